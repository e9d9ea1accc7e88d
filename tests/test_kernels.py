"""The kernel backends: the numpy reference against independent math, every backend
against the reference, and the registry.

1. `numpy_ref` vs independent computations: PyTorch (gelu, layer_norm, softmax, linear,
   scaled_dot_product_attention), int64 sums, hand-worked quantization values.
2. Every backend vs `numpy_ref` at awkward shapes (one row, odd sizes, sizes that are not a
   multiple of any tile, the exact context length), float32 and float64, extreme values;
   integer results bit for bit; hypothesis property tests over random shapes and values.
3. The checked API: the same bad call refused with the same error by every backend; the
   table of ops a compiled backend takes from the reference.
4. The registry: names, errors, $MINITF_BACKEND, "auto", and numba with NUMBA_DISABLE_JIT=1.

A backend that cannot load makes its tests fail (get_backend raises), never skip.
Tolerances come from tests/tolerances.py; every failure message prints the max error.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minitf.kernels as kernels
from minitf.kernels import BACKENDS, BackendError, BackendWarning, get_backend
from minitf.kernels import numpy_ref as ref
from tolerances import TOL

OUTSIDE = tempfile.gettempdir()  # subprocesses import the installed minitf, not the checkout's
FLOATS = (np.float32, np.float64)
PUBLIC = (
    "matmul",
    "matmul_nt",
    "quantize_rows",
    "matmul_int8_acc",
    "matmul_int8",
    "softmax",
    "layernorm",
    "gelu",
    "attention",
)
HYPOTHESIS = settings(max_examples=60, deadline=None)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)  # BackendError (a failure) if it cannot load


def rng(seed=0):
    return np.random.default_rng(seed)


def randn(shape, dtype=np.float32, seed=0, scale=1.0):
    return np.asarray(rng(seed).standard_normal(shape) * scale, dtype=dtype)


# --------------------------------------------------------------------- comparisons ----


def assert_close(actual, expected, tol, what=""):
    """|actual - expected| <= atol + rtol * |expected| elementwise, tol = (rtol, atol)."""
    rtol, atol = tol
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    bad = ~(err <= atol + rtol * np.abs(expected.astype(np.float64)))
    bad &= ~((actual == expected) | (np.isnan(actual) & np.isnan(expected)))  # inf == inf
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements off; max error {np.nanmax(err):.3g} "
        f"(rtol {rtol}, atol {atol})"
    )


def assert_within(actual, expected, bound, what=""):
    """|actual - expected| <= bound elementwise, bound an array (an error model)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    ratio = err / np.maximum(bound, np.finfo(np.float64).tiny)
    assert (err <= bound).all(), (
        f"{what}: max error {err.max():.3g}, max error/bound {ratio.max():.3g} "
        f"(must be <= 1)"
    )


def assert_equal(actual, expected, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = actual.astype(np.float64) - expected.astype(np.float64)
    assert np.array_equal(actual, expected), (
        f"{what}: {np.count_nonzero(diff)} elements differ; max error {np.abs(diff).max():.3g}"
    )


def dot_bound(x, w, bias, dtype):
    """TOL["kernel_dot"] * (sum_k |x w| + |bias|): how far a sum of products may move."""
    terms = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
    if bias is not None:
        terms = terms + np.abs(bias.astype(np.float64))
    return TOL[("kernel_dot", dtype)] * terms


def attention_bound(q, k, v, n_head, att, dtype):
    """TOL["kernel_attention"] * (1 + S) * sum_j p |v| per output (see tolerances.py)."""
    Tq, C = q.shape
    HS = C // n_head
    bound = np.empty((Tq, C))
    for h in range(n_head):
        cols = slice(h * HS, (h + 1) * HS)
        terms = np.abs(q[:, cols].astype(np.float64)) @ np.abs(k[:, cols].T)  # (Tq, Tk)
        S = terms.max(axis=1) / math.sqrt(HS)  # (Tq,)
        bound[:, cols] = (1 + S[:, None]) * (att[h].astype(np.float64) @ np.abs(v[:, cols]))
    return TOL[("kernel_attention", dtype)] * bound + np.finfo(dtype).tiny


# ------------------------------------------------- 1. the reference vs independent math ---


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


@pytest.mark.parametrize("N, K, M", [(1, 7, 13), (17, 33, 65), (4, 240, 960)])
def test_ref_matmul_vs_torch(N, K, M):
    x, w, b = randn((N, K), np.float64, 1), randn((K, M), np.float64, 2), randn(M, np.float64, 3)
    expected = torch.nn.functional.linear(t64(x), t64(w.T), t64(b)).numpy()
    assert_within(ref.matmul(x, w, b), expected, dot_bound(x, w, b, np.float64), "matmul")
    assert_within(ref.matmul(x, w), expected - b, dot_bound(x, w, None, np.float64), "no bias")
    expected_nt = (t64(x) @ t64(w)).numpy()  # w.T is (M, K): x @ (w.T).T
    assert_within(ref.matmul_nt(x, np.ascontiguousarray(w.T)), expected_nt,
                  dot_bound(x, w, None, np.float64), "matmul_nt")


def test_ref_quantize_rows_hand_worked():
    x = np.array(
        [
            [127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 63.5, -127.0],  # scale 1: ties go to even
            [254.0, 1.0, 3.0, -5.0, 0.0, 0.0, 0.0, 0.0],  # scale 2: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
            [0.0] * 8,  # all zeros: scale 1, never 0/0
            [1e-38, -1e-39, 0, 0, 0, 0, 0, 0],  # scale 1e-38/127 is subnormal: rejected
            [np.inf, 1.0, 0, 0, 0, 0, 0, 0],  # non-finite: rejected, not NaN
            [np.nan, 1.0, 0, 0, 0, 0, 0, 0],
            [-1.0, 0, 0, 0, 0, 0, 0, 0],  # scale 1/127: filled in below
        ],
        dtype=np.float32,
    )
    s = np.float32(1.0) / np.float32(127.0)
    x[6, 1:4] = [s, s / 2, -4 * s]  # exactly 1, 0.5 and -4 steps
    xq, scale = ref.quantize_rows(x)
    assert xq.dtype == np.int8 and scale.dtype == np.float32
    assert_equal(xq[0], np.array([127, 0, 2, 2, 0, -2, 64, -127], np.int8), "row 0")
    assert_equal(xq[1], np.array([127, 0, 2, -2, 0, 0, 0, 0], np.int8), "row 1")
    assert scale[0] == 1.0 and scale[1] == 2.0
    for row in (2, 3, 4, 5):
        assert scale[row] == 1.0 and not xq[row].any(), f"row {row}: {xq[row]}, {scale[row]}"
    assert scale[6] == np.float32(1.0) / np.float32(127.0)
    assert_equal(xq[6, :4], np.array([-127, 1, 0, -4], np.int8), "row 6")


def test_ref_quantize_rows_error_is_half_a_step():
    x = randn((9, 240), seed=4, scale=3.0)
    xq, scale = ref.quantize_rows(x)
    err = np.abs(xq * scale[:, None].astype(np.float64) - x)
    assert (err <= scale[:, None] * 0.5 * (1 + 1e-6)).all(), f"max error {err.max()}"
    assert (np.abs(xq).max(axis=1) == 127).all()  # the largest |x| maps to +-127


def test_ref_matmul_int8_acc_vs_int64():
    xq = rng(5).integers(-128, 128, (7, 33), dtype=np.int8)
    wq = rng(6).integers(-128, 128, (33, 13), dtype=np.int8)
    acc = ref.matmul_int8_acc(xq, wq)
    assert acc.dtype == np.int32
    assert_equal(acc.astype(np.int64), xq.astype(np.int64) @ wq.astype(np.int64), "int8 acc")


@pytest.mark.parametrize("N, K, M", [(1, 240, 960), (5, 960, 240), (3, 7, 13)])
def test_ref_matmul_int8_vs_float64(N, K, M):
    x = randn((N, K), seed=7)
    wq = rng(8).integers(-127, 128, (K, M), dtype=np.int8)
    w_scale = rng(9).uniform(1e-3, 1e-2, M).astype(np.float32)
    b = randn(M, seed=10)
    w = wq.astype(np.float64) * w_scale  # the dequantized weight (K, M)
    exact = x.astype(np.float64) @ w + b
    y = ref.matmul_int8(x, wq, w_scale, b, mode="weight-only")
    assert_within(y, exact, dot_bound(x, w, b, np.float32), "weight-only")
    # w8a8: first the int32 path done by hand in float64 (exact up to float32 rounding) ...
    xq, sx = ref.quantize_rows(x)
    scaled = (xq.astype(np.float64) @ wq) * sx[:, None] * w_scale  # (N, M), exact sums
    y8 = ref.matmul_int8(x, wq, w_scale, b, mode="w8a8")
    rounding = 4 * np.finfo(np.float32).eps * (np.abs(scaled) + np.abs(b))  # 3 float32 ops
    assert_within(y8, scaled + b, rounding, "w8a8 by hand")
    # ... and the activation-quantization error stays within half a step per input
    step_err = 0.5 * sx[:, None] * (np.ones((N, K)) @ np.abs(w))  # (N, M)
    assert_within(y8, exact, step_err + dot_bound(x, w, b, np.float32), "w8a8 vs float")


def test_ref_matmul_int8_unknown_mode():
    x, wq, s = randn((1, 4)), np.ones((4, 2), np.int8), np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"'int4'.*weight-only.*w8a8"):
        ref.matmul_int8(x, wq, s, mode="int4")


@pytest.mark.parametrize("dtype", FLOATS)
def test_ref_softmax_vs_torch(dtype):
    x = randn((7, 65), dtype, seed=11, scale=5.0)
    x[2, :] = x[2, :] + 1e4  # large logits: max subtraction keeps exp finite
    x[3, ::2] = -np.inf  # masked entries
    expected = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
    assert_close(ref.softmax(x), expected, TOL[("kernel", dtype)], "softmax vs torch")


def test_ref_softmax_all_masked_row_is_zero():
    x = np.full((3, 5), -np.inf, np.float32)
    x[1] = [0, 1, 2, 3, 4]
    y = ref.softmax(x)
    assert not np.isnan(y).any() and (y[[0, 2]] == 0).all()
    assert abs(y[1].sum() - 1) < 1e-6


@pytest.mark.parametrize("dtype", FLOATS)
def test_ref_layernorm_vs_torch(dtype):
    x = randn((9, 240), dtype, seed=12, scale=2.0) + 3.0
    w, b = randn(240, dtype, 13), randn(240, dtype, 14)
    expected = torch.nn.functional.layer_norm(
        torch.from_numpy(x), (240,), torch.from_numpy(w), torch.from_numpy(b), eps=1e-5
    ).numpy()
    assert_close(ref.layernorm(x, w, b), expected, TOL[("kernel", dtype)], "layernorm vs torch")


@pytest.mark.parametrize("dtype", FLOATS)
def test_ref_gelu_vs_torch(dtype):
    extremes = np.array([0, -1e4, 1e4, -20, 20], dtype)
    x = np.concatenate([randn(1000, dtype, 15, scale=4.0), extremes])
    expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    y = ref.gelu(x)
    assert y.dtype == dtype
    assert_close(y, expected, TOL[("kernel", dtype)], "gelu vs torch")


@pytest.mark.parametrize("T, C, NH", [(1, 240, 4), (17, 240, 4), (128, 240, 4), (9, 12, 3)])
def test_ref_attention_prefill_vs_torch_sdpa(T, C, NH):
    q, k, v = randn((T, C), seed=16), randn((T, C), seed=17), randn((T, C), seed=18)
    HS = C // NH

    def heads(a):  # (T, C) -> (1, NH, T, HS)
        return t64(a).reshape(T, NH, HS).transpose(0, 1)[None]

    expected = torch.nn.functional.scaled_dot_product_attention(
        heads(q), heads(k), heads(v), is_causal=True
    )[0].transpose(0, 1).reshape(T, C).numpy()
    att = np.empty((NH, T, T), np.float32)
    out = ref.attention(q, k, v, NH, att_out=att)
    assert_within(out, expected, attention_bound(q, k, v, NH, att, np.float32), "prefill")
    assert (np.triu(att, k=1) == 0).all()  # causal: no weight on a later key
    assert_close(att.sum(axis=-1), np.ones((NH, T)), TOL[("kernel", np.float32)], "row sums")


@pytest.mark.parametrize("Tq, Tk", [(1, 1), (1, 128), (3, 20)])
def test_ref_attention_decode_vs_torch_sdpa(Tq, Tk):
    C, NH = 240, 4
    HS = C // NH
    q, k, v = randn((Tq, C), seed=19), randn((Tk, C), seed=20), randn((Tk, C), seed=21)
    # query i sits at position Tk - Tq + i: torch's is_causal aligns to the top-left, so
    # the mask is given explicitly
    visible = torch.from_numpy(~np.triu(np.ones((Tq, Tk), bool), k=Tk - Tq + 1))

    def heads(a, T):
        return t64(a).reshape(T, NH, HS).transpose(0, 1)[None]

    expected = torch.nn.functional.scaled_dot_product_attention(
        heads(q, Tq), heads(k, Tk), heads(v, Tk), attn_mask=visible
    )[0].transpose(0, 1).reshape(Tq, C).numpy()
    att = np.empty((NH, Tq, Tk), np.float32)
    out = ref.attention(q, k, v, NH, att_out=att)
    assert_within(out, expected, attention_bound(q, k, v, NH, att, np.float32), "decode")


def test_ref_attention_decode_equals_last_prefill_row():
    T, C, NH = 33, 240, 4
    q, k, v = randn((T, C), seed=22), randn((T, C), seed=23), randn((T, C), seed=24)
    full = ref.attention(q, k, v, NH)
    last = ref.attention(q[-1:], k, v, NH)
    assert_close(last, full[-1:], TOL[("kernel", np.float32)], "decode == last prefill row")


# ------------------------------------------------------ 2. every backend vs the reference ---

MATMUL_SHAPES = [
    (1, 7, 13),
    (1, 240, 720),
    (1, 240, 960),
    (1, 960, 240),
    (2, 7, 13),
    (5, 33, 17),
    (17, 65, 33),
    (128, 240, 65),
    (9, 960, 240),
    (4, 1, 1),
    (0, 7, 13),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("N, K, M", MATMUL_SHAPES)
def test_matmul(backend, N, K, M, dtype):
    x, w, b = randn((N, K), dtype, 1), randn((K, M), dtype, 2), randn(M, dtype, 3)
    for bias in (b, None):
        y = backend.matmul(x, w, bias)
        assert y.dtype == dtype
        expected = ref.matmul(x, w, bias)
        assert_within(y, expected, dot_bound(x, w, bias, dtype), f"matmul {bias is None=}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "N, K, V", [(1, 240, 65), (1, 240, 1024), (3, 7, 13), (128, 240, 65), (2, 0, 5),
                (5, 24, 131)]  # several rows, over two chunks of 64 rows of wte and a part
)
def test_matmul_nt(backend, N, K, V, dtype):
    x, wte = randn((N, K), dtype, 4), randn((V, K), dtype, 5)
    y = backend.matmul_nt(x, wte)
    assert y.dtype == dtype
    assert_within(y, ref.matmul_nt(x, wte), dot_bound(x, wte.T, None, dtype), "matmul_nt")


def test_matmul_large_values(backend):
    x, w = randn((3, 65), seed=6, scale=1e4), randn((65, 17), seed=7, scale=1e3)
    assert_within(backend.matmul(x, w), ref.matmul(x, w), dot_bound(x, w, None, np.float32), "1e4")


INT8_SHAPES = [(1, 240, 960), (1, 960, 240), (7, 13, 17), (17, 65, 33), (128, 240, 65)]
QUANT_SHAPES = [(1, 240), (1, 960), (7, 13), (128, 240), (3, 1), (0, 5)]


@pytest.mark.parametrize("N, K", QUANT_SHAPES)
def test_quantize_rows_bit_identical(backend, N, K):
    x = randn((N, K), seed=8, scale=10.0)
    if N >= 3:
        x[0] = 0.0
        x[1] = 1e-39  # underflowing scale
        x[2, 0] = np.inf
    if N >= 7:
        x[3, 0] = np.nan
        x[4] = np.round(x[4] * 2) / 2  # many exact .5 ties
        x[4, 0] = 127.0  # with scale exactly 1
    xq, scale = backend.quantize_rows(x)
    rq, rs = ref.quantize_rows(x)
    assert_equal(xq, rq, "xq")
    assert_equal(scale, rs, "scale")


@pytest.mark.parametrize("N, K, M", INT8_SHAPES)
def test_matmul_int8_acc_bit_identical(backend, N, K, M):
    xq = rng(9).integers(-128, 128, (N, K), dtype=np.int8)
    wq = rng(10).integers(-128, 128, (K, M), dtype=np.int8)
    acc = backend.matmul_int8_acc(xq, wq)
    assert_equal(acc, ref.matmul_int8_acc(xq, wq), "vs reference")
    assert_equal(acc.astype(np.int64), xq.astype(np.int64) @ wq.astype(np.int64), "vs int64")


def test_matmul_int8_acc_extreme_k(backend):
    # the largest K an int32 sum is guaranteed to hold: every product is (-128)(-128)
    K = kernels._checks.INT8_MAX_K
    xq = np.full((1, K), -128, np.int8)
    wq = np.full((K, 2), -128, np.int8)
    acc = backend.matmul_int8_acc(xq, wq)
    assert acc.dtype == np.int32 and (acc.astype(np.int64) == K * 128 * 128).all(), acc


@pytest.mark.parametrize("mode", ["weight-only", "w8a8"])
@pytest.mark.parametrize("N, K, M", INT8_SHAPES)
def test_matmul_int8(backend, N, K, M, mode):
    x = randn((N, K), seed=11)
    if N >= 7:
        x[1] = 0.0  # an all-zero row quantizes to scale 1, xq 0
    wq = rng(12).integers(-127, 128, (K, M), dtype=np.int8)
    w_scale = rng(13).uniform(1e-3, 1e-2, M).astype(np.float32)
    b = randn(M, seed=14)
    for bias in (b, None):
        y = backend.matmul_int8(x, wq, w_scale, bias, mode=mode)
        expected = ref.matmul_int8(x, wq, w_scale, bias, mode=mode)
        assert y.dtype == np.float32
        if mode == "w8a8":
            # same int32 sums and the same float epilogue, in the same order
            assert_equal(y, expected, "w8a8")
        else:
            w = wq.astype(np.float64) * w_scale
            assert_within(y, expected, dot_bound(x, w, bias, np.float32), "weight-only")


def test_matmul_int8_unknown_mode(backend):
    x, wq, s = randn((1, 4)), np.ones((4, 2), np.int8), np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"'W8A8'.*weight-only.*w8a8"):
        backend.matmul_int8(x, wq, s, mode="W8A8")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("N, M", [(1, 65), (1, 1024), (7, 13), (4 * 128, 128), (3, 1), (0, 4)])
def test_softmax(backend, N, M, dtype):
    x = randn((N, M), dtype, 15, scale=5.0)
    y = backend.softmax(x)
    assert y.dtype == dtype
    assert_close(y, ref.softmax(x), TOL[("kernel", dtype)], "softmax")


@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_extremes(backend, dtype):
    x = randn((6, 33), dtype, 16)
    x[0] = -np.inf  # all masked: zeros, never NaN
    x[1, :5] = -np.inf
    x[2] = x[2] * 1e4  # large logits
    x[3] = 1e4  # a tie at a large value: uniform
    x[4, 7] = 1e4  # one dominant logit: one-hot
    x[5] = -1e4 + x[5]
    y = backend.softmax(x)
    assert not np.isnan(y).any() and (y[0] == 0).all(), y[0]
    assert_close(y[3], np.full(33, 1 / 33), TOL[("kernel", dtype)], "uniform")
    assert y[4, 7] == 1.0
    assert_close(y, ref.softmax(x), TOL[("kernel", dtype)], "softmax extremes")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("N, C", [(1, 240), (128, 240), (7, 13), (3, 1), (0, 4)])
def test_layernorm(backend, N, C, dtype):
    x = randn((N, C), dtype, 17, scale=3.0) + 1.5
    w, b = randn(C, dtype, 18), randn(C, dtype, 19)
    y = backend.layernorm(x, w, b)
    assert y.dtype == dtype
    assert_close(y, ref.layernorm(x, w, b), TOL[("kernel", dtype)], "layernorm")
    assert_close(backend.layernorm(x, w, b, eps=1e-3), ref.layernorm(x, w, b, eps=1e-3),
                 TOL[("kernel", dtype)], "layernorm eps=1e-3")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 960), (128, 960), (7,), (2, 3, 13), (0,), ()])
def test_gelu(backend, shape, dtype):
    x = randn(shape, dtype, 20, scale=3.0)
    y = backend.gelu(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref.gelu(x), TOL[("kernel", dtype)], "gelu")


@pytest.mark.parametrize("dtype", FLOATS)
def test_gelu_extremes(backend, dtype):
    x = np.array([0.0, -1e4, 1e4, -30.0, 30.0, -5.0, 5.0, 1e-30, -1e-30], dtype)
    assert_close(backend.gelu(x), ref.gelu(x), TOL[("kernel", dtype)], "gelu extremes")


ATTENTION_SHAPES = [
    # (Tq, Tk, C, NH)
    (1, 1, 240, 4),  # the first decode step
    (1, 128, 240, 4),  # decode at the exact context boundary
    (128, 128, 240, 4),  # prefill of a full context
    (17, 17, 240, 4),
    (1, 65, 240, 4),
    (5, 33, 12, 3),  # a chunk of queries against a longer cache
    (7, 7, 13, 1),  # one head, odd size
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("Tq, Tk, C, NH", ATTENTION_SHAPES)
def test_attention(backend, Tq, Tk, C, NH, dtype):
    q, k, v = randn((Tq, C), dtype, 21), randn((Tk, C), dtype, 22), randn((Tk, C), dtype, 23)
    att_ref = np.empty((NH, Tq, Tk), dtype)
    expected = ref.attention(q, k, v, NH, att_out=att_ref)
    att = np.full((NH, Tq, Tk), np.nan, dtype)
    out = backend.attention(q, k, v, NH, att_out=att)
    assert out.dtype == dtype
    assert_within(out, expected, attention_bound(q, k, v, NH, att_ref, dtype), "attention out")
    assert_close(att, att_ref, TOL[("kernel", dtype)], "attention weights")
    assert_close(backend.attention(q, k, v, NH), out, (0, 0), "same without att_out")


def test_attention_views_of_qkv_and_cache(backend):
    # prefill reads q from a column slice of the (T, 3C) qkv array; decode reads k and v
    # as row slices of a (block_size, C) cache
    T, C, NH = 20, 240, 4
    qkv = randn((T, 3 * C), seed=24)
    q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]
    qc, kc, vc = (np.ascontiguousarray(a) for a in (q, k, v))
    assert_close(backend.attention(q, k, v, NH), backend.attention(qc, kc, vc, NH), (0, 0), "views")
    k_cache, v_cache = np.zeros((128, C), np.float32), np.zeros((128, C), np.float32)
    k_cache[:T], v_cache[:T] = k, v
    out = backend.attention(q[-1:], k_cache[:T], v_cache[:T], NH)
    assert_close(out, backend.attention(qc[-1:], kc, vc, NH), (0, 0), "cache rows")


def test_attention_large_scores(backend):
    # scores near 1e4: every row's softmax is (nearly) one-hot, never NaN
    T, C, NH = 9, 12, 2
    q, k = randn((T, C), seed=25, scale=100.0), randn((T, C), seed=26, scale=100.0)
    v = randn((T, C), seed=27)
    att_ref = np.empty((NH, T, T), np.float32)
    expected = ref.attention(q, k, v, NH, att_out=att_ref)
    out = backend.attention(q, k, v, NH)
    assert not np.isnan(out).any()
    assert_within(out, expected, attention_bound(q, k, v, NH, att_ref, np.float32), "large scores")


def test_non_contiguous_inputs(backend):
    x = randn((40, 26), seed=28)[::2, ::2]  # (20, 13), strided
    w = randn((17, 13), seed=29).T  # (13, 17), Fortran order
    b = randn(34, seed=30)[::2]
    bound = dot_bound(x, w, b, np.float32)
    assert_within(backend.matmul(x, w, b), ref.matmul(x, w, b), bound, "matmul")
    assert_close(backend.softmax(x), ref.softmax(x), TOL[("kernel", np.float32)], "softmax")
    assert_close(backend.gelu(x.T), ref.gelu(x.T), TOL[("kernel", np.float32)], "gelu")
    assert_equal(backend.quantize_rows(x)[0], ref.quantize_rows(x)[0], "quantize_rows")


def test_float32_inputs_do_not_change(backend):
    x, w, b = randn((5, 13), seed=31), randn((13, 7), seed=32), randn(7, seed=33)
    copies = [a.copy() for a in (x, w, b)]
    backend.matmul(x, w, b)
    backend.softmax(x)
    backend.layernorm(x, randn(13, seed=34), randn(13, seed=35))
    backend.gelu(x)
    backend.attention(x[:, :12], x[:, :12], x[:, :12], 3)
    for before, after in zip(copies, (x, w, b)):
        assert_equal(after, before, "input modified")


# ---------------------------------------------------------------- 3. the checked API ----


def _bad_calls():
    """(what, exception, message pattern, call(backend)): bad calls every backend refuses."""
    x32, x64 = randn((3, 4)), randn((3, 4), np.float64)
    w, wq, s = randn((4, 2)), np.ones((4, 2), np.int8), np.ones(2, np.float32)
    big_k = 200_000  # > INT8_MAX_K: an int32 sum of int8 products could overflow
    return [
        ("mixed dtypes", TypeError, "float64", lambda B: B.matmul(x32, randn((4, 2), np.float64))),
        ("int64 input", TypeError, "int64", lambda B: B.softmax(np.ones((2, 3), np.int64))),
        ("weight shape", ValueError, r"\(5, 2\)", lambda B: B.matmul(x32, randn((5, 2)))),
        ("bias shape", ValueError, "bias has shape", lambda B: B.matmul(x32, w, bias=randn(3))),
        ("bias dtype", TypeError, "bias has dtype float64",
         lambda B: B.matmul(x32, w, bias=randn(2, np.float64))),
        ("matmul_nt shape", ValueError, "shape", lambda B: B.matmul_nt(x32, randn((2, 5)))),
        ("float64 to quantize", TypeError, "float32", lambda B: B.quantize_rows(x64)),
        ("int16 activations", TypeError, "int8",
         lambda B: B.matmul_int8_acc(np.ones((1, 4), np.int16), np.ones((4, 2), np.int8))),
        ("overflowing K", ValueError, "overflow",
         lambda B: B.matmul_int8_acc(np.ones((1, big_k), np.int8), np.ones((big_k, 1), np.int8))),
        ("overflowing K, w8a8", ValueError, "overflow",
         lambda B: B.matmul_int8(randn((1, big_k)), np.ones((big_k, 1), np.int8),
                                 np.ones(1, np.float32), mode="w8a8")),
        ("unknown int8 mode", ValueError, r"'W8A8'.*weight-only.*w8a8",
         lambda B: B.matmul_int8(x32, wq, s, mode="W8A8")),
        ("scale shape", ValueError, "w_scale has shape",
         lambda B: B.matmul_int8(x32, wq, np.ones(3, np.float32))),
        ("scale dtype", TypeError, "w_scale has dtype float64",
         lambda B: B.matmul_int8(x32, wq, np.ones(2), mode="w8a8")),
        ("int8 bias shape", ValueError, "bias has shape",
         lambda B: B.matmul_int8(x32, wq, s, randn(5), mode="weight-only")),
        ("float32 weights as int8", TypeError, "wq has dtype float32",
         lambda B: B.matmul_int8(x32, w, s)),
        ("LayerNorm weight shape", ValueError, "weight has shape",
         lambda B: B.layernorm(x32, randn(3), randn(4))),
        ("LayerNorm eps", ValueError, "eps", lambda B: B.layernorm(x32, randn(4), randn(4), eps=0)),
        ("GELU of ints", TypeError, "int32", lambda B: B.gelu(np.ones(3, np.int32))),
        ("heads", ValueError, "n_head", lambda B: B.attention(x32, x32, x32, 3)),  # 4 % 3
        ("Tq > Tk", ValueError, "Tq <= Tk", lambda B: B.attention(randn((5, 4)), x32, x32, 2)),
        ("strided att_out", ValueError, "C-contiguous",
         lambda B: B.attention(x32, x32, x32, 2, att_out=np.empty((2, 3, 6), np.float32)[:, :, ::2])),
        ("att_out shape", ValueError, "att_out has shape",
         lambda B: B.attention(x32, x32, x32, 2, att_out=np.empty((2, 3, 4), np.float32))),
        ("softmax of no columns", ValueError, "at least one column",
         lambda B: B.softmax(np.empty((2, 0), np.float32))),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("what, exception, pattern, call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_every_backend_refuses_the_same_bad_call_with_the_same_error(what, exception, pattern, call):
    messages = {}
    for name in BACKENDS:
        with pytest.raises(exception, match=pattern) as info:
            call(get_backend(name))
        messages[name] = str(info.value)
    assert len(set(messages.values())) == 1, f"{what}: the backends disagree: {messages}"


def test_ops_taken_from_the_reference_are_listed():
    """A compiled backend runs the reference loop only for an op it lists in REFERENCE_OPS;
    one that inherits an op without listing it is refused."""
    from minitf.kernels.backend import Backend
    from minitf.kernels.numpy_loops import LOOP_OPS, ReferenceLoops

    for name in BACKENDS:
        impl = get_backend(name).implementation()
        assert set(impl) == set(LOOP_OPS), name
        want = "reference" if name == "numpy" else "compiled"  # today every op is compiled
        assert set(impl.values()) == {want}, (name, impl)
    numba_loops = get_backend("numba").loops

    class Unlisted(ReferenceLoops):
        softmax = numba_loops.softmax

    with pytest.raises(TypeError, match=r"inherits the reference loops \[.*'attention'"):
        Backend("partial", Unlisted)

    class Listed(Unlisted):
        REFERENCE_OPS = frozenset(LOOP_OPS) - {"softmax"}

    partial = Backend("partial", Listed)
    assert partial.implementation()["softmax"] == "compiled"
    assert partial.implementation()["layernorm"] == "reference"
    x, w, b = randn((3, 8), seed=40), randn(8, seed=41), randn(8, seed=42)
    assert_equal(partial.layernorm(x, w, b), ref.layernorm(x, w, b), "a reference op")
    assert_close(partial.softmax(x), ref.softmax(x), TOL[("kernel", np.float32)], "compiled op")
    with pytest.raises(ValueError, match="weight has shape"):  # checked like every backend
        partial.layernorm(x, w[:3], b)


# ------------------------------------------------------------- hypothesis properties ----


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def matrices(draw, max_n=6, max_m=70, lo=-1e4, hi=1e4, neg_inf=True):
    N = draw(st.integers(1, max_n))
    M = draw(st.integers(1, max_m))
    flat = draw(st.lists(_floats(lo, hi) | (st.just(-np.inf) if neg_inf else st.nothing()),
                         min_size=N * M, max_size=N * M))
    return np.array(flat, np.float32).reshape(N, M)


@HYPOTHESIS
@given(x=matrices())
def test_softmax_property(x):
    y_ref = ref.softmax(x)
    assert not np.isnan(y_ref).any()
    sums = y_ref.sum(axis=1)
    masked = np.isneginf(x).all(axis=1)
    assert (sums[masked] == 0).all() and (np.abs(sums[~masked] - 1) < 1e-5).all(), sums
    for name in BACKENDS:
        assert_close(get_backend(name).softmax(x), y_ref, TOL[("kernel", np.float32)], name)


@HYPOTHESIS
@given(x=matrices(max_n=5, max_m=50, lo=-1e6, hi=1e6, neg_inf=False),
       scale=st.sampled_from([1.0, 1e-3, 1e-30, 1e-40, 1e30]),
       M=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_quantize_and_int8_acc_property(x, scale, M, seed):
    x = (x * np.float32(scale)).astype(np.float32)
    xq, s = ref.quantize_rows(x)
    assert (np.abs(xq.astype(np.int32)) <= 127).all() and (s > 0).all()
    wq = rng(seed).integers(-128, 128, (x.shape[1], M), dtype=np.int8)
    exact = xq.astype(np.int64) @ wq.astype(np.int64)
    for name in BACKENDS:
        B = get_backend(name)
        bq, bs = B.quantize_rows(x)
        assert_equal(bq, xq, f"{name} xq")
        assert_equal(bs, s, f"{name} scale")
        assert_equal(B.matmul_int8_acc(xq, wq).astype(np.int64), exact, f"{name} acc")


@HYPOTHESIS
@given(Tk=st.integers(1, 20), dq=st.integers(0, 19), NH=st.integers(1, 4),
       HS=st.integers(1, 9), seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 3.0]))
def test_attention_property(Tk, dq, NH, HS, seed, scale):
    Tq = Tk - min(dq, Tk - 1)  # 1 <= Tq <= Tk
    C = NH * HS
    q, k, v = (randn((T, C), seed=seed + i, scale=scale) for i, T in enumerate((Tq, Tk, Tk)))
    att_ref = np.empty((NH, Tq, Tk), np.float32)
    expected = ref.attention(q, k, v, NH, att_out=att_ref)
    assert_close(att_ref.sum(axis=-1), np.ones((NH, Tq)), TOL[("kernel", np.float32)], "sums")
    bound = attention_bound(q, k, v, NH, att_ref, np.float32)
    for name in BACKENDS:
        assert_within(get_backend(name).attention(q, k, v, NH), expected, bound, name)


# ------------------------------------------------------------------- 4. the registry ----


def test_every_backend_has_the_same_api():
    signatures = {n: inspect.signature(getattr(ref, n)) for n in PUBLIC}
    for name in BACKENDS:
        B = get_backend(name)
        assert B.NAME == name
        for fn in PUBLIC:
            assert inspect.signature(getattr(B, fn)) == signatures[fn], f"{name}.{fn}"
            assert getattr(B, fn).__doc__, f"{name}.{fn} has no docstring"


def test_every_backend_loads_here():
    # the project's own install builds every backend; one that cannot load is a failure
    assert kernels.available_backends() == {name: None for name in BACKENDS}


def test_unknown_backend_is_an_error_naming_the_choices():
    with pytest.raises(BackendError, match=r"'torch'.*numpy, numba, cython.*auto"):
        get_backend("torch")
    assert issubclass(BackendError, ValueError)


def test_environment_variable_picks_the_backend(monkeypatch):
    monkeypatch.setenv("MINITF_BACKEND", "numba")
    assert get_backend().NAME == "numba"
    monkeypatch.setenv("MINITF_BACKEND", "fortran")
    with pytest.raises(BackendError, match=r"'fortran'.*MINITF_BACKEND"):
        get_backend()
    monkeypatch.delenv("MINITF_BACKEND")
    assert get_backend().NAME == kernels.AUTO_ORDER[0]
    assert get_backend("auto").NAME == kernels.AUTO_ORDER[0]


def test_a_backend_that_cannot_load_says_why_and_how_to_fix(monkeypatch):
    monkeypatch.setitem(kernels._MODULES, "cython", "_no_such_extension")
    reason = kernels.available_backends()["cython"]
    assert reason is not None and "_no_such_extension" in reason
    match = r"'cython' cannot load.*_no_such_extension.*pip install \."
    with pytest.raises(BackendError, match=match):
        get_backend("cython")


def test_auto_says_which_backend_it_skips(monkeypatch):
    first, second = kernels.AUTO_ORDER[:2]
    monkeypatch.setitem(kernels._MODULES, first, "_no_such_extension")
    with pytest.warns(BackendWarning, match=rf"skips '{first}'"):
        assert get_backend("auto").NAME == second


def test_numba_runs_with_the_jit_disabled():
    # NUMBA_DISABLE_JIT=1 turns the kernels into plain Python: they must still be right
    script = """
import numpy as np
from minitf.kernels import get_backend, numpy_ref as ref
nb = get_backend("numba")
r = np.random.default_rng(0)
x, w = r.standard_normal((5, 7), np.float32), r.standard_normal((7, 13), np.float32)
b = r.standard_normal(13, np.float32)
assert np.allclose(nb.matmul(x, w, b), ref.matmul(x, w, b), atol=1e-5)
assert np.allclose(nb.matmul_nt(x, w.T), ref.matmul_nt(x, w.T), atol=1e-5)
xq, s = nb.quantize_rows(x); rq, rs = ref.quantize_rows(x)
assert (xq == rq).all() and (s == rs).all()
wq = r.integers(-128, 128, (7, 13), dtype=np.int8)
assert (nb.matmul_int8_acc(xq, wq) == ref.matmul_int8_acc(xq, wq)).all()
ws = np.full(13, 0.01, np.float32)
for mode in ("weight-only", "w8a8"):
    y, y_ref = nb.matmul_int8(x, wq, ws, b, mode), ref.matmul_int8(x, wq, ws, b, mode)
    assert np.allclose(y, y_ref, atol=1e-5), mode
x[0] = -np.inf
assert np.allclose(nb.softmax(x), ref.softmax(x), atol=1e-6)
assert np.allclose(nb.layernorm(w, b, b), ref.layernorm(w, b, b), atol=1e-5)
assert np.allclose(nb.gelu(w), ref.gelu(w), atol=1e-6)
q = r.standard_normal((3, 12), np.float32); k = r.standard_normal((6, 12), np.float32)
assert np.allclose(nb.attention(q, k, k, 3), ref.attention(q, k, k, 3), atol=1e-5)
print("ok")
"""
    # plain Python runs the portable int8 tile only (a forced MINITF_ISA does not apply)
    env = {k: v for k, v in os.environ.items() if k != "MINITF_ISA"} | {"NUMBA_DISABLE_JIT": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=OUTSIDE, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.parametrize("module, expected", [("numba_kernels", ("_matmul", "_attention")),
                                              ("numba_train", ("_layernorm_backward", "_adamw"))])
def test_jit_options_come_from_one_place(module, expected):
    """The inference and the training loops take kernels/_jit.py's options."""
    import importlib

    from minitf.kernels import _jit

    loops = importlib.import_module(f"minitf.kernels.{module}")
    jitted = [n for n in dir(loops) if hasattr(getattr(loops, n), "targetoptions")]
    if os.environ.get("NUMBA_DISABLE_JIT") != "1":
        assert set(expected) <= set(jitted)
    for name in jitted:
        options = getattr(loops, name).targetoptions
        for key in ("fastmath", "parallel", "nogil", "error_model"):
            assert options[key] == _jit.JIT_OPTIONS[key], f"{name}: {key}={options[key]!r}"
        # cache=True installs an on-disk FunctionCache instead of the in-memory NullCache
        assert type(getattr(loops, name)._cache).__name__ == "FunctionCache", name
    # nnan / ninf would let LLVM drop the -inf checks; arcp would turn x / s into x * (1 / s)
    assert not {"nnan", "ninf", "arcp", "fast"} & set(_jit.JIT_OPTIONS["fastmath"])
