"""Early stopping on a selective objective, shared by the heads trainer and full-image fine-tuning.

The objective is computed from a model's (logits, select score) on validation data with the
project's selective metrics (``policies.metrics``), oriented so that lower is better;
``EarlyStopping`` keeps the best value, its epoch and a snapshot of the weights, and says when
``patience`` epochs in a row have not improved on it.
"""
from __future__ import annotations

import math
from typing import Callable, Generic, TypeVar

import numpy as np
import torch

#: selective objectives for early stopping (see ``selective_objective``; all oriented lower = better)
SELECT_METRICS = ("augrc", "aurc", "coverage_at_risk")

#: an improvement must beat the best value by more than this (float noise is not progress)
MIN_DELTA = 1e-12

S = TypeVar("S")


def selective_objective(name: str, confidence: np.ndarray, errors: np.ndarray, target_risk: float) -> float:
    """Early-stopping objective, oriented so that LOWER is better."""
    from stage1.policies import metrics

    if name == "augrc":
        return float(metrics.augrc(confidence, errors))
    if name == "aurc":
        return float(metrics.aurc(confidence, errors))
    # coverage at selective risk <= target_risk (negated: lower is better)
    return -float(metrics.coverage_at_risk(confidence, errors, target_risk))


def validation_objective(
    name: str, logits: torch.Tensor, select: torch.Tensor, labels: np.ndarray, target_risk: float
) -> float:
    """``selective_objective`` of argmax predictions ``logits`` [n, C] ranked by ``select`` [n]."""
    errors = (logits.argmax(1).cpu().numpy() != labels).astype(np.int64)
    return selective_objective(name, select.cpu().numpy().astype(np.float64), errors, target_risk)


class EarlyStopping(Generic[S]):
    """Best value so far, its epoch and weights; how many epochs since it last improved.

    ``state`` is the snapshot to fall back on before any epoch improves (None: nothing yet).
    """

    def __init__(self, patience: int, state: S | None = None) -> None:
        self.patience = patience
        self.best = math.inf
        self.best_epoch = -1
        self.best_state: S | None = state
        self.stale = 0

    @property
    def best_value(self) -> float | None:
        """The best objective seen, or None when none was recorded."""
        return None if math.isinf(self.best) else float(self.best)

    def update(self, value: float, epoch: int, snapshot: Callable[[], S]) -> bool:
        """Record epoch ``epoch``'s objective; True when training should stop.

        On an improvement ``snapshot()`` is called for the weights to keep (only then, as copying
        weights costs time); otherwise one more stale epoch, and stop once ``patience`` are stale.
        """
        if value < self.best - MIN_DELTA:
            self.best, self.best_epoch, self.stale = value, epoch, 0
            self.best_state = snapshot()
            return False
        self.stale += 1
        return self.stale >= self.patience

    def keep(self, epoch: int, state: S) -> None:
        """Take ``epoch``'s ``state`` as the one to return, whatever its value (no validation data)."""
        self.best_epoch, self.best_state = epoch, state
