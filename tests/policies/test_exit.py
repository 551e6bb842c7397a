"""Exit policies: registry contract, each rule's definition, LTT against MAPIE, failure modes."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import softmax

from stage1.policies import LEVELS, POLICIES, Decision, policy_from_dict
from stage1.policies.audit import synthetic_scores
from stage1.policies.metrics import selective_risks
from stage1.policies.pvalues import binomial_pvalue, trials_needed

#: contract-test settings per policy; the contract tests run over POLICIES.names(), and a registered
#: policy missing here fails test_every_registered_policy_has_contract_settings.
PARAMS = {
    "threshold": {"threshold": 0.9},
    "coverage": {"target_coverage": 0.6},
    "crc": {"alpha": 0.05},
    "ltt": {"alpha": 0.05, "delta": 0.1},
    "scrc": {"alpha": 0.05, "xi": 0.6},
    "reward": {"n_boot": 5, "n_orderings": 40, "n_rounds": 200},
}


def test_every_registered_policy_has_contract_settings():
    assert {"coverage", "crc", "ltt", "scrc", "threshold"} <= set(POLICIES.names())
    assert sorted(PARAMS) == POLICIES.names()


@pytest.mark.parametrize("name", POLICIES.names())
@pytest.mark.parametrize("score", ["p", "select"])
def test_contract_and_json_round_trip(name, score, data):
    (cal, y), (test, ty) = data
    extra = {"select_calibrator": "platt"} if score == "select" else {}
    pol = POLICIES.create(name, score=score, **PARAMS[name], **extra)
    assert pol.fit(cal, y) is pol
    d = pol.decide(test)
    assert isinstance(d, Decision) and len(d) == len(ty)
    assert d.exit.dtype == bool and set(np.unique(d.pred_set)) <= {0, 1, 2}
    assert np.all((d.p_roadwork >= 0) & (d.p_roadwork <= 1))
    np.testing.assert_array_equal(d.pred_set == 2, ~d.exit)
    np.testing.assert_array_equal(d.pred_set[d.exit], d.label[d.exit])
    assert set(np.unique(d.level)) <= set(LEVELS)
    np.testing.assert_array_equal(np.char.startswith(d.level.astype(str), "CONFIDENT"), d.exit)
    np.testing.assert_array_equal(d.level[d.exit] == "CONFIDENT_1", d.label[d.exit] == 1)
    assert 0 < d.exit.mean() < 1
    assert isinstance(pol.certified, bool) and isinstance(pol.reason, str) and pol.reason
    text = json.dumps(pol.to_dict(), allow_nan=False)  # strict JSON
    again = policy_from_dict(json.loads(text))
    assert again.decide(test).equals(d)
    rec = d.to_records(paths=[f"img{i}.jpg" for i in range(len(d))])[0]
    assert list(rec) == ["path", "p_roadwork", "decision", "label", "pred_set", "select_score", "level"]
    deferred = d.to_records()[int(np.argmin(d.exit))]
    assert deferred["decision"] == "defer" and deferred["label"] is None and deferred["pred_set"] == [0, 1]


def test_threshold_is_the_seeds_rule(data):
    (cal, y), (test, _) = data
    pol = POLICIES.create("threshold", threshold=0.88).fit(cal, y)
    assert pol.calibrator is None and not pol.certified and "no risk guarantee" in pol.reason
    p = softmax(test["logits"], axis=1)[:, 1]
    d = pol.decide(test)
    np.testing.assert_array_equal(d.exit, (p >= 0.88) | (p <= 1 - 0.88))
    np.testing.assert_allclose(d.p_roadwork, p)
    sel = POLICIES.create("threshold", threshold=0.7, score="select").fit(cal, y)
    np.testing.assert_array_equal(sel.decide(test).exit, test["select"] >= 0.7)


def test_coverage_reaches_target_on_calibration(data):
    (cal, y), _ = data
    for target in (0.25, 0.6, 1.0):
        pol = POLICIES.create("coverage", target_coverage=target, score="select", calibrator=None).fit(cal, y)
        cov = pol.decide(cal).exit.mean()
        assert target <= cov <= target + 2 / len(y)


def test_crc_matches_brute_force_definition(data):
    (cal, y), _ = data
    alpha = 0.03
    pol = POLICIES.create("crc", alpha=alpha, calibrator=None).fit(cal, y)
    p = softmax(cal["logits"], axis=1)[:, 1]
    s, yhat = np.maximum(p, 1 - p), (p >= 0.5)
    n = int(y.sum())
    # smallest lambda on the data's own breakpoints with (n/(n+1)) R_n + 1/(n+1) <= alpha, exit-as-0 iff s > lambda
    cands = np.sort(np.r_[s, -np.inf])
    loss = np.array([np.sum((y == 1) & ~yhat & (s > lam)) for lam in cands]) / n
    ok = n / (n + 1) * loss + 1 / (n + 1) <= alpha
    lam = cands[np.argmax(ok)]
    assert pol.certified and pol.summary["crc_lambda"] == lam
    d = pol.decide(cal)
    np.testing.assert_array_equal(d.exit & ~d.label.astype(bool), ~yhat & (s > lam))
    fixed = POLICIES.create("crc", alpha=alpha, calibrator=None, exit1_threshold=0.75).fit(cal, y)
    np.testing.assert_array_equal(fixed.decide(cal).exit & yhat, yhat & (s >= 0.75))


def test_crc_not_certifiable_says_how_many_positives():
    sc, y = synthetic_scores(60, seed=4)
    pol = POLICIES.create("crc", alpha=0.01, calibrator=None).fit(sc, y)
    assert not pol.certified and pol.n_needed == 99 and "99" in pol.reason
    assert not pol.decide(sc).exit.any()


def _mapie_valid_pairs(p, y, thresholds, alpha, delta):
    mapie = pytest.importorskip("mapie.risk_control")

    def predict(X, t0, t1):
        x = np.asarray(X)[:, 0]
        out = np.full(len(x), np.nan)
        out[(x >= 0.5) & (x >= t1)] = 1
        out[(x < 0.5) & (1 - x >= t0)] = 0
        return out

    fnr_exit = mapie.BinaryRisk(
        risk_occurrence=lambda yt, yp: yp == 0,
        risk_condition=lambda yt, yp: (yt == 1) & ~np.isnan(yp),
        higher_is_better=False,
    )
    pairs = np.array([(a, b) for a in thresholds for b in thresholds])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctl = mapie.BinaryClassificationController(
            predict, fnr_exit, alpha, confidence_level=1 - delta,
            best_predict_param_choice=mapie.abstention_rate, list_predict_params=pairs,
            fwer_method="bonferroni",
        )
        ctl.calibrate(p[:, None], y)
    return {tuple(map(float, v)) for v in ctl.valid_predict_params}, ctl.best_predict_param


def test_ltt_bonferroni_equals_mapie(data):
    (cal, y), _ = data
    sub = {k: v[:1200] for k, v in cal.items()}
    pol = POLICIES.create(
        "ltt", calibrator=None, multiple_testing="bonferroni", grid=11, alpha=0.05, delta=0.1
    ).fit(sub, y[:1200])
    p = softmax(sub["logits"], axis=1)[:, 1]
    tab = pol.pair_table(np.maximum(p, 1 - p), (p >= 0.5).astype(int), y[:1200])
    valid, _ = pol._valid(tab["p"])
    t = tab["thresholds"]
    ours = {(float(t[i]), float(t[j])) for i, j in zip(*np.nonzero(valid))}
    theirs, best = _mapie_valid_pairs(p, y[:1200], t, 0.05, 0.1)
    assert len(ours) > 3 and ours == theirs
    assert (pol.t0, pol.t1) == best  # both maximise coverage (minimise abstention)


def test_ltt_fixed_sequence_definition(data):
    (cal, y), _ = data
    pol = POLICIES.create("ltt", calibrator=None, alpha=0.05, delta=0.1, grid=21).fit(cal, y)
    assert pol.summary["multiple_testing"] == "fixed_sequence"  # auto: fnr_exit is monotone along t0
    p = softmax(cal["logits"], axis=1)[:, 1]
    tab = pol.pair_table(np.maximum(p, 1 - p), (p >= 0.5).astype(int), y)
    # fnr_exit is blind to false alarms: only the most lenient exit-as-1 line can matter, so it gets
    # all of delta (the other lines have larger p-values and smaller coverage)
    assert pol.one_line() and pol.summary["n_hypotheses"] == tab["p"].shape[0]
    level = 0.1
    best_cov = 0
    j = tab["p"].shape[1] - 1
    for i in range(tab["p"].shape[0]):  # walk the line from strict to lenient t0, stop at first failure
        if tab["p"][i, j] > level:
            break
        best_cov = max(best_cov, tab["exits"][i, j])
    assert np.all(tab["p"][:, j] <= tab["p"].min(axis=1) + 1e-15)  # the lenient line dominates every row
    assert pol.certified and pol.summary["test_level"] == pytest.approx(level)
    assert pol.decide(cal).exit.sum() == best_cov
    r = selective_risks(y, pol.decide(cal).label.astype(int), pol.decide(cal).exit)
    assert r["fnr_exit"] <= 0.05


def test_ltt_holm_and_fallback_definitions():
    cal, y = synthetic_scores(3000, prevalence=0.3, separation=3.0, seed=12)
    p = softmax(cal["logits"], axis=1)[:, 1]
    s, yhat = np.maximum(p, 1 - p), (p >= 0.5).astype(int)
    kw = {"calibrator": None, "alpha": 0.05, "delta": 0.1, "eps": 0.1, "grid": 15}
    assert POLICIES.create("ltt", **kw).procedure() == "fallback"  # auto: selective error is not monotone
    holm = POLICIES.create("ltt", multiple_testing="holm", **kw)
    assert holm.procedure() == "holm"
    pv = holm.pair_table(s, yhat, y)["p"]
    valid, _ = holm._valid(pv)
    flat = np.sort(pv.ravel())  # step-down: reject the k smallest while p_(i) <= delta / (m - i)
    k = 0
    while k < flat.size and flat[k] <= 0.1 / (flat.size - k):
        k += 1
    assert k > 10 and valid.sum() == k and pv[valid].max() == flat[k - 1]
    bonf, _ = POLICIES.create("ltt", **kw, multiple_testing="bonferroni")._valid(pv)
    assert np.all(valid >= bonf)  # Holm rejects everything Bonferroni does
    fb = POLICIES.create("ltt", **kw, multiple_testing="fallback")
    fvalid, _ = fb._valid(pv)
    m0, lines = pv.shape
    for j in range(lines):  # Wiens' fallback along each line, by hand
        carry = 0.0
        for i in range(m0):
            w = 0.5 * 0.1 / lines if i == 0 else 0.5 * 0.1 / lines / (m0 - 1)
            level = w + carry
            assert fvalid[i, j] == (pv[i, j] <= level)
            carry = level if fvalid[i, j] else 0.0
    assert fvalid.sum() > 10


def test_ltt_with_selective_error_bound():
    cal, y = synthetic_scores(3000, prevalence=0.4, separation=4.0, seed=11)
    pol = POLICIES.create("ltt", alpha=0.05, delta=0.1, eps=0.02, calibrator=None).fit(cal, y)
    assert pol.certified and "selective error" in pol.reason
    d = pol.decide(cal)
    r = selective_risks(y, d.label.astype(int), d.exit)
    assert r["selective_error"] < 0.02 and r["fnr_exit"] < 0.05
    loose = POLICIES.create("ltt", alpha=0.05, delta=0.1, calibrator=None).fit(cal, y)
    assert loose.decide(cal).exit.sum() > d.exit.sum()  # the extra bound costs coverage


def test_no_exited_positives_does_not_break(data):
    (cal, y), _ = data
    neg = y == 0
    only_neg = {k: v[neg] for k, v in cal.items()}
    pol = POLICIES.create("ltt", calibrator=None).fit(only_neg, y[neg])  # zero positives at all
    assert not pol.certified and pol.n_needed > 1 and "every image is deferred" in pol.reason  # positives missing
    assert "no positives" in pol.reason
    assert not pol.decide(only_neg).exit.any()
    assert binomial_pvalue(0, 0, 0.05) == 1.0  # no trials: never rejected, never NaN
    sel = POLICIES.create(
        "ltt", calibrator=None, risk="selective_error", alpha=0.2, multiple_testing="bonferroni"
    ).fit(only_neg, y[neg])
    assert sel.certified and sel.summary["n_pos_certify"] == 0  # certified without a single positive
    assert sel.summary["calib_selective_error"] <= 0.2 and np.isnan(sel.summary["calib_fnr_exit"])


def test_not_certifiable_reports_positives_needed():
    small, ys = synthetic_scores(200, prevalence=0.3, seed=7)
    pol = POLICIES.create("ltt", alpha=0.02, delta=0.1).fit(small, ys)
    assert not pol.certified and not pol.decide(small).exit.any()
    n_pos = pol.summary["n_pos_certify"]
    assert pol.n_needed is not None and pol.n_needed > n_pos
    assert f"{pol.n_needed} calibration positives" in pol.reason
    # with comfortably more positives than stated, the same model certifies
    big, yb = synthetic_scores(int(2.0 * pol.n_needed / 0.3 / 0.7), prevalence=0.3, seed=8)
    assert POLICIES.create("ltt", alpha=0.02, delta=0.1).fit(big, yb).certified


def test_hopeless_risk_says_more_data_will_not_help():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    wrong = np.stack([np.zeros(2000), np.where(y == 1, -1.0, 1.0) * rng.uniform(0.5, 5, 2000)], 1)
    pol = POLICIES.create("ltt", risk="selective_error", alpha=0.1, calibrator=None).fit({"logits": wrong}, y)
    assert not pol.certified and pol.n_needed is None and "will not help" in pol.reason  # every exit is wrong
    logits = rng.normal(0, 1, (2000, 2))  # no signal at all
    fnr = POLICIES.create("ltt", alpha=0.01, calibrator=None).fit({"logits": logits}, y)
    # exiting every predicted positive has FNR_exit = 0, which is true and certified -- and the reason
    # says plainly that the false alarms it lets through are not bounded
    assert fnr.certified and fnr.t1 == 0.5 and "false alarms" in fnr.reason and "not bounded" in fnr.reason
    both = POLICIES.create("ltt", alpha=0.01, eps=0.1, calibrator=None).fit({"logits": logits}, y)
    assert not both.certified and both.n_needed is None  # half of every exit is wrong: hopeless


def test_trials_needed_is_consistent_with_pvalue():
    n = trials_needed(np.array([0.0, 0.01, 0.05]), 0.05, 0.01)
    assert n[0] == pytest.approx(math.log(0.01) / math.log(0.95), rel=0.03)
    assert np.isinf(n[2])
    assert binomial_pvalue(np.floor(0.01 * n[1]), n[1], 0.05) <= 0.01
    assert binomial_pvalue(np.floor(0.01 * n[1] * 0.9), n[1] * 0.9, 0.05) > 0.01
    hb = binomial_pvalue(np.array([0, 3, 10]), np.array([100, 100, 100]), 0.05, "hoeffding_bentkus")
    cp = binomial_pvalue(np.array([0, 3, 10]), np.array([100, 100, 100]), 0.05)
    assert np.all(hb >= cp - 1e-15)


def test_levels_from_band(data):
    (cal, y), (test, _) = data
    pol = POLICIES.create("threshold", threshold=0.95, ambiguous_band=0.15).fit(cal, y)
    d = pol.decide(test)
    amb = ~d.exit & (np.abs(d.p_roadwork - 0.5) <= 0.15)
    np.testing.assert_array_equal(d.level == "AMBIGUOUS", amb)
    np.testing.assert_array_equal(d.level == "UNCERTAIN", ~d.exit & ~amb)


def test_calibrator_split_and_select_calibration(data):
    (cal, y), _ = data
    pol = POLICIES.create("ltt", calibrator="temperature", calib_fraction=0.4, seed=3).fit(cal, y)
    assert pol.summary["n_fit_calibrator"] == pytest.approx(0.4 * len(y), abs=2)
    assert pol.summary["n_certify"] == len(y) - pol.summary["n_fit_calibrator"]
    assert pol.cal is not None and pol.cal.temperature > 1.2  # the data are overconfident
    iso = POLICIES.create("crc", score="select", select_calibrator="isotonic").fit(cal, y)
    assert iso.select_cal is not None and iso.certified
    with pytest.raises(ValueError, match="select_calibrator"):
        wide = dict(cal, select=cal["select"] * 5)
        POLICIES.create("ltt", score="select", calibrator=None).fit(wide, y)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("ltt", {"alpha": 0}, "alpha"),
        ("ltt", {"delta": 1.5}, "delta"),
        ("ltt", {"risk": "auc"}, "risk"),
        ("ltt", {"pvalue": "bootstrap"}, "pvalue"),
        ("ltt", {"multiple_testing": "hochberg"}, "multiple_testing"),
        ("ltt", {"grid": 1}, "grid"),
        ("ltt", {"risk": "selective_error", "eps": 0.1}, "eps"),
        ("crc", {"risk": "fnr_exit"}, "ltt"),
        ("threshold", {"threshold": 1.5}, "threshold"),
        ("coverage", {"target_coverage": 0}, "target_coverage"),
        ("coverage", {"calibrator": "magic"}, "unknown calibrator"),
        ("coverage", {"score": "gate"}, "score"),
        ("coverage", {"select_calibrator": "platt"}, "score='select'"),
        ("coverage", {"calib_fraction": 1.0}, "calib_fraction"),
        ("coverage", {"ambiguous_band": 0.7}, "ambiguous_band"),
    ],
)
def test_parameter_validation(name, params, match):
    with pytest.raises(ValueError, match=match):
        POLICIES.create(name, **params)


def test_input_validation_and_json_errors(data):
    (cal, y), _ = data
    pol = POLICIES.create("ltt")
    with pytest.raises(RuntimeError, match="not fitted"):
        pol.decide(cal)
    with pytest.raises(ValueError, match="shape"):
        pol.fit({"logits": cal["logits"][:, :1]}, y)
    with pytest.raises(ValueError, match="0/1"):
        pol.fit(cal, np.where(y == 1, 1, -1))
    with pytest.raises(ValueError, match="select"):
        POLICIES.create("ltt", score="select").fit({"logits": cal["logits"]}, y)
    d = POLICIES.create("threshold").fit(cal, y).to_dict()
    with pytest.raises(ValueError, match="schema_version"):
        policy_from_dict({**d, "schema_version": 99})
    with pytest.raises(ValueError, match="parameters"):
        policy_from_dict({**d, "params": {**d["params"], "bogus": 1}})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 300),
    prevalence=st.floats(0.0, 1.0),
    over=st.floats(0.3, 4.0),
    seed=st.integers(0, 10_000),
    name=st.sampled_from(sorted(PARAMS)),
    score=st.sampled_from(["p", "select"]),
)
def test_properties_never_crash_and_never_overclaim(n, prevalence, over, seed, name, score):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    theta = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    scores = {"logits": np.stack([np.zeros(n), over * 2 * theta], 1), "select": rng.random(n)}
    pol = POLICIES.create(name, score=score, calibrator=None, **PARAMS[name]).fit(scores, y)
    d = pol.decide(scores)
    if pol.guarantee != "none" and not pol.certified:
        assert not d.exit.any() and pol.reason
    if name == "ltt" and pol.certified:
        assert pol.summary["p_value"] <= pol.summary["test_level"]
    assert policy_from_dict(json.loads(json.dumps(pol.to_dict(), allow_nan=False))).decide(scores).equals(d)


def test_hoeffding_bentkus_matches_mapie_and_is_more_conservative():
    methods = pytest.importorskip("mapie.risk_control.methods")
    k, n = np.array([0, 1, 5, 12, 30]), np.array([50, 80, 200, 300, 400])
    ours = binomial_pvalue(k, n, 0.05, "hoeffding_bentkus")
    theirs = methods.compute_hoeffding_bentkus_p_value(k / n, n, 0.05, binary=False)[:, 0]
    np.testing.assert_allclose(ours, np.minimum(theirs, 1.0), rtol=1e-10)
    cal, y = synthetic_scores(3000, prevalence=0.4, separation=3.0, seed=13)
    kw = {"calibrator": None, "alpha": 0.03, "multiple_testing": "bonferroni"}
    cp = POLICIES.create("ltt", **kw).fit(cal, y)
    hb = POLICIES.create("ltt", pvalue="hoeffding_bentkus", **kw).fit(cal, y)
    assert hb.certified and "hoeffding_bentkus" in hb.reason
    assert hb.summary["n_valid"] <= cp.summary["n_valid"]
    assert hb.summary["calib_coverage"] <= cp.summary["calib_coverage"]


def test_ltt_explicit_grid_and_miss_rate_risk():
    cal, y = synthetic_scores(4000, prevalence=0.4, separation=3.0, seed=14)
    pol = POLICIES.create("ltt", calibrator=None, grid=[0.6, 0.95, 0.8], alpha=0.05).fit(cal, y)
    np.testing.assert_array_equal(pol.thresholds(), [np.inf, 0.95, 0.8, 0.6])
    assert pol.certified and pol.t0 in (np.inf, 0.95, 0.8, 0.6) and pol.t1 in (np.inf, 0.95, 0.8, 0.6)
    miss = POLICIES.create("ltt", calibrator=None, risk="miss_rate", alpha=0.01).fit(cal, y)
    assert miss.certified and "miss_rate" in miss.reason and miss.summary["calib_miss_rate"] <= 0.01
    sel = POLICIES.create("ltt", calibrator=None, risk="selective_error", alpha=0.03).fit(cal, y)
    assert sel.certified and sel.summary["calib_selective_error"] <= 0.03


def test_calibrator_params_and_seed_are_used():
    cal, y = synthetic_scores(2000, seed=15, overconfidence=2.0)
    pol = POLICIES.create("crc", calibrator="dirichlet", calibrator_params={"lam": 50.0, "mu": 50.0}).fit(cal, y)
    assert pol.cal.lam == 50.0 and pol.cal.mu == 50.0
    again = policy_from_dict(json.loads(json.dumps(pol.to_dict())))
    assert again.cal.lam == 50.0 and again.decide(cal).equals(pol.decide(cal))
    with pytest.raises(ValueError, match="not accepted by 'temperature'"):
        POLICIES.create("crc", calibrator="temperature", calibrator_params={"lam": 1.0})
    a = POLICIES.create("ltt", seed=1).fit(cal, y).cal.temperature
    b = POLICIES.create("ltt", seed=2).fit(cal, y).cal.temperature
    c = POLICIES.create("ltt", seed=1).fit(cal, y).cal.temperature
    assert a == c and a != b  # the seed picks the calibrator's part of val_calib, deterministically


# -- tiny val_calib: not certified, with the size needed (not an error) ---------------------------
@pytest.mark.parametrize("name", ["ltt", "crc"])
@pytest.mark.parametrize("n", [1, 2])
def test_tiny_val_calib_is_not_certified_and_says_what_is_needed(name: str, n: int) -> None:
    import numpy as np

    from stage1.policies import POLICIES, policy_from_dict

    y = np.array([1, 0])[:n]
    logits = np.stack([np.zeros(n), (2 * y - 1) * 3.0], 1)
    pol = POLICIES.create(name).fit({"logits": logits}, y)
    assert pol.certified is False and isinstance(pol.n_needed, int) and pol.n_needed > 1
    assert f"{pol.n_needed} calibration positives" in pol.reason and "too few" in pol.reason
    back = policy_from_dict(pol.to_dict())
    assert not back.decide({"logits": logits}).exit.any() and back.n_needed == pol.n_needed


def test_ltt_without_positives_says_positives_are_missing() -> None:
    import numpy as np

    from stage1.policies import POLICIES

    y = np.zeros(60, dtype=np.int64)
    pol = POLICIES.create("ltt", calibrator=None).fit({"logits": np.stack([np.zeros(60), -np.ones(60) * 3], 1)}, y)
    assert pol.certified is False and isinstance(pol.n_needed, int) and pol.n_needed > 1
    assert "no positives" in pol.reason and f"{pol.n_needed} calibration positives" in pol.reason
    assert "will not help" not in pol.reason
