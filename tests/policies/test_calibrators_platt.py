"""Platt on a gate / selector score in [0, 1]: fitted on the score's logit with Platt's targets, so
it agrees with scikit-learn's sigmoid calibration of that logit (the oracle) at small and large n;
2-column logits keep the maximum-likelihood fit (tests/policies/test_calibrators.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit
from sklearn.calibration import CalibratedClassifierCV, _sigmoid_calibration
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression

from stage1._core.errors import DataError
from stage1.policies import POLICIES
from stage1.policies.audit import synthetic_scores
from stage1.policies.base import stratified_split
from stage1.policies.calibrators import CALIBRATORS, as_logits, calibrator_from_dict, platt_targets


def _logit(s: np.ndarray) -> np.ndarray:
    """The logit the oracle is given: s clipped to [1e-12, 1 - 1e-12] (written out, not imported)."""
    c = np.clip(s, 1e-12, 1 - 1e-12)
    return np.log(c / (1 - c))


def _gate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A gate's fit part: the selector score in [0, 1] and whether the head's label was right."""
    sc, y = synthetic_scores(n, prevalence=0.4, overconfidence=2.0, seed=seed)
    right = ((sc["logits"][:, 1] > sc["logits"][:, 0]).astype(int) == y).astype(int)
    assert 0 < right.sum() < n  # both outcomes present (sklearn's estimator needs two classes)
    return sc["select"], right


def _sklearn_sigmoid(f_fit: np.ndarray, y: np.ndarray, f_new: np.ndarray) -> np.ndarray:
    """CalibratedClassifierCV(method="sigmoid") on a frozen model whose decision_function is f."""
    model = LogisticRegression().fit(f_fit[:, None], y)
    model.coef_, model.intercept_ = np.array([[1.0]]), np.array([0.0])  # decision_function = f
    sk = CalibratedClassifierCV(FrozenEstimator(model), method="sigmoid").fit(f_fit[:, None], y)
    return sk.predict_proba(f_new[:, None])[:, 1]


@pytest.mark.parametrize("n", [20, 60, 200, 1000])
def test_platt_on_a_gate_score_matches_sklearn(n):
    s, right = _gate(n, seed=n)
    cal = CALIBRATORS.create("platt").fit(s, right)
    assert cal.input == "score"
    A, B = _sigmoid_calibration(_logit(s), right)  # sklearn: P = 1 / (1 + exp(A f + B))
    assert cal.a == pytest.approx(-A, abs=1e-6) and cal.b == pytest.approx(-B, abs=1e-6)
    grid = np.r_[s, 0.0, 1.0, np.linspace(0, 1, 101)]
    p = cal.p1(grid)
    np.testing.assert_allclose(p, expit(-(A * _logit(grid) + B)), atol=1e-6)
    np.testing.assert_allclose(p, _sklearn_sigmoid(_logit(s), right, _logit(grid)), atol=1e-6)


def test_platt_gate_at_n60_old_fit_disagreed_new_fit_agrees():
    # the situation: a gate score at n = 60. The old fit read the probability s as a logit
    # and took hard targets (it is still what 2-column logits [0, s] get); sklearn's sigmoid
    # calibration of logit(s) with Platt's targets is the reference.
    s, right = _gate(60, seed=60)
    A, B = _sigmoid_calibration(_logit(s), right)
    old = CALIBRATORS.create("platt").fit(as_logits(s), right)
    new = CALIBRATORS.create("platt").fit(s, right)
    assert abs(old.a + A) > 1.0  # far apart: (4.48, -1.42) vs (0.72, 0.77)
    assert abs(new.a + A) < 1e-6 and abs(new.b + B) < 1e-6
    # and a calibrated gate stays calibrated: on s ~ U(0, 1) with P(right | s) = s the fit is near
    # the identity map in logit space (a = 1, b = 0), which a sigmoid of s itself cannot express
    rng = np.random.default_rng(0)
    u = rng.random(20000)
    ident = CALIBRATORS.create("platt").fit(u, (rng.random(20000) < u).astype(int))
    assert ident.a == pytest.approx(1.0, abs=0.05) and ident.b == pytest.approx(0.0, abs=0.05)


def test_platt_targets_are_platts():
    y = np.array([1, 1, 1, 0, 0])
    np.testing.assert_allclose(platt_targets(y), [0.8, 0.8, 0.8, 0.25, 0.25])
    # a separable gate sample keeps a finite slope (hard targets would send it to infinity)
    s = np.r_[np.linspace(0.05, 0.3, 10), np.linspace(0.7, 0.95, 10)]
    right = np.r_[np.zeros(10, int), np.ones(10, int)]
    cal = CALIBRATORS.create("platt").fit(s, right)
    A, _ = _sigmoid_calibration(_logit(s), right)
    assert np.isfinite(cal.a) and cal.a == pytest.approx(-A, abs=1e-6)


def test_platt_input_contract():
    s, right = _gate(200, seed=3)
    with pytest.raises(DataError, match=r"score in \[0, 1\].*two columns"):
        CALIBRATORS.create("platt").fit(s * 3 - 1, right)
    with pytest.raises(DataError, match="NaN"):
        CALIBRATORS.create("platt").fit(np.r_[s[:-1], np.nan], right)
    on_score = CALIBRATORS.create("platt").fit(s, right)
    with pytest.raises(DataError, match="fitted on a 1-D score"):
        on_score.p1(as_logits(s))
    with pytest.raises(DataError, match=r"score in \[0, 1\]"):
        on_score.p1(s + 1)
    on_logits = CALIBRATORS.create("platt").fit(as_logits(_logit(s)), right)
    with pytest.raises(DataError, match="fitted on 2-column logits"):
        on_logits.p1(s)
    # the scores' ends are finite after clipping, and the fit round-trips through JSON
    p = on_score.p1(np.array([0.0, 1.0]))
    assert np.all(np.isfinite(p)) and p[0] < p[1]
    again = calibrator_from_dict(json.loads(json.dumps(on_score.to_dict(), allow_nan=False)))
    assert again.input == "score"
    np.testing.assert_array_equal(again.p1(s), on_score.p1(s))


def test_platt_state_without_input_reads_a_1d_input_as_before():
    # policy.json written before the score path: a 1-D input was the class-1 logit, keep it so
    old = calibrator_from_dict({"name": "platt", "params": {"max_iter": 200}, "state": {"a": 2.0, "b": 0.5}})
    z = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(old.p1(z), expit(2.0 * z + 0.5), atol=1e-12)
    with pytest.raises(DataError, match="input must be one of"):
        calibrator_from_dict({"name": "platt", "params": {}, "state": {"a": 1, "b": 0, "input": "proba"}})


def test_policy_select_platt_is_sklearns_fit_on_the_fit_part():
    cal, y = synthetic_scores(600, prevalence=0.4, overconfidence=2.0, seed=1)
    pol = POLICIES.create("ltt", alpha=0.05, delta=0.1, score="select", select_calibrator="platt").fit(cal, y)
    fit_idx, _ = stratified_split(y, 0.3, 0)  # the policy's calibrator part (calib_fraction 0.3, seed 0)
    yhat = (pol.decide(cal).p_roadwork >= 0.5).astype(int)
    right = (yhat == y).astype(int)[fit_idx]
    A, B = _sigmoid_calibration(_logit(cal["select"][fit_idx]), right)
    scal = pol.to_dict()["state"]["select_calibrator"]
    assert scal["state"]["input"] == "score"
    assert scal["state"]["a"] == pytest.approx(-A, abs=1e-6) and scal["state"]["b"] == pytest.approx(-B, abs=1e-6)
