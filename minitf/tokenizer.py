"""Tokenizers: character-level and byte-level BPE, saved as JSON beside the model.

Both kinds share one interface:

    tok.encode(text) -> np.ndarray int32 (T,)     exact: tok.decode(tok.encode(s)) == s
    tok.decode(ids) -> str
    tok.vocab_size -> int
    tok.decode_stream() -> StreamDecoder            incremental decoding for generation
    tok.save(path); load_tokenizer(path)            one `tokenizer.json`, never pickle
    tok.to_tokenizers() -> tokenizers.Tokenizer     the same tokenizer in the HF library
    tok.special_tokens() -> {content: id}           GPT-2's <|endoftext|>, if it has one

`CharTokenizer` knows the distinct characters of its training text and refuses others with a
`TokenizerError` that names them. `BPETokenizer` is GPT-2's byte-level BPE trained with the HF
`tokenizers` library: its alphabet holds all 256 bytes, so it encodes any string.

Train a tokenizer on the training split only (see `minitf.data.split_text`), so the
validation text never influences the vocabulary.

File format: `tokenizer.json` is a plain HF `tokenizers` file, what `Tokenizer.to_str()`
writes, so `tokenizers.Tokenizer.from_file` (and transformers' `PreTrainedTokenizerFast`) load
it and give the same ids. Its structure says which kind it is:

    char  model BPE over single characters, ids in code-point order, no merges; pre_tokenizer
          Split on the regex [\\s\\S], behavior Isolated (every character is a word, newline
          included); decoder Fuse (the tokens concatenated); no normalizer, post_processor
          or added tokens.
    bpe   model BPE; pre_tokenizer ByteLevel with add_prefix_space=false; decoder ByteLevel;
          no normalizer; a post_processor only if it adds no tokens (ByteLevel, or a
          TemplateProcessing of the sequence alone). The tokenizer.json of GPT-2 on the HF
          hub is one, its special token <|endoftext|> included.

minitf keeps no field of its own, neither in the file nor beside it: the kind is read from
the structure above, the format version is the `tokenizers` one ("version": "1.0"). So a
tokenizer.json written by transformers loads exactly like one written by minitf, and no
second file can disagree with the first. One difference is by design: a character outside the
vocabulary is dropped silently by `tokenizers` and refused by minitf's `encode`, with a
TokenizerError that names it.

The format of earlier minitf versions, `{"type": "char" | "bpe", "version": 1, ...}`, still
loads; `save` writes the new one.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from minitf.config import MAX_BPE_VOCAB_SIZE
from minitf.fileio import read_json, save_json_atomic


TOKENIZER_FILE = "tokenizer.json"
LEGACY_FORMAT_VERSION = 1  # the {"type": ..., "version": 1} files of earlier minitf
KINDS = ("char", "bpe")
# The char tokenizer's pre-tokenizer: every character is its own word. [\s\S] because "."
# skips a newline in the regex dialect of `tokenizers` (Oniguruma).
CHAR_SPLIT_PATTERN = r"[\s\S]"


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

    def special_tokens(self) -> dict[str, int]:
        """{content: id} of the special tokens (GPT-2's <|endoftext|>); {} for the char kind."""
        return {}

    def decode_stream(self) -> "StreamDecoder":
        """A decoder for ids that arrive one at a time, as in generation; see StreamDecoder."""
        return StreamDecoder(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as a `tokenizers` JSON file to `path` (a directory means
        `path/tokenizer.json`); the module docstring describes the format.

        The write is atomic: a temporary file beside it, fsync, then rename.
        Returns the path written.
        """
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        save_json_atomic(path, json.loads(self.to_tokenizers().to_str()))
        return path

    def to_tokenizers(self) -> Tokenizer:
        """This tokenizer as a `tokenizers.Tokenizer` that gives the same ids (a new object)."""
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
        shown = ", ".join(_describe(c) for c in list(seen)[:10])
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

    def to_tokenizers(self) -> Tokenizer:
        """A `tokenizers` BPE without merges over these characters (module docstring).

        Raises TokenizerError for a lone surrogate character, which `tokenizers` cannot hold.
        """
        surrogates = [c for c in self.chars if 0xD800 <= ord(c) <= 0xDFFF]
        if surrogates:
            raise TokenizerError(f"character U+{ord(surrogates[0]):04X} is a lone surrogate, "
                                 "which a tokenizers file cannot hold")
        tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(self.chars)}, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_SPLIT_PATTERN), behavior="isolated")
        tk.decoder = decoders.Fuse()
        return tk

    @classmethod
    def _from_tokenizers_json(cls, d: dict) -> "CharTokenizer":
        """The char kind from a `tokenizers` JSON that the library accepts; refuses any other
        structure."""
        model = d.get("model") or {}
        if model.get("type") != "BPE" or model.get("merges") != []:
            raise TokenizerError("a char tokenizer is a BPE model with no merges")
        pre = d.get("pre_tokenizer")
        if pre is not None and not (pre.get("type") == "Split" and pre.get("behavior") == "Isolated"
                                    and pre.get("pattern") == {"Regex": CHAR_SPLIT_PATTERN}):
            raise TokenizerError(f"a char tokenizer's pre_tokenizer isolates every character "
                                 f"(Split on {CHAR_SPLIT_PATTERN}, behavior Isolated)")
        if d.get("normalizer") is not None or d.get("post_processor") is not None or d.get("added_tokens"):
            raise TokenizerError("a char tokenizer has no normalizer, post_processor or added tokens")
        vocab = model["vocab"]  # {character: id}, types checked by tokenizers
        chars = sorted(vocab, key=vocab.get)
        if [vocab[c] for c in chars] != list(range(len(chars))):
            raise TokenizerError("char vocabulary ids are not exactly 0..vocab_size-1")
        return cls(chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _describe(c: str) -> str:
    """A character for a message: "'é' (U+00E9)"; a lone surrogate that stands for a byte
    which was not UTF-8 (Python's surrogateescape: the command line, file names) says so."""
    if 0xDC80 <= ord(c) <= 0xDCFF:
        return f"U+{ord(c):04X} (the byte 0x{ord(c) - 0xDC00:02X}, which is not UTF-8)"
    return f"{c!r} (U+{ord(c):04X})"


def check_unicode(text: str) -> None:
    """TokenizerError unless `text` is valid Unicode (no lone surrogates, which UTF-8 and
    `tokenizers` cannot hold: they come from bytes that were not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"cannot encode {_describe(text[e.start])} at position {e.start}: "
                             f"the text is not valid UTF-8; give UTF-8 text") from None


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
        if (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                or not 256 <= vocab_size <= MAX_BPE_VOCAB_SIZE):
            raise ValueError(f"BPE vocab_size={vocab_size!r} must be an integer in [256 (the bytes), "
                             f"{MAX_BPE_VOCAB_SIZE}]")
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
        """Token ids of `text`, int32 (T,). Raises TokenizerError for text that is not valid
        Unicode (a lone surrogate: bytes that were not UTF-8)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_unicode(text)
        return np.array(self._tk.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        """Text of token ids. Bytes that are not valid UTF-8 (a cut character) become U+FFFD."""
        ids = self._check_ids(ids)
        return self._tk.decode(ids.tolist(), skip_special_tokens=False)

    def to_tokenizers(self) -> Tokenizer:
        return Tokenizer.from_str(self._tk.to_str())

    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def _from_tokenizers_json(cls, d: dict, tk: Tokenizer) -> "BPETokenizer":
        """The bpe kind from a `tokenizers` JSON `d` that the library accepts (as `tk`);
        refuses what breaks exact round trips."""
        model_type = (d.get("model") or {}).get("type")
        if model_type != "BPE":
            raise TokenizerError(f"model type is {model_type!r}, expected 'BPE'")
        pre = d.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") is not False:
            raise TokenizerError("pre_tokenizer must be ByteLevel with add_prefix_space=false")
        if (d.get("decoder") or {}).get("type") != "ByteLevel":
            raise TokenizerError("decoder must be ByteLevel")
        if d.get("normalizer") is not None:
            raise TokenizerError("a normalizer would break exact round trips")
        if not _adds_no_tokens(d.get("post_processor")):
            raise TokenizerError("a post_processor that adds tokens would break exact round trips")
        return cls(tk)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _adds_no_tokens(post_processor) -> bool:
    """True for no post-processor, ByteLevel (it only trims offsets), or a TemplateProcessing
    whose single-sequence template is the sequence alone (what transformers writes for GPT-2)."""
    if post_processor is None or post_processor.get("type") == "ByteLevel":
        return True
    return (post_processor.get("type") == "TemplateProcessing"
            and [list(piece) for piece in post_processor.get("single", [])] == [["Sequence"]])


def _tokenizers_from_json(d: dict) -> Tokenizer:
    try:
        return Tokenizer.from_str(json.dumps(d))
    except BaseException as e:  # a bare Exception for a bad field; a Rust panic is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"tokenizers library rejects it: {message}") from None


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
    """Load a tokenizer: a `tokenizers` JSON file (what `.save()` writes, or the tokenizer.json
    of a transformers GPT-2), or minitf's earlier format; `path` is the file or its directory.

    Raises TokenizerError naming the path for a missing file, invalid JSON, a structure minitf
    does not run (module docstring), an unknown earlier type or version, or a damaged
    vocabulary. Only JSON is read: loading cannot run code.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    d = read_json(path, TokenizerError, "tokenizer file")
    if isinstance(d, dict) and "model" in d and "type" not in d:
        try:
            return _from_tokenizers_json(d)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None
    return _load_legacy(path, d)


def _from_tokenizers_json(d: dict) -> CharTokenizer | BPETokenizer:
    """The kind of a parsed `tokenizers` JSON, from its pre-tokenizer and decoder."""
    tk = _tokenizers_from_json(d)  # what tokenizers.Tokenizer.from_file says about it
    pre = (d.get("pre_tokenizer") or {}).get("type")
    decoder = (d.get("decoder") or {}).get("type")
    if pre == "ByteLevel" or decoder == "ByteLevel":
        return BPETokenizer._from_tokenizers_json(d, tk)
    if decoder == "Fuse":
        return CharTokenizer._from_tokenizers_json(d)
    raise TokenizerError(
        f"not a tokenizer minitf runs (pre_tokenizer {pre!r}, decoder {decoder!r}); it runs "
        f"GPT-2's byte-level BPE (pre_tokenizer and decoder ByteLevel) and its own character "
        f"tokenizer (decoder Fuse)"
    )


def _load_legacy(path: Path, d) -> CharTokenizer | BPETokenizer:
    """minitf's format before plain `tokenizers` files: {"type", "version": 1, ...}."""
    if not isinstance(d, dict) or "type" not in d:
        raise TokenizerError(f'{path}: not a tokenizer: no "model" field (a tokenizers file) '
                             f'and no "type" field (an earlier minitf file)')
    kind, version = d["type"], d.get("version")
    if kind not in KINDS:
        raise TokenizerError(f"{path}: unknown tokenizer type {kind!r}; allowed: {list(KINDS)}")
    if version != LEGACY_FORMAT_VERSION:
        raise TokenizerError(
            f"{path}: tokenizer format version {version!r}; this minitf reads {LEGACY_FORMAT_VERSION}"
        )
    try:
        if kind == "char":
            chars = d.get("chars")
            if not isinstance(chars, list):
                raise TokenizerError('"chars" must be a list of characters')
            return CharTokenizer(chars)
        inner = d.get("tokenizer")
        if not isinstance(inner, dict):
            raise TokenizerError('"tokenizer" must hold the HF tokenizers JSON object')
        return BPETokenizer._from_tokenizers_json(inner, _tokenizers_from_json(inner))
    except TokenizerError as e:
        raise TokenizerError(f"{path}: damaged {kind} tokenizer: {e}") from None
