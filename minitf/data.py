"""The TinyShakespeare corpus, the train/validation split, and batches of token windows.

The data path of a training run:

    text = load_corpus()                               # str, 1,115,394 characters
    train_text, val_text = split_text(text)            # first 90% / last 10% of characters
    tok = train_tokenizer("bpe", train_text)           # the tokenizer never sees validation
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
    x, y = get_batch(train_ids, batch_size, block_size, rng)   # (B, T) each, for a step
    xv, yv = eval_windows(val_ids, block_size)                 # (N, T), the same every time

Why split the text and not the tokens: the BPE vocabulary must be learned from the training
split alone, so the split has to exist before there are tokens. Splitting at the 90% character
point is also what makes bits per character comparable across tokenizers: both see the same
validation text. For the char tokenizer the two orders give identical arrays
(`train_val_split(encode(text))` == `encode` of each part), as in nanoGPT's shakespeare_char.

A split is either an in-memory int array or a `TokenFile`: the ids of a prepared dataset
(minitf.dataset) in a raw .bin file, read window by window through np.memmap, so a corpus larger
than memory trains with memory bounded by the batch.

Token ids are int32 everywhere (encode, get_batch, eval_windows, TokenFile slices).
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np

from minitf.config import check_memory
from minitf.fileio import regular_file, write_bytes_atomic

CORPUS_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CORPUS_BYTES = 1_115_394
CACHE_NAME = "tinyshakespeare.txt"
ENV_VAR = "MINITF_DATA"


class CorpusError(OSError):
    """The corpus could not be downloaded, failed its checksum, or is not UTF-8 text."""


def cache_path() -> Path:
    """Where the downloaded corpus is kept: $XDG_CACHE_HOME/minitf/, else ~/.cache/minitf/."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minitf" / CACHE_NAME


def load_corpus(path: str | os.PathLike | None = None) -> str:
    """The training text, resolved in this order:

    1. `path`, if given (any UTF-8 text file; not checksummed);
    2. the file named by the environment variable MINITF_DATA (same);
    3. the cache, `cache_path()` (checksummed);
    4. a download of TinyShakespeare from CORPUS_URL into the cache, verified against
       CORPUS_SHA256 before it is written (atomically: no partial or bad file is left).

    Raises:
        FileNotFoundError: `path` or MINITF_DATA names a missing file.
        CorpusError: download failed, checksum mismatch, or the file is not UTF-8.
    """
    how = (
        f"pass an existing file, set {ENV_VAR}=/path/to/input.txt, or leave both unset to "
        f"download TinyShakespeare into {cache_path()}"
    )
    if path is not None:
        return _read_text(Path(path), f"corpus file {path} not found; {how}")
    env = os.environ.get(ENV_VAR)
    if env:
        return _read_text(Path(env), f"corpus file {env} (from ${ENV_VAR}) not found; {how}")
    cached = cache_path()
    if cached.exists():
        data = cached.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != CORPUS_SHA256:
            raise CorpusError(
                f"{cached}: SHA-256 {digest} does not match TinyShakespeare's {CORPUS_SHA256}; "
                f"delete the file to download it again"
            )
        return _decode(data, cached)
    return _decode(download_corpus(cached), cached)


def download_corpus(dest: Path) -> bytes:
    """Download TinyShakespeare to `dest` after checking its SHA-256; return its bytes."""
    print(f"minitf: downloading TinyShakespeare from {CORPUS_URL} to {dest}", file=sys.stderr)
    try:
        with urlopen(CORPUS_URL, timeout=60) as response:
            data = response.read()
    except (URLError, OSError) as e:
        raise CorpusError(
            f"cannot download {CORPUS_URL}: {e}; without network, set {ENV_VAR} to a copy of "
            f"input.txt"
        ) from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise CorpusError(
            f"downloaded {CORPUS_URL} ({len(data)} bytes) has SHA-256 {digest}, expected "
            f"{CORPUS_SHA256} ({CORPUS_BYTES} bytes); nothing was saved"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(dest, data)
    return data


# memory per byte of a text read whole and tokenized: the bytes, the str (1 byte a character
# for ASCII), the token ids as a Python list (8-byte pointers, and ints) and as an array
TEXT_MEMORY_PER_BYTE = 1 + 1 + 16 + 8


def read_text_bytes(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of the text file `path` (`what` names it: "--data", "--prompt-file"): a
    regular file (minitf.fileio.regular_file) whose reading and tokenizing fit in memory,
    or a pipe given by name (a FIFO, such as the shell's `<(command)`), read as a stream by
    `read_stream_bytes`. Devices and sockets are refused.

    Raises:
        FileNotFoundError, OSError, ValueError: see regular_file.
        minitf.config.SizeError: the file is too large for this machine's memory.
    """
    try:
        is_pipe = stat.S_ISFIFO(os.stat(path).st_mode)
    except (OSError, ValueError):
        is_pipe = False  # regular_file names the problem
    if is_pipe:
        with open(path, "rb") as stream:
            return read_stream_bytes(stream, f"{what} {path} (a pipe)")
    path = regular_file(path, what)
    size = path.stat().st_size
    check_memory({"the text and its tokens": size * TEXT_MEMORY_PER_BYTE},
                 f"{what} {path} ({size:,} bytes)",
                 "use a smaller file, or prepare it as a dataset folder (python -m minitf.prepare)")
    return path.read_bytes()


def read_stream_bytes(stream, what: str, chunk: int = 1 << 20) -> bytes:
    """The bytes of a binary stream (standard input: `what` names it), read `chunk` bytes
    at a time and refused, as `read_text_bytes` refuses a file, once what has arrived no
    longer fits in memory: a stream has no size to check first, and an endless one
    (`yes | ...`) would otherwise fill the machine.

    Raises:
        minitf.config.SizeError: the stream exceeds this machine's memory.
    """
    parts, size = [], 0
    while data := stream.read(chunk):
        parts.append(data)
        size += len(data)
        check_memory({"the text and its tokens": size * TEXT_MEMORY_PER_BYTE},
                     f"{what} (at least {size:,} bytes so far)", "give a shorter text")
    return b"".join(parts)


def _read_text(path: Path, missing_message: str) -> str:
    try:
        data = read_text_bytes(path, "corpus file")
    except FileNotFoundError:
        raise FileNotFoundError(missing_message) from None
    return _decode(data, path)


def _decode(data: bytes, path: Path) -> str:
    # bytes.decode, not read_text: universal newlines would turn "\r\n" into "\n" and change
    # the character count that bits per character divides by.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


# ----------------------------------------------------------------------------------------
# Train / validation split


def split_point(n: int, val_fraction: float = 0.1) -> int:
    """Where `n` items (characters, tokens) split: items [0, cut) train, [cut, n) validate.

    cut = int(n * (1 - val_fraction)), nanoGPT's `int(0.9 * len(data))`; either part may be
    empty here (a tiny document); `split_text` and `train_val_split` refuse that.
    Raises ValueError if val_fraction is not in (0, 1).
    """
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1)")
    return int(n * (1 - val_fraction))


def _split_point(n: int, val_fraction: float) -> int:
    cut = split_point(n, val_fraction)
    if cut == 0 or cut == n:
        raise ValueError(
            f"cannot split {n} items with val_fraction={val_fraction}: a part would be empty"
        )
    return cut


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(first 90%, last 10%) of the characters of `text`; train the tokenizer on the first."""
    cut = _split_point(len(text), val_fraction)
    return text[:cut], text[cut:]


def train_val_split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(first 90%, last 10%) of a token array (views, not copies).

    For a tokenizer trained on all the text (char level). With BPE use `split_text` first.
    """
    tokens = _check_tokens(tokens)
    cut = _split_point(len(tokens), val_fraction)
    return tokens[:cut], tokens[cut:]


# ----------------------------------------------------------------------------------------
# Token files: a split on disk, read slice by slice


class TokenFile:
    """The token ids of one split, stored as raw little-endian uint16 or uint32 in a file.

    `len(tokens)` is the number of ids; `tokens[a:b]` returns ids a..b-1 as an int32 array
    (b - a,). Each slice maps only its own bytes of the file with np.memmap and copies them
    out, and the mapping is closed at once: resident memory and address space stay the size
    of the windows being read, whatever the size of the file (a whole-file mapping would
    count the whole file against an address-space limit, and every page it ever touched
    against the resident set). The kernel's page cache still keeps hot pages in memory.
    The file stays open, so a dataset replaced on disk during a run does not change the ids
    that run reads.

    With `vocab_size`, every slice is checked to hold ids below it (a damaged file then
    gives a ValueError naming the file, not an IndexError deep in the model).

    Raises ValueError if the file's size is not a whole number of ids, or differs from
    `n_tokens` when that is given; FileNotFoundError if it is missing.
    """

    def __init__(self, path: str | os.PathLike, dtype, n_tokens: int | None = None,
                 vocab_size: int | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.vocab_size = vocab_size
        if self.dtype.kind != "u" or self.dtype.itemsize not in (2, 4):
            raise ValueError(f"token file dtype {np.dtype(dtype)} must be uint16 or uint32")
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: token file not found") from None
        size = os.fstat(self._file.fileno()).st_size
        n, extra = divmod(size, self.dtype.itemsize)
        problem = None
        if extra:
            problem = f"{size} bytes is not a whole number of {self.dtype.name} ids (truncated or damaged)"
        elif n_tokens is not None and n != n_tokens:
            problem = f"holds {n} {self.dtype.name} ids ({size} bytes), its record says {n_tokens} (truncated or replaced)"
        if problem:
            self._file.close()
            raise ValueError(f"{self.path}: {problem}")
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError(f"a TokenFile is read by slices (tokens[a:b]), not {type(key).__name__}")
        start, stop, step = key.indices(self._n)
        if step != 1:
            raise ValueError("a TokenFile slice must have step 1")
        if stop <= start:
            return np.zeros(0, dtype=np.int32)
        mapped = np.memmap(self._file, dtype=self.dtype, mode="r", offset=start * self.dtype.itemsize,
                           shape=(stop - start,))
        ids = mapped.astype(np.int32)  # (stop - start,) a copy, so the mapping can close
        del mapped
        if self.vocab_size is not None and ids.max() >= self.vocab_size:
            i = int(np.argmax(ids >= self.vocab_size))
            raise ValueError(f"{self.path}: token id {int(ids[i])} at position {start + i} is not below "
                             f"the vocabulary size {self.vocab_size} (damaged file)")
        return ids

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """All ids at once (reads the whole file into memory)."""
        ids = self[:]
        return ids if dtype is None else ids.astype(dtype)

    def close(self) -> None:
        self._file.close()

    def __del__(self):
        if hasattr(self, "_file"):
            self._file.close()

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, {self.dtype.name}, {self._n:,} ids)"


# ----------------------------------------------------------------------------------------
# Windows of block_size + 1 tokens: x = window[:-1], y = window[1:]


def _check_tokens(tokens) -> np.ndarray | TokenFile:
    if isinstance(tokens, TokenFile):
        return tokens  # checked when opened; np.asarray would read the whole file
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    return tokens


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")


def _check_length(tokens, block_size: int) -> None:
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"this split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1} "
            f"needed for one window; use a smaller block_size or more text"
        )


def _windows(tokens, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    # one slice per window: a TokenFile reads only these bytes, an array gives views
    w = np.zeros((len(starts), block_size + 1), dtype=np.int32)  # (B, T+1)
    for row, s in enumerate(starts):
        w[row] = tokens[s : s + block_size + 1]
    return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])  # (B, T), (B, T)


def batch_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch that process `rank` of `world_size` computes.

    Contiguous, sizes differing by at most one, in rank order: concatenating every rank's
    rows gives the whole batch, so `get_batch(..., rows=batch_rows(B, r, N))` over r = 0..N-1
    is the single-process batch for the same rng (data-parallel training).
    """
    _check_positive(batch_size=batch_size, world_size=world_size)
    if not (isinstance(rank, (int, np.integer)) and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size})")
    return slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)


def get_batch(
    tokens, batch_size: int, block_size: int, rng: np.random.Generator, rows: slice | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A random batch of windows from one split (an int array or a TokenFile).

    Returns x, y: int32 (B, T) with B = batch_size, T = block_size and y[:, t] = x[:, t+1]
    (y[:, -1] is the token after the window). Window starts are uniform over every start
    that fits, drawn from `rng` (a numpy Generator), so a seeded rng repeats the batches.

    `rows` (see `batch_rows`) keeps only those rows of the batch: all batch_size starts are
    still drawn, so the rng advances the same whatever the rows, and only the kept windows
    are read.

    Raises ValueError if the split is shorter than block_size + 1 tokens.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    tokens = _check_tokens(tokens)
    _check_positive(batch_size=batch_size, block_size=block_size)
    _check_length(tokens, block_size)
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)  # (B,) last: len-T-1
    if rows is not None:
        starts = starts[rows]
    return _windows(tokens, starts, block_size)


def eval_windows(
    tokens, block_size: int, n_windows: int | None = None, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed windows for validation loss, the same on every call (float32 vs int8, runs).

    Give at most one of:
        stride:    windows start at 0, stride, 2*stride, ... while they fit;
        n_windows: that many windows, start points spread evenly from the first to the last
                   start that fits (fewer if the split is short; no duplicates).
    Neither: stride = block_size, non-overlapping windows covering the split.

    Returns x, y: int32 (N, T) as in get_batch; slice them into batches to evaluate.
    """
    tokens = _check_tokens(tokens)
    _check_positive(block_size=block_size)
    _check_length(tokens, block_size)
    last = len(tokens) - block_size - 1  # last start whose window fits
    if n_windows is not None and stride is not None:
        raise ValueError("give n_windows or stride, not both")
    if n_windows is not None:
        _check_positive(n_windows=n_windows)
        starts = np.unique(np.linspace(0, last, min(n_windows, last + 1)).round().astype(np.int64))
    else:
        stride = block_size if stride is None else stride
        _check_positive(stride=stride)
        starts = np.arange(0, last + 1, stride)
    return _windows(tokens, starts, block_size)
