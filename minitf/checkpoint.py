"""Checkpoints: safetensors weights and JSON beside them; never pickle; every write atomic.

A checkpoint is a directory:

    config.json            GPTConfig.to_dict(), the model configuration only
    tokenizer.json         see minitf.tokenizer
    optimizer.safetensors  optional: AdamW moments "m.<name>", "v.<name>" per parameter
    train_state.json       with it: {"step": int, ...} (e.g. "rng_state", the learning rate)
    meta.json              optional, free-form: command line, seed, losses, quantization...
    (pictures, reports)    optional files the writer adds in the same save (loss_curve.png,
                           quant_report.json, ...)
    model.safetensors      the parameters by GPT-2 name, exactly the keys of
                           `param_shapes(config)` (the tied head is `wte`, stored once);
                           metadata {"format": "minitf", "format_version": "1",
                           "dtype": "float32", "sha256": <checksum of the tensor data>,
                           "files": <the seal>}

The seal, "files", is a JSON object {file name: SHA-256 of its bytes} of every other file
the save wrote: model.safetensors is written last and seals the directory. Loading verifies
each file it reads against the seal and refuses, naming the file, one that differs, that is
missing, or that the seal does not list (a meta.json added later, say). A checkpoint
written before the seal existed (no "files") loads with the tensor checksum alone, and a
directory written by transformers (minitf.hf) has no checksum of its own; the next save
of either writes a sealed one. minitf versions that do not know the seal ignore it.

`save_checkpoint` holds the directory's lock (minitf.rundir: one writer at a time, a second
one is refused naming the first), writes everything into a sibling `.DIR.minitf-tmp`, then
swaps it in (DIR -> .DIR.minitf-old, .DIR.minitf-tmp -> DIR, delete .DIR.minitf-old). Every
save and every load first recovers what an interrupted save left (`recover_checkpoint`):
the newest complete checkpoint among the three names becomes DIR, so a crash at any
moment loses nothing that was loadable, and no command ever deletes a loadable checkpoint
except by replacing it with a newer complete one.

Loading checks names, shapes, dtypes, finiteness, the checksums and the config, and turns
any damaged, truncated, tampered or missing file into a one-line `CheckpointError` naming
the file. Only safetensors and JSON are read, so loading cannot run code; a file larger
than this machine's memory is refused before it is read.

Which tensors a checkpoint holds is a layout, {name: (shape, dtype)} (minitf.tensors): by
default `tensor_layout(config)`, every parameter in the checkpoint's float dtype. A quantized
checkpoint passes its own layout (int8 weights, float32 scales) to `save_checkpoint`, and to
`load_checkpoint` either that or a function `layout(config, meta) -> dict` such as
`minitf.tensors.checkpoint_layout`, which derives it from what meta.json records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.numpy

from . import hf
from .config import GPTConfig, SizeError, check_memory, format_bytes, is_int
from .fileio import fsync_dir, read_json, save_json_atomic, write_bytes_atomic  # noqa: F401 (re-exported)
from .rundir import TMP_SUFFIX, DirectoryLock, probe_write, readable, recover, swap_in, temporary
from .tensors import Layout, check_tensors, optimizer_layout, tensor_layout
from .tokenizer import TokenizerError, load_tokenizer

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAIN_STATE_FILE = "train_state.json"
META_FILE = "meta.json"
CHECKPOINT_FILES = (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE, META_FILE)
SEAL_KEY = "files"  # model.safetensors metadata: {file name: SHA-256} of the other files
# safetensors' own bound on the JSON header; a larger length field means a damaged file
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or does not match its config."""


def load_json(path: str | os.PathLike):
    """Read a JSON file; CheckpointError naming the file if it is missing or invalid."""
    return read_json(path, CheckpointError, "file")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _tensor_checksum(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: catches corruption in the data section,
    which safetensors itself (header checks only) cannot see."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))  # its bytes, without a copy
    return h.hexdigest()


def save_safetensors_atomic(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` as safetensors atomically; metadata (str -> str) gets a "sha256" entry
    that `load_safetensors` verifies."""
    metadata = dict(metadata or {})
    if "sha256" in metadata:
        raise ValueError('metadata key "sha256" is reserved for the tensor checksum')
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    metadata["sha256"] = _tensor_checksum(tensors)
    # Serialize in memory and write it ourselves: safetensors' save_file creates files with
    # mode 0600, unreadable by other users of a shared or installed checkpoint.
    write_bytes_atomic(path, safetensors.numpy.save(tensors, metadata=metadata))


def _parse_header(f, size: int, path) -> tuple[dict, int]:
    """The JSON header of the safetensors file `f` (binary, at its start, `size` bytes long)
    and the offset where its data begins. CheckpointError naming `path` if it is not one.

    The format: an 8-byte little-endian length n, then n bytes of JSON, an object mapping
    each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the
    data that follows) plus an optional "__metadata__" {str: str}.
    """
    if size < 8:
        raise CheckpointError(f"{path}: truncated ({size} bytes; not a safetensors file)")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise CheckpointError(
            f"{path}: truncated or corrupt: header claims {n} bytes, file has {size - 8}"
        )
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: corrupt safetensors header: {n} bytes, more than the "
                              f"format's limit of {MAX_HEADER_BYTES}")
    try:
        header = json.loads(f.read(n))
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too "
                              f"deeply)") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The header of a safetensors file, read without reading its tensors (see
    `_parse_header` for its form). Raises CheckpointError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _parse_header(f, os.fstat(f.fileno()).st_size, path)[0]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None


# the safetensors dtypes numpy holds, little-endian as the format stores them
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
                       "U8": "u1", "BOOL": "?"}


def _tensor_entries(header: dict, data_bytes: int, path) -> list[tuple[str, np.dtype, tuple, int]]:
    """(name, dtype, shape, offset into the data) of every tensor of a parsed header, in
    file order. CheckpointError naming `path` unless every entry is well formed (a known
    dtype, a shape of integers >= 0, data_offsets [begin, end] spanning the shape's bytes)
    and the tensors fill the `data_bytes` bytes of data one after another, no gap or
    overlap, as the format requires."""
    entries = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[t["dtype"]])
            shape, (begin, end) = tuple(t["shape"]), t["data_offsets"]
            ok = all(is_int(n) and n >= 0 for n in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors file: bad header entry for "
                                  f"tensor {name!r}: {str(t)[:80]}")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: corrupt safetensors file: tensor {name!r} has "
                                  f"{end - begin} bytes for shape {list(shape)} of {t['dtype']}")
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    filled = 0
    for begin, end, name, _, _ in entries:
        if begin != filled:
            raise CheckpointError(f"{path}: corrupt safetensors file: tensor {name!r} starts at "
                                  f"byte {begin} of the data, expected {filled} (a gap or overlap)")
        filled = end
    if filled != data_bytes:
        if filled > data_bytes:
            raise CheckpointError(f"{path}: truncated: {data_bytes} bytes of data, the header "
                                  f"needs {filled}")
        raise CheckpointError(f"{path}: corrupt safetensors file: {data_bytes - filled} bytes "
                              f"after the last tensor")
    return [(name, dtype, shape, begin) for begin, _, name, dtype, shape in entries]


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file -> (tensors, metadata), verifying the checksum if recorded.

    Each tensor is read straight from the file into its own array, one after another: the
    memory it takes is the tensors' size, never the file's bytes beside them.

    Raises CheckpointError naming the file if it is missing, truncated or corrupt.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # the arrays made from the file, before any is allocated
            check_memory({"its arrays": size}, f"reading {path}",
                         "it is larger than this machine can load")
            header, start = _parse_header(f, size, path)
            entries = _tensor_entries(header, size - start, path)
            tensors = {}
            for name, dtype, shape, begin in entries:
                a = np.empty(shape, dtype)
                f.seek(start + begin)
                if f.readinto(a.reshape(-1).view(np.uint8)) != a.nbytes:
                    raise CheckpointError(f"{path}: truncated while it was read")
                tensors[name] = a
    except SizeError as e:
        raise CheckpointError(str(e)) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors file: metadata is not an object of strings")
    expected = metadata.get("sha256")
    if expected is not None and _tensor_checksum(tensors) != expected:
        raise CheckpointError(f"{path}: tensor data does not match its SHA-256 checksum (corrupt)")
    return tensors, metadata


# ----------------------------------------------------------------------------------------
# Save


def save_checkpoint(
    directory: str | os.PathLike,
    params: dict[str, np.ndarray],
    config: GPTConfig,
    tokenizer,
    optimizer_state: dict | None = None,
    meta: dict | None = None,
    *,
    layout: Layout | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (see the module docstring). Returns its path.

    Args:
        params: {GPT-2 name: array}, exactly the names and shapes of `layout` (default:
            `param_shapes(config)`, all in one float dtype); every value finite.
        tokenizer: a CharTokenizer or BPETokenizer with `vocab_size == config.vocab_size`.
        optimizer_state: {"m": {name: array}, "v": {name: array}, "step": int, ...}; the
            moments go to optimizer.safetensors, every other (JSON-able) entry, e.g.
            "rng_state" = `rng.bit_generator.state`, to train_state.json.
        meta: free-form JSON-able dict -> meta.json.
        extra: writes further files (pictures, reports) into the new checkpoint, given its
            directory, before it is sealed; they are swapped in and sealed with the rest.

    Raises CheckpointError (nothing is written) for mismatched names/shapes/dtypes, NaN/inf
    weights or moments, a tokenizer/config vocabulary mismatch, or a DIR that exists and is
    not a checkpoint; minitf.rundir.LockedError if another process is writing DIR; OSError
    naming the file for a failed write (a full disk), which leaves DIR as it was. Files in
    an existing checkpoint DIR that are not checkpoint files (plots, notes) are carried over
    into the new one.
    """
    # a symlinked DIR: replace the directory it points to, keep the link
    directory = Path(directory).resolve()
    where = f"refusing to save checkpoint {directory}"
    if not isinstance(config, GPTConfig):
        raise CheckpointError(f"{where}: config is a {type(config).__name__}, not a GPTConfig")
    layout = layout or tensor_layout(config)
    dtype_name = check_tensors(params, layout, where, error=CheckpointError)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer has {tokenizer.vocab_size} tokens, config.vocab_size is "
            f"{config.vocab_size}"
        )
    if optimizer_state is not None:
        moments, train_state = _split_optimizer_state(optimizer_state, layout, where)
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{where}: meta must be a dict, got {type(meta).__name__}")
    with DirectoryLock(directory):
        recover_checkpoint(directory)
        _check_replaceable(directory)
        tmp = temporary(directory)
        tmp.mkdir(parents=True)
        swapping = False
        try:
            save_json_atomic(tmp / CONFIG_FILE, config.to_dict())
            tokenizer.save(tmp / TOKENIZER_FILE)
            if optimizer_state is not None:
                save_safetensors_atomic(tmp / OPTIMIZER_FILE, moments,
                                        {"format": "minitf", "format_version": str(FORMAT_VERSION)})
                save_json_atomic(tmp / TRAIN_STATE_FILE, train_state)
            if meta is not None:
                save_json_atomic(tmp / META_FILE, meta)
            if extra is not None:
                extra(tmp)
            seal = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            seal.update(_carry_over_extra_files(directory, tmp))
            save_safetensors_atomic(  # last: a complete model file seals a complete directory
                tmp / MODEL_FILE,
                params,
                {"format": "minitf", "format_version": str(FORMAT_VERSION), "dtype": dtype_name,
                 SEAL_KEY: json.dumps(seal, sort_keys=True)},
            )
            fsync_dir(tmp)
            swapping = True
            swap_in(tmp, directory)  # at every instant DIR, or a complete leftover, is loadable
        except BaseException:
            if not swapping:  # once swapping, the complete tmp is the newest: recovery keeps it
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return directory


def _split_optimizer_state(state: dict, layout: Layout, where: str) -> tuple[dict, dict]:
    """{"m": .., "v": .., "step": .., rest} -> (flat moment tensors, JSON train state)."""
    if not isinstance(state, dict) or not {"m", "v", "step"} <= set(state):
        raise CheckpointError(f'{where}: optimizer_state needs keys "m", "v" and "step"')
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise CheckpointError(f"{where}: optimizer step {step!r} must be an integer >= 0")
    moments = {f"{k}.{name}": a for k in ("m", "v") for name, a in state[k].items()}
    check_tensors(moments, optimizer_layout(layout), where + " (optimizer state)",
                  error=CheckpointError)
    train_state = {k: v for k, v in state.items() if k not in ("m", "v")}
    train_state["step"] = int(step)
    return moments, train_state


def _check_replaceable(directory: Path) -> None:
    """Refuse to swap away a directory that is not a minitf checkpoint (e.g. a typo'd '.')."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"refusing to save checkpoint {directory}: it exists and is a file")
    entries = list(directory.iterdir())
    if entries and not is_checkpoint(directory):
        raise CheckpointError(
            f"refusing to save checkpoint {directory}: it exists and is not a minitf checkpoint "
            f"(no minitf {MODEL_FILE} and {CONFIG_FILE}); choose a new or empty directory"
        )


def check_writable(directory: str | os.PathLike, need_bytes: int = 0) -> None:
    """Raise now what a later `save_checkpoint(directory, ...)` would meet: CheckpointError
    for a directory it refuses to replace, OSError (one line) if a test write beside it
    fails or fewer than `need_bytes` are free there (minitf.rundir.probe_write)."""
    directory = Path(directory).resolve()
    _check_replaceable(directory)
    probe_write(directory, need_bytes, "checkpoint directory")


def check_output(out: str | os.PathLike, replace: bool, command: str,
                 own: Callable[[dict], str | None]) -> None:
    """The rule of the commands that write a model made from another (quantize, convert)
    into --out: an `out` without a checkpoint is written; one holding a model the command
    did not write (`own(meta)` is None for its meta.json: a trained model, say) is never
    overwritten; one it wrote (`own(meta)` describes it: "an int8 model (...)") is replaced
    only with `replace` (--replace). Call it under the lock of `out`, after recovery.

    Raises:
        CheckpointError: a refusal, in one line naming --out, what it holds and the way out.
    """
    out = Path(out)
    if not is_checkpoint(out):
        return
    meta = load_json(out / META_FILE) if (out / META_FILE).is_file() else {}
    mine = own(meta if isinstance(meta, dict) else {})
    if mine is None:
        raise CheckpointError(f"--out {out} holds a minitf model that {command} did not write; "
                              f"choose another directory ({command} never overwrites one)")
    if not replace:
        raise CheckpointError(f"--out {out} already holds {mine}; choose another directory, or "
                              f"add --replace to replace it")


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """True if `directory` holds a minitf model.safetensors (by its metadata) and a config.json."""
    directory = Path(directory)
    model, config = directory / MODEL_FILE, directory / CONFIG_FILE
    if not (model.is_file() and config.is_file()):
        return False
    try:
        metadata = read_safetensors_header(model).get("__metadata__")
    except CheckpointError:
        return False
    return isinstance(metadata, dict) and metadata.get("format") == "minitf"


def _carry_over_extra_files(source: Path, dest: Path) -> dict[str, str]:
    """Copy the files of `source` that are not checkpoint files and not already in `dest`
    (pictures, notes) into `dest`; returns the seal entries of those that the seal of
    `source` lists unchanged (minitf wrote them; a user's own files stay unsealed)."""
    # Copy, not move: until the swap, the old checkpoint must stay complete.
    if not source.is_dir():
        return {}
    try:
        old_seal = _seal(read_safetensors_header(source / MODEL_FILE), source / MODEL_FILE) or {}
    except CheckpointError:
        old_seal = {}
    sealed = {}
    for entry in source.iterdir():
        if entry.name in CHECKPOINT_FILES or entry.name.endswith(".tmp") \
                or (dest / entry.name).exists():  # written by this save
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name)
        else:
            shutil.copy2(entry, dest / entry.name)
            if entry.name in old_seal and file_sha256(dest / entry.name) == old_seal[entry.name]:
                sealed[entry.name] = old_seal[entry.name]
    return sealed


def _seal(header: dict, model_path: Path) -> dict[str, str] | None:
    """The seal {file name: SHA-256} in a model.safetensors header; None if it has none (a
    checkpoint from before the seal). CheckpointError if it is malformed."""
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or SEAL_KEY not in metadata:
        return None
    try:
        seal = json.loads(metadata[SEAL_KEY])
    except (TypeError, ValueError):
        seal = None
    if not (isinstance(seal, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in seal.items())):
        raise CheckpointError(f'{model_path}: corrupt metadata: "{SEAL_KEY}" is not an object of '
                              f'file checksums')
    return seal


# ----------------------------------------------------------------------------------------
# Load


@dataclasses.dataclass
class Checkpoint:
    """What `load_checkpoint` returns."""

    params: dict[str, np.ndarray]  # {GPT-2 name: array}, in the order of the layout
    config: GPTConfig
    tokenizer: object  # CharTokenizer | BPETokenizer
    optimizer_state: dict | None  # {"m": {...}, "v": {...}, "step": int, ...} or None
    meta: dict  # meta.json, {} if absent
    path: Path  # the directory actually read (.DIR.minitf-old after an interrupted save)

    def __repr__(self) -> str:
        """One line without the arrays: the path, config, training step (None without an
        optimizer state), the weight tensors' count and bytes, the optimizer's, the
        tokenizer's kind and size. E.g. Checkpoint(path=PosixPath('runs/char'),
        config=GPTConfig(...), step=2000, tensors=28, bytes=3339264 (3.3 MB),
        optimizer=56 tensors, bytes=6678528 (6.7 MB), tokenizer=CharTokenizer(65 tokens))."""
        def size(arrays) -> str:
            n = sum(int(a.nbytes) for a in arrays)
            return f"{n} ({format_bytes(n)})"

        opt = self.optimizer_state
        if opt is None:
            step, optimizer = None, "None"
        else:
            moments = [a for key in ("m", "v") for a in opt.get(key, {}).values()]
            step, optimizer = opt.get("step"), f"{len(moments)} tensors, bytes={size(moments)}"
        tok = self.tokenizer
        return (f"Checkpoint(path={self.path!r}, config={self.config!r}, step={step!r}, "
                f"tensors={len(self.params)}, bytes={size(self.params.values())}, "
                f"optimizer={optimizer}, tokenizer={type(tok).__name__}"
                f"({getattr(tok, 'vocab_size', '?')} tokens))")


# reads of a checkpoint that saves keep swapping out under the reader before it gives up: a
# training run saves once per evaluation, but a writer saving in a loop on a loaded 2-core
# machine (tests/test_faults.py) swapped three reads in a row
LOAD_ATTEMPTS = 10


def load_checkpoint(
    directory: str | os.PathLike,
    dtype=np.float32,
    *,
    layout: Layout | Callable[[GPTConfig, dict], Layout] | None = None,
    optimizer: bool = True,
) -> Checkpoint:
    """Load and verify a checkpoint directory, after recovering an interrupted save.

    Args:
        dtype: float dtype to return the parameters in (None: as stored). Tensors that the
            layout gives an explicit dtype (int8 weights, say) are returned as stored.
        layout: {name: (shape, dtype or None)} or a function (config, meta) -> that dict
            (raising ValueError for a meta.json it cannot read); default
            `tensor_layout(config)`.
        optimizer: also load and check the optimizer state (False for inference, which
            needs only the weights).

    Raises CheckpointError with a one-line message naming the file for: a missing directory
    or file, invalid JSON, a bad config (minitf.config.SizeError: absurd sizes), a damaged
    tokenizer, a truncated or corrupt safetensors file, a file that does not match the
    checkpoint's seal, missing/unexpected tensors, wrong shapes or dtypes, NaN/inf values,
    a model file larger than this machine's memory.
    """
    requested = directory
    for attempt in range(LOAD_ATTEMPTS):
        directory = readable(recover_checkpoint(requested), "checkpoint")
        before = _identity(directory)
        try:
            return _load(directory, dtype, layout, optimizer)
        except CheckpointError:
            # a save swapped the directory while it was read: read the new one
            if attempt == LOAD_ATTEMPTS - 1 or _identity(directory) == before:
                raise
    raise AssertionError("unreachable")


def _identity(directory: Path):
    """Which directory is under this name: a swap puts another one there (its inode number
    may be a reused one, its change time is new)."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _load(directory: Path, dtype, layout, optimizer: bool) -> Checkpoint:
    if not directory.is_dir():
        if directory.exists():
            raise CheckpointError(f"{directory}: not a checkpoint directory (it is a file)")
        raise CheckpointError(f"{directory}: no checkpoint here (directory not found)")
    if hf.is_hf_directory(directory):  # written by transformers' save_pretrained: see minitf.hf
        params, config, tokenizer, meta = hf.read_hf_directory(directory, dtype)
        check_tensors(params, tensor_layout(config), str(directory), error=CheckpointError)
        return Checkpoint(params, config, tokenizer, None, meta, directory)
    model_path = directory / MODEL_FILE
    files = _SealedFiles(directory, _seal(read_safetensors_header(model_path), model_path))
    config_path = directory / CONFIG_FILE
    try:
        config = GPTConfig.from_dict(load_json(config_path))
    except (ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{config_path}: invalid config: {e}") from None
    meta_path = directory / META_FILE
    meta = load_json(meta_path) if files.exists(META_FILE) else {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: must be a JSON object, got {type(meta).__name__}")
    # the tokenizer's seal first: a file changed since the save must not reach the
    # `tokenizers` library (Rust), which may panic on hostile input rather than raise
    files.check(TOKENIZER_FILE)
    try:
        tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{directory / TOKENIZER_FILE}: tokenizer has {tokenizer.vocab_size} tokens but "
            f"{config_path} says vocab_size={config.vocab_size}"
        )
    if layout is None:
        layout = tensor_layout(config)
    elif callable(layout):
        try:
            layout = layout(config, meta)
        except ValueError as e:
            raise CheckpointError(f"{meta_path}: {e}") from None
    # what was read is what was saved (a config that is valid but not this model's):
    # checked once it is known to parse, so that damage is reported as what it is, and
    # before the large files are read
    files.check(CONFIG_FILE, META_FILE, *files.extras())
    tensors, metadata = load_safetensors(model_path)
    _check_format(model_path, metadata)
    stored_dtype = check_tensors(tensors, layout, str(model_path), error=CheckpointError)
    if stored_dtype != "none" and metadata.get("dtype") != stored_dtype:
        raise CheckpointError(
            f"{model_path}: tensors are {stored_dtype} but metadata says dtype="
            f"{metadata.get('dtype')!r}"
        )
    params = {}
    for name, (_, explicit_dtype) in layout.items():  # layout order = param_shapes order
        a = tensors[name]
        params[name] = a if explicit_dtype is not None or dtype is None else a.astype(dtype, copy=False)

    optimizer_state = None
    opt_path = directory / OPTIMIZER_FILE
    if optimizer and files.exists(OPTIMIZER_FILE):
        moments, opt_meta = load_safetensors(opt_path)
        _check_format(opt_path, opt_meta)
        check_tensors(moments, optimizer_layout(layout), str(opt_path), error=CheckpointError)
        state_path = directory / TRAIN_STATE_FILE
        files.exists(TRAIN_STATE_FILE)
        train_state = load_json(state_path)
        if not isinstance(train_state, dict) or not is_int(train_state.get("step")) \
                or train_state["step"] < 0:
            raise CheckpointError(f'{state_path}: must be a JSON object with an integer "step" '
                                  f'>= 0')
        files.check(OPTIMIZER_FILE, TRAIN_STATE_FILE)
        optimizer_state = {
            **train_state,
            "m": {name: moments["m." + name] for name in params},
            "v": {name: moments["v." + name] for name in params},
        }
    return Checkpoint(params, config, tokenizer, optimizer_state, meta, directory)


class _SealedFiles:
    """The files of a checkpoint directory and its seal (None: a checkpoint from before the
    seal, whose files are not checked)."""

    def __init__(self, directory: Path, seal: dict[str, str] | None):
        self.directory, self.seal = directory, seal
        self.model = directory / MODEL_FILE

    def exists(self, name: str) -> bool:
        """Is `name` part of the checkpoint? With a seal, a checkpoint file it lists must
        exist and a file it does not list must not. CheckpointError otherwise."""
        path = self.directory / name
        present = path.is_file()
        if self.seal is None or present == (name in self.seal) or name not in CHECKPOINT_FILES:
            return present
        if present:
            raise CheckpointError(f"{path}: not part of the checkpoint as it was saved (the seal "
                                  f"in {self.model} does not list it)")
        raise CheckpointError(f"{path}: file not found (the seal in {self.model} lists it)")

    def extras(self) -> list[str]:
        """The sealed files that are not checkpoint files (pictures, reports)."""
        return [name for name in self.seal or {} if name not in CHECKPOINT_FILES]

    def check(self, *names: str) -> None:
        """Each of `names` that is part of the checkpoint matches its SHA-256 in the seal."""
        for name in names:
            if self.seal is None or not self.exists(name) or name not in self.seal:
                continue
            path = self.directory / name
            try:
                digest = file_sha256(path)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot read: {e}") from None
            if digest != self.seal[name]:
                raise CheckpointError(f"{path}: does not match the SHA-256 recorded in "
                                      f"{self.model} (changed or damaged since it was saved)")


def recover_checkpoint(directory: str | os.PathLike) -> Path:
    """Restore the newest complete checkpoint after an interrupted save (minitf.rundir
    `recover`), saying so in one line (a minitf.rundir.Recovered warning). Returns the
    directory, resolved. Every command that opens or writes a checkpoint calls it first."""
    return recover(directory, _complete, "checkpoint")


def _complete(directory: Path) -> bool:
    """A loadable checkpoint: sealed, its model data matching its checksum and every sealed
    file its SHA-256; or, from before the seal, a minitf model file beside a config (never a
    temporary one of those, which may lack the files written after the model)."""
    model = directory / MODEL_FILE
    try:
        seal = _seal(read_safetensors_header(model), model)
        if seal is None:
            return not directory.name.endswith(TMP_SUFFIX) and is_checkpoint(directory)
        load_safetensors(model)
        files = _SealedFiles(directory, seal)
        files.check(*seal)
        return all(files.exists(name) for name in seal if name in CHECKPOINT_FILES)
    except (CheckpointError, OSError):
        return False


def _check_format(path: Path, metadata: dict) -> None:
    if metadata.get("format") != "minitf":
        raise CheckpointError(f'{path}: not a minitf file (metadata "format" is missing)')
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: format_version {version!r}; this minitf reads {FORMAT_VERSION}"
        )
