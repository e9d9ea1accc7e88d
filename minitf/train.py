"""Train a GPT on TinyShakespeare with the hand-written backward pass.

    python -m minitf.train --out runs/char                   # the default model, char-level
    python -m minitf.train --tokenizer bpe --out runs/bpe     # byte-level BPE, vocab 1024
    python -m minitf.train --out runs/char --resume --steps 4000
    python -m minitf.train --backend numba --threads 2 --dropout 0.1 --keep-best --out runs/d
    mpiexec -n 2 python -m minitf.train --out runs/char       # data-parallel over 2 processes

Each step: a random batch of windows from the training split, forward, backward, global-norm
clipping, AdamW at the scheduled learning rate, on the kernel backend --backend names (its
compiled elementwise kernels between BLAS matmuls; --threads for both), with --dropout.
Every --eval-interval steps: validation loss (nats/token, perplexity, bits/char) and an
atomic checkpoint with the optimizer state and the training RNG (batches and dropout
masks), so --resume continues exactly where the run stopped. A NaN or inf loss stops the
run and leaves the last good checkpoint in place.

Under `mpiexec -n N` (N > 1; minitf.distributed) the run is data-parallel: each process
computes its rows of every global batch of --batch-size windows, the gradients are summed
over the processes, and rank 0 alone writes the checkpoints and reports; --threads is then
per process (default: the machine's cores shared among its processes). The model is the one
a single process trains from the same flags, up to float rounding. A process that fails ends
the whole job (MPI_Abort) with its message.

The training itself is minitf.trainer (Trainer, TrainSettings); this module parses and
checks the flags, and reports.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import warnings
from pathlib import Path

from .cli import (Parser, add_backend_argument, add_data_argument, bpe_vocab_size, fail, guarded,
                  path_argument, positive_int, prog_name, ruled)
from .config import DROPOUT, PRESETS, GPTConfig
from .dataset import load_dataset, tokenizer_kind
from .distributed import MPIUnavailable, World, abort_on, world
from .kernels import get_backend
from .threads import set_threads
from .trainer import REQUIRABLE, SETTING_RULES, Diverged, Interrupted, Trainer, TrainSettings

DEFAULTS = TrainSettings()
# what a new run takes for the flags that a checkpoint fixes (see build_parser)
NEW_RUN = {"tokenizer": "char", "vocab_size": 1024, "preset": "default", "seed": DEFAULTS.seed,
           "dtype": DEFAULTS.dtype}


# the optimization and evaluation flags, (TrainSettings field, type, what it sets), by group
RUN_FLAGS = {
    "optimization": [
        ("steps", int, "total optimizer steps"),
        ("batch_size", int, "windows per step"),
        ("lr", float, "peak learning rate"),
        ("min_lr", float, "learning rate at the end of the cosine decay"),
        ("warmup", int, "linear warmup steps"),
        ("decay_steps", int, "step where the cosine decay reaches --min-lr"),
        ("weight_decay", float, "AdamW decoupled weight decay, 2-D weights only"),
        ("beta1", float, "AdamW beta1"),
        ("beta2", float, "AdamW beta2"),
        ("grad_clip", float, "global-norm gradient clipping, 0: off"),
    ],
    "evaluation and output": [
        ("eval_interval", int, "validate and checkpoint every N steps"),
        ("eval_windows", int, "validation windows during training"),
        ("final_eval_windows", int, "validation windows at the last step"),
    ],
}


def build_parser() -> Parser:
    p = Parser(
        prog=prog_name("minitf.train"),
        description="Train a GPT-2-style model on TinyShakespeare with hand-written "
                    "backpropagation.",
        epilog="example: python -m minitf.train --out runs/char --steps 2000 --seed 1337",
    )
    add_data_argument(p)
    p.add_argument("--out", default="runs/char", type=path_argument, help="checkpoint directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (model, optimizer, data "
                        "RNG)")
    # flags that a checkpoint fixes default to None: on --resume, a flag given is checked
    # against the checkpoint, one not given takes the checkpoint's value
    p.add_argument("--tokenizer", default=None, choices=("char", "bpe"),
                   help="character-level or byte-level BPE (default: char; on --resume, the "
                        "checkpoint's)")
    p.add_argument("--vocab-size", type=bpe_vocab_size, default=None,
                   help=f"BPE vocabulary size, for --tokenizer bpe only (default: "
                        f"{NEW_RUN['vocab_size']})")
    g = p.add_argument_group("model (a preset, then single fields overridden)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model size preset (default: default)")
    for field in ("n_layer", "n_head", "d_model", "block_size"):
        g.add_argument("--" + field.replace("_", "-"), type=positive_int, default=None,
                       help=f"override the preset's {field} "
                            f"(default preset: {getattr(PRESETS['default'], field)})")
    d = DEFAULTS
    # the optimization and evaluation flags default to None too: a new run then takes the
    # TrainSettings default (shown), a resumed one the run's own value (meta.json "args")
    for title, flags in RUN_FLAGS.items():
        g = p.add_argument_group(title)
        for name, kind, what in flags:
            default = {"decay_steps": "--steps", "final_eval_windows": "the whole split"}.get(
                name, getattr(d, name))
            g.add_argument("--" + name.replace("_", "-"), type=ruled(kind, SETTING_RULES[name]),
                           default=None,
                           help=f"{what} (default: {default}; on --resume, the run's)")
    g.add_argument("--seed", type=ruled(int, SETTING_RULES["seed"]), default=None,
                   help=f"seed for initialisation, batches and dropout masks (default: {d.seed}; "
                        f"on --resume, the checkpoint's random state continues)")
    g.add_argument("--dtype", default=None, choices=("float32", "float64"),
                   help=f"training precision (default: {d.dtype}; on --resume, the checkpoint's)")
    g.add_argument("--no-plot", action="store_true", help="do not write loss_curve.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--keep-best", action="store_true", default=None,
                   help="also keep the checkpoint of the best validation loss in OUT/best "
                        "(its step in OUT/best/meta.json) (default: off; on --resume, the run's)")
    g = p.add_argument_group("regularization and speed")
    g.add_argument("--dropout", type=ruled(float, DROPOUT), default=None,
                   help="dropout probability where GPT-2 has it (embedding, attention weights, "
                        "residual branches), training only (default: 0.0; on --resume, the "
                        "run's own)")
    # the step's elementwise kernels; its matmuls are BLAS on every backend
    add_backend_argument(p)
    return p


def validate(parser: Parser, args) -> None:
    """Check the flags given against each other (each flag's own range is its type's,
    SETTING_RULES; a resumed run's own values are checked by its Trainer)."""
    # the tokenizer of the run: given, else a new run's default (a dataset folder's own and a
    # resumed run's are checked by check_dataset_flags and the Trainer)
    folder = args.data is not None and Path(args.data).is_dir()
    tokenizer = args.tokenizer or (None if args.resume or folder else NEW_RUN["tokenizer"])
    if args.vocab_size is not None and tokenizer == "char":
        fail(parser, f"--vocab-size {args.vocab_size} applies to --tokenizer bpe only (a char "
                     f"vocabulary is the text's characters)")
    if args.lr is None and args.resume:
        return  # a resumed run's --min-lr is checked against its own lr (TrainSettings)
    lr = args.lr if args.lr is not None else DEFAULTS.lr
    if args.min_lr is not None and not args.min_lr <= lr:
        fail(parser, f"--min-lr {args.min_lr} must be in [0, --lr={lr}]")
    if args.min_lr is None and not args.resume and lr < DEFAULTS.min_lr:
        fail(parser, f"--lr {lr} is below the default --min-lr {DEFAULTS.min_lr}: give --min-lr too")


def check_dataset_flags(parser: Parser, args) -> None:
    """A new run on a dataset folder uses the folder's tokenizer: a --tokenizer or
    --vocab-size that says otherwise is refused, not ignored."""
    if args.resume or args.data is None or not Path(args.data).is_dir() or (
            args.tokenizer is None and args.vocab_size is None):
        return
    ds = load_dataset(args.data)
    kind, size = tokenizer_kind(ds.tokenizer), ds.tokenizer.vocab_size
    flag = (f"--tokenizer {args.tokenizer}" if args.tokenizer not in (None, kind) else
            f"--vocab-size {args.vocab_size}" if args.vocab_size is not None
            and (kind != "bpe" or args.vocab_size != size) else None)
    if flag is not None:
        fail(parser, f"{flag} contradicts --data {args.data}, a dataset folder with its own "
                     f"{kind} tokenizer of {size} tokens, which the run uses; leave the flag "
                     f"out, or prepare the corpus with it (python -m minitf.prepare)")


def model_config(args) -> GPTConfig:
    """The preset with the fields the flags override (vocab_size: the tokenizer's, later)."""
    fields = PRESETS[args.preset or NEW_RUN["preset"]].to_dict()
    for field in ("n_layer", "n_head", "d_model", "block_size", "dropout"):
        if getattr(args, field) is not None:
            fields[field] = getattr(args, field)
    return GPTConfig(**fields)


def settings(args) -> dict:
    """The TrainSettings fields the flags give (their names are the fields'), {name: value}
    for the flags given: a new run takes TrainSettings' defaults for the others, a resumed
    one the run's own (Trainer.resume)."""
    names = [f.name for f in dataclasses.fields(TrainSettings)]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def required(args) -> dict:
    """What --resume must find in the checkpoint: every flag given that a checkpoint fixes
    (preset, model sizes, tokenizer, vocabulary, dtype, seed)."""
    return {name: getattr(args, name) for name in REQUIRABLE if getattr(args, name) is not None}


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted run: the same flags, with --resume."""
    flags = list(argv) + ([] if "--resume" in argv else ["--resume"])
    return "python -m minitf.train " + shlex.join(flags)


def run(args, log=print, world: World = World()) -> dict | None:
    """Train as the parsed flags `args` say, as one rank of `world`; returns the final
    metrics (None on ranks other than 0).

    Raises:
        Diverged: the run diverged (the last good checkpoint is kept).
        ValueError, OSError: a bad value, corpus or checkpoint (CheckpointError is a
            ValueError).
    """
    get_backend(args.backend)  # loaded first, so that --threads reaches its OpenMP threads too
    # several processes on one machine share its cores (one BLAS pool each)
    set_threads(args.threads if args.threads is not None or world.size == 1 else world.cores())
    # meta.json records the command line and every flag
    command = "python -m minitf.train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.resume:
        meta = {"command": command, "record": vars(args), "world": world}
        trainer = Trainer.resume(args.out, args.data, settings(args), required(args), **meta)
        if trainer.step >= trainer.settings.steps and world.rank == 0:
            print(f"{prog_name('minitf.train')}: --steps {trainer.settings.steps}: the run in {args.out} is at step "
                  f"{trainer.step} already; no step ran (nothing to do; give a larger --steps "
                  f"to train on)", file=sys.stderr)
    else:
        record = {**vars(args), **{k: NEW_RUN[k] for k in NEW_RUN if getattr(args, k) is None}}
        meta = {"command": command, "record": record, "world": world}
        trainer = Trainer.start(args.out, args.data, TrainSettings(**settings(args)),
                                model_config(args),
                                record["tokenizer"], record["vocab_size"], **meta)
    s = trainer.settings
    if world.rank == 0 and trainer.step < s.steps <= s.warmup:  # every step in the ramp
        warnings.warn(f"--steps {s.steps} <= --warmup {s.warmup}: the learning rate never leaves "
                      f"warm-up (it rises to {trainer.schedule(s.steps - 1):.3g}, not --lr "
                      f"{s.lr:g}); give --steps above --warmup, or a smaller --warmup",
                      stacklevel=2)
    return trainer.train(progress=not args.quiet, plot=not args.no_plot, log=log)


@guarded
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    check_dataset_flags(parser, args)
    try:
        ranks = world()
    except MPIUnavailable as e:
        fail(parser, str(e))
    try:
        return _train(parser, args, argv, ranks)
    except BaseException as e:
        if ranks.size > 1:  # this rank alone failed: end the job, not leave the others waiting
            abort_on(ranks, e, parser.prog)
        raise


def _train(parser: Parser, args, argv, ranks: World) -> int:
    """Train and report; the ends every rank reaches at the same step (divergence, SIGINT)
    return their status on every rank, with rank 0's message."""
    try:
        run(args, world=ranks)
    except Diverged as e:
        return _end_together(ranks, 1, f"{parser.prog}: {e}")
    except MemoryError:
        fail(parser, "out of memory: choose a smaller model (--d-model, --n-layer) or --batch-size")
    except Interrupted as e:
        again = resume_command(sys.argv[1:] if argv is None else argv)
        if ranks.size > 1:
            again = f"mpiexec -n {ranks.size} {again}"
        return _end_together(ranks, 130, (
            f"\n{parser.prog}: {e}; continue with: {again}" if e.saved is not None else
            f"\n{parser.prog}: {e}; start again with the same command"))
    except KeyboardInterrupt:  # before training began
        print(f"\n{parser.prog}: interrupted before training began; {args.out} is as it was",
              file=sys.stderr)
        return 130
    return 0


def _end_together(ranks: World, status: int, message: str) -> int:
    """Rank 0 prints `message`; every rank returns `status` once it has (a rank that ended
    first could make the launcher end rank 0 before it speaks)."""
    if ranks.rank == 0:
        print(message, file=sys.stderr)
    ranks.barrier()
    return status


if __name__ == "__main__":
    sys.exit(main())
