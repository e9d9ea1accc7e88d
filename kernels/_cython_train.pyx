# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Cython backend, training: the compiled loops of a training step (private:
`cython_train.CythonTrainLoops` calls them, and `backend.Backend` is the checked API).

The Cython twin of `numba_train` (read its docstring for the design): each entry point is
the compiled form of the `numpy_loops.ReferenceLoops` method of the same name, takes
C-contiguous typed memoryviews, outputs first, checks nothing and runs serially without
the GIL (a step's threads each run their rows through these: `minitf.trainer.StepThreads`).
Each is written once over the fused type `real` (float32 and float64); Cython makes one C
function per type and picks it by the arguments' dtype. Reductions over rows sum in
float64. float32 exponentials use the vectorized `_exp_into` of `_cython_loops.pxi`,
float64 ones libm's `exp`.
"""

from libc.math cimport log, sqrt
from libc.stdint cimport int64_t

import numpy as np

include "_cython_loops.pxi"  # the shared loops: `real`, GELU_C, _exp_into


cdef inline void _exp_row(real* y, const real* x, real shift, Py_ssize_t n) noexcept nogil:
    """y = exp(x - shift) over n elements; y may be x."""
    cdef Py_ssize_t i
    if real is float:
        _exp_into(y, x, shift, n)
    else:
        for i in range(n):
            y[i] = exp(x[i] - shift)


# ------------------------------------------------------------------- embedding -------


def embedding_forward(real[:, :, ::1] x, const int64_t[:, ::1] idx, const real[:, ::1] wte,
                      const real[:, ::1] wpe):
    """x (B, T, C) = wte[idx] + wpe[:T]; idx (B, T) int64."""
    cdef Py_ssize_t B = x.shape[0], T = x.shape[1], C = x.shape[2], b, t, c
    cdef int64_t tok
    with nogil:
        for b in range(B):
            for t in range(T):
                tok = idx[b, t]
                for c in range(C):
                    x[b, t, c] = wte[tok, c] + wpe[t, c]


def embedding_backward(real[:, ::1] dwte, real[:, ::1] dwpe, const real[:, :, ::1] dx,
                       const int64_t[:, ::1] idx):
    """dwte (V, C): each row of dx (B, T, C) added into its token's row, in batch order (as
    np.add.at); dwpe (block_size, C): the sum over the batch."""
    cdef Py_ssize_t B = dx.shape[0], T = dx.shape[1], C = dx.shape[2], b, t, c
    cdef int64_t tok
    with nogil:
        dwte[:, :] = 0
        dwpe[:, :] = 0
        for b in range(B):
            for t in range(T):
                tok = idx[b, t]
                for c in range(C):
                    dwte[tok, c] += dx[b, t, c]
                    dwpe[t, c] += dx[b, t, c]


# ------------------------------------------------------------------- LayerNorm -------


def layernorm_forward(real[:, ::1] y, real[::1] mean, real[::1] rstd, const real[:, ::1] x,
                      const real[::1] weight, const real[::1] bias, double eps):
    """y (N, C), mean and rstd (N,) of each row of x (N, C); statistics summed in float64."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], n, c
    cdef double total, sq, d, mu
    cdef real m, s
    with nogil:
        for n in range(N):
            total = 0
            for c in range(C):
                total += x[n, c]
            mu = total / C
            sq = 0
            for c in range(C):
                d = x[n, c] - mu
                sq += d * d
            m = <real>mu
            s = <real>(1.0 / sqrt(sq / C + eps))  # biased variance, as torch / GPT-2
            mean[n] = m
            rstd[n] = s
            for c in range(C):
                y[n, c] = (x[n, c] - m) * s * weight[c] + bias[c]


def layernorm_backward(real[:, ::1] dx, real[::1] dweight, real[::1] dbias,
                       const real[:, ::1] dy, const real[:, ::1] x, const real[::1] mean,
                       const real[::1] rstd, const real[::1] weight):
    """dx (N, C), dweight and dbias (C,): per row, x_hat = (x - mean) rstd, g = dy weight,
    dx = rstd (g - mean(g) - x_hat mean(g x_hat)); dweight, dbias as column sums kept in
    float64 until the end."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], n, c
    cdef double[::1] sum_w = np.zeros(C)
    cdef double[::1] sum_b = np.zeros(C)
    cdef double s1, s2
    cdef real m, r, xh, g, a, b
    with nogil:
        for n in range(N):
            m = mean[n]
            r = rstd[n]
            s1 = 0
            s2 = 0
            for c in range(C):
                xh = (x[n, c] - m) * r
                g = dy[n, c] * weight[c]
                s1 += g
                s2 += g * xh
                sum_w[c] += dy[n, c] * xh
                sum_b[c] += dy[n, c]
            a = <real>(s1 / C)
            b = <real>(s2 / C)
            for c in range(C):
                xh = (x[n, c] - m) * r
                dx[n, c] = r * (dy[n, c] * weight[c] - a - xh * b)
        for c in range(C):
            dweight[c] = <real>sum_w[c]
            dbias[c] = <real>sum_b[c]


# ------------------------------------------------------------------------ GELU -------


def gelu_forward(real[::1] y, real[::1] tanh_u, const real[::1] x):
    """GPT-2's GELU of the flat x (n,) and tanh(u): with s = 1 / (1 + exp(-2u)), y = x s and
    tanh u = 2 s - 1 (see numba_train._gelu_forward_block), a block at a time so that each
    block stays in cache from one loop to the next."""
    cdef Py_ssize_t n = x.shape[0], lo, hi, i
    cdef real c2 = <real>(-2.0 * GELU_C), c3 = <real>0.044715, v, s
    with nogil:
        for lo in range(0, n, 4096):
            hi = min(lo + 4096, n)
            for i in range(lo, hi):
                v = x[i]
                tanh_u[i] = c2 * (v + c3 * v * v * v)  # -2u; the exp goes here first
            _exp_row(&tanh_u[lo], &tanh_u[lo], <real>0, hi - lo)
            for i in range(lo, hi):
                s = 1 / (1 + tanh_u[i])
                y[i] = x[i] * s
                tanh_u[i] = 2 * s - 1


def gelu_backward(real[::1] dx, const real[::1] dy, const real[::1] x,
                  const real[::1] tanh_u):
    """dx (n,) = dy * gelu'(x) from the forward's tanh_u; flat arrays."""
    cdef Py_ssize_t n = x.shape[0], i
    cdef real s = <real>GELU_C, c = <real>(3.0 * 0.044715), v, th, du
    with nogil:
        for i in range(n):
            v = x[i]
            th = tanh_u[i]
            du = s * (1 + c * v * v)
            dx[i] = dy[i] * (<real>0.5 * (1 + th) + <real>0.5 * v * (1 - th * th) * du)


# ----------------------------------------------------------- attention's softmax -----


def causal_softmax(real[:, :, ::1] att, real[:, :, ::1] dropped, const real[:, :, ::1] mask,
                   real scale):
    """In place: the scores att (R, T, T) become softmax(scale * scores) over keys j <= i of
    each query row i, zero above the diagonal; dropped = att * mask (both None: no
    dropout). The row's sum is float64."""
    cdef Py_ssize_t R = att.shape[0], T = att.shape[1], r, i, j
    cdef bint drop = mask is not None
    cdef real mx, inv
    cdef real* row
    cdef double total
    with nogil:
        for r in range(R):
            for i in range(T):
                row = &att[r, i, 0]
                for j in range(i + 1):
                    row[j] = row[j] * scale
                mx = row[0]
                for j in range(i + 1):
                    mx = max(mx, row[j])
                _exp_row(row, row, mx, i + 1)
                total = 0
                for j in range(i + 1):
                    total += row[j]
                inv = <real>(1.0 / total)
                for j in range(i + 1):
                    row[j] = row[j] * inv
                for j in range(i + 1, T):
                    row[j] = 0
                if drop:
                    for j in range(i + 1):
                        dropped[r, i, j] = row[j] * mask[r, i, j]
                    for j in range(i + 1, T):
                        dropped[r, i, j] = 0


def causal_softmax_backward(real[:, :, ::1] datt, const real[:, :, ::1] att,
                            const real[:, :, ::1] mask, real scale):
    """In place: datt (R, T, T), the gradient of the (dropped) weights, becomes scale * the
    gradient of the scores: g = datt * mask (datt without a mask), dscores_j = att_j (g_j -
    sum_k att_k g_k) for j <= i, zero above the diagonal."""
    cdef Py_ssize_t R = datt.shape[0], T = datt.shape[1], r, i, j
    cdef bint drop = mask is not None
    cdef double total
    cdef real s
    with nogil:
        for r in range(R):
            for i in range(T):
                if drop:
                    for j in range(i + 1):
                        datt[r, i, j] = datt[r, i, j] * mask[r, i, j]
                total = 0
                for j in range(i + 1):
                    total += datt[r, i, j] * att[r, i, j]
                s = <real>total
                for j in range(i + 1):
                    datt[r, i, j] = scale * (att[r, i, j] * (datt[r, i, j] - s))
                for j in range(i + 1, T):
                    datt[r, i, j] = 0


# -------------------------------------------------------------- cross-entropy --------


def cross_entropy_forward(real[::1] loss, real[:, ::1] probs, const real[:, ::1] logits,
                          const int64_t[::1] targets):
    """loss (N,) = logsumexp(logits[n]) - logits[n, targets[n]], probs (N, V) = softmax; the
    row's sum is float64."""
    cdef Py_ssize_t N = logits.shape[0], V = logits.shape[1], n, j
    cdef real mx, inv
    cdef double total
    with nogil:
        for n in range(N):
            mx = logits[n, 0]
            for j in range(V):
                mx = max(mx, logits[n, j])
            _exp_row(&probs[n, 0], &logits[n, 0], mx, V)
            total = 0
            for j in range(V):
                total += probs[n, j]
            inv = <real>(1.0 / total)
            for j in range(V):
                probs[n, j] = probs[n, j] * inv
            loss[n] = <real>(mx + log(total) - logits[n, targets[n]])


def cross_entropy_backward(real[:, ::1] dlogits, const real[::1] dloss,
                           const real[:, ::1] probs, const int64_t[::1] targets):
    """dlogits (N, V) = (probs - one_hot(targets)) * dloss[n]."""
    cdef Py_ssize_t N = probs.shape[0], V = probs.shape[1], n, j
    cdef real d
    with nogil:
        for n in range(N):
            d = dloss[n]
            for j in range(V):
                dlogits[n, j] = probs[n, j] * d
            dlogits[n, targets[n]] = (probs[n, targets[n]] - 1) * d


# --------------------------------------------------------- dropout, residuals --------


def dropout_mask(real[::1] mask, const real[::1] u, double p):
    """mask (n,) = 1 / (1 - p) where u >= p, else 0, compared in u's precision; mask may
    be u."""
    cdef Py_ssize_t n = u.shape[0], i
    cdef real pt = <real>p, keep = <real>(1.0 / (1.0 - p))
    with nogil:
        for i in range(n):
            mask[i] = keep if u[i] >= pt else 0


def dropout(real[::1] y, const real[::1] x, const real[::1] mask):
    """y (n,) = x * mask."""
    cdef Py_ssize_t n = x.shape[0], i
    with nogil:
        for i in range(n):
            y[i] = x[i] * mask[i]


def residual_add(real[::1] y, const real[::1] x, const real[::1] a, const real[::1] mask):
    """y (n,) = x + a * mask, or x + a without a mask; y may be x."""
    cdef Py_ssize_t n = x.shape[0], i
    with nogil:
        if mask is None:
            for i in range(n):
                y[i] = x[i] + a[i]
        else:
            for i in range(n):
                y[i] = x[i] + a[i] * mask[i]


# ------------------------------------------------------------------ optimizer --------


def global_norm(double[::1] total, const real[::1] g):
    """total[0] = sqrt(sum g^2) of g (P,), summed in float64."""
    cdef Py_ssize_t n = g.shape[0], i
    cdef double s = 0
    with nogil:
        for i in range(n):
            s += <double>g[i] * <double>g[i]
        total[0] = sqrt(s)


cdef void _adamw_update(real* p, real* m, real* v, const real* g, Py_ssize_t n, real shrink,
                        real scale, real b1, real b2, real c1, real c2, real step_size,
                        real rs2, real e) noexcept nogil:
    """One AdamW step in place on p, m, v (n,) from g (n,): the decoupled decay (shrink;
    1 for parameters without decay) and the Adam update in one pass."""
    cdef Py_ssize_t i
    cdef real gi, mi, vi
    for i in range(n):
        gi = g[i] * scale
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * shrink - step_size * (mi / (sqrt(vi) / rs2 + e))


def adamw(real[::1] p, real[::1] m, real[::1] v, const real[::1] g, Py_ssize_t n_decay,
          double lr, double beta1, double beta2, double eps, double weight_decay,
          Py_ssize_t step, double grad_scale):
    """One AdamW step in place on p, m, v (P,) from g (P,), in the precision of p with the
    scalars rounded to it first (as numpy computes the reference); decay on p[:n_decay]."""
    cdef Py_ssize_t n = p.shape[0], d = n_decay
    cdef real scale = <real>grad_scale, b1 = <real>beta1, b2 = <real>beta2
    cdef real c1 = <real>(1.0 - beta1), c2 = <real>(1.0 - beta2)
    cdef real step_size = <real>(lr / (1.0 - beta1 ** step)), rs2 = <real>sqrt(1.0 - beta2 ** step)
    cdef real e = <real>eps
    if n == 0:
        return
    with nogil:
        _adamw_update(&p[0], &m[0], &v[0], &g[0], d, <real>(1.0 - lr * weight_decay), scale,
                      b1, b2, c1, c2, step_size, rs2, e)
        _adamw_update(&p[d], &m[d], &v[d], &g[d], n - d, 1, scale, b1, b2, c1, c2,
                      step_size, rs2, e)
