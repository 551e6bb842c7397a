"""Selective-classification and calibration metrics (numpy only).

Definitions follow DESIGN.md "Metrics": the risk-coverage family (AURC, E-AURC, AUGRC, E-AUGRC)
matches fd-shifts' ``RiskCoverageStats`` (Traub et al. 2024): one curve point per *distinct*
confidence value (ties grouped), trapezoid integration over coverage, values NOT scaled by 1000.
Brier / NLL follow scikit-learn; ECE is positive-class with 15 equal-width bins (confidence 1.0
falls in the last bin); the top-label ECE is reported separately and named so.

Conventions: ``y`` are 0/1 labels, ``p1`` the probability of class 1, ``label`` a predicted class,
``exit`` a boolean "answer now" mask, ``confidence`` higher = more confident, ``errors`` the
per-sample residual (1 = wrong, 0 = right; fractional residuals are allowed for the AUC family).
Ratios with an empty denominator (e.g. selective error when nothing exits) are ``nan``. The exit
risks (selective_error, fnr_exit, miss_rate) are defined once, in ``policies.risks``.
"""
from __future__ import annotations

import math

import numpy as np

from stage1._core.errors import ConfigError, DataError
from stage1.policies.risks import all_risks, get_risk

EPS = float(np.finfo(np.float64).eps)
N_BINS = 15

__all__ = [
    "accuracy", "mcc", "nll", "brier", "ece", "ece_top_label", "classwise_ece",
    "risk_coverage_curve", "aurc", "eaurc", "augrc", "eaugrc", "risk_at_coverage",
    "coverage_at_risk", "coverage", "selective_error", "fnr_exit", "miss_rate", "defer_rate",
    "mean_set_size", "selective_risks",
]


# ----------------------------------------------------------------------------- input helpers
def _vec(x: np.ndarray, name: str, dtype: type = np.float64) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _labels(y: np.ndarray, name: str = "y") -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {a.shape}")
    bad = ~np.isin(a, (0, 1))
    if bad.any():
        raise DataError(f"{name} must hold 0/1 labels; found {a[bad][:3].tolist()}")
    return a.astype(np.int64)


def _same_len(*arrays: np.ndarray) -> None:
    lens = {len(a) for a in arrays}
    if len(lens) > 1:
        raise DataError(f"arrays have different lengths: {sorted(lens)}")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def _proba(p1: np.ndarray) -> np.ndarray:
    p = _vec(p1, "p1")
    if np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise DataError("p1 must be probabilities in [0, 1]")
    return p


# ----------------------------------------------------------------------------- classification
def accuracy(y: np.ndarray, label: np.ndarray) -> float:
    """Fraction of correct predicted labels."""
    y, label = _labels(y), _labels(label, "label")
    _same_len(y, label)
    return float(np.mean(y == label)) if len(y) else float("nan")


def mcc(y: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation coefficient (0 when a marginal is constant, as scikit-learn)."""
    y, label = _labels(y), _labels(label, "label")
    _same_len(y, label)
    tp = float(np.sum((y == 1) & (label == 1)))
    tn = float(np.sum((y == 0) & (label == 0)))
    fp = float(np.sum((y == 0) & (label == 1)))
    fn = float(np.sum((y == 1) & (label == 0)))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den > 0 else 0.0


def nll(y: np.ndarray, p1: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class; p clipped to [eps, 1-eps] (scikit-learn)."""
    y, p = _labels(y), _proba(p1)
    _same_len(y, p)
    p = np.clip(p, EPS, 1.0 - EPS)
    return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))


def brier(y: np.ndarray, p1: np.ndarray) -> float:
    """Brier score mean((p1 - y)^2), scikit-learn's binary convention."""
    y, p = _labels(y), _proba(p1)
    _same_len(y, p)
    return float(np.mean((p - y) ** 2))


def _binned_gap(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> float:
    """Sum over equal-width bins of (bin share) * |mean(hit) - mean(conf)|; 1.0 in the last bin."""
    if len(conf) == 0:
        return float("nan")
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    s_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    s_hit = np.bincount(idx, weights=hit.astype(np.float64), minlength=n_bins)
    return float(np.sum(np.abs(s_hit - s_conf)) / len(conf))


def ece(y: np.ndarray, p1: np.ndarray, n_bins: int = N_BINS) -> float:
    """Positive-class ECE: bins on p1, gap between mean p1 and the fraction of y = 1."""
    y, p = _labels(y), _proba(p1)
    _same_len(y, p)
    return _binned_gap(p, y, n_bins)


def ece_top_label(y: np.ndarray, p1: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label ECE: bins on max(p1, 1 - p1), gap to the accuracy of the argmax label."""
    y, p = _labels(y), _proba(p1)
    _same_len(y, p)
    conf = np.maximum(p, 1.0 - p)
    return _binned_gap(conf, (p >= 0.5).astype(np.int64) == y, n_bins)


def classwise_ece(y: np.ndarray, proba: np.ndarray, n_bins: int = N_BINS) -> float:
    """Mean over classes of the one-vs-rest ECE; ``proba`` is [n, k] or p1 [n] (binary)."""
    yy = np.asarray(y).astype(np.int64)
    pr = np.asarray(proba, dtype=np.float64)
    if pr.ndim == 1:
        pr = np.stack([1.0 - pr, pr], axis=1)
    if pr.ndim != 2 or len(pr) != len(yy):
        raise DataError("proba must be [n, k] (or p1 [n]) with one row per label")
    return float(np.mean([_binned_gap(pr[:, c], yy == c, n_bins) for c in range(pr.shape[1])]))


# ----------------------------------------------------------------------------- risk-coverage
def risk_coverage_curve(
    confidence: np.ndarray, errors: np.ndarray, kind: str = "selective"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fd-shifts' RC points: (coverages desc, risks, thresholds), one point per distinct confidence.

    ``kind="selective"``: risk = errors kept / kept; ``kind="generalized"``: errors kept / n.
    A closing point at coverage 0 is appended (selective: repeats the last risk; generalized: 0),
    so ``thresholds`` has one entry fewer than ``coverages`` (the closing point has none).
    """
    conf, err = _vec(confidence, "confidence"), _vec(errors, "errors")
    _same_len(conf, err)
    if kind not in ("selective", "generalized"):
        raise ConfigError(f"kind must be 'selective' or 'generalized', got {kind!r}")
    n = len(conf)
    if n == 0:
        raise DataError("risk-coverage curve needs at least one sample")
    if np.isnan(conf).any() or np.isnan(err).any():
        raise DataError("confidence and errors must not contain NaN")
    order = np.argsort(-conf, kind="stable")  # descending confidence
    c, e = conf[order], err[order]
    last = np.r_[np.nonzero(c[1:] != c[:-1])[0], n - 1]  # last index of each tie group
    kept = (last + 1).astype(np.float64)
    err_kept = np.cumsum(e)[last]
    cov = kept / n
    risk = err_kept / kept if kind == "selective" else err_kept / n
    cov, risk, thr = cov[::-1], risk[::-1], c[last][::-1]  # descending coverage, as fd-shifts
    tail = risk[-1] if kind == "selective" else 0.0
    return np.r_[cov, 0.0], np.r_[risk, tail], thr


def _trapezoid(cov: np.ndarray, risk: np.ndarray) -> float:
    return float(np.sum((cov[:-1] - cov[1:]) * (risk[:-1] + risk[1:]) * 0.5))


def _is_binary(err: np.ndarray) -> bool:
    return bool(np.all((err == 0) | (err == 1)))


def aurc(confidence: np.ndarray, errors: np.ndarray) -> float:
    """Area under the selective risk-coverage curve (fd-shifts, trapezoid, not x1000)."""
    cov, risk, _ = risk_coverage_curve(confidence, errors, "selective")
    return _trapezoid(cov, risk)


def augrc(confidence: np.ndarray, errors: np.ndarray) -> float:
    """Area under the generalized risk-coverage curve (Traub et al. 2024), not x1000."""
    cov, risk, _ = risk_coverage_curve(confidence, errors, "generalized")
    return _trapezoid(cov, risk)


def _optimal_confidence(errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ideal ranking for non-binary residuals: smallest residual most confident, no ties."""
    err = np.sort(_vec(errors, "errors"), kind="stable")
    return np.linspace(1.0, 0.0, len(err)), err


def eaurc(confidence: np.ndarray, errors: np.ndarray) -> float:
    """Excess AURC: AURC minus the oracle AURC (closed form err + (1-err) ln(1-err) if binary)."""
    err = _vec(errors, "errors")
    if _is_binary(err):
        r = float(np.mean(err))
        optimal = r + (1.0 - r) * math.log(1.0 - r + EPS)
    else:
        optimal = aurc(*_optimal_confidence(err))
    return aurc(confidence, errors) - optimal


def eaugrc(confidence: np.ndarray, errors: np.ndarray) -> float:
    """Excess AUGRC: AUGRC minus the oracle AUGRC (err^2 / 2 if binary)."""
    err = _vec(errors, "errors")
    if _is_binary(err):
        optimal = 0.5 * float(np.mean(err)) ** 2
    else:
        optimal = augrc(*_optimal_confidence(err))
    return augrc(confidence, errors) - optimal


def risk_at_coverage(confidence: np.ndarray, errors: np.ndarray, target: float) -> float:
    """Selective risk of the RC point with the smallest coverage >= ``target`` (ties grouped)."""
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target coverage must be in (0, 1], got {target}")
    cov, risk, _ = risk_coverage_curve(confidence, errors, "selective")
    ok = cov[:-1] >= target - 1e-12
    return float(risk[:-1][ok][-1])


def coverage_at_risk(confidence: np.ndarray, errors: np.ndarray, target: float) -> float:
    """Largest coverage among RC points whose selective risk is <= ``target`` (0 if none)."""
    if not 0.0 <= target <= 1.0:
        raise ConfigError(f"target risk must be in [0, 1], got {target}")
    cov, risk, _ = risk_coverage_curve(confidence, errors, "selective")
    ok = risk[:-1] <= target + 1e-12
    return float(cov[:-1][ok].max()) if ok.any() else 0.0


# ----------------------------------------------------------------------------- exit risks
def _exit_inputs(y: np.ndarray, label: np.ndarray, exit: np.ndarray) -> tuple:
    yy, lab = _labels(y), _labels(label, "label")
    ex = np.asarray(exit)
    if ex.ndim != 1 or ex.dtype != bool:
        raise DataError("exit must be a 1-D boolean mask")
    _same_len(yy, lab, ex)
    return yy, lab, ex


def coverage(exit: np.ndarray) -> float:
    """#exit / N."""
    ex = np.asarray(exit, dtype=bool)
    return _ratio(ex.sum(), len(ex))


def defer_rate(exit: np.ndarray) -> float:
    """#defer / N = 1 - coverage."""
    ex = np.asarray(exit, dtype=bool)
    return _ratio((~ex).sum(), len(ex))


def selective_error(y: np.ndarray, label: np.ndarray, exit: np.ndarray) -> float:
    """#(exit and wrong) / #exit (the ``selective_error`` risk)."""
    return get_risk("selective_error").value(*_exit_inputs(y, label, exit))


def fnr_exit(y: np.ndarray, label: np.ndarray, exit: np.ndarray) -> float:
    """#(exit and y=1 and pred=0) / #(exit and y=1) (the ``fnr_exit`` risk)."""
    return get_risk("fnr_exit").value(*_exit_inputs(y, label, exit))


def miss_rate(y: np.ndarray, label: np.ndarray, exit: np.ndarray) -> float:
    """#(exit and y=1 and pred=0) / #(y=1) (the ``miss_rate`` risk)."""
    return get_risk("miss_rate").value(*_exit_inputs(y, label, exit))


def mean_set_size(pred_set: np.ndarray) -> float:
    """Mean prediction-set size with the encoding 0 = {0}, 1 = {1}, 2 = {0, 1}."""
    ps = np.asarray(pred_set)
    if ps.ndim != 1 or not np.isin(ps, (0, 1, 2)).all():
        raise DataError("pred_set must be 1-D with codes 0 = {0}, 1 = {1}, 2 = {0,1}")
    return _ratio(np.sum(np.where(ps == 2, 2, 1)), len(ps))


def selective_risks(y: np.ndarray, label: np.ndarray, exit: np.ndarray) -> dict[str, float]:
    """Coverage, every registered risk (``policies.risks``) and the defer rate, with DESIGN's stable
    names, plus the counts behind them."""
    yy, lab, ex = _exit_inputs(y, label, exit)
    return {
        "coverage": coverage(ex),
        **{r.name: r.value(yy, lab, ex) for r in all_risks()},
        "defer_rate": defer_rate(ex),
        "n_exit": int(ex.sum()),
        "n_exit_pos": int(np.sum(ex & (yy == 1))),
        "n_missed": int(np.sum(ex & (yy == 1) & (lab == 0))),
    }
