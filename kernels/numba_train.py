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


@njit_parallel
def _layernorm_forward(y, mean, rstd, x, weight, bias, eps):
    """y (N, C), mean and rstd (N,) of each row of x (N, C); statistics summed in float64."""
    N, C = x.shape
    for n in prange(N):
        total = 0.0
        for c in range(C):
            total += x[n, c]
        mu = total / C
        sq = 0.0
        for c in range(C):
            d = x[n, c] - mu
            sq += d * d
        r = 1.0 / np.sqrt(sq / C + eps)  # biased variance, as torch / GPT-2
        mean[n], rstd[n] = mu, r
        m, s = x.dtype.type(mu), x.dtype.type(r)
        for c in range(C):
            y[n, c] = (x[n, c] - m) * s * weight[c] + bias[c]


@njit_parallel
def _layernorm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight):
    """dx (N, C), dweight and dbias (C,) from dy, x (N, C), mean, rstd (N,), weight (C,).

    Per row, with x_hat = (x - mean) rstd and g = dy * weight (llm.c's layernorm_backward):
    dx = rstd (g - mean(g) - x_hat mean(g x_hat)); dweight and dbias are column sums, one
    float64 partial per block of rows, then added block by block.
    """
    N, C = x.shape
    nb = _blocks(N, _ROWS)
    part_w = np.zeros((nb, C))
    part_b = np.zeros((nb, C))
    for blk in prange(nb):
        for n in range(blk * _ROWS, min((blk + 1) * _ROWS, N)):
            m, r = mean[n], rstd[n]
            s1 = 0.0
            s2 = 0.0
            for c in range(C):
                xh = (x[n, c] - m) * r
                g = dy[n, c] * weight[c]
                s1 += g
                s2 += g * xh
                part_w[blk, c] += dy[n, c] * xh
                part_b[blk, c] += dy[n, c]
            a, b = x.dtype.type(s1 / C), x.dtype.type(s2 / C)
            for c in range(C):
                xh = (x[n, c] - m) * r
                dx[n, c] = r * (dy[n, c] * weight[c] - a - xh * b)
    for c in range(C):
        tw = 0.0
        tb = 0.0
        for blk in range(nb):
            tw += part_w[blk, c]
            tb += part_b[blk, c]
        dweight[c], dbias[c] = tw, tb


# ------------------------------------------------------------------------ GELU -------


@njit_parallel
def _gelu_forward(y, tanh_u, x):
    """GPT-2's GELU of the flat x (n,) and tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3).

    0.5 x (1 + tanh u) = x sigmoid(2u): one exp per element, with s = 1 / (1 + exp(-2u)),
    y = x s and tanh u = 2 s - 1 (an absolute error of an ulp near u = 0, which is what the
    backward's 1 + tanh u and 1 - tanh^2 u can see).
    """
    t = x.dtype.type
    c2, c3, one, two = t(-2.0 * _GELU_C), t(0.044715), t(1.0), t(2.0)
    n = x.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        lo, hi = blk * _ELEMS, min((blk + 1) * _ELEMS, n)
        ex = _exp_scratch(np.empty(2 * _ELEMS, np.int32), hi - lo)
        e = tanh_u[lo:hi]  # scratch for exp(-2u), then tanh u
        xs = x[lo:hi]
        for i in range(hi - lo):
            v = xs[i]
            e[i] = c2 * (v + c3 * v * v * v)
        _exp_row(e, e, 0.0, ex)
        ys = y[lo:hi]
        for i in range(hi - lo):
            s = one / (one + e[i])
            ys[i] = xs[i] * s
            e[i] = two * s - one


@njit_parallel
def _gelu_backward(dx, dy, x, tanh_u):
    """dx (n,) = dy * gelu'(x), from the forward's tanh_u; flat arrays."""
    t = x.dtype.type
    half, one, s, c = t(0.5), t(1.0), t(_GELU_C), t(3.0 * 0.044715)
    n = x.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        for i in range(blk * _ELEMS, min((blk + 1) * _ELEMS, n)):
            v, th = x[i], tanh_u[i]
            du = s * (one + c * v * v)
            dx[i] = dy[i] * (half * (one + th) + half * v * (one - th * th) * du)


# ----------------------------------------------------------- attention's softmax -----


@njit_parallel
def _causal_softmax(att, dropped, mask, scale):
    """In place: the scores att (R, T, T) become softmax(scale * scores) over keys j <= i of
    each query row i, zero above the diagonal; dropped = att * mask (both None: no dropout).
    The row's sum is float64."""
    R, T, _ = att.shape
    for r in prange(R):
        ex = _exp_scratch(np.empty(2 * T, np.int32), T)
        for i in range(T):
            row = att[r, i, :i + 1]
            mx = row[0] * scale
            for j in range(i + 1):
                row[j] *= scale
                mx = max(mx, row[j])
            _exp_row(row, row, mx, ex)
            total = 0.0
            for j in range(i + 1):
                total += row[j]
            inv = 1.0 / total
            for j in range(i + 1):
                row[j] *= inv
            for j in range(i + 1, T):
                att[r, i, j] = 0
            if mask is not None:
                for j in range(i + 1):
                    dropped[r, i, j] = row[j] * mask[r, i, j]
                for j in range(i + 1, T):
                    dropped[r, i, j] = 0


@njit_parallel
def _causal_softmax_backward(datt, att, mask, scale):
    """In place: datt (R, T, T), the gradient of the (dropped) weights, becomes scale * the
    gradient of the scores: with g = datt * mask (datt without a mask), row by row
    dscores_j = att_j (g_j - sum_k att_k g_k) for j <= i, zero above the diagonal."""
    R, T, _ = datt.shape
    for r in prange(R):
        for i in range(T):
            if mask is not None:
                for j in range(i + 1):
                    datt[r, i, j] *= mask[r, i, j]
            total = 0.0
            for j in range(i + 1):
                total += datt[r, i, j] * att[r, i, j]
            s = datt.dtype.type(total)
            for j in range(i + 1):
                datt[r, i, j] = scale * (att[r, i, j] * (datt[r, i, j] - s))
            for j in range(i + 1, T):
                datt[r, i, j] = 0


# -------------------------------------------------------------- cross-entropy --------


@njit_parallel
def _cross_entropy_forward(loss, probs, logits, targets):
    """loss (N,) = logsumexp(logits[n]) - logits[n, targets[n]] and probs (N, V) = softmax;
    the row's sum is float64."""
    N, V = logits.shape
    for blk in prange(_blocks(N, _ROWS)):
        ex = _exp_scratch(np.empty(2 * V, np.int32), V)
        for n in range(blk * _ROWS, min((blk + 1) * _ROWS, N)):
            mx = logits[n, 0]
            for j in range(V):
                mx = max(mx, logits[n, j])
            row = probs[n]
            _exp_row(row, logits[n], mx, ex)
            total = 0.0
            for j in range(V):
                total += row[j]
            inv = 1.0 / total
            for j in range(V):
                row[j] *= inv
            loss[n] = mx + np.log(total) - logits[n, targets[n]]


@njit_parallel
def _cross_entropy_backward(dlogits, dloss, probs, targets):
    """dlogits (N, V) = (probs - one_hot(targets)) * dloss[n]."""
    N, V = probs.shape
    one = probs.dtype.type(1.0)
    for blk in prange(_blocks(N, _ROWS)):
        for n in range(blk * _ROWS, min((blk + 1) * _ROWS, N)):
            d = dloss[n]
            for j in range(V):
                dlogits[n, j] = probs[n, j] * d
            dlogits[n, targets[n]] = (probs[n, targets[n]] - one) * d


# --------------------------------------------------------- dropout, residuals --------


@njit_parallel
def _dropout_mask(mask, u, p):
    """mask (n,) = 1 / (1 - p) where u >= p, else 0, compared in u's precision (as numpy
    compares an array with a Python float); mask may be u."""
    t = u.dtype.type
    pt, keep, zero = t(p), t(1.0 / (1.0 - p)), t(0.0)
    n = u.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        for i in range(blk * _ELEMS, min((blk + 1) * _ELEMS, n)):
            mask[i] = keep if u[i] >= pt else zero


@njit_parallel
def _dropout(y, x, mask):
    """y (n,) = x * mask."""
    n = x.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        for i in range(blk * _ELEMS, min((blk + 1) * _ELEMS, n)):
            y[i] = x[i] * mask[i]


@njit_parallel
def _residual_add(y, x, a, mask):
    """y (n,) = x + a * mask, or x + a without a mask; y may be x."""
    n = x.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        lo, hi = blk * _ELEMS, min((blk + 1) * _ELEMS, n)
        if mask is None:
            for i in range(lo, hi):
                y[i] = x[i] + a[i]
        else:
            for i in range(lo, hi):
                y[i] = x[i] + a[i] * mask[i]


# ------------------------------------------------------------------ optimizer --------


@njit_parallel
def _global_norm(total, g):
    """total[0] = sqrt(sum g^2) of g (P,), one float64 partial sum per block."""
    n = g.shape[0]
    nb = _blocks(n, _ELEMS)
    part = np.zeros(nb)
    for blk in prange(nb):
        s = 0.0
        for i in range(blk * _ELEMS, min((blk + 1) * _ELEMS, n)):
            s += np.float64(g[i]) * np.float64(g[i])
        part[blk] = s
    acc = 0.0
    for blk in range(nb):
        acc += part[blk]
    total[0] = np.sqrt(acc)


@njit_parallel
def _adamw(p, m, v, g, n_decay, lr, beta1, beta2, eps, weight_decay, step, grad_scale):
    """One AdamW step in place on p, m, v (P,) from g (P,), in the precision of p, the
    scalars rounded to it first (as numpy computes the reference); decay on p[:n_decay]."""
    t = p.dtype.type
    scale, b1, b2 = t(grad_scale), t(beta1), t(beta2)
    c1, c2 = t(1.0 - beta1), t(1.0 - beta2)
    shrink = t(1.0 - lr * weight_decay)
    rs2 = t(math.sqrt(1.0 - beta2**step))
    step_size = t(lr / (1.0 - beta1**step))
    e = t(eps)
    n = p.shape[0]
    for blk in prange(_blocks(n, _ELEMS)):
        lo, hi = blk * _ELEMS, min((blk + 1) * _ELEMS, n)
        for i in range(lo, min(hi, n_decay)):  # decoupled decay, before the Adam step
            p[i] *= shrink
        for i in range(lo, hi):
            gi = g[i] * scale
            mi = b1 * m[i] + c1 * gi
            vi = b2 * v[i] + c2 * (gi * gi)
            m[i], v[i] = mi, vi
            p[i] -= step_size * (mi / (np.sqrt(vi) / rs2 + e))


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
