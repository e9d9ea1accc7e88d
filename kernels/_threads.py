"""How many threads minitf's own compiled kernels split their large matmuls over.

One number for the whole process, set by `minitf.threads.set_threads` (the `--threads` flag)
and read by the fused path at every call (the engine passes it to the compiled step): 1, the
default, runs every kernel serially. With more, the fused decode step and the W8A8 prefill
stages split each linear layer of at least `layout.THREAD_MIN_WEIGHTS` weights, and the tied
head, into as many contiguous ranges of outputs, one per thread. Each output is computed by
the same loop on the same values whatever the split, so the logits do not depend on the
thread count, bit for bit. Smaller layers (the default 1.4M-parameter model has none this
large) stay serial: waking a thread costs more than they take.
"""

_count = 1


def kernel_threads() -> int:
    """The thread count of the compiled kernels (>= 1)."""
    return _count


def set_kernel_threads(n: int) -> None:
    """Use n >= 1 threads in the compiled kernels (checked by `minitf.threads.set_threads`)."""
    global _count
    _count = int(n)
