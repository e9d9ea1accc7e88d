"""The training layers of the GPT: forward/backward pairs built from the ops of a kernel backend.

Each `X_forward(...)` returns its output and a named cache holding what the backward pass
needs (llm.c keeps the same things in named buffers: LayerNorm's mean and rstd, attention's
softmax weights). Each `X_backward(d_out, cache)` sits right below its forward and returns
the gradients of the forward's inputs and parameters.

The arithmetic is not here: every layer calls the ops of one backend object (`ops`, default
`minitf.kernels.numpy_ref`, the readable specification of each op and its backward). A
layer adds what the model needs around an op: the (B, T, C) activations flattened to the
(N, C) rows the ops take, and the cache. So a backend that provides the ops in `OPS` under
the same names and signatures (compiled loops, fused kernels) trains the same model.

Shape vocabulary: B batch, T time (tokens), C d_model, NH heads, V vocabulary, N = B * T
rows. Arrays keep the dtype they come in with (float32 for training, float64 for gradient
checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import numpy_ref

# The ops the layers call; a backend that trains must provide each (see numpy_ref for the
# specification of every one).
OPS = (
    "embedding", "embedding_backward",
    "layernorm_forward", "layernorm_backward",
    "matmul", "matmul_backward",
    "gelu_forward", "gelu_backward",
    "attention_forward", "attention_backward",
    "matmul_nt", "matmul_nt_backward",
    "cross_entropy_forward", "cross_entropy_backward",
)


@dataclass
class EmbeddingCache:
    idx: np.ndarray  # (B, T) token ids
    vocab_size: int  # V, rows of wte
    block_size: int  # rows of wpe


@dataclass
class LayerNormCache:
    x: np.ndarray  # (N, C) input rows
    mean: np.ndarray  # (N,)
    rstd: np.ndarray  # (N,) 1 / sqrt(var + eps)
    weight: np.ndarray  # (C,)


@dataclass
class LinearCache:
    x: np.ndarray  # (N, K) input rows
    weight: np.ndarray  # (K, M) for a linear layer; (V, C) for the tied head


@dataclass
class GeluCache:
    x: np.ndarray  # (N, 4C) input rows
    tanh_u: np.ndarray  # (N, 4C)


@dataclass
class AttentionCache:
    qkv: np.ndarray  # (B, T, 3C) input
    att: np.ndarray  # (B, NH, T, T) softmax weights
    n_head: int


@dataclass
class CrossEntropyCache:
    probs: np.ndarray  # (N, V) softmax of the logits
    targets: np.ndarray  # (N,)
    shape: tuple[int, ...]  # the logits' (B, T, V)


class Layers:
    """The training layers over one backend's ops.

    Args:
        ops: an object (a kernel backend module) with every function named in `OPS`, each
            with numpy_ref's signature; default the numpy reference.
    Raises:
        ValueError: ops lacks some of them (the message names them).
    """

    def __init__(self, ops=numpy_ref):
        missing = [name for name in OPS if not callable(getattr(ops, name, None))]
        if missing:
            name = getattr(ops, "NAME", type(ops).__name__)
            raise ValueError(f"backend {name!r} cannot train: it has no {', '.join(missing)} "
                             f"(a training backend provides every op of minitf.layers.OPS)")
        self.ops = ops

    # ------------------------------------------------------------------------------------
    # token + position embedding

    def embedding_forward(self, idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray):
        """x (B, T, C) = wte[idx] + wpe[positions]; idx (B, T) ints in [0, V), T <= block_size."""
        x = self.ops.embedding(idx, wte, wpe)  # (B, T, C)
        return x, EmbeddingCache(idx, wte.shape[0], wpe.shape[0])

    def embedding_backward(self, dx: np.ndarray, cache: EmbeddingCache):
        """dx (B, T, C) -> (dwte (V, C), dwpe (block_size, C))."""
        return self.ops.embedding_backward(dx, cache.idx, cache.vocab_size, cache.block_size)

    # ------------------------------------------------------------------------------------
    # LayerNorm over the channels of every position

    def layernorm_forward(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                          eps: float = 1e-5):
        """x (B, T, C), weight and bias (C,) -> y (B, T, C)."""
        C = x.shape[-1]
        x2 = x.reshape(-1, C)  # (N, C)
        y, mean, rstd = self.ops.layernorm_forward(x2, weight, bias, eps)  # (N, C), (N,), (N,)
        return y.reshape(x.shape), LayerNormCache(x2, mean, rstd, weight)

    def layernorm_backward(self, dy: np.ndarray, cache: LayerNormCache):
        """dy (B, T, C) -> (dx (B, T, C), dweight (C,), dbias (C,))."""
        c = cache
        dy2 = dy.reshape(c.x.shape)  # (N, C)
        dx, dweight, dbias = self.ops.layernorm_backward(dy2, c.x, c.mean, c.rstd, c.weight)
        return dx.reshape(dy.shape), dweight, dbias

    # ------------------------------------------------------------------------------------
    # linear layer, GPT-2's Conv1D: weight stored (in, out)

    def linear_forward(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray):
        """y = x @ weight + bias: x (B, T, K), weight (K, M), bias (M,) -> y (B, T, M)."""
        K, M = weight.shape
        x2 = x.reshape(-1, K)  # (N, K): one (N, K) @ (K, M) GEMM, not a stack of small ones
        y = self.ops.matmul(x2, weight, bias)  # (N, M)
        return y.reshape(*x.shape[:-1], M), LinearCache(x2, weight)

    def linear_backward(self, dy: np.ndarray, cache: LinearCache):
        """dy (B, T, M) -> (dx (B, T, K), dweight (K, M), dbias (M,))."""
        K, M = cache.weight.shape
        dx, dweight, dbias = self.ops.matmul_backward(dy.reshape(-1, M), cache.x, cache.weight)
        return dx.reshape(*dy.shape[:-1], K), dweight, dbias

    # ------------------------------------------------------------------------------------
    # GELU (tanh approximation, as GPT-2)

    def gelu_forward(self, x: np.ndarray):
        """y = gelu(x) elementwise, x (B, T, 4C)."""
        x2 = x.reshape(-1, x.shape[-1])  # (N, 4C)
        y, tanh_u = self.ops.gelu_forward(x2)  # (N, 4C), (N, 4C)
        return y.reshape(x.shape), GeluCache(x2, tanh_u)

    def gelu_backward(self, dy: np.ndarray, cache: GeluCache):
        """dy (B, T, 4C) -> dx (B, T, 4C)."""
        dx = self.ops.gelu_backward(dy.reshape(cache.x.shape), cache.x, cache.tanh_u)  # (N, 4C)
        return dx.reshape(dy.shape)

    # ------------------------------------------------------------------------------------
    # causal multi-head self-attention over the output of c_attn

    def attention_forward(self, qkv: np.ndarray, n_head: int):
        """qkv (B, T, 3C), queries, keys and values side by side -> y (B, T, C)."""
        y, att = self.ops.attention_forward(qkv, n_head)  # (B, T, C), (B, NH, T, T)
        return y, AttentionCache(qkv, att, n_head)

    def attention_backward(self, dy: np.ndarray, cache: AttentionCache):
        """dy (B, T, C) -> dqkv (B, T, 3C)."""
        return self.ops.attention_backward(dy, cache.qkv, cache.att, cache.n_head)

    # ------------------------------------------------------------------------------------
    # tied output head: logits = x @ wte.T (Press & Wolf 2017, as GPT-2)

    def head_forward(self, x: np.ndarray, wte: np.ndarray):
        """x (B, T, C), wte (V, C) -> logits (B, T, V)."""
        V, C = wte.shape
        x2 = x.reshape(-1, C)  # (N, C)
        logits = self.ops.matmul_nt(x2, wte)  # (N, V)
        return logits.reshape(*x.shape[:-1], V), LinearCache(x2, wte)

    def head_backward(self, dlogits: np.ndarray, cache: LinearCache):
        """dlogits (B, T, V) -> (dx (B, T, C), dwte (V, C)); dwte adds to the embedding's."""
        V, C = cache.weight.shape
        dx, dwte = self.ops.matmul_nt_backward(dlogits.reshape(-1, V), cache.x, cache.weight)
        return dx.reshape(*dlogits.shape[:-1], C), dwte

    # ------------------------------------------------------------------------------------
    # softmax cross-entropy, the mean over all B * T positions, in nats/token

    def cross_entropy_forward(self, logits: np.ndarray, targets: np.ndarray):
        """logits (B, T, V), targets (B, T) ints in [0, V) -> (loss: float, nats/token)."""
        V = logits.shape[-1]
        t = np.asarray(targets).reshape(-1)  # (N,)
        losses, probs = self.ops.cross_entropy_forward(logits.reshape(-1, V), t)  # (N,), (N, V)
        return float(losses.mean()), CrossEntropyCache(probs, t, logits.shape)

    def cross_entropy_backward(self, cache: CrossEntropyCache):
        """dloss/dlogits (B, T, V) for dloss = 1."""
        N = cache.targets.shape[0]
        dloss = np.full(N, 1.0 / N, dtype=cache.probs.dtype)  # (N,) the mean's weights
        dlogits = self.ops.cross_entropy_backward(dloss, cache.probs, cache.targets)  # (N, V)
        return dlogits.reshape(cache.shape)
