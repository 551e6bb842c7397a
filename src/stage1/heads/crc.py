"""crc: conformal risk training (after Yeh et al., "Conformal Risk Training", arXiv 2510.08748).

The controlled risk is the miss rate of exiting as "no roadwork": a positive (y = 1) whose
p1 = softmax(logits)[1] falls below the threshold t is exited as 0. Post-hoc CRC picks t on
val_calib; here the same procedure is simulated inside every batch so the model gets feedback:

1. the (random) batch is split into a pseudo-calibration half and a pseudo-prediction half;
2. on the calibration half, the CRC threshold for miss rate <= crc_alpha is the order statistic
   s_(m) of the positives' p1 (ascending, 0-based) with m = floor(crc_alpha * (n_pos + 1) - 1)
   (largest t with (#{p1 < t} + 1) / (n_pos + 1) <= crc_alpha). It is *smoothed* -- a Gaussian
   kernel average of neighbouring order statistics (``crc_bandwidth`` ranks), like the window mean
   of the reference code -- so gradients reach the calibration half's scores through t;
3. on the prediction half: the soft miss rate mean_{y=1} sigmoid((t - p1) / T) (the controlled
   risk, weight ``lambda_crc``) and the soft rate of negatives *not* exitable at t,
   mean_{y=0} sigmoid((p1 - t) / T) (the paper's efficiency objective, weight ``lambda_eff``),
   are added to the classification CE.

Batches whose calibration half has too few positives for crc_alpha (m < 0) train on CE only.
``select`` = max softmax.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from stage1._core.params import Param, Params

from .mlp import MLPHead
from .registry import HEADS


def crc_rank(n_pos: int, alpha: float) -> int:
    """0-based rank m of the CRC threshold among n_pos ascending positive scores (-1: none)."""
    return int(math.floor(alpha * (n_pos + 1) - 1 + 1e-9))


def smoothed_order_statistic(values: torch.Tensor, rank: int, bandwidth: float) -> torch.Tensor:
    """Kernel-weighted average of sorted ``values`` around ``rank`` (exact order statistic if bw=0).

    Differentiable w.r.t. ``values`` (through the sorted values themselves).
    """
    s = torch.sort(values).values
    if bandwidth <= 0:
        return s[rank]
    j = torch.arange(len(s), dtype=s.dtype, device=s.device)
    w = torch.softmax(-0.5 * ((j - rank) / bandwidth) ** 2, dim=0)
    return (w * s).sum()


def crc_soft_terms(p1: torch.Tensor, y: torch.Tensor, alpha: float, bandwidth: float,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(threshold t, soft miss rate, soft negative non-exit rate) for one batch, or None.

    The first half of the batch is the pseudo-calibration half, the second the prediction half.
    """
    half = len(p1) // 2
    p_cal, y_cal, p_pred, y_pred = p1[:half], y[:half], p1[half:], y[half:]
    pos_cal = p_cal[y_cal == 1]
    m = crc_rank(len(pos_cal), alpha)
    if m < 0:
        return None
    t = smoothed_order_statistic(pos_cal, m, bandwidth)
    zero = p1.new_zeros(())
    pos, neg = p_pred[y_pred == 1], p_pred[y_pred == 0]
    miss = torch.sigmoid((t - pos) / temperature).mean() if len(pos) else zero
    keep = torch.sigmoid((neg - t) / temperature).mean() if len(neg) else zero
    return t, miss, keep


@HEADS.register("crc")
class CRCHead(MLPHead):
    """Classifier trained end to end through a simulated conformal risk control step.

    Same network as ``mlp`` (trunk + class layer); only the loss differs.
    """

    PARAMS = MLPHead.PARAMS.with_defaults(batch_size=512) + Params(
        Param("crc_alpha", float, 0.02, "Miss-rate level of the simulated CRC step.", low=0.0, high=1.0,
              low_open=True, high_open=True),
        Param("crc_bandwidth", float, 2.0, "Kernel bandwidth (in ranks) smoothing the CRC order statistic "
              "(0 = exact).", low=0.0),
        Param("crc_temperature", float, 0.05, "Temperature of the soft miss / non-exit indicators.", low=0.0,
              low_open=True),
        Param("lambda_crc", float, 1.0, "Weight of the soft miss rate.", low=0.0),
        Param("lambda_eff", float, 1.0, "Weight of the soft rate of negatives not exitable (efficiency).", low=0.0),
    )

    def loss(self, outputs: dict[str, torch.Tensor], y: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        h = self.hparams
        logits = outputs["logits"]
        ce = self.ce(logits, y)
        terms = crc_soft_terms(torch.softmax(logits, dim=1)[:, 1], y, float(h["crc_alpha"]),
                               float(h["crc_bandwidth"]), float(h["crc_temperature"]))
        if terms is None:
            return ce
        _, miss, keep = terms
        return ce + float(h["lambda_crc"]) * miss + float(h["lambda_eff"]) * keep

    def extra_json(self) -> dict[str, Any]:
        return {"controlled_risk": "miss_rate", "crc_alpha": float(self.hparams["crc_alpha"])}
