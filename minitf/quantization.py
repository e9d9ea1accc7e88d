"""Post-training int8 quantization: symmetric, per output channel.

    qparams, report = quantize_model(params, config, scope="ffn")
    save_quantized(out_dir, qparams, checkpoint, Quantization("ffn", "w8a8"))
    qparams, report = quantize_model(params, config, scope="all", head=True)  # int8 wte too

The method (llama2.c's `runq.c` quantizes the same way, per group instead of per channel):
for a linear weight w (K, M) stored (in, out) as GPT-2 does, each output channel m (a column)
gets scale[m] = max_k |w[k, m]| / 127 and wq[k, m] = round-half-to-even(w[k, m] / scale[m])
clamped to [-127, 127]. Symmetric: no zero point, and -128 is never used, so negation cannot
overflow. Every element then comes back within scale/2: |w - wq * scale| <= scale / 2. A
channel whose scale is 0 or not a normal float32 (all zeros, or values so small that
max/127 underflows) is stored as zeros with scale 1.0: a defined result, never 0/0.

Scopes (minitf.tensors.SCOPES): "ffn" (default, what the design specifies) quantizes
`mlp.c_fc` and `mlp.c_proj` of every block, two thirds of the weights of a block; "all" also
`attn.c_attn` and `attn.c_proj`. `wte` and `wpe` stay float32 in both, see `quantize_model`,
unless `head=True` (`--int8-head`): then the tied wte becomes one int8 matrix with a scale
per row, the same rule applied along rows (`quantize_per_row`), used by the embedding (the
row of a token, dequantized) and by the head (logits[v] = scale[v] * (h . q[v])).
Modes, recorded in meta.json and used by `minitf.engine.load_engine`: "weight-only" (float
activations times int8 weights) or "w8a8" (activations quantized per token at run time,
int8 x int8 summed in int32); see `minitf.kernels.numpy_ref.matmul_int8`, the reference both
modes are defined by.

A quantized checkpoint holds `<name>.weight` int8 (K, M) and `<name>.weight_scale` float32
(M,) for each quantized linear layer, every other tensor float32 (`minitf.tensors.tensor_layout`),
with an int8 head `wte` int8 (V, C) and `wte_scale` float32 (V,), and meta.json
{"quantization": {"scope", "mode", "head", "method"}} ("head" absent: false, as in the
checkpoints written before it). What it costs (bytes, errors,
validation loss) is measured by minitf.quant_report; `python -m minitf.quantize` does both.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, save_checkpoint
from .config import GPTConfig, param_shapes
from .model import check_params
from .quant_report import tensor_report, totals
from .tensors import HEAD, Quantization, scale_name, tensor_layout

METHOD = "symmetric per-output-channel int8, round-half-to-even"
HEAD_METHOD = "symmetric per-row int8 (one scale per vocabulary entry), round-half-to-even"
QMAX = 127  # symmetric int8: [-127, 127]


def _finite_float32_weight(w, caller: str, layout: str) -> np.ndarray:
    """w as a float32 2-D array, or ValueError naming `caller`, the expected `layout` and what
    was given: w must be non-empty, 2-D, floating point and finite."""
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"{caller} needs a non-empty 2-D float {layout} weight, got "
                         f"{w.dtype} {w.shape}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        bad = np.count_nonzero(~np.isfinite(w))
        raise ValueError(f"{caller}: the weight has {bad} NaN/inf values; quantize "
                         "a finite model")
    return w


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 quantization: w[:, m] ~= wq[:, m] * scale[m].

    w is rounded to float32 first (the dtype the engine runs in); scale = max|w[:, m]| / 127
    in float32, and wq = round-half-to-even(w / scale) clamped to [-127, 127]. The quotient is
    formed in float64: for two float32 numbers it is then exact enough that rounding it gives
    the correctly rounded integer (a true quotient is either exactly k + 1/2 or at least
    2^-25 from it, and float64 errs by < 2^-46 here), so |w - wq * scale| <= scale / 2 holds
    exactly, ties included. A channel whose scale is 0 or subnormal gets wq = 0, scale = 1.0.

    Args:
        w: (K, M) float weight, input axis first as GPT-2 stores it; finite.
    Returns:
        wq: (K, M) int8; scale: (M,) float32, every entry a normal float > 0.
    Raises:
        ValueError: w is not 2-D, is empty, or holds NaN/inf.
    """
    return _quantize_columns(_finite_float32_weight(w, "quantize_per_channel", "(K, M)"))


def _quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule of `quantize_per_channel` on a checked (K, M) float32 w: (K, M) int8, (M,)
    float32."""
    amax = np.max(np.abs(w), axis=0)  # (M,) float32
    scale = amax / np.float32(QMAX)  # (M,) float32
    usable = scale >= np.finfo(np.float32).tiny  # (M,) a normal float > 0
    scale = np.where(usable, scale, np.float32(1.0)).astype(np.float32)  # (M,)
    q = np.rint(w.astype(np.float64) / scale.astype(np.float64))  # (K, M); rint: half to even
    q = np.clip(q, -QMAX, QMAX)  # (K, M)
    wq = np.where(usable, q, 0.0).astype(np.int8)  # (K, M)
    return wq, scale


def quantize_per_row(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization: w[v, :] ~= wq[v, :] * scale[v], for the tied
    head, whose output channels are wte's rows: `quantize_per_channel` of w.T, transposed
    back (the same rule, ties and all-zero rows included).

    Args:
        w: (V, C) float weight; finite.
    Returns:
        wq: (V, C) int8, C-contiguous; scale: (V,) float32, every entry a normal float > 0.
    Raises:
        ValueError: w is not 2-D, is empty, or holds NaN/inf.
    """
    w = _finite_float32_weight(w, "quantize_per_row", "(V, C)")  # (V, C)
    wq_t, scale = _quantize_columns(w.T)  # (C, V), (V,)
    return np.ascontiguousarray(wq_t.T), scale  # (V, C)


def dequantize(wq: np.ndarray, scale: np.ndarray, dtype=np.float32) -> np.ndarray:
    """wq * scale per output channel: (K, M) int8 and (M,) float32 -> (K, M) `dtype`.

    In float64 the product is exact (an 8-bit times a 24-bit significand); in float32 it is
    rounded once. The engine never calls this: its int8 kernels apply the scale per output.
    """
    wq, scale = np.asarray(wq), np.asarray(scale)
    if wq.dtype != np.int8 or wq.ndim != 2 or scale.shape != (wq.shape[1],):
        raise ValueError(f"dequantize needs wq int8 (K, M) and scale (M,), got {wq.dtype} "
                         f"{wq.shape} and {scale.shape}")
    return wq.astype(dtype) * scale.astype(dtype)  # (K, M)


def quantize_model(params: dict[str, np.ndarray], config: GPTConfig, scope: str = "ffn",
                   head: bool = False):
    """Quantize the linear weights in `scope` of a float model, and with `head` the tied wte.

    By default the tied `wte` (the embedding lookup and, transposed, the output head) and
    `wpe` stay float32. Per-channel int8 needs one channel axis, and wte has two: the head's
    output channels are wte's rows (one scale per vocabulary entry), the embedding's its
    columns. In the default model wte (65 x 240) and wpe (128 x 240) are 3% of the
    parameters and the head's matmul has only 65 outputs, so there is little to gain. At
    GPT-2 small's size (V = 50,257) the head is 38.6M parameters, 64% of what a W8A8 decode
    step reads with a float32 head: `head=True` stores wte as ONE int8 matrix with a scale
    per row (`quantize_per_row`), which both uses read, so the tying stays (one matrix, one
    copy on disk). The embedding then looks up a dequantized row, q[token] * scale[token]
    (each value within scale/2 of the float one, as for any quantized weight). Biases,
    LayerNorms and wpe stay float32.

    Args:
        params: {GPT-2 name: float array} with exactly the names and shapes of
            `param_shapes(config)`; finite.
        scope: "ffn" (mlp.c_fc, mlp.c_proj of every block) or "all" (also attn.c_attn,
            attn.c_proj).
        head: also quantize wte, per row (True), or keep it float32 (False).
    Returns:
        (qparams, report): qparams in `tensor_layout(config, Quantization(scope, head=head))`
        order, `<name>.weight` int8 (K, M) plus `<name>.weight_scale` float32 (M,) for the
        quantized layers (with `head`, `wte` int8 (V, C) plus `wte_scale` float32 (V,)), all
        else float32. report: {"scope", "head", "method", "tensors", "totals"}, see
        minitf.quant_report.tensor_report and totals.
    Raises:
        ValueError: an unknown scope, a head that is not a bool, a model that is already
            quantized, or params that do not match the config.
    """
    names = Quantization(scope, head=head).weight_names(config)  # validates scope and head
    if any(np.asarray(p).dtype == np.int8 for p in params.values()) or \
            any(k.endswith(scale_name(".weight")) for k in params):
        raise ValueError("the model is already quantized (it has int8 weights); quantize the "
                         "float32 model it came from")
    check_params(params, config)
    qparams, tensors = {}, []
    for name in param_shapes(config):
        w = params[name]
        if name not in names:
            qparams[name] = np.ascontiguousarray(w, dtype=np.float32)
            continue
        if name == HEAD:  # per row; reported as its transpose, whose channels are columns
            wq, scale = quantize_per_row(w)
            report = tensor_report(name, w.T, wq.T, scale)
            report["shape"] = list(w.shape)
        else:
            wq, scale = quantize_per_channel(w)
            report = tensor_report(name, w, wq, scale)
        qparams[name], qparams[scale_name(name)] = wq, scale
        tensors.append(report)
    report = {"scope": scope, "head": head, "method": METHOD + (f"; wte: {HEAD_METHOD}" if head else ""),
              "tensors": tensors, "totals": totals(config, qparams, tensors)}
    return qparams, report


def quantized_meta(quant: Quantization, source: Checkpoint, command: str | None = None) -> dict:
    """meta.json of a model quantized from the checkpoint `source`."""
    method = METHOD + (f"; wte: {HEAD_METHOD}" if quant.head else "")
    return {
        "quantization": {**quant.to_meta(), "method": method},
        "quantized_from": str(source.path.resolve()),
        "command": command,
        "source_meta": source.meta,
    }


def save_quantized(out: str | os.PathLike, qparams: dict[str, np.ndarray], source: Checkpoint,
                   quant: Quantization, command: str | None = None, extra=None) -> Path:
    """Write the quantized model `qparams` (from `quantize_model`) of the checkpoint `source`
    as a checkpoint directory `out` (atomically, see minitf.checkpoint) with its config,
    tokenizer and `quantized_meta`; `extra` as for `save_checkpoint` (reports, pictures).
    Returns the directory.

    Raises:
        CheckpointError: qparams do not match the quantized layout, or `out` cannot be
            replaced.
    """
    meta = quantized_meta(quant, source, command)
    return save_checkpoint(out, qparams, source.config, source.tokenizer, meta=meta,
                           layout=tensor_layout(source.config, quant), extra=extra)
