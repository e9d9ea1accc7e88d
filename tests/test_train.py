"""The training command: exact resume (with dropout too), divergence handling, bad flags, the
best checkpoint, and a golden run that every backend trains alike."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from minitf import train
from minitf.checkpoint import load_checkpoint
from minitf.engine import Engine
from minitf.kernels import BACKENDS
from tolerances import TOL

TINY = ["--preset", "tiny", "--batch-size", "4", "--eval-windows", "4", "--final-eval-windows", "8",
        "--quiet", "--no-plot",
        "--warmup", "2", "--decay-steps", "8", "--lr", "3e-3"]


def run_train(corpus_path, out, *extra):
    args = train.build_parser().parse_args(["--data", str(corpus_path), "--out", str(out), *TINY, *extra])
    return train.run(args, log=lambda *a: None)


@pytest.mark.parametrize("dropout", [[], ["--dropout", "0.2"]], ids=["plain", "dropout"])
def test_resume_continues_exactly(corpus_path, tmp_path, dropout):
    """2N steps in one run equal N steps, then --resume for N more: same weights, same losses
    (bit for bit: the batches and the dropout masks both come from the checkpointed RNG)."""
    run_train(corpus_path, tmp_path / "once", "--steps", "8", "--eval-interval", "4", *dropout)
    run_train(corpus_path, tmp_path / "twice", "--steps", "4", "--eval-interval", "4", *dropout)
    run_train(corpus_path, tmp_path / "twice", "--steps", "8", "--eval-interval", "4", "--resume")
    once, twice = load_checkpoint(tmp_path / "once"), load_checkpoint(tmp_path / "twice")
    assert once.optimizer_state["step"] == twice.optimizer_state["step"] == 8
    for name, p in once.params.items():
        np.testing.assert_array_equal(p, twice.params[name], err_msg=name)
    assert once.meta["history"]["train"] == twice.meta["history"]["train"]


def test_the_final_validation_is_announced(corpus_path, tmp_path):
    """The last step's validation (the whole split by default) is said before it runs, with
    its window count, so a long final evaluation is not a silent pause."""
    lines = []
    args = train.build_parser().parse_args(["--data", str(corpus_path), "--out", str(tmp_path / "r"),
                                            *TINY, "--steps", "4", "--eval-interval", "2"])
    train.run(args, log=lambda *a: lines.append(" ".join(map(str, a))))
    said = [i for i, line in enumerate(lines) if "final validation" in line]
    assert len(said) == 1, lines
    assert lines[said[0]] == ("step 4: final validation over 8 windows, then the train split's loss "
                              "over 4 (in the result line)")
    assert lines[said[0] + 1].startswith("step 4: train loss"), lines


def test_resume_keeps_the_runs_own_settings(corpus_path, tmp_path, capsys):
    """--resume with only --steps: every optimization and evaluation setting is the run's own
    (non-default --warmup, --lr, --batch-size, ...), so the losses equal one uninterrupted run
    bit for bit; a flag given that differs is said in one line; --steps at or below the
    checkpoint's step says that no step ran."""
    run_train(corpus_path, tmp_path / "once", "--steps", "8", "--eval-interval", "4")
    run_train(corpus_path, tmp_path / "twice", "--steps", "4", "--eval-interval", "4")
    bare = ["--data", str(corpus_path), "--out", str(tmp_path / "twice"), "--resume", "--quiet",
            "--no-plot"]
    assert train.main([*bare, "--steps", "8"]) == 0
    once, twice = load_checkpoint(tmp_path / "once"), load_checkpoint(tmp_path / "twice")
    assert once.meta["history"]["train"] == twice.meta["history"]["train"]
    for name in ("warmup", "lr", "batch_size", "eval_windows", "decay_steps"):
        assert twice.meta["args"][name] == once.meta["args"][name], name
    capsys.readouterr()
    assert train.main([*bare, "--steps", "8"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at step 8 already; no step ran" in err[0], err
    assert train.main([*bare, "--steps", "10", "--lr", "0.005"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--lr 0.005 replaces the run's 0.003" in err[0], err
    # the run's cosine ended at its --decay-steps 8: steps 9 and 10 run at --min-lr, said
    assert "steps 9 to 10 run past the run's cosine decay, which ends at step 8" in err[1], err
    assert load_checkpoint(tmp_path / "twice").meta["args"]["lr"] == 0.005
    # --min-lr alone is checked against the run's own --lr (0.005 now), not the default
    assert train.main([*bare, "--steps", "11", "--decay-steps", "11", "--min-lr", "0.002"]) == 0
    assert load_checkpoint(tmp_path / "twice").meta["args"]["min_lr"] == 0.002


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


@pytest.mark.parametrize("field,value,message", [
    ("steps", -1, "steps=-1 is not allowed: it must be an integer >= 0"),
    ("batch_size", 2.0, "batch_size=2.0 is not allowed: it must be an integer >= 1"),
    ("lr", float("inf"), "lr=inf is not allowed: it must be a finite number > 0"),
    ("beta1", 1.0, "beta1=1.0 is not allowed: it must be a finite number in [0, 1)"),
    ("keep_best", 1, "keep_best=1 is not allowed: it must be True or False"),
    ("dtype", "float16", "dtype='float16' is not allowed: it must be float32 or float64"),
    ("min_lr", 0.5, "min_lr=0.5 must be at most lr=0.001"),
])
def test_train_settings_refuse_a_bad_field_by_name(field, value, message):
    from minitf.trainer import TrainSettings

    with pytest.raises(ValueError) as e:
        TrainSettings(**{field: value})
    assert str(e.value) == message


def test_trainer_start_refuses_settings_that_are_not_train_settings(corpus_path, tmp_path):
    from minitf.config import PRESETS
    from minitf.trainer import Trainer, TrainSettings

    with pytest.raises(TypeError, match="settings must be a TrainSettings and config a GPTConfig, got dict"):
        Trainer.start(tmp_path / "x", corpus_path, {"steps": 3}, PRESETS["tiny"])
    with pytest.raises(TypeError, match="got TrainSettings and str"):
        Trainer.start(tmp_path / "x", corpus_path, TrainSettings(), "tiny")
    assert not (tmp_path / "x").exists()


def test_train_settings_take_numpy_numbers_as_python_ones():
    """A numpy integer or float is allowed and stored as the Python number the run's
    meta.json records."""
    from minitf.trainer import TrainSettings

    s = TrainSettings(steps=np.int64(5), lr=np.float32(0.5), min_lr=0)
    assert type(s.steps) is int and s.steps == 5 and type(s.lr) is float and s.lr == 0.5
    json.dumps(dataclasses.asdict(s))


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
    code = train.main(["--data", str(corpus_path), "--out", str(out), *TINY, "--steps", "8", "--eval-interval", "4",
                       "--threads", "1"])  # one forward and backward per step
    assert code == 1
    err = capsys.readouterr().err
    assert "diverged at step 5" in err and "loss nan" in err
    ckpt = load_checkpoint(out)  # the checkpoint of step 4 is intact
    assert ckpt.optimizer_state["step"] == 4


@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "argument --lr: -1 is not allowed: it must be a finite number > 0"),
    (["--lr", "nan"], "argument --lr: nan is not allowed: it must be a finite number > 0"),
    (["--lr", "-inf"], "argument --lr: -inf is not allowed: it must be a finite number > 0"),
    (["--min-lr", "-1e-3"], "argument --min-lr: -1e-3 is not allowed: it must be a finite number >= 0"),
    (["--min-lr", "0.01"], "--min-lr 0.01 must be in [0, --lr=0.003]"),
    (["--beta2", "1"], "argument --beta2: 1 is not allowed: it must be a finite number in [0, 1)"),
    (["--n-head", "7"], "d_model=16 is not divisible by n_head=7"),
    (["--steps", "-3"], "argument --steps: -3 is not allowed: it must be an integer >= 0"),
    (["--eval-windows", "many"], "argument --eval-windows: 'many' is not allowed: it must be an integer >= 1"),
    (["--tokenizer", "word"], "invalid choice: 'word'"),
    (["--dropout", "1.5"], "argument --dropout: 1.5 is not allowed: it must be a number in [0, 1)"),
    (["--backend", "fortran"], "unknown kernel backend 'fortran'"),
    (["--tokenizer", "bpe", "--vocab-size", "99999999999"],
     "argument --vocab-size: 99999999999 must be in [256, 16777216]"),
    (["--seed", "-5"], "argument --seed: -5 is not allowed: it must be an integer >= 0"),
    (["--tokenizer", "char", "--vocab-size", "500"], "--vocab-size 500 applies to --tokenizer bpe only"),
    (["--vocab-size", "500"], "--vocab-size 500 applies to --tokenizer bpe only"),  # char: the default
])
def test_bad_flags_give_one_line_and_exit_2(corpus_path, tmp_path, flags, message):
    proc = subprocess.run(
        [sys.executable, "-m", "minitf.train", "--data", str(corpus_path), "--out", str(tmp_path / "x"),
         *TINY, "--steps", "1", *flags], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_steps_within_the_warmup_warn_on_one_line(corpus_path, tmp_path, steps):
    """TINY has --warmup 2: 1 or 2 steps never leave the linear ramp (their last rate is
    3e-3 * steps / 3, nanoGPT's (it + 1) / (warmup + 1)); 3 steps reach the cosine."""
    proc = subprocess.run(
        [sys.executable, "-m", "minitf.train", "--data", str(corpus_path), "--out", str(tmp_path / "x"),
         *TINY, "--steps", str(steps), "--eval-interval", "10"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "warning" in line]
    if steps > 2:
        assert warned == [], proc.stderr
        return
    assert warned == [f"python -m minitf.train: warning: --steps {steps} <= --warmup 2: the learning "
                      f"rate never leaves warm-up (it rises to {3e-3 * steps / 3:.3g}, not --lr "
                      f"0.003); give --steps above --warmup, or a smaller --warmup"], proc.stderr


def test_missing_corpus_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minitf.train", "--data", str(tmp_path / "nope.txt"),
                           "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "nope.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_golden_run_every_backend_agrees(corpus_path, tmp_path):
    """A tiny model trained for 10 steps with a fixed seed: its losses fall, its checkpoint and
    loss curve are written, every training backend gives the same 10 losses, and every
    backend greedily generates the same text from the model."""
    losses = {}
    for backend in BACKENDS:
        out = tmp_path / backend
        result = run_train(corpus_path, out, "--steps", "10", "--eval-interval", "5", "--seed", "7",
                           "--backend", backend)
        ckpt = load_checkpoint(out)
        losses[backend] = [loss for _, loss in ckpt.meta["history"]["train"]]
        assert ckpt.meta["args"]["backend"] == backend
    golden = losses["numpy"]
    assert len(golden) == 10 and golden[-1] < golden[0] < np.log(65) + 0.1, golden
    for backend, got in losses.items():
        err = max(abs(a - b) / b for a, b in zip(got, golden))
        assert err <= TOL[("train_losses", np.float32)], f"{backend}: losses {got} vs {golden}"
    assert 0 < result["val"]["bits_per_char"] < 6.1
    ckpt = load_checkpoint(tmp_path / "numpy")
    texts = {}
    for backend in BACKENDS:
        engine = Engine(ckpt.config, ckpt.params, backend)
        ids = list(engine.generate(ckpt.tokenizer.encode("ROMEO:"), 40, lambda l: int(np.argmax(l))))
        texts[backend] = ckpt.tokenizer.decode(ids)
    assert len(set(texts.values())) == 1, texts


def test_keep_best_keeps_the_best_validation_checkpoint(corpus_path, tmp_path):
    """--keep-best writes OUT/best, a checkpoint of the step with the lowest validation loss
    (on the same windows at every validation), recorded in the run's history, which a
    resumed run continues from."""
    out = tmp_path / "run"
    run_train(corpus_path, out, "--steps", "6", "--eval-interval", "2", "--keep-best")
    run_ckpt, best = load_checkpoint(out), load_checkpoint(out / "best")
    record = run_ckpt.meta["history"]["best"]
    val = dict(run_ckpt.meta["history"]["val"])
    assert record["step"] in val and best.meta["step"] == record["step"]
    assert best.optimizer_state is None and best.config == run_ckpt.config
    assert record["step"] == 6, run_ckpt.meta["history"]  # a short run still improves
    for name, p in run_ckpt.params.items():  # so the best is the last
        np.testing.assert_array_equal(best.params[name], p, err_msg=name)
    # at the last step val is the whole split; "best" compares the same 4 windows every time
    assert best.meta["val"]["windows"] == 4
    run_train(corpus_path, out, "--steps", "8", "--eval-interval", "2", "--keep-best", "--resume")
    again = load_checkpoint(out).meta["history"]["best"]
    assert again["step"] >= record["step"] and again["val_loss"] <= record["val_loss"]


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


@pytest.mark.parametrize("lr", ["1e30", "1000"], ids=["nan", "finite-but-huge"])
def test_divergence_from_a_huge_learning_rate_is_reported(corpus_path, tmp_path, capsys, lr):
    """lr 1e30 makes the weights NaN; lr 1000 leaves them finite with a validation loss far
    past what a perplexity can hold (e^loss overflows past ~709 nats): both are divergence,
    exit 1, the last good checkpoint kept."""
    out = tmp_path / "div"
    assert train.main(["--data", str(corpus_path), "--out", str(out), *TINY, "--steps", "2", "--eval-interval", "2"]) == 0
    code = train.main(["--data", str(corpus_path), "--out", str(out), *TINY, "--steps", "12", "--eval-interval", "2",
                       "--lr", lr, "--min-lr", "0", "--decay-steps", "12", "--resume"])
    assert code == 1
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "the last good checkpoint (step 2) is kept" in err, err
    assert np.all(np.isfinite(load_checkpoint(out).params["wte"]))  # the last good one
