"""What `train`, `calibrate` and `evaluate` do, as plain functions (the click layer only parses).

train: store -> RAM once -> head.fit on train (all views), early stopping on val_select ->
run folder. calibrate: val_calib scores only -> policy.json. evaluate: policy on a split ->
metrics.json / metrics.csv / plots.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import layout

from stage1._core.constants import SPLIT_NAMES
from stage1._core.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    from stage1.policies.selection import SelectionRecord


def _splits_file(store: str | os.PathLike[str]) -> Path:
    path = Path(store) / layout.SPLITS
    if not path.exists():
        raise layout.RunDirError(
            f"{path}: not found; run `stage1 split {store}` first to make the "
            "train / val_select / val_calib / test splits"
        )
    return path


def load_split_arrays(store_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Features of every split in RAM (one read of the store), labels, rows and store facts."""
    from stage1.featstore import open_store
    from stage1.featstore.splits import load_splits

    store = open_store(str(store_path))
    splits = load_splits(_splits_file(store_path), n_rows=store.rows)
    rows_all = np.unique(np.concatenate([splits[s] for s in SPLIT_NAMES]))
    feats = store.load_features(rows=rows_all)  # [m, V, D] float32, read once
    pos = {int(r): i for i, r in enumerate(rows_all)}
    labels = np.asarray(store.labels, dtype=np.int64)
    out: dict[str, Any] = {"store": store, "views": int(feats.shape[1]), "dim": int(feats.shape[2])}
    for s in SPLIT_NAMES:
        rows = splits[s]
        out[s] = {"x": feats[[pos[int(r)] for r in rows]], "y": labels[rows], "rows": rows}
    return out


class _EpochBar:
    """tqdm over epochs (stderr), showing the val_select objective."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="train", unit="epoch", disable=not enabled, leave=False)

    def __call__(self, epoch: int, loss: float, objective: float | None) -> None:
        self.bar.update(1)
        post = {"loss": f"{loss:.4f}"}
        if objective is not None:
            post["val"] = f"{objective:.5f}"
        self.bar.set_postfix(post)

    def close(self) -> None:
        self.bar.close()


def train_run(store: str | os.PathLike[str], head_name: str, run: str | os.PathLike[str],
              hparams: dict[str, Any], *, progress: bool = True, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train ``head_name`` with ``hparams`` on STORE's splits and write the run folder; a summary."""
    from stage1._core.io import json_safe, sha256_file, utc_timestamp

    from stage1.heads import HEADS

    cfg_path = Path(run) / layout.CONFIG
    if cfg_path.exists():
        raise layout.RunDirError(f"{cfg_path}: already exists; refusing to overwrite a run (choose a new --out folder)")
    head = HEADS.create(head_name, **hparams)
    splits_path = _splits_file(store)
    t0 = time.perf_counter()
    data = load_split_arrays(store)
    t_load = time.perf_counter() - t0
    tr, vs = data["train"], data["val_select"]
    keep_tr, keep_vs = tr["y"] >= 0, vs["y"] >= 0
    if keep_tr.sum() < 2 or len(np.unique(tr["y"][keep_tr])) < 2:
        raise DataError(f"{splits_path}: the train split needs labelled rows of both classes "
                         f"(has {int(keep_tr.sum())} labelled); label more images or change the split")
    x_val = vs["x"][keep_vs] if keep_vs.any() else None
    y_val = vs["y"][keep_vs] if keep_vs.any() else None
    bar = _EpochBar(int(head.hparams["epochs"]), progress)
    head.progress_callback = bar
    t1 = time.perf_counter()
    try:
        head.fit(tr["x"][keep_tr], tr["y"][keep_tr], X_val=x_val, y_val=y_val)
    finally:
        bar.close()
    t_fit = time.perf_counter() - t1
    Path(run).mkdir(parents=True, exist_ok=True)
    head.save(run)
    per_split: dict[str, dict[str, np.ndarray]] = {}
    for s in SPLIT_NAMES:
        d = data[s]
        sc = head.predict_scores(d["x"][:, 0]) if len(d["rows"]) else {"logits": np.zeros((0, 2)), "select": np.zeros(0)}
        per_split[s] = {**sc, "y": d["y"], "rows": d["rows"]}
    layout.write_scores(run, per_split, metadata={"head": head_name})
    layout.copy_splits(run, splits_path)
    store_obj = data["store"]
    hist = head.history_.to_dict() if head.history_ is not None else None
    val_summary = _quick_summary(per_split["val_select"])
    config = {
        "command": list(argv) if argv else None,
        "created": utc_timestamp(),
        "store": {
            "path": str(Path(store).resolve()),
            "rows": int(store_obj.rows),
            "dim": data["dim"],
            "views": data["views"],
            "dtype": str(store_obj.dtype),
            "provenance": store_obj.provenance,
            "splits_sha256": sha256_file(splits_path),
        },
        "splits": {s: {"n": int(len(data[s]["rows"])), "labelled": int((data[s]["y"] >= 0).sum()),
                       "positives": int((data[s]["y"] == 1).sum())} for s in SPLIT_NAMES},
        "head": head_name,
        "head_has_selector": bool(getattr(head, "HAS_SELECTOR", False)),
        "hparams": head.get_params(),
        "training": {"history": hist, "unlabelled_train_rows_skipped": int((~keep_tr).sum()),
                     "early_stopping_on": "val_select" if x_val is not None and head.hparams["early_stopping"]
                     else "none (fixed epochs, last weights kept)",
                     "seconds_load": round(t_load, 3), "seconds_fit": round(t_fit, 3),
                     "val_select": val_summary},
        "environment": {"python": platform.python_version(), "torch": _torch_version(), "threads": _threads()},
    }
    layout.start_run(run, json_safe(config))
    return {"run": str(run), "head": head_name, "best_epoch": None if hist is None else hist["best_epoch"],
            "epochs_run": None if hist is None else hist["epochs_run"], "seconds_fit": round(t_fit, 3),
            "val_select": val_summary, "splits": config["splits"],
            **({"crc_term_fraction": hist["crc_term_fraction"]} if hist and "crc_term_fraction" in hist else {})}


def _quick_summary(d: dict[str, np.ndarray]) -> dict[str, Any]:
    from stage1.policies import metrics

    keep = d["y"] >= 0
    if not keep.any():
        return {"n": 0}
    y = d["y"][keep]
    err = (d["logits"][keep].argmax(1) != y).astype(np.int64)
    return {"n": int(keep.sum()), "accuracy": float(1 - err.mean()),
            "augrc": float(metrics.augrc(d["select"][keep].astype(np.float64), err))}


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def calibrate_run(run: str | os.PathLike[str], policy_name: str, params: dict[str, Any],
                  score: str = "auto", *, part: str = "all", selection: "SelectionRecord | None" = None,
                  certify_fraction: float | None = None, part_seed: int = 0) -> dict[str, Any]:
    """Fit ``policy_name`` on the run's val_calib scores and write policy.json; a summary.

    ``part`` picks the rows: "all" of val_calib (one candidate, nothing chosen on it), "choose"
    (comparing candidates: the fit is recorded as not a guarantee) or "certify" (the held-out
    rows a choice never saw; ``selection`` says how the run was chosen). The parts are a fixed,
    label-stratified split keyed on store rows and ``part_seed`` (``policies.selection``).
    """
    from stage1.policies import POLICIES
    from stage1.policies.guarantee import guarantee_statement
    from stage1.policies.selection import DEFAULT_CERTIFY_FRACTION, SelectionRecord, part_mask

    cfg = layout.read_config(run)
    factory = POLICIES.get(policy_name)
    if score == "auto":
        score = "select" if cfg.get("head_has_selector") else "p"
    if score not in ("p", "select"):
        raise ConfigError(f"--score must be p, select or auto, got {score!r}")
    params = dict(params)
    if policy_name == "coverage" and "target_coverage" not in params and "coverage" in cfg.get("hparams", {}):
        # selectivenet: its selector threshold is set on val_calib to reach the coverage it trained for
        params["target_coverage"] = float(cfg["hparams"]["coverage"])
    try:
        policy = factory(score=score, **params)
    except TypeError as exc:
        raise ConfigError(f"policy {policy_name!r} does not accept these parameters ({exc}); "
                          "see `calibrate --help`") from None
    scores, y, rows, dropped = layout.split_scores(run, "val_calib")
    fraction = DEFAULT_CERTIFY_FRACTION if certify_fraction is None else float(certify_fraction)
    keep = part_mask(part, rows, y, fraction, part_seed)
    scores, y = {k: v[keep] for k, v in scores.items()}, y[keep]
    if len(y) == 0:
        raise DataError(f"{Path(run) / layout.SCORES}: val_calib ({part}) has no labelled rows; nothing to calibrate on")
    policy.fit(scores, y)
    if selection is None:
        selection = SelectionRecord("none" if part == "all" else "holdout", 1, part, fraction, part_seed)
    d = policy.to_dict()
    d["fit"] = {"split": "val_calib", "part": part, "n": int(len(y)), "positives": int(y.sum()),
                "unlabelled_skipped": dropped, "head": cfg.get("head"), "run_config_created": cfg.get("created")}
    d["selection"] = selection.to_dict()
    d["statement"] = guarantee_statement(d)
    layout.write_policy(run, d)
    state = d["state"]
    return {"policy": policy_name, "guarantee": d.get("guarantee", "none"), "certified": bool(state["certified"]),
            "reason": state["reason"], "n_needed": state["n_needed"], "t0": state["t0"], "t1": state["t1"],
            "score": score, "n_calib": int(len(y)), "part": part, "statement": d["statement"],
            "summary": state.get("summary", {})}


def evaluate_run(run: str | os.PathLike[str], split: str = "test") -> dict[str, Any]:
    """Apply policy.json to ``split``; write metrics.json, metrics.csv and PNG plots; the metrics."""
    from stage1.policies import policy_from_dict, reports
    from stage1.policies.evaluate import evaluation_metrics
    from stage1.policies.guarantee import guarantee_statement

    cfg = layout.read_config(run)
    policy_json = layout.read_policy(run)
    policy = policy_from_dict(policy_json, where=str(Path(run) / layout.POLICY))
    scores, y, _, dropped = layout.split_scores(run, split)
    if len(y) == 0:
        raise DataError(f"{Path(run) / layout.SCORES}: split {split!r} has no labelled rows to evaluate")
    decision = policy.decide(scores)
    metrics = dict(evaluation_metrics(y, scores, decision))
    metrics.update({"split": split, "head": cfg.get("head"), "policy": policy.name,
                    "guarantee_statement": guarantee_statement(policy_json),
                    "certified": bool(policy.certified), "unlabelled_skipped": dropped})
    out = layout.eval_dir(run, split)
    out.mkdir(parents=True, exist_ok=True)
    reports.write_metrics(out, metrics)
    errors = (decision.label.astype(np.int64) != y).astype(np.float64)
    reports.plot_risk_coverage(out / layout.PLOT_RISK_COVERAGE, decision.score, errors,
                               operating_point=(metrics["coverage"], metrics["selective_error"]),
                               title=f"Risk-coverage: {cfg.get('head')} + {policy.name} ({split})")
    reports.plot_reliability(out / layout.PLOT_RELIABILITY, y, decision.p_roadwork,
                             title=f"Reliability: {cfg.get('head')} + {policy.name} ({split})")
    return metrics
