"""Directories that minitf replaces as a whole (checkpoints, datasets): the lock of their one
writer, the swap that replaces them, the recovery of an interrupted swap, and the write
checks made before any work.

Around a directory DIR, minitf uses three hidden names in DIR's parent and no others:

    .DIR.minitf-lock   the lock file, held by the one process writing DIR
    .DIR.minitf-tmp    the next version of DIR while it is written
    .DIR.minitf-old    the previous version of DIR during the swap

The lock (`DirectoryLock`). An exclusive `flock` on .DIR.minitf-lock, taken without waiting:
a second writer gets a `LockedError` naming the PID, host and command that the holder wrote
into the file. The kernel drops a flock when the process holding it ends, however it ends
(kill -9 included), so a lock is never stale: the file a dead process leaves behind is
simply locked again and rewritten. Nothing is inferred from a PID (it may have been reused
by an unrelated process since); the PID in the file is only what the message shows. flock
works on local filesystems and, on Linux, on NFS (the client turns it into a POSIX lock that
the server arbitrates); a filesystem that has no locks at all is refused with one line.
Releasing deletes the file; a process that has opened the file just before and then locks
the deleted one notices (the file's inode is no longer the path's) and starts again, so two
processes never both hold DIR. The lock is re-entrant within a thread (`train` holds it for
the whole run and every save takes it again); another thread is refused like another
process.

The swap (`swap_in`). The complete new version, fsynced, waits in .DIR.minitf-tmp; then
DIR -> .DIR.minitf-old, .DIR.minitf-tmp -> DIR, fsync of the parent, delete
.DIR.minitf-old. At every instant the newest complete version is under one of the three
names, and what a reader finds under DIR is complete.

Recovery (`recover`), before anything else by every command that opens or writes DIR,
under the lock (a directory whose writer is alive is left to it): among .DIR.minitf-tmp,
DIR and .DIR.minitf-old (newest first), the newest complete version, by the caller's
`complete` test, becomes DIR and the older leftovers are deleted; an incomplete temporary
directory (a save that died while writing it) is deleted, since it never was loadable.
Nothing else is ever deleted: a complete version goes only when a newer complete one takes
its place.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import socket
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .config import format_bytes
from .fileio import fsync_dir

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock, released with the process as well
    fcntl = None
    import msvcrt

LOCK_SUFFIX, TMP_SUFFIX, OLD_SUFFIX = ".minitf-lock", ".minitf-tmp", ".minitf-old"
PROBE_BYTES = 1 << 16  # the size of the test write


class LockedError(OSError):
    """Another process (or thread) is writing the directory."""


class Recovered(UserWarning):
    """A leftover of an interrupted save was found and the newest complete version restored."""


def sibling(directory: Path, suffix: str) -> Path:
    """`.DIR<suffix>` beside DIR: the lock file, the temporary and the previous version."""
    return directory.with_name(f".{directory.name}{suffix}")


def temporary(directory: Path) -> Path:
    return sibling(directory, TMP_SUFFIX)


def previous(directory: Path) -> Path:
    return sibling(directory, OLD_SUFFIX)


# ----------------------------------------------------------------------------------------
# The lock


@dataclass
class _Held:
    fd: int
    thread: int
    depth: int


_held: dict[Path, _Held] = {}  # the locks this process holds, by lock file path


def _forget_inherited_locks() -> None:
    # A forked child shares its parent's open lock files; closing its copies leaves the
    # parent's locks in place (a flock goes when the last descriptor of it closes).
    for held in _held.values():
        os.close(held.fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_locks)


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it into the lock file."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8"))
        where = "" if info["host"] == socket.gethostname() else f" on host {info['host']}"
        return f"PID {int(info['pid'])}{where}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "PID unknown: it is starting"  # locked, not yet written


class DirectoryLock:
    """The exclusive lock of the writer of `directory` (module docstring).

        with DirectoryLock(out):         # or lock = DirectoryLock(out); lock.acquire() ...
            ...                          # lock.release()

    Raises (from acquire):
        LockedError: another process, or another thread of this one, holds it.
        OSError: the lock file cannot be created (a parent that is not writable) or the
            filesystem has no locks; one line naming the directory.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).resolve()
        self.path = sibling(self.directory, LOCK_SUFFIX)
        self._acquired = False

    def acquire(self) -> "DirectoryLock":
        if self._acquired:
            return self
        held = _held.get(self.path)
        if held is not None:
            if held.thread != threading.get_ident():
                raise LockedError(f"{self.directory} is being written by another thread of "
                                  f"this process (PID {os.getpid()})")
            held.depth += 1
        else:
            _held[self.path] = _Held(self._lock_file(), threading.get_ident(), 1)
        self._acquired = True
        return self

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        held = _held[self.path]
        held.depth -= 1
        if held.depth == 0:
            del _held[self.path]
            if fcntl is not None:  # delete while still holding it: see the module docstring
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            os.close(held.fd)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _lock_file(self) -> int:
        where = f"cannot lock {self.directory}"
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            blocked = next((p for p in (parent, *parent.parents) if p.exists()), parent)
            if not blocked.is_dir():
                raise OSError(errno.ENOTDIR,
                              f"{where}: {blocked} is a file, not a directory") from None
            raise OSError(e.errno, f"{where}: cannot create {parent} ({e.strerror})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise OSError(e.errno, f"{where}: cannot create {self.path.name} in {parent} "
                                       f"({e.strerror})") from None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError as e:
                holder = _holder(fd) if isinstance(e, BlockingIOError) or fcntl is None else ""
                os.close(fd)
                if holder:
                    raise LockedError(f"{self.directory} is being written by another minitf "
                                      f"process ({holder}); wait for it to end or choose another "
                                      f"directory") from None
                raise OSError(e.errno, f"{where}: the filesystem of {self.path.parent} does not "
                                       f"support file locks ({e.strerror})") from None
            if fcntl is None or self._still_linked(fd):
                break
            os.close(fd)  # locked a file its last holder had just deleted: again
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}
        try:  # only for the message a second writer gets: a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        except OSError:
            pass
        return fd

    def _still_linked(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


# ----------------------------------------------------------------------------------------
# The swap and its recovery


def swap_in(tmp: Path, directory: Path) -> None:
    """Put the complete, fsynced folder `tmp` in the place of `directory` (module docstring).
    The caller holds the lock."""
    old = previous(directory)
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)  # an older leftover: `directory` is newer and complete
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old.exists():
        shutil.rmtree(old)


def recover(directory: str | os.PathLike, complete: Callable[[Path], bool], what: str,
            extra_temporaries: Iterable[Path] = ()) -> Path:
    """Restore the newest complete version of `directory` after an interrupted swap.

    Args:
        complete: tells a complete version (loadable) from a partial one.
        what: "checkpoint" or "dataset", for the message.
        extra_temporaries: other names of unfinished versions (older minitf's), newest first.
    Returns:
        `directory` (resolved). Says what it did in one line (a `Recovered` warning). Without
        the lock (another process is writing the directory, or its parent is read-only) it
        changes nothing: a reader then finds the newest complete version with `readable`.
    """
    directory = Path(directory).resolve()
    tmp, old = temporary(directory), previous(directory)
    temporaries = [p for p in (tmp, *extra_temporaries) if p.exists()]
    if not temporaries and not old.exists():
        return directory
    try:
        lock = DirectoryLock(directory).acquire()
    except OSError:  # being written (its writer will recover it), or a read-only place
        return directory
    try:
        temporaries = [p for p in (tmp, *extra_temporaries) if p.exists()]  # now, locked
        news = [p for p in temporaries if complete(p)]
        for p in temporaries:
            if p not in news[:1]:
                shutil.rmtree(p)  # partial, never loadable; or older than news[0]
        if news:  # newer than DIR and .DIR.minitf-old, which it replaces
            if news[0] != tmp:
                os.replace(news[0], tmp)
            swap_in(tmp, directory)
            _say(f"{directory}: a save was interrupted after its new {what} was complete; "
                 f"restored that {what}")
        elif old.exists():
            if not directory.exists():
                if complete(old):
                    os.replace(old, directory)
                    fsync_dir(directory.parent)
                    _say(f"{directory}: a save was interrupted between its two renames; "
                         f"restored the previous {what} from {old.name}")
            elif complete(directory):
                shutil.rmtree(old)  # the swap was done; only the deletion was interrupted
        if temporaries and not news:
            _say(f"{directory}: removed the unfinished {what} of an interrupted save "
                 f"({', '.join(p.name for p in temporaries)})")
    finally:
        lock.release()
    return directory


def readable(directory: Path, what: str) -> Path:
    """Where a reader finds `directory`'s newest complete version when `recover` could not
    restore it: `directory`, else its previous version (with a one-line warning)."""
    old = previous(directory)
    if not directory.exists() and old.is_dir():
        _say(f"{directory} is missing but {old.name} exists: another process is saving it, or "
             f"a save was interrupted in a folder this one cannot write; reading the previous "
             f"{what}")
        return old
    return directory


def _say(message: str) -> None:
    warnings.warn(message, Recovered, stacklevel=4)


# ----------------------------------------------------------------------------------------
# Write checks


def probe_write(directory: str | os.PathLike, need_bytes: int = 0, what: str = "") -> None:
    """Check now that a new version of `directory` can be written: a real test write (and
    fsync) beside it, where the new version will be written, and `need_bytes` free there.

    Raises:
        OSError: one line naming the directory and the reason (not writable, read-only
            filesystem, ENOSPC, or less free space than `need_bytes`).
    """
    directory = Path(directory).resolve()
    name = f"{what} {directory}".strip()
    probe = sibling(directory, f".minitf-probe-{os.getpid()}")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, f"{name} cannot be written: a test write in {directory.parent} "
                               f"failed ({e.strerror or e})") from None
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(directory.parent).free
    if free < need_bytes:
        raise OSError(28, f"{name}: {format_bytes(free)} free on its filesystem, one more "
                          f"version of it needs {format_bytes(need_bytes)}; free some space "
                          f"or choose another place")

