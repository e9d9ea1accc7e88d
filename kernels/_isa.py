"""Which instruction-set variant of the kernels runs: the one place that reads MINITF_ISA,
for the numba and the Cython backend alike.

int8 tiles. Each backend has the same three variants of the W8A8 tile sums
(kernels/int8_tile.h, kernels/numba_int8_tile.py), which agree bit for bit:

- "portable": code the compiler vectorizes for any CPU (SSE2 on x86-64, NEON on aarch64);
- "avx2": vpmaddubsw / vpmaddwd, for x86-64 CPUs with AVX2 (Haswell, Zen 1-3 and later);
- "avx512vnni": vpdpbusd, for x86-64 CPUs with AVX-512 VNNI (Ice Lake, Zen 4 and later).

A backend asks `choose_variant` once, at import, with what runs on this CPU. Unset (or
"auto"), MINITF_ISA means the fastest variant that runs; a variant name forces that one
(to test or time it), and a variant this CPU cannot run is an error that says why, never
a crash on an illegal instruction.

Cython builds. On x86-64, setup.py compiles the Cython modules twice: for the x86-64
baseline (`_cython_kernels`, `_cython_fused`: SSE2, any x86-64 CPU) and for x86-64-v3
(`_cython_kernels_v3`, `_cython_fused_v3`: AVX2 and FMA, which the float and weight-only
loops need to be fast). `cython_suffix` picks the pair: v3 where the CPU runs it and the
int8 variant is not forced to "portable" (MINITF_ISA=portable runs the baseline build from
end to end, the CI job that tests the portable path). The two modules of a pair are always
taken together, so that the fused path rounds exactly as the unfused kernels do. numba
needs no such choice: it compiles for the CPU it runs on.
"""

from __future__ import annotations

import os

ENV_VAR = "MINITF_ISA"
# slowest first; the indices are the C header's MINITF_ISA_PORTABLE, _AVX2, _AVX512VNNI
VARIANTS = ("portable", "avx2", "avx512vnni")
# the CPU features (LLVM's and gcc's names) each variant needs
NEEDS = {"portable": (), "avx2": ("avx2",), "avx512vnni": ("avx512f", "avx512vnni")}
# the module-name suffix of the Cython pair built for x86-64-v3 (setup.py X86_BUILDS)
V3_SUFFIX = "_v3"


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


def why_chosen(status: dict[str, str | None]) -> str:
    """Why `choose_variant` picked what it did, in words (for the registry's report)."""
    name = requested()
    if name != "auto":
        return f"forced by {ENV_VAR}={name}"
    skipped = [f"{v}: {why}" for v, why in status.items() if why is not None]
    return "the fastest that runs here" + (f" ({'; '.join(skipped)})" if skipped else "")


def lacks(name: str, features: set[str] | None = None) -> str | None:
    """The reason variant `name` cannot run on a CPU with `features` (None: the C side,
    which only knows that something is missing), or None if nothing is missing."""
    missing = [f for f in NEEDS[name] if features is None or f not in features]
    return f"this CPU (or its operating system) lacks {' and '.join(missing)}" if missing else None


def cython_suffix(cpu_runs_v3: bool, has_v3_build: bool) -> tuple[str, str]:
    """(module-name suffix of the Cython pair to import, why): "_v3" or "" (the baseline).

    Args:
        cpu_runs_v3: this CPU runs x86-64-v3 code (the baseline module's CPU check).
        has_v3_build: the v3 pair is installed (x86-64 wheels have it; aarch64 builds and
            MINITF_NATIVE=1 builds do not).
    Raises:
        ISAError: $MINITF_ISA is unknown.
    """
    if requested() == "portable":
        return "", f"{ENV_VAR}=portable runs the baseline build"
    if not has_v3_build:
        return "", "the only build installed"
    if not cpu_runs_v3:
        return "", "this CPU cannot run the x86-64-v3 build (needs AVX2, FMA, BMI1/2, F16C)"
    return V3_SUFFIX, "this CPU runs the x86-64-v3 build"
