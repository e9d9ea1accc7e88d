"""The GPT-2 model for training: blocks built from the layers in `layers.py`, forward and
hand-written backward, no autodiff.

    x = wte[idx] + wpe[positions]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ wte.T                     (weight tying: one matrix, one gradient)

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
from .kernels import numpy_ref
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


@dataclass
class GPTCache:
    """What GPT.backward needs from GPT.forward."""

    embedding: EmbeddingCache
    blocks: list[BlockCache]
    ln_f: LayerNormCache
    head: LinearCache
    loss: CrossEntropyCache | None  # None when forward had no targets


class TransformerBlock:
    """One GPT-2 block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)). Stack as many as needed."""

    def __init__(self, config: GPTConfig, index: int, layers: Layers):
        self.config = config
        self.prefix = f"h.{index}."
        self.layers = layers

    def _weights(self, params: dict[str, np.ndarray], layer: str):
        """(weight, bias) of this block's `layer`, e.g. "mlp.c_fc"."""
        return params[self.prefix + layer + ".weight"], params[self.prefix + layer + ".bias"]

    def _store(self, grads: dict[str, np.ndarray], layer: str, dweight, dbias) -> None:
        grads[self.prefix + layer + ".weight"] = dweight
        grads[self.prefix + layer + ".bias"] = dbias

    def forward(self, params: dict[str, np.ndarray], x: np.ndarray):
        """x (B, T, C) -> (x (B, T, C), BlockCache)."""
        L, P = self.layers, partial(self._weights, params)  # P("ln_1") = (weight, bias)
        eps, NH = self.config.layer_norm_eps, self.config.n_head
        h, ln_1 = L.layernorm_forward(x, *P("ln_1"), eps)  # (B, T, C)
        qkv, c_attn = L.linear_forward(h, *P("attn.c_attn"))  # (B, T, 3C)
        a, attn = L.attention_forward(qkv, NH)  # (B, T, C)
        a, attn_proj = L.linear_forward(a, *P("attn.c_proj"))  # (B, T, C)
        x = x + a  # (B, T, C) residual
        h, ln_2 = L.layernorm_forward(x, *P("ln_2"), eps)  # (B, T, C)
        f, c_fc = L.linear_forward(h, *P("mlp.c_fc"))  # (B, T, 4C)
        g, gelu = L.gelu_forward(f)  # (B, T, 4C)
        m, mlp_proj = L.linear_forward(g, *P("mlp.c_proj"))  # (B, T, C)
        x = x + m  # (B, T, C) residual
        return x, BlockCache(ln_1, c_attn, attn, attn_proj, ln_2, c_fc, gelu, mlp_proj)

    def backward(self, dx: np.ndarray, cache: BlockCache, grads: dict[str, np.ndarray]):
        """dx (B, T, C) of the block's output -> dx of its input; writes this block's grads."""
        L, c = self.layers, cache
        # forward was x = x + m: the residual passes dx on unchanged, and into the MLP
        dg, dw, db = L.linear_backward(dx, c.mlp_proj)  # (B, T, 4C), (4C, C), (C,)
        self._store(grads, "mlp.c_proj", dw, db)
        df = L.gelu_backward(dg, c.gelu)  # (B, T, 4C)
        dh, dw, db = L.linear_backward(df, c.c_fc)  # (B, T, C), (C, 4C), (4C,)
        self._store(grads, "mlp.c_fc", dw, db)
        dh, dw, db = L.layernorm_backward(dh, c.ln_2)  # (B, T, C), (C,), (C,)
        self._store(grads, "ln_2", dw, db)
        dx = dx + dh  # (B, T, C) the gradient of both paths into x
        # forward was x = x + a: the same again for the attention
        da, dw, db = L.linear_backward(dx, c.attn_proj)  # (B, T, C), (C, C), (C,)
        self._store(grads, "attn.c_proj", dw, db)
        dqkv = L.attention_backward(da, c.attn)  # (B, T, 3C)
        dh, dw, db = L.linear_backward(dqkv, c.c_attn)  # (B, T, C), (C, 3C), (3C,)
        self._store(grads, "attn.c_attn", dw, db)
        dh, dw, db = L.layernorm_backward(dh, c.ln_1)  # (B, T, C), (C,), (C,)
        self._store(grads, "ln_1", dw, db)
        return dx + dh  # (B, T, C)


class GPT:
    """GPT-2 language model over a parameter dict, with a hand-written backward pass.

    Args:
        config: the model's sizes.
        params: `{name: array}` with exactly the names and shapes of `param_shapes(config)`,
            all float32 (training) or float64 (gradient checks), finite.
        ops: the backend whose ops the layers run (see minitf.layers.Layers); default the
            numpy reference.
    Raises:
        ValueError: params do not match the config, or ops cannot train.
    """

    def __init__(self, config: GPTConfig, params: dict[str, np.ndarray], ops=numpy_ref):
        check_params(params, config)
        self.config = config
        self.params = params
        self.layers = Layers(ops)
        self.blocks = [TransformerBlock(config, i, self.layers) for i in range(config.n_layer)]

    def forward(self, idx: np.ndarray, targets: np.ndarray | None = None):
        """Logits and (if targets are given) the mean cross-entropy loss.

        Args:
            idx: (B, T) integer token ids in [0, vocab_size), T <= block_size.
            targets: (B, T) integer ids of the next tokens, or None.
        Returns:
            (logits (B, T, V), loss in nats/token or None, GPTCache for `backward`).
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
        x, embedding = L.embedding_forward(idx, P["wte"], P["wpe"])  # (B, T, C)
        blocks = []
        for block in self.blocks:
            x, cache = block.forward(P, x)  # (B, T, C)
            blocks.append(cache)
        x, ln_f = L.layernorm_forward(x, P["ln_f.weight"], P["ln_f.bias"], eps)  # (B, T, C)
        logits, head = L.head_forward(x, P["wte"])  # (B, T, V)
        loss, ce = None, None
        if targets is not None:
            loss, ce = L.cross_entropy_forward(logits, targets)  # nats/token
        return logits, loss, GPTCache(embedding, blocks, ln_f, head, ce)

    def backward(self, cache: GPTCache) -> dict[str, np.ndarray]:
        """Gradient of the mean loss for every parameter, `{name: array}` like `params`."""
        if cache.loss is None:
            raise ValueError("backward needs a forward pass that was given targets")
        L, grads = self.layers, {}
        dlogits = L.cross_entropy_backward(cache.loss)  # (B, T, V)
        dx, dwte_head = L.head_backward(dlogits, cache.head)  # (B, T, C), (V, C)
        dx, dw, db = L.layernorm_backward(dx, cache.ln_f)  # (B, T, C), (C,), (C,)
        grads["ln_f.weight"], grads["ln_f.bias"] = dw, db
        for block, block_cache in zip(reversed(self.blocks), reversed(cache.blocks)):
            dx = block.backward(dx, block_cache, grads)  # (B, T, C)
        dwte_emb, dwpe = L.embedding_backward(dx, cache.embedding)  # (V, C), (block_size, C)
        grads["wpe"] = dwpe
        # wte is used twice (embedding and tied head): its gradient is the sum of both uses
        grads["wte"] = dwte_emb + dwte_head  # (V, C)
        return {name: grads[name] for name in self.params}

    def loss_and_grads(self, idx: np.ndarray, targets: np.ndarray):
        """(loss in nats/token, grads) for one batch."""
        _, loss, cache = self.forward(idx, targets)
        return loss, self.backward(cache)
