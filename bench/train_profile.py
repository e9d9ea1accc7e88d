"""Where a training step's time goes: milliseconds per op per step, for each backend.

    python bench/train_profile.py                       # default model, 32 x 128, 2 threads
    python bench/train_profile.py --preset small --threads 1 --backends numba
    python bench/train_profile.py --dropout 0.1

Every training op of the backend (minitf.kernels.backend.Backend: the BLAS matmuls, the
compiled loops, the optimizer's two passes) is timed at each call of a full training step
(`minitf.trainer.train_step` on --threads threads, as `python -m minitf.train` runs it;
with --dropout also the mask draws), and so are the attention's causal-softmax loops inside
their ops. On several threads an op's time is summed over the threads (thread time, each
running its block of the batch's rows); "step" is the wall time. Figures are medians over
--repeats steps; "other" is the thread time no op accounts for (Python, the layers'
bookkeeping, waiting). The machine may be shared: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout (build the extensions in place first)

from minitf.config import PRESETS  # noqa: E402
from minitf.kernels import BACKENDS, get_backend  # noqa: E402
from minitf.layers import OPS  # noqa: E402
from minitf.model import GPT, init_params  # noqa: E402
from minitf.optim import AdamW  # noqa: E402
from minitf.threads import set_threads  # noqa: E402
from minitf.trainer import StepThreads, train_step  # noqa: E402

TIMED = (*OPS, "global_norm", "adamw")
INNER = ("causal_softmax", "causal_softmax_backward")  # loops inside the attention ops


_LOCK = threading.Lock()  # the step's threads add to one table


def timed(times: dict, op: str, fn):
    """fn, adding its wall time to times[op] at every call."""
    def call(*args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        with _LOCK:
            times[op] += time.perf_counter() - t
        return result
    return call


class Timed:
    """A backend whose training ops add their wall time to `times[op]`."""

    def __init__(self, backend, times: dict):
        for op in TIMED:
            setattr(self, op, timed(times, op, getattr(backend, op)))
        self.NAME = backend.NAME


def profile(backend_name: str, preset: str, batch: int, dropout: float, threads: int,
            repeats: int):
    """{op: [seconds per step]} and [step seconds] over `repeats` steps."""
    config = PRESETS[preset].__class__(**{**PRESETS[preset].to_dict(), "dropout": dropout})
    backend = get_backend(backend_name)
    times: dict[str, float] = collections.defaultdict(float)
    loops = backend.loops
    # the attention's loops, timed inside their ops
    backend.loops = type("TimedLoops", (loops,), {
        name: staticmethod(timed(times, name, getattr(loops, name))) for name in INNER})
    try:
        ops = Timed(backend, times)
        params = init_params(config)
        model = GPT(config, params, ops)
        opt = AdamW(params, ops=ops)
        rng = np.random.default_rng(0)
        T = config.block_size
        x = rng.integers(0, config.vocab_size, (batch, T))
        y = rng.integers(0, config.vocab_size, (batch, T))

        workers = StepThreads(model, opt, threads)

        def step():
            t = time.perf_counter()
            masks = model.draw_masks(rng, batch)
            times["draw_masks"] += time.perf_counter() - t
            train_step(model, opt, x, y, 1e-4, 1.0, masks, workers)

        for _ in range(2):  # warm up: compilation, buffers, thread pools
            step()
        per_op, totals = collections.defaultdict(list), []
        for _ in range(repeats):
            times.clear()
            t = time.perf_counter()
            step()
            totals.append(time.perf_counter() - t)
            for op, s in times.items():
                per_op[op].append(s)
        return per_op, totals
    finally:
        backend.loops = loops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/train_profile.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="BLAS and kernel threads")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    names = args.backends.split(",")
    for name in names:
        get_backend(name)  # loaded before set_threads, which then reaches their OpenMP threads
    set_threads(args.threads)
    cfg = PRESETS[args.preset]
    print(f"training step profile: preset {args.preset} (d_model {cfg.d_model}, {cfg.n_layer} "
          f"layers), batch {args.batch_size} x {cfg.block_size}, dropout {args.dropout}, "
          f"{args.threads} thread(s); ms per step, medians of {args.repeats}")
    results = {n: profile(n, args.preset, args.batch_size, args.dropout, args.threads, args.repeats)
               for n in names}
    ops = [op for op in (*TIMED, *INNER, "draw_masks") if any(op in r[0] for r in results.values())]
    print(f"{'op':<28}" + "".join(f"{n:>12}" for n in names))
    for op in ops:
        label = ("  " + op) if op in INNER else op
        print(f"{label:<28}" + "".join(
            f"{statistics.median(results[n][0][op]) * 1e3:>12.2f}" if op in results[n][0] else f"{'':>12}"
            for n in names))
    for n in names:  # the rest: the thread time no op accounts for
        per_op, totals = results[n]
        results[n] = (per_op, totals, args.threads * statistics.median(totals)
                      - sum(statistics.median(v) for k, v in per_op.items() if k not in INNER))
    print(f"{'other (Python, waiting)':<28}" + "".join(f"{results[n][2] * 1e3:>12.2f}" for n in names))
    print(f"{'step (wall)':<28}" + "".join(f"{statistics.median(results[n][1]) * 1e3:>12.2f}" for n in names))
    tokens = args.batch_size * cfg.block_size
    print(f"{'tokens/s':<28}" + "".join(f"{tokens / statistics.median(results[n][1]):>12,.0f}"
                                         for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
