"""The training command: exact resume, divergence handling, bad flags, and a golden run."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from minitf import train
from minitf.checkpoint import load_checkpoint
from minitf.engine import Engine

TINY = ["--preset", "tiny", "--batch-size", "4", "--eval-windows", "4", "--final-eval-windows", "8",
        "--quiet", "--no-plot",
        "--warmup", "2", "--decay-steps", "8", "--lr", "3e-3"]


def run_train(corpus_path, out, *extra):
    args = train.build_parser().parse_args(["--data", str(corpus_path), "--out", str(out), *TINY, *extra])
    return train.run(args, log=lambda *a: None)


def test_resume_continues_exactly(corpus_path, tmp_path):
    """2N steps in one run equal N steps, then --resume for N more: same weights, same losses."""
    run_train(corpus_path, tmp_path / "once", "--steps", "8", "--eval-interval", "4")
    run_train(corpus_path, tmp_path / "twice", "--steps", "4", "--eval-interval", "4")
    run_train(corpus_path, tmp_path / "twice", "--steps", "8", "--eval-interval", "4", "--resume")
    once, twice = load_checkpoint(tmp_path / "once"), load_checkpoint(tmp_path / "twice")
    assert once.optimizer_state["step"] == twice.optimizer_state["step"] == 8
    for name, p in once.params.items():
        np.testing.assert_array_equal(p, twice.params[name], err_msg=name)
    assert once.meta["history"]["train"] == twice.meta["history"]["train"]


def test_the_python_api_trains_as_the_command_does(corpus_path, tmp_path):
    """Trainer/TrainSettings without argparse: the same run as the command, then a resume."""
    from minitf.config import PRESETS
    from minitf.trainer import Trainer, TrainSettings

    run_train(corpus_path, tmp_path / "cli", "--steps", "4", "--eval-interval", "4")
    settings = TrainSettings(steps=4, batch_size=4, eval_windows=4, final_eval_windows=8,
                             warmup=2, decay_steps=8, lr=3e-3, eval_interval=4)
    trainer = Trainer.start(tmp_path / "api", corpus_path, settings, PRESETS["tiny"])
    trainer.train(progress=False, plot=False, log=lambda *a: None)
    cli, api = load_checkpoint(tmp_path / "cli"), load_checkpoint(tmp_path / "api")
    for name, p in cli.params.items():
        np.testing.assert_array_equal(p, api.params[name], err_msg=name)
    more = Trainer.resume(tmp_path / "api", corpus_path, dataclasses.replace(settings, steps=6))
    assert more.step == 4 and more.schedule.decay_steps == 8
    more.train(progress=False, plot=False, log=lambda *a: None)
    assert load_checkpoint(tmp_path / "api").optimizer_state["step"] == 6


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus_path, tmp_path, monkeypatch, capsys):
    from minitf.model import GPT

    real = GPT.loss_and_grads
    calls = {"n": 0}

    def poisoned(self, x, y, *args):
        calls["n"] += 1
        loss, grads = real(self, x, y, *args)
        return (float("nan") if calls["n"] == 6 else loss), grads

    monkeypatch.setattr(GPT, "loss_and_grads", poisoned)
    out = tmp_path / "run"
    code = train.main(["--data", str(corpus_path), "--out", str(out), *TINY, "--steps", "8", "--eval-interval", "4"])
    assert code == 1
    err = capsys.readouterr().err
    assert "diverged at step 5" in err and "loss nan" in err
    ckpt = load_checkpoint(out)  # the checkpoint of step 4 is intact
    assert ckpt.optimizer_state["step"] == 4


@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "--lr -1.0 must be a finite number > 0"),
    (["--n-head", "7"], "d_model=16 is not divisible by n_head=7"),
    (["--steps", "-3"], "-3 must be >= 0"),
    (["--tokenizer", "word"], "invalid choice: 'word'"),
])
def test_bad_flags_give_one_line_and_exit_2(corpus_path, tmp_path, flags, message):
    proc = subprocess.run(
        [sys.executable, "-m", "minitf.train", "--data", str(corpus_path), "--out", str(tmp_path / "x"),
         *TINY, "--steps", "1", *flags], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_corpus_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minitf.train", "--data", str(tmp_path / "nope.txt"),
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_golden_run_every_backend_agrees(corpus_path, tmp_path):
    """A tiny model trained for 8 steps with a fixed seed: its losses fall, its checkpoint and
    loss curve are written, and every backend greedily generates the same text from it."""
    out = tmp_path / "golden"
    result = run_train(corpus_path, out, "--steps", "8", "--eval-interval", "4", "--seed", "7")
    ckpt = load_checkpoint(out)
    losses = [loss for _, loss in ckpt.meta["history"]["train"]]
    assert len(losses) == 8 and losses[-1] < losses[0] < np.log(65) + 0.1, losses
    assert 0 < result["val"]["bits_per_char"] < 6.1
    texts = {}
    for backend in ("numpy", "numba", "cython"):
        engine = Engine(ckpt.config, ckpt.params, backend)
        ids = list(engine.generate(ckpt.tokenizer.encode("ROMEO:"), 40, lambda l: int(np.argmax(l))))
        texts[backend] = ckpt.tokenizer.decode(ids)
    assert len(set(texts.values())) == 1, texts


def test_loss_curve_is_written(corpus_path, tmp_path):
    args = train.build_parser().parse_args(["--data", str(corpus_path), "--out", str(tmp_path / "p"),
                                            *[a for a in TINY if a != "--no-plot"], "--steps", "4",
                                            "--eval-interval", "2"])
    train.run(args, log=lambda *a: None)
    png = (tmp_path / "p" / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_never_deletes_or_overwrites_user_data(corpus_path, tmp_path):
    """A user's own DIR.old, a folder that merely has a config.json, and a trained run that
    --resume was not asked for are all left alone."""
    mine = tmp_path / "run.old" / "photos"
    mine.mkdir(parents=True)
    (mine / "a.jpg").write_text("x")
    run_train(corpus_path, tmp_path / "run", "--steps", "2", "--eval-interval", "2")
    assert (mine / "a.jpg").read_text() == "x"

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="not a minitf checkpoint"):
        run_train(corpus_path, proj, "--steps", "2", "--eval-interval", "2")
    assert (proj / "config.json").read_text() == '{"mine": 1}'

    before = load_checkpoint(tmp_path / "run").params["wte"].copy()
    with pytest.raises(ValueError, match="already holds a checkpoint; continue it with --resume"):
        run_train(corpus_path, tmp_path / "run", "--steps", "2", "--eval-interval", "2")
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "run").params["wte"], before)


def test_divergence_from_a_huge_learning_rate_is_reported(corpus_path, tmp_path, capsys):
    out = tmp_path / "div"
    assert train.main(["--data", str(corpus_path), "--out", str(out), *TINY, "--steps", "2", "--eval-interval", "2"]) == 0
    code = train.main(["--data", str(corpus_path), "--out", str(out), *TINY, "--steps", "12", "--eval-interval", "2",
                       "--lr", "1e30", "--min-lr", "0", "--resume"])
    assert code == 1
    assert "training diverged at step" in capsys.readouterr().err
    assert np.all(np.isfinite(load_checkpoint(out).params["wte"]))  # the last good one
