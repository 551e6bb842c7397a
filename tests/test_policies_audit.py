"""Guarantee audit on synthetic data of several shapes: the certificates must hold empirically."""
from __future__ import annotations

import numpy as np
import pytest

from stage1.policies import POLICIES, audit
from stage1.policies.audit import synthetic_scores

SHAPES = {
    "balanced": {"prevalence": 0.5},
    "rare_positives": {"prevalence": 0.1},
    "overconfident": {"prevalence": 0.4, "overconfidence": 3.0},
}
N_CALIB = {"balanced": 1500, "rare_positives": 4000, "overconfident": 1500}


def _pool(shape: str):
    """One finite population per shape; the audit calibrates on random parts, measures on the rest."""
    return synthetic_scores(3 * N_CALIB[shape], seed=100, **SHAPES[shape])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_ltt_violation_rate_within_delta(shape):
    sc, y = _pool(shape)
    pol = POLICIES.create("ltt", alpha=0.05, delta=0.2)
    rep = audit(pol, sc, y, n_calib=N_CALIB[shape], n_draws=60, seed=1)
    assert rep["certified_rate"] > 0.8  # the audit is not vacuous: it certifies and exits
    assert rep["coverage_mean"] > 0.1
    assert rep["violation_rate"] <= rep["delta"] + 3 * rep["violation_se"]
    assert rep["fnr_exit_mean"] <= 0.05


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_ltt_with_eps_and_select_score(shape):
    sc, y = _pool(shape)
    pol = POLICIES.create("ltt", alpha=0.05, delta=0.2, eps=0.15, score="select", select_calibrator="platt")
    rep = audit(pol, sc, y, n_calib=N_CALIB[shape], n_draws=25, seed=2)
    assert rep["violation_rate"] <= 0.2 + 3 * rep["violation_se"]
    assert rep["eps_violation_rate"] <= 0.2 + 3 * rep["eps_violation_se"]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_crc_mean_miss_rate_within_alpha(shape):
    sc, y = _pool(shape)
    alpha = 0.05
    pol = POLICIES.create("crc", alpha=alpha)
    rep = audit(pol, sc, y, n_calib=N_CALIB[shape], n_draws=60, seed=3)
    assert rep["certified_rate"] == 1.0
    assert rep["miss_rate_mean"] <= alpha + 3 * rep["miss_rate_se"]
    assert rep["miss_rate_mean"] > alpha / 3  # and it is not trivially conservative


def test_audit_resplits_without_fixed_test_and_validates():
    sc, y = synthetic_scores(3000, seed=5)
    pol = POLICIES.create("crc", alpha=0.05, calibrator=None)
    rep = audit(pol, sc, y, n_calib=1000, n_draws=20, seed=0)
    assert rep["n_draws"] == 20 and rep["n_calib"] == 1000 and np.isfinite(rep["miss_rate_se"])
    ts, ty = synthetic_scores(2000, seed=6)
    fixed = audit(pol, sc, y, n_calib=3000, n_draws=5, test_scores=ts, test_y=ty)  # all rows calibrate
    assert fixed["n_calib"] == 3000 and 0 < fixed["coverage_mean"] <= 1
    with pytest.raises(ValueError, match="n_calib"):
        audit(pol, sc, y, n_calib=3000, n_draws=5)
    with pytest.raises(ValueError, match="n_draws"):
        audit(pol, sc, y, n_draws=1)
