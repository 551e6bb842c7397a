"""Learn-then-Test certified exit policy with two thresholds (SCRC-I is its own policy: policies.scrc_policy).

Hypotheses: for every pair (t0, t1) of a fixed grid (plus "never exit" = inf), H0: risk > alpha,
where the risk is ``fnr_exit`` (default), ``selective_error`` or ``miss_rate``; with ``eps`` also
H0': selective error > eps (the pair's p-value is the max of both, an intersection-union test).
Each risk (``policies.risks``) is a ratio of counts, so its p-value is a binomial tail given the
number of trials (``policies.pvalues``); a pair with no trials (e.g. no exited positives) gets p = 1, i.e. it is
never certified and never breaks the procedure.

Family-wise error control at ``delta`` (each a valid FWER procedure for any data):
- ``fixed_sequence``: one line per t1; along a line t0 goes from strict (inf, nothing exits as 0)
  to lenient, testing at ``delta / #lines`` and stopping at the first non-rejection (fixed sequence
  within a line, Bonferroni across lines). Strong when the risk grows as t0 loosens (fnr_exit).
- ``fallback`` (Wiens 2003): the same lines, but half of a line's budget sits on its first pair and
  the rest is spread along it; a rejection passes its level on, a failure does not end the line.
  Robust when the risk is not monotone along t0 (selective error with ``eps``).
- ``holm``: Holm's step-down Bonferroni over all pairs; ``bonferroni``: every pair at delta/#pairs.
- ``auto`` (default): decided from the parameters alone, never from the data: ``fixed_sequence`` when
  every certified risk is monotone along the lines (``Risk.monotone``: fnr_exit or miss_rate, no
  eps), else ``fallback`` (Holm over all ~4,000 pairs starts at delta / 4,000 and certified nothing
  on the digits demo at FNR_exit <= 5% and selective error <= 10%, where fallback certified 68%).
The certified pair of maximum calibration coverage is returned (ties: lower empirical risk, then
stricter thresholds), so P(risk > alpha) <= delta over the draw of the certification data.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from stage1._core.errors import ConfigError
from stage1._core.params import Param, Params
from stage1.policies import POLICIES
from stage1.policies.base import BASE_PARAMS, ExitPolicy
from stage1.policies.pvalues import PVALUES, binomial_pvalue, trials_needed
from stage1.policies.risks import RISKS, Risk, get_risk

MULTIPLE_TESTING = ("auto", "fixed_sequence", "fallback", "holm", "bonferroni")


def _grid(value: Any) -> list[float] | int:
    """The ``grid`` parameter: an int >= 2 (even steps) or a non-empty list of finite thresholds."""
    if isinstance(value, int):
        if value < 2:
            raise ValueError("an int >= 2, a list of thresholds or None")
        return value
    try:
        g = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("a non-empty list of finite thresholds") from None
    if g.ndim != 1 or len(g) == 0 or not np.all(np.isfinite(g)):
        raise ValueError("a non-empty list of finite thresholds")
    return [float(v) for v in np.unique(g)]


def default_grid(lo: float) -> np.ndarray:
    """Fixed threshold grid on [lo, 1]: 51 even steps plus a log-spaced tail towards 1."""
    g = np.r_[np.linspace(lo, 1.0, 51), 1.0 - np.logspace(-4, -1.5, 11)]
    return np.unique(np.round(g[g >= lo], 12))


def _exit_counts(s: np.ndarray, y: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each threshold in ``grid``: (#exits with y=1, #exits with y=0) among rows with s >= t."""
    def count(v: np.ndarray) -> np.ndarray:
        v = np.sort(v)
        return len(v) - np.searchsorted(v, grid, side="left")

    return count(s[y == 1]), count(s[y == 0])


@POLICIES.register("ltt")
class LTTPolicy(ExitPolicy):
    """Certifies P(risk > alpha) <= delta (and P(selective error > eps) <= delta when eps is given)."""

    name = "ltt"
    guarantee = "ltt"
    PARAMS = Params(
        Param("alpha", float, 0.02, "Risk level: certify P(risk > alpha) <= delta.", low=0.0, high=1.0,
              low_open=True, high_open=True),
        Param("delta", float, 0.1, "Allowed probability that the risk exceeds alpha.", low=0.0, high=1.0,
              low_open=True, high_open=True),
        Param("risk", str, "fnr_exit", "The certified risk (policies.risks).", choices=RISKS.names),
        Param("eps", float, None, "Also bound the selective error by eps (same delta).", low=0.0, high=1.0,
              low_open=True, high_open=True, optional=True),
        Param("pvalue", str, "clopper_pearson", "Binomial-tail p-value.", choices=PVALUES),
        Param("multiple_testing", str, "auto", "Family-wise error procedure (auto: from the parameters).",
              choices=MULTIPLE_TESTING),
        Param("grid", list, None, "Thresholds tested: None (default grid), an int (even steps) or a list.",
              also=(int,), optional=True, check=_grid),
    ) + BASE_PARAMS

    def _check(self) -> None:
        if self.eps is not None and self.risk == "selective_error":
            raise ConfigError("eps bounds the selective error, which is already the primary risk; drop eps")

    def certifies(self) -> dict[str, str]:
        """The primary risk, and the selective error when ``eps`` is set, each P(> level) <= delta."""
        return {self.risk: "pac", **({"selective_error": "pac"} if self.eps is not None else {})}

    def one_line(self) -> bool:
        """True when only the most lenient exit-as-1 line can matter (a risk blind to false alarms and
        no eps): every other line has the same or larger p-values and smaller coverage, so testing
        it would only spend delta. Then that one line gets all of delta."""
        return self.risk_def.blind_to_false_alarms and self.eps is None

    @property
    def risk_def(self) -> Risk:
        """The certified risk as an object (``policies.risks``)."""
        return get_risk(self.risk)

    def thresholds(self) -> np.ndarray:
        """The tested thresholds, strict to lenient: inf (never exit) first, then the grid descending."""
        lo = 0.5 if self.score == "p" else 0.0
        if self.grid is None:
            g = default_grid(lo)
        elif isinstance(self.grid, int):
            g = np.linspace(lo, 1.0, self.grid)
        else:
            g = np.asarray(self.grid, dtype=np.float64)
        return np.r_[math.inf, np.sort(g)[::-1]]

    def pair_table(self, s: np.ndarray, yhat: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Counts, risks and p-values for every (t0 index i, t1 index j) pair: arrays [n_t0, n_t1]."""
        t = self.thresholds()
        miss, ok0 = _exit_counts(s[yhat == 0], y[yhat == 0], t)  # exit as 0: y=1 is a miss
        hit, fa = _exit_counts(s[yhat == 1], y[yhat == 1], t)  # exit as 1: y=0 is a false alarm
        miss, ok0, hit, fa = miss[:, None], ok0[:, None], hit[None, :], fa[None, :]
        exits = miss + ok0 + hit + fa
        wrong = miss + fa
        # (y, pred) cells: exited counts per pair, and all certification rows
        exited = {(1, 0): miss, (0, 0): ok0, (1, 1): hit, (0, 1): fa}
        total = {(yc, pc): int(np.sum((y == yc) & (yhat == pc))) for yc, pc in exited}
        k_t, n_t = (np.broadcast_to(a, exits.shape) for a in self.risk_def.from_cells(exited, total))
        p = binomial_pvalue(k_t, n_t, self.alpha, self.pvalue)
        table = {"thresholds": t, "exits": exits, "trials": n_t, "events": k_t, "p_primary": p}
        if self.eps is not None:
            p_sel = binomial_pvalue(wrong, exits, self.eps, self.pvalue)
            table["p_selective"] = p_sel
            p = np.maximum(p, p_sel)
        table["wrong"] = wrong
        table["p"] = p
        return table

    def procedure(self) -> str:
        """The multiple-testing procedure in force (``auto`` resolved from the parameters)."""
        if self.multiple_testing != "auto":
            return self.multiple_testing
        return "fixed_sequence" if self.risk_def.monotone and self.eps is None else "fallback"

    def _valid(self, p: np.ndarray) -> tuple[np.ndarray, float]:
        """Rejected hypotheses (certified pairs) and the smallest per-test level, under FWER <= delta."""
        m0, lines = p.shape
        procedure = self.procedure()
        if procedure == "bonferroni":
            level = self.delta / p.size
            return p <= level, level
        if procedure == "holm":
            order = np.argsort(p, axis=None, kind="stable")
            ok = p.ravel()[order] <= self.delta / (p.size - np.arange(p.size))
            n_rej = p.size if ok.all() else int(np.argmin(ok))
            valid = np.zeros(p.size, dtype=bool)
            valid[order[:n_rej]] = True
            return valid.reshape(p.shape), self.delta / p.size
        budget = self.delta / lines  # Bonferroni across t1 lines
        if procedure == "fixed_sequence":
            return np.cumprod(p <= budget, axis=0).astype(bool), budget
        # fallback (Wiens 2003): half the line's budget on its first hypothesis, the rest spread evenly;
        # a rejected hypothesis passes its level on, a failure does not end the line
        w = np.full(m0, 0.5 * budget / max(m0 - 1, 1))
        w[0] = 0.5 * budget if m0 > 1 else budget
        valid = np.zeros_like(p, dtype=bool)
        carry = np.zeros(lines)
        for i in range(m0):
            level_i = w[i] + carry
            valid[i] = p[i] <= level_i
            carry = np.where(valid[i], level_i, 0.0)
        return valid, float(w.min())

    def _fit_thresholds(self, s: np.ndarray, yhat: np.ndarray, y: np.ndarray) -> None:
        if self.score == "select" and (s.min() < 0.0 or s.max() > 1.0) and self.grid is None:
            raise ConfigError(
                "ltt's default grid is on [0, 1]; this selector is outside it. Use "
                "select_calibrator='platt' or 'isotonic', or pass an explicit grid"
            )
        tab = self.pair_table(s, yhat, y)
        if self.one_line():
            valid = np.zeros(tab["p"].shape, dtype=bool)
            valid[:, -1:], level = self._valid(tab["p"][:, -1:])
            tested = tab["p"].shape[0]
        else:
            valid, level = self._valid(tab["p"])
            tested = tab["p"].size
        t = tab["thresholds"]
        n = len(y)
        with np.errstate(divide="ignore", invalid="ignore"):
            risk_hat = np.where(tab["trials"] > 0, tab["events"] / np.maximum(tab["trials"], 1), np.nan)
        self.summary = {
            "n_hypotheses": int(tested),
            "lines": "most lenient exit-as-1 line only" if self.one_line() else "all exit-as-1 lines",
            "n_valid": int(valid.sum()),
            "test_level": level,
            "multiple_testing": self.procedure(),
        }
        if valid.any():
            i, j = self._best(valid, tab["exits"], risk_hat)
            self.t0, self.t1 = float(t[i]), float(t[j])
            self.certified = True
            extra = (f" and P(selective error > {self.eps:g}) <= {self.delta:g}" if self.eps is not None
                     else "; false alarms (exits as 1 of y=0) are not bounded (set eps to bound them)"
                     if self.risk_def.blind_to_false_alarms else "")
            self.reason = (
                f"LTT ({self.procedure()}, {self.pvalue}): P({self.risk} > {self.alpha:g}) <= {self.delta:g}"
                f"{extra}; certified pair of maximum calibration coverage {tab['exits'][i, j] / n:.4f}"
            )
            self.summary.update(p_value=float(tab["p"][i, j]), calib_risk_hat=float(risk_hat[i, j]))
            return
        self.n_needed = self._n_needed(tab, risk_hat, level, y)
        if int(y.sum()) == 0:
            self.n_needed = self.min_positives(level)
            self.reason = (
                f"not certifiable: the certification part of val_calib has no positives (y=1), so {self.risk} "
                f"cannot be estimated; at least {self.n_needed} calibration positives are needed (more if the "
                "model errs on them); add labelled positives to val_calib; every image is deferred"
            )
        elif self.n_needed is None:
            self.reason = (
                f"not certifiable: the observed {self.risk} is >= alpha={self.alpha:g}"
                + (f" (or selective error >= eps={self.eps:g})" if self.eps is not None else "")
                + " at every threshold pair that exits anything, so more calibration data will not help; "
                "improve the model or relax alpha; every image is deferred"
            )
        else:
            self.reason = (
                f"not certifiable with {int(y.sum())} calibration positives at delta={self.delta:g}: at the "
                f"observed error rates about {self.n_needed} calibration positives are needed; "
                "every image is deferred"
            )

    def min_positives(self, level: float | None = None) -> int | None:
        """Positives needed to certify even at zero observed error: the binomial test at ``level``
        (default delta, the most lenient per-test level) passes on n error-free trials."""
        need = float(trials_needed(np.zeros(1), self.alpha, self.delta if level is None else level, self.pvalue)[0])
        return int(math.ceil(need)) if math.isfinite(need) else None

    @staticmethod
    def _best(valid: np.ndarray, exits: np.ndarray, risk_hat: np.ndarray) -> tuple[int, int]:
        """Max coverage; ties -> lower empirical risk, then stricter (earlier) thresholds."""
        ii, jj = np.nonzero(valid)
        r = np.nan_to_num(risk_hat[ii, jj], nan=0.0)
        order = np.lexsort((ii + jj, r, -exits[ii, jj]))
        return int(ii[order[0]]), int(jj[order[0]])

    def _n_needed(self, tab: dict[str, np.ndarray], risk_hat: np.ndarray, level: float, y: np.ndarray) -> int | None:
        """Calibration positives needed to certify some exiting pair at the observed rates (estimate)."""
        n, n_pos = len(y), int(y.sum())
        ok = tab["exits"] > 0
        if n_pos == 0 or not ok.any():
            return None
        # primary risk: trials scale with the positives (fnr_exit, miss_rate) or with n (selective_error)
        per_positive = self.risk_def.positives_only
        frac = tab["trials"] / (n_pos if per_positive else n)
        need = np.full(risk_hat.shape, np.inf)
        cand = ok & (frac > 0) & (np.nan_to_num(risk_hat, nan=1.0) < self.alpha)
        if self.eps is not None:
            sel_hat = tab["wrong"] / np.maximum(tab["exits"], 1)
            cand &= sel_hat < self.eps
        if not cand.any():
            return None
        trials = trials_needed(risk_hat[cand], self.alpha, level, self.pvalue)
        pos = trials / frac[cand]
        if not per_positive:
            pos = pos * n_pos / n
        if self.eps is not None:
            sel_frac = tab["exits"][cand] / n
            sel_trials = trials_needed(sel_hat[cand], self.eps, level, self.pvalue)
            pos = np.maximum(pos, sel_trials / sel_frac * n_pos / n)
        need[cand] = pos
        best = float(need.min())
        return int(math.ceil(best)) if math.isfinite(best) else None
