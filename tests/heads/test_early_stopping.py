"""Early stopping shared by the heads trainer and fine-tuning: objective, best value, patience."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stage1.heads.early_stopping import EarlyStopping, selective_objective, validation_objective


def test_selective_objective_uses_policies_metrics() -> None:
    from stage1.policies import metrics

    conf = np.array([0.9, 0.8, 0.7, 0.6])
    err = np.array([0, 1, 0, 1])
    assert selective_objective("augrc", conf, err, 0.02) == metrics.augrc(conf, err)
    assert selective_objective("aurc", conf, err, 0.02) == metrics.aurc(conf, err)
    assert selective_objective("coverage_at_risk", conf, err, 0.0) == -0.25


def test_validation_objective_scores_argmax_errors_by_select() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    select = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = np.array([0, 0, 0, 0])  # predictions 0, 1, 0, 1: rows 1 and 3 are errors
    expected = selective_objective("augrc", select.numpy().astype(np.float64), np.array([0, 1, 0, 1]), 0.02)
    assert validation_objective("augrc", logits, select, labels, 0.02) == expected


def test_stops_after_patience_stale_epochs_and_keeps_the_best() -> None:
    stopper: EarlyStopping[str] = EarlyStopping(patience=2)
    assert stopper.best_value is None and stopper.best_state is None and stopper.best_epoch == -1
    snapshots: list[int] = []

    def snap(epoch: int):
        def take() -> str:
            snapshots.append(epoch)
            return f"weights{epoch}"

        return take

    values = [3.0, 2.0, 2.5, 1.0, 1.0, 1.5]
    stops = [stopper.update(v, e, snap(e)) for e, v in enumerate(values)]
    assert stops == [False, False, False, False, False, True]  # epochs 4 and 5 are stale
    assert snapshots == [0, 1, 3]  # weights are copied on improvements only
    assert (stopper.best_value, stopper.best_epoch, stopper.best_state) == (1.0, 3, "weights3")


def test_an_equal_or_nan_value_is_not_an_improvement() -> None:
    stopper: EarlyStopping[int] = EarlyStopping(patience=3)
    stopper.update(0.5, 0, lambda: 0)
    assert not stopper.update(0.5, 1, lambda: pytest.fail("equal is no progress"))
    assert not stopper.update(float("nan"), 2, lambda: pytest.fail("NaN is no progress"))
    assert stopper.update(0.5 - 1e-13, 3, lambda: pytest.fail("float noise is no progress"))
    assert stopper.best_epoch == 0 and stopper.stale == 3


def test_initial_state_and_keep() -> None:
    stopper = EarlyStopping(patience=1, state="initial")
    assert stopper.best_state == "initial" and stopper.best_epoch == -1  # nothing improved yet
    stopper.keep(4, "last")  # no validation data: the epoch is taken as it is
    assert (stopper.best_epoch, stopper.best_state, stopper.best_value) == (4, "last", None)
