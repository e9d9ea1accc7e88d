"""The one place where the numba kernels' compile options are set.

`fastmath` is a set of LLVM flags rather than `True`: `True` would also turn on `nnan`,
`ninf` and `arcp`, which would let LLVM delete the `-inf` tests that keep an all-masked
softmax row at zero, and rewrite `x / scale` as `x * (1 / scale)`, which would break the
bit-for-bit agreement of `quantize_rows` across backends. The flags kept allow what makes
the loops fast: reassociation (vectorized sums and dot products), fused multiply-add, and
ignoring the sign of zero. setup.py gives the Cython build the matching gcc flags.

`NUMBA_DISABLE_JIT=1` turns every kernel into plain Python (slow, but debuggable and
still correct): nothing in `numba_kernels` may depend on being compiled.
"""

import numba

FASTMATH = frozenset({"reassoc", "contract", "nsz"})

# Serial kernels: single-row (decode) shapes, where starting threads costs more than it saves.
JIT = dict(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
# Kernels whose outer loop is a `numba.prange`, for many-row (prefill, training) shapes.
JIT_PARALLEL = dict(JIT, parallel=True)


def njit(fn=None, *, parallel=False):
    """`numba.njit` with this module's options; `parallel=True` picks JIT_PARALLEL."""
    options = JIT_PARALLEL if parallel else JIT
    if fn is None:
        return lambda f: numba.njit(**options)(f)
    return numba.njit(**options)(fn)
