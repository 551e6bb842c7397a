"""Exchangeability alarm and live risk bounds (policies.monitor): validity in simulation, power, API."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from stage1._core.errors import ConfigError, DataError
from stage1.policies.monitor import (POWER_GRID, ExchangeabilityMonitor, OnlineConformal, TestMartingale,
                                     bernoulli_bounds, live_risk)


def _brute_pvalues(cal: np.ndarray, stream: np.ndarray, u: np.ndarray, sign: float) -> np.ndarray:
    seen = list(sign * cal)
    out = []
    for s, ut in zip(sign * stream, u):
        greater = sum(v > s for v in seen)
        equal = sum(v == s for v in seen)
        out.append((greater + ut * (equal + 1)) / (len(seen) + 1))
        seen.append(s)
    return np.asarray(out)


@pytest.mark.parametrize("strange", ["high", "low"])
def test_online_pvalues_match_definition_with_ties(strange):
    """Each stream score is ranked among val_calib and every earlier stream score; blocks do not matter."""
    rng = np.random.default_rng(0)
    cal = rng.integers(0, 5, 30).astype(float)
    stream = rng.integers(0, 6, 40).astype(float)
    u = np.random.default_rng(7).random(40)
    want = _brute_pvalues(cal, stream, u, 1.0 if strange == "high" else -1.0)
    np.testing.assert_allclose(OnlineConformal(cal, strange, seed=7).update(stream), want)
    small = OnlineConformal(cal, strange, seed=7, block=3)
    got = np.concatenate([small.update(stream[:11]), small.update(stream[11:])])
    np.testing.assert_allclose(got, want)
    assert small.n_seen == 70


def test_online_pvalues_exactly_uniform_with_many_ties():
    """Smoothed p-values are uniform even on heavily tied (integer) scores: KS over 3000 p-values of
    independent exchangeable streams (one p-value per stream, at a random position)."""
    ps = []
    for seed in range(3000):
        rng = np.random.default_rng(seed)
        scores = rng.integers(0, 4, 25).astype(float)
        ps.append(OnlineConformal(scores[:10], "high", seed=seed).update(scores[10:])[seed % 15])
    assert stats.kstest(ps, "uniform").pvalue > 1e-3


def test_simple_jumper_matches_vovk_algorithm():
    """Against a plain transcription of Simple Jumper (Vovk 2021, Algorithm 1), on one and many streams."""
    rng = np.random.default_rng(1)
    p = rng.random((4, 120)) ** 1.5
    jump = 0.05

    def naive(ps):
        c = {-1: 1 / 3, 0: 1 / 3, 1: 1 / 3}
        out = []
        for pt in ps:
            total = sum(c.values())
            c = {e: ((1 - jump) * v + jump * total / 3) * (1 + e * (pt - 0.5)) for e, v in c.items()}
            out.append(math.log(sum(c.values())))
        return np.asarray(out)

    want = np.stack([naive(row) for row in p])
    np.testing.assert_allclose(TestMartingale("simple_jumper", jump).update(p[0]), want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(TestMartingale("simple_jumper", jump, streams=4).update(p), want, rtol=1e-10, atol=1e-12)
    m = TestMartingale("simple_jumper", jump)
    np.testing.assert_allclose(np.r_[m.update(p[1, :50]), m.update(p[1, 50:])], want[1], rtol=1e-10, atol=1e-12)
    # jump = 1 mixes back to equal thirds every step: the bets cancel and M stays 1
    np.testing.assert_allclose(TestMartingale("simple_jumper", 1.0).update(p[0]), 0.0, atol=1e-12)


def test_power_mixture_matches_closed_form():
    p = np.random.default_rng(2).random(60)
    want = np.log(np.mean(np.exp(np.cumsum(np.log(POWER_GRID)[None, :] + (POWER_GRID - 1)[None, :]
                                           * np.log(p)[:, None], axis=0)), axis=1))
    m = TestMartingale("power_mixture")
    np.testing.assert_allclose(np.r_[m.update(p[:25]), m.update(p[25:])], want, rtol=1e-10)


@pytest.mark.parametrize("kind", ["simple_jumper", "power_mixture"])
def test_false_alarm_rate_at_most_level(kind):
    """Ville: over 400 seeded exchangeable streams (val_calib 100 rows, 300 stream items, two channels),
    the share that ever alarms is <= level + 3 s.e. (level 0.1, so a broken martingale would show)."""
    level, n_streams = 0.1, 400
    alarms = 0
    for seed in range(n_streams):
        rng = np.random.default_rng(20_000 + seed)
        cal, stream = rng.normal(size=(2, 100)), rng.normal(size=(2, 300))
        mon = ExchangeabilityMonitor({"select": cal[0], "novelty": cal[1]}, {"select": "low"}, level=level,
                                     martingale=kind, seed=seed)
        alarms += mon.update({"select": stream[0], "novelty": stream[1]}).alarm_time is not None
    rate = alarms / n_streams
    assert rate <= level + 3 * math.sqrt(level * (1 - level) / n_streams)


@pytest.mark.parametrize("kind,bound", [("simple_jumper", 30), ("power_mixture", 12)])
def test_alarm_fires_quickly_under_planted_shift(kind, bound):
    """A novelty channel whose stream is shifted by 1.5 sd from val_calib (200 rows), level 0.01: the
    median detection delay over 40 seeded streams was 21 (simple_jumper) and 8 (power_mixture) when
    measured; asserted with some room."""
    delays = []
    for seed in range(40):
        rng = np.random.default_rng(30_000 + seed)
        mon = ExchangeabilityMonitor({"novelty": rng.normal(size=200)}, level=0.01, martingale=kind, seed=seed)
        f = mon.update({"novelty": rng.normal(1.5, 1.0, size=200)})
        delays.append(f.alarm_time if f.alarm_time is not None else 10_000)
    assert np.median(delays) <= bound and max(delays) < 200


def test_monitor_averages_channels_and_reports_crossing():
    rng = np.random.default_rng(3)
    mon = ExchangeabilityMonitor({"a": rng.normal(size=100), "b": rng.normal(size=100)}, level=0.05, seed=1)
    f1 = mon.update({"a": rng.normal(size=30), "b": rng.normal(2.0, 1, size=30)})
    f = mon.update({"a": rng.normal(size=30), "b": rng.normal(2.0, 1, size=30)})
    assert len(f.log_martingale) == 60 and f.log_martingale[:30].tolist() == f1.log_martingale.tolist()
    mean = np.log((np.exp(f.log_martingales["a"]) + np.exp(f.log_martingales["b"])) / 2)
    np.testing.assert_allclose(f.log_martingale, mean, rtol=1e-10)
    assert f.threshold == 20.0
    first = int(np.flatnonzero(f.martingale >= 20.0)[0]) + 1
    assert f.alarm_time == first
    assert f.alarm_time is not None and f.log_martingales["b"][-1] > f.log_martingales["a"][-1]
    # a stricter level alarms later (or not at all)
    cal, shift = rng.normal(size=100), rng.normal(1.5, 1, size=100)
    t_strict = ExchangeabilityMonitor({"a": cal}, level=0.001, seed=1).update({"a": shift}).alarm_time
    t_lax = ExchangeabilityMonitor({"a": cal}, level=0.2, seed=1).update({"a": shift}).alarm_time
    assert t_lax is not None and (t_strict is None or t_strict > t_lax)


def test_seed_breaks_ties_reproducibly():
    cal = np.zeros(20)
    a = ExchangeabilityMonitor({"s": cal}, seed=1).update({"s": np.zeros(10)}).pvalues["s"]
    b = ExchangeabilityMonitor({"s": cal}, seed=1).update({"s": np.zeros(10)}).pvalues["s"]
    c = ExchangeabilityMonitor({"s": cal}, seed=2).update({"s": np.zeros(10)}).pvalues["s"]
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_monitor_errors():
    with pytest.raises(ConfigError, match="level"):
        ExchangeabilityMonitor({"a": np.zeros(3)}, level=0.9)
    with pytest.raises(ConfigError, match="martingale"):
        ExchangeabilityMonitor({"a": np.zeros(3)}, martingale="cusum")
    with pytest.raises(ConfigError, match="strange"):
        ExchangeabilityMonitor({"a": np.zeros(3)}, {"b": "low"})
    mon = ExchangeabilityMonitor({"a": np.zeros(3), "b": np.zeros(3)})
    with pytest.raises(DataError, match="lacks scores for channel"):
        mon.update({"a": np.zeros(2)})
    with pytest.raises(DataError, match="different lengths"):
        mon.update({"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(DataError, match="NaN"):
        mon.update({"a": np.array([np.nan]), "b": np.zeros(1)})
    with pytest.raises(DataError, match="no calibration"):
        OnlineConformal(np.zeros(0))


# -- live risk --------------------------------------------------------------------------------------
def test_confidence_sequence_covers_uniformly_over_time():
    """150 seeded Bernoulli(0.1) streams of 400 trials, level 0.1: the share of streams whose upper
    bound ever drops below the true rate (and, separately, whose lower bound ever rises above it)
    is <= level + 3 s.e."""
    level, rate, n_streams = 0.1, 0.1, 150
    miss_up = miss_lo = 0
    for seed in range(n_streams):
        x = (np.random.default_rng(40_000 + seed).random(400) < rate).astype(float)
        b = bernoulli_bounds(x, level)
        miss_up += bool((b["upper"] < rate).any())
        miss_lo += bool((b["lower"] > rate).any())
        assert np.all(b["lower"] <= np.maximum.accumulate(b["rate"]) + 1e-9)
    tol = level + 3 * math.sqrt(level * (1 - level) / n_streams)
    assert miss_up / n_streams <= tol and miss_lo / n_streams <= tol


def test_lower_bound_holds_when_the_rate_drifts_below_alpha():
    """The one-sided mixture stays valid when every conditional rate is <= alpha without being
    constant: rates drifting in [0.02, 0.1] over 120 seeded streams of 300; false alarms (lower >
    0.1) <= level + 3 s.e."""
    level, n_streams = 0.1, 120
    alarms = 0
    for seed in range(n_streams):
        rng = np.random.default_rng(50_000 + seed)
        q = 0.06 + 0.04 * np.sin(np.arange(300) / 30.0)
        alarms += bool((bernoulli_bounds((rng.random(300) < q).astype(float), level)["lower"] > 0.1).any())
    assert alarms / n_streams <= level + 3 * math.sqrt(level * (1 - level) / n_streams)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=60), st.sampled_from([0.01, 0.05, 0.2]))
def test_bounds_are_ordered_and_nested(events, level):
    b = bernoulli_bounds(np.asarray(events, dtype=float), level)
    assert np.all((0 <= b["lower"]) & (b["lower"] <= np.maximum.accumulate(b["rate"]) + 1e-9)
                  & (np.minimum.accumulate(b["rate"]) <= b["upper"] + 1e-9) & (b["upper"] <= 1))
    # the shortcut (lower only at events, upper only at non-events) equals the bound at every step
    full = bernoulli_bounds(np.asarray(events, dtype=float), level, every_step=True)
    np.testing.assert_allclose(full["lower"], b["lower"], atol=1e-8)
    np.testing.assert_allclose(full["upper"], b["upper"], atol=1e-8)
    assert np.all(np.diff(b["lower"]) >= 0) and np.all(np.diff(b["upper"]) <= 0)
    wider = bernoulli_bounds(np.asarray(events, dtype=float), level / 2)
    assert np.all(wider["lower"] <= b["lower"] + 1e-9) and np.all(wider["upper"] >= b["upper"] - 1e-9)


def test_live_risk_counts_alarm_and_certification():
    rng = np.random.default_rng(6)
    n = 3000
    y = rng.integers(0, 2, n)
    exit_ = rng.random(n) < 0.6
    label = y.copy()
    bad = (y == 1) & (rng.random(n) < 0.3)  # FNR 0.3 among positives
    label[bad] = 0
    y_unl = y.copy()
    y_unl[::10] = -1  # unlabelled rows are skipped
    f = live_risk(y_unl, label, exit_, "fnr_exit", alpha=0.1, level=0.01)
    trials = exit_ & (y_unl == 1)
    assert f.n[-1] == trials.sum() and f.k[-1] == (trials & (label == 0)).sum()
    assert f.alarm_time is not None and f.alarm_time < 400 and f.certified_from is None
    assert f.lower[f.alarm_time - 1] > 0.1 >= f.lower[f.alarm_time - 2]
    good = live_risk(y, y, exit_, "selective_error", alpha=0.1, level=0.01)
    assert good.alarm_time is None and good.certified_from is not None and good.upper[-1] < 0.01
    assert good.n[-1] == exit_.sum() and len(good.upper) == n and good.upper[0] in (1.0, good.upper[0])
    with pytest.raises(ConfigError, match="risk"):
        live_risk(y, y, exit_, "miss_rate", 0.1)
    with pytest.raises(DataError, match="lengths"):
        live_risk(y, y[:5], exit_, "fnr_exit", 0.1)


def test_bounds_errors():
    with pytest.raises(ConfigError, match="level"):
        bernoulli_bounds(np.zeros(3), 1.5)
    with pytest.raises(DataError, match="0 / 1"):
        bernoulli_bounds(np.array([0.5]), 0.1)
    empty = bernoulli_bounds(np.zeros(0), 0.1)
    assert len(empty["upper"]) == 0
