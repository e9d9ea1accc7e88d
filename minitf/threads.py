"""Thread control: the one knob for the threads minitf's computation uses.

minitf's compiled kernels (numba and Cython) are serial (kernels/_jit.py: `parallel=False`,
measured faster at the model's sizes), so the only thread pool that works for minitf is the
BLAS library's: numpy's matmuls, which every backend's prefill and training call.
`set_threads` limits that pool through threadpoolctl and touches nothing else: it does not
start numba's thread pool (numba starts it for a parallel kernel, and none exists), and it
leaves the OpenMP pool of another library in the same process alone (PyTorch's, in the
benchmarks and tests, keeps its own count).
"""

from __future__ import annotations

import os

from threadpoolctl import threadpool_limits

from .config import Rule

# what set_threads allows; the commands' --threads checks it too (minitf.cli)
THREADS = Rule(lambda n: not isinstance(n, bool) and isinstance(n, int)
               and 1 <= n <= (os.cpu_count() or 1),
               f"an integer in [1, {os.cpu_count() or 1}] (this machine's cores)")


def set_threads(n: int | None) -> None:
    """Use `n` threads in the BLAS library numpy calls; None leaves its default.

    Raises:
        ValueError: n < 1 or more than the machine's cores.
    """
    if n is None:
        return
    if not THREADS.allows(n):
        raise ValueError(f"threads={n!r} must be {THREADS.allowed}")
    threadpool_limits(limits=n, user_api="blas")
