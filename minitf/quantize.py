"""Post-training int8 quantization of a model directory, with a report of what it costs.

    python -m minitf.quantize                                   # the shipped model, FFN only
    python -m minitf.quantize --model runs/char --scope all --mode w8a8
    python -m minitf.quantize --model gpt2-run --scope all --mode w8a8 --int8-head

Writes the int8 model (minitf.quantization) to --out with quant_report.json (bytes per
tensor and in total, round-trip errors, file sizes, validation loss float32 vs int8:
minitf.quant_report) and quant_error.png (minitf.plots), all in one sealed checkpoint, and
prints the report as a table. --out is locked for the whole run (minitf.rundir), and its
free space is checked before anything is quantized.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .checkpoint import (check_output, check_writable, load_checkpoint, recover_checkpoint,
                         save_json_atomic)
from .cli import (Parser, add_backend_argument, add_data_argument, guarded, path_argument,
                  positive_int, prog_name)
from .dataset import load_data
from .engine import DEFAULT_MODEL_DIR, Engine, load_engine
from .hf import is_hf_directory
from .metrics import engine_logits, eval_starts, evaluate
from .plots import plot_quant_error
from .quant_report import evaluation, format_report, measure_files, roundtrip_error_in_scales
from .quantization import quantize_model, save_quantized
from .rundir import DirectoryLock
from .tensors import (HEAD, INT8_MODES, SCOPES, Quantization, checkpoint_layout, layout_bytes,
                      scale_name, tensor_layout)
from .threads import set_threads

REPORT_FILE = "quant_report.json"
PLOT_FILE = "quant_error.png"


def build_parser() -> Parser:
    p = Parser(
        prog=prog_name("minitf.quantize"),
        description="Post-training int8 quantization (symmetric, per output channel) of a "
                    "minitf model, with a report of its size and its validation loss against "
                    "the float32 model.",
        epilog="example: python -m minitf.quantize --model runs/char --scope all --mode w8a8 "
               "--backend numba",
    )
    p.add_argument("--model", default=None, type=path_argument,
                   help="float32 model directory (default: the shipped model)")
    p.add_argument("--out", default=None, type=path_argument,
                   help="directory for the int8 model (default: ./<model name>-int8); it "
                        "must not hold a model unless --replace")
    p.add_argument("--replace", action="store_true",
                   help="replace the int8 model already in --out (never a float model)")
    p.add_argument("--scope", default="ffn", choices=tuple(SCOPES),
                   help="ffn: mlp.c_fc and mlp.c_proj of every block; all: every linear layer")
    p.add_argument("--mode", default="weight-only", choices=INT8_MODES,
                   help="how the int8 model runs: int8 weights with float activations, or "
                        "activations quantized per token too (int32 accumulation)")
    p.add_argument("--int8-head", action="store_true",
                   help="also store the tied embedding/output head wte in int8, one scale per "
                        "row (per vocabulary entry), run in --mode as the linear layers "
                        "(default: wte stays float32)")
    add_data_argument(p)
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="evaluate on this many windows (default: the whole validation split)")
    add_backend_argument(p)
    return p


def int8_model(meta: dict) -> str | None:
    """What quantize wrote, as its meta.json says ("an int8 model (scope ffn, ...)"), or
    None for a model it did not write (minitf.checkpoint.check_output)."""
    quant = Quantization.from_meta(meta)
    return None if quant is None else f"an int8 model ({quant.describe()})"


@guarded
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    out = Path(args.out) if args.out else Path.cwd() / f"{model_dir.resolve().name}-int8"
    quant = Quantization(args.scope, args.mode, args.int8_head)
    set_threads(args.threads if args.threads is not None else 1)  # as generate: see cli.py
    with DirectoryLock(out):  # before any work: one writer of --out
        recover_checkpoint(out)
        if is_hf_directory(model_dir):  # the size report reads minitf's model.safetensors
            raise ValueError(f"{model_dir} is a transformers directory; convert it first: "
                             f"python -m minitf.convert --from-hf {model_dir} --out DIR")
        ckpt = load_checkpoint(model_dir, layout=checkpoint_layout)  # reads int8 models too
        source_quant = Quantization.from_meta(ckpt.meta)
        if source_quant is not None:
            raise ValueError(f"{ckpt.path} is already quantized ({source_quant.describe()}); "
                             "quantize the float32 model it came from")
        if out.resolve() == ckpt.path.resolve():
            raise ValueError(f"--out {out} is the model directory; choose another")
        check_output(out, args.replace, "quantize", int8_model)
        float_engine = Engine(ckpt.config, ckpt.params, args.backend)
        tokens = load_data(args.data, ckpt.tokenizer, with_train=False).val
        eval_starts(len(tokens), ckpt.config.block_size, args.max_windows)  # enough text? now
        check_writable(out, layout_bytes(tensor_layout(ckpt.config, quant)) + (1 << 20))
        qparams, report = quantize_model(ckpt.params, ckpt.config, args.scope, args.int8_head)
        report = {"scope": args.scope, "mode": args.mode, **report}
        errors = {}
        for t in report["tensors"]:
            w, wq, scale = ckpt.params[t["name"]], qparams[t["name"]], qparams[scale_name(t["name"])]
            if t["name"] == HEAD:  # its channels are rows: the error of the transpose
                w, wq = w.T, wq.T
            errors[t["name"]] = roundtrip_error_in_scales(w, wq, scale)
        title = (f"{model_dir.resolve().name}: int8 round-trip error per weight, in units of "
                 f"its channel's scale (scope {args.scope}{', int8 head' if args.int8_head else ''})")
        command = "python -m minitf.quantize " + shlex.join(sys.argv[1:] if argv is None else argv)

        def report_and_plot(directory: Path) -> None:
            save_json_atomic(directory / REPORT_FILE, report)
            plot_quant_error(errors, directory / PLOT_FILE, title)

        # Saved twice: the report describes the saved model as users load it, so it is
        # measured and evaluated from the first save, and the second adds it (same file
        # names, hence the same model file size: the seal holds one SHA-256 per name).
        save_quantized(out, qparams, ckpt, quant, command, extra=report_and_plot)
        int8_engine, _, qckpt = load_engine(out, args.backend)  # what users will load
        report["files"] = measure_files(ckpt.path / "model.safetensors",
                                        qckpt.path / "model.safetensors", ckpt.config)
        bs = ckpt.config.block_size
        f, q = (evaluate(engine_logits(engine), tokens, ckpt.tokenizer, bs, args.max_windows)
                for engine in (float_engine, int8_engine))
        data = str(args.data or os.environ.get("MINITF_DATA") or "default corpus")
        report["evaluation"] = evaluation(f, q, float_engine.backend, data)
        save_quantized(out, qparams, ckpt, quant, command,
                       extra=lambda directory: save_json_atomic(directory / REPORT_FILE, report))
    print(format_report(report))
    print(f"\nwrote {qckpt.path} ({REPORT_FILE}, {PLOT_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
