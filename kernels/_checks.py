"""Argument checks and output allocation of the public kernel functions (`backend.Backend`).

Kernels compute; wrappers check. Each `*_args` function takes a public function's
arguments, checks dtypes and shapes, makes the inputs C-contiguous (copying only arrays
that are not) and allocates the outputs, so that a public function is: call the `*_args`
function, call the backend's loop, return. Every backend, the numpy reference included,
goes through these, so the same bad call gives the same error on each. The checks are
attribute reads only, because the functions run once per layer per decoded token and their
overhead adds up.

Every error names the function, the argument, what it got and what is allowed:
TypeError for a wrong dtype, ValueError for a wrong shape or value.
"""

from __future__ import annotations

import math

import numpy as np

from . import numpy_ref as ref

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
I8 = np.dtype(np.int8)
FLOATS = (F32, F64)

INT8_MODES = ref.INT8_MODES  # the modes of numpy_ref.matmul_int8

# int8 x int8 products are at most 128 * 128 in size, so an int32 sum of K of them is exact
# while K <= (2**31 - 1) // 128**2.
INT8_MAX_K = (2**31 - 1) // (128 * 128)


def array(fn: str, name: str, a, dtypes: tuple, ndim: int | None) -> np.ndarray:
    """Return `a` as a C-contiguous array (copied only if it is not), after checking it.

    Raises:
        TypeError: `a` is not an ndarray, or its dtype is not one of `dtypes`.
        ValueError: `a` does not have `ndim` dimensions (None: any number).
    """
    if not isinstance(a, np.ndarray) or a.dtype not in dtypes:
        got = f"dtype {a.dtype}" if isinstance(a, np.ndarray) else f"type {type(a).__name__}"
        allowed = " or ".join(f"{d} ndarray" for d in dtypes)
        raise TypeError(f"{fn}: {name} has {got}; allowed: {allowed}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{fn}: {name} has shape {a.shape}; expected {ndim} dimensions")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def shape(fn: str, name: str, a: np.ndarray, expected: tuple) -> None:
    """Raise ValueError unless `a.shape == expected`."""
    if a.shape != expected:
        raise ValueError(f"{fn}: {name} has shape {a.shape}; expected {expected}")


def _like(fn: str, name: str, a, x: np.ndarray, expected: tuple) -> np.ndarray:
    """`a` checked to have x's dtype and the shape `expected`."""
    a = array(fn, name, a, (x.dtype,), len(expected))
    shape(fn, name, a, expected)
    return a


def _int8_k(fn: str, K: int) -> None:
    if K > INT8_MAX_K:
        raise ValueError(f"{fn}: K={K} > {INT8_MAX_K}; the int32 accumulator could overflow")


def matmul_args(x, w, bias):
    """-> y (N, M) to fill, x (N, K), w (K, M), bias (M,) or None; float32 or float64."""
    x = array("matmul", "x", x, FLOATS, 2)
    w = array("matmul", "w", w, (x.dtype,), 2)
    N, K = x.shape
    M = w.shape[1]
    shape("matmul", "w", w, (K, M))
    if bias is not None:
        bias = _like("matmul", "bias", bias, x, (M,))
    return np.empty((N, M), dtype=x.dtype), x, w, bias


def matmul_nt_args(x, w):
    """-> y (N, M) to fill, x (N, K), w (M, K); float32 or float64."""
    x = array("matmul_nt", "x", x, FLOATS, 2)
    w = array("matmul_nt", "w", w, (x.dtype,), 2)
    N, K = x.shape
    M = w.shape[0]
    shape("matmul_nt", "w", w, (M, K))
    return np.empty((N, M), dtype=x.dtype), x, w


def quantize_rows_args(x):
    """-> xq (N, K) int8 and scale (N,) float32 to fill, x (N, K) float32."""
    x = array("quantize_rows", "x", x, (F32,), 2)
    N, K = x.shape
    return np.empty((N, K), dtype=np.int8), np.empty(N, dtype=np.float32), x


def matmul_int8_acc_args(xq, wq):
    """-> acc (N, M) int32 to fill, xq (N, K) int8, wq (K, M) int8."""
    xq = array("matmul_int8_acc", "xq", xq, (I8,), 2)
    wq = array("matmul_int8_acc", "wq", wq, (I8,), 2)
    N, K = xq.shape
    M = wq.shape[1]
    shape("matmul_int8_acc", "wq", wq, (K, M))
    _int8_k("matmul_int8_acc", K)
    return np.empty((N, M), dtype=np.int32), xq, wq


def matmul_int8_args(x, wq, w_scale, bias, mode):
    """-> y (N, M) float32 to fill, x (N, K) float32, wq (K, M) int8, w_scale (M,) float32,
    bias (M,) float32 or None. Raises ValueError for a mode not in INT8_MODES."""
    if not isinstance(mode, str) or mode not in INT8_MODES:
        raise ValueError(f"matmul_int8 mode={mode!r} is unknown; allowed modes: {INT8_MODES}")
    x = array("matmul_int8", "x", x, (F32,), 2)
    wq = array("matmul_int8", "wq", wq, (I8,), 2)
    N, K = x.shape
    M = wq.shape[1]
    shape("matmul_int8", "wq", wq, (K, M))
    _int8_k("matmul_int8", K)
    w_scale = _like("matmul_int8", "w_scale", w_scale, x, (M,))
    if bias is not None:
        bias = _like("matmul_int8", "bias", bias, x, (M,))
    return np.empty((N, M), dtype=np.float32), x, wq, w_scale, bias


def softmax_args(x):
    """-> y (N, M) to fill, x (N, M) float32 or float64 with M >= 1."""
    x = array("softmax", "x", x, FLOATS, 2)
    if x.shape[1] == 0:
        raise ValueError(f"softmax: x has shape {x.shape}; need at least one column")
    return np.empty_like(x), x


def layernorm_args(x, weight, bias, eps):
    """-> y (N, C) to fill, x (N, C), weight (C,), bias (C,), eps as a float > 0."""
    x = array("layernorm", "x", x, FLOATS, 2)
    C = x.shape[1]
    weight = _like("layernorm", "weight", weight, x, (C,))
    bias = _like("layernorm", "bias", bias, x, (C,))
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"layernorm: eps={eps!r}; must be > 0")
    return np.empty_like(x), x, weight, bias, eps


def gelu_args(x):
    """-> y to fill and x, both flattened (1-D views), x float32 or float64 of any shape."""
    x = array("gelu", "x", x, FLOATS, None)
    return np.empty_like(x), x


def attention_args(q, k, v, n_head, att_out):
    """-> out (Tq, C) and att (NH, Tq, Tk) to fill, q (Tq, C), k, v (Tk, C), n_head, scale.

    att is att_out (checked: C-contiguous, q's dtype, (NH, Tq, Tk)) or a new scratch array.
    """
    q = array("attention", "q", q, FLOATS, 2)
    k = array("attention", "k", k, (q.dtype,), 2)
    v = array("attention", "v", v, (q.dtype,), 2)
    Tq, C = q.shape
    Tk = k.shape[0]
    ok = isinstance(n_head, (int, np.integer)) and n_head > 0 and C % n_head == 0
    if not ok or Tq > Tk or k.shape != (Tk, C) or v.shape != (Tk, C):
        raise ValueError(
            f"attention: q {q.shape}, k {k.shape}, v {v.shape}, n_head={n_head!r}: need "
            f"k and v (Tk, C), Tq <= Tk and C divisible by a positive n_head"
        )
    n_head = int(n_head)
    if att_out is None:
        att = np.empty((n_head, Tq, Tk), dtype=q.dtype)
    else:
        att = att_out
        if not isinstance(att, np.ndarray) or not att.flags.c_contiguous:
            raise ValueError("attention: att_out must be a C-contiguous ndarray (it is written)")
        att = _like("attention", "att_out", att, q, (n_head, Tq, Tk))
    scale = q.dtype.type(1.0 / math.sqrt(C // n_head))  # 1/sqrt(HS) in q's precision
    return np.empty((Tq, C), dtype=q.dtype), att, q, k, v, n_head, scale
