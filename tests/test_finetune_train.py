"""Training loops on a tiny random DINOv3 (CPU): losses fall, early stopping, views, DINO pieces."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stage1.finetune.adapters import AdapterSpec, attach, trainable
from stage1.finetune.data import Item, ViewDataset, collect_items
from stage1.finetune.dino import DinoHead, DinoLoss, ema_momentum, ema_update
from stage1.finetune.loop import Runtime, checkpointing_on, cls_features, enable_checkpointing
from stage1.finetune.selfsup import AdaptConfig, train_selfsup
from stage1.finetune.supervised import SupervisedConfig, predict, train_supervised
from stage1.finetune.targets import block_parameter_names, linear_targets


def _colour_items(folder: Path, n: int = 16) -> list[Item]:
    """Images whose label is visible (reddish = 1, bluish = 0), with texture so views differ."""
    from stage1._core.io import sha256_file

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        label = i % 2
        arr = rng.integers(0, 90, size=(36, 44, 3))
        arr[..., 0 if label else 2] += 150
        path = folder / f"c{i}.png"
        Image.fromarray(arr.astype(np.uint8)).save(path)
        items.append(Item(str(path), path.name, label, sha256_file(path)))
    return items


def _model(path: Path) -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), local_files_only=True)


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@torch.no_grad()
def _mean_loss(model, module, loss_fn, data: ViewDataset) -> float:
    outputs, y = predict(model, module, data, Runtime.resolve("cpu"), batch_size=32)
    return float(loss_fn(outputs, torch.as_tensor(y)))


@pytest.mark.parametrize("optimizer", ["adamw", "fsam"])
def test_supervised_loss_falls_and_best_epoch_is_restored(optimizer: str, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from stage1.heads import HEADS

    items = _colour_items(tmp_path / "img")
    torch.manual_seed(0)
    model = attach(_model(tiny_backbone_dir), AdapterSpec("lora", 4, 8, targets=linear_targets(_model(tiny_backbone_dir), [1], "all")))
    head = HEADS.create("mlp", dropout=0.0, hidden=16)
    head.prepare(np.array([it.label for it in items[:12]]))
    module = head.make_module(32)
    train = ViewDataset(items[:12], 32, MEAN, STD, seed=0, levels=(0, 1))
    clean_train = ViewDataset(items[:12], 32, MEAN, STD)
    val = ViewDataset(items[12:], 32, MEAN, STD)
    before = _mean_loss(model, module, head.loss, clean_train)
    start = {k: v.detach().clone() for k, v in trainable(model).items()}
    cfg = SupervisedConfig(epochs=4, batch_size=4, lr=5e-3, head_lr=5e-3, optimizer=optimizer, patience=2, warmup_frac=0.0)
    hist = train_supervised(model, module, head.loss, train, val, cfg, Runtime.resolve("cpu"),
                            score_fn=head.scores_from_outputs)
    after = _mean_loss(model, module, head.loss, clean_train)
    assert after < before - 0.05, (before, after, hist["train_loss"])
    assert any(not torch.equal(v, start[k]) for k, v in trainable(model).items())
    objective = hist["val_objective"]
    assert hist["best_epoch"] == int(np.argmin(objective))
    assert hist["epochs_run"] == cfg.epochs or hist["epochs_run"] - 1 - hist["best_epoch"] == cfg.patience
    assert len(hist["step_loss"]) == hist["epochs_run"] * 3  # 12 images / batch 4, ragged tail dropped


def test_views_are_the_store_views_and_deterministic(tmp_path: Path) -> None:
    from stage1.featstore.images import load_rgb, preprocess

    items = _colour_items(tmp_path / "img", n=2)
    clean = ViewDataset(items, 32, MEAN, STD)
    np.testing.assert_array_equal(clean[0][0][0].numpy(), preprocess(load_rgb(items[0].path), 32, MEAN, STD))
    a = ViewDataset(items, 32, MEAN, STD, seed=3, n_views=2, levels=(1, 2, 3))
    b = ViewDataset(items, 32, MEAN, STD, seed=3, n_views=2, levels=(1, 2, 3))
    first = a[0][0]
    assert first.shape == (2, 3, 32, 32)
    assert torch.equal(first, b[0][0])  # same seed, same epoch: identical
    assert not torch.equal(first[0], first[1])  # two different views
    a.set_epoch(1)
    assert not torch.equal(first, a[0][0])  # a new epoch draws new views
    with pytest.raises(ValueError, match="levels"):
        ViewDataset(items, 32, MEAN, STD, levels=(4,))


def test_bad_images_are_quarantined_not_dropped(tmp_path: Path) -> None:
    from stage1.featstore.labels import ImageEntry

    items = _colour_items(tmp_path, n=2)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    entries = [ImageEntry(items[0].rel, 1), ImageEntry("broken.jpg", 0), ImageEntry("missing.png", 1),
               ImageEntry(items[1].rel, 0)]
    good, quarantined, kept = collect_items(tmp_path, entries, 32)
    assert [it.rel for it in good] == [items[0].rel, items[1].rel] and kept == [0, 3]
    assert good[0].sha256 == items[0].sha256
    assert {q["path"]: q["reason"] for q in quarantined} == {"broken.jpg": "not an image", "missing.png": "missing"}
    assert all(q["path"] in q["detail"] for q in quarantined)  # the cause travels, as in extract's quarantine


def test_gradient_checkpointing_and_amp(tiny_backbone_dir: Path) -> None:
    torch.manual_seed(0)
    base = _model(tiny_backbone_dir)
    model = attach(base, AdapterSpec("lora", 4, 8, targets=linear_targets(base, [0, 1], "all")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32)
    model.train()

    def grads() -> dict[str, torch.Tensor]:
        torch.manual_seed(1)  # DINOv3 jitters its RoPE coordinates in train mode
        model.zero_grad()
        cls_features(model, x).pow(2).sum().backward()
        return {k: p.grad.clone() for k, p in trainable(model).items()}

    plain = grads()
    enable_checkpointing(model, True)
    assert checkpointing_on(model)
    ckpt = grads()
    enable_checkpointing(model, False)
    assert not checkpointing_on(model)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)
    cpu = Runtime.resolve("cpu")
    assert (cpu.amp, cpu.grad_checkpointing) == (False, False)
    amp = Runtime.resolve("cpu", amp=True, grad_checkpointing=True)
    model.eval()
    with amp.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        out = cls_features(model, x)
    with cpu.autocast():
        assert not torch.is_autocast_enabled("cpu")
        full = cls_features(model, x)
    assert not torch.equal(out, full)  # bf16 matmuls really ran ...
    torch.testing.assert_close(out.float(), full, atol=0.1, rtol=0.05)  # ... and agree to bf16 precision
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Runtime.resolve("cuda")


def test_dino_loss_matches_definition_and_updates_centre() -> None:
    torch.manual_seed(0)
    crit = DinoLoss(8, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    crit.center.fill_(0.05)
    s, t = torch.randn(6, 8), torch.randn(6, 8)
    s1, s2 = (s / 0.1).chunk(2)
    p1, p2 = torch.softmax((t - 0.05) / 0.04, -1).chunk(2)
    manual = 0.5 * ((-p1 * torch.log_softmax(s2, -1)).sum(-1).mean() + (-p2 * torch.log_softmax(s1, -1)).sum(-1).mean())
    torch.testing.assert_close(crit(s, t), manual)
    torch.testing.assert_close(crit.center, 0.9 * torch.full((1, 8), 0.05) + 0.1 * t.mean(0, keepdim=True))
    assert ema_momentum(0, 10, 0.996) == pytest.approx(0.996) and ema_momentum(9, 10, 0.996) == pytest.approx(1.0)
    teacher, student = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    ema_update(teacher, student, 0.75)
    torch.testing.assert_close(teacher["w"], torch.full((3,), 0.25))
    head = DinoHead(32, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    scores = head(torch.randn(5, 32))
    assert scores.shape == (5, 16) and scores.abs().max() <= 1.0 + 1e-6  # cosine scores


@pytest.mark.parametrize("keep", ["student", "teacher"])
def test_selfsup_student_learns_the_teacher_and_keeps_frozen_weights(keep: str, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    items = _colour_items(tmp_path / "img", n=8)
    base = _model(tiny_backbone_dir)
    frozen_before = {k: v.clone() for k, v in base.state_dict().items()}
    spec = AdapterSpec("lora", 4, 8, targets=linear_targets(base, [0], "qv"), unfrozen=block_parameter_names(base, [1]))
    torch.manual_seed(0)
    model = attach(base, spec)
    data = ViewDataset(items, 32, MEAN, STD, seed=0, n_views=2, levels=(1,))
    # a nearly frozen teacher makes the objective stationary: the student must get closer to it
    cfg = AdaptConfig(epochs=5, batch_size=8, lr=2e-3, head_lr=1e-2, out_dim=32, hidden_dim=32, bottleneck_dim=8,
                      ema=0.99999, head_warmup_frac=0.2, warmup_frac=0.0, keep=keep)
    hist = train_selfsup(model, 32, data, cfg, Runtime.resolve("cpu"))
    losses = hist["step_loss"]
    assert len(losses) == 5 and hist["head_only_steps"] == 1
    assert np.mean(losses[-2:]) < losses[0], losses
    now = model.get_base_model().state_dict()
    moved = set()
    for key, value in frozen_before.items():
        prefix, leaf = key.rsplit(".", 1)
        current = now.get(key, now.get(f"{prefix}.base_layer.{leaf}"))
        if not torch.equal(current, value):
            moved.add(key)
    # only the unfrozen last block can move (LoRA lives in separate tensors until merged)
    assert moved <= set(spec.unfrozen)
    if keep == "student":
        assert moved  # the student's unfrozen block trained
    with pytest.raises(ValueError, match="n_views=2"):
        train_selfsup(model, 32, ViewDataset(items, 32, MEAN, STD), cfg, Runtime.resolve("cpu"))
