"""The numpy backend's loops: `numpy_ref`'s functions, writing into preallocated outputs.

`ReferenceLoops` is what `Backend` (backend.py) calls for the numpy backend, and the base
class of the compiled backends' loops: an op a compiled backend does not compile yet is
this class's, and that backend lists it in its `REFERENCE_OPS`.

Every loop takes its outputs first, then inputs, weights and sizes, as the compiled loops
do; the arguments are already checked (C-contiguous, the right dtypes and shapes). Scratch
arguments the compiled loops need (the int8 rows of W8A8, the attention scale) are ignored
here: the reference computes them itself.
"""

from __future__ import annotations

import numpy as np

from . import numpy_ref as ref

# The loop ops of every backend. `matmul_int8` has two, one per mode. The training ops'
# matmuls are BLAS calls in `Backend`, the same for every backend; their loops are the rest
# (the attention's causal softmax and its backward, between the BLAS products).
LOOP_OPS = ("matmul", "matmul_nt", "quantize_rows", "matmul_int8_acc",
            "matmul_int8_weight_only", "matmul_w8a8", "matmul_nt_int8_weight_only",
            "matmul_nt_w8a8", "softmax", "layernorm", "gelu",
            "attention",
            # training
            "embedding_forward", "embedding_backward", "layernorm_forward",
            "layernorm_backward", "gelu_forward", "gelu_backward", "causal_softmax",
            "causal_softmax_backward", "cross_entropy_forward", "cross_entropy_backward",
            "dropout_mask", "dropout", "residual_add", "global_norm", "adamw")


class ReferenceLoops:
    """The reference loops (numpy_ref), with the compiled loops' signatures."""

    # Ops taken from this class by a subclass (a compiled backend that does not compile
    # them yet); see backend.py.
    REFERENCE_OPS: frozenset[str] = frozenset()

    @staticmethod
    def matmul(y, x, w, bias):
        """y (N, M) = x (N, K) @ w (K, M) + bias (M,) or None."""
        y[...] = ref.matmul(x, w, bias)

    @staticmethod
    def matmul_nt(y, x, w):
        """y (N, M) = x (N, K) @ w.T, w (M, K)."""
        y[...] = ref.matmul_nt(x, w)

    @staticmethod
    def quantize_rows(xq, scale, x):
        """xq (N, K) int8 and scale (N,) float32 from x (N, K) float32."""
        xq[...], scale[...] = ref.quantize_rows(x)

    @staticmethod
    def matmul_int8_acc(acc, xq, wq):
        """acc (N, M) int32 = xq (N, K) int8 @ wq (K, M) int8."""
        acc[...] = ref.matmul_int8_acc(xq, wq)

    @staticmethod
    def matmul_int8_weight_only(y, x, wq, w_scale, bias):
        """y (N, M) = (x (N, K) @ float32(wq (K, M))) * w_scale (M,) + bias (M,) or None."""
        y[...] = ref.matmul_int8(x, wq, w_scale, bias, mode="weight-only")

    @staticmethod
    def matmul_w8a8(y, xq, sx, acc, x, wq, w_scale, bias):
        """y (N, M): the W8A8 linear layer of x (N, K); xq, sx, acc: unused scratch."""
        y[...] = ref.matmul_int8(x, wq, w_scale, bias, mode="w8a8")

    @staticmethod
    def matmul_nt_int8_weight_only(y, x, wq, w_scale):
        """y (N, M) = (x (N, K) @ float32(wq (M, K)).T) * w_scale (M,). The reference a
        _HEAD_ROWS rows of wq at a time, so that no float copy of a whole head is made."""
        for m0 in range(0, wq.shape[0], _HEAD_ROWS):
            m = slice(m0, m0 + _HEAD_ROWS)
            y[:, m] = ref.matmul_nt_int8(x, wq[m], w_scale[m], mode="weight-only")

    @staticmethod
    def matmul_nt_w8a8(y, xq, sx, acc, x, wq, w_scale):
        """y (N, M): the W8A8 head of x (N, K), wq (M, K), w_scale (M,), _HEAD_ROWS rows of
        wq at a time (int32 sums: exact in any grouping); xq, sx, acc: unused scratch."""
        for m0 in range(0, wq.shape[0], _HEAD_ROWS):
            m = slice(m0, m0 + _HEAD_ROWS)
            y[:, m] = ref.matmul_nt_int8(x, wq[m], w_scale[m], mode="w8a8")

    @staticmethod
    def softmax(y, x):
        """y (N, M) = row softmax of x (N, M)."""
        y[...] = ref.softmax(x)

    @staticmethod
    def layernorm(y, x, weight, bias, eps):
        """y (N, C) = LayerNorm of the rows of x (N, C), weight and bias (C,)."""
        y[...] = ref.layernorm(x, weight, bias, eps)

    @staticmethod
    def gelu(y, x):
        """y (n,) = GELU of the flat array x (n,)."""
        y[...] = ref.gelu(x)

    @staticmethod
    def attention(out, att, q, k, v, n_head, scale):
        """out (Tq, C), weights att (NH, Tq, Tk) of causal attention; scale: unused."""
        out[...] = ref.attention(q, k, v, n_head, att_out=att)

    # ------------------------------------------------------------------------ training --

    @staticmethod
    def embedding_forward(x, idx, wte, wpe):
        """x (B, T, C) = wte[idx] + wpe[:T]; idx (B, T) int64."""
        x[...] = ref.embedding(idx, wte, wpe)

    @staticmethod
    def embedding_backward(dwte, dwpe, dx, idx):
        """dwte (V, C) and dwpe (block_size, C) from dx (B, T, C) and idx (B, T) int64."""
        dwte[...], dwpe[...] = ref.embedding_backward(dx, idx, dwte.shape[0], dwpe.shape[0])

    @staticmethod
    def layernorm_forward(y, mean, rstd, x, weight, bias, eps):
        """y (N, C), mean and rstd (N,) of the rows of x (N, C), weight and bias (C,)."""
        y[...], mean[...], rstd[...] = ref.layernorm_forward(x, weight, bias, eps)

    @staticmethod
    def layernorm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight):
        """dx (N, C), dweight and dbias (C,) from dy, x (N, C), mean, rstd (N,), weight."""
        dx[...], dweight[...], dbias[...] = ref.layernorm_backward(dy, x, mean, rstd, weight)

    @staticmethod
    def gelu_forward(y, tanh_u, x):
        """y and tanh_u (n,) of the flat array x (n,)."""
        y[...], tanh_u[...] = ref.gelu_forward(x)

    @staticmethod
    def gelu_backward(dx, dy, x, tanh_u):
        """dx (n,) from the flat arrays dy, x, tanh_u (n,)."""
        dx[...] = ref.gelu_backward(dy, x, tanh_u)

    @staticmethod
    def causal_softmax(att, dropped, mask, scale):
        """In place, the scores att (R, T, T) become the causal softmax weights of scale *
        scores (zero above the diagonal); dropped (R, T, T) = att * mask, both None without
        dropout."""
        T = att.shape[-1]
        causal = np.triu(np.full((T, T), -np.inf, dtype=att.dtype), k=1)  # (T, T)
        att[...] = ref.softmax(att * scale + causal)
        if mask is not None:
            dropped[...] = ref.dropout(att, mask)

    @staticmethod
    def causal_softmax_backward(datt, att, mask, scale):
        """In place, datt (R, T, T), the gradient of the (dropped) weights, becomes scale *
        the gradient of the scores, from att (R, T, T) and the dropout mask (or None)."""
        if mask is not None:
            datt[...] = ref.dropout(datt, mask)
        datt[...] = ref.softmax_backward(datt, att) * scale

    @staticmethod
    def cross_entropy_forward(loss, probs, logits, targets):
        """loss (N,) and probs (N, V) of logits (N, V) and targets (N,) int64."""
        loss[...], probs[...] = ref.cross_entropy_forward(logits, targets)

    @staticmethod
    def cross_entropy_backward(dlogits, dloss, probs, targets):
        """dlogits (N, V) from dloss (N,), probs (N, V), targets (N,) int64."""
        dlogits[...] = ref.cross_entropy_backward(dloss, probs, targets)

    @staticmethod
    def dropout_mask(mask, u, p):
        """mask = 1 / (1 - p) where u >= p, else 0; flat arrays (n,); mask may be u."""
        mask[...] = ref.dropout_mask(u, p)

    @staticmethod
    def dropout(y, x, mask):
        """y = x * mask, flat arrays (n,)."""
        y[...] = ref.dropout(x, mask)

    @staticmethod
    def residual_add(y, x, a, mask):
        """y = x + a * mask (mask None: x + a), flat arrays (n,); y may be x."""
        y[...] = ref.residual_add(x, a, mask)

    @staticmethod
    def global_norm(total, g):
        """total (1,) float64 = the L2 norm of g (P,)."""
        total[0] = ref.global_norm(g)

    @staticmethod
    def adamw(p, m, v, g, n_decay, lr, beta1, beta2, eps, weight_decay, step, grad_scale):
        """One AdamW step in place on p, m, v (P,) from g (P,). The reference's temporaries
        are made a slice at a time, so no parameter-sized array is allocated per step."""
        for start in range(0, p.shape[0], _CHUNK):
            s = slice(start, start + _CHUNK)
            decayed = min(max(n_decay - start, 0), _CHUNK)  # of this slice, the first `decayed`
            p[s], m[s], v[s] = ref.adamw(p[s], g[s], m[s], v[s], decayed, lr, beta1, beta2, eps,
                                         weight_decay, step, grad_scale)


_CHUNK = 1 << 16  # elements per slice of ReferenceLoops.adamw
_HEAD_ROWS = 4096  # rows of an int8 head per slice of the reference's matmul_nt_int8


LOOPS = ReferenceLoops
