"""Post-hoc calibrators on logits (numpy / scipy only), registered by name in ``CALIBRATORS``.

Every calibrator maps logits ``x`` [n, k] to probabilities [n, k]. A 1-D score ``x`` [n] (a gate or
selector score, or a binary margin) is read as the class-1 logit of the pair ``[0, x]``, so the
same calibrators (Platt, isotonic, ...) turn a gate score into a probability of being right.
Parametric calibrators are fitted by L-BFGS (scipy) on the mean NLL with analytic gradients.

- ``identity``: softmax of the logits, nothing fitted.
- ``temperature``: softmax(x / T), one parameter (Guo et al. 2017).
- ``platt``: binary, sigmoid(a * margin + b) with margin = x1 - x0 (Platt 1999).
- ``isotonic``: binary, monotone non-decreasing map of the margin (PAV), linear interpolation
  between fitted points and clipping outside them (as scikit-learn's IsotonicRegression).
- ``dirichlet``: softmax(W log softmax(x) + b) with ODIR (Kull et al. 2019).
- ``beta``: binary Dirichlet calibration; on two classes it is exactly beta calibration
  sigmoid(a ln p1 - b ln p0 + c) (Kull et al. 2017); ODIR off by default (netcal's fit).
- ``matrix``: softmax(W x + b) with ODIR.

ODIR penalty (added to the mean NLL): ``lam / (k (k-1)) * sum_{i != j} W_ij^2 + mu / k * sum_j b_j^2``;
the diagonal of W is not penalised.

Each calibrator declares its parameters once (``PARAMS``, a ``stage1._core.params.Params`` table);
the constructor validates given values against it and ``params()`` returns them.
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression, minimize
from scipy.special import log_softmax, softmax

from stage1._core.errors import DataError
from stage1._core.params import Param, Params
from stage1._core.registry import Registry

CALIBRATORS: Registry = Registry("calibrator")

__all__ = ["CALIBRATORS", "Calibrator", "as_logits", "calibrator_from_dict"]


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


@CALIBRATORS.register("platt")
class Platt(Calibrator):
    """Binary logistic calibration sigmoid(a * margin + b) on the logit margin x1 - x0."""

    name = "platt"
    PARAMS = Params(Param("max_iter", int, 200, MAX_ITER_HELP, low=1))

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.max_iter = self._params["max_iter"]
        self.a, self.b = 1.0, 0.0

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        _require_binary(x, "platt")
        m = x[:, 1] - x[:, 0]

        def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
            z = w[0] * m + w[1]
            zz = np.stack([np.zeros_like(z), z], axis=1)
            loss, gz = _nll_and_grad_z(zz, y)
            g = gz[:, 1]
            return loss, np.array([np.sum(g * m), np.sum(g)])

        self.a, self.b = (float(v) for v in _lbfgs(fun, np.array([1.0, 0.0]), self.max_iter))

    def _proba(self, x: np.ndarray) -> np.ndarray:
        _require_binary(x, "platt")
        z = self.a * (x[:, 1] - x[:, 0]) + self.b
        return softmax(np.stack([np.zeros_like(z), z], axis=1), axis=1)

    def state(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b}

    def load_state(self, state: dict[str, Any]) -> None:
        self.a, self.b = float(state["a"]), float(state["b"])


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


class _LinearODIR(Calibrator):
    """softmax(W f(x) + b) with the ODIR penalty; f is log-softmax (Dirichlet) or identity (matrix)."""

    PARAMS = Params(
        Param("lam", float, 0.0, "ODIR penalty on the off-diagonal of W.", low=0.0,
              note="the ODIR penalties lam and mu must be >= 0"),
        Param("mu", float, None, "ODIR penalty on the bias b (None: the same as lam).", low=0.0, optional=True,
              note="the ODIR penalties lam and mu must be >= 0"),
        Param("max_iter", int, 500, MAX_ITER_HELP, low=1),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.lam = self._params["lam"]
        self.mu = self.lam if self._params["mu"] is None else self._params["mu"]
        self.max_iter = self._params["max_iter"]
        self.W = np.eye(2)
        self.b = np.zeros(2)

    def _features(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def penalty(self, W: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """ODIR value and gradients: lam/(k(k-1)) sum_{i!=j} W_ij^2 + mu/k sum b_j^2."""
        k = W.shape[0]
        off = W * (1.0 - np.eye(k))
        cw = self.lam / (k * (k - 1))
        cb = self.mu / k
        return cw * float(np.sum(off**2)) + cb * float(np.sum(b**2)), 2 * cw * off, 2 * cb * b

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        f = self._features(x)
        k = f.shape[1]

        def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
            W, b = w[: k * k].reshape(k, k), w[k * k:]
            loss, gz = _nll_and_grad_z(f @ W.T + b, y)
            pen, gW_pen, gb_pen = self.penalty(W, b)
            gW = gz.T @ f + gW_pen
            gb = gz.sum(axis=0) + gb_pen
            return loss + pen, np.r_[gW.ravel(), gb]

        w = _lbfgs(fun, np.r_[np.eye(k).ravel(), np.zeros(k)], self.max_iter)
        self.W, self.b = w[: k * k].reshape(k, k), w[k * k:]

    def _proba(self, x: np.ndarray) -> np.ndarray:
        f = self._features(x)
        if f.shape[1] != self.W.shape[0]:
            raise DataError(f"{self.name} was fitted on {self.W.shape[0]} classes, got {f.shape[1]}")
        return softmax(f @ self.W.T + self.b, axis=1)

    def state(self) -> dict[str, Any]:
        return {"W": self.W.tolist(), "b": self.b.tolist()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.W = np.asarray(state["W"], dtype=np.float64)
        self.b = np.asarray(state["b"], dtype=np.float64)


@CALIBRATORS.register("dirichlet")
class Dirichlet(_LinearODIR):
    """Dirichlet calibration: softmax(W log softmax(x) + b), ODIR-regularised."""

    name = "dirichlet"

    def _features(self, x: np.ndarray) -> np.ndarray:
        return log_softmax(x, axis=1)


@CALIBRATORS.register("beta")
class Beta(Dirichlet):
    """Beta calibration = 2-class Dirichlet calibration; unregularised by default (netcal)."""

    name = "beta"

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        _require_binary(x, "beta")
        super()._fit(x, y)

    def coefficients(self) -> tuple[float, float, float]:
        """(a, b, c) of sigmoid(a ln p1 - b ln p0 + c), the classic beta-calibration form."""
        d = self.W[1] - self.W[0]
        return float(d[1]), float(-d[0]), float(self.b[1] - self.b[0])


@CALIBRATORS.register("matrix")
class Matrix(_LinearODIR):
    """Matrix scaling: softmax(W x + b), ODIR-regularised."""

    name = "matrix"

    def _features(self, x: np.ndarray) -> np.ndarray:
        return x
