"""Pieces both training loops share: CLS features, AMP / checkpointing, optimiser, LR schedule.

The LR schedule and the F-SAM optimiser are the heads trainer's (``heads.trainer.lr_at``,
``heads.optim.FSAM``): one implementation each across the project.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .adapters import base_model

OPTIMIZERS = ("adamw", "fsam")


@dataclass(frozen=True)
class Runtime:
    """Where and how to run: device, bf16 autocast, gradient checkpointing (both default on cuda)."""

    device: torch.device
    amp: bool
    grad_checkpointing: bool

    @classmethod
    def resolve(cls, device: str, amp: bool | None = None, grad_checkpointing: bool | None = None) -> "Runtime":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available; use --device cpu")
        on_gpu = dev.type == "cuda"
        return cls(dev, on_gpu if amp is None else bool(amp),
                   on_gpu if grad_checkpointing is None else bool(grad_checkpointing))

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when AMP is on; a no-op context otherwise."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def to_dict(self) -> dict[str, object]:
        return {"device": str(self.device), "amp": "bf16" if self.amp else "off",
                "gradient_checkpointing": self.grad_checkpointing}


def enable_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn transformers' activation (gradient) checkpointing on or off, non-reentrant (frozen inputs are fine)."""
    base = base_model(model)
    supported = getattr(base, "supports_gradient_checkpointing", False)
    if on and not supported:
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing; use --no-grad-checkpointing")
    if not supported:
        return
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2 name
        if on:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.activation_checkpointing_disable()
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_disable()


def checkpointing_on(model: nn.Module) -> bool:
    """Whether activation checkpointing is active on the transformers model under ``model``."""
    base = base_model(model)
    flag = getattr(base, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(base, "is_gradient_checkpointing", False))


def cls_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """CLS token of the last hidden state, the feature the store caches ([B, 3, H, W] -> [B, D])."""
    return model(pixel_values=pixels).last_hidden_state[:, 0]


def build_optimizer(
    groups: Sequence[dict], name: str, *, weight_decay: float, rho: float = 0.05
) -> torch.optim.Optimizer:
    """AdamW, or AdamW inside the project's F-SAM; each group's ``base_lr`` is kept for the schedule."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    param_groups = [{"params": list(g["params"]), "lr": g["lr"], "base_lr": g["lr"]} for g in groups if list(g["params"])]
    if name == "fsam":
        from stage1.heads.optim import FSAM

        return FSAM(param_groups, torch.optim.AdamW, rho=rho, weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups, weight_decay=weight_decay)


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, warmup_frac: float, min_lr_ratio: float = 0.01) -> None:
    """Warmup + cosine (the heads trainer's schedule) applied to each group's ``base_lr``."""
    from stage1.heads.trainer import TrainConfig, lr_at

    factor = lr_at(step, total, TrainConfig(lr=1.0, warmup_frac=warmup_frac, min_lr_ratio=min_lr_ratio))
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


def optimizer_step(
    opt: torch.optim.Optimizer, closure, params: Sequence[torch.Tensor], grad_clip: float
) -> torch.Tensor:
    """One update: forward/backward via ``closure``; with F-SAM a second pass at the perturbed point."""
    fsam = hasattr(opt, "first_step")
    opt.zero_grad(set_to_none=True)
    loss = closure()
    if fsam:
        opt.first_step()
        opt.zero_grad(set_to_none=True)
        closure()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    if fsam:
        opt.second_step()
    else:
        opt.step()
    return loss


def snapshot(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of tensors (the best epoch's trainable weights)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in named.items()}


@torch.no_grad()
def restore(named: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    for k, v in named.items():
        v.copy_(saved[k].to(v.device))


def progress(iterable, total: int, desc: str, enabled: bool) -> Iterator:
    """tqdm to stderr when enabled."""
    if not enabled:
        return iter(iterable)
    from tqdm import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, leave=False))
