"""Attach LoRA / DoRA adapters (through ``peft``) plus fully unfrozen parameters, and merge them back.

The adapters are ``peft``'s own (never hand-written). Parameters trained in full (ExPLoRA's unfrozen
blocks, norm layers) stay ordinary parameters of the base model, so ``merge_and_unload`` returns a
plain transformers model holding every trained change, ready for ``save_pretrained``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from stage1._core.registry import Registry
from stage1._core.errors import ConfigError

#: PEFT methods by name: each factory builds a ``peft.LoraConfig`` from the adapter spec.
PEFT_METHODS: Registry = Registry("peft method")


@dataclass
class AdapterSpec:
    """What to adapt and how: PEFT method, LoRA hyperparameters, wrapped modules, fully trained params."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)
    unfrozen: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.targets),
            "unfrozen_parameters": list(self.unfrozen),
        }


def _lora_config(spec: AdapterSpec, use_dora: bool) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        use_dora=use_dora,
        bias="none",
    )


@PEFT_METHODS.register("lora")
def lora_config(spec: AdapterSpec) -> Any:
    """Plain LoRA (Hu et al. 2021) on ``spec.targets``."""
    return _lora_config(spec, use_dora=False)


@PEFT_METHODS.register("dora")
def dora_config(spec: AdapterSpec) -> Any:
    """DoRA (Liu et al. 2024): LoRA on the direction plus a trained magnitude vector."""
    return _lora_config(spec, use_dora=True)


def attach(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Freeze ``model``, wrap ``spec.targets`` with the PEFT method and unfreeze ``spec.unfrozen``.

    Returns a ``peft.PeftModel`` (or ``model`` itself when there is nothing to wrap). The base
    model is modified in place, as ``peft`` does.
    """
    if spec.rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {spec.rank}")
    config = PEFT_METHODS.create(spec.method, spec=spec)
    by_name = dict(model.named_parameters())
    missing = [name for name in spec.unfrozen if name not in by_name]
    if missing:
        raise ConfigError(f"parameters to unfreeze not found in the model: {missing[:3]}")
    clash = [t for t in spec.targets if any(u.startswith(t + ".") for u in spec.unfrozen)]
    if clash:
        raise ConfigError(f"modules both LoRA-wrapped and fully unfrozen: {clash[:3]}")
    unfrozen = [by_name[name] for name in spec.unfrozen]
    for param in model.parameters():
        param.requires_grad_(False)
    wrapped = model
    if spec.targets:
        import warnings

        from peft import get_peft_model

        with warnings.catch_warnings():  # peft still calls transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model, config)
    for param in unfrozen:
        param.requires_grad_(True)
    return wrapped


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that will be trained, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (adapters still attached), or ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and drop the PEFT wrappers (``merge_and_unload``)."""
    merge_and_unload = getattr(model, "merge_and_unload", None)
    merged = merge_and_unload() if callable(merge_and_unload) else model
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged
