"""The one place where the numba kernels' compile options are set.

`fastmath` is a set of LLVM flags rather than `True`: `True` would also turn on `nnan`,
`ninf` and `arcp`, which would let LLVM delete the `-inf` tests that keep an all-masked
softmax row at zero, and rewrite `x / scale` as `x * (1 / scale)`, which would break the
bit-for-bit agreement of `quantize_rows` across backends. The flags kept allow what makes
the loops fast: reassociation (vectorized sums and dot products), fused multiply-add, and
ignoring the sign of zero. setup.py gives the Cython build the matching gcc flags.

`parallel` is off: at the model's shapes a `prange` was measured slower than the serial
loop on the 2-core target (thread wake-up costs more than a decode-size kernel takes, and
the threads compete with BLAS's and the other backends'); run several engines in parallel
instead.

`cache=True` keys a compiled function by its own source file: a change in another module
it calls or reads constants from (numba_kernels' loops, layout.py's offsets) does not
recompile it. After such a change, clear kernels/__pycache__.

`NUMBA_DISABLE_JIT=1` turns every kernel into plain Python (slow, but debuggable and
still correct): nothing in `numba_kernels` may depend on being compiled.
"""

import numba

JIT_OPTIONS = dict(
    cache=True,  # compiled code is kept in __pycache__: later processes start fast
    fastmath={"reassoc", "contract", "nsz"},  # see above: no nnan / ninf / arcp
    parallel=False,  # see above
    nogil=True,  # kernels release the GIL: callers may run them from threads
    error_model="numpy",  # x / 0 gives inf/nan as numpy does, no Python exception check
)


def njit(fn):
    """`numba.njit` with JIT_OPTIONS."""
    return numba.njit(**JIT_OPTIONS)(fn)
