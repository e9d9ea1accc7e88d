"""Convert between minitf checkpoints and transformers GPT-2 directories (see minitf.hf).

    python -m minitf.convert --from-hf gpt2 --out runs/gpt2        # transformers -> minitf
    python -m minitf.convert --to-hf exported                      # the shipped model -> transformers
    python -m minitf.convert --to-hf exported --model runs/char-int8 --dequantize

--from-hf reads a directory written by `GPT2LMHeadModel.save_pretrained` (or fetched from the
hub) and writes a minitf checkpoint with `save_checkpoint`: atomically, tensors as stored
(float32 or float16), the tokenizer.json carried over, meta.json recording the source. Every
`--model DIR` also reads such a directory directly; converting saves the renaming at each
start and gives the checkpoint minitf's checksum. An --out holding a model is refused, as
quantize refuses one: the model of an earlier convert is replaced only with --replace,
any other never (minitf.checkpoint.check_output).

--to-hf writes what `GPT2LMHeadModel.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained`
load. An int8 model is refused unless --dequantize: its weights then become int8 * scale in
float32, which keeps the rounding of the quantization (transformers runs the dequantized
model, not minitf's int8 kernels).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np

from .checkpoint import (check_output, check_writable, load_checkpoint, recover_checkpoint,
                         save_checkpoint)
from .cli import Parser, fail, guarded, path_argument, prog_name
from .engine import DEFAULT_MODEL_DIR
from .hf import HFError, is_hf_directory, save_hf_directory
from .quantization import dequantize
from .rundir import DirectoryLock
from .tensors import HEAD, Quantization, checkpoint_layout


def build_parser() -> Parser:
    p = Parser(
        prog=prog_name("minitf.convert"),
        description="Convert a transformers GPT-2 directory (save_pretrained, or a download from "
                    "the HF hub) into a minitf checkpoint, or a minitf model into one.",
        epilog="examples: python -m minitf.convert --from-hf gpt2 --out runs/gpt2;  "
               "python -m minitf.convert --to-hf exported --model runs/char",
    )
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="DIR", default=None, type=path_argument,
                     help="a transformers GPT-2 directory to read (config.json, model.safetensors "
                          "or its shards, tokenizer.json)")
    way.add_argument("--to-hf", metavar="DIR", default=None, type=path_argument,
                     help="a new (or empty) directory to write the transformers files into")
    p.add_argument("--out", default=None, type=path_argument,
                   help="with --from-hf: the minitf checkpoint directory to write; it must not "
                        "hold a model unless --replace")
    p.add_argument("--replace", action="store_true",
                   help="with --from-hf: replace the model an earlier convert wrote in --out "
                        "(never another model)")
    p.add_argument("--model", default=None, type=path_argument,
                   help="with --to-hf: the minitf model to export (default: the shipped model)")
    p.add_argument("--dequantize", action="store_true",
                   help="with --to-hf: export an int8 model as float32 int8 * scale (else refused)")
    return p


@guarded
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_hf is not None and (args.model is not None or args.dequantize):
        fail(parser, "--model and --dequantize go with --to-hf; --from-hf reads its DIR")
    if args.to_hf is not None and (args.out is not None or args.replace):
        fail(parser, "--out and --replace go with --from-hf; --to-hf writes into its DIR, "
                     "which must be new or empty")
    if args.from_hf is not None and not args.out:
        fail(parser, "--from-hf needs --out DIR, the minitf checkpoint to write")
    command = "python -m minitf.convert " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.from_hf is not None:
        path = from_hf(Path(args.from_hf), Path(args.out), command, args.replace)
    else:
        path = to_hf(Path(args.model) if args.model else DEFAULT_MODEL_DIR, Path(args.to_hf),
                     args.dequantize)
    print(f"wrote {path}")
    return 0


def converted_model(meta: dict) -> str | None:
    """What convert --from-hf wrote, as its meta.json says ("a model converted from DIR"),
    or None for a model it did not write (minitf.checkpoint.check_output)."""
    source = meta.get("converted_from")
    if source is None:
        return None
    where = source.get("directory") if isinstance(source, dict) else None
    return f"a model converted from {where}" if where else "a converted model"


def from_hf(source: Path, out: Path, command: str, replace: bool = False) -> Path:
    """transformers directory `source` -> minitf checkpoint `out`, holding the lock of `out`
    from the start. Raises ValueError (HFError, CheckpointError) for a source minitf cannot
    run, an `out` holding a model convert did not write, or one it wrote without `replace`;
    OSError (LockedError) for an `out` that another process writes or that has no room for
    the model."""
    with DirectoryLock(out):
        recover_checkpoint(out)
        if not is_hf_directory(source):
            raise HFError(f"{source}: not a transformers directory (no config.json with a "
                          f"model_type)")
        check_output(out, replace, "convert", converted_model)
        ckpt = load_checkpoint(source, dtype=None)  # tensors as stored
        check_writable(out, sum(a.nbytes for a in ckpt.params.values()) + (1 << 20))
        return save_checkpoint(out, ckpt.params, ckpt.config, ckpt.tokenizer,
                               meta={**ckpt.meta, "command": command})


def to_hf(model: Path, out: Path, dequantize_int8: bool) -> Path:
    """minitf model `model` -> transformers directory `out`, holding the lock of `out`.
    Raises ValueError for an int8 model without `dequantize_int8`, or an `out` that is not
    new or empty; OSError (LockedError) for an `out` another process writes."""
    with DirectoryLock(out):
        return _to_hf(model, out, dequantize_int8)


def _to_hf(model: Path, out: Path, dequantize_int8: bool) -> Path:
    ckpt = load_checkpoint(model, layout=checkpoint_layout, optimizer=False)
    params = ckpt.params
    quant = Quantization.from_meta(ckpt.meta)
    if quant is not None:
        if not dequantize_int8:
            raise HFError(
                f"{ckpt.path} is an int8 model ({quant.describe()}) "
                f"and transformers' GPT2LMHeadModel holds float weights: export the float32 model "
                f"it came from, or pass --dequantize to export int8 * scale as float32")
        # a linear's scales are per column; the int8 head's (wte) per row: its transpose's
        params = {name: (dequantize(a.T, params[name + "_scale"]).T if name == HEAD else
                         dequantize(a, params[name + "_scale"])) if a.dtype == np.int8 else a
                  for name, a in params.items() if not name.endswith("_scale")}
        n = sum(1 for a in ckpt.params.values() if a.dtype == np.int8)
        print(f"dequantized {n} int8 weight tensors to float32 (int8 * per-channel scale; wte per row): "
              f"transformers runs these rounded weights, not minitf's int8 kernels", file=sys.stderr)
    return save_hf_directory(out, params, ckpt.config, ckpt.tokenizer)


if __name__ == "__main__":
    sys.exit(main())
