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
