"""ODIR chosen by cross-validation (Kull et al. 2019): dirichlet and matrix default to lam="cv";
the choice, the grid and the scores are in the fitted state (and so in policy.json); explicit
numbers (0 = unregularised) keep working; too few rows fall back to a stated default."""
from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

from stage1._core.errors import ConfigError
from stage1.policies import POLICIES, policy_from_dict
from stage1.policies.audit import synthetic_scores
from stage1.policies.calibrators import CALIBRATORS, calibrator_from_dict
from stage1.policies.odir import ODIR_CV_GRID, stratified_folds
from stage1.workflows.space import studies_dir


def _three_class(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Miscalibrated, class-mixed 3-class logits."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.normal(0, 1, (n, 3)) + 2.0 * np.eye(3)[y]
    return 2.0 * z @ np.array([[1, 0.3, 0], [0, 1, 0.4], [0.2, 0, 1]]), y


def _held_out_logloss(name: str, x: np.ndarray, y: np.ndarray, lam: float, mu: float, folds: int) -> float:
    """Mean over stratified folds of the held-out log-loss of explicit-(lam, mu) fits."""
    fold = stratified_folds(y, x.shape[1], folds)
    out = []
    for j in range(folds):
        tr, te = fold != j, fold == j
        p = CALIBRATORS.create(name, lam=lam, mu=mu).fit(x[tr], y[tr]).predict_proba(x[te])
        out.append(-np.mean(np.log(p[np.arange(int(te.sum())), y[te]])))
    return float(np.mean(out))


@pytest.mark.parametrize("name", ["dirichlet", "matrix"])
def test_cv_is_the_default_and_records_its_choice(name):
    x, y = _three_class(450, seed=0)
    cal = CALIBRATORS.create(name).fit(x, y)
    assert cal.params()["lam"] == "cv" and cal.params()["mu"] is None
    st = cal.state()
    cv = st["cv"]
    assert cv["fallback"] is False and cv["folds"] == 5 and "log-loss" in cv["score"]
    assert cv["grid_lam"] == cv["grid_mu"] == list(ODIR_CV_GRID)
    table = np.array(cv["losses"], dtype=float)
    assert table.shape == (36, 3)  # every (lam, mu) pair
    best = table[int(np.argmin(table[:, 2]))]
    assert (st["lam"], st["mu"]) == (best[0], best[1]) == (cal.lam, cal.mu)
    assert cv["best_score"] == best[2]
    # each score is the mean held-out log-loss of an explicit fit on the same folds
    for lam, mu, score in table[[0, 17, 35]]:
        assert score == pytest.approx(_held_out_logloss(name, x, y, lam, mu, 5), rel=1e-9)
    # the kept model is the refit on all rows at the chosen values; deterministic
    refit = CALIBRATORS.create(name, lam=cal.lam, mu=cal.mu).fit(x, y)
    np.testing.assert_array_equal(refit.W, cal.W)
    again = CALIBRATORS.create(name).fit(x, y)
    assert again.state() == st
    loaded = calibrator_from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False)))
    np.testing.assert_array_equal(loaded.predict_proba(x), cal.predict_proba(x))
    assert (loaded.lam, loaded.mu, loaded.cv) == (cal.lam, cal.mu, cv)


def test_cv_beats_or_matches_no_penalty_held_out():
    x, y = _three_class(150, seed=1)  # small: regularisation should help
    cal = CALIBRATORS.create("dirichlet").fit(x, y)
    table = {(lam, mu): s for lam, mu, s in cal.cv["losses"]}
    assert cal.cv["best_score"] <= table[(0.0, 0.0)]


def test_folds_are_stratified_and_balanced():
    y = np.r_[np.zeros(23, int), np.ones(7, int), np.full(11, 2)]
    fold = stratified_folds(y, 3, 5)
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per = np.bincount(fold[y == c], minlength=5)
        assert per.max() - per.min() <= 1
    np.testing.assert_array_equal(stratified_folds(y, 3, 5), fold)  # seeded


@pytest.mark.parametrize("name", ["dirichlet", "matrix"])
def test_two_classes_search_mu_only_because_lam_cannot_matter(name):
    sc, y = synthetic_scores(800, prevalence=0.3, overconfidence=2.5, seed=5)
    x = sc["logits"]
    cal = CALIBRATORS.create(name).fit(x, y)
    assert cal.cv["grid_lam"] == [0.0] and len(cal.cv["losses"]) == len(ODIR_CV_GRID)
    assert "redundant" in cal.cv["lam_note"] and cal.lam == 0.0
    # the claim behind it: with two classes lam leaves the predictions unchanged
    free = CALIBRATORS.create(name, lam=0.0, mu=0.1).fit(x, y).p1(x)
    heavy = CALIBRATORS.create(name, lam=100.0, mu=0.1).fit(x, y).p1(x)
    np.testing.assert_allclose(heavy, free, atol=1e-6)


def test_too_few_rows_fall_back_and_say_why():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(9, int), np.ones(3, int)]
    x = rng.normal(0, 1, (12, 2)) + 2 * np.eye(2)[y]
    cal = CALIBRATORS.create("dirichlet").fit(x, y)
    assert cal.cv["fallback"] is True and (cal.lam, cal.mu) == (0.0, 0.1)  # two classes: lam fixed at 0
    assert "class 1 has 3 of 12 rows, fewer than cv_folds=5" in cal.cv["reason"]
    x3, y3 = _three_class(40, seed=2)
    y3[y3 == 2] = 0
    y3[:2] = 2  # class 2: two rows
    cal3 = CALIBRATORS.create("matrix", cv_fallback=1.0).fit(x3, y3)
    assert cal3.cv["fallback"] is True and (cal3.lam, cal3.mu) == (1.0, 1.0) and "class 2" in cal3.cv["reason"]
    fewer = CALIBRATORS.create("matrix", cv_folds=2).fit(x3, y3)
    assert fewer.cv["fallback"] is False and fewer.cv["folds"] == 2


def test_explicit_numbers_and_partial_cv():
    x, y = _three_class(300, seed=4)
    fixed = CALIBRATORS.create("dirichlet", lam=0.5).fit(x, y)
    assert fixed.cv is None and (fixed.lam, fixed.mu) == (0.5, 0.5)
    assert fixed.state()["cv"] is None
    mu_only = CALIBRATORS.create("dirichlet", lam=0.5, mu="cv").fit(x, y)
    assert mu_only.cv["grid_lam"] == [0.5] and len(mu_only.cv["losses"]) == len(ODIR_CV_GRID)
    lam_only = CALIBRATORS.create("matrix", lam="cv", mu=0.0).fit(x, y)
    assert lam_only.cv["grid_mu"] == [0.0] and lam_only.mu == 0.0
    small = CALIBRATORS.create("dirichlet", cv_grid=[1.0, 0.0], cv_folds=3).fit(x, y)
    assert small.cv["grid_lam"] == [0.0, 1.0] and small.cv["folds"] == 3
    # beta stays the unregularised maximum-likelihood fit unless asked
    assert CALIBRATORS.create("beta").params()["lam"] == 0.0


@pytest.mark.parametrize("bad", [{"lam": "auto"}, {"lam": -1}, {"mu": "x"}, {"cv_grid": []},
                                 {"cv_grid": [0.1, -1]}, {"cv_grid": [1, 1]}, {"cv_folds": 1}, {"cv_fallback": -0.5}])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        CALIBRATORS.create("dirichlet", **bad)


def test_penalty_needs_the_chosen_values_first():
    cal = CALIBRATORS.create("dirichlet")
    with pytest.raises(RuntimeError, match="cross-validation"):
        cal.penalty(np.eye(2), np.zeros(2))
    val, _, _ = cal.penalty(np.array([[1.0, 2.0], [0.0, 1.0]]), np.zeros(2), lam=2.0, mu=0.0)
    assert val == pytest.approx(2.0 / 2 * 4.0)


def test_legacy_state_without_cv_loads():
    legacy = {"name": "dirichlet", "params": {"lam": 0.0, "mu": None, "max_iter": 500},
              "state": {"W": [[1.0, 0.0], [0.0, 2.0]], "b": [0.0, 0.5]}}
    cal = calibrator_from_dict(legacy)
    assert cal.cv is None and (cal.lam, cal.mu) == (0.0, 0.0)
    assert cal.p1(np.array([0.0])).shape == (1,)


def test_policy_json_shows_the_cv_choice():
    cal, y = synthetic_scores(1000, prevalence=0.4, overconfidence=2.0, seed=1)
    pol = POLICIES.create("ltt", alpha=0.05, delta=0.1, calibrator="dirichlet").fit(cal, y)
    d = json.loads(json.dumps(pol.to_dict(), allow_nan=False))
    st = d["state"]["calibrator"]["state"]
    assert d["state"]["calibrator"]["params"]["lam"] == "cv"
    assert st["cv"]["fallback"] is False and st["mu"] in ODIR_CV_GRID and st["cv"]["losses"]
    assert policy_from_dict(d).decide(cal).equals(pol.decide(cal))


def test_shipped_spaces_let_the_sweep_search_dirichlet_and_matrix():
    for space in ("default", "gate", "quick"):
        data = tomllib.loads((studies_dir() / f"{space}.toml").read_text())
        searched = [p["calibrator"]["choices"] for p in data["policy"].values()
                    if isinstance(p.get("calibrator"), dict)]
        assert searched and all({"dirichlet", "matrix"} <= set(c) for c in searched), space
