"""Inference: prefill the prompt in one pass, then decode one token at a time with a KV cache.

Every hot operation goes through a kernel backend (`minitf.kernels`: numpy, numba, cython),
so the same model runs on any of them. The KV cache is laid out (layer, position, d_model)
as in llama2.c: head h of a cached key is columns h*HS:(h+1)*HS of its row.

Past the context (block_size tokens) generation continues with a sliding window: the next
token is predicted from the last block_size tokens, re-prefilled at positions
0..block_size-1 (GPT-2's learned absolute positions make the cached keys invalid once the
window moves), exactly what a full forward over the cropped context would give, as
nanoGPT's `generate` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .config import GPTConfig
from .kernels import get_backend

# The small pretrained TinyShakespeare model that ships inside the package.
DEFAULT_MODEL_DIR = Path(__file__).parent / "pretrained"
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
INT8_MODES = ("weight-only", "w8a8")


@dataclass
class Linear:
    """A float32 linear layer y = x @ weight + bias, weight (K, M) as GPT-2 stores it."""

    weight: np.ndarray  # (K, M) float32
    bias: np.ndarray  # (M,) float32

    def __call__(self, kb, x: np.ndarray) -> np.ndarray:
        return kb.matmul(x, self.weight, self.bias)


@dataclass
class Int8Linear:
    """An int8 linear layer: weight_q (K, M) int8 with a float32 scale per output channel.

    No dequantized float copy is kept: the int8 kernel applies the scale once per output.
    `mode` is "weight-only" (float activations) or "w8a8" (activations quantized per token).
    """

    weight_q: np.ndarray  # (K, M) int8
    scale: np.ndarray  # (M,) float32
    bias: np.ndarray  # (M,) float32
    mode: str = "weight-only"
    # W8A8 on the fused path only (see FusedWeights): the same int8 weights in the VNNI tile
    # layout, and their column sums. Kept here so that memory accounting sees them.
    packed: np.ndarray | None = None  # (Mp/64 * Kp/4 * 64 * 4,) int8
    colsum: np.ndarray | None = None  # (Mp,) int32

    def __call__(self, kb, x: np.ndarray) -> np.ndarray:
        return kb.matmul_int8(x, self.weight_q, self.scale, self.bias, mode=self.mode)


def make_linear(params: dict[str, np.ndarray], name: str, int8_mode: str = "weight-only"):
    """The Linear or Int8Linear for `name` (e.g. "h.0.mlp.c_fc"), by the weight's dtype."""
    w, b = params[name + ".weight"], params[name + ".bias"].astype(np.float32)
    if w.dtype == np.int8:
        scale = np.ascontiguousarray(params[name + ".weight_scale"], dtype=np.float32)
        return Int8Linear(np.ascontiguousarray(w), scale, b, int8_mode)
    return Linear(np.ascontiguousarray(w, dtype=np.float32), b)


class Engine:
    """A GPT-2 model ready for generation on one kernel backend.

    Args:
        config: model sizes.
        params: `{name: array}`: float arrays, or for a quantized model int8 weights with a
            `<name>.weight_scale` float32 (M,) array beside each.
        backend: "numpy", "numba", "cython", "auto" or None (environment variable
            MINITF_BACKEND, else auto).
        int8_mode: how int8 layers run, "weight-only" or "w8a8".
    Raises:
        minitf.kernels.BackendError: the backend is unknown or cannot load.
        ValueError: int8_mode is unknown.
    """

    def __init__(self, config: GPTConfig, params: dict[str, np.ndarray], backend: str | None = None,
                 int8_mode: str = "weight-only"):
        if int8_mode not in INT8_MODES:
            raise ValueError(f"int8 mode {int8_mode!r} is not one of {INT8_MODES}")
        self.config = config
        self.kb = get_backend(backend)
        self.backend = self.kb.NAME
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
        self.wte = f32(params["wte"])  # (V, C) embedding and tied head
        self.wpe = f32(params["wpe"])  # (block_size, C)
        self.ln_f = (f32(params["ln_f.weight"]), f32(params["ln_f.bias"]))
        self.blocks = []
        for i in range(config.n_layer):
            p = f"h.{i}."
            self.blocks.append({
                "ln_1": (f32(params[p + "ln_1.weight"]), f32(params[p + "ln_1.bias"])),
                "ln_2": (f32(params[p + "ln_2.weight"]), f32(params[p + "ln_2.bias"])),
                **{lin: make_linear(params, p + lin, int8_mode) for lin in LINEARS},
            })
        L, T, C = config.n_layer, config.block_size, config.d_model
        self.k_cache = np.zeros((L, T, C), dtype=np.float32)  # (layer, position, d_model)
        self.v_cache = np.zeros((L, T, C), dtype=np.float32)
        self.pos = 0  # number of positions filled in the cache
        # trace(op_name) is called after every operation when set (memory plots); None = off
        self.trace: Callable[[str], None] | None = None
        # when True, every prefill keeps its attention weights in last_attention (plots)
        self.capture_attention = False
        self.last_attention: list[np.ndarray] | None = None

    # ------------------------------------------------------------------------------------
    def _mark(self, op: str) -> None:
        if self.trace is not None:
            self.trace(op)

    def _forward(self, idx: np.ndarray, start: int, attention_out=None) -> np.ndarray:
        """Run tokens idx (T,) at positions start..start+T-1 against the cache; (T, V) logits."""
        kb, cfg = self.kb, self.config
        T, C = len(idx), cfg.d_model
        end = start + T
        x = self.wte[idx] + self.wpe[start:end]  # (T, C)
        self._mark("embedding")
        for l, blk in enumerate(self.blocks):
            h = kb.layernorm(x, *blk["ln_1"], cfg.layer_norm_eps)  # (T, C)
            self._mark(f"h.{l}.ln_1")
            qkv = blk["attn.c_attn"](kb, h)  # (T, 3C)
            self.k_cache[l, start:end] = qkv[:, C:2 * C]  # append this step's keys
            self.v_cache[l, start:end] = qkv[:, 2 * C:]  # and values
            att = None if attention_out is None else attention_out[l]
            a = kb.attention(np.ascontiguousarray(qkv[:, :C]), self.k_cache[l, :end],
                             self.v_cache[l, :end], cfg.n_head, att)  # (T, C)
            a = blk["attn.c_proj"](kb, a)  # (T, C)
            self._mark(f"h.{l}.attn")
            x = x + a  # residual
            self._mark(f"h.{l}.residual_1")
            h = kb.layernorm(x, *blk["ln_2"], cfg.layer_norm_eps)
            self._mark(f"h.{l}.ln_2")
            f = kb.gelu(blk["mlp.c_fc"](kb, h))  # (T, 4C)
            m = blk["mlp.c_proj"](kb, f)  # (T, C)
            self._mark(f"h.{l}.mlp")
            x = x + m  # residual
            self._mark(f"h.{l}.residual_2")
        x = kb.layernorm(x, *self.ln_f, cfg.layer_norm_eps)
        self._mark("ln_f")
        logits = kb.matmul_nt(x, self.wte)  # (T, V), tied head
        self._mark("head")
        return logits

    def _check_ids(self, ids) -> np.ndarray:
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        V = self.config.vocab_size
        if idx.size and (idx.min() < 0 or idx.max() >= V):
            raise ValueError(f"token ids must be in [0, {V}), got [{idx.min()}, {idx.max()}]")
        return idx

    def prefill(self, ids, attention_out: list[np.ndarray] | None = None) -> np.ndarray:
        """Reset the cache and run the prompt in one pass.

        Args:
            ids: T token ids, 1 <= T <= block_size.
            attention_out: optional list of n_layer float32 arrays (n_head, T, T) that receive
                each layer's attention weights.
        Returns:
            logits (T, V) float32; row t predicts token t + 1.
        Raises:
            ValueError: T is 0 or exceeds block_size, or an id is out of range.
        """
        idx = self._check_ids(ids)
        if not 1 <= len(idx) <= self.config.block_size:
            raise ValueError(f"prefill needs 1..{self.config.block_size} tokens, got {len(idx)}")
        self.pos = 0
        if attention_out is None and self.capture_attention:
            NH, T = self.config.n_head, len(idx)
            attention_out = [np.zeros((NH, T, T), np.float32) for _ in range(self.config.n_layer)]
            self.last_attention = attention_out
        logits = self._forward(idx, 0, attention_out)
        self.pos = len(idx)
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Append one token at position `pos` using the KV cache; its logits (V,) float32.

        Raises:
            ValueError: the cache is full (pos == block_size) or the id is out of range.
        """
        if self.pos >= self.config.block_size:
            raise ValueError(f"the KV cache is full ({self.config.block_size} positions); "
                             "use generate(), which slides the window")
        logits = self._forward(self._check_ids([token]), self.pos)[0]
        self.pos += 1
        return logits

    def forward(self, ids) -> np.ndarray:
        """Logits (T, V) of a full forward pass over ids (T <= block_size), no cache reuse."""
        return self.prefill(ids)

    def generate(self, prompt_ids, max_new_tokens: int, sample: Callable[[np.ndarray], int]) -> Iterator[int]:
        """Yield max_new_tokens new token ids, one at a time, as they are sampled.

        Args:
            prompt_ids: at least one token id; only the last block_size are used.
            max_new_tokens: >= 0; may exceed the context (sliding window).
            sample: maps logits (V,) float32 to a token id (see minitf.sampling.Sampler).
        """
        ids = [int(t) for t in self._check_ids(prompt_ids)]
        if not ids:
            raise ValueError("generate needs a prompt of at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        B = self.config.block_size
        logits = self.prefill(ids[-B:])[-1]
        for _ in range(max_new_tokens):
            token = sample(logits)
            self._mark("sample")
            yield token
            ids.append(token)
            if self.pos < B:
                logits = self.decode(token)
            else:  # context full: slide the window and re-prefill the last B tokens
                logits = self.prefill(ids[-B:])[-1]


def load_engine(model_dir=None, backend: str | None = None):
    """(Engine, tokenizer, checkpoint) for a model directory, default: the shipped model."""
    from .checkpoint import load_checkpoint
    from .quantize import quantized_layout  # quantization edit: int8 checkpoints load too

    ckpt = load_checkpoint(model_dir or DEFAULT_MODEL_DIR, layout=quantized_layout)
    quant = (ckpt.meta or {}).get("quantization") or {}
    engine = Engine(ckpt.config, ckpt.params, backend, int8_mode=quant.get("mode", "weight-only"))
    return engine, ckpt.tokenizer, ckpt
