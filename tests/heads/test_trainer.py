"""The trainer: schedule, EMA, early stopping on the selective objective, optimisers (F-SAM, Lion), views."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stage1.heads import HEADS
from stage1.heads.trainer import TrainConfig, train_module


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="select_metric"):
        TrainConfig(select_metric="accuracy")
    with pytest.raises(ValueError, match="view_mode"):
        TrainConfig(view_mode="mean")


def test_optimizer_setting_and_the_older_fsam_switch() -> None:
    from stage1._core.errors import ConfigError, UnknownNameError

    assert TrainConfig().optimizer == "adamw"
    assert TrainConfig(fsam=True).optimizer == "fsam"  # the older switch means optimizer=fsam
    assert TrainConfig(optimizer="fsam").optimizer == "fsam"
    with pytest.raises(UnknownNameError, match="choose one of: adamw, fsam, lion"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="fsam=True"):
        TrainConfig(optimizer="lion", fsam=True)


def test_learning_rate_follows_the_shared_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step's lr is ``optim.lr_factor`` at the configured peak: warmup then cosine."""
    from stage1.heads.optim import lr_factor

    x, y = _data()
    seen: list[float] = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, warmup_frac=0.25, min_lr_ratio=0.1, ema_decay=0.0)
    train_module(Probe(), lambda out, yb: nn.functional.cross_entropy(out["logits"], yb), _score, x, y, cfg)
    total = 3 * (128 // 32)
    assert seen == [lr_factor(s, total, 0.25, 0.1, peak=0.05) for s in range(total)]
    assert max(seen) == pytest.approx(0.05) and seen[-1] >= 0.05 * 0.1


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.lin(x)}


def _score(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return out["logits"], out["logits"].softmax(1).amax(1)


def _data(n: int = 128, views: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    if views:
        x = x[:, None, :].repeat(1, views, 1) + 0.01 * torch.randn(n, views, 4, generator=g)
    return x, y


def test_early_stopping_keeps_best_epoch_and_stops() -> None:
    x, y = _data()

    def loss_fn(out, yb):
        return nn.functional.cross_entropy(out["logits"], yb)

    # validation labels are the opposite rule: the objective gets worse as training improves
    torch.manual_seed(0)
    m = Probe()
    res = train_module(m, loss_fn, _score, x, y, TrainConfig(epochs=30, patience=3, batch_size=32, lr=0.05,
                                                             ema_decay=0.0), x_val=x, y_val=1 - y)
    assert res.epochs_run == res.best_epoch + 1 + 3 < 30
    assert res.best_objective == min(res.val_objective)


def test_ema_weights_are_what_is_kept() -> None:
    x, y = _data()

    def loss_fn(out, yb):
        return nn.functional.cross_entropy(out["logits"], yb)

    outs = []
    for decay in (0.0, 0.95):
        torch.manual_seed(0)
        m = Probe()
        train_module(m, loss_fn, _score, x, y, TrainConfig(epochs=5, batch_size=16, lr=0.1, ema_decay=decay))
        outs.append(m.lin.weight.detach().clone())
        assert all(p.requires_grad for p in m.parameters())  # still trainable (e.g. by finetune)
    assert not torch.equal(outs[0], outs[1])
    # the EMA lags the raw weights: it has moved less far from the common initialisation
    torch.manual_seed(0)
    init = Probe().lin.weight.detach()
    assert (outs[1] - init).norm() < (outs[0] - init).norm()


def test_view_mode_all_sees_every_row_view_pair() -> None:
    x, y = _data(n=40, views=3)
    batches: list[int] = []

    def loss_fn(out, yb):
        batches.append(len(yb))
        return nn.functional.cross_entropy(out["logits"], yb)

    torch.manual_seed(0)
    train_module(Probe(), loss_fn, _score, x, y, TrainConfig(epochs=1, batch_size=10, view_mode="all", ema_decay=0.0))
    assert sum(batches) == 120
    batches.clear()
    train_module(Probe(), loss_fn, _score, x, y, TrainConfig(epochs=1, batch_size=10, view_mode="sample", ema_decay=0.0))
    assert sum(batches) == 40


def test_extras_follow_their_rows_and_views() -> None:
    x, y = _data(n=30, views=2)
    tag = torch.arange(30)[:, None] * 10 + torch.arange(2)[None, :]  # encodes (row, view)
    xt = x.clone()
    xt[:, :, 3] = tag.float()

    def loss_fn(out, yb, tag):
        return nn.functional.cross_entropy(out["logits"], yb)

    class Check(Probe):
        def forward(self, xb):
            self.last = xb[:, 3].clone()
            return super().forward(xb)

    m = Check()
    seen_tags = []

    def loss_check(out, yb, tag):
        seen_tags.append((m.last.clone(), tag.float().clone()))
        return loss_fn(out, yb, tag)

    train_module(m, loss_check, _score, xt, y, TrainConfig(epochs=2, batch_size=8, ema_decay=0.0), extras={"tag": tag})
    for a, b in seen_tags:
        torch.testing.assert_close(a, b)


def test_fsam_and_clipping_train_deterministically() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    kw = dict(epochs=8, ema_decay=0.9, hidden=16, batch_size=32, fsam=True, fsam_rho=0.1, grad_clip=0.5, lr=1e-2)
    a = HEADS.create("mlp", **kw).fit(x, y)
    b = HEADS.create("mlp", **kw).fit(x, y)
    c = HEADS.create("mlp", **{**kw, "fsam": False}).fit(x, y)
    np.testing.assert_array_equal(a.predict_logits(x), b.predict_logits(x))
    assert not np.array_equal(a.predict_logits(x), c.predict_logits(x))
    assert (a.predict_logits(x).argmax(1) == y).mean() > 0.8


def test_fast_dropout_rate_scale_and_eval_identity() -> None:
    from stage1.heads.base import FastDropout

    d = FastDropout(0.3)
    torch.manual_seed(0)
    out = d(torch.ones(200, 500))
    assert abs(float((out == 0).float().mean()) - d.effective_p) < 0.01
    assert float(out.mean()) == pytest.approx(1.0, abs=0.02)  # inverted dropout keeps the mean
    d.eval()
    x = torch.randn(3, 4)
    assert torch.equal(d(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match="dropout"):
        FastDropout(1.0)


def test_without_early_stopping_runs_all_epochs_and_keeps_the_last() -> None:
    x, y = _data()

    def loss_fn(out, yb):
        return nn.functional.cross_entropy(out["logits"], yb)

    torch.manual_seed(0)
    res = train_module(Probe(), loss_fn, _score, x, y, TrainConfig(epochs=6, patience=1, batch_size=32, lr=0.05,
                                                                   ema_decay=0.0, early_stopping=False),
                       x_val=x, y_val=1 - y)
    assert res.epochs_run == 6 and res.best_epoch == 5 and len(res.val_objective) == 6


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_grad_clip_bounds_the_stepped_gradient(monkeypatch: pytest.MonkeyPatch, clip: float) -> None:
    x, y = _data()
    seen: list[tuple[float, float]] = []
    original = nn.utils.clip_grad_norm_

    def spy(params, max_norm, **kw):
        params = list(params)
        original(params, max_norm, **kw)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        seen.append((float(max_norm), float(after)))

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", spy)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, ema_decay=0.0, grad_clip=clip)
    train_module(Probe(), lambda out, yb: nn.functional.cross_entropy(out["logits"], yb) * 100, _score, x, y, cfg)
    if clip == 0:
        assert seen == []  # 0 = off
    else:
        assert len(seen) == 2 * (128 // 32)  # every step is clipped at the configured norm
        assert all(m == clip and after <= clip * (1 + 1e-4) for m, after in seen)


def test_lion_trains_a_module_to_a_low_loss_deterministically() -> None:
    """Trainer level: optimizer=lion steps the module (Lion's scale: lr 10x below AdamW's, wd 10x above)."""
    from lion_pytorch import Lion

    x, y = _data(256)
    kinds: list[type] = []
    original = Lion.step

    def spy(self, *args, **kwargs):
        kinds.append(type(self))
        return original(self, *args, **kwargs)

    def fit() -> tuple[Probe, list[float]]:
        torch.manual_seed(0)
        m = Probe()
        cfg = TrainConfig(epochs=15, batch_size=32, optimizer="lion", lr=2e-2, weight_decay=0.1, ema_decay=0.0)
        res = train_module(m, lambda out, yb: nn.functional.cross_entropy(out["logits"], yb), _score, x, y, cfg)
        return m, res.train_loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Lion, "step", spy)
        a, losses = fit()
    assert kinds and set(kinds) == {Lion}
    b, _ = fit()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert losses[-1] < 0.3 < losses[0], losses
    with torch.no_grad():
        assert (a(x)["logits"].argmax(1) == y).float().mean() > 0.95


def test_a_head_trains_with_lion_on_separable_data() -> None:
    """Head level: the ``optimizer`` hyperparameter reaches the trainer (lr about 3x below AdamW's 1e-2)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    kw = dict(epochs=20, hidden=16, batch_size=32, weight_decay=0.1, early_stopping=False)
    head = HEADS.create("mlp", optimizer="lion", lr=3e-3, **kw).fit(x, y)
    adamw = HEADS.create("mlp", lr=3e-3, **kw).fit(x, y)
    assert not np.array_equal(head.predict_logits(x), adamw.predict_logits(x))
    logits = torch.as_tensor(head.predict_logits(x))
    loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(y)))
    assert loss < 0.3 and (logits.argmax(1).numpy() == y).mean() > 0.93, loss
