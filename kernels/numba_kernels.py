"""numba backend: private `@njit` loop kernels and public wrappers that check and allocate.

Every public function has the name and signature of its `numpy_ref` counterpart and equals
it within the tolerance its docstring names (tests/tolerances.py). The kernels (`_name`)
only loop: they take C-contiguous arrays and a preallocated output, in the order outputs,
inputs, weights, sizes. Their compile options come from `_jit.py`; with
`NUMBA_DISABLE_JIT=1` they run as plain (slow) Python and give the same results.

Matmul loops run k outside m so that the innermost loop walks a (K, M) weight row and an
output row contiguously and LLVM vectorizes it; the k loop is unrolled by 4 (and rows
taken 4 at a time) so each output element is loaded and stored once per 4 products, not
once per product.
"""

from __future__ import annotations

import math

import numpy as np

from . import _checks as chk
from ._jit import njit

NAME = "numba"

INT8_MODES = chk.INT8_MODES

_F32_TINY = np.float32(np.finfo(np.float32).tiny)  # smallest normal float32
_F32_INF = np.float32(np.inf)
_Q_MAX = np.float32(127.0)
_GELU_C = math.sqrt(2.0 / math.pi)


# --------------------------------------------------------------------------- kernels ----


@njit
def _dot(a, b):
    """sum_k a[k] * b[k], summed in the dtype of the arrays."""
    acc = a.dtype.type(0)
    for k in range(a.shape[0]):
        acc += a[k] * b[k]
    return acc


@njit
def _matmul_row(yr, xr, w):
    """yr = xr @ w for one row: yr (M,), xr (K,), w (K, M)."""
    K = xr.shape[0]
    M = w.shape[1]
    for m in range(M):
        yr[m] = 0
    k = 0
    while k + 4 <= K:
        a0, a1, a2, a3 = xr[k], xr[k + 1], xr[k + 2], xr[k + 3]
        w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
        for m in range(M):
            yr[m] += a0 * w0[m] + a1 * w1[m] + a2 * w2[m] + a3 * w3[m]
        k += 4
    while k < K:
        a, wk = xr[k], w[k]
        for m in range(M):
            yr[m] += a * wk[m]
        k += 1


@njit
def _matmul_4rows(y, x, w, n):
    """y[n:n+4] = x[n:n+4] @ w: each weight element loaded once for 4 rows x 4 k."""
    K = x.shape[1]
    M = w.shape[1]
    y0, y1, y2, y3 = y[n], y[n + 1], y[n + 2], y[n + 3]
    x0, x1, x2, x3 = x[n], x[n + 1], x[n + 2], x[n + 3]
    for m in range(M):
        y0[m] = 0
        y1[m] = 0
        y2[m] = 0
        y3[m] = 0
    k = 0
    while k + 4 <= K:
        w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
        a00, a01, a02, a03 = x0[k], x0[k + 1], x0[k + 2], x0[k + 3]
        a10, a11, a12, a13 = x1[k], x1[k + 1], x1[k + 2], x1[k + 3]
        a20, a21, a22, a23 = x2[k], x2[k + 1], x2[k + 2], x2[k + 3]
        a30, a31, a32, a33 = x3[k], x3[k + 1], x3[k + 2], x3[k + 3]
        for m in range(M):
            b0, b1, b2, b3 = w0[m], w1[m], w2[m], w3[m]
            y0[m] += a00 * b0 + a01 * b1 + a02 * b2 + a03 * b3
            y1[m] += a10 * b0 + a11 * b1 + a12 * b2 + a13 * b3
            y2[m] += a20 * b0 + a21 * b1 + a22 * b2 + a23 * b3
            y3[m] += a30 * b0 + a31 * b1 + a32 * b2 + a33 * b3
        k += 4
    while k < K:
        wk = w[k]
        a0, a1, a2, a3 = x0[k], x1[k], x2[k], x3[k]
        for m in range(M):
            y0[m] += a0 * wk[m]
            y1[m] += a1 * wk[m]
            y2[m] += a2 * wk[m]
            y3[m] += a3 * wk[m]
        k += 1


@njit
def _matmul(y, x, w, bias):
    """y = x @ w (+ bias): y (N, M), x (N, K), w (K, M), bias (M,) or None."""
    N = x.shape[0]
    M = w.shape[1]
    n = 0
    while n + 4 <= N:
        _matmul_4rows(y, x, w, n)
        n += 4
    while n < N:
        _matmul_row(y[n], x[n], w)
        n += 1
    if bias is not None:
        for n in range(N):
            for m in range(M):
                y[n, m] += bias[m]


@njit
def _matmul_nt(y, x, w):
    """y = x @ w.T: y (N, M), x (N, K), w (M, K); each output is a contiguous dot product.

    Four rows of w at a time: x is loaded once for four independent sums, which also
    hides the latency of each sum's chain of additions.
    """
    N, K = x.shape
    M = w.shape[0]
    zero = y.dtype.type(0)
    for n in range(N):
        xr = x[n]
        m = 0
        while m + 4 <= M:
            w0, w1, w2, w3 = w[m], w[m + 1], w[m + 2], w[m + 3]
            s0, s1, s2, s3 = zero, zero, zero, zero
            for k in range(K):
                a = xr[k]
                s0 += a * w0[k]
                s1 += a * w1[k]
                s2 += a * w2[k]
                s3 += a * w3[k]
            y[n, m], y[n, m + 1], y[n, m + 2], y[n, m + 3] = s0, s1, s2, s3
            m += 4
        while m < M:
            y[n, m] = _dot(xr, w[m])
            m += 1


@njit
def _quantize_row(xq, x):
    """Quantize one row x (K,) float32 into xq (K,) int8; return its float32 scale."""
    K = x.shape[0]
    amax = np.float32(0.0)
    for k in range(K):
        a = abs(x[k])
        if a > amax or a != a:  # `a != a`: a NaN sticks, so the row is rejected below
            amax = a
    scale = amax / _Q_MAX
    if not (scale >= _F32_TINY and scale < _F32_INF):  # zero, subnormal, inf or NaN
        for k in range(K):
            xq[k] = 0
        return np.float32(1.0)
    for k in range(K):
        r = np.rint(x[k] / scale)  # round half to even
        r = min(max(r, -_Q_MAX), _Q_MAX)
        xq[k] = np.int8(r)
    return scale


@njit
def _quantize_rows(xq, scale, x):
    """xq (N, K) int8 and scale (N,) float32 from x (N, K) float32, row by row."""
    for n in range(x.shape[0]):
        scale[n] = _quantize_row(xq[n], x[n])


@njit
def _int8_acc_row(acc, xq, wq):
    """acc (M,) int32 = xq (K,) int8 @ wq (K, M) int8, every product widened to int32."""
    K = xq.shape[0]
    M = wq.shape[1]
    for m in range(M):
        acc[m] = 0
    k = 0
    while k + 4 <= K:
        a0, a1 = np.int32(xq[k]), np.int32(xq[k + 1])
        a2, a3 = np.int32(xq[k + 2]), np.int32(xq[k + 3])
        w0, w1, w2, w3 = wq[k], wq[k + 1], wq[k + 2], wq[k + 3]
        for m in range(M):
            acc[m] += (
                a0 * np.int32(w0[m])
                + a1 * np.int32(w1[m])
                + a2 * np.int32(w2[m])
                + a3 * np.int32(w3[m])
            )
        k += 4
    while k < K:
        a, wk = np.int32(xq[k]), wq[k]
        for m in range(M):
            acc[m] += a * np.int32(wk[m])
        k += 1


@njit
def _matmul_int8_acc(acc, xq, wq):
    """acc (N, M) int32 = xq (N, K) int8 @ wq (K, M) int8, exact."""
    for n in range(xq.shape[0]):
        _int8_acc_row(acc[n], xq[n], wq)


@njit
def _matmul_int8_weight_only(y, x, wq, w_scale, bias):
    """y = (x @ float32(wq)) * w_scale (+ bias): y (N, M), x (N, K) float32, wq (K, M) int8."""
    N, K = x.shape
    M = wq.shape[1]
    for n in range(N):
        yr, xr = y[n], x[n]
        for m in range(M):
            yr[m] = 0
        k = 0
        while k + 4 <= K:
            a0, a1, a2, a3 = xr[k], xr[k + 1], xr[k + 2], xr[k + 3]
            w0, w1, w2, w3 = wq[k], wq[k + 1], wq[k + 2], wq[k + 3]
            for m in range(M):
                yr[m] += (
                    a0 * np.float32(w0[m])
                    + a1 * np.float32(w1[m])
                    + a2 * np.float32(w2[m])
                    + a3 * np.float32(w3[m])
                )
            k += 4
        while k < K:
            a, wk = xr[k], wq[k]
            for m in range(M):
                yr[m] += a * np.float32(wk[m])
            k += 1
        for m in range(M):
            yr[m] = yr[m] * w_scale[m]  # the channel scale, once per output
        if bias is not None:
            for m in range(M):
                yr[m] += bias[m]


@njit
def _matmul_w8a8(y, xq, sx, acc, x, wq, w_scale, bias):
    """W8A8 linear: quantize each row of x, int32 int8 x int8 sums, then both scales.

    Outputs y (N, M) float32; scratch xq (N, K) int8, sx (N,) float32, acc (M,) int32;
    inputs x (N, K) float32, wq (K, M) int8, w_scale (M,) float32, bias (M,) or None.
    """
    N = x.shape[0]
    M = wq.shape[1]
    for n in range(N):
        s = _quantize_row(xq[n], x[n])
        sx[n] = s
        _int8_acc_row(acc, xq[n], wq)
        # (float(acc) * sx) * w_scale in two loops: a compiler allowed to reassociate
        # would otherwise compute acc * (sx * w_scale), which rounds differently.
        for m in range(M):
            y[n, m] = np.float32(acc[m]) * s
        for m in range(M):
            y[n, m] = y[n, m] * w_scale[m]
        if bias is not None:
            for m in range(M):
                y[n, m] += bias[m]


@njit
def _softmax(y, x):
    """Row softmax of x (N, M) into y; an all -inf row gives zeros. Sums kept in float64."""
    N, M = x.shape
    for n in range(N):
        xr, yr = x[n], y[n]
        mx = xr[0]
        for m in range(1, M):
            if xr[m] > mx:
                mx = xr[m]
        if mx == -np.inf:  # nothing to attend to: exp(-inf) would be 0 everywhere
            for m in range(M):
                yr[m] = 0
            continue
        total = 0.0
        for m in range(M):
            e = np.exp(xr[m] - mx)
            yr[m] = e
            total += e
        for m in range(M):
            yr[m] = yr[m] / total


@njit
def _layernorm(y, x, weight, bias, eps):
    """LayerNorm of each row of x (N, C) into y; mean and variance summed in float64."""
    N, C = x.shape
    for n in range(N):
        xr, yr = x[n], y[n]
        total = 0.0
        for c in range(C):
            total += xr[c]
        mean = total / C
        sq = 0.0
        for c in range(C):
            d = xr[c] - mean
            sq += d * d
        rstd = 1.0 / np.sqrt(sq / C + eps)  # biased variance, as torch / GPT-2
        for c in range(C):
            yr[c] = (xr[c] - mean) * rstd * weight[c] + bias[c]


@njit
def _gelu(y, x):
    """Tanh-approximated GELU of the flat array x into y, in x's precision.

    0.5 v (1 + tanh(u)) is evaluated as v / (1 + exp(-2u)), the same function
    (0.5 (1 + tanh u) = sigmoid(2u)): exp is several times faster than tanh, and for
    negative v the sigmoid form has no cancellation in 1 + tanh(u) ~ 0. For v -> -inf,
    exp overflows to inf and the result is -0, as in the reference.
    """
    t = x.dtype.type
    c2, c3, one = t(2.0 * _GELU_C), t(0.044715), t(1.0)
    for i in range(x.shape[0]):
        v = x[i]
        y[i] = v / (one + np.exp(-c2 * (v + c3 * v * v * v)))


@njit
def _attention(out, att, q, k, v, n_head, scale):
    """Causal attention: out (Tq, C), att (NH, Tq, Tk) weights; q (Tq, C), k, v (Tk, C).

    Query i sits at absolute position Tk - Tq + i and sees keys 0 .. that position.
    """
    Tq, C = q.shape
    Tk = k.shape[0]
    HS = C // n_head
    for h in range(n_head):
        c0, c1 = h * HS, (h + 1) * HS
        for i in range(Tq):
            last = Tk - Tq + i
            a = att[h, i]  # (Tk,)
            qi = q[i, c0:c1]  # (HS,)
            mx = -np.inf
            for j in range(last + 1):
                s = _dot(qi, k[j, c0:c1]) * scale
                a[j] = s
                if s > mx:
                    mx = s
            total = 0.0
            for j in range(last + 1):
                a[j] = np.exp(a[j] - mx)
                total += a[j]  # the rounded weights, which are what is stored
            for j in range(last + 1):
                a[j] = a[j] / total
            for j in range(last + 1, Tk):
                a[j] = 0
            o = out[i, c0:c1]  # (HS,)
            for c in range(HS):
                o[c] = 0
            for j in range(last + 1):
                p, vj = a[j], v[j, c0:c1]
                for c in range(HS):
                    o[c] += p * vj[c]


# --------------------------------------------------------------------------- wrappers ---


def matmul(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w + bias. Equals `numpy_ref.matmul` within TOL[("kernel_dot", dtype)].

    Args:
        x: (N, K) float32 or float64 (any input that is not C-contiguous is copied).
        w: (K, M), dtype of x.
        bias: (M,), dtype of x, or None.
    Returns:
        y: (N, M), dtype of x.
    Raises:
        TypeError: a dtype other than float32/float64, or dtypes that differ.
        ValueError: shapes that do not match.
    """
    y, x, w, bias = chk.matmul_args(x, w, bias)
    _matmul(y, x, w, bias)
    return y


def matmul_nt(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T. Equals `numpy_ref.matmul_nt` within TOL[("kernel_dot", dtype)].

    Args:
        x: (N, K) float32 or float64.
        w: (M, K), dtype of x (e.g. the tied embedding wte (V, C) for the logits).
    Returns:
        y: (N, M), dtype of x.
    Raises:
        TypeError: a dtype other than float32/float64, or dtypes that differ.
        ValueError: shapes that do not match.
    """
    y, x, w = chk.matmul_nt_args(x, w)
    _matmul_nt(y, x, w)
    return y


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8. Equals `numpy_ref.quantize_rows` bit for bit.

    Args:
        x: (N, K) float32.
    Returns:
        xq: (N, K) int8 in [-127, 127]; scale: (N,) float32 (1.0, with xq = 0, for a row
        that is all zeros, whose scale underflows, or that holds a non-finite value).
    Raises:
        TypeError: x is not float32.
        ValueError: x is not 2-D.
    """
    xq, scale, x = chk.quantize_rows_args(x)
    _quantize_rows(xq, scale, x)
    return xq, scale


def matmul_int8_acc(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """Exact int32 xq @ wq. Equals `numpy_ref.matmul_int8_acc` bit for bit.

    Args:
        xq: (N, K) int8.
        wq: (K, M) int8, K <= 131071 (so the int32 sum cannot overflow).
    Returns:
        acc: (N, M) int32.
    Raises:
        TypeError: an input is not int8.
        ValueError: shapes that do not match, or K > 131071.
    """
    acc, xq, wq = chk.matmul_int8_acc_args(xq, wq)
    _matmul_int8_acc(acc, xq, wq)
    return acc


def matmul_int8(
    x: np.ndarray,
    wq: np.ndarray,
    w_scale: np.ndarray,
    bias: np.ndarray | None = None,
    mode: str = "weight-only",
) -> np.ndarray:
    """Linear layer with per-output-channel int8 weights, "weight-only" or "w8a8".

    Equals `numpy_ref.matmul_int8` within TOL[("kernel_dot", float32)] for "weight-only";
    for "w8a8" the quantized activations and int32 sums are bit-identical and the float
    epilogue agrees within TOL[("kernel", float32)].

    Args:
        x: (N, K) float32.
        wq: (K, M) int8, K <= 131071.
        w_scale: (M,) float32, one scale per output channel.
        bias: (M,) float32 or None.
        mode: "weight-only" (float activations) or "w8a8" (activations quantized per row).
    Returns:
        y: (N, M) float32.
    Raises:
        ValueError: an unknown mode, shapes that do not match, K > 131071.
        TypeError: a wrong dtype.
    """
    y, x, wq, w_scale, bias = chk.matmul_int8_args(x, wq, w_scale, bias, mode)
    if mode == "weight-only":
        _matmul_int8_weight_only(y, x, wq, w_scale, bias)
    else:
        N, K = x.shape
        xq = np.empty((N, K), dtype=np.int8)
        sx = np.empty(N, dtype=np.float32)
        acc = np.empty(wq.shape[1], dtype=np.int32)
        _matmul_w8a8(y, xq, sx, acc, x, wq, w_scale, bias)
    return y


def softmax(x: np.ndarray) -> np.ndarray:
    """Row softmax. Equals `numpy_ref.softmax` within TOL[("kernel", dtype)].

    Args:
        x: (N, M) float32 or float64, M >= 1.
    Returns:
        y: (N, M), dtype of x; an all -inf row gives zeros.
    Raises:
        TypeError: a dtype other than float32/float64.
        ValueError: x is not 2-D or has no columns.
    """
    y, x = chk.softmax_args(x)
    _softmax(y, x)
    return y


def layernorm(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5
) -> np.ndarray:
    """LayerNorm over the last axis. Equals `numpy_ref.layernorm` within TOL[("kernel", dtype)].

    Args:
        x: (N, C) float32 or float64.
        weight, bias: (C,), dtype of x.
        eps: > 0, added to the biased variance.
    Returns:
        y: (N, C), dtype of x.
    Raises:
        TypeError: a dtype other than float32/float64, or dtypes that differ.
        ValueError: shapes that do not match, or eps <= 0.
    """
    y, x, weight, bias, eps = chk.layernorm_args(x, weight, bias, eps)
    _layernorm(y, x, weight, bias, eps)
    return y


def gelu(x: np.ndarray) -> np.ndarray:
    """Tanh-approximated GELU. Equals `numpy_ref.gelu` within TOL[("kernel", dtype)].

    Args:
        x: any shape, float32 or float64.
    Returns:
        y: shape and dtype of x.
    Raises:
        TypeError: a dtype other than float32/float64.
    """
    y, x = chk.gelu_args(x)
    _gelu(y.reshape(-1), x.reshape(-1))
    return y


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    n_head: int,
    att_out: np.ndarray | None = None,
) -> np.ndarray:
    """Causal multi-head attention, prefill (Tq == Tk) or decode (Tq < Tk).

    Equals `numpy_ref.attention` within TOL[("kernel_attention", dtype)], and the weights
    written to att_out within TOL[("kernel", dtype)].

    Args:
        q: (Tq, C) float32 or float64 (a column slice of a qkv array is copied).
        k, v: (Tk, C), dtype of q, Tk >= Tq (row slices of a KV cache are used in place).
        n_head: heads NH, dividing C.
        att_out: optional C-contiguous (NH, Tq, Tk) array of q's dtype for the weights.
    Returns:
        out: (Tq, C), dtype of q.
    Raises:
        TypeError: a wrong dtype.
        ValueError: shapes that do not match, or att_out not C-contiguous.
    """
    out, att, q, k, v, n_head, scale = chk.attention_args(q, k, v, n_head, att_out)
    _attention(out, att, q, k, v, n_head, scale)
    return out
