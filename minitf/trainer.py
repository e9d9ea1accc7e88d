"""Training a GPT with the hand-written backward pass: a run in a checkpoint directory.

    from minitf.trainer import Trainer, TrainSettings
    trainer = Trainer.start("runs/char", "input.txt", TrainSettings(steps=500))
    result = trainer.train()                      # validation metrics at the last step
    trainer = Trainer.resume("runs/char", "input.txt", TrainSettings(steps=1000))
    trainer.train()                               # continues exactly where the run stopped

Each step (`train_step`): a random batch of windows from the training split, forward,
backward, global-norm clipping, AdamW at the scheduled learning rate. Every eval_interval
steps: validation loss (nats/token, perplexity, bits/char) and an atomic checkpoint with the
optimizer state and the data RNG, so a resumed run continues exactly. A NaN or inf loss
stops the run (Diverged) and leaves the last good checkpoint in place.

The run directory. `start` and `resume` take the directory's lock before any work (a
second writer is refused, naming the first; minitf.rundir) and hold it until `train` ends;
they first restore what an interrupted save left (minitf.checkpoint.recover_checkpoint),
then check everything that could fail later: a directory that is not a checkpoint, a test
write and the free space for one checkpoint, the memory training needs
(minitf.tensors.training_bytes), and on `resume` a tampered meta.json or train_state.json
and settings that conflict with the checkpoint (`require`). SIGINT (Ctrl-C) stops the run
at the end of the current step and checkpoints it there (`Interrupted`); a second one stops
at once, leaving the last checkpoint as it was.

`python -m minitf.train` is the command line over this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController

from .checkpoint import (CheckpointError, check_writable, is_checkpoint, load_checkpoint,
                         recover_checkpoint, save_checkpoint)
from .config import (PRESETS, GPTConfig, Rule, check_memory, finite_number, integer_at_least, is_int,
                     is_real, num_params)
from .data import batch_rows, get_batch
from .dataset import Data, load_data
from .distributed import World
from .kernels import get_backend
from .metrics import eval_starts, evaluate
from .model import GPT, DropoutMasks, init_params
from .optim import AdamW, CosineSchedule, clip_coefficient
from .plots import plot_loss_curve
from .rundir import DirectoryLock
from .tensors import checkpoint_bytes, training_bytes

LOSS_CURVE_FILE = "loss_curve.png"
BEST_DIR = "best"  # with keep_best: the checkpoint of the best validation, inside the run's


MODEL_FIELDS = ("n_layer", "n_head", "d_model", "block_size")
# what `resume(require=...)` can check against the checkpoint, besides the model's sizes
REQUIRABLE = ("preset", *MODEL_FIELDS, "dropout", "tokenizer", "vocab_size", "dtype", "seed")
# bytes of meta.json per training step (its loss history), for the free-space check
HISTORY_BYTES_PER_STEP = 64
# JSON, tokenizer and loss curve beside the tensors
SIDE_FILES_BYTES = 4 << 20


class Diverged(RuntimeError):
    """The loss, the gradient norm or the weights became NaN or inf."""


class SettingChanged(UserWarning):
    """A resumed run was given a setting that differs from the run's own (which it replaces)."""


class Stopping(UserWarning):
    """SIGINT was received: the run stops at the end of its step."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT at `step`; `saved` is the step of the checkpoint now in
    `out` (None: there is none)."""

    def __init__(self, out: Path, step: int, saved: int | None):
        self.out, self.step, self.saved = out, step, saved
        where = (f"the checkpoint of step {saved} is in {out}" if saved is not None
                 else f"no checkpoint was written to {out}")
        super().__init__(f"interrupted at step {step}; {where}")


@dataclass(frozen=True)
class TrainSettings:
    """How to train (the model's sizes are its GPTConfig). The command line's defaults."""

    steps: int = 2000  # total optimizer steps
    batch_size: int = 32  # windows of block_size + 1 tokens per step
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup: int = 100  # linear warmup steps
    # the step where the cosine reaches min_lr; None: steps (on resume, the first run's)
    decay_steps: int | None = None
    weight_decay: float = 0.1  # AdamW decoupled weight decay, 2-D weights only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # global-norm gradient clipping; 0: off
    eval_interval: int = 250  # validate and checkpoint every N steps
    eval_windows: int = 100  # validation windows during training
    final_eval_windows: int | None = None  # validation windows at the last step; None: all
    seed: int = 1337  # seed for initialisation, batches and dropout masks
    dtype: str = "float32"  # training precision, "float32" or "float64"
    backend: str | None = None  # kernel backend of the step; None: $MINITF_BACKEND, else auto
    threads: int | None = None  # threads of the step (see StepThreads); None: every core
    keep_best: bool = False  # also keep the checkpoint of the best validation in out/best

    def __post_init__(self):
        """ValueError naming the first field of a wrong type or out of its range
        (SETTING_RULES), or min_lr above lr."""
        for name, rule in SETTING_RULES.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL_SETTINGS:
                continue
            if not rule.allows(value):
                raise ValueError(f"{name}={value!r} is not allowed: it must be {rule.allowed}")
            if is_real(value):  # numpy numbers too: the run's meta.json records Python ones
                object.__setattr__(self, name, int(value) if is_int(value) else float(value))
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be at most lr={self.lr}")


# What each TrainSettings field allows, written once: TrainSettings checks its fields with
# these, and minitf.train's flags with the same (minitf.cli.ruled).
SETTING_RULES = {
    "steps": integer_at_least(0),
    "batch_size": integer_at_least(1),
    "lr": finite_number(lambda v: v > 0, "> 0"),
    "min_lr": finite_number(lambda v: v >= 0, ">= 0 (at most lr)"),
    "warmup": integer_at_least(0),
    "decay_steps": integer_at_least(0),
    "weight_decay": finite_number(lambda v: v >= 0, ">= 0"),
    "beta1": finite_number(lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": finite_number(lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": finite_number(lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "eval_interval": integer_at_least(1),
    "eval_windows": integer_at_least(1),
    "final_eval_windows": integer_at_least(1),
    "seed": integer_at_least(0),
    "dtype": Rule(lambda v: v in ("float32", "float64"), "float32 or float64"),
    "threads": integer_at_least(1),
    "keep_best": Rule(lambda v: isinstance(v, bool), "True or False"),
}
# the fields that may be None (see TrainSettings)
OPTIONAL_SETTINGS = ("decay_steps", "final_eval_windows", "threads")


class StepThreads:
    """The forward and backward of a training step, on several threads.

    The batch's rows are split into `threads` blocks (as evenly as they go; fewer blocks
    if the batch has fewer rows). Block i runs on a thread of its own through replica i of
    the model (the same parameters, its own buffers), BLAS single-threaded while the step
    runs, and writes its gradients, weighted by its share of the rows, into a flat buffer
    of its own (block 0: the optimizer's `flat_grads`); the other blocks' buffers are then
    added into `flat_grads`. The sum is the whole batch's gradient, up to float rounding
    (which therefore depends on the number of threads, and on nothing else). On 2 cores,
    two such streams were measured faster than one stream with 2-thread BLAS and faster
    than parallel kernels, whose thread pools and BLAS's take turns spinning on the same
    cores (the README's Training section).

    In a data-parallel run (minitf.distributed) the batch is this rank's rows of the
    global batch, each block weighted by its share of the global batch's rows, and the
    threads' sum is then summed over the ranks: one Allreduce of `flat_grads`, in place,
    and one of the loss.

    Args:
        model: the model (replica 0); optimizer: its AdamW (whose flat buffers are summed
            into); threads: >= 1; world: the processes of the run (default: this one alone).
    """

    def __init__(self, model: GPT, optimizer: AdamW, threads: int, world: World = World()):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} must be an integer >= 1")
        self.optimizer = optimizer
        self.models = [model] + [GPT(model.config, model.params, model.layers.ops)
                                 for _ in range(threads - 1)]
        self.flat = [optimizer.flat_grads] + [np.zeros_like(optimizer.flat_grads)
                                              for _ in range(threads - 1)]
        self.grads = [optimizer.views(flat) for flat in self.flat]
        self.pool = ThreadPoolExecutor(threads - 1) if threads > 1 else None  # block 0: here
        self.blas = ThreadpoolController()
        self.world = world

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, masks: DropoutMasks | None,
                       batch_size: int | None = None) -> float:
        """The mean loss of the batch (x, y) (B, T), its gradient left in the optimizer's
        flat_grads; with `batch_size` (the global batch's rows, in a data-parallel run),
        (x, y) is this rank's part of it, and loss and gradient are the global batch's, on
        every rank."""
        B = x.shape[0]
        total = B if batch_size is None else batch_size  # the rows the mean is over
        n = min(len(self.models), B)
        parts = [slice(i * B // n, (i + 1) * B // n) for i in range(n)]

        def run(i: int) -> float:
            rows, share = parts[i], (parts[i].stop - parts[i].start) / total
            with np.errstate(over="ignore", invalid="ignore"):  # as train_step, per thread
                loss, _ = self.models[i].loss_and_grads(
                    x[rows], y[rows], None if masks is None else masks.rows(rows),
                    self.grads[i], share)
            return loss * share

        if n == 1:
            loss = run(0)
        else:
            with self.blas.limit(limits=1, user_api="blas"):
                others = [self.pool.submit(run, i) for i in range(1, n)]
                loss = run(0) + sum(f.result() for f in others)
            ops = self.models[0].layers.ops
            for flat in self.flat[1:n]:
                ops.residual_add(self.flat[0], flat, out=(self.flat[0],))  # the sum of the parts
        if self.world.size > 1:  # the sum of the ranks' parts
            self.world.sum_gradients(self.flat[0])
            loss = float(self.world.sum_values(np.array([loss]))[0])
        return loss


def train_step(model: GPT, optimizer: AdamW, x: np.ndarray, y: np.ndarray, lr: float,
               grad_clip: float, masks: DropoutMasks | None = None,
               threads: StepThreads | None = None,
               batch_size: int | None = None) -> tuple[float, float]:
    """One optimizer step on the batch (x, y): forward, backward into the optimizer's flat
    gradient buffer, global-norm clipping folded into the AdamW pass.

    Args:
        masks: the step's dropout masks (`model.draw_masks`), or None for no dropout.
        threads: run the forward and backward on these (`StepThreads` of this model and
            optimizer); None: on this thread.
        batch_size: with `threads`, the global batch's rows when (x, y) is one rank's part
            of it (`StepThreads.loss_and_grads`); the loss, the norm and the update are then
            the global batch's, the same on every rank.
    Returns:
        (loss in nats/token, the gradient's global norm before clipping; 0.0 if grad_clip
        is 0, which turns clipping off).
    Raises:
        Diverged: the loss or the norm is NaN or inf (the weights are left untouched).
    """
    # overflow in a diverging run is caught explicitly (loss, norm and weights are checked),
    # so numpy's warnings would only add noise
    with np.errstate(over="ignore", invalid="ignore"):
        if threads is None:
            loss, _ = model.loss_and_grads(x, y, masks, optimizer.grads)
        else:
            loss = threads.loss_and_grads(x, y, masks, batch_size)
        norm = optimizer.grad_norm() if grad_clip > 0 else 0.0
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise Diverged(f"loss {loss}, gradient norm {norm}")
    coef = clip_coefficient(norm, grad_clip) if grad_clip > 0 else 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        optimizer.step(lr=lr, grad_scale=coef)
    return loss, norm


class Trainer:
    """A training run writing checkpoints to `out`: build it with `start` or `resume`, then
    `train()`.

    Attributes: out, config, tokenizer, params ({name: array}, views into the optimizer's
    flat buffer, updated in place), backend (the kernel backend of the step), model (GPT),
    optimizer (AdamW), threads (StepThreads), schedule (CosineSchedule), rng (the training RNG: batches and
    dropout masks), step (optimizer steps done), history ({"train": [[step, loss]], "val":
    [[step, loss]]}, and "best": {"step", "val_loss"} with keep_best), settings (with
    decay_steps resolved), train_tokens, val_tokens, world (the run's processes,
    minitf.distributed; `world=` of start and resume, default this process alone), root
    (whether this process is rank 0).

    Data-parallel (world.size > 1): every rank holds the same model, optimizer and RNG and
    computes its rows of each global batch (minitf.data.batch_rows); rank 0 alone takes the
    directory's lock, validates, and writes checkpoints, plots, logs and the progress bar.
    start and resume run on rank 0 first (its checks, the recovery of an interrupted save),
    then on the others, which only read.
    """

    def __init__(self, out, config: GPTConfig, tokenizer, params: dict[str, np.ndarray],
                 data: Data, settings: TrainSettings, *, state: dict | None = None,
                 history: dict | None = None, command: str | None = None,
                 record: dict | None = None, world: World = World()):
        self.out = Path(out)
        self.world, self.root = world, world.rank == 0
        self.config, self.tokenizer, self.params = config, tokenizer, params
        self.settings = settings
        self.train_tokens, self.val_tokens = data.train, data.val  # arrays or TokenFiles
        s = settings
        self.backend = get_backend(s.backend)
        self.model = GPT(config, params, self.backend)
        # the parameters move into the optimizer's flat buffer (params[name] become views)
        self.optimizer = AdamW(params, lr=s.lr, betas=(s.beta1, s.beta2),
                               weight_decay=s.weight_decay, ops=self.backend)
        if s.batch_size < world.size:
            raise ValueError(f"--batch-size {s.batch_size} must be at least the number of MPI "
                             f"processes ({world.size}): each computes some of its rows")
        self.rows = batch_rows(s.batch_size, world.rank, world.size)  # this rank's
        # every core by default, shared by the ranks on this machine
        threads = min(s.threads or world.cores(), self.rows.stop - self.rows.start)
        self.threads = StepThreads(self.model, self.optimizer, threads, world)
        decay_steps = s.steps if s.decay_steps is None else s.decay_steps
        self.schedule = CosineSchedule(max_lr=s.lr, min_lr=s.min_lr, warmup=s.warmup,
                                       decay_steps=decay_steps)
        self.rng = np.random.default_rng(s.seed)
        self.step = 0
        self.history = history if history is not None else {"train": [], "val": []}
        self.command = command
        # meta.json "args": what made the run (the command's flags), with decay_steps resolved
        # and the settings it ran with, which a resumed run takes for what it is not given
        self.record = {**(record or {}), **dataclasses.asdict(s),
                       "decay_steps": self.schedule.decay_steps}
        self.saved_step: int | None = None  # the step of the checkpoint in `out`
        if state is not None:
            self._load_state(state)
            self.saved_step = self.step
        self._stop_requested = False
        # the run's, until train() ends; only rank 0 writes
        self._lock = DirectoryLock(self.out).acquire() if self.root else _NoLock()

    # ------------------------------------------------------------------------------------
    @classmethod
    def start(cls, out, data=None, settings: TrainSettings = TrainSettings(),
              config: GPTConfig = PRESETS["default"], tokenizer: str = "char",
              vocab_size: int = 1024, **kwargs) -> "Trainer":
        """A new run on `data` (a text file, a dataset folder from `minitf.prepare`, or None
        for the default corpus; see minitf.dataset.load_data): for a text file, a `tokenizer`
        ("char" or "bpe" with `vocab_size`) trained on its training split, for a dataset
        folder its own tokenizer; and a model of `config`'s sizes (its vocab_size replaced by the
        tokenizer's), initialised with settings.seed. `kwargs`: command, record (meta.json).

        Raises:
            minitf.rundir.LockedError: another process is writing `out`.
            CheckpointError: `out` already holds a checkpoint (after recovering an
                interrupted save), or is a directory that is not a checkpoint.
            OSError: `out` cannot be written, or has no room for one checkpoint.
            minitf.config.SizeError: training would need more memory than the machine has.
            ValueError: a bad tokenizer kind or size.
            TypeError: `settings` is not a TrainSettings or `config` not a GPTConfig.
        """
        if not isinstance(settings, TrainSettings) or not isinstance(config, GPTConfig):
            raise TypeError(f"Trainer.start: settings must be a TrainSettings and config a "
                            f"GPTConfig, got {type(settings).__name__} and "
                            f"{type(config).__name__}")
        out = Path(out)
        world = kwargs.get("world", World())
        with _rank_zero_first(world, out) as root:
            if root:
                recover_checkpoint(out)  # an interrupted save's checkpoint is found, kept
                if is_checkpoint(out):
                    raise CheckpointError(f"--out {out} already holds a checkpoint; continue it "
                                          "with --resume, or choose another --out")
                check_writable(out)  # a real write now, not after the first eval_interval steps
            splits = load_data(data, kind=tokenizer, vocab_size=vocab_size)
            config = dataclasses.replace(config, vocab_size=splits.tokenizer.vocab_size)
            _check_resources(out, config, settings, root)
            params = init_params(config, seed=settings.seed, dtype=np.dtype(settings.dtype).type)
            return cls(out, config, splits.tokenizer, params, splits, settings, **kwargs)

    @classmethod
    def resume(cls, out, data=None, settings: TrainSettings | dict | None = None,
               require: dict | None = None, **kwargs) -> "Trainer":
        """Continue the run in `out` from its checkpoint: model, tokenizer, optimizer state,
        data RNG, history, in the checkpoint's dtype; `data` as for `start`, encoded with the
        checkpoint's tokenizer (a dataset folder must hold that tokenizer).

        Args:
            settings: a dict {TrainSettings field: value} of what changes (e.g. {"steps":
                4000}): every field it does not name is the run's own (meta.json "args";
                backend and threads: their defaults), and a named one that differs from the
                run's is said in a SettingChanged warning ("--lr 0.005 replaces the run's
                0.003"); or a whole TrainSettings, used as it is (with decay_steps None, the
                schedule is the first run's); None: the run's settings unchanged.
            require: what the caller asked for that the checkpoint fixes, {name: value} with
                names from REQUIRABLE (a "preset" name or model sizes, the "tokenizer" kind,
                the "vocab_size" of a BPE tokenizer, "dtype", "seed"); a different value in
                the checkpoint is refused, naming both.
            kwargs: command, record (meta.json).
        Raises:
            minitf.rundir.LockedError: another process is writing `out`.
            CheckpointError: no checkpoint, no optimizer state, a meta.json or
                train_state.json that cannot be resumed from, or a `require` conflict.
            OSError, minitf.config.SizeError: as for `start`.
        """
        out = Path(out)
        world = kwargs.get("world", World())
        with _rank_zero_first(world, out) as root:
            ckpt = load_checkpoint(out, dtype=None)  # recovers an interrupted save first
            if ckpt.optimizer_state is None:
                raise CheckpointError(f"{out} has no optimizer state to resume from")
            first, history = _resume_meta(ckpt)
            stored_dtype = ckpt.params["wte"].dtype.name
            stored = _check_required(out, ckpt, first, stored_dtype, require or {})
            if kwargs.get("record") is not None:  # meta.json records what the run is, not None
                kwargs["record"] = {**kwargs["record"], **{
                    k: v for k, v in stored.items() if kwargs["record"].get(k, 0) is None}}
            if isinstance(settings, TrainSettings):
                decay_given = settings.decay_steps is not None
            else:
                decay_given = (settings or {}).get("decay_steps") is not None
                settings = _resumed_settings(out, first, settings or {})
            settings = dataclasses.replace(settings, dtype=stored_dtype)
            if settings.decay_steps is None:
                # continue the first run's schedule: its cosine ended where that run's steps did
                decay_steps = first.get("decay_steps") or first.get("steps")
                settings = dataclasses.replace(settings, decay_steps=decay_steps)
            _check_resources(out, ckpt.config, settings, root)
            splits = load_data(data, ckpt.tokenizer)
            past = max(int(ckpt.optimizer_state["step"]), settings.decay_steps)
            if not decay_given and settings.steps > past:  # said once the run can go on
                warnings.warn(f"steps {past + 1} to {settings.steps} run past the run's cosine "
                              f"decay, which ends at step {settings.decay_steps}, at --min-lr "
                              f"{settings.min_lr}; give --decay-steps to stretch the decay",
                              SettingChanged, stacklevel=2)
            return cls(out, ckpt.config, ckpt.tokenizer, ckpt.params, splits, settings,
                       state=ckpt.optimizer_state, history=history, **kwargs)

    def _load_state(self, state: dict) -> None:
        try:
            self.optimizer.load_state_dict(state)
            self.rng.bit_generator.state = state["rng_state"]
            self.step = int(state["step"])
            if self.step < 0:
                raise ValueError(f"step {self.step} is negative")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.out}/train_state.json cannot be resumed from: "
                                  f"{type(e).__name__}: {e}") from None

    # ------------------------------------------------------------------------------------
    def summary(self) -> str:
        """One line: parameters, config, tokenizer and split sizes."""
        tok = self.tokenizer
        return (f"model: {num_params(self.config):,} parameters, {self.config}; tokenizer: "
                f"{type(tok).__name__} ({tok.vocab_size} tokens); train "
                f"{len(self.train_tokens):,} / val {len(self.val_tokens):,} tokens")

    def evaluate(self, tokens: np.ndarray, max_windows: int | None) -> dict:
        """minitf.metrics.evaluate of the model on `tokens` (a split), `max_windows` windows."""
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged model is reported
            return evaluate(lambda x: self.model.forward(x)[0], tokens, self.tokenizer,
                            self.config.block_size, max_windows)

    def save(self, val: dict | None, result: dict | None = None, plot: bool = False) -> None:
        """Checkpoint the run at its current step (see minitf.checkpoint), atomically; with
        `plot`, loss_curve.png is drawn into the same checkpoint.

        Raises:
            OSError: the checkpoint could not be written (a full disk); one line that says
                which checkpoint is still in `out`.
        """
        meta = {
            "command": self.command,
            "args": self.record,
            "step": self.step,
            "history": self.history,
            "val": val,
            "result": result,
        }
        state = {**self.optimizer.state_dict(), "step": self.step,
                 "rng_state": self.rng.bit_generator.state}
        title = f"minitf {self.out.name}: {num_params(self.config):,} parameters"
        extra = (lambda d: plot_loss_curve(self.history, self.schedule, d / LOSS_CURVE_FILE,
                                           title=title)) if plot else None
        try:
            save_checkpoint(self.out, self.params, self.config, self.tokenizer,
                            optimizer_state=state, meta=meta, extra=extra)
        except OSError as e:
            raise OSError(e.errno, f"cannot save the checkpoint of step {self.step}: "
                                   f"{e.strerror or e}; {self._kept()}") from None
        self.saved_step = self.step

    def _kept(self) -> str:
        """What a failure leaves in `out`, for its message."""
        if self.saved_step is None:
            return f"no checkpoint was written to {self.out}"
        return f"the checkpoint of step {self.saved_step} in {self.out} is intact"

    def _diverged(self, what: str) -> Diverged:
        kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {self.out}"
                if self.saved_step is not None else f"no checkpoint was written to {self.out}")
        return Diverged(f"training diverged at step {self.step}: {what}; {kept} (try a lower "
                        f"--lr than {self.settings.lr})")

    def train(self, *, progress: bool = True, plot: bool = True, log=print) -> dict:
        """Train up to settings.steps, validating and checkpointing every eval_interval
        steps and at the end; returns {"step", "wall_seconds", "val", "train"} (metrics of
        the last step). Holds the lock of `out` until it returns or raises.

        Args:
            progress: show a progress bar (tqdm) on stderr.
            plot: write loss_curve.png into the checkpoint at every validation.
            log: where the summary, validation lines and result go (without a bar).
        Raises:
            Diverged: NaN or inf in the loss, the gradient norm, the weights or the
                validation loss; the last good checkpoint stays.
            Interrupted: SIGINT. The first one (in the main thread) stops the run at the end
                of its step, which is checkpointed; a second stops at once, and the last
                checkpoint stays as it was.
            OSError: a checkpoint could not be written (the previous one stays).
        """
        self._lock.acquire()
        try:
            with _sigint_stops_at_step_end(self):
                return self._train(progress, plot, log)
        except KeyboardInterrupt as e:
            if isinstance(e, Interrupted):
                raise
            raise Interrupted(self.out, self.step, self.saved_step) from None
        finally:
            self._lock.release()

    def close(self) -> None:
        """Let go of the run directory's lock before the Trainer is dropped (start and
        resume take it; train releases it when it ends)."""
        self._lock.release()

    def _stop(self, plot: bool) -> None:
        """SIGINT was received (by some rank): checkpoint the step reached, unless it just
        was; stop (every rank, once rank 0 has saved)."""
        if self.root and self.saved_step != self.step:
            self.save(None, plot=plot)
        self.world.barrier()
        raise Interrupted(self.out, self.step, self.saved_step)

    def _train(self, progress: bool, plot: bool, log) -> dict | None:
        s, cfg = self.settings, self.config
        if not self.root:  # rank 0 speaks for the run
            progress, log = False, lambda *args: None
        log(self.summary())
        bar = None
        if progress:
            from tqdm import tqdm  # imported only when a bar is shown: tqdm is slow to import

            bar = tqdm(total=s.steps, initial=self.step, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        tokens_per_step = s.batch_size * cfg.block_size
        result = None
        t_start = time.perf_counter()
        while self.step < s.steps:
            t0 = time.perf_counter()
            # every rank draws the whole batch's starts and masks (the same RNG), and keeps
            # its rows
            x, y = get_batch(self.train_tokens, s.batch_size, cfg.block_size, self.rng,
                             rows=self.rows)
            masks = self.model.draw_masks(self.rng, s.batch_size)  # None without dropout
            if masks is not None:
                masks = masks.rows(self.rows)
            lr = self.schedule(self.step)
            try:
                loss, _ = train_step(self.model, self.optimizer, x, y, lr, s.grad_clip, masks,
                                     self.threads, s.batch_size)
            except Diverged as e:
                raise self._diverged(str(e)) from None
            self.step += 1
            self.history["train"].append([self.step, loss])
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{tokens_per_step / (time.perf_counter() - t0):,.0f}")
                bar.update(1)
            if self.step % s.eval_interval == 0 or self.step == s.steps:
                result = self._validate(loss, bar, log, t_start, plot)
            if self.world.size > 1:  # a SIGINT reaching one rank stops them all, here
                self._stop_requested = self.world.sum_values(
                    np.array([float(self._stop_requested)]))[0] > 0
            if self._stop_requested:
                self._stop(plot)
        if bar is not None:
            bar.close()
        if not self.root:
            return None
        if result is None:  # nothing left to train (resumed at the last step): still report
            result = {"step": self.step, "wall_seconds": 0.0,
                      "val": self.evaluate(self.val_tokens, s.final_eval_windows),
                      "train": self.evaluate(self.train_tokens, s.eval_windows)}
        log(json.dumps(result))
        return result

    def _validate(self, loss: float, bar, log, t_start: float, plot: bool) -> dict | None:
        """Rank 0: validate, checkpoint and plot at the current step; the result at the last
        step. Every rank raises Diverged if rank 0 found NaN or inf."""
        failed = None
        result = None
        if self.root:
            try:
                result = self._validate_and_save(loss, bar, log, t_start, plot)
            except Diverged as e:
                failed = e
        if self.world.broadcast_flag(failed is not None) and failed is None:
            failed = self._diverged("rank 0's validation found NaN or inf")
        if failed is not None:
            raise failed
        return result

    def _validate_and_save(self, loss: float, bar, log, t_start: float, plot: bool) -> dict | None:
        s = self.settings
        final = self.step == s.steps
        bad = [n for n, p in self.params.items() if not np.all(np.isfinite(p))]
        if bad:
            raise self._diverged(f"weights {bad[:3]} became NaN or inf")
        say = bar.write if bar is not None else log
        if final:  # the last step's validation may take a while: say what runs
            B = self.config.block_size
            n_val = len(eval_starts(len(self.val_tokens), B, s.final_eval_windows))
            n_train = len(eval_starts(len(self.train_tokens), B, s.eval_windows))
            say(f"step {self.step}: final validation over {n_val:,} windows, then the train "
                f"split's loss over {n_train:,} (in the result line)")
        val = self.evaluate(self.val_tokens, s.final_eval_windows if final else s.eval_windows)
        # a loss past ~709 nats/token (e^loss overflows; a uniform guess over the vocabulary
        # is ln V, under 22) is divergence too, and its perplexity could not be recorded
        if not math.isfinite(val["perplexity"]):
            raise self._diverged(f"validation loss {val['loss']:.4g} nats/token")
        self.history["val"].append([self.step, val["loss"]])
        msg = (f"step {self.step}: train loss {loss:.4f}, val loss {val['loss']:.4f} nats/token, "
               f"perplexity {val['perplexity']:.2f}, {val['bits_per_char']:.4f} bits/char")
        say(msg)
        result = None
        if final:
            result = {"step": self.step, "wall_seconds": round(time.perf_counter() - t_start, 1),
                      "val": val, "train": self.evaluate(self.train_tokens, s.eval_windows)}
        improved = s.keep_best and self._record_best(
            val if not final or s.final_eval_windows == s.eval_windows
            else self.evaluate(self.val_tokens, s.eval_windows))
        self.save(val, result, plot=plot)
        if improved:
            self._save_best()
        return result

    def _record_best(self, val: dict) -> bool:
        """With keep_best: whether `val` (the validation on eval_windows windows, the same
        windows at every step) is the best so far; if so, record it in the history (which
        the run's checkpoint keeps, so a resumed run knows it)."""
        best = self.history.get("best")
        if best is not None and best["val_loss"] <= val["loss"]:
            return False
        self.history["best"] = {"step": self.step, "val_loss": val["loss"], "val": val}
        return True

    def _save_best(self) -> None:
        """Write the model to out/best: a checkpoint without optimizer state, for
        `python -m minitf.evaluate --model` and `generate --model`."""
        meta = {"command": self.command, "args": self.record, **self.history["best"]}
        save_checkpoint(self.out / BEST_DIR, self.params, self.config, self.tokenizer, meta=meta)


class _NoLock:
    """The lock of a rank that does not write the run directory (rank 0 holds the real one)."""

    def acquire(self) -> "_NoLock":
        return self

    def release(self) -> None:
        pass


@contextlib.contextmanager
def _rank_zero_first(world: World, out: Path):
    """Build a Trainer on rank 0 first, then on the others: yields whether this process is
    rank 0, holding the lock of `out` there; the other ranks wait for rank 0's checks (and
    recovery of an interrupted save), and only read. A failure on rank 0 leaves the others
    waiting: the command line ends the job then (minitf.distributed)."""
    root = world.rank == 0
    if not root:
        world.barrier()
    # first: a second writer is refused before any work
    lock = DirectoryLock(out).acquire() if root else _NoLock()
    try:
        yield root
    finally:
        lock.release()  # the Trainer has taken its own
    if root:
        world.barrier()


@contextlib.contextmanager
def _sigint_stops_at_step_end(trainer: Trainer):
    """While training: a first SIGINT asks `trainer` to stop at the end of its step, a
    second raises KeyboardInterrupt at once. Only the main thread can catch signals; in
    another, SIGINT keeps Python's default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._stop_requested:
            raise KeyboardInterrupt
        trainer._stop_requested = True
        if not trainer.root:  # the launcher gives every rank the signal: rank 0 says it
            return
        warnings.warn(f"stopping after step {trainer.step + 1} to checkpoint it; Ctrl-C again "
                      f"stops at once (the checkpoint in {trainer.out} then stays as it is)",
                      Stopping, stacklevel=2)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_resources(out: Path, config: GPTConfig, settings: TrainSettings,
                     writes: bool = True) -> None:
    """Before anything is allocated: training fits in memory, and (if this process `writes`
    the checkpoints) `out` has room for one more (tensors, optimizer moments, history, side
    files)."""
    itemsize = np.dtype(settings.dtype).itemsize
    check_memory(training_bytes(config, settings.batch_size, itemsize), "training",
                 "lower --batch-size, or the model's sizes (--d-model, --n-layer, --block-size)")
    if writes:
        check_writable(out, checkpoint_bytes(config, itemsize) + SIDE_FILES_BYTES
                       + HISTORY_BYTES_PER_STEP * settings.steps)


def _resume_meta(ckpt) -> tuple[dict, dict]:
    """(the first run's "args", the loss "history") of a checkpoint's meta.json, checked:
    CheckpointError naming the file and the entry for a type that cannot be resumed from."""
    where = ckpt.path / "meta.json"
    args = ckpt.meta.get("args", {})
    if not isinstance(args, dict):
        raise CheckpointError(f'{where}: "args" must be an object, got {type(args).__name__}')
    for key in ("steps", "decay_steps", "seed", "vocab_size"):
        value = args.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and value >= 0):
            raise CheckpointError(f'{where}: "args"."{key}" must be an integer >= 0 or null, '
                                  f'got {value!r}')
    history = ckpt.meta.get("history", {"train": [], "val": []})
    keys = set(history) if isinstance(history, dict) else set()
    ok = {"train", "val"} <= keys <= {"train", "val", "best"} and all(
        isinstance(rows, list) and all(
            isinstance(r, list) and len(r) == 2 and isinstance(r[0], int)
            and not isinstance(r[0], bool) and isinstance(r[1], (int, float))
            and not isinstance(r[1], bool) and math.isfinite(r[1]) for r in rows)
        for rows in (history["train"], history["val"]))
    ok = ok and isinstance(history.get("best", {}), dict)  # --keep-best's record
    if not ok:
        raise CheckpointError(f'{where}: "history" must be {{"train": [[step, loss], ...], '
                              f'"val": [[step, loss], ...]}} with integer steps and finite losses')
    return args, history


# the settings that belong to the machine, not the run: on resume, given or their defaults
MACHINE_SETTINGS = ("backend", "threads")
# the settings a resumed run changes without remark (steps: to train on; decay_steps: None is
# the first run's; seed and dtype: the checkpoint's, a conflict refused by `require`)
UNREMARKED = ("steps", "decay_steps", "seed", "dtype")


def _resumed_settings(out: Path, first: dict, changes: dict) -> TrainSettings:
    """The settings of a resumed run: `changes` (field: value, None for not given) over
    the run's own, `first` (meta.json "args"; a field it lacks ran at its default). A change
    that differs from the run's value is said in one SettingChanged warning each."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ValueError(f"resume: no such settings {unknown}; allowed: {', '.join(fields)}")
    values = {}
    for name, default in fields.items():
        own = default if name in MACHINE_SETTINGS else first.get(name, default)
        given = changes.get(name)
        if given is not None and own is not None and given != own and name not in UNREMARKED:
            warnings.warn(f"--{name.replace('_', '-')} {given} replaces the run's {own}",
                          SettingChanged, stacklevel=3)
        values[name] = own if given is None else given
    try:
        return TrainSettings(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot resume {out} with these settings (the run's own are in "
                              f'its meta.json "args"): {e}') from None


def _check_required(out: Path, ckpt, first: dict, dtype: str, require: dict) -> dict:
    """What the checkpoint fixes, {name in REQUIRABLE: value or None if unknown}; raises
    CheckpointError naming both values for the first of `require` that it contradicts."""
    unknown = sorted(set(require) - set(REQUIRABLE))
    if unknown:
        raise ValueError(f"resume: cannot require {unknown}; allowed: {', '.join(REQUIRABLE)}")
    kind = {"CharTokenizer": "char", "BPETokenizer": "bpe"}.get(type(ckpt.tokenizer).__name__)
    stored = {**{f: getattr(ckpt.config, f) for f in (*MODEL_FIELDS, "dropout")},
              "tokenizer": kind, "dtype": dtype, "seed": first.get("seed"),
              "vocab_size": first.get("vocab_size") if kind == "bpe" else None}
    for name, value in require.items():
        asked = {f: getattr(PRESETS[value], f) for f in MODEL_FIELDS} if name == "preset" \
            else {name: value}
        for field, wanted in asked.items():
            if wanted is None or stored[field] is None or wanted == stored[field]:
                continue
            flag = f"--preset {value} ({field}={wanted})" if name == "preset" else \
                f"--{name.replace('_', '-')} {value}"
            raise CheckpointError(
                f"{flag} conflicts with the checkpoint in {out}, which has {field}="
                f"{stored[field]}; resume without the flag, or start a new run with another --out")
    return stored
