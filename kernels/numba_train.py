"""numba backend, training: the compiled loops of a training step, and `NumbaLoops` with them.

The loops of the training ops of `backend.Backend` (embedding, LayerNorm, GELU, the
attention's causal softmax, softmax cross-entropy, dropout, residual adds, the global
gradient norm and AdamW), each the compiled form of the `numpy_loops.ReferenceLoops`
method of the same name and equal to it within the tolerance its Backend docstring names.
The matmuls between them are BLAS calls in `Backend`. Every loop takes its outputs first,
then inputs, weights and sizes, works for float32 and float64, and runs with
`NUMBA_DISABLE_JIT=1` as plain Python.

A training step works on B * T rows at once (4096 at the default batch), so these loops
run in parallel over blocks of rows or elements (`prange`; options from `_jit.py`, threads
set by `minitf.threads.set_threads`). Reductions over rows (LayerNorm's weight gradients,
the gradient norm) sum a partial result per block, in float64, then add the blocks in a
fixed order: the result does not depend on the number of threads.

float32 exponentials use `numba_fused`'s vectorized exp (within 2 ulp of `np.exp`; libm's
is a call per element); float64 ones use `np.exp`. Which one runs is decided by the arrays'
itemsize, a constant of each compiled specialization, so the other branch is compiled away.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ._jit import njit, njit_parallel
from .numba_fused import _exp_into, _exp_scratch
from .numba_kernels import NumbaLoops

_GELU_C = math.sqrt(2.0 / math.pi)
_ROWS = 64  # rows per parallel block of the row loops
_ELEMS = 4096  # elements per parallel block of the elementwise loops (32 KiB of exp scratch)


# ------------------------------------------------------------------------- helpers ----
# Each op is a serial kernel over a block of rows or elements (`_*_rows`), whose loops run
# from 0 over its slices so that LLVM vectorizes them (a loop from a block's offset inside a
# prange body does not vectorize, measured 10-30x slower), and a driver that runs the
# blocks in parallel.


@njit
def _blocks(n, size):
    """The number of blocks of `size` that cover n items."""
    return (n + size - 1) // size


@njit
def _exp_row(y, x, shift, ex):
    """y = exp(x - shift) over a row (n,): the vectorized exp for float32 (ex: its
    `_exp_scratch`, at least n), np.exp for float64. y may be x."""
    if y.itemsize == 4:
        _exp_into(y, x, y.dtype.type(shift), ex)
    else:
        for i in range(x.shape[0]):
            y[i] = np.exp(x[i] - shift)


# ------------------------------------------------------------------- embedding -------


@njit_parallel
def _embedding_forward(x, idx, wte, wpe):
    """x (B, T, C) = wte[idx] + wpe[:T]; idx (B, T) int64."""
    B, T, C = x.shape
    for b in prange(B):
        for t in range(T):
            tok = idx[b, t]
            for c in range(C):
                x[b, t, c] = wte[tok, c] + wpe[t, c]


@njit
def _embedding_backward(dwte, dwpe, dx, idx):
    """dwte (V, C): every row of dx (B, T, C) added into its token's row, in the order of
    the batch (as np.add.at); dwpe (block_size, C): the sum over the batch at each position.
    Serial: two rows of one token would race."""
    B, T, C = dx.shape
    dwte[:] = 0
    dwpe[:] = 0
    for b in range(B):
        for t in range(T):
            tok = idx[b, t]
            for c in range(C):
                dwte[tok, c] += dx[b, t, c]
                dwpe[t, c] += dx[b, t, c]


# ------------------------------------------------------------------- LayerNorm -------


@njit
def _layernorm_forward_rows(y, mean, rstd, x, weight, bias, eps):
    """y (n, C), mean and rstd (n,) of each row of x (n, C); statistics summed in float64."""
    n, C = x.shape
    for r in range(n):
        total = 0.0
        for c in range(C):
            total += x[r, c]
        mu = total / C
        sq = 0.0
        for c in range(C):
            d = x[r, c] - mu
            sq += d * d
        m, s = x.dtype.type(mu), x.dtype.type(1.0 / np.sqrt(sq / C + eps))  # biased variance
        mean[r], rstd[r] = m, s
        for c in range(C):
            y[r, c] = (x[r, c] - m) * s * weight[c] + bias[c]


@njit_parallel
def _layernorm_forward(y, mean, rstd, x, weight, bias, eps):
    """y (N, C), mean, rstd (N,): `_layernorm_forward_rows` on blocks of rows in parallel."""
    N = x.shape[0]
    for blk in prange(_blocks(N, _ROWS)):
        lo, hi = blk * _ROWS, min((blk + 1) * _ROWS, N)
        _layernorm_forward_rows(y[lo:hi], mean[lo:hi], rstd[lo:hi], x[lo:hi], weight, bias, eps)


@njit
def _layernorm_backward_rows(dx, dweight, dbias, dy, x, mean, rstd, weight):
    """dx (n, C) from dy, x (n, C), mean, rstd (n,), weight (C,); adds the rows' dweight and
    dbias into the float64 partial sums dweight, dbias (C,).

    Per row, with x_hat = (x - mean) rstd and g = dy * weight (llm.c's layernorm_backward):
    dx = rstd (g - mean(g) - x_hat mean(g x_hat)).
    """
    n, C = x.shape
    for r in range(n):
        m, s = mean[r], rstd[r]
        s1 = 0.0
        s2 = 0.0
        for c in range(C):
            xh = (x[r, c] - m) * s
            g = dy[r, c] * weight[c]
            s1 += g
            s2 += g * xh
            dweight[c] += dy[r, c] * xh
            dbias[c] += dy[r, c]
        a, b = x.dtype.type(s1 / C), x.dtype.type(s2 / C)
        for c in range(C):
            xh = (x[r, c] - m) * s
            dx[r, c] = s * (dy[r, c] * weight[c] - a - xh * b)


@njit_parallel
def _layernorm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight):
    """dx (N, C), dweight and dbias (C,): `_layernorm_backward_rows` on blocks of rows in
    parallel, one float64 partial of the column sums per block, added block by block."""
    N, C = x.shape
    nb = _blocks(N, _ROWS)
    part_w = np.zeros((nb, C))
    part_b = np.zeros((nb, C))
    for blk in prange(nb):
        lo, hi = blk * _ROWS, min((blk + 1) * _ROWS, N)
        _layernorm_backward_rows(dx[lo:hi], part_w[blk], part_b[blk], dy[lo:hi], x[lo:hi],
                                 mean[lo:hi], rstd[lo:hi], weight)
    for c in range(C):
        tw = 0.0
        tb = 0.0
        for blk in range(nb):
            tw += part_w[blk, c]
            tb += part_b[blk, c]
        dweight[c], dbias[c] = tw, tb


# ------------------------------------------------------------------------ GELU -------


@njit
def _gelu_forward_rows(y, tanh_u, x, ex):
    """GPT-2's GELU of x (n,) and tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3); ex: the exp
    scratch (`_exp_scratch`, at least n).

    0.5 x (1 + tanh u) = x sigmoid(2u): one exp per element, with s = 1 / (1 + exp(-2u)),
    y = x s and tanh u = 2 s - 1 (an absolute error of an ulp near u = 0, which is what the
    backward's 1 + tanh u and 1 - tanh^2 u can see).
    """
    t = x.dtype.type
    c2, c3, one, two = t(-2.0 * _GELU_C), t(0.044715), t(1.0), t(2.0)
    for i in range(x.shape[0]):
        v = x[i]
        tanh_u[i] = c2 * (v + c3 * v * v * v)  # -2u: tanh_u holds the exp's input, then tanh u
    _exp_row(tanh_u, tanh_u, 0.0, ex)
    for i in range(x.shape[0]):
        s = one / (one + tanh_u[i])
        y[i] = x[i] * s
        tanh_u[i] = two * s - one


@njit_parallel
def _gelu_forward(y, tanh_u, x):
    """y, tanh_u (n,) of the flat x (n,): `_gelu_forward_rows` on blocks in parallel."""
    n = x.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        lo, hi = blk * _ELEMS, min((blk + 1) * _ELEMS, n)
        ex = _exp_scratch(np.empty(2 * (hi - lo), np.int32), hi - lo)
        _gelu_forward_rows(y[lo:hi], tanh_u[lo:hi], x[lo:hi], ex)


@njit
def _gelu_backward_rows(dx, dy, x, tanh_u):
    """dx (n,) = dy * gelu'(x), from the forward's tanh_u:
    gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    t = x.dtype.type
    half, one, s, c = t(0.5), t(1.0), t(_GELU_C), t(3.0 * 0.044715)
    for i in range(x.shape[0]):
        v, th = x[i], tanh_u[i]
        du = s * (one + c * v * v)
        dx[i] = dy[i] * (half * (one + th) + half * v * (one - th * th) * du)


@njit_parallel
def _gelu_backward(dx, dy, x, tanh_u):
    """dx (n,) on flat arrays: `_gelu_backward_rows` on blocks in parallel."""
    n = x.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        lo, hi = blk * _ELEMS, min((blk + 1) * _ELEMS, n)
        _gelu_backward_rows(dx[lo:hi], dy[lo:hi], x[lo:hi], tanh_u[lo:hi])


# ----------------------------------------------------------- attention's softmax -----


@njit
def _causal_softmax_rows(att, dropped, mask, scale, ex):
    """In place: the scores att (T, T) of one head become softmax(scale * scores) over keys
    j <= i of each query row i, zero above the diagonal; dropped = att * mask (both None: no
    dropout); ex: the exp scratch of T. The row's sum is float64."""
    T = att.shape[0]
    for i in range(T):
        row = att[i, :i + 1]
        for j in range(i + 1):
            row[j] *= scale
        mx = row[0]
        for j in range(i + 1):
            mx = max(mx, row[j])
        _exp_row(row, row, mx, ex)
        total = 0.0
        for j in range(i + 1):
            total += row[j]
        inv = row.dtype.type(1.0 / total)
        for j in range(i + 1):
            row[j] *= inv
        att[i, i + 1:] = 0
        if mask is not None:
            keep, out = mask[i, :i + 1], dropped[i, :i + 1]
            for j in range(i + 1):
                out[j] = row[j] * keep[j]
            dropped[i, i + 1:] = 0


@njit_parallel
def _causal_softmax(att, dropped, mask, scale):
    """att (R, T, T) in place (and dropped): `_causal_softmax_rows` on each head in parallel."""
    R, T, _ = att.shape
    for r in prange(R):
        ex = _exp_scratch(np.empty(2 * T, np.int32), T)
        if mask is None:
            _causal_softmax_rows(att[r], None, None, scale, ex)
        else:
            _causal_softmax_rows(att[r], dropped[r], mask[r], scale, ex)


@njit
def _causal_softmax_backward_rows(datt, att, mask, scale):
    """In place: datt (T, T) of one head, the gradient of the (dropped) weights, becomes
    scale * the gradient of the scores: with g = datt * mask (datt without a mask), row by
    row dscores_j = att_j (g_j - sum_k att_k g_k) for j <= i, zero above the diagonal."""
    T = datt.shape[0]
    for i in range(T):
        g, a = datt[i, :i + 1], att[i, :i + 1]
        if mask is not None:
            keep = mask[i, :i + 1]
            for j in range(i + 1):
                g[j] *= keep[j]
        total = 0.0
        for j in range(i + 1):
            total += g[j] * a[j]
        s = datt.dtype.type(total)
        for j in range(i + 1):
            g[j] = scale * (a[j] * (g[j] - s))
        datt[i, i + 1:] = 0


@njit_parallel
def _causal_softmax_backward(datt, att, mask, scale):
    """datt (R, T, T) in place: `_causal_softmax_backward_rows` on each head in parallel."""
    for r in prange(datt.shape[0]):
        if mask is None:
            _causal_softmax_backward_rows(datt[r], att[r], None, scale)
        else:
            _causal_softmax_backward_rows(datt[r], att[r], mask[r], scale)


# -------------------------------------------------------------- cross-entropy --------


@njit
def _cross_entropy_forward_rows(loss, probs, logits, targets, ex):
    """loss (n,) = logsumexp(logits[r]) - logits[r, targets[r]] and probs (n, V) = softmax;
    ex: the exp scratch of V. The row's sum is float64."""
    n, V = logits.shape
    for r in range(n):
        row, x = probs[r], logits[r]
        mx = x[0]
        for j in range(V):
            mx = max(mx, x[j])
        _exp_row(row, x, mx, ex)
        total = 0.0
        for j in range(V):
            total += row[j]
        inv = row.dtype.type(1.0 / total)
        for j in range(V):
            row[j] *= inv
        loss[r] = mx + np.log(total) - x[targets[r]]


@njit_parallel
def _cross_entropy_forward(loss, probs, logits, targets):
    """loss (N,), probs (N, V): `_cross_entropy_forward_rows` on blocks of rows in parallel."""
    N, V = logits.shape
    for blk in prange(_blocks(N, _ROWS)):
        lo, hi = blk * _ROWS, min((blk + 1) * _ROWS, N)
        ex = _exp_scratch(np.empty(2 * V, np.int32), V)
        _cross_entropy_forward_rows(loss[lo:hi], probs[lo:hi], logits[lo:hi], targets[lo:hi], ex)


@njit
def _cross_entropy_backward_rows(dlogits, dloss, probs, targets):
    """dlogits (n, V) = (probs - one_hot(targets)) * dloss[r]."""
    n, V = probs.shape
    one = probs.dtype.type(1.0)
    for r in range(n):
        d = dloss[r]
        for j in range(V):
            dlogits[r, j] = probs[r, j] * d
        dlogits[r, targets[r]] = (probs[r, targets[r]] - one) * d


@njit_parallel
def _cross_entropy_backward(dlogits, dloss, probs, targets):
    """dlogits (N, V): `_cross_entropy_backward_rows` on blocks of rows in parallel."""
    N = probs.shape[0]
    for blk in prange(_blocks(N, _ROWS)):
        lo, hi = blk * _ROWS, min((blk + 1) * _ROWS, N)
        _cross_entropy_backward_rows(dlogits[lo:hi], dloss[lo:hi], probs[lo:hi], targets[lo:hi])


# --------------------------------------------------------- dropout, residuals --------


@njit
def _dropout_mask_rows(mask, u, p):
    """mask (n,) = 1 / (1 - p) where u >= p, else 0, compared in u's precision (as numpy
    compares an array with a Python float); mask may be u."""
    t = u.dtype.type
    pt, keep, zero = t(p), t(1.0 / (1.0 - p)), t(0.0)
    for i in range(u.shape[0]):
        mask[i] = keep if u[i] >= pt else zero


@njit_parallel
def _dropout_mask(mask, u, p):
    n = u.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        lo, hi = blk * _ELEMS, min((blk + 1) * _ELEMS, n)
        _dropout_mask_rows(mask[lo:hi], u[lo:hi], p)


@njit
def _dropout_rows(y, x, mask):
    """y (n,) = x * mask."""
    for i in range(x.shape[0]):
        y[i] = x[i] * mask[i]


@njit_parallel
def _dropout(y, x, mask):
    n = x.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        lo, hi = blk * _ELEMS, min((blk + 1) * _ELEMS, n)
        _dropout_rows(y[lo:hi], x[lo:hi], mask[lo:hi])


@njit
def _residual_add_rows(y, x, a, mask):
    """y (n,) = x + a * mask, or x + a without a mask; y may be x."""
    if mask is None:
        for i in range(x.shape[0]):
            y[i] = x[i] + a[i]
    else:
        for i in range(x.shape[0]):
            y[i] = x[i] + a[i] * mask[i]


@njit_parallel
def _residual_add(y, x, a, mask):
    n = x.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        lo, hi = blk * _ELEMS, min((blk + 1) * _ELEMS, n)
        if mask is None:
            _residual_add_rows(y[lo:hi], x[lo:hi], a[lo:hi], None)
        else:
            _residual_add_rows(y[lo:hi], x[lo:hi], a[lo:hi], mask[lo:hi])


# ------------------------------------------------------------------ optimizer --------


@njit
def _sum_squares(g):
    """sum g^2 of g (n,), in float64."""
    s = 0.0
    for i in range(g.shape[0]):
        s += np.float64(g[i]) * np.float64(g[i])
    return s


@njit_parallel
def _global_norm(total, g):
    """total[0] = sqrt(sum g^2) of g (P,), one float64 partial sum per block, added in order."""
    n = g.shape[0]
    nb = _blocks(n, _ELEMS)
    part = np.zeros(nb)
    for blk in prange(nb):
        lo, hi = blk * _ELEMS, min((blk + 1) * _ELEMS, n)
        part[blk] = _sum_squares(g[lo:hi])
    acc = 0.0
    for blk in range(nb):
        acc += part[blk]
    total[0] = np.sqrt(acc)


@njit
def _adamw_rows(p, m, v, g, decay, scale, b1, b2, c1, c2, shrink, rs2, step_size, e):
    """One AdamW step in place on p, m, v (n,) from g (n,), the scalars already in p's
    precision (see `_adamw`); decay: whether these parameters get weight decay."""
    if decay:  # decoupled, before the Adam step
        for i in range(p.shape[0]):
            p[i] *= shrink
    for i in range(p.shape[0]):
        gi = g[i] * scale
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
        m[i], v[i] = mi, vi
        p[i] -= step_size * (mi / (np.sqrt(vi) / rs2 + e))


@njit_parallel
def _adamw(p, m, v, g, n_decay, lr, beta1, beta2, eps, weight_decay, step, grad_scale):
    """One AdamW step in place on p, m, v (P,) from g (P,), in the precision of p, the
    scalars rounded to it first (as numpy computes the reference); decay on p[:n_decay].
    Blocks of `_adamw_rows` in parallel, the decayed prefix and the rest apart."""
    t = p.dtype.type
    hyper = (t(grad_scale), t(beta1), t(beta2), t(1.0 - beta1), t(1.0 - beta2),
             t(1.0 - lr * weight_decay), t(math.sqrt(1.0 - beta2**step)),
             t(lr / (1.0 - beta1**step)), t(eps))
    n = p.shape[0]
    nd = _blocks(n_decay, _ELEMS)  # blocks of the decayed prefix, then of the rest
    for blk in prange(nd + _blocks(n - n_decay, _ELEMS)):
        start, stop = (0, n_decay) if blk < nd else (n_decay, n)
        lo = start + (blk if blk < nd else blk - nd) * _ELEMS
        hi = min(lo + _ELEMS, stop)
        _adamw_rows(p[lo:hi], m[lo:hi], v[lo:hi], g[lo:hi], blk < nd, *hyper)


# ----------------------------------------------------------------------------- table ----


class NumbaTrainLoops(NumbaLoops):
    """The numba backend's loops, inference (`numba_kernels.NumbaLoops`) and training."""

    REFERENCE_OPS: frozenset[str] = frozenset()  # every op is compiled

    embedding_forward = staticmethod(_embedding_forward)
    embedding_backward = staticmethod(_embedding_backward)
    layernorm_forward = staticmethod(_layernorm_forward)
    layernorm_backward = staticmethod(_layernorm_backward)
    gelu_forward = staticmethod(_gelu_forward)
    gelu_backward = staticmethod(_gelu_backward)
    causal_softmax = staticmethod(_causal_softmax)
    causal_softmax_backward = staticmethod(_causal_softmax_backward)
    cross_entropy_forward = staticmethod(_cross_entropy_forward)
    cross_entropy_backward = staticmethod(_cross_entropy_backward)
    dropout_mask = staticmethod(_dropout_mask)
    dropout = staticmethod(_dropout)
    residual_add = staticmethod(_residual_add)
    global_norm = staticmethod(_global_norm)
    adamw = staticmethod(_adamw)


LOOPS = NumbaTrainLoops
