"""Novelty scorer: k-NN distance to train features as a conformal p-value (policies.novelty)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from stage1._core.errors import ConfigError, DataError
from stage1.policies.novelty import (CALIB_TENSOR, NOVELTY_FILE, REFERENCE_TENSOR, NoveltyScorer, defer_mask,
                                     fit_novelty, read_novelty, write_novelty)

DIM = 8
#: train-like rows cluster around this direction (features are L2-normalised, so a shift must turn them)
MU = np.r_[3.0, np.zeros(DIM - 1)]


def _draw(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(size=(n, DIM)) + MU


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _draw(np.random.default_rng(0), 300)


def test_pvalues_uniform_under_exchangeability(reference):
    """Fresh val_calib (19 rows) and one fresh test row per draw, all from the train distribution:
    the p-value is uniform on {1/20, ..., 1}. 400 independent draws, 20 bins of expected count 20;
    a chi-square goodness-of-fit p-value above 0.001 (seeded, so deterministic), and every
    P(p <= a) within 3 standard errors of a."""
    ps = []
    for seed in range(400):
        rng = np.random.default_rng(10_000 + seed)
        scorer = NoveltyScorer(k=5).fit(reference, _draw(rng, 19))
        ps.append(scorer.pvalues(_draw(rng, 1))[0])
    ps = np.asarray(ps)
    counts = np.bincount(np.rint(ps * 20).astype(int) - 1, minlength=20)
    assert counts.sum() == 400 and len(counts) == 20
    assert stats.chisquare(counts).pvalue > 1e-3
    se = np.sqrt(0.25 / 400)
    for a in (0.05, 0.1, 0.25, 0.5):
        assert abs(np.mean(ps <= a) - a) <= 3 * se + 1e-12


def test_pvalues_small_under_planted_shift(reference):
    """Rows from a shifted distribution (centred on another direction) get p-values near the
    minimum 1/201; exchangeable rows do not."""
    rng = np.random.default_rng(1)
    scorer = NoveltyScorer(k=10).fit(reference, _draw(rng, 200))
    same = scorer.pvalues(_draw(rng, 400))
    shifted = scorer.pvalues(rng.normal(size=(400, DIM)) + np.roll(MU, 1))
    assert np.median(shifted) < 0.02 and np.mean(defer_mask(shifted, 0.05)) > 0.9
    assert 0.35 < np.median(same) < 0.65 and np.mean(defer_mask(same, 0.05)) < 0.1
    assert shifted.min() >= 1 / 201


def test_score_matches_brute_force_for_each_metric_and_reduce(reference):
    """k, metric and reduce: the score equals a brute-force k-NN on unit vectors."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, DIM))
    d = np.linalg.norm(_unit(x)[:, None, :] - _unit(reference)[None, :, :], axis=2)
    d.sort(axis=1)
    cal = rng.normal(size=(30, DIM))
    for k in (1, 7):
        kth = NoveltyScorer(k=k).fit(reference, cal).score(x)
        np.testing.assert_allclose(kth, d[:, k - 1], rtol=1e-5)
        mean = NoveltyScorer(k=k, reduce="mean").fit(reference, cal).score(x)
        np.testing.assert_allclose(mean, d[:, :k].mean(axis=1), rtol=1e-5)
        cos = NoveltyScorer(k=k, metric="cosine").fit(reference, cal).score(x)
        np.testing.assert_allclose(cos, d[:, k - 1] ** 2 / 2, rtol=1e-4)
        np.testing.assert_allclose(cos, 1 - np.sort(_unit(x) @ _unit(reference).T, axis=1)[:, ::-1][:, k - 1],
                                   rtol=1e-4, atol=1e-6)


def test_reference_subsample_size_and_seed(reference):
    """reference_size keeps that many rows of train (a seeded subsample); seed picks which."""
    cal = np.random.default_rng(3).normal(size=(10, DIM))
    a = NoveltyScorer(reference_size=50, seed=1).fit(reference, cal)
    b = NoveltyScorer(reference_size=50, seed=1).fit(reference, cal)
    c = NoveltyScorer(reference_size=50, seed=2).fit(reference, cal)
    assert a.tensors()[REFERENCE_TENSOR].shape == (50, DIM)
    assert a.to_dict()["n_reference"] == 50 and a.to_dict()["n_reference_total"] == 300
    np.testing.assert_array_equal(a.tensors()[REFERENCE_TENSOR], b.tensors()[REFERENCE_TENSOR])
    assert not np.array_equal(a.tensors()[REFERENCE_TENSOR], c.tensors()[REFERENCE_TENSOR])
    rows = {tuple(np.round(r, 5)) for r in _unit(reference).astype(np.float32)}
    assert all(tuple(np.round(r, 5)) in rows for r in a.tensors()[REFERENCE_TENSOR])
    full = NoveltyScorer(reference_size=1000).fit(reference, cal)
    assert full.tensors()[REFERENCE_TENSOR].shape == (300, DIM)


def test_state_round_trip(tmp_path, reference):
    rng = np.random.default_rng(4)
    scorer = fit_novelty(reference, rng.normal(size=(40, DIM)), k=3, metric="cosine", reduce="mean")
    x = rng.normal(size=(25, DIM))
    again = NoveltyScorer.from_state(scorer.to_dict(), scorer.tensors())
    np.testing.assert_array_equal(again.pvalues(x), scorer.pvalues(x))
    assert again.params() == scorer.params()
    entry = write_novelty(tmp_path, scorer, alpha_n=0.02)
    assert entry["alpha_n"] == 0.02 and entry["file"] == NOVELTY_FILE and (tmp_path / NOVELTY_FILE).is_file()
    import json

    entry = json.loads(json.dumps(entry, allow_nan=False))  # what policy.json holds
    loaded = read_novelty(tmp_path, entry)
    np.testing.assert_allclose(loaded.score(x), scorer.score(x), rtol=1e-6)
    np.testing.assert_array_equal(loaded.pvalues(x), scorer.pvalues(x))
    # a tampered file or a mismatched record is refused
    from stage1._core.io import save_safetensors_atomic

    t = scorer.tensors()
    t[CALIB_TENSOR] = t[CALIB_TENSOR] + 1.0
    save_safetensors_atomic(t, tmp_path / NOVELTY_FILE)
    with pytest.raises(DataError, match="sha256"):
        read_novelty(tmp_path, entry)
    with pytest.raises(DataError, match="do not match"):
        NoveltyScorer.from_state(scorer.to_dict(), t)
    with pytest.raises(DataError, match="missing"):
        read_novelty(tmp_path / "nowhere", entry)


def test_clear_errors(reference):
    rng = np.random.default_rng(5)
    with pytest.raises(ConfigError, match="k=400 is larger than the 300 reference"):
        NoveltyScorer(k=400).fit(reference, rng.normal(size=(5, DIM)))
    with pytest.raises(ConfigError, match="reference_size=5"):
        NoveltyScorer(k=10, reference_size=5).fit(reference, rng.normal(size=(5, DIM)))
    with pytest.raises(DataError, match="width 4, the reference has 8"):
        NoveltyScorer().fit(reference, rng.normal(size=(5, 4)))
    scorer = NoveltyScorer().fit(reference, rng.normal(size=(5, DIM)))
    with pytest.raises(DataError, match="width 3"):
        scorer.pvalues(rng.normal(size=(2, 3)))
    bad = rng.normal(size=(4, DIM))
    bad[2, 1] = np.nan
    with pytest.raises(DataError, match="NaN or infinite values in 1 row"):
        scorer.pvalues(bad)
    with pytest.raises(DataError, match="NaN"):
        NoveltyScorer().fit(np.where(np.arange(DIM) == 0, np.inf, reference), bad[:1])
    with pytest.raises(ConfigError, match="metric"):
        NoveltyScorer(metric="manhattan")
    with pytest.raises(ConfigError, match="alpha_n"):
        defer_mask(np.zeros(2), 1.5)
    with pytest.raises(RuntimeError, match="not fitted"):
        NoveltyScorer().score(bad)


def test_defer_mask_is_strict():
    p = np.array([0.01, 0.02, 0.5])
    assert defer_mask(p, 0.02).tolist() == [True, False, False]
    assert not defer_mask(p, 0.0).any()


def test_defer_novel_turns_novel_exits_into_defers():
    from stage1.policies.decision import SET_01, UNCERTAIN, Decision
    from stage1.policies.novelty import defer_novel

    d = Decision(exit=np.array([True, True, False, True]), label=np.array([1, 0, 1, 0], dtype=np.int8),
                 pred_set=np.array([1, 0, 2, 0], dtype=np.int8), p_roadwork=np.array([0.9, 0.1, 0.5, 0.2]),
                 level=np.array(["CONFIDENT_1", "CONFIDENT_0", "UNCERTAIN", "CONFIDENT_0"], dtype="<U11"),
                 score=np.array([0.9, 0.9, 0.5, 0.8]))
    out = defer_novel(d, np.array([0.01, 0.5, 0.001, 0.04]), alpha_n=0.05)
    assert out.exit.tolist() == [False, True, False, False]
    assert out.pred_set.tolist() == [SET_01, 0, SET_01, SET_01]
    assert out.level.tolist() == [UNCERTAIN, "CONFIDENT_0", UNCERTAIN, UNCERTAIN]
    assert out.label.tolist() == d.label.tolist() and out.p_roadwork.tolist() == d.p_roadwork.tolist()
    assert [r["decision"] for r in out.to_records()] == ["defer", "exit", "defer", "defer"]
    assert defer_novel(d, np.ones(4), 0.05) is d
    with pytest.raises(DataError, match="4 decisions"):
        defer_novel(d, np.ones(3), 0.05)
