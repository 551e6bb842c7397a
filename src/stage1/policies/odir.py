"""The ODIR family of calibrators: dirichlet, beta and matrix scaling (Kull et al. 2019), registered
in ``CALIBRATORS`` on import (``policies.calibrators`` imports this module).

ODIR penalty (added to the mean NLL; Kull et al. 2019, Sec. 3, and ``reg_norm=True`` of their
``dirichletcal`` package): ``lam / (k (k-1)) * sum_{i != j} W_ij^2 + mu / k * sum_j b_j^2``; the
diagonal of W is not penalised. ``dirichlet`` and ``matrix`` choose lam and mu by default
(``lam="cv"``) as the paper does: K-fold cross-validation (stratified, deterministic; K = 5 as in the
paper's neural-network experiments) over a small grid, scored by held-out log-loss, then a refit on
all the rows given to ``fit``; the grid is the paper's ODIR grid {1e-7, 1e-5, 1e-3, 1e-1, 1e1, 1e3}
with 1e-7 replaced by 0 (no penalty). The choice, the grid and every grid point's score are kept in
the fitted state (policy.json shows them). With two classes lam cannot change the predictions (the
off-diagonal of W is redundant with its diagonal, softmax being shift-invariant), so only mu is
searched. Too few rows of some class for the folds: lam = mu = ``cv_fallback``, and the state says why.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import log_softmax, softmax

from stage1._core.errors import DataError
from stage1._core.params import Param, Params
from stage1.policies.calibrators import (CALIBRATORS, Calibrator, MAX_ITER_HELP, _lbfgs, _nll_and_grad_z,
                                         _require_binary, state_array, state_number)

#: the values cross-validation tries for lam and for mu: the ODIR grid of Kull et al. (2019)'s
#: non-neural experiments (``l2_odir`` with ``reg_norm=True`` in dirichletcal/experiments_neurips),
#: {1e-7, 1e-5, 1e-3, 1e-1, 1e1, 1e3}, with 1e-7 replaced by 0 so "no penalty" can win.
ODIR_CV_GRID = (0.0, 1e-5, 1e-3, 1e-1, 10.0, 1000.0)
#: seed of the stratified fold assignment (fixed: the same rows always give the same choice).
ODIR_CV_SEED = 0
#: what cross-validation minimises (recorded in the state).
ODIR_CV_SCORE = "mean over folds of the held-out log-loss"
CV = "cv"
_ODIR_NOTE = "the ODIR penalties lam and mu must be >= 0, or 'cv' (chosen by cross-validation)"


def _number_or_cv(v: Any) -> Any:
    """Param check: a number passes; the only accepted text is 'cv'."""
    if isinstance(v, str) and v.strip().lower() != CV:
        raise ValueError("a number >= 0 or 'cv'")
    return CV if isinstance(v, str) else v


def _grid(v: list) -> list[float]:
    """Param check of ``cv_grid``: 1-20 finite numbers >= 0, sorted, no repeats."""
    try:
        vals = sorted({float(x) for x in v if not isinstance(x, bool)})
    except (TypeError, ValueError):
        raise ValueError("a list of 1-20 numbers >= 0") from None
    if len(vals) != len(v) or not 1 <= len(vals) <= 20 or not all(np.isfinite(vals)) or vals[0] < 0:
        raise ValueError("a list of 1-20 distinct finite numbers >= 0")
    return vals


def stratified_folds(y: np.ndarray, k: int, folds: int, seed: int = ODIR_CV_SEED) -> np.ndarray:
    """Fold index [n] in 0..folds-1: each class's rows shuffled (seeded) and dealt round-robin,
    continuing the deal across classes so the folds' sizes differ by at most one."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    start = 0
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (start + np.arange(len(idx))) % folds
        start += len(idx)
    return fold


class _LinearODIR(Calibrator):
    """softmax(W f(x) + b) with the ODIR penalty; f is log-softmax (Dirichlet) or identity (matrix).

    ``lam`` / ``mu`` are numbers (0 = unregularised) or "cv": the value is chosen by stratified
    ``cv_folds``-fold cross-validation on the rows given to ``fit`` (the lowest mean held-out
    log-loss over ``cv_grid``, first in grid order on a tie), then the model is refitted on all of
    them. ``mu=None`` follows ``lam`` (both "cv": each searched on the grid, all pairs). After
    ``fit``, ``lam`` / ``mu`` attributes hold the values used and ``cv`` what the search did.
    """

    PARAMS = Params(
        Param("lam", float, CV, "ODIR penalty on the off-diagonal of W; 'cv': chosen by cross-validation.",
              low=0.0, also=(str,), check=_number_or_cv, note=_ODIR_NOTE),
        Param("mu", float, None, "ODIR penalty on the bias b; 'cv': chosen by cross-validation "
              "(None: the same as lam; with lam='cv', searched on the grid too).",
              low=0.0, optional=True, also=(str,), check=_number_or_cv, note=_ODIR_NOTE),
        Param("cv_grid", list, list(ODIR_CV_GRID), "Values of lam and of mu that cross-validation tries "
              "(Kull et al. 2019's ODIR grid, 1e-7 replaced by 0).", check=_grid),
        Param("cv_folds", int, 5, "Folds of the cross-validation (stratified, seeded).", low=2, high=20),
        Param("cv_fallback", float, 0.1, "lam and mu used when some class has fewer rows than cv_folds "
              "(too few for cross-validation).", low=0.0),
        Param("max_iter", int, 500, MAX_ITER_HELP, low=1),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self._params
        self.lam_spec: float | str = p["lam"]
        self.mu_spec: float | str = p["lam"] if p["mu"] is None else p["mu"]
        self.lam: float | None = None if self.lam_spec == CV else float(self.lam_spec)
        self.mu: float | None = None if self.mu_spec == CV else float(self.mu_spec)
        self.cv: dict[str, Any] | None = None
        self.max_iter = p["max_iter"]
        self.W = np.eye(2)
        self.b = np.zeros(2)

    def _features(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def penalty(self, W: np.ndarray, b: np.ndarray, lam: float | None = None,
                mu: float | None = None) -> tuple[float, np.ndarray, np.ndarray]:
        """ODIR value and gradients: lam/(k(k-1)) sum_{i!=j} W_ij^2 + mu/k sum b_j^2 (default: the
        calibrator's own lam / mu, known once given as numbers or chosen by ``fit``)."""
        lam = self.lam if lam is None else lam
        mu = self.mu if mu is None else mu
        if lam is None or mu is None:
            raise RuntimeError(f"{self.name}: lam / mu are chosen by cross-validation in fit(); fit first")
        k = W.shape[0]
        off = W * (1.0 - np.eye(k))
        cw = lam / (k * (k - 1))
        cb = mu / k
        return cw * float(np.sum(off**2)) + cb * float(np.sum(b**2)), 2 * cw * off, 2 * cb * b

    def _fit_penalised(self, f: np.ndarray, y: np.ndarray, lam: float, mu: float) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) minimising the mean NLL of softmax(f W^T + b) plus ODIR(lam, mu), from (I, 0)."""
        k = f.shape[1]

        def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
            W, b = w[: k * k].reshape(k, k), w[k * k:]
            loss, gz = _nll_and_grad_z(f @ W.T + b, y)
            pen, gW_pen, gb_pen = self.penalty(W, b, lam, mu)
            gW = gz.T @ f + gW_pen
            gb = gz.sum(axis=0) + gb_pen
            return loss + pen, np.r_[gW.ravel(), gb]

        w = _lbfgs(fun, np.r_[np.eye(k).ravel(), np.zeros(k)], self.max_iter)
        return w[: k * k].reshape(k, k), w[k * k:]

    def _cross_validate(self, f: np.ndarray, y: np.ndarray) -> tuple[float, float, dict[str, Any]]:
        """(lam, mu, record): the grid point of lowest mean held-out log-loss, or the fallback."""
        k = f.shape[1]
        grid = [float(v) for v in self._params["cv_grid"]]
        folds = int(self._params["cv_folds"])
        lam_free = self.lam_spec == CV and k == 2  # two classes: lam cannot change predictions
        lam_grid = [0.0] if lam_free else grid if self.lam_spec == CV else [float(self.lam_spec)]
        mu_grid = grid if self.mu_spec == CV else [float(self.mu_spec)]
        record: dict[str, Any] = {"score": ODIR_CV_SCORE, "folds": folds, "seed": ODIR_CV_SEED,
                                  "stratified": True, "grid_lam": lam_grid, "grid_mu": mu_grid}
        if lam_free:
            record["lam_note"] = ("two classes: the off-diagonal of W is redundant with its diagonal "
                                  "(softmax is shift-invariant), so lam does not change predictions; fixed at 0")
        counts = np.bincount(y, minlength=k)
        if counts.min() < folds:
            fb = float(self._params["cv_fallback"])
            lam = fb if self.lam_spec == CV and not lam_free else lam_grid[0]
            mu = fb if self.mu_spec == CV else mu_grid[0]
            c = int(np.argmin(counts))
            record.update(fallback=True, reason=(
                f"class {c} has {int(counts[c])} of {len(y)} rows, fewer than cv_folds={folds}: too few to "
                f"cross-validate; used cv_fallback={fb:g}"))
            return lam, mu, record
        fold = stratified_folds(y, k, folds)
        table: list[list[float | None]] = []
        best = (math.inf, 0.0, 0.0)
        for lam in lam_grid:
            for mu in mu_grid:
                losses = []
                for j in range(folds):
                    tr, te = fold != j, fold == j
                    W, b = self._fit_penalised(f[tr], y[tr], lam, mu)
                    lp = log_softmax(f[te] @ W.T + b, axis=1)
                    losses.append(-float(np.mean(lp[np.arange(int(te.sum())), y[te]])))
                score = float(np.mean(losses))
                finite = math.isfinite(score)
                table.append([lam, mu, score if finite else None])
                if finite and score < best[0]:
                    best = (score, lam, mu)
        if not math.isfinite(best[0]):
            raise RuntimeError(f"{self.name}: no grid point gave a finite held-out log-loss")
        record.update(fallback=False, losses=table, best_score=best[0])
        return best[1], best[2], record

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        f = self._features(x)
        if CV in (self.lam_spec, self.mu_spec):
            lam, mu, self.cv = self._cross_validate(f, y)
        else:
            lam, mu, self.cv = float(self.lam_spec), float(self.mu_spec), None
        self.lam, self.mu = lam, mu
        self.W, self.b = self._fit_penalised(f, y, lam, mu)

    def _proba(self, x: np.ndarray) -> np.ndarray:
        f = self._features(x)
        if f.shape[1] != self.W.shape[0]:
            raise DataError(f"{self.name} was fitted on {self.W.shape[0]} classes, got {f.shape[1]}")
        return softmax(f @ self.W.T + self.b, axis=1)

    def state(self) -> dict[str, Any]:
        return {"W": self.W.tolist(), "b": self.b.tolist(), "lam": self.lam, "mu": self.mu, "cv": self.cv}

    def load_state(self, state: dict[str, Any]) -> None:
        W, b = state_array(state, "W", self.name, 2), state_array(state, "b", self.name, 1)
        k = W.shape[0]
        if k < 2 or W.shape != (k, k) or b.shape != (k,) or (self.name == "beta" and k != 2):
            raise DataError(f"calibrator {self.name!r} state: W must be [k, k] and b [k] with k >= 2 "
                            f"(2 for beta), got {W.shape} and {b.shape}; re-run calibrate to regenerate policy.json")
        self.W, self.b = W, b
        # states written before lam / mu were recorded keep the declared values (numbers then)
        lam = state_number(state, "lam", self.name, low=0.0, optional=True)
        mu = state_number(state, "mu", self.name, low=0.0, optional=True)
        if lam is not None:
            self.lam = lam
        if mu is not None:
            self.mu = mu
        cv = state.get("cv")
        if cv is not None and not isinstance(cv, dict):
            raise DataError(f"calibrator {self.name!r} state: cv must be an object or null; "
                            "re-run calibrate to regenerate policy.json")
        self.cv = cv


@CALIBRATORS.register("dirichlet")
class Dirichlet(_LinearODIR):
    """Dirichlet calibration: softmax(W log softmax(x) + b), ODIR-regularised (lam, mu by CV)."""

    name = "dirichlet"

    def _features(self, x: np.ndarray) -> np.ndarray:
        return log_softmax(x, axis=1)


@CALIBRATORS.register("beta")
class Beta(Dirichlet):
    """Beta calibration = 2-class Dirichlet calibration; unregularised by default (lam = 0, as
    netcal's and Kull et al. 2017's fit), so it stays the classic maximum-likelihood beta fit; pass
    ``lam="cv"`` to cross-validate the intercept's penalty mu as ``dirichlet`` does."""

    name = "beta"
    PARAMS = _LinearODIR.PARAMS.with_defaults(lam=0.0)

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        _require_binary(x, "beta")
        super()._fit(x, y)

    def coefficients(self) -> tuple[float, float, float]:
        """(a, b, c) of sigmoid(a ln p1 - b ln p0 + c), the classic beta-calibration form."""
        d = self.W[1] - self.W[0]
        return float(d[1]), float(-d[0]), float(self.b[1] - self.b[0])


@CALIBRATORS.register("matrix")
class Matrix(_LinearODIR):
    """Matrix scaling: softmax(W x + b), ODIR-regularised (lam, mu by CV)."""

    name = "matrix"

    def _features(self, x: np.ndarray) -> np.ndarray:
        return x
