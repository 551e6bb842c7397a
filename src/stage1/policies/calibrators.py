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

ODIR (dirichlet, beta, matrix) lives in ``policies.odir``: the penalty and its cross-validation.

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

from stage1._core.errors import ConfigError, DataError
from stage1._core.params import Param, Params
from stage1._core.registry import Registry

CALIBRATORS: Registry = Registry("calibrator")

__all__ = ["CALIBRATORS", "Calibrator", "as_logits", "calibrator_from_dict", "platt_targets", "score_logit",
           "shift_prior", "state_number", "state_array"]

_REFIT = "re-run calibrate to regenerate policy.json"


def state_number(state: dict[str, Any], key: str, who: str, *, low: float | None = None,
                 low_open: bool = False, optional: bool = False) -> float | None:
    """``state[key]`` as a finite float (> / >= ``low``), checked at load: a DataError naming the
    calibrator, the key and the fix. Booleans and strings are refused (JSON ``true`` is not 1.0)."""
    v = state.get(key)
    if v is None and optional:
        return None
    bad = (v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)
           or (low is not None and (v < low or (low_open and v == low))))
    if bad:
        rng = "" if low is None else f" {'>' if low_open else '>='} {low:g}"
        raise DataError(f"calibrator {who!r} state: {key}={v!r}: expected a finite number{rng}; {_REFIT}")
    return float(v)


def state_array(state: dict[str, Any], key: str, who: str, ndim: int) -> np.ndarray:
    """``state[key]`` as a finite float64 array of ``ndim`` dimensions, checked at load (DataError)."""
    v = state.get(key)
    try:
        if not isinstance(v, list):
            raise ValueError
        a = np.asarray(v, dtype=np.float64)
        if any(isinstance(x, bool) for x in np.asarray(v, dtype=object).ravel()):
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"calibrator {who!r} state: {key} must be a {ndim}-D list of numbers; {_REFIT}") from None
    if a.ndim != ndim or not np.all(np.isfinite(a)):
        raise DataError(f"calibrator {who!r} state: {key} must be a {ndim}-D list of finite numbers, "
                        f"got shape {a.shape}; {_REFIT}")
    return a


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


def shift_prior(p: np.ndarray, from_prior: float, to_prior: float) -> np.ndarray:
    """Bayes correction of P(y=1) calibrated at positive rate ``from_prior`` to rate ``to_prior``.

    The class-conditional score distributions stay; only the classes' shares change, so the odds
    scale by the ratio of prior odds: odds' = odds * (pi / (1 - pi)) / (pi_c / (1 - pi_c)). Done on
    the logit (p = 0 and p = 1 stay where they are); both priors must be in (0, 1).
    """
    for name, v in (("from_prior", from_prior), ("to_prior", to_prior)):
        if not 0.0 < v < 1.0:
            raise DataError(f"shift_prior: {name}={v}: expected a positive rate in (0, 1)")
    a = np.asarray(p, dtype=np.float64)
    shift = math.log(to_prior / (1.0 - to_prior)) - math.log(from_prior / (1.0 - from_prior))
    with np.errstate(divide="ignore"):
        z = np.log(a) - np.log1p(-a)
    return expit(z + shift)


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
    """Rebuild a fitted calibrator from ``Calibrator.to_dict()`` output.

    Everything is validated here, at load: the name (a registered calibrator), the parameters
    (through the calibrator's ``PARAMS``) and the state (each ``load_state`` checks types, ranges,
    finiteness and shapes). Any problem is a one-line DataError.
    """
    if not isinstance(d, dict) or not isinstance(d.get("name"), str):
        raise DataError(f"calibrator JSON must be an object with a name, params and state; {_REFIT}")
    if d["name"] not in CALIBRATORS:
        raise DataError(f"calibrator JSON: unknown calibrator {d['name']!r}; known: {', '.join(CALIBRATORS.names())}")
    params, state = d.get("params", {}), d.get("state")
    if not isinstance(params, dict) or not isinstance(state, dict):
        raise DataError(f"calibrator {d['name']!r} JSON: params and state must be objects; {_REFIT}")
    try:
        cal = CALIBRATORS.create(d["name"], **params)
    except ConfigError as exc:
        raise DataError(f"calibrator JSON: {exc}; {_REFIT}") from None
    try:
        cal.load_state(state)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"calibrator {d['name']!r} state is missing or malformed ({exc}); {_REFIT}") from None
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
        # T <= 0 would invert (T < 0) or divide by zero (T = 0) every prediction
        self.temperature = state_number(state, "temperature", self.name, low=0.0, low_open=True)


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
        self.a = state_number(state, "a", self.name)
        self.b = state_number(state, "b", self.name)
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
        x, y = state_array(state, "x", self.name, 1), state_array(state, "y", self.name, 1)
        if len(x) == 0 or len(x) != len(y):
            raise DataError(f"calibrator 'isotonic' state: x and y must be non-empty and of one length "
                            f"(got {len(x)} and {len(y)}); {_REFIT}")
        if np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0) or y.min() < 0.0 or y.max() > 1.0:
            raise DataError("calibrator 'isotonic' state: knots must have increasing x and non-decreasing y "
                            f"in [0, 1]; {_REFIT}")
        self.x_knots, self.y_knots = x, y


# the ODIR family registers itself (dirichlet, beta, matrix); imported last: it builds on the above
from stage1.policies import odir as _odir  # noqa: E402,F401
