"""int8 tile variants against float32, per tile and per matmul, at the model's shapes.

    python bench/int8_tiles.py                 # this CPU as it is
    python bench/int8_tiles.py --pretend-avx2  # numba compiled without AVX-512 (as on an
                                               # AVX2-only CPU), Cython builds up to AVX2

Cython: one timing module (bench/_int8_bench.pyx: the fused path's own decode loops and
the variants of kernels/int8_tile.h) compiled three times, with setup.py's flags but
-march=x86-64 (the portable baseline, SSE2), -march=x86-64-v3 (AVX2, FMA) and
-march=native; every loop repeats in C. numba: the fused path's loops (numba_fused) and the
variants of numba_int8, repeated inside a compiled loop. "old" is today's tile
(`minitf_int8_tile`, `numba_fused._int8_tile`): VNNI where the build (or numba's target)
has it, else plain loops; it goes (and so do its columns) once the fused modules use the
new tiles. Rows: 1 (decode) and 128 (prefill), 4 rows per pass over the
weights. Times are medians of 9 samples, in microseconds per matmul (per tile for the
"tile" rows). Build products go to a temporary directory unless --build-dir is given.
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DECODE = [(240, 720), (240, 960), (960, 240)]  # the default model: c_attn, c_fc, mlp.c_proj
GPT2 = [(768, 2304), (768, 3072), (3072, 768)]  # GPT-2 small


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="example: python bench/int8_tiles.py --pretend-avx2")
    p.add_argument("--pretend-avx2", action="store_true",
                   help="numba targets this CPU without AVX-512; no -march=native build")
    p.add_argument("--build-dir", type=Path, default=None, help="where to compile (default: a temporary directory)")
    p.add_argument("--prefill-rows", type=int, default=128, help="rows of the prefill shapes")
    return p.parse_args(argv)


def setup_compile_args() -> list[str]:
    """setup.py's COMPILE_ARGS, read from its source (importing it would run setup())."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILE_ARGS":
            return ast.literal_eval(node.value)
    raise SystemExit("setup.py has no COMPILE_ARGS list")


def median_us(fn, *args) -> float:
    """Median of 9 samples of fn(*args, repeats) in microseconds per repetition."""
    fn(*args, 1)  # warm up (numba compiles here)
    t0 = time.perf_counter()
    fn(*args, 3)
    repeats = max(1, int(2e-3 / max((time.perf_counter() - t0) / 3, 1e-9)))
    samples = []
    for _ in range(9):
        t0 = time.perf_counter()
        fn(*args, repeats)
        samples.append((time.perf_counter() - t0) / repeats)
    return float(np.median(samples)) * 1e6


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.pretend_avx2:  # before numba is imported: it reads the variable once
        from llvmlite import binding
        host = binding.get_host_cpu_features().flatten().split(",")
        os.environ["NUMBA_CPU_FEATURES"] = ",".join("-" + f[1:] if f.startswith("+avx512") else f for f in host)
    sys.path.insert(0, str(REPO / "tests"))  # the extension builder lives with the tests
    from int8_probe import build_extension

    from minitf.engine import pack_vnni
    from minitf.kernels import _isa, numba_fused, numba_int8, numba_kernels

    base = [a for a in setup_compile_args() if not a.startswith("-march=")]
    builds = {"x86-64": base + ["-march=x86-64"], "x86-64-v3": base + ["-march=x86-64-v3"]}
    if not args.pretend_avx2:
        builds["native"] = base + ["-march=native"]
    build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="minitf-int8-bench-"))
    mods = {name: build_extension(build_dir / name, REPO / "bench" / "_int8_bench.pyx", "_int8_bench", flags)
            for name, flags in builds.items()}

    # numba: every kernel repeated inside one compiled call
    from threadpoolctl import threadpool_limits

    from minitf.kernels._jit import njit

    threadpool_limits(1)  # every kernel here runs on one core: BLAS too

    @njit
    def nb_f32(y, x, w, repeats):
        for _ in range(repeats):
            for n in range(x.shape[0]):
                numba_fused._matvec(y[n], x[n], w)

    @njit
    def nb_weight_only(y, x, wq, s, b, repeats):
        for _ in range(repeats):
            for n in range(x.shape[0]):
                numba_fused._matvec_int8(y[n], x[n], wq, s, b)

    @njit
    def nb_old(y, xq, sx, acc, x, wp, wsum, s, b, repeats):
        for _ in range(repeats):
            if x.shape[0] == 1:
                numba_fused._linear_w8a8_row(y[0], xq[0], acc, x[0], wp, wsum, s, b)
            else:
                numba_fused.linear_w8a8_rows(y, xq, sx, acc, x, wp, wsum, s, b)

    def nb_variant(tile):
        @njit
        def run(y, xq, sx, acc, x, wp, wsum, s, b, repeats):
            N, K = x.shape
            M, Kp, Mp = y.shape[1], xq.shape[1], wsum.shape[0]
            groups = Kp // 4
            xflat = xq.reshape(-1)
            for _ in range(repeats):
                for n in range(N):
                    sx[n] = numba_fused._quantize(xq[n, :K], x[n])
                n = 0
                while n < N:
                    rows = 4 if n + 4 <= N else 1
                    for t in range(Mp // 64):
                        tile(acc, t * 64, Mp, xflat[n * Kp:], Kp, wp, t * groups * 256, wsum, t * 64, groups, rows)
                    for r in range(rows):
                        for m in range(M):
                            y[n + r, m] = np.float32(acc[r * Mp + m]) * sx[n + r]
                        for m in range(M):
                            y[n + r, m] = y[n + r, m] * s[m]
                        for m in range(M):
                            y[n + r, m] += b[m]
                    n += rows
        return run

    def nb_tiles(tile):
        @njit
        def run(acc, xq, wp, wsum, n_tiles, repeats):
            rows, Kp = xq.shape
            Mp, groups = wsum.shape[0], Kp // 4
            xflat = xq.reshape(-1)
            for _ in range(repeats):
                for t in range(n_tiles):
                    tile(acc, t * 64, Mp, xflat, Kp, wp, t * groups * 256, wsum, t * 64, groups, rows)
        return run

    nb_runs = [v for v, why in numba_int8.INT8_STATUS.items() if why is None]
    nb_w8a8 = {v: nb_variant(numba_int8.TILES[v]) for v in nb_runs}
    nb_tile = {v: nb_tiles(numba_int8.TILES[v]) for v in nb_runs}

    def blas(y, x, w, repeats):
        for _ in range(repeats):
            np.matmul(x, w, out=y)

    print(f"CPU: {cpu_name()}; numba targets {'no AVX-512 (--pretend-avx2)' if args.pretend_avx2 else 'the host'}"
          f"; numba's old tile {'VNNI' if numba_fused.HAS_VNNI else 'plain loops'} (from the host); numba int8 variants: {', '.join(nb_runs)}")
    print(f"builds: " + "; ".join(f"{n}: {' '.join(f)}" for n, f in builds.items()))
    rng = np.random.default_rng(0)
    header = "| shape | rows | backend/build | f32 BLAS | f32 loop | weight-only | W8A8 old | " + \
             " | ".join(f"W8A8 {v}" for v in _isa.VARIANTS) + " | best W8A8 / f32 loop |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for K, M in DECODE + GPT2:
        wq = rng.integers(-127, 128, (K, M), dtype=np.int8)
        w = (wq * np.float32(0.01)).astype(np.float32)
        s = rng.uniform(0.001, 0.01, M).astype(np.float32)
        b = rng.standard_normal(M).astype(np.float32)
        wp, wsum = pack_vnni(wq)
        Kp, Mp = -(-K // 4) * 4, wsum.size
        zeros = np.zeros(Mp, np.int32)
        for N in (1, args.prefill_rows):
            x = rng.standard_normal((N, K)).astype(np.float32)
            y = np.zeros((N, M), np.float32)
            xq = np.zeros((N, Kp), np.int8)
            sx = np.zeros(N, np.float32)
            acc = np.zeros(4 * Mp, np.int32)
            f_blas = median_us(blas, y, x, w)
            rows = []
            for name, mod in mods.items():
                cells = [median_us(mod.f32_rows, y, x, w), median_us(mod.weight_only_rows, y, x, wq, s, b),
                         median_us(mod.w8a8_rows, "old", y, xq, sx, acc, x, wp, wsum, zeros, s, b)]
                cells += [median_us(mod.w8a8_rows, v, y, xq, sx, acc, x, wp, wsum, zeros, s, b)
                          if mod.RUNS[v] else float("nan") for v in _isa.VARIANTS]
                rows.append((f"cython {name}", cells))
            # (numba_fused decides on VNNI from the host, not from numba's target: with
            # --pretend-avx2 its VNNI intrinsic would not compile, so "old" is left out)
            cells = [median_us(nb_f32, y, x, w), median_us(nb_weight_only, y, x, wq, s, b),
                     float("nan") if args.pretend_avx2 else median_us(nb_old, y, xq, sx, acc, x, wp, wsum, s, b)]
            cells += [median_us(nb_w8a8[v], y, xq, sx, acc, x, wp, wsum, s, b) if v in nb_w8a8 else float("nan")
                      for v in _isa.VARIANTS]
            rows.append(("numba", cells))
            for label, cells in rows:
                best = np.nanmin(cells[3:])
                print(f"| {K}x{M} | {N} | {label} | {f_blas:.1f} | " + " | ".join(f"{c:.1f}" for c in cells)
                      + f" | {best / cells[0]:.2f} |", flush=True)
        # one tile, 1 and 4 rows
        for rows_ in (1, 4):
            xt = rng.integers(-128, 128, (rows_, Kp), dtype=np.int8)
            acc = np.zeros(4 * Mp, np.int32)
            line = f"| {K}x{M} | tile x{rows_} | "
            parts = []
            for name, mod in mods.items():
                parts.append(f"cython {name}: " + ", ".join(
                    f"{v} {median_us(mod.tiles_only, v, acc, xt, wp, wsum, 1):.3f}" for v in _isa.VARIANTS if mod.RUNS[v]))
            parts.append("numba: " + ", ".join(f"{v} {median_us(nb_tile[v], acc, xt, wp, wsum, 1):.3f}" for v in nb_runs))
            print(line + " ; ".join(parts) + " |", flush=True)


if __name__ == "__main__":
    main()
