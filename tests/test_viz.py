"""The pictures of a generation (--viz) and of training: the files are valid PNGs, and the data
behind them is right: the attention plotted is the one the model used, the memory log has one
row per operation of the path that ran (fused or unfused, which it names), its KV-cache
series grows by one row per layer per token, its weights equal the model's parameter bytes
and, on the fused path, its fixed buffers are counted."""

import csv
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from minitf.checkpoint import save_checkpoint
from minitf.config import GPTConfig
from minitf.engine import Engine
from minitf.model import init_params
from minitf.tokenizer import CharTokenizer
from minitf.viz import CSV_COLUMNS, Recorder, token_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BLOCK_OPS = ("ln_1", "attn", "residual_1", "ln_2", "mlp", "residual_2")
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET: Ay me!\n"


def tiny_model(block_size=32, seed=0):
    """A random 2-layer model whose attention is far from uniform (scaled q, k weights)."""
    tok = CharTokenizer.train(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=16)
    params = init_params(cfg, seed=seed)
    for l in range(cfg.n_layer):
        params[f"h.{l}.attn.c_attn.weight"][:, :2 * cfg.d_model] *= 25.0  # q and k columns
    return cfg, params, tok


def record(cfg, params, tok, prompt, n_new, out, backend="numpy", seed=0, context_mode="shift",
           keep=None):
    """Generate n_new tokens with a Recorder attached; (engine, recorder, written paths)."""
    engine = Engine(cfg, params, backend)
    ids = [int(t) for t in tok.encode(prompt)]
    rec = Recorder(engine, tok, ids[-cfg.block_size:], out, model_name="tiny-test")
    rng = np.random.default_rng(seed)
    new = list(engine.generate(ids, n_new, lambda logits: int(rng.integers(cfg.vocab_size)),
                               context_mode=context_mode, keep=keep))
    assert len(new) == n_new
    return engine, rec, rec.finish()


def assert_png(path, min_px=300, max_px=6000):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    import matplotlib.image

    h, w = matplotlib.image.imread(path).shape[:2]
    assert min_px <= h <= max_px and min_px <= w <= max_px, (path, w, h)


def reference_attention(params, cfg, ids):
    """Every layer's attention weights (n_head, T, T), recomputed in float64 numpy from the
    weights, independently of minitf's layers and kernels."""
    P = {k: v.astype(np.float64) for k, v in params.items()}
    T, C, NH = len(ids), cfg.d_model, cfg.n_head
    HS = C // NH

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * P[name + ".weight"] + P[name + ".bias"]

    def lin(x, name):
        return x @ P[name + ".weight"] + P[name + ".bias"]

    x = P["wte"][ids] + P["wpe"][:T]
    out = []
    for l in range(cfg.n_layer):
        qkv = lin(ln(x, f"h.{l}.ln_1"), f"h.{l}.attn.c_attn")
        q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(T, NH, HS).transpose(1, 0, 2) for i in range(3))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(HS)
        s[:, np.triu(np.ones((T, T), bool), 1)] = -np.inf
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out.append(w)
        y = (w @ v).transpose(1, 0, 2).reshape(T, C)
        x = x + lin(y, f"h.{l}.attn.c_proj")
        f = lin(ln(x, f"h.{l}.ln_2"), f"h.{l}.mlp.c_fc")
        f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
        x = x + lin(f, f"h.{l}.mlp.c_proj")
    return out


def pass_ops(n_layer):
    return ["embedding"] + [f"h.{l}.{op}" for l in range(n_layer) for op in BLOCK_OPS] + ["ln_f", "head"]


# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg, params, tok = tiny_model()
    prompt, n_new = "ROMEO:\nBut soft", 12
    engine, rec, paths = record(cfg, params, tok, prompt, n_new, tmp_path_factory.mktemp("viz"))
    return dict(cfg=cfg, params=params, tok=tok, ids=[int(t) for t in tok.encode(prompt)], n_new=n_new,
                engine=engine, rec=rec, paths=paths, log=rec.log())


def test_files_are_written_and_are_pngs(run):
    names = sorted(p.name for p in run["paths"])
    assert names == ["attn_prefill.png", "memory_log.csv", "memory_log.png"]
    for p in run["paths"]:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert_png(p)


def test_attention_is_what_the_model_used(run):
    cfg, ids, att = run["cfg"], run["ids"], run["rec"].attention
    T = len(ids)
    assert len(att) == cfg.n_layer
    ref = reference_attention(run["params"], cfg, ids)
    for l, a in enumerate(att):
        assert a.shape == (cfg.n_head, T, T) and a.dtype == np.float32
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)  # each row is a distribution
        assert np.all(a[:, np.triu(np.ones((T, T), bool), 1)] == 0.0)  # causal: nothing above
        np.testing.assert_allclose(a, ref[l], rtol=1e-4, atol=1e-5)
    assert ref[0][0].max(-1)[3:].mean() > 0.5, "the test model's attention should be peaked"
    # the heads differ, so the picture can tell them apart
    assert np.abs(att[0][0] - att[0][1]).max() > 0.1


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_attention_is_captured_on_every_backend(backend, tmp_path):
    from minitf.kernels import available_backends

    reason = available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    cfg, params, tok = tiny_model()
    prompt = "JULIET: Ay me!"
    _, rec, _ = record(cfg, params, tok, prompt, 3, tmp_path, backend=backend)
    ref = reference_attention(params, cfg, [int(t) for t in tok.encode(prompt)])
    for a, r in zip(rec.attention, ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_memory_log_of_the_fused_path(backend, tmp_path):
    """numba and cython record the path they run: the fused prefill operation by operation,
    then one `decode_step` per token; the KV cache grows by one row per layer per step; its
    buffers are counted in the activations; weights + buffers are every byte it holds."""
    cfg, params, tok = tiny_model()
    prompt, n = "ROMEO:\nBut soft", 6
    engine, rec, paths = record(cfg, params, tok, prompt, n, tmp_path, backend=backend)
    log, T, L, C = rec.log(), len(tok.encode(prompt)), cfg.n_layer, cfg.d_model
    assert engine.fused is not None and set(log["path"]) == {"fused"}
    # the last token is sampled, never forwarded
    assert list(log["op"]) == pass_ops(L) + ["sample"] + ["decode_step", "sample"] * (n - 1)
    steps = np.flatnonzero(log["op"] == "decode_step")
    assert list(log["kv_cache_bytes"][steps]) == [2 * L * (T + k) * C * 4 for k in range(1, n)]
    assert list(log["step"][steps]) == list(range(1, n))
    buffers = engine.fused.buffer_bytes()
    assert buffers > 0 and np.all(log["buffers_bytes"] == buffers)
    assert np.all(log["activations_bytes"] >= buffers - 1024)  # the buffers, less any frees
    assert np.all(log["weights_bytes"] == sum(p.nbytes for p in params.values()))
    every_byte = sum(engine.fused.nbytes().values())  # packed weights, table, kvT, scratch
    assert log["weights_bytes"][0] + buffers == every_byte
    assert_png(tmp_path / "memory_log.png")


def test_memory_log_of_a_fused_w8a8_model_counts_its_tiles(tmp_path):
    from minitf.quantize import quantize_model

    cfg, params, tok = tiny_model()
    q, _ = quantize_model(params, cfg, "all")
    engine = Engine(cfg, q, "numba", int8_mode="w8a8")
    ids = [int(t) for t in tok.encode("ROMEO:")]
    rec = Recorder(engine, tok, ids, tmp_path)
    list(engine.generate(ids, 3, lambda logits: int(np.argmax(logits))))
    rec.finish()
    tiles = sum(blk[lin].packed.nbytes + blk[lin].colsum.nbytes for blk in engine.blocks
                for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    log = rec.log()
    # the tiles replace the W8A8 layers' (K, M) int8 weights: every other tensor once, and them
    kept = sum(p.nbytes for name, p in q.items() if not (p.dtype == np.int8 and name.startswith("h.")))
    assert np.all(log["weights_bytes"] == kept + tiles)
    assert log["weights_bytes"][0] + log["buffers_bytes"][0] == sum(engine.fused.nbytes().values())


def test_memory_log_has_one_row_per_operation(run):
    cfg, log, n = run["cfg"], run["log"], run["n_new"]
    per_pass = pass_ops(cfg.n_layer)
    # prefill + one decode per token but the last (sampled, never forwarded), a sample per token
    expected = per_pass + ["sample"] + (per_pass + ["sample"]) * (n - 1)
    assert list(log["op"]) == expected
    assert list(log["index"]) == list(range(len(expected)))
    first = len(per_pass) + 1
    assert set(log["phase"][:first]) == {"prefill"} and set(log["phase"][first:]) == {"decode"}
    assert list(log["step"][:first]) == [0] * first
    assert set(log["step"][first:]) == set(range(1, n))
    with open(run["rec"].out_dir / "memory_log.csv") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) - 1 == len(expected)
    assert [r[3] for r in rows[1:]] == expected


def test_kv_cache_series_is_2_layers_tokens_dmodel_4_bytes(run):
    cfg, log, T = run["cfg"], run["log"], len(run["ids"])
    L, C = cfg.n_layer, cfg.d_model
    kv, ops, step, phase = log["kv_cache_bytes"], log["op"], log["step"], log["phase"]
    assert np.all(log["kv_cache_allocated_bytes"] == 2 * L * cfg.block_size * C * 4)
    assert run["engine"].k_cache.nbytes * 2 == 2 * L * cfg.block_size * C * 4
    last_attn = f"h.{L - 1}.attn"
    for i in range(len(kv)):
        if phase[i] != "decode":
            continue
        tokens = T + step[i]  # positions in the cache once this decode step has written its row
        pass_start = i - list(pass_ops(L) + ["sample"]).index(ops[i])
        written = list(ops[pass_start:i + 1])
        layers_done = sum(f"h.{l}.attn" in written for l in range(L))
        assert kv[i] == 2 * C * 4 * (layers_done * tokens + (L - layers_done) * (tokens - 1)), i
        if last_attn in written:  # every layer has its row: the formula of the issue
            assert kv[i] == 2 * L * tokens * C * 4
    # one row per layer per token: the increment at each decode step
    heads = np.flatnonzero((ops == "head") & (phase == "decode"))
    assert np.all(np.diff(kv[heads]) == 2 * L * C * 4)
    # during the prefill the cache fills layer by layer, T rows each
    pre = np.flatnonzero(phase == "prefill")
    assert kv[pre[0]] == 0 and kv[pre[-1]] == 2 * L * T * C * 4


def test_weights_equal_the_parameter_bytes(run):
    params = run["params"]
    expected = sum(p.nbytes for p in params.values())
    from minitf.config import num_params
    assert expected == num_params(run["cfg"]) * 4
    assert np.all(run["log"]["weights_bytes"] == expected)


def test_weights_of_an_int8_model_are_its_int8_bytes(tmp_path):
    cfg, params, tok = tiny_model()
    q = dict(params)
    for l in range(cfg.n_layer):
        for lin in ("mlp.c_fc", "mlp.c_proj"):
            w = params[f"h.{l}.{lin}.weight"]
            scale = (np.abs(w).max(0) / 127).astype(np.float32)
            q[f"h.{l}.{lin}.weight"] = np.round(w / scale).astype(np.int8)
            q[f"h.{l}.{lin}.weight_scale"] = scale
    _, rec, _ = record(cfg, q, tok, "ROMEO:", 3, tmp_path)
    assert np.all(rec.log()["weights_bytes"] == sum(p.nbytes for p in q.values()))
    assert sum(p.nbytes for p in q.values()) < sum(p.nbytes for p in params.values())


def test_activations_are_measured_and_exclude_the_recorder(tmp_path):
    """Activations come from tracemalloc: the prefill of a long prompt needs more than a
    decode step, and the recorder's own log does not show up as growth over a generation."""
    cfg, params, tok = tiny_model(block_size=128)
    prompt = (TEXT * 2)[:60]
    _, rec, _ = record(cfg, params, tok, prompt, 60, tmp_path)
    log = rec.log()
    act, phase, ops = log["activations_bytes"], log["phase"], log["op"]
    T, C = len(prompt), cfg.d_model
    # the prefill holds the (T, 4C) float32 MLP hidden layer at some point
    assert log["activations_peak_bytes"][phase == "prefill"].max() >= T * 4 * C * 4
    assert act[phase == "prefill"].max() > act[phase == "decode"].max()
    assert np.all(log["traced_bytes"] >= act)
    samples = act[(ops == "sample") & (phase == "decode")]
    # a kept Python row per operation would add ~100s of bytes per op, ~15 ops per token
    growth = (samples[-1] - samples[10]) / (len(samples) - 11)
    assert abs(growth) < 150, f"activations drift by {growth:.0f} B per token"
    assert log["attention_capture_bytes"][0] == cfg.n_layer * cfg.n_head * T * T * 4


@pytest.mark.parametrize("context_mode", ["exact", "shift"])
def test_sliding_window_keeps_the_prompt_attention(tmp_path, context_mode):
    cfg, params, tok = tiny_model(block_size=16)
    prompt, n, keep = "ROMEO:\nBut", 20, 5  # 10 tokens + 20 > 16: the window moves
    keep = None if context_mode == "exact" else keep
    engine, rec, paths = record(cfg, params, tok, prompt, n, tmp_path, context_mode=context_mode,
                                keep=keep)
    ids = [int(t) for t in tok.encode(prompt)]
    log = rec.log()
    L, C, B = cfg.n_layer, cfg.d_model, cfg.block_size
    assert len(rec.attention) == L and rec.attention[0].shape[1:] == (len(ids), len(ids))
    ref = reference_attention(params, cfg, ids)
    np.testing.assert_allclose(rec.attention[1], ref[1], rtol=1e-4, atol=1e-5)
    assert log["kv_cache_bytes"].max() == 2 * L * B * C * 4
    assert np.all(log["kv_cache_bytes"] <= log["kv_cache_allocated_bytes"])
    # positions in the cache after each forward pass (the prompt's prefill, then one per
    # token but the last): exact keeps block_size once full, shift falls back to keep
    tokens, filled = [], len(ids)
    for _ in range(n):
        tokens.append(filled)
        filled = filled + 1 if filled < B else (B if keep is None else keep)
    heads = np.flatnonzero(log["op"] == "head")
    assert list(log["kv_cache_bytes"][heads]) == [2 * L * t * C * 4 for t in tokens]
    re_prefills = set(log["step"][(log["phase"] == "prefill")]) - {0}
    assert re_prefills == {k for k in range(1, n) if tokens[k - 1] == B}  # once pos == block_size
    assert len(log["op"]) == n * len(pass_ops(L)) + n
    assert_png(tmp_path / "memory_log.png")


def test_finish_restores_the_engine_hooks(run):
    engine = run["engine"]
    assert engine.trace is None and engine.capture_attention is False
    import tracemalloc

    assert not tracemalloc.is_tracing()


def test_token_labels_are_visible():
    tok = CharTokenizer.train(TEXT)
    label = lambda c: token_label(tok, int(tok.encode(c)[0]))
    assert label("\n") == "\\n" and label(" ") == "\u2423" and label("R") == "R"


# ----------------------------------------------------------------------------------------
# Through the real command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg, params, tok = tiny_model()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", params, cfg, tok), cfg


def generate_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=tempfile.gettempdir(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("backend, path", [("numpy", "unfused"), ("numba", "fused")])
def test_generate_cli_writes_the_pictures(checkpoint, tmp_path, backend, path):
    model, cfg = checkpoint
    out = tmp_path / "viz"
    n = 20
    r = generate_cli("-m", "minitf.generate", "--model", str(model), "--max-new-tokens", str(n),
                     "--prompt", "ROMEO:", "--seed", "1", "--viz", str(out), "--backend", backend)
    assert r.returncode == 0, r.stderr
    for name in ("attn_prefill.png", "memory_log.png", "memory_log.csv"):
        assert (out / name).is_file() and f"wrote {out / name}" in r.stderr
    assert_png(out / "attn_prefill.png")
    assert_png(out / "memory_log.png")
    with open(out / "memory_log.csv") as f:
        rows = list(csv.DictReader(f))
    L, C, T = cfg.n_layer, cfg.d_model, len("ROMEO:")
    assert {r["path"] for r in rows} == {path}
    decode_ops = pass_ops(L) if path == "unfused" else ["decode_step"]  # one compiled call
    assert len(rows) == len(pass_ops(L)) + n + (n - 1) * len(decode_ops)  # the last: no forward
    for row in rows:
        if row["phase"] == "decode" and row["op"] in ("ln_f", "head", "decode_step", "sample"):
            assert int(row["kv_cache_bytes"]) == 2 * L * (T + int(row["step"])) * C * 4
    assert {int(r["weights_bytes"]) for r in rows} == {
        sum(p.nbytes for p in tiny_model()[1].values())}


def test_generate_without_viz_never_imports_the_plotting(checkpoint):
    model, _ = checkpoint
    r = generate_cli("-X", "importtime", "-m", "minitf.generate", "--model", str(model),
                     "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "matplotlib" not in imported and "minitf.viz" not in imported and "tracemalloc" not in imported


# ----------------------------------------------------------------------------------------
# Training


def test_training_writes_loss_curve_png(corpus_path, tmp_path):
    from minitf import train

    out = tmp_path / "run"
    args = train.build_parser().parse_args([
        "--data", str(corpus_path), "--out", str(out), "--preset", "tiny", "--batch-size", "2",
        "--eval-windows", "2", "--quiet", "--steps", "6", "--eval-interval", "3", "--warmup", "2"])
    train.run(args, log=lambda *a: None)
    assert_png(out / "loss_curve.png")
