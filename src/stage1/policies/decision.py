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
    error / reason (optional, object arrays): why a row could not be scored ("" = it was); such rows
    come from ``Decision.deferred`` and their records carry ``error`` / ``reason`` and no score.
    """

    exit: np.ndarray
    label: np.ndarray
    pred_set: np.ndarray
    p_roadwork: np.ndarray
    level: np.ndarray
    score: np.ndarray
    error: np.ndarray | None = None
    reason: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.exit)
        for name in ("label", "pred_set", "p_roadwork", "level", "score", "error", "reason"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Decision.{name} has {len(value)} rows, exit has {n}")

    @classmethod
    def deferred(cls, n: int, error: str, reason: str) -> "Decision":
        """``n`` rows that could not be scored: defer and flag (AMBIGUOUS), p_roadwork 0.5, set {0, 1}.

        The answer for an unreadable image or a broken head output: every record keeps the full
        schema, so a miner always has a ``p_roadwork`` in [0, 1] to send (0.5, no information) and
        Stage-2 gets the image; ``error`` (the detail) and ``reason`` (a short code) say why.
        """
        return cls(
            exit=np.zeros(n, dtype=bool),
            label=np.zeros(n, dtype=np.int64),
            pred_set=np.full(n, SET_01, dtype=np.int64),
            p_roadwork=np.full(n, 0.5),
            level=np.full(n, AMBIGUOUS, dtype="<U11"),
            score=np.full(n, np.nan),
            error=np.full(n, error, dtype=object),
            reason=np.full(n, reason, dtype=object),
        )

    def failed(self, i: int) -> bool:
        """Whether row ``i`` could not be scored (it has an error)."""
        return self.reason is not None and bool(self.reason[i])

    def __len__(self) -> int:
        return len(self.exit)

    def to_records(self, paths: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One JSON-able dict per row with the ``predict`` keys (path first when given)."""
        if paths is not None and len(paths) != len(self):
            raise ValueError(f"got {len(paths)} paths for {len(self)} decisions")
        out = []
        for i in range(len(self)):
            ex, failed = bool(self.exit[i]), self.failed(i)
            rec: dict[str, Any] = {} if paths is None else {"path": str(paths[i])}
            rec.update(
                p_roadwork=float(self.p_roadwork[i]),
                decision="exit" if ex else "defer",
                label=int(self.label[i]) if ex else None,
                pred_set=list(_SET_LISTS[int(self.pred_set[i])]),
                select_score=None if failed else float(self.score[i]),
                level=str(self.level[i]),
            )
            if failed:
                rec.update(error=str(self.error[i]) if self.error is not None else "", reason=str(self.reason[i]))
            out.append(rec)
        return out

    def equals(self, other: "Decision") -> bool:
        """Exact equality of every array (used for JSON round-trip checks; NaN scores compare equal)."""
        same = all(
            np.array_equal(getattr(self, f), getattr(other, f))
            for f in ("exit", "label", "pred_set", "p_roadwork", "level")
        ) and np.array_equal(self.score, other.score, equal_nan=True)
        for f in ("error", "reason"):
            a, b = getattr(self, f), getattr(other, f)
            same = same and ((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b)))
        return same
