"""Single-threshold exit rules: the seeds' softmax threshold, target coverage, and CRC."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from stage1.policies import POLICIES
from stage1.policies.base import ExitPolicy


@POLICIES.register("threshold")
class ThresholdPolicy(ExitPolicy):
    """The seeds' baseline: exit when the confidence reaches ``threshold`` (p >= t or p <= 1 - t).

    No risk guarantee: ``certified`` stays False and the reason says so, but it still exits.
    """

    name = "threshold"
    default_calibrator = None

    def __init__(self, threshold: float = 0.88, **base: Any) -> None:
        super().__init__(**base)
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        if self.score == "p" and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold on the calibrated probability must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def _own_params(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def _fit_thresholds(self, s: np.ndarray, yhat: np.ndarray, y: np.ndarray) -> None:
        self.t0 = self.t1 = self.threshold
        self.reason = f"baseline: fixed threshold {self.threshold:g} on {self.score}; no risk guarantee"


@POLICIES.register("coverage")
class CoveragePolicy(ExitPolicy):
    """Selector threshold that exits at least ``target_coverage`` of val_calib (no risk guarantee)."""

    name = "coverage"

    def __init__(self, target_coverage: float = 0.8, **base: Any) -> None:
        super().__init__(**base)
        if not 0.0 < target_coverage <= 1.0:
            raise ValueError(f"target_coverage must be in (0, 1], got {target_coverage}")
        self.target_coverage = float(target_coverage)

    def _own_params(self) -> dict[str, Any]:
        return {"target_coverage": self.target_coverage}

    def _fit_thresholds(self, s: np.ndarray, yhat: np.ndarray, y: np.ndarray) -> None:
        desc = np.sort(s)[::-1]
        k = max(1, math.ceil(self.target_coverage * len(desc) - 1e-9))
        self.t0 = self.t1 = float(desc[k - 1])
        self.reason = (
            f"selector threshold {self.t1:.6g} reaches coverage >= {self.target_coverage:g} on val_calib; "
            "no risk guarantee"
        )


@POLICIES.register("crc")
class CRCPolicy(ExitPolicy):
    """Conformal risk control of the miss rate (Angelopoulos et al. 2022): E[miss rate] <= alpha.

    The loss of a calibration positive is 1 when it exits as 0; it is non-increasing in the exit-as-0
    threshold. The threshold is the smallest lambda with (n/(n+1)) R_n(lambda) + 1/(n+1) <= alpha over
    the n calibration positives (exit as 0 when s > lambda). ``exit1_threshold`` fixes the exit-as-1
    threshold (misses never come from exiting as 1); None ties it to the CRC threshold.
    """

    name = "crc"
    guarantee = "crc"

    def __init__(
        self, alpha: float = 0.02, risk: str = "miss_rate", exit1_threshold: float | None = None, **base: Any
    ) -> None:
        super().__init__(**base)
        if risk != "miss_rate":
            raise ValueError(
                f"crc controls the expected miss rate (risk='miss_rate'); got {risk!r}. "
                "Use the ltt policy for fnr_exit or selective_error (PAC guarantees)."
            )
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if exit1_threshold is not None and not math.isfinite(exit1_threshold):
            raise ValueError("exit1_threshold must be a finite number or None")
        self.alpha = float(alpha)
        self.risk = risk
        self.exit1_threshold = None if exit1_threshold is None else float(exit1_threshold)

    def _own_params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "risk": self.risk, "exit1_threshold": self.exit1_threshold}

    def _fit_thresholds(self, s: np.ndarray, yhat: np.ndarray, y: np.ndarray) -> None:
        n = int(y.sum())
        k_max = math.floor(self.alpha * (n + 1) - 1 + 1e-9)  # allowed misses among n positives
        if k_max < 0:
            self.n_needed = math.ceil(1.0 / self.alpha - 1.0 - 1e-9)
            self.reason = (
                f"not certifiable: CRC at alpha={self.alpha:g} needs at least {self.n_needed} calibration "
                f"positives, val_calib has {n}; every image is deferred"
            )
            return
        misses = np.sort(s[(y == 1) & (yhat == 0)])[::-1]
        lam = -math.inf if k_max >= len(misses) else float(misses[k_max])
        self.t0 = float(np.nextafter(lam, math.inf)) if math.isfinite(lam) else -math.inf
        self.t1 = self.t0 if self.exit1_threshold is None else self.exit1_threshold
        self.certified = True
        self.reason = (
            f"CRC: expected miss rate <= {self.alpha:g} over the draw of val_calib "
            f"({n} calibration positives, at most {k_max} calibration misses allowed)"
        )
        self.summary = {"crc_lambda": lam, "crc_k_max": k_max}
