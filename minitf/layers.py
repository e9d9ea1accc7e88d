"""The training layers of the GPT: forward/backward pairs built from the ops of a kernel backend.

Each `X_forward(name, ...)` returns its output and a named cache holding what the backward
pass needs (llm.c keeps the same things in named buffers: LayerNorm's mean and rstd,
attention's softmax weights). Each `X_backward(name, d_out, cache, ...)` sits right below
its forward and returns the gradient of the forward's input; the gradients of its
parameters are written into the arrays it is given (the optimizer's flat gradient buffer).

The arithmetic is not here: every layer calls the training ops of one backend
(`minitf.kernels.get_backend(...)`, default "numpy", whose ops are `numpy_ref`, the
readable specification of each op and its backward). A layer adds what the model needs
around an op: the (B, T, C) activations flattened to the (N, C) rows the ops take, the
cache, and the arrays the op writes into.

Buffers. Every output is written into an array that the Layers object keeps under a name
(`buffer`): the first step of a batch shape allocates them, every later step reuses them,
as llm.c allocates its activations once. A forward's buffers are named after the layer
(e.g. "h.0.ln_1.y"), so each layer's cache survives until its backward; a backward's are
named after the layer's role (e.g. "grad.ln_1.dx"), shared by every block, because a block's
backward has consumed them before the next block's begins. So the arrays a forward or a
backward returns are valid until the next step: copy what must outlive it.

Shape vocabulary: B batch, T time (tokens), C d_model, NH heads, V vocabulary, N = B * T
rows. Arrays keep the dtype they come in with (float32 for training, float64 for gradient
checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import get_backend

# The ops the layers call; a backend that trains must provide each (see numpy_ref for the
# specification of every one, and kernels.backend for the `out=` they write into).
OPS = (
    "embedding_forward", "embedding_backward",
    "layernorm_forward", "layernorm_backward",
    "matmul_forward", "matmul_backward",
    "gelu_forward", "gelu_backward",
    "attention_forward", "attention_backward",
    "matmul_nt_forward", "matmul_nt_backward",
    "cross_entropy_forward", "cross_entropy_backward",
    "dropout_mask", "dropout", "residual_add",
)


@dataclass
class EmbeddingCache:
    idx: np.ndarray  # (B, T) token ids
    vocab_size: int  # V, rows of wte
    block_size: int  # rows of wpe
    mask: np.ndarray | None  # (B, T, C) dropout mask, or None


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
    mask: np.ndarray | None  # (B, NH, T, T) dropout mask of the weights, or None
    dropped: np.ndarray | None  # (B, NH, T, T) att * mask, or None


@dataclass
class CrossEntropyCache:
    probs: np.ndarray  # (N, V) softmax of the logits
    targets: np.ndarray  # (N,)
    shape: tuple[int, ...]  # the logits' (B, T, V)


class Layers:
    """The training layers over one backend's ops, and the buffers they write into.

    Args:
        ops: a kernel backend (`minitf.kernels.get_backend(name)`) providing every op in
            `OPS`; default the numpy backend (the reference ops).
    Raises:
        ValueError: ops lacks some of them (the message names them).
    """

    def __init__(self, ops=None):
        ops = get_backend("numpy") if ops is None else ops
        missing = [name for name in OPS if not callable(getattr(ops, name, None))]
        if missing:
            name = getattr(ops, "NAME", type(ops).__name__)
            raise ValueError(f"backend {name!r} cannot train: it has no {', '.join(missing)} "
                             f"(a training backend provides every op of minitf.layers.OPS)")
        self.ops = ops
        self._buffers: dict[str, np.ndarray] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The array called `name`: the same one at every call with this shape and dtype
        (allocated, uninitialised, at the first call or when the shape or dtype changes)."""
        a = self._buffers.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._buffers[name] = np.empty(shape, dtype=dtype)
        return a

    def _out(self, name: str, dtype, **shapes) -> tuple[np.ndarray, ...]:
        """The buffers "name.<key>" of the given shapes, as an op's `out=` tuple."""
        return tuple(self.buffer(f"{name}.{key}", shape, dtype) for key, shape in shapes.items())

    # ------------------------------------------------------------------------------------
    # token + position embedding, then dropout

    def embedding_forward(self, name: str, idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray,
                          mask: np.ndarray | None = None):
        """x (B, T, C) = dropout(wte[idx] + wpe[positions]); idx (B, T) ints in [0, V),
        T <= block_size; mask: the (B, T, C) dropout mask or None."""
        B, T = idx.shape
        C = wte.shape[1]
        x = self.ops.embedding_forward(idx, wte, wpe, out=self._out(name, wte.dtype,
                                                                    x=(B, T, C)))  # (B, T, C)
        if mask is not None:
            x = self.dropout(name + ".dropped", x, mask)  # (B, T, C)
        return x, EmbeddingCache(idx, wte.shape[0], wpe.shape[0], mask)

    def embedding_backward(self, name: str, dx: np.ndarray, cache: EmbeddingCache,
                           dwte: np.ndarray, dwpe: np.ndarray) -> None:
        """dx (B, T, C) -> dwte (V, C) and dwpe (block_size, C), written into the arrays
        given."""
        if cache.mask is not None:
            # forward was x = x * mask: the gradient passes where the mask kept a value
            dx = self.dropout(name + ".dx", dx, cache.mask)  # (B, T, C)
        self.ops.embedding_backward(dx, cache.idx, cache.vocab_size, cache.block_size,
                                    out=(dwte, dwpe))

    # ------------------------------------------------------------------------------------
    # LayerNorm over the channels of every position

    def layernorm_forward(self, name: str, x: np.ndarray, weight: np.ndarray,
                          bias: np.ndarray, eps: float = 1e-5):
        """x (B, T, C), weight and bias (C,) -> y (B, T, C)."""
        C = x.shape[-1]
        x2 = x.reshape(-1, C)  # (N, C)
        N = x2.shape[0]
        out = self._out(name, x.dtype, y=(N, C), mean=(N,), rstd=(N,))
        y, mean, rstd = self.ops.layernorm_forward(x2, weight, bias, eps, out=out)  # (N, C), (N,), (N,)
        return y.reshape(x.shape), LayerNormCache(x2, mean, rstd, weight)

    def layernorm_backward(self, name: str, dy: np.ndarray, cache: LayerNormCache,
                           dweight: np.ndarray, dbias: np.ndarray) -> np.ndarray:
        """dy (B, T, C) -> dx (B, T, C); dweight and dbias (C,) are written."""
        c = cache
        dy2 = dy.reshape(c.x.shape)  # (N, C)
        (dx,) = self._out(name, dy.dtype, dx=c.x.shape)
        self.ops.layernorm_backward(dy2, c.x, c.mean, c.rstd, c.weight, out=(dx, dweight, dbias))
        return dx.reshape(dy.shape)

    # ------------------------------------------------------------------------------------
    # linear layer, GPT-2's Conv1D: weight stored (in, out)

    def linear_forward(self, name: str, x: np.ndarray, weight: np.ndarray, bias: np.ndarray):
        """y = x @ weight + bias: x (B, T, K), weight (K, M), bias (M,) -> y (B, T, M)."""
        K, M = weight.shape
        x2 = x.reshape(-1, K)  # (N, K): one (N, K) @ (K, M) GEMM, not a stack of small ones
        y = self.ops.matmul_forward(x2, weight, bias,
                                    out=self._out(name, x.dtype, y=(x2.shape[0], M)))  # (N, M)
        return y.reshape(*x.shape[:-1], M), LinearCache(x2, weight)

    def linear_backward(self, name: str, dy: np.ndarray, cache: LinearCache,
                        dweight: np.ndarray, dbias: np.ndarray) -> np.ndarray:
        """dy (B, T, M) -> dx (B, T, K); dweight (K, M) and dbias (M,) are written."""
        K, M = cache.weight.shape
        (dx,) = self._out(name, dy.dtype, dx=cache.x.shape)
        self.ops.matmul_backward(dy.reshape(-1, M), cache.x, cache.weight,
                                 out=(dx, dweight, dbias))
        return dx.reshape(*dy.shape[:-1], K)

    # ------------------------------------------------------------------------------------
    # GELU (tanh approximation, as GPT-2)

    def gelu_forward(self, name: str, x: np.ndarray):
        """y = gelu(x) elementwise, x (B, T, 4C)."""
        x2 = x.reshape(-1, x.shape[-1])  # (N, 4C)
        y, tanh_u = self.ops.gelu_forward(x2, out=self._out(name, x.dtype, y=x2.shape,
                                                            tanh_u=x2.shape))  # (N, 4C) x 2
        return y.reshape(x.shape), GeluCache(x2, tanh_u)

    def gelu_backward(self, name: str, dy: np.ndarray, cache: GeluCache) -> np.ndarray:
        """dy (B, T, 4C) -> dx (B, T, 4C)."""
        (dx,) = self._out(name, dy.dtype, dx=cache.x.shape)
        self.ops.gelu_backward(dy.reshape(cache.x.shape), cache.x, cache.tanh_u, out=(dx,))
        return dx.reshape(dy.shape)

    # ------------------------------------------------------------------------------------
    # causal multi-head self-attention over the output of c_attn

    def attention_forward(self, name: str, qkv: np.ndarray, n_head: int,
                          mask: np.ndarray | None = None):
        """qkv (B, T, 3C), queries, keys and values side by side -> y (B, T, C); mask: the
        (B, NH, T, T) dropout mask of the attention weights, or None."""
        B, T, C3 = qkv.shape
        grid = (B, n_head, T, T)
        out = self._out(name, qkv.dtype, y=(B, T, C3 // 3), att=grid)
        dropped = None if mask is None else self.buffer(name + ".dropped", grid, qkv.dtype)
        y, att = self.ops.attention_forward(qkv, n_head, mask, out=out, dropped=dropped)
        return y, AttentionCache(qkv, att, n_head, mask, dropped)  # (B, T, C)

    def attention_backward(self, name: str, dy: np.ndarray, cache: AttentionCache) -> np.ndarray:
        """dy (B, T, C) -> dqkv (B, T, 3C)."""
        c = cache
        (dqkv,) = self._out(name, dy.dtype, dqkv=c.qkv.shape)
        datt = self.buffer(name + ".datt", c.att.shape, dy.dtype)  # scratch
        return self.ops.attention_backward(dy, c.qkv, c.att, c.n_head, c.mask, out=(dqkv,),
                                           dropped=c.dropped, datt=datt)

    # ------------------------------------------------------------------------------------
    # tied output head: logits = x @ wte.T (Press & Wolf 2017, as GPT-2)

    def head_forward(self, name: str, x: np.ndarray, wte: np.ndarray):
        """x (B, T, C), wte (V, C) -> logits (B, T, V)."""
        V, C = wte.shape
        x2 = x.reshape(-1, C)  # (N, C)
        logits = self.ops.matmul_nt_forward(x2, wte, out=self._out(name, x.dtype,
                                                                   logits=(x2.shape[0], V)))
        return logits.reshape(*x.shape[:-1], V), LinearCache(x2, wte)  # (B, T, V)

    def head_backward(self, name: str, dlogits: np.ndarray, cache: LinearCache,
                      dwte: np.ndarray) -> np.ndarray:
        """dlogits (B, T, V) -> dx (B, T, C); dwte (V, C), wte's gradient from its use as the
        head, is written (the embedding adds the other half)."""
        V, C = cache.weight.shape
        (dx,) = self._out(name, dlogits.dtype, dx=cache.x.shape)
        self.ops.matmul_nt_backward(dlogits.reshape(-1, V), cache.x, cache.weight,
                                    out=(dx, dwte))
        return dx.reshape(*dlogits.shape[:-1], C)

    # ------------------------------------------------------------------------------------
    # softmax cross-entropy, the mean over all B * T positions, in nats/token

    def cross_entropy_forward(self, name: str, logits: np.ndarray, targets: np.ndarray):
        """logits (B, T, V), targets (B, T) ints in [0, V) -> (loss: float, nats/token)."""
        V = logits.shape[-1]
        t = np.asarray(targets).reshape(-1)  # (N,)
        N = t.shape[0]
        out = self._out(name, logits.dtype, loss=(N,), probs=(N, V))
        losses, probs = self.ops.cross_entropy_forward(logits.reshape(-1, V), t, out=out)
        return float(losses.mean()), CrossEntropyCache(probs, t, logits.shape)

    def cross_entropy_backward(self, name: str, cache: CrossEntropyCache,
                               weight: float = 1.0) -> np.ndarray:
        """dloss/dlogits (B, T, V) for dloss = weight (1: the gradient of this batch's mean
        loss; a batch split into parts weighs each by its share of the rows)."""
        N = cache.targets.shape[0]
        dloss, dlogits = self._out(name, cache.probs.dtype, dloss=(N,), dlogits=cache.probs.shape)
        dloss.fill(weight / N)  # (N,) the mean's weights
        self.ops.cross_entropy_backward(dloss, cache.probs, cache.targets, out=(dlogits,))
        return dlogits.reshape(cache.shape)  # (B, T, V)

    # ------------------------------------------------------------------------------------
    # residual connections and dropout (inverted dropout, Srivastava et al. 2014)

    def residual_add(self, name: str, x: np.ndarray, a: np.ndarray,
                     mask: np.ndarray | None = None) -> np.ndarray:
        """x + dropout(a): the residual stream x (B, T, C) plus a branch, dropped by the
        (B, T, C) mask if one is given. Also sums the gradients of two paths (no mask)."""
        return self.ops.residual_add(x, a, mask, out=self._out(name, x.dtype, y=x.shape))

    def add_into(self, out: np.ndarray, x: np.ndarray, a: np.ndarray) -> None:
        """out = x + a, e.g. the gradient of a tensor used twice: the sum of both uses'."""
        self.ops.residual_add(x, a, out=(out,))

    def dropout(self, name: str, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """x * mask, the dropout of x and also its backward (dx = dy * mask)."""
        return self.ops.dropout(x, mask, out=self._out(name, x.dtype, y=x.shape))

    def dropout_mask(self, name: str, rng: np.random.Generator, shape: tuple[int, ...],
                     dtype, p: float) -> np.ndarray:
        """A dropout mask of `shape` (0 with probability p, else 1 / (1 - p)) from uniform
        numbers drawn from `rng` (the training RNG, whose state a checkpoint keeps)."""
        (mask,) = self._out(name, dtype, mask=shape)
        rng.random(out=mask, dtype=mask.dtype)  # uniform in [0, 1)
        return self.ops.dropout_mask(mask, p, out=(mask,))
