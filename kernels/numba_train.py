"""numba backend, training: the compiled loops of a training step, and `NumbaLoops` with them.

The loops of the training ops of `backend.Backend` (embedding, LayerNorm, GELU, the
attention's causal softmax, softmax cross-entropy, dropout, residual adds, the global
gradient norm and AdamW), each the compiled form of the `numpy_loops.ReferenceLoops`
method of the same name and equal to it within the tolerance its Backend docstring names.
The matmuls between them are BLAS calls in `Backend`. Every loop takes its outputs first,
then inputs, weights and sizes, works for float32 and float64, and runs with
`NUMBA_DISABLE_JIT=1` as plain Python.

The loops are serial (options from `_jit.py`, `parallel=False`): a training step uses
several cores by running blocks of the batch's rows on threads of its own
(`minitf.trainer.StepThreads`), each with single-threaded BLAS and these loops. (Loops in
parallel beside BLAS's threads were measured slower: on 2 cores the two thread pools take
turns spinning on the same cores.) They release the GIL. Reductions over rows sum in
float64.

float32 exponentials use `numba_fused`'s vectorized exp (within 2 ulp of `np.exp`; libm's
is a call per element); float64 ones use `np.exp`. Which one runs is decided by the arrays'
itemsize, a constant of each compiled specialization, so the other branch is compiled away.
"""

from __future__ import annotations

import math

import numpy as np
from ._jit import njit
from .numba_fused import _exp_into, _exp_scratch
from .numba_kernels import NumbaLoops

_GELU_C = math.sqrt(2.0 / math.pi)
_ELEMS = 4096  # elements per block of GELU's forward (32 KiB of exp scratch)


# ------------------------------------------------------------------------- helpers ----


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


@njit
def _embedding_forward(x, idx, wte, wpe):
    """x (B, T, C) = wte[idx] + wpe[:T]; idx (B, T) int64."""
    B, T, C = x.shape
    for b in range(B):
        for t in range(T):
            tok = idx[b, t]
            for c in range(C):
                x[b, t, c] = wte[tok, c] + wpe[t, c]


@njit
def _embedding_backward(dwte, dwpe, dx, idx):
    """dwte (V, C): every row of dx (B, T, C) added into its token's row, in the order of
    the batch (as np.add.at); dwpe (block_size, C): the sum over the batch at each position."""
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
def _layernorm_forward(y, mean, rstd, x, weight, bias, eps):
    """y (N, C), mean and rstd (N,) of each row of x (N, C); statistics summed in float64."""
    N, C = x.shape
    for n in range(N):
        total = 0.0
        for c in range(C):
            total += x[n, c]
        mu = total / C
        sq = 0.0
        for c in range(C):
            d = x[n, c] - mu
            sq += d * d
        m, s = x.dtype.type(mu), x.dtype.type(1.0 / np.sqrt(sq / C + eps))  # biased variance
        mean[n], rstd[n] = m, s
        for c in range(C):
            y[n, c] = (x[n, c] - m) * s * weight[c] + bias[c]


@njit
def _layernorm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight):
    """dx (N, C), dweight and dbias (C,) from dy, x (N, C), mean, rstd (N,), weight (C,).

    Per row, with x_hat = (x - mean) rstd and g = dy * weight (llm.c's layernorm_backward):
    dx = rstd (g - mean(g) - x_hat mean(g x_hat)); dweight and dbias are column sums, kept
    in float64 until the end.
    """
    N, C = x.shape
    sum_w = np.zeros(C)
    sum_b = np.zeros(C)
    for n in range(N):
        m, s = mean[n], rstd[n]
        s1 = 0.0
        s2 = 0.0
        for c in range(C):
            xh = (x[n, c] - m) * s
            g = dy[n, c] * weight[c]
            s1 += g
            s2 += g * xh
            sum_w[c] += dy[n, c] * xh
            sum_b[c] += dy[n, c]
        a, b = x.dtype.type(s1 / C), x.dtype.type(s2 / C)
        for c in range(C):
            xh = (x[n, c] - m) * s
            dx[n, c] = s * (dy[n, c] * weight[c] - a - xh * b)
    for c in range(C):
        dweight[c], dbias[c] = sum_w[c], sum_b[c]


# ------------------------------------------------------------------------ GELU -------


@njit
def _gelu_forward_block(y, tanh_u, x, ex):
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


@njit
def _gelu_forward(y, tanh_u, x):
    """y, tanh_u (n,) of the flat x (n,), `_gelu_forward_block` on blocks that stay in cache
    from one of its loops to the next. (A loop that starts at a block's offset does not
    vectorize; one over a block's slices from 0 does.)"""
    n = x.shape[0]
    ex = _exp_scratch(np.empty(2 * _ELEMS, np.int32), _ELEMS)
    for lo in range(0, n, _ELEMS):
        hi = min(lo + _ELEMS, n)
        _gelu_forward_block(y[lo:hi], tanh_u[lo:hi], x[lo:hi], ex)


@njit
def _gelu_backward(dx, dy, x, tanh_u):
    """dx (n,) = dy * gelu'(x) on flat arrays, from the forward's tanh_u:
    gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    t = x.dtype.type
    half, one, s, c = t(0.5), t(1.0), t(_GELU_C), t(3.0 * 0.044715)
    for i in range(x.shape[0]):
        v, th = x[i], tanh_u[i]
        du = s * (one + c * v * v)
        dx[i] = dy[i] * (half * (one + th) + half * v * (one - th * th) * du)


# ----------------------------------------------------------- attention's softmax -----


@njit
def _causal_softmax_head(att, dropped, mask, scale, ex):
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


@njit
def _causal_softmax(att, dropped, mask, scale):
    """att (R, T, T) in place (and dropped): `_causal_softmax_head` on each head."""
    R, T, _ = att.shape
    ex = _exp_scratch(np.empty(2 * T, np.int32), T)
    for r in range(R):
        if mask is None:
            _causal_softmax_head(att[r], None, None, scale, ex)
        else:
            _causal_softmax_head(att[r], dropped[r], mask[r], scale, ex)


@njit
def _causal_softmax_backward(datt, att, mask, scale):
    """In place: datt (R, T, T), the gradient of the (dropped) weights, becomes scale * the
    gradient of the scores: with g = datt * mask (datt without a mask), row by row
    dscores_j = att_j (g_j - sum_k att_k g_k) for j <= i, zero above the diagonal."""
    R, T, _ = datt.shape
    for r in range(R):
        for i in range(T):
            g, a = datt[r, i, :i + 1], att[r, i, :i + 1]
            if mask is not None:
                keep = mask[r, i, :i + 1]
                for j in range(i + 1):
                    g[j] *= keep[j]
            total = 0.0
            for j in range(i + 1):
                total += g[j] * a[j]
            s = datt.dtype.type(total)
            for j in range(i + 1):
                g[j] = scale * (a[j] * (g[j] - s))
            datt[r, i, i + 1:] = 0


# -------------------------------------------------------------- cross-entropy --------


@njit
def _cross_entropy_forward(loss, probs, logits, targets):
    """loss (N,) = logsumexp(logits[n]) - logits[n, targets[n]] and probs (N, V) = softmax;
    the row's sum is float64."""
    N, V = logits.shape
    ex = _exp_scratch(np.empty(2 * V, np.int32), V)
    for n in range(N):
        row, x = probs[n], logits[n]
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
        loss[n] = mx + np.log(total) - x[targets[n]]


@njit
def _cross_entropy_backward(dlogits, dloss, probs, targets):
    """dlogits (N, V) = (probs - one_hot(targets)) * dloss[n]."""
    N, V = probs.shape
    one = probs.dtype.type(1.0)
    for n in range(N):
        d = dloss[n]
        for j in range(V):
            dlogits[n, j] = probs[n, j] * d
        dlogits[n, targets[n]] = (probs[n, targets[n]] - one) * d


# --------------------------------------------------------- dropout, residuals --------


@njit
def _dropout_mask(mask, u, p):
    """mask (n,) = 1 / (1 - p) where u >= p, else 0, compared in u's precision (as numpy
    compares an array with a Python float); mask may be u."""
    t = u.dtype.type
    pt, keep, zero = t(p), t(1.0 / (1.0 - p)), t(0.0)
    for i in range(u.shape[0]):
        mask[i] = keep if u[i] >= pt else zero


@njit
def _dropout(y, x, mask):
    """y (n,) = x * mask."""
    for i in range(x.shape[0]):
        y[i] = x[i] * mask[i]


@njit
def _residual_add(y, x, a, mask):
    """y (n,) = x + a * mask, or x + a without a mask; y may be x."""
    if mask is None:
        for i in range(x.shape[0]):
            y[i] = x[i] + a[i]
    else:
        for i in range(x.shape[0]):
            y[i] = x[i] + a[i] * mask[i]


# ------------------------------------------------------------------ optimizer --------


@njit
def _global_norm(total, g):
    """total[0] = sqrt(sum g^2) of g (P,), summed in float64."""
    s = 0.0
    for i in range(g.shape[0]):
        s += np.float64(g[i]) * np.float64(g[i])
    total[0] = np.sqrt(s)


@njit
def _adamw_update(p, m, v, g, shrink, scale, b1, b2, c1, c2, step_size, rs2, e):
    """One AdamW step in place on p, m, v (n,) from g (n,): the decoupled decay (shrink;
    1 for parameters without decay) and the Adam update in one pass."""
    for i in range(p.shape[0]):
        gi = g[i] * scale
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
        m[i], v[i] = mi, vi
        p[i] = p[i] * shrink - step_size * (mi / (np.sqrt(vi) / rs2 + e))


@njit
def _adamw(p, m, v, g, n_decay, lr, beta1, beta2, eps, weight_decay, step, grad_scale):
    """One AdamW step in place on p, m, v (P,) from g (P,), in the precision of p, the
    scalars rounded to it first (as numpy computes the reference); decay on p[:n_decay]."""
    t = p.dtype.type
    hyper = (t(grad_scale), t(beta1), t(beta2), t(1.0 - beta1), t(1.0 - beta2),
             t(lr / (1.0 - beta1**step)), t(math.sqrt(1.0 - beta2**step)), t(eps))
    d = n_decay
    _adamw_update(p[:d], m[:d], v[:d], g[:d], t(1.0 - lr * weight_decay), *hyper)
    _adamw_update(p[d:], m[d:], v[d:], g[d:], t(1.0), *hyper)


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
