"""SCRC-I (stage1.policies.scrc): the guarantees by simulation, hand-worked thresholds, and
cross-checks against MAPIE and an independent brute force.

Population for the simulations (known in closed form, so the realised risk and coverage of each
fitted state are computed by quadrature, without test-sample noise):
    p1 ~ Beta(2, 2), y | p1 ~ Bernoulli(p1) (p1 is calibrated), selector g = |2 p1 - 1| + N(0, 0.1^2).
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from policies.conftest import prefit_p1_classifier
from scipy.special import ndtr
from scipy.stats import binom

from stage1.policies import scrc as S

SIGMA = 0.1
# midpoint quadrature over p1 in (0, 1): weights carry the Beta(2, 2) density
_M = 20000
_PG = (np.arange(_M) + 0.5) / _M
_W = 6.0 * _PG * (1.0 - _PG) / _M
_U = np.abs(2.0 * _PG - 1.0)


def _population(rng: np.random.Generator, n: int, step: float | None = None):
    p1 = rng.beta(2.0, 2.0, n)
    y = (rng.random(n) < p1).astype(np.int64)
    g = _U_of(p1) + rng.normal(0.0, SIGMA, n)
    if step is not None:  # a selector with atoms (ties), e.g. from a step-function calibrator
        g = np.floor(g / step) * step
    return g, p1, y


def _U_of(p1: np.ndarray) -> np.ndarray:
    return np.abs(2.0 * p1 - 1.0)


def _miss_prob(p: np.ndarray, lambda2: float) -> np.ndarray:
    """P(y not in C(x) | p1 = p) for the calibrated population."""
    sets = S.prediction_sets(p, lambda2)
    return np.where(sets == S.SET_01, 0.0, np.where(sets == S.SET_1, 1.0 - p, np.where(sets == S.SET_0, p, 1.0)))


def _realised(state: S.SCRCState, step: float | None = None) -> tuple[float, float]:
    """(P(y not in C | selected), P(selected)) of a fitted state on the population, by quadrature."""
    t = state.threshold1
    if math.isinf(t):
        sel = _W.copy()
    elif step is None:
        sel = _W * ndtr((_U - t) / SIGMA)
    else:  # floor(g / step) * step > t  <=>  g >= (floor(t / step) + 1) * step
        sel = _W * ndtr((_U - (math.floor(t / step + 1e-9) + 1) * step) / SIGMA)
    cov = float(sel.sum())
    return float((sel * _miss_prob(_PG, state.lambda2)).sum() / cov), cov


def _simulate(n_draws: int, n: int, seed0: int, step: float | None = None, **kw) -> tuple[np.ndarray, np.ndarray]:
    risks, covs = np.empty(n_draws), np.empty(n_draws)
    for d in range(n_draws):
        g, p1, y = _population(np.random.default_rng(seed0 + d), n, step)
        st = S.fit_scrc(g, p1, y, **kw)
        assert st.certified, st.reason
        risks[d], covs[d] = _realised(st, step)
    return risks, covs


def _rate_se(rate: float, n: int) -> float:
    return math.sqrt(max(rate * (1 - rate), 1e-4) / n)


# --------------------------------------------------------------------------------------------------
# (a) the guarantees, by simulation
# --------------------------------------------------------------------------------------------------
def test_pac_guarantee_by_simulation() -> None:
    """Default SCRC-I (both stages PAC): over 400 calibration draws the selected miscoverage exceeds
    alpha at rate <= delta2, the selection coverage falls short of xi at rate <= delta1, and either
    fails at rate <= delta (each + 3 s.e.)."""
    xi, alpha, delta, n_draws, n = 0.7, 0.1, 0.1, 400, 1000
    risks, covs = _simulate(n_draws, n, seed0=1000, xi=xi, alpha=alpha, delta=delta)
    d1 = d2 = delta / 2
    risk_rate = float(np.mean(risks > alpha))
    cov_rate = float(np.mean(covs < xi))
    joint = float(np.mean((risks > alpha) | (covs < xi)))
    k = S.selection_order(n, xi, d1)
    exact_cov_fail = binom.sf(k - 1, n, xi)  # P(Bin(n, xi) >= K): the exact stage-1 failure probability
    print(f"\nPAC: risk>alpha rate {risk_rate:.4f} (delta2={d2}), coverage<xi rate {cov_rate:.4f} "
          f"(delta1={d1}, exact {exact_cov_fail:.4f}), joint {joint:.4f} (delta={delta}); "
          f"mean risk {risks.mean():.4f}, mean coverage {covs.mean():.4f}")
    assert risk_rate <= d2 + 3 * _rate_se(d2, n_draws)
    assert cov_rate <= d1 + 3 * _rate_se(d1, n_draws)
    assert exact_cov_fail <= d1
    assert joint <= delta + 3 * _rate_se(delta, n_draws)
    # and it is not vacuous: a real threshold, real exits, coverage close to the target
    assert 0.7 <= covs.mean() <= 0.76 and risks.mean() > 0.06


def test_expectation_guarantee_by_simulation() -> None:
    """The in-expectation variant (the paper's Eq. (11) / Eq. (15) style): mean selected risk <= alpha
    and mean selection coverage >= xi (+- 3 s.e.) over 400 calibration draws."""
    xi, alpha, n_draws, n = 0.7, 0.1, 400, 1000
    risks, covs = _simulate(n_draws, n, seed0=5000, xi=xi, alpha=alpha,
                            selection_bound="expectation", risk_bound="crc")
    r_se = risks.std(ddof=1) / math.sqrt(n_draws)
    c_se = covs.std(ddof=1) / math.sqrt(n_draws)
    print(f"\nexpectation: mean risk {risks.mean():.4f} +- {r_se:.4f} (alpha={alpha}), "
          f"mean coverage {covs.mean():.4f} +- {c_se:.4f} (xi={xi}); risk>alpha rate {np.mean(risks > alpha):.3f}")
    assert risks.mean() <= alpha + 3 * r_se
    assert covs.mean() >= xi - 3 * c_se
    assert risks.mean() > alpha - 0.01  # CRC is tight in expectation


def test_stage2_guarantee_holds_with_a_tied_selector() -> None:
    """Stage 2 needs no continuity: with a selector that has atoms (step 0.05) the selected risk
    still exceeds alpha at rate <= delta2 (+ 3 s.e.); the state reports the ties."""
    xi, alpha, delta, n_draws, n = 0.6, 0.1, 0.1, 300, 800
    risks, _ = _simulate(n_draws, n, seed0=9000, step=0.05, xi=xi, alpha=alpha, delta=delta)
    rate = float(np.mean(risks > alpha))
    print(f"\ntied selector: risk>alpha rate {rate:.4f} (delta2={delta / 2})")
    assert rate <= delta / 2 + 3 * _rate_se(delta / 2, n_draws)
    g, p1, y = _population(np.random.default_rng(1), n, step=0.05)
    st = S.fit_scrc(g, p1, y, xi=xi, alpha=alpha, delta=delta)
    assert st.n_tied_at_threshold > 1 and "tie" in st.reason
    assert not np.any(S.scrc_selected(g[g == st.threshold1], st))  # tied rows are all out


# --------------------------------------------------------------------------------------------------
# (b) hand-worked examples
# --------------------------------------------------------------------------------------------------
# 10 calibration rows. Selector scores (shuffled) and, for the 8 rows that will be selected, p1 and y.
G10 = np.array([0.85, 0.3, 0.95, 0.6, 0.2, 0.9, 0.5, 0.8, 0.4, 0.7])
P10 = np.array([0.9, 0.5, 0.8, 0.3, 0.5, 0.1, 0.65, 0.45, 0.99, 0.2])
Y10 = np.array([1, 0, 1, 0, 1, 0, 1, 1, 1, 1])
# selected rows (g > 0.3): indices 0,2,3,5,6,7,8,9 with s = 1-p1 (y=1) or p1 (y=0):
#   0.1, 0.2, 0.3, 0.1, 0.35, 0.55, 0.01, 0.8


def test_hand_worked_stage1() -> None:
    # binomial, n=10, xi=0.5, delta1=0.05: P(Bin(10,.5) >= 8) = 56/1024 = 0.0547 > 0.05,
    # P(>= 9) = 11/1024 = 0.0107 <= 0.05  ->  K = 9, t1 = 9th largest = 0.3, lambda1 = 0.7
    assert S.binom_sf_ge(8, 10, 0.5) == pytest.approx(56 / 1024)
    assert S.binom_sf_ge(9, 10, 0.5) == pytest.approx(11 / 1024)
    assert S.selection_order(10, 0.5, 0.05, "binomial") == 9
    # hoeffding, delta1=0.5: K = ceil(10 (0.5 + sqrt(ln 2 / 20))) = ceil(6.8617) = 7
    assert S.selection_order(10, 0.5, 0.5, "hoeffding") == 7
    # expectation: K = ceil(11 * 0.5) = 6
    assert S.selection_order(10, 0.5, 0.05, "expectation") == 6
    # too few rows for a selective threshold: xi^n > delta1 -> K = n + 1 (select all)
    assert S.selection_order(4, 0.5, 0.05, "binomial") == 5  # 0.5^4 = 0.0625 > 0.05
    assert S.selection_order(5, 0.5, 0.05, "binomial") == 5  # 0.5^5 = 0.03125 <= 0.05

    st = S.fit_scrc(G10, P10, Y10, xi=0.5, alpha=0.25, delta=0.2, delta_split=0.25)
    assert (st.delta1, st.delta2) == pytest.approx((0.05, 0.15))
    assert st.order_k == 9 and st.threshold1 == 0.3 and st.lambda1 == pytest.approx(0.7)
    assert st.n_selected == 8 and st.n_tied_at_threshold == 1
    # coverage bound: the q with P(Bin(10, q) >= 9) = 0.05
    assert binom.sf(8, 10, st.coverage_bound) == pytest.approx(0.05, abs=1e-9)


def test_hand_worked_stage2() -> None:
    s = np.array([0.1, 0.2, 0.3, 0.1, 0.35, 0.55, 0.01, 0.8])
    # binomial, m=8, alpha=0.25, delta2=0.15: P(Bin(8,.25) <= 0) = 0.75^8 = 0.1001 <= 0.15,
    # P(<= 1) = 0.3671 > 0.15 -> budget c* = 0 -> lambda2 = largest score = 0.8
    assert S.binom_cdf(0, 8, 0.25) == pytest.approx(0.75 ** 8)
    assert S.binom_cdf(1, 8, 0.25) == pytest.approx(0.75 ** 8 + 8 * 0.25 * 0.75 ** 7)
    assert S.set_threshold(s, 0.25, 0.15, "binomial") == (pytest.approx(0.8), 0, True)
    assert S.min_selected_rows(0.25, 0.15, "binomial") == 7  # ln(.15)/ln(.75) = 6.59
    # crc: (c + 1) / 9 <= 0.25 -> c = floor(2.25) - 1 = 1 -> lambda2 = 2nd largest = 0.55, 1 miss
    assert S.set_threshold(s, 0.25, 0.0, "crc") == (pytest.approx(0.55), 1, True)
    # hoeffding: eps = sqrt(ln(1/.15) / 16) = 0.344 > 0.25 -> cannot certify with 8 rows (needs 16)
    assert S.set_threshold(s, 0.25, 0.15, "hoeffding") == (1.0, 0, False)
    assert S.min_selected_rows(0.25, 0.15, "hoeffding") == 16  # ceil(1.897 / 0.125) = ceil(15.18)

    st = S.fit_scrc(G10, P10, Y10, xi=0.5, alpha=0.25, delta=0.2, delta_split=0.25)
    assert st.certified and st.lambda2 == pytest.approx(0.8) and st.n_miss == 0
    assert st.risk_bound == pytest.approx(1 - 0.15 ** (1 / 8))  # Clopper-Pearson UCB with 0 misses in 8
    crc = S.fit_scrc(G10, P10, Y10, xi=0.5, alpha=0.25, delta=0.05, risk_bound="crc")
    assert crc.delta1 == 0.05 and crc.delta2 == 0.0  # the PAC stage takes all of delta
    assert crc.lambda2 == pytest.approx(0.55) and crc.n_miss == 1 and crc.risk_bound == pytest.approx(2 / 9)

    # decisions on new rows at lambda2 = 0.8: {1} iff p1 > 0.8 ... {0} iff p1 < 0.2, else {0, 1}
    g_new = np.array([0.31, 0.3, 0.9, 0.9, 0.9, 0.1])
    p_new = np.array([0.95, 0.95, 0.85, 0.5, 0.1, 0.99])
    exit_mask, sets = S.scrc_sets(g_new, p_new, st)
    assert exit_mask.tolist() == [True, False, True, False, True, False]
    assert sets.tolist() == [S.SET_1, S.SET_1, S.SET_1, S.SET_01, S.SET_0, S.SET_1]
    assert S.scrc_levels(g_new, p_new, st).tolist() == [
        "CONFIDENT_1", "UNCERTAIN", "CONFIDENT_1", "AMBIGUOUS", "CONFIDENT_0", "UNCERTAIN"]


def test_set_codes_match_the_decision_module() -> None:
    from stage1.policies import decision

    assert (S.SET_0, S.SET_1, S.SET_01) == (decision.SET_0, decision.SET_1, decision.SET_01)
    assert (S.CONFIDENT_0, S.CONFIDENT_1, S.UNCERTAIN, S.AMBIGUOUS) == (
        decision.CONFIDENT_0, decision.CONFIDENT_1, decision.UNCERTAIN, decision.AMBIGUOUS)


def test_too_few_rows_cannot_certify_and_says_how_many() -> None:
    g, p1, y = _population(np.random.default_rng(3), 20)
    st = S.fit_scrc(g, p1, y, xi=0.7, alpha=0.1, delta=0.1)
    # binomial stage 2 needs ceil(ln(.05)/ln(.9)) = 29 selected rows; stage 1 (binomial, xi=0.7,
    # delta1=0.05) selects K - 1 rows, which first reaches 29 at n = 35 (K = 30: P(Bin(35, .7) >= 30) <= .05)
    assert not st.certified and st.lambda2 == 1.0
    assert st.n_selected_needed == 29 and st.n_calib_needed == 35
    assert "29" in st.reason and "35" in st.reason
    assert binom.sf(29, 35, 0.7) <= 0.05 < binom.sf(28, 35, 0.7)  # n = 35: K = 30, 29 selected
    assert binom.sf(28, 34, 0.7) <= 0.05 < binom.sf(27, 34, 0.7)  # n = 34: K = 29, 28 selected
    # and the stated size is enough: 35 rows (continuous selector) certify, 34 do not
    g35, p35, y35 = _population(np.random.default_rng(30), 35)
    assert S.fit_scrc(g35, p35, y35, xi=0.7, alpha=0.1, delta=0.1).certified
    assert not S.fit_scrc(g35[:34], p35[:34], y35[:34], xi=0.7, alpha=0.1, delta=0.1).certified
    exit_mask, sets = S.scrc_sets(g, p1, st)
    assert not exit_mask.any() and (sets == S.SET_01).all()
    # 5 rows: stage 1 cannot place a threshold either (0.7^n <= 0.05 needs n >= 9): everything selected
    st5 = S.fit_scrc(g[:5], p1[:5], y[:5], xi=0.7, alpha=0.1, delta=0.1)
    assert math.isinf(st5.threshold1) and st5.n_selected == 5 and st5.coverage_bound == 1.0
    assert "every row is selected" in st5.reason
    # xi = 1: select everything
    st1 = S.fit_scrc(g, p1, y, xi=1.0, alpha=0.1, delta=0.1)
    assert st1.n_selected == 20 and S.scrc_selected(g, st1).all()


@pytest.mark.parametrize("method", S.SELECTION_BOUNDS)
def test_calib_rows_needed_matches_a_linear_scan(method: str) -> None:
    """The bisection in ``calib_rows_needed`` equals the first n of a plain scan whose stage 1 selects
    at least m_need rows (binomial order statistics recomputed with scipy)."""
    def selected(n: int, xi: float, d1: float) -> int:
        if method == "binomial":
            ok = np.flatnonzero(binom.sf(np.arange(n), n, xi) <= d1)  # P(Bin >= k) for k = 1..n
            k = int(ok[0]) + 1 if ok.size else n + 1
        else:
            k = S.selection_order(n, xi, d1, method)
        return n if k > n else k - 1

    rng = np.random.default_rng(11)
    for _ in range(25):
        m_need = int(rng.integers(1, 120))
        xi = float(rng.uniform(0.2, 1.0))
        d1 = float(rng.choice([0.01, 0.05, 0.2]))
        n = m_need
        while selected(n, xi, d1) < m_need:
            n += 1
        assert S.calib_rows_needed(m_need, xi, d1, method) == n, (m_need, xi, d1)


def test_ties_in_scores_and_empty_sets() -> None:
    # ties in the nonconformity score: tied rows are all in or all out of the set
    s = np.array([0.4, 0.4, 0.4, 0.1, 0.1])
    lam, n_miss, ok = S.set_threshold(s, 0.5, 0.0, "crc")  # c = floor(6 * .5) - 1 = 2 -> 3rd largest = 0.4
    assert ok and lam == 0.4 and n_miss == 0
    assert S.prediction_sets(np.array([0.6, 0.4, 0.6 + 1e-12]), 0.4).tolist() == [S.SET_1, S.SET_0, S.SET_1]
    # an accurate model gives lambda2 < 1/2; nonempty=False then yields empty sets (code 3, never exit)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.where(y == 1, 0.99, 0.01)
    g = rng.random(200)
    raw = S.fit_scrc(g, p1, y, xi=0.5, alpha=0.2, risk_bound="crc", selection_bound="expectation", nonempty=False)
    assert raw.lambda2 == pytest.approx(0.01) and raw.lambda2_raw == raw.lambda2
    exit_mask, sets = S.scrc_sets(np.array([1.0, 1.0]), np.array([0.5, 0.995]), raw)
    assert sets.tolist() == [S.SET_EMPTY, S.SET_1] and exit_mask.tolist() == [False, True]
    clamp = S.fit_scrc(g, p1, y, xi=0.5, alpha=0.2, risk_bound="crc", selection_bound="expectation")
    assert clamp.lambda2 == 0.5 and clamp.lambda2_raw == pytest.approx(0.01)
    assert S.scrc_sets(np.array([1.0]), np.array([0.5]), clamp)[1].tolist() == [S.SET_01]
    assert (S.prediction_sets(rng.random(1000), 0.5) != S.SET_EMPTY).all()


def test_state_round_trips_through_json_and_validates_inputs() -> None:
    g, p1, y = _population(np.random.default_rng(4), 300)
    st = S.fit_scrc(g, p1, y, xi=0.6, alpha=0.15, delta=0.1)
    assert S.SCRCState.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    st5 = S.fit_scrc(g[:5], p1[:5], y[:5], xi=0.7, alpha=0.1)
    back = S.SCRCState.from_dict(json.loads(json.dumps(st5.to_dict())))
    assert back.threshold1 == -math.inf and back == st5
    with pytest.raises(ValueError, match="xi"):
        S.fit_scrc(g, p1, y, xi=0.0, alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        S.fit_scrc(g, p1, y, xi=0.5, alpha=1.0)
    with pytest.raises(ValueError, match="y must"):
        S.fit_scrc(g, p1, np.full(300, 2), xi=0.5, alpha=0.1)
    with pytest.raises(ValueError, match="p1"):
        S.fit_scrc(g, p1 + 1.0, y, xi=0.5, alpha=0.1)
    with pytest.raises(ValueError, match="risk_bound"):
        S.fit_scrc(g, p1, y, xi=0.5, alpha=0.1, risk_bound="wsr")
    with pytest.raises(ValueError, match="same length"):
        S.scrc_sets(g, p1[:-1], st)


# --------------------------------------------------------------------------------------------------
# (c) cross-checks: MAPIE and an independent brute force
# --------------------------------------------------------------------------------------------------
def _selected_rows(seed: int, n: int, xi: float):
    rng = np.random.default_rng(seed)
    p1 = rng.integers(0, 1025, n) / 1024.0  # exactly representable, so 1 - (1 - p1) == p1 in MAPIE
    y = (rng.random(n) < p1).astype(np.int64)
    g = _U_of(p1) + rng.normal(0.0, SIGMA, n)
    return g, p1, y


@pytest.mark.parametrize("seed,alpha", [(0, 0.1), (1, 0.05), (2, 0.2), (3, 0.13)])
def test_crc_stage2_matches_mapie_split_conformal_lac(seed: int, alpha: float) -> None:
    """On the selected rows, the in-expectation stage 2 is split-conformal LAC: MAPIE's conformal
    quantile equals lambda2 and MAPIE's prediction sets equal ours."""
    from mapie.classification import SplitConformalClassifier

    g, p1, y = _selected_rows(seed, 600, 0.7)
    st = S.fit_scrc(g, p1, y, xi=0.7, alpha=alpha, selection_bound="expectation", risk_bound="crc", nonempty=False)
    sel = S.scrc_selected(g, st)
    assert sel.sum() == st.n_selected
    scc = SplitConformalClassifier(prefit_p1_classifier(), confidence_level=1 - alpha, conformity_score="lac",
                                   prefit=True)
    scc.conformalize(p1[sel][:, None], y[sel])
    grid = np.arange(0, 1025) / 1024.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, mapie_sets = scc.predict_set(grid[:, None])
    q = float(np.ravel(scc._mapie_classifier.conformity_score_function_.quantiles_)[0])
    assert st.lambda2 == pytest.approx(q, abs=0.0)
    mine = S.prediction_sets(grid, st.lambda2)
    ours01 = np.column_stack([np.isin(mine, (S.SET_0, S.SET_01)), np.isin(mine, (S.SET_1, S.SET_01))])
    assert np.array_equal(ours01, mapie_sets[:, :, 0].astype(bool))


@pytest.mark.parametrize("seed,alpha,delta2", [(0, 0.1, 0.05), (1, 0.05, 0.1), (2, 0.2, 0.01), (3, 0.1, 0.2)])
def test_binomial_stage2_matches_mapie_ltt_fixed_sequence(seed: int, alpha: float, delta2: float) -> None:
    """The PAC stage 2 equals Learn-then-Test run with MAPIE's pieces: its binary Hoeffding-Bentkus
    p-values (= the exact binomial tail for 0/1 losses) and fixed-sequence testing from lambda = 1
    down over every distinct score."""
    from mapie.risk_control import FWERFixedSequenceTesting
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    g, p1, y = _selected_rows(seed, 800, 0.7)
    st = S.fit_scrc(g, p1, y, xi=0.7, alpha=alpha, delta=delta2, selection_bound="expectation", nonempty=False)
    sel = S.scrc_selected(g, st)
    s = S.nonconformity(p1[sel], y[sel])
    m = len(s)
    grid = np.unique(np.concatenate([s, [0.0, 1.0]]))[::-1]  # lambda = 1 first (easiest), then downwards
    n_miss = (s[None, :] > grid[:, None]).sum(axis=1)
    r_hat = n_miss / m
    r_hat = np.where(np.ceil(m * r_hat) > n_miss, np.nextafter(r_hat, 0.0), r_hat)  # guard ceil(m * k/m) = k
    pvals = compute_hoeffding_bentkus_p_value(r_hat, m, alpha, binary=True)[:, 0]
    assert np.allclose(pvals, binom.cdf(n_miss, m, alpha))
    rejected = FWERFixedSequenceTesting().run(pvals, delta2)
    assert len(rejected) > 0
    assert st.lambda2 == grid[np.max(rejected)]


def _brute_stage2(s: np.ndarray, alpha: float, delta2: float) -> float:
    """Independent: over candidates {0, 1, scores}, the smallest lambda such that every candidate
    lambda' >= lambda has P(Bin(m, alpha) <= #{s > lambda'}) <= delta2 (explicit loops)."""
    m = len(s)
    cands = sorted(set(s.tolist()) | {0.0, 1.0})
    ok = []
    for lam in cands:
        misses = sum(1 for v in s if v > lam)
        ok.append(binom.cdf(misses, m, alpha) <= delta2)
    best = 1.0
    for i in range(len(cands) - 1, -1, -1):
        if all(ok[i:]):
            best = cands[i]
        else:
            break
    return best


def test_stage1_and_stage2_match_brute_force() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        n = int(rng.integers(1, 400))
        xi = float(rng.uniform(0.05, 0.99))
        d1 = float(rng.choice([0.01, 0.05, 0.1, 0.3]))
        ks = [k for k in range(1, n + 1) if binom.sf(k - 1, n, xi) <= d1]
        assert S.selection_order(n, xi, d1, "binomial") == (ks[0] if ks else n + 1), (n, xi, d1)
    for trial in range(40):
        m = int(rng.integers(1, 300))
        alpha = float(rng.uniform(0.02, 0.4))
        d2 = float(rng.choice([0.01, 0.05, 0.1]))
        s = np.round(rng.beta(1.0, 4.0, m), 2)  # coarse, so ties are common
        lam, _, ok = S.set_threshold(s, alpha, d2, "binomial")
        assert lam == _brute_stage2(s, alpha, d2), (trial, m, alpha, d2)
        assert ok == (binom.cdf(0, m, alpha) <= d2)
