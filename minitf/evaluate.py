"""Validation loss (nats/token), perplexity and bits/char of a model, as JSON on stdout.

    python -m minitf.evaluate --model DIR [--data PATH] [--backend numba]

The metrics are minitf.metrics.evaluate's; this module only parses, checks and prints.
"""

from __future__ import annotations

import json
import math
import sys

from .cli import (Parser, add_backend_argument, add_data_argument, fail, guarded, path_argument,
                  prog_name)
from .dataset import load_data
from .engine import load_engine
from .metrics import engine_logits, evaluate
from .threads import set_threads


def build_parser() -> Parser:
    parser = Parser(
        prog=prog_name("minitf.evaluate"),
        description="Validation loss (nats/token), perplexity and bits/char of a model.",
        epilog="example: python -m minitf.evaluate --backend numba --max-windows 200",
    )
    parser.add_argument("--model", default=None, type=path_argument,
                        help="model directory (default: the shipped model)")
    add_data_argument(parser)
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate on this many windows (default: the whole split)")
    add_backend_argument(parser)
    return parser


@guarded
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_windows is not None and args.max_windows < 1:
        fail(parser, f"--max-windows {args.max_windows} must be >= 1")
    try:
        set_threads(args.threads if args.threads is not None else 1)  # as generate: see cli.py
        engine, tokenizer, _ = load_engine(args.model, args.backend)
        tokens = load_data(args.data, tokenizer, with_train=False).val
        result = evaluate(engine_logits(engine), tokens, tokenizer, engine.config.block_size,
                          args.max_windows)
    except (ValueError, OSError) as e:
        fail(parser, str(e))
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return 130
    if not math.isfinite(result["loss"]):
        fail(parser, f"the model's validation loss is {result['loss']}: its logits are not finite")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
