"""Fault injection: what a hostile user, a full disk, a crash or a second process can do to
minitf's commands. Two writers of one directory at once; a crash at every step of a
checkpoint swap, then train, --resume and generate on what it left; a full disk for every
file minitf writes, standard output closed, full or gone; kill -9 and SIGINT at random
moments of a tiny training run, then a resume that must give the losses of a run that was
never interrupted, bit for bit; absurd sizes; hostile meta.json, train_state.json and
tokenizer.json. Each asserts that no loadable checkpoint was lost and that every message is
one line, never a traceback.

Crashes are real: a forked child dies with os._exit (no cleanup runs) or is sent SIGKILL or
SIGINT. A full disk is an injected ENOSPC (`full_disk`) at the n-th file opened for writing,
for every n the command reaches. Subprocesses only where the interpreter itself matters
(argv bytes, locales, closed or full standard output, a process that holds a lock).
"""

import builtins
import errno
import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minitf import convert, evaluate, generate, prepare, quantize, train
from minitf.checkpoint import CheckpointError, is_checkpoint, load_checkpoint, save_checkpoint
from minitf.config import GPTConfig, SizeError
from minitf.engine import Engine
from minitf.rundir import DirectoryLock, LockedError
from minitf.tokenizer import BPETokenizer

FORK = pytest.mark.skipif(not hasattr(os, "fork"), reason="crashes are simulated with os.fork")
TINY = ["--preset", "tiny", "--batch-size", "4", "--eval-windows", "4", "--final-eval-windows",
        "8", "--quiet", "--warmup", "2", "--decay-steps", "40", "--lr", "3e-3", "--threads", "1"]
PROG = "python -m minitf."


@pytest.fixture(scope="module")
def corpus(corpus_path, tmp_path_factory) -> Path:
    """The first 30,000 characters of the corpus: a tiny run loads it in milliseconds."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(corpus_path.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


def train_args(corpus, out, *extra) -> list[str]:
    return ["--data", str(corpus), "--out", str(out), *TINY, *extra]


def call(main, *argv) -> int:
    """A command's main in this process; its exit status."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def lines_of(stderr: str, prog: str) -> list[str]:
    """The messages of a command's standard error: each one line starting with its program
    name, never a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    for line in lines:
        assert line.startswith(PROG + prog + ":"), stderr
    return lines


def error_of(capsys, prog: str) -> str:
    """The one error line of an in-process run (warnings of a recovery may precede it)."""
    lines = [line for line in lines_of(capsys.readouterr().err, prog) if ": warning: " not in line]
    assert len(lines) == 1, lines
    return lines[0]


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(parent: Path, *keep: str) -> list[str]:
    """What minitf left beside its directories: temporaries, previous versions, locks."""
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def step_of(directory: Path) -> int:
    return load_checkpoint(directory).optimizer_state["step"]


@pytest.fixture(scope="module")
def run4(corpus, tmp_path_factory) -> Path:
    """A tiny run of 4 steps, checkpointed at step 4 with its loss curve: copy it to use it."""
    out = tmp_path_factory.mktemp("run4") / "run"
    assert call(train.main, *train_args(corpus, out, "--steps", "4", "--eval-interval", "2")) == 0
    return out


@pytest.fixture
def run_dir(run4, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run4, out)
    return out


# ---------------------------------------------------------------------------------------
# Two writers


HOLD = ("import sys; from minitf.rundir import DirectoryLock; DirectoryLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); sys.stdin.read()")


@pytest.fixture
def holder():
    """Start a process that holds the lock of a directory until the test ends."""
    procs = []

    def hold(directory) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("prog", ["train", "train --resume", "quantize", "convert", "prepare"])
def test_a_second_writer_is_refused_naming_the_first(prog, run_dir, corpus, holder, capsys):
    """Every command that writes a directory takes its lock before any work; a second writer
    gets one line naming the first's PID, exits 2 and leaves the directory as it was."""
    other = holder(run_dir)
    before = snapshot(run_dir)
    command = {
        "train": (train.main, *train_args(corpus, run_dir, "--steps", "2")),
        "train --resume": (train.main, *train_args(corpus, run_dir, "--steps", "6", "--resume")),
        "quantize": (quantize.main, "--out", run_dir, "--data", corpus),
        "convert": (convert.main, "--from-hf", corpus.parent, "--out", run_dir),
        "prepare": (prepare.main, corpus, "--out", run_dir, "--quiet"),
    }[prog]
    assert call(*command) == 2
    line = error_of(capsys, prog.split()[0])
    assert f"PID {other.pid}" in line and str(run_dir) in line and "being written" in line, line
    assert snapshot(run_dir) == before


def test_the_python_api_is_locked_too(run_dir, corpus, holder):
    other = holder(run_dir)
    ckpt = load_checkpoint(run_dir)  # readers need no lock
    with pytest.raises(LockedError, match=f"PID {other.pid}"):
        save_checkpoint(run_dir, ckpt.params, ckpt.config, ckpt.tokenizer)
    from minitf.trainer import Trainer
    with pytest.raises(LockedError, match=f"PID {other.pid}"):
        Trainer.resume(run_dir, corpus)


def test_two_trains_on_one_directory(corpus, tmp_path, capsys):
    """A second `train --out DIR` while the first runs is refused at once; the first ends
    with a loadable checkpoint."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "minitf.train",
                              *train_args(corpus, out, "--steps", "300", "--eval-interval", "100")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.stdout.readline().startswith("model:")  # it holds the lock from its start
    assert call(train.main, *train_args(corpus, out, "--steps", "2")) == 2
    assert f"PID {first.pid}" in error_of(capsys, "train")
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert step_of(out) == 300 and leftovers(tmp_path) == ["run"]


def test_a_lock_left_by_a_killed_process_is_taken_over(run_dir, corpus, holder):
    """flock dies with its process: the file a kill -9 leaves is locked again, and a lock
    file naming a live PID that holds nothing (a reused PID) is no obstacle either."""
    lock_file = run_dir.with_name(".run.minitf-lock")
    p = holder(run_dir)
    p.kill()
    p.wait()
    assert str(p.pid) in lock_file.read_text()  # left behind, naming the dead process
    assert call(train.main, *train_args(corpus, run_dir, "--steps", "6", "--eval-interval", "2",
                                        "--resume", "--no-plot")) == 0
    assert not lock_file.exists() and step_of(run_dir) == 6
    lock_file.write_text(json.dumps({"pid": 1, "host": "here", "command": "init"}))
    assert call(train.main, *train_args(corpus, run_dir, "--steps", "8", "--eval-interval", "2",
                                        "--resume", "--no-plot")) == 0
    assert not lock_file.exists() and step_of(run_dir) == 8


def test_a_lock_file_deleted_under_a_waiting_process(tmp_path, monkeypatch):
    """A process that opens the lock file just before its holder releases (and deletes) it
    ends up locking a deleted file; it notices and locks the file that is there now."""
    import fcntl

    directory = tmp_path / "d"
    lock_file = tmp_path / ".d.minitf-lock"
    real_flock, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:  # the first attempt: its holder deletes the file meanwhile
            os.unlink(lock_file)
        calls.append(os.fstat(fd).st_ino)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = DirectoryLock(directory).acquire()
    assert len(calls) == 2 and calls[1] == os.stat(lock_file).st_ino
    lock.release()
    assert not lock_file.exists()


def test_another_thread_is_refused_like_another_process(tmp_path):
    import threading

    errors = []
    with DirectoryLock(tmp_path / "d"):
        t = threading.Thread(target=lambda: errors.append(
            pytest.raises(LockedError, DirectoryLock(tmp_path / "d").acquire)))
        t.start()
        t.join()
        with DirectoryLock(tmp_path / "d"):  # the same thread again: re-entrant
            pass
    assert "another thread" in str(errors[0].value)


@FORK
@pytest.mark.filterwarnings("ignore:.*another process is saving it")  # between the renames
def test_a_reader_during_saves_always_gets_a_complete_checkpoint(run_dir):
    """generate and evaluate take no lock: while a writer saves again and again, every load
    returns one of the versions written, whole."""
    ckpt = load_checkpoint(run_dir)
    versions = [{k: v + i for k, v in ckpt.params.items()} for i in range(2)]
    stop = run_dir.with_name("stop")
    pid = os.fork()
    if pid == 0:
        try:
            i = 0
            while not stop.exists():
                save_checkpoint(run_dir, versions[i % 2], ckpt.config, ckpt.tokenizer,
                                meta={"i": i})
                i += 1
        finally:
            os._exit(0)
    try:
        seen = set()
        for _ in range(200):
            got = load_checkpoint(run_dir, optimizer=False).params["wte"]
            seen.update(i for i, v in enumerate(versions) if (got == v["wte"]).all())
        assert seen == {0, 1}
    finally:
        stop.touch()
        os.waitpid(pid, 0)


# ---------------------------------------------------------------------------------------
# A crash at every step of a checkpoint swap


def _in_child(body, timeout=120) -> int:
    """Run `body()` in a forked child that ends with os._exit (no cleanup of any kind, as
    when the power fails); its exit status."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body() or 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child did not finish")


def _swap_steps(run4, corpus, tmp_path) -> int:
    """How many renames a resumed run's one save makes (its files, then the two swaps)."""
    out = tmp_path / "count"
    shutil.copytree(run4, out)
    real, n = os.replace, [0]

    def counting(src, dst):
        n[0] += 1
        real(src, dst)

    os.replace = counting
    try:
        assert call(train.main, *train_args(corpus, out, "--steps", "6", "--eval-interval", "6",
                                            "--resume")) == 0
    finally:
        os.replace = real
    shutil.rmtree(out)
    return n[0]


@FORK
def test_a_crash_at_every_step_of_the_swap_loses_nothing(run4, corpus, tmp_path, capsys):
    """A resumed run (step 4 -> 6, one save) is killed at each step of its save: before each
    of its renames (the files written into .DIR.minitf-tmp, DIR -> .DIR.minitf-old,
    .DIR.minitf-tmp -> DIR), half way through deleting .DIR.minitf-old, and after. Then
    `train --out DIR` without --resume must refuse (the old code trained from scratch and
    deleted the survivor), --resume must continue from the newest complete checkpoint, and
    generate must run on it."""
    steps = _swap_steps(run4, corpus, tmp_path)
    assert steps == 9  # config, tokenizer, optimizer, train_state, meta, loss curve, model; 2 swaps
    for k in [*range(steps), "rmtree", "after"]:
        case = tmp_path / f"case-{k}"
        out = case / "run"
        shutil.copytree(run4, out)

        def crash():
            n, real_replace, real_rmtree = [0], os.replace, shutil.rmtree

            def replace(src, dst):
                if n[0] == k:
                    os._exit(0)
                n[0] += 1
                real_replace(src, dst)

            def rmtree(path, *a, **kw):  # the previous checkpoint, half deleted
                if k == "rmtree" and str(path).endswith(".minitf-old"):
                    for p in sorted(Path(path).iterdir())[::2]:
                        p.unlink()
                    os._exit(0)
                real_rmtree(path, *a, **kw)

            os.replace, shutil.rmtree = replace, rmtree
            return call(train.main, *train_args(corpus, out, "--steps", "6", "--eval-interval",
                                                "6", "--resume"))

        assert _in_child(crash) == 0
        newest = 4 if isinstance(k, int) and k < steps - 2 else 6  # the new one was complete
        capsys.readouterr()
        assert call(train.main, *train_args(corpus, out, "--steps", "2")) == 2, k
        assert "already holds a checkpoint" in error_of(capsys, "train"), k
        assert step_of(out) == newest, k
        assert leftovers(case, "run") == [], k
        assert call(train.main, *train_args(corpus, out, "--steps", "8", "--eval-interval", "8",
                                            "--resume")) == 0, k
        history = load_checkpoint(out).meta["history"]["train"]
        assert [s for s, _ in history] == list(range(1, 9)), k
        assert call(generate.main, "--model", out, "--backend", "numpy", "--max-new-tokens", "5",
                    "--seed", "1") == 0, k
        assert leftovers(case, "run") == [], k


# ---------------------------------------------------------------------------------------
# A full disk, for every file written


class _FullFile:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self):  # no copying around write() (shutil's sendfile): it fails the same way
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class full_disk:
    """Patch `open` so that the `at`-th file opened for writing under `root` (0-based) is on
    a full disk; with at=None only count them (`opened`: their paths, in order)."""

    def __init__(self, monkeypatch, root: Path, at: int | None = None):
        self.root, self.at, self.opened = str(root), at, []
        real = builtins.open

        def patched(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wxa") \
                    and os.path.abspath(file).startswith(self.root):
                self.opened.append(os.path.abspath(file))
                if len(self.opened) - 1 == self.at:
                    return _FullFile(f)
            return f

        monkeypatch.setattr(builtins, "open", patched)


def target_name(path: str) -> str:
    """The file a write was for: an atomic write's temporary `.NAME.<pid>.<hex>.tmp` -> NAME."""
    name = Path(path).name
    parts = name.split(".")
    if name.startswith(".") and name.endswith(".tmp") and len(parts) >= 5:
        return ".".join(parts[1:-3])
    return name


def _every_write_fails_cleanly(monkeypatch, capsys, root: Path, run, reset, check,
                               prog: str) -> list[str]:
    """Count the files `run()` opens for writing under `root`, then run it again with a full
    disk at each of them, after `reset()` each time: exit 2, one line saying so, and
    `check()` holds. Returns the names of the files written."""
    reset()
    counting = full_disk(monkeypatch, root)
    assert run() == 0
    monkeypatch.undo()
    files = counting.opened
    assert files, "nothing was written"
    for at, path in enumerate(files):
        reset()
        capsys.readouterr()
        full_disk(monkeypatch, root, at)
        code = run()
        monkeypatch.undo()
        assert code == 2, path
        line = error_of(capsys, prog)
        assert "No space left on device" in line, line
        check(path)
    return [target_name(f) for f in files]


def test_full_disk_at_every_file_of_a_training_checkpoint(run_dir, corpus, monkeypatch, capsys):
    pristine = run_dir.with_name("pristine")
    shutil.copytree(run_dir, pristine)
    before = snapshot(pristine)

    def reset():
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(pristine, run_dir)

    def run():
        return call(train.main, *train_args(corpus, run_dir, "--steps", "6", "--eval-interval",
                                            "2", "--resume"))

    def check(path):  # the checkpoint of step 4 is there as it was, and nothing else
        assert snapshot(run_dir) == before, path
        assert leftovers(run_dir.parent, "run", "pristine") == [], path

    written = _every_write_fails_cleanly(monkeypatch, capsys, run_dir.parent, run, reset, check,
                                         "train")
    assert {"config.json", "tokenizer.json", "optimizer.safetensors", "train_state.json",
            "meta.json", "loss_curve.png", "model.safetensors"} <= set(written), written


def test_full_disk_in_a_new_run_leaves_nothing(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "new"
    _every_write_fails_cleanly(
        monkeypatch, capsys, tmp_path,
        lambda: call(train.main, *train_args(corpus, out, "--steps", "2", "--eval-interval", "2")),
        lambda: shutil.rmtree(out, ignore_errors=True),
        lambda path: leftovers(tmp_path) == [], "train")


def test_full_disk_in_quantize_and_convert(run_dir, corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "int8"
    written = _every_write_fails_cleanly(
        monkeypatch, capsys, tmp_path,
        lambda: call(quantize.main, "--model", run_dir, "--out", out, "--data", corpus,
                     "--max-windows", "2", "--backend", "numpy"),
        lambda: shutil.rmtree(out, ignore_errors=True),
        lambda path: not out.exists() and leftovers(tmp_path, "run") == [], "quantize")
    assert {"quant_report.json", "quant_error.png", "model.safetensors"} <= set(written), written
    hf_dir, back = tmp_path / "hf", tmp_path / "back"

    def reset():
        for d in (hf_dir, back):
            shutil.rmtree(d, ignore_errors=True)

    def run():
        return call(convert.main, "--to-hf", hf_dir, "--model", run_dir) or \
            call(convert.main, "--from-hf", hf_dir, "--out", back)

    written = _every_write_fails_cleanly(
        monkeypatch, capsys, tmp_path, run, reset,
        lambda path: leftovers(tmp_path, "run", "hf") == [], "convert")
    assert {"generation_config.json", "tokenizer_config.json", "model.safetensors"} <= set(written)


def test_full_disk_in_prepare(corpus, tmp_path, monkeypatch, capsys):
    """Replacing a dataset from standard input (spooled to a file first), BPE."""
    out, pristine = tmp_path / "ds", tmp_path / "pristine"
    assert call(prepare.main, corpus, "--out", pristine, "--quiet") == 0
    before = snapshot(pristine)

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, out)

    def run():
        saved = sys.stdin
        sys.stdin = io.TextIOWrapper(open(corpus, "rb"))  # its .buffer: the corpus' bytes
        try:
            return call(prepare.main, "-", "--out", out, "--quiet", "--tokenizer", "bpe",
                        "--vocab-size", "300")
        finally:
            sys.stdin.close()
            sys.stdin = saved

    written = _every_write_fails_cleanly(
        monkeypatch, capsys, tmp_path, run, reset,
        lambda path: snapshot(out) == before and leftovers(tmp_path, "ds", "pristine") == [],
        "prepare")
    assert {"stdin.txt", "train.bin", "val.bin", "tokenizer.json", "dataset.json"} <= set(written)


def test_full_disk_while_writing_the_pictures_of_generate(tmp_path, monkeypatch, capsys):
    viz = tmp_path / "viz"
    written = _every_write_fails_cleanly(
        monkeypatch, capsys, tmp_path,
        lambda: call(generate.main, "--prompt", "ROMEO:", "--max-new-tokens", "3", "--seed", "1",
                     "--backend", "numpy", "--viz", viz),
        lambda: shutil.rmtree(viz, ignore_errors=True),
        lambda path: not [p for p in viz.iterdir() if p.name.endswith(".tmp")], "generate")
    assert {"memory_log.csv", "memory_log.png", "attn_prefill.png"} <= set(written), written


def _cli(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """python -m ARGS in a subprocess, output as bytes; an argument may be bytes (argv that
    is not UTF-8)."""
    argv = [os.fsencode(sys.executable), b"-m",
            *(a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args)]
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(argv, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                          timeout=300, **kwargs)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("prog", ["generate", "evaluate"])
def test_full_closed_or_vanished_standard_output(prog, corpus):
    args = {"generate": ["minitf.generate", "--max-new-tokens", "50", "--seed", "1"],
            "evaluate": ["minitf.evaluate", "--max-windows", "2", "--data", corpus]}[prog]
    args += ["--backend", "numpy"]
    with open("/dev/full", "w") as full:
        r = _cli(*args, stdout=full)
    assert r.returncode == 2
    assert lines_of(r.stderr.decode(), prog) == [f"{PROG}{prog}: error: cannot write standard "
                                                 f"output: No space left on device"]
    r = _cli(*args, stdout=None, preexec_fn=lambda: os.close(1))
    assert r.returncode == 2
    assert lines_of(r.stderr.decode(), prog) == [f"{PROG}{prog}: error: cannot write standard "
                                                 f"output: it is closed"]
    more = ["--max-new-tokens", "5000"] if prog == "generate" else []
    p = subprocess.Popen([sys.executable, "-m", *map(str, args), *more], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(5)
    p.stdout.close()  # the reader goes away, as `| head -c 5` does: a quiet end
    assert p.wait(timeout=300) == 0 and p.stderr.read() == b""


# ---------------------------------------------------------------------------------------
# kill -9 and SIGINT at random moments, then resume: the losses of an uninterrupted run


RANDOM_RUN = ["--steps", "60", "--eval-interval", "10", "--no-plot"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """The reference: the same run, never interrupted; its train losses and wall time."""
    out = tmp_path_factory.mktemp("ref") / "run"
    t = time.perf_counter()
    assert call(train.main, *train_args(corpus, out, *RANDOM_RUN)) == 0
    return load_checkpoint(out).meta["history"]["train"], time.perf_counter() - t


def _finish(corpus, out):
    """Continue an interrupted run: --resume if a checkpoint survived, else start again."""
    resume = ["--resume"] if is_checkpoint(out) else []
    assert call(train.main, *train_args(corpus, out, *RANDOM_RUN, *resume)) == 0
    return load_checkpoint(out).meta["history"]["train"]


@FORK
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_moment_then_resume_is_bitwise_exact(seed, corpus, tmp_path,
                                                                uninterrupted):
    reference, seconds = uninterrupted
    out = tmp_path / "run"
    delay = random.Random(seed).uniform(0.05, 1.2 * seconds)
    pid = os.fork()
    if pid == 0:
        try:
            call(train.main, *train_args(corpus, out, *RANDOM_RUN))
        finally:
            os._exit(0)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert _finish(corpus, out) == reference  # every loss, bit for bit (JSON keeps all digits)
    assert leftovers(tmp_path, "run") == []


@FORK
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigint_at_a_random_moment_checkpoints_and_says_how_to_resume(seed, corpus, tmp_path,
                                                                      uninterrupted):
    reference, seconds = uninterrupted
    out, err = tmp_path / "run", tmp_path / "stderr"
    delay = random.Random(100 + seed).uniform(0.05, 1.2 * seconds)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT)
            os.dup2(fd, 2)
            sys.stderr = open(2, "w", closefd=False)
            code = call(train.main, *train_args(corpus, out, *RANDOM_RUN))
            sys.stderr.flush()
        finally:
            os._exit(code)
    time.sleep(delay)
    os.kill(pid, signal.SIGINT)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    messages = lines_of(err.read_text(), "train")  # one line each
    if code == 0:  # it had finished
        assert load_checkpoint(out).meta["history"]["train"] == reference
        return
    errors = [m for m in messages if ": warning: " not in m]  # "stopping after step N ..."
    assert code == 130 and len(errors) == 1, messages
    line = errors[0]
    if "continue with: " in line:
        step = int(line.split("interrupted at step ")[1].split(";")[0])
        assert f"the checkpoint of step {step} is in {out}" in line and step_of(out) == step
        command = shlex.split(line.split("continue with: ")[1])
        assert command[:3] == ["python", "-m", "minitf.train"] and "--resume" in command
        assert call(train.main, *command[3:]) == 0
        assert load_checkpoint(out).meta["history"]["train"] == reference
    else:
        assert "before training began" in line and not is_checkpoint(out)
        assert _finish(corpus, out) == reference


def test_sigint_checkpoints_the_step_reached(run_dir, corpus, monkeypatch, capsys):
    """The first Ctrl-C stops after the step it interrupts and checkpoints that step (not
    the last eval_interval one); the message gives the exact command that continues."""
    from minitf import trainer as trainer_module

    real = trainer_module.train_step
    steps = [0]

    def interrupted_step(*args):
        steps[0] += 1
        if steps[0] == 3:  # step 4 -> 7: the third one is step 7
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(trainer_module, "train_step", interrupted_step)
    argv = train_args(corpus, run_dir, "--steps", "20", "--eval-interval", "10", "--resume")
    assert call(train.main, *argv) == 130
    line = error_of(capsys, "train")
    assert f"interrupted at step 7; the checkpoint of step 7 is in {run_dir}" in line, line
    assert line.endswith("continue with: python -m minitf.train " + shlex.join(argv))
    assert step_of(run_dir) == 7


def test_a_second_sigint_stops_at_once_and_keeps_the_last_checkpoint(run_dir, corpus,
                                                                    monkeypatch, capsys):
    from minitf import trainer as trainer_module

    real = trainer_module.train_step

    def twice(*args):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(trainer_module, "train_step", twice)
    before = snapshot(run_dir)
    assert call(train.main, *train_args(corpus, run_dir, "--steps", "20", "--resume")) == 130
    line = error_of(capsys, "train")
    assert "interrupted at step 4; the checkpoint of step 4 is in" in line and "--resume" in line
    assert snapshot(run_dir) == before


def test_sigint_before_training_began_says_nothing_was_written(corpus, tmp_path, monkeypatch,
                                                               capsys):
    from minitf import trainer as trainer_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "load_data", interrupt)
    assert call(train.main, *train_args(corpus, tmp_path / "run", "--steps", "4")) == 130
    assert "interrupted before training began" in error_of(capsys, "train")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------
# Checks before any work: writable, free space, memory, sizes


def _no_step_runs(monkeypatch):
    from minitf import trainer as trainer_module

    def never(*args):
        raise AssertionError("a training step ran before the checks")

    monkeypatch.setattr(trainer_module, "train_step", never)


def test_an_unwritable_out_is_refused_before_the_first_step(corpus, tmp_path, monkeypatch, capsys):
    _no_step_runs(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert call(train.main, *train_args(corpus, blocker / "run", "--steps", "4")) == 2
    line = error_of(capsys, "train")
    assert f"{blocker} is a file, not a directory" in line, line
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_is_refused_before_the_first_step(corpus, tmp_path, monkeypatch,
                                                            capsys):
    _no_step_runs(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert call(train.main, *train_args(corpus, ro / "run", "--steps", "4")) == 2
        assert "Permission denied" in error_of(capsys, "train")
    finally:
        ro.chmod(0o755)


def test_too_little_free_space_is_refused_before_the_first_step(corpus, tmp_path, monkeypatch,
                                                               capsys):
    _no_step_runs(monkeypatch)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert call(train.main, *train_args(corpus, tmp_path / "run", "--steps", "4")) == 2
    line = error_of(capsys, "train")
    assert "1.0 kB free on its filesystem" in line and "needs 4.3 MB" in line, line
    assert leftovers(tmp_path) == []


def test_the_parameter_count_is_exact_without_building_the_shapes():
    """The closed form the limit uses equals the shapes summed, and GPT-2 small's published
    124,439,808 (tied head); a billion layers are counted at once."""
    from math import prod

    from minitf.config import PRESETS, num_params, param_shapes

    for config in (*PRESETS.values(), GPTConfig(vocab_size=7, block_size=3, n_layer=5, n_head=3,
                                                d_model=9)):
        assert num_params(config) == sum(prod(s) for s in param_shapes(config).values())
    gpt2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768)
    assert num_params(gpt2) == 124_439_808
    with pytest.raises(SizeError, match="3,280,000,001,328 parameters"):
        GPTConfig(n_layer=10**9, d_model=16, n_head=2, block_size=16)


@pytest.mark.parametrize("flags, fragment", [
    (["--n-layer", "1000000000"], "n_layer=1000000000"),
    (["--d-model", "1048576", "--n-head", "1"], "d_model=1048576"),
    (["--block-size", "1000000000000"], "block_size=1000000000000"),
    (["--batch-size", "1000000000"], "training needs at least"),
])
def test_absurd_sizes_are_refused_before_allocation(flags, fragment, corpus, tmp_path, capsys):
    """Each a one-line refusal naming the field (or what needs the memory), the computed
    bytes and the limit; it comes at once: nothing was allocated."""
    assert call(train.main, *train_args(corpus, tmp_path / "run", "--steps", "4", *flags)) == 2
    line = error_of(capsys, "train")
    assert fragment in line, line
    assert ("parameters" in line and "MAX_PARAMS" in line) or ("bytes" in line and "memory" in line)
    assert leftovers(tmp_path) == []


def test_absurd_sizes_in_a_checkpoint_and_on_the_python_api(run_dir, tmp_path, monkeypatch,
                                                            capsys):
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "n_layer": 10**9}))
    assert call(generate.main, "--model", run_dir, "--backend", "numpy") == 2
    line = error_of(capsys, "generate")
    assert "config.json" in line and "n_layer=1000000000" in line and "MAX_PARAMS" in line, line
    with pytest.raises(SizeError, match=r"d_model=1000000: the model would have"):
        GPTConfig(d_model=10**6, n_head=1)
    from minitf import config as config_module
    from minitf.model import init_params
    from minitf.trainer import Trainer

    small = GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, d_model=16)
    params = init_params(small)
    monkeypatch.setattr(config_module, "memory_limit", lambda: 10_000)  # a tiny machine
    with pytest.raises(SizeError, match=r"an Engine for this model needs at least .* memory of 10.0 kB"):
        Engine(small, params, "numpy")
    text = tmp_path / "text.txt"
    # small enough for reading it (TEXT_MEMORY_PER_BYTE), not for training
    text.write_text("to be or not to be, that is the question\n" * 8)
    with pytest.raises(SizeError, match=r"^training needs at least"):
        Trainer.start(tmp_path / "new", text, config=small)
    assert leftovers(tmp_path, "run", "text.txt") == []


def test_a_model_file_larger_than_memory_is_refused_before_it_is_read(run_dir, monkeypatch):
    from minitf import config as config_module

    monkeypatch.setattr(config_module, "memory_limit", lambda: 10_000)
    with pytest.raises(CheckpointError, match=r"model.safetensors needs at least .* memory of 10.0 kB"):
        load_checkpoint(run_dir)


# ---------------------------------------------------------------------------------------
# Resume flags that conflict with the checkpoint, hostile meta.json and train_state.json


@pytest.mark.parametrize("flags, message", [
    (["--d-model", "32", "--n-head", "2"], "--d-model 32 conflicts with the checkpoint in {out}, which has d_model=16"),
    (["--n-layer", "3"], "which has n_layer=2"),
    (["--tokenizer", "bpe"], "--tokenizer bpe conflicts with the checkpoint in {out}, which has tokenizer=char"),
    (["--dtype", "float64"], "which has dtype=float32"),
    (["--preset", "default"], "--preset default (n_head=4) conflicts with the checkpoint in {out}, which has n_head=2"),
    (["--seed", "5"], "--seed 5 conflicts"),
    (["--dropout", "0.1"], "--dropout 0.1 conflicts with the checkpoint in {out}, which has dropout=0.0"),
])
def test_resume_flags_that_conflict_with_the_checkpoint_are_refused(flags, message, run_dir,
                                                                    corpus, capsys):
    before = snapshot(run_dir)
    argv = [a for a in train_args(corpus, run_dir, "--steps", "6", "--resume") if a not in ("--preset", "tiny")]
    assert call(train.main, *argv, *flags) == 2
    assert message.format(out=run_dir) in error_of(capsys, "train")
    assert snapshot(run_dir) == before


def test_resume_flags_that_agree_with_the_checkpoint_are_fine(run_dir, corpus):
    assert call(train.main, *train_args(corpus, run_dir, "--steps", "6", "--resume", "--d-model",
                                        "16", "--tokenizer", "char", "--dtype", "float32",
                                        "--seed", "1337", "--dropout", "0")) == 0
    assert step_of(run_dir) == 6


def _reseal(run_dir: Path, meta=None, state=None):
    """Write the checkpoint again through save_checkpoint with a hostile meta.json or
    train_state.json: a consistent seal, so the content itself is what is refused."""
    ckpt = load_checkpoint(run_dir)
    optimizer_state = {**ckpt.optimizer_state, **(state or {})}
    save_checkpoint(run_dir, ckpt.params, ckpt.config, ckpt.tokenizer,
                    optimizer_state=optimizer_state, meta=ckpt.meta if meta is None else meta)


@pytest.mark.parametrize("meta, fragment", [
    ({"args": []}, '"args" must be an object'),
    ({"args": {"steps": "2000"}}, '"args"."steps" must be an integer'),
    ({"args": {"decay_steps": -5}}, '"args"."decay_steps" must be an integer'),
    ({"history": {"train": "x", "val": []}}, '"history" must be'),
    ({"history": {"train": [[1, "4.2"]], "val": []}}, '"history" must be'),
    ({"history": {"train": [[1.5, 4.2]], "val": []}}, '"history" must be'),
    ({"history": []}, '"history" must be'),
])
def test_hostile_meta_is_refused_on_resume(meta, fragment, run_dir, corpus, capsys):
    _reseal(run_dir, meta=meta)
    before = snapshot(run_dir)
    assert call(train.main, *train_args(corpus, run_dir, "--steps", "6", "--resume")) == 2
    line = error_of(capsys, "train")
    assert "meta.json" in line and fragment in line, line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("state, fragment", [
    ({"rng_state": 5}, "train_state.json cannot be resumed from"),
    ({"rng_state": {"bit_generator": "MT19937", "state": {}}}, "train_state.json cannot be resumed from"),
    ({"rng_state": {"bit_generator": "PCG64", "state": {"state": "x", "inc": 1},
                    "has_uint32": 0, "uinteger": 0}}, "train_state.json cannot be resumed from"),
])
def test_hostile_train_state_is_refused_on_resume(state, fragment, run_dir, corpus, capsys):
    _reseal(run_dir, state=state)
    assert call(train.main, *train_args(corpus, run_dir, "--steps", "6", "--resume")) == 2
    assert fragment in error_of(capsys, "train")


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: {**d, "step": "4"}, 'must be a JSON object with an integer "step" >= 0'),
    (lambda d: {**d, "step": -1}, 'must be a JSON object with an integer "step" >= 0'),
    (lambda d: [d], 'must be a JSON object with an integer "step"'),
])
def test_a_tampered_train_state_is_refused(edit, fragment, run_dir, corpus, capsys):
    """Edited by hand (so the seal no longer matches): the content is reported first when it
    is wrong, the seal when it is merely different."""
    path = run_dir / "train_state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert call(train.main, *train_args(corpus, run_dir, "--steps", "6", "--resume")) == 2
    assert fragment in error_of(capsys, "train")


@pytest.mark.parametrize("name, edit", [
    ("meta.json", lambda t: t.replace('"step": 4', '"step": 3')),
    ("meta.json", lambda t: "[" * 100_000 + "]" * 100_000),
    ("train_state.json", lambda t: t.replace('"step": 4', '"step": 3')),
    ("tokenizer.json", lambda t: t.replace('"a": ', '"`": ', 1)),  # still sorted: it parses
    ("config.json", lambda t: t.replace("1e-05", "1e-06")),
    ("loss_curve.png", None),
])
def test_every_file_of_a_checkpoint_is_covered_by_its_seal(name, edit, run_dir, corpus, capsys):
    """A file changed after the save is refused naming it, by the API and by the command
    that reads it (generate; train --resume for the training state)."""
    path = run_dir / name
    if edit is None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    else:
        text = path.read_text()
        assert edit(text) != text
        path.write_text(edit(text))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(run_dir)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    if name == "train_state.json":
        assert call(train.main, *train_args(corpus, run_dir, "--steps", "6", "--resume")) == 2
        assert str(path) in error_of(capsys, "train")
    else:
        assert call(generate.main, "--model", run_dir, "--backend", "numpy") == 2
        assert str(path) in error_of(capsys, "generate")


@pytest.mark.parametrize("tokenizer_json, fragment", [
    ({"model": 5}, "tokenizers library rejects it"),
    ({"model": {"type": "BPE", "vocab": {"a": "x"}, "merges": []}}, "tokenizers library rejects it"),
    ({"model": {"type": "BPE", "vocab": {"a": 0, "b": 5}, "merges": []}, "decoder": {"type": "Fuse"},
      "pre_tokenizer": None, "normalizer": None, "post_processor": None, "added_tokens": [],
      "version": "1.0", "truncation": None, "padding": None}, "ids are not exactly"),
    ({"type": "char", "version": 1, "chars": "abc"}, '"chars" must be a list'),
    ({"type": "exe", "version": 1}, "unknown tokenizer type"),
    ([[[[[[]]]]]], "not a tokenizer"),
])
def test_hostile_tokenizer_json_is_one_line(tokenizer_json, fragment, run_dir, tmp_path, capsys):
    """The tokenizer's reader refuses each on one line; inside a sealed checkpoint, the seal
    refuses it first, before the `tokenizers` library (Rust, which can panic) sees it."""
    from minitf.tokenizer import TokenizerError, load_tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(TokenizerError, match=fragment) as e:
        load_tokenizer(tmp_path / "tokenizer.json")
    assert "\n" not in str(e.value)
    (run_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(CheckpointError, match="tokenizer.json: does not match the SHA-256"):
        load_checkpoint(run_dir)
    assert call(generate.main, "--model", run_dir, "--backend", "numpy") == 2
    assert "tokenizer.json: does not match the SHA-256" in error_of(capsys, "generate")


def test_the_tokenizer_seal_is_checked_before_the_tokenizer_is_parsed(run_dir, monkeypatch):
    from minitf import checkpoint as checkpoint_module

    def parsed(path):
        raise AssertionError(f"{path} was parsed before its seal was checked")

    (run_dir / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}}}')
    monkeypatch.setattr(checkpoint_module, "load_tokenizer", parsed)
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_checkpoint(run_dir)


def test_a_sealed_checkpoint_refuses_a_file_it_did_not_write(run_dir):
    ckpt = load_checkpoint(run_dir)
    save_checkpoint(run_dir, ckpt.params, ckpt.config, ckpt.tokenizer)  # no meta, no optimizer
    (run_dir / "meta.json").write_text('{"quantization": {"scope": "all", "mode": "w8a8"}}')
    with pytest.raises(CheckpointError, match="meta.json: not part of the checkpoint as it was saved"):
        load_checkpoint(run_dir)


# ---------------------------------------------------------------------------------------
# Prompts that are not UTF-8, locales that cannot print them


@pytest.fixture(scope="module")
def bpe_model(corpus, tmp_path_factory) -> Path:
    tok = BPETokenizer.train(corpus.read_text(encoding="utf-8"), vocab_size=300)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16)
    from minitf.model import init_params

    out = tmp_path_factory.mktemp("bpe") / "model"
    save_checkpoint(out, init_params(config, seed=0), config, tok)
    return out


@pytest.mark.parametrize("model", ["bpe", "char"])
def test_a_prompt_that_is_not_utf8(model, bpe_model):
    """argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)."""
    where = ["--model", str(bpe_model)] if model == "bpe" else []
    r = _cli("minitf.generate", *where, "--backend", "numpy", "--prompt", os.fsencode("ab\udcff"))
    assert r.returncode == 2
    (line,) = lines_of(r.stderr.decode(errors="replace"), "generate")
    assert "the byte 0xFF, which is not UTF-8" in line, line


def test_a_non_ascii_prompt_under_the_c_locale(bpe_model):
    prompt = "né".encode()
    args = ("minitf.generate", "--model", bpe_model, "--backend", "numpy", "--max-new-tokens", "3",
            "--seed", "1", "--prompt", prompt)
    r = _cli(*args, env={"LC_ALL": "C"})  # Python's UTF-8 mode: works
    assert r.returncode == 0 and r.stdout.startswith(prompt), r.stderr
    r = _cli(*args, env={"LC_ALL": "C", "PYTHONUTF8": "0"})  # an ASCII standard output
    assert r.returncode == 2
    (line,) = lines_of(r.stderr.decode(errors="replace"), "generate")
    assert "cannot print" in line and "U+00E9" in line and "PYTHONUTF8=1" in line, line


def test_an_internal_error_is_one_line_with_a_hint(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise TypeError("something minitf did wrong")

    monkeypatch.setattr(generate, "load_engine", broken)
    assert call(generate.main) == 1
    line = error_of(capsys, "generate")
    assert "internal error: TypeError: something minitf did wrong" in line and "MINITF_DEBUG=1" in line


@pytest.mark.parametrize("prog, flag", [
    ("train", "--out"), ("train", "--data"), ("quantize", "--out"), ("quantize", "--model"),
    ("prepare", "--out"), ("convert", "--to-hf"), ("convert", "--from-hf"), ("evaluate", "--model"),
    ("generate", "--model"), ("generate", "--viz"),
])
def test_an_empty_path_is_refused_rather_than_read_as_the_default(prog, flag, tmp_path, capsys,
                                                                   monkeypatch):
    """`--out "$UNSET"` names no directory: it must not fall back to the default model or the
    current directory."""
    monkeypatch.chdir(tmp_path)
    main = {"train": train.main, "quantize": quantize.main, "prepare": prepare.main,
            "convert": convert.main, "evaluate": evaluate.main, "generate": generate.main}[prog]
    extra = ["source.txt"] if prog == "prepare" else []
    assert call(main, *extra, flag, "") == 2
    line = error_of(capsys, prog)
    assert flag in line and "empty path" in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------------------------------
# Inputs that never end, or that the machine cannot hold


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize("prog, flags, fragment", [
    ("train", ["--data", "/dev/zero", "--out", "{tmp}/new"], "/dev/zero: not a regular file"),
    ("evaluate", ["--data", "/dev/zero", "--model", "{run}"], "/dev/zero: not a regular file"),
    ("generate", ["--prompt-file", "/dev/zero", "--model", "{run}"],
     "--prompt-file /dev/zero: not a regular file"),
])
def test_an_endless_input_is_refused_before_it_is_read(prog, flags, fragment, run_dir, tmp_path,
                                                       capsys):
    main = {"train": train.main, "evaluate": evaluate.main, "generate": generate.main}[prog]
    argv = [f.format(tmp=tmp_path, run=run_dir) for f in flags]
    assert call(main, *argv, "--backend", "numpy") == 2
    assert fragment in error_of(capsys, prog)


def test_a_text_larger_than_memory_is_refused_before_it_is_read(corpus, tmp_path, monkeypatch,
                                                                capsys):
    from minitf import config as config_module

    monkeypatch.setattr(config_module, "memory_limit", lambda: 10_000)
    assert call(train.main, *train_args(corpus, tmp_path / "run", "--steps", "1")) == 2
    line = error_of(capsys, "train")
    assert f"corpus file {corpus}" in line and "memory of 10.0 kB" in line, line


@pytest.mark.parametrize("text", ["1e400", "Infinity", "NaN", "1" + "0" * 400, "0.0", "1.0", "2",
                                  "true", '"1e-5"'])
def test_a_layer_norm_eps_that_is_not_a_small_positive_float(text, run_dir, capsys):
    config = (run_dir / "config.json").read_text()
    assert '"layer_norm_eps": 1e-05' in config
    (run_dir / "config.json").write_text(config.replace('"layer_norm_eps": 1e-05',
                                                        f'"layer_norm_eps": {text}'))
    with pytest.raises(CheckpointError, match=r"layer_norm_eps=.* must be a finite float in \(0, 1\)"):
        load_checkpoint(run_dir)
    assert call(generate.main, "--model", run_dir, "--backend", "numpy") == 2
    assert "layer_norm_eps" in error_of(capsys, "generate")


def test_a_stop_string_that_is_not_utf8_is_refused_like_a_prompt():
    r = _cli("minitf.generate", "--backend", "numpy", "--stop", os.fsencode("ab\udcff"))
    assert r.returncode == 2
    (line,) = lines_of(r.stderr.decode(errors="replace"), "generate")
    assert "--stop: " in line and "the byte 0xFF, which is not UTF-8" in line, line


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_a_symlink_loop_as_a_path_is_one_line_exit_2(corpus, tmp_path, capsys):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    assert call(generate.main, "--model", loop, "--backend", "numpy") == 2
    assert str(loop) in error_of(capsys, "generate")
    assert call(train.main, *train_args(corpus, loop, "--steps", "1")) == 2
    assert str(loop) in error_of(capsys, "train")
