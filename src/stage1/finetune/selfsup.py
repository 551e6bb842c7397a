"""ExPLoRA-style continued pretraining (Khanna et al. 2024): DINO self-distillation on new images.

The student is the backbone with its last blocks unfrozen and LoRA elsewhere, plus a fresh DINO
projection head; the teacher is an EMA copy of both. Each image gives two validator-style
distorted views; the student on one view learns the centred, sharpened teacher distribution on the
other. The exported weights are the teacher's by default (as DINO evaluates), or the student's.
HF checkpoints ship no DINO head, so the head starts random: ``head_warmup_frac`` of the
steps train the head alone, so its early random targets do not wash through the backbone.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import trainable
from .data import ViewDataset, loader
from .dino import N_VIEWS, DinoHead, DinoLoss, ema_momentum, ema_update
from .loop import Runtime, StepLoop, build_optimizer, cls_features, restore
from stage1._core.errors import ConfigError

#: Which network's backbone weights ``adapt`` exports: the EMA teacher (DINO practice) or the student.
KEEP = ("teacher", "student")


@dataclass
class AdaptConfig:
    """Self-distillation settings of ``adapt`` (DINO defaults scaled to short runs)."""

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


class Student(nn.Module):
    """Backbone + DINO head: pixels [B, 3, H, W] -> prototype scores [B, out_dim]."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(cls_features(self.backbone, pixels))


def train_selfsup(
    model: nn.Module, hidden_size: int, data: ViewDataset, cfg: AdaptConfig, rt: Runtime, *, show_progress: bool = False
) -> dict[str, Any]:
    """Continue pretraining ``model``'s trainable parameters in place; returns the history.

    ``data`` must give two views per image (``n_views=2``).
    """
    if data.n_views != N_VIEWS:
        raise ConfigError(f"self-distillation needs a dataset with n_views={N_VIEWS}")
    torch.manual_seed(cfg.seed)
    head = DinoHead(hidden_size, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
    student = Student(model, head).to(rt.device)
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    criterion = DinoLoss(cfg.out_dim, cfg.student_temp, cfg.teacher_temp, cfg.center_momentum).to(rt.device)
    backbone_params = trainable(model)
    head_params = dict(head.named_parameters())
    opt = build_optimizer(
        [{"params": backbone_params.values(), "lr": cfg.lr}, {"params": head_params.values(), "lr": cfg.head_lr}],
        "adamw", weight_decay=cfg.weight_decay,
    )
    student_named = {n: p for n, p in student.named_parameters() if p.requires_grad}
    teacher_all = dict(teacher.named_parameters())
    teacher_named = {n: teacher_all[n] for n in student_named}
    params = list(student_named.values())
    batches = loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.workers)
    total = len(batches) * cfg.epochs
    head_only_steps = int(round(cfg.head_warmup_frac * total))
    history: dict[str, Any] = {"train_loss": [], "step_loss": [], "images_per_s": [], "head_only_steps": head_only_steps}
    steps = StepLoop(opt, params, total, cfg.warmup_frac, cfg.grad_clip, history)
    for epoch in range(cfg.epochs):
        data.set_epoch(epoch)
        student.train()
        for pixels, _, _ in steps.epoch(batches, f"adapt epoch {epoch + 1}", show_progress):
            x = pixels.transpose(0, 1).reshape(-1, *pixels.shape[2:]).to(rt.device)  # view-major [2B, ...]
            head_only = steps.step < head_only_steps
            for p in backbone_params.values():
                p.requires_grad_(not head_only)

            def closure() -> torch.Tensor:
                with torch.no_grad(), rt.autocast():
                    t_out = teacher(x)
                with rt.autocast():
                    s_out = student(x)
                loss = criterion(s_out, t_out)  # (it computes in float32)
                loss.backward()
                return loss

            steps.update(closure)
            ema_update(teacher_named, student_named, ema_momentum(steps.step, total, cfg.ema))
    for p in backbone_params.values():
        p.requires_grad_(True)
    if cfg.keep == "teacher":  # the student's model object takes the teacher's weights, then gets merged
        restore(backbone_params, {n: teacher_all["backbone." + n] for n in backbone_params})
    model.eval()
    history.update(epochs_run=cfg.epochs,
                   final_loss=history["step_loss"][-1] if history["step_loss"] else math.nan)
    return history
