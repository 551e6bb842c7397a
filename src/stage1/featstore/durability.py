"""Durability of a store on disk: fsync, the atomic commit of attributes, the one-writer lock, stale-temp sweep.

A store's rows become visible only when ``n_committed`` moves past them, so written chunk files are
fsynced before the marker, and the marker (one zarr.json write) is fsynced after it; a failed fsync
raises ``NotDurable`` instead of letting the marker move over data that may not be on disk. One process
writes a store at a time (an advisory ``flock`` the kernel drops if the writer dies); a forked child
(a DataLoader worker) closes its inherited copy of the lock at once, so the lock dies with the process
that took it even if orphaned children live on. A writer that takes the lock may delete the
``*.partial`` temp files a killed writer left behind.
"""
from __future__ import annotations

import errno
import os
import weakref
from pathlib import Path
from typing import Any, Iterable

import zarr

from stage1._core.io import PARTIAL_SUFFIX

from .errors import NotDurable, StoreBusy

#: The lock file inside a store folder.
LOCK_NAME = ".featstore.lock"


def fsync_path(path: Path) -> None:
    """fsync a file or directory; a failure raises ``NotDurable`` (the caller must not commit past it).

    Only a directory that cannot be opened or fsynced at all on this filesystem (EINVAL / ENOTSUP /
    EISDIR / EACCES on the folder itself) is tolerated: that says nothing about the data's durability.
    """
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        if is_dir and exc.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise NotDurable(f"{path}: cannot open it to fsync ({exc.strerror or exc}); nothing was committed") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (is_dir and exc.errno in _DIR_FSYNC_UNSUPPORTED):
            full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
            raise NotDurable(f"{path}: fsync failed ({exc.strerror or exc}); the rows were not committed, "
                             + ("free space on that disk or pick another --out" if full else "check the disk")
                             + " and re-run to resume") from exc
    finally:
        os.close(fd)


#: errno values a filesystem gives when directories simply cannot be fsynced (not a data problem).
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EISDIR, errno.EACCES, errno.EBADF}


def fsync_chunks(root: Path, arrays: Iterable[tuple[str, zarr.Array]], first: int, last: int) -> None:
    """fsync chunk files ``first..last`` (row-chunk indices) of each (name, array) and their folders."""
    for c in range(first, last + 1):
        for name, arr in arrays:
            f = root / name / chunk_key(arr, c)
            fsync_path(f)
            fsync_path(f.parent)


def chunk_key(arr: zarr.Array, index: int) -> str:
    """The relative file name of row-chunk ``index`` of ``arr`` (e.g. ``c/1/0/0``)."""
    return arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))


def commit_attributes(group: zarr.Group, root: Path, update: dict[str, Any]) -> None:
    """Write ``update`` into the group attributes in one zarr.json write, then fsync it and the folder."""
    group.update_attributes(update)  # one atomic zarr.json write (attrs.update writes once per key)
    fsync_path(root / "zarr.json")
    fsync_path(root)


def sweep_partials(root: str | os.PathLike[str]) -> list[Path]:
    """Delete stale ``*.partial`` temp files a killed writer left behind; returns what was removed."""
    removed = []
    for p in Path(root).rglob(f"*{PARTIAL_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


#: Every lock this process holds; a forked child drops its inherited copies (``_drop_in_child``).
_HELD: "weakref.WeakSet[WriterLock]" = weakref.WeakSet()


def _drop_in_child() -> None:
    """After ``fork``: close this child's copies of the parent's lock files (the parent keeps its lock).

    ``flock`` belongs to the open file, which a fork shares; without this an orphaned worker (its
    parent killed with -9) would hold the store lock for as long as it lives.
    """
    for lock in list(_HELD):
        try:
            lock.fh.close()
        except OSError:  # pragma: no cover - closing our own copy cannot matter to the parent
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


class WriterLock:
    """An exclusive advisory lock (flock) on STORE/.featstore.lock, owned by this process alone.

    The kernel drops it when the process dies; forked children never keep it (see ``_drop_in_child``).
    """

    def __init__(self, root: Path) -> None:
        """Take the lock or raise ``StoreBusy`` at once (never waits)."""
        self.fh = open(root / LOCK_NAME, "a+")
        try:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - non-POSIX: no lock, one writer by convention
            pass
        except BlockingIOError:
            self.fh.close()
            raise StoreBusy(f"{root}: another process is writing this store; wait for it to finish") from None
        _HELD.add(self)

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        _HELD.discard(self)
        if not self.fh.closed:
            self.fh.close()
