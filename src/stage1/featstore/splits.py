"""Deterministic, stratified, leakage-free splits keyed on content hash and a seed.

Rows with the same content hash form one group and always land in the same split. Within each
label stratum, groups are ordered by sha256(seed, content hash) and cut at the cumulative fractions,
so the result depends only on the content, the labels and the seed (not on row order).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from stage1._core.io import atomic_write_json, read_json

from stage1._core.errors import ConfigError, DataError, MissingError
from stage1._core.constants import DEFAULT_FRACTIONS, SPLIT_NAMES  # noqa: F401 (re-exported)
SPLITS_FILE = "splits.json"
SCHEMA_VERSION = 1


class SplitError(DataError):
    """Splits that cannot be made as asked (bad fractions, a `split` column that leaks)."""


class FractionsError(SplitError, ConfigError):
    """--fractions that cannot be split fractions (a usage error: fix the command line)."""

    usage = True


def parse_fractions(fractions: Mapping[str, float] | Sequence[float] | str | None) -> dict[str, float]:
    """Fractions per split, normalised to sum 1: a dict, 4 numbers in SPLIT_NAMES order, or "a,b,c,d"."""
    if fractions is None:
        return dict(DEFAULT_FRACTIONS)
    if isinstance(fractions, str):
        try:
            fractions = [float(x) for x in fractions.replace(" ", "").split(",")]
        except ValueError:
            raise FractionsError(f"fractions {fractions!r}: give 4 comma-separated numbers (train,val_select,val_calib,test)") from None
    if isinstance(fractions, Mapping):
        unknown = set(fractions) - set(SPLIT_NAMES)
        if unknown:
            raise FractionsError(f"unknown split name(s) {sorted(unknown)}; use {', '.join(SPLIT_NAMES)}")
        values = [float(fractions.get(name, 0.0)) for name in SPLIT_NAMES]
    else:
        values = [float(x) for x in fractions]
        if len(values) != len(SPLIT_NAMES):
            raise FractionsError(f"give {len(SPLIT_NAMES)} fractions ({', '.join(SPLIT_NAMES)}), got {len(values)}")
    if any(not np.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise FractionsError(f"fractions must be >= 0 with a positive sum, got {values}")
    total = sum(values)
    return {name: v / total for name, v in zip(SPLIT_NAMES, values)}


def _group_key(seed: int, sha: str) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def make_splits(
    labels: Sequence[int] | np.ndarray,
    sha256: Sequence[str] | np.ndarray,
    seed: int = 0,
    fractions: Mapping[str, float] | Sequence[float] | str | None = None,
    split_column: Sequence[str] | np.ndarray | None = None,
    describe: Callable[[int], str] | None = None,
) -> dict[str, np.ndarray]:
    """Row indices (sorted int64) per split name; stratified by label, grouped by content hash.

    ``split_column`` (e.g. from the labels CSV) forces rows into a named split ('' = free); a group of
    identical images given two different splits is refused, since it would leak across them.
    ``describe`` names a row in messages (e.g. its labels-CSV line and path; default ``row N``).
    """
    name_row = describe or (lambda r: f"row {r}")
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    sha = np.asarray(sha256).astype(str).reshape(-1)
    if y.shape != sha.shape:
        raise SplitError(f"labels ({y.size}) and sha256 ({sha.size}) differ in length")
    fr = parse_fractions(fractions)
    cuts = np.cumsum([fr[name] for name in SPLIT_NAMES])
    cuts[-1] = 1.0 + 1e-9
    uniq, group_of = np.unique(sha, return_inverse=True)
    n_groups = len(uniq)
    forced = np.full(n_groups, -1, dtype=np.int64)
    forced_by = np.full(n_groups, -1, dtype=np.int64)  # the row that forced each group's split
    if split_column is not None:
        col = np.asarray(split_column).astype(str).reshape(-1)
        if col.shape != y.shape:
            raise SplitError(f"split column ({col.size}) and labels ({y.size}) differ in length")
        for row in np.flatnonzero(col != ""):
            name = col[row]
            if name not in SPLIT_NAMES:
                raise SplitError(f"{name_row(int(row))}: split {name!r} is not one of {', '.join(SPLIT_NAMES)}")
            k = SPLIT_NAMES.index(name)
            g = group_of[row]
            if forced[g] not in (-1, k):
                raise SplitError(
                    f"{name_row(int(forced_by[g]))} and {name_row(int(row))}: the same identical image (sha256 "
                    f"{sha[row][:12]}...) is assigned to both {SPLIT_NAMES[forced[g]]} and {name}, which would leak "
                    "between them; give identical images one split in the labels CSV (then extract to a new --out)"
                )
            forced[g] = k
            forced_by[g] = row
    sizes = np.bincount(group_of, minlength=n_groups)
    lo = np.full(n_groups, 2, dtype=np.int64)
    hi = np.full(n_groups, -2, dtype=np.int64)
    np.minimum.at(lo, group_of, y)
    np.maximum.at(hi, group_of, y)
    stratum = np.where(lo == hi, lo, -2)  # -2: identical images with conflicting labels
    assign = forced.copy()
    keys = np.array([_group_key(seed, s) for s in uniq])
    for s in np.unique(stratum):
        free = np.flatnonzero((stratum == s) & (forced < 0))
        if free.size == 0:
            continue
        free = free[np.argsort(keys[free], kind="stable")]
        w = sizes[free].astype(np.float64)
        mid = (np.cumsum(w) - w / 2) / w.sum()
        assign[free] = np.searchsorted(cuts, mid, side="right")
    row_split = assign[group_of]
    return {name: np.flatnonzero(row_split == k).astype(np.int64) for k, name in enumerate(SPLIT_NAMES)}


def split_counts(labels: np.ndarray, splits: Mapping[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Rows and per-label counts of each split."""
    y = np.asarray(labels)
    out = {}
    for name in SPLIT_NAMES:
        rows = np.asarray(splits.get(name, []), dtype=np.int64)
        yy = y[rows]
        out[name] = {
            "n": int(rows.size),
            "0": int(np.sum(yy == 0)),
            "1": int(np.sum(yy == 1)),
            "unlabelled": int(np.sum(yy == -1)),
        }
    return out


#: How many conflicting-label pairs are named on stderr (the count covers all).
CONFLICTS_SHOWN = 10


def label_conflicts(ids: Sequence[str], sha256: Sequence[str], labels: Sequence[int]) -> list[str]:
    """One line per image content (sha256) stored under both label 0 and label 1, naming both rows.

    Identical bytes cannot be both classes: one of the rows is mislabelled (unlabelled rows are ignored).
    """
    first: dict[str, dict[int, tuple[int, str]]] = {}
    lines = []
    for r, (i, h, lab) in enumerate(zip(ids, sha256, labels)):
        lab = int(lab)
        if lab not in (0, 1):
            continue
        seen = first.setdefault(str(h), {})
        other = seen.get(1 - lab)
        if other is not None and lab not in seen:
            lines.append(f"identical images with conflicting labels: row {other[0]} ({other[1]!r}, label {1 - lab}) "
                         f"and row {r} ({str(i)!r}, label {lab}) have sha256 {str(h)[:12]}; fix one label")
        seen.setdefault(lab, (r, str(i)))
    return lines


def warn_label_conflicts(lines: Sequence[str], who: str) -> None:
    """Write up to ``CONFLICTS_SHOWN`` of ``label_conflicts``' lines to stderr, then how many there are."""
    for line in lines[:CONFLICTS_SHOWN]:
        sys.stderr.write(f"{who}: warning: {line}\n")
    if len(lines) > CONFLICTS_SHOWN:
        sys.stderr.write(f"{who}: warning: ... and {len(lines) - CONFLICTS_SHOWN} more identical images with "
                         "conflicting labels\n")
    if lines:
        sys.stderr.write(f"{who}: warning: {len(lines)} identical image(s) with conflicting labels in all; each "
                         "group stays in one split, but one label of each is wrong: fix the labels CSV\n")


def store_fingerprint(store: Any) -> str:
    """sha256 over what a split was made from: the committed rows' labels, ids, content hashes and
    split column, and the recorded checksum of every committed chunk file (so changed features count
    too). ``runs.steps.check_splits_current`` compares it with the one splits.json records."""
    from .store import CHUNKS_ATTR

    h = hashlib.sha256(f"rows={store.rows}\n".encode())
    h.update(np.ascontiguousarray(store.labels, dtype=np.int8).tobytes())
    for name, values in (("ids", store.ids), ("sha256", store.sha256), ("split", store.split_column)):
        if values is not None:
            h.update(f"\n{name}\n".encode())
            h.update("\x00".join(str(v) for v in values.tolist()).encode("utf-8", "surrogatepass"))
    records = store.attrs.get(CHUNKS_ATTR)
    if isinstance(records, dict):
        h.update(b"\nchunks\n")
        for key in sorted(records, key=lambda k: int(k) if str(k).isdigit() else -1):
            files = records[key].get("files", {}) if isinstance(records[key], dict) else {}
            for name in sorted(files):
                h.update(f"{key}:{name}:{files[name][-1]}\n".encode())
    return h.hexdigest()


def _row_namer(store: Any) -> Callable[[int], str]:
    """Names a store row in messages: its labels-CSV path and line when the store records the CSV and
    the file still lists exactly the store's images, else the store row and its image path. The CSV
    is read on the first call only (messages are rare; a split must not re-read a large CSV)."""
    from .labels import LabelsError, image_list_sha256, parse_labels_csv

    csv_path = store.provenance.get("labels_csv")
    cache: dict[str, Any] = {}

    def lines() -> dict[str, int]:
        if "lines" not in cache:
            cache["lines"], cache["ids"] = {}, store.ids
            if isinstance(csv_path, str) and Path(csv_path).is_file():
                try:
                    entries, _ = parse_labels_csv(csv_path)
                except LabelsError:
                    entries = []
                if entries and image_list_sha256(entries) == store.provenance.get("image_list_sha256"):
                    cache["lines"] = {e.path: e.line for e in entries}
        return cache["lines"]

    def name(row: int) -> str:
        found = lines()
        path = str(cache["ids"][row])
        line = found.get(path)
        return f"{csv_path} line {line} ({path!r})" if line else f"{store.path} row {row} ({path!r})"

    return name


def write_splits(
    store_path: str | os.PathLike[str],
    seed: int = 0,
    fractions: Mapping[str, float] | Sequence[float] | str | None = None,
) -> dict[str, Any]:
    """Make splits for a store and write STORE/splits.json (seed, fractions, counts, rows); returns it.

    splits.json also records the store it was made from (rows, n_committed, complete, image list hash,
    ``store_fingerprint``) so a later train refuses it once the store changed. Identical images with
    conflicting labels are named on stderr (and counted under ``label_conflicts``).
    """
    from .store import Store

    store = Store.open(store_path)
    fr = parse_fractions(fractions)
    labels = store.labels
    splits = make_splits(labels, store.sha256, seed=seed, fractions=fr, split_column=store.split_column,
                         describe=_row_namer(store))
    conflicts = label_conflicts(store.ids, store.sha256, labels)
    warn_label_conflicts(conflicts, "split")
    payload = {
        "schema_version": SCHEMA_VERSION,
        "seed": int(seed),
        "fractions": fr,
        "counts": split_counts(labels, splits),
        "rows": {name: splits[name].tolist() for name in SPLIT_NAMES},
        "label_conflicts": len(conflicts),
        "store": {
            "path": str(Path(store_path).resolve()),
            "rows": store.rows,
            "n_committed": store.rows,
            "complete": store.complete,
            "fingerprint": store_fingerprint(store),
            "image_list_sha256": store.provenance.get("image_list_sha256", ""),
            "split_column": store.split_column is not None,
        },
    }
    if not store.complete:
        sys.stderr.write(f"split: warning: {store_path} is not complete ({store.rows} rows committed of "
                         f"{store.attrs.get('n_listed', '?')} listed): re-run `stage1 split` once extraction "
                         "finishes (train refuses this split after the store grows)\n")
    atomic_write_json(Path(store_path) / SPLITS_FILE, payload)
    return payload


def load_splits(path: str | os.PathLike[str], n_rows: int | None = None) -> dict[str, np.ndarray]:
    """Row indices per split from a splits.json, or from STORE/splits.json when given a folder.

    The file is validated here, at load (it may be hand-edited): 'rows' names exactly the splits of
    SPLIT_NAMES, each a list of distinct integer rows in [0, n_rows), and no row is in two splits
    (a row in train and test leaks). ``n_rows`` is the store's row count (default: the count the
    file records under store.rows). A SplitError names the file and the fix.
    """
    p = Path(path)
    if p.is_dir():
        p = p / SPLITS_FILE
    if not p.exists():
        raise MissingError(f"{p}: no splits file; run `stage1 split STORE` first")
    data = read_json(p)
    fix = "regenerate it with `stage1 split STORE`"
    if not isinstance(data, dict):
        raise SplitError(f"{p}: not a JSON object; {fix}")
    rows = data.get("rows")
    if not isinstance(rows, dict):
        raise SplitError(f"{p}: expected 'rows' with {', '.join(SPLIT_NAMES)}; {fix}")
    unknown = sorted(set(rows) - set(SPLIT_NAMES))
    missing = [name for name in SPLIT_NAMES if name not in rows]
    if unknown or missing:
        what = "; ".join(x for x in (f"unknown split(s) {', '.join(map(repr, unknown))}" if unknown else "",
                                      f"missing {', '.join(missing)}" if missing else "") if x)
        raise SplitError(f"{p}: 'rows' must name exactly {', '.join(SPLIT_NAMES)} ({what}); {fix}")
    if n_rows is None:
        recorded = (data.get("store") or {}).get("rows") if isinstance(data.get("store"), dict) else None
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 0:
            n_rows = recorded
    out: dict[str, np.ndarray] = {}
    for name in SPLIT_NAMES:
        given = rows[name]
        if not isinstance(given, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in given):
            raise SplitError(f"{p}: rows.{name} must be a list of integer row numbers; {fix}")
        arr = np.asarray(given, dtype=np.int64)
        if arr.size and (arr.min() < 0 or (n_rows is not None and arr.max() >= n_rows)):
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise SplitError(f"{p}: rows.{name} holds row {bad}, outside the store's rows 0..{(n_rows or 0) - 1}; {fix}")
        if len(np.unique(arr)) != len(arr):
            raise SplitError(f"{p}: rows.{name} lists a row twice; {fix}")
        for other, taken in out.items():
            both = np.intersect1d(taken, arr)
            if both.size:
                raise SplitError(f"{p}: row {int(both[0])} is in both {other} and {name} (it would leak "
                                 f"between them; {both.size} such rows); {fix}")
        out[name] = arr
    return out
