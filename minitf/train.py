"""Train a GPT on TinyShakespeare with the hand-written backward pass.

    python -m minitf.train --out runs/char                   # the default model, char-level
    python -m minitf.train --tokenizer bpe --out runs/bpe     # byte-level BPE, vocab 1024
    python -m minitf.train --out runs/char --resume --steps 4000

Each step: a random batch of windows from the training split, forward, backward, global-norm
clipping, AdamW at the scheduled learning rate. Every --eval-interval steps: validation loss
(nats/token, perplexity, bits/char) and an atomic checkpoint with the optimizer state and the
data RNG, so --resume continues exactly where the run stopped. A NaN or inf loss stops the
run and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, check_writable, is_checkpoint, load_checkpoint, save_checkpoint
from .cli import Parser, add_threads_argument, fail, nonneg_int, positive_int
from .config import PRESETS, GPTConfig, num_params
from .data import get_batch
from .dataset import load_data
from .evaluate import evaluate
from .model import GPT, init_params
from .optim import AdamW, CosineSchedule, clip_grad_norm


class Diverged(RuntimeError):
    """The loss or the gradient norm became NaN or inf."""


def build_parser() -> Parser:
    p = Parser(
        prog="python -m minitf.train",
        description="Train a GPT-2-style model on TinyShakespeare with hand-written backpropagation.",
        epilog="example: python -m minitf.train --out runs/char --steps 2000 --seed 1337",
    )
    p.add_argument("--data", default=None, help="corpus text file, or a dataset folder from python -m minitf.prepare, whose tokenizer is then used (default: $MINITF_DATA, else ~/.cache/minitf, else a verified download)")
    p.add_argument("--out", default="runs/char", help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (model, optimizer, data RNG)")
    p.add_argument("--tokenizer", default="char", choices=("char", "bpe"), help="character-level or byte-level BPE")
    p.add_argument("--vocab-size", type=positive_int, default=1024, help="BPE vocabulary size (ignored for char)")
    g = p.add_argument_group("model (a preset, then single fields overridden)")
    g.add_argument("--preset", default="default", choices=sorted(PRESETS), help="model size preset")
    for field in ("n_layer", "n_head", "d_model", "block_size"):
        g.add_argument("--" + field.replace("_", "-"), type=positive_int, default=None,
                       help=f"override the preset's {field} (default preset: {getattr(PRESETS['default'], field)})")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=nonneg_int, default=2000, help="total optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=32, help="windows per step")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup", type=nonneg_int, default=100, help="linear warmup steps")
    g.add_argument("--decay-steps", type=nonneg_int, default=None, help="step where the cosine decay reaches --min-lr (default: --steps; on --resume, the first run's)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (2-D weights only)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.99, help="AdamW beta2")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global-norm gradient clipping (0: off)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-interval", type=positive_int, default=250, help="validate and checkpoint every N steps")
    g.add_argument("--eval-windows", type=positive_int, default=100, help="validation windows during training")
    g.add_argument("--final-eval-windows", type=positive_int, default=None, help="validation windows at the last step (default: the whole split)")
    g.add_argument("--seed", type=int, default=1337, help="seed for initialisation and batches")
    g.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="training precision")
    g.add_argument("--no-plot", action="store_true", help="do not write loss_curve.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    # training runs the numpy layers (BLAS matmuls); --backend is for generation and evaluation
    add_threads_argument(p)
    return p


def validate(parser: Parser, args) -> None:
    if not (math.isfinite(args.lr) and args.lr > 0):
        fail(parser, f"--lr {args.lr} must be a finite number > 0")
    if not (0 <= args.min_lr <= args.lr):
        fail(parser, f"--min-lr {args.min_lr} must be in [0, --lr={args.lr}]")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            fail(parser, f"--{name} {getattr(args, name)} must be in [0, 1)")
    if not args.weight_decay >= 0:
        fail(parser, f"--weight-decay {args.weight_decay} must be >= 0")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(args, name)):
            fail(parser, f"--{name.replace('_', '-')} {getattr(args, name)} must be a finite number")
    if not args.grad_clip >= 0:
        fail(parser, f"--grad-clip {args.grad_clip} must be >= 0 (0 turns clipping off)")


def model_config(args, vocab_size: int) -> GPTConfig:
    fields = PRESETS[args.preset].to_dict()
    for field in ("n_layer", "n_head", "d_model", "block_size"):
        if getattr(args, field) is not None:
            fields[field] = getattr(args, field)
    fields["vocab_size"] = vocab_size
    return GPTConfig(**fields)


def run(args, log=print) -> dict:
    """Train as `args` say; returns the final metrics. Raises Diverged, ValueError, OSError."""
    from .threads import set_threads

    set_threads(args.threads)
    out = Path(args.out)
    dtype = np.dtype(args.dtype).type

    if not args.resume:
        if out.exists() and is_checkpoint(out):
            raise CheckpointError(f"--out {out} already holds a checkpoint; continue it with --resume, "
                                  "or choose another --out")
        check_writable(out)  # now, not after the first --eval-interval steps

    if args.resume:
        ckpt = load_checkpoint(out, dtype=dtype)
        if ckpt.optimizer_state is None:
            raise CheckpointError(f"{out} has no optimizer state to resume from")
        config, tokenizer, params = ckpt.config, ckpt.tokenizer, ckpt.params
        train_tokens, val_tokens, tokenizer = load_data(args.data, ckpt.tokenizer)
        state = ckpt.optimizer_state
        history = ckpt.meta.get("history", {"train": [], "val": []})
    else:
        train_tokens, val_tokens, tokenizer = load_data(args.data, kind=args.tokenizer, vocab_size=args.vocab_size)
        config = model_config(args, tokenizer.vocab_size)
        params = init_params(config, seed=args.seed, dtype=dtype)
        state = None
        history = {"train": [], "val": []}

    model = GPT(config, params)
    opt = AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    decay_steps = args.decay_steps
    if decay_steps is None and args.resume:
        # continue the first run's schedule: its cosine ended where that run's --steps did
        first = ckpt.meta.get("args", {})
        decay_steps = first.get("decay_steps") or first.get("steps")
    if decay_steps is None:
        decay_steps = args.steps
    args.decay_steps = decay_steps  # recorded in meta.json, so a later resume keeps it too
    schedule = CosineSchedule(max_lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, decay_steps=decay_steps)
    rng = np.random.default_rng(args.seed)
    step = 0
    if state is not None:
        try:
            opt.load_state_dict({f"m.{n}": a for n, a in state["m"].items()} | {f"v.{n}": a for n, a in state["v"].items()},
                                {"t": state["step"]})
            rng.bit_generator.state = state["rng_state"]
            step = int(state["step"])
            if step < 0:
                raise ValueError(f"step {step} is negative")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{out}/train_state.json cannot be resumed from: {type(e).__name__}: {e}") from None
    log(f"model: {num_params(config):,} parameters, {config}; tokenizer: {type(tokenizer).__name__} "
        f"({tokenizer.vocab_size} tokens); train {len(train_tokens):,} / val {len(val_tokens):,} tokens")

    def logits_fn(x):
        return model.forward(x)[0]

    def save(step_done: int, val: dict | None, result: dict | None = None) -> None:
        meta = {
            "command": "python -m minitf.train " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "args": {k: v for k, v in vars(args).items()},
            "step": step_done,
            "history": history,
            "val": val,
            "result": result,
        }
        save_checkpoint(out, params, config, tokenizer,
                        optimizer_state={"m": opt.m, "v": opt.v, "step": step_done,
                                         "rng_state": rng.bit_generator.state},
                        meta=meta)

    progress = None
    if not args.quiet:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    tokens_per_step = args.batch_size * config.block_size
    val = result = None
    t_start = time.perf_counter()
    while step < args.steps:
        t0 = time.perf_counter()
        x, y = get_batch(train_tokens, args.batch_size, config.block_size, rng)
        # overflow in a diverging run is caught explicitly below (loss, norm and weights are
        # checked), so numpy's warnings would only add noise
        with np.errstate(over="ignore", invalid="ignore"):
            loss, grads = model.loss_and_grads(x, y)
            norm = clip_grad_norm(grads, args.grad_clip) if args.grad_clip > 0 else 0.0
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise Diverged(
                f"training diverged at step {step}: loss {loss}, gradient norm {norm}; "
                f"the last good checkpoint is kept in {out} (try a lower --lr than {args.lr})"
            )
        lr = schedule(step)
        with np.errstate(over="ignore", invalid="ignore"):
            opt.step(grads, lr=lr)
        step += 1
        history["train"].append([step, loss])
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                 tok_s=f"{tokens_per_step / (time.perf_counter() - t0):,.0f}")
            progress.update(1)
        if step % args.eval_interval == 0 or step == args.steps:
            final = step == args.steps
            bad = [n for n, p in params.items() if not np.all(np.isfinite(p))]
            if bad:
                raise Diverged(f"training diverged at step {step}: weights {bad[:3]} became NaN or inf; "
                               f"the last good checkpoint is kept in {out} (try a lower --lr than {args.lr})")
            with np.errstate(over="ignore", invalid="ignore"):
                val = evaluate(logits_fn, val_tokens, tokenizer, config.block_size,
                               args.final_eval_windows if final else args.eval_windows)
            if not math.isfinite(val["loss"]):
                raise Diverged(f"training diverged at step {step}: validation loss {val['loss']}; "
                               f"the last good checkpoint is kept in {out} (try a lower --lr than {args.lr})")
            history["val"].append([step, val["loss"]])
            msg = (f"step {step}: train loss {loss:.4f}, val loss {val['loss']:.4f} nats/token, "
                   f"perplexity {val['perplexity']:.2f}, {val['bits_per_char']:.4f} bits/char")
            (progress.write if progress is not None else log)(msg)
            result = None
            if final:
                train_eval = evaluate(logits_fn, train_tokens, tokenizer, config.block_size, args.eval_windows)
                result = {"step": step, "wall_seconds": round(time.perf_counter() - t_start, 1),
                          "val": val, "train": train_eval}
            save(step, val, result)
            if not args.no_plot:
                from .plots import plot_loss_curve
                plot_loss_curve(history, schedule, out / "loss_curve.png",
                                title=f"minitf {out.name}: {num_params(config):,} parameters")
    if progress is not None:
        progress.close()
    if result is None:  # nothing left to train (resumed at the last step): still report
        val = evaluate(logits_fn, val_tokens, tokenizer, config.block_size, args.final_eval_windows)
        train_eval = evaluate(logits_fn, train_tokens, tokenizer, config.block_size, args.eval_windows)
        result = {"step": step, "wall_seconds": 0.0, "val": val, "train": train_eval}
    log(json.dumps(result))
    return result


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    try:
        run(args)
    except Diverged as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        fail(parser, str(e))
    except MemoryError:
        fail(parser, "out of memory: choose a smaller model (--d-model, --n-layer) or --batch-size")
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted; the last checkpoint in {args.out} is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
