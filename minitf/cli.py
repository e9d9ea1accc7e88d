"""What every minitf command line shares: one-line errors, the --backend and --threads flags."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

BACKEND_CHOICES = ("numpy", "numba", "cython", "auto")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" unless the help already says what the default is."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with every default shown in --help and errors on one line, exit status 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Report a bad value on one line and exit with status 2 (argparse's convention)."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """--backend (default: $MINITF_BACKEND, else auto) and --threads."""
    parser.add_argument(
        "--backend",
        default=None,
        help=f"kernel backend, one of {', '.join(BACKEND_CHOICES)} "
             f"(default: $MINITF_BACKEND, else auto; now {os.environ.get('MINITF_BACKEND') or 'auto'})",
    )
    add_threads_argument(parser)


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """--data: the corpus, as minitf.data.load_corpus resolves it."""
    parser.add_argument(
        "--data", default=None,
        help="corpus text file, or a dataset folder from python -m minitf.prepare (whose "
             "tokenizer is then used) (default: $MINITF_DATA, else ~/.cache/minitf, else a "
             "verified download)",
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=None,
        # 1 for inference: its matmuls are small, and a second BLAS thread that spins while
        # the other core is busy made quantize's validation 10x slower (measured)
        help="BLAS threads (minitf's own kernels are serial) (default: 1 for generate, "
             "evaluate and quantize, the BLAS library's own default for train)",
    )


def int_at_least(low: int):
    """An argparse type: an integer >= low, else a message naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
