"""policies.metrics against golden peer values (fd-shifts, scikit-learn) and a loop reference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, matthews_corrcoef

from stage1.policies import metrics as M

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict]:
    arrays = dict(np.load(DATA / "synthetic_scores.npz"))
    values = json.loads((DATA / "golden.json").read_text())["values"]
    return arrays, values


@pytest.mark.parametrize("key,conf", [("maxprob", "conf"), ("maxprob_rounded_2dp", "conf_rounded_2dp")])
@pytest.mark.parametrize("name", ["aurc", "eaurc", "augrc", "eaugrc"])
def test_rc_family_matches_fd_shifts(golden, key, conf, name):
    arrays, values = golden
    got = getattr(M, name)(arrays[conf], arrays["err"])
    assert got == pytest.approx(values[key][name], abs=1e-9, rel=0)


def test_rounded_set_really_has_ties(golden):
    arrays, _ = golden
    assert len(np.unique(arrays["conf_rounded_2dp"])) < 60
    # ties matter: breaking them by index changes the AURC, so grouping is what we match
    jitter = arrays["conf_rounded_2dp"] + np.arange(4000) * 1e-9
    assert abs(M.aurc(jitter, arrays["err"]) - M.aurc(arrays["conf_rounded_2dp"], arrays["err"])) > 1e-5


def test_calibration_metrics_match_sklearn(golden):
    arrays, values = golden
    y, p = arrays["y"][2000:], arrays["p1"][2000:]
    gold = values["calibration_test_half"]
    assert M.nll(y, p) == pytest.approx(gold["raw_nll"], abs=1e-12)
    assert M.brier(y, p) == pytest.approx(gold["raw_brier"], abs=1e-12)
    label = (arrays["p1"] >= 0.5).astype(int)
    assert M.accuracy(arrays["y"], label) == pytest.approx(accuracy_score(arrays["y"], label))
    assert M.mcc(arrays["y"], label) == pytest.approx(matthews_corrcoef(arrays["y"], label), abs=1e-12)


def _fd_loop(conf, res, generalized):
    """Direct transcription of the fd-shifts RC-point loop (ascending sweep), for reference."""
    order = np.argsort(conf)
    res, c = res[order], conf[order]
    n = len(res)
    err = float(np.sum(res))
    covs, risks = [1.0], [err / n]
    for i in range(n - 1):
        err -= res[i]
        if c[i] != c[i + 1]:
            covs.append((n - i - 1) / n)
            risks.append(err / n if generalized else err / (n - i - 1))
    covs.append(0.0)
    risks.append(0.0 if generalized else risks[-1])
    covs, risks = np.array(covs), np.array(risks)
    return float(np.sum((covs[:-1] - covs[1:]) * (risks[:-1] + risks[1:]) / 2))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.sampled_from([0.0, 1.0, 0.25])), min_size=1, max_size=40)
)
def test_rc_family_equals_loop_reference_with_ties(pairs):
    conf = np.array([p[0] / 6 for p in pairs])
    res = np.array([p[1] for p in pairs])
    assert M.aurc(conf, res) == pytest.approx(_fd_loop(conf, res, False), abs=1e-12)
    assert M.augrc(conf, res) == pytest.approx(_fd_loop(conf, res, True), abs=1e-12)
    binary = (res > 0.5).astype(float)
    err = binary.mean()
    # oracle ranking reaches the closed-form optimum; any ranking is no better
    assert M.augrc(conf, binary) >= 0.5 * err**2 - 1e-12
    assert M.eaugrc(-binary, binary) == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= M.augrc(conf, binary) <= err + 1e-12


def test_non_binary_residuals_use_numeric_oracle():
    rng = np.random.default_rng(0)
    res = rng.uniform(size=50)
    assert M.eaurc(-res, res) == pytest.approx(0.0, abs=1e-12)
    assert M.eaugrc(-res, res) == pytest.approx(0.0, abs=1e-12)
    assert M.eaugrc(rng.uniform(size=50), res) > 0


def test_curve_and_operating_points():
    conf = np.array([0.9, 0.9, 0.8, 0.7, 0.6])
    err = np.array([0, 1, 0, 1, 1.0])
    cov, risk, thr = M.risk_coverage_curve(conf, err)
    np.testing.assert_allclose(cov, [1.0, 0.8, 0.6, 0.4, 0.0])
    np.testing.assert_allclose(risk, [3 / 5, 2 / 4, 1 / 3, 1 / 2, 1 / 2])
    np.testing.assert_allclose(thr, [0.6, 0.7, 0.8, 0.9])
    gcov, grisk, _ = M.risk_coverage_curve(conf, err, "generalized")
    np.testing.assert_allclose(grisk, [3 / 5, 2 / 5, 1 / 5, 1 / 5, 0.0])
    assert M.risk_at_coverage(conf, err, 0.5) == pytest.approx(1 / 3)
    assert M.risk_at_coverage(conf, err, 1.0) == pytest.approx(3 / 5)
    assert M.coverage_at_risk(conf, err, 0.4) == pytest.approx(0.6)
    assert M.coverage_at_risk(conf, err, 0.1) == 0.0
    with pytest.raises(ValueError, match="kind"):
        M.risk_coverage_curve(conf, err, "other")
    with pytest.raises(ValueError, match="target coverage"):
        M.risk_at_coverage(conf, err, 0.0)


def test_ece_definitions():
    y = np.array([1, 0, 1, 1, 0, 0])
    p = np.array([1.0, 0.0, 0.7, 0.72, 0.3, 0.5])
    # bins of width 1/15: 1.0 -> last bin (14); 0.0 -> bin 0; 0.7, 0.72 -> bin 10; 0.3 -> 4; 0.5 -> 7
    expect = (0 + 0 + 2 * abs(1 - 0.71) + abs(0 - 0.3) + abs(0 - 0.5)) / 6
    assert M.ece(y, p) == pytest.approx(expect)
    conf = np.maximum(p, 1 - p)  # 1,1,.7,.72,.7,.5 ; hits: 1,1,1,1,1,0 (0.5 -> predicts 1, y=0)
    expect_top = (abs(2 - 2.0) + abs(3 - (0.7 + 0.72 + 0.7)) + abs(0 - 0.5)) / 6
    assert M.ece_top_label(y, p) == pytest.approx(expect_top)
    assert M.classwise_ece(y, p) == pytest.approx(0.5 * (M.ece(y, p) + M.ece(1 - y, 1 - p)), abs=1e-12)
    assert M.classwise_ece(y, np.stack([1 - p, p], 1)) == pytest.approx(M.classwise_ece(y, p))
    with pytest.raises(ValueError, match="probabilities"):
        M.ece(y, p + 0.5)


def test_classification_metrics_match_sklearn_random():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = rng.uniform(size=300)
    assert M.nll(y, p) == pytest.approx(log_loss(y, p), abs=1e-12)
    assert M.brier(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert M.mcc(y, np.ones(300, int)) == 0.0
    with pytest.raises(ValueError, match="0/1"):
        M.nll(y + 1, p)


def test_exit_risks_follow_design_definitions():
    y = np.array([1, 1, 1, 0, 0, 1, 0])
    lab = np.array([1, 0, 0, 0, 1, 1, 0])
    ex = np.array([True, True, False, True, True, False, False])
    r = M.selective_risks(y, lab, ex)
    assert r["coverage"] == pytest.approx(4 / 7)
    assert r["defer_rate"] == pytest.approx(3 / 7)
    assert r["selective_error"] == pytest.approx(2 / 4)  # rows 1 and 4
    assert r["fnr_exit"] == pytest.approx(1 / 2)  # exited positives: rows 0, 1; row 1 missed
    assert r["miss_rate"] == pytest.approx(1 / 4)  # 4 positives
    assert (r["n_exit"], r["n_exit_pos"], r["n_missed"]) == (4, 2, 1)
    none = np.zeros(7, bool)
    assert np.isnan(M.selective_error(y, lab, none)) and np.isnan(M.fnr_exit(y, lab, none))
    assert M.coverage(none) == 0.0 and M.miss_rate(y, lab, none) == 0.0
    assert M.mean_set_size(np.array([0, 1, 2, 2])) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="boolean"):
        M.fnr_exit(y, lab, ex.astype(int))
