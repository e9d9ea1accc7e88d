"""Model configuration and the one place where every parameter is named.

`param_shapes(config)` is the single list of parameters: initialisation, checkpoints, the
optimizer, gradient checks and quantization all iterate over it, so a tensor is named once.
Names and the `(in, out)` weight layout follow GPT-2 (and nanoGPT / HF transformers), so a
GPT-2-family checkpoint maps onto minitf name by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT-2-style decoder-only transformer.

    Raises:
        ValueError: a size is not a positive integer, `d_model` is not divisible by
            `n_head`, or `dropout` is outside [0, 1).
    """

    vocab_size: int = 65  # tokens; 65 = TinyShakespeare's characters
    block_size: int = 128  # context length: the most tokens the model attends over
    n_layer: int = 2  # number of stacked TransformerBlocks
    n_head: int = 4  # attention heads per block
    d_model: int = 240  # residual stream width (C); d_head = d_model // n_head = 60
    layer_norm_eps: float = 1e-5  # GPT-2's LayerNorm epsilon
    dropout: float = 0.0  # training only: probability of dropping, where GPT-2 drops

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config {name}={value!r} must be a positive integer")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"config d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"allowed n_head values for d_model={self.d_model}: "
                f"{[h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]}"
            )
        if not (isinstance(self.layer_norm_eps, float) and self.layer_norm_eps > 0):
            raise ValueError(f"config layer_norm_eps={self.layer_norm_eps!r} must be a float > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config dropout={self.dropout!r} must be a number in [0, 1)")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_ff(self) -> int:
        """Width of the MLP's hidden layer: 4 * d_model, as in GPT-2."""
        return 4 * self.d_model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build a config from a JSON dict; unknown or missing keys are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; allowed: {sorted(fields)}")
        missing = sorted(fields - set(d) - {"layer_norm_eps", "dropout"})  # both have defaults
        if missing:
            raise ValueError(f"config is missing keys {missing}")
        d = dict(d)
        if "layer_norm_eps" in d and isinstance(d["layer_norm_eps"], int):
            d["layer_norm_eps"] = float(d["layer_norm_eps"])
        return cls(**d)


# Named presets; the CLI overrides single fields by name on top of one of these.
PRESETS: dict[str, GPTConfig] = {
    "default": GPTConfig(),  # ~1.4M parameters with the 65-character vocabulary
    "tiny": GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, d_model=16),  # tests
    "small": GPTConfig(block_size=256, n_layer=4, n_head=6, d_model=384),
}


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model, `{GPT-2 name: shape}`, in a fixed order.

    Linear weights are `(in, out)` as in GPT-2's Conv1D. `wte` is `(vocab_size, d_model)` and
    is also the output head (weight tying), so there is no separate `lm_head` tensor.
    """
    C, V, T = config.d_model, config.vocab_size, config.block_size
    shapes: dict[str, tuple[int, ...]] = {"wte": (V, C), "wpe": (T, C)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes[p + "ln_1.weight"] = (C,)
        shapes[p + "ln_1.bias"] = (C,)
        shapes[p + "attn.c_attn.weight"] = (C, 3 * C)  # q, k, v side by side
        shapes[p + "attn.c_attn.bias"] = (3 * C,)
        shapes[p + "attn.c_proj.weight"] = (C, C)
        shapes[p + "attn.c_proj.bias"] = (C,)
        shapes[p + "ln_2.weight"] = (C,)
        shapes[p + "ln_2.bias"] = (C,)
        shapes[p + "mlp.c_fc.weight"] = (C, 4 * C)
        shapes[p + "mlp.c_fc.bias"] = (4 * C,)
        shapes[p + "mlp.c_proj.weight"] = (4 * C, C)
        shapes[p + "mlp.c_proj.bias"] = (C,)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    return shapes


def num_params(config: GPTConfig) -> int:
    """Number of scalar parameters (the tied head counted once)."""
    total = 0
    for shape in param_shapes(config).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
