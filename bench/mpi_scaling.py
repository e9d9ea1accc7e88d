"""Data-parallel scaling: training tokens/s of 2 MPI ranks x 1 thread against 1 process x 1
thread, on the same global batch, and the share of the step the Allreduce takes.

    python bench/mpi_scaling.py                        # default model, 32 x 128, 3 runs
    python bench/mpi_scaling.py --preset small --batch-size 16 --repeats 5

Each run times --steps training steps (after --warmup untimed ones) of
`minitf.trainer.train_step` as `python -m minitf.train` runs it (StepThreads on 1 thread,
BLAS on 1 thread, float32, random tokens), once in one process and once under
`mpiexec -n 2`, one after the other. A step's time is rank 0's wall time from the batch
draw to the end of AdamW; "allreduce" is the time inside the step's two Allreduces (the
gradients and the loss), which includes waiting for the slower rank. Figures are medians
over the steps of a run; the summary line is the median over runs. Needs the mpi extra
(`pip install ".[mpi]"`). The machine may be shared: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minitf.config import PRESETS
from minitf.data import batch_rows, get_batch
from minitf.distributed import MPIWorld, World, launched_size
from minitf.kernels import get_backend
from minitf.model import GPT, init_params
from minitf.optim import AdamW
from minitf.threads import set_threads
from minitf.trainer import StepThreads, train_step

CORPUS_TOKENS = 1_000_000  # random ids the batches are drawn from


class TimedWorld(MPIWorld):
    """MPIWorld adding the wall time of its reductions to `seconds`."""

    seconds = 0.0

    def sum_gradients(self, flat_grads):
        t = time.perf_counter()
        super().sum_gradients(flat_grads)
        self.seconds += time.perf_counter() - t

    def sum_values(self, values):
        t = time.perf_counter()
        out = super().sum_values(values)
        self.seconds += time.perf_counter() - t
        return out


def worker(args) -> None:
    """One rank's (or the one process's) steps; rank 0 prints {"step_s", "allreduce_s",
    "params"} as one JSON line."""
    world = TimedWorld() if launched_size() > 1 else World()
    set_threads(1)
    config = PRESETS[args.preset]
    backend = get_backend(args.backend)
    params = init_params(config, seed=0, dtype=np.float32)
    optimizer = AdamW(params, ops=backend)
    model = GPT(config, params, backend)
    threads = StepThreads(model, optimizer, 1, world)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, CORPUS_TOKENS)
    rng = np.random.default_rng(1)
    rows = batch_rows(args.batch_size, world.rank, world.size)
    steps, comm = [], []
    for i in range(args.warmup + args.steps):
        world.seconds = 0.0
        t = time.perf_counter()
        x, y = get_batch(tokens, args.batch_size, config.block_size, rng, rows=rows)
        train_step(model, optimizer, x, y, 1e-4, 1.0, None, threads, args.batch_size)
        if i >= args.warmup:
            steps.append(time.perf_counter() - t)
            comm.append(world.seconds)
    if world.rank == 0:
        print(json.dumps({"step_s": statistics.median(steps), "allreduce_s": statistics.median(comm),
                          "params": optimizer.flat_params.size}))


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=32, help="the global batch, windows")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="runs of each")
    p.add_argument("--backend", default="auto")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    if not os.path.exists(mpiexec):
        mpiexec = shutil.which("mpiexec") or sys.exit('mpiexec not found: pip install ".[mpi]"')
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--preset", args.preset,
          "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup",
          str(args.warmup), "--backend", args.backend]
    tokens = args.batch_size * PRESETS[args.preset].block_size
    print(f"{cpu_name()}, {os.cpu_count()} cores; preset {args.preset}, global batch "
          f"{args.batch_size} x {PRESETS[args.preset].block_size}, backend {args.backend}, "
          f"float32; load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'run':>3} {'1x1 tok/s':>10} {'2x1 tok/s':>10} {'speed-up':>8} {'allreduce':>10} "
          f"{'share':>6}")
    ratios, shares = [], []
    for r in range(args.repeats):
        one = run(me)
        two = run([mpiexec, "-n", "2", *me])
        ratio = one["step_s"] / two["step_s"]
        share = two["allreduce_s"] / two["step_s"]
        ratios.append(ratio)
        shares.append(share)
        print(f"{r + 1:>3} {tokens / one['step_s']:>10,.0f} {tokens / two['step_s']:>10,.0f} "
              f"{ratio:>7.2f}x {two['allreduce_s'] * 1e3:>8.2f}ms {share:>6.1%}")
    print(f"median speed-up {statistics.median(ratios):.2f}x, allreduce "
          f"{statistics.median(shares):.1%} of the 2-rank step ({one['params']:,} float32 "
          f"parameters: {4 * one['params']:,} bytes per Allreduce); load average after: "
          f"{os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
