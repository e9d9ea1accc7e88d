"""Tokenizers: exact round trips, clear errors, streaming decode, JSON save/load."""

import json
import os

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from minitf.data import split_text
from minitf.engine import DEFAULT_MODEL_DIR
from minitf.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    TokenizerError,
    load_tokenizer,
    train_tokenizer,
)

@pytest.fixture(scope="module")
def text(corpus_path):
    return corpus_path.read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def char_tok(text):
    return train_tokenizer("char", split_text(text)[0])


@pytest.fixture(scope="module")
def bpe_tok(text):
    # A slice keeps training well under a second; 512 tokens still exercises merges.
    return train_tokenizer("bpe", text[:200_000], vocab_size=512)


# ---------------------------------------------------------------------------- char


def test_char_round_trip_full_corpus(text, char_tok):
    ids = char_tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert char_tok.vocab_size == 65  # TinyShakespeare's characters, all in the train split
    assert char_tok.decode(ids) == text


def test_char_ids_follow_sorted_characters(char_tok):
    assert char_tok.chars == sorted(char_tok.chars)
    assert char_tok.encode("\n ").tolist() == [0, 1]  # '\n' < ' ' < everything else
    assert char_tok.decode([char_tok.chars.index("z")]) == "z"


def test_char_unknown_characters_are_named(char_tok):
    with pytest.raises(TokenizerError) as e:
        char_tok.encode("Thou art €5 señor, € again")
    msg = str(e.value)
    for part in ("'€' (U+20AC)", "'ñ' (U+00F1)", "'5' (U+0035)", "position 9", "65 characters"):
        assert part in msg, msg
    assert msg.count("U+20AC") == 1  # each character named once


def test_text_that_is_not_utf8_is_named_by_every_tokenizer(char_tok, bpe_tok):
    """Bytes that are not UTF-8 reach Python as lone surrogates (os.fsdecode of argv, a file
    read with surrogateescape); both kinds refuse them naming the byte, never a traceback
    from the tokenizers library."""
    text = os.fsdecode(b"Thou art \xff")  # 'Thou art \udcff'
    for tok in (char_tok, bpe_tok):
        with pytest.raises(TokenizerError, match=r"U\+DCFF \(the byte 0xFF, which is not UTF-8\)"):
            tok.encode(text)
    assert bpe_tok.decode(bpe_tok.encode("Thou art ÿ")) == "Thou art ÿ"  # the character is fine


def test_char_empty_and_types(char_tok):
    assert char_tok.encode("").dtype == np.int32 and char_tok.encode("").size == 0
    assert char_tok.decode([]) == ""
    with pytest.raises(TypeError):
        char_tok.encode(b"bytes")
    with pytest.raises(TokenizerError):
        CharTokenizer.train("")


def test_decode_bad_ids(char_tok, bpe_tok):
    for tok in (char_tok, bpe_tok):
        V = tok.vocab_size
        cases = [
            ([1, 2, V], f"token id {V} at position 2"),
            (np.array([-1]), "token id -1 at position 0"),
            ([[1, 2]], "1-D"),
            ([1.0], "integers"),
        ]
        for ids, fragment in cases:
            with pytest.raises(TokenizerError) as e:
                tok.decode(ids)
            assert fragment in str(e.value), str(e.value)
        assert f"0..{V - 1}" in str(pytest.raises(TokenizerError, tok.decode, [V]).value)


def test_char_tokenizer_rejects_bad_vocabulary():
    for chars in (["a", "a"], ["b", "a"], ["ab"], [], [1]):
        with pytest.raises(TokenizerError):
            CharTokenizer(chars)


# ---------------------------------------------------------------------------- BPE


def test_bpe_round_trip_unseen_slice(text, bpe_tok):
    held_out = text[500_000:600_000]  # not in the training slice
    ids = bpe_tok.encode(held_out)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.min() >= 0 and ids.max() < bpe_tok.vocab_size
    assert len(ids) < 0.6 * len(held_out)  # merges compress English well beyond bytes
    assert bpe_tok.decode(ids) == held_out


def test_bpe_vocab_size_and_determinism(text, bpe_tok):
    assert bpe_tok.vocab_size == 512
    again = BPETokenizer.train(text[:200_000], vocab_size=512)
    assert again.encode(text[:5000]).tolist() == bpe_tok.encode(text[:5000]).tolist()


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_encodes_any_text_exactly(bpe_tok, s):
    assert bpe_tok.decode(bpe_tok.encode(s)) == s


def test_bpe_round_trip_whitespace_and_unicode(bpe_tok):
    for s in ["", " leading", "trailing  ", "\n\n  \t\r\n", "naïve 日本語 😀 €", "\x00\x7f"]:
        assert bpe_tok.decode(bpe_tok.encode(s)) == s, repr(s)


def test_bpe_bad_vocab_size():
    with pytest.raises(ValueError, match="256"):
        BPETokenizer.train("some text", vocab_size=100)


def test_train_tokenizer_bad_kind():
    with pytest.raises(ValueError, match="'word'.*'char', 'bpe'"):
        train_tokenizer("word", "text")


# ---------------------------------------------------------------------------- streaming


def test_stream_holds_back_partial_utf8(bpe_tok):
    s = "a😀b"  # 4-byte character: byte-level tokens split it
    ids = bpe_tok.encode(s)
    stream = bpe_tok.decode_stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == s
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # at least one push completed no character


def test_stream_equals_decode_for_random_ids(char_tok, bpe_tok):
    rng = np.random.default_rng(0)
    for tok in (char_tok, bpe_tok):
        for _ in range(300):
            ids = rng.integers(0, tok.vocab_size, size=rng.integers(0, 30))
            stream = tok.decode_stream()
            streamed = "".join(stream.push(i) for i in ids) + stream.flush()
            assert streamed == tok.decode(ids), ids  # includes invalid byte sequences
    with pytest.raises(TokenizerError):
        bpe_tok.decode_stream().push(bpe_tok.vocab_size)


# ---------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path, text, char_tok, bpe_tok):
    sample = text[:3000]
    for tok in (char_tok, bpe_tok):
        path = tok.save(tmp_path / f"{tok.kind}.json")
        assert "type" not in json.loads(path.read_text())  # a plain tokenizers file
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
        assert loaded.encode(sample).tolist() == tok.encode(sample).tolist()
    assert sorted(os.listdir(tmp_path)) == ["bpe.json", "char.json"]  # no temp files left


def test_save_into_directory(tmp_path, char_tok):
    assert char_tok.save(tmp_path) == tmp_path / "tokenizer.json"
    assert load_tokenizer(tmp_path).chars == char_tok.chars


def test_save_is_atomic(tmp_path, monkeypatch, char_tok):
    path = char_tok.save(tmp_path / "tokenizer.json")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        CharTokenizer(["a", "b"]).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["tokenizer.json"]


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_load_errors_name_the_file(tmp_path, bpe_tok):
    cases = {
        "missing.json": (None, "not found"),
        "bad.json": ("{not json", "invalid JSON"),
        "list.json": ([1, 2], 'no "type"'),
        "kind.json": ({"type": "wordpiece", "version": 1}, "unknown tokenizer type 'wordpiece'"),
        "version.json": ({"type": "char", "version": 9, "chars": ["a"]}, "version 9"),
        "dup.json": ({"type": "char", "version": 1, "chars": ["a", "a"]}, "sorted and distinct"),
        "multi.json": ({"type": "char", "version": 1, "chars": ["ab"]}, "not a single character"),
        "nochars.json": ({"type": "char", "version": 1}, '"chars" must be a list'),
    }
    bpe = json.loads(bpe_tok.to_tokenizers().to_str())
    no_byte = json.loads(json.dumps(bpe))
    del no_byte["model"]["vocab"]["Ġ"]  # the space byte
    cases["nobyte.json"] = (no_byte, "byte")
    prefix = json.loads(json.dumps(bpe))
    prefix["pre_tokenizer"]["add_prefix_space"] = True
    cases["prefix.json"] = (prefix, "add_prefix_space")
    garbage = json.loads(json.dumps(bpe))
    garbage["model"]["merges"] = "not merges"
    cases["garbage.json"] = (garbage, "tokenizers library rejects")
    adds = json.loads(json.dumps(bpe))
    adds["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "!", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [], "special_tokens": {"!": {"id": "!", "ids": [0], "tokens": ["!"]}}}
    cases["adds.json"] = (adds, "adds tokens")
    legacy = {"type": "bpe", "version": 1, "tokenizer": prefix}
    cases["legacy_prefix.json"] = (legacy, "damaged bpe tokenizer: pre_tokenizer")
    char = json.loads(CharTokenizer(["a", "b"]).to_tokenizers().to_str())
    merges = json.loads(json.dumps(char))
    merges["model"]["merges"] = [["a", "b"]]
    merges["model"]["vocab"]["ab"] = 2
    cases["char_merges.json"] = (merges, "no merges")
    order = json.loads(json.dumps(char))
    order["model"]["vocab"] = {"b": 0, "a": 1}
    cases["char_order.json"] = (order, "sorted and distinct")
    split = json.loads(json.dumps(char))
    split["pre_tokenizer"] = {"type": "Whitespace"}
    cases["char_split.json"] = (split, "isolates every character")
    wordpiece = json.loads(json.dumps(char))
    wordpiece["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    cases["wordpiece.json"] = (wordpiece, "not a tokenizer minitf runs")
    for name, (content, fragment) in cases.items():
        path = tmp_path / name
        if content is not None:
            _write(path, content)
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(path)
        assert str(path) in str(e.value) and fragment in str(e.value), str(e.value)


# ---------------------------------------------------------------------------- tokenizers files


def test_shipped_tokenizer_is_a_plain_tokenizers_file(text):
    """The HF library reads the shipped file and gives minitf's ids, and back the exact text."""
    path = DEFAULT_MODEL_DIR / "tokenizer.json"
    hf = tokenizers.Tokenizer.from_file(str(path))
    ours = load_tokenizer(path)
    sample = text[:20_000]
    ids = hf.encode(sample).ids
    assert ids == ours.encode(sample).tolist()
    assert hf.decode(ids) == sample == ours.decode(ids)


def test_char_file_round_trips_every_character_in_tokenizers(tmp_path):
    """Newline, space, tab, carriage return, combining marks, astral characters: each is one
    token in both libraries, and decoding concatenates them exactly."""
    chars = sorted(set("\n \t\r\x00\x0b\u00a0\u2028e\u0301\u00e9😀日本語ab,.'"))
    tok = CharTokenizer(chars)
    hf = tokenizers.Tokenizer.from_file(str(tok.save(tmp_path)))
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = "".join(rng.choice(chars, size=rng.integers(0, 40)))
        ids = tok.encode(s).tolist()
        assert hf.encode(s).ids == ids, repr(s)
        assert len(ids) == len(s) and hf.decode(ids) == s == tok.decode(ids), repr(s)
    with pytest.raises(TokenizerError, match=r"'z' \(U\+007A\)"):
        load_tokenizer(tmp_path).encode("abz")  # tokenizers would drop it; minitf names it


def test_earlier_minitf_files_still_load(tmp_path, text, char_tok, bpe_tok):
    char_file = _write(tmp_path / "char.json", {"type": "char", "version": 1, "chars": char_tok.chars})
    bpe_file = _write(tmp_path / "bpe.json", {"type": "bpe", "version": 1,
                                              "tokenizer": json.loads(bpe_tok.to_tokenizers().to_str())})
    sample = text[:3000]
    for tok, path in ((char_tok, char_file), (bpe_tok, bpe_file)):
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tok) and loaded.encode(sample).tolist() == tok.encode(sample).tolist()


def test_lone_surrogate_cannot_be_saved(tmp_path):
    with pytest.raises(TokenizerError, match="U\\+D800"):
        CharTokenizer(["a", "\ud800"]).save(tmp_path)
