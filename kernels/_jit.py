"""The one place where the numba kernels' compile options are set.

`fastmath` is a set of LLVM flags rather than `True`: `True` would also turn on `nnan`,
`ninf` and `arcp`, which would let LLVM delete the `-inf` tests that keep an all-masked
softmax row at zero, and rewrite `x / scale` as `x * (1 / scale)`, which would break the
bit-for-bit agreement of `quantize_rows` across backends. The flags kept allow what makes
the loops fast: reassociation (vectorized sums and dot products), fused multiply-add, and
ignoring the sign of zero. setup.py gives the Cython build the matching gcc flags.

`parallel` is off but for the few kernels made with `njit_parallel`: at the default model's
shapes a `prange` was measured slower than the serial loop on the 2-core target (thread
wake-up costs more than a decode-size kernel takes). Those few split a large matmul (GPT-2
small's) over the threads of kernels/_threads.py, and the fused kernels call them only with
more than one thread and a layer of at least `layout.THREAD_MIN_WEIGHTS` weights. numba's
threading layer is chosen in the order omp, tbb, workqueue (its default tries tbb first,
which is rarely installed; omp wakes its threads in about a microsecond, workqueue in tens),
unless $NUMBA_THREADING_LAYER or $NUMBA_THREADING_LAYER_PRIORITY says otherwise.

`cache=True` keys a compiled function by its own source file: a change in another module
it calls or reads constants from (numba_kernels' loops, layout.py's offsets) does not
recompile it. After such a change, clear kernels/__pycache__.

`NUMBA_DISABLE_JIT=1` turns every kernel into plain Python (slow, but debuggable and
still correct): nothing in `numba_kernels` may depend on being compiled.

The first run after an install (or a change of source, CPU or numba) compiles the kernels
it calls, several seconds in all; it says so once on standard error ("compiling kernels,
first run only"), so that a silent pause is not taken for a hang. Loads from the on-disk
cache say nothing.
"""

import os
import sys

import numba
from numba.core import event

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


def njit_parallel(fn):
    """`numba.njit` with JIT_OPTIONS and parallel=True: for a function whose only parallel
    construct is its `numba.prange` loop (keep it that small: numba would also parallelize
    any array expression in it).

    It also starts numba's thread pool, once, in the module that defines such a function,
    before any kernel of it runs: the code of a prange links against the pool, and numba
    loads from its cache a kernel that calls a prange kernel (`numba_fused.decode_rows`
    calling `_matmul_cols_threads`) without starting the pool when it compiled that kernel
    on a callee that itself came from the cache; the first call then crashes (seen with a
    fresh install's cache). `numba.get_num_threads` starts the pool; the omp layer creates
    no thread until a prange runs on more than one (tests/test_cpu.py counts them)."""
    numba.get_num_threads()
    return numba.njit(**{**JIT_OPTIONS, "parallel": True})(fn)


if "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]


class _FirstCompile(event.Listener):
    """Prints one line on standard error when numba first compiles (rather than loads from
    its cache) a minitf kernel in this process."""

    said = False

    def on_start(self, ev):
        dispatcher = ev.data["dispatcher"]
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
        if not self.said and module.startswith("minitf."):
            self.said = True
            print("compiling kernels, first run only", file=sys.stderr, flush=True)

    def on_end(self, ev):
        pass


event.register("numba:compile", _FirstCompile())
