"""python -m minitf.kernels: which kernel variant each backend runs on this CPU, and why."""

import sys

from . import _isa, report

if __name__ == "__main__":
    try:
        print(report())
    except _isa.ISAError as exc:  # an unknown MINITF_ISA: one line, exit 2 as the CLIs do
        print(f"python -m minitf.kernels: error: {exc}", file=sys.stderr)
        sys.exit(2)
