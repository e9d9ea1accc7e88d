"""The inference engine against the training model's full forward pass (minitf.model, an
independent code path through minitf.layers): prefill (all positions, and the last alone),
KV-cache decode, the exact context mode past the context (tests/test_generation.py has
the context modes and batches in full)."""

import numpy as np
import pytest

from minitf.config import GPTConfig
from minitf.engine import Engine
from minitf.model import GPT, init_params
from tolerances import TOL

BACKENDS = ["numpy", "numba", "cython"]
ATOL = TOL[("kv_cache_logits", np.float32)]


@pytest.fixture(scope="module")
def model():
    config = GPTConfig(vocab_size=37, block_size=12, n_layer=2, n_head=3, d_model=24)
    params = init_params(config, seed=4, dtype=np.float64)
    rng = np.random.default_rng(9)
    for name in params:  # larger weights than at init, so the logits differ clearly by token
        params[name] += rng.normal(scale=0.2, size=params[name].shape)
    return config, params


def full_logits(config, params, ids):
    """Logits (T, V) from the float64 training forward over ids (no cache)."""
    return GPT(config, params).forward(np.asarray(ids)[None, :])[0][0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_matches_full_forward(model, backend):
    config, params = model
    engine = Engine(config, params, backend)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=config.block_size)
    for T in (1, 5, config.block_size):  # T = 1 and the exact context boundary
        got = engine.prefill(ids[:T])
        want = full_logits(config, params, ids[:T])
        err = np.abs(got - want).max()
        assert err <= ATOL, f"{backend} prefill T={T}: max |diff| {err:.2e}"
        # the last position alone: the last layer's attention output, MLP and head on one row
        err = np.abs(engine.prefill(ids[:T], last_only=True) - want[-1]).max()
        assert err <= ATOL, f"{backend} prefill T={T}, last_only: max |diff| {err:.2e}"
        got = engine.decode(ids[0]) if T < config.block_size else None  # its cache is complete
        if got is not None:
            want = full_logits(config, params, list(ids[:T]) + [ids[0]])[-1]
            assert np.abs(got - want).max() <= ATOL, f"{backend} decode after a last_only prefill"


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_decode_matches_full_forward(model, backend):
    config, params = model
    engine = Engine(config, params, backend)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=config.block_size)
    engine.prefill(ids[:3])
    for t in range(3, config.block_size):  # up to and including the last position
        got = engine.decode(ids[t])
        want = full_logits(config, params, ids[: t + 1])[-1]
        err = np.abs(got - want).max()
        assert err <= ATOL, f"{backend} decode at position {t}: max |diff| {err:.2e}"
    with pytest.raises(ValueError, match="cache is full"):
        engine.decode(ids[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_slides_the_window_past_the_context(model, backend):
    """Greedy generation beyond block_size, context_mode exact: every step equals a full
    forward over the last block_size tokens (nanoGPT's crop), and never raises an index
    error."""
    config, params = model
    engine = Engine(config, params, backend)
    prompt = [1, 2, 3]
    n_new = 2 * config.block_size + 3
    got = list(engine.generate(prompt, n_new, lambda logits: int(np.argmax(logits)),
                               context_mode="exact"))
    ids = list(prompt)
    for _ in range(n_new):
        ids.append(int(np.argmax(full_logits(config, params, ids[-config.block_size:])[-1])))
    assert got == ids[len(prompt):]


def test_prompt_longer_than_context_uses_its_last_block_size_tokens(model):
    config, params = model
    engine = Engine(config, params, "numpy")
    prompt = list(np.random.default_rng(2).integers(0, config.vocab_size, size=config.block_size + 5))
    greedy = lambda logits: int(np.argmax(logits))
    assert list(engine.generate(prompt, 4, greedy)) == list(engine.generate(prompt[-config.block_size:], 4, greedy))


def test_bad_input(model):
    config, params = model
    engine = Engine(config, params, "numpy")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 37\)"):
        engine.prefill([0, 37])
    with pytest.raises(ValueError, match="1..12 tokens"):
        engine.prefill([])
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        list(engine.generate([1], -1, lambda logits: 0))
    with pytest.raises(ValueError, match="int8 mode 'int4'"):
        Engine(config, params, "numpy", int8_mode="int4")
    from minitf.kernels import BackendError
    with pytest.raises(BackendError, match="unknown kernel backend 'cuda'"):
        Engine(config, params, "cuda")
    import dataclasses
    with pytest.raises(ValueError, match="parameters not in the config"):  # 2 blocks, config says 1
        Engine(dataclasses.replace(config, n_layer=1), params, "numpy")
    with pytest.raises(ValueError, match="parameter wte has shape"):
        Engine(dataclasses.replace(config, vocab_size=38), params, "numpy")
