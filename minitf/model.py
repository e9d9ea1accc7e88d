"""The GPT-2 model for training: blocks built from the layers in `layers.py`, forward and
hand-written backward, no autodiff.

    x = dropout(wte[idx] + wpe[positions])
    for each block:  x = x + dropout(attn(ln_1(x)));  x = x + dropout(mlp(ln_2(x)))
    logits = ln_f(x) @ wte.T                     (weight tying: one matrix, one gradient)

Dropout (GPT-2's places: the embedding, the attention weights inside attn, each residual
branch) acts only in a training step that draws masks (`GPT.draw_masks`, config.dropout >
0); evaluation and generation never drop anything.

Parameters live in a flat `{GPT-2 name: array}` dict whose keys and shapes come from
`config.param_shapes`, so checkpoints, the optimizer and gradient checks share one naming.
Each forward returns a named cache (BlockCache, GPTCache) that its backward reads.
Inference (prefill, KV cache, kernel backends) lives in `engine.py`.

Shapes: B batch, T time, C d_model, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np

from .config import GPTConfig, param_shapes
from .layers import (
    AttentionCache,
    CrossEntropyCache,
    EmbeddingCache,
    GeluCache,
    LayerNormCache,
    Layers,
    LinearCache,
)
from .tensors import check_tensors, tensor_layout


def init_params(config: GPTConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """GPT-2 initialisation: weights ~ N(0, 0.02), residual projections (attn.c_proj and
    mlp.c_proj) ~ N(0, 0.02 / sqrt(2 * n_layer)) (GPT-2 paper, section 2.3; nanoGPT), biases 0,
    LayerNorm weight 1.

    Returns:
        {name: array of `dtype`} in `param_shapes(config)` order.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            p = np.ones(shape)
        elif name.endswith(".bias"):
            p = np.zeros(shape)
        else:
            std = 0.02
            if name.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * config.n_layer)
            p = rng.normal(0.0, std, size=shape)
        params[name] = p.astype(dtype)
    return params


def check_params(params: dict[str, np.ndarray], config: GPTConfig) -> None:
    """Raise ValueError unless `params` are exactly the float tensors of `config`, all of one
    dtype and finite (see minitf.tensors.check_tensors)."""
    check_tensors(params, tensor_layout(config), "GPT", noun="parameter")


@dataclass
class BlockMasks:
    """The dropout masks of one block (see minitf.kernels.numpy_ref.dropout_mask), where
    GPT-2 has dropout."""

    att: np.ndarray  # (B, NH, T, T) on the attention weights
    attn: np.ndarray  # (B, T, C) on the attention branch, after attn.c_proj
    mlp: np.ndarray  # (B, T, C) on the MLP branch, after mlp.c_proj


@dataclass
class DropoutMasks:
    """Every dropout mask of one training step: after the embedding, and in each block."""

    embedding: np.ndarray  # (B, T, C) on wte[idx] + wpe
    blocks: list[BlockMasks]

    def rows(self, rows: slice) -> "DropoutMasks":
        """The masks of the batch rows `rows` (views), for a batch split into parts."""
        return DropoutMasks(self.embedding[rows], [BlockMasks(b.att[rows], b.attn[rows], b.mlp[rows])
                                                   for b in self.blocks])


@dataclass
class BlockCache:
    """What TransformerBlock.backward needs from its forward: one cache per layer."""

    ln_1: LayerNormCache
    c_attn: LinearCache
    attn: AttentionCache
    attn_proj: LinearCache  # attn.c_proj
    ln_2: LayerNormCache
    c_fc: LinearCache
    gelu: GeluCache
    mlp_proj: LinearCache  # mlp.c_proj
    masks: BlockMasks | None


@dataclass
class GPTCache:
    """What GPT.backward needs from GPT.forward."""

    embedding: EmbeddingCache
    blocks: list[BlockCache]
    ln_f: LayerNormCache
    head: LinearCache
    loss: CrossEntropyCache | None  # None when forward had no targets


class TransformerBlock:
    """One GPT-2 block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)). Stack as many as needed.

    The forward names its buffers after the block's layers ("h.0.ln_1", ...); the backward
    after their roles ("grad.ln_1", ...), shared by every block (see minitf.layers).
    """

    def __init__(self, config: GPTConfig, index: int, layers: Layers):
        self.config = config
        self.prefix = f"h.{index}."
        self.layers = layers

    def _weights(self, params: dict[str, np.ndarray], layer: str):
        """(weight, bias) of this block's `layer`, e.g. "mlp.c_fc"; also its gradients'
        arrays when given the grads."""
        return params[self.prefix + layer + ".weight"], params[self.prefix + layer + ".bias"]

    def forward(self, params: dict[str, np.ndarray], x: np.ndarray,
                masks: BlockMasks | None = None):
        """x (B, T, C) -> (x (B, T, C), BlockCache); masks: dropout, or None (none)."""
        L, P, n = self.layers, partial(self._weights, params), self.prefix
        eps, NH = self.config.layer_norm_eps, self.config.n_head
        att_mask, attn_mask, mlp_mask = (None, None, None) if masks is None else \
            (masks.att, masks.attn, masks.mlp)
        h, ln_1 = L.layernorm_forward(n + "ln_1", x, *P("ln_1"), eps)  # (B, T, C)
        qkv, c_attn = L.linear_forward(n + "attn.c_attn", h, *P("attn.c_attn"))  # (B, T, 3C)
        a, attn = L.attention_forward(n + "attn", qkv, NH, att_mask)  # (B, T, C)
        a, attn_proj = L.linear_forward(n + "attn.c_proj", a, *P("attn.c_proj"))  # (B, T, C)
        x = L.residual_add(n + "attn.residual", x, a, attn_mask)  # (B, T, C) x + dropout(a)
        h, ln_2 = L.layernorm_forward(n + "ln_2", x, *P("ln_2"), eps)  # (B, T, C)
        f, c_fc = L.linear_forward(n + "mlp.c_fc", h, *P("mlp.c_fc"))  # (B, T, 4C)
        g, gelu = L.gelu_forward(n + "mlp.gelu", f)  # (B, T, 4C)
        m, mlp_proj = L.linear_forward(n + "mlp.c_proj", g, *P("mlp.c_proj"))  # (B, T, C)
        x = L.residual_add(n + "mlp.residual", x, m, mlp_mask)  # (B, T, C) x + dropout(m)
        return x, BlockCache(ln_1, c_attn, attn, attn_proj, ln_2, c_fc, gelu, mlp_proj, masks)

    def backward(self, dx: np.ndarray, cache: BlockCache, grads: dict[str, np.ndarray]):
        """dx (B, T, C) of the block's output -> dx of its input; writes this block's
        gradients into the arrays of `grads`."""
        L, c, G = self.layers, cache, partial(self._weights, grads)  # G("ln_1") = (dw, db)
        # forward was x = x + dropout(m): the residual passes dx on unchanged, and into the
        # MLP where the mask kept it
        dm = dx if c.masks is None else L.dropout("grad.mlp.dropout", dx, c.masks.mlp)
        dg = L.linear_backward("grad.mlp.c_proj", dm, c.mlp_proj, *G("mlp.c_proj"))  # (B, T, 4C)
        df = L.gelu_backward("grad.mlp.gelu", dg, c.gelu)  # (B, T, 4C)
        dh = L.linear_backward("grad.mlp.c_fc", df, c.c_fc, *G("mlp.c_fc"))  # (B, T, C)
        dh = L.layernorm_backward("grad.ln_2", dh, c.ln_2, *G("ln_2"))  # (B, T, C)
        dx = L.residual_add("grad.x_mid", dx, dh)  # (B, T, C) the gradient of both paths into x
        # forward was x = x + dropout(a): the same again for the attention
        da = dx if c.masks is None else L.dropout("grad.attn.dropout", dx, c.masks.attn)
        da = L.linear_backward("grad.attn.c_proj", da, c.attn_proj, *G("attn.c_proj"))  # (B, T, C)
        dqkv = L.attention_backward("grad.attn", da, c.attn)  # (B, T, 3C)
        dh = L.linear_backward("grad.attn.c_attn", dqkv, c.c_attn, *G("attn.c_attn"))  # (B, T, C)
        dh = L.layernorm_backward("grad.ln_1", dh, c.ln_1, *G("ln_1"))  # (B, T, C)
        return L.residual_add("grad.x", dx, dh)  # (B, T, C)


class GPT:
    """GPT-2 language model over a parameter dict, with a hand-written backward pass.

    Args:
        config: the model's sizes (and its dropout probability, used when a training step
            hands `forward` the masks of `draw_masks`).
        params: `{name: array}` with exactly the names and shapes of `param_shapes(config)`,
            all float32 (training) or float64 (gradient checks), finite.
        ops: the kernel backend whose training ops the layers run (`get_backend(name)`, see
            minitf.layers.Layers); default the numpy backend (the reference ops).
    Raises:
        ValueError: params do not match the config, or ops cannot train.

    The arrays `forward` and `backward` return (logits, and the gradients when backward
    allocates them) are buffers the next call overwrites (see minitf.layers): copy what
    must outlive a step.
    """

    def __init__(self, config: GPTConfig, params: dict[str, np.ndarray], ops=None):
        check_params(params, config)
        self.config = config
        self.params = params
        self.layers = Layers(ops)
        self.blocks = [TransformerBlock(config, i, self.layers) for i in range(config.n_layer)]

    def draw_masks(self, rng: np.random.Generator, batch_size: int,
                   T: int | None = None) -> DropoutMasks | None:
        """The dropout masks of one training step of `batch_size` sequences of T tokens
        (default block_size), drawn from `rng` (the training RNG: a checkpoint keeps its
        state, so a resumed run draws the same masks); None when config.dropout is 0 (and
        nothing is drawn).
        """
        p = self.config.dropout
        if p == 0:
            return None
        cfg, dtype = self.config, self.params["wte"].dtype
        B, T, C, NH = batch_size, cfg.block_size if T is None else T, cfg.d_model, cfg.n_head
        mask = partial(self.layers.dropout_mask, rng=rng, dtype=dtype, p=p)
        embedding = mask("drop.wte", shape=(B, T, C))
        blocks = [BlockMasks(mask(f"drop.h.{i}.att", shape=(B, NH, T, T)),
                             mask(f"drop.h.{i}.attn", shape=(B, T, C)),
                             mask(f"drop.h.{i}.mlp", shape=(B, T, C)))
                  for i in range(cfg.n_layer)]
        return DropoutMasks(embedding, blocks)

    def forward(self, idx: np.ndarray, targets: np.ndarray | None = None,
                masks: DropoutMasks | None = None):
        """Logits and (if targets are given) the mean cross-entropy loss.

        Args:
            idx: (B, T) integer token ids in [0, vocab_size), T <= block_size.
            targets: (B, T) integer ids of the next tokens, or None.
            masks: the dropout masks of a training step (`draw_masks`, or any masks of the
                same shapes), or None: no dropout (evaluation, generation).
        Returns:
            (logits (B, T, V), loss in nats/token or None, GPTCache for `backward`). The
            logits and the cache are this model's buffers (`minitf.layers`): the next
            forward with the same batch shape overwrites them; copy what must be kept.
        Raises:
            ValueError: idx is not 2-D, T exceeds block_size, or an id is out of range.
        """
        idx = np.asarray(idx)
        cfg = self.config
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {idx.shape}")
        B, T = idx.shape
        if not 1 <= T <= cfg.block_size:
            raise ValueError(f"sequence length T={T} must be in [1, block_size={cfg.block_size}]")
        if idx.size and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), "
                             f"got [{idx.min()}, {idx.max()}]")
        L, P, eps = self.layers, self.params, cfg.layer_norm_eps
        x, embedding = L.embedding_forward("wte", idx, P["wte"], P["wpe"],
                                           None if masks is None else masks.embedding)
        blocks = []
        for i, block in enumerate(self.blocks):
            x, cache = block.forward(P, x, None if masks is None else masks.blocks[i])
            blocks.append(cache)
        x, ln_f = L.layernorm_forward("ln_f", x, P["ln_f.weight"], P["ln_f.bias"], eps)  # (B, T, C)
        logits, head = L.head_forward("head", x, P["wte"])  # (B, T, V)
        loss, ce = None, None
        if targets is not None:
            loss, ce = L.cross_entropy_forward("loss", logits, targets)  # nats/token
        return logits, loss, GPTCache(embedding, blocks, ln_f, head, ce)

    def backward(self, cache: GPTCache, grads: dict[str, np.ndarray] | None = None,
                 weight: float = 1.0) -> dict[str, np.ndarray]:
        """Gradient of `weight` times the mean loss for every parameter, `{name: array}`
        like `params`: written into `grads` (e.g. the views of the optimizer's flat gradient
        buffer), or into new arrays if it is None. (A batch split into parts weighs each
        part by its share of the rows, so that the parts' gradients add up to the whole
        batch's.)"""
        if cache.loss is None:
            raise ValueError("backward needs a forward pass that was given targets")
        L, P = self.layers, self.params
        if grads is None:
            grads = {name: np.empty_like(p) for name, p in P.items()}
        dlogits = L.cross_entropy_backward("grad.loss", cache.loss, weight)  # (B, T, V)
        dwte_head = L.buffer("grad.head.dwte", P["wte"].shape, P["wte"].dtype)  # (V, C)
        dx = L.head_backward("grad.head", dlogits, cache.head, dwte_head)  # (B, T, C)
        dx = L.layernorm_backward("grad.ln_f", dx, cache.ln_f, grads["ln_f.weight"],
                                  grads["ln_f.bias"])  # (B, T, C)
        for block, block_cache in zip(reversed(self.blocks), reversed(cache.blocks)):
            dx = block.backward(dx, block_cache, grads)  # (B, T, C)
        dwte_emb = L.buffer("grad.wte.dwte", P["wte"].shape, P["wte"].dtype)  # (V, C)
        L.embedding_backward("grad.wte", dx, cache.embedding, dwte_emb, grads["wpe"])
        # wte is used twice (embedding and tied head): its gradient is the sum of both uses
        L.add_into(grads["wte"], dwte_emb, dwte_head)  # (V, C)
        return grads

    def loss_and_grads(self, idx: np.ndarray, targets: np.ndarray,
                       masks: DropoutMasks | None = None,
                       grads: dict[str, np.ndarray] | None = None, weight: float = 1.0):
        """(loss in nats/token, grads) for one batch; masks, grads and weight as for
        forward and backward."""
        _, loss, cache = self.forward(idx, targets, masks)
        return loss, self.backward(cache, grads, weight)
