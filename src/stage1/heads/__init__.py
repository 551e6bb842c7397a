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
    """Load a head saved by ``Head.save`` (head.json + head.safetensors in ``path``).

    Everything is validated here, at load: head.json's fields (schema version, a known head name,
    ``in_dim`` an integer >= 1, ``hparams`` through the head's declaration: types, ranges,
    finiteness), and the weights (finite, and each tensor's shape what that config builds). Any
    problem is a one-line DataError naming the file and the fix.
    """
    from stage1._core.errors import DataError, Stage1Error
    import numpy as np

    from stage1._core.io import load_safetensors, read_json

    from .base import HEAD_JSON, HEAD_WEIGHTS, SCHEMA_VERSION

    registry = _registry()
    meta_path = os.path.join(path, HEAD_JSON)
    weights_path = os.path.join(path, HEAD_WEIGHTS)
    fix = "retrain the head (`stage1 train`)"
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: not a JSON object; {fix}")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{meta_path}: schema_version {meta.get('schema_version')!r}, expected "
                         f"{SCHEMA_VERSION}; retrain the head with this version")
    name = meta.get("head")
    if not isinstance(name, str) or name not in registry:
        raise DataError(f"{meta_path}: unknown head {name!r}; known: {', '.join(registry.names())}")
    # hparams go through the head's declaration (PARAMS) in from_saved: a ConfigError there names them
    in_dim = meta.get("in_dim")
    if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
        raise DataError(f"{meta_path}: in_dim={in_dim!r}: expected an integer >= 1; {fix}")
    if not isinstance(meta.get("hparams"), dict):
        raise DataError(f"{meta_path}: hparams must be an object; {fix}")
    standardize_active = meta.get("standardize_active")
    if standardize_active is not None and not isinstance(standardize_active, bool):
        raise DataError(f"{meta_path}: standardize_active={standardize_active!r}: expected true or false; {fix}")
    training = meta.get("training")
    if training is not None and not isinstance(training, dict):
        raise DataError(f"{meta_path}: training must be an object or null; {fix}")
    try:
        tensors = load_safetensors(weights_path)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError on a damaged file
        raise DataError(f"{weights_path}: not a readable safetensors file ({exc}); the file is damaged or "
                        f"is another format (pickled weights are never loaded); {fix}") from None
    for key, arr in tensors.items():
        a = np.asarray(arr)
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise DataError(f"{weights_path}: tensor {key!r} holds NaN or infinite values; {fix}")
    try:
        return registry.get(name).from_saved(meta, tensors)
    except Stage1Error as exc:
        raise DataError(f"{meta_path}: {exc}; {fix}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{meta_path}: malformed ({type(exc).__name__}: {exc}); {fix}") from None
