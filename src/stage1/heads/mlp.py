"""mlp: trunk (Linear-ReLU-Dropout) and a 2-class head; CE with label smoothing and class weights.

Its ``select`` score is the max softmax probability (the seeds' confidence).
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import HEADS
from .base import Head


@HEADS.register("mlp")
class MLPHead(Head):
    """Plain classifier head on cached features (the common hyperparameters only)."""

    def build_layers(self, width: int) -> nn.ModuleDict:
        return nn.ModuleDict({"cls": nn.Linear(width, 2)})

    @staticmethod
    def forward_outputs(layers: nn.ModuleDict, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": layers["cls"](z)}

    def loss(self, outputs: dict[str, torch.Tensor], y: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        return self.ce(outputs["logits"], y)
