"""minitf.kernels: the kernel backends and the one registry that picks between them.

Three backends export the same functions with the same signatures (matmul, matmul_nt,
quantize_rows, matmul_int8_acc, matmul_int8, softmax, layernorm, gelu, attention):

- `numpy_ref`: the readable reference, the specification the others are tested against;
- `numba_kernels`: loop kernels compiled by numba at first use (cached on disk);
- `cython_kernels`: loop kernels compiled ahead of time by `pip install .`.

    from minitf.kernels import get_backend
    K = get_backend("numba")          # or None: $MINITF_BACKEND, else "auto"
    y = K.matmul(x, w, bias)

A backend that was asked for but cannot load raises BackendError; nothing falls back
silently to another backend.
"""

from __future__ import annotations

import importlib
import os
import warnings

BACKENDS = ("numpy", "numba", "cython")

# "auto" takes the first backend of this list that loads. Measured with
# `pytest --benchmark bench/bench_kernels.py` at the default model's shapes (2-core
# AVX-512 machine, medians): numba and cython tie on the float decode path (matmuls
# 10-16 us, attention decode 13 us, within noise of numpy's BLAS on matmuls), and numba
# is 1.3-1.8x faster on every int8 matmul (LLVM widens int8 to int32 better than gcc)
# and on decode softmax/GELU, so numba goes first. Its cost: compiling once (~4 s on the
# first run, ~0.15 s from its on-disk cache after). numpy last: 10-25x slower on int8
# and 2-7x on decode-size softmax/LayerNorm/attention, where per-call overhead dominates.
AUTO_ORDER = ("numba", "cython", "numpy")

ENV_VAR = "MINITF_BACKEND"

_MODULES = {"numpy": "numpy_ref", "numba": "numba_kernels", "cython": "cython_kernels"}
_FIXES = {
    "numpy": "reinstall minitf and numpy with `pip install .`",
    "numba": "install numba with `pip install numba` (or reinstall with `pip install .`)",
    "cython": "reinstall with `pip install .` to build the Cython extension "
    "(in a source checkout: `python setup.py build_ext --inplace`)",
}


class BackendError(ValueError):
    """An unknown backend name, or a backend that cannot load (the message says why)."""


class BackendWarning(UserWarning):
    """"auto" passed over a faster backend because it cannot load (the message says why)."""


def _load(name: str):
    """Import a backend's module; raise BackendError with the reason and the fix."""
    try:
        return importlib.import_module(f"{__name__}.{_MODULES[name]}")
    except ImportError as exc:  # a missing package or an unbuilt/broken extension
        raise BackendError(
            f"kernel backend {name!r} cannot load: {type(exc).__name__}: {exc}. "
            f"Fix: {_FIXES[name]}. Allowed backends: {', '.join(BACKENDS)} or 'auto'; "
            f"available here: {_available_names()}"
        ) from exc


def _available_names() -> str:
    return ", ".join(n for n, reason in available_backends().items() if reason is None)


def available_backends() -> dict[str, str | None]:
    """{name: None if the backend loads, else the reason it cannot}, for every backend."""
    status = {}
    for name in BACKENDS:
        try:
            importlib.import_module(f"{__name__}.{_MODULES[name]}")
            status[name] = None
        except ImportError as exc:
            status[name] = f"{type(exc).__name__}: {exc}"
    return status


def get_backend(name: str | None = None):
    """Return the backend module called `name`.

    Args:
        name: "numpy", "numba", "cython" or "auto" (the fastest that loads, see AUTO_ORDER);
            None reads the environment variable MINITF_BACKEND, and "auto" if it is unset.
    Returns:
        The backend module; its NAME attribute is the backend's name.
    Raises:
        BackendError: an unknown name, or a backend that cannot load (with the reason and
            how to fix it). "auto" raises only if no backend loads; when it passes over a
            faster backend that cannot load, it says so with a BackendWarning.
    """
    source = "argument"
    if name is None:
        name, source = os.environ.get(ENV_VAR) or "auto", f"${ENV_VAR}"
    if not isinstance(name, str) or name.strip().lower() not in (*BACKENDS, "auto"):
        raise BackendError(
            f"unknown kernel backend {name!r} (from {source}); allowed: "
            f"{', '.join(BACKENDS)} or 'auto'"
        )
    name = name.strip().lower()
    if name != "auto":
        return _load(name)
    for candidate in AUTO_ORDER:
        try:
            return _load(candidate)
        except BackendError as exc:
            if candidate == AUTO_ORDER[-1]:
                raise
            warnings.warn(f"backend 'auto' skips {candidate!r}: {exc}", BackendWarning, 2)
    raise AssertionError("unreachable: AUTO_ORDER ends with the numpy backend")
