"""The GPT-2 model for training: blocks built from the layers in `layers.py`, forward and
hand-written backward, no autodiff.

    x = wte[idx] + wpe[positions]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
    logits = ln_f(x) @ wte.T                     (weight tying: one matrix, one gradient)

Parameters live in a flat `{GPT-2 name: array}` dict whose keys and shapes come from
`config.param_shapes`, so checkpoints, the optimizer and gradient checks share one naming.
Inference (prefill, KV cache, kernel backends) lives in `engine.py`.
"""

from __future__ import annotations

import math

import numpy as np

from . import layers
from .config import GPTConfig, param_shapes


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
    """Raise ValueError if names, shapes or finiteness of `params` do not match `config`."""
    expected = param_shapes(config)
    missing = [n for n in expected if n not in params]
    extra = [n for n in params if n not in expected]
    if missing or extra:
        raise ValueError(f"parameters do not match the config: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"parameter {name} has shape {params[name].shape}, config needs {shape}")
        if not np.all(np.isfinite(params[name])):
            raise ValueError(f"parameter {name} contains NaN or inf")


class TransformerBlock:
    """One GPT-2 block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)). Stack as many as needed."""

    def __init__(self, config: GPTConfig, index: int):
        self.config = config
        self.prefix = f"h.{index}."

    def forward(self, params: dict[str, np.ndarray], x: np.ndarray):
        """x (B, T, C) -> (x (B, T, C), cache)."""
        p, eps = self.prefix, self.config.layer_norm_eps
        h, c_ln1 = layers.layernorm_forward(x, params[p + "ln_1.weight"], params[p + "ln_1.bias"], eps)
        qkv, c_attn = layers.linear_forward(h, params[p + "attn.c_attn.weight"], params[p + "attn.c_attn.bias"])  # (B, T, 3C)
        a, c_att = layers.attention_forward(qkv, self.config.n_head)  # (B, T, C)
        a, c_aproj = layers.linear_forward(a, params[p + "attn.c_proj.weight"], params[p + "attn.c_proj.bias"])
        x = x + a  # residual
        h, c_ln2 = layers.layernorm_forward(x, params[p + "ln_2.weight"], params[p + "ln_2.bias"], eps)
        f, c_fc = layers.linear_forward(h, params[p + "mlp.c_fc.weight"], params[p + "mlp.c_fc.bias"])  # (B, T, 4C)
        g, c_gelu = layers.gelu_forward(f)
        m, c_mproj = layers.linear_forward(g, params[p + "mlp.c_proj.weight"], params[p + "mlp.c_proj.bias"])  # (B, T, C)
        x = x + m  # residual
        return x, (c_ln1, c_attn, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj)

    def backward(self, dx: np.ndarray, cache, grads: dict[str, np.ndarray]) -> np.ndarray:
        """dx (B, T, C) of the block's output -> dx of its input; writes this block's grads."""
        p = self.prefix
        c_ln1, c_attn, c_att, c_aproj, c_ln2, c_fc, c_gelu, c_mproj = cache
        # forward was x = x + m: the residual passes dx through and into the MLP
        dm = dx
        dg, grads[p + "mlp.c_proj.weight"], grads[p + "mlp.c_proj.bias"] = layers.linear_backward(dm, c_mproj)
        df = layers.gelu_backward(dg, c_gelu)
        dh, grads[p + "mlp.c_fc.weight"], grads[p + "mlp.c_fc.bias"] = layers.linear_backward(df, c_fc)
        dh, grads[p + "ln_2.weight"], grads[p + "ln_2.bias"] = layers.layernorm_backward(dh, c_ln2)
        dx = dx + dh
        # forward was x = x + a
        da, grads[p + "attn.c_proj.weight"], grads[p + "attn.c_proj.bias"] = layers.linear_backward(dx, c_aproj)
        dqkv = layers.attention_backward(da, c_att)
        dh, grads[p + "attn.c_attn.weight"], grads[p + "attn.c_attn.bias"] = layers.linear_backward(dqkv, c_attn)
        dh, grads[p + "ln_1.weight"], grads[p + "ln_1.bias"] = layers.layernorm_backward(dh, c_ln1)
        return dx + dh


class GPT:
    """GPT-2 language model over a parameter dict, with a hand-written backward pass.

    Args:
        config: the model's sizes.
        params: `{name: array}` with exactly the names and shapes of `param_shapes(config)`,
            all float32 (training) or float64 (gradient checks).
    Raises:
        ValueError: params do not match the config.
    """

    def __init__(self, config: GPTConfig, params: dict[str, np.ndarray]):
        check_params(params, config)
        self.config = config
        self.params = params
        self.blocks = [TransformerBlock(config, i) for i in range(config.n_layer)]

    def forward(self, idx: np.ndarray, targets: np.ndarray | None = None):
        """Logits and (if targets are given) the mean cross-entropy loss.

        Args:
            idx: (B, T) integer token ids in [0, vocab_size), T <= block_size.
            targets: (B, T) integer ids of the next tokens, or None.
        Returns:
            (logits (B, T, V), loss in nats/token or None, cache for `backward`).
        Raises:
            ValueError: idx is not 2-D, T exceeds block_size, or an id is out of range.
        """
        idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {idx.shape}")
        B, T = idx.shape
        if not 1 <= T <= self.config.block_size:
            raise ValueError(f"sequence length T={T} must be in [1, block_size={self.config.block_size}]")
        if idx.size and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got [{idx.min()}, {idx.max()}]")
        P = self.params
        x, c_emb = layers.embedding_forward(idx, P["wte"], P["wpe"])  # (B, T, C)
        c_blocks = []
        for block in self.blocks:
            x, c = block.forward(P, x)
            c_blocks.append(c)
        x, c_lnf = layers.layernorm_forward(x, P["ln_f.weight"], P["ln_f.bias"], self.config.layer_norm_eps)
        logits, c_head = layers.head_forward(x, P["wte"])  # (B, T, V)
        loss, c_ce = None, None
        if targets is not None:
            loss, c_ce = layers.cross_entropy_forward(logits, np.asarray(targets))
        return logits, loss, (c_emb, c_blocks, c_lnf, c_head, c_ce)

    def backward(self, cache) -> dict[str, np.ndarray]:
        """Gradient of the mean loss for every parameter, `{name: array}` like `params`."""
        c_emb, c_blocks, c_lnf, c_head, c_ce = cache
        if c_ce is None:
            raise ValueError("backward needs a forward pass that was given targets")
        grads: dict[str, np.ndarray] = {}
        dlogits = layers.cross_entropy_backward(c_ce)  # (B, T, V)
        dx, dwte_head = layers.head_backward(dlogits, c_head)
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = layers.layernorm_backward(dx, c_lnf)
        for block, c in zip(reversed(self.blocks), reversed(c_blocks)):
            dx = block.backward(dx, c, grads)
        dwte_emb, grads["wpe"] = layers.embedding_backward(dx, c_emb)
        # wte is used twice (embedding and tied head): its gradient is the sum of both uses
        grads["wte"] = dwte_emb + dwte_head
        return {name: grads[name] for name in self.params}

    def loss_and_grads(self, idx: np.ndarray, targets: np.ndarray):
        """(loss in nats/token, grads) for one batch."""
        _, loss, cache = self.forward(idx, targets)
        return loss, self.backward(cache)
