"""Model configuration and the one place where every parameter is named.

`param_shapes(config)` is the single list of parameters: initialisation, checkpoints, the
optimizer, gradient checks and quantization all iterate over it, so a tensor is named once.
Names and the `(in, out)` weight layout follow GPT-2 (and nanoGPT / HF transformers), so a
GPT-2-family checkpoint maps onto minitf name by name.

Limits. A size is refused before anything is allocated: `GPTConfig` itself refuses a model
of more than MAX_PARAMS parameters (counted in integers, `num_params`) or a vocabulary whose
ids do not fit int32, naming the field that makes it too large; `check_memory` refuses what
a run would allocate (minitf.tensors counts the bytes: training, inference, a checkpoint)
when it exceeds this machine's memory (`memory_limit`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

# The largest model minitf builds: 2**33 (8.6 billion) parameters, 34 GB of float32 weights,
# five times GPT-2 XL. Far beyond what a CPU trains, and it keeps every size computed from
# a config well inside int64.
MAX_PARAMS = 2**33
# Token ids are int32 (tokenizers, datasets, kernels).
MAX_VOCAB_SIZE = 2**31 - 1
# The largest BPE vocabulary asked of the tokenizer trainer: 2**24 ids fit a dataset's uint32
# and MAX_VOCAB_SIZE, are 300x GPT-2's 50257, and the `tokenizers` trainer handles them; it
# aborts the process (a failed allocation in Rust, no exception) near 2**31. With the other
# size limits, so that the flag check in cli.py does not depend on the tokenizer module.
MAX_BPE_VOCAB_SIZE = 2**24
SIZE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "d_model")


class SizeError(ValueError):
    """A size that minitf refuses before allocating anything."""


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool (True is a mistake, not a 1), a float or NaN."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (Python or numpy, NaN and inf included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Rule(NamedTuple):
    """What one setting allows, written once: the Python API raises with it
    (`f"top_p={v!r} is not allowed: it must be {rule.allowed}"`) and the command line's flag
    checks with it (minitf.cli.ruled, where argparse names the flag).

    allows: value -> bool (the value as the API receives it, e.g. a float from float(text)).
    allowed: what is allowed, in words after "must be", e.g. "a number in (0, 1]".
    """

    allows: Callable[[object], bool]
    allowed: str


def integer_at_least(low: int) -> Rule:
    """The Rule "an integer >= low" (`is_int`)."""
    return Rule(lambda v: is_int(v) and v >= low, f"an integer >= {low}")


def finite_number(test: Callable[[float], bool], allowed: str) -> Rule:
    """The Rule "a finite number `allowed`" (`is_real`, not NaN or inf, and `test`)."""
    return Rule(lambda v: is_real(v) and math.isfinite(v) and test(v), f"a finite number {allowed}")


# GPTConfig.dropout, and minitf.train's --dropout (minitf.cli.ruled)
DROPOUT = Rule(lambda v: is_real(v) and 0.0 <= v < 1.0, "a number in [0, 1)")


def num_params(config: GPTConfig) -> int:
    """Number of scalar parameters (the tied head counted once): `param_shapes` summed in
    closed form, in Python integers, exact for any size without building the shapes."""
    return _count_params(config.vocab_size, config.block_size, config.n_layer, config.d_model)


def _count_params(vocab_size: int, block_size: int, n_layer: int, d_model: int) -> int:
    C = d_model
    # c_attn 3C^2 + 3C, attn.c_proj C^2 + C, c_fc 4C^2 + 4C, mlp.c_proj 4C^2 + C, ln_1/ln_2 4C
    per_block = 12 * C * C + 13 * C
    return (vocab_size + block_size) * C + n_layer * per_block + 2 * C  # + wte, wpe, ln_f


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT-2-style decoder-only transformer.

    Raises:
        ValueError: a size is not a positive integer, `d_model` is not divisible by
            `n_head`, or `dropout` is outside [0, 1).
        SizeError (a ValueError): more than MAX_PARAMS parameters, or a vocab_size beyond
            the int32 token ids.
    """

    vocab_size: int = 65  # tokens; 65 = TinyShakespeare's characters
    block_size: int = 128  # context length: the most tokens the model attends over
    n_layer: int = 2  # number of stacked TransformerBlocks
    n_head: int = 4  # attention heads per block
    d_model: int = 240  # residual stream width (C); d_head = d_model // n_head = 60
    layer_norm_eps: float = 1e-5  # GPT-2's LayerNorm epsilon
    dropout: float = 0.0  # training only: probability of dropping, where GPT-2 drops

    def __post_init__(self) -> None:
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config {name}={value!r} must be a positive integer")
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise SizeError(f"config vocab_size={self.vocab_size} is more than {MAX_VOCAB_SIZE}: "
                            f"token ids are int32")
        n = num_params(self)
        if n > MAX_PARAMS:
            field = _largest_field(self)
            raise SizeError(
                f"config {field}={getattr(self, field)}: the model would have {n:,} parameters "
                f"({format_bytes(4 * n)} as float32), more than minitf's limit of "
                f"{MAX_PARAMS:,} (minitf.config.MAX_PARAMS)")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"config d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"allowed n_head values for d_model={self.d_model}: "
                f"{[h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]}"
            )
        # GPT-2 uses 1e-5 (others 1e-6 .. 1e-12): a variance floor, far below 1, never inf
        if not (isinstance(self.layer_norm_eps, float) and 0 < self.layer_norm_eps < 1):
            raise ValueError(f"config layer_norm_eps={self.layer_norm_eps!r} must be a finite "
                             f"float in (0, 1) (GPT-2: 1e-05)")
        if not DROPOUT.allows(self.dropout):
            raise ValueError(f"config dropout={self.dropout!r} must be {DROPOUT.allowed}")

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
        return cls(**d)  # an integer layer_norm_eps is refused: none is in (0, 1)


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


def _largest_field(config: GPTConfig) -> str:
    """The size that makes the model large: the field whose default value would shrink the
    parameter count the most (n_head changes no count)."""
    sizes = {k: getattr(config, k) for k in ("vocab_size", "block_size", "n_layer", "d_model")}
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    return min(sizes, key=lambda k: _count_params(**{**sizes, k: min(sizes[k], defaults[k])}))


# ----------------------------------------------------------------------------------------
# Memory: what a run may allocate


def memory_limit() -> int | None:
    """Bytes of memory this process may use: the machine's physical memory, or the memory
    limit of its control group (a container) when that is lower; None where the system
    does not say (then only MAX_PARAMS bounds a model)."""
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def check_memory(parts: dict[str, int], what: str, advice: str) -> None:
    """Refuse, before allocating, what needs more than `memory_limit()`.

    Args:
        parts: {what is counted: bytes}, e.g. {"parameters": ..., "activations": ...}.
        what: what would need it ("training", "the Engine").
        advice: which flag or field to lower.
    Raises:
        SizeError: one line with the total, its largest part and the limit.
    """
    total, limit = sum(parts.values()), memory_limit()
    if limit is not None and total > limit:
        shown = ", ".join(f"{name} {format_bytes(n)}" for name, n in
                          sorted(parts.items(), key=lambda kv: -kv[1]))
        raise SizeError(f"{what} needs at least {format_bytes(total)} ({total:,} bytes: {shown}), "
                        f"more than this machine's memory of {format_bytes(limit)}; {advice}")


def format_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units), exact below 1 kB."""
    for unit, size in (("EB", 10**18), ("PB", 10**15), ("TB", 10**12), ("GB", 10**9),
                       ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"
