"""Cython backend: the checked public API over the compiled kernels of `_cython_kernels`.

Every public function has the name and signature of its `numpy_ref` counterpart and equals
it within the tolerance its docstring names (tests/tolerances.py). The extension is built
by `pip install .` (or `python setup.py build_ext --inplace` in a checkout); if it is
missing, importing this module fails with ImportError, which `minitf.kernels.get_backend`
turns into a BackendError that says how to build it. There is no pure-Python fallback.
"""

from __future__ import annotations

import numpy as np

from . import _checks as chk
from . import _cython_kernels as _ck

NAME = "cython"

INT8_MODES = chk.INT8_MODES


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
    (_ck.matmul_f32 if x.dtype == chk.F32 else _ck.matmul_f64)(y, x, w, bias)
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
    (_ck.matmul_nt_f32 if x.dtype == chk.F32 else _ck.matmul_nt_f64)(y, x, w)
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
    _ck.quantize_rows(xq, scale, x)
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
    _ck.matmul_int8_acc(acc, xq, wq)
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
        _ck.matmul_int8_weight_only(y, x, wq, w_scale, bias)
    else:
        N, K = x.shape
        xq = np.empty((N, K), dtype=np.int8)
        sx = np.empty(N, dtype=np.float32)
        acc = np.empty(wq.shape[1], dtype=np.int32)
        _ck.matmul_w8a8(y, xq, sx, acc, x, wq, w_scale, bias)
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
    (_ck.softmax_f32 if x.dtype == chk.F32 else _ck.softmax_f64)(y, x)
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
    (_ck.layernorm_f32 if x.dtype == chk.F32 else _ck.layernorm_f64)(y, x, weight, bias, eps)
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
    (_ck.gelu_f32 if x.dtype == chk.F32 else _ck.gelu_f64)(y.reshape(-1), x.reshape(-1))
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
    kernel = _ck.attention_f32 if q.dtype == chk.F32 else _ck.attention_f64
    kernel(out, att, q, k, v, n_head, scale)
    return out
