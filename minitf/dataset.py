"""Prepared datasets: a text corpus of any size tokenized once into train.bin / val.bin, then
read back window by window, so training memory does not grow with the corpus.

    prepare("books/", "data/books", tokenizer="bpe")    # python -m minitf.prepare books/ --out data/books
    ds = load_dataset("data/books")                      # ds.train, ds.val: TokenFile; ds.tokenizer
    train, val, tokenizer = load_data("data/books")      # what train and evaluate do with --data

A dataset folder holds:

    train.bin        the training split's token ids, raw little-endian uint16 (uint32 when the
                     vocabulary has more than 65,536 tokens), no header
    val.bin          the validation split's, the same way
    tokenizer.json   the tokenizer, written by its own `save`
    dataset.json     the record: format, dtype, vocabulary size, the tokenizer (kind, where it
                     came from, SHA-256 of tokenizer.json), the split rule, every source file
                     (path, bytes, SHA-256, characters in each split), and per split the file,
                     token and character counts and the SHA-256 of the .bin file

The split rule. A source is a list of documents: one text file, every file of a folder that
matches a glob (hidden files skipped, sorted by relative path in code-point order), or standard
input (one document). Each document is split where `minitf.data.split_point` says: its first
int(n * (1 - val_fraction)) characters go to training, the rest to validation. Within a split
the documents' parts follow in source order, joined by a separator (default "\\n\\n"), and
each part is tokenized on its own: train.bin = encode(part 1) + encode(separator) +
encode(part 2) + ... So one text file gives exactly `split_text` of it, encoded, which is
what `train --data FILE` trains on, and a folder's validation split samples every document.

Training a tokenizer uses the training split only, as `train` does: a char vocabulary is the
distinct characters of the training split (plus the separator's, when it joins parts); BPE is
trained on the training split's text, at most its first `bpe_max_chars` characters.

Memory. Files are read in blocks (1 MiB): a scan (size, SHA-256, UTF-8 check, character
count and, for a char tokenizer, the characters of the training split), for BPE a read of
its training sample, then tokenizing (the SHA-256 is checked again: a file that changed in
between is refused). Text is encoded in pieces of about a million characters, each cut just before a
space or newline that follows a non-space: byte-level BPE's pre-tokenizer splits there
whatever surrounds it, so the pieces encode exactly as the whole part would. Memory is
therefore bounded by the block size, plus the longest stretch of text with no such place,
plus a BPE training sample. Standard input is first copied into the output's temporary folder.

Writes are atomic: everything goes into a hidden temporary folder beside the output, which
then replaces it (an existing dataset is swapped out, as checkpoints are). A folder that is
not a dataset is never replaced; a failed or interrupted run leaves nothing in its place.
The output is locked from the start (one `prepare` per folder; minitf.rundir), and what an
interrupted run left is recovered first, by `prepare` and by every reader
(`recover_dataset`): the newest complete dataset, whose dataset.json is written last.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import sys
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

import numpy as np
from tqdm import tqdm

from minitf import __version__
from minitf.data import CorpusError, TokenFile, load_corpus, split_point, split_text
from minitf.fileio import fsync_dir, read_json, regular_file, save_json_atomic
from minitf.rundir import (DirectoryLock, previous, probe_write, readable, recover, swap_in,
                           temporary)
from minitf.tokenizer import BPETokenizer, CharTokenizer, TokenizerError, load_tokenizer, train_tokenizer

FORMAT = "minitf-dataset"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
TOKENIZER_FILE = "tokenizer.json"
TRAINED_KINDS = ("char", "bpe")
DTYPES = ("auto", "uint16", "uint32")
BLOCK_BYTES = 1 << 20  # bytes read at a time
PIECE_CHARS = 1 << 20  # characters encoded at a time (about)
SPLIT_RULE = (
    "each document (a file, or standard input) is split at int(chars * (1 - val_fraction)): "
    "the characters before go to train, the rest to val; within a split the documents' parts "
    "follow in source order (a folder's files sorted by relative path), joined by the "
    "separator, each part tokenized on its own"
)


class DatasetError(ValueError):
    """Input that cannot be prepared, an output that must not be replaced, or a dataset
    folder that is missing, damaged, or tokenized differently from a model."""


# ----------------------------------------------------------------------------------------
# Sources: the documents of a file, a folder or standard input, read in blocks


@dataclasses.dataclass
class _Document:
    name: str  # as recorded and reported: the path given, a folder's relative path, or "-"
    path: Path  # where it is read from (standard input: its copy in the temporary folder)
    bytes: int = 0
    sha256: str = ""
    chars: int = 0
    cut: int = 0  # characters [0, cut) are training text


class _Reader:
    """Iterate over (byte offset, text) blocks of one UTF-8 document; afterwards `.bytes`
    and `.sha256` hold its size and digest. Raises CorpusError naming the document and the
    byte offset of the first byte that is not UTF-8."""

    def __init__(self, doc: _Document, block_bytes: int, bar: tqdm):
        self.doc, self.block_bytes, self.bar = doc, block_bytes, bar
        self.bytes, self.sha256 = 0, ""

    def __iter__(self) -> Iterator[tuple[int, str]]:
        decoder = codecs.getincrementaldecoder("utf-8")()  # holds a character cut by a block
        digest = hashlib.sha256()
        try:
            f = open(self.doc.path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.doc.name}: no such file (was it removed?)") from None
        with f:
            while True:
                data = f.read(self.block_bytes)
                start = self.bytes - len(decoder.getstate()[0])  # byte offset of text[0]
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:  # e.start counts from the held-back bytes
                    raise CorpusError(f"{self.doc.name}: byte {start + e.start}: not UTF-8 "
                                      f"({e.reason})") from None
                digest.update(data)
                self.bytes += len(data)
                self.bar.update(len(data))
                if text:
                    yield start, text
                if not data:
                    break
        self.sha256 = digest.hexdigest()


def _documents(source, glob: str, spool_dir: Path, stdin: BinaryIO | None, progress: bool) -> list[_Document]:
    """The documents of `source`: a text file, a folder (files matching `glob`), or "-"."""
    if str(source) == "-":
        copy = spool_dir / "stdin.txt"
        with open(copy, "xb") as out, _bar(None, "stdin", progress) as bar:
            stream = stdin if stdin is not None else sys.stdin.buffer
            while data := stream.read(BLOCK_BYTES):
                out.write(data)
                bar.update(len(data))
        return [_Document("-", copy)]
    try:
        path = regular_file(source, "source", folder=True)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    if path.is_file():
        return [_Document(str(source), path)]
    if Path(glob).is_absolute():  # pathlib cannot, and a folder's files are under it
        raise DatasetError(f"--glob {glob!r}: patterns are relative to the folder {source} "
                           f"(e.g. '**/*.txt'), not absolute")
    found = []
    for p in path.glob(glob):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append((rel.as_posix(), p))
    if not found:
        raise DatasetError(f"{source}: no files match {glob!r} (hidden files are skipped)")
    return [_Document(name, p) for name, p in sorted(found)]


def _bar(total: int | None, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True,
                disable=not enabled, file=sys.stderr)


# ----------------------------------------------------------------------------------------
# Pass 1: size, checksum, UTF-8, character count, and the characters of the training split


class _CharSet:
    """The distinct characters of the training split, found in one pass over each document
    before its cut is known: each character's first position in the document is kept, and
    at the document's end those before the cut join the set."""

    def __init__(self):
        self.in_train = np.zeros(0x110000, dtype=bool)  # (code points,) in the set
        self._seen = np.zeros(0x110000, dtype=bool)  # in the set or seen in this document
        self._first: dict[int, int] = {}  # code point seen in this document -> first position

    def see(self, text: str, position: int) -> None:
        """`text` starts at character `position` of the current document."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")  # (n,) code points
        new = np.flatnonzero(~self._seen[cps])  # (k,) positions of characters not seen yet
        if new.size:
            cp, i = np.unique(cps[new], return_index=True)  # first position of each
            self._seen[cp] = True
            self._first.update(zip(cp.tolist(), (position + new[i]).tolist()))

    def end_document(self, cut: int) -> None:
        for c, j in self._first.items():
            self.in_train[c] |= j < cut  # first seen before the cut: in the training part
        self._seen[list(self._first)] = self.in_train[list(self._first)]
        self._first.clear()

    def chars(self) -> set[str]:
        return {chr(c) for c in np.flatnonzero(self.in_train)}


def _scan(doc: _Document, val_fraction: float, block_bytes: int, bar: tqdm,
          vocab: _CharSet | None) -> None:
    """Fill doc.bytes, .sha256, .chars, .cut; with `vocab`, add the characters of this
    document's training part to it."""
    reader = _Reader(doc, block_bytes, bar)
    chars = 0
    for _, text in reader:
        if vocab is not None:
            vocab.see(text, chars)
        chars += len(text)
    doc.bytes, doc.sha256, doc.chars = reader.bytes, reader.sha256, chars
    doc.cut = split_point(chars, val_fraction)
    if vocab is not None:
        vocab.end_document(doc.cut)


def _training_text(docs: list[_Document], separator: str, max_chars: int, block_bytes: int,
                   bar: tqdm) -> str:
    """The training split's text (parts joined by the separator), at most its first
    `max_chars` characters of document text: what BPE is trained on."""
    parts, left = [], max_chars
    for doc in docs:
        if left == 0:
            break
        want = min(doc.cut, left)
        if want == 0:
            continue
        pieces, got = [], 0
        for _, text in _Reader(doc, block_bytes, bar):
            pieces.append(text[: want - got])
            got += len(pieces[-1])
            if got == want:
                break
        parts.append("".join(pieces))
        left -= want
    return separator.join(parts)


# ----------------------------------------------------------------------------------------
# Pass 2: tokenize each document's two parts into train.bin and val.bin

# A place to cut text for byte-level BPE: just before a space or newline that follows a
# non-space. GPT-2's pre-tokenizer pattern ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
# \s+(?!\S)|\s+) never matches across it and looks at nothing before a match, so
# encode(a + b) == encode(a) + encode(b) there. (Python's \S excludes every character a
# Unicode \s matches.) A char tokenizer may be cut anywhere.
_CUT = re.compile(r"\S[ \n]")


def _cut_point(text: str, start: int = 0) -> int:
    """The last safe place to cut `text` (see _CUT) at or after `start`, 0 if there is none."""
    for lo in (max(start, len(text) - 65536), start):  # the tail first: it nearly always has one
        last = None
        for last in _CUT.finditer(text, lo):
            pass
        if last is not None:
            return last.start() + 1
        if lo == start:
            break
    return 0


class _SplitWriter:
    """Tokenizes the documents of one split piece by piece and appends the ids to its file."""

    def __init__(self, path: Path, target: Path, tokenizer, dtype: np.dtype, separator: str,
                 hint: str, piece_chars: int = PIECE_CHARS):
        self.file = open(path, "xb")
        self.path, self.tokenizer, self.dtype = path, tokenizer, dtype
        self.target = target / path.name  # where the file ends up once the folder is swapped in
        self.separator, self.hint, self.piece_chars = separator, hint, piece_chars
        self.digest = hashlib.sha256()
        self.tokens = self.chars = self.documents = 0
        self._text, self._name, self._byte = "", "", 0  # text not yet encoded, where it began
        self._uncut = 0  # self._text[:_uncut] is known to hold no place to cut

    def begin(self, name: str) -> None:
        """Start a document's part; parts after the first are preceded by the separator."""
        if self.documents and self.separator:
            try:
                ids = self.tokenizer.encode(self.separator)
            except TokenizerError:
                raise DatasetError(f"the separator {self.separator!r} placed between documents "
                                   f"cannot be encoded by this tokenizer; choose another one "
                                   f"('' joins documents directly)") from None
            self._write(ids, len(self.separator))
        self.documents += 1
        self._name = name

    def add(self, text: str, byte_offset: int) -> None:
        """More text of the current document; `byte_offset`: where it starts in the file."""
        if not self._text:
            self._byte = byte_offset
        self._text += text
        if len(self._text) >= self.piece_chars:
            cut = _cut_point(self._text, max(0, self._uncut - 1))  # a match is 2 characters
            if cut:
                head, self._text = self._text[:cut], self._text[cut:]
                self._encode(head)
                self._byte += len(head.encode("utf-8"))
            self._uncut = len(self._text)  # what is left after the last place has none

    def end(self) -> None:
        """The current document's part is complete: encode what is left of it."""
        if self._text:
            self._encode(self._text)
            self._text, self._uncut = "", 0

    def close(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise OSError(e.errno, f"cannot write {self.target}: {e.strerror or e}") from None
        finally:
            with contextlib.suppress(OSError):  # what the failed flush left is discarded
                self.file.close()

    def record(self) -> dict:
        return {"file": self.path.name, "tokens": self.tokens, "chars": self.chars,
                "documents": self.documents, "sha256": self.digest.hexdigest()}

    def _encode(self, text: str) -> None:
        try:
            ids = self.tokenizer.encode(text)
        except TokenizerError:
            raise DatasetError(self._unencodable(text)) from None
        self._write(ids, len(text))

    def _write(self, ids, chars: int) -> None:
        out = np.asarray(ids).astype(self.dtype)  # (n,) fits: vocab_size was checked
        try:
            self.file.write(out)
        except OSError as e:  # a full disk: name the file it was for
            raise OSError(e.errno, f"cannot write {self.target}: {e.strerror or e}") from None
        self.digest.update(out)
        self.tokens += len(out)
        self.chars += chars

    def _unencodable(self, text: str) -> str:
        # the shortest prefix that fails ends with the culprit (encoding a prefix of
        # encodable text never fails)
        lo, hi = 0, len(text)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                self.tokenizer.encode(text[:mid])
                lo = mid
            except TokenizerError:
                hi = mid
        c = text[hi - 1]
        byte = self._byte + len(text[: hi - 1].encode("utf-8"))
        return (f"{self._name}: byte {byte}: character {c!r} (U+{ord(c):04X}) cannot be encoded "
                f"by the tokenizer ({self.tokenizer.vocab_size} tokens){self.hint}")


def _tokenize(doc: _Document, train: _SplitWriter, val: _SplitWriter, block_bytes: int,
              bar: tqdm) -> None:
    reader = _Reader(doc, block_bytes, bar)
    if doc.cut > 0:
        train.begin(doc.name)
    if doc.chars > doc.cut:
        val.begin(doc.name)
    pos = 0  # characters of the document before this block
    for byte, text in reader:
        k = min(len(text), max(0, doc.cut - pos))  # this block's characters in the train part
        if k:
            train.add(text[:k], byte)
        if k < len(text):
            val.add(text[k:], byte + len(text[:k].encode("utf-8")))
        pos += len(text)
    train.end()
    val.end()
    if reader.sha256 != doc.sha256:
        raise DatasetError(f"{doc.name} changed while it was being prepared (its SHA-256 differs "
                           f"between the two reads); prepare a copy that does not change")


# ----------------------------------------------------------------------------------------
# prepare


def _token_dtype(name: str, vocab_size: int) -> np.dtype:
    if name == "auto":
        name = "uint16" if vocab_size <= 1 << 16 else "uint32"
    dtype = np.dtype(name).newbyteorder("<")
    limit = np.iinfo(dtype).max
    if vocab_size - 1 > limit:
        raise DatasetError(f"the tokenizer has {vocab_size} tokens, too many for {name} "
                           f"(ids up to {limit}); use dtype uint32 or auto")
    return dtype


def tokenizer_kind(tokenizer) -> str:
    """"char" or "bpe" for minitf's tokenizers, else the class name."""
    for cls, kind in ((CharTokenizer, "char"), (BPETokenizer, "bpe")):
        if isinstance(tokenizer, cls):
            return kind
    return type(tokenizer).__name__


def _check_output(out) -> Path:
    """The folder to write (a symlink's target), if it may be written; else DatasetError."""
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise DatasetError(f"output {out} is a file; give a new or empty folder, or a dataset "
                           f"folder to replace")
    if target.is_dir() and any(target.iterdir()) and not is_dataset(target):
        raise DatasetError(f"output folder {out} exists and is not a minitf dataset (no "
                           f"{DATASET_FILE}); refusing to replace it: give a new or empty folder")
    return target


def _legacy_temporaries(target: Path) -> list[Path]:
    """Temporary folders of minitf versions before the lock, `.DIR.minitf-prepare-<pid>`."""
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{glob_escape(target.name)}.minitf-prepare-*"))


def recover_dataset(path: str | os.PathLike) -> Path:
    """Restore the newest complete dataset after an interrupted `prepare` (minitf.rundir
    `recover`; a complete one has its dataset.json, written last, and its files), saying so
    in one line. Returns the folder, resolved."""
    target = Path(path).resolve()
    return recover(target, _complete, "dataset", _legacy_temporaries(target))


def _complete(path: Path) -> bool:
    try:
        ds = _open_dataset(path)
    except (ValueError, OSError):
        return False
    ds.train.close()
    ds.val.close()
    return True


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(BLOCK_BYTES):
            digest.update(data)
    return digest.hexdigest()


def prepare(source, out, tokenizer="char", *, vocab_size: int = 1024, val_fraction: float = 0.1,
            separator: str = "\n\n", glob: str = "**/*.txt", dtype: str = "auto",
            bpe_max_chars: int = 5_000_000, progress: bool = False, stdin: BinaryIO | None = None,
            block_bytes: int = BLOCK_BYTES, piece_chars: int = PIECE_CHARS) -> dict:
    """Tokenize a corpus into the dataset folder `out` (see the module docstring).

    Args:
        source: a UTF-8 text file, a folder (its files matching `glob`), or "-" for `stdin`
            (default sys.stdin.buffer), read as bytes.
        out: the dataset folder to write: new, empty, or a dataset to replace.
        tokenizer: "char" or "bpe" to train one on the training split (BPE to `vocab_size`
            tokens, on at most `bpe_max_chars` characters), a tokenizer object, or the path
            of a tokenizer.json or of a folder holding one (a model, a dataset).
        val_fraction: the share of each document's characters that goes to validation.
        separator: the text placed between consecutive documents' parts within a split.
        dtype: "uint16", "uint32", or "auto" (uint16 when the vocabulary fits).
        progress: show progress bars (bytes and MB/s) on stderr.
        block_bytes, piece_chars: read and encode sizes (small values exercise boundaries).
    Returns:
        The record written to dataset.json (a dict).
    Raises:
        FileNotFoundError: `source` or a tokenizer path does not exist.
        CorpusError (an OSError): a document is not UTF-8 (names it and the byte offset).
        DatasetError (a ValueError): a character the tokenizer cannot encode (document and
            byte offset), an empty corpus or split, a vocabulary too large for `dtype`, an
            output that is a file or a folder that is not a dataset, a bad argument.
        TokenizerError: a tokenizer file that is missing or damaged.
    """
    if tokenizer == "bpe" and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                               or vocab_size < 256):
        raise DatasetError(f"BPE vocab_size {vocab_size!r} must be an integer >= 256 (the bytes)")
    if dtype not in DTYPES:
        raise DatasetError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(separator, str):
        raise DatasetError(f"separator must be a string, got {type(separator).__name__}")
    if isinstance(bpe_max_chars, bool) or not isinstance(bpe_max_chars, int) or bpe_max_chars < 1:
        raise DatasetError(f"bpe_max_chars {bpe_max_chars!r} must be a positive integer")
    split_point(0, val_fraction)  # raises ValueError for a val_fraction outside (0, 1)
    given = None
    if isinstance(tokenizer, (str, os.PathLike)) and str(tokenizer) not in TRAINED_KINDS:
        given = str(tokenizer)
        tokenizer = load_tokenizer(tokenizer)  # before any reading: a bad path fails at once
    elif not (isinstance(tokenizer, str) or hasattr(tokenizer, "encode")):
        raise DatasetError(f"tokenizer {tokenizer!r} is not 'char', 'bpe', a path or a tokenizer")
    if str(source) != "-" and not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    from_stdin = str(source) == "-"
    shown = "standard input" if from_stdin else str(source)
    target = Path(out).resolve()
    with DirectoryLock(target):  # one writer; then what an interrupted run left, then work
        recover_dataset(target)
        _check_output(out)
        probe_write(target, 0, "dataset folder")
        tmp = temporary(target)
        tmp.mkdir(parents=True)
        swapping = False
        try:
            docs = _documents(source, glob, tmp, stdin, progress)
            vocab = _CharSet() if tokenizer == "char" else None
            with _bar(sum(d.path.stat().st_size for d in docs), "scan", progress) as bar:
                for doc in docs:
                    _scan(doc, val_fraction, block_bytes, bar, vocab)
            chars, train_chars = sum(d.chars for d in docs), sum(d.cut for d in docs)
            if chars == 0:
                raise DatasetError(f"{shown}: the corpus is empty (0 characters in {len(docs)} "
                                   f"{'file' if len(docs) == 1 else 'files'})")
            if train_chars == 0 or train_chars == chars:
                raise DatasetError(f"{shown}: {chars} characters are too few to split with "
                                   f"val_fraction={val_fraction}: a split would be empty")

            tokenizer, info, hint = _tokenizer_for(tokenizer, given, docs, vocab, separator,
                                                   vocab_size, bpe_max_chars, block_bytes, progress)
            token_dtype = _token_dtype(dtype, tokenizer.vocab_size)
            # at most one token per byte of text (a char is at least one byte, so is a BPE token)
            probe_write(target, sum(d.bytes for d in docs) * token_dtype.itemsize, "dataset folder")
            writers = [_SplitWriter(tmp / name, target, tokenizer, token_dtype, separator, hint,
                                    piece_chars) for name in (TRAIN_FILE, VAL_FILE)]
            try:
                with _bar(sum(d.bytes for d in docs), "tokenize", progress) as bar:
                    for doc in docs:
                        _tokenize(doc, *writers, block_bytes, bar)
            finally:
                for w in writers:
                    w.close()
            tokenizer.save(tmp / TOKENIZER_FILE)
            record = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "minitf_version": __version__,
                "dtype": token_dtype.name,
                "byte_order": "little",
                "vocab_size": tokenizer.vocab_size,
                "tokenizer": {"file": TOKENIZER_FILE, **info,
                              "sha256": _sha256_file(tmp / TOKENIZER_FILE)},
                "split": {"rule": SPLIT_RULE, "val_fraction": val_fraction, "separator": separator,
                          **({"glob": glob} if not from_stdin and Path(source).is_dir() else {})},
                "sources": [{"path": d.name, "bytes": d.bytes, "sha256": d.sha256, "chars": d.chars,
                             "train_chars": d.cut, "val_chars": d.chars - d.cut} for d in docs],
                "train": writers[0].record(),
                "val": writers[1].record(),
            }
            save_json_atomic(tmp / DATASET_FILE, record)
            (tmp / "stdin.txt").unlink(missing_ok=True)
            fsync_dir(tmp)
            swapping = True
            swap_in(tmp, target)
        except BaseException:
            if not swapping:  # once swapping, the complete tmp is the newest: recovery keeps it
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return record


def _tokenizer_for(tokenizer, given: str | None, docs: list[_Document], vocab: _CharSet | None,
                   separator: str, vocab_size: int, bpe_max_chars: int, block_bytes: int,
                   progress: bool) -> tuple[object, dict, str]:
    """(tokenizer, its entry in the record, the hint for a character it cannot encode):
    the given one, or one trained on the training split."""
    if tokenizer == "char":
        train_parts = sum(1 for d in docs if d.cut > 0)
        chars = vocab.chars() | (set(separator) if train_parts > 1 else set())
        return (train_tokenizer("char", "".join(sorted(chars))),
                {"kind": "char", "source": "trained on the training split"},
                "; a char vocabulary holds the training split's characters: use a tokenizer "
                "that knows this one, or bpe")
    if tokenizer == "bpe":
        with _bar(None, "bpe sample", progress) as bar:
            text = _training_text(docs, separator, bpe_max_chars, block_bytes, bar)
        return (train_tokenizer("bpe", text, vocab_size),
                {"kind": "bpe", "source": "trained on the training split",
                 "requested_vocab_size": vocab_size, "training_chars": len(text)}, "")
    return (tokenizer, {"kind": tokenizer_kind(tokenizer), "source": given or "given"},
            "; give another tokenizer, or train one on this corpus (char or bpe)")


# ----------------------------------------------------------------------------------------
# Reading a dataset


@dataclasses.dataclass
class Dataset:
    """What `load_dataset` returns."""

    path: Path  # the folder read (its .minitf-old copy after an interrupted replacement)
    record: dict  # dataset.json
    tokenizer: object  # CharTokenizer | BPETokenizer
    train: TokenFile  # the training split's ids, read window by window
    val: TokenFile


def is_dataset(path: str | os.PathLike) -> bool:
    """True if `path` is a folder holding a minitf dataset.json."""
    record_path = Path(path) / DATASET_FILE
    if not record_path.is_file():
        return False
    try:
        record = read_json(record_path)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("format") == FORMAT


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Open a dataset folder written by `prepare`: its record, tokenizer and two TokenFiles.

    Checks the record's format, the tokenizer against its recorded SHA-256 and vocabulary
    size, and each .bin file's size against its token count (reading the ids is left to
    the windows; every window is range-checked as it is read).

    Raises DatasetError with one line naming the file for a missing folder or file, invalid
    JSON, an unknown format or dtype, a replaced tokenizer, or a truncated .bin file.
    """
    return _open_dataset(readable(recover_dataset(path), "dataset"))


def _open_dataset(path: Path) -> Dataset:
    if not path.is_dir():
        raise DatasetError(f"{path}: not a dataset folder ({'a file' if path.exists() else 'not found'})")
    record_path = path / DATASET_FILE
    if not record_path.is_file():
        raise DatasetError(f"{path}: not a minitf dataset (no {DATASET_FILE}); make one with "
                           f"python -m minitf.prepare")
    record = read_json(record_path, DatasetError, "dataset record")
    try:
        if record["format"] != FORMAT or record["format_version"] != FORMAT_VERSION:
            raise DatasetError(f"{record_path}: format {record['format']!r} version "
                               f"{record['format_version']!r}; this minitf reads {FORMAT!r} "
                               f"version {FORMAT_VERSION}")
        dtype, vocab_size = record["dtype"], record["vocab_size"]
        if dtype not in ("uint16", "uint32"):
            raise DatasetError(f"{record_path}: dtype {dtype!r} must be uint16 or uint32")
        tok_path = _member(path, record_path, record["tokenizer"]["file"])
        if tok_path.is_file() and _sha256_file(tok_path) != record["tokenizer"]["sha256"]:
            raise DatasetError(f"{tok_path}: does not match the SHA-256 in {record_path} "
                               f"(replaced or damaged)")
        try:
            tokenizer = load_tokenizer(tok_path)
        except TokenizerError as e:
            raise DatasetError(str(e)) from None
        if tokenizer.vocab_size != vocab_size:
            raise DatasetError(f"{tok_path}: {tokenizer.vocab_size} tokens, {record_path} says "
                               f"{vocab_size}")
        splits = [TokenFile(_member(path, record_path, record[s]["file"]), dtype, record[s]["tokens"],
                            vocab_size)
                  for s in ("train", "val")]
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{record_path}: damaged record ({type(e).__name__}: {e})") from None
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(str(e)) from None
    return Dataset(path, record, tokenizer, *splits)


def _member(folder: Path, record_path: Path, name) -> Path:
    """The file `name` of a dataset record: a plain name inside `folder`, never a path that
    leads out of it ("../x", "/etc/passwd", "sub/x"), else DatasetError."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name \
            or "/" in name or "\\" in name:
        raise DatasetError(f"{record_path}: file {name!r} must be a plain file name inside {folder}")
    return folder / name


def same_tokenizer(a, b) -> bool:
    """True if two tokenizers are the same: equal JSON when both are saved by this minitf
    (so a dataset written by an older version still matches its model)."""
    if a.vocab_size != b.vocab_size:
        return False
    with tempfile.TemporaryDirectory() as d:
        return read_json(a.save(Path(d) / "a.json")) == read_json(b.save(Path(d) / "b.json"))


class Data(NamedTuple):
    """What `load_data` returns: the two splits (arrays or TokenFiles) and their tokenizer."""

    train: np.ndarray | TokenFile | None
    val: np.ndarray | TokenFile
    tokenizer: object


def load_data(data: str | os.PathLike | None = None, tokenizer=None, *, kind: str = "char",
              vocab_size: int = 1024, with_train: bool = True) -> Data:
    """The token splits and tokenizer for a `--data` argument: what train and evaluate use.

    data: a dataset folder (from `prepare`): its train.bin and val.bin as TokenFiles, read
        window by window, and its tokenizer. A given `tokenizer` (a model's, on evaluate or
        resume) must be the dataset's, else DatasetError.
    data: a text file, or None (`load_corpus`: $MINITF_DATA, the cache, a download): the
        text's 90/10 `split_text`, encoded with `tokenizer`, or with a tokenizer of `kind`
        ("char" or "bpe", `vocab_size` for BPE) trained on the training split. Splits are
        int32 arrays (N,).
    with_train=False skips the training split (returns None for it), for evaluation.

    Raises DatasetError (dataset problems, a tokenizer mismatch), FileNotFoundError and
    CorpusError (text problems), TokenizerError (text the tokenizer cannot encode).
    """
    if data is not None and not Path(data).is_file():
        recover_dataset(data)  # what an interrupted prepare left, before it is read
    if data is not None and (Path(data).is_dir() or previous(Path(data).resolve()).is_dir()):
        ds = load_dataset(data)
        if tokenizer is not None and not same_tokenizer(tokenizer, ds.tokenizer):
            raise DatasetError(
                f"{data}: the dataset was tokenized with another tokenizer ({type(ds.tokenizer).__name__}, "
                f"{ds.tokenizer.vocab_size} tokens) than the model's ({type(tokenizer).__name__}, "
                f"{tokenizer.vocab_size} tokens); prepare the corpus with --tokenizer MODEL_DIR"
            )
        return Data(ds.train if with_train else None, ds.val, ds.tokenizer if tokenizer is None else tokenizer)
    train_text, val_text = split_text(load_corpus(data))
    if tokenizer is None:
        tokenizer = train_tokenizer(kind, train_text, vocab_size)
    train = np.asarray(tokenizer.encode(train_text)) if with_train else None
    return Data(train, np.asarray(tokenizer.encode(val_text)), tokenizer)
