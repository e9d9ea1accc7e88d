"""Every layer of the GPT as a forward/backward pair of plain numpy functions.

Each `X_forward(...)` returns its output and a `cache` holding what the backward pass needs
(llm.c keeps the same things in named buffers: LayerNorm's mean and rstd, attention's
softmax weights). Each `X_backward(d_out, cache)` sits right below its forward and returns
the gradients of the forward's inputs and parameters. Comments in a backward work back from
the forward line they undo.

Shape vocabulary: B batch, T time (tokens), C d_model, NH heads, HS head size (C // NH),
V vocabulary, N = B * T rows. Arrays keep the dtype they come in with (float32 for training,
float64 for gradient checks).
"""

from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------------------
# token + position embedding


def embedding_forward(idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray):
    """x = wte[idx] + wpe[positions].

    Args:
        idx: (B, T) integer token ids, each in [0, V).
        wte: (V, C) token embedding (also the tied output head).
        wpe: (block_size, C) position embedding; T <= block_size.
    Returns:
        x: (B, T, C) in wte's dtype, and the cache for `embedding_backward`.
    """
    B, T = idx.shape
    x = wte[idx] + wpe[:T]  # (B, T, C)
    return x, (idx, wte.shape, wpe.shape)


def embedding_backward(dx: np.ndarray, cache):
    """Gradients of wte (V, C) and wpe (block_size, C) from dx (B, T, C)."""
    idx, wte_shape, wpe_shape = cache
    B, T, C = dx.shape
    dwte = np.zeros(wte_shape, dtype=dx.dtype)
    # forward gathered rows wte[idx]; a token used several times collects every gradient
    np.add.at(dwte, idx.reshape(-1), dx.reshape(-1, C))
    dwpe = np.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[:T] = dx.sum(axis=0)  # every sequence in the batch used the same positions
    return dwte, dwpe


# ----------------------------------------------------------------------------------------
# LayerNorm (Ba et al. 2016), biased variance as in GPT-2 / torch.nn.LayerNorm


def layernorm_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis.

    Args:
        x: (..., C); weight, bias: (C,).
    Returns:
        y: (..., C), and the cache (x_hat, rstd, weight).
    """
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1) biased, as GPT-2
    rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
    x_hat = xc * rstd  # (..., C)
    y = x_hat * weight + bias  # (..., C)
    return y, (x_hat, rstd, weight)


def layernorm_backward(dy: np.ndarray, cache):
    """Returns (dx (..., C), dweight (C,), dbias (C,))."""
    x_hat, rstd, weight = cache
    C = dy.shape[-1]
    # forward was y = x_hat * weight + bias
    dweight = (dy * x_hat).reshape(-1, C).sum(axis=0)
    dbias = dy.reshape(-1, C).sum(axis=0)
    dx_hat = dy * weight
    # forward was x_hat = (x - mean) * rstd with mean and rstd functions of x; differentiating
    # through both gives the standard closed form (as in llm.c's layernorm_backward)
    dx = rstd * (
        dx_hat
        - dx_hat.mean(axis=-1, keepdims=True)
        - x_hat * (dx_hat * x_hat).mean(axis=-1, keepdims=True)
    )
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------
# linear layer, GPT-2's Conv1D: weight stored (in, out)


def linear_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray):
    """y = x @ weight + bias.  x (..., K), weight (K, M), bias (M,) -> y (..., M)."""
    K, M = weight.shape
    # one (N, K) @ (K, M) GEMM rather than a stack of small ones
    y = (x.reshape(-1, K) @ weight + bias).reshape(*x.shape[:-1], M)  # (..., M)
    return y, (x, weight)


def linear_backward(dy: np.ndarray, cache):
    """Returns (dx (..., K), dweight (K, M), dbias (M,))."""
    x, weight = cache
    K, M = weight.shape
    x2 = x.reshape(-1, K)  # (N, K)
    dy2 = dy.reshape(-1, M)  # (N, M)
    # forward was y = x @ weight + bias
    dweight = x2.T @ dy2  # (K, M)
    dbias = dy2.sum(axis=0)  # (M,)
    dx = (dy2 @ weight.T).reshape(x.shape)  # (..., K)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------
# GELU, tanh approximation as GPT-2 uses (Hendrycks & Gimpel 2016, eq. in section 2)

_GELU_SCALE = math.sqrt(2.0 / math.pi)


def gelu_forward(x: np.ndarray):
    """y = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), elementwise."""
    u = _GELU_SCALE * (x + 0.044715 * (x * x * x))
    tanh_u = np.tanh(u)
    y = 0.5 * x * (1.0 + tanh_u)
    return y, (x, tanh_u)


def gelu_backward(dy: np.ndarray, cache):
    """Returns dx, same shape as dy."""
    x, tanh_u = cache
    # y = 0.5 x (1 + tanh(u)) with u = s (x + 0.044715 x^3), so
    # dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) * s (1 + 3 * 0.044715 x^2)
    du_dx = _GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
    dx = dy * (0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u * tanh_u) * du_dx)
    return dx


# ----------------------------------------------------------------------------------------
# causal multi-head self-attention (Vaswani et al. 2017), scale 1/sqrt(HS)


def attention_forward(qkv: np.ndarray, n_head: int):
    """Causal self-attention over the output of c_attn.

    Args:
        qkv: (B, T, 3C), queries, keys and values side by side (GPT-2's c_attn layout).
        n_head: NH; C must be divisible by it.
    Returns:
        y: (B, T, C) heads concatenated, and the cache (q, k, v, att) where att (B, NH, T, T)
        are the softmax weights, zero above the diagonal.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    NH = n_head
    HS = C // NH
    q, k, v = np.split(qkv, 3, axis=2)  # 3 x (B, T, C)
    q = q.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS)
    k = k.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS)
    v = v.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS)
    scale = 1.0 / math.sqrt(HS)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B, NH, T, T)
    # a token never sees the ones after it: -inf above the diagonal, 0 elsewhere
    scores += np.triu(np.full((T, T), -np.inf, dtype=scores.dtype), k=1)  # (B, NH, T, T)
    att = softmax(scores)  # (B, NH, T, T)
    y = att @ v  # (B, NH, T, HS)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C) heads side by side
    return y, (q, k, v, att)


def attention_backward(dy: np.ndarray, cache):
    """Returns dqkv (B, T, 3C) from dy (B, T, C)."""
    q, k, v, att = cache
    B, NH, T, HS = q.shape
    C = NH * HS
    scale = 1.0 / math.sqrt(HS)
    dy = dy.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # (B, NH, T, HS)
    # forward was y = att @ v
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, T)
    dv = att.transpose(0, 1, 3, 2) @ dy  # (B, NH, T, HS)
    # forward was att = softmax(scores) row by row: dscores = att * (datt - sum(datt * att));
    # masked entries have att = 0, so they get no gradient
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, NH, T, T)
    # forward was scores = q @ k^T * scale
    dq = (dscores @ k) * scale  # (B, NH, T, HS)
    dk = (dscores.transpose(0, 1, 3, 2) @ q) * scale  # (B, NH, T, HS)
    dqkv = np.concatenate(
        [d.transpose(0, 2, 1, 3).reshape(B, T, C) for d in (dq, dk, dv)], axis=2
    )  # (B, T, 3C)
    return dqkv


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; max-subtracted; a row of all -inf gives zeros, not NaN."""
    m = x.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0).astype(x.dtype)  # all -inf row: avoid inf - inf
    e = np.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    return e / np.where(s > 0, s, 1.0).astype(x.dtype)


# ----------------------------------------------------------------------------------------
# tied output head: logits = x @ wte.T (Press & Wolf 2017, as GPT-2)


def head_forward(x: np.ndarray, wte: np.ndarray):
    """logits (B, T, V) = x (B, T, C) @ wte (V, C).T"""
    V, C = wte.shape
    logits = (x.reshape(-1, C) @ wte.T).reshape(*x.shape[:-1], V)  # (B, T, V)
    return logits, (x, wte)


def head_backward(dlogits: np.ndarray, cache):
    """Returns (dx (B, T, C), dwte (V, C)); dwte is added to the embedding's gradient."""
    x, wte = cache
    V, C = wte.shape
    # forward was logits = x @ wte.T
    dx = (dlogits.reshape(-1, V) @ wte).reshape(x.shape)  # (B, T, C)
    dwte = dlogits.reshape(-1, V).T @ x.reshape(-1, C)  # (V, C)
    return dx, dwte


# ----------------------------------------------------------------------------------------
# softmax cross-entropy, mean over all B * T positions, in nats/token


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray):
    """Mean negative log-likelihood of targets.

    Args:
        logits: (B, T, V) float; targets: (B, T) ints in [0, V).
    Returns:
        loss (python float, nats/token) and the cache (probs, targets).
    """
    B, T, V = logits.shape
    m = logits.max(axis=-1, keepdims=True)  # (B, T, 1)
    shifted = logits - m
    logsumexp = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # (B, T, 1)
    logprobs = shifted - logsumexp  # (B, T, V)
    picked = np.take_along_axis(logprobs, targets[..., None], axis=-1)  # (B, T, 1)
    loss = -picked.mean()
    return float(loss), (np.exp(logprobs), targets)


def cross_entropy_backward(cache):
    """dloss/dlogits (B, T, V) for dloss = 1: (softmax - one_hot(target)) / (B * T)."""
    probs, targets = cache
    B, T, V = probs.shape
    dlogits = probs.copy()
    np.put_along_axis(
        dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], -1) - 1, -1
    )
    dlogits /= B * T
    return dlogits
