"""Single-threshold exit rules: the seeds' softmax threshold, target coverage, and CRC."""
from __future__ import annotations

import math

import numpy as np

from stage1._core.errors import ConfigError
from stage1._core.params import Param, Params
from stage1.policies import POLICIES
from stage1.policies.base import BASE_PARAMS, ExitPolicy
from stage1.policies.risks import RISKS, get_risk


def crc_risks() -> list[str]:
    """Risks CRC can control: a fixed population of counted rows and a loss that only grows as the
    exit threshold loosens (``Risk.fixed_denominator`` and ``Risk.monotone``): the miss rate."""
    return [n for n in RISKS.names() if get_risk(n).fixed_denominator and get_risk(n).monotone]


@POLICIES.register("threshold")
class ThresholdPolicy(ExitPolicy):
    """The seeds' baseline: exit when the confidence reaches ``threshold`` (p >= t or p <= 1 - t).

    No risk guarantee: ``certified`` stays False and the reason says so, but it still exits.
    """

    name = "threshold"
    PARAMS = Params(
        Param("threshold", float, 0.88, "Exit when the confidence reaches it (seeds: 0.88); in [0, 1] for score='p'."),
    ) + BASE_PARAMS.with_defaults(calibrator=None)

    def _check(self) -> None:
        if self.score == "p" and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold on the calibrated probability must be in [0, 1], got {self.threshold}")

    def _fit_thresholds(self, s: np.ndarray, yhat: np.ndarray, y: np.ndarray) -> None:
        self.t0 = self.t1 = self.threshold
        self.reason = f"baseline: fixed threshold {self.threshold:g} on {self.score}; no risk guarantee"


@POLICIES.register("coverage")
class CoveragePolicy(ExitPolicy):
    """Selector threshold that exits at least ``target_coverage`` of val_calib (no risk guarantee)."""

    name = "coverage"
    PARAMS = Params(
        Param("target_coverage", float, 0.8, "Share of val_calib to exit.", low=0.0, high=1.0, low_open=True),
    ) + BASE_PARAMS

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
    PARAMS = Params(
        Param("alpha", float, 0.02, "Bound on the expected risk, e.g. 0.02.", low=0.0, high=1.0, low_open=True,
              high_open=True),
        Param("risk", str, "miss_rate", "The controlled risk (policies.risks).", choices=crc_risks,
              note="crc controls an expected risk over a fixed population, i.e. the miss rate; use the ltt "
                   "policy for fnr_exit or selective_error (PAC guarantees)"),
        Param("exit1_threshold", float, None, "Fixed exit-as-1 threshold (None: the CRC threshold).", optional=True),
    ) + BASE_PARAMS

    def certifies(self) -> dict[str, str]:
        """CRC bounds the expected controlled risk over the draw of val_calib, nothing else."""
        return {self.risk: "expectation"}

    def min_positives(self) -> int:
        """CRC certifies once alpha * (n + 1) >= 1: n >= 1 / alpha - 1 calibration positives."""
        return math.ceil(1.0 / self.alpha - 1.0 - 1e-9)

    def _fit_thresholds(self, s: np.ndarray, yhat: np.ndarray, y: np.ndarray) -> None:
        risk = get_risk(self.risk)
        counted = np.asarray(risk.counted(y, yhat, True), dtype=bool)  # the fixed population
        n = int(counted.sum())
        k_max = math.floor(self.alpha * (n + 1) - 1 + 1e-9)  # allowed misses among n positives
        if k_max < 0:
            self.n_needed = self.min_positives()
            self.reason = (
                f"not certifiable: CRC at alpha={self.alpha:g} needs at least {self.n_needed} calibration "
                f"positives, val_calib has {n}; every image is deferred"
            )
            return
        misses = np.sort(s[counted & np.asarray(risk.wrong(y, yhat), dtype=bool)])[::-1]  # loss 1 if exited
        lam = -math.inf if k_max >= len(misses) else float(misses[k_max])
        self.t0 = float(np.nextafter(lam, math.inf)) if math.isfinite(lam) else -math.inf
        self.t1 = self.t0 if self.exit1_threshold is None else self.exit1_threshold
        self.certified = True
        self.reason = (
            f"CRC: expected miss rate <= {self.alpha:g} over the draw of val_calib "
            f"({n} calibration positives, at most {k_max} calibration misses allowed)"
        )
        self.summary = {"crc_lambda": lam, "crc_k_max": k_max}
