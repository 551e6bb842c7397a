"""What a sweep reads: the labelled rows of train / val_select / val_calib, loaded into RAM once per process.

Test rows are never loaded: ``SWEEP_SPLITS`` leaves ``test`` out, and ``SweepData.load`` reads only
the rows those splits list, so no trial and no choice among trials can see a test label. Of
val_calib only the *choose* part is kept (``policies.selection``): the exported runs are certified
on the other part, which the choice among trials never saw, so their certificates hold.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stage1._core.errors import DataError, MissingError
from stage1.policies.selection import DEFAULT_CERTIFY_FRACTION, PART_SEED, holdout_parts

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
        """Read train / val_select and the choose part of val_calib (labelled rows only) once."""
        from stage1.featstore import open_store
        from stage1.featstore.splits import load_splits

        store = open_store(str(store_path))
        try:
            splits = load_splits(store_path, n_rows=store.rows)
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
        # val_calib: only its choose part. The certify part is what the chosen runs are certified on
        # (write_trial_run), so no trial and no choice among trials may see it.
        choose = holdout_parts(rows["val_calib"], y["val_calib"], DEFAULT_CERTIFY_FRACTION, PART_SEED)["choose"]
        x["val_calib"], y["val_calib"], rows["val_calib"] = (x["val_calib"][choose], y["val_calib"][choose],
                                                             rows["val_calib"][choose])
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
