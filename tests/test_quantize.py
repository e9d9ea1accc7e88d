"""Int8 quantization: the method against its definition and hand-worked numbers, the int8
kernels of every backend against float64/int64 references, a quantized model on every
backend, its checkpoint, its memory, and the `python -m minitf.quantize` command."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from fractions import Fraction

import numpy as np
import pytest

from minitf.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_safetensors,
    save_checkpoint,
    save_safetensors_atomic,
)
from minitf.config import GPTConfig, param_shapes
from minitf.engine import Engine, Int8Linear, Linear, load_engine
from minitf.kernels import get_backend
from minitf.model import init_params
from minitf.quant_report import format_report
from minitf.quantization import dequantize, quantize_model, quantize_per_channel, quantize_per_row
from minitf.tensors import checkpoint_layout, quantized_weight_names
from minitf.tokenizer import CharTokenizer
from reachable import reachable_arrays
from tolerances import TOL

from conftest import CORPUS

BACKENDS = ["numpy", "numba", "cython"]
# Every linear weight of this config has a shape no other tensor has, so the memory test can
# tell a float copy of a quantized weight by its shape.
CONFIG = GPTConfig(vocab_size=37, block_size=12, n_layer=2, n_head=3, d_model=24)
MODES = ["weight-only", "w8a8"]
SCOPES = ["ffn", "all"]


def awkward_weight(K=37, M=23, seed=0):
    """(K, M) float32 whose channels span 1e-30 .. 1e3 in magnitude, sizes not a multiple of
    any tile, some channels dominated by one outlier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, M)) * 10.0 ** rng.uniform(-30, 3, size=M)  # (K, M)
    w[rng.integers(0, K, size=M // 3), np.arange(M // 3)] *= 50  # outliers
    return w.astype(np.float32)


@pytest.fixture(scope="module")
def model():
    """CONFIG with GPT-2 init, then larger weights so that logits differ clearly by token."""
    params = init_params(CONFIG, seed=4)
    rng = np.random.default_rng(9)
    for name in params:
        params[name] = (params[name] + rng.normal(scale=0.2, size=params[name].shape)).astype(np.float32)
    return params


def tokenizer(vocab_size=CONFIG.vocab_size):
    return CharTokenizer([chr(i) for i in range(32, 32 + vocab_size)])


# ----------------------------------------------------------------------------------------
# The method


@pytest.mark.parametrize("shape", [(1, 1), (37, 23), (240, 960), (960, 240)])
def test_roundtrip_within_half_a_scale(shape):
    w = awkward_weight(*shape, seed=sum(shape))
    wq, scale = quantize_per_channel(w)
    assert wq.dtype == np.int8 and wq.shape == shape and scale.dtype == np.float32 and scale.shape == (shape[1],)
    assert wq.min() >= -127 and wq.max() <= 127
    # In float64 the dequantized value wq * scale is exact, so the bound holds with no slack.
    err = np.abs(w.astype(np.float64) - dequantize(wq, scale, np.float64))  # (K, M)
    half = scale.astype(np.float64) / 2  # (M,)
    worst = (err / half).max()
    assert worst <= 1.0, f"max |error| / (scale/2) = {worst!r}"
    # float32 dequantization adds one rounding of the product: half an ulp of |w| at most.
    err32 = np.abs(w.astype(np.float64) - dequantize(wq, scale).astype(np.float64))
    slack = np.spacing(np.abs(w)).astype(np.float64) / 2 + 1e-300
    assert (err32 <= half + slack).all(), f"float32: max excess {(err32 - half - slack).max():.3e}"


def test_scales_are_exactly_max_abs_over_127():
    w = awkward_weight(50, 31, seed=3)
    wq, scale = quantize_per_channel(w)
    np.testing.assert_array_equal(scale, np.abs(w).max(axis=0) / np.float32(127))
    # the largest |w| of each channel becomes +-127 exactly (with the sign of w)
    k = np.abs(w).argmax(axis=0)  # (M,)
    m = np.arange(w.shape[1])
    np.testing.assert_array_equal(wq[k, m], np.sign(w[k, m]) * 127)


def test_zero_and_underflowing_channels_get_zeros_and_scale_one():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 5)).astype(np.float32)  # (K, M)
    w[:, 1] = 0.0  # all zero: scale would be 0, so w / scale would be 0/0
    w[:, 2] = np.float32(1e-45)  # the smallest subnormal: max/127 underflows to 0
    w[:, 3] = np.float32(1e-38) * np.sign(rng.standard_normal(8))  # max/127 is subnormal
    with np.errstate(divide="raise", invalid="raise", over="raise"):  # no 0/0, no x/0; underflow is the case under test
        wq, scale = quantize_per_channel(w)
    for m in (1, 2, 3):
        assert scale[m] == 1.0 and not wq[:, m].any(), f"channel {m}: scale {scale[m]}, q {wq[:, m]}"
    for m in (0, 4):  # the ordinary channels beside them are untouched
        assert scale[m] == np.abs(w[:, m]).max() / np.float32(127)
        assert np.abs(wq[:, m]).max() == 127
    err = np.abs(w.astype(np.float64) - dequantize(wq, scale, np.float64))
    assert (err <= scale / 2).all()
    _, report = quantize_model(
        {**init_params(CONFIG), "h.0.mlp.c_fc.weight": np.zeros((24, 96), np.float32)}, CONFIG)
    assert report["tensors"][0]["zero_channels"] == 96


def test_hand_worked_values_with_ties_rounding_to_even():
    # Channel 0: max |w| = 127, so scale = 1 and q = round-half-to-even(w): 2.5 -> 2,
    #   -3.5 -> -4, 0.5 -> 0, -0.5 -> 0 (-0), 1.5 -> 2, 126.5 -> 126.
    # Channel 1: max |w| = 254, so scale = 2: w / 2 = -127, 2.5 -> 2, 1.5 -> 2, 3.5 -> 4,
    #   0.25 -> 0, 63.25 -> 63.
    # Channel 2: max |w| = 12.7: scale = float32(12.7) / 127, w / scale ~ 127, 63.5 (a tie
    #   only up to float rounding), -10, 0.
    w = np.array([[127.0, -254.0, 12.7],
                  [2.5, 5.0, 6.35],
                  [-3.5, 3.0, -1.0],
                  [0.5, 7.0, 0.0],
                  [-0.5, 0.5, 0.0],
                  [1.5, 0.0, 0.0],
                  [126.5, 126.5, 0.0]], dtype=np.float32)
    wq, scale = quantize_per_channel(w)
    s2 = np.float32(12.7) / np.float32(127)
    np.testing.assert_array_equal(scale, np.array([1.0, 2.0, s2], dtype=np.float32))
    # float32(6.35) / s2 is 63.5 only up to rounding: exact rational arithmetic decides
    q2 = round(Fraction(float(np.float32(6.35))) / Fraction(float(s2)))  # half to even
    expected = np.array([[127, -127, 127],
                         [2, 2, q2],
                         [-4, 2, -10],
                         [0, 4, 0],
                         [0, 0, 0],
                         [2, 0, 0],
                         [126, 63, 0]], dtype=np.int8)
    np.testing.assert_array_equal(wq, expected)
    np.testing.assert_array_equal(dequantize(wq[:, :2], scale[:2]),
                                  expected[:, :2].astype(np.float32) * np.float32([1.0, 2.0]))


def test_matches_exact_rational_rounding():
    """q equals Python's round (half to even) of the exact rational w / scale, everywhere:
    the float64 quotient never rounds onto or across a tie."""
    w = awkward_weight(19, 11, seed=8)
    w[:5, 0] = np.float32([127, 0.5, 1.5, -2.5, 63.5])  # scale 1: exact ties
    wq, scale = quantize_per_channel(w)
    for m in range(w.shape[1]):
        s = Fraction(float(scale[m]))
        want = [max(-127, min(127, round(Fraction(float(v)) / s))) for v in w[:, m]]
        assert wq[:, m].tolist() == want, f"channel {m}"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_per_channel(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_channel(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"quantize_per_row needs a non-empty 2-D float \(V, C\) "
                                         r"weight, got int64 \(2, 3\)"):
        quantize_per_row(np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match="quantize_per_row: the weight has 1 NaN/inf"):
        quantize_per_row(np.array([[1.0, np.inf]], np.float32))
    with pytest.raises(ValueError, match="scope 'attn'"):
        quantize_model(init_params(CONFIG), CONFIG, scope="attn")
    qparams, _ = quantize_model(init_params(CONFIG), CONFIG)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(qparams, CONFIG)


def test_quantize_model_scopes_and_report(model):
    for scope, linears in (("ffn", ("mlp.c_fc", "mlp.c_proj")),
                           ("all", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))):
        qparams, report = quantize_model(model, CONFIG, scope)
        names = [f"h.{i}.{lin}.weight" for i in range(CONFIG.n_layer) for lin in linears]
        assert sorted(quantized_weight_names(CONFIG, scope)) == sorted(names)
        assert list(qparams) == list(checkpoint_layout(CONFIG, {"quantization": {"scope": scope, "mode": "w8a8"}}))
        for name, a in qparams.items():
            quantized = name in names or name[: -len("_scale")] in names
            assert a.dtype == (np.int8 if name in names else np.float32), name
            if not quantized:  # wte, wpe, biases, LayerNorms stay float32, unchanged
                np.testing.assert_array_equal(a, model[name])
        assert [t["name"] for t in report["tensors"]] == names
        for t in report["tensors"]:
            K, M = t["shape"]
            assert (t["float32_bytes"], t["int8_bytes"], t["scale_bytes"]) == (4 * K * M, K * M, 4 * M)
            assert 0 < t["max_error_half_scales"] <= 1.0
            assert t["mean_abs_error"] <= t["max_abs_error"]
        ffn = report["totals"]["ffn"]
        assert ffn["ratio_without_scales"] == 4.0 and ffn["ratio"] < 4.0
        assert ffn["float32_bytes"] == 4 * ffn["int8_bytes"]


# ----------------------------------------------------------------------------------------
# The int8 kernels of every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,K,M", [(1, 24, 96), (7, 37, 23), (13, 240, 960)])
def test_weight_only_matmul_equals_float_matmul_with_dequantized_weights(backend, N, K, M):
    kb = get_backend(backend)
    rng = np.random.default_rng(N * K + M)
    x = rng.standard_normal((N, K)).astype(np.float32)  # (N, K)
    w = rng.standard_normal((K, M)) * 10.0 ** rng.uniform(-3, 2, size=M)  # (K, M)
    wq, scale = quantize_per_channel(w.astype(np.float32))
    bias = rng.standard_normal(M).astype(np.float32)  # (M,)
    got = kb.matmul_int8(x, wq, scale, bias, mode="weight-only")  # (N, M)
    want = x.astype(np.float64) @ dequantize(wq, scale, np.float64) + bias  # (N, M)
    # relative to each output channel's magnitude (channels span many decades)
    rtol, atol = TOL[("kernel", np.float32)]
    ref = np.abs(x.astype(np.float64)) @ np.abs(dequantize(wq, scale, np.float64)) + np.abs(bias)  # (N, M)
    rel = (np.abs(got - want) / np.maximum(ref, 1e-300)).max()
    assert got.dtype == np.float32 and rel <= rtol, f"{backend}: max relative error {rel:.2e}"


@pytest.mark.parametrize("N,K,M", [(1, 24, 96), (5, 960, 240), (9, 37, 23)])
def test_w8a8_int32_accumulations_bit_identical_across_backends(N, K, M):
    rng = np.random.default_rng(K)
    xq = rng.integers(-127, 128, size=(N, K), dtype=np.int8)  # (N, K)
    wq = rng.integers(-127, 128, size=(K, M), dtype=np.int8)  # (K, M)
    xq[0, :], wq[:, 0] = -127, -127  # the largest sum the quantizer can produce: K * 127^2
    want = xq.astype(np.int64) @ wq.astype(np.int64)  # (N, M), an independent int64 sum
    assert want[0, 0] == K * 127 * 127
    x = rng.standard_normal((N, K)).astype(np.float32) * np.float32(3)
    x[-1] = 0.0  # an all-zero activation row: scale 1.0, not 0/0
    ref_xq, ref_sx = get_backend("numpy").quantize_rows(x)
    for backend in BACKENDS:
        kb = get_backend(backend)
        acc = kb.matmul_int8_acc(xq, wq)
        assert acc.dtype == np.int32, backend
        np.testing.assert_array_equal(acc, want, err_msg=f"{backend}: int32 accumulation")
        got_xq, got_sx = kb.quantize_rows(x)  # run-time activation quantization
        np.testing.assert_array_equal(got_xq, ref_xq, err_msg=f"{backend}: quantize_rows")
        np.testing.assert_array_equal(got_sx, ref_sx, err_msg=f"{backend}: quantize_rows scales")


@pytest.mark.parametrize("backend", BACKENDS)
def test_w8a8_matmul_matches_its_definition(backend):
    kb = get_backend(backend)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 96)).astype(np.float32)  # (N, K)
    wq, scale = quantize_per_channel(rng.standard_normal((96, 24)).astype(np.float32))
    bias = rng.standard_normal(24).astype(np.float32)
    got = kb.matmul_int8(x, wq, scale, bias, mode="w8a8")  # (N, M)
    xq, sx = get_backend("numpy").quantize_rows(x)
    acc = xq.astype(np.int64) @ wq.astype(np.int64)  # (N, M)
    want = acc * sx.astype(np.float64)[:, None] * scale.astype(np.float64) + bias  # (N, M)
    rtol, atol = TOL[("kernel", np.float32)]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=backend)


# ----------------------------------------------------------------------------------------
# A quantized model


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", MODES)
def test_quantized_model_logits_and_greedy_text_identical_across_backends(model, scope, mode):
    qparams, _ = quantize_model(model, CONFIG, scope)
    ids = np.random.default_rng(2).integers(0, CONFIG.vocab_size, size=CONFIG.block_size)
    greedy = lambda logits: int(np.argmax(logits))
    results = {}
    for backend in BACKENDS:
        engine = Engine(CONFIG, qparams, backend, int8_mode=mode)
        prefill = engine.prefill(ids[:5])
        decode = [engine.decode(t) for t in ids[5:]]  # to the exact context boundary
        text = list(engine.generate([1, 2, 3], 2 * CONFIG.block_size + 3, greedy))  # slides
        results[backend] = (prefill, np.stack(decode), text)
    ref = results["numpy"]
    atol = TOL[("backend_logits", np.float32)]
    for backend, (prefill, decode, text) in results.items():
        err = max(np.abs(prefill - ref[0]).max(), np.abs(decode - ref[1]).max())
        assert err <= atol, f"{backend} {scope} {mode}: max |logit diff| vs numpy {err:.2e}"
        assert text == ref[2], f"{backend} {scope} {mode}: greedy generation differs"


def test_weight_only_model_equals_float_model_with_dequantized_weights(model):
    """Weight-only int8 changes the weights, nothing else: a float engine given the
    dequantized weights must give the same logits."""
    qparams, _ = quantize_model(model, CONFIG, "all")
    names = quantized_weight_names(CONFIG, "all")
    deq = {k: v for k, v in qparams.items() if not k.endswith("_scale")}
    for n in names:
        deq[n] = dequantize(qparams[n], qparams[n + "_scale"])
    ids = np.arange(CONFIG.block_size) % CONFIG.vocab_size
    got = Engine(CONFIG, qparams, "numpy").prefill(ids)
    want = Engine(CONFIG, deq, "numpy").prefill(ids)
    err = np.abs(got - want).max()
    assert err <= TOL[("backend_logits", np.float32)], f"max |logit diff| {err:.2e}"
    assert np.abs(got - Engine(CONFIG, model, "numpy").prefill(ids)).max() > 0  # it did change


@pytest.fixture
def quantized_dir(tmp_path, model):
    def make(scope="ffn", mode="weight-only"):
        qparams, _ = quantize_model(model, CONFIG, scope)
        meta = {"quantization": {"scope": scope, "mode": mode, "method": "test"}}
        path = tmp_path / f"q-{scope}-{mode}"
        save_checkpoint(path, qparams, CONFIG, tokenizer(), meta=meta,
                        layout=checkpoint_layout(CONFIG, meta))
        return path, qparams
    return make


@pytest.mark.parametrize("scope", SCOPES)
def test_quantized_checkpoint_round_trips(quantized_dir, scope, model, tmp_path):
    path, qparams = quantized_dir(scope, "w8a8")
    ckpt = load_checkpoint(path, layout=checkpoint_layout)
    assert list(ckpt.params) == list(qparams)
    for name, a in qparams.items():
        assert ckpt.params[name].dtype == a.dtype, name
        np.testing.assert_array_equal(ckpt.params[name], a, err_msg=name)
    engine, _, _ = load_engine(path, "numpy")
    assert engine.blocks[0]["mlp.c_fc"].mode == "w8a8"
    # a float checkpoint still loads through the same layout function
    save_checkpoint(tmp_path / "float", model, CONFIG, tokenizer())
    assert load_checkpoint(tmp_path / "float", layout=checkpoint_layout).params.keys() == model.keys()


def test_engine_refuses_int8_weights_that_are_not_a_scope(model):
    """The engine reads a quantized model from its arrays: the int8 ones must be exactly the
    weights of one scope, each with its scale."""
    qparams, _ = quantize_model(model, CONFIG, "ffn")
    one = {**model, "h.0.mlp.c_fc.weight": qparams["h.0.mlp.c_fc.weight"],
           "h.0.mlp.c_fc.weight_scale": qparams["h.0.mlp.c_fc.weight_scale"]}
    with pytest.raises(ValueError, match="h.0.mlp.c_fc.weight are not the weights of a quantization scope"):
        Engine(CONFIG, one, "numpy")
    del qparams["h.1.mlp.c_proj.weight_scale"]
    with pytest.raises(ValueError, match="missing parameters h.1.mlp.c_proj.weight_scale"):
        Engine(CONFIG, qparams, "numpy")


def test_tampered_scale_shape_is_refused(quantized_dir):
    path, qparams = quantized_dir("ffn")
    tensors, metadata = load_safetensors(path / "model.safetensors")
    tensors["h.1.mlp.c_proj.weight_scale"] = tensors["h.1.mlp.c_proj.weight_scale"][:-1]  # (23,)
    # rewritten the legitimate way (valid checksum), so only the layout check can catch it
    save_safetensors_atomic(path / "model.safetensors", tensors,
                            {k: v for k, v in metadata.items() if k != "sha256"})
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_proj\.weight_scale has shape \(23,\), expected \(24,\)"):
        load_engine(path, "numpy")


def test_other_tampering_is_refused(quantized_dir):
    path, qparams = quantized_dir("ffn")
    tensors, metadata = load_safetensors(path / "model.safetensors")
    metadata.pop("sha256")
    tensors["h.0.mlp.c_fc.weight"] = tensors["h.0.mlp.c_fc.weight"].astype(np.float32)
    save_safetensors_atomic(path / "model.safetensors", tensors, metadata)
    with pytest.raises(CheckpointError, match=r"h\.0\.mlp\.c_fc\.weight has dtype float32, expected int8"):
        load_engine(path, "numpy")
    meta = json.loads((path / "meta.json").read_text())
    meta["quantization"]["scope"] = "attn"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="scope 'attn' is unknown"):
        load_engine(path, "numpy")


def _float_bytes(obj) -> int:
    """Bytes of float memory reachable from obj, each buffer counted once (views resolved to
    the array that owns the memory)."""
    roots = {}
    for a in reachable_arrays(obj):
        while isinstance(a.base, np.ndarray):
            a = a.base
        roots[id(a)] = a
    return sum(a.nbytes for a in roots.values() if a.dtype.kind == "f")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_engine_keeps_no_float_copy_of_quantized_weights(quantized_dir, model, scope, backend):
    path, _ = quantized_dir(scope)
    engine, _, _ = load_engine(path, backend)
    shapes = param_shapes(CONFIG)
    names = quantized_weight_names(CONFIG, scope)
    for blk in engine.blocks:
        for lin, layer in blk.items():
            if lin.startswith("ln_"):
                continue
            if f"h.0.{lin}.weight" in names:
                assert isinstance(layer, Int8Linear), lin
                assert layer.weight_q.dtype == np.int8 and layer.scale.dtype == np.float32
                assert layer.scale.shape == (layer.weight_q.shape[1],)
            else:
                assert isinstance(layer, Linear) and layer.weight.dtype == np.float32, lin
    quantized_shapes = {shapes[n] for n in names}
    arrays = reachable_arrays(engine)
    floats = [a.shape for a in arrays if a.dtype.kind == "f" and a.shape in quantized_shapes]
    assert not floats, f"{backend}: the engine holds float arrays shaped like quantized weights: {floats}"
    # Packed or flattened copies have other shapes: count bytes instead. Against the float
    # model on the same backend (same caches and scratch buffers), the int8 engine must hold
    # less float memory by the quantized weights' float32 size, minus their scales; a float
    # copy of even the smallest quantized weight would take back more than the slack.
    float_engine = Engine(CONFIG, model, backend)
    saved = sum(4 * math.prod(shapes[n]) - 4 * shapes[n][1] for n in names)
    smallest = min(4 * math.prod(shapes[n]) for n in names)
    dropped = _float_bytes(float_engine) - _float_bytes(engine)
    assert dropped > saved - smallest, f"{backend} {scope}: float memory fell by {dropped:,} B, " \
        f"the quantized weights take {saved:,} B as float32"


# ----------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("scope, mode, head", [("ffn", "weight-only", True), ("all", "w8a8", False)])
def test_report_validation_table_columns_line_up(scope, mode, head):
    """The widest label, "int8 ffn weight-only +head", widens its column: every row of the
    validation table ends where its header does."""
    group = {"float32_bytes": 4000, "stored_bytes": 1100, "scale_bytes": 100, "ratio": 3.64,
             "ratio_without_scales": 4.0}
    metrics = {"loss": 1.5, "perplexity": 4.48, "bits_per_char": 2.16}
    report = {"scope": scope, "mode": mode, "head": head, "tensors": [],
              "totals": dict.fromkeys(("ffn_one_block", "ffn", "linear", "model"), group),
              "evaluation": {"windows": 2, "tokens": 256, "chars": 256, "backend": "numpy",
                             "float32": metrics, "int8": metrics,
                             "diff_percent": {"loss": 0.25, "perplexity": -0.5, "bits_per_char": 12.0}}}
    lines = format_report(report).splitlines()
    table = lines[-4:]
    label = f"int8 {scope} {mode}" + (" +head" if head else "")
    assert [x[:len(label)].strip() for x in table] == ["model", "float32", label, "difference"], table
    assert len({len(x) for x in table}) == 1, table
    header = table[0]
    for row in table[1:]:  # each number ends under its column's title
        for title in ("loss (nats/token)", "perplexity", "bits/char"):
            end = header.index(title) + len(title)
            assert row[end - 1] != " " and (end == len(row) or row[end] == " "), (title, row)


def run_cli(*args, cwd=tempfile.gettempdir()):
    env = {**os.environ, "MINITF_DATA": str(CORPUS),
           "MINITF_BACKEND": "numpy"}
    return subprocess.run([sys.executable, "-m", "minitf.quantize", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_model_dir(corpus_path, tmp_path_factory):
    """A small float32 model with the corpus' character vocabulary, GPT-2 init."""
    from minitf.tokenizer import train_tokenizer

    tok = train_tokenizer("char", corpus_path.read_text(encoding="utf-8"))
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, d_model=16)
    path = tmp_path_factory.mktemp("cli") / "model"
    save_checkpoint(path, init_params(config, seed=1), config, tok, meta={"seed": 1})
    return path


def test_cli_end_to_end(tiny_model_dir, tmp_path):
    # default --out: ./<model name>-int8 in the working directory
    r = run_cli("--model", tiny_model_dir, "--max-windows", 3, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "model-int8"
    for f in ("model.safetensors", "config.json", "tokenizer.json", "meta.json",
              "quant_report.json", "quant_error.png"):
        assert (out / f).is_file(), f
    for f in ("config.json", "tokenizer.json"):
        assert (out / f).read_bytes() == (tiny_model_dir / f).read_bytes(), f
    meta = json.loads((out / "meta.json").read_text())
    assert meta["quantization"] == {"scope": "ffn", "mode": "weight-only", "head": False,
                                    "method": "symmetric per-output-channel int8, round-half-to-even"}
    assert (out / "quant_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "quant_report.json").read_text())
    assert len(report["tensors"]) == 4 and report["totals"]["ffn"]["ratio_without_scales"] == 4.0
    files = report["files"]
    assert files["ffn_bytes_in_source_file"] == 4 * (files["ffn_bytes_in_int8_file"]
                                                     - files["ffn_scale_bytes_in_int8_file"])
    assert files["int8_model_file_bytes"] == (out / "model.safetensors").stat().st_size
    ev = report["evaluation"]
    assert ev["windows"] == 3 and ev["tokens"] == 3 * 16
    for key in ("loss", "perplexity", "bits_per_char"):
        want = 100 * (ev["int8"][key] - ev["float32"][key]) / ev["float32"][key]
        assert ev["diff_percent"][key] == pytest.approx(want)
    assert "FFN weights, all blocks" in r.stdout and "difference" in r.stdout
    engine, _, _ = load_engine(out, "numpy")
    assert isinstance(engine.blocks[1]["mlp.c_proj"], Int8Linear)

    r = run_cli("--model", tiny_model_dir, "--out", tmp_path / "all", "--scope", "all",
                "--mode", "w8a8", "--max-windows", 2)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "all" / "quant_report.json").read_text())
    assert report["mode"] == "w8a8" and len(report["tensors"]) == 8
    engine, _, _ = load_engine(tmp_path / "all", "numpy")
    assert isinstance(engine.blocks[0]["attn.c_attn"], Int8Linear) and engine.blocks[0]["attn.c_attn"].mode == "w8a8"

    # --int8-head: wte int8 with a scale per row, recorded; its report and plot row
    r = run_cli("--model", tiny_model_dir, "--out", tmp_path / "head", "--scope", "all",
                "--mode", "w8a8", "--int8-head", "--max-windows", 2)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "head" / "meta.json").read_text())
    assert meta["quantization"]["head"] is True and "per-row" in meta["quantization"]["method"]
    report = json.loads((tmp_path / "head" / "quant_report.json").read_text())
    head = {t["name"]: t for t in report["tensors"]}["wte"]
    assert report["head"] is True and len(report["tensors"]) == 9
    assert head["shape"][1] == 16 and 0 < head["max_error_half_scales"] <= 1.0
    assert "+head" in r.stdout
    engine, _, _ = load_engine(tmp_path / "head", "numpy")
    assert engine.wte.dtype == np.int8 and engine.head_mode == "w8a8"

    # quantizing the int8 model again is refused, on one line
    r = run_cli("--model", out, "--out", tmp_path / "again")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{out} is already quantized (scope ffn, weight-only, float32 head); " in r.stderr, r.stderr
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("args,message", [
    (["--scope", "attn"], "invalid choice: 'attn'"),
    (["--mode", "int4"], "invalid choice: 'int4'"),
    (["--max-windows", "0"], "must be >= 1"),
    (["--backend", "fortran"], "unknown kernel backend 'fortran'"),
])
def test_cli_bad_values_exit_2_with_one_line(tiny_model_dir, tmp_path, args, message):
    r = run_cli("--model", tiny_model_dir, "--out", tmp_path / "q", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "q").exists()


def test_cli_missing_model_dir_exits_2(tmp_path):
    r = run_cli("--model", tmp_path / "nothing", "--out", tmp_path / "q")
    assert r.returncode == 2 and "no checkpoint here" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_int8_model_in_out_is_replaced_only_with_replace(tiny_model_dir, tmp_path):
    """A second quantize into the same --out would lose the first int8 model: refused with
    one line unless --replace."""
    out = tmp_path / "q"
    assert run_cli("--model", tiny_model_dir, "--out", out, "--scope", "all").returncode == 0
    before = (out / "model.safetensors").read_bytes()
    r = run_cli("--model", tiny_model_dir, "--out", out)
    assert r.stderr.strip() == (f"python -m minitf.quantize: error: --out {out} already holds an "
                                f"int8 model (scope all, weight-only, float32 head); choose another "
                                f"directory, or add --replace to replace it"), r.stderr
    assert r.returncode == 2 and (out / "model.safetensors").read_bytes() == before
    r = run_cli("--model", tiny_model_dir, "--out", out, "--replace")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["quantization"]["scope"] == "ffn"
    # a model quantize did not write is never replaced
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    r = run_cli("--model", tiny_model_dir, "--out", other, "--replace")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "holds a minitf model that quantize did not write" in r.stderr, r.stderr


@pytest.mark.parametrize("change, message", [
    (lambda p: p["h.0.mlp.c_fc.weight_scale"].__setitem__(0, 0.0), "scales must be positive"),
    (lambda p: p["h.0.mlp.c_fc.weight_scale"].__setitem__(1, -0.5), "scales must be positive"),
    (lambda p: p["h.0.mlp.c_fc.weight_scale"].__setitem__(2, 3e38), "at most"),
    (lambda p: p["h.0.mlp.c_fc.weight"].__setitem__((0, 0), -128), "must be in \\[-127, 127\\]"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_tensors_the_quantizer_never_writes_are_refused_by_every_backend(change, message, backend):
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8)
    qparams, _ = quantize_model(init_params(config, seed=1), config, "ffn")
    qparams = {k: v.copy() for k, v in qparams.items()}
    change(qparams)
    with pytest.raises(ValueError, match=message):
        Engine(config, qparams, backend)
