"""ExPLoRA-style continued pretraining (Khanna et al. 2024) with a simplified DINO objective.

The student is the backbone with its last blocks unfrozen and LoRA elsewhere, plus a fresh DINO
projection head; the teacher is an EMA copy of both. The objective is a *simplified DINO*: CLS-token
self-distillation only (``dino.DinoLoss``), on two validator-style distorted global views per image
(the student on one view learns the centred, sharpened teacher distribution on the other), with no
iBOT masked-patch loss and no multi-crop unless asked for:

* ``multi_crop`` N > 0 adds N smaller local crops per image that only the student sees (DINO);
* ``ibot_weight`` W > 0 adds W x the iBOT masked-patch term: the student's global views get a
  share of their patch tokens replaced by the backbone's mask token (which then trains too), and a
  patch head learns the teacher's patch-token distributions at those positions (``dino.IBotPatchLoss``).

Both are experimental and off by default: they were not shown to help in our measurement
(``benchmarks/finetune_bench.py --ablate-adapt``: DINOv2-S, 112 px, 1 epoch on 96 TraCon images,
student kept; logistic probe on 100 held-out images: AUROC 0.9908 before adapt, 0.9920 plain,
0.9916 with --multi-crop 2, 0.9920 with --ibot-weight 1, accuracy 0.94 for all four; every
difference inside the paired-bootstrap noise). The exported weights are the teacher's by
default (as DINO evaluates), or the student's. HF checkpoints ship no DINO head, so the heads start
random: ``head_warmup_frac`` of the steps train the heads alone, so their early random targets do
not wash through the backbone.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import base_model, trainable
from .data import ViewDataset, loader
from .dino import N_VIEWS, DinoHead, DinoLoss, IBotPatchLoss, ema_momentum, ema_update, random_patch_masks
from .loop import Runtime, StepLoop, build_optimizer, cls_features, restore
from stage1._core.errors import ConfigError

#: Which network's backbone weights ``adapt`` exports: the EMA teacher (DINO practice) or the student.
KEEP = ("teacher", "student")


@dataclass
class AdaptConfig:
    """Self-distillation settings of ``adapt`` (DINO defaults scaled to short runs).

    ``multi_crop``: local crops per image (0 = off); ``ibot_weight``: weight of the iBOT
    masked-patch term (0 = off; its masking follows ``dino.MASK_PROBABILITY`` / ``MASK_RATIO``).
    """

    epochs: int = 2
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.04
    batch_size: int = 16
    warmup_frac: float = 0.1
    head_warmup_frac: float = 0.2
    grad_clip: float = 3.0
    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    ema: float = 0.996
    keep: str = "teacher"
    multi_crop: int = 0
    ibot_weight: float = 0.0
    seed: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError(f"epochs must be >= 1 and batch size >= 2 (got {self.epochs}, {self.batch_size})")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if self.keep not in KEEP:
            raise ConfigError(f"keep must be one of {', '.join(KEEP)}, got {self.keep!r}")
        if not 0.0 <= self.head_warmup_frac < 1.0:
            raise ConfigError(f"head warmup fraction must be in [0, 1), got {self.head_warmup_frac}")
        if self.multi_crop < 0:
            raise ConfigError(f"multi-crop must be >= 0 local crops, got {self.multi_crop}")
        if not (self.ibot_weight >= 0 and math.isfinite(self.ibot_weight)):
            raise ConfigError(f"iBOT weight must be a finite number >= 0, got {self.ibot_weight}")


def objective_text(cfg: AdaptConfig) -> str:
    """One line saying which objective ``cfg`` trains (recorded in provenance.json)."""
    text = "simplified DINO: CLS-token self-distillation (EMA teacher, centring, sharpening), two global views"
    text += f", {cfg.multi_crop} student-only local crops (multi-crop)" if cfg.multi_crop else ", no multi-crop"
    text += f", iBOT masked-patch term x {cfg.ibot_weight:g}" if cfg.ibot_weight > 0 else ", no iBOT masked-patch loss"
    return text


def mask_token_name(model: nn.Module) -> str:
    """Name of the mask-token parameter of the transformers model under ``model`` (as ``named_parameters``
    of ``model`` spells it); ConfigError when the backbone cannot mask patches (``bool_masked_pos``)."""
    base = base_model(model)
    names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "mask_token"]
    if "bool_masked_pos" not in inspect.signature(base.forward).parameters or len(names) != 1:
        raise ConfigError(f"{type(base).__name__} cannot mask patch tokens (no bool_masked_pos / mask token); "
                          "--ibot-weight needs one (e.g. Dinov2Model, DINOv3ViTModel)")
    return names[0]


class Student(nn.Module):
    """Backbone + DINO head (+ iBOT patch head): pixels [B, 3, H, W] -> prototype scores [B, out_dim]."""

    def __init__(self, backbone: nn.Module, head: nn.Module, patch_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(cls_features(self.backbone, pixels))

    def tokens(self, pixels: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [B, T, D]; ``masks`` [B, n_patches] swaps those patches for the mask token."""
        extra = {} if masks is None else {"bool_masked_pos": masks}
        return self.backbone(pixel_values=pixels, **extra).last_hidden_state


class SelfDistillation:
    """The ``adapt`` objective on one batch: simplified DINO, plus multi-crop / iBOT when configured.

    ``loss(x, local, masks)``: ``x`` the global views [N_VIEWS * B, 3, S, S] view-major, ``local``
    the local crops [n_local * B, 3, s, s] view-major (or None), ``masks`` [N_VIEWS * B, n_patches]
    (or None: no iBOT term). The teacher sees the unmasked global views only; the student sees the
    masked global views and the local crops. Returns the total and its parts (``dino``, ``ibot``).
    """

    def __init__(self, student: Student, teacher: Student, dino: DinoLoss, ibot: IBotPatchLoss | None,
                 ibot_weight: float, rt: Runtime) -> None:
        if (ibot is None) != (student.patch_head is None) or (ibot is not None and ibot_weight <= 0):
            raise ConfigError("the iBOT term needs a patch head, its loss and a weight > 0 together")
        self.student, self.teacher, self.dino, self.ibot = student, teacher, dino, ibot
        self.ibot_weight = ibot_weight
        self.rt = rt

    def loss(self, x: torch.Tensor, local: torch.Tensor | None = None,
             masks: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        rt, student, teacher = self.rt, self.student, self.teacher
        if masks is None or self.ibot is None:
            with torch.no_grad(), rt.autocast():
                t_out = teacher(x)
            with rt.autocast():
                s_out = student(x)
            ibot = None
        else:
            n = masks.shape[1]  # patch tokens are the last n (after CLS and any register tokens)
            with torch.no_grad(), rt.autocast():
                t_tokens = teacher.tokens(x)
                t_out = teacher.head(t_tokens[:, 0])
                t_patch = teacher.patch_head(t_tokens[:, -n:][masks])  # type: ignore[misc]
            with rt.autocast():
                s_tokens = student.tokens(x, masks)
                s_out = student.head(s_tokens[:, 0])
                s_patch = student.patch_head(s_tokens[:, -n:][masks])  # type: ignore[misc]
            ibot = self.ibot(s_patch, t_patch, masks)
        if local is not None:
            with rt.autocast():
                s_out = torch.cat([s_out, student(local)])
        dino = self.dino(s_out, t_out)  # (it computes in float32)
        total = dino if ibot is None else dino + self.ibot_weight * ibot
        return total, {"dino": float(dino.detach()), "ibot": 0.0 if ibot is None else float(ibot.detach())}


def _view_major(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, V, 3, S, S] -> [V * B, 3, S, S] (all images' view 0, then view 1, ...)."""
    return pixels.transpose(0, 1).reshape(-1, *pixels.shape[2:]).to(device)


def train_selfsup(
    model: nn.Module, hidden_size: int, data: ViewDataset, cfg: AdaptConfig, rt: Runtime, *, show_progress: bool = False
) -> dict[str, Any]:
    """Continue pretraining ``model``'s trainable parameters in place; returns the history.

    ``data`` must give two views per image (``n_views=2``), and ``cfg.multi_crop`` local crops
    when that is > 0. With ``cfg.ibot_weight > 0`` the backbone must accept ``bool_masked_pos``.
    """
    if data.n_views != N_VIEWS:
        raise ConfigError(f"self-distillation needs a dataset with n_views={N_VIEWS}")
    if data.n_local != cfg.multi_crop:
        raise ConfigError(f"multi-crop {cfg.multi_crop} needs a dataset with n_local={cfg.multi_crop} (has {data.n_local})")
    use_ibot = cfg.ibot_weight > 0
    patch_size = 0
    if use_ibot:
        mask_token_name(model)
        patch = getattr(base_model(model).config, "patch_size", 16)
        patch_size = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    torch.manual_seed(cfg.seed)
    head = DinoHead(hidden_size, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
    patch_head = DinoHead(hidden_size, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim) if use_ibot else None
    student = Student(model, head, patch_head).to(rt.device)
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    criterion = DinoLoss(cfg.out_dim, cfg.student_temp, cfg.teacher_temp, cfg.center_momentum).to(rt.device)
    ibot_loss = (IBotPatchLoss(cfg.out_dim, cfg.student_temp, cfg.teacher_temp, cfg.center_momentum).to(rt.device)
                 if use_ibot else None)
    objective = SelfDistillation(student, teacher, criterion, ibot_loss, cfg.ibot_weight, rt)
    backbone_params = trainable(model)
    head_params = dict(head.named_parameters())
    if patch_head is not None:
        head_params.update({"patch." + n: p for n, p in patch_head.named_parameters()})
    opt = build_optimizer(
        [{"params": backbone_params.values(), "lr": cfg.lr}, {"params": head_params.values(), "lr": cfg.head_lr}],
        "adamw", weight_decay=cfg.weight_decay,
    )
    student_named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    teacher_all = dict(teacher.named_parameters())
    teacher_named = {n: teacher_all[n] for n in student_named}
    params = list(student_named.values())
    batches = loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.workers)
    mask_gen = torch.Generator().manual_seed(int(cfg.seed))  # masks apart from the global RNG
    total = len(batches) * cfg.epochs
    head_only_steps = int(round(cfg.head_warmup_frac * total))
    history: dict[str, Any] = {"train_loss": [], "step_loss": [], "images_per_s": [], "head_only_steps": head_only_steps}
    if use_ibot:
        history["step_ibot_loss"] = []
    steps = StepLoop(opt, params, total, cfg.warmup_frac, cfg.grad_clip, history)
    for epoch in range(cfg.epochs):
        data.set_epoch(epoch)
        student.train()
        for batch in steps.epoch(batches, f"adapt epoch {epoch + 1}", show_progress):
            x = _view_major(batch[0], rt.device)
            local = _view_major(batch[3], rt.device) if cfg.multi_crop else None
            masks = None
            if use_ibot:
                n_patches = (x.shape[-2] // patch_size) * (x.shape[-1] // patch_size)
                masks = random_patch_masks(x.shape[0], n_patches, mask_gen).to(rt.device)
            head_only = steps.step < head_only_steps
            for p in backbone_params.values():
                p.requires_grad_(not head_only)
            parts: dict[str, float] = {}

            def closure() -> torch.Tensor:
                loss, found = objective.loss(x, local, masks)
                parts.update(found)
                loss.backward()
                return loss

            steps.update(closure)
            if use_ibot:
                history["step_ibot_loss"].append(parts["ibot"])
            ema_update(teacher_named, student_named, ema_momentum(steps.step, total, cfg.ema))
    for p in backbone_params.values():
        p.requires_grad_(True)
    if cfg.keep == "teacher":  # the student's model object takes the teacher's weights, then gets merged
        restore(backbone_params, {n: teacher_all["backbone." + n] for n in backbone_params})
    model.eval()
    history.update(epochs_run=cfg.epochs,
                   final_loss=history["step_loss"][-1] if history["step_loss"] else math.nan)
    return history
