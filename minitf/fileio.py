"""Files written atomically and JSON read with one-line errors: what every module that
touches disk shares (checkpoints, tokenizers, the corpus cache, reports, pictures).

A write goes to a temporary file beside its target, is fsynced, then renamed onto it, so a
reader sees either the old file or the whole new one, never a part. A failed write (a full
disk, a read-only folder) removes its temporary file and raises an OSError that names the
target, not the temporary file. Whole directories are replaced by minitf.rundir.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike):
    """Yield a temporary path beside `path` for the body to write; if the body succeeds,
    fsync it and rename it onto `path` (os.replace is atomic on POSIX and Windows). On
    failure, delete it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically: the file is either the old one or all of `data`."""
    with atomic_target(path) as tmp:
        with open(tmp, "xb") as f:  # created with the usual umask permissions
            f.write(data)


def _json_default(obj):
    # numpy scalars and arrays (losses, seeds) are common in meta; store them as plain JSON.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def save_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """Write `obj` as strict JSON (no NaN/inf: other readers reject them) atomically."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot write {path} as JSON: {e} (NaN/inf: store None or a string)") from e
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError, what: str = "file"):
    """Parse a JSON file; raise `error` with one line naming the file if it is missing,
    unreadable or not valid JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read {what}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path}: invalid JSON: nested too deeply") from None


def regular_file(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """`path` if it names a regular file (with `folder`, or a folder): never a device, a
    FIFO or a socket, which /dev/zero shows can be read until memory runs out.

    Raises:
        FileNotFoundError: nothing is there; OSError: it cannot be looked at (a symlink
        loop, no permission); ValueError: it is something else. Each names `what` and path.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file" + (" or folder" if folder else "")) \
            from None
    except OSError as e:
        raise OSError(e.errno, f"{what} {path}: {e.strerror or e}") from None
    if not (stat.S_ISREG(mode) or folder and stat.S_ISDIR(mode)):
        raise ValueError(f"{what} {path}: not a regular file" + (" or a folder" if folder else ""))
    return path
