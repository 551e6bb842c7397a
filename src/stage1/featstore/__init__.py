"""Frozen-backbone feature extraction into a chunked Zarr store, with provenance and splits.

Kept import-light: heavy modules (torch, transformers, zarr) load only when used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .store import Store


def open_store(path: str, mode: str = "r") -> "Store":
    """Open an existing feature store (see ``featstore.store.Store``)."""
    from .store import Store

    return Store.open(path, mode=mode)
