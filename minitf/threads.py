"""Thread control: the one knob for the threads minitf's computation uses.

Two pools take it. The BLAS library's, numpy's matmuls, which every backend's prefill and
training call: `set_threads` limits it through threadpoolctl. And minitf's own compiled
kernels (kernels/_threads.py): the fused decode step and the W8A8 prefill stages split each
large linear layer and the tied head over that many threads (GPT-2 small's sizes; the
default 1.4M-parameter model's layers are too small to gain and stay serial), with the
same logits, bit for bit, for any count. No thread is created until such a kernel runs on
more than one. `set_threads` leaves the OpenMP pool of another
library in the same process alone (PyTorch's, in the benchmarks and tests, keeps its own
count).
"""

from __future__ import annotations

import os

from threadpoolctl import threadpool_limits

from .config import Rule
from .kernels._threads import set_kernel_threads

# what set_threads allows; the commands' --threads checks it too (minitf.cli)
THREADS = Rule(lambda n: not isinstance(n, bool) and isinstance(n, int)
               and 1 <= n <= (os.cpu_count() or 1),
               f"an integer in [1, {os.cpu_count() or 1}] (this machine's cores)")


def set_threads(n: int | None) -> None:
    """Use `n` threads in the BLAS library numpy calls and in minitf's compiled kernels;
    None leaves both as they are (BLAS: its default; the kernels: 1 unless set).

    Raises:
        ValueError: n < 1 or more than the machine's cores.
    """
    if n is None:
        return
    if not THREADS.allows(n):
        raise ValueError(f"threads={n!r} must be {THREADS.allowed}")
    threadpool_limits(limits=n, user_api="blas")
    set_kernel_threads(n)
