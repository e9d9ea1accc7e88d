"""Validation metrics: loss in nats/token, perplexity and bits per character.

Bits per character = total nats over the scored tokens / ln 2 / number of characters those
tokens spell. It does not depend on the tokenizer, so a character-level and a BPE model can be
compared with each other and with published TinyShakespeare results.

    python -m minitf.evaluate --model DIR [--data PATH] [--backend numba]
"""

from __future__ import annotations

import json
import math
import sys
from typing import Callable

import numpy as np


def eval_starts(n_tokens: int, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Start offsets of non-overlapping windows of block_size + 1 tokens (stride block_size).

    With `max_windows`, that many windows evenly spread over the split, always the same ones.
    """
    n = (n_tokens - 1) // block_size
    if n < 1:
        raise ValueError(f"the split has {n_tokens} tokens; evaluation needs at least block_size + 1 = {block_size + 1}")
    if max_windows is not None and max_windows < n:
        # window numbers picked from 0..n-1, never all n of them: a split may be a huge file
        return np.linspace(0, n - 1, max_windows).round().astype(np.int64) * block_size
    return np.arange(n) * block_size


def evaluate(logits_fn: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, tokenizer,
             block_size: int, max_windows: int | None = None, batch_size: int = 16) -> dict:
    """Mean validation loss of a model over fixed windows of a token split.

    Args:
        logits_fn: maps ids (B, T) int to logits (B, T, V) float.
        tokens: (N,) int token ids of the split.
        tokenizer: its `decode` gives the characters the scored tokens spell.
        block_size: T, the window length.
        max_windows: evaluate on this many evenly spread windows (None: all of them).
    Returns:
        {"loss": nats/token, "perplexity": e^loss, "bits_per_char": bits/char,
         "tokens": scored tokens, "chars": characters they spell, "windows": count}.
    """
    starts = eval_starts(len(tokens), block_size, max_windows)
    total_nats, total_tokens, total_chars = 0.0, 0, 0
    for b in range(0, len(starts), batch_size):
        s = starts[b:b + batch_size]
        win = np.stack([tokens[i:i + block_size + 1] for i in s])  # (B, T + 1)
        x, y = win[:, :-1], win[:, 1:]
        logits = np.asarray(logits_fn(x), dtype=np.float64)  # (B, T, V)
        m = logits.max(axis=-1, keepdims=True)
        logz = m[..., 0] + np.log(np.exp(logits - m).sum(axis=-1))  # (B, T)
        picked = np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]  # (B, T)
        total_nats += float((logz - picked).sum())
        total_tokens += y.size
        total_chars += sum(len(tokenizer.decode(row)) for row in y)
    loss = total_nats / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "bits_per_char": total_nats / math.log(2) / total_chars,
        "tokens": total_tokens,
        "chars": total_chars,
        "windows": len(starts),
    }


def validation_tokens(text: str, tokenizer, val_fraction: float = 0.1) -> np.ndarray:
    """Token ids of the validation split: the last `val_fraction` of the text's characters."""
    from .data import split_text

    _, val_text = split_text(text, val_fraction)
    return np.asarray(tokenizer.encode(val_text))


def main(argv=None) -> int:
    from .cli import Parser, add_backend_argument, fail
    from .dataset import load_data
    from .engine import load_engine

    parser = Parser(
        prog="python -m minitf.evaluate",
        description="Validation loss (nats/token), perplexity and bits/char of a model.",
        epilog="example: python -m minitf.evaluate --backend numba --max-windows 200",
    )
    parser.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    parser.add_argument("--data", default=None, help="corpus text file, or dataset folder from python -m minitf.prepare (default: $MINITF_DATA, the user cache, or a verified download)")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate on this many windows (default: the whole split)")
    add_backend_argument(parser)
    args = parser.parse_args(argv)
    if args.max_windows is not None and args.max_windows < 1:
        fail(parser, f"--max-windows {args.max_windows} must be >= 1")
    try:
        from .threads import set_threads

        set_threads(args.threads)
        engine, tokenizer, _ = load_engine(args.model, args.backend)
        tokens = load_data(args.data, tokenizer, with_train=False).val
        result = evaluate(lambda x: np.stack([engine.forward(row) for row in x]), tokens, tokenizer,
                          engine.config.block_size, args.max_windows)
    except (ValueError, OSError) as e:
        fail(parser, str(e))
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted", file=sys.stderr)
        return 130
    if not math.isfinite(result["loss"]):
        fail(parser, f"the model's validation loss is {result['loss']}: its logits are not finite")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
