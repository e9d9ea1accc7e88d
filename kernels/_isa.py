"""Which instruction-set variant of the int8 tile kernels runs: the one place that reads
MINITF_ISA, for the numba and the Cython backend alike.

Each backend has the same three variants of the W8A8 tile sums (kernels/int8_tile.h,
kernels/numba_int8.py), which agree bit for bit:

- "portable": loops the compiler vectorizes for any CPU (SSE2, NEON, ...);
- "avx2": vpmaddubsw / vpmaddwd, for x86-64 CPUs with AVX2 (Haswell, Zen 1-3 and later);
- "avx512vnni": vpdpbusd, for x86-64 CPUs with AVX-512 VNNI (Ice Lake, Zen 4 and later).

A backend asks `choose_variant` once, at import, with what runs on this CPU. Unset (or
"auto"), MINITF_ISA means the fastest variant that runs; a variant name forces that one
(to test or time it), and a variant this CPU cannot run is an error that says why, never
a crash on an illegal instruction.
"""

from __future__ import annotations

import os

ENV_VAR = "MINITF_ISA"
# slowest first; the indices are the C header's MINITF_ISA_PORTABLE, _AVX2, _AVX512VNNI
VARIANTS = ("portable", "avx2", "avx512vnni")
# the CPU features (LLVM's and gcc's names) each variant needs
NEEDS = {"portable": (), "avx2": ("avx2",), "avx512vnni": ("avx512f", "avx512vnni")}


class ISAError(ValueError):
    """MINITF_ISA names an unknown variant, or one that cannot run here (says why)."""


def requested() -> str:
    """The variant $MINITF_ISA asks for, lower-cased: a name of VARIANTS, or "auto" when
    it is unset or empty. Raises ISAError for anything else."""
    raw = os.environ.get(ENV_VAR, "")
    name = raw.strip().lower() or "auto"
    if name not in (*VARIANTS, "auto"):
        raise ISAError(f"unknown {ENV_VAR}={raw!r}; allowed: {', '.join(VARIANTS)} or auto "
                       f"(the fastest this CPU runs)")
    return name


def choose_variant(status: dict[str, str | None], backend: str) -> str:
    """The int8 tile variant a backend runs: $MINITF_ISA's, else the fastest that runs.

    Args:
        status: {variant: None if it runs here, else the reason it cannot}, for every name
            of VARIANTS ("portable" always runs).
        backend: the backend's name, for the error message.
    Returns:
        A name of VARIANTS.
    Raises:
        ISAError: $MINITF_ISA is unknown, or names a variant that cannot run here.
    """
    name = requested()
    runs = [v for v in VARIANTS if status[v] is None]
    if name == "auto":
        return runs[-1]
    if status[name] is not None:
        raise ISAError(f"{ENV_VAR}={name} asks for the {name} int8 kernels of the {backend} "
                       f"backend, which cannot run here: {status[name]}. Variants that run "
                       f"here: {', '.join(runs)}; unset {ENV_VAR} to pick the fastest")
    return name


def missing_features(name: str, cpu_features: set[str]) -> str | None:
    """None if cpu_features has every feature variant `name` needs, else the reason."""
    missing = [f for f in NEEDS[name] if f not in cpu_features]
    return f"this CPU lacks {' and '.join(missing)}" if missing else None
