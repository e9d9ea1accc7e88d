"""Each layer's hand-written backward against float64 central finite differences.

For a layer y = f(inputs) we take the scalar L = sum(y * R) with a fixed random R, so
dL/dy = R; the backward given R must equal the numerical derivative of L with respect to
every element of every input and parameter. The layers run on the numpy backend, whose ops
are the reference ops (minitf.kernels.numpy_ref), so this checks every op's backward there
(the compiled backends are checked against the reference in tests/test_train_kernels.py).
Dropout is checked with fixed masks: with the mask held, the layer is a smooth function.
"""

import numpy as np
import pytest

from minitf.layers import Layers
from minitf.config import GPTConfig
from minitf.model import GPT, init_params
from tolerances import TOL

RTOL = TOL[("finite_difference", np.float64)]
H = 1e-5  # central-difference step
layers = Layers()  # over the numpy reference ops


def numerical_grad(scalar_fn, x: np.ndarray) -> np.ndarray:
    """d scalar_fn() / dx by central differences, perturbing x in place element by element."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        plus = scalar_fn()
        flat[i] = old - H
        minus = scalar_fn()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * H)
    return grad


def assert_close(analytic, numeric, what):
    analytic, numeric = np.asarray(analytic), np.asarray(numeric)
    assert analytic.shape == numeric.shape, what
    err = np.linalg.norm(analytic - numeric) / max(np.linalg.norm(analytic) + np.linalg.norm(numeric), 1e-300)
    assert err <= RTOL, f"{what}: relative error {err:.3e} > {RTOL} (max abs diff {np.abs(analytic - numeric).max():.3e})"
    assert np.linalg.norm(numeric) > 0 or np.linalg.norm(analytic) == 0, f"{what}: degenerate check"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def grads_like(*arrays):
    """Arrays for a backward to write the parameters' gradients into."""
    return tuple(np.empty_like(a) for a in arrays)


def mask(rng, shape, p=0.3):
    """A dropout mask: 0 with probability p, else 1 / (1 - p)."""
    return np.where(rng.random(shape) >= p, 1.0 / (1.0 - p), 0.0)


def test_layernorm(rng):
    x = rng.normal(size=(2, 3, 5))
    w, b = rng.normal(size=5), rng.normal(size=5)
    R = rng.normal(size=(2, 3, 5))
    y, cache = layers.layernorm_forward("ln", x, w, b)
    dw, db = grads_like(w, b)
    dx = layers.layernorm_backward("grad.ln", R, cache, dw, db)
    loss = lambda: float((layers.layernorm_forward("ln", x, w, b)[0] * R).sum())
    assert_close(dx, numerical_grad(loss, x), "layernorm dx")
    assert_close(dw, numerical_grad(loss, w), "layernorm dweight")
    assert_close(db, numerical_grad(loss, b), "layernorm dbias")


def test_layernorm_matches_hand_values():
    # x = [1, 2, 3]: mean 2, biased var 2/3, so y = (x - 2) / sqrt(2/3 + eps)
    y, _ = layers.layernorm_forward("ln", np.array([[1.0, 2.0, 3.0]]), np.ones(3), np.zeros(3),
                                    eps=1e-5)
    expected = np.array([-1.0, 0.0, 1.0]) / np.sqrt(2.0 / 3.0 + 1e-5)
    np.testing.assert_allclose(y[0], expected, rtol=1e-12)


def test_linear(rng):
    x, w, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 6)), rng.normal(size=6)
    R = rng.normal(size=(2, 3, 6))
    _, cache = layers.linear_forward("fc", x, w, b)
    dw, db = grads_like(w, b)
    dx = layers.linear_backward("grad.fc", R, cache, dw, db)
    loss = lambda: float((layers.linear_forward("fc", x, w, b)[0] * R).sum())
    assert_close(dx, numerical_grad(loss, x), "linear dx")
    assert_close(dw, numerical_grad(loss, w), "linear dweight")
    assert_close(db, numerical_grad(loss, b), "linear dbias")


def test_gelu(rng):
    x = rng.normal(scale=2.0, size=(3, 7))
    R = rng.normal(size=(3, 7))
    _, cache = layers.gelu_forward("gelu", x)
    dx = layers.gelu_backward("grad.gelu", R, cache)
    loss = lambda: float((layers.gelu_forward("gelu", x)[0] * R).sum())
    assert_close(dx, numerical_grad(loss, x), "gelu dx")


def test_gelu_hand_values():
    # gelu(0) = 0; gelu(1) = 0.5 * (1 + tanh(sqrt(2/pi) * 1.044715))
    y, _ = layers.gelu_forward("gelu", np.array([0.0, 1.0]))
    assert y[0] == 0.0
    assert abs(y[1] - 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * 1.044715))) < 1e-15


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("dropout", [False, True])
def test_attention(rng, T, dropout):
    B, NH, HS = 2, 2, 3
    C = NH * HS
    qkv = rng.normal(size=(B, T, 3 * C))
    R = rng.normal(size=(B, T, C))
    m = mask(rng, (B, NH, T, T)) if dropout else None
    _, cache = layers.attention_forward("attn", qkv, NH, m)
    dqkv = layers.attention_backward("grad.attn", R, cache)
    loss = lambda: float((layers.attention_forward("attn", qkv, NH, m)[0] * R).sum())
    assert_close(dqkv, numerical_grad(loss, qkv), f"attention dqkv T={T} dropout={dropout}")


def test_attention_is_causal_and_normalised(rng):
    qkv = rng.normal(size=(1, 5, 3 * 4))
    _, cache = layers.attention_forward("attn", qkv, 2)
    att = cache.att
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-12)
    assert np.all(att[..., np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0.0)


def test_embedding(rng):
    idx = np.array([[0, 2, 2], [1, 0, 2]])  # repeated tokens must accumulate
    wte, wpe = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
    R = rng.normal(size=(2, 3, 3))
    m = mask(rng, (2, 3, 3))
    _, cache = layers.embedding_forward("wte", idx, wte, wpe, m)
    dwte, dwpe = grads_like(wte, wpe)
    layers.embedding_backward("grad.wte", R, cache, dwte, dwpe)
    loss = lambda: float((layers.embedding_forward("wte", idx, wte, wpe, m)[0] * R).sum())
    assert_close(dwte, numerical_grad(loss, wte), "embedding dwte")
    assert_close(dwpe, numerical_grad(loss, wpe), "embedding dwpe")


def test_head(rng):
    x, wte = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 4))
    R = rng.normal(size=(2, 3, 5))
    _, cache = layers.head_forward("head", x, wte)
    (dwte,) = grads_like(wte)
    dx = layers.head_backward("grad.head", R, cache, dwte)
    loss = lambda: float((layers.head_forward("head", x, wte)[0] * R).sum())
    assert_close(dx, numerical_grad(loss, x), "head dx")
    assert_close(dwte, numerical_grad(loss, wte), "head dwte")


def test_cross_entropy(rng):
    logits = rng.normal(size=(2, 3, 5))
    targets = rng.integers(0, 5, size=(2, 3))
    _, cache = layers.cross_entropy_forward("loss", logits, targets)
    dlogits = layers.cross_entropy_backward("grad.loss", cache)
    loss = lambda: layers.cross_entropy_forward("loss", logits, targets)[0]
    assert_close(dlogits, numerical_grad(loss, logits), "cross-entropy dlogits")


def test_cross_entropy_hand_value():
    # uniform logits over V classes: loss = ln V exactly
    loss, _ = layers.cross_entropy_forward("loss", np.zeros((1, 2, 7)), np.array([[3, 6]]))
    assert abs(loss - np.log(7)) < 1e-15


def test_residual_add_with_dropout(rng):
    x, a = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    m, R = mask(rng, (2, 3, 4)), rng.normal(size=(2, 3, 4))
    loss = lambda: float((layers.residual_add("res", x, a, m) * R).sum())
    # y = x + a * mask: dy/dx = 1, dy/da = mask, and the backward of the product is itself
    assert_close(R, numerical_grad(loss, x), "residual dx")
    assert_close(layers.dropout("grad.res", R, m), numerical_grad(loss, a), "residual da")


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_whole_model_finite_differences(dropout):
    """Every parameter of a tiny 2-block model, tied head included, against finite
    differences; with dropout, under one fixed draw of the masks."""
    config = GPTConfig(vocab_size=7, block_size=6, n_layer=2, n_head=2, d_model=4, dropout=dropout)
    params = init_params(config, seed=3, dtype=np.float64)
    rng = np.random.default_rng(5)
    for name in params:  # move LayerNorm and biases off 1 and 0 so every path is exercised
        params[name] += rng.normal(scale=0.1, size=params[name].shape)
    model = GPT(config, params)
    idx, targets = rng.integers(0, 7, size=(2, 5)), rng.integers(0, 7, size=(2, 5))
    masks = model.draw_masks(np.random.default_rng(6), 2, 5)
    assert (masks is None) == (dropout == 0)
    _, grads = model.loss_and_grads(idx, targets, masks)
    loss = lambda: model.forward(idx, targets, masks)[1]
    for name, p in params.items():
        assert_close(grads[name], numerical_grad(loss, p), f"model {name}")


def test_a_backend_without_the_training_ops_is_refused():
    """Layers names what a backend lacks instead of failing deep inside a step."""
    from minitf.kernels import numpy_ref

    partial = type("Partial", (), {"NAME": "partial", "layernorm_forward": numpy_ref.layernorm_forward})
    with pytest.raises(ValueError, match=r"backend 'partial' cannot train: it has no .*layernorm_backward"):
        Layers(partial)
