"""Contract tests run over every registered head: the sklearn-style protocol of DESIGN "Heads"."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stage1 import heads
from stage1.heads import HEADS, load_head

FAST = dict(epochs=3, hidden=16, batch_size=32, lr=1e-2, patience=50, ema_decay=0.9)
PER_HEAD = {"gate": dict(folds=2), "crc": dict(batch_size=32, crc_alpha=0.25)}


def tiny_data(n: int = 160, d: int = 12, views: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    w = np.random.default_rng(123).normal(size=d)  # one rule for every draw
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d)).astype(np.float32)
    y = (base @ w + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
    if views:
        x = base[:, None, :] + 0.1 * rng.normal(size=(n, views, d)).astype(np.float32)
        return x.astype(np.float32), y
    return base, y


def make(name: str, **kw) -> heads.base.Head:
    return HEADS.create(name, **{**FAST, **PER_HEAD.get(name, {}), **kw})


def state(head) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in head.module_.state_dict().items()}


def test_registry_has_the_four_heads() -> None:
    assert set(HEADS.names()) >= {"mlp", "gate", "selectivenet", "crc"}


@pytest.mark.parametrize("name", HEADS.names())
def test_init_only_stores_and_rejects_unknown(name: str) -> None:
    head = HEADS.create(name, lr=3e-3)
    assert head.module_ is None and head.get_params()["lr"] == 3e-3
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        HEADS.create(name, not_a_param=1)
    with pytest.raises(RuntimeError, match="fit"):
        head.predict_logits(np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("name", HEADS.names())
def test_fit_predict_shapes_and_ranges(name: str) -> None:
    x, y = tiny_data()
    xv, yv = tiny_data(seed=1)
    head = make(name)
    assert head.fit(x, y, X_val=xv, y_val=yv) is head
    scores = head.predict_scores(xv)
    assert scores["logits"].shape == (len(xv), 2) and scores["logits"].dtype == np.float32
    assert scores["select"].shape == (len(xv),)
    assert np.all((scores["select"] >= 0) & (scores["select"] <= 1))
    np.testing.assert_array_equal(head.predict_logits(xv), scores["logits"])
    assert (scores["logits"].argmax(1) == yv).mean() > 0.7  # it learned the linear rule
    assert 0 <= head.history_.best_epoch < head.history_.epochs_run <= 3


@pytest.mark.parametrize("name", HEADS.names())
def test_save_load_gives_identical_outputs(name: str, tmp_path) -> None:
    x, y = tiny_data()
    head = make(name).fit(x, y)
    head.save(tmp_path)
    meta = json.loads((tmp_path / "head.json").read_text())
    assert meta["head"] == name and meta["schema_version"] == 1 and meta["in_dim"] == x.shape[1]
    again = load_head(tmp_path)
    assert type(again) is type(head) and again.get_params() == head.get_params()
    a, b = head.predict_scores(x), again.predict_scores(x)
    np.testing.assert_array_equal(a["logits"], b["logits"])
    np.testing.assert_array_equal(a["select"], b["select"])


@pytest.mark.parametrize("name", HEADS.names())
def test_same_seed_identical_weights_other_seed_differs(name: str) -> None:
    x, y = tiny_data()
    s1, s2 = state(make(name, seed=3).fit(x, y)), state(make(name, seed=3).fit(x, y))
    s3 = state(make(name, seed=4).fit(x, y))
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k])
    assert any(not np.array_equal(s1[k], s3[k]) for k in s1)


@pytest.mark.parametrize("name", HEADS.names())
@pytest.mark.parametrize("view_mode", ["sample", "all"])
def test_accepts_views_and_predicts_on_view0(name: str, view_mode: str) -> None:
    x3, y = tiny_data(views=3)
    head = make(name, view_mode=view_mode).fit(x3, y, X_val=x3, y_val=y)
    np.testing.assert_array_equal(head.predict_logits(x3), head.predict_logits(x3[:, 0]))
    assert head.predict_logits(x3).shape == (len(x3), 2)


@pytest.mark.parametrize("name", HEADS.names())
def test_make_module_and_loss_for_finetuning(name: str) -> None:
    """The finetune contract: make_module(in_dim) maps [B, D] to outputs; loss(outputs, y) is a scalar."""
    head = make(name, **({"gate_target": "in_sample"} if name == "gate" else {}))
    module = head.make_module(8)
    torch.manual_seed(0)
    feats = torch.randn(64, 8, requires_grad=True)
    y = torch.arange(64) % 2
    head.prepare(y)
    out = module(feats)
    assert out["logits"].shape == (64, 2)
    loss = head.loss(out, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


@pytest.mark.parametrize("name", HEADS.names())
def test_bad_inputs_have_clear_errors(name: str) -> None:
    head = make(name)
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        head.fit(np.zeros((4,), np.float32), np.zeros(4))
    with pytest.raises(ValueError, match="both X_val and y_val"):
        head.fit(np.zeros((4, 3), np.float32), np.array([0, 1, 1, 0]), X_val=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        head.fit(np.zeros((4, 3), np.float32), np.array([0, 1, -1, 0]))
    x, y = tiny_data(n=64)
    head.fit(x, y)
    with pytest.raises(ValueError, match="width"):
        head.predict_logits(np.zeros((2, x.shape[1] + 1), np.float32))
