"""The crc head: the paper's objective (efficiency through the CRC threshold, no risk penalty), the
class-stratified split and positive top-up that let the CRC term run, the refusal / warning when it
cannot, the recorded share of steps that ran it, and seeded determinism."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stage1._core.errors import ConfigError
from stage1.heads import HEADS, load_head
from stage1.heads.crc import (CRCTrainResult, _PositiveTopUp, batch_capacity, crc_min_positives, crc_rank,
                              crc_soft_terms, feature_stats, split_batch)

SMALL = dict(hidden=16, epochs=2, lr=1e-2, ema_decay=0.0, early_stopping=False, class_weights="none")


def rare_data(n: int = 600, d: int = 8, prevalence: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes, ``prevalence`` positives (exactly round(n * prevalence) of them)."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=np.int64)
    y[rng.permutation(n)[: int(round(n * prevalence))]] = 1
    x = rng.normal(size=(n, d)).astype(np.float32) + 1.5 * y[:, None].astype(np.float32)
    return x, y


def spy_terms(head) -> list:
    """Record the CRC terms (or None) of every loss evaluation of ``head``."""
    seen: list = []
    orig = head.crc_terms

    def spy(*args, **kwargs):
        terms = orig(*args, **kwargs)
        seen.append(terms)
        return terms

    head.crc_terms = spy
    return seen


# -- the objective ----------------------------------------------------------------------------
def test_min_positives_is_where_the_crc_rank_starts() -> None:
    for alpha in (0.02, 0.05, 0.1, 0.25, 0.3, 0.5):
        need = crc_min_positives(alpha)
        assert crc_rank(need, alpha) == 0 and crc_rank(need - 1, alpha) == -1
    assert crc_min_positives(0.02) == 49


def test_loss_terms_by_hand_on_a_tiny_batch() -> None:
    """alpha 0.25: 3 calibration positives suffice, m = floor(0.25 * 4 - 1) = 0 (their minimum)."""
    y = torch.tensor([1, 0, 1, 0, 1, 0, 0, 1])
    p = [0.9, 0.3, 0.6, 0.2, 0.8, 0.7, 0.1, 0.4]
    logits = torch.tensor([[0.0, math.log(q / (1 - q))] for q in p])  # softmax(logits)[:, 1] = p
    T, lam_eff, lam_crc = 0.1, 0.5, 2.0

    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    ce = -sum(math.log(q if yy else 1 - q) for q, yy in zip(p, y.tolist())) / len(p)
    # paper, stratified: every positive calibrates -> t = min(0.9, 0.6, 0.8, 0.4) = 0.4; every negative predicts
    keep = sum(sig((q - 0.4) / T) for q in (0.3, 0.2, 0.7, 0.1)) / 4
    head = HEADS.create("crc", crc_alpha=0.25, crc_bandwidth=0.0, crc_temperature=T, lambda_eff=lam_eff,
                        class_weights="none")
    head.prepare(y)
    assert float(head.loss({"logits": logits}, y)) == pytest.approx(ce + lam_eff * keep, rel=1e-6)
    # risk_and_efficiency, halves: rows 0-3 calibrate (positives 0.9, 0.6: 2 < 3, no threshold) -> CE only
    head.set_params(crc_objective="risk_and_efficiency", crc_split="halves", lambda_crc=lam_crc)
    assert float(head.loss({"logits": logits}, y)) == pytest.approx(ce, rel=1e-6)
    # risk_and_efficiency, stratified: positives alternate -> calibration {0.9, 0.8}, 2 < 3 -> CE only;
    # with alpha 0.5 (1 positive suffices, m = floor(0.5 * 3 - 1) = 0): t = min(0.9, 0.8) = 0.8
    head.set_params(crc_split="stratified", crc_alpha=0.5)
    miss = sum(sig((0.8 - q) / T) for q in (0.6, 0.4)) / 2
    keep = sum(sig((q - 0.8) / T) for q in (0.3, 0.2, 0.7, 0.1)) / 4
    want = ce + lam_crc * miss + lam_eff * keep
    assert float(head.loss({"logits": logits}, y)) == pytest.approx(want, rel=1e-6)


def test_paper_gradient_has_no_controlled_risk_term() -> None:
    """d loss / d logits of the paper objective = that of CE + lambda_eff * E(t) alone, whatever lambda_crc;
    the old objective adds the miss-rate gradient, which pushes the threshold's positives down."""
    torch.manual_seed(3)
    y = (torch.rand(400) < 0.3).long()
    base = torch.randn(400, 2)
    kw = dict(crc_alpha=0.05, crc_split="halves", lambda_eff=0.7, class_weights="none")

    def grad(objective: str, lambda_crc: float, manual: bool = False) -> torch.Tensor:
        logits = base.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head = HEADS.create("crc", crc_objective=objective, lambda_crc=lambda_crc, **kw)
        head.prepare(y)
        if manual:
            p1 = torch.softmax(logits, 1)[:, 1]
            cal, pp, pn = split_batch(y, "halves", objective)
            terms = crc_soft_terms(p1[cal], p1[pp], p1[pn], 0.05, 2.0, 0.05)
            assert terms is not None
            loss = F.cross_entropy(logits, y) + 0.7 * terms.keep
        else:
            loss = head.loss({"logits": logits}, y)
        loss.backward()
        return logits.grad

    g_paper = grad("paper", 1.0)
    torch.testing.assert_close(g_paper, grad("paper", 1.0, manual=True))
    torch.testing.assert_close(g_paper, grad("paper", 5.0))  # lambda_crc is inert
    g_old = grad("risk_and_efficiency", 1.0)
    diff = (g_old - g_paper)[:, 1]  # the miss term's gradient w.r.t. the positive logit
    cal = split_batch(y, "halves", "paper")[0]
    assert diff.abs().sum() > 0
    assert (diff[cal] >= -1e-9).all() and diff[cal].sum() > 0  # descent pushes calibration positives down


def test_lambda_crc_with_the_paper_objective_warns() -> None:
    with pytest.warns(UserWarning, match="lambda_crc has no effect"):
        HEADS.create("crc", lambda_crc=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HEADS.create("crc", lambda_crc=2.0, crc_objective="risk_and_efficiency")
        HEADS.create("crc")


# -- the split and the top-up -----------------------------------------------------------------
def test_split_masks() -> None:
    y = torch.tensor([0, 1, 1, 0, 1, 0, 1, 1])
    cal, pp, pn = split_batch(y, "stratified", "paper")
    assert cal.tolist() == (y == 1).tolist() and not pp.any() and pn.tolist() == (y == 0).tolist()
    cal, pp, pn = split_batch(y, "stratified", "risk_and_efficiency")
    assert torch.nonzero(cal).flatten().tolist() == [1, 4, 7] and torch.nonzero(pp).flatten().tolist() == [2, 6]
    assert pn.tolist() == (y == 0).tolist()
    cal, pp, pn = split_batch(y, "halves", "paper")
    assert torch.nonzero(cal).flatten().tolist() == [1, 2] and torch.nonzero(pp).flatten().tolist() == [4, 6, 7]
    assert torch.nonzero(pn).flatten().tolist() == [5]
    assert batch_capacity("halves", "paper", 512, 1000) == 256
    assert batch_capacity("stratified", "paper", 512, 30) == 30
    assert batch_capacity("stratified", "risk_and_efficiency", 512, 31) == 16


def test_topup_draws_positives_outside_the_batch_and_repeats_for_the_same_batch() -> None:
    y = torch.tensor([1, 0] * 30)
    x = torch.randn(60, 4)
    top = _PositiveTopUp(x, y, None, seed=0, module=nn.Identity())
    rows = torch.arange(0, 40)
    pick, views = top.draw(rows, 7)
    assert len(pick) == 7 and (y[pick] == 1).all() and not np.isin(pick.numpy(), rows.numpy()).any()
    assert len(set(pick.tolist())) == 7 and (views == 0).all()
    again, _ = top.draw(rows.clone(), 7)  # F-SAM's second evaluation of the same batch
    assert torch.equal(again, pick)
    most, _ = top.draw(torch.arange(0, 50), 99)  # only 5 positives outside the batch
    assert sorted(most.tolist()) == [50, 52, 54, 56, 58]


@pytest.mark.parametrize("split", ["stratified", "halves"])
def test_every_step_has_enough_calibration_positives(split: str) -> None:
    """10% positives, batch 128, alpha 0.05 (19 needed): a batch holds ~13 positives, half ~6; the
    top-up brings every step's calibration set to >= 19 and the CRC term runs in all of them."""
    x, y = rare_data(n=1280)
    head = HEADS.create("crc", crc_alpha=0.05, batch_size=128, crc_split=split, **SMALL)
    seen = spy_terms(head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "CRC term ran in k of n steps" warning
        head.fit(x, y)
    assert len(seen) == 2 * 10 and all(t is not None and t.n_cal_pos >= 19 for t in seen)
    hist = head.history_
    assert isinstance(hist, CRCTrainResult)
    assert (hist.crc_term_fraction, hist.crc_term_steps, hist.crc_steps) == (1.0, 20, 20)
    assert hist.crc_topup_steps >= 15 and hist.crc_topup_rows >= hist.crc_topup_steps


def test_min_cal_positives_sets_the_topup_target() -> None:
    x, y = rare_data(n=1280)
    head = HEADS.create("crc", crc_alpha=0.05, batch_size=128, crc_min_cal_positives=40, **SMALL)
    seen = spy_terms(head)
    head.fit(x, y)
    assert all(t.n_cal_pos >= 40 for t in seen)


def test_without_topup_short_steps_warn_and_the_fraction_is_counted() -> None:
    """Halves of 256-row batches at 10% hold ~13 positives; alpha 0.1 needs 9: most but not all run."""
    x, y = rare_data(n=2560, seed=1)
    head = HEADS.create("crc", crc_alpha=0.1, batch_size=256, crc_split="halves", crc_topup=False,
                        crc_objective="risk_and_efficiency", **SMALL)
    seen = spy_terms(head)
    with pytest.warns(UserWarning, match=r"CRC term ran in \d+ of 20 training steps") as rec:
        head.fit(x, y)
    ran = sum(t is not None for t in seen)
    assert len(seen) == 20 and 0 < ran < 20
    assert head.history_.crc_term_steps == ran and head.history_.crc_steps == 20
    assert head.history_.crc_term_fraction == pytest.approx(ran / 20)
    assert head.history_.crc_topup_rows == 0
    assert "needs >= 9 positives" in str(rec[0].message)


def test_refuses_when_the_crc_term_could_never_run() -> None:
    x, y = rare_data(n=400, prevalence=0.1)  # 40 positives
    with pytest.raises(ConfigError, match=r"needs at least 49 calibration positives.*has 40 positive rows"):
        HEADS.create("crc", crc_alpha=0.02, **SMALL).fit(x, y)
    with pytest.raises(ConfigError, match="no positives at all|has 0 positive rows"):
        HEADS.create("crc", crc_alpha=0.25, **SMALL).fit(x, np.zeros(len(y), dtype=np.int64))
    # without the top-up, half of a 40-row batch can never hold the 24 positives alpha 0.04 needs
    with pytest.raises(ConfigError, match="a batch of 40 rows holds at most 20 calibration positives"):
        HEADS.create("crc", crc_alpha=0.04, batch_size=40, crc_split="halves", crc_topup=False, **SMALL).fit(x, y)
    head = HEADS.create("crc", crc_alpha=0.04, batch_size=40, **SMALL).fit(x, y)  # the top-up makes it run
    assert head.history_.crc_term_fraction == 1.0


def test_fsam_counts_each_step_once_and_reuses_the_topup_draw() -> None:
    x, y = rare_data(n=1280)
    head = HEADS.create("crc", crc_alpha=0.05, batch_size=128, fsam=True, **SMALL)
    seen = spy_terms(head)
    head.fit(x, y)
    assert len(seen) == 2 * 20  # two loss evaluations per step
    assert head.history_.crc_steps == 20 and head.history_.crc_term_fraction == 1.0
    assert all(a.n_cal_pos == b.n_cal_pos for a, b in zip(seen[::2], seen[1::2]))


# -- records, determinism ---------------------------------------------------------------------
def test_fraction_is_saved_and_loaded(tmp_path) -> None:
    x, y = rare_data(n=1280)
    head = HEADS.create("crc", crc_alpha=0.05, batch_size=128, **SMALL).fit(x, y)
    head.save(tmp_path)
    meta = json.loads((tmp_path / "head.json").read_text())
    assert meta["training"]["crc_term_fraction"] == 1.0 and meta["training"]["crc_steps"] == 20
    assert meta["crc_term_fraction"] == 1.0 and meta["crc_objective"] == "paper"
    again = load_head(tmp_path)
    assert again.history_.to_dict() == head.history_.to_dict()
    np.testing.assert_array_equal(again.predict_logits(x), head.predict_logits(x))


def test_heads_saved_before_the_objective_option_keep_their_objective(tmp_path) -> None:
    x, y = rare_data(n=1280)
    head = HEADS.create("crc", crc_alpha=0.05, batch_size=128, **SMALL).fit(x, y)
    head.save(tmp_path)
    meta = json.loads((tmp_path / "head.json").read_text())
    for k in ("crc_objective", "crc_split", "crc_topup", "crc_min_cal_positives"):
        del meta["hparams"][k]
    for k in ("crc_term_fraction", "crc_term_steps", "crc_steps", "crc_topup_steps", "crc_topup_rows"):
        del meta["training"][k]
    (tmp_path / "head.json").write_text(json.dumps(meta))
    old = load_head(tmp_path)
    p = old.get_params()
    assert (p["crc_objective"], p["crc_split"], p["crc_topup"]) == ("risk_and_efficiency", "halves", False)
    np.testing.assert_array_equal(old.predict_logits(x), head.predict_logits(x))


def test_topup_standardises_like_the_fit() -> None:
    x, y = rare_data(n=640)
    x = x * 3.0 + 5.0
    head = HEADS.create("crc", crc_alpha=0.05, batch_size=128, **SMALL).fit(x, y)
    mean, std = feature_stats(torch.from_numpy(x))
    torch.testing.assert_close(head.module_.standardize.mean, mean)
    torch.testing.assert_close(head.module_.standardize.std, std)


@pytest.mark.parametrize("view_mode", ["sample", "all"])
def test_same_seed_same_weights_with_topup(view_mode: str) -> None:
    x, y = rare_data(n=1280)
    x3 = np.stack([x, x + 0.05], axis=1)
    kw = dict(crc_alpha=0.05, batch_size=128, view_mode=view_mode, **SMALL)

    def weights(seed: int) -> dict[str, np.ndarray]:
        head = HEADS.create("crc", seed=seed, **kw).fit(x3, y)
        assert head.history_.crc_topup_rows > 0 and head.history_.crc_term_fraction == 1.0
        return {k: v.detach().numpy().copy() for k, v in head.module_.state_dict().items()}

    a, b, c = weights(5), weights(5), weights(6)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
