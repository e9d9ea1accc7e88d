"""GPT-2 interop against HF transformers, the independent reference.

Models are made here with `GPT2LMHeadModel(GPT2Config(...))` and random weights, saved with
`save_pretrained` (and the tokenizer with transformers' GPT2Tokenizer), and loaded by minitf:
a tiny one, and one of GPT-2 small's widths (d_model 768, 12 heads, vocab 50,257, context
1,024) with 2 layers instead of 12 to keep CI short. Logits must agree within
TOL[("hf_logits", float32)] and greedy generation token for token, on every backend; exports
must load in transformers without a warning and give the same logits. Nothing is downloaded.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from minitf import convert, evaluate, hf, quantize
from minitf.kernels import numpy_ref
from minitf.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from minitf.engine import DEFAULT_MODEL_DIR, Engine, load_engine
from minitf.quantization import quantize_model
from minitf.tensors import checkpoint_layout
from minitf.tokenizer import _bytes_to_unicode, load_tokenizer, train_tokenizer
from tolerances import TOL

BACKENDS = ["numpy", "numba", "cython"]
ATOL = TOL[("hf_logits", np.float32)]
TINY = dict(n_positions=64, n_embd=32, n_layer=2, n_head=4)
# GPT-2 small's widths, 2 of its 12 layers. Weights N(0, 0.05) instead of 0.02 spread the
# logits (std ~1.4): greedy's top two then differ by >= 0.027 along the path, 2,700 times
# the float32 differences (~1e-5), so a differing token means a bug, not a near tie.
SMALL = dict(n_positions=1024, n_embd=768, n_layer=2, n_head=12, initializer_range=0.05)
NEW_TOKENS = 50


def greedy(sample_logits):
    return int(np.argmax(sample_logits))


def hf_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits[0].numpy()  # (T, V)


def hf_greedy(model, ids, n=NEW_TOKENS):
    """transformers' own greedy `generate` (eos off: exactly n tokens) -> (ids, top-2 gaps)."""
    x = torch.tensor([list(ids)])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    gaps = [float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in out.scores]
    return out.sequences[0, len(ids):].tolist(), min(gaps)


def gpt2_tokenizer(vocab: dict, merges: list) -> GPT2Tokenizer:
    """transformers' GPT-2 tokenizer over a vocabulary (<|endoftext|> added last, as GPT-2's)."""
    return GPT2Tokenizer(vocab={**vocab, hf.END_OF_TEXT: len(vocab)}, merges=[tuple(m) for m in merges])


def save_hf_model(directory, tokenizer, seed=0, **config):
    """A random GPT2LMHeadModel saved with save_pretrained beside `tokenizer`; returns it."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=None,
                                       **config)).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def assert_close(got, ref, what):
    err = float(np.abs(got - ref).max())
    assert err <= ATOL, f"{what}: max |minitf - transformers| = {err:.2e} > {ATOL}"


@pytest.fixture(scope="module")
def bpe_parts(corpus_path):
    """(vocab, merges) of a byte-level BPE trained on a slice of the corpus (400 tokens)."""
    tok = train_tokenizer("bpe", corpus_path.read_text(encoding="utf-8")[:100_000], vocab_size=400)
    model = json.loads(tok.to_tokenizers().to_str())["model"]
    return model["vocab"], model["merges"]


@pytest.fixture(scope="module")
def text(corpus_path):
    return corpus_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bpe_parts):
    """(directory, transformers model) of a tiny random GPT-2 with a trained BPE tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-hf")
    return directory, save_hf_model(directory, gpt2_tokenizer(*bpe_parts), **TINY)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(directory, transformers model) of GPT-2 small's widths, 2 layers, random weights.

    Its tokenizer has GPT-2's size, 50,257 tokens: the 256 byte tokens, 50,000 merges of
    two bytes each, then <|endoftext|> (GPT-2's vocabulary itself is not downloaded).
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(byte_chars)}
    merges = [(a, b) for a in byte_chars for b in byte_chars][:50256 - 256]
    vocab.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    directory = tmp_path_factory.mktemp("small-hf")
    return directory, save_hf_model(directory, gpt2_tokenizer(vocab, merges), **SMALL)


def minitf_engine(directory, backend):
    ckpt = load_checkpoint(directory)
    return Engine(ckpt.config, ckpt.params, backend)


# ---------------------------------------------------------------------------- import


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_logits_over_the_full_context_and_greedy_50(tiny, text, backend):
    directory, model = tiny
    engine = minitf_engine(directory, backend)
    tokenizer = load_tokenizer(directory)
    ids = tokenizer.encode(text[3000:4000])[: TINY["n_positions"]]  # exactly the context
    assert len(ids) == TINY["n_positions"]
    assert_close(engine.prefill(ids), hf_logits(model, ids), f"{backend}, 64 positions")
    prompt = ids[:10]
    want, gap = hf_greedy(model, prompt)
    got = list(engine.generate(prompt, NEW_TOKENS, greedy))
    assert got == want, f"{backend}: greedy tokens differ (smallest top-2 logit gap {gap:.1e})"


@pytest.fixture(scope="module")
def small_reference(small):
    """transformers' logits over a full 1,024-token context and its 50 greedy tokens after a
    975-token prompt (the last one is predicted at position 1,023, the context's end)."""
    _, model = small
    ids = np.random.default_rng(0).integers(0, 50257, SMALL["n_positions"])
    prompt = ids[: SMALL["n_positions"] - NEW_TOKENS + 1]
    return ids, hf_logits(model, ids), prompt, hf_greedy(model, prompt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_small_widths_logits_and_greedy_50(small, small_reference, backend):
    """Every backend: all 1,024 x 50,257 logits of a full prefill. numba, cython also: the
    last row of a last-only prefill and 24 decode steps at positions 1,000..1,023 against the
    KV cache."""
    directory, _ = small
    ids, ref, prompt, (want, gap) = small_reference
    engine = minitf_engine(directory, backend)
    assert_close(engine.prefill(ids), ref, f"{backend}, 1024 positions")
    if backend != "numpy":
        assert_close(engine.prefill(ids, last_only=True), ref[-1], f"{backend}, position 1023")
        engine.prefill(ids[:1000], last_only=True)
        decoded = np.stack([engine.decode(t) for t in ids[1000:]])
        assert_close(decoded, ref[1000:], f"{backend}, decode at positions 1000..1023")
    got = list(engine.generate(prompt, NEW_TOKENS, greedy))
    assert got == want, f"{backend}: greedy tokens differ (smallest top-2 logit gap {gap:.1e})"


def test_generate_cli_prints_transformers_greedy_text(tmp_path, bpe_parts):
    """A fresh Python process makes a random GPT-2 and saves it with save_pretrained; another
    runs `python -m minitf.generate --model DIR` on it and must print transformers' greedy text."""
    parts = tmp_path / "bpe_parts.json"
    parts.write_text(json.dumps(bpe_parts))
    model_dir, prompt = tmp_path / "model", "ROMEO:\nWhat say you"
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from test_hf import gpt2_tokenizer, save_hf_model, TINY
tok = gpt2_tokenizer(*json.load(open({str(parts)!r})))
model = save_hf_model({str(model_dir)!r}, tok, seed=7, **TINY)
x = torch.tensor([tok.encode({prompt!r})])
out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=50, do_sample=False,
                     eos_token_id=None, pad_token_id=0)
print(json.dumps(tok.decode(out[0, x.shape[1]:].tolist(), clean_up_tokenization_spaces=False)))
"""
    # cwd outside the checkout, so that both processes run the installed package
    made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    want = json.loads(made.stdout.strip().splitlines()[-1])
    for backend in ("numpy", "cython"):
        run = subprocess.run([sys.executable, "-m", "minitf.generate", "--model", str(model_dir),
                              "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "50",
                              "--backend", backend], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert run.stdout == prompt + want + "\n", backend


def test_evaluate_and_quantize_commands_on_a_transformers_directory(tiny, corpus_path, capsys):
    assert evaluate.main(["--model", str(tiny[0]), "--data", str(corpus_path), "--max-windows", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 2
    with pytest.raises(SystemExit) as e:  # its size report compares minitf files: convert first
        quantize.main(["--model", str(tiny[0]), "--data", str(corpus_path)])
    assert e.value.code == 2 and "python -m minitf.convert --from-hf" in capsys.readouterr().err


def test_hub_layout_without_prefix_with_buffers_and_tied_head(tiny, tmp_path, text):
    """What the hub's gpt2 holds: unprefixed names (a GPT2Model file), the causal-mask buffers
    attn.bias / attn.masked_bias, lm_head.weight stored equal to wte, an older config.json, and
    the tokenizer.json that `tokenizers` wrote then (ByteLevel post-processor, string merges)."""
    source, model = tiny
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    T = TINY["n_positions"]
    for i in range(TINY["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = state["transformer.wte.weight"].copy()
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
              "model_type": "gpt2", "n_ctx": T, "vocab_size": len(state["transformer.wte.weight"]),
              "summary_type": "cls_index", "task_specific_params": {"text-generation": {"max_length": 50}},
              **TINY}  # no n_inner, layer_norm_epsilon or tie_word_embeddings: the defaults
    (tmp_path / "config.json").write_text(json.dumps(config))
    tok = json.loads((source / "tokenizer.json").read_text())
    tok["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False}
    tok["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True}
    tok["model"]["merges"] = [" ".join(m) for m in tok["model"]["merges"]]
    for key in ("byte_fallback", "ignore_merges"):
        tok["model"].pop(key)
    tok["added_tokens"][0]["normalized"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))

    ckpt = load_checkpoint(tmp_path)
    ids = ckpt.tokenizer.encode(text[:2000])[:T]
    assert ids.tolist() == GPT2Tokenizer.from_pretrained(source).encode(text[:2000])[:T]
    assert_close(Engine(ckpt.config, ckpt.params, "numpy").prefill(ids), hf_logits(model, ids), "hub layout")


def test_sharded_safetensors_with_index(tiny, tmp_path, text):
    _, model = tiny
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shutil.copy(tiny[0] / "tokenizer.json", tmp_path)
    index = json.loads((tmp_path / hf.WEIGHTS_INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / hf.WEIGHTS_FILE).exists()
    engine = minitf_engine(tmp_path, "numpy")
    ids = load_tokenizer(tmp_path).encode(text[:500])[:40]
    assert_close(engine.prefill(ids), hf_logits(model, ids), "sharded")

    index["weight_map"]["transformer.wte.weight"] = "../elsewhere.safetensors"
    (tmp_path / hf.WEIGHTS_INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not a file name"):
        load_checkpoint(tmp_path)


def test_float16_weights_load_as_float32_or_as_stored(tiny, tmp_path):
    source, model = tiny
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    tensors = {k: v.numpy().astype(np.float16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert load_checkpoint(tmp_path).params["wte"].dtype == np.float32
    assert load_checkpoint(tmp_path, dtype=None).params["wte"].dtype == np.float16


def test_gpt2_tanh_gelus_are_minitfs_gelu():
    """minitf accepts activation_function gelu_new, gelu_pytorch_tanh and gelu_fast as the
    function it computes, and refuses the exact (erf) gelu: measured here against
    transformers' own implementations."""
    x = np.linspace(-8, 8, 20001)
    ours = numpy_ref.gelu(x)  # float64
    for name in hf.TANH_GELU:
        theirs = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
        assert np.abs(ours - theirs).max() <= 1e-9, name
        theirs32 = transformers.activations.ACT2FN[name](torch.from_numpy(x.astype(np.float32))).numpy()
        assert np.abs(ours - theirs32).max() <= 1e-6, name  # float32 rounding only
    exact = transformers.activations.ACT2FN["gelu"](torch.from_numpy(x)).numpy()
    assert np.abs(ours - exact).max() > 1e-4  # another function: refused


# ---------------------------------------------------------------------------- refusals


def edited_copy(source, tmp_path, config_edit=None, tensor_edit=None):
    directory = tmp_path / "edited"
    shutil.copytree(source, directory)
    if config_edit is not None:
        path = directory / "config.json"
        path.write_text(json.dumps(config_edit(json.loads(path.read_text()))))
    if tensor_edit is not None:
        path = directory / "model.safetensors"
        tensors = safetensors.numpy.load_file(str(path))
        tensor_edit(tensors)
        safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "llama", "model_type 'llama' is not GPT-2"),
    ("activation_function", "gelu", "activation_function 'gelu'"),
    ("activation_function", "relu", "activation_function 'relu'"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True"),
    ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn=True"),
    ("add_cross_attention", True, "add_cross_attention=True"),
    ("scale_attn_weights", False, "scale_attn_weights=False"),
    ("n_inner", 64, "n_inner=64"),
    ("n_head", 5, "n_embd=32 is not divisible by n_head=5"),
    ("layer_norm_epsilon", -1.0, "layer_norm_epsilon=-1.0"),
    ("n_positions", 0, "n_positions=0"),
])
def test_configs_minitf_cannot_run_are_refused_naming_the_field(tiny, tmp_path, field, value, message):
    directory = edited_copy(tiny[0], tmp_path, lambda c: {**c, field: value})
    with pytest.raises(ValueError) as e:
        load_checkpoint(directory)
    assert message in str(e.value) and str(directory / "config.json") in str(e.value), str(e.value)


@pytest.mark.parametrize("field,value", [("activation_function", "gelu_pytorch_tanh"),
                                         ("activation_function", "gelu_fast"), ("n_inner", 128),
                                         ("layer_norm_epsilon", 1e-6)])
def test_configs_minitf_runs(tiny, tmp_path, field, value):
    ckpt = load_checkpoint(edited_copy(tiny[0], tmp_path, lambda c: {**c, field: value}))
    assert ckpt.config.layer_norm_eps == (value if field == "layer_norm_epsilon" else 1e-5)


def test_generate_cli_refusal_is_one_line_naming_the_field(tiny, tmp_path):
    directory = edited_copy(tiny[0], tmp_path, lambda c: {**c, "activation_function": "quick_gelu"})
    run = subprocess.run([sys.executable, "-m", "minitf.generate", "--model", str(directory)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "activation_function 'quick_gelu'" in lines[0], run.stderr


def _set(name, f):
    return lambda t: t.__setitem__(name, f(t))


@pytest.mark.parametrize("config_edit,tensor_edit,message", [
    (None, _set("lm_head.weight", lambda t: t["transformer.wte.weight"] + 1e-3), "lm_head.weight differs"),
    (lambda c: {**c, "tie_word_embeddings": False}, None, "tie_word_embeddings=false"),
    (None, lambda t: t.pop("transformer.h.1.ln_2.bias"), "missing tensors transformer.h.1.ln_2.bias"),
    (None, _set("score.weight", lambda t: np.zeros((2, 32), np.float32)), "score.weight"),
    (None, _set("wpe.weight", lambda t: t["transformer.wpe.weight"]), "are the same tensor"),
    (None, _set("transformer.wpe.weight", lambda t: t["transformer.wpe.weight"][:10]), "has shape (10, 32)"),
    (lambda c: {**c, "vocab_size": c["vocab_size"] + 1}, None, "the tokenizer has 401 tokens"),
])
def test_weights_minitf_cannot_run_are_refused(tiny, tmp_path, config_edit, tensor_edit, message):
    directory = edited_copy(tiny[0], tmp_path, config_edit, tensor_edit)
    with pytest.raises(ValueError, match=None) as e:
        load_checkpoint(directory)
    assert message in str(e.value), str(e.value)


def test_tied_head_stored_untied_in_config_loads(tiny, tmp_path):
    directory = edited_copy(tiny[0], tmp_path, lambda c: {**c, "tie_word_embeddings": False},
                            _set("lm_head.weight", lambda t: t["transformer.wte.weight"].copy()))
    assert load_checkpoint(directory).config.vocab_size == 401


def test_a_deeply_nested_config_json_is_one_line(tmp_path):
    """Not a transformers directory (the JSON cannot be read), and not a checkpoint: one
    line, not a RecursionError."""
    from minitf import hf

    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert hf.is_hf_directory(tmp_path) is False
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


def test_damaged_or_unsafe_files_are_refused(tiny, tmp_path):
    directory = edited_copy(tiny[0], tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(directory)
    weights.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle file.*never reads"):
        load_checkpoint(directory)
    state = {k: v.to(torch.bfloat16) for k, v in tiny[1].state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="bfloat16"):
        load_checkpoint(directory)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json: not found"):
        load_checkpoint(directory)


# ---------------------------------------------------------------------------- export


class TransformersWarnings:
    """Collects every warning and every transformers log record at WARNING or above."""

    def __enter__(self):
        self.records = []
        self._handler = logging.Handler(logging.WARNING)
        self._handler.emit = self.records.append
        self._logger = logging.getLogger("transformers")
        self._logger.addHandler(self._handler)
        self._warnings = warnings.catch_warnings(record=True)
        self.warned = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        self._logger.removeHandler(self._handler)

    def messages(self):
        return [str(w.message) for w in self.warned] + [r.getMessage() for r in self.records]


def load_in_transformers(directory):
    """(model, tokenizer) from from_pretrained, asserting that transformers warned nothing."""
    transformers.logging.set_verbosity_warning()
    with TransformersWarnings() as caught:
        model = GPT2LMHeadModel.from_pretrained(directory).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
    assert caught.messages() == []
    return model, tokenizer


def run_convert(*args):
    """python -m minitf.convert in this process -> exit status."""
    try:
        return convert.main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def test_shipped_model_exported_gives_minitfs_greedy_text_in_transformers(tmp_path, capsys, text):
    out = tmp_path / "exported"
    assert run_convert("--to-hf", out) == 0
    with safetensors.safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"} and "transformer.h.0.attn.c_attn.weight" in f.keys()
    model, tokenizer = load_in_transformers(out)
    engine, minitf_tok, _ = load_engine(None, "numpy")
    ids = minitf_tok.encode(text[-3000:])[:128]
    assert tokenizer.encode(text[-3000:])[:128] == ids.tolist()
    assert_close(engine.prefill(ids), hf_logits(model, ids), "shipped model, 128 positions")
    prompt = "ROMEO:"
    ours = minitf_tok.decode(list(engine.generate(minitf_tok.encode(prompt), 100, greedy)))
    theirs, gap = hf_greedy(model, tokenizer.encode(prompt), 100)
    assert tokenizer.decode(theirs) == ours, f"smallest top-2 gap {gap:.1e}"


def test_import_convert_export_round_trip_gives_identical_logits(tiny, tmp_path, text, capsys):
    source, model = tiny
    ckpt_dir, export = tmp_path / "minitf", tmp_path / "exported"
    assert run_convert("--from-hf", source, "--out", ckpt_dir) == 0
    assert is_checkpoint(ckpt_dir)
    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.meta["converted_from"]["format"] == "transformers"
    assert ckpt.meta["command"].startswith("python -m minitf.convert --from-hf")
    assert run_convert("--to-hf", export, "--model", ckpt_dir) == 0
    back, tokenizer = load_in_transformers(export)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    ids = tokenizer.encode(text[:3000])[: TINY["n_positions"]]
    assert ids == GPT2Tokenizer.from_pretrained(source).encode(text[:3000])[: TINY["n_positions"]]
    assert np.array_equal(hf_logits(back, ids), hf_logits(model, ids))
    assert tokenizer.decode(ids) == text[: len(tokenizer.decode(ids))]
    assert tokenizer.eos_token == hf.END_OF_TEXT and back.config.eos_token_id == 400
    # converting again into the same checkpoint needs --replace; into a model convert did
    # not write, never; each refusal one line that leaves the directory as it was
    capsys.readouterr()
    before = (ckpt_dir / "model.safetensors").read_bytes()
    assert run_convert("--from-hf", source, "--out", ckpt_dir) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"python -m minitf.convert: error: --out {ckpt_dir} already holds a model "
                   f"converted from {source.resolve()}; choose another directory, or add "
                   f"--replace to replace it"), err
    assert (ckpt_dir / "model.safetensors").read_bytes() == before
    assert run_convert("--from-hf", source, "--out", ckpt_dir, "--replace") == 0
    assert load_checkpoint(ckpt_dir).meta["command"].endswith("--replace")
    shipped = {p.name: p.read_bytes() for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file()}
    assert run_convert("--from-hf", source, "--out", DEFAULT_MODEL_DIR, "--replace") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("holds a minitf model that convert did not write; choose another "
                        "directory (convert never overwrites one)") and "\n" not in err, err
    assert {p.name: p.read_bytes() for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file()} == shipped


def test_int8_export_refused_unless_dequantized(tmp_path, capsys, text):
    shipped = load_checkpoint(DEFAULT_MODEL_DIR)
    qparams, _ = quantize_model(shipped.params, shipped.config, "all")
    meta = {"quantization": {"scope": "all", "mode": "w8a8", "method": "test"}}
    int8_dir = tmp_path / "int8"
    save_checkpoint(int8_dir, qparams, shipped.config, shipped.tokenizer, meta=meta,
                    layout=checkpoint_layout(shipped.config, meta))
    capsys.readouterr()
    assert run_convert("--to-hf", tmp_path / "refused", "--model", int8_dir) == 2
    err = capsys.readouterr().err
    assert "int8 model" in err and "--dequantize" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    assert run_convert("--to-hf", tmp_path / "float", "--model", int8_dir, "--dequantize") == 0
    assert "dequantized 8 int8 weight tensors" in capsys.readouterr().err
    model, _ = load_in_transformers(tmp_path / "float")
    float_params = load_checkpoint(tmp_path / "float").params
    ids = shipped.tokenizer.encode(text[:500])[:128]
    assert_close(Engine(shipped.config, float_params, "numpy").prefill(ids), hf_logits(model, ids),
                 "dequantized export")


def test_export_never_replaces_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert run_convert("--to-hf", tmp_path) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_convert("--to-hf", empty) == 0
    assert sorted(os.listdir(empty)) == sorted(hf.EXPORT_FILES)


@pytest.mark.parametrize("args,message", [
    (["--from-hf", "x"], "--from-hf needs --out"),
    (["--to-hf", "x", "--out", "y"], "--out and --replace go with --from-hf"),
    (["--to-hf", "x", "--replace"], "--out and --replace go with --from-hf"),
    (["--from-hf", "x", "--out", "y", "--dequantize"], "go with --to-hf"),
    ([], "one of the arguments --from-hf --to-hf is required"),
])
def test_convert_cli_bad_arguments(capsys, args, message):
    assert run_convert(*args) == 2
    assert message in capsys.readouterr().err


def test_from_hf_refuses_a_minitf_checkpoint(tmp_path, capsys):
    assert run_convert("--from-hf", DEFAULT_MODEL_DIR, "--out", tmp_path / "x") == 2
    assert "not a transformers directory" in capsys.readouterr().err
