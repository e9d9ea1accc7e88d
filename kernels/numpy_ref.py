"""The numpy reference ops: the one specification of every op of minitf, forward and backward.

Each function is written to be read, not to be fast: one line per step of the formula, in
the order the formula states it, with the shape at the end of each line. Every other
implementation must equal these functions: `numba_kernels` and `cython_kernels` export the
inference ops under the same names and signatures, and tests/test_kernels.py checks them
against these functions (and checks these against independent computations: PyTorch,
hand-worked values). The training layers (minitf.layers) are built from the same ops, so the
model that is trained and the model that generates share one definition of each op.

Two kinds of functions, side by side for each op:

- `op(...)`: the value only, what inference and evaluation call (matmul, layernorm, gelu,
  softmax, log_softmax, attention, cross_entropy, embedding);
- `op_forward(...)` / `op_backward(...)`: training. A forward returns its value and what its
  backward needs (LayerNorm's mean and rstd, attention's softmax weights, the cross-entropy's
  probabilities), as llm.c keeps them in named buffers; the backward takes the gradient of
  the output and those arrays and returns the gradients of the inputs and weights. When the
  forward has nothing to keep beyond its inputs, the value-only op serves as the forward
  (matmul, matmul_nt, embedding).

Every function takes arrays and returns new arrays: a compiled backend implements the same
name and signature over loops that write into buffers its wrapper allocates. Ops marked
"Hot in training" carry the elementwise and reduction work of a training step beside the
BLAS matmuls; those are the ones worth compiling.

Shape letters: N rows (tokens, B * T in training), K inputs, M outputs, C channels,
B batch, T / Tq / Tk positions, NH heads, HS head size, V vocabulary. Arrays keep the dtype
they come in (float32 to train and run, float64 for gradient checks).
"""

from __future__ import annotations

import math

import numpy as np

NAME = "numpy"

# w8a8 and weight-only int8 execution, see `matmul_int8`.
INT8_MODES = ("weight-only", "w8a8")

# GPT-2's GELU constant sqrt(2 / pi), a Python float so that float32 inputs stay float32.
_GELU_SCALE = math.sqrt(2.0 / math.pi)


# ----------------------------------------------------------------------------------------
# linear layers: y = x @ w + bias, GPT-2's Conv1D with the weight stored (in, out)


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


def matmul_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray):
    """Gradients of y = x @ w + bias (`matmul`) from dy = dL/dy.

    Args:
        dy: (N, M); x: (N, K) the forward's input; w: (K, M).
    Returns:
        dx (N, K), dw (K, M), dbias (M,) (the bias gradient, for a layer that has one).
    """
    # forward was y = x @ w + bias
    dx = dy @ w.T  # (N, K)
    dw = x.T @ dy  # (K, M)
    dbias = dy.sum(axis=0)  # (M,) every row added the same bias
    return dx, dw, dbias


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


def matmul_nt_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray):
    """Gradients of y = x @ w.T (`matmul_nt`, the tied head) from dy = dL/dy.

    Args:
        dy: (N, M); x: (N, K); w: (M, K).
    Returns:
        dx (N, K), dw (M, K). For the head, dw is wte's gradient from its use as the head;
        the embedding adds the other half.
    """
    # forward was y = x @ w.T
    dx = dy @ w  # (N, K)
    dw = dy.T @ x  # (M, K)
    return dx, dw


# ----------------------------------------------------------------------------------------
# int8: symmetric per-row / per-channel quantization and the int8 linear layer


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


def matmul_nt_int8(
    x: np.ndarray,
    wq: np.ndarray,
    w_scale: np.ndarray,
    mode: str = "weight-only",
) -> np.ndarray:
    """The tied head with an int8 wte, one scale per row: y ~= x @ (wq * w_scale[:, None]).T.

    Row v of wq is the output channel v, so this is `matmul_int8` of the transposed weight
    (K, M) = wq.T with its per-column scales w_scale, and no bias:
    "weight-only": y[n, v] = (sum_k x[n, k] * float(wq[v, k])) * w_scale[v];
    "w8a8": xq, sx = quantize_rows(x); acc[n, v] = sum_k xq[n, k] * wq[v, k] (int32);
        y[n, v] = (float32(acc[n, v]) * sx[n]) * w_scale[v].

    Args:
        x: (N, K) float32.
        wq: (M, K) int8, the rows of the head (V, C).
        w_scale: (M,) float32, one scale per row of wq.
        mode: "weight-only" or "w8a8".
    Returns:
        y: (N, M) float32.
    Raises:
        ValueError: unknown mode.
    """
    return matmul_int8(x, wq.T, w_scale, None, mode)  # (N, M)


def dequantize_rows(wq: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """Rows of an int8 matrix with a scale per row, as float32: float32(wq) * w_scale[:, None]
    (one rounding), e.g. the embeddings of tokens idx of an int8 wte:
    dequantize_rows(wq[idx], w_scale[idx]).

    Args:
        wq: (N, K) int8; w_scale: (N,) float32.
    Returns:
        (N, K) float32.
    """
    return wq.astype(np.float32) * w_scale[:, None]  # (N, K)


# ----------------------------------------------------------------------------------------
# softmax, log-sum-exp and the softmax cross-entropy


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; a row that is all -inf gives a row of zeros, never NaN.

    Args:
        x: (N, M) float32 or float64 (any leading axes: every row on its own).
    Returns:
        y: shape and dtype of x; each row sums to 1 (or is all zeros).
    """
    m = np.max(x, axis=-1, keepdims=True)  # (N, 1)
    # exp(x - max) cannot overflow. A row of all -inf has max -inf, and -inf - -inf is NaN:
    # subtract 0 there instead, so exp gives 0 everywhere and the row stays 0.
    m = np.where(m == -np.inf, 0, m)  # (N, 1)
    e = np.exp(x - m)  # (N, M)
    s = np.sum(e, axis=-1, keepdims=True)  # (N, 1)
    return e / np.where(s == 0, 1, s)  # (N, M)


def softmax_backward(dy: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of y = softmax(x) over the last axis, from dy = dL/dy and the output y.

    dx_i = sum_j y_j (delta_ij - y_i) dy_j = y_i (dy_i - sum_j y_j dy_j). An entry with
    y = 0 (a masked score) gets no gradient.

    Args:
        dy, y: (N, M) float, same shape (any leading axes). Hot in training (attention).
    Returns:
        dx: (N, M).
    """
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))  # (N, M)


def logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, max-subtracted so exp cannot overflow.

    Args:
        x: (N, M) float32 or float64 (any leading axes), at least one finite value a row.
    Returns:
        (N,), dtype of x.
    """
    m = np.max(x, axis=-1, keepdims=True)  # (N, 1)
    return m[..., 0] + np.log(np.sum(np.exp(x - m), axis=-1))  # (N,)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log(softmax(x)) over the last axis, as x - logsumexp(x): accurate where a probability
    is too small for the float type (its log is still finite).

    Args:
        x: (N, M) float (any leading axes), at least one finite value a row.
    Returns:
        (N, M), dtype of x.
    """
    return x - logsumexp(x)[..., None]  # (N, M)


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Softmax cross-entropy, the value only (the loss of `cross_entropy_forward`), e.g. for
    evaluation in float64.

    Args:
        logits: (N, V) float (any leading axes); targets: (N,) ints in [0, V).
    Returns:
        loss: (N,) = -log softmax(logits[n])[targets[n]] in nats, dtype of logits.
    """
    return cross_entropy_forward(logits, targets)[0]


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray):
    """Softmax cross-entropy: the negative log-likelihood of each target under
    softmax(logits), in nats, and the probabilities the backward needs. Hot in training
    (with the tied head's logits).

    Args:
        logits: (N, V) float (any leading axes); targets: (N,) ints in [0, V).
    Returns:
        loss (N,) = -log softmax(logits[n])[targets[n]], and probs (N, V) = softmax(logits).
    """
    logp = log_softmax(logits)  # (N, V)
    loss = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (N,)
    return loss, np.exp(logp)  # (N,), (N, V) the probabilities from their logs


def cross_entropy_backward(dloss: np.ndarray, probs: np.ndarray, targets: np.ndarray):
    """Gradient of the per-row losses of `cross_entropy_forward` with respect to the logits.

    Args:
        dloss: (N,) dL/dloss[n] (1 / N each for a mean over the rows); probs: (N, V);
            targets: (N,). Hot in training.
    Returns:
        dlogits: (N, V).
    """
    N = probs.shape[0]
    # forward was loss[n] = logsumexp(logits[n]) - logits[n, targets[n]], and
    # d logsumexp / d logits = softmax(logits) = probs, so dloss/dlogits = probs - one_hot
    dlogits = probs.copy()  # (N, V)
    dlogits[np.arange(N), targets] -= 1.0  # (N, V)
    dlogits *= dloss[:, None]  # (N, V)
    return dlogits


# ----------------------------------------------------------------------------------------
# LayerNorm (Ba et al. 2016), biased variance as in GPT-2 / torch.nn.LayerNorm


def layernorm(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5
) -> np.ndarray:
    """LayerNorm over the last axis with the biased variance, as torch.nn.LayerNorm / GPT-2:
    the y of `layernorm_forward`.

    Args:
        x: (N, C) float32 or float64.
        weight, bias: (C,), dtype of x.
        eps: added to the variance before the square root.
    Returns:
        y: (N, C), dtype of x.
    """
    return layernorm_forward(x, weight, bias, eps)[0]


def layernorm_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis, and the row
    statistics the backward needs. Hot in training.

    Args:
        x: (N, C) float32 or float64 (any leading axes).
        weight, bias: (C,), dtype of x.
        eps: added to the variance before the square root.
    Returns:
        y (N, C), mean (N,) and rstd (N,) = 1 / sqrt(var + eps), dtype of x.
    """
    mean = np.mean(x, axis=-1, keepdims=True)  # (N, 1)
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)  # (N, 1), biased: divide by C
    rstd = 1.0 / np.sqrt(var + eps)  # (N, 1)
    y = (x - mean) * rstd * weight + bias  # (N, C)
    return y, mean[..., 0], rstd[..., 0]


def layernorm_backward(dy: np.ndarray, x: np.ndarray, mean: np.ndarray, rstd: np.ndarray,
                       weight: np.ndarray):
    """Gradients of `layernorm_forward` from dy = dL/dy. Hot in training.

    Args:
        dy, x: (N, C) (any leading axes); mean, rstd: (N,) from the forward; weight: (C,).
    Returns:
        dx (N, C), dweight (C,), dbias (C,).
    """
    C = x.shape[-1]
    mean, rstd = mean[..., None], rstd[..., None]  # (N, 1)
    x_hat = (x - mean) * rstd  # (N, C) the normalized input, as the forward computed it
    # forward was y = x_hat * weight + bias
    dweight = (dy * x_hat).reshape(-1, C).sum(axis=0)  # (C,)
    dbias = dy.reshape(-1, C).sum(axis=0)  # (C,)
    dx_hat = dy * weight  # (N, C)
    # forward was x_hat = (x - mean) * rstd with mean and rstd functions of x; differentiating
    # through both gives the standard closed form (as in llm.c's layernorm_backward)
    dx = rstd * (
        dx_hat
        - dx_hat.mean(axis=-1, keepdims=True)
        - x_hat * (dx_hat * x_hat).mean(axis=-1, keepdims=True)
    )  # (N, C)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------
# GELU, the tanh approximation GPT-2 uses (Hendrycks & Gimpel 2016, "Gaussian Error Linear
# Units", the tanh form in section 2)


def gelu(x: np.ndarray) -> np.ndarray:
    """GPT-2's GELU, the tanh approximation: the y of `gelu_forward`.

    Args:
        x: any shape, float32 or float64.
    Returns:
        y: shape and dtype of x.
    """
    return gelu_forward(x)[0]


def gelu_forward(x: np.ndarray):
    """GPT-2's GELU, y = 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3),
    elementwise, and tanh(u), which the backward needs. Hot in training.

    Args:
        x: any shape, float32 or float64.
    Returns:
        y and tanh_u, shape and dtype of x.
    """
    x3 = x * x * x  # x**3 would call pow(): hundreds of times slower than two multiplies
    tanh_u = np.tanh(_GELU_SCALE * (x + 0.044715 * x3))
    return 0.5 * x * (1.0 + tanh_u), tanh_u


def gelu_backward(dy: np.ndarray, x: np.ndarray, tanh_u: np.ndarray) -> np.ndarray:
    """Gradient of `gelu_forward` from dy = dL/dy, its input x and its tanh_u. Hot in training.

    Args:
        dy, x, tanh_u: same shape, float.
    Returns:
        dx: shape of x.
    """
    # forward was y = 0.5 x (1 + tanh(u)) with u = s (x + 0.044715 x^3), so
    # dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) * s (1 + 3 * 0.044715 x^2)
    du_dx = _GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
    return dy * (0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u * tanh_u) * du_dx)


# ----------------------------------------------------------------------------------------
# causal multi-head self-attention ("Attention Is All You Need", Vaswani et al. 2017, eq. 1)


def _split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """(..., T, C) -> (..., NH, T, HS): head h is columns h*HS:(h+1)*HS (a view, no copy)."""
    *batch, T, C = x.shape
    return x.reshape(*batch, T, n_head, C // n_head).swapaxes(-3, -2)  # (..., NH, T, HS)


def _merge_heads(x: np.ndarray) -> np.ndarray:
    """(..., NH, T, HS) -> (..., T, C), the heads side by side again."""
    *batch, NH, T, HS = x.shape
    return x.swapaxes(-3, -2).reshape(*batch, T, NH * HS)  # (..., T, C)


def _causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                      mask: np.ndarray | None = None):
    """softmax(q k^T / sqrt(HS) + causal mask) v for each head, and the softmax weights.

    q (..., NH, Tq, HS), k and v (..., NH, Tk, HS) with Tq <= Tk: query i sits at absolute
    position Tk - Tq + i and sees keys 0 .. Tk - Tq + i. With a dropout `mask` (..., NH, Tq,
    Tk) the weights are dropped before they weigh v (training). Returns out (..., NH, Tq,
    HS) and att (..., NH, Tq, Tk), before dropout, zero where the causal mask hides a key.
    """
    Tq, Tk, HS = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(HS))  # (..., NH, Tq, Tk)
    # query i (absolute position Tk - Tq + i) must not see key j > Tk - Tq + i: add -inf
    # there, 0 elsewhere
    scores += np.triu(np.full((Tq, Tk), -np.inf, dtype=scores.dtype), k=Tk - Tq + 1)
    att = softmax(scores)  # (..., NH, Tq, Tk)
    dropped = att if mask is None else dropout(att, mask)  # (..., NH, Tq, Tk)
    return dropped @ v, att  # (..., NH, Tq, HS), (..., NH, Tq, Tk)


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
    qh, kh, vh = (_split_heads(a, n_head) for a in (q, k, v))  # (NH, Tq or Tk, HS)
    out, att = _causal_attention(qh, kh, vh)  # (NH, Tq, HS), (NH, Tq, Tk)
    if att_out is not None:
        att_out[...] = att
    return _merge_heads(out)  # (Tq, C)


def attention_forward(qkv: np.ndarray, n_head: int, mask: np.ndarray | None = None):
    """Causal self-attention of a batch of sequences for training: the output and the
    softmax weights the backward needs. Hot in training (its softmax).

    Args:
        qkv: (B, T, 3C) float, the output of c_attn: queries, keys and values side by side
            (GPT-2's layout), each with head h in columns h*HS:(h+1)*HS.
        n_head: NH; must divide C.
        mask: None, or a (B, NH, T, T) dropout mask of qkv's dtype (see `dropout_mask`)
            applied to the softmax weights before they weigh the values, as GPT-2 does.
    Returns:
        y (B, T, C), the heads side by side, and att (B, NH, T, T), the softmax weights
        (before dropout), zero above the diagonal.
    """
    q, k, v = (_split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))  # (B, NH, T, HS)
    y, att = _causal_attention(q, k, v, mask)  # (B, NH, T, HS), (B, NH, T, T)
    return _merge_heads(y), att  # (B, T, C), (B, NH, T, T)


def attention_backward(dy: np.ndarray, qkv: np.ndarray, att: np.ndarray, n_head: int,
                       mask: np.ndarray | None = None):
    """Gradient of `attention_forward` with respect to qkv. Hot in training.

    Args:
        dy: (B, T, C) dL/dy; qkv: (B, T, 3C) the forward's input; att: (B, NH, T, T) its
            softmax weights; n_head: NH; mask: the forward's dropout mask or None.
    Returns:
        dqkv: (B, T, 3C).
    """
    q, k, v = (_split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))  # (B, NH, T, HS)
    scale = 1.0 / math.sqrt(q.shape[-1])
    dy = _split_heads(dy, n_head)  # (B, NH, T, HS)
    dropped = att if mask is None else dropout(att, mask)  # (B, NH, T, T) what weighed v
    # forward was y = dropped @ v
    ddropped = dy @ v.swapaxes(-1, -2)  # (B, NH, T, T)
    dv = dropped.swapaxes(-1, -2) @ dy  # (B, NH, T, HS)
    # forward was dropped = att * mask: the gradient passes where the mask kept a weight
    datt = ddropped if mask is None else dropout(ddropped, mask)  # (B, NH, T, T)
    # forward was att = softmax(scores) row by row; masked scores have att = 0, so they get
    # no gradient
    dscores = softmax_backward(datt, att)  # (B, NH, T, T)
    # forward was scores = q @ k^T * scale
    dq = (dscores @ k) * scale  # (B, NH, T, HS)
    dk = (dscores.swapaxes(-1, -2) @ q) * scale  # (B, NH, T, HS)
    return np.concatenate([_merge_heads(d) for d in (dq, dk, dv)], axis=-1)  # (B, T, 3C)


# ----------------------------------------------------------------------------------------
# token + position embedding


def embedding(idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray) -> np.ndarray:
    """x = wte[idx] + wpe[positions], positions 0 .. T-1.

    Args:
        idx: (B, T) integer token ids, each in [0, V).
        wte: (V, C) token embedding (also the tied output head).
        wpe: (block_size, C) position embedding; T <= block_size.
    Returns:
        x: (B, T, C) in wte's dtype.
    """
    T = idx.shape[-1]
    return wte[idx] + wpe[:T]  # (B, T, C)


def embedding_backward(dx: np.ndarray, idx: np.ndarray, vocab_size: int, block_size: int):
    """Gradients of `embedding` from dx = dL/dx.

    Args:
        dx: (B, T, C); idx: (B, T) the forward's token ids; vocab_size V; block_size.
    Returns:
        dwte (V, C), dwpe (block_size, C), dtype of dx (rows of unused tokens and positions
        are zero).
    """
    B, T, C = dx.shape
    dwte = np.zeros((vocab_size, C), dtype=dx.dtype)  # (V, C)
    # forward gathered rows wte[idx]; a token used several times collects every gradient
    np.add.at(dwte, idx.reshape(-1), dx.reshape(-1, C))  # (V, C)
    dwpe = np.zeros((block_size, C), dtype=dx.dtype)  # (block_size, C)
    dwpe[:T] = dx.sum(axis=0)  # (T, C) every sequence in the batch used the same positions
    return dwte, dwpe


# The training forwards of the linear layers and the embedding are their value-only ops:
# they keep nothing but their inputs.
matmul_forward = matmul
matmul_nt_forward = matmul_nt
embedding_forward = embedding


# ----------------------------------------------------------------------------------------
# dropout (Srivastava et al. 2014), "inverted" as torch.nn.Dropout: kept values are scaled
# by 1 / (1 - p) while training, so evaluation and generation use the weights unchanged


def dropout_mask(u: np.ndarray, p: float) -> np.ndarray:
    """The dropout mask of uniform numbers u in [0, 1): 1 / (1 - p) where u >= p (kept, with
    probability 1 - p), 0 elsewhere (dropped, with probability p); E[mask] = 1.

    Args:
        u: any shape, float32 or float64, uniform in [0, 1) (drawn from the training RNG).
        p: the dropout probability, 0 <= p < 1.
    Returns:
        mask: shape and dtype of u.
    """
    scale = 1.0 / (1.0 - p)
    return np.where(u >= p, scale, 0.0).astype(u.dtype)


def dropout(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """y = x * mask, with a mask from `dropout_mask`. The product is also its own backward:
    dx = dy * mask.

    Args:
        x, mask: same shape and float dtype.
    Returns:
        y: shape and dtype of x.
    """
    return x * mask


def residual_add(x: np.ndarray, a: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """A residual connection, y = x + dropout(a, mask) (GPT-2 drops the branch before adding
    it); without a mask, y = x + a, which also sums the gradients of two paths into one
    tensor.

    Args:
        x, a: same shape and float dtype; mask: like a, or None.
    Returns:
        y: shape and dtype of x.
    """
    return x + (a if mask is None else dropout(a, mask))


# ----------------------------------------------------------------------------------------
# the optimizer's passes over the flat parameter and gradient buffers


def global_norm(g: np.ndarray) -> float:
    """The L2 norm of every gradient together, sqrt(sum g^2), summed in float64 (the norm
    that global-norm clipping scales by, as torch.nn.utils.clip_grad_norm_). Hot in training.

    Args:
        g: (P,) float32 or float64, the flat gradient buffer.
    Returns:
        the norm as a Python float (inf or nan if a gradient is not finite).
    """
    g64 = g.astype(np.float64)  # (P,)
    return math.sqrt(float(np.dot(g64, g64)))


def adamw(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, n_decay: int, lr: float,
          beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
          grad_scale: float = 1.0):
    """One AdamW step over flat buffers (Loshchilov & Hutter 2019, "Decoupled Weight Decay
    Regularization", algorithm 2), as torch.optim.AdamW computes it:

        g = grad_scale * g                      (global-norm clipping, folded in)
        p = p * (1 - lr * weight_decay)         (decoupled decay, the first n_decay only)
        m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
        p = p - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

    Hot in training: a compiled backend does it in one pass over the four buffers.

    Args:
        p, g, m, v: (P,) of one float dtype: parameters, gradients, first and second moments.
        n_decay: weight decay applies to p[:n_decay] (the buffer holds the decayed tensors
            first).
        lr, beta1, beta2, eps, weight_decay: the hyperparameters; step: this step's number,
            counting from 1 (for the bias corrections).
        grad_scale: multiplies the gradients first (the clipping coefficient; 1: none).
    Returns:
        the new p, m, v (new arrays).
    """
    g = g * grad_scale  # (P,)
    p = p.copy()  # (P,)
    p[:n_decay] *= 1.0 - lr * weight_decay  # decoupled: shrink before the Adam step
    m = beta1 * m + (1.0 - beta1) * g  # (P,)
    v = beta2 * v + (1.0 - beta2) * (g * g)  # (P,)
    denom = np.sqrt(v) / math.sqrt(1.0 - beta2**step) + eps  # (P,)
    p -= (lr / (1.0 - beta1**step)) * (m / denom)  # (P,)
    return p, m, v
