"""The int8 tied head (`quantize_model(head=True)`, `python -m minitf.quantize --int8-head`):
wte stored once in int8 with a scale per row, used by the embedding (a token's row
dequantized) and by the head (logits[v] = scale[v] * (h . q[v])).

The quantization rule on hand-worked values; the head kernel of every backend against a
float64 / int64 computation written here; every backend and path (unfused, fused decode,
decode of several rows at once, prefill of all rows and of the last only) against an
independent forward pass written here in float64 numpy on the dequantized weights (for
W8A8 with the activations quantized as the rule says); the checkpoint round trip, old
checkpoints, the export, and bad input. That a row of a batch gets, bit for bit, what it
gets alone is tests/test_generation.py's batch test (its MODELS hold int8-head models)."""

import json
import math

import numpy as np
import pytest

from minitf.checkpoint import load_checkpoint, load_safetensors
from minitf.config import GPTConfig, param_shapes
from minitf.engine import Engine, load_engine
from minitf.kernels import get_backend
from minitf.quantization import quantize_model, quantize_per_row, save_quantized
from minitf.tensors import Quantization, checkpoint_layout, tensor_layout
from minitf.tokenizer import CharTokenizer
from models import perturbed_params
from reachable import reachable_arrays
from tolerances import TOL

BACKENDS = ["numpy", "numba", "cython"]
# V = 301 and 37 are not multiples of the head's chunk (64 rows) or of the int8 tile (64
# outputs); 301 takes three passes of the W8A8 head through the rows' sums (128 wide at
# d_model 26: 4C = 104 padded), the last one partial, 37 less than one; d_model 26 is not a
# multiple of the tile's 4 bytes of k; block_size 12 not of the 16 keys of the transposed
# cache.
CONFIGS = [GPTConfig(vocab_size=301, block_size=12, n_layer=2, n_head=2, d_model=26),
           GPTConfig(vocab_size=37, block_size=9, n_layer=1, n_head=3, d_model=24)]
MODELS = [("ffn", "weight-only"), ("all", "weight-only"), ("ffn", "w8a8"), ("all", "w8a8")]


@pytest.fixture(scope="module", params=range(len(CONFIGS)), ids=["V301-C26", "V37-C24"])
def config_params(request):
    config = CONFIGS[request.param]
    return config, perturbed_params(config)


# ----------------------------------------------------------------------------------------
# An independent forward pass: float64 numpy on the dequantized weights


def quantize_rule(x):
    """The symmetric per-row rule, in x's float dtype: scale = max|x| / 127, q = round half
    to even of x / scale, clamped to [-127, 127]; an all-zero row q = 0 with scale 1.
    x (N, K) float32 (bit for bit what the kernels must give) or float64 (the forward)."""
    amax = np.abs(x).max(axis=1)  # (N,)
    scale = amax / x.dtype.type(127)  # (N,)
    scale = np.where(scale > 0, scale, x.dtype.type(1))
    q = np.clip(np.rint(x / scale[:, None]), -127, 127)  # (N, K)
    return q, scale


def reference_logits(qparams, config, ids, w8a8):
    """Logits (T, V) of ids (T,), float64. Each int8 weight dequantized exactly (q * scale,
    per column of a linear, per row of wte); with w8a8 the input rows of every int8 linear
    layer and of the head quantized by `quantize_rule` first."""
    f = {k: v.astype(np.float64) for k, v in qparams.items()}
    T, C, NH = len(ids), config.d_model, config.n_head
    HS = C // NH

    def layernorm(x, name):
        mu = x.mean(axis=1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
        return (x - mu) / np.sqrt(var + config.layer_norm_eps) * f[name + ".weight"] + f[name + ".bias"]

    def linear(x, name):
        w = f[name + ".weight"]
        if qparams[name + ".weight"].dtype != np.int8:
            return x @ w + f[name + ".bias"]
        s = f[name + ".weight_scale"]  # (M,)
        if w8a8:
            xq, sx = quantize_rule(x)
            return (xq @ w) * sx[:, None] * s + f[name + ".bias"]
        return x @ (w * s) + f[name + ".bias"]

    wte = f["wte"] * f["wte_scale"][:, None]  # (V, C) the int8 head dequantized, row by row
    x = wte[ids] + f["wpe"][:T]  # (T, C)
    for l in range(config.n_layer):
        p = f"h.{l}."
        qkv = linear(layernorm(x, p + "ln_1"), p + "attn.c_attn")  # (T, 3C)
        q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(T, NH, HS).transpose(1, 0, 2) for i in range(3))
        att = q @ k.transpose(0, 2, 1) / math.sqrt(HS) + np.triu(np.full((T, T), -np.inf), 1)
        att = np.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        a = (att @ v).transpose(1, 0, 2).reshape(T, C)  # (T, C)
        x = x + linear(a, p + "attn.c_proj")
        h = linear(layernorm(x, p + "ln_2"), p + "mlp.c_fc")  # (T, 4C)
        g = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + linear(g, p + "mlp.c_proj")
    h = layernorm(x, "ln_f")  # (T, C)
    if w8a8:  # logits[v] = scale[v] * sx * (hq . q[v])
        hq, sh = quantize_rule(h)
        return (hq @ f["wte"].T) * sh[:, None] * f["wte_scale"]
    return h @ wte.T  # (T, V)


class Forced:
    """A sampler that keeps a copy of each logits it is given and returns the next token of
    `seq` (from position `t`): every step's logits are then those of a known prefix."""

    def __init__(self, seq, t):
        self.seq, self.t, self.logits = seq, t, []

    def __call__(self, logits):
        self.logits.append(logits.copy())
        self.t += 1
        return int(self.seq[self.t - 1]) if self.t <= len(self.seq) else 0


def relative_error(got, want) -> float:
    """max |got - want| / max(1, max |want|) (float32 logits of magnitude 10 are a few ulp
    apart at 1e-5)."""
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


# ----------------------------------------------------------------------------------------
# The rule


def test_per_row_rule_on_hand_worked_values():
    # row 0: max |w| = 127: scale 1, q = round half to even: 2.5 -> 2, -3.5 -> -4, 0.5 -> 0
    # row 1: max |w| = 254: scale 2: w / 2 = -127, 1.25 -> 1, 2.5 -> 2, 63.25 -> 63
    # row 2: all zeros: q = 0 and scale 1 (not 0/0)
    # row 3: 1e-45 (subnormal): max / 127 underflows: q = 0, scale 1
    w = np.array([[127.0, 2.5, -3.5, 0.5],
                  [-254.0, 2.5, 5.0, 126.5],
                  [0.0, 0.0, 0.0, 0.0],
                  [1e-45, -1e-45, 0.0, 1e-45]], np.float32)
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        wq, scale = quantize_per_row(w)
    np.testing.assert_array_equal(scale, np.float32([1.0, 2.0, 1.0, 1.0]))
    np.testing.assert_array_equal(wq, np.int8([[127, 2, -4, 0],
                                               [-127, 1, 2, 63],
                                               [0, 0, 0, 0],
                                               [0, 0, 0, 0]]))
    assert wq.flags.c_contiguous and wq.dtype == np.int8 and scale.dtype == np.float32


def test_quantize_model_head_layout_and_report(config_params):
    config, params = config_params
    qparams, report = quantize_model(params, config, "all", head=True)
    V, C = config.vocab_size, config.d_model
    assert list(qparams) == list(tensor_layout(config, Quantization("all", "w8a8", True)))
    assert qparams["wte"].dtype == np.int8 and qparams["wte"].shape == (V, C)
    assert qparams["wte_scale"].dtype == np.float32 and qparams["wte_scale"].shape == (V,)
    assert qparams["wpe"].dtype == np.float32 and "wpe_scale" not in qparams
    # row v within scale[v] / 2 of the float row: the per-row rule
    err = np.abs(params["wte"].astype(np.float64)
                 - qparams["wte"].astype(np.float64) * qparams["wte_scale"][:, None])
    assert (err <= qparams["wte_scale"][:, None].astype(np.float64) / 2).all()
    np.testing.assert_array_equal(qparams["wte_scale"], np.abs(params["wte"]).max(axis=1) / np.float32(127))
    head = next(t for t in report["tensors"] if t["name"] == "wte")
    assert head["shape"] == [V, C] and head["scale_bytes"] == 4 * V and head["int8_bytes"] == V * C
    assert 0 < head["max_error_half_scales"] <= 1 and report["head"] is True
    assert quantize_model(params, config, "all")[0]["wte"].dtype == np.float32  # no head: float32


# ----------------------------------------------------------------------------------------
# The kernel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,K,M", [(1, 26, 101), (5, 24, 37), (4, 96, 200), (3, 768, 130)])
def test_head_kernel_against_float64_and_int64(backend, N, K, M):
    kb = get_backend(backend)
    rng = np.random.default_rng(N * K + M)
    x = rng.standard_normal((N, K)).astype(np.float32)  # (N, K)
    w = rng.standard_normal((M, K)) * 10.0 ** rng.uniform(-3, 2, size=(M, 1))  # rows of many sizes
    w[M // 2] = 0.0  # an all-zero row
    wq, scale = quantize_per_row(w.astype(np.float32))
    # weight-only: float64 dot products with the exactly dequantized rows
    got = kb.matmul_nt_int8(x, wq, scale, mode="weight-only")  # (N, M)
    deq = wq.astype(np.float64) * scale.astype(np.float64)[:, None]  # (M, K)
    want = x.astype(np.float64) @ deq.T
    ref = np.abs(x.astype(np.float64)) @ np.abs(deq).T  # per output, the sum of |products|
    rel = (np.abs(got - want) / np.maximum(ref, 1e-300)).max()
    assert got.dtype == np.float32 and got.shape == (N, M)
    assert rel <= TOL[("kernel_dot", np.float32)], f"{backend} weight-only: {rel:.2e}"
    # w8a8: int64 sums of the quantized rows (the rule written in this test), both scales
    got = kb.matmul_nt_int8(x, wq, scale, mode="w8a8")
    xq, sx = quantize_rule(x)  # float32, as defined
    acc = xq.astype(np.int64) @ wq.astype(np.int64).T  # (N, M), exact
    want = (acc.astype(np.float32) * sx[:, None]) * scale  # float32, one rounding per product
    np.testing.assert_array_equal(got, want, err_msg=f"{backend} w8a8")


def test_head_kernel_refuses_bad_arguments():
    kb = get_backend("numpy")
    x, wq, s = np.zeros((2, 8), np.float32), np.zeros((5, 8), np.int8), np.ones(5, np.float32)
    with pytest.raises(ValueError, match="matmul_nt_int8 mode='int4' is unknown"):
        kb.matmul_nt_int8(x, wq, s, mode="int4")
    with pytest.raises(ValueError, match=r"wq has shape \(5, 7\); expected \(5, 8\)"):
        kb.matmul_nt_int8(x, wq[:, :7], s)
    with pytest.raises(ValueError, match=r"w_scale has shape \(4,\); expected \(5,\)"):
        kb.matmul_nt_int8(x, wq, s[:4])
    with pytest.raises(TypeError, match="wq has dtype float32"):
        kb.matmul_nt_int8(x, wq.astype(np.float32), s)


# ----------------------------------------------------------------------------------------
# Every backend and path


@pytest.mark.parametrize("quant", MODELS, ids=["-".join(m) for m in MODELS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_path_against_the_float64_forward(config_params, backend, quant):
    """Prefill of all rows, prefill of the last row only, decode one token at a time (the
    fused decode step on numba and cython), on the fused and the unfused path, against
    `reference_logits`: weight-only within 1e-5 (float32 against float64), W8A8 within
    TOL[("kv_cache_logits_w8a8")] (the float32 activations before a quantization may round
    into the next int8 step where float64 did not); the fused path equals the unfused one
    bit for bit for W8A8."""
    config, params = config_params
    scope, mode = quant
    qparams, _ = quantize_model(params, config, scope, head=True)
    w8a8 = mode == "w8a8"
    tol = TOL[("kv_cache_logits_w8a8", np.float32)] if w8a8 else TOL[("kv_cache_logits", np.float32)]
    B = config.block_size
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=B)
    want = reference_logits(qparams, config, ids, w8a8)  # (B, V); row t sees ids[:t+1]
    paths = [False] if backend == "numpy" else [False, True]
    results = {}
    for fused in paths:
        e = Engine(config, qparams, backend, int8_mode=mode, fused=fused)
        assert e.wte.dtype == np.int8 and (e.fused is not None) == fused
        full = e.prefill(ids)  # (B, V)
        last = np.stack([e.prefill(ids[:t], last_only=True) for t in (1, 5, B)])
        e.prefill(ids[:1])
        decode = np.stack([e.decode(t) for t in ids[1:]])  # positions 1 .. B-1
        label = f"{backend} fused={fused} {scope} {mode}"
        for name, got, ref in (("prefill", full, want), ("last_only", last, want[[0, 4, B - 1]]),
                               ("decode", decode, want[1:])):
            err = relative_error(got, ref)
            assert err <= tol, f"{label} {name}: error {err:.2e} > {tol}"
        results[fused] = (full, last, decode)
    if w8a8 and True in results:
        for a, b in zip(results[True], results[False]):
            np.testing.assert_array_equal(a, b, err_msg=f"{backend} {scope}: fused != unfused")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_int8_head_is_read_as_it_is_stored(config_params, backend):
    """No float copy of the head: the engine holds no float array of wte's shape (or its
    transpose's), and wte is the int8 matrix, stored once: on the fused path a view into the
    packed arrays, weight-only as its (V, C) rows, W8A8 only as the tiles of wte.T (from
    which `Engine.wte` rebuilds the rows)."""
    config, params = config_params
    V, C = config.vocab_size, config.d_model
    for mode in ("weight-only", "w8a8"):
        qparams, _ = quantize_model(params, config, "all", head=True)
        e = Engine(config, qparams, backend, int8_mode=mode)
        arrays = [a for a in reachable_arrays(e) if a.dtype.kind == "f"]
        assert not [a.shape for a in arrays if a.shape in ((V, C), (C, V), (V * C,))], (backend, mode)
        assert e.wte.dtype == np.int8 and e.wte_scale.shape == (V,)
        np.testing.assert_array_equal(e.wte, qparams["wte"], err_msg=f"{backend} {mode}")
        if e.fused is not None:
            tiled = mode == "w8a8"
            assert (e.head_packed is not None) == tiled and (e.stored_wte is None) == tiled
            kept = e.head_packed if tiled else e.stored_wte
            assert np.shares_memory(kept, e.fused.weights.pq)
            if tiled:
                assert e.head_packed.dtype == np.int8 and e.head_packed.size == -(-C // 4) * 4 * -(-V // 64) * 64


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_a_fused_w8a8_engine_keeps_each_int8_weight_once(config_params, backend):
    """On the fused path a W8A8 model keeps its linear layers' weights only as tiles and
    wte's only as the tiles of wte.T, which the head reads and the embedding gathers a
    token's row from: pq is exactly those sizes, padded to the tile, and every other int8
    array the engine holds is a scratch buffer. Built with take_params (the dict it takes
    is left empty), its prefill, decode and decode of several rows at once still match the
    float64 forward, `Engine.wte` and a layer's `weight_q` (rebuilt from the tiles) equal
    the quantized weights, and a layer's unfused call matches a float64 product of the
    activations quantized by the rule."""
    config, params = config_params
    qparams, _ = quantize_model(params, config, "all", head=True)
    V, C, B = config.vocab_size, config.d_model, config.block_size
    given = dict(qparams)
    e = Engine(config, given, backend, int8_mode="w8a8", take_params=True)
    assert given == {}
    pad = lambda n, m: -(-n // m) * m  # noqa: E731
    layers = [n for n, a in qparams.items() if a.dtype == np.int8 and n != "wte"]
    tiles = sum(pad(qparams[n].shape[0], 4) * pad(qparams[n].shape[1], 64) for n in layers)
    pq = e.fused.weights.pq
    assert pq.size == tiles + pad(C, 4) * pad(V, 64)  # wte once: its transpose's tiles
    assert e.stored_wte is None and "wte" not in e.fused.weights.views
    scratch = {id(a) for a in reachable_arrays(e.fused.buffers)}
    for a in reachable_arrays(e):
        if a.dtype == np.int8 and id(a) not in scratch and a.base is None:
            assert a is pq, a.shape
    np.testing.assert_array_equal(e.wte, qparams["wte"])  # rebuilt from the tiles
    ids = np.random.default_rng(2).integers(0, V, size=B)
    want = reference_logits(qparams, config, ids, True)  # (B, V)
    tol = TOL[("kv_cache_logits_w8a8", np.float32)]
    e.prefill(ids[:1])
    decode = np.stack([e.decode(t) for t in ids[1:]])  # positions 1 .. B-1
    for name, got, ref in (("prefill", e.prefill(ids), want), ("decode", decode, want[1:])):
        err = relative_error(got, ref)
        assert err <= tol, f"{backend} {name}: error {err:.2e} > {tol}"
    # rows of a batch, prompts of 1, 4 and 2 tokens of other sequences, each fed its own
    # next token: every decode step but the last ones runs several rows in one call
    seqs = np.random.default_rng(4).integers(0, V, size=(3, B))
    rows = [Forced(seq, p) for seq, p in zip(seqs, (1, 4, 2))]
    list(e.generate_batch([seq[:r.t] for seq, r in zip(seqs, rows)], [B - r.t + 1 for r in rows], rows))
    for i, (seq, r) in enumerate(zip(seqs, rows)):
        got, ref = np.stack(r.logits), reference_logits(qparams, config, seq, True)[B - len(r.logits):]
        err = relative_error(got, ref)
        assert err <= tol, f"{backend} batch row {i}: error {err:.2e} > {tol}"
    rng = np.random.default_rng(3)
    for l, blk in enumerate(e.blocks):
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            layer, name = blk[lin], f"h.{l}.{lin}"
            assert layer.stored_q is None and layer.packed is not None, name
            wq = qparams[name + ".weight"]
            np.testing.assert_array_equal(layer.weight_q, wq, err_msg=name)
            x = rng.standard_normal((3, wq.shape[0])).astype(np.float32)
            xq, sx = quantize_rule(x)  # float32, as the kernels quantize
            ref = ((xq.astype(np.float64) @ wq) * sx[:, None].astype(np.float64)
                   * qparams[name + ".weight_scale"] + qparams[name + ".bias"])
            err = relative_error(layer(e.kb, x), ref)
            assert err <= 1e-5, f"{backend} {name} unfused: error {err:.2e}"


# ----------------------------------------------------------------------------------------
# Checkpoints, export, bad input


def tokenizer(vocab_size):
    return CharTokenizer([chr(i) for i in range(32, 32 + vocab_size)])


class Source:
    """What save_quantized needs of the checkpoint a model was quantized from."""

    def __init__(self, path, config):
        self.path, self.config, self.meta = path, config, {"seed": 1}
        self.tokenizer = tokenizer(config.vocab_size)


def test_checkpoint_round_trip_and_old_checkpoints(config_params, tmp_path):
    config, params = config_params
    qparams, _ = quantize_model(params, config, "all", head=True)
    out = save_quantized(tmp_path / "q", qparams, Source(tmp_path, config), Quantization("all", "w8a8", True))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["quantization"]["head"] is True and meta["quantization"]["mode"] == "w8a8"
    assert "per-row" in meta["quantization"]["method"]
    tensors, _ = load_safetensors(out / "model.safetensors")  # safetensors, no pickle
    assert tensors["wte"].dtype == np.int8 and tensors["wte_scale"].dtype == np.float32
    ckpt = load_checkpoint(out, layout=checkpoint_layout)
    assert list(ckpt.params) == list(qparams)
    for name, a in qparams.items():
        np.testing.assert_array_equal(ckpt.params[name], a, err_msg=name)
    engine, _, _ = load_engine(out, "numba")
    ids = [3, 1, 4, 1, 5]
    np.testing.assert_array_equal(engine.prefill(ids),
                                  Engine(config, qparams, "numba", int8_mode="w8a8").prefill(ids))
    # a quantized checkpoint written before the option has no "head": float32 wte
    old = {"quantization": {"scope": "ffn", "mode": "w8a8", "method": "..."}}
    assert checkpoint_layout(config, old)["wte"] == (param_shapes(config)["wte"], None)
    assert Quantization.from_meta(old) == Quantization("ffn", "w8a8", False)


def test_bad_input_is_refused_with_a_clear_error(config_params, tmp_path):
    config, params = config_params
    with pytest.raises(ValueError, match=r"head='yes' must be true or false"):
        quantize_model(params, config, "all", head="yes")
    with pytest.raises(ValueError, match=r"head=1 must be true or false"):
        Quantization.from_meta({"quantization": {"scope": "ffn", "mode": "w8a8", "head": 1}})
    qparams, _ = quantize_model(params, config, "ffn", head=True)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(qparams, config, "ffn", head=True)
    # an int8 wte needs its scales, and int8 linear layers of a scope beside it
    with pytest.raises(ValueError, match="missing parameters wte_scale"):
        Engine(config, {k: v for k, v in qparams.items() if k != "wte_scale"}, "numpy")
    head_only = {**params, "wte": qparams["wte"], "wte_scale": qparams["wte_scale"]}
    with pytest.raises(ValueError, match="int8 tensors wte are not the weights of a quantization scope"):
        Engine(config, head_only, "numpy")


def test_export_to_transformers_is_refused_or_dequantized_per_row(config_params, tmp_path):
    from minitf.convert import to_hf
    from minitf.hf import HFError

    config, params = config_params
    qparams, _ = quantize_model(params, config, "ffn", head=True)
    src = save_quantized(tmp_path / "q", qparams, Source(tmp_path, config),
                         Quantization("ffn", "weight-only", True))
    with pytest.raises(HFError, match="is an int8 model .*int8 head.* --dequantize"):
        to_hf(src, tmp_path / "hf", False)
    out = to_hf(src, tmp_path / "hf2", True)
    tensors, _ = load_safetensors(out / "model.safetensors")
    wte = tensors["transformer.wte.weight"]
    np.testing.assert_array_equal(wte, qparams["wte"].astype(np.float32) * qparams["wte_scale"][:, None])
