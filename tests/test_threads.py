"""Threads in the compiled kernels: `set_threads(n)` splits the fused decode step's and the
W8A8 prefill's large linear layers and the tied head over n threads (kernels/_threads.py).

Each output is computed by the same loop on the same values whatever the split, so the
logits of 2 threads equal those of 1 bit for bit; and both equal the float64 forward of
tests/test_int8_head.py (`reference_logits`) within the tolerances of tests/tolerances.py.
The model's layers are large enough to be split (c_attn 512x1536 and c_fc 512x2048 hold
at least layout.THREAD_MIN_WEIGHTS weights, the head 1024x512 too; c_proj 512x512 stays
serial), so both the split and the serial layers run in one step.
"""

import os

import numpy as np
import pytest

from minitf.config import GPTConfig
from minitf.engine import Engine
from minitf.kernels import layout
from minitf.kernels._threads import kernel_threads
from minitf.quantization import quantize_model
from minitf.threads import set_threads
from models import perturbed_params
from test_int8_head import reference_logits, relative_error
from tolerances import TOL

CONFIG = GPTConfig(vocab_size=1024, block_size=32, n_layer=1, n_head=8, d_model=512)
# (label, int8 scope or None for float32, int8_mode)
MODELS = [("float32", None, "weight-only"), ("int8", "all", "weight-only"), ("w8a8", "all", "w8a8")]
PROMPTS = [[5], [7, 300, 2, 900, 41], [1000, 3, 3], [8, 9, 10, 11, 12, 13, 14, 15], [600, 1]]
NEW = [12, 7, 20, 3, 16]  # within the context: prompt + new tokens <= block_size

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores")


@pytest.fixture(scope="module")
def params():
    return perturbed_params(CONFIG)


@pytest.fixture(autouse=True)
def one_thread_after():
    yield
    set_threads(1)


class Greedy:
    """A sampler that keeps a copy of every logits it is given and takes the argmax."""

    def __init__(self):
        self.logits = []

    def __call__(self, logits):
        self.logits.append(logits.copy())
        return int(np.argmax(logits))


def run(engine, rows, threads):
    """Greedy generation of PROMPTS[:rows] together with `threads` kernel threads: per row,
    its tokens and the logits (steps, V) it sampled from."""
    set_threads(threads)
    samplers = [Greedy() for _ in range(rows)]
    out = [[] for _ in range(rows)]
    for step in engine.generate_batch(PROMPTS[:rows], NEW[:rows], samplers):
        for i, token in enumerate(step):
            if token is not None:
                out[i].append(token)
    return out, [np.stack(s.logits) for s in samplers]


def test_the_model_has_split_and_serial_layers():
    C = CONFIG.d_model
    assert C * 3 * C >= layout.THREAD_MIN_WEIGHTS and C * 4 * C >= layout.THREAD_MIN_WEIGHTS
    assert C * C < layout.THREAD_MIN_WEIGHTS and CONFIG.vocab_size * C >= layout.THREAD_MIN_WEIGHTS


def test_large_float_layers_are_stored_transposed_once(params):
    """A float32 layer of at least THREAD_MIN_WEIGHTS weights (not in a W8A8 model) is kept
    as its transpose (M, K) in pf, kind F32T, and its view is the original (K, M) weight
    without a copy; smaller ones stay (K, M), kind F32; W8A8 models keep every float layer
    (K, M)."""
    packed = layout.PackedWeights(dict(params), CONFIG.n_layer, CONFIG.n_head, "weight-only")
    kinds = {}
    for j, name in enumerate(layout.LAYER_ROWS):
        if name.startswith("ln"):
            continue
        row = packed.tab[layout.FIRST_LAYER_ROW + j]
        w, view = params[f"h.0.{name}.weight"], packed.views[f"h.0.{name}.weight"]
        K, M = w.shape
        kinds[name] = int(row[layout.KIND])
        stored = packed.pf[row[layout.W]:row[layout.W] + K * M]
        assert np.shares_memory(view, stored) and np.array_equal(view, w.astype(np.float32))
        if kinds[name] == layout.F32T:
            assert view.flags.f_contiguous and np.array_equal(stored.reshape(M, K), view.T)
        else:
            assert view.flags.c_contiguous and np.array_equal(stored.reshape(K, M), view)
    assert kinds == {"attn.c_attn": layout.F32T, "attn.c_proj": layout.F32,
                     "mlp.c_fc": layout.F32T, "mlp.c_proj": layout.F32T}
    q = quantize_model(params, CONFIG, scope="ffn")[0]  # attention float in a W8A8 model
    w8a8 = layout.PackedWeights(q, CONFIG.n_layer, CONFIG.n_head, "w8a8")
    row = w8a8.tab[layout.FIRST_LAYER_ROW + layout.C_ATTN]
    assert row[layout.KIND] == layout.F32 and w8a8.views["h.0.attn.c_attn.weight"].flags.c_contiguous


@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize("model", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_two_threads_give_the_logits_of_one_bit_for_bit(params, backend, model, rows):
    label, scope, mode = model
    qparams = params if scope is None else quantize_model(params, CONFIG, scope, head=True)[0]
    engine = Engine(CONFIG, qparams, backend, int8_mode=mode)
    assert engine.fused is not None
    tokens1, logits1 = run(engine, rows, 1)
    tokens2, logits2 = run(engine, rows, 2)
    assert tokens2 == tokens1, f"{backend} {label} rows={rows}"
    for i in range(rows):
        np.testing.assert_array_equal(logits2[i], logits1[i], err_msg=f"{backend} {label} row {i}")


@pytest.mark.parametrize("model", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_two_threads_against_the_float64_forward(params, backend, model):
    """Every row's logits, prefill (its last prompt position) and each decode step, against
    `reference_logits` of the row's prompt and greedy tokens."""
    label, scope, mode = model
    if scope is None:  # reference_logits reads the head's per-row scale: 1 for float32
        qparams = params
        ref_params = dict(params, wte_scale=np.ones(CONFIG.vocab_size, np.float32))
    else:
        qparams = ref_params = quantize_model(params, CONFIG, scope, head=True)[0]
    w8a8 = mode == "w8a8"
    tol = TOL[("kv_cache_logits_w8a8" if w8a8 else "kv_cache_logits", np.float32)]
    engine = Engine(CONFIG, qparams, backend, int8_mode=mode)
    tokens, logits = run(engine, len(PROMPTS), 2)
    for i, prompt in enumerate(PROMPTS):
        ids = np.array(prompt + tokens[i][:-1])
        want = reference_logits(ref_params, CONFIG, ids, w8a8)[len(prompt) - 1:]  # (steps, V)
        err = relative_error(logits[i], want)
        assert err <= tol, f"{backend} {label} row {i}: error {err:.2e} > {tol}"


def test_set_threads_sets_the_kernels_and_refuses_bad_counts():
    set_threads(2)
    assert kernel_threads() == 2
    set_threads(None)  # leaves it
    assert kernel_threads() == 2
    set_threads(1)
    assert kernel_threads() == 1
    for bad in (0, -1, 1.5, True, "2", (os.cpu_count() or 1) + 1):
        with pytest.raises(ValueError, match="threads="):
            set_threads(bad)
    assert kernel_threads() == 1


@pytest.mark.parametrize("given,expected", [(None, "18"), ("25", "25")])
def test_importing_minitf_shortens_the_blas_threads_spin_unless_set(given, expected):
    """minitf, imported before numpy (as its commands are), asks OpenBLAS's idle threads to
    spin 2^18 cycles rather than 2^28 (minitf/__init__.py), before numpy loads OpenBLAS;
    a value the user set is kept."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = ("import sys, minitf, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'], "
            "'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [expected, "True"]
