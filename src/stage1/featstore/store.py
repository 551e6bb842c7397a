"""The feature store: one Zarr v3 group with `features` [N,V,D], `labels`, `ids`, `sha256`.

Write path: preallocate, write chunk-aligned row blocks, fsync them, then bump the `n_committed`
attribute, so a crash leaves everything below the marker intact and resume simply rewrites what
lies ahead of it. Read path: whole chunk files are read straight into RAM (no per-row zarr calls).
"""
from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from stage1 import __version__
from stage1._core.io import PARTIAL_SUFFIX, read_json, sha256_bytes, utc_timestamp

SCHEMA_VERSION = 1
from stage1._core.constants import DEFAULT_CHUNK_ROWS  # noqa: F401 (re-exported)
from stage1._core.constants import FEATURE_DTYPES as DTYPES
from stage1._core.errors import DataError, EnvironmentProblem
LOCK_NAME = ".featstore.lock"
SPLITS_NAME = "splits.json"
#: Provenance keys that describe where something lives, not what it is: never compared on resume.
INFORMATIONAL_KEYS = ("backbone.path", "images_root", "source_path")


class StoreError(DataError):
    """A store that cannot be used as asked (missing, wrong schema, bad rows)."""


class ProvenanceMismatch(StoreError):
    """Resume / append refused because a provenance attribute differs."""


class StoreBusy(EnvironmentProblem):
    """Another process holds the store's writer lock."""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def provenance_differences(stored: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(attribute, stored value, new value) for every provenance attribute that differs."""
    a, b = _flatten(stored), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in INFORMATIONAL_KEYS:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            diffs.append((key, va, vb))
    return diffs


def sweep_partials(root: str | os.PathLike[str]) -> list[Path]:
    """Delete stale ``*.partial`` temp files a killed writer left behind; returns what was removed."""
    removed = []
    for p in Path(root).rglob(f"*{PARTIAL_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _fsync_path(path: Path) -> None:
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


class _WriterLock:
    """An exclusive advisory lock (flock) on STORE/.featstore.lock; the kernel drops it if we die."""

    def __init__(self, root: Path) -> None:
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
        if not self.fh.closed:
            self.fh.close()


class Store:
    """A feature store folder. Open with ``Store.open`` / ``featstore.open_store``; build with ``create``."""

    def __init__(self, path: Path, group: zarr.Group, mode: str, lock: _WriterLock | None = None) -> None:
        self.path = path
        self.group = group
        self.mode = mode
        self._lock = lock
        self._attrs = dict(group.attrs)
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """A member array, cached (opening one re-reads its zarr.json)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]  # type: ignore[assignment]
        return self._arrays[name]

    def has_array(self, name: str) -> bool:
        return name in self._arrays or name in self.group

    # ------------------------------------------------------------------ opening / creating
    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r") -> "Store":
        """Open an existing store; ``mode="r+"`` takes the writer lock and sweeps stale partial files."""
        root = Path(path)
        if not (root / "zarr.json").exists():
            raise StoreError(f"{root}: not a feature store (no zarr.json); run `extract` or `import-features` first")
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        lock = None
        if mode == "r+":
            lock = _WriterLock(root)
            sweep_partials(root)
        try:
            group = zarr.open_group(str(root), mode="r" if mode == "r" else "r+", zarr_format=3)
            attrs = dict(group.attrs)
            version = attrs.get("schema_version")
            if version != SCHEMA_VERSION or "features" not in group:
                raise StoreError(
                    f"{root}: schema_version {version!r} is not {SCHEMA_VERSION} or arrays are missing; "
                    "re-extract or re-import it with this version"
                )
        except BaseException:
            if lock:
                lock.release()
            raise
        return cls(root, group, mode, lock)

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
    ) -> "Store":
        """Preallocate an empty store (nothing committed) and return it open for writing."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
        if chunk_rows < 1 or views < 1 or dim < 1 or n_rows < 0:
            raise ValueError("chunk_rows, views and dim must be >= 1 and n_rows >= 0")
        root = Path(path)
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root}: exists and is not empty; choose a new --out or delete it")
        root.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(root)
        try:
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
                "created": stamp,
                "updated": stamp,
            }
            attrs.update(extra_attrs or {})
            group.update_attributes(attrs)
        except BaseException:
            lock.release()
            raise
        return cls(root, group, "r+", lock)

    def close(self) -> None:
        """Release the writer lock (reads stay possible)."""
        if self._lock:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Re-read attributes (e.g. to follow a writer's progress)."""
        self.group = zarr.open_group(str(self.path), mode="r" if self.mode == "r" else "r+", zarr_format=3)
        self._attrs = dict(self.group.attrs)
        self._arrays = {}

    # ------------------------------------------------------------------ properties
    @property
    def attrs(self) -> dict[str, Any]:
        """All group attributes (provenance, n_committed, quarantine, times)."""
        return dict(self._attrs)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._attrs.get("provenance", {}))

    @property
    def rows(self) -> int:
        """Committed rows: only these are readable."""
        return int(self._attrs.get("n_committed", 0))

    @property
    def committed(self) -> int:
        return self.rows

    @property
    def complete(self) -> bool:
        return bool(self._attrs.get("complete", False))

    @property
    def chunk_rows(self) -> int:
        return int(self._array("features").chunks[0])

    @property
    def views(self) -> int:
        return int(self._array("features").shape[1])

    @property
    def dim(self) -> int:
        return int(self._array("features").shape[2])

    @property
    def dtype(self) -> str:
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

    # ------------------------------------------------------------------ reading features
    def _chunk_file(self, index: int) -> Path:
        key = self._array("features").metadata.encode_chunk_key((index, 0, 0))
        return self.path / "features" / key

    def _raw_chunks_ok(self) -> bool:
        """True when chunk files hold plain little-endian bytes we can read directly."""
        arr = self._array("features")
        codecs = arr.metadata.codecs
        return (
            len(codecs) == 1
            and type(codecs[0]).__name__ == "BytesCodec"
            and np.dtype(self.dtype).itemsize in (2, 4)
            and (np.dtype(self.dtype).byteorder in ("=", "<") and np.little_endian)
        )

    def _map_chunk(self, index: int) -> tuple[mmap.mmap | None, np.ndarray | None]:
        """Memory-map chunk ``index`` as [chunk_rows, V, D] (None, None when never written = fill value)."""
        path = self._chunk_file(index)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            return None, None
        with fh:
            shape = (self.chunk_rows, self.views, self.dim)
            dtype = np.dtype(self.dtype)
            expected = int(np.prod(shape)) * dtype.itemsize
            size = os.fstat(fh.fileno()).st_size
            if size != expected:
                raise StoreError(f"{path}: chunk has {size} bytes, expected {expected}; re-run extract")
            # MAP_POPULATE maps the whole chunk in one go instead of one page fault per 4 KiB
            mm = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        return mm, np.frombuffer(mm, dtype=dtype).reshape(shape)

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
        return self._load_raw(idx, start, stop, vsel, out_dtype)

    def _load_raw(
        self, idx: np.ndarray | None, start: int, stop: int, vsel: np.ndarray | None, out_dtype: np.dtype
    ) -> np.ndarray:
        """Copy straight from memory-mapped chunk files into the output (one copy, like a .npy memmap)."""
        cr, V, D = self.chunk_rows, self.views, self.dim
        nv = V if vsel is None else len(vsel)
        n = (stop - start) if idx is None else len(idx)
        out = np.empty((n, nv, D), dtype=out_dtype)
        if n == 0:
            return out
        if idx is None:
            chunks = range(start // cr, (stop - 1) // cr + 1)
            groups = None
        else:
            chunk_of = idx // cr
            order = np.argsort(chunk_of, kind="stable")
            groups = np.split(order, np.flatnonzero(np.diff(chunk_of[order])) + 1)
            chunks = [int(chunk_of[g[0]]) for g in groups]
        for k, c in enumerate(chunks):
            c0 = c * cr
            mm, arr = self._map_chunk(c)
            try:
                if groups is None:
                    lo, hi = max(start, c0), min(stop, c0 + cr)
                    dest = out[lo - start : hi - start]
                    if arr is None:
                        dest[...] = 0
                    elif vsel is None:
                        dest[...] = arr[lo - c0 : hi - c0]
                    else:
                        dest[...] = arr[lo - c0 : hi - c0][:, vsel]
                else:
                    pos = groups[k]
                    if arr is None:
                        out[pos] = 0
                    else:
                        local = idx[pos] - c0
                        out[pos] = arr[local] if vsel is None else arr[local][:, vsel]
            finally:
                del arr
                if mm is not None:
                    mm.close()
        return out

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
    ) -> None:
        """Write rows [start, start+n) (start chunk-aligned) and fsync them; does not commit."""
        self._require_writable()
        n = len(features)
        cr = self.chunk_rows
        if start % cr:
            raise StoreError(f"block start {start} is not a multiple of chunk_rows {cr}")
        if start + n > self._array("features").shape[0]:
            raise StoreError(f"block [{start}, {start + n}) exceeds the preallocated {self._array('features').shape[0]} rows")
        if not (len(labels) == len(ids) == len(sha256) == n):
            raise StoreError("features, labels, ids and sha256 must have the same number of rows")
        self._array("features")[start : start + n] = np.asarray(features, dtype=self.dtype)
        self._array("labels")[start : start + n] = np.asarray(labels, dtype=np.int8)
        self._array("ids")[start : start + n] = np.asarray(list(ids), dtype=object).astype(str)
        self._array("sha256")[start : start + n] = np.asarray(list(sha256), dtype=object).astype(str)
        names = ["features", "labels", "ids", "sha256"]
        if self.has_array("split"):
            self._array("split")[start : start + n] = np.asarray(list(split) if split is not None else [""] * n, dtype=object).astype(str)
            names.append("split")
        for c in range(start // cr, (start + n - 1) // cr + 1):
            for name in names:
                arr = self._array(name)
                key = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
                f = self.path / name / key
                _fsync_path(f)
                _fsync_path(f.parent)

    def commit(self, n_committed: int, **attrs: Any) -> None:
        """Durably move the committed-rows marker (and progress attributes) forward."""
        self._require_writable()
        update = {"n_committed": int(n_committed), "updated": utc_timestamp(), **attrs}
        self.group.update_attributes(update)  # one atomic zarr.json write (attrs.update writes once per key)
        self._attrs.update(update)
        _fsync_path(self.path / "zarr.json")
        _fsync_path(self.path)

    def finalize(self) -> None:
        """Trim arrays to the committed rows (quarantined images left slack) and mark complete."""
        self._require_writable()
        n = self.rows
        for name in ("features", "labels", "ids", "sha256", "split"):
            if self.has_array(name):
                arr = self._array(name)
                if arr.shape[0] != n:
                    arr.resize((n,) + tuple(arr.shape[1:]))
        self._arrays = {}
        self.commit(n, complete=True)

    def check_provenance(self, provenance: dict[str, Any]) -> None:
        """Refuse (naming the attribute) when ``provenance`` differs from the stored one."""
        diffs = provenance_differences(self.provenance, provenance)
        if diffs:
            key, old, new = diffs[0]
            more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
            raise ProvenanceMismatch(
                f"{self.path}: provenance attribute '{key}' differs (store has {old!r}, this run has {new!r}){more}; "
                "re-run with the store's settings to resume, or write to a new --out"
            )

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
            "schema_version": self._attrs.get("schema_version"),
            "tool_version": self._attrs.get("tool_version"),
            "created": self._attrs.get("created"),
            "updated": self._attrs.get("updated"),
        }


def row_hashes(features: np.ndarray) -> list[str]:
    """sha256 of each row's view-0 features (float32 bytes): a content key for stores without images."""
    v0 = np.ascontiguousarray(np.asarray(features, dtype=np.float32)[:, 0])
    return [sha256_bytes(row.tobytes()) for row in v0]


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
) -> Store:
    """Build a complete store from arrays: features [N,V,D] (or [N,D] -> V=1), labels [N] in {-1,0,1}.

    ``dtype`` defaults to the input's when float16/float32 (else float32); ``sha256`` defaults to a
    hash of each row's view-0 features; ``ids`` to ``row-000000``... Returns the store, open read-only.
    """
    feats = np.asarray(features)
    if feats.ndim == 2:
        feats = feats[:, None, :]
    if feats.ndim != 3:
        raise StoreError(f"features must be [N, D] or [N, V, D], got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating) or not np.all(np.isfinite(feats)):
        raise StoreError("features must be finite floating-point numbers")
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
    if dtype is None:
        dtype = str(feats.dtype) if str(feats.dtype) in DTYPES else "float32"
    root = Path(path)
    if overwrite and (root / "zarr.json").exists():
        shutil.rmtree(root)
    prov = dict(provenance or {"kind": "arrays"})
    prov.setdefault("kind", "arrays")
    with Store.create(
        root, n, feats.shape[1], feats.shape[2], prov, dtype=dtype, chunk_rows=chunk_rows,
        with_split=split_list is not None, extra_attrs={"n_consumed": n},
    ) as store:
        cr = store.chunk_rows
        for s in range(0, n, cr):
            e = min(n, s + cr)
            store.write_block(s, feats[s:e], lab[s:e], id_list[s:e], sha[s:e], None if split_list is None else split_list[s:e])
        store.commit(n, n_consumed=n)
        store.finalize()
    return Store.open(root)
