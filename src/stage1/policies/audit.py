"""Guarantee audit: refit a policy on many random calibration draws and measure its risks elsewhere.

For ``ltt`` the audited quantity is the violation rate P(risk > alpha) over draws of the
calibration set (it must be <= delta); for ``crc`` it is the mean miss rate (it must be <= alpha);
for ``scrc`` a draw violates when the miscoverage among selected rows (the set misses the label)
exceeds alpha or the selection coverage (share of rows selected, exits and AMBIGUOUS alike) falls
below xi, and the violation rate must be <= delta (both parts are also reported alone; with its
in-expectation bounds compare the means with alpha and xi instead). Each figure comes with its
standard error over the draws. Risks are measured on a fixed held-out set when given (close to the
true risk), otherwise on the rows not drawn for calibration.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from stage1._core.errors import ConfigError
from stage1.policies.base import ExitPolicy, check_labels, check_scores
from stage1.policies.decision import SET_01, UNCERTAIN, Decision
from stage1.policies.metrics import selective_risks
from stage1.policies.risks import all_risks


def risk_keys() -> list[str]:
    """What the audit measures per draw: coverage and every registered risk (``policies.risks``)."""
    return ["coverage", *(r.name for r in all_risks())]


def _take(scores: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[idx] for k, v in scores.items() if v is not None}


def scrc_draw(d: Decision, y: np.ndarray) -> tuple[float, float]:
    """(miscoverage among selected, selection coverage) of an scrc decision on labelled rows.

    Selected = not UNCERTAIN (exits and AMBIGUOUS rows); a row is covered when its ``pred_set``
    holds the label. Miscoverage is NaN when nothing is selected."""
    selected = d.level != UNCERTAIN
    covered = (d.pred_set == SET_01) | (d.pred_set == y)
    n_sel = int(selected.sum())
    risk = float(np.sum(selected & ~covered) / n_sel) if n_sel else float("nan")
    return risk, float(selected.mean()) if len(y) else float("nan")


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(np.mean(x)), se


def _rate_se(flags: np.ndarray) -> tuple[float, float]:
    v = float(np.mean(flags))
    return v, math.sqrt(max(v * (1 - v), 1e-12) / len(flags))


def audit(
    policy: ExitPolicy,
    scores: dict[str, np.ndarray],
    y: np.ndarray,
    *,
    n_calib: int | None = None,
    n_draws: int = 100,
    seed: int = 0,
    test_scores: dict[str, np.ndarray] | None = None,
    test_y: np.ndarray | None = None,
) -> dict[str, Any]:
    """Refit ``policy`` (its parameters, not its state) on ``n_draws`` random draws of ``n_calib``
    rows from (scores, y); return per-risk mean / s.e., certified rate and guarantee violations."""
    logits, _ = check_scores(scores, False)
    yy = check_labels(y, len(logits))
    if n_draws < 2:
        raise ConfigError("n_draws must be >= 2 to estimate a standard error")
    n_calib = len(yy) // 2 if n_calib is None else int(n_calib)
    fixed_test = test_scores is not None
    if fixed_test:
        if test_y is None:
            raise ConfigError("test_scores needs test_y")
        ty = check_labels(test_y, len(check_scores(test_scores, False)[0]))
    elif not 0 < n_calib < len(yy):
        raise ConfigError(f"n_calib must be in (0, {len(yy)}) when the rest is the test set")
    if fixed_test and not 0 < n_calib <= len(yy):
        raise ConfigError(f"n_calib must be in (0, {len(yy)}]")
    from stage1.policies import POLICIES

    rng = np.random.default_rng(seed)
    keys = risk_keys()
    per_draw: dict[str, list[float]] = {k: [] for k in keys}
    certified = []
    scrc: dict[str, list[float]] = {"miscoverage_selected": [], "selection_coverage": []}
    for _ in range(n_draws):
        perm = rng.permutation(len(yy))
        cal_idx, rest = perm[:n_calib], perm[n_calib:]
        p = POLICIES.create(policy.name, **policy.params()).fit(_take(scores, cal_idx), yy[cal_idx])
        certified.append(p.certified)
        ts, tyy = (test_scores, ty) if fixed_test else (_take(scores, rest), yy[rest])
        d = p.decide(ts)
        r = selective_risks(tyy, d.label.astype(np.int64), d.exit)
        for k in keys:
            per_draw[k].append(r[k])
        if policy.guarantee == "scrc":
            risk_d, cov_d = scrc_draw(d, tyy)
            scrc["miscoverage_selected"].append(risk_d)
            scrc["selection_coverage"].append(cov_d)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in per_draw.items()}
    out: dict[str, Any] = {
        "policy": policy.name,
        "n_draws": n_draws,
        "n_calib": n_calib,
        "certified_rate": float(np.mean(certified)),
    }
    for k, a in arrays.items():
        out[f"{k}_mean"], out[f"{k}_se"] = _mean_se(a)
    alpha = getattr(policy, "alpha", None)
    if policy.guarantee == "ltt":
        risk = np.nan_to_num(arrays[policy.risk], nan=0.0)  # nothing exited: no violation
        out["violation_rate"], out["violation_se"] = _rate_se(risk > alpha)
        out["delta"] = policy.delta
        if policy.eps is not None:
            sel = np.nan_to_num(arrays["selective_error"], nan=0.0)
            out["eps_violation_rate"], out["eps_violation_se"] = _rate_se(sel > policy.eps)
    if policy.guarantee == "crc":
        out["alpha"] = alpha
    if policy.guarantee == "scrc":
        risk = np.nan_to_num(np.asarray(scrc["miscoverage_selected"]), nan=0.0)  # nothing selected: no miss
        cov = np.asarray(scrc["selection_coverage"])
        for k, a in scrc.items():
            out[f"{k}_mean"], out[f"{k}_se"] = _mean_se(np.asarray(a, dtype=np.float64))
        out["risk_violation_rate"], out["risk_violation_se"] = _rate_se(risk > alpha)
        out["coverage_violation_rate"], out["coverage_violation_se"] = _rate_se(cov < policy.xi)
        out["violation_rate"], out["violation_se"] = _rate_se((risk > alpha) | (cov < policy.xi))
        out.update(alpha=alpha, xi=policy.xi, delta=policy.delta)
    return out


def synthetic_scores(
    n: int, *, prevalence: float = 0.5, overconfidence: float = 1.0, separation: float = 2.0, seed: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Synthetic head outputs: Gaussian evidence per class, Bayes logit times ``overconfidence``,
    and a selector in [0, 1] that tracks the model's confidence with noise (for tests and benches)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(np.int64)
    theta = rng.normal(np.where(y == 1, separation / 2, -separation / 2), 1.0)
    bayes = separation * theta + math.log(prevalence / (1 - prevalence))
    logit1 = overconfidence * bayes
    logits = np.stack([-logit1 / 2, logit1 / 2], axis=1)
    select = 1.0 / (1.0 + np.exp(-(np.abs(bayes) - 1.0 + rng.normal(0, 0.7, n))))
    return {"logits": logits, "select": select}, y
