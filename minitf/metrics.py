"""Validation metrics: loss in nats/token, perplexity and bits per character.

Bits per character = total nats over the scored tokens / ln 2 / number of characters those
tokens spell. It does not depend on the tokenizer, so a character-level and a BPE model can be
compared with each other and with published TinyShakespeare results.

    tokens = load_data("input.txt", tokenizer, with_train=False).val   # minitf.dataset
    result = evaluate(engine_logits(engine), tokens, tokenizer, config.block_size)

`python -m minitf.evaluate` is the command line over these functions.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .kernels.numpy_ref import cross_entropy


def eval_starts(n_tokens: int, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Start offsets of non-overlapping windows of block_size + 1 tokens (stride block_size).

    With `max_windows`, that many windows evenly spread over the split, always the same ones.

    Raises:
        ValueError: the split is shorter than one window.
    """
    n = (n_tokens - 1) // block_size
    if n < 1:
        raise ValueError(f"the split has {n_tokens} tokens; evaluation needs at least "
                         f"block_size + 1 = {block_size + 1}")
    if max_windows is not None and max_windows < n:
        # window numbers picked from 0..n-1, never all n of them: a split may be a huge file
        return np.linspace(0, n - 1, max_windows).round().astype(np.int64) * block_size
    return np.arange(n) * block_size


def evaluate(logits_fn: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, tokenizer,
             block_size: int, max_windows: int | None = None, batch_size: int = 16) -> dict:
    """Mean validation loss of a model over fixed windows of a token split.

    The loss of each token is the reference softmax cross-entropy, in float64 whatever the
    logits' dtype.

    Args:
        logits_fn: maps ids (B, T) int to logits (B, T, V) float.
        tokens: (N,) int token ids of the split.
        tokenizer: its `decode` gives the characters the scored tokens spell.
        block_size: T, the window length.
        max_windows: evaluate on this many evenly spread windows (None: all of them).
    Returns:
        {"loss": nats/token, "perplexity": e^loss, "bits_per_char": bits/char,
         "tokens": scored tokens, "chars": characters they spell, "windows": count}.
    Raises:
        ValueError: the split is shorter than one window.
    """
    starts = eval_starts(len(tokens), block_size, max_windows)
    total_nats, total_tokens, total_chars = 0.0, 0, 0
    for b in range(0, len(starts), batch_size):
        s = starts[b:b + batch_size]
        win = np.stack([tokens[i:i + block_size + 1] for i in s])  # (B, T + 1)
        x, y = win[:, :-1], win[:, 1:]  # (B, T), (B, T)
        logits = np.asarray(logits_fn(x), dtype=np.float64)  # (B, T, V)
        total_nats += float(cross_entropy(logits, y).sum())  # (B, T) nats summed
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


def engine_logits(engine) -> Callable[[np.ndarray], np.ndarray]:
    """A `logits_fn` for `evaluate` from an inference engine: a full forward pass (no cache
    reuse) of each window, ids (B, T) -> logits (B, T, V) float32."""
    return lambda x: np.stack([engine.forward(row) for row in x])  # (B, T, V)
