"""Learn-then-Test / SCRC-I style certified exit policy with two thresholds.

Hypotheses: for every pair (t0, t1) of a fixed grid (plus "never exit" = inf), H0: risk > alpha,
where the risk is ``fnr_exit`` (default), ``selective_error`` or ``miss_rate``; with ``eps`` also
H0': selective error > eps (the pair's p-value is the max of both, an intersection-union test).
Each risk is a ratio of counts, so its p-value is a binomial tail given the number of trials
(``policies.pvalues``); a pair with no trials (e.g. no exited positives) gets p = 1, i.e. it is
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
  every certified risk is monotone along the lines (fnr_exit or miss_rate, no eps), else ``holm``.
The certified pair of maximum calibration coverage is returned (ties: lower empirical risk, then
stricter thresholds), so P(risk > alpha) <= delta over the draw of the certification data.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from stage1.policies import POLICIES
from stage1.policies.base import ExitPolicy
from stage1.policies.pvalues import PVALUES, binomial_pvalue, trials_needed

RISKS = ("fnr_exit", "selective_error", "miss_rate")
MULTIPLE_TESTING = ("auto", "fixed_sequence", "fallback", "holm", "bonferroni")
MONOTONE_RISKS = ("fnr_exit", "miss_rate")  # non-decreasing in expectation as t0 loosens


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

    def __init__(
        self,
        alpha: float = 0.02,
        delta: float = 0.1,
        risk: str = "fnr_exit",
        eps: float | None = None,
        pvalue: str = "clopper_pearson",
        multiple_testing: str = "auto",
        grid: list[float] | int | None = None,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if risk not in RISKS:
            raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
        if eps is not None and not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1) or None, got {eps}")
        if eps is not None and risk == "selective_error":
            raise ValueError("eps bounds the selective error, which is already the primary risk; drop eps")
        if pvalue not in PVALUES:
            raise ValueError(f"pvalue must be one of {PVALUES}, got {pvalue!r}")
        if multiple_testing not in MULTIPLE_TESTING:
            raise ValueError(f"multiple_testing must be one of {MULTIPLE_TESTING}, got {multiple_testing!r}")
        if isinstance(grid, bool) or (isinstance(grid, int) and grid < 2):
            raise ValueError(f"grid must be an int >= 2, a list of thresholds or None, got {grid!r}")
        if grid is not None and not isinstance(grid, int):
            g = np.asarray(grid, dtype=np.float64)
            if g.ndim != 1 or len(g) == 0 or not np.all(np.isfinite(g)):
                raise ValueError("grid must be a non-empty list of finite thresholds")
            grid = [float(v) for v in np.unique(g)]
        self.alpha, self.delta, self.risk, self.eps = float(alpha), float(delta), risk, eps
        self.pvalue, self.multiple_testing, self.grid = pvalue, multiple_testing, grid

    def _own_params(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha, "delta": self.delta, "risk": self.risk, "eps": self.eps,
            "pvalue": self.pvalue, "multiple_testing": self.multiple_testing, "grid": self.grid,
        }

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
        n_pos = int(y.sum())
        trials = {
            "fnr_exit": (miss + hit, miss + 0 * hit),
            "selective_error": (exits, wrong),
            "miss_rate": (np.full(exits.shape, n_pos), miss + 0 * hit),
        }
        n_t, k_t = trials[self.risk]
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
        return "fixed_sequence" if self.risk in MONOTONE_RISKS and self.eps is None else "holm"

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
            raise ValueError(
                "ltt's default grid is on [0, 1]; this selector is outside it. Use "
                "select_calibrator='platt' or 'isotonic', or pass an explicit grid"
            )
        tab = self.pair_table(s, yhat, y)
        valid, level = self._valid(tab["p"])
        t = tab["thresholds"]
        n = len(y)
        with np.errstate(divide="ignore", invalid="ignore"):
            risk_hat = np.where(tab["trials"] > 0, tab["events"] / np.maximum(tab["trials"], 1), np.nan)
        self.summary = {
            "n_hypotheses": int(tab["p"].size),
            "n_valid": int(valid.sum()),
            "test_level": level,
            "multiple_testing": self.procedure(),
        }
        if valid.any():
            i, j = self._best(valid, tab["exits"], risk_hat)
            self.t0, self.t1 = float(t[i]), float(t[j])
            self.certified = True
            extra = f" and P(selective error > {self.eps:g}) <= {self.delta:g}" if self.eps is not None else ""
            self.reason = (
                f"LTT ({self.procedure()}, {self.pvalue}): P({self.risk} > {self.alpha:g}) <= {self.delta:g}"
                f"{extra}; certified pair of maximum calibration coverage {tab['exits'][i, j] / n:.4f}"
            )
            self.summary.update(p_value=float(tab["p"][i, j]), calib_risk_hat=float(risk_hat[i, j]))
            return
        self.n_needed = self._n_needed(tab, risk_hat, level, y)
        if self.n_needed is None:
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
        frac = tab["trials"] / (n_pos if self.risk != "selective_error" else n)
        need = np.full(risk_hat.shape, np.inf)
        cand = ok & (frac > 0) & (np.nan_to_num(risk_hat, nan=1.0) < self.alpha)
        if self.eps is not None:
            sel_hat = tab["wrong"] / np.maximum(tab["exits"], 1)
            cand &= sel_hat < self.eps
        if not cand.any():
            return None
        trials = trials_needed(risk_hat[cand], self.alpha, level, self.pvalue)
        pos = trials / frac[cand]
        if self.risk == "selective_error":
            pos = pos * n_pos / n
        if self.eps is not None:
            sel_frac = tab["exits"][cand] / n
            sel_trials = trials_needed(sel_hat[cand], self.eps, level, self.pvalue)
            pos = np.maximum(pos, sel_trials / sel_frac * n_pos / n)
        need[cand] = pos
        best = float(need.min())
        return int(math.ceil(best)) if math.isfinite(best) else None
