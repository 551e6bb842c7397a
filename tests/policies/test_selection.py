"""Choosing among candidates must not void the certificate (issue: 'Every printed guarantee must be true').

The population: every candidate's only exit-everything pair has true FNR_exit 0.0543 > alpha 0.05;
exiting only its confident positives is genuinely safe (FNR_exit 0). A violation is a certified
policy that exits the miss-prone rows. Picking the best of 20 candidates by how they certified on
one val_calib (what the sweep and the demo used to do) violates far more often than delta; fitting
the winner again on a held-out part the choice never saw stays within delta.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from stage1.policies import POLICIES
from stage1.policies.selection import (
    SelectionRecord,
    choose_split_delta,
    choose_then_certify,
    holdout_parts,
    part_mask,
)

TRUE_FNR, ALPHA, DELTA, K = 0.0543, 0.05, 0.1, 20


def _draw(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """One val_calib (labels shared) and k candidates' scores on it, with independent errors."""
    y = (rng.random(n) < 0.5).astype(np.int64)
    cands = []
    for _ in range(k):
        u = rng.random(n)
        p = np.where(y == 1, np.where(u < TRUE_FNR, 0.01, 0.99), np.where(u < 0.9, 0.01, 0.99))
        cands.append({"logits": np.stack([np.log1p(-p), np.log(p)], 1), "select": np.maximum(p, 1 - p)})
    return y, cands


def _policy(_: int = 0, split: int = 1):
    # no calibrator, one threshold: the exit rule is the same for every candidate and fast to fit
    return POLICIES.create("ltt", alpha=ALPHA, delta=DELTA / split, risk="fnr_exit", calibrator=None, grid=[0.98])


def _violates(policy) -> bool:
    """Certified and exits the miss-prone confident-negative rows (true FNR_exit 0.0543 > alpha)."""
    probe = {"logits": np.log(np.array([[0.99, 0.01]])), "select": np.array([0.99])}
    return bool(policy.certified and policy.decide(probe).exit[0])


def _naive_best(y: np.ndarray, cands: list[dict[str, np.ndarray]]):
    fits = [_policy().fit(c, y) for c in cands]
    key = [(f.certified, float(np.mean(f.decide(c).exit)) if f.certified else 0.0) for f, c in zip(fits, cands)]
    return fits[max(range(len(fits)), key=lambda i: (key[i], -i))]


def test_choose_then_certify_keeps_the_pipeline_within_delta() -> None:
    rng = np.random.default_rng(20261203)
    draws, n = 200, 600
    naive = held_out = split = 0
    for r in range(draws):
        y, cands = _draw(rng, n, K)
        naive += _violates(_naive_best(y, cands))
        held_out += _violates(choose_then_certify(cands, y, np.arange(n), _policy, seed=r).policy)
        split += _violates(choose_split_delta(cands, y, _policy).policy)
    se = math.sqrt(DELTA * (1 - DELTA) / draws)
    assert held_out / draws <= DELTA + 3 * se, held_out / draws
    assert split / draws <= DELTA + 3 * se, split / draws  # the demo's route: delta / K each
    # the old pipeline really fails (this is the bug the held-out certificate fixes)
    assert naive / draws > DELTA + 3 * se, naive / draws


def test_holdout_parts_are_stratified_deterministic_and_order_free() -> None:
    rng = np.random.default_rng(0)
    rows = rng.permutation(1000)[:301]
    y = (rng.random(301) < 0.3).astype(np.int64)
    parts = holdout_parts(rows, y, 0.5, seed=3)
    assert not (parts["choose"] & parts["certify"]).any() and (parts["choose"] | parts["certify"]).all()
    for c in (0, 1):
        n_c = int((y == c).sum())
        assert int((parts["certify"] & (y == c)).sum()) == int(round(0.5 * n_c))
    order = rng.permutation(301)
    again = holdout_parts(rows[order], y[order], 0.5, seed=3)
    np.testing.assert_array_equal(again["certify"], parts["certify"][order])
    other = holdout_parts(rows, y, 0.5, seed=4)
    assert not np.array_equal(other["certify"], parts["certify"])
    assert part_mask("all", rows, y).all()
    np.testing.assert_array_equal(part_mask("certify", rows, y, 0.5, 3), parts["certify"])
    with pytest.raises(ValueError, match="part must be"):
        part_mask("test", rows, y)
    with pytest.raises(ValueError, match="fraction"):
        holdout_parts(rows, y, 1.0)


def test_the_winner_is_certified_on_rows_the_choice_never_saw() -> None:
    rng = np.random.default_rng(1)
    y, cands = _draw(rng, 400, 3)
    seen: list[int] = []

    class Spy:
        def __init__(self) -> None:
            self.inner = _policy()

        def fit(self, scores, yy):
            seen.append(len(yy))
            self.inner.fit(scores, yy)
            return self

        def __getattr__(self, name):
            return getattr(self.inner, name)

    sel = choose_then_certify(cands, y, np.arange(400), lambda i: Spy(), seed=0)
    parts = holdout_parts(np.arange(400), y, 0.5, 0)
    assert seen[:3] == [int(parts["choose"].sum())] * 3 and seen[3] == int(parts["certify"].sum())
    assert sel.record.part == "certify" and sel.record.candidates == 3
    assert "unseen by the choice" in sel.record.statement()


def test_selection_record_says_what_a_fit_is_worth() -> None:
    choose = SelectionRecord("holdout", 12, "choose", 0.5, 0)
    assert not choose.is_guarantee and "not a guarantee" in choose.statement()
    top = SelectionRecord("holdout", 12, "certify", 0.5, 0, delta_split=3, chosen_by="Pareto front")
    assert top.is_guarantee and "delta split over 3" in top.statement()
    assert SelectionRecord("none", 1, "all", 0.5, 0).to_dict()["method"] == "none"
    bonf = SelectionRecord("bonferroni", 3, "all", 0.5, 0, delta_split=3, chosen_by="coverage")
    assert bonf.is_guarantee and "delta / 3 (Bonferroni)" in bonf.statement()
