"""Exit risks as objects (policies.risks): hand counts, agreement with the metric functions, the
properties ltt / crc rely on, and the count tables ltt builds from them."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage1._core.errors import UnknownNameError
from stage1.policies import POLICIES
from stage1.policies import metrics as M
from stage1.policies.risks import RISKS, Risk, all_risks, get_risk

# 8 rows: exited are 0 (y1 p0: a miss), 1, 3 (y1 p1), 4, 5 (y0 p0), 7 (y1 p0: a miss); 2 and 6 defer
Y = np.array([1, 1, 1, 1, 0, 0, 0, 1])
PRED = np.array([0, 1, 0, 1, 0, 0, 1, 0])
EXIT = np.array([True, True, False, True, True, True, False, True])
HAND = {  # (events, trials) counted by hand
    "fnr_exit": (2, 4),  # misses 0, 7 among exited positives 0, 1, 3, 7
    "selective_error": (2, 6),  # wrong exits 0, 7 among the 6 exits
    "miss_rate": (2, 5),  # misses 0, 7 among all positives 0, 1, 2, 3, 7
}
METRIC = {"fnr_exit": M.fnr_exit, "selective_error": M.selective_error, "miss_rate": M.miss_rate}


def test_registry_holds_the_three_risks_and_not_coverage():
    assert RISKS.names() == ["fnr_exit", "miss_rate", "selective_error"]
    assert "coverage" not in RISKS
    assert [r.name for r in all_risks()] == ["selective_error", "fnr_exit", "miss_rate"]  # report order
    with pytest.raises(UnknownNameError, match="unknown risk 'auc'"):
        get_risk("auc")


@pytest.mark.parametrize("name", sorted(HAND))
def test_each_risk_matches_a_hand_count(name):
    risk = get_risk(name)
    assert isinstance(risk, Risk) and risk.name == name
    assert risk.counts(Y, PRED, EXIT) == HAND[name]
    assert risk.value(Y, PRED, EXIT) == pytest.approx(HAND[name][0] / HAND[name][1])
    loss, counted = risk.losses(Y, PRED, EXIT)
    assert loss.dtype == bool and counted.dtype == bool and not (loss & ~counted).any()
    assert (int(loss.sum()), int(counted.sum())) == HAND[name]
    assert METRIC[name](Y, PRED, EXIT) == risk.value(Y, PRED, EXIT)


def test_flags_follow_the_definitions():
    assert {r.name: r.monotone for r in all_risks()} == {"fnr_exit": True, "miss_rate": True, "selective_error": False}
    assert {r.name: r.positives_only for r in all_risks()} == {"fnr_exit": True, "miss_rate": True,
                                                                "selective_error": False}
    assert {r.name: r.fixed_denominator for r in all_risks()} == {"fnr_exit": False, "miss_rate": True,
                                                                   "selective_error": False}


def test_empty_denominators_are_nan():
    none = np.zeros(len(Y), dtype=bool)
    assert math.isnan(get_risk("fnr_exit").value(Y, PRED, none))
    assert math.isnan(get_risk("selective_error").value(Y, PRED, none))
    assert get_risk("miss_rate").value(Y, PRED, none) == 0.0  # positives exist, none was exited
    neg = np.zeros(len(Y), dtype=np.int64)
    assert math.isnan(get_risk("miss_rate").value(neg, PRED, EXIT))


def test_from_cells_equals_the_row_counts():
    cells = [(1, 0), (0, 0), (1, 1), (0, 1)]
    exited = {c: int(np.sum(EXIT & (Y == c[0]) & (PRED == c[1]))) for c in cells}
    total = {c: int(np.sum((Y == c[0]) & (PRED == c[1]))) for c in cells}
    for r in all_risks():
        assert r.from_cells(exited, total) == r.counts(Y, PRED, EXIT), r.name


def _formula(name: str, y: np.ndarray, pred: np.ndarray, ex: np.ndarray) -> float:
    """The DESIGN definitions written out once more, independently of the risk classes."""
    if name == "fnr_exit":
        num, den = np.sum(ex & (y == 1) & (pred == 0)), np.sum(ex & (y == 1))
    elif name == "selective_error":
        num, den = np.sum(ex & (y != pred)), np.sum(ex)
    else:
        num, den = np.sum(ex & (y == 1) & (pred == 0)), np.sum(y == 1)
    return float(num) / float(den) if den else float("nan")


rows = st.integers(0, 60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    st.lists(st.booleans(), min_size=n, max_size=n),
))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rows)
def test_risk_objects_agree_with_the_metric_functions(data):
    y, pred, ex = (np.asarray(a) for a in data)
    y, pred, ex = y.astype(np.int64), pred.astype(np.int64), ex.astype(bool)
    table = M.selective_risks(y, pred, ex)
    for r in all_risks():
        v = r.value(y, pred, ex)
        for other in (METRIC[r.name](y, pred, ex), table[r.name], _formula(r.name, y, pred, ex)):
            assert (math.isnan(v) and math.isnan(other)) or v == other, r.name


@settings(max_examples=100, deadline=None)
@given(data=rows, extra=st.lists(st.booleans(), min_size=60, max_size=60))
def test_fixed_denominator_risks_only_grow_with_more_exits(data, extra):
    """A loosened threshold exits a superset; a risk over a fixed population (CRC's) cannot drop."""
    y, pred, ex = (np.asarray(a) for a in data)
    y, pred, ex = y.astype(np.int64), pred.astype(np.int64), ex.astype(bool)
    more = ex | np.asarray(extra[: len(ex)], dtype=bool)
    for r in all_risks():
        if r.fixed_denominator and r.monotone and (y == 1).any():
            assert r.value(y, pred, more) >= r.value(y, pred, ex)


@pytest.mark.parametrize("risk", RISKS.names())
def test_ltt_pair_table_counts_are_the_risk_counts(risk):
    """Every (t0, t1) pair of ltt's table holds the risk's counts of the decision at that pair."""
    rng = np.random.default_rng(3)
    n = 400
    y = rng.integers(0, 2, n)
    yhat = np.where(rng.random(n) < 0.8, y, 1 - y)
    s = rng.uniform(0.5, 1.0, n)
    pol = POLICIES.create("ltt", risk=risk, grid=[0.6, 0.7, 0.8, 0.9], calibrator=None)
    tab = pol.pair_table(s, yhat, y)
    t = tab["thresholds"]
    for i in range(len(t)):
        for j in range(len(t)):
            ex = s >= np.where(yhat == 1, t[j], t[i])
            events, trials = get_risk(risk).counts(y, yhat, ex)
            assert (int(tab["events"][i, j]), int(tab["trials"][i, j])) == (events, trials)


def test_ltt_procedure_and_crc_risks_come_from_the_flags():
    from stage1.policies.rules import crc_risks

    assert crc_risks() == [r.name for r in all_risks() if r.fixed_denominator and r.monotone] == ["miss_rate"]
    for r in all_risks():
        expected = "fixed_sequence" if r.monotone else "fallback"
        assert POLICIES.create("ltt", risk=r.name).procedure() == expected
