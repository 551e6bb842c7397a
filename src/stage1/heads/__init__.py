"""Small heads trained on cached features, registered by name in ``HEADS``.

``HEADS.create(name, **hparams)`` builds an unfitted head; ``load_head(dir)`` restores a saved one.
Each head class declares its hyperparameters once (``HEADS.get(name).PARAMS``).
Importing ``heads`` stays light: the head modules, which need torch, are imported the first time
``HEADS`` or ``load_head`` is used.

Examples
--------
``HEADS.create(name, **hparams)``: hyperparameters are checked against the head's declaration;
``fit`` trains on cached features ([n, D], or [n, V, D] with views); ``predict_scores`` gives the
logits and the ``select`` score an exit policy thresholds.

>>> import numpy as np
>>> from stage1.heads import HEADS
>>> HEADS.names()
['crc', 'gate', 'mlp', 'selectivenet']
>>> rng = np.random.default_rng(0)
>>> y = rng.integers(0, 2, 200)
>>> X = rng.normal(0, 1, (200, 8)).astype(np.float32) + 2.0 * y[:, None]
>>> head = HEADS.create("gate", hidden=16, epochs=5, batch_size=32, seed=0).fit(X, y)
>>> scores = head.predict_scores(X[:3])
>>> sorted(scores), scores["logits"].shape
(['logits', 'select'], (3, 2))
>>> HEADS.create("mlp", hidden=-1)
Traceback (most recent call last):
...
stage1._core.errors.ConfigError: head 'mlp': hidden=-1: expected int >= 1
"""
from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from stage1._core.registry import Registry

    from .base import Head

    HEADS: Registry

#: modules whose import registers a head (one per head name).
HEAD_MODULES = ("stage1.heads.mlp", "stage1.heads.gate", "stage1.heads.selectivenet", "stage1.heads.crc")


def _registry() -> "Registry":
    from .registry import HEADS as registry

    for mod in HEAD_MODULES:
        importlib.import_module(mod)
    return registry


def __getattr__(name: str) -> Any:
    if name == "HEADS":
        return _registry()
    raise AttributeError(f"module 'heads' has no attribute {name!r}")


def load_head(path: str | os.PathLike[str]) -> "Head":
    """Load a head saved by ``Head.save`` (head.json + head.safetensors in ``path``)."""
    from stage1._core.errors import DataError
    from stage1._core.io import load_safetensors, read_json

    from .base import HEAD_JSON, HEAD_WEIGHTS, SCHEMA_VERSION

    registry = _registry()
    meta_path = os.path.join(path, HEAD_JSON)
    meta = read_json(meta_path)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{meta_path}: schema_version {meta.get('schema_version')!r}, expected "
                         f"{SCHEMA_VERSION}; retrain the head with this version")
    name = meta.get("head")
    if name not in registry:
        raise DataError(f"{meta_path}: unknown head {name!r}; known: {', '.join(registry.names())}")
    return registry.get(name).from_saved(meta, load_safetensors(os.path.join(path, HEAD_WEIGHTS)))
