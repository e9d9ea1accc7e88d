"""The one description of a model's tensors, and the one check of a set of tensors against it.

    layout = tensor_layout(config)                                # the float model
    layout = tensor_layout(config, Quantization("ffn", "w8a8"))   # an int8 model
    check_tensors(params, layout, "GPT", noun="parameter")        # names, shapes, dtypes

A layout is `{name: (shape, dtype)}` in a fixed order. Names and shapes come from
`config.param_shapes`; dtype None means "the model's float dtype" (float16, 32 or 64, one for
all of them), an explicit dtype is stored as it is. Quantization replaces each linear weight
of its scope (K, M) by int8 and adds its per-output-channel float32 scale
`<name>_scale` (M,), e.g. `h.0.mlp.c_fc.weight` and `h.0.mlp.c_fc.weight_scale`. With an
int8 head (`Quantization.head`) the tied `wte` (V, C) is int8 too, one matrix for the
embedding and the head, with one float32 scale per row (per vocabulary entry) `wte_scale`
(V,): row v is wte[v] * wte_scale[v].

Everything that holds a model goes through these two functions: the training model
(`minitf.model.GPT`), the inference engine, checkpoints (save and load) and quantization. A
new kind of tensor (int4, an int8 head) is a change here, not in each of them.

The byte counts of the limits (minitf.config.check_memory) are here too, computed in
integers from a config before anything is allocated: `layout_bytes`, `training_bytes`,
`inference_bytes`, `checkpoint_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import GPTConfig, num_params, param_shapes
from .kernels.numpy_ref import INT8_MODES

# The linear layers of a block, in the order they run.
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Which linear layers a quantization scope stores in int8.
SCOPES = {
    "ffn": ("mlp.c_fc", "mlp.c_proj"),  # W1, W2 of the design
    "all": LINEARS,
}
FLOAT_DTYPES = (np.float16, np.float32, np.float64)
HEAD = "wte"  # the tied embedding and output head, int8 with per-row scales under `head`

# {tensor name: (shape, dtype)}; dtype None means "the model's float dtype".
Layout = dict[str, tuple[tuple[int, ...], "np.dtype | None"]]


def scale_name(weight_name: str) -> str:
    """The name of an int8 weight's per-channel scale: "h.0.mlp.c_fc.weight_scale"."""
    return weight_name + "_scale"


@dataclass(frozen=True)
class Quantization:
    """Which linear weights are stored in int8 (`scope`) and how they run (`mode`), as
    meta.json records it under "quantization".

    scope: "ffn" (mlp.c_fc and mlp.c_proj of every block) or "all" (every linear layer).
    mode: "weight-only" (float activations times int8 weights) or "w8a8" (activations
        quantized per token too); see minitf.kernels.numpy_ref.matmul_int8.
    head: the tied `wte` is int8 too, with a scale per row (`wte_scale`), and runs in
        `mode` as the linear layers do (minitf.kernels.numpy_ref.matmul_nt_int8); False:
        wte stays float32 (every checkpoint written before the option).
    Raises:
        ValueError: an unknown scope or mode, or a head that is not a bool.
    """

    scope: str = "ffn"
    mode: str = "weight-only"
    head: bool = False

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"quantization scope {self.scope!r} is unknown; allowed: "
                             f"{', '.join(SCOPES)}")
        if self.mode not in INT8_MODES:
            raise ValueError(f"quantization mode {self.mode!r} is unknown; allowed: "
                             f"{', '.join(INT8_MODES)}")
        if not isinstance(self.head, bool):
            raise ValueError(f"quantization head={self.head!r} must be true or false (an int8 "
                             "tied embedding and head, or a float32 one)")

    @classmethod
    def from_meta(cls, meta: dict | None) -> "Quantization | None":
        """The quantization meta.json describes; None for a float model.

        Raises:
            ValueError: "quantization" is not an object, or names an unknown scope or mode.
        """
        quant = (meta or {}).get("quantization")
        if quant is None:
            return None
        if not isinstance(quant, dict):
            raise ValueError(f'"quantization" must be an object, got {quant!r}')
        # "head" is absent from the checkpoints written before the int8 head: float32 head
        return cls(quant.get("scope"), quant.get("mode"), quant.get("head", False))

    def to_meta(self) -> dict:
        """What meta.json records under "quantization" (with the method, see
        minitf.quantization.quantized_meta)."""
        return {"scope": self.scope, "mode": self.mode, "head": self.head}

    def describe(self) -> str:
        """For messages and reports: "scope ffn, weight-only, float32 head"."""
        return f"scope {self.scope}, {self.mode}, {'int8' if self.head else 'float32'} head"

    def weight_names(self, config: GPTConfig) -> list[str]:
        """The int8 weights, e.g. ["h.0.mlp.c_fc.weight", ...], in parameter order; "wte"
        last with an int8 head."""
        return quantized_weight_names(config, self.scope) + ([HEAD] if self.head else [])


def quantized_weight_names(config: GPTConfig, scope: str = "ffn") -> list[str]:
    """The weights `scope` quantizes, e.g. ["h.0.mlp.c_fc.weight", ...], in parameter order.

    Raises:
        ValueError: an unknown scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"quantization scope {scope!r} is unknown; allowed: {', '.join(SCOPES)}")
    # block by block, and within a block in LINEARS order: the order of param_shapes
    return [f"h.{i}.{lin}.weight" for i in range(config.n_layer) for lin in SCOPES[scope]]


def tensor_layout(config: GPTConfig, quant: Quantization | None = None) -> Layout:
    """Every tensor of a model, `{name: (shape, dtype)}`, in `param_shapes(config)` order.

    Without `quant`: every parameter with dtype None (the model's float dtype). With it: the
    weights of its scope as int8 (K, M), each followed by its `<name>_scale` float32 (M,),
    and with `quant.head` wte as int8 (V, C) followed by `wte_scale` float32 (V,), a scale
    per row: the head's output channels are wte's rows.
    """
    int8 = set(quant.weight_names(config)) if quant is not None else set()
    layout: Layout = {}
    for name, shape in param_shapes(config).items():
        if name in int8:
            layout[name] = (shape, np.dtype(np.int8))  # (K, M), or the head's (V, C)
            channels = shape[0] if name == HEAD else shape[1]  # rows of wte, columns of a linear
            layout[scale_name(name)] = ((channels,), np.dtype(np.float32))  # (M,) or (V,)
        else:
            layout[name] = (shape, None)
    return layout


def checkpoint_layout(config: GPTConfig, meta: dict | None) -> Layout:
    """The layout of a checkpoint whose meta.json is `meta`: float, or quantized as its
    "quantization" entry says. Pass it as `load_checkpoint(dir, layout=checkpoint_layout)`.

    Raises:
        ValueError: a malformed "quantization" entry (see `Quantization.from_meta`).
    """
    return tensor_layout(config, Quantization.from_meta(meta))


def optimizer_layout(layout: Layout) -> Layout:
    """AdamW's moments of every tensor of `layout`: "m.<name>" then "v.<name>", float."""
    return {f"{moment}.{name}": (shape, None) for moment in ("m", "v")
            for name, (shape, _) in layout.items()}


def infer_quantization(params: dict[str, np.ndarray], config: GPTConfig,
                       mode: str = "weight-only") -> Quantization | None:
    """The quantization whose int8 weights are exactly the int8 arrays of `params` (None if
    there are none): how the engine tells a quantized model from its arrays.

    Raises:
        ValueError: the int8 arrays are not the weights of one scope, or an unknown mode.
    """
    int8 = sorted(name for name, a in params.items() if getattr(a, "dtype", None) == np.int8)
    if not int8:
        return None
    head = HEAD in int8
    linears = [name for name in int8 if name != HEAD]
    for scope in SCOPES:
        if sorted(quantized_weight_names(config, scope)) == linears:
            return Quantization(scope, mode, head)
    scopes = "; ".join(f"{scope}: {', '.join(linears)}" for scope, linears in SCOPES.items())
    raise ValueError(f"int8 tensors {_names(int8)} are not the weights of a quantization "
                     f"scope ({scopes}; with an int8 head, wte too)")


def check_tensors(
    tensors: dict[str, np.ndarray],
    layout: Layout,
    where: str,
    *,
    noun: str = "tensor",
    finite: bool = True,
    error: type[ValueError] = ValueError,
) -> str:
    """Check that `tensors` are exactly the tensors of `layout`.

    Names (none missing, none extra), shapes, dtypes (an explicit one exactly; None: one of
    float16/32/64, the same for all such tensors) and, with `finite`, that no float value is
    NaN or inf.

    Args:
        tensors: {name: array}.
        layout: what they must be, from `tensor_layout` (or any {name: (shape, dtype)}).
        where: the start of every message, e.g. the file being read.
        noun: what the messages call a tensor ("tensor", "parameter").
        finite: also refuse NaN and inf.
        error: the exception class to raise (a ValueError subclass such as CheckpointError).
    Returns:
        The name of the float dtype of the tensors whose layout dtype is None ("none" if
        there are none).
    Raises:
        `error`: one line naming the first problem found.
    """
    missing = [k for k in layout if k not in tensors]
    extra = sorted(k for k in tensors if k not in layout)
    if missing:
        raise error(f"{where}: missing {noun}s {_names(missing)}")
    if extra:
        raise error(f"{where}: unexpected {noun}s {_names(extra)} ({noun}s not in the config)")
    float_dtypes: set[str] = set()
    for name, (shape, dtype) in layout.items():
        a = tensors[name]
        if not isinstance(a, np.ndarray):
            raise error(f"{where}: {noun} {name} is a {type(a).__name__}, not an ndarray")
        if tuple(a.shape) != tuple(shape):
            raise error(f"{where}: {noun} {name} has shape {a.shape}, expected {tuple(shape)}")
        if dtype is None:
            if a.dtype not in FLOAT_DTYPES:
                raise error(f"{where}: {noun} {name} has dtype {a.dtype}, expected float16/32/64")
            float_dtypes.add(a.dtype.name)
        elif a.dtype != np.dtype(dtype):
            raise error(f"{where}: {noun} {name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        if finite and a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int(np.count_nonzero(~np.isfinite(a)))
            raise error(f"{where}: {noun} {name} has {bad} NaN/inf values of {a.size}")
    if len(float_dtypes) > 1:
        raise error(f"{where}: float {noun}s mix dtypes {sorted(float_dtypes)}; use one")
    return float_dtypes.pop() if float_dtypes else "none"


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------
# Byte counts for the limits: integers from the config, nothing allocated


def layout_bytes(layout: Layout, float_itemsize: int = 4) -> int:
    """Bytes of the tensors of `layout`, its dtype-None tensors `float_itemsize` bytes each."""
    total = 0
    for shape, dtype in layout.values():
        n = 1
        for s in shape:
            n *= s
        total += n * (np.dtype(dtype).itemsize if dtype is not None else float_itemsize)
    return total


def training_bytes(config: GPTConfig, batch_size: int, itemsize: int = 4) -> dict[str, int]:
    """A lower bound of what training holds, {part: bytes}, values of `itemsize` bytes:
    the parameters, their gradients and AdamW's two moments (P values each), and the
    activations the backward pass keeps for a batch of B windows of T = block_size tokens:
    per block the inputs of its two LayerNorms and four linear layers, q/k/v and the MLP's
    GELU input (16 B T C values) and the attention weights (B NH T^2), and the head's logits
    and their gradient (2 B T V)."""
    P = num_params(config)
    B, T, C, NH, V = batch_size, config.block_size, config.d_model, config.n_head, config.vocab_size
    activations = config.n_layer * (16 * B * T * C + B * NH * T * T) + 2 * B * T * V
    return {"parameters": P * itemsize, "gradients": P * itemsize,
            "AdamW moments": 2 * P * itemsize,
            f"activations of {B} x {T} tokens": activations * itemsize}


def inference_bytes(config: GPTConfig, quant: Quantization | None = None,
                    rows: int = 1) -> dict[str, int]:
    """A lower bound of what an Engine generating `rows` sequences together allocates,
    {part: bytes}: a copy of the weights (the fused path packs them), per row the KV cache
    and its transposed copy (2 x 2 L T C float32), a logits buffer (V float32) and its
    window of token ids (T Python ints, 8-byte pointers at least), and a full-context
    prefill: attention weights (NH T^2), the activations of a block (10 T C) and the logits
    (T V), float32."""
    L, T, C, NH, V = (config.n_layer, config.block_size, config.d_model, config.n_head,
                      config.vocab_size)
    per_row = "" if rows == 1 else f" of {rows:,} sequences"
    return {"weights": layout_bytes(tensor_layout(config, quant)),
            "KV cache" + ("s" + per_row if per_row else ""): 2 * 2 * L * T * C * 4 * rows,
            "logits and token windows" + per_row: (V * 4 + T * 8) * rows,
            f"a prefill of {T} tokens": (NH * T * T + 10 * T * C + T * V) * 4}


def checkpoint_bytes(config: GPTConfig, itemsize: int = 4, optimizer: bool = True) -> int:
    """Bytes of a checkpoint's tensors: the weights, and with `optimizer` AdamW's moments."""
    return num_params(config) * itemsize * (3 if optimizer else 1)
