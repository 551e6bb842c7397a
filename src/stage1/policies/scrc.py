"""SCRC-I: selective conformal risk control, calibration-only (Xu, Guo & Wei, arXiv:2512.12844).

Pure functions, numpy arrays in and out (no scipy, no torch). Two stages on one i.i.d. calibration
set of ``n`` rows with a selector score ``select`` (higher = more confident, any real scale), the
calibrated ``p1 = P(y=1 | x)`` and the label ``y``:

Stage 1 (selection, lambda1). An image is *selected* iff ``select > t1`` (strict), where ``t1`` is the
K-th largest calibration selector score (``-inf`` when ``K = n + 1``: select everything), and
``lambda1 = 1 - t1`` in the paper's notation ("abstain when g(x) < 1 - lambda1"). K is the smallest
order statistic that certifies the selection coverage ``P(select > t1) >= xi``:

* ``"binomial"`` (default, PAC): smallest K with ``P(Bin(n, xi) >= K) <= delta1``;
* ``"hoeffding"`` (PAC): ``K = ceil(n (xi + sqrt(log(1/delta1) / (2 n))))``;
* ``"expectation"`` (the paper's Eq. (11) style, in expectation): ``K = ceil((n + 1) xi)``.

Stage 2 (set size, lambda2) on the ``m`` selected rows. Nonconformity ``s(x, 1) = 1 - p1`` and
``s(x, 0) = p1``; the set is ``C(x) = {k : s(x, k) <= lambda2}`` (= ``{k : f_k(x) >= 1 - lambda2}``);
the loss is miscoverage ``1{y not in C(x)}`` (an empty set is a miss). With
``N(lambda) = #{selected i : s(x_i, y_i) > lambda}``:

* ``"binomial"`` (default, PAC, Clopper-Pearson): ``lambda2 = inf{lambda : P(Bin(m, alpha) <= N(lambda)) <= delta2}``;
  needs ``m >= ceil(log(delta2) / log(1 - alpha))``;
* ``"hoeffding"`` (PAC): ``lambda2 = inf{lambda : N/m + sqrt(log(1/delta2) / (2 m)) <= alpha}``;
* ``"crc"`` (conformal risk control, in expectation, the paper's Eq. (15) with the CRC budget):
  ``lambda2 = inf{lambda : (N(lambda) + 1) / (m + 1) <= alpha}`` (1 if none).

``nonempty=True`` (default) raises ``lambda2`` to at least 1/2, so every set is non-empty; larger sets
only lower the loss, so the guarantee is kept.

Why this is valid without the test point (the calibration-only "I" variant): conditional on
``t1 = g_(K)`` and on which rows lie strictly above it, those rows are i.i.d. from
``P(. | select > t1)`` -- exactly the population the deployed rule selects -- so the stage-2 bound
holds conditionally on the stage-1 outcome, hence unconditionally. Guarantee (both stages PAC,
``delta1 + delta2 = delta``): with probability >= 1 - delta over the calibration draw,
``P(select > t1) >= xi`` (needs no atom of the selector distribution exactly at ``t1``) and
``P(y not in C(x) | select > t1) <= alpha``. With ``"expectation"`` / ``"crc"`` the corresponding
statement holds in expectation over the calibration draw and consumes no delta.

Decisions: exit iff selected and the set is a singleton (the label is that class); selected with set
{0, 1} is AMBIGUOUS; not selected is UNCERTAIN (defer). Set codes: 0 = {0}, 1 = {1}, 2 = {0, 1},
3 = {} (only with ``nonempty=False``).

The registered exit policy ``scrc`` (calibrators, val_calib split, Decision, policy.json) is
``policies.scrc_policy.SCRCPolicy``; this module stays free of the policy machinery.

The paper's own SCRC-I concentration step could not be read (only the abstract and second-hand
quotes of Eqs. (2), (6), (11), (15) and Theorem 2 were available); see the notes for what is the
paper's and what is this module's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

SET_0, SET_1, SET_01, SET_EMPTY = 0, 1, 2, 3
SELECTION_BOUNDS = ("binomial", "hoeffding", "expectation")
RISK_BOUNDS = ("binomial", "hoeffding", "crc")
_PAC_SELECTION = ("binomial", "hoeffding")
_PAC_RISK = ("binomial", "hoeffding")

CONFIDENT_0, CONFIDENT_1, UNCERTAIN, AMBIGUOUS = "CONFIDENT_0", "CONFIDENT_1", "UNCERTAIN", "AMBIGUOUS"


# --------------------------------------------------------------------------------------------------
# exact binomial tails (numpy only)
# --------------------------------------------------------------------------------------------------
def _binom_pmf(n: int, p: float) -> np.ndarray:
    """pmf of Bin(n, p) at 0..n (log-space, exact to float rounding)."""
    j = np.arange(n + 1, dtype=np.float64)
    if p <= 0.0:
        return (j == 0).astype(np.float64)
    if p >= 1.0:
        return (j == n).astype(np.float64)
    logfact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))))
    lchoose = logfact[n] - logfact - logfact[::-1]
    return np.exp(lchoose + j * math.log(p) + (n - j) * math.log1p(-p))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(min(1.0, _binom_pmf(n, p)[: k + 1].sum()))


def binom_sf_ge(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) >= k)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return float(min(1.0, _binom_pmf(n, p)[k:].sum()))


def _bisect(f, lo: float, hi: float, iters: int = 64) -> float:
    """Largest x in [lo, hi] with f(x) True for a predicate that is True then False along x."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid):
            lo = mid
        else:
            hi = mid
    return lo


def clopper_pearson_ucb(k: int, n: int, delta: float) -> float:
    """Upper (1 - delta) confidence bound on a Bernoulli rate from ``k`` events in ``n`` trials."""
    if n <= 0 or k >= n:
        return 1.0
    return _bisect(lambda p: binom_cdf(k, n, p) > delta, k / n, 1.0)


# --------------------------------------------------------------------------------------------------
# the two stages
# --------------------------------------------------------------------------------------------------
def nonconformity(p1: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``s(x, y)``: ``1 - p1`` for y = 1, ``p1`` for y = 0 (1 minus the probability of class y)."""
    p1 = np.asarray(p1, dtype=np.float64)
    return np.where(np.asarray(y) == 1, 1.0 - p1, p1)


def selection_order(n: int, xi: float, delta1: float, method: str = "binomial") -> int:
    """Stage 1: the order statistic K in 1..n+1 (t1 = K-th largest score; K = n + 1 selects all)."""
    if method not in SELECTION_BOUNDS:
        raise ValueError(f"selection_bound must be one of {SELECTION_BOUNDS}, got {method!r}")
    if n == 0:
        return 1
    if method == "expectation":
        k = math.ceil((n + 1) * xi - 1e-12)
    elif method == "hoeffding":
        k = math.ceil(n * (xi + math.sqrt(math.log(1.0 / delta1) / (2.0 * n))) - 1e-12)
    else:
        tail = np.cumsum(_binom_pmf(n, xi)[::-1])[::-1]  # tail[j] = P(Bin >= j), j = 0..n
        ok = np.nonzero(tail <= delta1)[0]
        k = int(ok[0]) if ok.size else n + 1
    return int(min(max(k, 1), n + 1))


def selection_coverage_bound(n: int, k: int, delta1: float, method: str = "binomial") -> float:
    """The selection coverage P(select > t1) that stage 1 certifies for order statistic ``k``
    (a 1 - delta1 lower bound for the PAC methods, ``k / (n + 1)`` in expectation)."""
    if k > n:
        return 1.0
    if method == "expectation":
        return k / (n + 1)
    if method == "hoeffding":
        return max(0.0, k / n - math.sqrt(math.log(1.0 / delta1) / (2.0 * n)))
    return _bisect(lambda q: binom_sf_ge(k, n, q) <= delta1, 0.0, 1.0)


def min_selected_rows(alpha: float, delta2: float, method: str = "binomial") -> int:
    """Fewest selected calibration rows with which stage 2 can certify anything smaller than the
    full set (zero misses must already pass the bound)."""
    if method == "binomial":
        return int(math.ceil(math.log(delta2) / math.log1p(-alpha) - 1e-12))
    if method == "hoeffding":
        return int(math.ceil(math.log(1.0 / delta2) / (2.0 * alpha * alpha) - 1e-12))
    if method == "crc":
        return int(max(1, math.ceil(1.0 / alpha - 1.0 - 1e-12)))
    raise ValueError(f"risk_bound must be one of {RISK_BOUNDS}, got {method!r}")


def _rows_for_proper_threshold(xi: float, delta1: float, method: str) -> int:
    """Fewest calibration rows for which stage 1 picks a real threshold (K <= n) rather than
    selecting everything (0 when xi = 1: selecting everything is then the only option)."""
    if xi >= 1.0:
        return 0
    if method == "expectation":  # ceil((n + 1) xi) <= n
        return int(math.ceil(xi / (1.0 - xi) - 1e-12))
    if method == "hoeffding":  # xi + sqrt(log(1/delta1) / (2 n)) <= 1
        return int(math.ceil(math.log(1.0 / delta1) / (2.0 * (1.0 - xi) ** 2) - 1e-12))
    return int(math.ceil(math.log(delta1) / math.log(xi) - 1e-12))  # P(Bin(n, xi) >= n) = xi^n <= delta1


def selected_count(n: int, xi: float, delta1: float, method: str = "binomial") -> int:
    """Rows stage 1 selects from ``n`` calibration rows when the selector has no ties: ``K - 1``
    (those strictly above the K-th largest), or ``n`` when ``K = n + 1`` (select all)."""
    k = selection_order(n, xi, delta1, method)
    return n if k > n else k - 1


def calib_rows_needed(m_need: int, xi: float, delta1: float, method: str = "binomial") -> int:
    """Fewest calibration rows ``n`` with which stage 1 selects at least ``m_need`` rows (exact when
    the selector has no ties). ``selected_count`` is non-decreasing in ``n`` (K(n) is, and so is
    ``min(K(n) - 1, n)``), so a bisection finds it."""
    if m_need <= 0:
        return 0
    lo = m_need  # at most n rows are selected, so n >= m_need
    if selected_count(lo, xi, delta1, method) >= m_need:
        return lo
    hi = max(lo + 1, int(math.ceil(m_need / xi)) + 1)
    while selected_count(hi, xi, delta1, method) < m_need:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # selected_count(lo) < m_need <= selected_count(hi)
        mid = (lo + hi) // 2
        if selected_count(mid, xi, delta1, method) >= m_need:
            hi = mid
        else:
            lo = mid
    return hi


def _miss_budget(m: int, alpha: float, delta2: float, method: str) -> int:
    """Largest number of misses c among m selected rows that still passes the bound (-1: none)."""
    if m <= 0:
        return -1
    if method == "crc":  # (c + 1) / (m + 1) <= alpha
        return int(math.floor((m + 1) * alpha + 1e-12)) - 1
    if method == "hoeffding":  # c / m + eps <= alpha
        eps = math.sqrt(math.log(1.0 / delta2) / (2.0 * m))
        return int(math.floor(m * (alpha - eps) + 1e-12)) if alpha >= eps else -1
    cdf = np.cumsum(_binom_pmf(m, alpha))
    ok = np.nonzero(cdf <= delta2)[0]
    return int(ok[-1]) if ok.size else -1


def risk_bound_value(n_miss: int, m: int, alpha: float, delta2: float, method: str) -> float:
    """The bound on the selected miscoverage at the chosen lambda2 (a 1 - delta2 upper confidence
    bound for the PAC methods, the CRC bound ``(N + 1) / (m + 1)`` for ``"crc"``)."""
    if m <= 0:
        return 1.0
    if method == "crc":
        return (n_miss + 1) / (m + 1)
    if method == "hoeffding":
        return min(1.0, n_miss / m + math.sqrt(math.log(1.0 / delta2) / (2.0 * m)))
    return clopper_pearson_ucb(n_miss, m, delta2)


def set_threshold(scores: np.ndarray, alpha: float, delta2: float, method: str = "binomial") -> tuple[float, int, bool]:
    """Stage 2 on the selected rows' nonconformity ``scores``: (lambda2, misses at lambda2, ok).

    ``lambda2`` is the smallest value in [0, 1] with ``#{scores > lambda2} <= c`` for the bound's
    miss budget ``c``, i.e. the (c+1)-th largest score (0 if c >= m). ``ok`` is False when not even
    zero misses pass (too few rows); then lambda2 = 1 (full sets, no loss).
    """
    if method not in RISK_BOUNDS:
        raise ValueError(f"risk_bound must be one of {RISK_BOUNDS}, got {method!r}")
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    m = len(s)
    c = _miss_budget(m, alpha, delta2, method)
    if c < 0:
        return 1.0, 0, False
    lam = 0.0 if c >= m else float(min(1.0, max(0.0, s[c])))
    return lam, int(np.count_nonzero(s > lam)), True


# --------------------------------------------------------------------------------------------------
# state, fit, decide
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SCRCState:
    """A fitted SCRC-I certificate (JSON-safe via ``to_dict`` / ``from_dict``).

    threshold1: select iff ``select > threshold1`` (``-inf``: select all); lambda1 = 1 - threshold1.
    lambda2: set rule ``k in C(x) iff s(x, k) <= lambda2``; lambda2_raw before the non-empty clamp.
    order_k: the order statistic K (threshold1 = K-th largest calibration selector score).
    n_selected / n_miss: selected calibration rows and their misses at lambda2_raw.
    risk_bound: the bound achieved on the selected miscoverage; coverage_bound: the selection
    coverage stage 1 certifies. certified: the stage-2 bound certifies something smaller than the
    full set; reason: a sentence (why not, how many rows would be needed, tie warnings).
    n_selected_needed: fewest selected rows the stage-2 bound needs; n_calib_needed: fewest calibration
    rows with which stage 1 selects that many (``calib_rows_needed``; exact without selector ties).
    n_tied_at_threshold: calibration rows whose selector equals threshold1 (the threshold row
    included; > 1 means ties, and the coverage statement then assumes no atom there).
    """

    threshold1: float
    lambda1: float
    lambda2: float
    lambda2_raw: float
    order_k: int
    n_calib: int
    n_selected: int
    n_miss: int
    certified: bool
    reason: str
    risk_bound: float
    coverage_bound: float
    xi: float
    alpha: float
    delta: float
    delta1: float
    delta2: float
    selection_bound: str
    risk_bound_method: str
    nonempty: bool
    n_selected_needed: int
    n_calib_needed: int
    n_tied_at_threshold: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("threshold1", "lambda1"):
            if math.isinf(d[key]):
                d[key] = "inf" if d[key] > 0 else "-inf"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SCRCState":
        names = {f.name for f in fields(cls)}
        missing = names - set(d)
        if missing:
            raise ValueError(f"SCRC state is missing {sorted(missing)}")
        kw = {k: d[k] for k in names}
        for key in ("threshold1", "lambda1"):
            kw[key] = float(kw[key])  # float("inf") / float("-inf") parse the JSON-safe strings
        return cls(**kw)


def _check_inputs(select: np.ndarray, p1: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, ...]:
    g = np.asarray(select, dtype=np.float64)
    p = np.asarray(p1, dtype=np.float64)
    if g.ndim != 1 or p.shape != g.shape:
        raise ValueError(f"select and p1 must be 1-D of the same length, got {g.shape} and {p.shape}")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(p))):
        raise ValueError("select and p1 must be finite")
    if np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("p1 must lie in [0, 1]")
    if y is None:
        return g, p
    yy = np.asarray(y)
    if yy.shape != g.shape or not np.isin(yy, (0, 1)).all():
        raise ValueError(f"y must hold 0/1 labels with shape {g.shape}")
    return g, p, yy.astype(np.int64)


def fit_scrc(
    select: np.ndarray,
    p1: np.ndarray,
    y: np.ndarray,
    *,
    xi: float,
    alpha: float,
    delta: float = 0.1,
    delta_split: float = 0.5,
    selection_bound: str = "binomial",
    risk_bound: str = "binomial",
    nonempty: bool = True,
) -> SCRCState:
    """Fit SCRC-I on one i.i.d. calibration set (see the module docstring for the procedure).

    xi: target selection coverage in (0, 1]; alpha: target miscoverage among selected in (0, 1);
    delta: total failure probability of the PAC stages; delta_split: the fraction of delta given to
    stage 1 when both stages are PAC (a stage in expectation takes none).
    """
    g, p, yy = _check_inputs(select, p1, y)
    if not 0.0 < xi <= 1.0:
        raise ValueError(f"xi must be in (0, 1], got {xi}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if selection_bound not in SELECTION_BOUNDS:
        raise ValueError(f"selection_bound must be one of {SELECTION_BOUNDS}, got {selection_bound!r}")
    if risk_bound not in RISK_BOUNDS:
        raise ValueError(f"risk_bound must be one of {RISK_BOUNDS}, got {risk_bound!r}")
    pac1, pac2 = selection_bound in _PAC_SELECTION, risk_bound in _PAC_RISK
    if (pac1 or pac2) and not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0.0 < delta_split < 1.0:
        raise ValueError(f"delta_split must be in (0, 1), got {delta_split}")
    if pac1 and pac2:
        delta1, delta2 = delta * delta_split, delta * (1.0 - delta_split)
    else:
        delta1, delta2 = (delta if pac1 else 0.0), (delta if pac2 else 0.0)

    n = len(g)
    k = selection_order(n, xi, delta1, selection_bound)
    desc = np.sort(g)[::-1]
    t1 = -math.inf if k > n else float(desc[k - 1])
    selected = g > t1
    m = int(selected.sum())
    n_tied = int(np.count_nonzero(g == t1)) if k <= n else 0
    cov_bound = selection_coverage_bound(n, k, delta1, selection_bound)

    lam_raw, n_miss, ok = set_threshold(nonconformity(p[selected], yy[selected]), alpha, delta2, risk_bound)
    lam = max(lam_raw, 0.5) if nonempty else lam_raw
    m_need = min_selected_rows(alpha, delta2, risk_bound)
    n_need = calib_rows_needed(m_need, xi, delta1, selection_bound)  # rows for stage 1 to select m_need
    n_proper = _rows_for_proper_threshold(xi, delta1, selection_bound)
    bound = risk_bound_value(n_miss, m, alpha, delta2, risk_bound) if ok else 0.0

    how = {"binomial": f"Clopper-Pearson at delta2={delta2:g}", "hoeffding": f"Hoeffding at delta2={delta2:g}",
           "crc": "CRC (in expectation)"}[risk_bound]
    parts: list[str] = []
    if ok:
        parts.append(
            f"selected {m}/{n} calibration rows (select > {t1:.6g}); miscoverage bound {bound:.4g} <= alpha={alpha:g} "
            f"({how}) at lambda2={lam:.6g}; selection coverage >= {cov_bound:.4g} (target xi={xi:g})"
        )
    else:
        parts.append(
            f"cannot certify: {m} selected calibration rows but the {risk_bound} bound needs at least {m_need} "
            f"(at least {n_need} calibration rows at xi={xi:g}, without ties in the selector); all selected rows "
            "stay AMBIGUOUS (full sets)"
        )
    if k > n:
        parts.append(f"{n} rows are too few for a selective threshold at xi={xi:g} ({selection_bound} needs >= "
                     f"{n_proper}); every row is selected, which keeps the coverage guarantee")
    if n_tied > 1:
        parts.append(f"{n_tied} calibration selector scores tie at the threshold: the coverage guarantee assumes "
                     "no atom of the selector there (break ties, e.g. with a secondary score)")
    if ok and lam >= 1.0:
        parts.append("lambda2 = 1: every selected set is {0,1}, so nothing exits")
    return SCRCState(
        threshold1=t1, lambda1=1.0 - t1, lambda2=float(lam), lambda2_raw=float(lam_raw), order_k=int(k),
        n_calib=n, n_selected=m, n_miss=int(n_miss), certified=bool(ok), reason="; ".join(parts),
        risk_bound=float(bound), coverage_bound=float(cov_bound), xi=float(xi), alpha=float(alpha),
        delta=float(delta), delta1=float(delta1), delta2=float(delta2), selection_bound=selection_bound,
        risk_bound_method=risk_bound, nonempty=bool(nonempty), n_selected_needed=int(m_need),
        n_calib_needed=n_need, n_tied_at_threshold=n_tied,
    )


def prediction_sets(p1: np.ndarray, lambda2: float) -> np.ndarray:
    """Set codes for ``C(x) = {k : s(x, k) <= lambda2}``: 0 = {0}, 1 = {1}, 2 = {0, 1}, 3 = {}."""
    p = np.asarray(p1, dtype=np.float64)
    has1 = (1.0 - p) <= lambda2
    has0 = p <= lambda2
    return np.where(has0 & has1, SET_01, np.where(has1, SET_1, np.where(has0, SET_0, SET_EMPTY))).astype(np.int64)


def scrc_selected(select: np.ndarray, state: SCRCState) -> np.ndarray:
    """Stage 1 on new rows: ``select > threshold1``."""
    g = np.asarray(select, dtype=np.float64)
    return g > state.threshold1


def scrc_sets(select: np.ndarray, p1: np.ndarray, state: SCRCState) -> tuple[np.ndarray, np.ndarray]:
    """(exit_mask, pred_set codes) for new rows. exit = selected and singleton; the set code is given
    for every row (it depends on p1 only); uncertified states never exit."""
    g, p = _check_inputs(select, p1, None)
    sets = prediction_sets(p, state.lambda2)
    exit_mask = scrc_selected(g, state) & ((sets == SET_0) | (sets == SET_1)) & bool(state.certified)
    return exit_mask, sets


def scrc_levels(select: np.ndarray, p1: np.ndarray, state: SCRCState) -> np.ndarray:
    """Per-row level: CONFIDENT_0 / CONFIDENT_1 (exit), AMBIGUOUS (selected, set {0,1} or {}, or the
    state is uncertified), UNCERTAIN (not selected)."""
    g, p = _check_inputs(select, p1, None)
    exit_mask, sets = scrc_sets(g, p, state)
    sel = scrc_selected(g, state)
    out = np.full(len(g), UNCERTAIN, dtype="<U11")
    out[sel] = AMBIGUOUS
    out[exit_mask & (sets == SET_0)] = CONFIDENT_0
    out[exit_mask & (sets == SET_1)] = CONFIDENT_1
    return out
