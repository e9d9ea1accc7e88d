"""Generation speed per backend (pytest-benchmark): prefill of 128 tokens, per-token decode
latency, generation past the context and batches, float32 and int8, on the shipped model
(or a default-size one if none is shipped).

    python -m pytest --benchmark bench/bench_decode.py
    python -m pytest --benchmark bench/bench_decode.py -k decode --benchmark-columns=median
    python -m pytest --benchmark bench/bench_decode.py -k "long or batch"

- prefill: one pass over 128 tokens filling the KV cache, last position's logits
  (`Engine.prefill(ids, last_only=True)`, what generation needs);
- decode: a 16-token prompt, then 112 greedy decode steps to the end of the context; one
  round is the 112 steps, so divide pytest-benchmark's times by 112 (extra_info
  "us_per_token" holds the median per token);
- models: float32; int8 weight-only of the FFN (the default of `python -m minitf.quantize`);
  int8 W8A8 of every linear layer (the fastest);
- long: a 16-token prompt, then 1,000 greedy tokens past the context, context_mode shift
  (keep 64) and exact; extra_info "us_per_token" is the average over the 1,000;
- batch: 16 prompts of 16 tokens, 112 greedy tokens each, `Engine.generate_batch`;
  extra_info "tokens_per_s" counts all 16 x 112 tokens, prefills included;
- numba and cython run their fused path (one compiled call per step), numpy the unfused
  reference; the "unfused" rows run numba and cython through the unfused path for contrast.
1 thread (decode's default). Every engine generates once before timing (numba compiles or
loads its cache). `test_decode_under_50_ms_per_token` asserts the seed design's target for
every backend.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from minitf.config import GPTConfig
from minitf.engine import DEFAULT_MODEL_DIR, Engine
from minitf.kernels import BACKENDS
from minitf.quantization import quantize_model
from minitf.threads import set_threads

PROMPT, NEW, PREFILL = 16, 112, 128
LONG_NEW, KEEP, BATCH_ROWS = 1000, 64, 16
MODELS = {"float32": None, "int8 weight-only ffn": ("ffn", "weight-only"), "int8 w8a8 all": ("all", "w8a8")}
PATHS = [(b, None) for b in BACKENDS] + [(b, False) for b in ("numba", "cython")]
PATH_IDS = [b if fused is None else f"{b}-unfused" for b, fused in PATHS]


@pytest.fixture(scope="module")
def model():
    set_threads(1)
    if (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        from minitf.checkpoint import load_checkpoint

        ckpt = load_checkpoint(DEFAULT_MODEL_DIR)
        return ckpt.config, ckpt.params
    from minitf.model import init_params

    config = GPTConfig(vocab_size=1024)
    return config, init_params(config, seed=0)


_engines = {}


def engine(model, backend, fused, name):
    key = (backend, fused, name)
    if key not in _engines:
        config, params = model
        quant = MODELS[name]
        mode = "weight-only"
        if quant is not None:
            params, _ = quantize_model(params, config, quant[0])
            mode = quant[1]
        e = Engine(config, params, backend, int8_mode=mode, fused=fused)
        ids = np.arange(PREFILL) % config.vocab_size
        list(e.generate(ids[:PROMPT], NEW, greedy))  # warm up: compile, touch every buffer
        e.prefill(ids, last_only=True)
        _engines[key] = e
    return _engines[key]


def greedy(logits) -> int:
    return int(np.argmax(logits))


def decode_run(e):
    """112 decode steps after a 16-token prefill; the steps' time in seconds."""
    ids = np.arange(PROMPT) % e.config.vocab_size
    logits = e.prefill(ids, last_only=True)
    t = time.perf_counter()
    for _ in range(NEW):
        logits = e.decode(greedy(logits))
    return time.perf_counter() - t


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend, fused", PATHS, ids=PATH_IDS)
def test_prefill_128(benchmark, model, backend, fused, name):
    e = engine(model, backend, fused, name)
    ids = np.arange(PREFILL) % e.config.vocab_size
    benchmark.group = f"prefill {PREFILL} tokens, {name}"
    benchmark.pedantic(e.prefill, args=(ids,), kwargs={"last_only": True}, rounds=20, iterations=1,
                       warmup_rounds=1)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend, fused", PATHS, ids=PATH_IDS)
def test_decode_112_tokens(benchmark, model, backend, fused, name):
    e = engine(model, backend, fused, name)
    ids = np.arange(PROMPT) % e.config.vocab_size

    def setup():  # the prompt's prefill is not timed
        return (e, greedy(e.prefill(ids, last_only=True))), {}

    def steps(e, token):
        for _ in range(NEW):
            token = greedy(e._decode(token))

    benchmark.group = f"decode {NEW} tokens (divide by {NEW} for one), {name}"
    benchmark.pedantic(steps, setup=setup, rounds=15, iterations=1, warmup_rounds=1)
    benchmark.extra_info["us_per_token"] = benchmark.stats.stats.median / NEW * 1e6


@pytest.mark.parametrize("context_mode", ["shift", "exact"])
@pytest.mark.parametrize("name", ["float32", "int8 w8a8 all"])
@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_long_1000_tokens(benchmark, model, backend, name, context_mode):
    e = engine(model, backend, None, name)
    ids = list(np.arange(PROMPT) % e.config.vocab_size)
    keep = KEEP if context_mode == "shift" else None
    benchmark.group = f"long: {PROMPT}-token prompt + {LONG_NEW} tokens past the context"
    benchmark.pedantic(lambda: list(e.generate(ids, LONG_NEW, greedy, context_mode=context_mode, keep=keep)),
                       rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["us_per_token"] = benchmark.stats.stats.median / LONG_NEW * 1e6


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend, fused", PATHS[:3], ids=PATH_IDS[:3])
def test_batch_16_prompts(benchmark, model, backend, fused, name):
    e = engine(model, backend, fused, name)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, e.config.vocab_size, size=PROMPT)) for _ in range(BATCH_ROWS)]
    benchmark.group = f"batch: {BATCH_ROWS} prompts x {PROMPT} tokens + {NEW} tokens each, {name}"
    benchmark.pedantic(lambda: list(e.generate_batch(prompts, NEW, [greedy] * BATCH_ROWS)),
                       rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = BATCH_ROWS * NEW / benchmark.stats.stats.median


def test_decode_under_50_ms_per_token(model):
    """The seed design's target, for every backend, float32 and int8: median < 50 ms/token."""
    for backend in BACKENDS:
        for name in ("float32", "int8 w8a8 all"):
            e = engine(model, backend, None, name)
            per_token = statistics.median(decode_run(e) for _ in range(3)) / NEW
            assert per_token < 0.050, f"{backend} {name}: {per_token * 1e3:.2f} ms/token"
