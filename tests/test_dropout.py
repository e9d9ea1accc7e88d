"""Dropout: the masks' 1 / (1 - p) scaling and drop rate, dropout off outside training, and the
config field. (Its forward and backward against PyTorch with the same masks:
tests/test_model_torch.py; against finite differences: tests/test_layers_grad.py; resuming
a run with dropout exactly: tests/test_train.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from minitf.config import GPTConfig
from minitf.engine import Engine
from minitf.kernels import BACKENDS, get_backend
from minitf.model import GPT, init_params

CONFIG = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, d_model=8, dropout=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_keep_with_probability_1_minus_p_and_scale_by_its_inverse(backend, p):
    """Every mask value is 0 or exactly 1 / (1 - p); the dropped fraction is p within 5
    standard deviations; so E[mask] = 1 and a dropped layer keeps its expected value."""
    config = GPTConfig(**{**CONFIG.to_dict(), "dropout": p})
    model = GPT(config, init_params(config), get_backend(backend))
    masks = model.draw_masks(np.random.default_rng(0), 64)
    arrays = [masks.embedding] + [m for b in masks.blocks for m in (b.att, b.attn, b.mlp)]
    assert [a.shape for a in arrays[:4]] == [(64, 16, 8), (64, 2, 16, 16), (64, 16, 8), (64, 16, 8)]
    values = np.concatenate([a.reshape(-1) for a in arrays])
    scale = np.float32(1.0 / (1.0 - p))
    assert set(np.unique(values)) == {np.float32(0.0), scale}
    n = values.size
    dropped = np.count_nonzero(values == 0) / n
    assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / n), dropped
    assert abs(values.mean() - 1.0) <= 5 * math.sqrt(p / (1 - p) / n), values.mean()
    x = np.random.default_rng(1).standard_normal(masks.embedding.shape).astype(np.float32)
    y = model.layers.dropout("test", x, masks.embedding)
    np.testing.assert_array_equal(y, x * masks.embedding)  # kept values scaled, dropped zero


def test_masks_come_from_the_rng_they_are_given():
    """The same RNG state draws the same masks (into the same buffers, hence the copies)."""
    model = GPT(CONFIG, init_params(CONFIG))
    a = model.draw_masks(np.random.default_rng(5), 4).blocks[1].att.copy()
    b = model.draw_masks(np.random.default_rng(5), 4).blocks[1].att.copy()
    c = model.draw_masks(np.random.default_rng(6), 4).blocks[1].att
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)


def test_no_dropout_draws_nothing():
    """dropout 0: no masks and the RNG untouched, so the seed's runs are what they were."""
    config = GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.0})
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    assert GPT(config, init_params(config)).draw_masks(rng, 4) is None
    assert rng.bit_generator.state == state


def test_dropout_is_off_in_evaluation_and_generation():
    """Without masks (evaluation, generation), a model with dropout computes exactly what the
    same weights without dropout compute; only a training step's masks drop anything."""
    params = init_params(CONFIG, seed=2)
    plain = GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.0})
    idx = np.random.default_rng(4).integers(0, 11, (2, 16))
    with_dropout = GPT(CONFIG, params).forward(idx, idx)
    without = GPT(plain, {n: p.copy() for n, p in params.items()}).forward(idx, idx)
    np.testing.assert_array_equal(with_dropout[0], without[0])
    assert with_dropout[1] == without[1]
    model = GPT(CONFIG, params)
    masks = model.draw_masks(np.random.default_rng(0), 2)
    assert model.forward(idx, idx, masks)[1] != without[1]  # a training step does drop
    logits = Engine(CONFIG, params, "numpy").forward(list(idx[0]))
    np.testing.assert_allclose(logits, without[0][0], atol=1e-5)


@pytest.mark.parametrize("value", [-0.1, 1.0, 2, "0.1", True, float("nan")])
def test_config_dropout_must_be_in_0_1(value):
    with pytest.raises(ValueError, match=r"config dropout=.* must be a number in \[0, 1\)"):
        GPTConfig(dropout=value)


def test_config_without_dropout_loads_as_zero():
    """Checkpoints written before the field existed load with dropout 0."""
    d = CONFIG.to_dict()
    del d["dropout"]
    assert GPTConfig.from_dict(d).dropout == 0.0
    assert GPTConfig.from_dict(CONFIG.to_dict()) == CONFIG
