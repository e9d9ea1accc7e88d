"""Tests of minitf.sampling against hand-worked numbers and HF transformers' own warpers.

The oracle is HF's sampling path as `generate(do_sample=True)` builds it:
TemperatureLogitsWarper (if temperature != 1), TopKLogitsWarper (if top_k not None/0),
TopPLogitsWarper (if top_p < 1), in that order, run with torch on the same logits.
"""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minitf.sampling import (
    Sampler,
    apply_temperature,
    greedy,
    probabilities,
    process_logits,
    sample_rows,
    sample_token,
    top_k_filter,
    top_p_filter,
    validate_sampling,
)
from tests.tolerances import TOL

HYPOTHESIS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)

P4 = np.array([0.5, 0.3, 0.15, 0.05])  # the hand-worked distribution


def kept(filtered: np.ndarray) -> list:
    return np.flatnonzero(np.isfinite(filtered)).tolist()


# ----------------------------------------------------------------------------------------
# hand-worked values


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.8, [0.625, 0.375, 0.0, 0.0]),  # 0.5 + 0.3 reaches 0.8 exactly: 2 tokens
        (0.5, [1.0, 0.0, 0.0, 0.0]),  # 0.5 reaches 0.5: 1 token
        (0.3, [1.0, 0.0, 0.0, 0.0]),  # the first token already crosses p
        (0.65, [0.625, 0.375, 0.0, 0.0]),  # 0.3 crosses 0.65 and is kept
        (0.81, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (0.95, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # reaches 0.95 exactly
        (1.0, P4),  # no filtering
        (1e-12, [1.0, 0.0, 0.0, 0.0]),  # at least one token
    ],
)
def test_top_p_hand_worked(top_p, expected):
    got = probabilities(np.log(P4), temperature=1.0, top_p=top_p)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got.dtype == np.float64 and abs(got.sum() - 1) < 1e-12


@pytest.mark.parametrize("top_p, n_kept", [(0.8 + 1e-9, 2), (0.8 + 3e-9, 3)])
def test_top_p_resolves_mass_differences_float32_cannot(top_p, n_kept):
    # the first two tokens hold 0.8 + 2e-9: float64 tells that apart from p within 1e-9
    x = np.log([0.5, 0.3 + 2e-9, 0.2 - 2e-9])
    assert kept(top_p_filter(x, top_p)) == list(range(n_kept))


def test_top_p_keeps_the_most_probable_tokens_in_any_order():
    perm = [2, 0, 3, 1]  # P4 shuffled: 0.15, 0.5, 0.05, 0.3
    got = probabilities(np.log(P4[perm]).astype(np.float32), temperature=1.0, top_p=0.7)
    np.testing.assert_allclose(got, [0.0, 0.625, 0.0, 0.375], atol=1e-7)
    assert kept(top_p_filter(np.log(P4[perm]), 0.7)) == [1, 3]


def test_top_p_tie_straddling_p_keeps_as_many_as_hf_lowest_index_first():
    # four equal tokens of 0.25: p = 0.5 is reached by two of them. HF keeps two as well
    # (which two follows torch.sort's order); minitf keeps the lowest indices.
    assert kept(top_p_filter(np.zeros(4), 0.5)) == [0, 1]
    assert kept(top_p_filter(np.zeros(4), 0.51)) == [0, 1, 2]
    hf = TopPLogitsWarper(0.5)(None, torch.zeros(1, 4))[0]
    assert int(torch.isfinite(hf).sum()) == 2


def test_top_k_keeps_ties_with_the_kth_largest():
    x = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert kept(top_k_filter(x, 1)) == [1, 2, 4]  # three tokens tie for the largest
    assert kept(top_k_filter(x, 2)) == [1, 2, 4]
    assert kept(top_k_filter(x, 4)) == [1, 2, 3, 4]
    assert kept(top_k_filter(x, 6)) == list(range(6))
    assert kept(top_k_filter(x, 1000)) == list(range(6))  # k > V: no filtering
    assert kept(top_k_filter(x, None)) == kept(top_k_filter(x, 0)) == list(range(6))
    np.testing.assert_allclose(
        probabilities(x, top_k=2), [0, 1 / 3, 1 / 3, 0, 1 / 3, 0], rtol=0, atol=1e-15
    )
    np.testing.assert_array_equal(top_k_filter(x, 2)[[1, 2, 4]], [3.0, 3.0, 3.0])  # unscaled


def test_top_k_with_masked_tokens():
    x = np.array([0.0, -np.inf, -np.inf, 1.0])
    assert kept(top_k_filter(x, 3)) == [0, 3]  # the 3rd largest is -inf: nothing more to drop
    np.testing.assert_allclose(probabilities(x, top_k=1), [0, 0, 0, 1])


def test_temperature_scaling():
    x = np.array([0.0, math.log(2.0)])
    np.testing.assert_array_equal(apply_temperature(x, 0.5), [0.0, 2 * math.log(2.0)])
    np.testing.assert_allclose(probabilities(x, 1.0), [1 / 3, 2 / 3], atol=1e-15)
    np.testing.assert_allclose(probabilities(x, 0.5), [1 / 5, 4 / 5], atol=1e-15)
    r2 = math.sqrt(2.0)
    np.testing.assert_allclose(probabilities(x, 2.0), [1 / (1 + r2), r2 / (1 + r2)], atol=1e-15)
    y = apply_temperature(np.array([1.0, -np.inf], dtype=np.float32), 4.0)
    assert y.dtype == np.float64 and y[0] == 0.25 and y[1] == -np.inf


def test_warpers_run_in_hf_order():
    # temperature before top-p: T = 0.5 squares P4 -> [.685, .247, .062, .007], so two
    # tokens reach p = 0.9; top-p on the unscaled P4 would have kept three.
    assert kept(process_logits(np.log(P4), 0.5, None, 0.9)) == [0, 1]
    # top-k before top-p: k = 2 renormalizes [0.4, 0.3] to [4/7, 3/7], which alone reaches
    # p = 0.5; top-p on the full distribution would have kept two.
    x = np.log([0.4, 0.3, 0.2, 0.1])
    assert kept(process_logits(x, 1.0, 2, 0.5)) == [0]
    assert kept(process_logits(x, 1.0, None, 0.5)) == [0, 1]


def test_greedy_is_the_first_maximum_and_uses_no_randomness():
    x = np.array([1.0, 5.0, 5.0, -np.inf], dtype=np.float32)
    assert greedy(x) == 1
    np.testing.assert_array_equal(probabilities(x, temperature=0, top_k=1, top_p=0.1), [0, 1, 0, 0])
    assert kept(process_logits(x, 0)) == [1]
    sampler = Sampler(temperature=0, top_p=0.5, seed=7)
    state = sampler.rng.bit_generator.state
    assert [sampler(x) for _ in range(5)] == [1] * 5
    assert sampler.rng.bit_generator.state == state
    assert greedy(x) == int(torch.argmax(torch.from_numpy(x)))  # torch: the first maximum too


# ----------------------------------------------------------------------------------------
# against HF transformers' warpers


def hf_warp(logits: np.ndarray, temperature, top_k, top_p) -> torch.Tensor:
    """HF's filtered scores (V,) for the logits, in the logits' dtype; generate()'s rules."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    scores = torch.from_numpy(logits.copy())[None]  # (1, V)
    return warpers(torch.zeros(1, 0, dtype=torch.long), scores)[0]  # (V,)


def boundary_margin(x: np.ndarray, temperature, top_k, top_p) -> float:
    """How far (in probability, or relative logit for top-k) the case is from a decision
    that rounding could flip: a prefix sum equal to p, or two values at the k-th place
    that float32 division could merge. An independent float64 numpy restatement."""
    z = x.astype(np.float64) / temperature  # (V,)
    margin = math.inf
    V = z.size
    if top_k and top_k < V:
        desc = np.sort(z)[::-1]
        kth = desc[top_k - 1]
        below = desc[desc < kth]
        if below.size and np.isfinite(below[0]) and np.isfinite(kth):
            margin = min(margin, (kth - below[0]) / max(1.0, abs(kth)))
        z = np.where(z < kth, -np.inf, z)
    if top_p is not None and top_p < 1:
        e = np.exp(z - z.max())
        q = np.sort(e / e.sum())[::-1]
        margin = min(margin, float(np.min(np.abs(np.cumsum(q) - q - top_p))))
    return margin


def assert_matches_hf(x, temperature, top_k, top_p, atol):
    """Kept set and renormalized probabilities of minitf equal HF's.

    Where a group of equal logits straddles the top-p boundary, HF keeps a number of them
    that is fixed, but which ones follows torch.sort's unstable order; there we compare
    how many are kept and the sorted probabilities, everywhere else token by token.
    """
    mine = probabilities(x, temperature, top_k, top_p)  # (V,) float64
    mine_keep = np.isfinite(process_logits(x, temperature, top_k, top_p))
    hf_scores = hf_warp(x, temperature, top_k, top_p)
    hf_keep = torch.isfinite(hf_scores).numpy()
    hf = torch.softmax(hf_scores.double(), dim=-1).numpy()  # renormalize over HF's kept set

    values, group = np.unique(x, return_inverse=True)
    size = np.bincount(group, minlength=values.size)
    mine_count = np.bincount(group, weights=mine_keep, minlength=values.size)
    hf_count = np.bincount(group, weights=hf_keep, minlength=values.size)
    diff = np.flatnonzero(mine_count != hf_count)
    assert diff.size == 0, (
        f"kept sets differ (T={temperature}, k={top_k}, p={top_p}): minitf keeps "
        f"{np.flatnonzero(mine_keep).tolist()}, HF keeps {np.flatnonzero(hf_keep).tolist()}"
    )
    partial = (mine_count > 0) & (mine_count < size)  # tie groups cut by the boundary
    assert partial.sum() <= 1
    whole = ~partial[group]  # (V,) tokens outside such a group
    np.testing.assert_array_equal(mine_keep[whole], hf_keep[whole])
    err = max(np.abs(mine - hf)[whole].max(initial=0.0), np.abs(np.sort(mine) - np.sort(hf)).max())
    assert err <= atol, f"max |minitf - HF| = {err:.3g} > {atol:.3g}"
    assert abs(mine.sum() - 1.0) < 1e-12


@st.composite
def sampling_cases(draw, extreme_scale):
    """(logits float64 (V,), temperature, top_k, top_p) with ties, masks and extremes."""
    V = draw(st.sampled_from([65, 1024]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "extreme"]))
    if kind == "normal":
        x = rng.standard_normal(V) * draw(st.sampled_from([0.1, 1.0, 3.0, 10.0]))
    elif kind == "ties":  # few distinct values: ties everywhere, also at the k / p boundary
        x = rng.integers(-3, 4, size=V) * draw(st.sampled_from([0.25, 1.0, 4.0]))
    else:  # a huge spread: probabilities that underflow to exactly 0 next to large ones
        x = rng.standard_normal(V) * 30.0
        x[rng.choice(V, size=5, replace=False)] = [extreme_scale, extreme_scale, -extreme_scale,
                                                   extreme_scale / 2, -1.0]
    masked = draw(st.sampled_from([0.0, 0.3, 0.95]))  # fraction of -inf (masked) tokens
    x = np.where(rng.random(V) < masked, -np.inf, x)
    x[rng.integers(V)] = rng.standard_normal()  # at least one finite logit
    temperature = draw(st.one_of(st.just(1.0), st.floats(0.05, 20.0)))
    top_k = draw(st.one_of(st.none(), st.just(0), st.integers(1, 8), st.integers(1, V + 10)))
    top_p = draw(st.one_of(st.none(), st.just(1.0), st.floats(0.01, 0.999)))
    return x.astype(np.float64), temperature, top_k, top_p


@HYPOTHESIS
@given(case=sampling_cases(extreme_scale=1e30))
def test_matches_hf_warpers_float64(case):
    x, temperature, top_k, top_p = case
    assume(boundary_margin(x, temperature, top_k, top_p) > 1e-9)
    assert_matches_hf(x, temperature, top_k, top_p, TOL[("sampling", np.float64)])


@HYPOTHESIS
@given(case=sampling_cases(extreme_scale=1e4))
def test_matches_hf_warpers_float32(case):
    # HF computes in float32 here and minitf in float64. Float32 rounds each logit / T to
    # 2**-24 relative, which moves a probability by up to ~1e-7 times the largest |logit/T|,
    # so the table's absolute tolerance is scaled by that size (when it exceeds 1).
    x, temperature, top_k, top_p = case
    x = x.astype(np.float32)
    assume(boundary_margin(x, temperature, top_k, top_p) > 1e-5)
    scale = max(1.0, float(np.abs(x[np.isfinite(x)]).max()) / temperature)
    assert_matches_hf(x, temperature, top_k, top_p, TOL[("sampling", np.float32)] * scale)


def test_matches_hf_on_realistic_float32_logits_with_plain_tolerance():
    # GPT-sized logits of moderate size, where the absolute table tolerance applies as is.
    rng = np.random.default_rng(0)
    for i in range(200):
        V = (65, 1024)[i % 2]
        x = (rng.standard_normal(V) * 3.0).astype(np.float32)
        temperature, top_k, top_p = rng.uniform(0.5, 1.5), int(rng.integers(0, V)), rng.uniform(0.05, 1)
        if boundary_margin(x, temperature, top_k, top_p) > 1e-5:
            assert_matches_hf(x, temperature, top_k, top_p, TOL[("sampling", np.float32)])


def test_top_p_on_a_large_vocabulary_keeps_what_a_full_sort_keeps():
    """top_p_filter sorts only the largest logits until the nucleus closes among them; on a
    GPT-2-sized vocabulary its kept set equals the one a full stable sort gives, whether
    the nucleus has 1 token, a few hundred or most of the vocabulary, with ties at every
    boundary and masked tokens."""

    def full_sort(x, p):  # the definition: most probable first, lower index first on ties
        e = np.exp(x - x.max())
        q = e / e.sum()
        order = np.argsort(-x, kind="stable")
        before = np.cumsum(q[order]) - q[order]
        keep = before < p - 1e-10
        keep[0] = True
        return np.sort(order[keep])

    rng = np.random.default_rng(11)
    V = 50257
    for scale, lead in ((1.0, 12.0), (1.0, 6.0), (2.0, 0.0), (0.01, 0.0)):
        for ties in (False, True):
            x = rng.standard_normal(V) * scale
            x[:20] += lead  # a few likely tokens, as a trained model's logits have
            if ties:
                x = np.round(x * 4) / 4
            x[rng.random(V) < 0.1] = -np.inf
            for p in (0.05, 0.5, 0.9, 0.99):
                got = np.flatnonzero(np.isfinite(top_p_filter(x, p)))
                np.testing.assert_array_equal(got, full_sort(x, p), err_msg=f"scale {scale} lead {lead} p {p}")


# ----------------------------------------------------------------------------------------
# drawing tokens


def test_sample_token_inverse_cdf_on_a_grid_of_coins():
    # Evenly spaced coins are the exact quantiles: token i must get probs[i] of them (to
    # within one coin), and tokens of probability 0 none at all.
    probs = np.array([0.0, 0.1, 0.0, 0.25, 0.6, 0.05, 0.0])
    n = 10_000
    tokens = [sample_token(probs, (j + 0.5) / n) for j in range(n)]
    counts = np.bincount(tokens, minlength=probs.size)
    assert np.abs(counts / n - probs).max() <= 1 / n
    assert counts[probs == 0].sum() == 0


def test_sample_token_coins_near_0_and_1():
    probs = np.array([0.0, 0.0, 0.3, 0.0, 0.7, 0.0, 0.0])
    assert sample_token(probs, 0.0) == 2  # skips the leading zeros
    assert sample_token(probs, 1e-300) == 2
    assert sample_token(probs, np.nextafter(1.0, 0.0)) == 4  # skips the trailing zeros
    assert sample_token(probs, 0.3) == 4  # a coin on the CDF step belongs to the next token
    assert sample_token(np.array([1.0]), np.nextafter(1.0, 0.0)) == 0
    # a float32 softmax summing to 1 - 1e-7: the largest coin still lands on a real token
    p32 = np.array([0.5, 0.4999999, 0.0], dtype=np.float32)
    assert sample_token(p32, np.nextafter(1.0, 0.0)) == 1
    tiny = np.array([1.0 - 1e-17, 1e-300, 0.0])  # a token the CDF cannot resolve
    assert sample_token(tiny, np.nextafter(1.0, 0.0)) in (0, 1)


def test_same_seed_same_tokens():
    rng = np.random.default_rng(3)
    logits = [rng.standard_normal(65).astype(np.float32) for _ in range(50)]
    a = Sampler(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    b = Sampler(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    c = Sampler(temperature=0.9, top_k=20, top_p=0.9, seed=1235)
    ta, tb, tc = ([s(x) for x in logits] for s in (a, b, c))
    assert ta == tb
    assert ta != tc  # a different seed gives a different sequence (fixed seeds: no flake)


@pytest.mark.parametrize("V", [3, 65, 128, 129, 1000])
@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, 0.9), (0.7, None, 0.5), (1.0, None, None), (1.3, 20, 0.95), (0.8, 5, None),
    (1.0, None, 1.0)])
def test_sampler_draws_sample_token_of_probabilities_with_its_coins(V, temperature, top_k, top_p):
    """Sampler's one-pass pipeline gives, token for token, sample_token(probabilities(x),
    coin) with the coins of the same seeded generator (HF-checked warpers, then the
    grid-checked inverse CDF): exactly, ties and masked tokens included."""
    rng = np.random.default_rng(V)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=7)
    coins = np.random.default_rng(7)
    for i in range(40):
        x = rng.standard_normal(V) * (3 if i % 2 else 0.3)
        if i % 3 == 0:
            x = np.round(x)  # ties
        if i % 5 == 0:
            x[rng.random(V) < 0.3] = -np.inf
            x[0] = 2.0  # at least one token
        x = x.astype(np.float32 if i % 4 else np.float64)
        want = sample_token(probabilities(x, temperature, top_k, top_p), coins.random())
        assert sampler(x) == want, i


@pytest.mark.parametrize("V", [3, 65, 129, 1000])
def test_sample_rows_draws_each_row_as_its_sampler_alone(V):
    """sample_rows (the batched generation's sampling: one numpy pass per group of Samplers
    with the same settings) gives, row by row, sample_token(probabilities(x), coin) with
    the coins of each row's own seeded generator, drawn in row order: greedy and sampled
    groups mixed, a Sampler serving several rows, a plain callable, ties and masked
    tokens (a row with -inf, whose group is drawn row by row)."""
    rng = np.random.default_rng(V)
    settings = [(1.0, None, 0.9), (0.7, 5, 0.5), (0.0, None, 0.9), (1.3, None, None),
                (0.7, 5, 0.5), (1.0, None, 0.9), (1.0, None, 0.9)]
    samplers = [Sampler(t, k, p, seed=10 + i) for i, (t, k, p) in enumerate(settings)]
    samplers[6] = samplers[0]  # one generator drawing for rows 0 and 6, in that order
    coins = [np.random.default_rng(10 + i) for i in range(len(settings))]
    coins[6] = coins[0]
    samplers.append(lambda x: int(np.argmin(x)))  # not a Sampler: called as it is
    for step in range(30):
        x = rng.standard_normal((len(samplers), V)) * (3 if step % 2 else 0.3)
        if step % 3 == 0:
            x = np.round(x)  # ties
        if step % 5 == 0:
            x[1, rng.random(V) < 0.3] = -np.inf
            x[1, 0] = 2.0
        x = x.astype(np.float32 if step % 4 else np.float64)
        want = []
        for i, (t, k, p) in enumerate(settings):
            if t == 0:
                want.append(int(np.argmax(x[i])))
            else:
                want.append(sample_token(probabilities(x[i], t, k, p), coins[i].random()))
        want.append(int(np.argmin(x[-1])))
        assert sample_rows(samplers, list(x)) == want, step


def test_sampler_frequencies_match_probabilities():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(65) * 1.5
    sampler = Sampler(temperature=0.8, top_k=30, top_p=0.9, seed=2024)
    probs = sampler.probabilities(x)
    n = 20_000
    counts = np.bincount([sampler(x) for _ in range(n)], minlength=x.size)
    assert counts[probs == 0].sum() == 0, "a filtered token was drawn"
    support = probs > 0
    expected = n * probs[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    # mean dof, sd sqrt(2 dof): 5 sd above the mean is p < 1e-5 for a correct sampler
    assert chi2 < dof + 5 * math.sqrt(2 * dof), f"chi-square {chi2:.1f} with {dof} dof"


# ----------------------------------------------------------------------------------------
# bad input: a ValueError that names the value


@pytest.mark.parametrize(
    "call, needle",
    [
        *[(lambda v=v: validate_sampling(v), f"temperature={v!r}")
          for v in (-1.0, -1e-9, float("nan"), float("inf"), "hot", True, None)],
        *[(lambda v=v: validate_sampling(1.0, top_p=v), f"top_p={v!r}")
          for v in (0.0, 0, -0.1, 1.5, 1.0000001, float("nan"), "0.9", True)],
        *[(lambda v=v: validate_sampling(1.0, top_k=v), f"top_k={v!r}")
          for v in (-1, 2.5, 3.0, True, "5")],
        *[(lambda v=v: validate_sampling(1.0, vocab_size=v), f"vocab_size={v!r}") for v in (0, -5, 65.0)],
        (lambda: Sampler(temperature=-0.5), "temperature=-0.5"),
        (lambda: Sampler(top_p=2), "top_p=2"),
        (lambda: Sampler(top_k=-3), "top_k=-3"),
        (lambda: Sampler(seed=-1), "seed=-1"),
        (lambda: Sampler(seed="abc"), "seed='abc'"),
        (lambda: probabilities(np.zeros(4), temperature=-2.0), "temperature=-2.0"),
        (lambda: process_logits(np.zeros(4), 1.0, top_k=1.5), "top_k=1.5"),
        (lambda: top_p_filter(np.zeros(4), 0.0), "top_p=0.0"),
        (lambda: top_k_filter(np.zeros(4), -2), "top_k=-2"),
        (lambda: apply_temperature(np.zeros(4), 0.0), "temperature=0"),
        (lambda: apply_temperature(np.array([1e300, 0.0]), 1e-10), "temperature=1e-10"),
        (lambda: probabilities(np.array([0.0, np.nan, 1.0, np.nan])), "NaN at positions [1, 3]"),
        (lambda: Sampler(seed=0)(np.array([0.0, 1.0, np.inf], dtype=np.float32)), "+inf at positions [2]"),
        (lambda: greedy(np.full(3, -np.inf)), "every logit is -inf"),
        (lambda: Sampler(temperature=0)(np.array([np.nan, 1.0])), "NaN at positions [0]"),
        (lambda: probabilities(np.zeros((2, 3))), "shape (2, 3)"),
        (lambda: probabilities(np.zeros(0)), "V=0"),
        (lambda: probabilities(np.arange(4)), "int64"),
        (lambda: probabilities(np.zeros(4, dtype=np.float16)), "float16"),
        (lambda: sample_token(np.array([0.5, 0.5]), 1.0), "coin=1.0"),
        (lambda: sample_token(np.array([0.5, 0.5]), -0.1), "coin=-0.1"),
        (lambda: sample_token(np.array([0.5, 0.5]), float("nan")), "coin=nan"),
        (lambda: sample_token(np.array([0.5, -0.1, 0.6]), 0.5), "positions [1]"),
        (lambda: sample_token(np.array([0.5, np.nan]), 0.5), "positions [1]"),
        (lambda: sample_token(np.array([0.5, 0.6]), 0.5), "1.1"),
        (lambda: sample_token(np.array([[1.0]]), 0.5), "shape (1, 1)"),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(call, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        call()


def test_allowed_edge_settings():
    validate_sampling(0, top_k=0, top_p=1, vocab_size=1)  # ints are numbers too
    validate_sampling(1e-3, top_k=10**9, top_p=1e-9, vocab_size=65)  # top_k > V is allowed
    validate_sampling(np.float32(0.7), top_k=np.int64(5), top_p=np.float64(0.9))
    assert Sampler(top_k=10**6, top_p=None, seed=0)(np.zeros(3)) in (0, 1, 2)
