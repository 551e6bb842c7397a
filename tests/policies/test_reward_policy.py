"""The ``reward`` exit policy: the band it chooses, never worse than answering everything on val_calib,
composition with a certified base policy, JSON, and the guarantee sentence it prints."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stage1._core.errors import ConfigError, DataError
from stage1.policies import POLICIES, policy_from_dict
from stage1.policies.audit import synthetic_scores
from stage1.policies.guarantee import guarantee_statement, is_guarantee_for
from stage1.policies.reward import expected_reward

FAST = {"n_boot": 5, "n_orderings": 40, "n_rounds": 200, "folds": 3}


def _answers(policy, scores):
    d = policy.decide(scores)
    return np.where(d.exit, d.p_roadwork, -1.0)


@pytest.fixture(scope="module")
def weak():
    """A mediocre model (about 80% accurate): abstaining on its least certain images pays."""
    cal = synthetic_scores(3000, prevalence=0.5, separation=1.2, overconfidence=1.0, seed=21)
    test = synthetic_scores(4000, prevalence=0.5, separation=1.2, overconfidence=1.0, seed=22)
    return cal, test


def test_reward_policy_gains_on_a_weak_model_and_holds_on_test(weak):
    (cal, y), (test, ty) = weak
    pol = POLICIES.create("reward", calibrator=None, **FAST).fit(cal, y)
    s = pol.summary
    assert 0.02 < s["abstain_rate"] < 0.5 and s["gain"] > 0.002 and s["gain_lo"] <= s["gain"] <= s["gain_hi"]
    assert pol.guarantee == "none" and not pol.certified and pol.certifies() == {}
    # the summary's rewards are expected_reward of the policy's answers on the same streams (seed, sizes)
    kw = dict(n_rounds=FAST["n_rounds"], n_orderings=FAST["n_orderings"], seed=pol.seed)
    mine = expected_reward(_answers(pol, cal), y, **kw).mean
    always = expected_reward(pol.decide(cal).p_roadwork, y, **kw).mean
    assert mine == pytest.approx(s["reward_policy"], abs=1e-12) and always == pytest.approx(s["reward_always"], abs=1e-12)
    # held-out rows: still better than answering everything
    kw["n_orderings"] = 100
    assert expected_reward(_answers(pol, test), ty, **kw).mean > expected_reward(
        pol.decide(test).p_roadwork, ty, **kw).mean


def test_the_choice_is_a_coordinate_optimum_by_brute_force(weak):
    (cal, y), _ = weak
    pol = POLICIES.create("reward", calibrator=None, grid=4, max_abstain=0.45, **{**FAST, "folds": 0}).fit(cal, y)
    p = pol.decide(cal).p_roadwork
    s, yhat = np.maximum(p, 1 - p), p >= 0.5
    kw = dict(n_rounds=FAST["n_rounds"], n_orderings=FAST["n_orderings"], seed=pol.seed)
    # candidates per predicted class: answer all, or abstain on the lowest 15% / 30% / 45% of its s values
    c0, c1 = pol._candidates(s, ~yhat), pol._candidates(s, yhat)
    assert len(c0) == len(c1) == 4 and c0[0] == c1[0] == -np.inf

    def reward(t0, t1):
        answered = s >= np.where(yhat, t1, t0)
        return expected_reward(np.where(answered, p, -1.0), y, **kw).mean

    chosen = reward(pol.t0, pol.t1)
    assert chosen == pytest.approx(pol.summary["reward_policy"], abs=1e-12) and pol.summary["n_candidates"] == 16
    # no single threshold move improves it, and it beats answering everything
    assert all(reward(t0, pol.t1) <= chosen + 1e-12 for t0 in c0)
    assert all(reward(pol.t0, t1) <= chosen + 1e-12 for t1 in c1)
    assert chosen > reward(-np.inf, -np.inf)


def test_never_worse_than_answering_everything_and_ties_answer(weak):
    (cal, y), _ = weak
    # a perfect model: every candidate earns 1, so the empty band (answer all) wins the tie
    perfect = {"logits": np.stack([np.zeros(len(y)), np.where(y == 1, 5.0, -5.0)], 1)}
    pol = POLICIES.create("reward", calibrator=None, **FAST).fit(perfect, y)
    assert (pol.t0, pol.t1) == (-np.inf, -np.inf) and pol.decide(perfect).exit.all()
    assert pol.summary["gain"] == 0.0 and "answer every image" in pol.reason
    # a gain must exceed min_gain, else it answers everything
    strict = POLICIES.create("reward", calibrator=None, min_gain=0.5, **FAST).fit(cal, y)
    assert strict.decide(cal).exit.all() and strict.summary["reward_policy"] == strict.summary["reward_always"]
    loose = POLICIES.create("reward", calibrator=None, **FAST).fit(cal, y)
    assert loose.summary["reward_policy"] >= loose.summary["reward_always"]


def test_one_class_val_calib_answers_everything():
    sc, y = synthetic_scores(50, prevalence=0.4, seed=3)
    ones = np.ones(len(y), dtype=int)
    pol = POLICIES.create("reward", calibrator=None, **FAST).fit(sc, ones)
    assert pol.decide(sc).exit.all() and "only y=1" in pol.reason


def test_prior_sets_the_simulated_label_mix(weak):
    (cal, y), _ = weak
    pol = POLICIES.create("reward", calibrator=None, prior=0.3, **FAST).fit(cal, y)
    assert pol.summary["prior"] == 0.3 and pol.sim_prior() == 0.3 and "prior 0.3" in pol.reason
    assert POLICIES.create("reward").sim_prior() == 0.5


def test_composes_with_a_certified_base(weak):
    (cal, y), (test, _) = weak
    kw = {"base": "ltt", "base_params": {"alpha": 0.05, "delta": 0.1}, **FAST}
    pol = POLICIES.create("reward", **kw).fit(cal, y)
    base = POLICIES.create("ltt", alpha=0.05, delta=0.1).fit(cal, y)  # the same scoring parameters: same fit
    bd, d = base.decide(test), pol.decide(test)
    assert base.certified and pol.base_policy is not None and pol.base_policy.certified
    assert 0 < bd.exit.mean() < d.exit.mean() < 1
    assert np.all(d.exit[bd.exit])  # the certified exits are always answered ...
    np.testing.assert_array_equal(d.label[bd.exit], bd.label[bd.exit])  # ... with the base's label
    np.testing.assert_array_equal(d.p_roadwork, bd.p_roadwork)  # the base's calibrated p
    assert pol.summary["base"] == "ltt" and pol.summary["base_certified"] is True
    again = policy_from_dict(json.loads(json.dumps(pol.to_dict(), allow_nan=False)))
    assert again.decide(test).equals(d) and again.base_policy.certified
    text = guarantee_statement(pol.to_dict())
    assert text.startswith("no guarantee: reward is an optimiser") and "its base ltt covers only" in text
    assert "P(fnr_exit > 0.05) <= 0.1" in text
    assert not is_guarantee_for(pol.to_dict(), "fnr_exit")


def test_uncertified_base_leaves_every_image_to_the_reward_rule():
    sc, y = synthetic_scores(80, prevalence=0.4, separation=1.0, seed=5)
    pol = POLICIES.create("reward", base="ltt", base_params={"alpha": 0.001}, **FAST).fit(sc, y)
    assert not pol.base_policy.certified and pol.summary["base_exit_rate"] == 0.0
    assert "certified nothing" in guarantee_statement(pol.to_dict())


def test_guarantee_sentence_alone():
    sc, y = synthetic_scores(600, prevalence=0.5, separation=1.2, seed=6)
    d = POLICIES.create("reward", **FAST).fit(sc, y).to_dict()
    text = guarantee_statement(d)
    assert text.startswith("no guarantee") and "not a certificate" in text and "in-sample" in text
    assert d["bounds"] == {} and d["guarantee"] == "none"


def test_bad_parameters_and_state():
    with pytest.raises(ConfigError, match="base_params needs base"):
        POLICIES.create("reward", base_params={"alpha": 0.1})
    with pytest.raises(ConfigError, match="scoring parameters"):
        POLICIES.create("reward", base="ltt", base_params={"calibrator": "platt"})
    with pytest.raises(ConfigError, match="alpha"):
        POLICIES.create("reward", base="ltt", base_params={"alpha": 3})
    with pytest.raises(ConfigError):
        POLICIES.create("reward", base="reward")
    with pytest.raises(ConfigError, match="max_abstain"):
        POLICIES.create("reward", max_abstain=1.0)
    sc, y = synthetic_scores(300, prevalence=0.5, seed=7)
    d = POLICIES.create("reward", base="threshold", **FAST).fit(sc, y).to_dict()
    del d["state"]["base"]
    with pytest.raises(DataError, match="state.base"):
        policy_from_dict(d)
