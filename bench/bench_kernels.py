"""Every kernel on every backend at the default model's real shapes (pytest-benchmark).

    python -m pytest --benchmark bench/bench_kernels.py
    python -m pytest --benchmark bench/bench_kernels.py -k decode      # the per-token path

Shapes: d_model C=240, n_head 4 (HS 60), d_ff 960, vocab 65 (characters) and 1024 (BPE),
T=128 for prefill and one row for decode; attention decode against Tk=128 cached keys.
Each group is one kernel at one shape, so the table reads kernel x backend. Every call is
made once before timing, so numba's compilation (or cache load) is never timed.
"""

from __future__ import annotations

import numpy as np
import pytest

from minitf.kernels import BACKENDS, get_backend

C, NH, D_FF, T = 240, 4, 960, 128


@pytest.fixture(params=BACKENDS)
def backend(request):
    # get_backend raises BackendError for a backend that cannot load: the benchmark fails
    # instead of quietly leaving a column out of the table.
    return get_backend(request.param)


def _rng():
    return np.random.default_rng(0)


def _run(benchmark, group: str, fn, *args, **kwargs):
    benchmark.group = group
    fn(*args, **kwargs)  # warm up: numba compiles (or loads its cache) on the first call
    benchmark(fn, *args, **kwargs)


# (label, N, K, M): the linear layers of a block and the tied head, decode and prefill
LINEARS = [
    (f"{phase} {name}", N, K, M)
    for phase, N in (("decode", 1), ("prefill", T))
    for name, K, M in (("c_attn", C, 3 * C), ("c_fc", C, D_FF), ("mlp.c_proj", D_FF, C))
]
HEADS = [
    (f"{phase} head V={V}", N, C, V)
    for phase, N in (("decode", 1), ("prefill", T))
    for V in (65, 1024)
]
INT8_LINEARS = [
    (f"{phase} {name}", N, K, M)
    for phase, N in (("decode", 1), ("prefill", T))
    for name, K, M in (("c_fc", C, D_FF), ("mlp.c_proj", D_FF, C))
]


@pytest.mark.parametrize("label, N, K, M", LINEARS, ids=[row[0] for row in LINEARS])
def test_matmul(benchmark, backend, label, N, K, M):
    rng = _rng()
    x = rng.standard_normal((N, K), dtype=np.float32)
    w = rng.standard_normal((K, M), dtype=np.float32)
    b = rng.standard_normal(M, dtype=np.float32)
    _run(benchmark, f"matmul {label} ({N}x{K} @ {K}x{M})", backend.matmul, x, w, b)


@pytest.mark.parametrize("label, N, K, M", HEADS, ids=[row[0] for row in HEADS])
def test_matmul_nt(benchmark, backend, label, N, K, M):
    rng = _rng()
    x = rng.standard_normal((N, K), dtype=np.float32)
    wte = rng.standard_normal((M, K), dtype=np.float32)
    _run(benchmark, f"matmul_nt {label} ({N}x{K} @ ({M}x{K}).T)", backend.matmul_nt, x, wte)


@pytest.mark.parametrize(
    "N, K", [(1, C), (1, D_FF), (T, C)], ids=["decode C", "decode d_ff", "prefill C"]
)
def test_quantize_rows(benchmark, backend, N, K):
    x = _rng().standard_normal((N, K), dtype=np.float32)
    _run(benchmark, f"quantize_rows {N}x{K}", backend.quantize_rows, x)


@pytest.mark.parametrize("label, N, K, M", INT8_LINEARS, ids=[row[0] for row in INT8_LINEARS])
def test_matmul_int8_acc(benchmark, backend, label, N, K, M):
    rng = _rng()
    xq = rng.integers(-127, 128, (N, K), dtype=np.int8)
    wq = rng.integers(-127, 128, (K, M), dtype=np.int8)
    _run(benchmark, f"matmul_int8_acc {label} ({N}x{K} @ {K}x{M})", backend.matmul_int8_acc, xq, wq)


@pytest.mark.parametrize("mode", ["weight-only", "w8a8"])
@pytest.mark.parametrize("label, N, K, M", INT8_LINEARS, ids=[row[0] for row in INT8_LINEARS])
def test_matmul_int8(benchmark, backend, label, N, K, M, mode):
    rng = _rng()
    x = rng.standard_normal((N, K), dtype=np.float32)
    wq = rng.integers(-127, 128, (K, M), dtype=np.int8)
    w_scale = rng.uniform(1e-3, 1e-2, M).astype(np.float32)
    b = rng.standard_normal(M, dtype=np.float32)
    group = f"matmul_int8 {mode} {label} ({N}x{K} @ {K}x{M})"
    _run(benchmark, group, backend.matmul_int8, x, wq, w_scale, b, mode=mode)


@pytest.mark.parametrize(
    "N, M", [(1, 65), (1, 1024), (NH * T, T)], ids=["decode V=65", "decode V=1024", "prefill att"]
)
def test_softmax(benchmark, backend, N, M):
    x = _rng().standard_normal((N, M), dtype=np.float32)
    _run(benchmark, f"softmax {N}x{M}", backend.softmax, x)


@pytest.mark.parametrize("N", [1, T], ids=["decode", "prefill"])
def test_layernorm(benchmark, backend, N):
    rng = _rng()
    x = rng.standard_normal((N, C), dtype=np.float32)
    w = rng.standard_normal(C, dtype=np.float32)
    b = rng.standard_normal(C, dtype=np.float32)
    _run(benchmark, f"layernorm {N}x{C}", backend.layernorm, x, w, b)


@pytest.mark.parametrize("N", [1, T], ids=["decode", "prefill"])
def test_gelu(benchmark, backend, N):
    x = _rng().standard_normal((N, D_FF), dtype=np.float32)
    _run(benchmark, f"gelu {N}x{D_FF}", backend.gelu, x)


@pytest.mark.parametrize("Tq", [1, T], ids=["decode", "prefill"])
def test_attention(benchmark, backend, Tq):
    rng = _rng()
    # q is a column slice of the (T, 3C) qkv activations, as in the model's prefill;
    # k and v are the first Tk rows of a (block_size, C) cache, as in decode.
    qkv = rng.standard_normal((Tq, 3 * C), dtype=np.float32)
    k_cache = rng.standard_normal((T, C), dtype=np.float32)
    v_cache = rng.standard_normal((T, C), dtype=np.float32)
    q = qkv[:, :C] if Tq > 1 else np.ascontiguousarray(qkv[:, :C])
    group = f"attention {'decode' if Tq == 1 else 'prefill'} Tq={Tq} Tk={T} C={C} NH={NH}"
    _run(benchmark, group, backend.attention, q, k_cache[:T], v_cache[:T], NH)
