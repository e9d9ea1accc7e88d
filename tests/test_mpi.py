"""Data-parallel training over MPI (minitf.distributed), through `mpiexec` and the command line.

The reference is a one-process run with the same flags: `mpiexec -n N` must train the same
model on the same global batches, up to the order in which the ranks' gradients are summed.
The MPI here is the `mpi` extra's (mpi4py and MPICH from the package index): CI installs it,
and there these tests fail rather than skip when it is missing.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from tolerances import TOL

from conftest import missing

from minitf.checkpoint import load_checkpoint
from minitf.rundir import Recovered

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--block-size", "16",
        "--batch-size", "4", "--warmup", "2", "--eval-windows", "2", "--final-eval-windows", "2",
        "--threads", "1", "--backend", "numpy", "--quiet", "--no-plot", "--seed", "5"]
# a run that must never end by itself (the killed-rank test ends it)
ENDLESS = 100_000
# seconds before a job that should have ended is declared hung
HANG = 120


def _mpiexec() -> list[str]:
    """mpiexec and the flags it needs; skips (fails in CI) without the mpi extra."""
    path = Path(sys.executable).parent / "mpiexec"  # the extra's MPICH, beside this Python
    found = str(path) if path.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401 - the ranks import it
    except ImportError:
        found = None
    if found is None:
        missing('mpiexec or mpi4py not installed: pip install ".[mpi]"')
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    flags = []
    if "Open MPI" in version or "OpenRTE" in version:  # Open MPI refuses root, and 2 slots
        flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [found, *flags]


def _train(corpus_path, out, *flags, ranks: int | None = None, timeout=HANG):
    """python -m minitf.train (under `mpiexec -n ranks`, else one process); the finished
    process. stdout and stderr go to files beside `out` (a pipe a rank fills could stall the
    job)."""
    cmd = [sys.executable, "-m", "minitf.train", "--data", str(corpus_path), "--out", str(out),
           *TINY, *flags]
    if ranks is not None:
        cmd = [*_mpiexec(), "-n", str(ranks), *cmd]
    with open(f"{out}.stdout", "w") as o, open(f"{out}.stderr", "w") as e:
        proc = subprocess.run(cmd, stdout=o, stderr=e, timeout=timeout)
    proc.stderr = Path(f"{out}.stderr").read_text()
    return proc


def _losses(out) -> np.ndarray:
    return np.array([loss for _, loss in json.loads((Path(out) / "meta.json").read_text())
                     ["history"]["train"]])


def _same_checkpoint(out, ref, dtype) -> None:
    """The checkpoints in out and ref: the same parameters and optimizer moments (TOL
    "mpi_params"), the same step and data RNG state."""
    a, b = load_checkpoint(out, dtype=None), load_checkpoint(ref, dtype=None)
    tol = TOL["mpi_params", dtype]
    for kind, x, y in [("params", a.params, b.params), ("m", a.optimizer_state["m"],
                       b.optimizer_state["m"]), ("v", a.optimizer_state["v"], b.optimizer_state["v"])]:
        assert all(x[n].dtype == y[n].dtype == dtype for n in b.params), kind
        diff = {n: np.max(np.abs(x[n] - y[n])) for n in b.params}
        worst = max(diff, key=diff.get)
        err = diff[worst] / max(np.max(np.abs(y[n])) for n in b.params)
        assert err <= tol, f"{kind} {worst}: max |diff| / max |ref| = {err:.3g} > {tol}"
    assert a.optimizer_state["step"] == b.optimizer_state["step"]
    assert a.optimizer_state["rng_state"] == b.optimizer_state["rng_state"]


# the two precisions, dropout in one of them (the ranks' rows of the masks)
CASES = {np.float64: ["--dtype", "float64", "--dropout", "0.1"], np.float32: ["--dtype", "float32"]}


@pytest.fixture(scope="module")
def one_process(corpus_path, tmp_path_factory):
    """{dtype: the run directory of 10 steps in one process, 1 thread}."""
    root = tmp_path_factory.mktemp("one_process")
    runs = {}
    for dtype, flags in CASES.items():
        out = root / np.dtype(dtype).name
        proc = _train(corpus_path, out, "--steps", "10", "--eval-interval", "5", *flags)
        assert proc.returncode == 0, proc.stderr
        runs[dtype] = out
    return runs


@pytest.mark.parametrize("dtype", list(CASES), ids=lambda d: np.dtype(d).name)
def test_two_ranks_train_as_one_process(corpus_path, tmp_path, one_process, dtype):
    """mpiexec -n 2 for 10 steps: the one-process losses and checkpoint; rank 1 writes nothing."""
    out = tmp_path / "run"
    proc = _train(corpus_path, out, "--steps", "10", "--eval-interval", "5", *CASES[dtype], ranks=2)
    assert proc.returncode == 0, proc.stderr
    ref = _losses(one_process[dtype])
    err = np.max(np.abs(_losses(out) - ref) / ref)
    assert len(_losses(out)) == 10 and err <= TOL["mpi_losses", dtype], \
        f"losses: max relative error {err:.3g}"
    _same_checkpoint(out, one_process[dtype], dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.stderr", "run.stdout"]
    # rank 0 alone reports: one summary line, one line per validation
    assert Path(f"{out}.stdout").read_text().count("model: ") == 1


def test_resume_with_another_number_of_ranks(corpus_path, tmp_path, one_process):
    """5 steps on 2 ranks, resumed on 3 (rows 1, 1 and 2 of the batch of 4) to step 10: the
    10-step run of one process."""
    out = tmp_path / "run"
    flags = ["--eval-interval", "5", "--decay-steps", "10"]
    proc = _train(corpus_path, out, "--steps", "5", *flags, *CASES[np.float64], ranks=2)
    assert proc.returncode == 0, proc.stderr
    proc = _train(corpus_path, out, "--steps", "10", "--resume", *flags, ranks=3)  # its dropout
    assert proc.returncode == 0, proc.stderr
    ref = _losses(one_process[np.float64])
    err = np.max(np.abs(_losses(out) - ref) / ref)
    assert err <= TOL["mpi_losses", np.float64], f"losses: max relative error {err:.3g}"
    _same_checkpoint(out, one_process[np.float64], np.float64)


def _rank_pids(pid: int, rank: int) -> list[int]:
    """The processes below `pid` whose MPI rank (PMI_RANK in their environment) is `rank`."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    below, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        below += kids
        todo += kids
    found = []
    for p in below:
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env or f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            found.append(p)
    return found


def test_a_killed_rank_ends_the_job_and_leaves_the_last_checkpoint(corpus_path, tmp_path):
    out = tmp_path / "run"
    cmd = [*_mpiexec(), "-n", "2", sys.executable, "-m", "minitf.train", "--data",
           str(corpus_path), "--out", str(out), *TINY, "--steps", str(ENDLESS),
           "--eval-interval", "3"]
    with open(tmp_path / "stdout", "w") as o, open(tmp_path / "stderr", "w") as e:
        job = subprocess.Popen(cmd, stdout=o, stderr=e)
        try:
            deadline = time.monotonic() + HANG
            while not (out / "meta.json").exists():  # a first checkpoint
                assert job.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "no checkpoint was written"
                time.sleep(0.1)
            time.sleep(0.5)  # training on, between checkpoints
            victims = _rank_pids(job.pid, 1)
            assert len(victims) == 1, victims
            os.kill(victims[0], signal.SIGKILL)
            status = job.wait(timeout=HANG)  # a hang fails here
        finally:
            if job.poll() is None:
                job.kill()
    assert status != 0
    assert _rank_pids(job.pid, 0) == []  # rank 0 is gone too
    with warnings.catch_warnings():
        # rank 0 may have been ended in the middle of a save: its unfinished copy is removed
        warnings.simplefilter("ignore", Recovered)
        ckpt = load_checkpoint(out, dtype=None)
    step = ckpt.optimizer_state["step"]
    assert step >= 3 and step % 3 == 0 and step == ckpt.meta["step"]
    assert all(np.all(np.isfinite(p)) for p in ckpt.params.values())


def test_a_failing_rank_ends_the_job_with_its_message(corpus_path, tmp_path):
    """Rank 1 alone fails (its --data does not exist) while rank 0 trains on: the job ends
    with rank 1's message instead of leaving rank 0 waiting for its gradients."""
    out = tmp_path / "run"
    common = [sys.executable, "-m", "minitf.train", "--out", str(out), *TINY, "--steps", "20"]
    cmd = [*_mpiexec(), "-n", "1", *common, "--data", str(corpus_path),
           ":", "-n", "1", *common, "--data", str(tmp_path / "nope.txt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "rank 1 of 2 failed" in ln]
    assert len(lines) == 1 and "nope.txt" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_diverged_run_ends_every_rank_with_one_message(corpus_path, tmp_path):
    """A learning rate that overflows the weights: every rank sees the same reduced NaN and
    stops at the same step; rank 0 alone says so, and nothing is aborted."""
    out = tmp_path / "run"
    proc = _train(corpus_path, out, "--steps", "20", "--eval-interval", "20", "--lr", "1e30",
                  "--min-lr", "1e30", "--grad-clip", "0", ranks=2)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("training diverged") == 1, proc.stderr
    assert "MPI_Abort" not in proc.stderr
    assert not (out / "meta.json").exists()  # no validation was reached: no checkpoint


def test_without_a_launcher_mpi_is_never_imported(corpus_path, tmp_path):
    code = (f"import sys; from minitf.train import main; "
            f"status = main({['--data', str(corpus_path), '--out', str(tmp_path / 'r'), *TINY, '--steps', '1']!r}); "
            f"assert 'mpi4py' not in sys.modules, 'mpi4py imported'; sys.exit(status)")
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    for extra in ({}, {"PMI_SIZE": "1"}):  # mpiexec -n 1 too: one process, no MPI
        proc = subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                              capture_output=True, text=True, timeout=HANG)
        assert proc.returncode == 0, proc.stderr
        shutil.rmtree(tmp_path / "r")
