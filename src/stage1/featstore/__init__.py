"""Frozen-backbone feature extraction into a chunked Zarr store, with provenance and splits.

Kept import-light: heavy modules (torch, transformers, zarr) load only when used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .store import Store


def open_store(path: str, mode: str = "r") -> "Store":
    """Open an existing feature store.

    Parameters
    ----------
    path : str
        The store folder written by ``stage1 extract`` (or ``import-features`` / ``write_store``).
    mode : {"r", "r+"}
        Read only (default), or read-write for a writer that holds the store's lock.

    Returns
    -------
    Store
        Rows, views, width, labels, ids, provenance; ``load_features`` reads rows into RAM.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from stage1.featstore.store import write_store
    >>> path = tempfile.mkdtemp() + "/feats.zarr"
    >>> feats = np.arange(24, dtype=np.float32).reshape(3, 2, 4)  # 3 images, 2 views, 4 dims
    >>> _ = write_store(path, feats, labels=[0, 1, -1], ids=["a.jpg", "b.jpg", "c.jpg"])
    >>> store = open_store(path)
    >>> store.rows, store.views, store.dim
    (3, 2, 4)
    >>> store.load_features(rows=[1], views=0).tolist()
    [[[8.0, 9.0, 10.0, 11.0]]]
    >>> store.labels.tolist(), str(store.ids[0])
    ([0, 1, -1], 'a.jpg')
    """
    from .store import Store

    return Store.open(path, mode=mode)
