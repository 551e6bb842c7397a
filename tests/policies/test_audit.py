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


# SCRC-I: alpha per shape so that stage 2 binds (lambda2 >= 1/2: some selected sets are {0, 1}); with a
# larger alpha the argmax singletons already meet it and only the selection stage is tested.
SCRC_ALPHA = {"balanced": 0.05, "rare_positives": 0.01, "overconfident": 0.05}
SCRC_POOL, SCRC_CALIB, SCRC_DRAWS = 20000, 1500, 200


def _scrc_pool(shape: str):
    """A larger finite population than ``_pool``: calibrate on 1500 rows, measure on the other 18500
    (close to the population's risk, so the held-out noise barely inflates the violation rate)."""
    return synthetic_scores(SCRC_POOL, seed=100, **SHAPES[shape])


@pytest.mark.parametrize("shape,score", [("balanced", "p"), ("rare_positives", "p"), ("overconfident", "p"),
                                         ("balanced", "select")])
def test_scrc_violation_rate_within_delta(shape, score):
    """SCRC-I (both stages PAC, delta = 0.1 split 0.05 / 0.05) over 200 resplits: a draw violates when
    the miscoverage among selected held-out rows exceeds alpha or their selection coverage is below
    xi; the violation rate is <= delta + 3 s.e., and each stage's rate <= its share + 3 s.e."""
    sc, y = _scrc_pool(shape)
    alpha, xi, delta = SCRC_ALPHA[shape], 0.6, 0.1
    pol = POLICIES.create("scrc", alpha=alpha, xi=xi, delta=delta, score=score)
    rep = audit(pol, sc, y, n_calib=SCRC_CALIB, n_draws=SCRC_DRAWS, seed=7)
    print(f"\nscrc {shape}/{score}: violation {rep['violation_rate']:.3f} +- {rep['violation_se']:.3f} "
          f"(risk {rep['risk_violation_rate']:.3f}, coverage {rep['coverage_violation_rate']:.3f}; delta={delta}); "
          f"miscoverage|selected {rep['miscoverage_selected_mean']:.4f} (alpha={alpha}), "
          f"selection coverage {rep['selection_coverage_mean']:.4f} (xi={xi}), exit rate {rep['coverage_mean']:.3f}")
    assert rep["n_draws"] >= 200 and (rep["alpha"], rep["xi"], rep["delta"]) == (alpha, xi, delta)
    assert rep["violation_rate"] <= delta + 3 * rep["violation_se"]
    assert rep["risk_violation_rate"] <= delta / 2 + 3 * rep["risk_violation_se"]
    assert rep["coverage_violation_rate"] <= delta / 2 + 3 * rep["coverage_violation_se"]
    # not vacuous: always certified, both constraints close to binding, and it exits
    assert rep["certified_rate"] == 1.0
    assert alpha / 3 < rep["miscoverage_selected_mean"] <= alpha
    assert xi <= rep["selection_coverage_mean"] <= xi + 0.05
    assert rep["coverage_mean"] > 0.2


def test_scrc_in_expectation_means_within_targets():
    """The in-expectation variant (selection 'expectation', risk 'crc'): over 200 resplits the mean
    miscoverage among selected is <= alpha + 3 s.e. and the mean selection coverage >= xi - 3 s.e.,
    both close to their targets (conformal procedures are exact in expectation; the non-empty clamp,
    active in draws whose selected rows hold few wrong argmax predictions, makes it a bit conservative)."""
    sc, y = _scrc_pool("balanced")
    alpha, xi = 0.05, 0.6
    pol = POLICIES.create("scrc", alpha=alpha, xi=xi, selection_bound="expectation", risk_bound="crc")
    rep = audit(pol, sc, y, n_calib=SCRC_CALIB, n_draws=SCRC_DRAWS, seed=8)
    print(f"\nscrc in expectation: miscoverage|selected {rep['miscoverage_selected_mean']:.4f} "
          f"+- {rep['miscoverage_selected_se']:.4f} (alpha={alpha}), selection coverage "
          f"{rep['selection_coverage_mean']:.4f} +- {rep['selection_coverage_se']:.4f} (xi={xi})")
    assert rep["miscoverage_selected_mean"] <= alpha + 3 * rep["miscoverage_selected_se"]
    assert rep["selection_coverage_mean"] >= xi - 3 * rep["selection_coverage_se"]
    assert rep["miscoverage_selected_mean"] > alpha - 0.005 and rep["selection_coverage_mean"] < xi + 0.01
