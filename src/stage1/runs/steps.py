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


def check_splits_current(splits_path: str | os.PathLike[str], store: Any) -> None:
    """Refuse a splits.json made on another state of the store (rows since added, another image list).

    splits.json records the store it was made on (``store.rows``, ``store.image_list_sha256``; newer
    versions also ``store.n_committed``, ``store.complete`` and ``store.fingerprint``); a split made
    while extraction was still running would otherwise train on a fraction of the rows.
    """
    from stage1._core.io import read_json

    path = Path(splits_path)
    data = read_json(path)
    recorded = data.get("store") if isinstance(data, dict) else None
    fix = f"re-run `stage1 split {path.parent}` to split the store as it is now"
    if not isinstance(recorded, dict):
        raise DataError(f"{path}: records no store facts (rows, image list), so it cannot be tied to this "
                        f"store; {fix}")
    now = int(store.rows)
    for key in ("rows", "n_committed"):
        was = recorded.get(key)
        if was is None:
            continue
        if not isinstance(was, int) or isinstance(was, bool) or was != now:
            raise DataError(f"{path}: made when the store had {was!r} rows, it has {now} now (extraction "
                            f"continued, or the store was rebuilt); {fix}")
    if "image_list_sha256" in recorded:
        have = str((store.provenance or {}).get("image_list_sha256", ""))
        if str(recorded["image_list_sha256"]) != have:
            raise DataError(f"{path}: made for another image list (image_list_sha256 "
                            f"{str(recorded['image_list_sha256'])[:12] or 'none'} vs the store's "
                            f"{have[:12] or 'none'}); {fix}")
    from stage1.featstore import splits as splits_mod

    fingerprint = getattr(splits_mod, "store_fingerprint", None)
    if "fingerprint" in recorded and fingerprint is not None and recorded["fingerprint"] != fingerprint(store):
        raise DataError(f"{path}: the store's rows (content or labels) changed since the split was made; {fix}")


def load_split_arrays(store_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Features of every split in RAM (one read of the store), labels, rows and store facts."""
    from stage1.featstore import open_store
    from stage1.featstore.splits import load_splits

    store = open_store(str(store_path))
    splits_path = _splits_file(store_path)
    splits = load_splits(splits_path, n_rows=store.rows)
    check_splits_current(splits_path, store)
    rows_all = np.unique(np.concatenate([splits[s] for s in SPLIT_NAMES]))
    feats = store.load_features(rows=rows_all)  # [m, V, D] float32, read once
    bad = ~np.isfinite(feats).all(axis=(1, 2))
    if bad.any():
        rows_bad = rows_all[bad]
        shown = ", ".join(str(int(r)) for r in rows_bad[:10]) + (", ..." if len(rows_bad) > 10 else "")
        raise DataError(f"{store_path}: features must be finite; {len(rows_bad)} store row(s) hold NaN or "
                        f"infinite values (rows {shown}); re-extract those images or drop them from "
                        f"{layout.SPLITS} (`stage1 split`) before training")
    pos = {int(r): i for i, r in enumerate(rows_all)}
    labels = np.asarray(store.labels, dtype=np.int64)
    levels = store.view_levels()  # [N, V] int8 or None (store made without validator views)
    out: dict[str, Any] = {"store": store, "views": int(feats.shape[1]), "dim": int(feats.shape[2]),
                           "has_view_levels": levels is not None}
    for s in SPLIT_NAMES:
        rows = splits[s]
        out[s] = {"x": feats[[pos[int(r)] for r in rows]], "y": labels[rows], "rows": rows}
        if levels is not None:
            out[s]["levels"] = levels[np.asarray(rows, dtype=np.int64)]
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
              hparams: dict[str, Any], *, progress: bool = True, argv: Sequence[str] | None = None,
              train_views: bool = True) -> dict[str, Any]:
    """Train ``head_name`` with ``hparams`` on STORE's splits and write the run folder; a summary.

    ``train_views``: fit on every cached view of the train rows (default) or on view 0 only.
    """
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
        x_tr = tr["x"][keep_tr] if train_views else tr["x"][keep_tr][:, :1]
        head.fit(x_tr, tr["y"][keep_tr], X_val=x_val, y_val=y_val)
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
        if "levels" in d and len(d["rows"]):
            per_split[s].update(_view_scores(head, d["x"], d["levels"]))
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
            "view_levels": data["has_view_levels"],
        },
        "splits": {s: {"n": int(len(data[s]["rows"])), "labelled": int((data[s]["y"] >= 0).sum()),
                       "positives": int((data[s]["y"] == 1).sum())} for s in SPLIT_NAMES},
        "head": head_name,
        "head_has_selector": bool(getattr(head, "HAS_SELECTOR", False)),
        "hparams": head.get_params(),
        "training": {"history": hist, "views": "all cached views" if train_views else "view 0 only", "unlabelled_train_rows_skipped": int((~keep_tr).sum()),
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


def _view_scores(head: Any, x: np.ndarray, levels: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of every cached view ([n, V, 2] logits, [n, V] select) and the views' levels."""
    n, v, dim = x.shape
    sc = head.predict_scores(x.reshape(n * v, dim))
    return {"view_logits": np.asarray(sc["logits"]).reshape(n, v, 2),
            "view_select": np.asarray(sc["select"]).reshape(n, v), "view_levels": levels}


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
                  certify_fraction: float | None = None, part_seed: int = 0, views: str = "clean",
                  view_seed: int = 0, per_level: bool = False, novelty: float | None = None,
                  novelty_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit ``policy_name`` on the run's val_calib scores and write policy.json; a summary.

    ``novelty`` (alpha_n in (0, 1)): also fit a k-NN novelty scorer (``policies.novelty``; its
    parameters in ``novelty_params``) on the store's train features (view 0, the reference) and
    val_calib features (the calibration scores: view 0, or the drawn validator views with
    ``views="validator"``); images with novelty p-value < alpha_n are then deferred before the exit
    rule (policy.json ``novelty``, arrays in the run's novelty.safetensors). Needs the run's store.

    ``views``: "clean" (view 0, the default) or "validator": one view per val_calib image, drawn
    with the subnet's level mix (``policies.views.draw_one_view``, keyed on ``view_seed`` and the
    store row; the draw is recorded in policy.json), and per-level metrics of the fitted policy on
    those rows. ``per_level`` (validator only): also certify one policy per level on one view of
    that level per image; each level's guarantee holds for that level alone (policy.json
    ``per_level``; the pooled policy stays the one export / predict use).

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
    _check_views(views, per_level)
    novelty_params = _check_novelty(novelty, novelty_params)
    fraction = DEFAULT_CERTIFY_FRACTION if certify_fraction is None else float(certify_fraction)
    if selection is None:
        selection = SelectionRecord("none" if part == "all" else "holdout", 1, part, fraction, part_seed)
    vdraw: dict[str, Any] | None = None
    if views == "validator":
        vd = _validator_draw(run, "val_calib", view_seed, part=part, fraction=fraction, part_seed=part_seed)
        scores, y, dropped = vd["scores"], vd["y"], vd["dropped"]
    else:
        scores, y, rows, dropped = layout.split_scores(run, "val_calib")
        keep = part_mask(part, rows, y, fraction, part_seed)
        scores, y = {k: v[keep] for k, v in scores.items()}, y[keep]
    if len(y) == 0:
        raise DataError(f"{Path(run) / layout.SCORES}: val_calib ({part}) has no labelled rows; nothing to calibrate on")
    policy.fit(scores, y)
    d = policy.to_dict()
    d["fit"] = {"split": "val_calib", "part": part, "n": int(len(y)), "positives": int(y.sum()),
                "unlabelled_skipped": dropped, "head": cfg.get("head"), "run_config_created": cfg.get("created")}
    d["selection"] = selection.to_dict()
    d["statement"] = guarantee_statement(d)
    if views == "validator":
        from stage1.policies.views import per_level_metrics

        dec = policy.decide(scores)
        vdraw = {"mode": "validator", "seed": int(view_seed),
                 "rule": "one view per image: a level uniformly among the levels 0-3 the image has, then a view "
                         "uniformly among its views at that level (seeded by view seed and store row)",
                 "no_validator_view_skipped": vd["no_view"],
                 "level_counts": {f"level{k}": int(np.sum(vd["level"] == k)) for k in range(4)},
                 "per_level": per_level_metrics(y, dec.label, dec.exit, vd["level"]),
                 "draw": {"rows": vd["rows"].tolist(), "view": vd["view"].tolist(), "level": vd["level"].tolist()}}
        from stage1._core.io import json_safe

        vdraw = json_safe(vdraw)
        d["views"] = vdraw
        d["statement"] += "; fit on one validator view per val_calib image (subnet level mix)"
        if per_level:
            d["per_level"] = _per_level_policies(run, factory, score, params, view_seed, part, fraction, part_seed,
                                                 selection, cfg)
            ok = [lv for lv, p in d["per_level"].items() if p["certified"]]
            no = [lv for lv in d["per_level"] if lv not in ok]
            d["per_level_statement"] = (
                f"per level (each level separately, each at its own 1 - delta, not jointly): guarantee holds for "
                f"{', '.join(ok) or 'no level'}" + (f"; not for {', '.join(no)}" if no else ""))
    if novelty is None:
        layout.clear_novelty(run)  # a scorer from an earlier calibrate must not outlive its policy.json
    else:
        d["novelty"] = _fit_novelty(run, cfg, novelty, novelty_params, views, view_seed)
        from stage1.policies.novelty import novelty_clause

        d["statement"] += novelty_clause(d["novelty"])
    layout.write_policy(run, d)
    state = d["state"]
    out = {"policy": policy_name, "guarantee": d.get("guarantee", "none"), "certified": bool(state["certified"]),
           "reason": state["reason"], "n_needed": state["n_needed"], "t0": state["t0"], "t1": state["t1"],
           "score": score, "n_calib": int(len(y)), "part": part, "statement": d["statement"],
           "summary": state.get("summary", {}), "views": views}
    if "novelty" in d:
        nv = d["novelty"]
        out["novelty"] = {"alpha_n": nv["alpha_n"], "k": nv["params"]["k"], "n_reference": nv["n_reference"],
                          "n_calib": nv["n_calib"], "calib_views": nv["calib_views"]}
    if vdraw is not None:
        out["per_level_metrics"] = vdraw["per_level"]
        out["level_counts"] = vdraw["level_counts"]
        out["view_seed"] = int(view_seed)
    if "per_level" in d:
        out["per_level"] = {lv: {k: p[k] for k in ("certified", "reason", "n", "positives", "n_needed", "statement")}
                            for lv, p in d["per_level"].items()}
        out["per_level_statement"] = d["per_level_statement"]
    return out


def _check_novelty(alpha_n: float | None, params: dict[str, Any] | None) -> dict[str, Any]:
    """The novelty scorer's parameters, checked before any work (ConfigError naming the option)."""
    from stage1.policies.novelty import NoveltyScorer

    if alpha_n is None:
        if params:
            raise ConfigError(f"novelty parameters ({', '.join(sorted(params))}) need --novelty ALPHA_N")
        return {}
    if not isinstance(alpha_n, (int, float)) or isinstance(alpha_n, bool) or not 0.0 < float(alpha_n) < 1.0:
        raise ConfigError(f"--novelty {alpha_n!r}: expected a level in (0, 1), e.g. 0.01")
    NoveltyScorer(**(params or {}))  # unknown or out-of-range parameters are refused here
    return dict(params or {})


def _fit_novelty(run: str | os.PathLike[str], cfg: dict[str, Any], alpha_n: float, params: dict[str, Any],
                 views: str, view_seed: int) -> dict[str, Any]:
    """Fit the novelty scorer on the store's train (reference) and val_calib (calibration) features,
    write the run's novelty file; the policy.json entry.

    Every val_calib row (labelled or not, every part) is a calibration row: the scorer never saw
    them, so a new image exchangeable with them gets a valid p-value. With ``views="validator"``
    each val_calib row contributes the view ``calibrate --views validator`` draws for it (the same
    seed), so the p-values are calibrated for validator views, not clean ones.
    """
    from stage1.policies.novelty import fit_novelty, write_novelty

    _, _, train_rows, _ = layout.split_scores(run, "train", labelled_only=False)
    if views == "validator":
        from stage1.policies.views import draw_one_view

        vs, _, cal_rows, _ = layout.split_view_scores(run, "val_calib", labelled_only=False)
        view, _ = draw_one_view(vs["view_levels"], cal_rows, view_seed)
        keep = view >= 0
        cal_rows, cal_views = cal_rows[keep], view[keep]
        described = f"one drawn validator view per val_calib image (view seed {int(view_seed)})"
    else:
        _, _, cal_rows, _ = layout.split_scores(run, "val_calib", labelled_only=False)
        cal_views, described = None, "view 0 of every val_calib image"
    scorer = fit_novelty(run_store_features(run, train_rows, cfg=cfg),
                         run_store_features(run, cal_rows, cal_views, cfg=cfg), **params)
    entry = write_novelty(run, scorer, float(alpha_n))  # layout.NOVELTY
    entry.update(reference="train, view 0", calib_views=described)
    return entry


def run_store_features(run: str | os.PathLike[str], rows: np.ndarray, views: np.ndarray | None = None,
                       cfg: dict[str, Any] | None = None) -> np.ndarray:
    """Features [n, D] of store ``rows`` (view 0, or view ``views[i]`` of row i) from the store the run
    was trained on: the run folder keeps scores, not features, and novelty needs features."""
    from stage1.featstore import open_store

    cfg = layout.read_config(run) if cfg is None else cfg
    recorded = cfg.get("store") if isinstance(cfg.get("store"), dict) else {}
    path = recorded.get("path")
    fix = "novelty needs the features of the store the run was trained on; copy the store back or re-train"
    if not path or not Path(str(path)).is_dir():
        raise DataError(f"{Path(run) / layout.CONFIG}: its store {path} is not on this machine; {fix}")
    rows = np.asarray(rows, dtype=np.int64)
    with open_store(str(path)) as store:
        if int(store.rows) != recorded.get("rows") or int(store.dim) != recorded.get("dim"):
            raise DataError(f"{path}: has {store.rows} rows of width {store.dim}, the run was trained on "
                            f"{recorded.get('rows')} rows of width {recorded.get('dim')}; the store changed since "
                            f"`train`: {fix}")
        if views is None:
            return store.load_features(rows=rows, views=0)[:, 0]
        views = np.asarray(views, dtype=np.int64)
        return store.load_features(rows=rows)[np.arange(len(rows)), views]


def _check_views(views: str, per_level: bool) -> None:
    from stage1.policies.views import VIEW_MODES

    if views not in VIEW_MODES:
        raise ConfigError(f"--views must be {' or '.join(VIEW_MODES)}, got {views!r}")
    if per_level and views != "validator":
        raise ConfigError("--per-level needs --views validator (levels exist only on validator views)")


def _validator_draw(run: str | os.PathLike[str], split: str, seed: int, *, part: str = "all",
                    fraction: float | None = None, part_seed: int = 0) -> dict[str, Any]:
    """One drawn view per labelled image of ``split`` (of ``part`` for val_calib): its scores, y, level."""
    from stage1.policies.selection import part_mask
    from stage1.policies.views import draw_one_view, take_views

    vs, y, rows, dropped = layout.split_view_scores(run, split)
    view, level = draw_one_view(vs["view_levels"], rows, seed)
    keep = view >= 0
    no_view = int((~keep).sum())
    if part != "all":
        keep &= part_mask(part, rows, y, fraction, part_seed)
    scores = take_views({k: v[keep] for k, v in vs.items()}, view[keep])
    return {"scores": scores, "y": y[keep], "rows": rows[keep], "view": view[keep], "level": level[keep],
            "dropped": dropped, "no_view": no_view, "all": (vs, y, rows)}


def _per_level_policies(run: str | os.PathLike[str], factory: Any, score: str, params: dict[str, Any],
                        seed: int, part: str, fraction: float, part_seed: int, selection: Any,
                        cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One policy per level, each fit and certified on one view of that level per image (Mondrian)."""
    from stage1.policies.guarantee import guarantee_statement
    from stage1.policies.selection import part_mask
    from stage1.policies.views import VIEW_LEVELS, level_views, take_views

    vs, y, rows, _ = layout.split_view_scores(run, "val_calib")
    in_part = part_mask(part, rows, y, fraction, part_seed)
    out: dict[str, dict[str, Any]] = {}
    for lv in VIEW_LEVELS:
        view = level_views(vs["view_levels"], rows, lv, seed)
        m = in_part & (view >= 0)
        if not m.any():
            continue
        pol = factory(score=score, **params)
        yy = y[m]
        pol.fit(take_views({k: v[m] for k, v in vs.items()}, view[m]), yy)
        pd = pol.to_dict()
        pd["fit"] = {"split": "val_calib", "part": part, "n": int(len(yy)), "positives": int(yy.sum()),
                     "level": lv, "head": cfg.get("head")}
        pd["selection"] = selection.to_dict()
        st = pd["state"]
        out[f"level{lv}"] = {"policy": pd, "certified": bool(st["certified"]), "reason": st["reason"],
                             "n": int(len(yy)), "positives": int(yy.sum()), "n_needed": st["n_needed"],
                             "statement": f"level {lv} views only: " + guarantee_statement(pd)}
    return out


def _apply_novelty(run: str | os.PathLike[str], cfg: dict[str, Any], entry: dict[str, Any], decision: Any,
                   rows: np.ndarray, views: np.ndarray | None) -> tuple[Any, dict[str, Any]]:
    """``decision`` with novel exits deferred (the features of ``rows``: view 0, or the drawn ``views``
    the policy was evaluated on) and the novelty figures for metrics.json."""
    from stage1.policies.novelty import defer_mask, defer_novel, read_novelty

    scorer = read_novelty(run, entry)
    p = scorer.pvalues(run_store_features(run, rows, views, cfg=cfg))
    alpha_n = float(entry["alpha_n"])
    deferred = defer_novel(decision, p, alpha_n)
    return deferred, {"novelty_alpha_n": alpha_n, "novelty_flagged_rate": float(defer_mask(p, alpha_n).mean()),
                      "novelty_deferred": int((decision.exit & ~deferred.exit).sum()),
                      "novelty_views": "view 0" if views is None else "the drawn validator views"}


def _novelty_clause(policy_json: dict[str, Any]) -> str:
    """The statement's novelty sentence when policy.json defers novel images, else ""."""
    from stage1.policies.novelty import novelty_clause

    return novelty_clause(policy_json["novelty"]) if isinstance(policy_json.get("novelty"), dict) else ""


def evaluate_run(run: str | os.PathLike[str], split: str = "test", views: str = "clean",
                 view_seed: int | None = None) -> dict[str, Any]:
    """Apply policy.json to ``split``; write metrics.json, metrics.csv and PNG plots; the metrics.

    ``views="validator"``: on one view per image drawn like ``calibrate --views validator`` (seed:
    ``view_seed``, else the one policy.json records, else 0), with ``level{k}_*`` metrics per level
    and, when policy.json holds per-level policies, ``level{k}_per_level_*`` (each level's own
    policy on that level's rows); written to ``eval_{split}_validator/``.

    When policy.json has ``novelty``, images whose novelty p-value is below its alpha_n are deferred
    (features from the run's store, of the same view the policy saw); metrics.json then also holds
    ``novelty_*`` figures and ``coverage`` / ``fnr_exit`` / ``selective_error`` ``_without_novelty``.
    Per-level policies (``level{k}_per_level_*``) are reported without novelty deferral.
    """
    from stage1.policies import policy_from_dict, reports
    from stage1.policies.evaluate import evaluation_metrics
    from stage1.policies.guarantee import guarantee_statement

    _check_views(views, False)
    cfg = layout.read_config(run)
    policy_json = layout.read_policy(run)
    policy = policy_from_dict(policy_json, where=str(Path(run) / layout.POLICY))
    extra: dict[str, Any] = {}
    if views == "validator":
        from stage1.policies.views import DEFAULT_VIEW_SEED, flatten_levels, per_level_metrics

        seed = view_seed if view_seed is not None else int((policy_json.get("views") or {}).get("seed", DEFAULT_VIEW_SEED))
        vd = _validator_draw(run, split, seed)
        scores, y, dropped, level = vd["scores"], vd["y"], vd["dropped"], vd["level"]
        rows, drawn = vd["rows"], vd["view"]
    else:
        scores, y, rows, dropped = layout.split_scores(run, split)
        drawn = None
    if len(y) == 0:
        raise DataError(f"{Path(run) / layout.SCORES}: split {split!r} has no labelled rows to evaluate")
    decision = policy.decide(scores)
    novelty_metrics: dict[str, Any] = {}
    if isinstance(policy_json.get("novelty"), dict):
        before = evaluation_metrics(y, scores, decision)
        decision, novelty_metrics = _apply_novelty(run, cfg, policy_json["novelty"], decision, rows, drawn)
        novelty_metrics.update({f"{k}_without_novelty": before[k]
                                for k in ("coverage", "fnr_exit", "selective_error") if k in before})
    metrics = dict(evaluation_metrics(y, scores, decision))
    metrics.update(novelty_metrics)
    if views == "validator":
        extra = {"views": "validator", "view_seed": int(seed), "no_validator_view_skipped": vd["no_view"],
                 **flatten_levels(per_level_metrics(y, decision.label, decision.exit, level))}
        for lv, entry in (policy_json.get("per_level") or {}).items():
            m = level == int(lv.removeprefix("level"))
            if not m.any():
                continue
            pol = policy_from_dict(entry["policy"], where=f"{Path(run) / layout.POLICY} per_level.{lv}")
            dl = pol.decide({k: v[m] for k, v in scores.items()})
            pl = per_level_metrics(y[m], dl.label, dl.exit, level[m])
            extra.update({f"{lv}_per_level_{k}": v for k, v in pl[lv].items()})
            extra[f"{lv}_per_level_certified"] = bool(entry["certified"])
    metrics.update({"split": split, "head": cfg.get("head"), "policy": policy.name,
                    "policy_sha256": layout.policy_sha256(run),
                    "guarantee_statement": guarantee_statement(policy_json) + _novelty_clause(policy_json),
                    "certified": bool(policy.certified), "unlabelled_skipped": dropped, **extra})
    out = layout.eval_dir(run, split, views)
    out.mkdir(parents=True, exist_ok=True)
    reports.write_metrics(out, metrics)
    errors = (decision.label.astype(np.int64) != y).astype(np.float64)
    what = split if views == "clean" else f"{split}, validator views"
    reports.plot_risk_coverage(out / layout.PLOT_RISK_COVERAGE, decision.score, errors,
                               operating_point=(metrics["coverage"], metrics["selective_error"]),
                               title=f"Risk-coverage: {cfg.get('head')} + {policy.name} ({what})")
    reports.plot_reliability(out / layout.PLOT_RELIABILITY, y, decision.p_roadwork,
                             title=f"Reliability: {cfg.get('head')} + {policy.name} ({what})")
    return metrics
