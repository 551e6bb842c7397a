"""Label-prior shift: the Bayes correction of the calibrated p, recorded in policy.json, and metrics at a prior."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit, logit

from stage1._core.errors import ConfigError, DataError
from stage1.policies import POLICIES, policy_from_dict
from stage1.policies.audit import synthetic_scores
from stage1.policies.calibrators import shift_prior


def test_shift_prior_hand_worked():
    # p = 0.5 calibrated at a 20% positive rate, moved to 50%: odds 1 * (0.5/0.5) / (0.2/0.8) = 4 -> p' = 0.8
    assert shift_prior(np.array([0.5]), 0.2, 0.5)[0] == pytest.approx(0.8)
    # p = 0.8 at 50% moved to 20%: odds 4 * (0.2/0.8) / 1 = 1 -> 0.5
    assert shift_prior(np.array([0.8]), 0.5, 0.2)[0] == pytest.approx(0.5)
    # the same prior: no change; certain answers stay certain
    p = np.array([0.0, 0.1, 0.5, 0.93, 1.0])
    np.testing.assert_allclose(shift_prior(p, 0.3, 0.3), p)
    np.testing.assert_array_equal(shift_prior(p, 0.3, 0.6)[[0, -1]], [0.0, 1.0])
    with pytest.raises(DataError, match="to_prior"):
        shift_prior(p, 0.3, 1.0)


@settings(max_examples=50, deadline=None)
@given(p=st.floats(1e-6, 1 - 1e-6), a=st.floats(0.01, 0.99), b=st.floats(0.01, 0.99))
def test_shift_prior_is_invertible_and_monotone(p, a, b):
    q = shift_prior(np.array([p, min(p * 1.01, 1 - 1e-6)]), a, b)
    assert shift_prior(q[:1], b, a)[0] == pytest.approx(p, rel=1e-9, abs=1e-12)
    assert q[1] >= q[0]
    assert (q[0] > p) == (b > a) or q[0] == pytest.approx(p)


def test_shifted_p_is_the_posterior_at_the_deployment_prior():
    # x | y ~ N(+-1, 1): the posterior logit at positive rate pi is 2x + logit(pi). Logits that are exact at
    # val_calib's 20% rate, shifted to 50%, must give 2x (up to val_calib's empirical rate vs 0.2).
    rng = np.random.default_rng(0)
    n = 20000
    y = (rng.random(n) < 0.2).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    scores = {"logits": np.stack([np.zeros(n), 2 * x + logit(0.2)], 1)}
    pol = POLICIES.create("threshold", threshold=0.9, prior=0.5).fit(scores, y)
    assert pol.calib_prior == pytest.approx(y.mean())
    np.testing.assert_allclose(pol.decide(scores).p_roadwork, expit(2 * x), atol=0.01)
    # without the prior the same policy keeps p at val_calib's rate
    plain = POLICIES.create("threshold", threshold=0.9).fit(scores, y)
    np.testing.assert_allclose(plain.decide(scores).p_roadwork, expit(2 * x + logit(0.2)))


@pytest.mark.parametrize("name", ["threshold", "ltt", "crc", "scrc", "reward"])
def test_every_policy_applies_and_records_the_prior(name):
    cal, y = synthetic_scores(3000, prevalence=0.25, overconfidence=1.5, seed=8)
    extra = {"n_boot": 3, "n_orderings": 20, "n_rounds": 100} if name == "reward" else {}
    shifted = POLICIES.create(name, prior=0.5, **extra).fit(cal, y)
    plain = POLICIES.create(name, **extra).fit(cal, y)
    np.testing.assert_allclose(shifted.decide(cal).p_roadwork,
                               shift_prior(plain.decide(cal).p_roadwork, float(y.mean()), 0.5))
    d = json.loads(json.dumps(shifted.to_dict(), allow_nan=False))
    assert d["params"]["prior"] == 0.5 and d["state"]["calib_prior"] == pytest.approx(y.mean())
    assert policy_from_dict(d).decide(cal).equals(shifted.decide(cal))
    assert "calib_prior" not in plain.to_dict()["state"]


def test_summary_reports_metrics_at_the_prior():
    cal, y = synthetic_scores(3000, prevalence=0.25, seed=9)
    pol = POLICIES.create("ltt", alpha=0.05, prior=0.5).fit(cal, y)
    at = pol.summary["calib_at_prior"]
    assert at["prior"] == 0.5 and 0 < at["coverage"] <= 1 and at["fnr_exit"] == pytest.approx(pol.summary["calib_fnr_exit"])


def test_bad_prior_and_bad_state():
    with pytest.raises(ConfigError, match="prior"):
        POLICIES.create("ltt", prior=1.0)
    with pytest.raises(ConfigError, match="prior"):
        POLICIES.create("threshold", prior=0.0)
    cal, y = synthetic_scores(200, prevalence=0.4, seed=10)
    with pytest.raises(DataError, match="both classes"):
        POLICIES.create("threshold", prior=0.5).fit(cal, np.zeros(len(y), dtype=int))
    d = POLICIES.create("threshold", prior=0.5).fit(cal, y).to_dict()
    for bad in (None, 0.0, 1.0, True, "0.4"):
        d["state"]["calib_prior"] = bad
        with pytest.raises(DataError, match="calib_prior"):
            policy_from_dict(d)
