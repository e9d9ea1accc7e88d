"""minitf.kernels: the kernel backends and the one registry that picks between them.

Every backend is a `Backend` (backend.py): the same checked functions with the names and
signatures of `numpy_ref` (matmul, matmul_nt, quantize_rows, matmul_int8_acc, matmul_int8,
softmax, layernorm, gelu, attention), over that backend's loops:

- "numpy": `numpy_ref`, the readable reference and the specification the others are
  tested against (`numpy_loops` writes its results into the checked outputs);
- "numba": loops compiled by numba at first use, cached on disk (`numba_kernels`);
- "cython": loops compiled ahead of time by `pip install .` (`cython_kernels`).

    from minitf.kernels import get_backend
    K = get_backend("numba")          # or None: $MINITF_BACKEND, else "auto"
    y = K.matmul(x, w, bias)

numba and cython also have a fused path (`fused_kernels`): a whole decode step in one
compiled call, on weights packed by `layout`. A backend that was asked for but cannot load
raises BackendError; nothing falls back silently to another backend.

Which compiled variant runs on this CPU (the Cython build, the int8 tile: kernels/_isa.py)
is reported by `describe()`; `python -m minitf.kernels` prints it.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from pathlib import Path

from . import _isa
from ._checks import INT8_MODES  # noqa: F401 (re-exported: the modes of matmul_int8)
from .backend import Backend

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

# the module holding each backend's loops (its LOOPS class), and its fused kernels
_MODULES = {"numpy": "numpy_loops", "numba": "numba_train", "cython": "cython_train"}
# the module of each fused path (cython: the one cython_kernels picked, its FUSED)
FUSED_MODULES = {"numba": "numba_fused", "cython": "cython_kernels"}
_FIXES = {
    "numpy": "reinstall minitf and numpy with `pip install .`",
    "numba": "install numba with `pip install numba` (or reinstall with `pip install .`)",
    "cython": "install a C compiler and the Python headers (e.g. `apt-get install gcc "
    "python3-dev`) and reinstall with "
    "`pip install .` to build the Cython extension (in a source checkout: `pip install -e .`)",
}
# what setup.py built, with which flags, or why it did not (written at install time)
BUILD_INFO = Path(__file__).with_name("_build.json")


class BackendError(ValueError):
    """An unknown backend name, or a backend that cannot load (the message says why)."""


class BackendWarning(UserWarning):
    """"auto" passed over a faster backend because it cannot load (the message says why)."""


_instances: dict[str, Backend] = {}  # one Backend per loops module, made at first use


def _import(module: str):
    return importlib.import_module(f"{__name__}.{module}")


def build_info() -> dict:
    """setup.py's record of the Cython build: {"cython": None or why it was not built,
    "builds": {name: {"modules": [...], "flags": "..."}}}; {} if there is none."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def _why_not(name: str, exc: Exception) -> str:
    """The reason backend `name` cannot load, and its fix: the install's record for an
    unbuilt Cython extension, a source checkout that was not built in place, else the
    exception."""
    if name == "cython" and isinstance(exc, ImportError) and build_info().get("cython"):
        return f"the Cython extension was {build_info()['cython']}. Fix: {_FIXES[name]}"
    source = Path(__file__).resolve().parent.parent  # kernels/.. of a source checkout
    if name == "cython" and not BUILD_INFO.exists() and (source / "setup.py").is_file():
        return (f"minitf is imported from its source checkout {source}, where the Cython "
                f"extension is not built (pip install . builds it into site-packages): run "
                f"from another directory to use the installed minitf, or install the "
                f"checkout with `pip install -e .`")
    return f"{type(exc).__name__}: {exc}. Fix: {_FIXES[name]}"


def _load(name: str) -> Backend:
    """The Backend of `name`; raise BackendError with the reason and the fix."""
    module = _MODULES[name]
    try:
        if name != "numpy":
            _isa.requested()  # a bad MINITF_ISA fails here, before any kernel is chosen
        if module not in _instances:
            _instances[module] = Backend(name, _import(module).LOOPS)
        return _instances[module]
    except _isa.ISAError as exc:  # MINITF_ISA asks for what cannot run here
        raise BackendError(f"kernel backend {name!r} cannot load: {exc}") from exc
    except ImportError as exc:  # a missing package or an unbuilt/broken extension
        raise BackendError(
            f"kernel backend {name!r} cannot load: {_why_not(name, exc)}. "
            f"Allowed backends: {', '.join(BACKENDS)} or 'auto'; "
            f"available here: {_available_names()}"
        ) from exc


def _available_names() -> str:
    return ", ".join(n for n, reason in available_backends().items() if reason is None)


def available_backends() -> dict[str, str | None]:
    """{name: None if the backend loads, else the reason it cannot}, for every backend."""
    status = {}
    for name in BACKENDS:
        try:
            _import(_MODULES[name])
            status[name] = None
        except (ImportError, _isa.ISAError) as exc:
            status[name] = _why_not(name, exc)
    return status


def get_backend(name: str | None = None) -> Backend:
    """Return the backend called `name`.

    Args:
        name: "numpy", "numba", "cython" or "auto" (the fastest that loads, see AUTO_ORDER);
            None reads the environment variable MINITF_BACKEND, and "auto" if it is unset.
    Returns:
        The Backend (one object per backend); its NAME attribute is the backend's name.
    Raises:
        BackendError: an unknown name, or a backend that cannot load (with the reason and
            how to fix it). "auto" raises for an unknown $MINITF_ISA, and if no backend
            loads; when it passes over a faster backend that cannot load, it says so with
            a BackendWarning.
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
    try:  # a bad MINITF_ISA is the user's error, not a reason for auto to pass a backend over
        _isa.requested()
    except _isa.ISAError as exc:
        raise BackendError(f"backend 'auto': {exc}") from None
    for candidate in AUTO_ORDER:
        try:
            return _load(candidate)
        except BackendError as exc:
            if candidate == AUTO_ORDER[-1]:
                raise
            warnings.warn(f"backend 'auto' skips {candidate!r}: {exc}", BackendWarning, 2)
    raise AssertionError("unreachable: AUTO_ORDER ends with the numpy backend")


def fused_kernels(name: str):
    """The fused-path module of backend `name` ("numba" or "cython"): `Decoder`, the
    compiled decode step, and the prefill stages `linear_w8a8_rows`, `causal_softmax_rows`
    and `gelu_fast_rows` (see numba_fused.py).

    Raises:
        BackendError: `name` has no fused path, or its module cannot load.
    """
    if name not in FUSED_MODULES:
        raise BackendError(f"backend {name!r} has no fused path; backends with one: "
                           f"{', '.join(FUSED_MODULES)}")
    try:
        module = _import(FUSED_MODULES[name])
    except (ImportError, _isa.ISAError) as exc:
        raise BackendError(f"the fused kernels of backend {name!r} cannot load: "
                           f"{_why_not(name, exc)}") from exc
    return module.FUSED if name == "cython" else module


# ------------------------------------------------------------------ what runs here ------


def _blas() -> str:
    """The BLAS library numpy calls (threadpoolctl's view): name, version, kernel, threads."""
    from threadpoolctl import threadpool_info  # a dependency; loaded only for the report

    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')} "
                     f"kernels, {i.get('num_threads')} thread{'' if i.get('num_threads') == 1 else 's'})"
                     for i in libs) or "unknown"


def describe(name: str) -> str:
    """One line: what backend `name` runs on this CPU and why, or why it cannot load.

    numpy: numpy's BLAS; numba: the CPU numba compiles for and its int8 tile variant; cython:
    the build pair imported (and its flags) and its int8 tile variant. The choices are
    kernels/_isa.py's (MINITF_ISA forces the int8 variant).
    """
    why_not = available_backends()[name]
    if why_not is not None:
        return f"{name}: cannot load: {why_not}"
    if name == "numpy":
        return f"numpy: the reference (numpy_ref); BLAS {_blas()}"
    if name == "numba":
        tile = _import("numba_int8_tile")
        return (f"numba: loops compiled for {tile.CPU_NAME} by LLVM; int8 tile {tile.INT8_ISA} "
                f"({_isa.why_chosen(tile.INT8_STATUS)})")
    ck = _import("cython_kernels")
    flags = build_info().get("builds", {}).get(ck.BUILD, {}).get("flags", "flags not recorded")
    return (f"cython: build {ck.BUILD} ({ck.WHY}; {flags}); int8 tile {ck.FUSED.INT8_ISA} "
            f"({_isa.why_chosen(ck.FUSED.INT8_STATUS)})")


def report() -> str:
    """Every backend's `describe` line, then what "auto" picks (python -m minitf.kernels).

    Raises _isa.ISAError for an unknown $MINITF_ISA (one that names a variant this CPU
    cannot run is a backend's "cannot load" line instead)."""
    _isa.requested()
    lines = [describe(name) for name in BACKENDS]
    status = available_backends()
    auto = next((n for n in AUTO_ORDER if status[n] is None), None)
    lines.append(f"auto: {auto} (the first of {', '.join(AUTO_ORDER)} that loads)")
    return "\n".join(lines)
