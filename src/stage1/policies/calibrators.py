"""Post-hoc calibrators on logits (numpy / scipy only), registered by name in ``CALIBRATORS``.

Every calibrator maps logits ``x`` [n, k] to probabilities [n, k]. What a 1-D input ``x`` [n] means:

- ``platt``: a **score in [0, 1]** (a gate / selector probability, the exit policies' ``select``). It
  is fitted on the score's logit ``log(s / (1 - s))`` (s clipped to [1e-12, 1 - 1e-12]) with Platt's
  target smoothing, exactly scikit-learn's sigmoid calibration of that logit. Logits go in as two
  columns (``as_logits(z)`` for a class-1 logit z); a 1-D input outside [0, 1] is a DataError.
- every other calibrator: the class-1 logit of the pair ``[0, x]`` (a binary margin; the golden
  tests feed temperature and beta that way). ``isotonic`` then fits on a gate score itself, as
  scikit-learn's isotonic calibration of predict_proba does (a monotone map, so the scale matters
  only between knots). temperature / beta / dirichlet / matrix would read a gate probability as
  a logit: calibrate a gate score with platt or isotonic.

Parametric calibrators are fitted by L-BFGS (scipy) on the mean NLL with analytic gradients.

- ``identity``: softmax of the logits, nothing fitted.
- ``temperature``: softmax(x / T), one parameter (Guo et al. 2017).
- ``platt``: binary, sigmoid(a * f + b) (Platt 1999). On 2-column logits f = x1 - x0 and the fit is
  maximum likelihood (= unpenalised logistic regression of y on the margin); on a 1-D score f is
  its logit and the targets are Platt's (N+ + 1) / (N+ + 2) and 1 / (N- + 2).
- ``isotonic``: binary, monotone non-decreasing map of the margin (PAV), linear interpolation
  between fitted points and clipping outside them (as scikit-learn's IsotonicRegression).
- ``dirichlet``: softmax(W log softmax(x) + b) with ODIR (Kull et al. 2019).
- ``beta``: binary Dirichlet calibration; on two classes it is exactly beta calibration
  sigmoid(a ln p1 - b ln p0 + c) (Kull et al. 2017); ODIR off by default (netcal's fit).
- ``matrix``: softmax(W x + b) with ODIR.

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

Each calibrator declares its parameters once (``PARAMS``, a ``stage1._core.params.Params`` table);
the constructor validates given values against it and ``params()`` returns them.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression, minimize
from scipy.special import expit, log_softmax, softmax

from stage1._core.errors import DataError
from stage1._core.params import Param, Params
from stage1._core.registry import Registry

CALIBRATORS: Registry = Registry("calibrator")

__all__ = ["CALIBRATORS", "Calibrator", "as_logits", "calibrator_from_dict", "platt_targets", "score_logit"]


def as_logits(x: np.ndarray) -> np.ndarray:
    """[n, k] logits as float64; a 1-D score becomes the pair [0, x] (x = class-1 logit)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = np.stack([np.zeros_like(a), a], axis=1)
    if a.ndim != 2 or a.shape[1] < 2:
        raise DataError(f"calibrator input must be logits [n, k>=2] or a score [n]; got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise DataError("calibrator input contains NaN or infinite values")
    return a


#: a score in [0, 1] is clipped to [SCORE_EPS, 1 - SCORE_EPS] before its logit: finite (|logit| <=
#: 27.6) and still one-to-one on float32 scores (their spacing near 1 is 6e-8), so no ties appear.
SCORE_EPS = 1e-12


def score_logit(s: np.ndarray, who: str = "platt") -> np.ndarray:
    """``log(s / (1 - s))`` of a 1-D score in [0, 1], s clipped to [SCORE_EPS, 1 - SCORE_EPS].

    A DataError names ``who`` when the score is not 1-D, not finite or outside [0, 1] (then it is
    not a probability: logits go in as two columns, e.g. ``as_logits(z)`` for a class-1 logit z).
    """
    a = np.asarray(s, dtype=np.float64)
    if a.ndim != 1:
        raise DataError(f"{who}: a score must be 1-D [n]; got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{who}: the score contains NaN or infinite values")
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise DataError(
            f"{who}: a 1-D input is a score in [0, 1] (a gate / selector probability); got values in "
            f"[{a.min():.4g}, {a.max():.4g}]. Pass logits as two columns [n, 2] (as_logits(z) for a class-1 logit z)"
        )
    c = np.clip(a, SCORE_EPS, 1.0 - SCORE_EPS)
    return np.log(c) - np.log1p(-c)


def platt_targets(y: np.ndarray) -> np.ndarray:
    """Platt's smoothed targets: (N+ + 1) / (N+ + 2) for y = 1 and 1 / (N- + 2) for y = 0.

    They are the posterior mean of each class's label under a uniform prior (Platt 1999, Sec. 2.2),
    and keep the sigmoid's slope finite on small or separable samples (scikit-learn uses the same).
    """
    yy = np.asarray(y)
    n_pos = float(np.sum(yy == 1))
    n_neg = float(len(yy) - n_pos)
    return np.where(yy == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))


def _targets(y: np.ndarray, n: int, k: int) -> np.ndarray:
    yy = np.asarray(y)
    if yy.ndim != 1 or len(yy) != n:
        raise DataError(f"y must be 1-D with {n} labels, got shape {yy.shape}")
    if not np.isin(yy, np.arange(k)).all():
        raise DataError(f"y must hold class indices 0..{k - 1}")
    if len(yy) == 0:
        raise DataError("cannot fit a calibrator on zero samples")
    return yy.astype(np.int64)


def _nll_and_grad_z(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of softmax(z) and its gradient w.r.t. z."""
    lp = log_softmax(z, axis=1)
    n = len(y)
    loss = -float(np.mean(lp[np.arange(n), y]))
    g = np.exp(lp)
    g[np.arange(n), y] -= 1.0
    return loss, g / n


_BLAS: Any = None


def _one_blas_thread():
    """Context that pins BLAS to one thread: these fits have 1-12 parameters, and a multi-threaded
    BLAS inside L-BFGS-B spins on a loaded CPU (measured 7x slower here). No-op without threadpoolctl."""
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
            _BLAS = False
    return _BLAS.limit(limits=1, user_api="blas") if _BLAS else contextlib.nullcontext()


def _lbfgs(fun, x0: np.ndarray, max_iter: int) -> np.ndarray:
    with _one_blas_thread():
        res = minimize(fun, x0, jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "gtol": 1e-10, "ftol": 1e-14})
    if not np.all(np.isfinite(res.x)):
        raise RuntimeError(f"calibrator fit diverged: {res.message}")
    return res.x


MAX_ITER_HELP = "L-BFGS iterations at most."


class Calibrator:
    """Base class: ``fit(x, y) -> self``, ``predict_proba(x) -> [n, k]``, ``p1(x)``, JSON state.

    Subclasses declare ``PARAMS``; ``__init__(**params)`` checks given values against it (a
    ConfigError naming the parameter and its valid range) and keeps them in ``self._params``.
    """

    name = "base"
    #: the declared parameters (name, type, default, range, help).
    PARAMS: Params = Params()

    def __init__(self, **params: Any) -> None:
        self._params = type(self).PARAMS.resolve(params, f"calibrator {self.name!r}")
        self.fitted = False

    # subclass hooks -------------------------------------------------------------------------
    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _proba(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-able); ``CALIBRATORS.create(name, **params())`` rebuilds it."""
        return dict(self._params)

    def state(self) -> dict[str, Any]:
        """Fitted state (JSON-able)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the fitted state written by ``state``."""

    # public API -----------------------------------------------------------------------------
    def fit(self, x: np.ndarray, y: np.ndarray) -> "Calibrator":
        """Fit on logits / scores ``x`` and class labels ``y``; returns self."""
        xx = as_logits(x)
        self._k = xx.shape[1]
        self._fit(xx, _targets(y, len(xx), xx.shape[1]))
        self.fitted = True
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [n, k]."""
        if not self.fitted:
            raise RuntimeError(f"calibrator {self.name!r} is not fitted; call fit(x, y) first")
        return self._proba(as_logits(x))

    def p1(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probability of class 1 (binary input)."""
        return self.predict_proba(x)[:, 1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able {name, params, state}; ``calibrator_from_dict`` inverts it exactly."""
        if not self.fitted:
            raise RuntimeError(f"calibrator {self.name!r} is not fitted; nothing to save")
        return {"name": self.name, "params": self.params(), "state": self.state()}


def calibrator_from_dict(d: dict[str, Any]) -> Calibrator:
    """Rebuild a fitted calibrator from ``Calibrator.to_dict()`` output."""
    try:
        cal = CALIBRATORS.create(d["name"], **d.get("params", {}))
        cal.load_state(d["state"])
    except KeyError as exc:
        raise DataError(f"calibrator JSON is missing {exc}; expected keys name, params, state") from None
    cal.fitted = True
    return cal


def _require_binary(x: np.ndarray, name: str) -> None:
    if x.shape[1] != 2:
        raise DataError(f"{name} calibration is binary; got {x.shape[1]} classes (use dirichlet or matrix)")


@CALIBRATORS.register("identity")
class Identity(Calibrator):
    """Plain softmax; nothing is learned (the seeds' raw probabilities)."""

    name = "identity"

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        pass

    def _proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(x, axis=1)


@CALIBRATORS.register("temperature")
class Temperature(Calibrator):
    """softmax(x / T); log T fitted by L-BFGS (same optimum as scikit-learn's method='temperature')."""

    name = "temperature"
    PARAMS = Params(Param("max_iter", int, 200, MAX_ITER_HELP, low=1))

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.max_iter = self._params["max_iter"]
        self.temperature = 1.0

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
            z = x * np.exp(-theta[0])
            loss, gz = _nll_and_grad_z(z, y)
            return loss, np.array([-np.sum(gz * z)])

        theta = _lbfgs(fun, np.zeros(1), self.max_iter)
        self.temperature = float(np.exp(np.clip(theta[0], -30.0, 30.0)))

    def _proba(self, x: np.ndarray) -> np.ndarray:
        return softmax(x / self.temperature, axis=1)

    def state(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def load_state(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])


#: what a fitted Platt calibrator was given (its state's ``input``).
PLATT_INPUTS = ("score", "logits")


@CALIBRATORS.register("platt")
class Platt(Calibrator):
    """Binary logistic calibration sigmoid(a * f + b); two inputs, each fitted as suits it.

    - 2-column logits [n, 2]: f = x1 - x0 (already log-odds), maximum likelihood; the same optimum
      as an unpenalised logistic regression of y on the margin.
    - a 1-D score s in [0, 1] (a gate / selector probability): f = logit(s), targets smoothed as
      Platt's (``platt_targets``); the same fit as scikit-learn's sigmoid calibration of logit(s)
      (``sklearn.calibration._sigmoid_calibration``, whose (A, B) are (-a, -b)). Fitting on the
      logit lets the sigmoid reproduce the identity map of a calibrated score (a = 1, b = 0), which a
      sigmoid of the probability itself cannot; the smoothing keeps a small or separable sample
      (tens of rows of a gate's fit part) from driving the slope to infinity.

    The state records which input was fitted (``input``: "score" or "logits"); ``predict_proba``
    wants the same kind. A state without it (written before this distinction) reads a 1-D input as
    the class-1 logit, as it was fitted.
    """

    name = "platt"
    PARAMS = Params(Param("max_iter", int, 200, MAX_ITER_HELP, low=1))

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.max_iter = self._params["max_iter"]
        self.a, self.b = 1.0, 0.0
        self.input: str | None = None

    def _as_input(self, x: np.ndarray, kind: str | None) -> np.ndarray:
        """``x`` as [n, 2] logits for ``kind`` ("score": [0, logit(s)]; "logits" / None: as given)."""
        a = np.asarray(x, dtype=np.float64)
        if kind == "score":
            if a.ndim != 1:
                raise DataError(f"platt was fitted on a 1-D score in [0, 1]; got logits of shape {a.shape}")
            return as_logits(score_logit(a, "platt"))
        if kind == "logits" and a.ndim == 1:
            raise DataError("platt was fitted on 2-column logits [n, 2]; got a 1-D score (pass the logits)")
        return a

    def fit(self, x: np.ndarray, y: np.ndarray) -> "Platt":
        """Fit on 2-column logits or on a 1-D score in [0, 1] (see the class docstring); returns self."""
        kind = "score" if np.ndim(x) == 1 else "logits"
        xx = self._as_input(x, kind)
        before, self.input = self.input, kind  # _fit reads it (the targets depend on the input)
        try:
            super().fit(xx, y)
        except Exception:
            self.input = before
            raise
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [n, 2] of the same kind of input as the fit."""
        if not self.fitted:
            raise RuntimeError(f"calibrator {self.name!r} is not fitted; call fit(x, y) first")
        return super().predict_proba(self._as_input(x, self.input))

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        _require_binary(x, "platt")
        m = x[:, 1] - x[:, 0]
        t = platt_targets(y) if self.input == "score" else y.astype(np.float64)

        def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
            z = w[0] * m + w[1]
            # mean binary cross-entropy with (soft) targets t: log(1 + e^z) - t z
            loss = float(np.mean(np.logaddexp(0.0, z) - t * z))
            g = (expit(z) - t) / len(z)
            return loss, np.array([np.sum(g * m), np.sum(g)])

        self.a, self.b = (float(v) for v in _lbfgs(fun, np.array([1.0, 0.0]), self.max_iter))

    def _proba(self, x: np.ndarray) -> np.ndarray:
        _require_binary(x, "platt")
        z = self.a * (x[:, 1] - x[:, 0]) + self.b
        return softmax(np.stack([np.zeros_like(z), z], axis=1), axis=1)

    def state(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "input": self.input}

    def load_state(self, state: dict[str, Any]) -> None:
        self.a, self.b = float(state["a"]), float(state["b"])
        kind = state.get("input")
        if kind is not None and kind not in PLATT_INPUTS:
            raise DataError(f"platt state: input must be one of {', '.join(PLATT_INPUTS)}, got {kind!r}")
        self.input = kind


@CALIBRATORS.register("isotonic")
class Isotonic(Calibrator):
    """Binary isotonic regression of y on the margin x1 - x0 (PAV; ties in x averaged)."""

    name = "isotonic"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.x_knots = np.zeros(0)
        self.y_knots = np.zeros(0)

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        _require_binary(x, "isotonic")
        m = x[:, 1] - x[:, 0]
        ux, inv, counts = np.unique(m, return_inverse=True, return_counts=True)
        ymean = np.bincount(inv, weights=y.astype(np.float64)) / counts
        fitted = isotonic_regression(ymean, weights=counts.astype(np.float64), increasing=True).x
        keep = np.r_[True, fitted[1:] != fitted[:-1]] | np.r_[fitted[:-1] != fitted[1:], True]
        self.x_knots, self.y_knots = ux[keep], np.clip(fitted[keep], 0.0, 1.0)

    def _proba(self, x: np.ndarray) -> np.ndarray:
        _require_binary(x, "isotonic")
        p = np.interp(x[:, 1] - x[:, 0], self.x_knots, self.y_knots)
        return np.stack([1.0 - p, p], axis=1)

    def state(self) -> dict[str, Any]:
        return {"x": self.x_knots.tolist(), "y": self.y_knots.tolist()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.x_knots = np.asarray(state["x"], dtype=np.float64)
        self.y_knots = np.asarray(state["y"], dtype=np.float64)


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
        self.W = np.asarray(state["W"], dtype=np.float64)
        self.b = np.asarray(state["b"], dtype=np.float64)
        # states written before lam / mu were recorded keep the declared values (numbers then)
        if state.get("lam") is not None:
            self.lam = float(state["lam"])
        if state.get("mu") is not None:
            self.mu = float(state["mu"])
        self.cv = state.get("cv")


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
