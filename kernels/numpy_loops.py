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

from . import numpy_ref as ref

# The loop ops of every backend. `matmul_int8` has two, one per mode.
LOOP_OPS = ("matmul", "matmul_nt", "quantize_rows", "matmul_int8_acc",
            "matmul_int8_weight_only", "matmul_w8a8", "softmax", "layernorm", "gelu",
            "attention")


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


LOOPS = ReferenceLoops
