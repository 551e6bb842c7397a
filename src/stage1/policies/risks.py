"""Exit risks as objects, registered by name in ``RISKS`` (DESIGN "Risks"; coverage is a metric).

A risk is a ratio of counts over the rows of a decision (``y`` the label, ``pred`` the predicted
label, ``exit`` the answer-now mask). Each risk says, per row, what counts as an error
(``wrong(y, pred)``, looked at only on exited rows) and which rows form the denominator
(``counted(y, pred, exit)``); everything else is derived from those two rules:

- ``fnr_exit`` = #(exit, y=1, pred=0) / #(exit, y=1)
- ``selective_error`` = #(exit, wrong) / #exit
- ``miss_rate`` = #(exit, y=1, pred=0) / #(y=1)

``monotone``: the risk is non-decreasing in expectation as the exit threshold loosens (true for
fnr_exit and miss_rate: loosening only adds exits, and the errors it adds are the least confident
ones). The rules work elementwise on numpy arrays and on plain Python ints / bools, so the same
definition gives per-row losses (``losses``), totals (``counts``, ``value``) and the count tables of
``ltt`` built from the four exit cells (``from_cells``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from stage1._core.errors import DataError
from stage1._core.registry import Registry

__all__ = ["Risk", "RISKS", "get_risk", "all_risks", "FnrExit", "SelectiveError", "MissRate"]

RISKS: Registry = Registry("risk")
_ORDER: list[str] = []  # registration order: the order risks are reported in


def _register(cls: type["Risk"]) -> type["Risk"]:
    RISKS.register(cls.name)(cls)
    _ORDER.append(cls.name)
    return cls


def _arrays(y: Any, pred: Any, exit: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, pp, ex = np.asarray(y), np.asarray(pred), np.asarray(exit)
    if ex.dtype != bool:
        raise DataError("exit must be a boolean mask")
    if not (yy.shape == pp.shape == ex.shape) or yy.ndim != 1:
        raise DataError(f"y, pred and exit must be 1-D of one length, got {yy.shape}, {pp.shape}, {ex.shape}")
    return yy, pp, ex


class Risk:
    """Base of the exit risks: subclasses set ``name``, ``monotone``, ``wrong`` and ``counted``."""

    name: ClassVar[str] = "risk"
    #: non-decreasing in expectation as the exit threshold loosens.
    monotone: ClassVar[bool] = False
    #: one line for help texts.
    description: ClassVar[str] = ""

    # -- the definition ----------------------------------------------------------------------
    @staticmethod
    def wrong(y: Any, pred: Any) -> Any:
        """What counts as an error on an exited row."""
        raise NotImplementedError

    @staticmethod
    def counted(y: Any, pred: Any, exit: Any) -> Any:
        """Which rows form the denominator."""
        raise NotImplementedError

    # -- derived -------------------------------------------------------------------------------
    def losses(self, y: np.ndarray, pred: np.ndarray, exit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: (loss, counted) boolean arrays; the risk is loss.sum() / counted.sum()."""
        yy, pp, ex = _arrays(y, pred, exit)
        counted = np.asarray(self.counted(yy, pp, ex), dtype=bool)
        return ex & np.asarray(self.wrong(yy, pp), dtype=bool) & counted, counted

    def counts(self, y: np.ndarray, pred: np.ndarray, exit: np.ndarray) -> tuple[int, int]:
        """(events, trials): the numerator and denominator counts."""
        loss, counted = self.losses(y, pred, exit)
        return int(loss.sum()), int(counted.sum())

    def value(self, y: np.ndarray, pred: np.ndarray, exit: np.ndarray) -> float:
        """events / trials; NaN when no row counts (e.g. nothing exited for fnr_exit)."""
        k, n = self.counts(y, pred, exit)
        return k / n if n > 0 else float("nan")

    def from_cells(self, exited: dict[tuple[int, int], Any], total: dict[tuple[int, int], Any]) -> tuple[Any, Any]:
        """(events, trials) from counts per (y, pred) cell: exited rows and all rows (arrays broadcast).

        ``ltt`` counts exits per threshold pair cell by cell; this sums the cells the risk counts.
        """
        trials: Any = 0
        events: Any = 0
        for cell, n_exit in exited.items():
            y, pred = cell
            if self.counted(y, pred, True):
                trials = trials + n_exit
                if self.wrong(y, pred):
                    events = events + n_exit
            if self.counted(y, pred, False):
                trials = trials + (total[cell] - n_exit)
        return events, trials

    @property
    def positives_only(self) -> bool:
        """True when only y=1 rows are counted (the trials scale with the positives, not with n)."""
        return not any(bool(self.counted(0, p, e)) for p in (0, 1) for e in (False, True))

    @property
    def blind_to_false_alarms(self) -> bool:
        """True when exiting a predicted positive is never an error for this risk (fnr_exit, miss_rate):
        such exits can only add trials, so the most lenient exit-as-1 threshold is never worse, and
        a certificate for this risk alone says nothing about false alarms."""
        return not any(bool(self.wrong(y, 1)) for y in (0, 1))

    @property
    def fixed_denominator(self) -> bool:
        """True when the counted rows do not depend on exiting (CRC needs a fixed population)."""
        return all(bool(self.counted(y, p, True)) == bool(self.counted(y, p, False)) for y in (0, 1) for p in (0, 1))

    def __repr__(self) -> str:
        return f"<risk {self.name!r}>"


@_register
class SelectiveError(Risk):
    """#(exit and wrong) / #exit."""

    name = "selective_error"
    monotone = False
    description = "errors among exited rows"

    @staticmethod
    def wrong(y: Any, pred: Any) -> Any:
        return y != pred

    @staticmethod
    def counted(y: Any, pred: Any, exit: Any) -> Any:
        return exit


@_register
class FnrExit(Risk):
    """#(exit, y=1, pred=0) / #(exit, y=1)."""

    name = "fnr_exit"
    monotone = True
    description = "false negatives among exited positives"

    @staticmethod
    def wrong(y: Any, pred: Any) -> Any:
        return (y == 1) & (pred == 0)

    @staticmethod
    def counted(y: Any, pred: Any, exit: Any) -> Any:
        return exit & (y == 1)


@_register
class MissRate(Risk):
    """#(exit, y=1, pred=0) / #(y=1)."""

    name = "miss_rate"
    monotone = True
    description = "positives exited as 0 among all positives"

    @staticmethod
    def wrong(y: Any, pred: Any) -> Any:
        return (y == 1) & (pred == 0)

    @staticmethod
    def counted(y: Any, pred: Any, exit: Any) -> Any:
        return y == 1  # every positive, exited or not


def get_risk(name: str) -> Risk:
    """The risk registered as ``name`` (UnknownNameError listing the names otherwise)."""
    return RISKS.create(name)


def all_risks() -> list[Risk]:
    """Every registered risk, in registration order (the order reports list them)."""
    return [RISKS.create(n) for n in _ORDER if n in RISKS]
