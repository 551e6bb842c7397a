"""Supervised PEFT fine-tuning: backbone (with adapters) + a head from ``heads/`` on distorted views.

Early stopping uses the heads trainer's selective objective (AUGRC by default) on val_select,
computed on clean images; the best epoch's adapter, unfrozen and head weights are restored at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from stage1.heads.early_stopping import EarlyStopping, validation_objective
from stage1.heads.optim import OPTIMIZERS
from stage1.heads.trainer import LossFn, ScoreFn

from .adapters import trainable
from .data import ViewDataset, loader
from .loop import Runtime, StepLoop, build_optimizer, cls_features, restore, snapshot
from stage1._core.errors import ConfigError


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
    #: a name of ``heads.optim.OPTIMIZERS`` (adamw, fsam, lion); lion usually wants ``lr`` / ``head_lr``
    #: 3-10x smaller and ``weight_decay`` 3-10x larger than AdamW (not rescaled for you).
    optimizer: str = "adamw"
    fsam_rho: float = 0.05
    patience: int = 2
    select_metric: str = "augrc"
    target_risk: float = 0.02
    seed: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ConfigError("learning rates must be > 0")
        OPTIMIZERS.get(self.optimizer)  # UnknownNameError listing the optimisers, before any work


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
    score_fn: ScoreFn,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Train ``model``'s trainable parameters and ``head`` in place; returns the history.

    ``score_fn(outputs) -> (logits, select)`` is the head's (``Head.scores_from_outputs``). On
    return both hold the weights of the epoch with the best val_select objective (or the last
    epoch when there is no val_select data).
    """
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
    total = len(batches) * cfg.epochs
    history: dict[str, Any] = {"train_loss": [], "val_objective": [], "step_loss": [], "images_per_s": []}
    steps = StepLoop(opt, params, total, cfg.warmup_frac, cfg.grad_clip, history)
    stopper = EarlyStopping(cfg.patience, state=snapshot(named))
    for epoch in range(cfg.epochs):
        train_data.set_epoch(epoch)
        model.train()
        head.train()
        for pixels, y, _ in steps.epoch(batches, f"finetune epoch {epoch + 1}", show_progress):
            x = pixels[:, 0].to(rt.device)
            yb = y.to(rt.device)

            def closure() -> torch.Tensor:
                with rt.autocast():
                    out = head(cls_features(model, x))
                loss = loss_fn({k: v.float() for k, v in out.items()}, yb)
                loss.backward()
                return loss

            steps.update(closure)
        if val_data is None or len(val_data) == 0:
            stopper.keep(epoch, snapshot(named))
            continue
        outputs, yv = predict(model, head, val_data, rt, cfg.batch_size, cfg.workers)
        logits, select = score_fn(outputs)
        obj = validation_objective(cfg.select_metric, logits, select, yv, cfg.target_risk)
        history["val_objective"].append(obj)
        if stopper.update(obj, epoch, lambda: snapshot(named)):
            break
    restore(named, stopper.best_state)
    model.eval()
    head.eval()
    history.update(best_epoch=stopper.best_epoch, epochs_run=len(history["train_loss"]),
                   best_objective=stopper.best_value)
    return history
