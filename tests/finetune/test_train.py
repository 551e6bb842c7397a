"""Training loops on a tiny random DINOv3 (CPU): losses fall, early stopping, views, DINO pieces,
the optimisers (AdamW, F-SAM, Lion), and adapt's optional multi-crop and iBOT terms."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stage1.finetune.adapters import AdapterSpec, attach, trainable
from stage1.finetune.data import Item, ViewDataset, collect_items
from stage1.finetune.dino import DinoHead, DinoLoss, IBotPatchLoss, ema_momentum, ema_update, random_patch_masks
from stage1.finetune.loop import Runtime, build_optimizer, checkpointing_on, cls_features, enable_checkpointing
from stage1.finetune.selfsup import AdaptConfig, SelfDistillation, Student, mask_token_name, train_selfsup
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


def _moved(model, before: dict) -> set:
    """Names of the base weights that changed (a LoRA-wrapped weight lives under ``base_layer``)."""
    now = model.get_base_model().state_dict()
    moved = set()
    for key, value in before.items():
        prefix, leaf = key.rsplit(".", 1)
        current = now.get(key, now.get(f"{prefix}.base_layer.{leaf}"))
        if not torch.equal(current, value):
            moved.add(key)
    return moved


@pytest.mark.parametrize("optimizer", ["adamw", "fsam", "lion"])
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
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
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
    moved = _moved(model, frozen_before)
    # only the unfrozen last block can move (LoRA lives in separate tensors until merged)
    assert moved <= set(spec.unfrozen)
    if keep == "student":
        assert moved  # the student's unfrozen block trained
    with pytest.raises(ValueError, match="n_views=2"):
        train_selfsup(model, 32, ViewDataset(items, 32, MEAN, STD), cfg, Runtime.resolve("cpu"))


def test_build_optimizer_takes_the_registry_names_and_lists_them_otherwise() -> None:
    from lion_pytorch import Lion

    from stage1._core.errors import UnknownNameError
    from stage1.heads.optim import FSAM

    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    groups = [{"params": list(a.parameters()), "lr": 1e-3}, {"params": list(b.parameters()), "lr": 1e-2},
              {"params": [], "lr": 1.0}]
    for name, kind in (("adamw", torch.optim.AdamW), ("fsam", FSAM), ("lion", Lion)):
        opt = build_optimizer(groups, name, weight_decay=0.1)
        assert isinstance(opt, kind) and len(opt.param_groups) == 2  # the empty group is dropped
        assert [(g["lr"], g["base_lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-3, 1e-3, 0.1), (1e-2, 1e-2, 0.1)]
    with pytest.raises(UnknownNameError, match="unknown optimizer 'sgd'; choose one of: adamw, fsam, lion"):
        build_optimizer(groups, "sgd", weight_decay=0.1)
    with pytest.raises(UnknownNameError, match="adamw, fsam, lion"):
        SupervisedConfig(optimizer="sgd")


# -- adapt: multi-crop and iBOT --------------------------------------------------------------------
def test_local_crops_are_small_seeded_apart_and_leave_the_global_views_alone(tmp_path: Path) -> None:
    from stage1.finetune.data import local_size_for

    assert local_size_for(224, 14) == 98 and local_size_for(112, 14) == 42 and local_size_for(32, 16) == 16
    items = _colour_items(tmp_path / "img", n=2)
    plain = ViewDataset(items, 32, MEAN, STD, seed=3, n_views=2, levels=(1, 2, 3))
    multi = ViewDataset(items, 32, MEAN, STD, seed=3, n_views=2, levels=(1, 2, 3), n_local=3, local_size=16)
    assert len(plain[0]) == 3
    views, label, index, local = multi[0]
    assert torch.equal(views, plain[0][0]) and (label, index) == (items[0].label, 0)
    assert local.shape == (3, 3, 16, 16)
    assert not torch.equal(local[0], local[1])
    assert torch.equal(local, multi[0][3])  # deterministic
    multi.set_epoch(1)
    assert not torch.equal(local, multi[0][3])  # new crops each epoch
    with pytest.raises(ValueError, match="local crops"):
        ViewDataset(items, 32, MEAN, STD, n_local=2, local_size=16)  # no view levels


def _selfsup_model(tiny_backbone_dir: Path, mask_token: bool = False) -> tuple[torch.nn.Module, AdapterSpec, dict]:
    base = _model(tiny_backbone_dir)
    frozen_before = {k: v.clone() for k, v in base.state_dict().items()}
    unfrozen = block_parameter_names(base, [1]) + ([mask_token_name(base)] if mask_token else [])
    spec = AdapterSpec("lora", 4, 8, targets=linear_targets(base, [0], "qv"), unfrozen=unfrozen)
    torch.manual_seed(0)
    return attach(base, spec), spec, frozen_before


def test_multi_crop_student_sees_the_local_crops_and_the_teacher_only_the_globals(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    items = _colour_items(tmp_path / "img", n=8)
    model, _, _ = _selfsup_model(tiny_backbone_dir)
    seen: list[tuple[tuple[int, ...], bool]] = []  # (pixel shape, grad mode): the teacher runs under no_grad
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((tuple(kwargs["pixel_values"].shape), torch.is_grad_enabled())),
        with_kwargs=True)
    data = ViewDataset(items, 32, MEAN, STD, seed=0, n_views=2, levels=(1,), n_local=2, local_size=16)
    cfg = AdaptConfig(epochs=1, batch_size=4, out_dim=16, hidden_dim=16, bottleneck_dim=8, multi_crop=2,
                      head_warmup_frac=0.0)
    hist = train_selfsup(model, 32, data, cfg, Runtime.resolve("cpu"))
    assert len(hist["step_loss"]) == 2 and "step_ibot_loss" not in hist
    teacher = [shape for shape, grad in seen if not grad]
    student = [shape for shape, grad in seen if grad]
    assert teacher == [(8, 3, 32, 32)] * 2  # per step: the 2 global views of 4 images, nothing else
    assert student == [(8, 3, 32, 32), (8, 3, 16, 16)] * 2  # the globals, then the 2 local crops of 4 images
    with pytest.raises(ValueError, match="n_local=2"):
        train_selfsup(model, 32, ViewDataset(items, 32, MEAN, STD, seed=0, n_views=2, levels=(1,)), cfg,
                      Runtime.resolve("cpu"))


def test_dino_loss_with_local_crops_is_every_student_crop_against_every_other_teacher_view() -> None:
    torch.manual_seed(0)
    crit = DinoLoss(8, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    s, t = torch.randn(8, 8), torch.randn(4, 8)  # B = 2: 2 global + 2 local student crops, 2 teacher views
    s_chunks = (s / 0.1).chunk(4)
    p_chunks = torch.softmax(t / 0.04, -1).chunk(2)
    terms = [(-p * torch.log_softmax(c, -1)).sum(-1).mean()
             for i, p in enumerate(p_chunks) for j, c in enumerate(s_chunks) if i != j]
    assert len(terms) == 6
    torch.testing.assert_close(crit(s, t), torch.stack(terms).mean())


def test_ibot_patch_loss_matches_its_definition_and_masks_are_seeded() -> None:
    torch.manual_seed(0)
    crit = IBotPatchLoss(8, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    masks = torch.tensor([[True, False, True, False], [False, False, False, False], [False, True, False, False]])
    s, t = torch.randn(3, 8), torch.randn(3, 8)  # the three masked positions, in masks[masks] order
    ce = (-torch.softmax(t / 0.04, -1) * torch.log_softmax(s / 0.1, -1)).sum(-1)
    manual = ((ce[0] + ce[1]) / 2 + ce[2] / 1) / 3  # per image over its masked patches, then over all images
    torch.testing.assert_close(crit(s, t, masks), manual)
    torch.testing.assert_close(crit.center, 0.1 * t.mean(0, keepdim=True))
    assert float(crit(s[:0], t[:0], torch.zeros(3, 4, dtype=torch.bool))) == 0.0

    def draw(seed: int, **kw) -> torch.Tensor:
        return random_patch_masks(400, 64, torch.Generator().manual_seed(seed), **kw)

    m = draw(0)
    assert m.shape == (400, 64) and torch.equal(m, draw(0)) and not torch.equal(m, draw(1))
    counts = m.sum(1)
    assert 0.35 < float((counts > 0).float().mean()) < 0.65  # half of the views are masked ...
    assert int(counts[counts > 0].min()) >= round(0.1 * 64) and int(counts.max()) <= round(0.5 * 64)  # ... at 10-50%
    assert not draw(0, probability=0.0).any()
    assert draw(0, probability=1.0, ratio=(0.01, 0.01)).sum(1).eq(1).all()  # at least one patch


def _objective(model: torch.nn.Module, weight: float, patch_head: bool = True) -> SelfDistillation:
    import copy

    torch.manual_seed(1)
    student = Student(model, DinoHead(32, 16, 16, 8), DinoHead(32, 16, 16, 8) if patch_head else None)
    teacher = copy.deepcopy(student).eval()
    ibot = IBotPatchLoss(16) if patch_head else None
    return SelfDistillation(student, teacher, DinoLoss(16), ibot, weight, Runtime.resolve("cpu"))


def test_ibot_term_is_off_at_weight_zero_and_drives_the_patch_head_when_on(tiny_backbone_dir: Path) -> None:
    model, _, _ = _selfsup_model(tiny_backbone_dir, mask_token=True)
    model.eval()  # DINOv3 jitters RoPE in train mode: keep the forward passes comparable
    torch.manual_seed(2)
    x = torch.randn(4, 3, 32, 32)  # 2 images x 2 global views, 2 x 2 patches each
    masks = torch.tensor([[True, False, False, True], [False, False, False, False],
                          [False, True, False, False], [True, True, False, False]])

    def grads(objective: SelfDistillation, m: torch.Tensor | None) -> tuple[dict[str, float], dict[str, torch.Tensor | None]]:
        objective.student.zero_grad(set_to_none=True)
        loss, parts = objective.loss(x, None, m)
        loss.backward()
        named = dict(objective.student.named_parameters())
        return parts, {n: (p.grad.clone() if p.grad is not None else None) for n, p in named.items()}

    # weight 0: no patch head, no iBOT term, the plain DINO loss (the default objective)
    parts, g0 = grads(_objective(model, 0.0, patch_head=False), None)
    assert parts["ibot"] == 0.0 and not any("patch_head" in n for n in g0)
    with pytest.raises(ValueError, match="weight > 0"):
        _objective(model, 0.0)
    # weight > 0: the iBOT term is positive, and it alone trains the patch head, in proportion to the weight
    parts_a, ga = grads(_objective(model, 0.5), masks)
    parts_b, gb = grads(_objective(model, 1.0), masks)
    assert parts_a["ibot"] > 0 and parts_a["ibot"] == pytest.approx(parts_b["ibot"])
    patch = [n for n in ga if n.startswith("patch_head.")]
    assert patch and all(ga[n] is not None and ga[n].abs().sum() > 0 for n in patch)
    for n in patch:
        torch.testing.assert_close(gb[n], 2 * ga[n])
    for n in ga:
        if n.startswith("head."):  # the DINO head only sees the DINO term
            torch.testing.assert_close(gb[n], ga[n])
    token = [n for n in ga if n.endswith("mask_token")]
    assert len(token) == 1 and ga[token[0]].abs().sum() > 0  # the masked positions reach the mask token
    # no masks: the patch head gets no gradient at all
    parts_n, gn = grads(_objective(model, 1.0), None)
    assert parts_n["ibot"] == 0.0 and all(gn[n] is None for n in patch)


def test_selfsup_with_multi_crop_and_ibot_keeps_frozen_weights(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    items = _colour_items(tmp_path / "img", n=8)
    model, spec, frozen_before = _selfsup_model(tiny_backbone_dir, mask_token=True)
    data = ViewDataset(items, 32, MEAN, STD, seed=0, n_views=2, levels=(1,), n_local=2, local_size=16)
    cfg = AdaptConfig(epochs=2, batch_size=4, lr=2e-3, head_lr=1e-2, out_dim=16, hidden_dim=16, bottleneck_dim=8,
                      head_warmup_frac=0.25, warmup_frac=0.0, keep="student", multi_crop=2, ibot_weight=1.0)
    hist = train_selfsup(model, 32, data, cfg, Runtime.resolve("cpu"))
    assert len(hist["step_ibot_loss"]) == len(hist["step_loss"]) == 4
    assert all(np.isfinite(hist["step_loss"])) and max(hist["step_ibot_loss"]) > 0
    moved = _moved(model, frozen_before)
    assert moved <= set(spec.unfrozen) and "embeddings.mask_token" in moved
