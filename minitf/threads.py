"""Thread control: one knob for the BLAS library (through threadpoolctl) and numba."""

from __future__ import annotations

import os

from threadpoolctl import threadpool_limits


def set_threads(n: int | None) -> None:
    """Use `n` threads in BLAS and in numba's parallel kernels; None leaves the defaults.

    Raises:
        ValueError: n < 1 or more than the machine's cores.
    """
    if n is None:
        return
    cores = os.cpu_count() or 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cores:
        raise ValueError(f"threads={n!r} must be an integer in [1, {cores}] (this machine's cores)")
    threadpool_limits(limits=n)
    try:
        import numba  # here, not at the top: importing numba takes ~0.5 s, needed only now

        numba.set_num_threads(n)
    except ImportError:  # numba is a dependency; without it only BLAS threads matter
        pass
