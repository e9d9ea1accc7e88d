"""python -m minitf.kernels: which kernel variant each backend runs on this CPU, and why."""

import sys

from ..cli import Parser, guarded
from . import report


@guarded
def main(argv=None) -> int:
    # no options: an unknown argument is refused, not ignored; an unknown MINITF_ISA is an
    # ISAError (a ValueError): one line, exit 2, as for every command
    Parser(prog="python -m minitf.kernels",
           description="Which kernel variant each backend runs on this CPU, and why "
                       "(MINITF_ISA forces one: portable, avx2, avx512vnni or auto).",
           epilog="example: MINITF_ISA=portable python -m minitf.kernels").parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
