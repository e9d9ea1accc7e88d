"""Checkpoints: bit-exact round trips, a clear CheckpointError for every kind of damage, and
atomic saves that survive a crash at any point."""

import json
import math
import os
import time
import warnings

import numpy as np
import pytest
import safetensors.numpy

from minitf.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_safetensors,
    save_checkpoint,
    save_json_atomic,
    save_safetensors_atomic,
)
from minitf.config import PRESETS, GPTConfig, param_shapes
from minitf.tokenizer import BPETokenizer, CharTokenizer, TokenizerError, load_tokenizer

CONFIG = PRESETS["tiny"]  # vocab 65, d_model 16, 2 layers


def make_params(config=CONFIG, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in param_shapes(config).items()}


def char_tokenizer():
    return CharTokenizer([chr(i) for i in range(32, 32 + CONFIG.vocab_size)])


def optimizer_state(params, step=7, rng=None):
    rng = rng or np.random.default_rng(1)
    return {
        "m": {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()},
        "v": {k: rng.random(p.shape).astype(np.float32) for k, p in params.items()},
        "step": step,
        "rng_state": rng.bit_generator.state,
        "lr": 3e-4,
    }


@pytest.fixture
def saved(tmp_path):
    """A complete checkpoint on disk, and what went into it."""
    params = make_params()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, params, CONFIG, char_tokenizer(), meta={"seed": 1337})
    return ckpt, params


def model_file(ckpt):
    return ckpt / "model.safetensors"


def rewrite_model(ckpt, tensors, dtype="float32"):
    """Replace model.safetensors with `tensors` written the legitimate way (valid checksum)."""
    save_safetensors_atomic(
        model_file(ckpt), tensors, {"format": "minitf", "format_version": "1", "dtype": dtype}
    )


def assert_error(ckpt, *fragments, **kwargs):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


# ---------------------------------------------------------------------------- round trips


def test_round_trip_bit_exact(tmp_path):
    params = make_params()
    rng = np.random.default_rng(5)
    rng.random(3)
    state = optimizer_state(params, rng=rng)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, params, CONFIG, char_tokenizer(), state, meta={"cmd": "train", "loss": np.float32(2.5)})
    ck = load_checkpoint(ckpt)
    assert list(ck.params) == list(param_shapes(CONFIG))  # the one canonical order
    for k, p in params.items():
        assert ck.params[k].dtype == np.float32 and np.array_equal(ck.params[k], p), k
    assert ck.config == CONFIG and ck.path == ckpt
    assert ck.tokenizer.chars == char_tokenizer().chars
    assert ck.meta == {"cmd": "train", "loss": 2.5}
    opt = ck.optimizer_state
    assert opt["step"] == 7 and opt["lr"] == 3e-4
    for k in params:
        assert np.array_equal(opt["m"][k], state["m"][k]) and np.array_equal(opt["v"][k], state["v"][k])
    resumed = np.random.default_rng()
    resumed.bit_generator.state = opt["rng_state"]
    assert np.array_equal(resumed.random(4), rng.random(4))  # RNG continues where it stopped


def test_repr_shows_sizes_not_arrays(tmp_path, saved):
    params = make_params()
    save_checkpoint(tmp_path / "opt", params, CONFIG, char_tokenizer(), optimizer_state(params, step=7))
    n = len(param_shapes(CONFIG))
    nbytes = 4 * sum(math.prod(shape) for shape in param_shapes(CONFIG).values())  # float32
    text = repr(load_checkpoint(tmp_path / "opt"))
    assert "array" not in text and "\n" not in text and len(text) < 1000, text
    assert f"config={CONFIG!r}" in text and "step=7" in text, text
    assert f"tensors={n}, bytes={nbytes} (" in text, text
    assert f"optimizer={2 * n} tensors, bytes={2 * nbytes} (" in text, text
    assert "tokenizer=CharTokenizer(65 tokens)" in text, text
    bare = repr(load_checkpoint(saved[0]))  # no optimizer state
    assert "step=None" in bare and "optimizer=None" in bare and "array" not in bare, bare


def test_files_on_disk(saved):
    ckpt, _ = saved
    assert sorted(os.listdir(ckpt)) == ["config.json", "meta.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt"]  # no temp or .old directory left
    assert json.loads((ckpt / "config.json").read_text()) == CONFIG.to_dict()
    tensors, meta = load_safetensors(model_file(ckpt))
    assert set(tensors) == set(param_shapes(CONFIG)) and "lm_head.weight" not in tensors
    assert meta["format"] == "minitf" and meta["format_version"] == "1" and meta["dtype"] == "float32"
    assert load_checkpoint(ckpt).optimizer_state is None


def test_float64_and_casting(tmp_path):
    params = make_params(dtype=np.float64)
    save_checkpoint(tmp_path / "c", params, CONFIG, char_tokenizer())
    as_stored = load_checkpoint(tmp_path / "c", dtype=None).params
    assert all(as_stored[k].dtype == np.float64 and np.array_equal(as_stored[k], params[k]) for k in params)
    cast = load_checkpoint(tmp_path / "c").params
    assert all(cast[k].dtype == np.float32 for k in params)


def test_bpe_tokenizer_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), size=rng.integers(2, 7))) for _ in range(300)]
    tok = BPETokenizer.train(" ".join(rng.choice(words, size=5000)), vocab_size=300)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, d_model=8)
    save_checkpoint(tmp_path / "c", make_params(config), config, tok)
    ck = load_checkpoint(tmp_path / "c")
    assert isinstance(ck.tokenizer, BPETokenizer)
    assert ck.tokenizer.encode("abc fed").tolist() == tok.encode("abc fed").tolist()


def test_overwrite_replaces_everything_and_keeps_extra_files(tmp_path):
    ckpt = tmp_path / "ckpt"
    params = make_params()
    save_checkpoint(ckpt, params, CONFIG, char_tokenizer(), optimizer_state(params), meta={"a": 1})
    (ckpt / "loss.png").write_bytes(b"png")
    new = make_params(seed=1)
    save_checkpoint(ckpt, new, CONFIG, char_tokenizer())
    ck = load_checkpoint(ckpt)
    assert np.array_equal(ck.params["wte"], new["wte"])
    assert ck.optimizer_state is None and ck.meta == {}  # stale optimizer/meta not kept
    assert (ckpt / "loss.png").read_bytes() == b"png"


# ---------------------------------------------------------------------------- damage


def test_missing_directory_and_files(tmp_path, saved):
    assert_error(tmp_path / "nowhere", "nowhere", "no checkpoint")
    ckpt, _ = saved
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        path = ckpt / name
        data = path.read_bytes()
        path.unlink()
        assert_error(ckpt, str(path), "not found")
        path.write_bytes(data)
    load_checkpoint(ckpt)


def test_truncated_model(saved):
    ckpt, _ = saved
    path = model_file(ckpt)
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 100, 5, 0):
        path.write_bytes(data[:cut])
        assert_error(ckpt, str(path), "truncated")


def test_load_safetensors_reads_what_the_safetensors_library_reads(tmp_path):
    """Every dtype numpy holds, empty and 0-d tensors too, equal to safetensors' own reader;
    and entries the format forbids (a gap, an overlap, bytes that do not match the shape,
    data after the last tensor) are refused naming the file."""
    rng = np.random.default_rng(0)
    tensors = {f"t.{dt}": (np.abs(rng.standard_normal((3, 5))) * 50).astype(dt)
               for dt in ("<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "<u8", "<u4", "<u2", "u1")}
    tensors |= {"mask": rng.random((2, 7)) > 0.5, "empty": np.zeros((0, 4), np.float32),
                "scalar": np.array(2.5, np.float32)}
    path = tmp_path / "all.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata={"k": "v"})
    got, metadata = load_safetensors(path)
    want = safetensors.numpy.load_file(str(path))
    assert metadata == {"k": "v"} and sorted(got) == sorted(want)
    for name, a in want.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
        np.testing.assert_array_equal(got[name], a, err_msg=name)

    def write(header: dict, data: bytes):
        raw = json.dumps(header).encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)

    entry = lambda begin, end: {"dtype": "F32", "shape": [2], "data_offsets": [begin, end]}  # noqa: E731
    for header, data, fragment in (
            ({"a": entry(0, 8), "b": entry(12, 20)}, bytes(20), "a gap or overlap"),
            ({"a": entry(0, 8), "b": entry(4, 12)}, bytes(12), "a gap or overlap"),
            ({"a": {**entry(0, 12), "shape": [2]}}, bytes(12), r"12 bytes for shape \[2\]"),
            ({"a": {**entry(0, 8), "dtype": "BF99"}}, bytes(8), "bad header entry"),
            ({"a": {**entry(0, 8), "shape": [-2]}}, bytes(8), "bad header entry"),
            ({"a": entry(0, 8)}, bytes(9), "1 bytes after the last tensor"),
            ({"a": entry(0, 8)}, bytes(7), "truncated")):
        write(header, data)
        with pytest.raises(CheckpointError, match=fragment) as e:
            load_safetensors(path)
        assert str(path) in str(e.value)


def test_header_length_beyond_the_format_limit(saved):
    """A length field claiming a header larger than safetensors allows is refused before
    that much is read, and such a directory is not taken for a checkpoint."""
    from minitf.checkpoint import MAX_HEADER_BYTES, is_checkpoint, read_safetensors_header

    ckpt, _ = saved
    path = model_file(ckpt)
    n = MAX_HEADER_BYTES + 1
    with open(path, "r+b") as f:  # a sparse file long enough to hold the claimed header
        f.write(n.to_bytes(8, "little"))
        f.truncate(8 + n)
    with pytest.raises(CheckpointError, match="more than the format's limit"):
        read_safetensors_header(path)
    assert_error(ckpt, str(path), "limit")
    assert not is_checkpoint(ckpt)


def test_flipped_bytes_in_header(saved):
    ckpt, _ = saved
    path = model_file(ckpt)
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].decode()
    for target in ('{"__metadata__"', '"F32"', '"shape":[16'):  # JSON syntax, dtype, shape
        damaged = bytearray(data)
        i = 8 + header.index(target) + 1
        damaged[i] ^= 0x5A
        path.write_bytes(bytes(damaged))
        assert_error(ckpt, str(path))


def test_flipped_byte_in_tensor_data(saved):
    ckpt, _ = saved
    path = model_file(ckpt)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a mantissa bit of the last tensor: still a finite float
    path.write_bytes(bytes(data))
    assert_error(ckpt, str(path), "SHA-256 checksum")


def test_missing_extra_wrong_shape_wrong_dtype_nan(saved):
    ckpt, params = saved
    path = str(model_file(ckpt))

    missing = {k: v for k, v in params.items() if k != "h.1.mlp.c_fc.bias"}
    rewrite_model(ckpt, missing)
    assert_error(ckpt, path, "missing tensors h.1.mlp.c_fc.bias")

    rewrite_model(ckpt, {**params, "lm_head.weight": params["wte"]})
    assert_error(ckpt, path, "unexpected tensors lm_head.weight")

    rewrite_model(ckpt, {**params, "wpe": params["wpe"][:-1]})
    assert_error(ckpt, path, "tensor wpe has shape (15, 16), expected (16, 16)")

    rewrite_model(ckpt, {**params, "ln_f.bias": params["ln_f.bias"].astype(np.int32)})
    assert_error(ckpt, path, "tensor ln_f.bias has dtype int32")

    rewrite_model(ckpt, {**params, "ln_f.bias": params["ln_f.bias"].astype(np.float64)})
    assert_error(ckpt, path, "mix dtypes")

    bad = params["h.0.attn.c_proj.weight"].copy()
    bad[3, 4] = np.nan
    bad[0, 0] = np.inf
    rewrite_model(ckpt, {**params, "h.0.attn.c_proj.weight": bad})
    assert_error(ckpt, path, "h.0.attn.c_proj.weight has 2 NaN/inf values")


def test_not_a_minitf_file(saved):
    ckpt, params = saved
    safetensors.numpy.save_file(params, str(model_file(ckpt)))  # no minitf metadata
    assert_error(ckpt, "not a minitf file")
    rewrite_model(ckpt, params)
    tensors, meta = load_safetensors(model_file(ckpt))
    meta["format_version"] = "2"
    safetensors.numpy.save_file(tensors, str(model_file(ckpt)), metadata=meta)
    assert_error(ckpt, "format_version '2'; this minitf reads 1")


def test_bad_config_and_tokenizer(saved):
    ckpt, _ = saved
    config_path = ckpt / "config.json"
    good = config_path.read_text()
    config_path.write_text(good[:-10])
    assert_error(ckpt, str(config_path), "invalid JSON")
    config_path.write_text(json.dumps({**CONFIG.to_dict(), "n_head": 3}))
    assert_error(ckpt, str(config_path), "invalid config", "not divisible")
    config_path.write_text(json.dumps({**CONFIG.to_dict(), "vocab_size": 66}))
    assert_error(ckpt, "tokenizer has 65 tokens", "vocab_size=66")
    config_path.write_text(good)

    tok_path = ckpt / "tokenizer.json"
    tok_path.write_text('{"type": "char", "version": 1, "chars": ["a", "a"]}')
    # the seal refuses it before it is parsed; parsed, it is a damaged tokenizer
    assert_error(ckpt, str(tok_path), "does not match the SHA-256")
    with pytest.raises(TokenizerError, match=f"{tok_path}.*damaged char tokenizer"):
        load_tokenizer(tok_path)


def test_damaged_optimizer_state(tmp_path):
    params = make_params()
    ckpt = tmp_path / "c"
    save_checkpoint(ckpt, params, CONFIG, char_tokenizer(), optimizer_state(params))
    (ckpt / "train_state.json").unlink()
    assert_error(ckpt, "train_state.json", "not found")
    opt = ckpt / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:-1])
    assert_error(ckpt, str(opt))


# ---------------------------------------------------------------------------- refused saves


def test_refuses_bad_params_and_writes_nothing(tmp_path):
    ckpt = tmp_path / "c"
    params = make_params()
    nan = {**params, "wte": params["wte"].copy()}
    nan["wte"][0, 0] = np.nan
    state = optimizer_state(params)
    del state["v"]["wpe"]
    cases = [
        (nan, {}, "tensor wte has 1 NaN/inf values"),
        ({k: v for k, v in params.items() if k != "wpe"}, {}, "missing tensors wpe"),
        ({**params, "extra": params["wpe"]}, {}, "unexpected tensors extra"),
        ({**params, "wpe": params["wpe"].T[:, :8]}, {}, "tensor wpe has shape"),
        (params, {"optimizer_state": state}, "missing tensors v.wpe"),
        (params, {"optimizer_state": {"m": {}, "v": {}}}, '"step"'),
        (params, {"meta": ["not", "a", "dict"]}, "meta must be a dict"),
    ]
    for p, kwargs, fragment in cases:
        with pytest.raises(CheckpointError, match="refusing to save") as e:
            save_checkpoint(ckpt, p, CONFIG, char_tokenizer(), **kwargs)
        assert fragment in str(e.value), str(e.value)
        assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="tokenizer has 3 tokens"):
        save_checkpoint(ckpt, params, CONFIG, CharTokenizer(["a", "b", "c"]))


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="not a minitf checkpoint"):
        save_checkpoint(precious, make_params(), CONFIG, char_tokenizer())
    assert os.listdir(precious) == ["thesis.tex"] and sorted(os.listdir(tmp_path)) == ["home"]


def test_meta_must_be_strict_json(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        save_checkpoint(tmp_path / "c", make_params(), CONFIG, char_tokenizer(), meta={"loss": float("nan")})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- atomicity


def test_crash_in_safetensors_writer_keeps_old_checkpoint(saved, monkeypatch):
    ckpt, params = saved

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the weights are being serialized

    monkeypatch.setattr(safetensors.numpy, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, make_params(seed=9), CONFIG, char_tokenizer())
    monkeypatch.undo()
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt"]  # the temporary directory is gone
    ck = load_checkpoint(ckpt)
    assert all(np.array_equal(ck.params[k], params[k]) for k in params)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a real save")
def test_kill_at_every_rename_leaves_a_loadable_checkpoint(tmp_path):
    """A child process saves and is killed (os._exit: no cleanup runs) just before its k-th
    rename, for every k; the checkpoint left behind must load as the old or the new one."""
    ckpt = tmp_path / "ckpt"
    old, new = make_params(seed=1), make_params(seed=2)
    tok = char_tokenizer()
    real_replace = os.replace
    calls = []

    def counting(src, dst):
        calls.append(src)
        real_replace(src, dst)

    save_checkpoint(ckpt, old, CONFIG, tok, optimizer_state(old))
    os.replace = counting
    try:
        save_checkpoint(ckpt, new, CONFIG, tok, optimizer_state(new))
    finally:
        os.replace = real_replace
    assert len(calls) == 7  # 5 files, DIR -> DIR.old, tmp -> DIR

    outcomes = set()
    for k in range(len(calls) + 1):
        save_checkpoint(ckpt, old, CONFIG, tok, optimizer_state(old))
        pid = os.fork()
        if pid == 0:  # child: die at the k-th rename, or finish if k is past the last one
            try:
                n = [0]

                def killer(src, dst):
                    if n[0] == k:
                        os._exit(0)
                    n[0] += 1
                    real_replace(src, dst)

                os.replace = killer
                save_checkpoint(ckpt, new, CONFIG, tok, optimizer_state(new))
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loading DIR.old warns; that is expected here
            ck = load_checkpoint(ckpt)
        version = next((p for p in (old, new) if np.array_equal(ck.params["wte"], p["wte"])), None)
        assert version is not None, f"killed before rename {k}: unknown weights"
        assert all(np.array_equal(ck.params[n], version[n]) for n in version)
        assert all(np.array_equal(ck.optimizer_state["m"][n], optimizer_state(version)["m"][n]) for n in version)
        outcomes.add("new" if version is new else "old")
    assert outcomes == {"old", "new"}
    save_checkpoint(ckpt, new, CONFIG, tok)  # a later save clears every leftover
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_crash_in_single_file_replace_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    save_json_atomic(path, {"step": 1})

    def crash(src, dst):
        raise OSError("simulated power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        save_json_atomic(path, {"step": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["state.json"]


def test_crash_between_directory_renames_recovers_the_newest(saved, monkeypatch):
    """A save that fails between its two renames leaves the old checkpoint under
    .DIR.minitf-old and the complete new one under .DIR.minitf-tmp; the next load restores
    the newest complete one to DIR, says so, and leaves nothing else behind."""
    ckpt, params = saved
    real_replace = os.replace

    def crash_on_swap_in(src, dst):
        if str(src).endswith(".minitf-tmp"):  # DIR is already renamed to DIR.old
            raise OSError("simulated crash between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_swap_in)
    new = make_params(seed=3)
    with pytest.raises(OSError, match="between the renames"):
        save_checkpoint(ckpt, new, CONFIG, char_tokenizer())
    monkeypatch.undo()
    assert not ckpt.exists() and (ckpt.parent / ".ckpt.minitf-old").is_dir()

    with pytest.warns(UserWarning, match="interrupted"):
        ck = load_checkpoint(ckpt)
    assert ck.path == ckpt and np.array_equal(ck.params["wte"], new["wte"])
    assert ck.meta == {}
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt"]

    save_checkpoint(ckpt, params, CONFIG, char_tokenizer())
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt"]
    assert np.array_equal(load_checkpoint(ckpt).params["wte"], params["wte"])


# ---------------------------------------------------------------------------- int8 hook


def test_layout_hook_for_quantized_tensors(tmp_path, saved):
    """An int8 checkpoint declares its own layout; the float layout rejects its tensors."""
    params = make_params()
    name = "h.0.mlp.c_fc.weight"
    w = params.pop(name)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)  # (4C,) per output channel
    params[name] = np.round(w / scale).astype(np.int8)
    params[name + ".scale"] = scale

    def layout(config, meta):
        shapes = {k: (s, None) for k, s in param_shapes(config).items()}
        for q in meta["quantized"]:
            shapes[q] = (shapes[q][0], np.int8)
            shapes[q + ".scale"] = ((shapes[q][0][1],), np.float32)
        return shapes

    ckpt = tmp_path / "q"
    meta = {"quantized": [name]}
    save_checkpoint(ckpt, params, CONFIG, char_tokenizer(), meta=meta, layout=layout(CONFIG, meta))
    ck = load_checkpoint(ckpt, layout=layout)
    assert ck.params[name].dtype == np.int8 and np.array_equal(ck.params[name], params[name])
    assert ck.params[name + ".scale"].dtype == np.float32
    assert_error(ckpt, "unexpected tensors h.0.mlp.c_fc.weight.scale")
    float_layout = {**layout(CONFIG, meta), name: ((16, 64), None)}  # int8 not declared
    with pytest.raises(CheckpointError, match="has dtype int8"):
        save_checkpoint(tmp_path / "r", params, CONFIG, char_tokenizer(), layout=float_layout)


# ---------------------------------------------------------------------------- recovery


def _version(path, seed, complete=True):
    """A checkpoint of make_params(seed) at `path`; incomplete: as a save that died while
    writing it leaves it (every file but the model, which is written last)."""
    save_checkpoint(path, make_params(seed=seed), CONFIG, char_tokenizer(), meta={"seed": seed})
    if not complete:
        (path / "model.safetensors").unlink()


@pytest.mark.parametrize("state, restored, message", [
    # what a crash can leave: (which of .DIR.minitf-tmp, DIR, .DIR.minitf-old hold which version)
    ({"tmp": (2, False), "dir": 1}, 1, "removed the unfinished checkpoint"),
    ({"tmp": (2, True), "dir": 1}, 2, "restored that checkpoint"),  # killed before DIR -> old
    ({"tmp": (2, True), "old": 1}, 2, "restored that checkpoint"),  # between the renames
    ({"old": 1}, 1, "restored the previous checkpoint"),  # an earlier minitf deleted tmp
    ({"dir": 2, "old": 1}, 2, None),  # killed while deleting old
    ({"dir": 2, "old": (1, False)}, 2, None),  # ... half way through
    ({"tmp": (2, False), "old": 1}, 1, "restored the previous checkpoint"),
])
def test_recovery_restores_the_newest_complete_checkpoint(tmp_path, state, restored, message):
    ckpt = tmp_path / "ckpt"
    names = {"tmp": tmp_path / ".ckpt.minitf-tmp", "dir": ckpt, "old": tmp_path / ".ckpt.minitf-old"}
    for where, version in state.items():
        seed, complete = version if isinstance(version, tuple) else (version, True)
        _version(tmp_path / "making", seed, complete)
        os.rename(tmp_path / "making", names[where])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = load_checkpoint(ckpt)
    said = [str(w.message) for w in caught]
    assert np.array_equal(ck.params["wte"], make_params(seed=restored)["wte"]) and ck.path == ckpt
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # every leftover resolved, no lock left
    if message is None:
        assert said == []
    else:
        assert any(message in m for m in said) and all("\n" not in m for m in said), said


def test_recovery_without_the_lock_changes_nothing(tmp_path):
    """While another process writes DIR (it holds the lock), a reader never moves its
    files: between the renames it reads the previous checkpoint where it is."""
    from minitf.rundir import DirectoryLock

    _version(tmp_path / "making", 1)
    os.rename(tmp_path / "making", tmp_path / ".ckpt.minitf-old")
    pid = os.fork() if hasattr(os, "fork") else pytest.skip("needs os.fork")
    if pid == 0:  # the writer: holds the lock until the reader is done
        DirectoryLock(tmp_path / "ckpt").acquire()
        (tmp_path / "locked").touch()
        while not (tmp_path / "done").exists():
            time.sleep(0.01)
        os._exit(0)
    while not (tmp_path / "locked").exists():
        time.sleep(0.01)
    try:
        with pytest.warns(UserWarning, match="another process is saving it"):
            ck = load_checkpoint(tmp_path / "ckpt")
        assert ck.path.name == ".ckpt.minitf-old"
        assert np.array_equal(ck.params["wte"], make_params(seed=1)["wte"])
        assert (tmp_path / ".ckpt.minitf-old").is_dir() and not (tmp_path / "ckpt").exists()
    finally:
        (tmp_path / "done").touch()
        os.waitpid(pid, 0)


# ---------------------------------------------------------------------------- the seal


def test_the_seal_lists_every_file_the_save_wrote(tmp_path):
    from minitf.checkpoint import file_sha256, read_safetensors_header

    params = make_params()
    ckpt = tmp_path / "c"
    save_checkpoint(ckpt, params, CONFIG, char_tokenizer(), optimizer_state(params), meta={"a": 1},
                    extra=lambda d: (d / "report.txt").write_text("a report"))
    (ckpt / "notes.txt").write_text("mine")  # a user's file: carried over, never sealed
    save_checkpoint(ckpt, params, CONFIG, char_tokenizer(), optimizer_state(params), meta={"a": 2})
    seal = json.loads(read_safetensors_header(ckpt / "model.safetensors")["__metadata__"]["files"])
    assert sorted(seal) == ["config.json", "meta.json", "optimizer.safetensors", "report.txt",
                            "tokenizer.json", "train_state.json"]
    assert all(seal[name] == file_sha256(ckpt / name) for name in seal)
    (ckpt / "notes.txt").write_text("changed: not minitf's business")
    load_checkpoint(ckpt)
    (ckpt / "report.txt").write_text("changed")
    assert_error(ckpt, str(ckpt / "report.txt"), "does not match the SHA-256")


def test_a_checkpoint_from_before_the_seal_still_loads_and_is_sealed_by_the_next_save(tmp_path):
    """Written the way minitf wrote checkpoints before the seal: model metadata without
    "files"; it loads as before (its tensor checksum checked), and a save seals it."""
    ckpt = tmp_path / "old"
    params = make_params()
    save_checkpoint(ckpt, params, CONFIG, char_tokenizer(), meta={"seed": 1})
    rewrite_model(ckpt, params)  # metadata without the seal
    (ckpt / "meta.json").write_text('{"seed": 2}')  # unsealed: not checked
    ck = load_checkpoint(ckpt)
    assert ck.meta == {"seed": 2} and np.array_equal(ck.params["wte"], params["wte"])
    save_checkpoint(ckpt, ck.params, ck.config, ck.tokenizer, meta=ck.meta)
    (ckpt / "meta.json").write_text('{"seed": 3}')
    assert_error(ckpt, "meta.json", "does not match the SHA-256")


def test_the_shipped_model_is_sealed():
    from minitf.checkpoint import file_sha256, read_safetensors_header
    from minitf.engine import DEFAULT_MODEL_DIR

    meta = read_safetensors_header(DEFAULT_MODEL_DIR / "model.safetensors")["__metadata__"]
    seal = json.loads(meta["files"])
    assert sorted(seal) == ["config.json", "meta.json", "tokenizer.json"]
    assert all(seal[name] == file_sha256(DEFAULT_MODEL_DIR / name) for name in seal)
