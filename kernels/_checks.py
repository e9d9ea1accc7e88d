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


def _matmul_inputs(fn: str, x, w, bias):
    """x (N, K), w (K, M), bias (M,) or None, checked; float32 or float64."""
    x = array(fn, "x", x, FLOATS, 2)
    w = array(fn, "w", w, (x.dtype,), 2)
    N, K = x.shape
    M = w.shape[1]
    shape(fn, "w", w, (K, M))
    if bias is not None:
        bias = _like(fn, "bias", bias, x, (M,))
    return x, w, bias


def matmul_args(x, w, bias):
    """-> y (N, M) to fill, x (N, K), w (K, M), bias (M,) or None; float32 or float64."""
    x, w, bias = _matmul_inputs("matmul", x, w, bias)
    return np.empty((x.shape[0], w.shape[1]), dtype=x.dtype), x, w, bias


def _matmul_nt_inputs(fn: str, x, w):
    """x (N, K), w (M, K), checked; float32 or float64."""
    x = array(fn, "x", x, FLOATS, 2)
    w = array(fn, "w", w, (x.dtype,), 2)
    shape(fn, "w", w, (w.shape[0], x.shape[1]))
    return x, w


def matmul_nt_args(x, w):
    """-> y (N, M) to fill, x (N, K), w (M, K); float32 or float64."""
    x, w = _matmul_nt_inputs("matmul_nt", x, w)
    return np.empty((x.shape[0], w.shape[0]), dtype=x.dtype), x, w


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


def matmul_nt_int8_args(x, wq, w_scale, mode):
    """-> y (N, M) float32 to fill, x (N, K) float32, wq (M, K) int8, w_scale (M,) float32.
    Raises ValueError for a mode not in INT8_MODES."""
    fn = "matmul_nt_int8"
    if not isinstance(mode, str) or mode not in INT8_MODES:
        raise ValueError(f"{fn} mode={mode!r} is unknown; allowed modes: {INT8_MODES}")
    x = array(fn, "x", x, (F32,), 2)
    wq = array(fn, "wq", wq, (I8,), 2)
    N, K = x.shape
    M = wq.shape[0]
    shape(fn, "wq", wq, (M, K))
    _int8_k(fn, K)
    w_scale = _like(fn, "w_scale", w_scale, x, (M,))
    return np.empty((N, M), dtype=np.float32), x, wq, w_scale


def softmax_args(x):
    """-> y (N, M) to fill, x (N, M) float32 or float64 with M >= 1."""
    x = array("softmax", "x", x, FLOATS, 2)
    if x.shape[1] == 0:
        raise ValueError(f"softmax: x has shape {x.shape}; need at least one column")
    return np.empty_like(x), x


def _layernorm_inputs(fn: str, x, weight, bias, eps):
    """x (N, C), weight (C,), bias (C,) checked, and eps as a float > 0."""
    x = array(fn, "x", x, FLOATS, 2)
    C = x.shape[1]
    weight = _like(fn, "weight", weight, x, (C,))
    bias = _like(fn, "bias", bias, x, (C,))
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"{fn}: eps={eps!r}; must be > 0")
    return x, weight, bias, eps


def layernorm_args(x, weight, bias, eps):
    """-> y (N, C) to fill, x (N, C), weight (C,), bias (C,), eps as a float > 0."""
    x, weight, bias, eps = _layernorm_inputs("layernorm", x, weight, bias, eps)
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


# ---------------------------------------------------------------------- training ops ----
# A training op takes `out`: None (its outputs are allocated) or the arrays to write, one
# per return value in the order of the return values, each C-contiguous with the dtype and
# shape the op returns. Preallocated outputs are how a training step reuses its buffers from
# one step to the next instead of allocating them again.


def output(fn: str, out, i: int, names: tuple, shape: tuple, dtype) -> np.ndarray:
    """Output i of `fn`: out[i] checked, or a new array if out is None.

    Raises:
        ValueError: out is not a tuple of len(names) arrays, or out[i] is not C-contiguous
            or has the wrong shape.
        TypeError: out[i] is not an ndarray of `dtype`.
    """
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, (tuple, list)) or len(out) != len(names):
        raise ValueError(f"{fn}: out must be None or a tuple of {len(names)} arrays "
                         f"({', '.join(names)}), got {type(out).__name__}")
    a = out[i]
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        got = f"dtype {a.dtype}" if isinstance(a, np.ndarray) else f"type {type(a).__name__}"
        raise TypeError(f"{fn}: out {names[i]} has {got}; allowed: {np.dtype(dtype)} ndarray")
    shape_ok = a.shape == tuple(shape)
    if not shape_ok or not a.flags.c_contiguous:
        what = f"shape {a.shape}" if not shape_ok else "a layout that is not C-contiguous"
        raise ValueError(f"{fn}: out {names[i]} has {what}; expected a C-contiguous {tuple(shape)}")
    return a


def outputs(fn: str, out, spec: dict, dtype) -> tuple:
    """(output 0, output 1, ...) of `fn` for spec {name: shape}, all of `dtype` (see output)."""
    names = tuple(spec)
    return tuple(output(fn, out, i, names, shape, dtype) for i, shape in enumerate(spec.values()))


def token_ids(fn: str, name: str, idx, shape_len: int, vocab_size: int) -> np.ndarray:
    """Integer token ids as a C-contiguous int64 array of `shape_len` dimensions, each in
    [0, vocab_size): a compiled gather or scatter never reads or writes past its table.

    Raises:
        TypeError: idx is not an integer ndarray.
        ValueError: wrong number of dimensions, or an id out of range.
    """
    if not isinstance(idx, np.ndarray) or idx.dtype.kind not in "iu":
        got = f"dtype {idx.dtype}" if isinstance(idx, np.ndarray) else f"type {type(idx).__name__}"
        raise TypeError(f"{fn}: {name} has {got}; allowed: an integer ndarray")
    if idx.ndim != shape_len:
        raise ValueError(f"{fn}: {name} has shape {idx.shape}; expected {shape_len} dimensions")
    if idx.size and (idx.min() < 0 or idx.max() >= vocab_size):
        raise ValueError(f"{fn}: {name} holds ids in [{idx.min()}, {idx.max()}]; allowed: "
                         f"[0, {vocab_size})")
    return np.ascontiguousarray(idx, dtype=np.int64)


def matmul_forward_args(x, w, bias, out):
    """-> y (N, M) to fill, x (N, K), w (K, M), bias (M,) or None."""
    x, w, bias = _matmul_inputs("matmul_forward", x, w, bias)
    return output("matmul_forward", out, 0, ("y",), (x.shape[0], w.shape[1]), x.dtype), x, w, bias


def matmul_backward_args(dy, x, w, out):
    """-> dx (N, K), dw (K, M), dbias (M,) to fill, dy (N, M), x (N, K), w (K, M)."""
    fn = "matmul_backward"
    x, w, _ = _matmul_inputs(fn, x, w, None)
    (N, K), M = x.shape, w.shape[1]
    dy = _like(fn, "dy", dy, x, (N, M))
    dx, dw, dbias = outputs(fn, out, {"dx": (N, K), "dw": (K, M), "dbias": (M,)}, x.dtype)
    return dx, dw, dbias, dy, x, w


def matmul_nt_forward_args(x, w, out):
    """-> y (N, M) to fill, x (N, K), w (M, K)."""
    x, w = _matmul_nt_inputs("matmul_nt_forward", x, w)
    return output("matmul_nt_forward", out, 0, ("y",), (x.shape[0], w.shape[0]), x.dtype), x, w


def matmul_nt_backward_args(dy, x, w, out):
    """-> dx (N, K), dw (M, K) to fill, dy (N, M), x (N, K), w (M, K)."""
    fn = "matmul_nt_backward"
    x, w = _matmul_nt_inputs(fn, x, w)
    (N, K), M = x.shape, w.shape[0]
    dy = _like(fn, "dy", dy, x, (N, M))
    dx, dw = outputs(fn, out, {"dx": (N, K), "dw": (M, K)}, x.dtype)
    return dx, dw, dy, x, w


def embedding_forward_args(idx, wte, wpe, out):
    """-> x (B, T, C) to fill, idx (B, T) int64, wte (V, C), wpe (block_size, C)."""
    fn = "embedding_forward"
    wte = array(fn, "wte", wte, FLOATS, 2)
    wpe = array(fn, "wpe", wpe, (wte.dtype,), 2)
    V, C = wte.shape
    idx = token_ids(fn, "idx", idx, 2, V)
    B, T = idx.shape
    if wpe.shape[1] != C or T > wpe.shape[0]:
        raise ValueError(f"{fn}: wpe has shape {wpe.shape}; expected (block_size >= T={T}, {C})")
    return output(fn, out, 0, ("x",), (B, T, C), wte.dtype), idx, wte, wpe


def embedding_backward_args(dx, idx, vocab_size, block_size, out):
    """-> dwte (V, C), dwpe (block_size, C) to fill, dx (B, T, C), idx (B, T) int64."""
    fn = "embedding_backward"
    dx = array(fn, "dx", dx, FLOATS, 3)
    B, T, C = dx.shape
    idx = token_ids(fn, "idx", idx, 2, vocab_size)
    shape(fn, "idx", idx, (B, T))
    if T > block_size:
        raise ValueError(f"{fn}: T={T} > block_size={block_size}")
    dwte, dwpe = outputs(fn, out, {"dwte": (vocab_size, C), "dwpe": (block_size, C)}, dx.dtype)
    return dwte, dwpe, dx, idx


def layernorm_forward_args(x, weight, bias, eps, out):
    """-> y (N, C), mean (N,), rstd (N,) to fill, x (N, C), weight, bias (C,), eps."""
    x, weight, bias, eps = _layernorm_inputs("layernorm_forward", x, weight, bias, eps)
    N, C = x.shape
    y, mean, rstd = outputs("layernorm_forward", out, {"y": (N, C), "mean": (N,), "rstd": (N,)},
                            x.dtype)
    return y, mean, rstd, x, weight, bias, eps


def layernorm_backward_args(dy, x, mean, rstd, weight, out):
    """-> dx (N, C), dweight (C,), dbias (C,) to fill, dy, x (N, C), mean, rstd (N,), weight."""
    fn = "layernorm_backward"
    x = array(fn, "x", x, FLOATS, 2)
    N, C = x.shape
    dy = _like(fn, "dy", dy, x, (N, C))
    mean = _like(fn, "mean", mean, x, (N,))
    rstd = _like(fn, "rstd", rstd, x, (N,))
    weight = _like(fn, "weight", weight, x, (C,))
    dx, dweight, dbias = outputs(fn, out, {"dx": (N, C), "dweight": (C,), "dbias": (C,)}, x.dtype)
    return dx, dweight, dbias, dy, x, mean, rstd, weight


def gelu_forward_args(x, out):
    """-> y, tanh_u to fill, x: any shape, float32 or float64."""
    x = array("gelu_forward", "x", x, FLOATS, None)
    y, tanh_u = outputs("gelu_forward", out, {"y": x.shape, "tanh_u": x.shape}, x.dtype)
    return y, tanh_u, x


def gelu_backward_args(dy, x, tanh_u, out):
    """-> dx to fill, dy, x, tanh_u: one shape and float dtype."""
    fn = "gelu_backward"
    x = array(fn, "x", x, FLOATS, None)
    dy = _like(fn, "dy", dy, x, x.shape)
    tanh_u = _like(fn, "tanh_u", tanh_u, x, x.shape)
    return output(fn, out, 0, ("dx",), x.shape, x.dtype), dy, x, tanh_u


def _attention_sizes(fn: str, qkv, n_head) -> tuple:
    """(qkv (B, T, 3C) checked, B, T, C, NH, scale 1/sqrt(HS) in qkv's precision)."""
    qkv = array(fn, "qkv", qkv, FLOATS, 3)
    B, T, C3 = qkv.shape
    ok = isinstance(n_head, (int, np.integer)) and n_head > 0 and C3 % (3 * n_head) == 0
    if not ok:
        raise ValueError(f"{fn}: qkv has shape {qkv.shape}, n_head={n_head!r}: need (B, T, 3C) "
                         "with C divisible by a positive n_head")
    C, NH = C3 // 3, int(n_head)
    return qkv, B, T, C, NH, qkv.dtype.type(1.0 / math.sqrt(C // NH))


def attention_forward_args(qkv, n_head, mask, out, dropped):
    """-> y (B, T, C), att (B, NH, T, T) to fill, qkv, n_head, scale, mask or None, and
    dropped (B, NH, T, T) to fill with att * mask (None without a mask)."""
    fn = "attention_forward"
    qkv, B, T, C, NH, scale = _attention_sizes(fn, qkv, n_head)
    y, att = outputs(fn, out, {"y": (B, T, C), "att": (B, NH, T, T)}, qkv.dtype)
    if mask is not None:
        mask = _like(fn, "mask", mask, qkv, (B, NH, T, T))
        dropped = output(fn, None if dropped is None else (dropped,), 0, ("dropped",),
                         (B, NH, T, T), qkv.dtype)
    else:
        dropped = None
    return y, att, qkv, NH, scale, mask, dropped


def attention_backward_args(dy, qkv, att, n_head, mask, out, dropped, datt):
    """-> dqkv (B, T, 3C) to fill, dy (B, T, C), qkv, att (B, NH, T, T), n_head, scale, mask
    or None, dropped (att * mask, or att without a mask) and datt, a (B, NH, T, T) scratch."""
    fn = "attention_backward"
    qkv, B, T, C, NH, scale = _attention_sizes(fn, qkv, n_head)
    dy = _like(fn, "dy", dy, qkv, (B, T, C))
    att = _like(fn, "att", att, qkv, (B, NH, T, T))
    dqkv = output(fn, out, 0, ("dqkv",), (B, T, 3 * C), qkv.dtype)
    grid = (B, NH, T, T)
    datt = output(fn, None if datt is None else (datt,), 0, ("datt",), grid, qkv.dtype)
    if mask is None:
        dropped = att
    else:
        mask = _like(fn, "mask", mask, qkv, grid)
        if dropped is None:  # not kept from the forward: recompute it
            dropped = att * mask
        dropped = _like(fn, "dropped", dropped, qkv, grid)
    return dqkv, dy, qkv, att, NH, scale, mask, dropped, datt


def cross_entropy_forward_args(logits, targets, out):
    """-> loss (N,), probs (N, V) to fill, logits (N, V), targets (N,) int64."""
    fn = "cross_entropy_forward"
    logits = array(fn, "logits", logits, FLOATS, 2)
    N, V = logits.shape
    targets = token_ids(fn, "targets", targets, 1, V)
    shape(fn, "targets", targets, (N,))
    loss, probs = outputs(fn, out, {"loss": (N,), "probs": (N, V)}, logits.dtype)
    return loss, probs, logits, targets


def cross_entropy_backward_args(dloss, probs, targets, out):
    """-> dlogits (N, V) to fill, dloss (N,), probs (N, V), targets (N,) int64."""
    fn = "cross_entropy_backward"
    probs = array(fn, "probs", probs, FLOATS, 2)
    N, V = probs.shape
    dloss = _like(fn, "dloss", dloss, probs, (N,))
    targets = token_ids(fn, "targets", targets, 1, V)
    shape(fn, "targets", targets, (N,))
    return output(fn, out, 0, ("dlogits",), (N, V), probs.dtype), dloss, probs, targets


def dropout_mask_args(u, p, out):
    """-> mask to fill, u (any shape, float), p as a float in [0, 1)."""
    u = array("dropout_mask", "u", u, FLOATS, None)
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_mask: p={p!r}; allowed: 0 <= p < 1")
    return output("dropout_mask", out, 0, ("mask",), u.shape, u.dtype), u, p


def dropout_args(x, mask, out):
    """-> y to fill, x, mask: one shape and float dtype."""
    x = array("dropout", "x", x, FLOATS, None)
    mask = _like("dropout", "mask", mask, x, x.shape)
    return output("dropout", out, 0, ("y",), x.shape, x.dtype), x, mask


def residual_add_args(x, a, mask, out):
    """-> y to fill, x, a, mask or None: one shape and float dtype."""
    x = array("residual_add", "x", x, FLOATS, None)
    a = _like("residual_add", "a", a, x, x.shape)
    if mask is not None:
        mask = _like("residual_add", "mask", mask, x, x.shape)
    return output("residual_add", out, 0, ("y",), x.shape, x.dtype), x, a, mask


def global_norm_args(g):
    """-> total (1,) float64 to fill, g (P,) float."""
    g = array("global_norm", "g", g, FLOATS, 1)
    return np.empty(1, dtype=np.float64), g


def adamw_args(p, g, m, v, n_decay, lr, beta1, beta2, eps, weight_decay, step, grad_scale, out):
    """-> p, m, v to update in place (out, or copies of the inputs), g, and the checked
    hyperparameters (n_decay, lr, beta1, beta2, eps, weight_decay, step, grad_scale)."""
    fn = "adamw"
    p = array(fn, "p", p, FLOATS, 1)
    P = p.shape[0]
    g, m, v = (_like(fn, name, a, p, (P,)) for name, a in (("g", g), ("m", m), ("v", v)))
    n_decay, step = int(n_decay), int(step)
    if not 0 <= n_decay <= P:
        raise ValueError(f"{fn}: n_decay={n_decay}; allowed: 0 <= n_decay <= {P}")
    if step < 1:
        raise ValueError(f"{fn}: step={step}; allowed: >= 1 (the bias corrections count from 1)")
    hyper = [float(h) for h in (lr, beta1, beta2, eps, weight_decay, grad_scale)]
    lr, beta1, beta2, eps, weight_decay, grad_scale = hyper
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and eps > 0):
        raise ValueError(f"{fn}: beta1={beta1}, beta2={beta2}, eps={eps}; allowed: betas in "
                         "[0, 1), eps > 0")
    state = outputs(fn, out, {"p": (P,), "m": (P,), "v": (P,)}, p.dtype)
    for new, old in zip(state, (p, m, v)):
        if new is not old:
            new[...] = old  # the update runs in place on the outputs
    return (*state, g, n_decay, lr, beta1, beta2, eps, weight_decay, step, grad_scale)
