"""Corpus resolution and download (never for real), the 90/10 split, batches and eval windows."""

import hashlib
import io
import os
import subprocess
import sys
from urllib.error import URLError

import numpy as np
import pytest

from minitf import data
from minitf.data import (
    CORPUS_SHA256,
    CorpusError,
    TokenFile,
    batch_rows,
    eval_windows,
    get_batch,
    load_corpus,
    split_point,
    split_text,
    train_val_split,
)
from minitf.tokenizer import CharTokenizer

from conftest import REPO, SHARED_CORPUS

SHARED = SHARED_CORPUS.parent


@pytest.fixture(scope="module")
def corpus_bytes(corpus_path):
    return corpus_path.read_bytes()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download fails the test; tests that need urlopen replace it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download the corpus")

    monkeypatch.setattr(data, "urlopen", refuse)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """No MINITF_DATA, and a fresh cache directory: load_corpus() must download."""
    monkeypatch.delenv("MINITF_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "minitf" / "tinyshakespeare.txt"


def serve(monkeypatch, payload: bytes) -> list:
    """Make data.urlopen return `payload`; returns the list of URLs requested."""
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(data, "urlopen", fake_urlopen)
    return calls


# ---------------------------------------------------------------------------- corpus


def test_corpus_sha256_matches(corpus_bytes):
    digest = hashlib.sha256(corpus_bytes).hexdigest()
    assert digest == CORPUS_SHA256
    sums = SHARED / "SHA256SUMS"
    if sums.exists():
        assert sums.read_text().split()[0] == CORPUS_SHA256
    assert len(corpus_bytes) == data.CORPUS_BYTES


def test_load_corpus_explicit_path(corpus_path, corpus_bytes):
    text = load_corpus(corpus_path)
    assert len(text) == 1_115_394 and text.encode("utf-8") == corpus_bytes


def _pytest_without_corpus(tmp_path, **env):
    """test_load_corpus_explicit_path in a pytest of its own, $MINITF_DATA naming no file,
    outside CI unless `env` says otherwise; (the missing path, the finished process)."""
    nothing = tmp_path / "nothing.txt"
    env = {**{k: v for k, v in os.environ.items() if k not in ("CI", "MINITF_INSTALLED")},
           "MINITF_DATA": str(nothing), **env}
    test = f"{__file__}::test_load_corpus_explicit_path"
    return nothing, subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
         str(REPO / "pyproject.toml"), test], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300)


def test_a_missing_corpus_is_said_at_the_end_of_the_run(tmp_path):
    nothing, r = _pytest_without_corpus(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    line = f"1 test skipped: TinyShakespeare not found at {nothing}; set MINITF_DATA=/path/to/input.txt"
    assert line in r.stdout.splitlines(), r.stdout
    assert "1 skipped" in r.stdout.splitlines()[-1], r.stdout


def test_a_missing_corpus_fails_the_run_in_ci(tmp_path):
    nothing, r = _pytest_without_corpus(tmp_path, CI="true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"TinyShakespeare not found at {nothing}" in r.stdout and "1 error" in r.stdout, r.stdout


def test_load_corpus_env_var(tmp_path, monkeypatch):
    f = tmp_path / "my.txt"
    f.write_bytes(b"to be\r\nor not")  # kept byte-exact: no newline translation
    monkeypatch.setenv("MINITF_DATA", str(f))
    assert load_corpus() == "to be\r\nor not"
    assert load_corpus(f) == "to be\r\nor not"


def test_missing_path_says_how_to_provide_data(tmp_path, monkeypatch):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="MINITF_DATA") as e:
        load_corpus(missing)
    assert str(missing) in str(e.value)
    monkeypatch.setenv("MINITF_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match=r"nope\.txt \(from \$MINITF_DATA\)"):
        load_corpus()


def test_not_utf8(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("señor".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(f)


def test_download_good_hash_then_cached(empty_cache, monkeypatch, corpus_bytes):
    calls = serve(monkeypatch, corpus_bytes)
    text = load_corpus()
    assert calls == [data.CORPUS_URL]
    assert text.encode("utf-8") == corpus_bytes
    assert empty_cache.read_bytes() == corpus_bytes
    assert os.listdir(empty_cache.parent) == [empty_cache.name]  # no temp file left
    assert load_corpus() == text and len(calls) == 1  # second call reads the cache


def test_download_bad_hash_leaves_nothing(empty_cache, monkeypatch, corpus_bytes):
    tampered = corpus_bytes.replace(b"ROMEO", b"ROMEx", 1)
    serve(monkeypatch, tampered)
    with pytest.raises(CorpusError, match="SHA-256") as e:
        load_corpus()
    assert CORPUS_SHA256 in str(e.value) and "nothing was saved" in str(e.value)
    assert not empty_cache.exists()
    assert not empty_cache.parent.exists() or os.listdir(empty_cache.parent) == []


def test_download_network_error(empty_cache, monkeypatch):
    def offline(url, timeout=None):
        raise URLError("no route to host")

    monkeypatch.setattr(data, "urlopen", offline)
    with pytest.raises(CorpusError, match="MINITF_DATA"):
        load_corpus()
    assert not empty_cache.exists()


def test_corrupt_cache_is_reported(empty_cache):
    empty_cache.parent.mkdir(parents=True)
    empty_cache.write_bytes(b"half a corpus")
    with pytest.raises(CorpusError, match="delete the file"):
        load_corpus()


def test_cache_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.cache_path() == tmp_path / "minitf" / "tinyshakespeare.txt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_path() == tmp_path / ".cache" / "minitf" / "tinyshakespeare.txt"


# ---------------------------------------------------------------------------- split


def test_split_text_90_10(corpus_bytes):
    text = corpus_bytes.decode("utf-8")
    train, val = split_text(text)
    assert len(train) == int(0.9 * len(text)) == 1_003_854  # nanoGPT's split point
    assert train + val == text


def test_char_split_text_equals_split_tokens(corpus_bytes):
    text = corpus_bytes.decode("utf-8")
    tok = CharTokenizer.train(text)
    train_ids, val_ids = train_val_split(tok.encode(text))
    train, val = split_text(text)
    assert np.array_equal(train_ids, tok.encode(train)) and np.array_equal(val_ids, tok.encode(val))


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "0.1"])
def test_split_bad_fraction(bad):
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("abcdefghij", bad)


def test_split_point_allows_empty_parts():
    assert [split_point(n) for n in (0, 1, 9, 10, 11, 1_115_394)] == [0, 0, 8, 9, 9, 1_003_854]
    assert split_point(10, 0.25) == 7  # int(10 * 0.75)
    with pytest.raises(ValueError, match="val_fraction"):
        split_point(10, 1.0)


def test_split_too_short():
    with pytest.raises(ValueError, match="empty"):
        train_val_split(np.arange(1), 0.1)  # int(0.9) = 0 training tokens
    with pytest.raises(ValueError, match="empty"):
        split_text("abc", 1e-17)  # 1 - 1e-17 == 1.0: no validation text


# ---------------------------------------------------------------------------- batches


def test_get_batch_windows_come_from_the_split():
    N, B, T = 1000, 64, 16
    tokens = np.arange(N, dtype=np.int32)  # token value = its position: windows are legible
    x, y = get_batch(tokens, B, T, np.random.default_rng(0))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
    assert np.array_equal(y, x + 1)  # y is x shifted by one
    assert np.array_equal(np.diff(x, axis=1), np.ones((B, T - 1), dtype=np.int32))  # contiguous
    assert x.min() >= 0 and y.max() <= N - 1


def test_get_batch_real_tokens_shift(corpus_bytes):
    text = corpus_bytes.decode("utf-8")[:50_000]
    tokens = CharTokenizer.train(text).encode(text)
    x, y = get_batch(tokens, 8, 32, np.random.default_rng(1))
    assert np.array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        starts = np.flatnonzero(tokens[: len(tokens) - 32] == row_x[0])
        assert any(
            np.array_equal(tokens[s : s + 32], row_x) and np.array_equal(tokens[s + 1 : s + 33], row_y)
            for s in starts
        )


def test_get_batch_reaches_both_ends_and_is_seeded():
    tokens = np.arange(12, dtype=np.int32)
    T = 8  # starts 0..3 fit (window of 9 tokens)
    x, _ = get_batch(tokens, 400, T, np.random.default_rng(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2, 3}
    a = get_batch(tokens, 5, T, np.random.default_rng(7))
    b = get_batch(tokens, 5, T, np.random.default_rng(7))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_get_batch_exact_boundary_and_too_short():
    x, y = get_batch(np.arange(9), 3, 8, np.random.default_rng(0))  # exactly block_size + 1
    assert np.array_equal(x, np.tile(np.arange(8), (3, 1))) and np.array_equal(y, x + 1)
    with pytest.raises(ValueError, match=r"8 tokens, fewer than block_size \+ 1 = 9"):
        get_batch(np.arange(8), 3, 8, np.random.default_rng(0))


def test_get_batch_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="Generator"):
        get_batch(np.arange(100), 2, 4, 0)
    with pytest.raises(ValueError, match="batch_size"):
        get_batch(np.arange(100), 0, 4, rng)
    with pytest.raises(ValueError, match="1-D integer"):
        get_batch(np.zeros(100), 2, 4, rng)


# ---------------------------------------------------------------------------- eval windows


def test_eval_windows_default_non_overlapping():
    tokens = np.arange(100, dtype=np.int32)
    x, y = eval_windows(tokens, 16)
    assert x.shape == (6, 16)  # starts 0, 16, ..., 80: 80 + 17 <= 100; 96 would not fit
    assert np.array_equal(x[:, 0], np.arange(0, 96, 16)) and np.array_equal(y, x + 1)
    x2, y2 = eval_windows(tokens, 16)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)  # deterministic


def test_eval_windows_n_windows_and_stride():
    tokens = np.arange(100, dtype=np.int32)
    x, _ = eval_windows(tokens, 16, n_windows=5)
    assert x[:, 0].tolist() == [0, 21, 42, 62, 83]  # evenly spread, first and last start
    x, _ = eval_windows(tokens, 16, n_windows=1000)
    assert x.shape == (84, 16)  # capped at every possible start, no duplicates
    x, _ = eval_windows(tokens, 16, stride=40)
    assert x[:, 0].tolist() == [0, 40, 80]
    with pytest.raises(ValueError, match="not both"):
        eval_windows(tokens, 16, n_windows=2, stride=4)
    with pytest.raises(ValueError, match="block_size"):
        eval_windows(tokens[:10], 16)


# ---------------------------------------------------------------------------- token files


@pytest.fixture
def token_file(tmp_path):
    ids = np.random.default_rng(0).integers(0, 1000, size=5000).astype("<u2")  # (N,)
    ids.tofile(tmp_path / "t.bin")
    return ids, TokenFile(tmp_path / "t.bin", np.uint16, n_tokens=5000, vocab_size=1000)


def test_token_file_slices_are_the_file_s_ids(token_file):
    ids, tokens = token_file
    assert len(tokens) == 5000
    for a, b in [(0, 1), (0, 5000), (4000, 4017), (4999, 5000), (-20, None), (3, 3)]:
        got = tokens[a:b]
        assert got.dtype == np.int32 and np.array_equal(got, ids[a:b].astype(np.int32)), (a, b)
    assert np.array_equal(np.asarray(tokens), ids)
    with pytest.raises(TypeError, match="slices"):
        tokens[3]
    with pytest.raises(ValueError, match="step 1"):
        tokens[::2]


def test_get_batch_and_eval_windows_from_a_token_file_equal_the_array(token_file):
    ids, tokens = token_file
    for seed in range(3):
        a = get_batch(tokens, 16, 32, np.random.default_rng(seed))
        b = get_batch(ids, 16, 32, np.random.default_rng(seed))
        assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert all(np.array_equal(p, q) for p, q in zip(eval_windows(tokens, 64, n_windows=7), eval_windows(ids, 64, n_windows=7)))


def test_token_file_size_and_range_checks(tmp_path):
    np.arange(10, dtype="<u2").tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match=r"holds 10 uint16 ids \(20 bytes\), its record says 11"):
        TokenFile(tmp_path / "t.bin", np.uint16, n_tokens=11)
    assert len(TokenFile(tmp_path / "t.bin", np.uint32)) == 5  # the same 20 bytes
    (tmp_path / "odd.bin").write_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match="7 bytes is not a whole number of uint16 ids"):
        TokenFile(tmp_path / "odd.bin", np.uint16)
    with pytest.raises(ValueError, match="token id 9 at position 9 is not below the vocabulary size 9"):
        TokenFile(tmp_path / "t.bin", np.uint16, vocab_size=9)[5:10]
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        TokenFile(tmp_path / "nope.bin", np.uint16)


def test_ranks_rows_make_up_the_single_process_batch():
    tokens = np.arange(10_000, dtype=np.int32)
    for batch_size, world_size in [(8, 2), (7, 3), (2, 4)]:
        whole = get_batch(tokens, batch_size, 16, np.random.default_rng(5))
        parts = [get_batch(tokens, batch_size, 16, np.random.default_rng(5), rows=batch_rows(batch_size, r, world_size))
                 for r in range(world_size)]
        for i in range(2):  # x, then y
            assert np.array_equal(np.concatenate([part[i] for part in parts]), whole[i])
    assert [batch_rows(7, r, 3) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 7)]
    with pytest.raises(ValueError, match="rank=3"):
        batch_rows(8, 3, 3)


def test_a_token_file_replaced_on_disk_keeps_reading_the_open_one(tmp_path):
    np.arange(100, dtype="<u2").tofile(tmp_path / "t.bin")
    tokens = TokenFile(tmp_path / "t.bin", np.uint16)
    np.full(100, 7, dtype="<u2").tofile(tmp_path / "new.bin")
    os.replace(tmp_path / "new.bin", tmp_path / "t.bin")  # as prepare replaces a dataset
    assert np.array_equal(tokens[90:95], np.arange(90, 95))
    assert np.array_equal(TokenFile(tmp_path / "t.bin", np.uint16)[90:95], np.full(5, 7))
