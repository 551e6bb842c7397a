"""The feature store: one Zarr v3 group with `features` [N,V,D], `labels`, `ids`, `sha256` (and `split`).

``Store`` opens, creates, reads and writes one; ``write_store`` builds a complete one from arrays.
Write path: preallocate, write chunk-aligned row blocks, fsync them, then bump the `n_committed`
attribute, so a crash leaves everything below the marker intact and resume simply rewrites what
lies ahead of it (``durability``). Read path: whole chunk files are read straight into RAM
(``chunks``), with zarr as the fallback for stores written by other tools. Provenance checks live
in ``provenance``, the error classes in ``errors``; both are re-exported here.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import zarr

from stage1 import __version__
from stage1._core.constants import DEFAULT_CHUNK_ROWS, VIEW_LEVELS
from stage1._core.constants import FEATURE_DTYPES as DTYPES
from stage1._core.constants import STORE_SPLITS as SPLITS_NAME
from stage1._core.errors import ConfigError
from stage1._core.io import PARTIAL_SUFFIX, read_json, sha256_bytes, utc_timestamp

from .chunks import RawChunkReader, raw_readable
from .durability import LOCK_NAME, WriterLock, chunk_key, commit_attributes, fsync_chunks, sweep_partials
from .errors import NotDurable, ProvenanceMismatch, StoreBusy, StoreDiskError, StoreError
from .provenance import INFORMATIONAL_KEYS, check_provenance, provenance_differences

__all__ = [
    "CHUNKS_ATTR", "DEFAULT_CHUNK_ROWS", "DTYPES", "INFORMATIONAL_KEYS", "LOCK_NAME", "ROW_ARRAYS",
    "SCHEMA_VERSION", "SPLITS_NAME", "NotDurable", "ProvenanceMismatch", "Store", "StoreBusy", "StoreError", "provenance_differences", "row_hashes",
    "is_created", "sweep_partials", "unfinished_creation", "write_store",
]

SCHEMA_VERSION = 1

#: The attribute recording each committed row-chunk: {"<index>": {"rows": n, "files": {array: [bytes, sha256]}}}.
#: Stores written before it existed (0.1.0) lack it; they get a presence and size check of `features` only.
CHUNKS_ATTR = "chunk_files"

#: errno values of a disk that cannot take the store's writes: full (ENOSPC, EDQUOT) or read-only (EROFS).
DISK_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS") if hasattr(errno, name))

#: The arrays with one entry per row (all chunked along rows only).
ROW_ARRAYS = ("features", "labels", "ids", "sha256", "split", "view_levels", "view_params")


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Store:
    """A feature store folder. Open with ``Store.open`` / ``featstore.open_store``; build with ``create``."""

    def __init__(self, path: Path, group: zarr.Group, mode: str, lock: WriterLock | None = None) -> None:
        self.path = path
        self.group = group
        self.mode = mode
        self._lock = lock
        self._attrs = dict(group.attrs)
        self._arrays: dict[str, zarr.Array] = {}
        self._pending_chunks: dict[str, dict[str, Any]] = {}

    def _array(self, name: str) -> zarr.Array:
        """A member array, cached (opening one re-reads its zarr.json)."""
        if name not in self._arrays:
            if self.mode == "r+":  # every chunk file is written, even all-fill ones, so a missing file is damage
                # (the array takes its config from zarr's global config when opened, in every zarr >= 3.0.8)
                with zarr.config.set({"array.write_empty_chunks": True}):
                    arr = self.group[name]
            else:
                arr = self.group[name]
            self._arrays[name] = arr  # type: ignore[assignment]
        return self._arrays[name]

    def _open_arrays(self) -> None:
        """Open every row array once, turning zarr's metadata errors (a hand-edited array zarr.json:
        a bad shape, data type or chunk grid) into one StoreError naming the file."""
        for name in ROW_ARRAYS:
            try:
                if name in self.group:
                    self._array(name)
            except Exception as exc:  # zarr raises TypeError, ValueError and its own errors alike here
                raise StoreError(f"{self.path / name / 'zarr.json'}: zarr cannot read this array's metadata "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the store "
                                 "is damaged: restore it from a backup or re-extract") from None

    def has_array(self, name: str) -> bool:
        """True when the group holds array ``name`` (``split`` is optional)."""
        return name in self._arrays or name in self.group

    # ------------------------------------------------------------------ opening / creating
    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r") -> "Store":
        """Open an existing store; ``mode="r+"`` takes the writer lock and sweeps stale partial files."""
        root = Path(path)
        if not (root / "zarr.json").exists():
            raise StoreError(f"{root}: not a feature store (no zarr.json); run `extract` or `import-features` first")
        if unfinished_creation(root):
            raise StoreError(f"{root}: its creation was interrupted (no row was written); re-run `extract` "
                             "with the same --out to start it again")
        if mode not in ("r", "r+"):
            raise ConfigError(f"mode must be 'r' or 'r+', not {mode!r}")
        check_metadata(root)
        lock = None
        if mode == "r+":
            lock = WriterLock(root)
            sweep_partials(root)
        try:
            group = _open_group(root, mode)
            attrs = dict(group.attrs)
            check_attributes(root, attrs)
            version = attrs.get("schema_version")
            if version != SCHEMA_VERSION or not (root / "features" / "zarr.json").is_file():
                raise StoreError(
                    f"{root}: schema_version {version!r} is not {SCHEMA_VERSION} or arrays are missing; "
                    "re-extract or re-import it with this version"
                )
            store = cls(root, group, mode, lock)
            store._open_arrays()
            store.check_integrity()
        except BaseException:
            if lock:
                lock.release()
            raise
        return store

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        n_rows: int,
        views: int,
        dim: int,
        provenance: dict[str, Any],
        dtype: str = "float16",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        with_split: bool = False,
        extra_attrs: dict[str, Any] | None = None,
        view_param_names: Sequence[str] | None = None,
    ) -> "Store":
        """Preallocate an empty store (nothing committed) and return it open for writing.

        ``view_param_names``: also create ``view_levels`` [N, V] int8 (-1 = not a validator view) and
        ``view_params`` [N, V, P] float32 (NaN = not applicable), P = len(names), names kept in attrs.
        """
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        if chunk_rows < 1 or views < 1 or dim < 1 or n_rows < 0:
            raise ConfigError("chunk_rows, views and dim must be >= 1 and n_rows >= 0")
        root = Path(path)
        if root.exists() and any(root.iterdir()):
            if not unfinished_creation(root):
                raise StoreError(f"{root}: exists and is not empty; choose a new --out or delete it")
            lock = WriterLock(root)  # StoreBusy while its creator is still alive
            try:
                _clear_unfinished(root)
            except BaseException:
                lock.release()
                raise
        else:
            root.mkdir(parents=True, exist_ok=True)
            lock = WriterLock(root)
        try:
            with disk_errors(root, "its arrays (creating it)"):
                return cls._create_arrays(root, lock, n_rows, views, dim, provenance, dtype, chunk_rows, with_split,
                                          extra_attrs, view_param_names)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create_arrays(cls, root: Path, lock: WriterLock, n_rows: int, views: int, dim: int,
                       provenance: dict[str, Any], dtype: str, chunk_rows: int, with_split: bool,
                       extra_attrs: dict[str, Any] | None, view_param_names: Sequence[str] | None) -> "Store":
        """``create``'s zarr writes (the folder made and locked): arrays, then the attributes last."""
        group = zarr.open_group(str(root), mode="a", zarr_format=3)
        rows = max(n_rows, 1)
        chunk = min(chunk_rows, rows) if n_rows else chunk_rows
        group.create_array(
            "features", shape=(n_rows, views, dim), chunks=(chunk, views, dim), dtype=dtype,
            compressors=None, fill_value=0,
        )
        group.create_array("labels", shape=(n_rows,), chunks=(chunk,), dtype="int8", compressors=None, fill_value=-1)
        group.create_array("ids", shape=(n_rows,), chunks=(chunk,), dtype=str, compressors=None)
        group.create_array("sha256", shape=(n_rows,), chunks=(chunk,), dtype=str, compressors=None)
        if with_split:
            group.create_array("split", shape=(n_rows,), chunks=(chunk,), dtype=str, compressors=None)
        if view_param_names:
            group.create_array("view_levels", shape=(n_rows, views), chunks=(chunk, views), dtype="int8",
                               compressors=None, fill_value=-1)
            p = len(view_param_names)
            group.create_array("view_params", shape=(n_rows, views, p), chunks=(chunk, views, p),
                               dtype="float32", compressors=None, fill_value=float("nan"))
        stamp = utc_timestamp()
        attrs = {
            "schema_version": SCHEMA_VERSION,
            "tool": "featstore",
            "tool_version": __version__,
            "provenance": provenance,
            "chunk_rows": chunk,
            "n_committed": 0,
            "n_listed": n_rows,
            "n_consumed": 0,
            "quarantined": [],
            "complete": False,
            CHUNKS_ATTR: {},
            "created": stamp,
            "updated": stamp,
        }
        if view_param_names:
            attrs["view_param_names"] = [str(name) for name in view_param_names]
        attrs.update(extra_attrs or {})
        group.update_attributes(attrs)
        return cls(root, group, "r+", lock)

    def close(self) -> None:
        """Release the writer lock (reads stay possible)."""
        if self._lock:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Store":
        """The store itself; ``__exit__`` closes it."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Release the writer lock."""
        self.close()

    def refresh(self) -> None:
        """Re-read attributes (e.g. to follow a writer's progress)."""
        self.group = zarr.open_group(str(self.path), mode="r" if self.mode == "r" else "r+", zarr_format=3)
        self._attrs = dict(self.group.attrs)
        self._arrays = {}
        self.check_integrity()

    # ------------------------------------------------------------------ integrity
    def _row_arrays(self) -> list[str]:
        return [name for name in ROW_ARRAYS if self.has_array(name)]

    def check_integrity(self) -> None:
        """Refuse a store whose ``n_committed`` or chunk files do not add up (cheap: stat calls only).

        ``n_committed`` must be an integer within every row array's length (equal to it once complete)
        and, where chunk records exist, equal to the rows they record; every recorded chunk file must
        be present with its recorded size. A store without records (0.1.0) has the presence and size
        of its `features` chunk files checked. ``verify`` re-hashes the files as well.
        """
        where = self.path
        raw = self._attrs.get("n_committed", 0)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise StoreError(f"{where}: attribute n_committed is {raw!r}, not a row count; the store is damaged")
        n = raw
        lengths = {name: int(self._array(name).shape[0]) for name in self._row_arrays()}
        allocated = lengths["features"]
        if n < 0 or n > allocated:
            raise StoreError(f"{where}: n_committed is {n} but the features array has {allocated} rows; "
                             "the store is damaged (was zarr.json edited?): re-extract it")
        for name, length in lengths.items():
            if length != allocated:
                raise StoreError(f"{where}: array '{name}' has {length} rows, features has {allocated}; the store is damaged")
        if self._attrs.get("complete") and n != allocated:
            raise StoreError(f"{where}: marked complete with n_committed {n} but {allocated} rows stored; "
                             "the store is damaged (was zarr.json edited?): re-extract it")
        cr = int(self._array("features").chunks[0])
        n_chunks = -(-n // cr)
        records = self._attrs.get(CHUNKS_ATTR)
        if records is None:
            if "features" in lengths and raw_readable(self._array("features")):
                reader = RawChunkReader(self.path / "features", self._array("features"))
                expected = cr * self.views * self.dim * reader.dtype.itemsize
                for c in range(n_chunks):
                    self._check_file("features", c, expected, cr)
            return
        if not isinstance(records, dict) or sorted(records, key=lambda k: int(k) if str(k).isdigit() else -1) != [str(c) for c in range(n_chunks)]:
            have = sorted(records) if isinstance(records, dict) else records
            raise StoreError(f"{where}: n_committed {n} needs row-chunks 0..{n_chunks - 1} but the store records {have}; "
                             "the store is damaged (was zarr.json edited?): re-extract it")
        total = sum(int(records[str(c)].get("rows", 0)) for c in range(n_chunks))
        if total != n:
            raise StoreError(f"{where}: n_committed is {n} but the committed chunks hold {total} rows; "
                             "the store is damaged (was zarr.json edited?): re-extract it")
        for c in range(n_chunks):
            for name, (size, _digest) in records[str(c)].get("files", {}).items():
                self._check_file(name, c, int(size), cr)

    def _check_file(self, name: str, index: int, size: int, cr: int) -> Path:
        path = self.path / name / chunk_key(self._array(name), index)
        rows = f"rows {index * cr}-{(index + 1) * cr - 1}"
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"{path}: chunk file of '{name}' ({rows}) is missing; the store is damaged: "
                             "restore it from a backup or re-extract") from None
        if actual != size:
            raise StoreError(f"{path}: chunk file of '{name}' ({rows}) has {actual} bytes, expected {size}; "
                             "the store is damaged: restore it from a backup or re-extract")
        return path

    def verify(self) -> dict[str, Any]:
        """Re-hash every committed chunk file against its recorded sha256; raise StoreError naming the first bad one.

        Returns {"files": checked, "hashed": bool}; ``hashed`` is False for a store written before
        chunk checksums were recorded (then only presence and size were checked, by ``open``).
        """
        records = self._attrs.get(CHUNKS_ATTR)
        if records is None:
            return {"files": 0, "hashed": False}
        cr = self.chunk_rows
        checked = 0
        for c in range(-(-self.rows // cr)):
            for name, (size, digest) in records[str(c)].get("files", {}).items():
                path = self._check_file(name, c, int(size), cr)
                if _file_sha256(path) != digest:
                    raise StoreError(f"{path}: chunk file of '{name}' (rows {c * cr}-{(c + 1) * cr - 1}) does not match "
                                     "its recorded sha256; the store is damaged: restore it from a backup or re-extract")
                checked += 1
        return {"files": checked, "hashed": True}

    # ------------------------------------------------------------------ properties
    @property
    def attrs(self) -> dict[str, Any]:
        """All group attributes (provenance, n_committed, quarantine, times)."""
        return dict(self._attrs)

    @property
    def provenance(self) -> dict[str, Any]:
        """What the features were made from (backbone, preprocessing, image list), as written at creation."""
        return dict(self._attrs.get("provenance", {}))

    @property
    def rows(self) -> int:
        """Committed rows: only these are readable."""
        return int(self._attrs.get("n_committed", 0))

    @property
    def committed(self) -> int:
        """Same as ``rows``."""
        return self.rows

    @property
    def complete(self) -> bool:
        """True once ``finalize`` has run (every listed image written or quarantined)."""
        return bool(self._attrs.get("complete", False))

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk file (and per durable commit)."""
        return int(self._array("features").chunks[0])

    @property
    def views(self) -> int:
        """Views per image (V)."""
        return int(self._array("features").shape[1])

    @property
    def dim(self) -> int:
        """Feature width (D)."""
        return int(self._array("features").shape[2])

    @property
    def dtype(self) -> str:
        """Stored precision: 'float16' or 'float32'."""
        return str(np.dtype(self._array("features").dtype))

    @property
    def labels(self) -> np.ndarray:
        """int8 [rows]; -1 = unlabelled."""
        return np.asarray(self._array("labels")[: self.rows], dtype=np.int8)

    @property
    def ids(self) -> np.ndarray:
        """Image paths relative to --images (or imported ids), numpy str [rows]."""
        return self._strings("ids")

    @property
    def sha256(self) -> np.ndarray:
        """Content hashes (of the image file, or of the feature row for imported stores)."""
        return self._strings("sha256")

    @property
    def split_column(self) -> np.ndarray | None:
        """The labels CSV's `split` column ('' = not given), or None when the CSV had none."""
        return self._strings("split") if self.has_array("split") else None

    @property
    def quarantined(self) -> list[dict[str, str]]:
        """Images that could not be used, as {"path", "reason", "detail"}."""
        return [dict(q) for q in self._attrs.get("quarantined", [])]

    def _strings(self, name: str) -> np.ndarray:
        n = self.rows
        if n == 0:
            return np.array([], dtype=str)
        return np.array(self._array(name)[:n].tolist(), dtype=str)

    @property
    def view_param_names(self) -> list[str]:
        """Field names of ``view_params``' last axis ([] when the store records no view parameters)."""
        return [str(n) for n in self._attrs.get("view_param_names", [])]

    def view_levels(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray | None:
        """Validator level of each view, int8 [n, V] (-1 = not a validator view); None if not recorded."""
        if not self.has_array("view_levels"):
            return None
        data = np.asarray(self._array("view_levels")[: self.rows], dtype=np.int8)
        return data if rows is None else data[np.asarray(rows, dtype=np.int64)]

    def view_params(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray | None:
        """Each view's recorded parameters, float32 [n, V, P] (fields ``view_param_names``); None if not recorded."""
        if not self.has_array("view_params"):
            return None
        data = np.asarray(self._array("view_params")[: self.rows], dtype=np.float32)
        return data if rows is None else data[np.asarray(rows, dtype=np.int64)]

    # ------------------------------------------------------------------ reading features
    def _raw_chunks_ok(self) -> bool:
        """True when chunk files hold plain native-order bytes the raw reader can copy directly."""
        return raw_readable(self._array("features"))

    def load_features(
        self,
        rows: Sequence[int] | np.ndarray | slice | None = None,
        views: int | Sequence[int] | None = None,
        dtype: Any = np.float32,
    ) -> np.ndarray:
        """Features [n, V, D] in RAM (float32 by default), reading whole chunks at a time.

        ``rows``: None (all committed rows), a slice, or row indices (any order, repeats allowed).
        ``views``: None (all), an int (that view only, shape [n, 1, D]) or a list of views.
        """
        n_all = self.rows
        start, stop = 0, n_all
        idx: np.ndarray | None = None  # None: the contiguous rows [start, stop)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n_all)
            idx = None if step == 1 else np.arange(start, stop, step)
            stop = max(start, stop)
        elif rows is not None:
            idx = np.asarray(rows, dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= n_all):
                raise IndexError(f"{self.path}: row index out of range 0..{n_all - 1} (committed rows)")
        if views is None:
            vsel: np.ndarray | None = None
        else:
            vsel = np.atleast_1d(np.asarray(views, dtype=np.int64))
            if vsel.size == 0 or vsel.min() < 0 or vsel.max() >= self.views:
                raise IndexError(f"{self.path}: view {views} out of range 0..{self.views - 1}")
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(self.dtype)
        if not self._raw_chunks_ok():  # e.g. a compressed store written by another tool
            arr = self._array("features")
            data = arr[start:stop] if idx is None else arr.get_orthogonal_selection((idx, slice(None), slice(None)))
            data = data if vsel is None else data[:, vsel]
            return np.asarray(data, dtype=out_dtype)
        return RawChunkReader(self.path / "features", self._array("features")).read(idx, start, stop, vsel, out_dtype)

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if self.mode != "r+" or self._lock is None:
            raise StoreError(f"{self.path}: opened read-only; open with mode='r+' to write")

    def write_block(
        self,
        start: int,
        features: np.ndarray,
        labels: np.ndarray,
        ids: Sequence[str],
        sha256: Sequence[str],
        split: Sequence[str] | None = None,
        view_levels: np.ndarray | None = None,
        view_params: np.ndarray | None = None,
    ) -> None:
        """Write rows [start, start+n) (start chunk-aligned) and fsync them; does not commit.

        ``view_levels`` [n, V] / ``view_params`` [n, V, P] are written when the store has those arrays.
        """
        self._require_writable()
        n = len(features)
        cr = self.chunk_rows
        if start % cr:
            raise StoreError(f"block start {start} is not a multiple of chunk_rows {cr}")
        if start + n > self._array("features").shape[0]:
            raise StoreError(f"block [{start}, {start + n}) exceeds the preallocated {self._array('features').shape[0]} rows")
        if not (len(labels) == len(ids) == len(sha256) == n):
            raise StoreError("features, labels, ids and sha256 must have the same number of rows")
        with self._disk_errors(f"rows {start}-{start + n - 1}"):
            self._write_rows(start, features, labels, ids, sha256, split, view_levels, view_params)

    def _write_rows(self, start: int, features: np.ndarray, labels: np.ndarray, ids: Sequence[str],
                    sha256: Sequence[str], split: Sequence[str] | None, view_levels: np.ndarray | None,
                    view_params: np.ndarray | None) -> None:
        """``write_block``'s writes, fsyncs and chunk records (its checks done)."""
        n = len(features)
        cr = self.chunk_rows
        self._array("features")[start : start + n] = np.asarray(features, dtype=self.dtype)
        self._array("labels")[start : start + n] = np.asarray(labels, dtype=np.int8)
        self._array("ids")[start : start + n] = np.asarray(list(ids), dtype=object).astype(str)
        self._array("sha256")[start : start + n] = np.asarray(list(sha256), dtype=object).astype(str)
        names = ["features", "labels", "ids", "sha256"]
        if self.has_array("split"):
            self._array("split")[start : start + n] = np.asarray(list(split) if split is not None else [""] * n, dtype=object).astype(str)
            names.append("split")
        for name, value in (("view_levels", view_levels), ("view_params", view_params)):
            if self.has_array(name):
                arr = self._array(name)
                if value is None:  # not given: the fill value, written so every chunk file exists
                    value = np.full((n,) + tuple(arr.shape[1:]), arr.fill_value, dtype=arr.dtype)
                arr[start : start + n] = np.asarray(value, dtype=arr.dtype)
                names.append(name)
        if n == 0:
            return
        first, last = start // cr, (start + n - 1) // cr
        arrays = [(name, self._array(name)) for name in self._row_arrays()]  # unwritten optional arrays too
        fsync_chunks(self.path, arrays, first, last)
        for c in range(first, last + 1):
            files = {}
            for name, arr in arrays:
                path = self.path / name / chunk_key(arr, c)
                files[name] = [path.stat().st_size, _file_sha256(path)]
            rows = min(start + n, (c + 1) * cr) - c * cr
            self._pending_chunks[str(c)] = {"rows": int(rows), "files": files}

    def _disk_errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        """``disk_errors`` for this store (its committed rows named in the message)."""
        return disk_errors(self.path, what, self.rows)

    def commit(self, n_committed: int, **attrs: Any) -> None:
        """Durably move the committed-rows marker (and progress attributes) forward."""
        self._require_writable()
        n = int(n_committed)
        update: dict[str, Any] = {"n_committed": n, "updated": utc_timestamp(), **attrs}
        records = self._attrs.get(CHUNKS_ATTR)
        if records is not None or self.rows == 0:  # a 0.1.0 store resumed past rows written has no records to extend
            cr = self.chunk_rows
            merged = {**(records or {}), **self._pending_chunks}
            update[CHUNKS_ATTR] = {k: v for k, v in merged.items() if int(k) * cr < n}
            if sum(int(v["rows"]) for v in update[CHUNKS_ATTR].values()) != n or len(update[CHUNKS_ATTR]) != -(-n // cr):
                raise StoreError(f"{self.path}: commit of {n} rows does not match the rows written; nothing was committed")
        with self._disk_errors(f"the commit of {n} rows"):
            commit_attributes(self.group, self.path, update)
        self._attrs.update(update)
        if CHUNKS_ATTR in update:  # chunks written ahead of the marker stay pending for the next commit
            self._pending_chunks = {k: v for k, v in self._pending_chunks.items() if k not in update[CHUNKS_ATTR]}

    def finalize(self) -> None:
        """Trim arrays to the committed rows (quarantined images left slack) and mark complete."""
        self._require_writable()
        n = self.rows
        for name in ("features", "labels", "ids", "sha256", "split", "view_levels", "view_params"):
            if self.has_array(name):
                arr = self._array(name)
                if arr.shape[0] != n:
                    arr.resize((n,) + tuple(arr.shape[1:]))
        self._arrays = {}
        self.commit(n, complete=True)
        self.check_integrity()

    def check_provenance(self, provenance: dict[str, Any]) -> None:
        """Refuse (naming the attribute) when ``provenance`` differs from the stored one."""
        check_provenance(self.path, self.provenance, provenance)

    # ------------------------------------------------------------------ summary
    def splits_counts(self) -> dict[str, int] | None:
        """Rows per split from STORE/splits.json, or None when `split` has not been run."""
        path = self.path / SPLITS_NAME
        if not path.exists():
            return None
        data = read_json(path)
        return {name: int(v["n"]) for name, v in data.get("counts", {}).items()}

    def info(self) -> dict[str, Any]:
        """The `info --json` object (stable keys: rows, committed, dim, views, dtype, provenance, quarantined)."""
        labels = self.labels
        return {
            "path": str(self.path),
            "rows": self.rows,
            "committed": self.rows,
            "complete": self.complete,
            "listed": int(self._attrs.get("n_listed", self.rows)),
            "dim": self.dim,
            "views": self.views,
            "dtype": self.dtype,
            "chunk_rows": self.chunk_rows,
            "labels": {
                "0": int(np.sum(labels == 0)),
                "1": int(np.sum(labels == 1)),
                "unlabelled": int(np.sum(labels == -1)),
            },
            "provenance": self.provenance,
            "quarantined": self.quarantined,
            "splits": self.splits_counts(),
            "view_levels": self._level_counts(),
            "schema_version": self._attrs.get("schema_version"),
            "tool_version": self._attrs.get("tool_version"),
            "created": self._attrs.get("created"),
            "updated": self._attrs.get("updated"),
        }


    def _level_counts(self) -> dict[str, int] | None:
        """Views per validator level over committed rows ("-1" = not a validator view); None if not recorded."""
        levels = self.view_levels()
        if levels is None:
            return None
        values, counts = np.unique(levels, return_counts=True)
        return {str(int(v)): int(c) for v, c in zip(values, counts)}


@contextlib.contextmanager
def disk_errors(root: Path, what: str, committed: int = 0) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) or a read-only one (EROFS) while writing store ``root`` into
    one line naming the store and the fix; committed rows stay as they are (a resume continues from them)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        problem = "is read-only" if exc.errno == errno.EROFS else "is full (no space left on the device)"
        fix = ("pick another --out on a writable disk" if exc.errno == errno.EROFS else
               "free space on that disk or pick another --out")
        kept = (f" {committed} rows are committed and kept: re-run the same command to resume" if committed else "")
        raise StoreDiskError(f"{root}: the disk holding the store {problem} while writing {what}; {fix}.{kept}") from None


def _open_group(root: Path, mode: str) -> zarr.Group:
    """The store's zarr group; zarr's metadata errors (a root zarr.json that is not a group's) as one StoreError."""
    try:
        return zarr.open_group(str(root), mode="r" if mode == "r" else "r+", zarr_format=3)
    except Exception as exc:  # zarr raises TypeError, ValueError and its own errors alike here
        raise StoreError(f"{root / 'zarr.json'}: zarr cannot read it as a store's group "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the store's "
                         "metadata is damaged: restore it from a backup or re-extract") from None


def check_metadata(root: Path) -> None:
    """Refuse a store whose zarr.json (or a member array's) is not a JSON object, naming the file.

    zarr would raise a JSONDecodeError or TypeError from deep inside; a hand-edited or truncated
    metadata file deserves one line saying which file and what to do.
    """
    fix = "the store's metadata is damaged: restore it from a backup or re-extract"
    for meta in [root / "zarr.json", *sorted(root.glob("*/zarr.json"))]:
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise StoreError(f"{meta}: not UTF-8 text; {fix}") from None
        except ValueError as exc:
            raise StoreError(f"{meta}: not valid JSON ({exc}); {fix}") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{meta}: holds a JSON {type(doc).__name__}, not an object; {fix}")
        if meta.parent == root and not isinstance(doc.get("attributes", {}), dict):
            raise StoreError(f"{meta}: 'attributes' is a JSON {type(doc['attributes']).__name__}, not an object; {fix}")


#: Attribute name -> (accepted types, what it must be): checked at open, since zarr.json may be hand-edited.
_ATTR_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "provenance": ((dict,), "an object (what the features were made from)"),
    "quarantined": ((list,), "a list of {path, reason} objects"),
    "complete": ((bool,), "true or false"),
    "n_listed": ((int,), "a row count"),
    "n_consumed": ((int,), "a row count"),
    "chunk_rows": ((int,), "a row count"),
    CHUNKS_ATTR: ((dict,), "an object of per-chunk records"),
    "view_param_names": ((list,), "a list of names"),
}


def check_attributes(root: Path, attrs: dict[str, Any]) -> None:
    """StoreError naming the attribute when a known attribute of zarr.json has the wrong JSON type."""
    fix = "the store is damaged (was zarr.json edited?): restore it from a backup or re-extract"
    for key, (types, what) in _ATTR_TYPES.items():
        if key not in attrs:
            continue
        value = attrs[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise StoreError(f"{root / 'zarr.json'}: attribute {key} is {value!r:.60}, not {what}; {fix}")
    for item in attrs.get("quarantined", []):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("path", "reason")):
            raise StoreError(f"{root / 'zarr.json'}: attribute quarantined holds {item!r:.60}, not a "
                             f"{{path, reason}} object; {fix}")
    if not all(isinstance(n, str) for n in attrs.get("view_param_names", [])):
        raise StoreError(f"{root / 'zarr.json'}: attribute view_param_names must be a list of names; {fix}")


#: Everything ``Store.create`` writes before its attributes (the last step) are in place.
_CREATION_NAMES = frozenset({LOCK_NAME, "zarr.json", "features", "labels", "ids", "sha256", "split",
                             "view_levels", "view_params"})


def is_created(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a store whose creation finished (zarr.json carries ``schema_version``)."""
    meta = Path(path) / "zarr.json"
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("attributes"), dict) \
        and "schema_version" in doc["attributes"]


def unfinished_creation(path: str | os.PathLike[str]) -> bool:
    """True for a folder a killed ``Store.create`` left: only its files, and no finished attributes.

    Such a folder holds no committed row, so the next ``create`` may clear it and start again.
    """
    root = Path(path)
    if not root.is_dir() or is_created(root):
        return False
    names = [p.name for p in root.iterdir()]
    if not names or not all(n in _CREATION_NAMES or n.endswith(PARTIAL_SUFFIX) for n in names):
        return False
    # no chunk file anywhere: creation writes none, so not a single row can be lost by clearing it
    return not any((root / n / "c").exists() for n in names if (root / n).is_dir())


def _clear_unfinished(root: Path) -> None:
    """Delete what an unfinished creation left (the lock file stays: we hold it)."""
    for p in root.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def nonfinite_rows(features: np.ndarray, block_rows: int = 4096) -> np.ndarray:
    """Indices (int64) of the rows of ``features`` [N, ...] holding a NaN or an infinity (memmaps read blockwise)."""
    out = []
    for s in range(0, len(features), block_rows):
        block = np.asarray(features[s:s + block_rows])
        ok = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        out.append(s + np.flatnonzero(~ok))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def describe_rows(rows: np.ndarray, shown: int = 10) -> str:
    """``"3 rows (2, 5, 9)"``: how many rows, and the first ``shown`` of them."""
    listed = ", ".join(str(int(r)) for r in rows[:shown]) + (", ..." if len(rows) > shown else "")
    return f"{len(rows)} row(s) ({listed})"


def row_hashes(features: np.ndarray) -> list[str]:
    """sha256 of each row's view-0 features (float32 bytes): a content key for stores without images."""
    v0 = np.ascontiguousarray(np.asarray(features, dtype=np.float32)[:, 0])
    return [sha256_bytes(row.tobytes()) for row in v0]


def check_view_arrays(view_levels: Any, view_params: Any, names: Sequence[str] | None, n: int, views: int,
                      where: str = "") -> tuple[np.ndarray | None, np.ndarray | None, list[str] | None]:
    """(levels int8 [n, V], params float32 [n, V, P], P names), or Nones when none is given; a StoreError
    (prefixed by ``where``) when only some are given, or their shapes or values do not fit the features."""
    pre = f"{where}: " if where else ""
    given = [x is not None for x in (view_levels, view_params, names)]
    if not any(given):
        return None, None, None
    if not all(given):
        raise StoreError(f"{pre}view_levels, view_params and view_param_names come together; give all three or none")
    levels = np.asarray(view_levels)
    params = np.asarray(view_params)
    names = [str(x) for x in names]  # type: ignore[union-attr]
    if levels.shape != (n, views) or levels.dtype.kind not in "iu" or not np.isin(levels, (-1, *VIEW_LEVELS)).all():
        raise StoreError(f"{pre}view_levels must be integers in -1..3 of shape ({n}, {views}), got "
                         f"{levels.dtype} {levels.shape}")
    if params.shape != (n, views, len(names)) or params.dtype.kind != "f" or not names:
        raise StoreError(f"{pre}view_params must be floats of shape ({n}, {views}, {len(names)}) (one per "
                         f"view_param_names entry), got {params.dtype} {params.shape}")
    return levels.astype(np.int8), params.astype(np.float32), names


def write_store(
    path: str | os.PathLike[str],
    features: np.ndarray,
    labels: Iterable[int] | np.ndarray,
    ids: Iterable[str] | np.ndarray | None = None,
    sha256: Iterable[str] | np.ndarray | None = None,
    provenance: dict[str, Any] | None = None,
    *,
    dtype: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    split: Iterable[str] | None = None,
    overwrite: bool = False,
    view_levels: np.ndarray | None = None,
    view_params: np.ndarray | None = None,
    view_param_names: Sequence[str] | None = None,
) -> Store:
    """Build a complete store from arrays: features [N,V,D] (or [N,D] -> V=1), labels [N] in {-1,0,1}.

    ``dtype`` defaults to the input's when float16/float32 (else float32); ``sha256`` defaults to a
    hash of each row's view-0 features; ``ids`` to ``row-000000``... ``view_levels`` [N,V] and
    ``view_params`` [N,V,P] (with P ``view_param_names``) are stored as ``extract`` stores them, when
    given (all three together). Returns the store, open read-only.
    """
    feats = np.asarray(features)
    if feats.ndim == 2:
        feats = feats[:, None, :]
    if feats.ndim != 3:
        raise StoreError(f"features must be [N, D] or [N, V, D], got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise StoreError(f"features must be floating-point numbers, got {feats.dtype}")
    if feats.shape[1] < 1 or feats.shape[2] < 1:
        raise StoreError(f"features have shape {feats.shape}: a store needs at least 1 view and 1 feature (D >= 1)")
    bad = nonfinite_rows(feats)
    if bad.size:
        raise StoreError(f"features must be finite: {describe_rows(bad)} hold NaN or infinite values; "
                         "fix or drop those rows")
    n = feats.shape[0]
    lab = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels).reshape(-1)
    if lab.shape != (n,):
        raise StoreError(f"labels has {lab.size} entries for {n} feature rows")
    if lab.size and (not np.all(np.isin(lab, (-1, 0, 1)))):
        bad = lab[~np.isin(lab, (-1, 0, 1))][0]
        raise StoreError(f"labels must be 0, 1 or -1 (unlabelled); found {bad!r}")
    id_list = [f"row-{i:06d}" for i in range(n)] if ids is None else [str(x) for x in ids]
    if len(id_list) != n:
        raise StoreError(f"ids has {len(id_list)} entries for {n} feature rows")
    sha = row_hashes(feats) if sha256 is None else [str(s) for s in sha256]
    if len(sha) != n:
        raise StoreError(f"sha256 has {len(sha)} entries for {n} feature rows")
    split_list = None if split is None else [str(s) for s in split]
    levels, params, names = check_view_arrays(view_levels, view_params, view_param_names, n, feats.shape[1])
    if dtype is None:
        dtype = str(feats.dtype) if str(feats.dtype) in DTYPES else "float32"
    root = Path(path)
    if overwrite and (root / "zarr.json").exists():
        shutil.rmtree(root)
    prov = dict(provenance or {"kind": "arrays"})
    prov.setdefault("kind", "arrays")
    with Store.create(
        root, n, feats.shape[1], feats.shape[2], prov, dtype=dtype, chunk_rows=chunk_rows,
        with_split=split_list is not None, extra_attrs={"n_consumed": n}, view_param_names=names,
    ) as store:
        cr = store.chunk_rows
        for s in range(0, n, cr):
            e = min(n, s + cr)
            store.write_block(s, feats[s:e], lab[s:e], id_list[s:e], sha[s:e], None if split_list is None else split_list[s:e],
                              view_levels=None if levels is None else levels[s:e],
                              view_params=None if params is None else params[s:e])
        store.commit(n, n_consumed=n)
        store.finalize()
    return Store.open(root)
