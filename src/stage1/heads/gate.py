"""gate: shared trunk, class head + gate head; loss = CE + gate_weight * BCE(gate, "classifier right").

``gate_target`` chooses what "right" means:
* ``"in_sample"`` (the seeds' recipe): argmax of the batch's own current logits equals y. The
  classifier is right on almost every training row it has fit, so this gate learns little about
  where it fails on new data and tends to exit too much.
* ``"out_of_fold"``: K-fold cross-fitting. For each fold a classifier with the same trunk / trainer
  settings is fit on the other K-1 folds and predicts the held-out fold (every cached view); the
  gate's target for a (row, view) is whether that out-of-fold prediction was right. The gate thus
  learns where a classifier fails on data it has not fit. The final class head is still trained on
  all rows.
``select`` = sigmoid(gate logit).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stage1._core.errors import DataError
from stage1._core.params import Param, Params

from .base import COMMON_PARAMS, Head
from .registry import HEADS

GATE_TARGETS = ("in_sample", "out_of_fold")


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id in [0, k) per row, stratified by label, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        idx = idx[rng.permutation(len(idx))]
        fold[idx] = np.arange(len(idx)) % k
    return fold


@HEADS.register("gate")
class GateHead(Head):
    """Classifier with a learned exit gate."""

    HAS_SELECTOR = True
    PARAMS = COMMON_PARAMS + Params(
        Param("gate_target", str, "out_of_fold", "What 'the classifier is right' means for the gate: the batch's "
              "own logits (in_sample) or K-fold cross-fitted predictions (out_of_fold).", choices=GATE_TARGETS),
        Param("gate_weight", float, 1.0, "Weight of the gate's BCE next to the classification CE.", low=0.0),
        Param("gate_hidden", int, 64, "Width of the gate's hidden layer (0 = a linear gate).", low=0),
        Param("folds", int, 5, "Cross-fitting folds K for gate_target=out_of_fold.", low=2),
    )

    def build_layers(self, width: int) -> nn.ModuleDict:
        gh = int(self.hparams["gate_hidden"])
        gate: nn.Module = nn.Sequential(nn.Linear(width, gh), nn.ReLU(), nn.Linear(gh, 1)) if gh > 0 else nn.Linear(width, 1)
        return nn.ModuleDict({"cls": nn.Linear(width, 2), "gate": gate})

    @staticmethod
    def forward_outputs(layers: nn.ModuleDict, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": layers["cls"](z), "gate_logit": layers["gate"](z).squeeze(-1)}

    def scores_from_outputs(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs["logits"], torch.sigmoid(outputs["gate_logit"])

    def loss(self, outputs: dict[str, torch.Tensor], y: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        logits = outputs["logits"]
        if self.hparams["gate_target"] == "in_sample":
            target = (logits.detach().argmax(1) == y).float()
        else:
            if "gate_target" not in extras:
                raise DataError("gate: gate_target='out_of_fold' needs cross-fitted targets (fit() computes "
                                 "them); pass gate_target=... to loss() or use gate_target='in_sample'")
            target = extras["gate_target"].float()
        bce = F.binary_cross_entropy_with_logits(outputs["gate_logit"], target)
        return self.ce(logits, y) + float(self.hparams["gate_weight"]) * bce

    def fit_extras(self, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor | None,
                   yv: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.hparams["gate_target"] != "out_of_fold":
            return {}
        return {"gate_target": self.out_of_fold_correct(x, y, xv, yv)}

    def out_of_fold_correct(self, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor | None,
                            yv: torch.Tensor | None) -> torch.Tensor:
        """[n, V] float: 1 where the classifier fit without the row's fold predicts it right."""
        from .mlp import MLPHead

        xs = x if x.ndim == 3 else x[:, None, :]
        k = int(self.hparams["folds"])
        seed = int(self.hparams["seed"])
        fold = stratified_folds(y.numpy(), k, seed)
        shared = {name: self.hparams[name] for name in MLPHead.default_hparams()}
        correct = torch.zeros(xs.shape[0], xs.shape[1])
        for f in range(k):
            tr, ho = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            clf = MLPHead(**{**shared, "seed": seed + 1 + f})
            clf._fit_tensors(xs[tr], y[tr], xv, yv)
            n_ho, n_views = len(ho), xs.shape[1]
            pred = clf.predict_logits(xs[ho].reshape(n_ho * n_views, -1)).argmax(1).reshape(n_ho, n_views)
            correct[ho] = torch.from_numpy((pred == y[ho].numpy()[:, None]).astype(np.float32))
        self.oof_accuracy_ = float(correct.mean())
        return correct

    def extra_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gate_target": self.hparams["gate_target"]}
        if getattr(self, "oof_accuracy_", None) is not None:
            out["out_of_fold_accuracy"] = self.oof_accuracy_
        return out
