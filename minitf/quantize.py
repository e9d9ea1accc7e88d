"""Post-training int8 quantization: symmetric, per output channel, with its cost measured.

    python -m minitf.quantize                                   # the shipped model, FFN only
    python -m minitf.quantize --model runs/char --scope all --mode w8a8

The method (llama2.c's `runq.c` quantizes the same way, per group instead of per channel):
for a linear weight w (K, M) stored (in, out) as GPT-2 does, each output channel m (a column)
gets scale[m] = max_k |w[k, m]| / 127 and wq[k, m] = round-half-to-even(w[k, m] / scale[m])
clamped to [-127, 127]. Symmetric: no zero point, and -128 is never used, so negation cannot
overflow. Every element then comes back within scale/2: |w - wq * scale| <= scale / 2. A
channel whose scale is 0 or not a normal float32 (all zeros, or values so small that
max/127 underflows) is stored as zeros with scale 1.0: a defined result, never 0/0.

Scopes: "ffn" (default, what the design specifies) quantizes `mlp.c_fc` and `mlp.c_proj` of
every block, two thirds of the weights of a block; "all" also `attn.c_attn` and `attn.c_proj`.
`wte` and `wpe` stay float32 in both, see `quantize_model`. Modes, recorded in meta.json and
used by `minitf.engine.load_engine`: "weight-only" (float activations times int8 weights) or
"w8a8" (activations quantized per token at run time, int8 x int8 summed in int32); see
`minitf.kernels.numpy_ref.matmul_int8`, the reference both modes are defined by.

A quantized checkpoint holds `<name>.weight` int8 (K, M) and `<name>.weight_scale` float32
(M,) for each quantized linear layer, every other tensor float32, and meta.json
{"quantization": {"scope", "mode", "method"}}; `quantized_layout` tells `load_checkpoint`
what to expect, so a wrong shape or dtype is refused with a CheckpointError.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, Layout, default_layout
from .config import GPTConfig, param_shapes
from .engine import INT8_MODES, LINEARS

SCOPES = {
    "ffn": ("mlp.c_fc", "mlp.c_proj"),  # W1, W2 of the design
    "all": LINEARS,  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
}
FFN = SCOPES["ffn"]
METHOD = "symmetric per-output-channel int8, round-half-to-even"
QMAX = 127  # symmetric int8: [-127, 127]
REPORT_FILE = "quant_report.json"
PLOT_FILE = "quant_error.png"


# ----------------------------------------------------------------------------------------
# The method


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
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"quantize_per_channel needs a non-empty 2-D float (K, M) weight, got "
                         f"{w.dtype} {w.shape}")
    w = w.astype(np.float32, copy=False)  # (K, M)
    if not np.isfinite(w).all():
        raise ValueError(f"quantize_per_channel: the weight has {np.count_nonzero(~np.isfinite(w))} "
                         "NaN/inf values; quantize a finite model")
    amax = np.max(np.abs(w), axis=0)  # (M,) float32
    scale = amax / np.float32(QMAX)  # (M,) float32
    usable = scale >= np.finfo(np.float32).tiny  # (M,) a normal float > 0
    scale = np.where(usable, scale, np.float32(1.0)).astype(np.float32)  # (M,)
    q = np.rint(w.astype(np.float64) / scale.astype(np.float64))  # (K, M); rint: half to even
    q = np.clip(q, -QMAX, QMAX)  # (K, M)
    wq = np.where(usable, q, 0.0).astype(np.int8)  # (K, M)
    return wq, scale


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


def roundtrip_error_in_scales(w: np.ndarray, wq: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(w - wq * scale) / scale, float64 (K, M): every entry lies in [-0.5, 0.5]."""
    s = scale.astype(np.float64)  # (M,)
    return (w.astype(np.float32).astype(np.float64) - wq.astype(np.float64) * s) / s  # (K, M)


# ----------------------------------------------------------------------------------------
# A whole model


def quantized_weight_names(config: GPTConfig, scope: str = "ffn") -> list[str]:
    """The weights `scope` quantizes, e.g. ["h.0.mlp.c_fc.weight", ...], in param order."""
    if scope not in SCOPES:
        raise ValueError(f"quantization scope {scope!r} is unknown; allowed: {', '.join(SCOPES)}")
    return [n for n in param_shapes(config)
            if n.endswith(".weight") and n[: -len(".weight")].split(".", 2)[-1] in SCOPES[scope]]


def _linear_weight_names(config: GPTConfig, linears=LINEARS) -> list[str]:
    return [f"h.{i}.{lin}.weight" for i in range(config.n_layer) for lin in linears]


def quantize_model(params: dict[str, np.ndarray], config: GPTConfig, scope: str = "ffn"):
    """Quantize the linear weights in `scope` of a float model.

    The tied `wte` (the embedding lookup and, transposed, the output head) and `wpe` stay
    float32. Per-channel int8 needs one channel axis, and wte has two: the head's output
    channels are wte's rows (one scale per vocabulary entry), the embedding's are its columns
    (one per d_model feature), so one set of scales serves one use badly; a second, int8
    copy for the head would undo the weight tying the design keeps ("one matrix, one copy
    on disk"). And there is little to gain: in the default model wte (65 x 240) and wpe
    (128 x 240) are 3% of the parameters and the head's matmul has only 65 outputs, while the
    linear layers hold 96% (the FFN alone 64%). Biases and LayerNorms stay float32 too.

    Args:
        params: {GPT-2 name: float array} with exactly the names and shapes of
            `param_shapes(config)`; finite.
        scope: "ffn" (mlp.c_fc, mlp.c_proj of every block) or "all" (also attn.c_attn,
            attn.c_proj).
    Returns:
        (qparams, report): qparams in `quantized_layout` order, `<name>.weight` int8 (K, M)
        plus `<name>.weight_scale` float32 (M,) for the quantized layers, all else float32.
        report: {"scope", "method", "tensors": [per quantized tensor: name, shape,
        float32_bytes, int8_bytes, scale_bytes, ratio, max_abs_error, mean_abs_error,
        max_error_half_scales (max |error| / (scale/2), <= 1), zero_channels], "totals":
        {"ffn", "linear", "quantized", "model": bytes as float32 and as stored, ratios,
        errors}}.
    Raises:
        ValueError: an unknown scope, a model that is already quantized, or params that do
            not match the config.
    """
    from .model import check_params

    names = quantized_weight_names(config, scope)  # validates scope
    if any(np.asarray(p).dtype == np.int8 for p in params.values()) or \
            any(k.endswith(".weight_scale") for k in params):
        raise ValueError("the model is already quantized (it has int8 weights); quantize the "
                         "float32 model it came from")
    check_params(params, config)
    qparams, tensors = {}, []
    for name in param_shapes(config):
        w = params[name]
        if name not in names:
            qparams[name] = np.ascontiguousarray(w, dtype=np.float32)
            continue
        wq, scale = quantize_per_channel(w)
        qparams[name], qparams[name + "_scale"] = wq, scale
        err = roundtrip_error_in_scales(w, wq, scale) * scale.astype(np.float64)  # (K, M)
        half = scale.astype(np.float64) / 2  # (M,)
        tensors.append({
            "name": name,
            "shape": list(w.shape),
            "float32_bytes": int(w.size * 4),
            "int8_bytes": int(wq.nbytes),
            "scale_bytes": int(scale.nbytes),
            "ratio": w.size * 4 / (wq.nbytes + scale.nbytes),
            "max_abs_error": float(np.abs(err).max()),
            "mean_abs_error": float(np.abs(err).mean()),
            "max_error_half_scales": float((np.abs(err) / half).max()),
            "zero_channels": int(np.count_nonzero(~wq.any(axis=0))),
        })
    report = {"scope": scope, "method": METHOD, "tensors": tensors,
              "totals": _totals(config, qparams, tensors)}
    return qparams, report


def _group(names, qparams, by_name) -> dict:
    """Bytes of a group of weights as float32 and as stored, and the errors of its int8 part."""
    f32 = int8 = scales = kept = 0
    for n in names:
        if n in by_name:
            t = by_name[n]
            f32, int8, scales = f32 + t["float32_bytes"], int8 + t["int8_bytes"], scales + t["scale_bytes"]
        else:
            f32 += qparams[n].size * 4
            kept += qparams[n].size * 4
    stored = int8 + scales + kept
    q = [by_name[n] for n in names if n in by_name]
    return {
        "tensors": len(names),
        "quantized_tensors": len(q),
        "float32_bytes": f32,
        "stored_bytes": stored,  # int8 + scales + what stayed float32
        "int8_bytes": int8,
        "scale_bytes": scales,
        "float32_kept_bytes": kept,
        "ratio": f32 / stored if stored else None,
        "ratio_without_scales": f32 / (stored - scales) if stored - scales else None,
        "max_abs_error": max((t["max_abs_error"] for t in q), default=None),
        "mean_abs_error": (sum(t["mean_abs_error"] * math.prod(t["shape"]) for t in q)
                           / sum(math.prod(t["shape"]) for t in q)) if q else None,
    }


def _totals(config: GPTConfig, qparams: dict, tensors: list[dict]) -> dict:
    by_name = {t["name"]: t for t in tensors}
    ffn = _linear_weight_names(config, FFN)
    return {
        "ffn": _group(ffn, qparams, by_name),
        "ffn_one_block": _group(ffn[: len(FFN)], qparams, by_name),
        "linear": _group(_linear_weight_names(config), qparams, by_name),
        "quantized": _group(list(by_name), qparams, by_name),
        "model": _group(list(param_shapes(config)), qparams, by_name),
    }


def quantized_layout(config: GPTConfig, meta: dict) -> Layout:
    """The checkpoint layout {name: (shape, dtype)} that meta.json describes.

    Without a "quantization" entry: the float layout (`default_layout`). With one: the
    quantized weights of its scope as int8 (K, M), each followed by `<name>_scale` float32
    (M,), every other tensor float. Use as `load_checkpoint(dir, layout=quantized_layout)`.

    Raises:
        CheckpointError: the "quantization" entry is not an object, or names an unknown scope
            or mode.
    """
    quant = (meta or {}).get("quantization")
    if quant is None:
        return default_layout(config)
    if not isinstance(quant, dict):
        raise CheckpointError(f'meta.json: "quantization" must be an object, got {quant!r}')
    scope, mode = quant.get("scope"), quant.get("mode")
    if scope not in SCOPES:
        raise CheckpointError(f"meta.json: quantization scope {scope!r} is unknown; allowed: "
                              f"{', '.join(SCOPES)}")
    if mode not in INT8_MODES:
        raise CheckpointError(f"meta.json: quantization mode {mode!r} is unknown; allowed: "
                              f"{', '.join(INT8_MODES)}")
    names = set(quantized_weight_names(config, scope))
    layout: Layout = {}
    for name, shape in param_shapes(config).items():
        if name in names:
            layout[name] = (shape, np.dtype(np.int8))  # (K, M)
            layout[name + "_scale"] = ((shape[1],), np.dtype(np.float32))  # (M,)
        else:
            layout[name] = (shape, None)
    return layout


# ----------------------------------------------------------------------------------------
# Report: files, table, plot


def safetensors_tensor_bytes(path: str | os.PathLike) -> dict[str, int]:
    """{tensor name: bytes of its data} read from a safetensors file's header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # header length, then the header's JSON
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
            if k != "__metadata__"}


def measure_files(source_file: Path, int8_file: Path, config: GPTConfig) -> dict:
    """File sizes of the two model.safetensors and the FFN weights' bytes in each."""
    src, q = safetensors_tensor_bytes(source_file), safetensors_tensor_bytes(int8_file)
    ffn = _linear_weight_names(config, FFN)
    src_ffn = sum(src[n] for n in ffn)
    q_ffn = sum(q[n] + q.get(n + "_scale", 0) for n in ffn)
    q_ffn_scales = sum(q.get(n + "_scale", 0) for n in ffn)
    return {
        "source_model_file": str(source_file),
        "source_model_file_bytes": source_file.stat().st_size,
        "int8_model_file": str(int8_file),
        "int8_model_file_bytes": int8_file.stat().st_size,
        "file_ratio": source_file.stat().st_size / int8_file.stat().st_size,
        "ffn_bytes_in_source_file": src_ffn,
        "ffn_bytes_in_int8_file": q_ffn,  # int8 weights + their scales
        "ffn_scale_bytes_in_int8_file": q_ffn_scales,
        "ffn_ratio_in_file": src_ffn / q_ffn,
        "ffn_ratio_in_file_without_scales": src_ffn / (q_ffn - q_ffn_scales),
    }


def format_report(report: dict) -> str:
    """The report as a plain-text table."""
    def b(n):
        return f"{n:,}"

    rows = [f"{'tensor':<24} {'shape':>11} {'float32 B':>11} {'int8 + scales B':>17} {'ratio':>6} "
            f"{'max|err|':>9} {'mean|err|':>9} {'max|err|/(s/2)':>14}"]
    for t in report["tensors"]:
        rows.append(f"{t['name']:<24} {'x'.join(map(str, t['shape'])):>11} {b(t['float32_bytes']):>11} "
                    f"{b(t['int8_bytes']) + ' + ' + b(t['scale_bytes']):>17} {t['ratio']:>5.2f}x "
                    f"{t['max_abs_error']:>9.2e} {t['mean_abs_error']:>9.2e} {t['max_error_half_scales']:>14.4f}")
    rows.append("")
    rows.append(f"{'totals':<30} {'float32 B':>11} {'stored B':>11} {'of which scales':>15} "
                f"{'ratio':>6} {'w/o scales':>10}")
    labels = {"ffn_one_block": "FFN weights, one block", "ffn": "FFN weights, all blocks",
              "linear": "all linear weights", "model": "all parameters"}
    for key, label in labels.items():
        g = report["totals"][key]
        rows.append(f"{label:<30} {b(g['float32_bytes']):>11} {b(g['stored_bytes']):>11} "
                    f"{b(g['scale_bytes']):>15} {g['ratio']:>5.2f}x {g['ratio_without_scales']:>9.2f}x")
    f = report.get("files")
    if f:
        rows.append(f"{'model.safetensors (measured)':<30} {b(f['source_model_file_bytes']):>11} "
                    f"{b(f['int8_model_file_bytes']):>11} {'':>15} {f['file_ratio']:>5.2f}x")
        rows.append(f"{'FFN weights in the files':<30} {b(f['ffn_bytes_in_source_file']):>11} "
                    f"{b(f['ffn_bytes_in_int8_file']):>11} {b(f['ffn_scale_bytes_in_int8_file']):>15} "
                    f"{f['ffn_ratio_in_file']:>5.2f}x {f['ffn_ratio_in_file_without_scales']:>9.2f}x")
    ev = report.get("evaluation")
    if ev:
        rows.append("")
        rows.append(f"validation: {ev['windows']} windows, {ev['tokens']:,} tokens, {ev['chars']:,} chars "
                    f"(backend {ev['backend']})")
        rows.append(f"{'model':<22} {'loss (nats/token)':>17} {'perplexity':>11} {'bits/char':>10}")
        for key, label in (("float32", "float32"), ("int8", f"int8 {report['scope']} {report['mode']}")):
            m = ev[key]
            rows.append(f"{label:<22} {m['loss']:>17.4f} {m['perplexity']:>11.4f} {m['bits_per_char']:>10.4f}")
        d = ev["diff_percent"]
        rows.append(f"{'difference':<22} {d['loss']:>+16.4f}% {d['perplexity']:>+10.4f}% {d['bits_per_char']:>+9.4f}%")
    return "\n".join(rows)


def plot_quant_error(errors: dict[str, np.ndarray], path, title: str) -> Path:
    """quant_error.png: one histogram per quantized tensor (a row per block) of the round-trip
    error divided by its channel's scale, which must lie in [-0.5, 0.5] (dashed lines)."""
    from .plots import _pyplot, save_figure_atomic

    plt = _pyplot()
    blocks = sorted({int(n.split(".")[1]) for n in errors})
    linears = [lin for lin in LINEARS if any(n.endswith(lin + ".weight") for n in errors)]
    fig, axes = plt.subplots(len(blocks), len(linears), squeeze=False, sharex=True,
                             figsize=(3.2 * len(linears) + 0.6, min(2.4 * len(blocks), 24) + 0.8))
    for r, blk in enumerate(blocks):
        for c, lin in enumerate(linears):
            ax = axes[r][c]
            name = f"h.{blk}.{lin}.weight"
            e = errors[name].ravel()
            ax.hist(e, bins=np.linspace(-0.55, 0.55, 45), color="tab:blue")
            for x in (-0.5, 0.5):
                ax.axvline(x, color="tab:red", ls="--", lw=1)
            ax.set_title(f"{name}\nmax |err|/scale = {np.abs(e).max():.4f}", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("weights", fontsize=8)
            if r == len(blocks) - 1:
                ax.set_xlabel("round-trip error / channel scale", fontsize=8)
    fig.suptitle(title, fontsize=9)
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------
# Command line


def build_parser():
    from .cli import Parser, add_backend_argument, positive_int

    p = Parser(
        prog="python -m minitf.quantize",
        description="Post-training int8 quantization (symmetric, per output channel) of a "
                    "minitf model, with a report of its size and its validation loss against "
                    "the float32 model.",
        epilog="example: python -m minitf.quantize --model runs/char --scope all --mode w8a8 "
               "--backend numba",
    )
    p.add_argument("--model", default=None,
                   help="float32 model directory (default: the shipped model)")
    p.add_argument("--out", default=None,
                   help="directory for the int8 model (default: ./<model name>-int8)")
    p.add_argument("--scope", default="ffn", choices=tuple(SCOPES),
                   help="ffn: mlp.c_fc and mlp.c_proj of every block; all: every linear layer")
    p.add_argument("--mode", default="weight-only", choices=INT8_MODES,
                   help="how the int8 model runs: int8 weights with float activations, or "
                        "activations quantized per token too (int32 accumulation)")
    p.add_argument("--data", default=None,
                   help="corpus text file (default: $MINITF_DATA, the user cache, or a verified download)")
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="evaluate on this many windows (default: the whole validation split)")
    add_backend_argument(p)
    return p


def main(argv=None) -> int:
    from .checkpoint import load_checkpoint, save_checkpoint, save_json_atomic
    from .cli import fail
    from .data import load_corpus
    from .engine import DEFAULT_MODEL_DIR, Engine, load_engine
    from .checkpoint import is_checkpoint, load_json
    from .evaluate import eval_starts, evaluate, validation_tokens
    from .hf import is_hf_directory
    from .threads import set_threads

    parser = build_parser()
    args = parser.parse_args(argv)
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    out = Path(args.out) if args.out else Path.cwd() / f"{model_dir.resolve().name}-int8"
    try:
        set_threads(args.threads)
        if is_hf_directory(model_dir):  # the size report reads minitf's model.safetensors
            raise ValueError(f"{model_dir} is a transformers directory; convert it first: "
                             f"python -m minitf.convert --from-hf {model_dir} --out DIR")
        ckpt = load_checkpoint(model_dir, layout=quantized_layout)  # reads int8 models too
        if ckpt.meta.get("quantization"):
            raise ValueError(f"{ckpt.path} is already quantized ({ckpt.meta['quantization']}); "
                             "quantize the float32 model it came from")
        if out.resolve() == ckpt.path.resolve():
            raise ValueError(f"--out {out} is the model directory; choose another")
        if is_checkpoint(out) and not (load_json(out / "meta.json") if (out / "meta.json").is_file() else {}).get("quantization"):
            raise ValueError(f"--out {out} holds a float model; choose another directory, "
                             "quantize never overwrites a model it did not write")
        float_engine = Engine(ckpt.config, ckpt.params, args.backend)
        tokens = validation_tokens(load_corpus(args.data), ckpt.tokenizer)
        eval_starts(len(tokens), ckpt.config.block_size, args.max_windows)  # enough text? check now
        qparams, report = quantize_model(ckpt.params, ckpt.config, args.scope)
        quant = {"scope": args.scope, "mode": args.mode, "method": METHOD}
        meta = {
            "quantization": quant,
            "quantized_from": str(ckpt.path.resolve()),
            "command": "python -m minitf.quantize " + shlex.join(sys.argv[1:] if argv is None else argv),
            "source_meta": ckpt.meta,
        }
        save_checkpoint(out, qparams, ckpt.config, ckpt.tokenizer, meta=meta,
                        layout=quantized_layout(ckpt.config, meta))
        int8_engine, _, qckpt = load_engine(out, args.backend)  # what users will load
    except (ValueError, OSError) as e:
        fail(parser, str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return 130

    report = {"scope": args.scope, "mode": args.mode, **report}
    report["files"] = measure_files(ckpt.path / "model.safetensors", qckpt.path / "model.safetensors",
                                    ckpt.config)
    bs = ckpt.config.block_size
    results = {}
    for key, engine in (("float32", float_engine), ("int8", int8_engine)):
        results[key] = evaluate(lambda x, e=engine: np.stack([e.forward(row) for row in x]),
                                tokens, ckpt.tokenizer, bs, args.max_windows)
    f, q = results["float32"], results["int8"]
    report["evaluation"] = {
        "backend": float_engine.backend,
        "data": str(args.data or os.environ.get("MINITF_DATA") or "default corpus"),
        "windows": f["windows"], "tokens": f["tokens"], "chars": f["chars"],
        "float32": {k: f[k] for k in ("loss", "perplexity", "bits_per_char")},
        "int8": {k: q[k] for k in ("loss", "perplexity", "bits_per_char")},
        "diff_percent": {k: 100.0 * (q[k] - f[k]) / f[k] for k in ("loss", "perplexity", "bits_per_char")},
    }
    save_json_atomic(qckpt.path / REPORT_FILE, report)
    errors = {t["name"]: roundtrip_error_in_scales(ckpt.params[t["name"]], qparams[t["name"]],
                                                   qparams[t["name"] + "_scale"])
              for t in report["tensors"]}
    plot_quant_error(errors, qckpt.path / PLOT_FILE,
                     f"{model_dir.resolve().name}: int8 round-trip error per weight, in units of "
                     f"its channel's scale (scope {args.scope})")
    print(format_report(report))
    print(f"\nwrote {qckpt.path} ({REPORT_FILE}, {PLOT_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
