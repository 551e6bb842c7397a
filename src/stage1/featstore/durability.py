"""Durability of a store on disk: fsync, the atomic commit of attributes, the one-writer lock, stale-temp sweep.

A store's rows become visible only when ``n_committed`` moves past them, so written chunk files are
fsynced before the marker, and the marker (one zarr.json write) is fsynced after it. One process
writes a store at a time (an advisory ``flock`` the kernel drops if the writer dies); a writer that
takes the lock may delete the ``*.partial`` temp files a killed writer left behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import zarr

from stage1._core.io import PARTIAL_SUFFIX

from .errors import StoreBusy

#: The lock file inside a store folder.
LOCK_NAME = ".featstore.lock"


def fsync_path(path: Path) -> None:
    """Best-effort fsync of a file or directory (durability of the committed rows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_chunks(root: Path, arrays: Iterable[tuple[str, zarr.Array]], first: int, last: int) -> None:
    """fsync chunk files ``first..last`` (row-chunk indices) of each (name, array) and their folders."""
    for c in range(first, last + 1):
        for name, arr in arrays:
            key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
            f = root / name / key
            fsync_path(f)
            fsync_path(f.parent)


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


class WriterLock:
    """An exclusive advisory lock (flock) on STORE/.featstore.lock; the kernel drops it if we die."""

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

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if not self.fh.closed:
            self.fh.close()
