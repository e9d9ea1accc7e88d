"""What int8 quantization costs, measured: bytes per tensor and in total, the round-trip
error of every quantized weight, the sizes of the files on disk, and the validation loss of
the float32 model against the int8 one; and the report as a plain-text table.

The quantization itself is minitf.quantization; its `quantize_model` builds the per-tensor
and total parts of the report with `tensor_report` and `totals`, `python -m minitf.quantize`
adds `measure_files` and `evaluation` and prints `format_report`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .checkpoint import read_safetensors_header
from .config import GPTConfig, param_shapes
from .tensors import SCOPES, quantized_weight_names, scale_name


def roundtrip_error_in_scales(w: np.ndarray, wq: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(w - wq * scale) / scale, float64 (K, M): every entry lies in [-0.5, 0.5]."""
    s = scale.astype(np.float64)  # (M,)
    return (w.astype(np.float32).astype(np.float64) - wq.astype(np.float64) * s) / s  # (K, M)


def tensor_report(name: str, w: np.ndarray, wq: np.ndarray, scale: np.ndarray) -> dict:
    """One quantized weight: name, shape, float32_bytes, int8_bytes, scale_bytes, ratio,
    max_abs_error, mean_abs_error, max_error_half_scales (max |error| / (scale/2), <= 1) and
    zero_channels (channels stored as all zeros)."""
    err = roundtrip_error_in_scales(w, wq, scale) * scale.astype(np.float64)  # (K, M)
    half = scale.astype(np.float64) / 2  # (M,)
    return {
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
    }


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


def totals(config: GPTConfig, qparams: dict, tensors: list[dict]) -> dict:
    """{"ffn", "ffn_one_block", "linear", "quantized", "model"}: bytes as float32 and as
    stored, ratios and errors of each group of weights (see `_group`); `tensors` are the
    `tensor_report`s of the quantized weights in `qparams`."""
    by_name = {t["name"]: t for t in tensors}
    ffn = quantized_weight_names(config, "ffn")
    return {
        "ffn": _group(ffn, qparams, by_name),
        "ffn_one_block": _group(ffn[: len(SCOPES["ffn"])], qparams, by_name),
        "linear": _group(quantized_weight_names(config, "all"), qparams, by_name),
        "quantized": _group(list(by_name), qparams, by_name),
        "model": _group(list(param_shapes(config)), qparams, by_name),
    }


def safetensors_tensor_bytes(path) -> dict[str, int]:
    """{tensor name: bytes of its data} read from a safetensors file's header."""
    header = read_safetensors_header(path)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
            if k != "__metadata__"}


def measure_files(source_file: Path, int8_file: Path, config: GPTConfig) -> dict:
    """File sizes of the two model.safetensors and the FFN weights' bytes in each."""
    src, q = safetensors_tensor_bytes(source_file), safetensors_tensor_bytes(int8_file)
    ffn = quantized_weight_names(config, "ffn")
    src_ffn = sum(src[n] for n in ffn)
    q_ffn = sum(q[n] + q.get(scale_name(n), 0) for n in ffn)
    q_ffn_scales = sum(q.get(scale_name(n), 0) for n in ffn)
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


METRICS = ("loss", "perplexity", "bits_per_char")


def evaluation(float_result: dict, int8_result: dict, backend: str, data: str) -> dict:
    """The quality part of the report: the `minitf.metrics.evaluate` results of the float32
    and the int8 model on the same windows, and the int8 model's difference in percent."""
    f, q = float_result, int8_result
    return {
        "backend": backend,
        "data": data,
        "windows": f["windows"], "tokens": f["tokens"], "chars": f["chars"],
        "float32": {k: f[k] for k in METRICS},
        "int8": {k: q[k] for k in METRICS},
        "diff_percent": {k: 100.0 * (q[k] - f[k]) / f[k] for k in METRICS},
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
        int8 = f"int8 {report['scope']} {report['mode']}" + (" +head" if report.get("head") else "")
        w = max(22, len(int8))  # the label column: "int8 all weight-only +head" is 26 wide
        rows.append(f"{'model':<{w}} {'loss (nats/token)':>17} {'perplexity':>11} {'bits/char':>10}")
        for key, label in (("float32", "float32"), ("int8", int8)):
            m = ev[key]
            rows.append(f"{label:<{w}} {m['loss']:>17.4f} {m['perplexity']:>11.4f} {m['bits_per_char']:>10.4f}")
        d = ev["diff_percent"]
        rows.append(f"{'difference':<{w}} {d['loss']:>+16.4f}% {d['perplexity']:>+10.4f}% {d['bits_per_char']:>+9.4f}%")
    return "\n".join(rows)
