"""The numpy reference kernels: the specification every other backend must equal.

Each function is written to be read, not to be fast: one line per step of the formula, in
the order the formula states it. `numba_kernels` and `cython_kernels` export the same names
with the same signatures, and tests/test_kernels.py checks them against these functions
(and checks these functions against independent computations: PyTorch, hand-worked values).

Shape letters: N rows (tokens), K inputs, M outputs, C channels, T / Tq / Tk positions,
NH heads, HS head size.
"""

from __future__ import annotations

import math

import numpy as np

NAME = "numpy"

# w8a8 and weight-only int8 execution, see `matmul_int8`.
INT8_MODES = ("weight-only", "w8a8")


def matmul(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w + bias, a linear layer with GPT-2's `(in, out)` weight layout.

    Args:
        x: (N, K) float32 or float64.
        w: (K, M), same dtype as x.
        bias: (M,) same dtype, or None for no bias.
    Returns:
        y: (N, M), dtype of x.
    Raises:
        ValueError: mismatched shapes (raised by numpy's matmul).
    """
    y = x @ w  # (N, M)
    if bias is not None:
        y = y + bias  # (N, M)
    return y


def matmul_nt(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T, for the tied output head: logits = x @ wte.T with wte (V, C).

    Args:
        x: (N, K) float32 or float64.
        w: (M, K), same dtype as x.
    Returns:
        y: (N, M), dtype of x.
    Raises:
        ValueError: mismatched shapes (raised by numpy's matmul).
    """
    return x @ w.T  # (N, M)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization: x[n, :] ~= xq[n, :] * scale[n].

    scale = max|x_row| / 127 and xq = round-half-to-even(x / scale), clamped to [-127, 127]
    (symmetric: -128 is never used, so negating a quantized value cannot overflow). A row
    whose scale is 0 or not a normal float (all zeros, values so small that the scale
    underflows, or a non-finite value in the row) gets xq = 0 and scale = 1.0: a defined
    result instead of 0/0 (llama2.c's `runq.c` divides by a zero scale there).

    Every backend divides (x / scale, never x * (1 / scale)) so all agree bit for bit.

    Args:
        x: (N, K) float32.
    Returns:
        xq: (N, K) int8; scale: (N,) float32.
    """
    amax = np.max(np.abs(x), axis=1)  # (N,)
    scale = amax / np.float32(127.0)  # (N,) float32
    usable = np.isfinite(scale) & (scale >= np.finfo(np.float32).tiny)  # (N,) normal, > 0
    scale = np.where(usable, scale, np.float32(1.0))  # (N,)
    xq = np.rint(x / scale[:, None])  # (N, K) float32; np.rint rounds half to even
    xq = np.clip(xq, -127, 127)  # (N, K)
    xq = np.where(usable[:, None], xq, 0).astype(np.int8)  # (N, K)
    return xq, scale


def matmul_int8_acc(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """acc = xq @ wq summed exactly in int32: the integer core of W8A8.

    Exact for K <= 131071 (|product| <= 128 * 128, so the int32 sum cannot overflow).

    Args:
        xq: (N, K) int8.
        wq: (K, M) int8.
    Returns:
        acc: (N, M) int32.
    """
    return xq.astype(np.int32) @ wq.astype(np.int32)  # (N, M)


def matmul_int8(
    x: np.ndarray,
    wq: np.ndarray,
    w_scale: np.ndarray,
    bias: np.ndarray | None = None,
    mode: str = "weight-only",
) -> np.ndarray:
    """A linear layer with per-output-channel int8 weights: y ~= x @ (wq * w_scale) + bias.

    mode "weight-only": float activations times the int8 weights converted to float; the
        channel scale is applied once per output:
        y[n, m] = (sum_k x[n, k] * float(wq[k, m])) * w_scale[m] + bias[m].
    mode "w8a8": activations quantized per row (per token) at run time, int8 x int8
        products summed in int32, both scales applied once per output:
        xq, sx = quantize_rows(x); acc = xq @ wq (int32);
        y[n, m] = (float32(acc[n, m]) * sx[n]) * w_scale[m] + bias[m].

    Args:
        x: (N, K) float32.
        wq: (K, M) int8.
        w_scale: (M,) float32.
        bias: (M,) float32 or None.
        mode: "weight-only" or "w8a8".
    Returns:
        y: (N, M) float32.
    Raises:
        ValueError: unknown mode.
    """
    if mode == "weight-only":
        y = (x @ wq.astype(np.float32)) * w_scale  # (N, M)
    elif mode == "w8a8":
        xq, sx = quantize_rows(x)  # (N, K) int8, (N,) float32
        acc = matmul_int8_acc(xq, wq)  # (N, M) int32
        y = (acc.astype(np.float32) * sx[:, None]) * w_scale  # (N, M)
    else:
        raise ValueError(f"matmul_int8 mode={mode!r} is unknown; allowed modes: {INT8_MODES}")
    if bias is not None:
        y = y + bias  # (N, M)
    return y


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; a row that is all -inf gives a row of zeros, never NaN.

    Args:
        x: (N, M) float32 or float64.
    Returns:
        y: (N, M), dtype of x; each row sums to 1 (or is all zeros).
    """
    m = np.max(x, axis=-1, keepdims=True)  # (N, 1)
    # exp(x - max) cannot overflow. A row of all -inf has max -inf, and -inf - -inf is NaN:
    # subtract 0 there instead, so exp gives 0 everywhere and the row stays 0.
    m = np.where(m == -np.inf, 0, m)  # (N, 1)
    e = np.exp(x - m)  # (N, M)
    s = np.sum(e, axis=-1, keepdims=True)  # (N, 1)
    return e / np.where(s == 0, 1, s)  # (N, M)


def layernorm(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5
) -> np.ndarray:
    """LayerNorm over the last axis with the biased variance, as torch.nn.LayerNorm / GPT-2.

    Args:
        x: (N, C) float32 or float64.
        weight, bias: (C,), dtype of x.
        eps: added to the variance before the square root.
    Returns:
        y: (N, C), dtype of x.
    """
    mean = np.mean(x, axis=-1, keepdims=True)  # (N, 1)
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)  # (N, 1), biased: divide by C
    rstd = 1.0 / np.sqrt(var + eps)  # (N, 1)
    return (x - mean) * rstd * weight + bias  # (N, C)


def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's GELU, the tanh approximation (Hendrycks & Gimpel 2016, "Gaussian Error
    Linear Units", eq. for the tanh form): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Args:
        x: any shape, float32 or float64.
    Returns:
        y: shape and dtype of x.
    """
    # Python floats (not np.float64 scalars) keep a float32 input in float32.
    c = math.sqrt(2.0 / math.pi)
    x3 = x * x * x  # x**3 would call pow(): hundreds of times slower than two multiplies
    return 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x3)))


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    n_head: int,
    att_out: np.ndarray | None = None,
) -> np.ndarray:
    """Causal multi-head attention for prefill (Tq == Tk) and KV-cache decode (Tq < Tk).

    Head h occupies columns h*HS:(h+1)*HS of q, k and v (HS = C // n_head): the KV cache's
    (position, d_model) layout, as llama2.c lays it out. Query row i sits at absolute
    position Tk - Tq + i and attends to keys 0 .. Tk - Tq + i; scores are scaled by
    1/sqrt(HS) ("Attention Is All You Need", Vaswani et al. 2017, eq. 1).

    Args:
        q: (Tq, C) float32 or float64 (may be a column slice of a (T, 3C) qkv array).
        k, v: (Tk, C), dtype of q, Tk >= Tq (may be row slices of a bigger cache).
        n_head: number of heads NH; must divide C.
        att_out: optional (NH, Tq, Tk) array of q's dtype that receives the softmax
            weights (zeros where the causal mask hides a key), e.g. for plots.
    Returns:
        out: (Tq, C), dtype of q.
    Raises:
        ValueError: C not divisible by n_head, Tq > Tk, or mismatched shapes.
    """
    Tq, C = q.shape
    Tk = k.shape[0]
    if n_head < 1 or C % n_head != 0 or Tq > Tk or k.shape != (Tk, C) or v.shape != (Tk, C):
        raise ValueError(
            f"attention: q {q.shape}, k {k.shape}, v {v.shape}, n_head={n_head!r}: need "
            f"k and v (Tk, C), Tq <= Tk and C divisible by a positive n_head"
        )
    NH, HS = n_head, C // n_head
    qh = q.reshape(Tq, NH, HS).transpose(1, 0, 2)  # (NH, Tq, HS)
    kh = k.reshape(Tk, NH, HS).transpose(1, 0, 2)  # (NH, Tk, HS)
    vh = v.reshape(Tk, NH, HS).transpose(1, 0, 2)  # (NH, Tk, HS)
    att = (qh @ kh.transpose(0, 2, 1)) * (1.0 / math.sqrt(HS))  # (NH, Tq, Tk)
    # query i (absolute position Tk - Tq + i) must not see key j > Tk - Tq + i
    hidden = np.triu(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)  # (Tq, Tk)
    att = np.where(hidden, -np.inf, att)  # (NH, Tq, Tk)
    att = softmax(att.reshape(NH * Tq, Tk)).reshape(NH, Tq, Tk)  # (NH, Tq, Tk)
    if att_out is not None:
        att_out[...] = att
    out = att @ vh  # (NH, Tq, HS)
    return out.transpose(1, 0, 2).reshape(Tq, C)  # (Tq, C), heads side by side again
