"""The registered ``scrc`` exit policy (policies.scrc_policy): contract, levels and sets, the certificate
it fits (the core's fit_scrc on its certification rows), rows needed, JSON, and a MAPIE cross-check."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from policies.conftest import prefit_p1_classifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import softmax

from stage1._core.errors import ConfigError
from stage1.policies import LEVELS, POLICIES, Decision, policy_from_dict
from stage1.policies import scrc as S
from stage1.policies.audit import scrc_draw, synthetic_scores
from stage1.policies.base import stratified_split
from stage1.policies.scrc_policy import SCRCPolicy


def test_registered_with_its_guarantee_and_bounded_risks():
    assert "scrc" in POLICIES.names() and POLICIES.get("scrc") is SCRCPolicy
    pol = POLICIES.create("scrc")
    assert pol.name == "scrc" and pol.guarantee == "scrc"
    assert pol.certifies() == {"miscoverage_selected": "pac"}
    assert POLICIES.create("scrc", risk_bound="hoeffding").certifies() == {"miscoverage_selected": "pac"}
    assert POLICIES.create("scrc", risk_bound="crc").certifies() == {"miscoverage_selected": "expectation"}
    names = SCRCPolicy.PARAMS.names()
    assert names[:7] == ["xi", "alpha", "delta", "delta_split", "selection_bound", "risk_bound", "nonempty"]
    assert {"calibrator", "score", "select_calibrator", "calib_fraction", "seed"} <= set(names)
    assert "ambiguous_band" not in names  # AMBIGUOUS comes from the certified sets, not from a band
    with pytest.raises(ConfigError, match="ambiguous_band"):
        POLICIES.create("scrc", ambiguous_band=0.1)
    assert POLICIES.create("scrc", **pol.params()).params() == pol.params()


@pytest.mark.parametrize("score,extra", [("p", {}), ("select", {}), ("select", {"select_calibrator": "platt"})])
def test_contract_levels_sets_and_json_round_trip(score, extra, data):
    (cal, y), (test, ty) = data
    pol = POLICIES.create("scrc", score=score, alpha=0.03, xi=0.6, **extra)
    assert pol.fit(cal, y) is pol and pol.certified and pol.n_needed is None
    assert "miscoverage bound" in pol.reason
    d = pol.decide(test)
    assert isinstance(d, Decision) and len(d) == len(ty) and d.exit.dtype == bool
    st_ = pol.state
    s = d.score
    selected = s > st_.threshold1
    sets = S.prediction_sets(d.p_roadwork, st_.lambda2)
    single = (sets == S.SET_0) | (sets == S.SET_1)
    # exit iff selected and the set is a singleton; the label is the singleton
    np.testing.assert_array_equal(d.exit, selected & single)
    np.testing.assert_array_equal(d.label[d.exit], sets[d.exit])
    np.testing.assert_array_equal(d.pred_set[d.exit], sets[d.exit])
    # AMBIGUOUS iff selected with {0, 1}; UNCERTAIN iff not selected; deferred rows carry {0, 1}
    np.testing.assert_array_equal(d.level == "AMBIGUOUS", selected & (sets == S.SET_01))
    np.testing.assert_array_equal(d.level == "UNCERTAIN", ~selected)
    np.testing.assert_array_equal(d.pred_set == 2, ~d.exit)
    np.testing.assert_array_equal(d.level[d.exit] == "CONFIDENT_1", d.label[d.exit] == 1)
    assert set(np.unique(d.level)) <= set(LEVELS)
    assert 0 < d.exit.mean() < 1 and (d.level == "AMBIGUOUS").any() and (d.level == "UNCERTAIN").any()
    np.testing.assert_array_equal(d.label, np.where(d.exit, d.label, d.p_roadwork >= 0.5))  # label = argmax
    # t0 = t1 is the selection threshold in the base convention s >= t
    np.testing.assert_array_equal(s >= pol.t1, selected)
    text = json.dumps(pol.to_dict(), allow_nan=False)
    again = policy_from_dict(json.loads(text))
    assert isinstance(again, SCRCPolicy) and again.state == pol.state and again.certified
    assert again.decide(test).equals(d) and json.loads(text)["guarantee"] == "scrc"
    assert json.loads(text)["bounds"] == {"miscoverage_selected": "pac"}
    rec = d.to_records()[int(np.argmax(d.level == "AMBIGUOUS"))]
    assert rec["decision"] == "defer" and rec["label"] is None and rec["pred_set"] == [0, 1]


def test_certificate_is_fit_scrc_on_the_certification_rows(data):
    (cal, y), _ = data
    kw = dict(xi=0.65, alpha=0.04, delta=0.08, delta_split=0.3, selection_bound="hoeffding", risk_bound="binomial")
    pol = POLICIES.create("scrc", seed=4, **kw).fit(cal, y)
    fit_idx, cert_idx = stratified_split(y, 0.3, 4)  # the base convention: 0.3 fits the calibrator
    assert pol.summary["n_fit_calibrator"] == len(fit_idx) and pol.summary["n_certify"] == len(cert_idx)
    p = pol.cal.p1(cal["logits"])
    s = np.maximum(p, 1 - p)
    ref = S.fit_scrc(s[cert_idx], p[cert_idx], y[cert_idx], nonempty=True, **kw)
    assert pol.state == ref and pol.reason.startswith(ref.reason)
    assert (ref.delta1, ref.delta2) == pytest.approx((0.024, 0.056))
    # the calibration summary: selection coverage and miscoverage among selected on the certification rows
    sel = s[cert_idx] > ref.threshold1
    assert pol.summary["n_selected"] == sel.sum() == ref.n_selected
    assert pol.summary["calib_selection_coverage"] == pytest.approx(sel.mean())
    sets = S.prediction_sets(p[cert_idx][sel], ref.lambda2)
    miss = np.mean((sets != S.SET_01) & (sets != y[cert_idx][sel]))
    assert pol.summary["calib_miscoverage_selected"] == pytest.approx(miss)
    # no fitted calibrator: every row certifies
    raw = POLICIES.create("scrc", calibrator=None, **kw).fit(cal, y)
    p0 = softmax(cal["logits"], axis=1)[:, 1]
    assert raw.state == S.fit_scrc(np.maximum(p0, 1 - p0), p0, y, nonempty=True, **kw)
    assert raw.summary["n_certify"] == len(y)


def test_not_certifiable_says_how_many_rows_and_they_suffice():
    sc, y = synthetic_scores(4000, prevalence=0.4, seed=21)
    small = {k: v[:60] for k, v in sc.items()}
    pol = POLICIES.create("scrc", calibrator=None, alpha=0.05, xi=0.7).fit(small, y[:60])
    # binomial stage 2 needs ceil(ln(0.05) / ln(0.95)) = 59 selected rows
    assert not pol.certified and pol.state.n_selected_needed == 59
    assert pol.n_needed == pol.state.n_calib_needed and str(pol.n_needed) in pol.reason
    assert "every image is deferred" in pol.reason
    d = pol.decide(sc)
    assert not d.exit.any() and (d.pred_set == 2).all()
    np.testing.assert_array_equal(d.level == "AMBIGUOUS", d.score > pol.state.threshold1)  # selected, full sets
    n = pol.n_needed  # exact without selector ties: n rows certify, n - 1 do not
    assert POLICIES.create("scrc", calibrator=None, alpha=0.05, xi=0.7).fit(
        {k: v[:n] for k, v in sc.items()}, y[:n]).certified
    assert not POLICIES.create("scrc", calibrator=None, alpha=0.05, xi=0.7).fit(
        {k: v[: n - 1] for k, v in sc.items()}, y[: n - 1]).certified
    # with a fitted calibrator n_needed counts val_calib rows (the calibrator's 0.3 share included)
    cal = POLICIES.create("scrc", alpha=0.05, xi=0.7).fit(small, y[:60])
    assert cal.n_needed == math.ceil(cal.state.n_calib_needed / 0.7) and "fit the calibrator" in cal.reason
    big = int(cal.n_needed * 1.05) + 4  # rounding of the stratified split
    assert POLICIES.create("scrc", alpha=0.05, xi=0.7).fit({k: v[:big] for k, v in sc.items()}, y[:big]).certified


def test_in_expectation_variant_and_empty_sets(data):
    (cal, y), (test, _) = data
    pol = POLICIES.create("scrc", selection_bound="expectation", risk_bound="crc", alpha=0.2, xi=0.5,
                          calibrator=None).fit(cal, y)
    assert pol.certified and pol.state.delta1 == 0.0 and pol.state.delta2 == 0.0 and "CRC" in pol.reason
    assert pol.state.lambda2_raw < 0.5 and pol.state.lambda2 == 0.5  # the non-empty clamp
    raw = POLICIES.create("scrc", selection_bound="expectation", risk_bound="crc", alpha=0.2, xi=0.5,
                          calibrator=None, nonempty=False).fit(cal, y)
    d = raw.decide(test)
    sets = S.prediction_sets(d.p_roadwork, raw.state.lambda2)
    empty = (d.score > raw.state.threshold1) & (sets == S.SET_EMPTY)
    assert empty.any()  # selected rows with an empty set: deferred, AMBIGUOUS, reported as {0, 1}
    assert not d.exit[empty].any() and (d.level[empty] == "AMBIGUOUS").all() and (d.pred_set[empty] == 2).all()
    assert policy_from_dict(json.loads(json.dumps(raw.to_dict()))).decide(test).equals(d)


def test_json_errors(data):
    (cal, y), _ = data
    d = POLICIES.create("scrc").fit(cal, y).to_dict()
    broken = {**d, "state": {k: v for k, v in d["state"].items() if k != "scrc"}}
    with pytest.raises(ValueError, match="scrc"):
        policy_from_dict(broken)
    bad = {**d, "state": {**d["state"], "scrc": {"lambda2": 0.5}}}
    with pytest.raises(ValueError, match="missing"):
        policy_from_dict(bad)
    with pytest.raises(RuntimeError, match="not fitted"):
        POLICIES.create("scrc").decide(cal)
    with pytest.raises(ValueError, match="select"):
        POLICIES.create("scrc", score="select").fit({"logits": cal["logits"]}, y)


@pytest.mark.parametrize("params,match", [
    ({"xi": 0.0}, "xi"), ({"xi": 1.2}, "xi"), ({"alpha": 1.0}, "alpha"), ({"delta": 0.0}, "delta"),
    ({"delta_split": 1.0}, "delta_split"), ({"selection_bound": "dkw"}, "selection_bound"),
    ({"risk_bound": "wsr"}, "risk_bound"), ({"nonempty": "maybe"}, "nonempty"),
])
def test_parameter_validation(params, match):
    with pytest.raises(ConfigError, match=match):
        POLICIES.create("scrc", **params)


def test_stage2_matches_mapie_split_conformal_at_the_policy_level(data):
    """With the in-expectation stages and no calibrator, the policy's stage 2 is split-conformal LAC on
    the selected val_calib rows: MAPIE's conformal quantile equals lambda2, and on selected test rows
    MAPIE's sets are the policy's decisions (singleton = exit with that label, {0, 1} = AMBIGUOUS)."""
    from mapie.classification import SplitConformalClassifier

    (cal, y), (test, _) = data
    for alpha in (0.03, 0.06):
        pol = POLICIES.create("scrc", calibrator=None, selection_bound="expectation", risk_bound="crc",
                              alpha=alpha, xi=0.6).fit(cal, y)
        assert pol.state.lambda2_raw >= 0.5  # the non-empty clamp is inactive, so MAPIE's sets apply as they are
        p = softmax(cal["logits"], axis=1)[:, 1]
        sel = np.maximum(p, 1 - p) > pol.state.threshold1
        scc = SplitConformalClassifier(prefit_p1_classifier(), confidence_level=1 - alpha,
                                       conformity_score="lac", prefit=True)
        scc.conformalize(p[sel][:, None], y[sel])
        d = pol.decide(test)
        tsel = d.level != "UNCERTAIN"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, msets = scc.predict_set(d.p_roadwork[tsel][:, None])
        q = float(np.ravel(scc._mapie_classifier.conformity_score_function_.quantiles_)[0])  # set by predict_set
        assert pol.state.lambda2 == pytest.approx(q, abs=1e-12)
        m01 = msets[:, :, 0].astype(bool)
        ours = np.column_stack([d.pred_set[tsel] != 1, d.pred_set[tsel] != 0])  # {0}: (T, F), {1}: (F, T), {0,1}
        assert m01.sum(axis=1).min() >= 1 and np.array_equal(ours, m01)
        assert (d.level[tsel] == "AMBIGUOUS").any() and d.exit[tsel].any()


def test_scrc_draw_measures_selected_miscoverage():
    d = Decision(exit=np.array([True, True, False, False, False]), label=np.array([1, 0, 1, 0, 0]),
                 pred_set=np.array([1, 0, 2, 2, 2]), p_roadwork=np.full(5, 0.5),
                 level=np.array(["CONFIDENT_1", "CONFIDENT_0", "AMBIGUOUS", "UNCERTAIN", "UNCERTAIN"]),
                 score=np.zeros(5))
    risk, cov = scrc_draw(d, np.array([1, 1, 0, 1, 0]))  # the second exit misses; 3 of 5 selected
    assert risk == pytest.approx(1 / 3) and cov == pytest.approx(3 / 5)
    none = Decision(exit=np.zeros(2, bool), label=np.zeros(2, int), pred_set=np.full(2, 2), p_roadwork=np.full(2, .5),
                    level=np.array(["UNCERTAIN", "UNCERTAIN"]), score=np.zeros(2))
    risk, cov = scrc_draw(none, np.array([0, 1]))
    assert math.isnan(risk) and cov == 0.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 300),
    prevalence=st.floats(0.0, 1.0),
    over=st.floats(0.3, 4.0),
    seed=st.integers(0, 10_000),
    score=st.sampled_from(["p", "select"]),
    risk_bound=st.sampled_from(S.RISK_BOUNDS),
    selection_bound=st.sampled_from(S.SELECTION_BOUNDS),
)
def test_properties_never_crash_and_never_overclaim(n, prevalence, over, seed, score, risk_bound, selection_bound):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    theta = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    scores = {"logits": np.stack([np.zeros(n), over * 2 * theta], 1), "select": np.round(rng.random(n), 2)}
    pol = POLICIES.create("scrc", score=score, calibrator=None, alpha=0.1, xi=0.6, risk_bound=risk_bound,
                          selection_bound=selection_bound).fit(scores, y)
    d = pol.decide(scores)
    assert pol.reason
    if not pol.certified:
        assert not d.exit.any() and pol.n_needed is not None and pol.n_needed > 0
    np.testing.assert_array_equal(d.pred_set == 2, ~d.exit)
    assert policy_from_dict(json.loads(json.dumps(pol.to_dict(), allow_nan=False))).decide(scores).equals(d)
