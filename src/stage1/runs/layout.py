"""The run directory that ``train`` writes and ``calibrate`` / ``evaluate`` / ``export`` read.

Layout (DESIGN "Artifacts"): ``config.json`` (resolved, never overwritten), ``splits.json``
(copied from the store), ``head.safetensors`` + ``head.json`` (``Head.save``),
``scores.safetensors`` (per split: ``{split}.logits`` [n, 2] float32, ``{split}.select`` [n]
float32, ``{split}.y`` [n] int8 with -1 = unlabelled, ``{split}.rows`` [n] int64 store rows),
optionally (runs trained on a store that records view levels) ``{split}.view_logits`` [n, V, 2]
float32, ``{split}.view_select`` [n, V] float32 and ``{split}.view_levels`` [n, V] int8 (every cached
view's scores; -1 = not a validator view), ``policy.json`` (``calibrate``), ``novelty.safetensors``
(``calibrate --novelty``: reference features and val_calib novelty scores), ``metrics.json`` / ``metrics.csv`` / PNG plots (``evaluate``).
Pure numpy + JSON: reading a run never needs torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from stage1._core.errors import DataError

from stage1._core.io import (
    atomic_write_bytes,
    atomic_write_json,
    load_safetensors,
    read_json,
    save_safetensors_atomic,
)

SCHEMA_VERSION = 1
CONFIG = "config.json"
SPLITS = "splits.json"
SCORES = "scores.safetensors"
POLICY = "policy.json"
#: the novelty scorer's arrays (``calibrate --novelty``), beside policy.json; the same name as
#: ``policies.novelty.NOVELTY_FILE`` (kept literal so reading a run never imports the policies).
NOVELTY = "novelty.safetensors"
METRICS = "metrics.json"
METRICS_CSV = "metrics.csv"
PLOT_RISK_COVERAGE = "risk_coverage.png"
PLOT_RELIABILITY = "reliability.png"
SCORE_FIELDS = ("logits", "select", "y", "rows")
VIEW_FIELDS = ("view_logits", "view_select", "view_levels")
NO_VIEW_SCORES_FIX = ("re-train on a store with views (`stage1 extract ... --views N --view-recipe validator`, "
                      "`split`, then `train`)")


class RunDirError(DataError):
    """A run directory is missing a file, or a file is not what this version writes."""


def _need(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise RunDirError(f"{path}: {what} not found; {fix}")
    return path


def start_run(run: str | os.PathLike[str], config: dict[str, Any]) -> Path:
    """Create ``run`` and write config.json; refuses when a config.json is already there."""
    root = Path(run)
    cfg = root / CONFIG
    if cfg.exists():
        raise RunDirError(f"{cfg}: already exists; refusing to overwrite a run (choose a new --out folder)")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg, {"schema_version": SCHEMA_VERSION, **config})
    return root


def update_config(run: str | os.PathLike[str], **fields: Any) -> None:
    """Add result fields (e.g. training history) to config.json; resolved inputs are never changed."""
    cfg = read_config(run)
    clash = sorted(k for k in fields if k in cfg)
    if clash:
        raise RunDirError(f"{Path(run) / CONFIG}: fields {', '.join(clash)} are already set")
    atomic_write_json(Path(run) / CONFIG, {**cfg, **fields})


def read_config(run: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of ``run`` (checked schema version)."""
    path = _need(Path(run) / CONFIG, "run config", "is this a folder written by `train`?")
    cfg = read_json(path)
    if cfg.get("schema_version") != SCHEMA_VERSION:
        raise RunDirError(f"{path}: schema_version {cfg.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return cfg


def copy_splits(run: str | os.PathLike[str], splits_json: str | os.PathLike[str]) -> None:
    """Copy the store's splits.json into the run byte for byte (the run records what it used)."""
    atomic_write_bytes(Path(run) / SPLITS, Path(splits_json).read_bytes())


def write_scores(run: str | os.PathLike[str], per_split: dict[str, dict[str, np.ndarray]],
                 metadata: dict[str, str] | None = None) -> None:
    """Write ``{split}.{logits,select,y,rows}`` for every split into scores.safetensors."""
    tensors: dict[str, np.ndarray] = {}
    for split, d in per_split.items():
        missing = [f for f in SCORE_FIELDS if f not in d]
        if missing:
            raise ValueError(f"scores for split {split!r} lack {', '.join(missing)}")
        n = len(d["rows"])
        logits = np.asarray(d["logits"], dtype=np.float32).reshape(n, 2)
        tensors[f"{split}.logits"] = logits
        tensors[f"{split}.select"] = np.asarray(d["select"], dtype=np.float32).reshape(n)
        tensors[f"{split}.y"] = np.asarray(d["y"], dtype=np.int8).reshape(n)
        tensors[f"{split}.rows"] = np.asarray(d["rows"], dtype=np.int64).reshape(n)
        have = [f for f in VIEW_FIELDS if f in d]
        if have and len(have) != len(VIEW_FIELDS):
            raise ValueError(f"view scores for split {split!r} need all of {', '.join(VIEW_FIELDS)}")
        if have:
            vl = np.asarray(d["view_logits"], dtype=np.float32)
            v = vl.shape[1] if vl.ndim == 3 else -1
            tensors[f"{split}.view_logits"] = vl.reshape(n, v, 2)
            tensors[f"{split}.view_select"] = np.asarray(d["view_select"], dtype=np.float32).reshape(n, v)
            tensors[f"{split}.view_levels"] = np.asarray(d["view_levels"], dtype=np.int8).reshape(n, v)
    meta = {"schema_version": str(SCHEMA_VERSION), "splits": ",".join(per_split), **(metadata or {})}
    save_safetensors_atomic(tensors, Path(run) / SCORES, metadata=meta)


def _read_all(run: str | os.PathLike[str]) -> tuple[Path, dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    path = _need(Path(run) / SCORES, "scores", "run `train` to produce it")
    flat = load_safetensors(path)
    out: dict[str, dict[str, np.ndarray]] = {}
    views: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in flat.items():
        split, _, field = key.rpartition(".")
        if field in VIEW_FIELDS:
            views.setdefault(split, {})[field] = arr
        elif field in SCORE_FIELDS:
            out.setdefault(split, {})[field] = arr
        else:
            raise RunDirError(f"{path}: unexpected tensor {key!r}")
    return path, out, views


def read_scores(run: str | os.PathLike[str]) -> dict[str, dict[str, np.ndarray]]:
    """``{split: {"logits", "select", "y", "rows"}}`` (view 0) from scores.safetensors."""
    path, out, _ = _read_all(run)
    for split, d in out.items():
        if set(d) != set(SCORE_FIELDS):
            raise RunDirError(f"{path}: split {split!r} has {sorted(d)}, expected {list(SCORE_FIELDS)}")
    return out


def split_scores(run: str | os.PathLike[str], split: str, labelled_only: bool = True
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, int]:
    """(scores dict for policies, y, store rows, #unlabelled rows dropped) of one split."""
    all_scores = read_scores(run)
    if split not in all_scores:
        raise RunDirError(f"{Path(run) / SCORES}: no split {split!r}; have {', '.join(sorted(all_scores))}")
    d = all_scores[split]
    keep = d["y"] >= 0 if labelled_only else np.ones(len(d["y"]), dtype=bool)
    scores = {"logits": d["logits"][keep], "select": d["select"][keep]}
    return scores, d["y"][keep].astype(np.int64), d["rows"][keep], int((~keep).sum())


def has_view_scores(run: str | os.PathLike[str], split: str) -> bool:
    """True when scores.safetensors holds every cached view's scores of ``split``."""
    return len(_read_all(run)[2].get(split, {})) == len(VIEW_FIELDS)


def split_view_scores(run: str | os.PathLike[str], split: str, labelled_only: bool = True
                      ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, int]:
    """({"view_logits" [n, V, 2], "view_select" [n, V], "view_levels" [n, V]}, y, rows, #unlabelled dropped).

    RunDirError when the run has no view scores (written before they existed, or trained on a store
    that records no view levels): the message names the fix.
    """
    path, out, views = _read_all(run)
    if split not in out:
        raise RunDirError(f"{path}: no split {split!r}; have {', '.join(sorted(out))}")
    v = views.get(split, {})
    if len(v) != len(VIEW_FIELDS):
        raise RunDirError(f"{path}: this run has no view scores for {split!r} (its store records no view "
                          f"levels, or an older version trained it); {NO_VIEW_SCORES_FIX}")
    d = out[split]
    keep = d["y"] >= 0 if labelled_only else np.ones(len(d["y"]), dtype=bool)
    return ({f: v[f][keep] for f in VIEW_FIELDS}, d["y"][keep].astype(np.int64), d["rows"][keep],
            int((~keep).sum()))


def write_policy(run: str | os.PathLike[str], policy_dict: dict[str, Any]) -> Path:
    """Write policy.json (the policy's ``to_dict()`` plus where it was fit)."""
    path = Path(run) / POLICY
    atomic_write_json(path, policy_dict)
    return path


def novelty_path(run: str | os.PathLike[str]) -> Path:
    """Where ``calibrate --novelty`` keeps the novelty scorer's arrays."""
    return Path(run) / NOVELTY


def clear_novelty(run: str | os.PathLike[str]) -> None:
    """Remove a novelty file left by an earlier ``calibrate --novelty`` (the new policy.json has none)."""
    novelty_path(run).unlink(missing_ok=True)


def read_policy(run: str | os.PathLike[str]) -> dict[str, Any]:
    """policy.json of ``run``."""
    return read_json(_need(Path(run) / POLICY, "policy", "run `calibrate RUN --policy NAME` first"))


def policy_sha256(run: str | os.PathLike[str]) -> str:
    """sha256 of policy.json's bytes: ``evaluate`` records it in metrics.json, ``export`` copies the
    metrics only while policy.json still has it (a re-calibrate makes them stale)."""
    from stage1._core.io import sha256_file

    return sha256_file(_need(Path(run) / POLICY, "policy", "run `calibrate RUN --policy NAME` first"))


def eval_dir(run: str | os.PathLike[str], split: str, views: str = "clean") -> Path:
    """Where ``evaluate`` writes: the run folder for test, ``eval_{split}/`` for other splits;
    with ``views="validator"`` always ``eval_{split}_validator/`` (view-0 results stay where they were)."""
    if views != "clean":
        return Path(run) / f"eval_{split}_{views}"
    return Path(run) if split == "test" else Path(run) / f"eval_{split}"
