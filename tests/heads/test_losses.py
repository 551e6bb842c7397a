"""Head-specific losses: CRC threshold, SelectiveNet objective, gate targets, class weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stage1.heads import HEADS
from stage1.heads.base import class_weight_vector
from stage1.heads.crc import crc_rank, crc_soft_terms, smoothed_order_statistic, split_batch
from stage1.heads.gate import stratified_folds


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=300, unique=True),
       st.sampled_from([0.02, 0.05, 0.1, 0.3]))
def test_crc_rank_is_the_largest_valid_threshold(scores: list[float], alpha: float) -> None:
    """s_(m) satisfies (#{p < t} + 1) / (n + 1) <= alpha; the next order statistic does not."""
    s = np.sort(np.array(scores))
    n, m = len(s), crc_rank(len(s), alpha)

    def crc_ok(t: float) -> bool:
        return (np.sum(s < t) + 1) / (n + 1) <= alpha + 1e-12

    if m < 0:
        assert not crc_ok(s[0] + 1e-9)  # even the smallest non-trivial threshold breaks the bound
    else:
        assert crc_ok(s[m])
        if m + 1 < n:
            assert not crc_ok(s[m + 1])


def test_smoothed_order_statistic_exact_and_differentiable() -> None:
    v = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7], requires_grad=True)
    assert float(smoothed_order_statistic(v.detach(), 1, 0.0)) == pytest.approx(0.3)
    t = smoothed_order_statistic(v, 1, 1.0)
    assert 0.1 < float(t.detach()) < 0.7
    t.backward()
    g = v.grad.numpy()
    assert g[3] > g[1] > 0 and g[3] > g[2] > 0  # rank 1 (0.3) weighs most, neighbours less
    assert g.sum() == pytest.approx(1.0, abs=1e-6)


def test_crc_soft_terms_split_halves_and_small_batches() -> None:
    y = torch.tensor([1, 0] * 50)
    p1 = torch.linspace(0.01, 0.99, 100, requires_grad=True)
    cal, pred_pos, pred_neg = split_batch(y, "halves", "risk_and_efficiency")
    terms = crc_soft_terms(p1[cal], p1[pred_pos], p1[pred_neg], alpha=0.1, bandwidth=0.0, temperature=0.05)
    assert terms is not None and terms.n_cal_pos == 25
    t = terms.threshold
    cal_pos = np.sort(p1.detach().numpy()[:50][y.numpy()[:50] == 1])
    assert float(t.detach()) == pytest.approx(cal_pos[crc_rank(25, 0.1)])
    pred, yp = p1.detach()[50:], y[50:]
    want_miss = torch.sigmoid((t.detach() - pred[yp == 1]) / 0.05).mean()
    want_keep = torch.sigmoid((pred[yp == 0] - t.detach()) / 0.05).mean()
    assert float(terms.miss.detach()) == pytest.approx(float(want_miss))
    assert float(terms.keep.detach()) == pytest.approx(float(want_keep))
    (terms.miss + terms.keep).backward()
    assert p1.grad[:50].abs().sum() > 0 and p1.grad[50:].abs().sum() > 0  # both halves get gradient
    small = p1.detach()[:20]
    cal, pred_pos, pred_neg = split_batch(y[:20], "halves", "risk_and_efficiency")
    assert crc_soft_terms(small[cal], small[pred_pos], small[pred_neg], alpha=0.02, bandwidth=1.0,
                          temperature=0.05) is None


@pytest.mark.parametrize("objective", ["paper", "risk_and_efficiency"])
def test_crc_loss_adds_weighted_terms(objective: str) -> None:
    kw = dict(crc_alpha=0.1, crc_objective=objective, crc_split="halves", lambda_crc=2.0, lambda_eff=0.5,
              class_weights="none")
    if objective == "paper":
        with pytest.warns(UserWarning, match="lambda_crc has no effect"):
            head = HEADS.create("crc", **kw)
    else:
        head = HEADS.create("crc", **kw)
    torch.manual_seed(0)
    logits = torch.randn(100, 2)
    y = torch.tensor([1, 0] * 50)
    head.prepare(y)
    p1 = torch.softmax(logits, 1)[:, 1]
    cal, pred_pos, pred_neg = split_batch(y, "halves", objective)
    terms = crc_soft_terms(p1[cal], p1[pred_pos], p1[pred_neg], 0.1, 2.0, 0.05)
    assert terms is not None
    want = F.cross_entropy(logits, y) + 0.5 * terms.keep + (2.0 * terms.miss if objective != "paper" else 0.0)
    assert float(head.loss({"logits": logits}, y)) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("divide", [True, False])
def test_selectivenet_loss_formula(divide: bool) -> None:
    head = HEADS.create("selectivenet", coverage=0.9, lam=32.0, alpha=0.5, divide_by_coverage=divide,
                        class_weights="none")
    torch.manual_seed(1)
    out = {"logits": torch.randn(50, 2), "select_logit": torch.randn(50) - 1.0, "aux_logits": torch.randn(50, 2)}
    y = torch.randint(0, 2, (50,))
    head.prepare(y)
    g = torch.sigmoid(out["select_logit"])
    phi = g.mean()
    r = (F.cross_entropy(out["logits"], y, reduction="none") * g).mean()
    r = r / phi if divide else r
    want = 0.5 * (r + 32.0 * max(0.0, 0.9 - float(phi)) ** 2) + 0.5 * F.cross_entropy(out["aux_logits"], y)
    assert float(head.loss(out, y)) == pytest.approx(float(want), rel=1e-5)
    assert head.extra_json()["selective_risk_divided_by_coverage"] is divide
    defaults = HEADS.get("selectivenet").default_hparams()
    assert (defaults["lam"], defaults["alpha"]) == (32.0, 0.5)


def test_gate_in_sample_target_is_batch_correctness() -> None:
    head = HEADS.create("gate", gate_target="in_sample", gate_weight=1.0, class_weights="none")
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    gate = torch.tensor([0.3, -0.2, 0.1])
    y = torch.tensor([0, 0, 0])
    head.prepare(y)
    want = F.cross_entropy(logits, y) + F.binary_cross_entropy_with_logits(gate, torch.tensor([1.0, 0.0, 1.0]))
    assert float(head.loss({"logits": logits, "gate_logit": gate}, y)) == pytest.approx(float(want))
    oof = HEADS.create("gate", gate_target="out_of_fold")
    with pytest.raises(ValueError, match="cross-fitted"):
        oof.loss({"logits": logits, "gate_logit": gate}, y)
    with pytest.raises(ValueError, match="gate_target"):
        HEADS.create("gate", gate_target="bogus")


def test_out_of_fold_targets_see_failures_in_sample_misses() -> None:
    """On pure-noise labels a big head fits the training rows (in-sample ~ always right), but
    cross-fitted predictions are right only about half the time: that is what OOF gates learn."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 16)).astype(np.float32)
    y = rng.integers(0, 2, 240)
    common = dict(hidden=128, dropout=0.0, epochs=40, lr=2e-2, batch_size=48, ema_decay=0.0, weight_decay=0.0)
    head = HEADS.create("gate", gate_target="out_of_fold", folds=3, **common)
    head.prepare(y)
    oof = head.out_of_fold_correct(torch.from_numpy(x), torch.from_numpy(y), None, None)
    assert oof.shape == (240, 1)
    fitted = HEADS.create("mlp", **common).fit(x, y)
    in_sample = (fitted.predict_logits(x).argmax(1) == y).mean()
    assert in_sample > 0.9
    assert abs(float(oof.mean()) - 0.5) < 0.15


def test_stratified_folds_balanced_and_deterministic() -> None:
    y = np.array([0] * 30 + [1] * 12)
    f = stratified_folds(y, 3, seed=5)
    np.testing.assert_array_equal(f, stratified_folds(y, 3, seed=5))
    for k in range(3):
        assert np.sum((f == k) & (y == 1)) == 4 and np.sum((f == k) & (y == 0)) == 10


def test_class_weights_and_label_smoothing_match_torch() -> None:
    y = np.array([0, 0, 0, 1])
    w = class_weight_vector("balanced", y)
    np.testing.assert_allclose(w.numpy(), [4 / 6, 4 / 2])
    assert class_weight_vector("none", y) is None
    np.testing.assert_allclose(class_weight_vector("1,3", y).numpy(), [1, 3])
    with pytest.raises(ValueError, match="class_weights"):
        class_weight_vector("1,2,3", y)
    head = HEADS.create("mlp", label_smoothing=0.1)
    head.prepare(y)
    logits = torch.randn(4, 2)
    yt = torch.from_numpy(y)
    want = F.cross_entropy(logits, yt, weight=w, label_smoothing=0.1)
    assert float(head.loss({"logits": logits}, yt)) == pytest.approx(float(want), rel=1e-6)
    assert not math.isnan(float(head.ce(logits, yt, reduction="none").sum()))
