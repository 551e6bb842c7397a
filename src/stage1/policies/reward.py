"""The subnet's reward, replayed: what a miner is paid for its answers (numpy only).

The validators' tracker as ../shared/SUBNET.md states it (``natix/validator/reward.py`` and
``miner_performance_tracker.py``), in this order, every round:

1. the answer and the label are appended to the miner's history (the last ``HISTORY`` = 100 pairs,
   **-1 answers included**);
2. each window takes the last 100 (for MCC) or last 10 (for accuracy) entries of the history
   **first**, then drops the entries whose answer is exactly -1;
3. predictions are ``np.round(answer)`` (round half to even, so 0.5 counts as class 0); MCC is
   ``max(0, mcc)`` and 0 unless both classes occur among the window's labels (and, through MCC's
   denominator, among its predictions); accuracy is plain (0 on an empty window);
4. the round's reward is 0 for an answer of -1; otherwise ``(0.5 * MCC_100 + 0.5 * accuracy_10) ** 3``,
   times 0 when the answer lies outside [0, 1] (the answer still enters the windows);
5. the validator's score is an EMA of the round rewards with alpha 0.05 (``ema``).

``round_rewards`` is the plain replay of one sequence (the reference); ``simulate_rewards`` computes
the same numbers for many sequences at once from sliding-window counts; ``expected_reward`` draws
many random orderings of a labelled set at the validators' label mix and reports the expected
reward per round and its spread. ``metrics_at_prior`` re-weights selective metrics by class to a
deployment prior.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stage1._core.errors import DataError

#: the tracker keeps this many (answer, label) pairs; MCC is computed over them.
HISTORY = 100
#: accuracy is computed over the last this many pairs.
SHORT = 10
#: the validators' EMA of round rewards.
EMA_ALPHA = 0.05
#: the reward is this power of the blended metric.
POWER = 3
#: the answer that abstains (a miner's default prediction).
ABSTAIN = -1.0
#: the validators draw labels 50/50.
VALIDATOR_PRIOR = 0.5

__all__ = ["ABSTAIN", "EMA_ALPHA", "HISTORY", "SHORT", "VALIDATOR_PRIOR", "RewardEstimate", "binary_mcc", "ema",
           "expected_reward", "metrics_at_prior", "orderings", "round_rewards", "simulate_rewards", "summarize",
           "window_metrics"]


# -- the tracker, plainly -------------------------------------------------------------------------------
def _mcc(labels: np.ndarray, preds: np.ndarray) -> float:
    """Matthews correlation of any classes (scikit-learn's multiclass formula); 0 when undefined."""
    classes, inv = np.unique(np.r_[labels, preds], return_inverse=True)
    k, n = len(classes), len(labels)
    cm = np.zeros((k, k))
    np.add.at(cm, (inv[:n], inv[n:]), 1.0)
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    c, s = float(np.trace(cm)), float(n)
    denom = (s * s - float(p @ p)) * (s * s - float(t @ t))
    return 0.0 if denom == 0.0 else (c * s - float(t @ p)) / math.sqrt(denom)


def window_metrics(answers: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(MCC clipped at 0, accuracy) of one window, already sliced: -1 dropped here, then rounded."""
    a = np.asarray(answers, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.float64)
    keep = a != ABSTAIN
    a, lab = a[keep], lab[keep]
    if len(a) == 0:
        return 0.0, 0.0
    pred = np.round(a)
    acc = float(np.mean(pred == lab))
    mcc = max(0.0, _mcc(lab, pred)) if len(np.unique(lab)) > 1 else 0.0
    return mcc, acc


def round_rewards(answers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The reward of every round of one sequence of (answer, label) challenges, replayed in order."""
    a = np.asarray(answers, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.float64)
    if a.shape != lab.shape or a.ndim != 1:
        raise DataError(f"answers and labels must be 1-D of one length, got {a.shape} and {lab.shape}")
    out = np.zeros(len(a))
    for t in range(len(a)):
        hist_a, hist_y = a[max(0, t + 1 - HISTORY): t + 1], lab[max(0, t + 1 - HISTORY): t + 1]
        mcc, _ = window_metrics(hist_a, hist_y)
        _, acc = window_metrics(hist_a[-SHORT:], hist_y[-SHORT:])
        if a[t] == ABSTAIN:
            continue
        penalty = 0.0 if (a[t] < 0.0 or a[t] > 1.0) else 1.0
        out[t] = (0.5 * mcc + 0.5 * acc) ** POWER * penalty
    return out


def ema(rewards: np.ndarray, alpha: float = EMA_ALPHA, start: float = 0.0) -> np.ndarray:
    """The validator's score after each round: s <- (1 - alpha) s + alpha r, from ``start``."""
    r = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(r)
    s = float(start)
    for i, v in enumerate(r):
        s = (1.0 - alpha) * s + alpha * float(v)
        out[i] = s
    return out


# -- the same numbers, many sequences at once ----------------------------------------------------------
def _window_sum(x: np.ndarray, w: int) -> np.ndarray:
    """Sum of the last ``w`` entries (this one included) along axis 1."""
    c = np.cumsum(x, axis=1, dtype=np.int32)
    out = c.copy()
    out[:, w:] -= c[:, :-w]
    return out


def binary_mcc(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> np.ndarray:
    """MCC from 0/1 confusion counts (arrays), 0 where a class is missing among labels or predictions."""
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (tp * tn - fp * fn) / np.sqrt(denom)
    return np.where(denom > 0, m, 0.0)


def simulate_rewards(answered: np.ndarray, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Round rewards [k, T] of k sequences of T rounds, each answer in [0, 1] or abstaining.

    ``answered`` [k, T] bool (False: the answer was -1), ``pred`` [k, T] the rounded answer (0/1),
    ``y`` [k, T] the labels. Equal to ``round_rewards`` row by row (tested), from sliding-window
    counts instead of a loop. Out-of-range answers are not representable here (``round_rewards`` has them).
    """
    a = np.asarray(answered, dtype=bool)
    p = a & np.asarray(pred).astype(bool)
    yy = a & np.asarray(y).astype(bool)
    tp = p & yy
    correct = tp | (a & ~p & ~yy)
    n, n_p, n_y, n_tp = (_window_sum(v, HISTORY) for v in (a, p, yy, tp))
    mcc = np.maximum(binary_mcc(n_tp, n_p - n_tp, n_y - n_tp, n - n_p - n_y + n_tp), 0.0)
    kept, right = _window_sum(a, SHORT), _window_sum(correct, SHORT)
    acc = right / np.maximum(kept, 1)  # a round that answers has kept >= 1; others pay 0 below
    return np.where(a, (0.5 * mcc + 0.5 * acc) ** POWER, 0.0)


@dataclass(frozen=True)
class RewardEstimate:
    """Expected reward per round over random orderings: the mean, its spread and what it was run on.

    ``mean`` is the average round reward over every ordering's rounds after ``burn_in`` (the
    windows are full then: the steady state the EMA tracks); ``std`` the standard deviation of one
    ordering's mean, ``lo`` / ``hi`` its 5% and 95% quantiles; ``answer_rate`` the share answered.
    """

    mean: float
    std: float
    lo: float
    hi: float
    answer_rate: float
    prior: float
    n_rounds: int
    n_orderings: int
    burn_in: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


def _check(answers: np.ndarray, y: np.ndarray, prior: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(answers, dtype=np.float64)
    yy = np.asarray(y)
    if a.ndim != 1 or a.shape != yy.shape:
        raise DataError(f"answers and y must be 1-D of one length, got {a.shape} and {yy.shape}")
    if not np.isin(yy, (0, 1)).all():
        raise DataError("y must hold 0/1 labels to simulate the reward")
    if not np.all((a == ABSTAIN) | ((a >= 0.0) & (a <= 1.0))):
        raise DataError("answers must be in [0, 1] or -1 (abstain) to simulate the reward")
    if not 0.0 <= prior <= 1.0:
        raise DataError(f"prior={prior}: expected a positive rate in [0, 1]")
    for c, share in ((1, prior), (0, 1.0 - prior)):
        if share > 0 and not np.any(yy == c):
            raise DataError(f"cannot simulate at prior {prior:g}: the labelled set has no y={c} rows")
    return a, yy.astype(np.int64)


def orderings(y: np.ndarray, prior: float, n_rounds: int, n_orderings: int, seed: int) -> np.ndarray:
    """Row indices [n_orderings, n_rounds]: each round's label drawn with P(1) = prior, then a row of that
    class uniformly with replacement (the validators' challenge stream, played from a labelled set)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    is_pos = rng.random((n_orderings, n_rounds)) < prior
    idx = np.empty((n_orderings, n_rounds), dtype=np.int64)
    if len(pos):
        idx[is_pos] = pos[rng.integers(0, len(pos), int(is_pos.sum()))]
    if len(neg):
        idx[~is_pos] = neg[rng.integers(0, len(neg), int((~is_pos).sum()))]
    return idx


def summarize(rewards: np.ndarray, burn_in: int, answered: np.ndarray, prior: float) -> RewardEstimate:
    """A ``RewardEstimate`` from simulated round rewards [k, T] (rounds before ``burn_in`` left out)."""
    r = rewards[:, burn_in:]
    per = r.mean(axis=1)
    return RewardEstimate(mean=float(per.mean()), std=float(per.std(ddof=1)) if len(per) > 1 else 0.0,
                          lo=float(np.quantile(per, 0.05)), hi=float(np.quantile(per, 0.95)),
                          answer_rate=float(answered[:, burn_in:].mean()), prior=float(prior),
                          n_rounds=int(r.shape[1]), n_orderings=int(r.shape[0]), burn_in=int(burn_in))


def expected_reward(answers: np.ndarray, y: np.ndarray, prior: float = VALIDATOR_PRIOR, n_rounds: int = 500,
                    n_orderings: int = 200, burn_in: int = HISTORY, seed: int = 0) -> RewardEstimate:
    """Expected reward per round of a model's ``answers`` (p in [0, 1], or -1) on a labelled set.

    Plays ``n_orderings`` random challenge streams of ``burn_in + n_rounds`` rounds, each round a
    label drawn at ``prior`` (the validators: 0.5) and a row of that class drawn with replacement,
    through the tracker (``simulate_rewards``), and averages the rounds after the burn-in.
    """
    a, yy = _check(answers, y, prior)
    if n_rounds < 1 or n_orderings < 1 or burn_in < 0:
        raise DataError(f"n_rounds and n_orderings must be >= 1 and burn_in >= 0 "
                        f"(got {n_rounds}, {n_orderings}, {burn_in})")
    idx = orderings(yy, prior, burn_in + n_rounds, n_orderings, seed)
    answered = (a != ABSTAIN)[idx]
    rewards = simulate_rewards(answered, (np.round(a) == 1)[idx], yy[idx])
    return summarize(rewards, burn_in, answered, prior)


# -- metrics at a deployment prior ---------------------------------------------------------------------
def metrics_at_prior(y: np.ndarray, label: np.ndarray, exit: np.ndarray, prior: float) -> dict[str, float]:
    """Selective metrics as they would be at positive rate ``prior``: each class's rows re-weighted so
    that positives carry ``prior`` of the weight (per-class rates such as TPR are prior-free, so this is
    exact in expectation when the classes' score distributions do not change, only their shares).

    Keys: coverage, accuracy (on exits), selective_error, fnr_exit, miss_rate, mcc (on exits) and
    prior. NaN where undefined (no exits, or no exited positives).
    """
    yy = np.asarray(y).astype(np.int64)
    lab = np.asarray(label).astype(np.int64)
    ex = np.asarray(exit, dtype=bool)
    if not 0.0 < prior < 1.0:
        raise DataError(f"prior={prior}: expected a positive rate in (0, 1)")
    n1, n0 = int(np.sum(yy == 1)), int(np.sum(yy == 0))
    if n1 == 0 or n0 == 0:
        raise DataError("metrics at a prior need labelled rows of both classes")
    w = np.where(yy == 1, prior / n1, (1.0 - prior) / n0)  # sums to 1
    cell = {(c, k): float(np.sum(w * (ex & (yy == c) & (lab == k)))) for c in (0, 1) for k in (0, 1)}
    tp, fn, fp, tn = cell[1, 1], cell[1, 0], cell[0, 1], cell[0, 0]
    cov = tp + fn + fp + tn
    nan = float("nan")
    return {
        "prior": float(prior),
        "coverage": cov,
        "accuracy": (tp + tn) / cov if cov > 0 else nan,
        "selective_error": (fp + fn) / cov if cov > 0 else nan,
        "fnr_exit": fn / (tp + fn) if tp + fn > 0 else nan,
        "miss_rate": fn / prior,
        "mcc": float(binary_mcc(tp, fp, fn, tn)) if cov > 0 else nan,
    }
