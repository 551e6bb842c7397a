"""The feature store's errors, in one place so the store, its reader, lock and provenance check share them.

All derive from ``stage1._core.errors`` (a store that cannot be used is a ``DataError``; a store
another process is writing is an ``EnvironmentProblem``), so the CLI maps them to one-line messages.
"""
from __future__ import annotations

from stage1._core.errors import DataError, EnvironmentProblem


class StoreError(DataError):
    """A store that cannot be used as asked (missing, wrong schema, bad rows)."""


class ProvenanceMismatch(StoreError):
    """Resume / append refused because a provenance attribute differs."""


class StoreBusy(EnvironmentProblem):
    """Another process holds the store's writer lock."""


class NotDurable(EnvironmentProblem):
    """An fsync failed: written rows may not be on disk, so they are not committed."""


class StoreDiskError(EnvironmentProblem):
    """The disk holding a store is full or read-only: the rows written so far stay committed."""
