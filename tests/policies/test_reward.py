"""The subnet reward replay (policies.reward): every tracker rule on a hand-worked sequence, scikit-learn's
MCC as an oracle, the vectorised simulation against the plain replay, and the expected reward's properties."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage1._core.errors import DataError
from stage1.policies.reward import (
    binary_mcc,
    ema,
    expected_reward,
    metrics_at_prior,
    round_rewards,
    simulate_rewards,
    window_metrics,
)

A = -1.0  # abstain


def test_each_window_is_sliced_before_the_abstentions_are_dropped():
    # round 1: 0.9 for y=0 (wrong); rounds 2-10 abstain; round 11: 0.1 for y=0 (right).
    # At round 11 the last 10 entries are rounds 2-11; dropping the -1s leaves round 11 only: accuracy 1.
    # (Dropping first would keep rounds 1 and 11: accuracy 0.5.) The MCC window (rounds 1-11, kept 1 and 11)
    # has labels {0} only, so MCC = 0. Reward = (0.5 * 0 + 0.5 * 1) ** 3 = 0.125 (drop-first: 0.25**3).
    answers = [0.9] + [A] * 9 + [0.1]
    labels = [0] + [1] * 9 + [0]
    r = round_rewards(answers, labels)
    assert r[-1] == pytest.approx(0.125)
    # rounds 2-10 abstain: each pays 0
    assert np.all(r[1:10] == 0.0)
    # round 1: its own window holds one wrong answer: MCC 0 (one class), accuracy 0 -> 0
    assert r[0] == 0.0


def test_the_mcc_window_is_the_last_100_entries_abstentions_included():
    # round 1: 0.9 for y=0 (wrong); rounds 2-100 abstain; round 101: 0.9 for y=1; round 102: 0.1 for y=0.
    # Round 101: the last 100 are rounds 2-101, kept: round 101 only -> one label class -> MCC 0; the last 10
    #   (92-101) keep round 101, right -> accuracy 1; reward (0 + 0.5) ** 3 = 0.125.
    # Round 102: the last 100 are rounds 3-102 (round 1 has left), kept 101 and 102: y = [1, 0], pred = [1, 0]
    #   -> MCC 1; accuracy over 93-102: 2/2 = 1; reward (0.5 + 0.5) ** 3 = 1.
    #   (Had round 1 stayed: y = [0, 1, 0], pred = [1, 1, 0], MCC = (1*1 - 1*0) / sqrt(2*1*2*1) = 0.5,
    #   reward 0.75 ** 3 = 0.421875.)
    answers = [0.9] + [A] * 99 + [0.9, 0.1]
    labels = [0] + [1] * 99 + [1, 0]
    r = round_rewards(answers, labels)
    assert r[100] == pytest.approx(0.125)
    assert r[101] == pytest.approx(1.0)


def test_answers_are_rounded_and_one_half_counts_as_class_0():
    # round 1: 0.5 for y=0 -> np.round(0.5) = 0, right; MCC 0 (one label class); acc 1 -> 0.5**3 = 0.125.
    # round 2: 0.5 for y=1 -> predicted 0, wrong; predictions [0, 0] are one class -> MCC 0; acc 1/2
    #   -> 0.25**3 = 0.015625.
    # round 3: 0.51 for y=1 -> predicted 1; y = [0, 1, 1], pred = [0, 0, 1]: tp 1, fn 1, tn 1, fp 0,
    #   MCC = (1*1 - 0*1) / sqrt((1+0)(1+1)(1+0)(1+1)) = 1/2; acc 2/3 -> (1/4 + 1/3)**3 = (7/12)**3.
    r = round_rewards([0.5, 0.5, 0.51], [0, 1, 1])
    np.testing.assert_allclose(r, [0.125, 0.015625, (7 / 12) ** 3])


def test_mcc_is_clipped_at_zero():
    # y = [0, 1, 1], answers [0.9, 0.1, 0.9] -> pred [1, 0, 1]: tp 1, fp 1, fn 1, tn 0,
    # MCC = (1*0 - 1*1) / sqrt((1+1)(1+1)(0+1)(0+1)) = -1/2 -> clipped to 0; acc 1/3 -> (1/6)**3 = 1/216.
    r = round_rewards([0.9, 0.1, 0.9], [0, 1, 1])
    assert r[2] == pytest.approx(1 / 216)
    assert window_metrics(np.array([0.9, 0.1, 0.9]), np.array([0, 1, 1])) == (0.0, pytest.approx(1 / 3))
    # round 2 alone: y = [0, 1], pred = [1, 0]: MCC -1 -> 0, accuracy 0 -> reward 0
    assert r[1] == 0.0


def test_mcc_is_zero_unless_both_classes_occur():
    # labels of one class: y = [1, 1], pred = [1, 0] -> MCC 0 (the tracker's rule), accuracy 1/2
    assert window_metrics(np.array([0.9, 0.2]), np.array([1, 1])) == (0.0, 0.5)
    # predictions of one class: y = [1, 0], pred = [1, 1] -> MCC's denominator is 0 -> 0, accuracy 1/2
    assert window_metrics(np.array([0.9, 0.8]), np.array([1, 0])) == (0.0, 0.5)
    # only abstentions: empty window -> both 0
    assert window_metrics(np.array([A, A]), np.array([1, 0])) == (0.0, 0.0)


def test_out_of_range_answer_pays_zero_but_stays_in_the_windows():
    # round 1: 1.5 for y=1: outside [0, 1] -> reward 0. It stays in the windows as np.round(1.5) = 2.
    # round 2: 0.1 for y=0 -> pred 0. Window: y = [1, 0], pred = [2, 0]: accuracy 1/2; scikit-learn's
    #   multiclass MCC over classes {0, 1, 2}: t = [1, 1, 0], p = [1, 0, 1], c = 1, s = 2:
    #   (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (2 - 1) / sqrt(2 * 2) = 1/2
    #   -> reward (0.25 + 0.25)**3 = 0.125.
    # round 3: -0.2 for y=1: pays 0 (out of range), even though -0.2 is not the abstain value -1.
    r = round_rewards([1.5, 0.1, -0.2], [1, 0, 1])
    np.testing.assert_allclose(r, [0.0, 0.125, 0.0])


def test_reward_is_the_cube_of_the_blend():
    # y = [1, 0, 1, 0], answers right on rounds 1, 2, 4 and wrong on 3 (0.2 for y=1):
    # round 4: pred = [1, 0, 0, 0]: tp 1, fn 1, tn 2, fp 0; MCC = (1*2 - 0) / sqrt(1 * 2 * 2 * 3) = 2/sqrt(12);
    # accuracy 3/4; reward = (0.5 * 0.57735 + 0.5 * 0.75) ** 3 = 0.66367**3 = 0.29233
    r = round_rewards([0.8, 0.3, 0.2, 0.1], [1, 0, 1, 0])
    blend = 0.5 * 2 / np.sqrt(12) + 0.5 * 0.75
    assert r[3] == pytest.approx(blend ** 3)
    assert r[3] == pytest.approx(0.29233, abs=1e-5)


def test_ema_with_alpha_005():
    # s1 = 0.05 * 1 = 0.05; s2 = 0.95 * 0.05 = 0.0475; s3 = 0.95 * 0.0475 + 0.05 = 0.095125
    np.testing.assert_allclose(ema([1.0, 0.0, 1.0]), [0.05, 0.0475, 0.095125])
    assert ema([0.2] * 2000, start=1.0)[-1] == pytest.approx(0.2)


def _tracker_with_sklearn(answers, labels):
    """The validators' loop written independently with a deque and scikit-learn's matthews_corrcoef."""
    from sklearn.metrics import matthews_corrcoef

    hist = deque(maxlen=100)
    out = []
    for a, y in zip(answers, labels):
        hist.append((a, y))
        vals = []
        for w in (100, 10):
            recent = list(hist)[-w:]
            kept = [(p, t) for p, t in recent if p != -1]
            pred = np.round(np.array([p for p, _ in kept]))
            lab = np.array([t for _, t in kept])
            acc = float(np.mean(pred == lab)) if len(kept) else 0.0
            mcc = max(0.0, matthews_corrcoef(lab, pred)) if len(np.unique(lab)) > 1 else 0.0
            vals.append((mcc, acc))
        bad = a < 0 or a > 1
        out.append(0.0 if a == -1 else (0.5 * vals[0][0] + 0.5 * vals[1][1]) ** 3 * (0.0 if bad else 1.0))
    return np.array(out)


def test_replay_matches_an_independent_tracker_using_sklearn_mcc():
    rng = np.random.default_rng(3)
    n = 260
    y = rng.integers(0, 2, n)
    answers = np.clip(np.where(y == 1, 0.7, 0.3) + rng.normal(0, 0.3, n), 0, 1)
    answers[rng.random(n) < 0.25] = -1.0
    answers[rng.random(n) < 0.03] = 1.7  # out of range: rounds to 2
    np.testing.assert_allclose(round_rewards(answers, y), _tracker_with_sklearn(answers, y), atol=1e-12)


def test_binary_mcc_matches_sklearn():
    from sklearn.metrics import matthews_corrcoef

    rng = np.random.default_rng(5)
    for _ in range(20):
        y, p = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
        tp, fp = np.sum((p == 1) & (y == 1)), np.sum((p == 1) & (y == 0))
        fn, tn = np.sum((p == 0) & (y == 1)), np.sum((p == 0) & (y == 0))
        assert float(binary_mcc(tp, fp, fn, tn)) == pytest.approx(matthews_corrcoef(y, p), abs=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 250), abstain=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_vectorised_simulation_equals_the_replay(n, abstain, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    answers = rng.choice([0.0, 0.2, 0.5, 0.51, 0.9, 1.0], n)
    answers[rng.random(n) < abstain] = -1.0
    fast = simulate_rewards((answers != -1)[None], (np.round(answers) == 1)[None], y[None])[0]
    np.testing.assert_allclose(fast, round_rewards(answers, y), atol=1e-12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 200), seed=st.integers(0, 10_000), abstain=st.floats(0, 1), prior=st.floats(0.05, 0.95))
def test_expected_reward_properties(n, seed, abstain, prior):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes
    answers = rng.random(n)
    answers[rng.random(n) < abstain] = -1.0
    kw = dict(prior=prior, n_rounds=60, n_orderings=8, seed=seed)
    est = expected_reward(answers, y, **kw)
    assert 0.0 <= est.lo <= est.mean <= 1.0 and est.lo <= est.hi <= 1.0 and 0.0 <= est.answer_rate <= 1.0
    # abstaining everywhere pays nothing
    none = expected_reward(np.full(n, -1.0), y, **kw)
    assert none.mean == 0.0 and none.answer_rate == 0.0
    # a perfect answerer (any p on the right side of 0.5) is paid 1 every round once the windows hold both classes
    perfect = np.where(y == 1, rng.uniform(0.51, 1.0, n), rng.uniform(0.0, 0.5, n))
    assert expected_reward(perfect, y, **{**kw, "prior": 0.5, "n_orderings": 4}).mean == pytest.approx(1.0)


def test_expected_reward_draws_labels_at_the_prior_and_is_seeded():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(900, int), np.ones(100, int)]  # a 10% positive set, played 50/50
    p = np.clip(np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.25, len(y)), 0, 1)
    a = expected_reward(p, y, seed=1)
    assert a == expected_reward(p, y, seed=1) and a.prior == 0.5 and a.n_rounds == 500 and a.burn_in == 100
    # always answering 1 at the 50/50 mix: MCC 0 (one predicted class); accuracy over 10 is X / 10 with
    # X ~ Binomial(10, 1/2) (mean 1/2, variance 1/40, symmetric), so E[(acc / 2)**3] = (1/8)(1/8 + 3 (1/2)(1/40))
    # = 0.0203125 (a 10% positive set played 50/50, not at its own rate, where it would be about 0.0001)
    ones = expected_reward(np.ones(len(y)), y, seed=1)
    assert ones.mean == pytest.approx(0.0203125, rel=0.05)
    with pytest.raises(DataError, match="no y=1"):
        expected_reward(p[:900], y[:900])
    with pytest.raises(DataError, match=r"\[0, 1\] or -1"):
        expected_reward(np.full(len(y), 1.5), y)


def test_metrics_at_prior_reweights_by_class():
    from stage1.policies.metrics import selective_risks

    # y = [1, 1, 0, 0, 0, 0, 0, 0], every row exits; errors: one positive called 0, one negative called 1.
    # At the set's own rate (0.25) the metrics are the plain ones. At prior 0.5 each positive weighs
    # 0.5 / 2 = 0.25 and each negative 0.5 / 6: accuracy = 0.25 (tp) + 5 * 0.5/6 (tn) = 0.25 + 0.41667 = 0.66667;
    # fnr_exit = fn / (tp + fn) = 1/2 at any prior; selective error = 0.25 + 0.5/6 = 0.33333.
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    label = np.array([1, 0, 1, 0, 0, 0, 0, 0])
    ex = np.ones(8, bool)
    same = metrics_at_prior(y, label, ex, 0.25)
    plain = selective_risks(y, label, ex)
    for k in ("coverage", "selective_error", "fnr_exit", "miss_rate"):
        assert same[k] == pytest.approx(plain[k])
    half = metrics_at_prior(y, label, ex, 0.5)
    assert half["accuracy"] == pytest.approx(2 / 3) and half["selective_error"] == pytest.approx(1 / 3)
    assert half["fnr_exit"] == pytest.approx(0.5) and half["coverage"] == pytest.approx(1.0)
    # defer the wrong negative: coverage 1 - 0.5/6, accuracy (0.25 + 5 * 0.5/6) / (1 - 0.5/6) = 0.72727
    ex[2] = False
    assert metrics_at_prior(y, label, ex, 0.5)["accuracy"] == pytest.approx((0.25 + 2.5 / 6) / (1 - 0.5 / 6))
    with pytest.raises(DataError):
        metrics_at_prior(y, label, ex, 1.0)
