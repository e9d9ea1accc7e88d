"""numba backend: private `@njit` loops, and `NumbaLoops`, the table `Backend` calls them by.

The checked public functions are `backend.Backend`'s (`get_backend("numba")`); the loops
here only compute: they take C-contiguous arrays and a preallocated output, in the order
outputs, inputs, weights, sizes. Their compile options come from `_jit.py`; with
`NUMBA_DISABLE_JIT=1` they run as plain (slow) Python and give the same results. The fused
path (`numba_fused`) calls the row loops (`_matmul_row`, `_quantize_row`, ...) itself, so
that its stages round exactly as these kernels do.

Matmul loops run k outside m so that the innermost loop walks a (K, M) weight row and an
output row contiguously and LLVM vectorizes it; the k loop is unrolled by 4 (and rows
taken 4 at a time) so each output element is loaded and stored once per 4 products, not
once per product. Row loops index their 2-D arguments (`w[k, m]`) rather than take row
views: a view made inside a numba loop costs two atomic reference-count updates.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import njit
from .numpy_loops import ReferenceLoops

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
def _matmul_row(y, x, w):
    """y (M,) = x (K,) @ w (K, M), one row (`_matmul` and the fused decode's float linears)."""
    K, M = w.shape
    for m in range(M):
        y[m] = 0
    k = 0
    while k + 4 <= K:
        a0, a1, a2, a3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        for m in range(M):
            y[m] += a0 * w[k, m] + a1 * w[k + 1, m] + a2 * w[k + 2, m] + a3 * w[k + 3, m]
        k += 4
    while k < K:
        a = x[k]
        for m in range(M):
            y[m] += a * w[k, m]
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
def _matmul_nt_row(y, x, w):
    """y (M,) = x (K,) @ w.T, w (M, K): each output a contiguous dot product, four rows of w
    per pass (x loaded once for four sums; LLVM vectorizes each sum into vector lanes), then
    the last M % 4 one at a time. An output's sum depends only on where its group of four
    starts, so callers that cut w into pieces start each piece at a multiple of 4.

    Four rows per pass streamed GPT-2 small's tied head (50,257 x 768) from memory faster
    than one dot product at a time on an Intel Xeon (AVX-512), at 1 and 2 threads, whether
    numba compiled for that CPU, znver3 or znver4 (`bench/compare.py --config gpt2` times
    the decode step it ends); an earlier run on a shared Zen 4 had found the opposite.
    """
    M, K = w.shape
    m = 0
    while m + 4 <= M:
        w0, w1, w2, w3 = w[m], w[m + 1], w[m + 2], w[m + 3]
        s0 = s1 = s2 = s3 = y.dtype.type(0)
        for k in range(K):
            a = x[k]
            s0 += a * w0[k]
            s1 += a * w1[k]
            s2 += a * w2[k]
            s3 += a * w3[k]
        y[m], y[m + 1], y[m + 2], y[m + 3] = s0, s1, s2, s3
        m += 4
    while m < M:
        wm = w[m]
        s0 = y.dtype.type(0)
        for k in range(K):
            s0 += x[k] * wm[k]
        y[m] = s0
        m += 1


NT_CHUNK = 64  # rows of w per pass of `_matmul_nt` (64 x C floats: 192 KB at d_model 768, in L2)


@njit
def _matmul_nt(y, x, w):
    """y (N, M) = x (N, K) @ w.T, w (M, K): NT_CHUNK rows of w at a time for every row of
    x, so that a w larger than the caches (the tied head, V x C) is read from memory once,
    not N times; each output sums exactly as `_matmul_nt_row` of the whole row does."""
    M = w.shape[0]
    for m0 in range(0, M, NT_CHUNK):
        m1 = min(m0 + NT_CHUNK, M)
        for n in range(x.shape[0]):
            _matmul_nt_row(y[n, m0:m1], x[n], w[m0:m1])


@njit
def _quantize_row(xq, x):
    """Quantize one row x (K,) float32 into xq (K,) int8; return its float32 scale.

    `numpy_ref.quantize_rows` bit for bit, in loops LLVM vectorizes: the max of |x| is
    exact in any order, a NaN anywhere rejects the row (through its own flag: `max` would
    drop it), and each element is x / scale rounded half to even and clamped.
    """
    K = x.shape[0]
    amax = np.float32(0.0)
    nan = False
    for k in range(K):
        a = abs(x[k])
        amax = max(amax, a)
        nan |= a != a
    scale = amax / _Q_MAX
    if nan or not (scale >= _F32_TINY and scale < _F32_INF):  # 0, subnormal, inf or NaN
        for k in range(K):
            xq[k] = 0
        return np.float32(1.0)
    for k in range(K):
        r = np.rint(x[k] / scale)  # round half to even
        xq[k] = np.int8(min(max(r, -_Q_MAX), _Q_MAX))
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
def _matmul_int8_row(y, x, wq, w_scale, bias):
    """y (M,) = (x (K,) @ float32(wq (K, M))) * w_scale (M,) + bias (M,) or None."""
    K, M = wq.shape
    for m in range(M):
        y[m] = 0
    k = 0
    while k + 4 <= K:
        a0, a1, a2, a3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        for m in range(M):
            y[m] += (a0 * np.float32(wq[k, m]) + a1 * np.float32(wq[k + 1, m])
                     + a2 * np.float32(wq[k + 2, m]) + a3 * np.float32(wq[k + 3, m]))
        k += 4
    while k < K:
        a = x[k]
        for m in range(M):
            y[m] += a * np.float32(wq[k, m])
        k += 1
    for m in range(M):
        y[m] = y[m] * w_scale[m]  # the channel scale, once per output
    if bias is not None:
        for m in range(M):
            y[m] += bias[m]


@njit
def _matmul_int8_weight_only(y, x, wq, w_scale, bias):
    """y (N, M) = (x (N, K) @ float32(wq (K, M))) * w_scale + bias, row by row."""
    for n in range(x.shape[0]):
        _matmul_int8_row(y[n], x[n], wq, w_scale, bias)


@njit
def _w8a8_epilogue(y, acc, s, w_scale, bias):
    """y (M,) = (float32(acc) * s) * w_scale + bias: the float end of a W8A8 row.

    Three loops: a compiler allowed to reassociate would otherwise compute
    acc * (s * w_scale), which rounds differently from `numpy_ref.matmul_int8`.
    """
    M = y.shape[0]
    for m in range(M):
        y[m] = np.float32(acc[m]) * s
    for m in range(M):
        y[m] = y[m] * w_scale[m]
    if bias is not None:
        for m in range(M):
            y[m] += bias[m]


@njit
def _matmul_w8a8(y, xq, sx, acc, x, wq, w_scale, bias):
    """W8A8 linear: quantize each row of x, int32 int8 x int8 sums, then both scales.

    Outputs y (N, M) float32; scratch xq (N, K) int8, sx (N,) float32, acc (M,) int32;
    inputs x (N, K) float32, wq (K, M) int8, w_scale (M,) float32, bias (M,) or None.
    """
    for n in range(x.shape[0]):
        sx[n] = _quantize_row(xq[n], x[n])
        _int8_acc_row(acc, xq[n], wq)
        _w8a8_epilogue(y[n], acc, sx[n], w_scale, bias)


@njit
def _matmul_nt_int8_row(y, x, wq, w_scale):
    """y (M,) = (x (K,) @ float32(wq (M, K)).T) * w_scale (M,): each output a contiguous
    dot product of x with an int8 row (as `_matmul_nt_row`), then its row's scale once."""
    M, K = wq.shape
    for m in range(M):
        s0 = np.float32(0)
        for k in range(K):
            s0 += x[k] * np.float32(wq[m, k])
        y[m] = s0 * w_scale[m]


@njit
def _matmul_nt_int8_weight_only(y, x, wq, w_scale):
    """y (N, M) = (x (N, K) @ float32(wq (M, K)).T) * w_scale: NT_CHUNK rows of wq at a time
    for every row of x (`_matmul_nt`), each output as `_matmul_nt_int8_row` computes it."""
    M = wq.shape[0]
    for m0 in range(0, M, NT_CHUNK):
        m1 = min(m0 + NT_CHUNK, M)
        for n in range(x.shape[0]):
            _matmul_nt_int8_row(y[n, m0:m1], x[n], wq[m0:m1], w_scale[m0:m1])


@njit
def _int8_dot_rows(acc, xq, wq):
    """acc (M,) int32 = wq (M, K) int8 @ xq (K,) int8: a contiguous exact dot per row."""
    M, K = wq.shape
    for m in range(M):
        s0 = np.int32(0)
        for k in range(K):
            s0 += np.int32(xq[k]) * np.int32(wq[m, k])
        acc[m] = s0


@njit
def _matmul_nt_w8a8(y, xq, sx, acc, x, wq, w_scale):
    """The W8A8 head: quantize each row of x, exact int32 sums against the int8 rows of wq,
    then both scales (`_w8a8_epilogue`). acc.shape[0] rows of wq at a time for every row of
    x, so the head is read once for all rows.

    Outputs y (N, M) float32; scratch xq (N, K) int8, sx (N,) float32, acc (chunk,) int32;
    inputs x (N, K) float32, wq (M, K) int8, w_scale (M,) float32.
    """
    N, M = x.shape[0], wq.shape[0]
    chunk = acc.shape[0]
    for n in range(N):
        sx[n] = _quantize_row(xq[n], x[n])
    for m0 in range(0, M, chunk):
        m1 = min(m0 + chunk, M)
        for n in range(N):
            _int8_dot_rows(acc[:m1 - m0], xq[n], wq[m0:m1])
            _w8a8_epilogue(y[n, m0:m1], acc[:m1 - m0], sx[n], w_scale[m0:m1], None)


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




# ----------------------------------------------------------------------------- table ----


class NumbaLoops(ReferenceLoops):
    """The loops of the numba backend (signatures: `numpy_loops.ReferenceLoops`)."""

    REFERENCE_OPS: frozenset[str] = frozenset()  # every op is compiled

    matmul = staticmethod(_matmul)
    matmul_nt = staticmethod(_matmul_nt)
    quantize_rows = staticmethod(_quantize_rows)
    matmul_int8_acc = staticmethod(_matmul_int8_acc)
    matmul_int8_weight_only = staticmethod(_matmul_int8_weight_only)
    matmul_w8a8 = staticmethod(_matmul_w8a8)
    matmul_nt_int8_weight_only = staticmethod(_matmul_nt_int8_weight_only)
    matmul_nt_w8a8 = staticmethod(_matmul_nt_w8a8)
    softmax = staticmethod(_softmax)
    layernorm = staticmethod(_layernorm)
    gelu = staticmethod(_gelu)
    attention = staticmethod(_attention)


LOOPS = NumbaLoops
