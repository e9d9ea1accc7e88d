"""The int8 tile variants (kernels/int8_tile.h for Cython, kernels/numba_int8_tile.py for
numba) against numpy_ref.matmul_int8_acc: every variant that runs on this CPU gives the exact
int32 sums, bit for bit, on awkward shapes and extreme values, in every installed Cython
build (the x86-64 baseline and x86-64-v3 pairs); MINITF_ISA forces a variant, and an unknown
or unavailable one is a clear error."""

import importlib
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from minitf.kernels import _isa, build_info, numpy_ref
from minitf.kernels import numba_int8_tile as numba_int8
from minitf.kernels.layout import pack_vnni

# (N, K, M): K not a multiple of 4, M not a multiple of 64, 1 and 4 rows and 4 + 1, the
# model's shapes and one tile exactly
SHAPES = [(1, 3, 1), (1, 26, 78), (4, 26, 78), (5, 961, 130), (4, 240, 720), (1, 960, 240),
          (4, 64, 64)]


# the fused module of every installed Cython build (setup.py: both pairs on x86-64)
BUILDS = {b: m for b, info in build_info().get("builds", {}).items()
          for m in info["modules"] if m.startswith("_cython_fused")}


@pytest.fixture(scope="module", params=sorted(BUILDS) or [None])
def probe(request):
    """The fused module of one Cython build (its int8_matmul_acc runs any tile variant)."""
    if request.param is None:
        pytest.skip("the Cython extension is not built here")
    return importlib.import_module(f"minitf.kernels.{BUILDS[request.param]}")


def cases():
    """(label, xq (N, K) int8 in [-128, 127], wq (K, M) int8 in [-127, 127])."""
    rng = np.random.default_rng(11)
    for N, K, M in SHAPES:
        yield f"random-{N}x{K}x{M}", rng.integers(-128, 128, (N, K), dtype=np.int8), \
            rng.integers(-127, 128, (K, M), dtype=np.int8)
    N, K, M = 5, 961, 130
    sign = np.where(rng.random((K, M)) < 0.5, -1, 1)
    for label, x in (("x=-128", np.full((N, K), -128)), ("x=+127", np.full((N, K), 127)),
                     ("x=-127", np.full((N, K), -127))):
        # every product at its extreme: the int16 pair sums of the AVX2 variant at their
        # largest (2 * 128 * 127), the int32 sums far from zero
        yield label + " w=+-127", x.astype(np.int8), (127 * sign).astype(np.int8)
        yield label + " w=-127", x.astype(np.int8), np.full((K, M), -127, np.int8)
    yield "zeros", np.zeros((N, K), np.int8), np.zeros((K, M), np.int8)
    yield "zero x", np.zeros((N, K), np.int8), rng.integers(-127, 128, (K, M), dtype=np.int8)


CASES = list(cases())


def packed(xq, wq):
    """(xq padded to (N, Kp), tiles, colsum): the operands of the tile kernels."""
    tiles, colsum = pack_vnni(wq)
    Kp = -(-wq.shape[0] // 4) * 4
    xp = np.zeros((xq.shape[0], Kp), np.int8)
    xp[:, :xq.shape[1]] = xq
    return xp, tiles, colsum


def numba_matmul_acc(tile, xp, tiles, colsum):
    """acc (N, Mp) with a numba tile variant, 4 rows per pass then single rows."""
    N, Kp = xp.shape
    Mp, groups = colsum.size, Kp // 4
    acc = np.full((N, Mp), 12345, np.int32)  # garbage: every output must be written
    flat, out = xp.reshape(-1), acc.reshape(-1)
    n = 0
    while n < N:
        rows = 4 if n + 4 <= N else 1
        for t in range(Mp // 64):
            tile(out, n * Mp + 64 * t, Mp, flat[n * Kp:], Kp, tiles, t * groups * 256, colsum,
                 64 * t, groups, rows)
        n += rows
    return acc


def check_exact(acc, xq, wq, what):
    want = numpy_ref.matmul_int8_acc(xq, wq)  # (N, M) int32
    got = acc[:, :wq.shape[1]]
    bad = np.argwhere(got != want)
    assert bad.size == 0, (f"{what}: {len(bad)} int32 sums differ, first at {tuple(bad[0])}: "
                           f"{got[tuple(bad[0])]} != {want[tuple(bad[0])]}")


def test_every_variant_runs_where_the_cpu_has_it(probe):
    """Both backends see the same CPU, through different detectors (the C compiler's
    __builtin_cpu_supports, LLVM's host features): they must agree on what runs."""
    assert probe.INT8_STATUS["portable"] is None and numba_int8.INT8_STATUS["portable"] is None
    cython_runs = [v for v, why in probe.INT8_STATUS.items() if why is None]
    numba_runs = [v for v, why in numba_int8.INT8_STATUS.items() if why is None]
    if not numba_int8.numba.config.DISABLE_JIT:
        assert cython_runs == numba_runs
    if "MINITF_ISA" not in os.environ:  # unforced, both pick the fastest
        assert probe.INT8_ISA == cython_runs[-1] and numba_int8.INT8_ISA == numba_runs[-1]


@pytest.mark.parametrize("variant", _isa.VARIANTS)
def test_cython_variant_is_exact(probe, variant):
    if probe.INT8_STATUS[variant] is not None:
        pytest.skip(f"{variant}: {probe.INT8_STATUS[variant]}")
    for label, xq, wq in CASES:
        xp, tiles, colsum = packed(xq, wq)
        acc = np.full((xq.shape[0], colsum.size), 12345, np.int32)
        probe.int8_matmul_acc(variant, acc, xp, tiles, colsum)
        check_exact(acc, xq, wq, f"cython {variant} {label}")


@pytest.mark.parametrize("variant", _isa.VARIANTS)
def test_numba_variant_is_exact(variant):
    if numba_int8.INT8_STATUS[variant] is not None:
        pytest.skip(f"{variant}: {numba_int8.INT8_STATUS[variant]}")
    for label, xq, wq in CASES:
        acc = numba_matmul_acc(numba_int8.TILES[variant], *packed(xq, wq))
        check_exact(acc, xq, wq, f"numba {variant} {label}")


def test_one_tile_call_writes_only_its_tile():
    """A tile writes rows x 64 outputs at a_stride apart and nothing else (numba; the Cython
    variants fill every output of the exact test above, which starts from garbage)."""
    rng = np.random.default_rng(2)
    xq = rng.integers(-128, 128, (4, 40), dtype=np.int8)
    wq = rng.integers(-127, 128, (40, 64), dtype=np.int8)
    xp, tiles, colsum = packed(xq, wq)
    want = numpy_ref.matmul_int8_acc(xq, wq)
    for variant in [v for v, why in numba_int8.INT8_STATUS.items() if why is None]:
        for rows in (1, 4):
            acc = np.full(4 * 64 + 7, -1, np.int32)
            numba_int8.TILES[variant](acc, 0, 64, xp.reshape(-1), 40, tiles, 0, colsum, 0, 10, rows)
            np.testing.assert_array_equal(acc[:rows * 64].reshape(rows, 64), want[:rows])
            assert (acc[rows * 64:] == -1).all(), f"{variant} rows={rows} wrote past its tile"


def test_pack_vnni_refuses_a_weight_of_minus_128():
    wq = np.zeros((8, 64), np.int8)
    wq[3, 5] = -128
    with pytest.raises(ValueError, match=r"int8 weights must be in \[-127, 127\].*got -128"):
        pack_vnni(wq)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter with env added (MINITF_ISA is read at import)."""
    full = {k: v for k, v in os.environ.items() if k != "MINITF_ISA"}
    full.update(env)
    full["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), full.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          timeout=300, cwd=tempfile.gettempdir())  # the installed minitf


def test_minitf_isa_forces_the_portable_variant_in_both_backends():
    """MINITF_ISA=portable: both int8 tiles portable, and the Cython backend on its
    baseline build, both modules of the pair."""
    code = ("from minitf.kernels import cython_kernels, numba_int8_tile\n"
            "print(cython_kernels.FUSED.INT8_ISA, numba_int8_tile.INT8_ISA, cython_kernels.BUILD,\n"
            "      cython_kernels._ck.__name__, cython_kernels.FUSED.__name__)\n")
    done = run_python(code, MINITF_ISA=" Portable ")
    assert done.returncode == 0, done.stderr
    baseline = next(iter(build_info()["builds"]))  # setup.py lists the baseline build first
    assert done.stdout.split() == ["portable", "portable", baseline, "minitf.kernels._cython_kernels",
                                   "minitf.kernels._cython_fused"]


def test_an_unknown_minitf_isa_is_a_clear_error():
    done = run_python("import minitf.kernels.numba_int8_tile", MINITF_ISA="sse9")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("minitf.kernels._isa.ISAError: unknown MINITF_ISA='sse9'"), last
    assert "portable, avx2, avx512vnni or auto" in last


def test_forcing_a_variant_the_cpu_lacks_is_a_clear_error():
    """numba compiles for the CPU features it is told: without AVX-512 (as on Zen 3),
    MINITF_ISA=avx512vnni must refuse at import, saying why, and auto must pick avx2."""
    host = numba_int8.binding.get_host_cpu_features().flatten().split(",")
    if "+avx2" not in host:
        pytest.skip("needs an AVX2 host to pretend to be an AVX2-only one")
    zen3 = ",".join("-" + f[1:] if f.startswith("+avx512") else f for f in host)
    done = run_python("import minitf.kernels.numba_int8_tile", MINITF_ISA="avx512vnni",
                      NUMBA_CPU_FEATURES=zen3)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and "ISAError: MINITF_ISA=avx512vnni asks for the avx512vnni" in last
    assert "lacks avx512f and avx512vnni" in last and "run here: portable, avx2" in last
    done = run_python("from minitf.kernels import numba_int8_tile; print(numba_int8_tile.INT8_ISA)",
                      NUMBA_CPU_FEATURES=zen3)
    assert done.returncode == 0 and done.stdout.split() == ["avx2"], done.stderr


def test_choose_variant_refuses_what_cannot_run(monkeypatch):
    """The rule alone, on a made-up CPU that lacks AVX2 (as an aarch64 one)."""
    status = {"portable": None, "avx2": "this CPU lacks avx2", "avx512vnni": "this CPU lacks avx512f"}
    monkeypatch.delenv("MINITF_ISA", raising=False)
    assert _isa.choose_variant(status, "cython") == "portable"
    monkeypatch.setenv("MINITF_ISA", "avx2")
    with pytest.raises(_isa.ISAError, match=r"MINITF_ISA=avx2 asks for the avx2 int8 kernels of "
                       r"the cython backend, which cannot run here: this CPU lacks avx2\. "
                       r"Variants that run here: portable"):
        _isa.choose_variant(status, "cython")
    monkeypatch.setenv("MINITF_ISA", "auto")
    assert _isa.choose_variant(status, "cython") == "portable"


def test_numba_portable_variant_without_the_jit():
    """NUMBA_DISABLE_JIT=1: only the portable variant runs, and it is still exact."""
    code = ("import numpy as np\n"
            "from minitf.kernels import numba_int8_tile as numba_int8, numpy_ref\n"
            "from test_int8_tile import numba_matmul_acc, packed\n"
            "rng = np.random.default_rng(0)\n"
            "xq = rng.integers(-128, 128, (5, 7), dtype=np.int8)\n"
            "wq = rng.integers(-127, 128, (7, 65), dtype=np.int8)\n"
            "acc = numba_matmul_acc(numba_int8.int8_tile, *packed(xq, wq))\n"
            "assert (acc[:, :65] == numpy_ref.matmul_int8_acc(xq, wq)).all()\n"
            "print(numba_int8.INT8_ISA, numba_int8.INT8_STATUS['avx2'])\n")
    done = run_python(code, NUMBA_DISABLE_JIT="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(" ", 1) == ["portable", "NUMBA_DISABLE_JIT=1 (intrinsics need compiled code)\n"]
    done = run_python("import minitf.kernels.numba_int8_tile", NUMBA_DISABLE_JIT="1", MINITF_ISA="avx2")
    assert done.returncode != 0 and "cannot run here: NUMBA_DISABLE_JIT=1" in done.stderr
