"""Sampling: turn one vector of next-token logits into a token id.

The pipeline is HF transformers' sampling path, warper for warper and in the same order
(`transformers/generation/logits_process.py`, as `generate(do_sample=True)` builds it):

    logits (V,) --TemperatureLogitsWarper--> --TopKLogitsWarper--> --TopPLogitsWarper-->
           filtered logits (V,) --softmax--> probs (V,) --inverse CDF(coin)--> token id

- temperature: `logits / temperature`; 0 means greedy decoding (argmax, no randomness).
- top-k (Fan et al. 2018, "Hierarchical Neural Story Generation"): keep the k largest
  logits; a token tied with the k-th largest is kept too, as in HF.
- top-p, nucleus (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"):
  keep the smallest set of most probable tokens whose probability reaches p, the token
  that crosses p included; always at least one token.

As in llama2.c, the sampler takes its random number (`coin`, uniform in [0, 1)) as an
argument, so `sample_token` is a pure function and tests can drive it; `Sampler` owns the
`numpy.random.Generator` that supplies the coins. Everything is computed in float64 whatever
the logits' dtype, so probabilities are accurate to ~1e-16 and sum to 1.

Filtered tokens get -inf (never a finite sentinel). Logits may contain -inf (a masked
token); NaN, +inf, or every token -inf is a ValueError that names the positions.
"""

from __future__ import annotations

import numpy as np

from .config import Rule, finite_number, is_int, is_real
from .kernels.numpy_ref import softmax

# "Reaches p" is tested with this much slack. The float64 prefix sums of V probabilities
# carry a rounding error of at most ~V * 1.1e-16 (5.6e-12 for GPT-2's 50257 tokens), which
# could otherwise make a set whose exact mass equals p (log([0.5, 0.3, ...]) with p = 0.8)
# look short of p and drag in one more token. 1e-10 is above that error and far below any
# probability mass that matters to sampling.
_TOP_P_SLACK = 1e-10

# sample_token accepts probabilities whose sum is this close to 1 (float32 softmax output).
_PROBS_SUM_ATOL = 1e-5

# top-p sorts the largest 64 logits first (8x more each time the nucleus is larger).
_TOP_P_CANDIDATES = 64


# ----------------------------------------------------------------------------------------
# validation


def _positions(mask: np.ndarray, limit: int = 10) -> str:
    """Indices where `mask` is True, as "[i, j, ...]" with at most `limit` shown."""
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:limit])
    more = f", ... ({idx.size} in total)" if idx.size > limit else ""
    return f"[{shown}{more}]"


# The rules of the sampling settings, each written once: validate_sampling (the Python API)
# and generate's flags (--temperature, --top-k, --top-p) apply these.
# `not (0 < p <= 1)` is also True for NaN; the finite check refuses inf and NaN.
TEMPERATURE = finite_number(lambda v: v >= 0, ">= 0 (0 means greedy decoding)")
TOP_K = Rule(lambda v: is_int(v) and v >= 0, "0 (no top-k filtering) or a positive integer")
TOP_P = Rule(lambda v: is_real(v) and 0 < v <= 1,
             "a number in (0, 1] (1 means no nucleus filtering)")


def validate_sampling(temperature, top_k=None, top_p=None, vocab_size=None) -> None:
    """Check sampling settings; raise ValueError with one sentence naming the bad value.

    Args:
        temperature: a finite number >= 0; 0 means greedy decoding (argmax).
        top_k: None or 0 (no top-k filtering) or a positive int. A top_k larger than the
            vocabulary is allowed and means no filtering (HF's TopKLogitsWarper clamps it
            to V the same way).
        top_p: None (no nucleus filtering) or a number in (0, 1]; 1 means no filtering
            (HF's generate() does not add a TopPLogitsWarper for top_p = 1).
        vocab_size: None (not known yet) or a positive int V.

    Raises:
        ValueError: any argument outside the ranges above (the rules TEMPERATURE, TOP_K,
            TOP_P).
    """
    if not TEMPERATURE.allows(temperature):
        raise ValueError(f"temperature={temperature!r} is not allowed: it must be "
                         f"{TEMPERATURE.allowed}")
    if top_k is not None and not TOP_K.allows(top_k):
        raise ValueError(f"top_k={top_k!r} is not allowed: it must be None or {TOP_K.allowed}")
    if top_p is not None and not TOP_P.allows(top_p):
        raise ValueError(f"top_p={top_p!r} is not allowed: it must be None or {TOP_P.allowed}")
    if vocab_size is not None and (not is_int(vocab_size) or vocab_size < 1):
        raise ValueError(f"vocab_size={vocab_size!r} is not allowed: it must be a positive integer")


def _check_logits(logits) -> np.ndarray:
    """Validate one logits vector and return it as a float64 array of shape (V,)."""
    x = np.asarray(logits)
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"logits must be float32 or float64, got dtype {x.dtype}")
    if x.ndim != 1:
        raise ValueError(f"logits must be 1-D with shape (V,), got shape {x.shape}")
    if x.size == 0:
        raise ValueError("logits are empty (V=0); at least one token is needed")
    if np.isfinite(x).all():  # the usual case: one pass, then the copy
        return x.astype(np.float64)  # (V,) always a new array: callers may write into it
    nan = np.isnan(x)
    if nan.any():
        raise ValueError(f"logits contain NaN at positions {_positions(nan)}")
    pos_inf = np.isposinf(x)
    if pos_inf.any():
        raise ValueError(
            f"logits contain +inf at positions {_positions(pos_inf)}; only -inf (a masked "
            "token) is allowed"
        )
    if np.isneginf(x).all():
        raise ValueError(f"every logit is -inf (V={x.size}), so there is no token to sample")
    return x.astype(np.float64)  # (V,) always a new array: callers may write into it


# ----------------------------------------------------------------------------------------
# the warpers: private functions compute on checked float64 logits, public ones check first


def _softmax(x: np.ndarray) -> np.ndarray:
    """softmax of checked float64 logits (V,), at least one finite; -inf -> probability 0."""
    with np.errstate(over="ignore"):  # x - max may overflow to -inf: probability 0 anyway
        return softmax(x)  # (V,) the reference kernels' softmax, here in float64


def _temperature(x: np.ndarray, temperature: float) -> np.ndarray:
    with np.errstate(over="ignore"):
        y = x / temperature  # (V,) HF TemperatureLogitsWarper: scores / temperature
    if np.isfinite(y).all():
        return y
    if np.isposinf(y).any() or np.isneginf(y).all():
        raise ValueError(
            f"logits / temperature overflows float64 at positions "
            f"{_positions(np.isinf(y) & np.isfinite(x))}: temperature={temperature!r} is too "
            "small for these logits (use temperature=0 for greedy decoding)"
        )
    return y


def _top_k(x: np.ndarray, k) -> np.ndarray:
    V = x.size
    if not k or k >= V:  # None/0: no filtering; k >= V keeps everything (HF: min(k, V))
        return x
    kth = np.partition(x, V - k)[V - k]  # the k-th largest logit
    # HF TopKLogitsWarper: `scores < topk(scores, k)[..., -1]` -> -inf, so ties with the k-th
    # largest all survive and more than k tokens may be kept.
    return np.where(x < kth, -np.inf, x)  # (V,)


def _top_p(x: np.ndarray, top_p) -> np.ndarray:
    if top_p is None or top_p >= 1:  # as HF generate(): no TopPLogitsWarper for p = 1
        return x
    return np.where(_nucleus(x, _softmax(x), top_p), x, -np.inf)  # (V,)


def _nucleus(x: np.ndarray, probs: np.ndarray, top_p: float) -> np.ndarray:
    """The tokens top-p keeps, as a (V,) bool mask: x the checked float64 logits (V,),
    probs their softmax, top_p in (0, 1)."""
    V = x.size
    # Most probable first; among equal logits the lower index first (a stable sort). HF
    # sorts with torch.sort, which is not stable for V > 16, so which members of a tie group
    # straddling the boundary HF keeps is arbitrary; how many it keeps is the same as here.
    # The nucleus is most often a few tokens: the sort runs on the n largest logits (every
    # token tied with the n-th included, so they are a prefix of the whole sorted order),
    # n growing until the set closes inside them; the result is the whole sort's. Tokens at
    # -inf (filtered or masked) have probability 0 and come after all the others, where
    # the mass of those already reaches p: they are never kept, and never sorted. A small
    # vocabulary is sorted whole at once.
    finite = np.flatnonzero(x > -np.inf)  # (F,) vocabulary order
    n = finite.size if finite.size <= 2 * _TOP_P_CANDIDATES else _TOP_P_CANDIDATES
    while True:
        if n < finite.size:
            cand = np.flatnonzero(x >= np.partition(x, V - n)[V - n])  # (>= n,) vocabulary order
        else:
            cand = finite
        order = cand[np.argsort(-x[cand], kind="stable")]  # descending
        p_sorted = probs[order]
        mass_before = np.cumsum(p_sorted) - p_sorted  # probability of the tokens ranked above
        # A token is kept while the tokens above it have not yet reached p, so the token that
        # crosses p is kept. This is HF's rule `ascending cumsum <= 1 - p -> remove` seen from
        # the other end, without the rounding that `1 - p` adds (see _TOP_P_SLACK).
        keep_sorted = mass_before < top_p - _TOP_P_SLACK  # a prefix: mass_before only grows
        keep_sorted[0] = True  # at least one token (HF's min_tokens_to_keep=1)
        if not keep_sorted.all() or cand.size == finite.size:
            break
        n = min(finite.size, 8 * n)
    keep = np.zeros(V, dtype=bool)
    keep[order[keep_sorted]] = True  # back to vocabulary order
    return keep


def apply_temperature(logits, temperature) -> np.ndarray:
    """`logits / temperature`, as HF's TemperatureLogitsWarper.

    Args:
        logits: (V,) float32 or float64; -inf entries (masked tokens) stay -inf.
        temperature: a finite number > 0. Temperature 0 (greedy) has no logits of its own;
            `process_logits` and `Sampler` handle it.

    Returns:
        (V,) float64, a new array.

    Raises:
        ValueError: bad logits (see `process_logits`), temperature not > 0, or a
            temperature so small that the division overflows float64.
    """
    validate_sampling(temperature)
    if temperature == 0:
        raise ValueError(
            "temperature=0 cannot scale logits: it means greedy decoding, which "
            "process_logits and Sampler handle; apply_temperature needs temperature > 0"
        )
    return _temperature(_check_logits(logits), float(temperature))


def top_k_filter(logits, k) -> np.ndarray:
    """Top-k filtering (Fan et al. 2018) with HF TopKLogitsWarper's semantics.

    Every token whose logit is strictly below the k-th largest gets -inf, so tokens tied
    with the k-th largest are all kept (more than k tokens may survive).

    Args:
        logits: (V,) float32 or float64.
        k: None or 0 (no filtering) or a positive int; k >= V keeps every token.

    Returns:
        (V,) float64, a new array.

    Raises:
        ValueError: bad logits (see `process_logits`) or a bad k.
    """
    validate_sampling(1.0, top_k=k)
    return _top_k(_check_logits(logits), k).copy()


def top_p_filter(logits, top_p) -> np.ndarray:
    """Nucleus filtering (Holtzman et al. 2019) with HF TopPLogitsWarper's semantics.

    Keeps the smallest set of most probable tokens whose probability (softmax of `logits`)
    reaches `top_p`: the token that crosses p is kept, and so is the most probable token
    whatever p is; all others get -inf. Example: probabilities [0.5, 0.3, 0.15, 0.05] keep
    tokens {0, 1} for p = 0.8 and {0} for p = 0.5. Equal logits are ranked lower index
    first; when such a tie group straddles p, as many of its tokens are kept as HF keeps
    (HF's choice of which ones depends on torch.sort's unstable order).

    Args:
        logits: (V,) float32 or float64.
        top_p: None or 1 (no filtering) or a number in (0, 1).

    Returns:
        (V,) float64, a new array.

    Raises:
        ValueError: bad logits (see `process_logits`) or top_p outside (0, 1].
    """
    validate_sampling(1.0, top_p=top_p)
    return _top_p(_check_logits(logits), top_p).copy()


def process_logits(logits, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """Temperature, then top-k, then top-p: HF's warpers in generate()'s order.

    Args:
        logits: (V,) float32 or float64 next-token logits; -inf marks a masked token.
        temperature, top_k, top_p: see `validate_sampling`. With temperature 0 (greedy)
            only the first largest logit is kept and top_k / top_p do not matter.

    Returns:
        (V,) float64: the scaled logits of the kept tokens, -inf elsewhere.

    Raises:
        ValueError: logits not 1-D float32/float64, empty, containing NaN or +inf (the
            message lists the positions), or all -inf; or a bad setting.
    """
    x = _check_logits(logits)  # (V,) float64
    validate_sampling(temperature, top_k, top_p, vocab_size=x.size)
    if temperature == 0:
        out = np.full_like(x, -np.inf)  # (V,)
        best = int(np.argmax(x))  # the first maximum, as torch.argmax and HF's greedy search
        out[best] = x[best]
        return out
    x = _temperature(x, float(temperature))
    x = _top_k(x, top_k)
    return _top_p(x, top_p)


def probabilities(logits, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """The sampling distribution: softmax of `process_logits`, renormalized over kept tokens.

    Args and Raises: as `process_logits`.

    Returns:
        (V,) float64 probabilities summing to 1 (to float64 rounding); 0 for every filtered
        token. Temperature 0 gives a one-hot vector at the first largest logit.
    """
    return _softmax(process_logits(logits, temperature, top_k, top_p))


# ----------------------------------------------------------------------------------------
# drawing a token


def greedy(logits) -> int:
    """Index of the largest logit, the first one on ties (greedy decoding, no randomness).

    Args: logits (V,) float32 or float64. Raises: ValueError on bad logits.
    """
    return int(np.argmax(_check_logits(logits)))


def sample_token(probs, coin) -> int:
    """Draw a token from `probs` by inverting its CDF at `coin` (llama2.c's sample_mult).

    Token i is returned for coin * total in [cdf[i-1], cdf[i]), so a token with probability
    0 is never returned: its interval is empty. Scaling the coin by the total (as llama2.c's
    top-p sampler does) means a sum that is 1 only up to rounding cannot leave coins near 1
    past the end of the CDF.

    Args:
        probs: (V,) float32 or float64, finite, >= 0, summing to 1 (within 1e-5).
        coin: a float in [0, 1), e.g. `numpy.random.Generator.random()`.

    Returns:
        int token id in [0, V) with probs[id] > 0.

    Raises:
        ValueError: probs not a 1-D float vector, empty, with NaN/inf or negative entries,
            or not summing to 1; coin outside [0, 1).
    """
    p = np.asarray(probs)
    if p.dtype not in (np.float32, np.float64) or p.ndim != 1 or p.size == 0:
        raise ValueError(
            f"probs must be a non-empty 1-D float32 or float64 array of shape (V,), got dtype "
            f"{p.dtype} and shape {p.shape}"
        )
    bad = ~np.isfinite(p) | (p < 0)
    if bad.any():
        raise ValueError(
            f"probs must be finite and >= 0, but are not at positions {_positions(bad)}"
        )
    total = float(p.sum(dtype=np.float64))
    if abs(total - 1.0) > _PROBS_SUM_ATOL:
        raise ValueError(f"probs must sum to 1 (within {_PROBS_SUM_ATOL}), but sum to {total!r}")
    if not is_real(coin) or not (0 <= coin < 1):
        raise ValueError(f"coin={coin!r} is not allowed: it must be a number in [0, 1)")
    return _draw(p, float(coin))


def _draw(p: np.ndarray, coin: float) -> int:
    """sample_token on checked probabilities p (V,) and coin in [0, 1)."""
    cdf = np.cumsum(p, dtype=np.float64)  # (V,)
    # coin < 1 makes coin * cdf[-1] < cdf[-1] in floating point too (the product is at most
    # cdf[-1] * (1 - 2**-53), which never rounds up to cdf[-1]), so the search always lands
    # on a token, and on one whose CDF step is not empty.
    return int(np.searchsorted(cdf, coin * cdf[-1], side="right"))


def sample_rows(samplers, logits) -> list[int]:
    """One token per row: row i drawn by samplers[i] from logits[i], the tokens
    `[samplers[i](logits[i]) for i ...]` gives, bit for bit, each `Sampler` drawing its coin
    from its own generator in row order (a sampler may serve several rows: it then draws
    for them in turn, as that loop does).

    Rows whose samplers are `Sampler`s with the same settings run together, in one numpy
    pass over their (n, V) logits: the same float64 operations on the same numbers as
    `Sampler.__call__` (elementwise, or along each row: max, sum, sort, cumsum), its
    nucleus sorted whole rather than from its largest candidates (whose prefix of the
    sorted order is the same). Other callables are called row by row; so is every row of a
    group holding a non-finite logit, or overflowing its temperature, so that the error
    names that row's values as `Sampler.__call__` does.

    Args:
        samplers: N callables, logits (V,) -> token id (`Sampler`s or any others).
        logits: N logits vectors (V,) float32 or float64 (a sequence, or an (N, V) array).
    Returns:
        N token ids, as each sampler returns them.
    Raises:
        ValueError: as the samplers raise for bad logits.
    """
    n = len(samplers)
    if n == 1:  # batch 1: the call itself
        return [samplers[0](logits[0])]
    tokens: list = [None] * n
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samplers):
        if type(s) is Sampler:
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
        else:
            tokens[i] = s(logits[i])
    for (temperature, top_k, top_p), rows in groups.items():
        if len(rows) == 1:
            tokens[rows[0]] = samplers[rows[0]](logits[rows[0]])
            continue
        for i, t in zip(rows, _sample_group([samplers[i] for i in rows], [logits[i] for i in rows],
                                            temperature, top_k, top_p)):
            tokens[i] = t
    return tokens


def _sample_group(samplers, logits, temperature, top_k, top_p) -> list[int]:
    """`sample_rows` for rows whose Samplers share these settings (see there)."""
    x = np.asarray(logits)
    if x.dtype not in (np.float32, np.float64) or x.ndim != 2 or x.shape[1] == 0 or \
            not np.isfinite(x).all():
        return [s(l) for s, l in zip(samplers, logits)]  # row by row: its checks and messages
    x = x.astype(np.float64)  # (n, V) a new array
    if temperature == 0:
        return [int(t) for t in np.argmax(x, axis=1)]  # the first maximum of each row
    if temperature != 1:
        with np.errstate(over="ignore"):
            y = x / float(temperature)  # (n, V)
        if not np.isfinite(y).all():  # an overflow: the row's own error
            return [s(l) for s, l in zip(samplers, logits)]
        x = y
    V = x.shape[1]
    if top_k and top_k < V:  # as _top_k, row by row
        kth = np.partition(x, V - top_k, axis=1)[:, V - top_k:V - top_k + 1]  # (n, 1)
        x = np.where(x < kth, -np.inf, x)
    with np.errstate(over="ignore"):  # as Sampler.__call__
        e = np.exp(x - x.max(axis=1, keepdims=True))  # (n, V)
    if top_p is not None and top_p < 1:
        probs = e / e.sum(axis=1, keepdims=True)
        # _nucleus with the whole row sorted: most probable first, ties lower index first;
        # -inf tokens (probability 0) last, never kept (the mass above them reaches p)
        order = np.argsort(-x, axis=1, kind="stable")  # (n, V)
        p_sorted = np.take_along_axis(probs, order, axis=1)
        mass_before = np.cumsum(p_sorted, axis=1) - p_sorted
        keep_sorted = mass_before < top_p - _TOP_P_SLACK
        keep_sorted[:, 0] = True
        keep = np.zeros(x.shape, dtype=bool)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        e = np.where(keep, e, 0.0)
    p = e / e.sum(axis=1, keepdims=True)  # (n, V)
    cdf = np.cumsum(p, axis=1)  # as _draw, row by row
    coins = np.array([s.rng.random() for s in samplers])  # row order, as the loop draws
    # searchsorted(cdf, u, side="right") on a non-decreasing cdf: how many entries are <= u
    return [int(t) for t in (cdf <= (coins * cdf[:, -1])[:, None]).sum(axis=1)]


class Sampler:
    """Holds the sampling settings and a seeded random generator; one call, one token.

    Usage: `sampler = Sampler(temperature=0.8, top_k=40, seed=1337)`, then
    `token = sampler(logits)` for each (V,) float32 or float64 logits vector.

    Args:
        temperature: finite >= 0; 0 is greedy decoding and never draws a random number.
        top_k: None/0 (off) or a positive int (larger than V means off).
        top_p: None or a number in (0, 1]; the default 0.9 is minitf's nucleus default.
        seed: None (fresh OS entropy) or a non-negative int; the same seed gives the same
            sequence of tokens for the same sequence of logits.

    Raises:
        ValueError: a bad setting or seed here, bad logits at call time.
    """

    def __init__(self, temperature=1.0, top_k=None, top_p=0.9, seed=None):
        validate_sampling(temperature, top_k, top_p)
        if seed is not None and (not is_int(seed) or seed < 0):
            raise ValueError(f"seed={seed!r} is not allowed: it must be None or an integer >= 0")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def probabilities(self, logits) -> np.ndarray:
        """(V,) float64 distribution this sampler draws from; see `probabilities`."""
        return probabilities(logits, self.temperature, self.top_k, self.top_p)

    def __call__(self, logits) -> int:
        """Next token id for one logits vector (V,): `sample_token(self.probabilities(logits),
        coin)`, the settings and the probabilities not checked again (the settings were at
        construction; softmax output is a distribution)."""
        x = _check_logits(logits)  # (V,) float64
        if self.temperature == 0:
            return int(np.argmax(x))
        if self.temperature != 1:  # x / 1 is x
            x = _temperature(x, float(self.temperature))
        x = _top_k(x, self.top_k)
        # the softmax of the filtered logits, computed once: the nucleus always holds the
        # largest logit, so softmax(where(keep, x, -inf)) = where(keep, e, 0) / its sum,
        # e = exp(x - max x) the terms of softmax(x), bit for bit the same operations
        # (numpy_ref.softmax) on the same numbers
        with np.errstate(over="ignore"):  # as _softmax: x - max may overflow to -inf
            e = np.exp(x - x.max())  # (V,); -inf -> 0
        if self.top_p is not None and self.top_p < 1:
            e = np.where(_nucleus(x, e / e.sum(), self.top_p), e, 0.0)
        return _draw(e / e.sum(), self.rng.random())

    def __repr__(self) -> str:
        return (
            f"Sampler(temperature={self.temperature!r}, top_k={self.top_k!r}, "
            f"top_p={self.top_p!r}, seed={self.seed!r})"
        )
