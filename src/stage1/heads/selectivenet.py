"""selectivenet (Geifman & El-Yaniv, 2019): prediction f, selection g, auxiliary h on one trunk.

    L = alpha * (r + lam * max(0, c - phi)^2) + (1 - alpha) * CE(h)
    phi = mean(g)                      (empirical coverage of the batch)
    r   = mean(CE(f) * g) / phi        (selective risk)

With ``divide_by_coverage=True`` (default, as in the paper) r is divided by phi, i.e. it is the
risk *among selected* samples; with False it is mean(CE(f) * g), the risk mass. head.json records
which one was used (``selective_risk_divided_by_coverage``). Defaults: c = 0.8, lam = 32,
alpha = 0.5. ``select`` = g. The exit threshold on g that reaches coverage c is set afterwards on
val_calib by a policy (``calibrate --policy coverage``), never on training data.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stage1._core.params import Param, Params

from .base import COMMON_PARAMS, Head
from .registry import HEADS


@HEADS.register("selectivenet")
class SelectiveNetHead(Head):
    """f, g, h heads trained for a target coverage c."""

    HAS_SELECTOR = True
    PARAMS = COMMON_PARAMS + Params(
        Param("coverage", float, 0.8, "Target coverage c of the selection head g.", low=0.0, high=1.0, low_open=True),
        Param("lam", float, 32.0, "Weight of the coverage penalty max(0, c - phi)^2.", low=0.0),
        Param("alpha", float, 0.5, "Weight of the selective loss; 1 - alpha goes to the auxiliary CE.",
              low=0.0, high=1.0),
        Param("divide_by_coverage", bool, True, "Selective risk among selected rows (divide by phi, as the paper)."),
        Param("select_hidden", int, 64, "Width of the selection head's hidden layer (0 = linear).", low=0),
    )

    def build_layers(self, width: int) -> nn.ModuleDict:
        sh = int(self.hparams["select_hidden"])
        g: nn.Module = nn.Sequential(nn.Linear(width, sh), nn.ReLU(), nn.Linear(sh, 1)) if sh > 0 else nn.Linear(width, 1)
        return nn.ModuleDict({"f": nn.Linear(width, 2), "g": g, "h": nn.Linear(width, 2)})

    @staticmethod
    def forward_outputs(layers: nn.ModuleDict, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": layers["f"](z), "select_logit": layers["g"](z).squeeze(-1), "aux_logits": layers["h"](z)}

    def scores_from_outputs(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs["logits"], torch.sigmoid(outputs["select_logit"])

    def loss(self, outputs: dict[str, torch.Tensor], y: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        g = torch.sigmoid(outputs["select_logit"])
        phi = g.mean()
        risk = (self.ce(outputs["logits"], y, reduction="none") * g).mean()
        if h["divide_by_coverage"]:
            risk = risk / phi.clamp_min(1e-6)
        penalty = float(h["lam"]) * torch.clamp(float(h["coverage"]) - phi, min=0.0) ** 2
        a = float(h["alpha"])
        return a * (risk + penalty) + (1.0 - a) * self.ce(outputs["aux_logits"], y)

    def extra_json(self) -> dict[str, Any]:
        return {
            "selective_risk_divided_by_coverage": bool(self.hparams["divide_by_coverage"]),
            "target_coverage": float(self.hparams["coverage"]),
        }
