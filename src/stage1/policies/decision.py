"""The per-image outcome of an exit policy (arrays in, arrays out) and its JSON-lines form."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CONFIDENT_0 = "CONFIDENT_0"
CONFIDENT_1 = "CONFIDENT_1"
UNCERTAIN = "UNCERTAIN"
AMBIGUOUS = "AMBIGUOUS"
LEVELS = (CONFIDENT_0, CONFIDENT_1, UNCERTAIN, AMBIGUOUS)

SET_0, SET_1, SET_01 = 0, 1, 2
_SET_LISTS = {SET_0: [0], SET_1: [1], SET_01: [0, 1]}


@dataclass(frozen=True)
class Decision:
    """What a policy says about each image.

    exit: answer now (True) or defer; label: predicted class (argmax of the calibrated p, given for
    every row; records show null when deferred); pred_set: 0={0}, 1={1}, 2={0,1}; p_roadwork:
    calibrated P(y=1); level: CONFIDENT_0 / CONFIDENT_1 (exit), UNCERTAIN (defer), AMBIGUOUS (defer
    and flag); score: the confidence the policy thresholded (calibrated max-p or the selector).
    """

    exit: np.ndarray
    label: np.ndarray
    pred_set: np.ndarray
    p_roadwork: np.ndarray
    level: np.ndarray
    score: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.exit)
        for name in ("label", "pred_set", "p_roadwork", "level", "score"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Decision.{name} has {len(getattr(self, name))} rows, exit has {n}")

    def __len__(self) -> int:
        return len(self.exit)

    def to_records(self, paths: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One JSON-able dict per row with the ``predict`` keys (path first when given)."""
        if paths is not None and len(paths) != len(self):
            raise ValueError(f"got {len(paths)} paths for {len(self)} decisions")
        out = []
        for i in range(len(self)):
            ex = bool(self.exit[i])
            rec: dict[str, Any] = {} if paths is None else {"path": str(paths[i])}
            rec.update(
                p_roadwork=float(self.p_roadwork[i]),
                decision="exit" if ex else "defer",
                label=int(self.label[i]) if ex else None,
                pred_set=list(_SET_LISTS[int(self.pred_set[i])]),
                select_score=float(self.score[i]),
                level=str(self.level[i]),
            )
            out.append(rec)
        return out

    def equals(self, other: "Decision") -> bool:
        """Exact equality of every array (used for JSON round-trip checks)."""
        return all(
            np.array_equal(getattr(self, f), getattr(other, f))
            for f in ("exit", "label", "pred_set", "p_roadwork", "level", "score")
        )
