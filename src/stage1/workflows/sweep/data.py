"""What a sweep reads: the labelled rows of train / val_select / val_calib, loaded into RAM once per process.

Test rows are never loaded: ``SWEEP_SPLITS`` leaves ``test`` out, and ``SweepData.load`` reads only
the rows those splits list, so no trial and no choice among trials can see a test label.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stage1._core.errors import DataError, MissingError

#: splits a sweep reads; test is deliberately absent.
SWEEP_SPLITS = ("train", "val_select", "val_calib")


@dataclass
class SweepData:
    """Labelled rows of the sweep splits, in RAM: train [n, V, D], val splits [n, D] (view 0)."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]
    store_path: str
    fingerprint: str

    @classmethod
    def load(cls, store_path: str | os.PathLike[str]) -> "SweepData":
        """Read train / val_select / val_calib (labelled rows only) from ``store_path`` once."""
        from stage1.featstore import open_store
        from stage1.featstore.splits import load_splits

        store = open_store(str(store_path))
        try:
            splits = load_splits(store_path)
        except FileNotFoundError:
            raise MissingError(
                f"{store_path}: no splits.json; run `stage1 split {store_path}` first"
            ) from None
        labels = np.asarray(store.labels)
        x, y, rows = {}, {}, {}
        for name in SWEEP_SPLITS:
            r = np.asarray(splits[name], dtype=np.int64)
            r = r[labels[r] >= 0]
            if len(r) == 0:
                raise DataError(f"{store_path}: split {name} has no labelled rows; a sweep needs all of "
                                f"{', '.join(SWEEP_SPLITS)} (re-run `split` with other fractions)")
            views = None if name == "train" else 0
            feats = np.asarray(store.load_features(rows=r, views=views), dtype=np.float32)
            x[name] = feats if name == "train" else feats[:, 0]
            y[name] = labels[r].astype(np.int64)
            rows[name] = r
        return cls(x=x, y=y, rows=rows, store_path=str(Path(store_path).resolve()),
                   fingerprint=store_fingerprint(store, rows))


def store_fingerprint(store: Any, rows: dict[str, np.ndarray]) -> str:
    """A short hash of what the sweep's numbers depend on: backbone provenance, dims, split rows."""
    h = hashlib.sha256()
    prov = store.provenance or {}
    backbone = prov.get("backbone", {}) if isinstance(prov, dict) else {}
    h.update(str(backbone.get("weights_sha256", "")).encode())
    h.update(f"{store.dim}:{store.views}".encode())
    for name in SWEEP_SPLITS:
        h.update(name.encode())
        h.update(np.asarray(rows[name], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]
