"""The training ops of every backend against the numpy reference, and a whole training step.

1. Every training op of every backend (minitf.kernels.backend.Backend, its BLAS matmuls and
   its compiled loops) vs `numpy_ref` at awkward shapes (T = 1, one row, sizes that are not a
   multiple of any block), float32 and float64, with and without dropout masks; the
   reference itself is checked against finite differences and PyTorch elsewhere
   (tests/test_layers_grad.py, tests/test_model_torch.py).
2. One training step (forward, backward, gradient norm, AdamW) on every backend vs the
   numpy backend: the loss, every gradient, and the parameters after the step; float32 and
   float64; with dropout; a step reuses its buffers (no parameter-sized allocation); the
   optimizer's flat buffers.
3. The checked API: the same bad call refused with the same error on every backend; numba's
   training loops with NUMBA_DISABLE_JIT=1 (their options: test_kernels.py).

Tolerances: tests/tolerances.py, ("train_grad", dtype): max |diff| / max |reference| per
tensor. A backend that cannot load fails its tests (get_backend raises), never skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from minitf.config import GPTConfig
from minitf.kernels import BACKENDS, get_backend
from minitf.kernels import numpy_ref as ref
from minitf.model import GPT, init_params
from minitf.optim import AdamW, decays
from minitf.trainer import StepThreads, train_step
from test_kernels import (  # the check of the inference ops, for the training ones
    test_every_backend_refuses_the_same_bad_call_with_the_same_error as refused_alike)
from tolerances import TOL

FLOATS = (np.float32, np.float64)
COMPILED = [b for b in BACKENDS if b != "numpy"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return get_backend(request.param)


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def dropout_mask(rng, shape, dtype, p=0.3):
    return ref.dropout_mask(rng.random(shape).astype(dtype), p)


def assert_rel(actual, expected, dtype, what, key="train_grad"):
    """max |actual - expected| <= TOL[(key, dtype)] * max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max() if expected.size else 0.0
    err = np.abs(actual - expected).max() if expected.size else 0.0
    tol = TOL[(key, dtype)]
    assert err <= tol * max(scale, np.finfo(np.float64).tiny), (
        f"{what}: max error {err:.3g} = {err / max(scale, 1e-300):.3g} of the largest "
        f"{scale:.3g} (allowed {tol})")


def assert_all_rel(actual, expected, dtype, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_rel(a, e, dtype, f"{what} output {i}")


# ------------------------------------------------------------ 1. op by op -------------

ROWS = [(1, 7), (5, 240), (67, 33)]  # (N, C): one row, the model's width, odd sizes


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("N, K, M", [(1, 3, 5), (37, 24, 17)])
def test_matmuls(backend, dtype, N, K, M):
    rng = np.random.default_rng(0)
    x, w, b = randn(rng, (N, K), dtype), randn(rng, (K, M), dtype), randn(rng, M, dtype)
    dy = randn(rng, (N, M), dtype)
    assert_rel(backend.matmul_forward(x, w, b), ref.matmul(x, w, b), dtype, "matmul_forward")
    assert_all_rel(backend.matmul_backward(dy, x, w), ref.matmul_backward(dy, x, w), dtype,
                   "matmul_backward")
    wt = np.ascontiguousarray(w.T)  # (M, K): the head's wte
    assert_rel(backend.matmul_nt_forward(x, wt), ref.matmul_nt(x, wt), dtype, "matmul_nt_forward")
    assert_all_rel(backend.matmul_nt_backward(dy, x, wt), ref.matmul_nt_backward(dy, x, wt),
                   dtype, "matmul_nt_backward")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B, T, V, C", [(1, 1, 3, 4), (3, 17, 11, 13)])
def test_embedding(backend, dtype, B, T, V, C):
    rng = np.random.default_rng(1)
    idx = rng.integers(0, V, (B, T))
    idx[0, 0] = idx[-1, -1] = 0  # a token used several times collects every gradient
    wte, wpe, dx = randn(rng, (V, C), dtype), randn(rng, (T + 2, C), dtype), randn(rng, (B, T, C), dtype)
    x = backend.embedding_forward(idx.astype(np.int32), wte, wpe)
    np.testing.assert_array_equal(x, ref.embedding(idx, wte, wpe))
    assert_all_rel(backend.embedding_backward(dx, idx, V, T + 2),
                   ref.embedding_backward(dx, idx, V, T + 2), dtype, "embedding_backward")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("N, C", ROWS)
def test_layernorm(backend, dtype, N, C):
    rng = np.random.default_rng(2)
    x = randn(rng, (N, C), dtype, scale=3.0) + dtype(1.5)
    w, b, dy = randn(rng, C, dtype), randn(rng, C, dtype), randn(rng, (N, C), dtype)
    y, mean, rstd = backend.layernorm_forward(x, w, b, 1e-5)
    assert_all_rel((y, mean, rstd), ref.layernorm_forward(x, w, b, 1e-5), dtype, "layernorm_forward")
    assert_all_rel(backend.layernorm_backward(dy, x, mean, rstd, w),
                   ref.layernorm_backward(dy, x, mean, rstd, w), dtype, "layernorm_backward")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1,), (3, 17), (40, 960)])
def test_gelu(backend, dtype, shape):
    rng = np.random.default_rng(3)
    x, dy = randn(rng, shape, dtype, scale=3.0), randn(rng, shape, dtype)
    if x.size >= 3:
        x.reshape(-1)[:3] = [-30.0, 0.0, 30.0]  # far tails and zero
    y, tanh_u = backend.gelu_forward(x)
    assert_all_rel((y, tanh_u), ref.gelu_forward(x), dtype, "gelu_forward")
    assert_rel(backend.gelu_backward(dy, x, tanh_u), ref.gelu_backward(dy, x, tanh_u), dtype,
               "gelu_backward")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B, T, NH, HS", [(1, 1, 1, 3), (2, 7, 3, 5), (3, 33, 2, 8)])
@pytest.mark.parametrize("dropout", [False, True])
def test_attention(backend, dtype, B, T, NH, HS, dropout):
    rng = np.random.default_rng(4)
    C = NH * HS
    qkv, dy = randn(rng, (B, T, 3 * C), dtype, scale=2.0), randn(rng, (B, T, C), dtype)
    mask = dropout_mask(rng, (B, NH, T, T), dtype) if dropout else None
    y, att = backend.attention_forward(qkv, NH, mask)
    y_ref, att_ref = ref.attention_forward(qkv, NH, mask)
    assert_all_rel((y, att), (y_ref, att_ref), dtype, "attention_forward")
    assert_rel(backend.attention_backward(dy, qkv, att_ref, NH, mask),
               ref.attention_backward(dy, qkv, att_ref, NH, mask), dtype, "attention_backward")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("N, V", [(1, 2), (37, 65), (5, 1024)])
def test_cross_entropy(backend, dtype, N, V):
    rng = np.random.default_rng(5)
    logits, targets = randn(rng, (N, V), dtype, scale=4.0), rng.integers(0, V, N)
    loss, probs = backend.cross_entropy_forward(logits, targets)
    assert_all_rel((loss, probs), ref.cross_entropy_forward(logits, targets), dtype,
                   "cross_entropy_forward")
    dloss = np.full(N, 1.0 / N, dtype)
    assert_rel(backend.cross_entropy_backward(dloss, probs, targets),
               ref.cross_entropy_backward(dloss, probs, targets), dtype, "cross_entropy_backward")


@pytest.mark.parametrize("dtype", FLOATS)
def test_dropout_and_residual(backend, dtype):
    rng = np.random.default_rng(6)
    n = 40_000  # more than one block of the elementwise loops
    u = rng.random(n).astype(dtype)
    u[:4] = [0.0, dtype(0.3), np.nextafter(dtype(0.3), dtype(0)), 1 - np.finfo(dtype).eps]
    for p in (0.0, 0.3, 0.9):
        np.testing.assert_array_equal(backend.dropout_mask(u, p), ref.dropout_mask(u, p), f"p={p}")
    x, a, mask = randn(rng, n, dtype), randn(rng, n, dtype), ref.dropout_mask(u, 0.3)
    np.testing.assert_array_equal(backend.dropout(x, mask), ref.dropout(x, mask))
    assert_rel(backend.residual_add(x, a, mask), ref.residual_add(x, a, mask), dtype, "residual")
    assert_rel(backend.residual_add(x, a), ref.residual_add(x, a), dtype, "residual, no mask")
    y = x.copy()
    backend.residual_add(y, a, out=(y,))  # in place, as the backward sums two paths
    assert_rel(y, x + a, dtype, "residual in place")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("P, n_decay", [(1, 1), (50_001, 30_000), (7, 0)])
def test_global_norm_and_adamw(backend, dtype, P, n_decay):
    rng = np.random.default_rng(7)
    p, g = randn(rng, P, dtype), randn(rng, P, dtype, scale=1e-2)
    m, v = randn(rng, P, dtype, scale=1e-3), (rng.random(P) * 1e-4).astype(dtype)
    assert_rel(backend.global_norm(g), ref.global_norm(g), dtype, "global_norm")
    hyper = (n_decay, 3e-3, 0.9, 0.99, 1e-8, 0.1, 7, 0.5)
    expected = ref.adamw(p, g, m, v, *hyper)
    state = p.copy(), m.copy(), v.copy()
    backend.adamw(*state[:1], g, *state[1:], *hyper, out=state)  # in place, as the optimizer
    assert_rel(state[0] - p, expected[0] - p, dtype, "adamw p", key="train_params")
    assert_all_rel(state[1:], expected[1:], dtype, "adamw m, v")
    assert_all_rel(backend.adamw(p, g, m, v, *hyper), expected, dtype, "adamw, new arrays")


def test_outputs_are_the_arrays_given(backend):
    """out= is written, not replaced: how a training step reuses its buffers."""
    rng = np.random.default_rng(8)
    x, w, b = randn(rng, (6, 5), np.float32), randn(rng, 5, np.float32), randn(rng, 5, np.float32)
    out = (np.empty((6, 5), np.float32), np.empty(6, np.float32), np.empty(6, np.float32))
    got = backend.layernorm_forward(x, w, b, out=out)
    assert all(g is o for g, o in zip(got, out))
    assert_all_rel(out, ref.layernorm_forward(x, w, b), np.float32, "layernorm into out")


# ------------------------------------------------------- 2. a whole training step -----


def step_case(dtype, dropout, backend_name):
    """A model, its optimizer mid-run (moments and step count set), one batch and masks."""
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, d_model=48,
                       dropout=dropout)
    params = init_params(config, seed=1, dtype=dtype)
    rng = np.random.default_rng(2)
    for name in params:  # LayerNorm weights and biases away from 1 and 0: every path counts
        params[name] += rng.normal(scale=0.05, size=params[name].shape).astype(dtype)
    K = get_backend(backend_name)
    model = GPT(config, params, K)
    opt = AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, ops=K)
    opt.flat_m[:] = rng.normal(scale=1e-3, size=opt.flat_m.shape)
    opt.flat_v[:] = rng.random(opt.flat_v.shape) * 1e-5
    opt.t = 5
    x, y = rng.integers(0, 65, (3, 32)), rng.integers(0, 65, (3, 32))
    masks = model.draw_masks(np.random.default_rng(3), 3)
    return model, opt, x, y, masks


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("name", COMPILED)
def test_a_training_step_equals_the_reference(name, dtype, dropout):
    """Loss, every gradient and the parameters after the AdamW step (with clipping) of one
    step on a compiled backend equal the numpy backend's."""
    results = {}
    for backend_name in ("numpy", name):
        model, opt, x, y, masks = step_case(dtype, dropout, backend_name)
        before = opt.flat_params.copy()
        loss, norm = train_step(model, opt, x, y, lr=1e-3, grad_clip=0.5, masks=masks)
        results[backend_name] = (loss, norm, {n: g.copy() for n, g in opt.grads.items()},
                                 before, opt.flat_params.copy())
    (loss, norm, grads, before, after), (loss_b, norm_b, grads_b, _, after_b) = \
        results["numpy"], results[name]
    assert norm > 0.5, "the case should exercise clipping"
    tol = TOL[("train_grad", dtype)]
    assert abs(loss_b - loss) <= tol * abs(loss), f"loss {loss_b} vs {loss}"
    assert abs(norm_b - norm) <= tol * norm, f"gradient norm {norm_b} vs {norm}"
    for n in grads:
        assert_rel(grads_b[n], grads[n], dtype, f"{name} gradient of {n}")
    assert_rel(after_b - before, after - before, dtype, f"{name} parameters after the step",
               key="train_params")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", BACKENDS)
def test_a_step_on_threads_equals_the_single_threaded_step(name, threads):
    """StepThreads: the batch's rows split across threads (3 rows on 2 threads: 1 + 2; on 3:
    one each), each part weighted by its share; the same loss, gradients and step as one
    thread, up to float rounding."""
    results = {}
    for n in (1, threads):
        model, opt, x, y, masks = step_case(np.float64, 0.2, name)
        workers = StepThreads(model, opt, n)
        loss, norm = train_step(model, opt, x, y, 1e-3, 0.5, masks, workers)
        results[n] = (loss, norm, opt.flat_grads.copy(), opt.flat_params.copy())
    (loss, norm, grads, params), (loss_t, norm_t, grads_t, params_t) = results[1], results[threads]
    tol = TOL[("train_grad", np.float64)]
    assert abs(loss_t - loss) <= tol * loss and abs(norm_t - norm) <= tol * norm
    assert_rel(grads_t, grads, np.float64, f"{threads} threads: gradients")
    assert_rel(params_t, params, np.float64, f"{threads} threads: parameters")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", COMPILED)
def test_a_step_reuses_its_buffers(name, threads):
    """After the first step of a batch shape, a step allocates nothing near the size of one
    activation, let alone of the parameters: every activation, gradient, mask and optimizer
    buffer is reused, on one thread or several. (What remains is small and does not grow
    with the model: numpy's 32 KiB ufunc and reduction buffers, a few per thread, views,
    ids.)"""
    B, T, C = 16, 64, 256
    config = GPTConfig(vocab_size=65, block_size=T, n_layer=2, n_head=4, d_model=C, dropout=0.1)
    params = init_params(config, seed=0)
    model, K = GPT(config, params, get_backend(name)), get_backend(name)
    opt = AdamW(params, ops=K)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 65, (B, T)), rng.integers(0, 65, (B, T))
    workers = StepThreads(model, opt, threads)
    for _ in range(2):
        train_step(model, opt, x, y, 1e-3, 1.0, model.draw_masks(rng, B), workers)
    activation = B // threads * T * C * 4  # the smallest of a thread, one (B, T, C) float32
    small = activation // 2
    assert 3 * threads * 32 * 1024 < small and activation < opt.flat_params.nbytes
    tracemalloc.start()
    try:
        train_step(model, opt, x, y, 1e-3, 1.0, model.draw_masks(rng, B), workers)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < small, f"{name}: a step allocated up to {peak} bytes at once"


def test_the_optimizer_keeps_flat_buffers():
    """params and grads are views of one buffer each (one Allreduce of flat_grads sums every
    gradient); the tensors that decay come first."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=8)
    params = init_params(config, seed=0)
    copies = {n: p.copy() for n, p in params.items()}
    opt = AdamW(params)
    assert opt.params is params
    for n, p in params.items():
        np.testing.assert_array_equal(p, copies[n])
        assert np.shares_memory(p, opt.flat_params) and np.shares_memory(opt.grads[n], opt.flat_grads)
        assert opt.grads[n].shape == p.shape and p.flags.c_contiguous
    assert opt.flat_grads.ndim == 1 and opt.flat_grads.size == sum(p.size for p in params.values())
    decayed = [n for n in params if decays(n, params[n].shape)]
    assert opt.n_decay == sum(params[n].size for n in decayed)
    for n in params:  # a tensor lies wholly before or after n_decay, as it decays or not
        start = (opt.grads[n].__array_interface__["data"][0]
                 - opt.flat_grads.__array_interface__["data"][0]) // 4
        assert (start + params[n].size <= opt.n_decay) == (n in decayed), n
    opt.flat_grads[:] = 1.0  # what a backward (or an Allreduce) leaves there, seen by name
    assert all((g == 1.0).all() for g in opt.grads.values())


# ---------------------------------------------------------- 3. the checked API --------


@pytest.mark.parametrize("what, call, exception, pattern", [
    ("out of the wrong shape", lambda K: K.gelu_forward(np.ones(4, np.float32),
                                                        out=(np.empty(3, np.float32),) * 2),
     ValueError, r"gelu_forward: out y has shape \(3,\); expected a C-contiguous \(4,\)"),
    ("out of the wrong dtype", lambda K: K.dropout(np.ones(4), np.ones(4), out=(np.empty(4, np.float32),)),
     TypeError, r"dropout: out y has dtype float32; allowed: float64 ndarray"),
    ("a strided out", lambda K: K.residual_add(np.ones(4), np.ones(4), out=(np.empty(8)[::2],)),
     ValueError, "not C-contiguous"),
    ("a token id out of range", lambda K: K.embedding_forward(np.array([[0, 5]]), np.ones((5, 2)),
                                                              np.ones((4, 2))),
     ValueError, r"embedding_forward: idx holds ids in \[0, 5\]; allowed: \[0, 5\)"),
    ("a target out of range", lambda K: K.cross_entropy_forward(np.ones((2, 3)), np.array([0, -1])),
     ValueError, r"targets holds ids in \[-1, 0\]"),
    ("float ids", lambda K: K.cross_entropy_backward(np.ones(2), np.ones((2, 3)), np.ones(2)),
     TypeError, "targets has dtype float64; allowed: an integer ndarray"),
    ("p outside [0, 1)", lambda K: K.dropout_mask(np.ones(3), 1.0),
     ValueError, r"dropout_mask: p=1.0; allowed: 0 <= p < 1"),
    ("step 0", lambda K: K.adamw(*(np.ones(3),) * 4, 0, 1e-3, 0.9, 0.99, 1e-8, 0.1, 0),
     ValueError, r"adamw: step=0; allowed: >= 1"),
    ("n_head not dividing C", lambda K: K.attention_forward(np.ones((1, 2, 9)), 2),
     ValueError, r"attention_forward: qkv has shape \(1, 2, 9\), n_head=2"),
])
def test_every_backend_refuses_the_same_bad_training_call(what, call, exception, pattern):
    refused_alike(what, exception, pattern, call)


def test_numba_training_step_runs_with_the_jit_disabled(tmp_path):
    """NUMBA_DISABLE_JIT=1 turns the training loops into plain Python: still right."""
    script = """
import numpy as np
from minitf.config import GPTConfig
from minitf.kernels import get_backend
from minitf.model import GPT, init_params
cfg = GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=2, d_model=4, dropout=0.25)
rng = np.random.default_rng(0)
x, y = rng.integers(0, 7, (2, 5)), rng.integers(0, 7, (2, 5))
out = {}
for name in ("numpy", "numba"):
    model = GPT(cfg, init_params(cfg, seed=1, dtype=np.float64), get_backend(name))
    out[name] = model.loss_and_grads(x, y, model.draw_masks(np.random.default_rng(1), 2))
assert abs(out["numba"][0] - out["numpy"][0]) < 1e-12
for n, g in out["numpy"][1].items():
    assert np.abs(out["numba"][1][n] - g).max() <= 1e-10 * np.abs(g).max(), n
print("ok")
"""
    # plain Python runs the portable int8 tile only (a forced MINITF_ISA does not apply)
    env = {k: v for k, v in os.environ.items() if k != "MINITF_ISA"} | {"NUMBA_DISABLE_JIT": "1"}
    # from a folder of its own: `python -c` puts the current folder first on sys.path
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
