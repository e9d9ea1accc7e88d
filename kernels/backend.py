"""The public kernel API, written once for every backend: checks, allocation, docstrings.

A backend is a `Backend` over a *loops* class. The loops only compute: each takes
C-contiguous arrays and preallocated outputs, in the order outputs, inputs, weights, sizes,
and checks nothing. `Backend` holds the public functions: it checks dtypes and shapes
(`_checks`), allocates the outputs, calls the loops and returns. Every backend therefore
refuses the same bad call with the same error, the numpy one included.

    numpy   `numpy_loops.ReferenceLoops`: numpy_ref's functions, written into the outputs
    numba   `numba_kernels.NumbaLoops`: private @njit loops
    cython  `cython_kernels.CythonLoops`: the compiled entry points of `_cython_kernels`

The compiled loops classes subclass `ReferenceLoops` and override the ops they compile, as
thinc's compiled Ops override only the hot ops of its numpy Ops. An op that a compiled
backend does not compile yet runs the reference loop, and says so: it is listed in the
class's `REFERENCE_OPS`, the table of such ops (`Backend` refuses a loops class that
inherits an op it does not list, so none is taken from the reference by accident). Adding
an op: its checks in `_checks`, a method here with the docstring, a reference loop in
`ReferenceLoops`, and its name in each compiled class's `REFERENCE_OPS` until that
backend compiles it.
"""

from __future__ import annotations

import numpy as np

from . import _checks as chk
from . import numpy_ref as ref
from .layout import HEAD_CHUNK as NT_INT8_ACC  # the int32 sums of matmul_nt_w8a8's chunks
from .numpy_loops import LOOP_OPS, ReferenceLoops


class Backend:
    """The checked kernel functions of one backend (`get_backend` returns these).

    Every function has the name and signature of its `numpy_ref` counterpart and equals it
    within the tolerance its docstring names (tests/tolerances.py).

    Attributes:
        NAME: "numpy", "numba" or "cython".
        INT8_MODES: the modes of `matmul_int8`.
        loops: the loops class (unchecked: arguments as its docstring says).
        reference_ops: the loop ops this backend takes from the reference (not compiled).
    """

    INT8_MODES = chk.INT8_MODES

    def __init__(self, name: str, loops: type[ReferenceLoops]):
        inherited = {op for op in LOOP_OPS if getattr(loops, op) is getattr(ReferenceLoops, op)}
        listed = set(loops.REFERENCE_OPS)
        if loops is not ReferenceLoops and inherited != listed:
            raise TypeError(
                f"{loops.__name__} inherits the reference loops {sorted(inherited - listed)} "
                f"without listing them in REFERENCE_OPS (or lists {sorted(listed - inherited)} "
                "that it overrides)"
            )
        self.NAME = name
        self.loops = loops
        self.reference_ops = frozenset(LOOP_OPS if loops is ReferenceLoops else listed)

    def __repr__(self) -> str:
        return f"<minitf kernel backend {self.NAME!r}>"

    def implementation(self) -> dict[str, str]:
        """{loop op: "compiled" or "reference"}: what this backend runs for each op."""
        return {op: "reference" if op in self.reference_ops else "compiled" for op in LOOP_OPS}

    def matmul(self, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
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
        self.loops.matmul(y, x, w, bias)
        return y

    def matmul_nt(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
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
        self.loops.matmul_nt(y, x, w)
        return y

    def quantize_rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric per-row int8. Equals `numpy_ref.quantize_rows` bit for bit.

        Args:
            x: (N, K) float32.
        Returns:
            xq: (N, K) int8 in [-127, 127]; scale: (N,) float32 (1.0, with xq = 0, for a
            row that is all zeros, whose scale underflows, or that holds a non-finite value).
        Raises:
            TypeError: x is not float32.
            ValueError: x is not 2-D.
        """
        xq, scale, x = chk.quantize_rows_args(x)
        self.loops.quantize_rows(xq, scale, x)
        return xq, scale

    def matmul_int8_acc(self, xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
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
        self.loops.matmul_int8_acc(acc, xq, wq)
        return acc

    def matmul_int8(
        self,
        x: np.ndarray,
        wq: np.ndarray,
        w_scale: np.ndarray,
        bias: np.ndarray | None = None,
        mode: str = "weight-only",
    ) -> np.ndarray:
        """Linear layer with per-output-channel int8 weights, "weight-only" or "w8a8".

        Equals `numpy_ref.matmul_int8` within TOL[("kernel_dot", float32)] for
        "weight-only"; for "w8a8" the quantized activations, the int32 sums and the float
        epilogue (the same operations in the same order) are bit-identical.

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
            self.loops.matmul_int8_weight_only(y, x, wq, w_scale, bias)
        else:
            N, K = x.shape
            xq = np.empty((N, K), dtype=np.int8)  # scratch: the quantized rows
            sx = np.empty(N, dtype=np.float32)  # and their scales
            acc = np.empty(wq.shape[1], dtype=np.int32)  # one row's int32 sums
            self.loops.matmul_w8a8(y, xq, sx, acc, x, wq, w_scale, bias)
        return y

    def matmul_nt_int8(
        self,
        x: np.ndarray,
        wq: np.ndarray,
        w_scale: np.ndarray,
        mode: str = "weight-only",
    ) -> np.ndarray:
        """The tied head with an int8 wte (M, K) and a scale per row, "weight-only" or "w8a8":
        y ~= x @ (wq * w_scale[:, None]).T, read from the int8 rows directly.

        Equals `numpy_ref.matmul_nt_int8` within TOL[("kernel_dot", float32)] for
        "weight-only"; for "w8a8" bit for bit (the same quantized rows, exact int32 sums, the
        same float epilogue).

        Args:
            x: (N, K) float32.
            wq: (M, K) int8, K <= 131071.
            w_scale: (M,) float32, one scale per row of wq.
            mode: "weight-only" (float activations) or "w8a8" (activations quantized per row).
        Returns:
            y: (N, M) float32.
        Raises:
            ValueError: an unknown mode, shapes that do not match, K > 131071.
            TypeError: a wrong dtype.
        """
        y, x, wq, w_scale = chk.matmul_nt_int8_args(x, wq, w_scale, mode)
        if mode == "weight-only":
            self.loops.matmul_nt_int8_weight_only(y, x, wq, w_scale)
        else:
            N, K = x.shape
            xq = np.empty((N, K), dtype=np.int8)  # scratch: the quantized rows
            sx = np.empty(N, dtype=np.float32)  # and their scales
            acc = np.empty(NT_INT8_ACC, dtype=np.int32)  # a chunk of rows' int32 sums
            self.loops.matmul_nt_w8a8(y, xq, sx, acc, x, wq, w_scale)
        return y

    def softmax(self, x: np.ndarray) -> np.ndarray:
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
        self.loops.softmax(y, x)
        return y

    def layernorm(
        self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5
    ) -> np.ndarray:
        """LayerNorm over the last axis. Equals `numpy_ref.layernorm` within
        TOL[("kernel", dtype)].

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
        self.loops.layernorm(y, x, weight, bias, eps)
        return y

    def gelu(self, x: np.ndarray) -> np.ndarray:
        """Tanh-approximated GELU. Equals `numpy_ref.gelu` within TOL[("kernel", dtype)].

        Args:
            x: any shape, float32 or float64.
        Returns:
            y: shape and dtype of x.
        Raises:
            TypeError: a dtype other than float32/float64.
        """
        y, x = chk.gelu_args(x)
        self.loops.gelu(y.reshape(-1), x.reshape(-1))
        return y

    def attention(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        n_head: int,
        att_out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Causal multi-head attention, prefill (Tq == Tk) or decode (Tq < Tk).

        Equals `numpy_ref.attention` within TOL[("kernel_attention", dtype)], and the
        weights written to att_out within TOL[("kernel", dtype)].

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
        self.loops.attention(out, att, q, k, v, n_head, scale)
        return out

    # ---------------------------------------------------------------------- training ----
    # The ops of a training step (minitf.layers calls them). Each has the name and
    # signature of its numpy_ref counterpart, plus `out`: None (new outputs) or the arrays
    # to write, a tuple in the order of the return values (see _checks.output), which is
    # how a training step reuses its buffers. The matmuls are numpy's BLAS matmul writing
    # into the outputs, the same on every backend; the loops do the elementwise and
    # reduction work between them. "Within TOL[("train_grad", dtype)]" means: for each
    # output, max |out - reference| <= tol * max |reference|.

    def matmul_forward(self, x, w, bias=None, *, out=None):
        """y = x @ w + bias by BLAS, a linear layer of the training forward (the unfused
        inference path's `matmul` is the backend's own loop). Equals
        `numpy_ref.matmul` (the same BLAS call) within TOL[("train_grad", dtype)].

        Args:
            x: (N, K) float32 or float64; w: (K, M); bias: (M,) or None; dtype of x.
            out: None or (y (N, M),).
        Returns:
            y: (N, M).
        Raises:
            TypeError, ValueError: wrong dtypes or shapes (of the inputs or of out).
        """
        y, x, w, bias = chk.matmul_forward_args(x, w, bias, out)
        np.matmul(x, w, out=y)
        if bias is not None:
            y += bias
        return y

    def matmul_backward(self, dy, x, w, *, out=None):
        """Gradients of y = x @ w + bias by BLAS. Equals `numpy_ref.matmul_backward` within
        TOL[("train_grad", dtype)].

        Args:
            dy: (N, M); x: (N, K), the forward's input; w: (K, M); one float dtype.
            out: None or (dx (N, K), dw (K, M), dbias (M,)).
        Returns:
            dx, dw, dbias.
        Raises:
            TypeError, ValueError: wrong dtypes or shapes.
        """
        dx, dw, dbias, dy, x, w = chk.matmul_backward_args(dy, x, w, out)
        np.matmul(dy, w.T, out=dx)  # (N, K)
        np.matmul(x.T, dy, out=dw)  # (K, M)
        np.sum(dy, axis=0, out=dbias)  # (M,)
        return dx, dw, dbias

    def matmul_nt_forward(self, x, w, *, out=None):
        """y = x @ w.T by BLAS (the tied head's logits, w = wte). Equals
        `numpy_ref.matmul_nt` within TOL[("train_grad", dtype)].

        Args:
            x: (N, K) float32 or float64; w: (M, K), dtype of x. out: None or (y (N, M),).
        Returns:
            y: (N, M).
        Raises:
            TypeError, ValueError: wrong dtypes or shapes.
        """
        y, x, w = chk.matmul_nt_forward_args(x, w, out)
        return np.matmul(x, w.T, out=y)

    def matmul_nt_backward(self, dy, x, w, *, out=None):
        """Gradients of y = x @ w.T by BLAS. Equals `numpy_ref.matmul_nt_backward` within
        TOL[("train_grad", dtype)].

        Args:
            dy: (N, M); x: (N, K); w: (M, K); one float dtype. out: None or (dx, dw).
        Returns:
            dx (N, K), dw (M, K).
        Raises:
            TypeError, ValueError: wrong dtypes or shapes.
        """
        dx, dw, dy, x, w = chk.matmul_nt_backward_args(dy, x, w, out)
        np.matmul(dy, w, out=dx)  # (N, K)
        np.matmul(dy.T, x, out=dw)  # (M, K)
        return dx, dw

    def embedding_forward(self, idx, wte, wpe, *, out=None):
        """x = wte[idx] + wpe[:T]. Equals `numpy_ref.embedding` bit for bit.

        Args:
            idx: (B, T) integer ids in [0, V); wte: (V, C) float; wpe: (block_size, C),
                T <= block_size. out: None or (x (B, T, C),).
        Returns:
            x: (B, T, C), dtype of wte.
        Raises:
            TypeError, ValueError: wrong dtypes or shapes, or an id out of range.
        """
        x, idx, wte, wpe = chk.embedding_forward_args(idx, wte, wpe, out)
        self.loops.embedding_forward(x, idx, wte, wpe)
        return x

    def embedding_backward(self, dx, idx, vocab_size, block_size, *, out=None):
        """Gradients of `embedding`: every row of dx added into the row of its token and of
        its position. Equals `numpy_ref.embedding_backward` within TOL[("train_grad", dtype)].

        Args:
            dx: (B, T, C) float; idx: (B, T) ids in [0, vocab_size); block_size >= T.
            out: None or (dwte (V, C), dwpe (block_size, C)).
        Returns:
            dwte, dwpe (zero rows for unused tokens and positions).
        Raises:
            TypeError, ValueError: wrong dtypes or shapes, or an id out of range.
        """
        dwte, dwpe, dx, idx = chk.embedding_backward_args(dx, idx, vocab_size, block_size, out)
        self.loops.embedding_backward(dwte, dwpe, dx, idx)
        return dwte, dwpe

    def layernorm_forward(self, x, weight, bias, eps=1e-5, *, out=None):
        """LayerNorm of the rows of x and the row statistics. Equals
        `numpy_ref.layernorm_forward` within TOL[("train_grad", dtype)].

        Args:
            x: (N, C) float32 or float64; weight, bias: (C,); eps > 0.
            out: None or (y (N, C), mean (N,), rstd (N,)).
        Returns:
            y, mean, rstd = 1 / sqrt(var + eps).
        Raises:
            TypeError, ValueError: wrong dtypes or shapes, or eps <= 0.
        """
        y, mean, rstd, x, weight, bias, eps = chk.layernorm_forward_args(x, weight, bias, eps,
                                                                         out)
        self.loops.layernorm_forward(y, mean, rstd, x, weight, bias, eps)
        return y, mean, rstd

    def layernorm_backward(self, dy, x, mean, rstd, weight, *, out=None):
        """Gradients of `layernorm_forward`. Equals `numpy_ref.layernorm_backward` within
        TOL[("train_grad", dtype)].

        Args:
            dy, x: (N, C); mean, rstd: (N,) from the forward; weight: (C,); one float dtype.
            out: None or (dx (N, C), dweight (C,), dbias (C,)).
        Returns:
            dx, dweight, dbias.
        Raises:
            TypeError, ValueError: wrong dtypes or shapes.
        """
        dx, dweight, dbias, dy, x, mean, rstd, weight = chk.layernorm_backward_args(
            dy, x, mean, rstd, weight, out)
        self.loops.layernorm_backward(dx, dweight, dbias, dy, x, mean, rstd, weight)
        return dx, dweight, dbias

    def gelu_forward(self, x, *, out=None):
        """GELU and the tanh(u) its backward needs. Equals `numpy_ref.gelu_forward` within
        TOL[("train_grad", dtype)].

        Args:
            x: any shape, float32 or float64. out: None or (y, tanh_u), x's shape.
        Returns:
            y, tanh_u.
        Raises:
            TypeError, ValueError: a wrong dtype or shape.
        """
        y, tanh_u, x = chk.gelu_forward_args(x, out)
        self.loops.gelu_forward(y.reshape(-1), tanh_u.reshape(-1), x.reshape(-1))
        return y, tanh_u

    def gelu_backward(self, dy, x, tanh_u, *, out=None):
        """Gradient of `gelu_forward`. Equals `numpy_ref.gelu_backward` within
        TOL[("train_grad", dtype)].

        Args:
            dy, x, tanh_u: one shape and float dtype. out: None or (dx,).
        Returns:
            dx.
        Raises:
            TypeError, ValueError: wrong dtypes or shapes.
        """
        dx, dy, x, tanh_u = chk.gelu_backward_args(dy, x, tanh_u, out)
        self.loops.gelu_backward(dx.reshape(-1), dy.reshape(-1), x.reshape(-1),
                                 tanh_u.reshape(-1))
        return dx

    def attention_forward(self, qkv, n_head, mask=None, *, out=None, dropped=None):
        """Causal self-attention for training: scores and the weighted values by BLAS, the
        causal softmax (and dropout) by the backend's loop. Equals
        `numpy_ref.attention_forward` within TOL[("train_grad", dtype)].

        Args:
            qkv: (B, T, 3C) float, queries, keys, values side by side; n_head: NH dividing C.
            mask: None, or a (B, NH, T, T) dropout mask (`dropout_mask`) for the weights.
            out: None or (y (B, T, C), att (B, NH, T, T)).
            dropped: with a mask, the (B, NH, T, T) array that receives att * mask (the
                weights that weigh the values; pass it on to `attention_backward`); None:
                a new one.
        Returns:
            y, att (the softmax weights before dropout, zero above the diagonal).
        Raises:
            TypeError, ValueError: wrong dtypes or shapes, or C not divisible by n_head.
        """
        y, att, qkv, NH, scale, mask, dropped = chk.attention_forward_args(
            qkv, n_head, mask, out, dropped)
        B, T, _ = qkv.shape
        q, k, v = (ref._split_heads(a, NH) for a in np.split(qkv, 3, axis=-1))  # (B, NH, T, HS)
        np.matmul(q, k.swapaxes(-1, -2), out=att)  # (B, NH, T, T) the scores, unscaled
        self.loops.causal_softmax(att.reshape(-1, T, T), None if mask is None else
                                  dropped.reshape(-1, T, T), None if mask is None else
                                  mask.reshape(-1, T, T), scale)
        np.matmul(att if mask is None else dropped, v, out=ref._split_heads(y, NH))
        return y, att

    def attention_backward(self, dy, qkv, att, n_head, mask=None, *, out=None, dropped=None,
                           datt=None):
        """Gradient of `attention_forward` with respect to qkv. Equals
        `numpy_ref.attention_backward` within TOL[("train_grad", dtype)].

        Args:
            dy: (B, T, C); qkv: (B, T, 3C); att: (B, NH, T, T) the forward's weights; n_head;
                mask: the forward's dropout mask or None; one float dtype.
            out: None or (dqkv (B, T, 3C),).
            dropped: with a mask, the forward's att * mask (None: computed again).
            datt: a (B, NH, T, T) scratch array for the gradient of the weights (None: new).
        Returns:
            dqkv.
        Raises:
            TypeError, ValueError: wrong dtypes or shapes.
        """
        dqkv, dy, qkv, att, NH, scale, mask, dropped, datt = chk.attention_backward_args(
            dy, qkv, att, n_head, mask, out, dropped, datt)
        B, T, _ = qkv.shape
        q, k, v = (ref._split_heads(a, NH) for a in np.split(qkv, 3, axis=-1))  # (B, NH, T, HS)
        dq, dk, dv = (ref._split_heads(a, NH) for a in np.split(dqkv, 3, axis=-1))
        dy = ref._split_heads(dy, NH)  # (B, NH, T, HS)
        # forward was y = dropped @ v
        np.matmul(dy, v.swapaxes(-1, -2), out=datt)  # (B, NH, T, T)
        np.matmul(dropped.swapaxes(-1, -2), dy, out=dv)  # (B, NH, T, HS)
        # forward was dropped = softmax(scale * scores) * mask: datt becomes scale * dscores
        self.loops.causal_softmax_backward(datt.reshape(-1, T, T), att.reshape(-1, T, T),
                                           None if mask is None else mask.reshape(-1, T, T),
                                           scale)
        # forward was scores = q @ k^T
        np.matmul(datt, k, out=dq)  # (B, NH, T, HS)
        np.matmul(datt.swapaxes(-1, -2), q, out=dk)  # (B, NH, T, HS)
        return dqkv

    def cross_entropy_forward(self, logits, targets, *, out=None):
        """Softmax cross-entropy per row and the probabilities. Equals
        `numpy_ref.cross_entropy_forward` within TOL[("train_grad", dtype)].

        Args:
            logits: (N, V) float; targets: (N,) ids in [0, V). out: None or (loss, probs).
        Returns:
            loss (N,) in nats, probs (N, V).
        Raises:
            TypeError, ValueError: wrong dtypes or shapes, or a target out of range.
        """
        loss, probs, logits, targets = chk.cross_entropy_forward_args(logits, targets, out)
        self.loops.cross_entropy_forward(loss, probs, logits, targets)
        return loss, probs

    def cross_entropy_backward(self, dloss, probs, targets, *, out=None):
        """dlogits of the per-row losses. Equals `numpy_ref.cross_entropy_backward` within
        TOL[("train_grad", dtype)].

        Args:
            dloss: (N,); probs: (N, V); targets: (N,) ids in [0, V). out: None or (dlogits,).
        Returns:
            dlogits: (N, V).
        Raises:
            TypeError, ValueError: wrong dtypes or shapes, or a target out of range.
        """
        dlogits, dloss, probs, targets = chk.cross_entropy_backward_args(dloss, probs, targets,
                                                                         out)
        self.loops.cross_entropy_backward(dlogits, dloss, probs, targets)
        return dlogits

    def dropout_mask(self, u, p, *, out=None):
        """The dropout mask of uniform numbers u: 1 / (1 - p) where u >= p, else 0. Equals
        `numpy_ref.dropout_mask` bit for bit.

        Args:
            u: any shape, float32 or float64, in [0, 1); p: 0 <= p < 1.
            out: None or (mask,), u's shape and dtype (may be u itself).
        Returns:
            mask.
        Raises:
            TypeError, ValueError: a wrong dtype or shape, or p outside [0, 1).
        """
        mask, u, p = chk.dropout_mask_args(u, p, out)
        self.loops.dropout_mask(mask.reshape(-1), u.reshape(-1), p)
        return mask

    def dropout(self, x, mask, *, out=None):
        """y = x * mask (dropout, and its backward). Equals `numpy_ref.dropout` bit for bit.

        Args:
            x, mask: one shape and float dtype. out: None or (y,).
        Returns:
            y.
        Raises:
            TypeError, ValueError: wrong dtypes or shapes.
        """
        y, x, mask = chk.dropout_args(x, mask, out)
        self.loops.dropout(y.reshape(-1), x.reshape(-1), mask.reshape(-1))
        return y

    def residual_add(self, x, a, mask=None, *, out=None):
        """y = x + a * mask (mask None: x + a). Equals `numpy_ref.residual_add` within
        TOL[("train_grad", dtype)] (a compiled loop may fuse the multiply-add).

        Args:
            x, a: one shape and float dtype; mask: like a, or None.
            out: None or (y,); y may be x (added in place).
        Returns:
            y.
        Raises:
            TypeError, ValueError: wrong dtypes or shapes.
        """
        y, x, a, mask = chk.residual_add_args(x, a, mask, out)
        self.loops.residual_add(y.reshape(-1), x.reshape(-1), a.reshape(-1),
                                None if mask is None else mask.reshape(-1))
        return y

    def global_norm(self, g) -> float:
        """sqrt(sum g^2) of the flat gradient buffer, summed in float64. Equals
        `numpy_ref.global_norm` within TOL[("train_grad", dtype)].

        Args:
            g: (P,) float32 or float64.
        Returns:
            the norm (inf or nan if a gradient is not finite).
        Raises:
            TypeError, ValueError: a wrong dtype, or g not 1-D.
        """
        total, g = chk.global_norm_args(g)
        self.loops.global_norm(total, g)
        return float(total[0])

    def adamw(self, p, g, m, v, n_decay, lr, beta1, beta2, eps, weight_decay, step,
              grad_scale=1.0, *, out=None):
        """One AdamW step over flat buffers, one pass. Equals `numpy_ref.adamw` within
        TOL[("train_grad", dtype)].

        Args:
            p, g, m, v: (P,) of one float dtype; n_decay: decay p[:n_decay]; lr, beta1,
                beta2, eps, weight_decay; step >= 1; grad_scale: multiplies g first.
            out: None (new p, m, v) or (p, m, v) to write, which may be the inputs
                themselves (the optimizer updates its buffers in place).
        Returns:
            p, m, v.
        Raises:
            TypeError, ValueError: wrong dtypes or shapes, or a hyperparameter out of range.
        """
        p, m, v, g, *hyper = chk.adamw_args(p, g, m, v, n_decay, lr, beta1, beta2, eps,
                                            weight_decay, step, grad_scale, out)
        self.loops.adamw(p, m, v, g, *hyper)
        return p, m, v
