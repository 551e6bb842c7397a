"""Interop with features cached by other scripts: export a store to HDF5 / .npy, import HDF5 / .npz.

Exports stream chunk by chunk (no whole-store copy in RAM). Imports become ordinary stores whose
provenance says ``kind: imported`` and names the source file and its sha256. A store's per-view
``view_levels`` [N, V] and ``view_params`` [N, V, P] (with their ``view_param_names``) travel too
when it has them (HDF5 datasets and an attribute; .npy files; .npz keys of the same names).
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from stage1._core.io import atomic_dir, atomic_path, atomic_write_json, sha256_file
from .store import (DEFAULT_CHUNK_ROWS, Store, StoreError, check_view_arrays, describe_rows, nonfinite_rows,
                    write_store)
from stage1._core.errors import ConfigError, DataError, ExistsError, MissingError

FORMATS = ("h5", "npy")
#: Per-view arrays exported and imported when a store has them (names of view_params' last axis alongside).
VIEW_KEYS = ("view_levels", "view_params", "view_param_names")


def default_export_path(store_path: str | os.PathLike[str], fmt: str) -> Path:
    """STORE.h5 next to the store, or a STORE.npy/ folder."""
    p = Path(store_path)
    return p.with_name(p.name + (".h5" if fmt == "h5" else ".npy"))


def export_features(store_path: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str] | None = None,
                    force: bool = False) -> Path:
    """Write the store's committed rows as HDF5 (one file) or .npy files (a folder); returns the path.

    An existing output is never overwritten silently: without ``force`` it is an ExistsError. With
    ``force`` an existing file (h5) or folder (npy) is replaced atomically, only by one of the same
    kind (a folder in place of an .h5 file, or the reverse, is refused: it is probably not an export).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {FORMATS}, not {fmt!r}")
    store = Store.open(store_path)
    target = Path(out) if out else default_export_path(store_path, fmt)
    if target.exists() or target.is_symlink():
        if not force:
            raise ExistsError(f"{target}: already exists; choose another --out, or pass --force to replace it")
        wanted_dir = fmt == "npy"
        if target.is_dir() != wanted_dir:
            kind = "a folder" if target.is_dir() else "a file"
            raise ExistsError(f"{target}: is {kind}, not a {fmt} export; --force only replaces an export "
                              "of the same format: choose another --out")
    if fmt == "h5":
        _export_h5(store, target)
    else:
        _export_npy(store, target)
    return target


def _blocks(store: Store):
    cr = store.chunk_rows
    for s in range(0, store.rows, cr):
        e = min(store.rows, s + cr)
        yield s, e, store.load_features(slice(s, e), dtype=None)


def _export_h5(store: Store, target: Path) -> None:
    import h5py

    n = store.rows
    with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("features", shape=(n, store.views, store.dim), dtype=store.dtype)
        for s, e, block in _blocks(store):
            ds[s:e] = block
        f.create_dataset("labels", data=store.labels)
        f.create_dataset("ids", data=store.ids.astype(object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("sha256", data=store.sha256.astype(object), dtype=h5py.string_dtype("utf-8"))
        levels, params = store.view_levels(), store.view_params()
        if levels is not None and params is not None:  # each view's validator level and parameters
            f.create_dataset("view_levels", data=levels)
            f.create_dataset("view_params", data=params)
            f.attrs["view_param_names"] = json.dumps(store.view_param_names)
        f.attrs["provenance"] = json.dumps(store.provenance, sort_keys=True)
        f.attrs["source_store"] = str(store.path.resolve())
        f.attrs["schema_version"] = int(store.attrs.get("schema_version", 1))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file handle: np.save would append .npy to a name
        np.save(fh, arr, allow_pickle=False)


def _export_npy(store: Store, target: Path) -> None:
    with atomic_dir(target) as work:  # the folder appears (or replaces an old export) only when complete
        with atomic_path(work / "features.npy") as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=store.dtype,
                                           shape=(store.rows, store.views, store.dim))
            for s, e, block in _blocks(store):
                mm[s:e] = block
            mm.flush()
            del mm
        _save_npy(work / "labels.npy", store.labels)
        _save_npy(work / "ids.npy", store.ids)
        _save_npy(work / "sha256.npy", store.sha256)
        levels, params = store.view_levels(), store.view_params()
        if levels is not None and params is not None:  # each view's validator level and parameters
            _save_npy(work / "view_levels.npy", levels)
            _save_npy(work / "view_params.npy", params)
            _save_npy(work / "view_param_names.npy", np.asarray(store.view_param_names, dtype=str))
        atomic_write_json(work / "provenance.json", store.provenance)


def _labels_from(raw: np.ndarray, where: str) -> np.ndarray:
    lab = np.asarray(raw).reshape(-1)
    if lab.dtype.kind == "f":
        lab = np.where(np.isnan(lab), -1, lab)
    if lab.dtype.kind not in "biuf" or not np.all(np.isin(lab, (-1, 0, 1))):
        bad = lab[~np.isin(lab, (-1, 0, 1))][:3] if lab.dtype.kind in "biuf" else lab.dtype
        raise StoreError(f"{where}: labels must be 0, 1 or -1 (unlabelled); found {bad}")
    return lab.astype(np.int8)


def _strings_from(raw: Any, where: str, key: str) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    if arr.dtype.kind not in "U":
        raise StoreError(f"{where}: '{key}' must be strings (save it as np.array(ids, dtype=str)), got {arr.dtype}")
    return arr.reshape(-1)


def read_features_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """features / labels / ids / sha256 / provenance from an HDF5 file, an .npz or an exported .npy folder."""
    p = Path(path)
    where = str(p)
    if not p.exists():
        raise MissingError(f"{p}: file not found")
    out: dict[str, Any] = {"format": None, "provenance": None, "ids": None, "sha256": None}
    if p.is_dir():
        if not (p / "features.npy").exists():
            raise StoreError(f"{p}: a folder must hold features.npy and labels.npy (as `export-features --format npy` writes)")
        out["format"] = "npy"
        arrays = {}
        for key in ("features", "labels", "ids", "sha256", *VIEW_KEYS):
            f = p / f"{key}.npy"
            if f.exists():
                arrays[key] = np.load(f, allow_pickle=False, mmap_mode="r" if key == "features" else None)
        if (p / "provenance.json").exists():
            out["provenance"] = json.loads((p / "provenance.json").read_text(encoding="utf-8"))
    elif p.suffix.lower() == ".npz":
        out["format"] = "npz"
        if not zipfile.is_zipfile(p):
            raise StoreError(f"{where}: not a .npz (zip) file; save it with np.savez")
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as exc:
            raise StoreError(f"{where}: cannot read without pickle ({exc}); store ids as a str array, not objects") from None
        except (OSError, zipfile.BadZipFile) as exc:
            raise StoreError(f"{where}: damaged .npz file ({exc}); save it again with np.savez") from None
    elif p.suffix.lower() in (".h5", ".hdf5", ".hdf"):
        import h5py

        out["format"] = "h5"
        try:
            f = h5py.File(p, "r")
        except OSError as exc:
            raise StoreError(f"{where}: not a readable HDF5 file ({exc}); write it with h5py") from None
        with f:
            arrays = {}
            for key in ("features", "labels", "ids", "sha256", *VIEW_KEYS):
                if key in f:
                    ds = f[key]
                    arrays[key] = np.array(ds.asstr()[()].tolist(), dtype=str) if h5py.check_string_dtype(ds.dtype) else ds[()]
            if "provenance" in f.attrs:
                out["provenance"] = json.loads(f.attrs["provenance"])
            if "view_param_names" in f.attrs:
                try:
                    arrays["view_param_names"] = np.asarray(json.loads(f.attrs["view_param_names"]), dtype=str)
                except ValueError:
                    raise StoreError(f"{where}: attribute view_param_names is not a JSON list of names") from None
    else:
        raise StoreError(f"{where}: unknown format; use .h5/.hdf5, .npz, or a folder from `export-features --format npy`")
    for key in ("features", "labels"):
        if key not in arrays:
            raise StoreError(f"{where}: no '{key}' array (found: {', '.join(sorted(arrays)) or 'none'})")
    feats = np.asarray(arrays["features"])
    if feats.ndim not in (2, 3) or feats.dtype.kind != "f":
        raise StoreError(f"{where}: 'features' must be a float array [N, D] or [N, V, D], got {feats.dtype} {feats.shape}")
    if feats.shape[0] == 0 or 0 in feats.shape[1:]:
        raise StoreError(f"{where}: 'features' has shape {feats.shape}: a store needs at least 1 row, 1 view and "
                         "1 feature (D >= 1); export the features again")
    out["features"] = feats
    out["labels"] = _labels_from(arrays["labels"], where)
    if len(out["labels"]) != len(feats):
        raise StoreError(f"{where}: {len(out['labels'])} labels for {len(feats)} feature rows")
    for key in ("ids", "sha256"):
        if key in arrays:
            out[key] = _strings_from(arrays[key], where, key)
            if len(out[key]) != len(feats):
                raise StoreError(f"{where}: {len(out[key])} {key} for {len(feats)} feature rows")
    names = _strings_from(arrays["view_param_names"], where, "view_param_names") if "view_param_names" in arrays else None
    views = feats.shape[1] if feats.ndim == 3 else 1
    out["view_levels"], out["view_params"], out["view_param_names"] = check_view_arrays(
        arrays.get("view_levels"), arrays.get("view_params"), names, len(feats), views, where)
    return out


def check_fits_dtype(feats: np.ndarray, dtype: str, where: str, block_rows: int = 4096) -> None:
    """DataError when a finite value of ``feats`` lies beyond ``dtype``'s range: casting would turn it
    into inf silently (float16 ends at 65504). Scans ``block_rows`` rows at a time (memmaps stay lazy)."""
    dt = np.dtype(dtype)
    if dt.kind != "f" or np.finfo(dt).max >= np.finfo(feats.dtype).max:
        return
    limit = float(np.finfo(dt).max)
    for s in range(0, len(feats), block_rows):
        block = np.asarray(feats[s:s + block_rows])
        big = np.abs(block[np.isfinite(block)])
        if big.size and float(big.max()) > limit:
            raise DataError(
                f"{where}: features reach |x| = {float(big.max()):.6g}, beyond {dt.name}'s range "
                f"(max {limit:g}): {dt.name} would store them as inf; use --dtype float32 (or rescale the features)"
            )


def import_features(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Store:
    """Build a store at ``out`` from an HDF5 / .npz / .npy-folder file; provenance kind "imported"."""
    src = Path(path)
    data = read_features_file(src)
    if dtype is None:
        dtype = str(data["features"].dtype) if str(data["features"].dtype) in ("float16", "float32") else "float32"
    bad = nonfinite_rows(data["features"])
    if bad.size:
        raise DataError(f"{src}: features must be finite; {describe_rows(bad)} hold NaN or infinite values; "
                        "fix or drop those rows before importing")
    check_fits_dtype(data["features"], dtype, str(src))
    source_sha = sha256_file(src / "features.npy") if src.is_dir() else sha256_file(src)
    provenance: dict[str, Any] = {
        "kind": "imported",
        "source_path": str(src.resolve()),
        "source_format": data["format"],
        "source_sha256": source_sha,
        "feature": (data["provenance"] or {}).get("feature", "unknown"),
    }
    if data["provenance"]:
        provenance["source_provenance"] = data["provenance"]
    if Path(out).exists() and any(Path(out).iterdir()):
        raise StoreError(f"{out}: exists and is not empty; choose a new --out")
    return write_store(
        out, np.asarray(data["features"]), data["labels"], data["ids"], data["sha256"], provenance,
        dtype=dtype, chunk_rows=chunk_rows, view_levels=data["view_levels"], view_params=data["view_params"],
        view_param_names=data["view_param_names"],
    )
