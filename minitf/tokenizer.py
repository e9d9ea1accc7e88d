"""Tokenizers: character-level and byte-level BPE, saved as JSON beside the model.

Both kinds share one interface:

    tok.encode(text) -> np.ndarray int32 (T,)     exact: tok.decode(tok.encode(s)) == s
    tok.decode(ids) -> str
    tok.vocab_size -> int
    tok.decode_stream() -> StreamDecoder            incremental decoding for generation
    tok.save(path); load_tokenizer(path)            one `tokenizer.json`, never pickle

`CharTokenizer` knows the distinct characters of its training text and refuses others with a
`TokenizerError` that names them. `BPETokenizer` is GPT-2's byte-level BPE trained with the HF
`tokenizers` library: its alphabet holds all 256 bytes, so it encodes any string.

Train a tokenizer on the training split only (see `minitf.data.split_text`), so the
validation text never influences the vocabulary.

File format of `tokenizer.json` (always a JSON object with a "type" field):
    {"type": "char", "version": 1, "chars": ["\\n", " ", "!", ...]}   sorted, distinct
    {"type": "bpe", "version": 1, "tokenizer": {...}}   the HF `tokenizers` JSON, unchanged
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minitf.fileio import read_json, save_json_atomic

TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
KINDS = ("char", "bpe")


class TokenizerError(ValueError):
    """Text or token ids a tokenizer cannot handle, or a missing or damaged tokenizer file."""


# ----------------------------------------------------------------------------------------
# Shared by both kinds: id checks, streaming decode, save


class _Tokenizer:
    """What both tokenizers share; subclasses set `_token_bytes` (UTF-8 bytes of each id)."""

    kind: str
    _token_bytes: list[bytes]  # token id -> the bytes it stands for

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def _check_ids(self, ids) -> np.ndarray:
        """`ids` as a 1-D int64 array, every id in [0, vocab_size), else TokenizerError."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TokenizerError(
                f"token ids must be a 1-D sequence of integers, got shape {arr.shape} "
                f"dtype {arr.dtype}"
            )
        bad = np.flatnonzero((arr < 0) | (arr >= self.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise TokenizerError(
                f"cannot decode token id {int(arr[i])} at position {i} ({bad.size} bad ids in "
                f"all); this {self.kind} tokenizer's ids are 0..{self.vocab_size - 1}"
            )
        return arr.astype(np.int64, copy=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (a BPE token may be part of a UTF-8 char)."""
        return self._token_bytes[int(self._check_ids([token_id])[0])]

    def decode_stream(self) -> "StreamDecoder":
        """A decoder for ids that arrive one at a time, as in generation; see StreamDecoder."""
        return StreamDecoder(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as JSON to `path` (a directory means `path/tokenizer.json`).

        The write is atomic: a temporary file beside it, fsync, then rename.
        Returns the path written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        save_json_atomic(path, self._to_json())
        return path

    def _to_json(self) -> dict:
        raise NotImplementedError


class StreamDecoder:
    """Decode token ids one at a time, returning text as soon as it is complete.

    A byte-level BPE token can end in the middle of a multi-byte UTF-8 character; `push` then
    holds those bytes back and returns "" until the character is complete, so streaming never
    crashes and never prints a half character. The concatenation of every `push` result and
    `flush()` equals `tokenizer.decode(all_ids)`.

        stream = tok.decode_stream()
        for token_id in ids:
            print(stream.push(token_id), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: _Tokenizer):
        self._tokenizer = tokenizer
        # errors="replace" matches decode(): an invalid byte sequence becomes U+FFFD.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text it completes ("" while a character is partial)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return what is left (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------------------
# Character-level


class CharTokenizer(_Tokenizer):
    """One token per character; the vocabulary is the sorted distinct characters of a text.

    Ids follow the sorted order (Unicode code point), as in nanoGPT's shakespeare_char.
    """

    kind = "char"

    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise TokenizerError("a char tokenizer needs at least one character")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise TokenizerError(f"char tokenizer entry {c!r} is not a single character")
        if chars != sorted(set(chars)):
            raise TokenizerError("char tokenizer characters must be sorted and distinct")
        self.chars: list[str] = chars
        self._token_bytes = [c.encode("utf-8", errors="surrogatepass") for c in chars]
        # Encoding and decoding go through code points so both are vectorized numpy lookups.
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)  # (V,) sorted

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        """Vocabulary = the sorted distinct characters of `text`."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise TokenizerError("cannot train a char tokenizer on empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32 (T,). Raises TokenizerError naming unknown characters."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        cps = _codepoints(text)  # (T,) uint32
        ids = np.searchsorted(self._codepoints, cps)  # (T,) position in the sorted vocabulary
        ids = np.minimum(ids, self.vocab_size - 1)
        unknown = self._codepoints[ids] != cps
        if unknown.any():
            raise TokenizerError(self._unknown_message(text, np.flatnonzero(unknown)))
        return ids.astype(np.int32)

    def _unknown_message(self, text: str, positions: np.ndarray) -> str:
        seen: dict[str, None] = {}  # distinct, in order of first appearance
        for i in positions:
            seen.setdefault(text[i], None)
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in list(seen)[:10])
        more = f" and {len(seen) - 10} more" if len(seen) > 10 else ""
        known = repr("".join(self.chars))
        if len(known) > 200:
            known = known[:200] + "..."
        return (
            f"cannot encode characters {shown}{more} (first at position {int(positions[0])}); "
            f"this tokenizer knows {self.vocab_size} characters: {known}"
        )

    def decode(self, ids) -> str:
        """Text of token ids (any 1-D integer sequence). Raises TokenizerError on a bad id."""
        ids = self._check_ids(ids)
        cps = self._codepoints[ids]  # (T,) uint32
        return cps.astype("<u4").tobytes().decode("utf-32-le", errors="surrogatepass")

    def _to_json(self) -> dict:
        return {"type": "char", "version": FORMAT_VERSION, "chars": self.chars}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _codepoints(text: str) -> np.ndarray:
    """Code points of `text` as uint32 (T,); lone surrogates are kept, not rejected."""
    data = text.encode("utf-32-le", errors="surrogatepass")
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


# ----------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2's scheme, trained with HF `tokenizers`)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (openai/gpt-2 encoder.py).

    Byte-level BPE works on these stand-in characters; a token's string maps back to bytes.
    """
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, n = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


class BPETokenizer(_Tokenizer):
    """Byte-level BPE: every string encodes, and decoding gives it back exactly.

    The ByteLevel pre-tokenizer runs with `add_prefix_space=False` (GPT-2 would add a space
    in front of the text, which breaks the exact round trip) and no normalizer, so
    `decode(encode(s)) == s` for every string s.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer: Tokenizer):
        self._tk = hf_tokenizer
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)  # {token string: id}
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise TokenizerError("BPE vocabulary ids are not exactly 0..vocab_size-1")
        by_id = sorted(vocab, key=vocab.get)
        missing = [c for c in _BYTE_OF_CHAR if c not in vocab]
        if missing:
            raise TokenizerError(
                f"BPE vocabulary lacks {len(missing)} of the 256 byte tokens (e.g. {missing[0]!r}),"
                f" so some strings could not be encoded"
            )
        try:
            self._token_bytes = [bytes(_BYTE_OF_CHAR[c] for c in tok) for tok in by_id]
        except KeyError as e:
            raise TokenizerError(f"BPE token with a non-byte-level character {e.args[0]!r}")

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024) -> "BPETokenizer":
        """Train byte-level BPE on `text` to `vocab_size` tokens (256 bytes + merges).

        A short text may run out of pairs to merge and give fewer tokens: use `.vocab_size`,
        not the number asked for, to size the model.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise TokenizerError("cannot train a BPE tokenizer on empty text")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"BPE vocab_size={vocab_size!r} must be an integer >= 256 (bytes)")
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
            special_tokens=[],
            show_progress=False,
        )
        tk.train_from_iterator([text], trainer=trainer)
        return cls(tk)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32 (T,)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.array(self._tk.encode(text).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        """Text of token ids. Bytes that are not valid UTF-8 (a cut character) become U+FFFD."""
        ids = self._check_ids(ids)
        return self._tk.decode(ids.tolist(), skip_special_tokens=False)

    def _to_json(self) -> dict:
        return {"type": "bpe", "version": FORMAT_VERSION, "tokenizer": json.loads(self._tk.to_str())}

    @classmethod
    def _from_json(cls, d: dict) -> "BPETokenizer":
        inner = d.get("tokenizer")
        if not isinstance(inner, dict):
            raise TokenizerError('"tokenizer" must hold the HF tokenizers JSON object')
        # Only GPT-2-style byte-level BPE round-trips exactly; refuse anything else.
        model_type = (inner.get("model") or {}).get("type")
        if model_type != "BPE":
            raise TokenizerError(f"model type is {model_type!r}, expected 'BPE'")
        pre = inner.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") is not False:
            raise TokenizerError("pre_tokenizer must be ByteLevel with add_prefix_space=false")
        if (inner.get("decoder") or {}).get("type") != "ByteLevel":
            raise TokenizerError("decoder must be ByteLevel")
        if inner.get("normalizer") is not None or inner.get("post_processor") is not None:
            raise TokenizerError("a normalizer or post_processor would break exact round trips")
        try:
            tk = Tokenizer.from_str(json.dumps(inner))
        except Exception as e:  # the Rust side raises a bare Exception for any bad field
            raise TokenizerError(f"tokenizers library rejects it: {e}") from e
        return cls(tk)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------
# Entry points


def train_tokenizer(kind: str, text: str, vocab_size: int = 1024) -> CharTokenizer | BPETokenizer:
    """Train a tokenizer of `kind` ("char" or "bpe") on `text` (the training split).

    `vocab_size` applies to BPE only; a char vocabulary is fixed by the text.
    """
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size=vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; allowed: {', '.join(map(repr, KINDS))}")


def load_tokenizer(path: str | os.PathLike) -> CharTokenizer | BPETokenizer:
    """Load a tokenizer saved by `.save()`; `path` is the file or a directory holding it.

    Raises TokenizerError naming the path for a missing file, invalid JSON, an unknown type
    or version, or a damaged vocabulary. Only JSON is read: loading cannot run code.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    d = read_json(path, TokenizerError, "tokenizer file")
    if not isinstance(d, dict) or "type" not in d:
        raise TokenizerError(f'{path}: not a minitf tokenizer (no "type" field)')
    kind, version = d["type"], d.get("version")
    if kind not in KINDS:
        raise TokenizerError(f"{path}: unknown tokenizer type {kind!r}; allowed: {list(KINDS)}")
    if version != FORMAT_VERSION:
        raise TokenizerError(
            f"{path}: tokenizer format version {version!r}; this minitf reads {FORMAT_VERSION}"
        )
    try:
        if kind == "char":
            chars = d.get("chars")
            if not isinstance(chars, list):
                raise TokenizerError('"chars" must be a list of characters')
            return CharTokenizer(chars)
        return BPETokenizer._from_json(d)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: damaged {kind} tokenizer: {e}") from None
