"""The flat metrics object of ``evaluate`` (metrics.json): DESIGN's stable keys plus diagnostics.

Classification and calibration metrics use the policy's calibrated ``p_roadwork`` and its argmax
label on every row; the risk-coverage family ranks rows by the policy's own confidence score;
exit risks use the policy's exit mask. ``*_uncalibrated`` keys score the raw softmax of the logits,
so the calibrator's effect is visible. Undefined ratios are NaN (written as null).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import softmax

from stage1._core.errors import DataError
from stage1.policies import metrics as M
from stage1.policies.base import check_labels, check_scores
from stage1.policies.decision import LEVELS, Decision
from stage1.policies.risks import all_risks

#: DESIGN's stable keys, in the order metrics.csv lists them; the exit risks come from ``RISKS``.
STABLE_KEYS: tuple[str, ...] = (
    "accuracy", "mcc", "nll", "brier", "ece", "ece_top_label", "aurc", "eaurc", "augrc", "eaugrc",
    "coverage", *(r.name for r in all_risks()), "defer_rate", "n",
)


def evaluation_metrics(
    y: np.ndarray,
    scores: dict[str, np.ndarray],
    decision: Decision,
    *,
    at_coverage: tuple[float, ...] = (0.8, 0.9),
    at_risk: tuple[float, ...] = (0.02, 0.05),
) -> dict[str, Any]:
    """Every DESIGN stable key (see ``STABLE_KEYS``) and more, as one flat dict of numbers."""
    logits, _ = check_scores(scores, False)
    yy = check_labels(y, len(logits))
    if len(decision) != len(yy):
        raise DataError(f"decision has {len(decision)} rows, y has {len(yy)}")
    if len(yy) == 0:
        raise DataError("cannot evaluate zero rows")
    p = decision.p_roadwork
    label = decision.label.astype(np.int64)
    errors = (label != yy).astype(np.float64)
    conf = decision.score
    raw = softmax(logits, axis=1)[:, 1]
    out: dict[str, Any] = {
        "n": int(len(yy)),
        "n_pos": int(yy.sum()),
        "prevalence": float(yy.mean()),
        "accuracy": M.accuracy(yy, label),
        "mcc": M.mcc(yy, label),
        "nll": M.nll(yy, p),
        "brier": M.brier(yy, p),
        "ece": M.ece(yy, p),
        "ece_top_label": M.ece_top_label(yy, p),
        "classwise_ece": M.classwise_ece(yy, p),
        "nll_uncalibrated": M.nll(yy, raw),
        "ece_uncalibrated": M.ece(yy, raw),
        "aurc": M.aurc(conf, errors),
        "eaurc": M.eaurc(conf, errors),
        "augrc": M.augrc(conf, errors),
        "eaugrc": M.eaugrc(conf, errors),
        **M.selective_risks(yy, label, decision.exit),
        "mean_set_size": M.mean_set_size(decision.pred_set),
    }
    for c in at_coverage:
        out[f"risk_at_coverage_{round(c * 100):d}pct"] = M.risk_at_coverage(conf, errors, c)
    for r in at_risk:
        out[f"coverage_at_risk_{round(r * 100):d}pct"] = M.coverage_at_risk(conf, errors, r)
    for lev in LEVELS:
        out[f"n_{lev.lower()}"] = int(np.sum(decision.level == lev))
    return out
