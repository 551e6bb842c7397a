"""Report writers at the edge: metrics.json / metrics.csv and PNG plots (matplotlib, Agg canvas).

metrics.json is strict JSON (NaN -> null); metrics.csv is one header row and one value row, the
stable DESIGN keys first in a fixed order then the rest sorted, so runs concatenate into a table.
Plots are drawn on a private Agg canvas (no pyplot state, no display needed) and written atomically.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from stage1._core.io import atomic_write_bytes, atomic_write_json, atomic_write_text, json_safe
from stage1.policies import metrics as M
from stage1.policies.evaluate import STABLE_KEYS

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
RISK_COVERAGE_PNG = "risk_coverage.png"
RELIABILITY_PNG = "reliability.png"


def ordered_keys(metrics: dict[str, Any]) -> list[str]:
    """Stable keys first (DESIGN order), then every other key sorted."""
    missing = [k for k in STABLE_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack stable keys {missing}; build them with evaluation_metrics()")
    return list(STABLE_KEYS) + sorted(k for k in metrics if k not in STABLE_KEYS)


def write_metrics(out_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Path]:
    """Write metrics.json and metrics.csv into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    keys = ordered_keys(metrics)
    flat = json_safe({k: metrics[k] for k in keys})
    for k, v in flat.items():
        if isinstance(v, (dict, list)):
            raise ValueError(f"metrics must be flat; {k!r} holds a {type(v).__name__}")
    atomic_write_json(out / METRICS_JSON, flat)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    w.writerow(["" if flat[k] is None else (repr(flat[k]) if isinstance(flat[k], float) else flat[k]) for k in keys])
    atomic_write_text(out / METRICS_CSV, buf.getvalue())
    return {"json": out / METRICS_JSON, "csv": out / METRICS_CSV}


def _figure(width: float = 5.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_risk_coverage(
    path: str | Path,
    confidence: np.ndarray,
    errors: np.ndarray,
    *,
    operating_point: tuple[float, float] | None = None,
    title: str = "Risk-coverage",
) -> Path:
    """Selective risk vs coverage (fd-shifts points, ties grouped) with the policy's point marked."""
    cov, risk, _ = M.risk_coverage_curve(confidence, errors, "selective")
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(cov, risk, color="tab:blue", lw=1.5, label=f"AURC = {M.aurc(confidence, errors):.4f}")
    if operating_point is not None:
        c, r = (float("nan") if v is None else float(v) for v in operating_point)
        if math.isfinite(c) and math.isfinite(r):
            ax.plot([c], [r], "o", color="tab:red", ms=8, label=f"policy: coverage {c:.3f}, risk {r:.3f}")
        else:
            ax.axvline(0.0, color="tab:red", ls="--", lw=2, label="policy: nothing exits (defers all)")
    ax.set_xlabel("coverage")
    ax.set_ylabel("selective risk")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _save_png(fig, path)


def plot_reliability(
    path: str | Path, y: np.ndarray, p1: np.ndarray, *, n_bins: int = M.N_BINS, title: str = "Reliability"
) -> Path:
    """Positive-class reliability diagram on the ECE bins, with the bin counts underneath."""
    yy = np.asarray(y, dtype=np.float64)
    p = np.asarray(p1, dtype=np.float64)
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.bincount(idx, weights=yy, minlength=n_bins) / count
        mean_p = np.bincount(idx, weights=p, minlength=n_bins) / count
    edges = np.linspace(0, 1, n_bins + 1)
    fig = _figure(5.0, 5.0)
    ax = fig.add_axes((0.12, 0.32, 0.83, 0.6))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ok = count > 0
    ax.bar(edges[:-1][ok], frac[ok], width=1 / n_bins, align="edge", alpha=0.6, edgecolor="k", label="fraction y=1")
    ax.plot(mean_p[ok], frac[ok], "o-", color="tab:red", ms=4, label=f"ECE = {M.ece(y, p1, n_bins):.4f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed fraction of y = 1")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    hx = fig.add_axes((0.12, 0.08, 0.83, 0.17))
    hx.bar(edges[:-1], count, width=1 / n_bins, align="edge", color="tab:blue", edgecolor="k")
    hx.set_xlim(0, 1)
    hx.set_xlabel("calibrated p(roadwork)")
    hx.set_ylabel("count")
    return _save_png(fig, path)


def write_report(out_dir: str | Path, y: np.ndarray, scores: dict[str, np.ndarray], decision) -> dict[str, Any]:
    """evaluation_metrics + metrics.json/csv + both plots in ``out_dir``; returns metrics and paths."""
    from stage1.policies.evaluate import evaluation_metrics

    out = Path(out_dir)
    metrics = evaluation_metrics(y, scores, decision)
    paths: dict[str, Any] = dict(write_metrics(out, metrics))
    errors = (decision.label.astype(np.int64) != np.asarray(y)).astype(np.float64)
    paths["risk_coverage"] = plot_risk_coverage(
        out / RISK_COVERAGE_PNG, decision.score, errors,
        operating_point=(metrics["coverage"], metrics["selective_error"]),
    )
    paths["reliability"] = plot_reliability(out / RELIABILITY_PNG, y, decision.p_roadwork)
    return {"metrics": metrics, "paths": paths}
