"""minitf side by side with PyTorch and HF transformers: one process, the same weights.

    python bench/compare.py                            # the shipped model, 1 thread
    python bench/compare.py --model runs/bpe --repeats 9
    python bench/compare.py --threads 2 --no-train
    python bench/compare.py --no-long --no-batch     # the decode workload only
    python bench/compare.py --train-only --repeats 7        # training tokens/s only
    python bench/compare.py --config gpt2 --repeats 3       # GPT-2 small's shape: docs/gpt2.md
    python bench/compare.py --config gpt2 --memory-only     # its peak-memory step alone

Workloads (always `decode`, which the others' ratios need; `long` and `batch` unless
--no-long, --no-batch):

`decode` (issue 6): batch 1, a 16-token prompt, then 112 new tokens (to the end of the
128-token context). For every engine it prints
- decode µs/token: (time to generate 112 tokens - time to generate 1) / 111, prefill and
  sampling included in both, so what is left is the per-token cost of a decode step and of
  choosing the token (greedy unless the row says top-p);
- prefill-128 ms: one forward pass over 128 tokens that fills the KV cache and returns the
  last position's logits (what generation needs; HF: `logits_to_keep=1`);
- training tokens/s (unless --no-train): forward, backward, gradient clipping and an AdamW
  step (`minitf.trainer.train_step` on every backend) on a batch of 32 windows of the
  model's context, against PyTorch eager autograd on the same weights, at each of
  --train-threads thread counts, for the model and for the `small` preset;
and each figure's ratio to the fastest minitf row (> 1: slower than minitf). Medians over
--repeats runs; engines take turns within each run, so a busy machine slows all of them.

`long`: batch 1, a 16-token prompt, then 1,000 new tokens, far past the context: the
average µs per token over all 1,000 (prompt prefill included) with context_mode shift
(keep 64: a re-prefill of 64 tokens every 64 tokens) and exact (a re-prefill of the last
128 tokens per token), and its ratio to the same engine's in-context decode µs/token (the
`decode` workload's figure, measured just before it in every run; the median of the runs'
ratios, which a load changing between workloads does not move). The minimal PyTorch GPT runs the same two
policies; HF `generate` is asked for 1,000 tokens and its own behaviour past `n_positions`
is reported as it is (it raises once a position past the context is needed).

`batch`: 16 prompts of 16 tokens, 112 new tokens each, decoded together (minitf:
`Engine.generate_batch`, one compiled call per step for all rows; PyTorch: the minimal GPT
with a (rows, ...) KV cache; HF: `generate` on the batch, left-padded with an attention
mask, which these equal-length prompts do not need). Decode tokens/s = 16 x 111 / (time of
112 tokens - time of 1), and its ratio to the same engine's batch-1 decode tokens/s
(measured just before it in every run, as for `long`) and to HF's batch.

Before timing, every float32 engine's logits (over 128 tokens) are checked against minitf's
numpy reference on the same weights (1e-4, absolute) and its 112 greedy tokens against
minitf's, and each minitf int8 engine against its backend's unfused path; the run stops with
an error if one differs. PyTorch's `quantize_dynamic` int8 quantizes differently from
minitf (per-tensor activation scales), so its logits are reported, not checked. The long
and batch workloads check their greedy tokens too: every minitf row of a batch against
the same engine's batch-1 generation, PyTorch's and HF's against minitf's numpy engine.
PyTorch and transformers are optional (test extras): a missing one is skipped with a message.

`--config gpt2` (`main_gpt2`): a random-weight model of GPT-2 small's exact shape, the same
checks, then decode (GPT2_NEW new tokens) and prefill-128 at 1 and 2 threads for minitf's
float32 and W8A8 engines (all linears with a float32 head, and all linears + the int8 head
of `quantize --int8-head`), PyTorch eager and HF `generate`, each decode time also over the
time of reading the engine's weights once at the memory bandwidth measured in the same run;
then the peak memory of the float32 and each int8 generation, each in a fresh process, on
the numba and the cython fused path (`peak_memory`; alone: --memory-only).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import minitf  # noqa: F401 (before numpy: minitf sets OpenBLAS's idle spin as its commands run it)
import numpy as np

# measures the installed minitf (a checkout: `pip install -e .`); `python -m minitf.kernels`
# and the header below say which build and int8 variant each backend runs
from minitf.cli import Parser
from minitf.config import GPTConfig
from minitf.engine import DEFAULT_MODEL_DIR, Engine
from minitf.hf import config_to_hf, params_to_hf
from minitf.kernels import BACKENDS, describe
from minitf.quantization import quantize_model
from minitf.threads import set_threads

PROMPT, NEW, PREFILL = 16, 112, 128
LONG_NEW, KEEP = 1000, 64  # the long workload: new tokens, and the tokens shift keeps
BATCH_ROWS = 16  # the batch workload: prompts of PROMPT tokens, NEW new tokens each
TRAIN_BATCH = 32
TIMED_STEPS = 2  # training steps timed per engine per turn
CHECK_ATOL = 1e-4


# ----------------------------------------------------------------------------------------
# The model


def load_model(model_dir: str | None) -> tuple[GPTConfig, dict[str, np.ndarray], str]:
    """(config, float32 params, description): --model, else the shipped model, else a
    default-size model with a 1024-token vocabulary from minitf.model.init_params."""
    from minitf.checkpoint import load_checkpoint

    path = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if model_dir or (path / "model.safetensors").is_file():
        ckpt = load_checkpoint(path)
        if (ckpt.meta or {}).get("quantization"):
            sys.exit(f"compare.py: {path} is an int8 model; give the float32 model it came from")
        params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in ckpt.params.items()}
        return ckpt.config, params, str(path)
    from minitf.model import init_params

    config = GPTConfig(vocab_size=1024)
    return config, init_params(config, seed=0), "init_params(GPTConfig(vocab_size=1024), seed=0)"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------
# Engines: each has prefill(ids) -> last logits (V,) and generate(ids, n) -> n token ids


class MinitfEngine:
    def __init__(self, name: str, engine: Engine, top_p: float | None = None):
        from minitf.sampling import Sampler

        self.name, self.engine, self.family = name, engine, "minitf"
        self.sample = (lambda logits: int(np.argmax(logits))) if top_p is None else \
            Sampler(temperature=1.0, top_p=top_p, seed=0)

    def prefill(self, ids):
        return self.engine.prefill(ids, last_only=True)

    def logits(self, ids):
        return self.engine.prefill(ids)

    def generate(self, ids, n, context_mode="shift"):
        keep = KEEP if context_mode == "shift" else None
        return list(self.engine.generate(ids, n, self.sample, context_mode=context_mode, keep=keep))

    def generate_batch(self, prompts, n):
        rows = [[] for _ in prompts]
        for step in self.engine.generate_batch(prompts, n, [self.sample] * len(prompts)):
            for row, token in zip(rows, step):
                row.append(token)
        return rows


def torch_model(config: GPTConfig, params: dict[str, np.ndarray]):
    """A minimal PyTorch GPT-2 (eager), our weights, a preallocated KV cache."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    C, NH, L, B = config.d_model, config.n_head, config.n_layer, config.block_size
    HS = C // NH
    t = lambda name: torch.from_numpy(np.array(params[name]))

    def linear(prefix):  # ours (in, out) -> nn.Linear's (out, in)
        lin = nn.Linear(*params[prefix + ".weight"].shape)
        lin.weight.data = t(prefix + ".weight").T.contiguous()
        lin.bias.data = t(prefix + ".bias")
        return lin

    def layernorm(prefix):
        ln = nn.LayerNorm(C, eps=config.layer_norm_eps)
        ln.weight.data, ln.bias.data = t(prefix + ".weight"), t(prefix + ".bias")
        return ln

    class Block(nn.Module):
        def __init__(self, i):
            super().__init__()
            p = f"h.{i}."
            self.ln_1, self.ln_2 = layernorm(p + "ln_1"), layernorm(p + "ln_2")
            self.c_attn, self.attn_proj = linear(p + "attn.c_attn"), linear(p + "attn.c_proj")
            self.c_fc, self.mlp_proj = linear(p + "mlp.c_fc"), linear(p + "mlp.c_proj")

        def forward(self, x, cache=None, pos=0):
            Bt, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (a.view(Bt, T, NH, HS).transpose(1, 2) for a in (q, k, v))  # (B, NH, T, HS)
            if cache is not None:  # append to the preallocated cache, attend to all of it
                k_cache, v_cache = cache
                k_cache[:, :, pos:pos + T] = k
                v_cache[:, :, pos:pos + T] = v
                k, v = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            x = x + self.attn_proj(y.transpose(1, 2).reshape(Bt, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Parameter(t("wte")), nn.Parameter(t("wpe"))
            self.blocks = nn.ModuleList(Block(i) for i in range(L))
            self.ln_f = layernorm("ln_f")
            self.k_cache = self.v_cache = torch.zeros(L, 0, NH, B, HS)

        def forward(self, idx, pos=0, cache=False, last_only=False):
            Bt, T = idx.shape
            if cache and self.k_cache.shape[1] != Bt:  # one cache row per sequence
                self.k_cache, self.v_cache = torch.zeros(L, Bt, NH, B, HS), torch.zeros(L, Bt, NH, B, HS)
            x = self.wte[idx] + self.wpe[pos:pos + T]
            for i, block in enumerate(self.blocks):
                x = block(x, (self.k_cache[i], self.v_cache[i]) if cache else None, pos)
            x = self.ln_f(x[:, -1:] if last_only else x)
            return x @ self.wte.T  # tied head

    return TorchGPT()


class TorchEngine:
    """PyTorch eager: prefill then one cached step per token, greedy."""

    def __init__(self, name: str, model):
        import torch

        self.name, self.model, self.torch, self.family = name, model.eval(), torch, "torch"

    def prefill(self, ids):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids]), cache=True, last_only=True)[0, -1]

    def logits(self, ids):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids]))[0].numpy()

    def generate(self, ids, n, context_mode="shift"):
        """Greedy; past the context the policy of minitf's context_mode: shift re-prefills
        the last KEEP tokens once the cache is full, exact the last block_size for every
        token."""
        torch, B = self.torch, self.model.wpe.shape[0]
        keep = KEEP if context_mode == "shift" else B
        window, out = list(ids[-B:]), []
        with torch.inference_mode():
            logits = self.model(torch.tensor([window]), cache=True, last_only=True)[0, -1]
            for i in range(n):
                token = int(torch.argmax(logits))
                out.append(token)
                if i == n - 1:
                    break
                if len(window) < B:
                    logits = self.model(torch.tensor([[token]]), pos=len(window), cache=True)[0, -1]
                    window.append(token)
                else:  # the window is full: re-prefill its last `keep` tokens
                    window = (window + [token])[-keep:]
                    logits = self.model(torch.tensor([window]), cache=True, last_only=True)[0, -1]
        return out

    def generate_batch(self, prompts, n):
        """Greedy, every row one step at a time (the prompts have one length)."""
        torch = self.torch
        x = torch.tensor(prompts)
        out = []
        with torch.inference_mode():
            logits = self.model(x, cache=True, last_only=True)[:, -1]
            for i in range(n):
                tokens = torch.argmax(logits, dim=-1)
                out.append(tokens)
                if i < n - 1:
                    logits = self.model(tokens[:, None], pos=x.shape[1] + i, cache=True)[:, -1]
        return torch.stack(out, dim=1).tolist()


def hf_model(config: GPTConfig, params: dict[str, np.ndarray]):
    """transformers' GPT2LMHeadModel with our weights (its Conv1D weights are (in, out) too)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config.from_dict({**config_to_hf(config), "pad_token_id": 0})
    model = GPT2LMHeadModel(hf_config).eval()
    state = {name: torch.from_numpy(np.array(value)) for name, value in params_to_hf(params).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight" and not m.endswith(".attn.bias")]
    if missing or unexpected:
        sys.exit(f"compare.py: HF GPT-2 weights do not map: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class HFEngine:
    """transformers' `generate`, greedy or nucleus (top-p, top_k off) sampling."""

    def __init__(self, name: str, model, top_p: float | None = None):
        import torch

        self.name, self.model, self.torch, self.family = name, model, torch, "hf"
        self.kwargs = dict(do_sample=False) if top_p is None else \
            dict(do_sample=True, top_p=top_p, top_k=0, temperature=1.0)

    def prefill(self, ids):
        x = self.torch.tensor([ids])
        with self.torch.inference_mode():
            out = self.model(x, attention_mask=self.torch.ones_like(x), use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def logits(self, ids):
        x = self.torch.tensor([ids])
        with self.torch.inference_mode():
            return self.model(x, attention_mask=self.torch.ones_like(x)).logits[0].numpy()

    def generate(self, ids, n, context_mode=None):
        return self.generate_batch([ids], n)[0]

    def generate_batch(self, prompts, n, logits_processor=None):
        """`generate` on the prompts left-padded to one length (pad id 0, masked out)."""
        torch = self.torch
        T = max(len(p) for p in prompts)
        x = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      logits_processor=logits_processor, **self.kwargs)
        return out[:, T:].tolist()

    def past_the_context(self, ids, n) -> str:
        """What HF's `generate` does when asked for n tokens past n_positions."""
        from transformers import LogitsProcessor, LogitsProcessorList

        class Count(LogitsProcessor):  # called once per new token
            calls = 0

            def __call__(self, input_ids, scores):
                Count.calls += 1
                return scores

        try:
            got = self.generate_batch([ids], n, LogitsProcessorList([Count()]))[0]
        except Exception as exc:  # noqa: BLE001 - reported as it is
            return (f"raises {type(exc).__name__} ({str(exc)[:40]}) after {Count.calls} new tokens, "
                    f"forwarding position {len(ids) + Count.calls - 1} (n_positions "
                    f"{self.model.config.n_positions})")
        return f"returns {len(got)} tokens"


# ----------------------------------------------------------------------------------------
# Checks and timing


def check(engines, config, params, quantized, prompt_128, new: int = NEW) -> list[str]:
    """Check every engine's logits over 128 tokens and its greedy tokens; raise SystemExit
    naming the first that differs. Float32 engines (minitf's, PyTorch's, HF's) against
    minitf's numpy engine; a minitf int8 engine against the same backend's unfused path:
    W8A8 quantizes activations at run time, so backends whose float kernels round 1 ulp
    apart can put an activation in the next int8 step, and int8 logits differ between
    backends by up to ~0.1 by design (reported, not checked)."""
    lines = []
    prompt = prompt_128[:PROMPT]
    reference = engines[0]
    want_logits, want_tokens = reference.logits(prompt_128), reference.generate(prompt, new)
    int8_numpy = {}
    for e in engines[1:]:
        if "quantize_dynamic" in e.name:  # another int8 method: report, do not check
            err = np.abs(e.logits(prompt_128) - want_logits).max()
            lines.append(f"  {e.name}: not checked (another int8 method); max |logit - minitf "
                         f"float32| {err:.3f}")
            continue
        ref, ref_logits, ref_tokens, note = reference, want_logits, want_tokens, ""
        if e.family == "minitf" and " int8 " in e.name:
            label = e.name.split(" int8 ")[1].split(",")[0]
            if e.engine.backend == "numpy":
                int8_numpy[label] = e
                continue
            scope_mode = quantized[label]
            ref = MinitfEngine(f"its unfused path", Engine(config, scope_mode[0], e.engine.backend,
                                                            int8_mode=scope_mode[1], fused=False))
            ref_logits, ref_tokens = ref.logits(prompt_128), ref.generate(prompt, new)
            if label in int8_numpy:
                across = np.abs(e.logits(prompt_128) - int8_numpy[label].logits(prompt_128)).max()
                note = f" (vs minitf numpy int8 {label}: {across:.1e})"
        err = float(np.abs(e.logits(prompt_128) - ref_logits).max())
        if not err <= CHECK_ATOL:
            sys.exit(f"compare.py: {e.name}: logits differ from {ref.name} by {err:.2e} > {CHECK_ATOL}")
        same = ""
        if "top-p" not in e.name:
            got = e.generate(prompt, new)
            if got != ref_tokens:
                first = next(i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b)
                sys.exit(f"compare.py: {e.name}: greedy tokens differ from {ref.name} at new token {first}")
            same = f", {new} greedy tokens identical"
        lines.append(f"  {e.name}: max |logit diff| vs {ref.name} {err:.1e}{same}{note}")
    return lines


def time_call(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def decode_per_token(e, prompt, new: int = NEW) -> float:
    """The decode workload's figure: (time of `new` tokens - time of 1) / (new - 1), seconds."""
    return (time_call(e.generate, prompt, new) - time_call(e.generate, prompt, 1)) / (new - 1)


def measure(engines, prompt_128, repeats: int, new: int = NEW,
            prefill_best_of: int = 3) -> dict[str, dict[str, list[float]]]:
    """Decode s/token (`new` tokens) and prefill-128 s (best of `prefill_best_of`) per
    engine and repeat, engines taking turns."""
    prompt = prompt_128[:PROMPT]
    res = {e.name: {"decode": [], "prefill": []} for e in engines}
    for e in engines:  # warm up: compile, load caches, touch buffers
        e.generate(prompt, new)
        e.prefill(prompt_128)
    for _ in range(repeats):
        for e in engines:
            res[e.name]["decode"].append(decode_per_token(e, prompt, new))
            res[e.name]["prefill"].append(min(time_call(e.prefill, prompt_128)
                                              for _ in range(prefill_best_of)))
    return res


def check_long_and_batch(long_engines, batch_engines, reference, prompts) -> list[str]:
    """Greedy tokens of the long workload (each context mode) and of every row of the batch
    workload: float32 engines' (minitf's fused ones, PyTorch's, HF's) against the minitf
    `reference` engine (float32 numpy), every minitf engine's batch rows against its own
    batch-1 generation. SystemExit naming the first that differs."""
    lines, prompt = [], prompts[0]
    want = {mode: reference.generate(prompt, LONG_NEW, mode) for mode in ("shift", "exact")}
    for e, mode in long_engines:
        if e is reference or " int8 " in e.name:  # int8: differs from float32 by design
            continue
        got = e.generate(prompt, LONG_NEW, mode)
        if got != want[mode]:
            first = next(i for i, (a, b) in enumerate(zip(got, want[mode])) if a != b)
            sys.exit(f"compare.py: {e.name} {mode}: greedy tokens differ from minitf numpy at new token {first}")
    lines.append(f"  long: {LONG_NEW} greedy tokens of every float32 engine identical to minitf numpy's, "
                 "shift and exact")
    want_rows = reference.generate_batch(prompts, NEW)
    for e in batch_engines:
        rows = e.generate_batch(prompts, NEW)
        alone = [e.generate(p, NEW) for p in prompts] if e.family == "minitf" else want_rows
        if rows != alone:
            r = next(i for i, (a, b) in enumerate(zip(rows, alone)) if a != b)
            what = "its batch-1 generation" if e.family == "minitf" else "minitf's"
            sys.exit(f"compare.py: {e.name}: batch row {r} differs from {what}")
    lines.append(f"  batch: every row of {BATCH_ROWS} identical to batch-1 generation (minitf) "
                 "and to minitf's rows (PyTorch, HF)")
    return lines


def measure_long(long_engines, prompt, repeats: int) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per (engine, context mode) and repeat: seconds per token over all LONG_NEW tokens, and
    that over the engine's in-context decode seconds per token measured right before it
    (the ratio of each repeat, so that a machine whose load changes between the workloads
    does not move it)."""
    res = {(e.name, mode): {"all": [], "ratio": []} for e, mode in long_engines}
    for _ in range(repeats):
        for e, mode in long_engines:
            decode = decode_per_token(e, prompt)
            t = time_call(e.generate, prompt, LONG_NEW, mode) / LONG_NEW
            res[(e.name, mode)]["all"].append(t)
            res[(e.name, mode)]["ratio"].append(t / decode)
    return res


def measure_batch(batch_engines, prompts, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Per engine and repeat: decode seconds per row-token, (time of NEW tokens - time of 1)
    / ((NEW - 1) rows); the whole generation's seconds per token; and the ratio of the
    engine's batch-1 decode seconds per token, measured right before, to the first (how
    many times the batch-1 tokens/s)."""
    res = {e.name: {"decode": [], "total": [], "x_batch_1": []} for e in batch_engines}
    for e in batch_engines:  # warm up: buffers for the rows, thread pools
        e.generate_batch(prompts, NEW)
    for _ in range(repeats):
        for e in batch_engines:
            single = decode_per_token(e, prompts[0])
            many, one = time_call(e.generate_batch, prompts, NEW), time_call(e.generate_batch, prompts, 1)
            decode = (many - one) / ((NEW - 1) * len(prompts))
            res[e.name]["decode"].append(decode)
            res[e.name]["total"].append(many / (NEW * len(prompts)))
            res[e.name]["x_batch_1"].append(single / decode)
    return res


def training_steps(config, params, threads: int) -> dict[str, object]:
    """{engine: step()} for a TRAIN_BATCH x block_size batch on `threads` threads:
    `minitf.trainer.train_step` (forward, hand-written backward, clipping, AdamW) on each
    backend, with `StepThreads` as `python -m minitf.train --threads` runs it, and PyTorch
    eager (autograd, clip_grad_norm_, torch.optim.AdamW) on the same weights and batch."""
    from minitf.kernels import get_backend
    from minitf.model import GPT
    from minitf.optim import AdamW
    from minitf.trainer import StepThreads, train_step

    rng = np.random.default_rng(0)
    T = config.block_size
    x = rng.integers(0, config.vocab_size, size=(TRAIN_BATCH, T))
    y = rng.integers(0, config.vocab_size, size=(TRAIN_BATCH, T))
    steps = {}
    for backend in BACKENDS:
        K = get_backend(backend)
        p = {k: v.copy() for k, v in params.items()}
        model, opt = GPT(config, p, K), AdamW(p, lr=1e-4, ops=K)
        steps[f"minitf {backend}"] = partial(train_step, model, opt, x, y, 1e-4, 1.0, None,
                                             StepThreads(model, opt, threads))
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        print(f"training: PyTorch skipped ({exc})")
        return steps
    tm = torch_model(config, params).train()
    decay = [q for n, q in tm.named_parameters() if q.dim() == 2]
    no_decay = [q for n, q in tm.named_parameters() if q.dim() != 2]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.99))
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def torch_step():
        logits = tm(tx)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), ty.view(-1))
        topt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        topt.step()

    steps["PyTorch eager"] = torch_step
    return steps


def training(sizes: dict, threads: list[int], repeats: int) -> list[tuple[str, str, int, float]]:
    """[(size, engine, threads, tokens/s)]: the median step of every engine, per size and
    thread count. Engines take turns, a few steps each (one untimed, then TIMED_STEPS):
    long enough for the thread pools one leaves spinning (OpenBLAS, OpenMP) to settle,
    short enough that a busy machine slows every engine alike."""
    rows = []
    for label, (config, params) in sizes.items():
        for n in threads:
            set_threads(n)
            try:
                import torch

                torch.set_num_threads(n)
            except ImportError:
                pass
            steps = training_steps(config, params, n)
            for step in steps.values():  # warm up: compilation, buffers, thread pools
                for _ in range(2):
                    step()
            times = {name: [] for name in steps}
            for _ in range(repeats):
                for name, step in steps.items():
                    step()
                    times[name] += [time_call(step) for _ in range(TIMED_STEPS)]
            tokens = TRAIN_BATCH * config.block_size
            rows += [(label, name, n, tokens / statistics.median(ts)) for name, ts in times.items()]
            del steps  # free this size's buffers before the next
    return rows


def training_sizes(config, params) -> dict:
    """{label: (config, float32 params)}: the compared model, and the `small` preset with its
    vocabulary (init_params, seed 0)."""
    from minitf.config import PRESETS
    from minitf.model import init_params

    small = dataclasses.replace(PRESETS["small"], vocab_size=config.vocab_size)
    return {"model": (config, params), "small": (small, init_params(small, seed=0))}


def print_training(rows, sizes) -> None:
    """One table per size: tokens/s of each engine at each thread count, and its ratio to
    PyTorch eager at the same threads."""
    for label, (config, _) in sizes.items():
        print()
        print(f"training step, {label}: d_model {config.d_model}, {config.n_layer} layers, vocab "
              f"{config.vocab_size}, batch {TRAIN_BATCH} x {config.block_size} (forward + backward "
              f"+ clip + AdamW), medians:")
        threads = sorted({n for size, _, n, _ in rows if size == label})
        print(f"{'engine':<24}" + "".join(f"{f'{n} thr tok/s':>15}{'x torch':>9}" for n in threads))
        table = {(name, n): tps for size, name, n, tps in rows if size == label}
        for name in dict.fromkeys(name for size, name, _, _ in rows if size == label):
            cells = ""
            for n in threads:
                torch_tps = table.get(("PyTorch eager", n))
                ratio = f"{table[(name, n)] / torch_tps:>9.2f}" if torch_tps else f"{'':>9}"
                cells += f"{table[(name, n)]:>15,.0f}{ratio}"
            print(f"{name:<24}{cells}")


# ----------------------------------------------------------------------------------------
# --config gpt2: GPT-2 small's exact shape, random weights, decode and prefill only

GPT2_SMALL = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768)
GPT2_NEW = 24  # new tokens per timed generation (fewer than NEW: a step takes tens of ms)
GPT2_THREADS = (1, 2)
HEAD_LABEL = "w8a8 (all + head)"  # W8A8 linears and the int8 tied head (quantize --int8-head)
BANDWIDTH_BYTES = 1 << 30  # the bandwidth buffer: 1 GiB, far larger than any L3


def memory_bandwidth(threads: int, repeats: int = 5) -> float:
    """Bytes per second that `threads` threads read from memory: the best of `repeats` times
    of a float32 dot product of a BANDWIDTH_BYTES buffer with itself (BLAS sdot on one
    thread each, one contiguous slice per thread; numpy releases the GIL in it). Each 4
    bytes read take one multiply-add on vector registers, so memory, not arithmetic, sets
    its speed (numpy's sum, a pairwise sum, read slower here): the speed a
    decode step that reads each weight once could reach. The best time, not the median:
    on a shared machine the others' load only ever slows it, and a bandwidth taken too low
    would flatter the ratios."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    a = np.ones(BANDWIDTH_BYTES // 4, np.float32)  # written once: every page is resident
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool, threadpool_limits(1, user_api="blas"):
        def read():
            list(pool.map(lambda p: np.dot(p, p), parts))
        read()
        t = min(time_call(read) for _ in range(repeats))
    return a.nbytes / t


def weight_bytes(params: dict[str, np.ndarray]) -> int:
    """Bytes a decode step must read at least once: every tensor but wpe (one row of it
    per token), the tied head counted once, as stored (int8 weights and their scales)."""
    return sum(a.nbytes for name, a in params.items() if name != "wpe")


def gpt2_engines(config, params, quantized) -> tuple[list, list[str], list[str]]:
    """(engines, versions, skipped) of the gpt2 comparison: minitf numpy (the reference),
    numba and cython float32 and each int8 model of `quantized` ({label: (params, mode)}:
    W8A8 all linears with a float32 head, and with the int8 head), the minimal PyTorch GPT
    and HF `generate`. The fused rows run the path the engine chooses (`fused=None`)."""
    versions, skipped = [f"numpy {np.__version__}"], []
    engines = [MinitfEngine("minitf numpy float32", Engine(config, params, "numpy"))]
    for backend in BACKENDS[1:]:
        engines.append(MinitfEngine(f"minitf {backend} float32", Engine(config, params, backend)))
        for label, (qparams, mode) in quantized.items():
            engines.append(MinitfEngine(f"minitf {backend} int8 {label}",
                                        Engine(config, qparams, backend, int8_mode=mode)))
    try:
        import torch

        versions.append(f"torch {torch.__version__}")
        engines.append(TorchEngine("PyTorch eager, KV cache, float32", torch_model(config, params)))
        try:
            import transformers

            versions.append(f"transformers {transformers.__version__}")
            transformers.logging.set_verbosity_error()
            engines.append(HFEngine("HF GPT2LMHeadModel.generate, greedy", hf_model(config, params)))
        except ImportError as exc:
            skipped.append(f"HF transformers skipped: {exc} (pip install transformers)")
    except ImportError as exc:
        skipped.append(f"PyTorch and HF transformers skipped: {exc} (pip install torch transformers)")
    return engines, versions, skipped


# the child of `peak_memory`: load the tensors with the reader of load_checkpoint, build the
# engine (which takes them, as load_engine does), generate; print peak RSS and RSS at the end
# (Linux)
_PEAK_RSS_CHILD = """
import json, sys
import numpy as np
from minitf.checkpoint import load_safetensors
from minitf.config import GPTConfig
from minitf.engine import Engine
path, config, mode, new, backend = (sys.argv[1], GPTConfig(**json.loads(sys.argv[2])), sys.argv[3],
                                    int(sys.argv[4]), sys.argv[5])
engine = Engine(config, load_safetensors(path)[0], backend, int8_mode=mode, take_params=True)
tokens = list(engine.generate(list(range(16)), new, lambda logits: int(np.argmax(logits))))
with open("/proc/self/status") as f:  # VmHWM: this process's peak (ru_maxrss survives exec)
    kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
           if k in ("VmHWM", "VmRSS")}
print(kib["VmHWM"] * 1024, kib["VmRSS"] * 1024)
"""
MEMORY_BACKENDS = ("numba", "cython")  # the fused backends, each measured


def peak_memory(config, models: dict[str, tuple[dict, str]], new: int = 16,
                backends=MEMORY_BACKENDS) -> dict[tuple[str, str], tuple[int, int]]:
    """{(backend, label): (peak, final) resident bytes} of a fresh process per backend and model that
    loads its tensors from a safetensors file (`minitf.checkpoint.load_safetensors`, the
    reader of load_checkpoint: one tensor after another into its array), builds an Engine
    of that backend (its fused path) which takes the loaded tensors as `load_engine` does,
    and generates `new` greedy tokens after a 16-token prompt: the child's VmHWM (Linux),
    which includes Python, numpy and the backend's compiled kernels (the same in every
    child of a backend) and the loading itself; and its VmRSS after generating, what the
    generation holds once loading is over. Not getrusage's ru_maxrss: Linux carries it over
    exec from the parent, this whole run. The children run one after the other."""
    import json
    import subprocess
    import tempfile

    from safetensors.numpy import save_file

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (params, mode) in models.items():
            path = os.path.join(tmp, "model.safetensors")
            save_file(params, path)
            for backend in backends:
                done = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHILD, path,
                                       json.dumps(dataclasses.asdict(config)), mode, str(new), backend],
                                      capture_output=True, text=True, cwd=tmp)  # not a checkout's
                if done.returncode != 0:  # say why, not only that it failed
                    sys.exit(f"compare.py: the peak-memory process of {backend} {label} failed "
                             f"({done.returncode}): {(done.stderr.strip().splitlines() or [''])[-1]}")
                hwm, rss = done.stdout.split()[-2:]
                out[backend, label] = int(hwm), int(rss)
    return out


def print_peak_memory(peak: dict[tuple[str, str], tuple[int, int]]) -> None:
    """Per backend, a line of each model's peak and its ratio to the float32 one, and a line
    of the same after generating."""
    print("peak resident memory of a generation (a fresh process: load the safetensors file, build "
          "an Engine (fused path) that takes the loaded tensors, 16 new tokens; VmHWM), and "
          "resident at its end (VmRSS):")
    for backend in dict.fromkeys(b for b, _ in peak):
        for i, what in enumerate(("peak", "end")):
            row = {label: n[i] for (b, label), n in peak.items() if b == backend}
            print(f"  {backend} {what}: " + ", ".join(f"{label} {n / 2**20:,.0f} MiB" for label, n in row.items()) +
                  "; " + ", ".join(f"{label} / float32 = {n / row['float32']:.2f}"
                                   for label, n in row.items() if label != "float32"))


def gpt2_models(config, params) -> dict[str, tuple[dict, str]]:
    """The int8 models of the gpt2 comparison, {label: (params, int8 mode)}: W8A8 all
    linears with a float32 head, and with the int8 head (quantize --int8-head)."""
    return {"w8a8 (all)": (quantize_model(params, config, "all")[0], "w8a8"),
            HEAD_LABEL: (quantize_model(params, config, "all", head=True)[0], "w8a8")}


def main_gpt2_memory() -> int:
    """`--config gpt2 --memory-only`: the peak-memory step alone (no engines in this
    process, no checks or timings)."""
    from minitf.model import init_params

    config = GPT2_SMALL
    print(f"minitf peak memory, {datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}")
    params = init_params(config, seed=0)
    quantized = gpt2_models(config, params)
    peak = peak_memory(config, {"float32": (params, "weight-only"),
                                **{f"int8 {label}": q for label, q in quantized.items()}})
    print_peak_memory(peak)
    return 0


def main_gpt2(args) -> int:
    """`--config gpt2`: the decode and prefill table at GPT-2 small's size, at 1 and 2
    threads, with the machine's memory bandwidth measured in the same run and each decode
    time's ratio to the time of reading the engine's weights once."""
    import numba

    config = GPT2_SMALL
    print(f"minitf side by side, {datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}")
    t = time.perf_counter()
    from minitf.model import init_params

    params = init_params(config, seed=0)
    quantized = gpt2_models(config, params)
    engines, versions, skipped = gpt2_engines(config, params, quantized)
    versions.insert(1, f"numba {numba.__version__}")
    set_threads(1)  # the checks' thread count, and what the kernels line reports
    print(", ".join(versions))
    print("kernels:", *(describe(name) for name in BACKENDS), sep="\n  ")
    print(f"model: GPT-2 small's shape, random weights (init_params, seed 0): vocab {config.vocab_size}, "
          f"d_model {config.d_model}, {config.n_layer} layers, {config.n_head} heads, context "
          f"{config.block_size}; built in {time.perf_counter() - t:.0f} s")
    print(f"workload decode: batch 1, {PROMPT}-token prompt + {GPT2_NEW} new tokens, greedy; prefill "
          f"{PREFILL} tokens (last position's logits); medians of {args.repeats} runs")
    for line in skipped:
        print(line)
    rng = np.random.default_rng(0)
    prompt_128 = [int(t) for t in rng.integers(0, config.vocab_size, size=PREFILL)]
    print("checks:")
    for line in check(engines, config, params, quantized, prompt_128, GPT2_NEW):
        print(line)
    nbytes = {e.name: weight_bytes(quantized[e.name.split(" int8 ")[1]][0] if " int8 " in e.name
                                   else params) for e in engines}
    table, bandwidth = {}, {}
    for n in GPT2_THREADS:
        set_threads(n)
        try:
            import torch

            torch.set_num_threads(n)
        except ImportError:
            pass
        bandwidth[n] = memory_bandwidth(n)
        res = measure(engines, prompt_128, args.repeats, GPT2_NEW, prefill_best_of=1)
        table[n] = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in res.items()}
        bandwidth[n] = max(bandwidth[n], memory_bandwidth(n))  # the best of before and after
    hf = "HF GPT2LMHeadModel.generate, greedy"
    print()
    print("memory bandwidth (float32 dot over 1 GiB, best of 5 before and 5 after the timings): " +
          ", ".join(f"{n} thread(s) {bandwidth[n] / 1e9:.1f} GB/s" for n in GPT2_THREADS))
    print(f"weights read per decode step: float32 {weight_bytes(params) / 1e6:.0f} MB, "
          f"int8 w8a8 (all) {weight_bytes(quantized['w8a8 (all)'][0]) / 1e6:.0f} MB (float32 head), "
          f"int8 {HEAD_LABEL} {weight_bytes(quantized[HEAD_LABEL][0]) / 1e6:.0f} MB")
    head = f"{'engine':<40}"
    for n in GPT2_THREADS:
        head += f" | {f'{n} thr decode ms':>16} {'x read':>6} {'x HF':>5} {'prefill ms':>10} {'x HF':>5}"
    print(head)
    for e in engines:
        line = f"{e.name:<40}"
        for n in GPT2_THREADS:
            d, p = table[n][e.name]["decode"], table[n][e.name]["prefill"]
            read_once = nbytes[e.name] / bandwidth[n]
            hf_d, hf_p = (table[n][hf]["decode"], table[n][hf]["prefill"]) if hf in table[n] else (None, None)
            line += (f" | {d * 1e3:>16.1f} {d / read_once:>6.2f} "
                     f"{d / hf_d if hf_d else float('nan'):>5.2f} {p * 1e3:>10.0f} "
                     f"{p / hf_p if hf_p else float('nan'):>5.2f}")
        print(line)
    print(f"(x read: decode time / the time of reading the engine's weights once at the measured "
          f"bandwidth; x HF: time / HF's at the same threads; decode = (time of {GPT2_NEW} tokens "
          f"- time of 1) / {GPT2_NEW - 1}; prefill: one pass over {PREFILL} tokens)")
    del engines, res, e  # their memory, before the children that measure their own peak start
    peak = peak_memory(config, {"float32": (params, "weight-only"),
                                **{f"int8 {label}": q for label, q in quantized.items()}})
    print()
    print_peak_memory(peak)
    return 0


# ----------------------------------------------------------------------------------------


def thread_list(text: str) -> list[int]:
    """--train-threads: "1,2" -> [1, 2]."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python bench/compare.py",
        description="Decode, prefill and training speed of minitf's backends against PyTorch "
                    "eager and HF transformers, in one process, on the same weights.",
        epilog="example: python bench/compare.py --model runs/bpe --repeats 9")
    p.add_argument("--config", choices=["gpt2"], default=None,
                   help="gpt2: a random-weight model of GPT-2 small's shape (vocab 50257, 12 layers, "
                        "d_model 768, 12 heads, context 1024), decode and prefill at 1 and 2 threads "
                        "against the memory bandwidth (no training, long or batch workloads)")
    p.add_argument("--model", default=None,
                   help="float32 model directory (default: the shipped model, else a default-size "
                        "model with vocab 1024 from init_params)")
    p.add_argument("--threads", type=int, default=1, help="threads for decode and prefill (BLAS, numba, torch)")
    p.add_argument("--train-threads", type=thread_list, default=[1, 2],
                   help="comma-separated thread counts for the training step (default: 1,2)")
    p.add_argument("--repeats", type=int, default=5, help="runs per engine; figures are medians")
    p.add_argument("--no-train", action="store_true", help="skip the training comparison")
    p.add_argument("--no-long", action="store_true", help=f"skip the long workload ({LONG_NEW} tokens past the context)")
    p.add_argument("--no-batch", action="store_true", help=f"skip the batch workload ({BATCH_ROWS} prompts together)")
    p.add_argument("--train-only", action="store_true", help="only the training comparison")
    p.add_argument("--memory-only", action="store_true",
                   help="with --config gpt2: only the peak memory of each generation, each in a fresh "
                        "process (no checks or timings)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cores = os.cpu_count() or 1
    if not 1 <= args.threads <= cores:
        build_parser().error(f"--threads {args.threads} must be in [1, {cores}]")
    if not all(1 <= n <= cores for n in args.train_threads):
        build_parser().error(f"--train-threads {args.train_threads} must each be in [1, {cores}]")
    if args.repeats < 1:
        build_parser().error(f"--repeats {args.repeats} must be >= 1")
    if args.memory_only and args.config is None:
        build_parser().error("--memory-only measures GPT-2 small's shape: give --config gpt2 too")
    if args.config is not None:
        if args.model is not None:
            build_parser().error("--config gpt2 builds its own model: give --config or --model, not both")
        try:  # before numba's thread pool starts (below)
            import torch  # noqa: F401
        except ImportError:
            pass
        return main_gpt2_memory() if args.memory_only else main_gpt2(args)
    try:  # before set_threads: once numba.set_num_threads has started numba's OpenMP
        import torch  # noqa: F401  # workers, a torch imported later ran its 2-thread
    except ImportError:  # training step 13x slower (two OpenMP runtimes spinning)
        pass
    config, params, source = load_model(args.model)
    sizes = training_sizes(config, params)
    train_rows = [] if args.no_train else training(sizes, args.train_threads, args.repeats)
    if args.train_only:
        print(f"minitf training side by side, {datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}")
        print_training(train_rows, sizes)
        return 0
    set_threads(args.threads)
    versions = [f"numpy {np.__version__}"]
    import numba

    versions.append(f"numba {numba.__version__}")

    engines = []
    quantized = {"w8a8 (all)": (quantize_model(params, config, "all")[0], "w8a8"),
                 "weight-only (ffn)": (quantize_model(params, config, "ffn")[0], "weight-only")}
    for backend in BACKENDS:  # numpy first: the reference
        engines.append(MinitfEngine(f"minitf {backend} float32", Engine(config, params, backend)))
        for label, (q, mode) in quantized.items():
            engines.append(MinitfEngine(f"minitf {backend} int8 {label}",
                                        Engine(config, q, backend, int8_mode=mode)))
    best_int8 = next(e for e in engines if e.name == "minitf cython int8 w8a8 (all)")
    engines.append(MinitfEngine("minitf cython int8 w8a8 (all), top-p 0.9", best_int8.engine, top_p=0.9))
    skipped = []
    try:
        import torch

        torch.set_num_threads(args.threads)
        versions.append(f"torch {torch.__version__}")
        tm = torch_model(config, params)
        engines.append(TorchEngine("PyTorch eager, KV cache, float32", tm))
        with warnings.catch_warnings():  # deprecated for torchao, still what users have
            warnings.simplefilter("ignore")
            tq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(tm), {torch.nn.Linear},
                                                        dtype=torch.qint8)
        engines.append(TorchEngine("PyTorch eager + quantize_dynamic int8", tq))
        try:
            import transformers

            versions.append(f"transformers {transformers.__version__}")
            transformers.logging.set_verbosity_error()  # its padding advice does not apply here
            hf = hf_model(config, params)
            engines.append(HFEngine("HF GPT2LMHeadModel.generate, greedy", hf))
            engines.append(HFEngine("HF GPT2LMHeadModel.generate, top-p 0.9", hf, top_p=0.9))
        except ImportError as exc:
            skipped.append(f"HF transformers skipped: {exc} (pip install transformers)")
    except ImportError as exc:
        skipped.append(f"PyTorch and HF transformers skipped: {exc} (pip install torch transformers)")

    rng = np.random.default_rng(0)
    prompt_128 = [int(t) for t in rng.integers(0, config.vocab_size, size=PREFILL)]
    prompts = [prompt_128[:PROMPT]] + [[int(t) for t in rng.integers(0, config.vocab_size, size=PROMPT)]
                                       for _ in range(BATCH_ROWS - 1)]
    by_name = {e.name: e for e in engines}
    long_engines, batch_engines = [], []
    if not args.no_long:  # numpy: shift only (exact re-prefills 1,000 times on the reference)
        long_engines = [(by_name["minitf numpy float32"], "shift")]
        long_engines += [(by_name[f"minitf {b} {m}"], mode) for b in ("numba", "cython")
                         for m in ("float32", "int8 w8a8 (all)") for mode in ("shift", "exact")]
        long_engines += [(e, mode) for e in engines if e.name == "PyTorch eager, KV cache, float32"
                         for mode in ("shift", "exact")]
    if not args.no_batch:
        batch_engines = [by_name[f"minitf {b} {m}"] for b in BACKENDS
                         for m in ("float32", "int8 w8a8 (all)", "int8 weight-only (ffn)")]
        batch_engines += [e for e in engines if e.name in ("PyTorch eager, KV cache, float32",
                                                            "HF GPT2LMHeadModel.generate, greedy")]
    hf_greedy = by_name.get("HF GPT2LMHeadModel.generate, greedy")

    print(f"minitf side by side, {datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}")
    print(f"{', '.join(versions)}; {args.threads} thread(s) for decode and prefill")
    print("kernels:", *(describe(name) for name in BACKENDS), sep="\n  ")
    print(f"model: {source}: vocab {config.vocab_size}, d_model {config.d_model}, "
          f"{config.n_layer} layers, {config.n_head} heads, context {config.block_size}")
    print(f"workload decode: batch 1, {PROMPT}-token prompt + {NEW} new tokens; prefill {PREFILL} tokens; "
          f"medians of {args.repeats} runs")
    for line in skipped:
        print(line)
    print("checks:")
    for line in check(engines, config, params, quantized, prompt_128):
        print(line)
    if long_engines or batch_engines:
        for line in check_long_and_batch(long_engines, batch_engines, engines[0], prompts):
            print(line)

    res = measure(engines, prompt_128, args.repeats)
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in res.items()}
    ours = [e.name for e in engines if e.family == "minitf"]
    best_decode = min(med[n]["decode"] for n in ours)
    best_prefill = min(med[n]["prefill"] for n in ours)
    print()
    print(f"{'engine':<46} {'decode us/token':>15} {'x minitf':>9} {'prefill-128 ms':>15} {'x minitf':>9}")
    for e in engines:
        d, p = med[e.name]["decode"], med[e.name]["prefill"]
        print(f"{e.name:<46} {d * 1e6:>15.1f} {d / best_decode:>9.2f} {p * 1e3:>15.2f} {p / best_prefill:>9.2f}")
    print(f"(x minitf: time / the fastest minitf row's; decode {best_decode * 1e6:.1f} us/token, "
          f"prefill {best_prefill * 1e3:.2f} ms)")

    goals = []
    if long_engines:
        long = {k: {m: statistics.median(v) for m, v in r.items()}
                for k, r in measure_long(long_engines, prompts[0], args.repeats).items()}
        print()
        print(f"workload long: batch 1, {PROMPT}-token prompt + {LONG_NEW} new tokens past the "
              f"{config.block_size}-token context (shift: keep {KEEP}), greedy; medians of {args.repeats} runs")
        print(f"{'engine':<46} {'context':>8} {'us/token, all':>14} {'x its in-context decode':>24}")
        ratios = {}
        for e, mode in long_engines:
            t, ratios[(e.name, mode)] = long[(e.name, mode)]["all"], long[(e.name, mode)]["ratio"]
            print(f"{e.name:<46} {mode:>8} {t * 1e6:>14.1f} {ratios[(e.name, mode)]:>24.2f}")
        print("(x its in-context decode: the median over the runs of this figure / the engine's "
              "decode us/token measured just before it)")
        if hf_greedy is not None:
            print(f"{'HF GPT2LMHeadModel.generate':<46} {'-':>8}  {hf_greedy.past_the_context(prompts[0], LONG_NEW)}")
        for mode, goal in (("shift", 1.5), ("exact", 10.0)):
            name = min((n for (n, m) in ratios if m == mode and n.startswith("minitf")),
                       key=lambda n: long[(n, mode)]["all"])
            goals.append(f"long, {mode}, fastest minitf row ({name}): {ratios[(name, mode)]:.2f}x its "
                         f"in-context decode (goal <= {goal})")

    if batch_engines:
        bres = measure_batch(batch_engines, prompts, args.repeats)
        bmed = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in bres.items()}
        hf_tps = 1 / bmed[hf_greedy.name]["decode"] if hf_greedy in batch_engines else None
        print()
        print(f"workload batch: {BATCH_ROWS} prompts of {PROMPT} tokens + {NEW} new tokens each, decoded "
              f"together, greedy; medians of {args.repeats} runs")
        print(f"{'engine':<46} {'decode us/token':>15} {'tokens/s':>10} {'x batch-1':>10} {'x HF':>6} "
              f"{'all tokens/s':>13}")
        for e in batch_engines:
            d, tps = bmed[e.name]["decode"], 1 / bmed[e.name]["decode"]
            vs_hf = f"{tps * bmed[hf_greedy.name]['decode']:>6.2f}" if hf_tps else f"{'-':>6}"
            print(f"{e.name:<46} {d * 1e6:>15.1f} {tps:>10,.0f} {bmed[e.name]['x_batch_1']:>10.2f} {vs_hf} "
                  f"{1 / bmed[e.name]['total']:>13,.0f}")
        print("(decode us/token: per token of one row; x batch-1: decode tokens/s / the same engine's "
              "batch-1 decode tokens/s, measured just before it, median of the runs' ratios)")
        name = min((e.name for e in batch_engines if e.family == "minitf"), key=lambda n: bmed[n]["decode"])
        tps = 1 / bmed[name]["decode"]
        line = (f"batch, fastest minitf row ({name}): {tps:,.0f} tokens/s = "
                f"{bmed[name]['x_batch_1']:.2f}x its batch-1 decode, {best_decode * tps:.2f}x the "
                f"fastest batch-1 decode of the decode workload (goal >= 6)")
        if hf_tps:
            line += f", {tps / hf_tps:.2f}x HF generate's batch (goal >= 3)"
        goals.append(line)
    if goals:
        print()
        print("goals (issue 11):")
        for line in goals:
            print("  " + line)

    if train_rows:
        print_training(train_rows, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
