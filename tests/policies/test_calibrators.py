"""Calibrators against peers (scikit-learn, netcal) and their own contracts (ODIR, JSON, 1-D scores)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from stage1.policies.calibrators import CALIBRATORS, as_logits, calibrator_from_dict
from stage1.policies.metrics import nll

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def golden():
    arrays = dict(np.load(DATA / "synthetic_scores.npz"))
    values = json.loads((DATA / "golden.json").read_text())["values"]["calibration_test_half"]
    return arrays, values


def _halves(arrays):
    z, y = arrays["logit1"], arrays["y"]
    return z[:2000], y[:2000], z[2000:], y[2000:]


def test_registry_names():
    assert CALIBRATORS.names() == ["beta", "dirichlet", "identity", "isotonic", "matrix", "platt", "temperature"]


def test_temperature_matches_sklearn_golden_and_live(golden):
    arrays, gold = golden
    z_fit, y_fit, z_te, y_te = _halves(arrays)
    cal = CALIBRATORS.create("temperature").fit(z_fit, y_fit)
    assert nll(y_te, cal.p1(z_te)) == pytest.approx(gold["temperature_nll_sklearn"], abs=1e-4)

    margin = LogisticRegression().fit(z_fit[:, None], y_fit)  # then pinned: decision_function = logit
    margin.coef_, margin.intercept_ = np.array([[1.0]]), np.array([0.0])
    sk = CalibratedClassifierCV(FrozenEstimator(margin), method="temperature")
    sk.fit(z_fit[:, None], y_fit)
    p_sk = sk.predict_proba(z_te[:, None])[:, 1]
    np.testing.assert_allclose(cal.p1(z_te), p_sk, atol=1e-5)


def test_beta_matches_netcal_golden(golden):
    arrays, gold = golden
    z_fit, y_fit, z_te, y_te = _halves(arrays)
    beta = CALIBRATORS.create("beta").fit(z_fit, y_fit)
    assert nll(y_te, beta.p1(z_te)) == pytest.approx(gold["beta_nll_netcal"], abs=1e-4)
    # two-class Dirichlet is the same model; the classic (a, b, c) form reproduces it (dirichlet
    # cross-validates its ODIR penalty by default; lam=0 is the unregularised fit beta makes)
    dirichlet = CALIBRATORS.create("dirichlet", lam=0.0).fit(z_fit, y_fit)
    np.testing.assert_allclose(beta.p1(z_te), dirichlet.p1(z_te), atol=1e-6)
    a, b, c = beta.coefficients()
    p = 1 / (1 + np.exp(-z_te))
    direct = 1 / (1 + np.exp(-(a * np.log(p) - b * np.log1p(-p) + c)))
    np.testing.assert_allclose(beta.p1(z_te), direct, atol=1e-9)


def test_beta_matches_netcal_live(golden):
    netcal_scaling = pytest.importorskip("netcal.scaling")
    arrays, _ = golden
    z_fit, y_fit, z_te, y_te = _halves(arrays)
    ours = CALIBRATORS.create("beta").fit(z_fit, y_fit).p1(z_te)
    ref = netcal_scaling.BetaCalibration()
    ref.fit(arrays["p1"][:2000], y_fit)
    theirs = np.clip(ref.transform(arrays["p1"][2000:]), 0, 1)
    assert nll(y_te, ours) == pytest.approx(nll(y_te, theirs), abs=1e-4)


def test_platt_matches_unpenalised_logistic_regression(golden):
    arrays, _ = golden
    z_fit, y_fit, z_te, _ = _halves(arrays)
    # logits go to platt as two columns (a 1-D input is a score in [0, 1], see the tests below)
    cal = CALIBRATORS.create("platt").fit(as_logits(z_fit), y_fit)
    assert cal.input == "logits"
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(z_fit[:, None], y_fit)
    assert cal.a == pytest.approx(lr.coef_[0, 0], abs=1e-4)
    assert cal.b == pytest.approx(lr.intercept_[0], abs=1e-4)
    np.testing.assert_allclose(cal.p1(as_logits(z_te)), lr.predict_proba(z_te[:, None])[:, 1], atol=1e-5)


def test_isotonic_matches_sklearn_with_ties(golden):
    arrays, _ = golden
    z_fit, y_fit, z_te, _ = _halves(arrays)
    z_fit = np.round(z_fit, 1)  # many ties in x
    cal = CALIBRATORS.create("isotonic").fit(z_fit, y_fit)
    sk = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(z_fit, y_fit)
    grid = np.r_[z_te, -50.0, 50.0, z_fit[:50]]
    np.testing.assert_allclose(cal.p1(grid), sk.predict(grid), atol=1e-12)


def test_odir_penalty_formula_and_effect():
    rng = np.random.default_rng(0)
    n, k = 1500, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + 3.0 * np.eye(k)[y]
    logits = 2.5 * logits @ np.array([[1, 0.3, 0], [0, 1, 0.4], [0.2, 0, 1]])  # miscalibrated, mixed
    cal = CALIBRATORS.create("dirichlet", lam=0.3, mu=0.5)
    W = rng.normal(size=(k, k))
    b = rng.normal(size=k)
    val, gW, gb = cal.penalty(W, b)
    off = W - np.diag(np.diag(W))
    assert val == pytest.approx(0.3 / (k * (k - 1)) * np.sum(off**2) + 0.5 / k * np.sum(b**2))
    assert np.all(np.diag(gW) == 0)  # diagonal not penalised
    np.testing.assert_allclose(gb, 2 * 0.5 / k * b)

    free = CALIBRATORS.create("dirichlet", lam=0.0).fit(logits, y)
    strong = CALIBRATORS.create("dirichlet", lam=1e4, mu=1e4).fit(logits, y)
    off_free = np.abs(free.W - np.diag(np.diag(free.W))).sum()
    off_strong = np.abs(strong.W - np.diag(np.diag(strong.W))).sum()
    assert off_strong < 1e-2 * off_free
    assert np.abs(strong.b).max() < 1e-2
    assert np.abs(np.diag(strong.W) - 1).max() > 0.05  # the diagonal still moves freely
    for name in ("dirichlet", "matrix"):
        fitted = CALIBRATORS.create(name, lam=1e-3).fit(logits, y)
        p = fitted.predict_proba(logits)
        assert p.shape == (n, k)
        base = -np.mean(np.log(CALIBRATORS.create("identity").fit(logits, y).predict_proba(logits)[np.arange(n), y]))
        assert -np.mean(np.log(p[np.arange(n), y])) < base - 0.01


def test_matrix_gradient_matches_finite_differences():
    # the fit is only as good as its analytic gradient; check it through the fitted optimum:
    # at the optimum of NLL + ODIR, the finite-difference slope along random directions is ~0
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    x = rng.normal(0, 1, (400, 2)) + 2 * np.eye(2)[y]
    cal = CALIBRATORS.create("matrix", lam=0.1, mu=0.2).fit(x, y)
    W, b = cal.W.copy(), cal.b.copy()

    def objective(W_, b_):
        z = x @ W_.T + b_
        z = z - z.max(1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -lp[np.arange(400), y].mean() + cal.penalty(W_, b_)[0]

    for _ in range(5):
        dW, db = rng.normal(size=W.shape), rng.normal(size=b.shape)
        h = 1e-5
        slope = (objective(W + h * dW, b + h * db) - objective(W - h * dW, b - h * db)) / (2 * h)
        assert abs(slope) < 1e-5


@pytest.mark.parametrize("name", ["identity", "temperature", "platt", "isotonic", "beta", "dirichlet", "matrix"])
def test_json_round_trip_and_one_d_scores(name):
    rng = np.random.default_rng(2)
    s = rng.normal(0, 2, 300)
    y = (rng.random(300) < 1 / (1 + np.exp(-s / 2))).astype(int)
    # a 1-D input is the class-1 logit, except for platt: a score in [0, 1] (a gate probability)
    x = 1 / (1 + np.exp(-s)) if name == "platt" else s
    cal = CALIBRATORS.create(name).fit(x, y)
    p = cal.p1(x)
    assert p.shape == (300,) and np.all((p >= 0) & (p <= 1))
    again = calibrator_from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False)))
    np.testing.assert_array_equal(again.p1(x), p)
    np.testing.assert_array_equal(as_logits(s)[:, 1], s)


def test_errors_are_clear():
    with pytest.raises(KeyError, match="unknown calibrator"):
        CALIBRATORS.create("nope")
    with pytest.raises(RuntimeError, match="not fitted"):
        CALIBRATORS.create("temperature").p1(np.zeros(3))
    with pytest.raises(ValueError, match="binary"):
        CALIBRATORS.create("platt").fit(np.zeros((4, 3)), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="class indices"):
        CALIBRATORS.create("temperature").fit(np.zeros(4), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="NaN"):
        CALIBRATORS.create("temperature").fit(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="lam and mu"):
        CALIBRATORS.create("dirichlet", lam=-1)
