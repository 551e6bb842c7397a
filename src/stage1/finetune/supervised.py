"""Supervised PEFT fine-tuning: backbone (with adapters) + a head from ``heads/`` on distorted views.

Early stopping uses the heads trainer's selective objective (AUGRC by default) on val_select,
computed on clean images; the best epoch's adapter, unfrozen and head weights are restored at the end.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .adapters import trainable
from .data import ViewDataset, loader
from .loop import Runtime, build_optimizer, cls_features, optimizer_step, progress, restore, set_lr, snapshot

LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
ScoreFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SupervisedConfig:
    """Optimisation and stopping settings of ``finetune``."""

    epochs: int = 5
    lr: float = 2e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    fsam_rho: float = 0.05
    patience: int = 2
    select_metric: str = "augrc"
    target_risk: float = 0.02
    seed: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("learning rates must be > 0")


def default_scores(outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, select): the head's ``select`` output when it has one, else the max softmax."""
    logits = outputs["logits"].float()
    select = outputs.get("select")
    if select is None:
        select = logits.softmax(-1).max(-1).values
    return logits, select.float().reshape(-1)


@torch.no_grad()
def predict(
    model: nn.Module, head: nn.Module, data: ViewDataset, rt: Runtime, batch_size: int, workers: int = 0
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Head outputs (float32, CPU) over ``data`` (view 0) and the labels, in dataset order."""
    was = model.training, head.training
    model.eval()
    head.eval()
    parts: list[dict[str, torch.Tensor]] = []
    labels: list[int] = []
    for pixels, y, _ in loader(data, batch_size, shuffle=False, seed=0, workers=workers):
        with rt.autocast():
            out = head(cls_features(model, pixels[:, 0].to(rt.device)))
        parts.append({k: v.float().cpu() for k, v in out.items()})
        labels.extend(int(v) for v in y)
    model.train(was[0])
    head.train(was[1])
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, np.asarray(labels)


def train_supervised(
    model: nn.Module,
    head: nn.Module,
    loss_fn: LossFn,
    train_data: ViewDataset,
    val_data: ViewDataset | None,
    cfg: SupervisedConfig,
    rt: Runtime,
    *,
    score_fn: ScoreFn = default_scores,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Train ``model``'s trainable parameters and ``head`` in place; returns the history.

    On return both hold the weights of the epoch with the best val_select objective (or the last
    epoch when there is no val_select data).
    """
    from stage1.heads.trainer import selective_objective

    torch.manual_seed(cfg.seed)
    model.to(rt.device)
    head.to(rt.device)
    backbone_params = trainable(model)
    head_params = {n: p for n, p in head.named_parameters() if p.requires_grad}
    named = {**{"backbone." + k: v for k, v in backbone_params.items()}, **{"head." + k: v for k, v in head_params.items()}}
    opt = build_optimizer(
        [{"params": backbone_params.values(), "lr": cfg.lr}, {"params": head_params.values(), "lr": cfg.head_lr}],
        cfg.optimizer, weight_decay=cfg.weight_decay, rho=cfg.fsam_rho,
    )
    params = list(named.values())
    batches = loader(train_data, cfg.batch_size, shuffle=True, seed=cfg.seed, workers=cfg.workers)
    steps_per_epoch = len(batches)
    total = steps_per_epoch * cfg.epochs
    history: dict[str, Any] = {"train_loss": [], "val_objective": [], "step_loss": [], "images_per_s": []}
    best, best_epoch, stale, step = math.inf, -1, 0, 0
    best_state = snapshot(named)
    for epoch in range(cfg.epochs):
        train_data.set_epoch(epoch)
        model.train()
        head.train()
        losses: list[float] = []
        seen, t0 = 0, time.perf_counter()
        for pixels, y, _ in progress(batches, steps_per_epoch, f"finetune epoch {epoch + 1}", show_progress):
            x = pixels[:, 0].to(rt.device)
            yb = y.to(rt.device)

            def closure() -> torch.Tensor:
                with rt.autocast():
                    out = head(cls_features(model, x))
                loss = loss_fn({k: v.float() for k, v in out.items()}, yb)
                loss.backward()
                return loss

            set_lr(opt, step, total, cfg.warmup_frac)
            loss = optimizer_step(opt, closure, params, cfg.grad_clip)
            losses.append(float(loss.detach()))
            seen += len(x)
            step += 1
        history["images_per_s"].append(seen / max(time.perf_counter() - t0, 1e-9))
        history["step_loss"].extend(losses)
        history["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))
        if val_data is None or len(val_data) == 0:
            best_epoch, best_state = epoch, snapshot(named)
            continue
        outputs, yv = predict(model, head, val_data, rt, cfg.batch_size, cfg.workers)
        logits, select = score_fn(outputs)
        errors = (logits.argmax(1).numpy() != yv).astype(np.int64)
        obj = selective_objective(cfg.select_metric, select.numpy().astype(np.float64), errors, cfg.target_risk)
        history["val_objective"].append(float(obj))
        if obj < best - 1e-12:
            best, best_epoch, stale = obj, epoch, 0
            best_state = snapshot(named)
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    restore(named, best_state)
    model.eval()
    head.eval()
    history.update(best_epoch=best_epoch, epochs_run=len(history["train_loss"]),
                   best_objective=None if math.isinf(best) else float(best))
    return history
