"""One validator-style view per image, and metrics per distortion level (Mondrian reporting).

A store made with the ``validator`` view recipe records each view's distortion level (0-3; -1 =
not a validator view, e.g. a squash clean view 0). ``draw_one_view`` picks exactly one view per
image with the subnet's level mix: a level uniformly among the levels (0-3) that image has, then a
view uniformly among its views at that level. With all four levels available each level has
probability 0.25. View 0 made with ``--preprocess validator`` is a level-0 view on every image;
when the distorted views (1..V-1) already supply level 0 it is left out of the draw, because
adding it to every image over-draws level 0 (TraCon, 3 distorted views: 45/24/20/13 of 102 rows
instead of about 26 each); the distorted views' levels are i.i.d., so drawing among them alone keeps
each level at 0.25. One view per image keeps calibration rows exchangeable (several views of one
image are never used as if independent). The draw of a row depends only on ``(seed, store row)``,
so it is the same whatever other rows are drawn with it.

``level_views`` picks, for one level, one view of that level per image that has one (the rows a
per-level certification uses). ``per_level_metrics`` counts coverage and every registered exit risk
per level. Numpy only.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stage1._core.errors import DataError
from stage1.policies.metrics import selective_risks

#: distortion levels a validator view can have.
VIEW_LEVELS: tuple[int, ...] = (0, 1, 2, 3)
#: the ``--views`` choices of calibrate / evaluate.
VIEW_MODES: tuple[str, ...] = ("clean", "validator")
DEFAULT_VIEW_SEED = 0


def _row_rng(seed: int, row: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(row), int(salt)])


def draw_one_view(levels: np.ndarray, rows: np.ndarray, seed: int = DEFAULT_VIEW_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(view index [n], level [n]) of one view per image; -1 / -1 where an image has no validator view.

    ``levels`` [n, V] int (-1 = not a validator view), ``rows`` [n] store rows (the draw's key).
    View 0 is left out of the draw when its levels all occur among views 1..V-1 of these rows
    (decided over the whole array: pass a whole split).
    """
    lev = np.asarray(levels, dtype=np.int64)
    rr = np.asarray(rows, dtype=np.int64).reshape(-1)
    if lev.ndim != 2 or lev.shape[0] != rr.shape[0]:
        raise DataError(f"view levels {lev.shape} do not match {rr.shape[0]} rows")
    if lev.shape[1] > 1:
        first = set(np.unique(lev[:, 0]).tolist()) - {-1}
        if first and first <= set(np.unique(lev[:, 1:]).tolist()):
            lev = lev.copy()
            lev[:, 0] = -1
    view = np.full(len(rr), -1, dtype=np.int64)
    level = np.full(len(rr), -1, dtype=np.int64)
    for i, row in enumerate(rr):
        have = [lv for lv in VIEW_LEVELS if np.any(lev[i] == lv)]
        if not have:
            continue
        rng = _row_rng(seed, row)
        lv = have[int(rng.integers(len(have)))]
        cands = np.flatnonzero(lev[i] == lv)
        view[i] = int(cands[int(rng.integers(len(cands)))])
        level[i] = lv
    return view, level


def level_views(levels: np.ndarray, rows: np.ndarray, level: int, seed: int = DEFAULT_VIEW_SEED) -> np.ndarray:
    """View index [n] of one view at ``level`` per image (seeded by store row), -1 where the image has none."""
    lev = np.asarray(levels, dtype=np.int64)
    rr = np.asarray(rows, dtype=np.int64).reshape(-1)
    view = np.full(len(rr), -1, dtype=np.int64)
    for i, row in enumerate(rr):
        cands = np.flatnonzero(lev[i] == level)
        if len(cands):
            view[i] = int(cands[int(_row_rng(seed, row, 1 + level).integers(len(cands)))])
    return view


def take_views(view_scores: dict[str, np.ndarray], view: np.ndarray) -> dict[str, np.ndarray]:
    """Policy scores ``{"logits" [n, 2], "select" [n]}`` of the chosen view of each row (view >= 0)."""
    idx = np.arange(len(view))
    return {"logits": np.asarray(view_scores["view_logits"])[idx, view],
            "select": np.asarray(view_scores["view_select"])[idx, view]}


def per_level_metrics(y: np.ndarray, label: np.ndarray, exit: np.ndarray, level: np.ndarray,
                      levels: tuple[int, ...] = VIEW_LEVELS) -> dict[str, dict[str, Any]]:
    """``{"level0": {"n", "positives", "coverage", <every risk>, "defer_rate", "n_exit", ...}, ...}``.

    Only levels with at least one row are reported; undefined ratios are NaN.
    """
    yy = np.asarray(y, dtype=np.int64)
    lab = np.asarray(label, dtype=np.int64)
    ex = np.asarray(exit, dtype=bool)
    lv = np.asarray(level, dtype=np.int64)
    out: dict[str, dict[str, Any]] = {}
    for k in levels:
        m = lv == k
        if not m.any():
            continue
        out[f"level{k}"] = {"n": int(m.sum()), "positives": int(yy[m].sum()), **selective_risks(yy[m], lab[m], ex[m])}
    return out


def flatten_levels(per_level: dict[str, dict[str, Any]], keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``{"level0_coverage": ..., ...}`` (flat, for metrics.json / metrics.csv)."""
    return {f"{lv}_{k}": v for lv, d in per_level.items() for k, v in d.items() if keys is None or k in keys}
