"""Pieces both training loops share: CLS features, AMP / checkpointing, optimiser, the step loop.

The optimisers, the LR schedule and the (F-SAM) update step are the heads trainer's
(``heads.optim.OPTIMIZERS``, ``lr_factor``, ``sam_step``): one implementation each across the project.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from stage1.heads.optim import OPTIMIZERS, lr_factor, sam_step

from .adapters import base_model
from stage1._core.errors import ConfigError

#: the cosine schedule ends at this fraction of each group's learning rate
MIN_LR_RATIO = 0.01

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """Where and how to run: device, bf16 autocast, gradient checkpointing (both default on cuda)."""

    device: torch.device
    amp: bool
    grad_checkpointing: bool

    @classmethod
    def resolve(cls, device: str, amp: bool | None = None, grad_checkpointing: bool | None = None) -> "Runtime":
        from stage1.featstore.backbones import resolve_device

        dev = resolve_device(device)
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
        raise ConfigError(f"{type(base).__name__} does not support gradient checkpointing; use --no-grad-checkpointing")
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
    """The optimiser ``name`` of ``heads.optim.OPTIMIZERS`` over ``groups`` (dicts with ``params``, ``lr``).

    Empty groups are dropped; each group's ``lr`` is kept as ``base_lr`` for the schedule. AdamW runs
    torch's default kernel here (the fine-tuning loops always did). UnknownNameError for a bad name.
    """
    factory = OPTIMIZERS.get(name)  # fails before any work, listing the names
    param_groups = [{"params": list(g["params"]), "lr": g["lr"], "base_lr": g["lr"]} for g in groups if list(g["params"])]
    if not param_groups:
        raise ConfigError("nothing to train: every parameter group is empty")
    return factory(param_groups, lr=param_groups[0]["lr"], weight_decay=weight_decay, rho=rho)


class StepLoop:
    """The step loop both fine-tuning loops run: LR schedule, (F-SAM) update, per-epoch history.

    ``for batch in loop.epoch(batches, desc, show):`` yields the batches of one epoch; the body
    calls ``loop.update(closure)`` once per batch. ``loop.step`` is the global step of the batch
    being trained (it advances after the body). At the end of the epoch ``history`` gets the step
    losses (``step_loss``), their mean (``train_loss``) and the throughput (``images_per_s``).
    """

    def __init__(self, opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], total: int,
                 warmup_frac: float, grad_clip: float, history: dict[str, Any]) -> None:
        self.opt, self.params, self.total = opt, params, total
        self.warmup_frac, self.grad_clip = warmup_frac, grad_clip
        self.history = history
        self.step = 0
        self._losses: list[float] = []

    def epoch(self, batches: Collection[Any], desc: str, show_progress: bool) -> Iterator[Any]:
        """Yield ``batches`` (their first item is the image tensor [B, ...]) and log the epoch."""
        self._losses = []
        seen, t0 = 0, time.perf_counter()
        for batch in progress(batches, len(batches), desc, show_progress):
            yield batch
            seen += batch[0].shape[0]
            self.step += 1
        losses = self._losses
        self.history["images_per_s"].append(seen / max(time.perf_counter() - t0, 1e-9))
        self.history["step_loss"].extend(losses)
        self.history["train_loss"].append(float(np.mean(losses)) if losses else float("nan"))

    def update(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Set this step's learning rates (warmup + cosine on each group's ``base_lr``) and step."""
        factor = lr_factor(self.step, self.total, self.warmup_frac, MIN_LR_RATIO)
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss = sam_step(self.opt, closure, self.params, self.grad_clip)
        self._losses.append(float(loss.detach()))
        return loss


def snapshot(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of tensors (the best epoch's trainable weights)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in named.items()}


@torch.no_grad()
def restore(named: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` tensors back into ``named`` (on their devices), in place."""
    for k, v in named.items():
        v.copy_(saved[k].to(v.device))


def progress(iterable: Iterable[T], total: int, desc: str, enabled: bool) -> Iterator[T]:
    """tqdm to stderr when enabled."""
    if not enabled:
        return iter(iterable)
    from tqdm import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, leave=False))
