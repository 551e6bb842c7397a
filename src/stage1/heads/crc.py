"""crc: conformal risk training (Yeh, Christianson, Wierman, Yue, "Conformal Risk Training:
End-to-End Optimization of Conformal Risk Control", NeurIPS 2025, arXiv 2510.08748).

The controlled risk is the miss rate of exiting as "no roadwork": a positive (y = 1) whose
p1 = softmax(logits)[1] falls below the threshold t is exited as 0. Post-hoc CRC (the ``crc``
policy) picks t on val_calib; this head simulates that step inside every training batch so the
model gets feedback from it:

1. the batch is split into a pseudo-calibration set and a pseudo-prediction set (``crc_split``);
2. the CRC threshold for miss rate <= crc_alpha over the calibration positives is the order
   statistic s_(m) of their p1 (ascending, 0-based), m = floor(crc_alpha * (n_pos + 1) - 1): the
   largest t with (#{p1 < t} + 1) / (n_pos + 1) <= crc_alpha, the rule of the ``crc`` policy. It
   exists only when n_pos >= ceil(1 / crc_alpha) - 1 (49 at crc_alpha 0.02). It is *smoothed* (a
   Gaussian kernel average of neighbouring order statistics, ``crc_bandwidth`` ranks) and *not*
   detached, so gradients reach the calibration positives' scores through t;
3. on the prediction set, with sigmoid relaxations of temperature ``crc_temperature``:
   efficiency term  E(t) = mean_{y=0} sigmoid((p1 - t) / T)  (negatives *not* exitable at t),
   risk term        R(t) = mean_{y=1} sigmoid((t - p1) / T)  (soft miss rate).

``crc_objective`` chooses the loss:

* ``"paper"`` (default): CE + lambda_eff * E(t). This is Yeh et al.'s objective: the risk is
  *controlled* by the threshold (CRC makes it hold whatever the model), and only the efficiency of
  the controlled predictor is optimised, differentiating through the threshold. In their reference
  code (github.com/chrisyeh96/conformal-risk-training, ``run_polyp.py``, ``e2ecrc``, the FNR-control
  experiment this head mirrors) the batch's first half calibrates, the threshold is the mean of the
  sorted positive scores in a window of ranks around the CRC index (sort indices under no_grad, the
  values keep their gradient), and the loss is the sigmoid-relaxed false positive rate
  sigmoid((p - lambda) / T), T = 0.1, of the second half's negatives. They fine-tune a pretrained
  model with that loss alone; a head here trains from scratch, so the classification CE stays.
* ``"risk_and_efficiency"``: CE + lambda_crc * R(t) + lambda_eff * E(t), this head's earlier
  objective. Penalising the controlled risk as well adds a gradient that pushes t down, i.e. pushes
  the hardest calibration positives *down*; kept as a named option for comparison.

Making the CRC term run. A batch whose calibration set holds fewer than ceil(1 / crc_alpha) - 1
positives has no CRC threshold; before, such batches silently trained on CE only (at crc_alpha 0.02,
batch 512 and 10% positives: half a batch holds ~26 positives, so nearly every batch). Now:

* ``crc_split="stratified"`` (default) splits by class: with the paper objective every positive
  of the batch calibrates and every negative is a prediction row (the objective reads nothing else:
  a row has one label, so no information is thrown away and the two sets stay disjoint); with
  risk_and_efficiency the positives alternate between the two sets and the negatives predict.
  ``"halves"``: the first half of the batch calibrates, the second predicts (the reference code).
* ``crc_topup`` (default on): a calibration set still short of ``crc_min_cal_positives`` (0 = the
  ceil(1 / crc_alpha) - 1 minimum) is topped up with positives drawn (seeded) from the training rows
  *not* in the batch, run through the module in the same step. They only enter the threshold (not
  the CE), so the batch's CE is exactly the ``mlp`` head's. The trainer's batches stay as they are.
* ``fit`` refuses (ConfigError) when the training set, or with crc_topup off any batch, can never
  hold enough calibration positives, and warns once, with the numbers, when some steps could not
  run the CRC term. The share of training steps that ran it is recorded in the fit history
  (``crc_term_fraction``, with the step counts), hence in head.json and the run's config.

``select`` = max softmax.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from stage1._core.errors import ConfigError
from stage1._core.params import Param, Params

from .mlp import MLPHead
from .registry import HEADS
from .trainer import TrainResult

CRC_OBJECTIVES = ("paper", "risk_and_efficiency")
CRC_SPLITS = ("stratified", "halves")
#: what the fit history adds to ``TrainResult`` (head.json "training" and the run's config).
CRC_HISTORY_KEYS = ("crc_term_fraction", "crc_term_steps", "crc_steps", "crc_topup_steps", "crc_topup_rows")


def crc_rank(n_pos: int, alpha: float) -> int:
    """0-based rank m of the CRC threshold among n_pos ascending positive scores (-1: none)."""
    return int(math.floor(alpha * (n_pos + 1) - 1 + 1e-9))


def crc_min_positives(alpha: float) -> int:
    """The fewest calibration positives with a CRC threshold at ``alpha``: ceil(1 / alpha) - 1.

    (crc_rank(n, alpha) >= 0 iff n >= 1 / alpha - 1; 49 at alpha 0.02.)
    """
    return max(0, int(math.ceil(1.0 / alpha - 1.0 - 1e-9)))


def smoothed_order_statistic(values: torch.Tensor, rank: int, bandwidth: float) -> torch.Tensor:
    """Kernel-weighted average of sorted ``values`` around ``rank`` (exact order statistic if bw=0).

    Differentiable w.r.t. ``values`` (through the sorted values themselves; the sort order is
    piecewise constant), like the reference code's window mean of the sorted scores.
    """
    s = torch.sort(values).values
    if bandwidth <= 0:
        return s[rank]
    j = torch.arange(len(s), dtype=s.dtype, device=s.device)
    w = torch.softmax(-0.5 * ((j - rank) / bandwidth) ** 2, dim=0)
    return (w * s).sum()


@dataclass(frozen=True)
class CRCTerms:
    """The simulated CRC step of one batch.

    ``threshold``: smoothed CRC threshold (differentiable w.r.t. the calibration positives);
    ``miss``: soft miss rate R(t) of the prediction positives (0 without any); ``keep``: soft share
    E(t) of prediction negatives not exitable at t (0 without any); ``n_cal_pos``: positives used.
    """

    threshold: torch.Tensor
    miss: torch.Tensor
    keep: torch.Tensor
    n_cal_pos: int


def crc_soft_terms(p_cal_pos: torch.Tensor, p_pred_pos: torch.Tensor, p_pred_neg: torch.Tensor, alpha: float,
                   bandwidth: float, temperature: float) -> CRCTerms | None:
    """Threshold and soft terms from the three score sets, or None when there is no threshold.

    ``p_cal_pos``: p1 of the calibration positives (they set t); ``p_pred_pos`` / ``p_pred_neg``:
    p1 of the prediction positives / negatives (they are scored at t).
    """
    m = crc_rank(len(p_cal_pos), alpha)
    if m < 0:
        return None
    t = smoothed_order_statistic(p_cal_pos, m, bandwidth)
    zero = t.new_zeros(())
    miss = torch.sigmoid((t - p_pred_pos) / temperature).mean() if len(p_pred_pos) else zero
    keep = torch.sigmoid((p_pred_neg - t) / temperature).mean() if len(p_pred_neg) else zero
    return CRCTerms(t, miss, keep, len(p_cal_pos))


def split_batch(y: torch.Tensor, split: str, objective: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean masks (calibration positives, prediction positives, prediction negatives) of a batch.

    ``"halves"``: rows [0, B // 2) calibrate, the rest predict. ``"stratified"``: the paper objective
    calibrates on every positive and predicts on every negative; risk_and_efficiency needs held-out
    positives too, so positives alternate (1st, 3rd, ... calibrate) and every negative predicts.
    """
    pos = y == 1
    if split == "halves":
        first = torch.arange(len(y), device=y.device) < len(y) // 2
        return pos & first, pos & ~first, ~pos & ~first
    if split != "stratified":
        raise ConfigError(f"crc_split must be one of {', '.join(CRC_SPLITS)}, got {split!r}")
    if objective == "paper":
        return pos, torch.zeros_like(pos), ~pos
    rank = torch.cumsum(pos.long(), 0) - 1
    cal = pos & (rank % 2 == 0)
    return cal, pos & ~cal, ~pos


def batch_capacity(split: str, objective: str, batch_size: int, n_pos: int) -> int:
    """Most calibration positives a batch of ``batch_size`` rows can hold (``n_pos`` in the data)."""
    if split == "halves":
        return min(batch_size // 2, n_pos)
    most = min(batch_size, n_pos)
    return most if objective == "paper" else (most + 1) // 2


def feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The standardisation the head's fit applies to the training features (mean, std over all views).

    The top-up rows are standardised with these, as the trainer's batches are (a test checks they
    equal the fitted module's ``standardize`` buffers).
    """
    flat = x.reshape(-1, x.shape[-1])
    return flat.mean(0), flat.std(0).clamp_min(1e-6)


@dataclass
class CRCTrainResult(TrainResult):
    """``TrainResult`` plus how often the CRC term ran.

    ``crc_steps``: training steps (an F-SAM step's second loss evaluation is not counted again);
    ``crc_term_steps``: those with a CRC threshold; ``crc_term_fraction`` = their ratio;
    ``crc_topup_steps`` / ``crc_topup_rows``: steps that drew extra positives, and how many in all.
    """

    crc_term_fraction: float | None = None
    crc_term_steps: int = 0
    crc_steps: int = 0
    crc_topup_steps: int = 0
    crc_topup_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        frac = None if self.crc_term_fraction is None else round(float(self.crc_term_fraction), 6)
        return {**super().to_dict(), "crc_term_fraction": frac, "crc_term_steps": self.crc_term_steps,
                "crc_steps": self.crc_steps, "crc_topup_steps": self.crc_topup_steps,
                "crc_topup_rows": self.crc_topup_rows}


class _PositiveTopUp:
    """Draws training positives outside the current batch and scores them with the live module.

    Seeded (its own generator), so fits stay reproducible. The draw is remembered per batch: the
    second loss evaluation of an F-SAM step (same batch rows) re-scores the same rows.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None,
                 seed: int, *, module: nn.Module) -> None:
        self.x = x if x.ndim == 3 else x[:, None, :]
        self.n = len(y)
        self.pos = torch.nonzero(y == 1).flatten()
        self.stats = stats
        self.module = module
        # its own stream (the trainer's batch order and the global RNG of dropout are left as they are)
        self.gen = torch.Generator().manual_seed(int(seed) + 7919)
        self._key: torch.Tensor | None = None
        self._k = -1
        self._draw: tuple[torch.Tensor, torch.Tensor] | None = None

    def draw(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids, view ids) of up to ``k`` positives not in ``rows``; the same again for the same batch."""
        if self._draw is not None and self._key is not None and self._k == k and torch.equal(self._key, rows):
            return self._draw
        in_batch = torch.zeros(self.n, dtype=torch.bool)
        in_batch[rows] = True
        cand = self.pos[~in_batch[self.pos]]
        pick = cand[torch.randperm(len(cand), generator=self.gen)[:k]]
        views = torch.randint(0, self.x.shape[1], (len(pick),), generator=self.gen)
        self._key, self._k, self._draw = rows.clone(), k, (pick, views)
        return self._draw

    def scores(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        """p1 of up to ``k`` extra positives, through the module (with gradient)."""
        pick, views = self.draw(rows, k)
        xb = self.x[pick, views]
        if self.stats is not None:
            xb = (xb - self.stats[0]) / self.stats[1]
        return torch.softmax(self.module(xb)["logits"], dim=1)[:, 1]


@HEADS.register("crc")
class CRCHead(MLPHead):
    """Classifier trained end to end through a simulated conformal risk control step.

    Same network as ``mlp`` (trunk + class layer); only the loss (and, for the CRC term, the
    extra calibration positives it may draw) differs.
    """

    PARAMS = MLPHead.PARAMS.with_defaults(batch_size=512) + Params(
        Param("crc_alpha", float, 0.02, "Miss-rate level of the simulated CRC step.", low=0.0, high=1.0,
              low_open=True, high_open=True),
        Param("crc_objective", str, "paper", "'paper': CE + lambda_eff * efficiency through the CRC threshold "
              "(Yeh et al.); 'risk_and_efficiency': also lambda_crc * the soft miss rate (the earlier objective).",
              choices=CRC_OBJECTIVES),
        Param("crc_split", str, "stratified", "Pseudo-calibration / prediction split of a batch: 'stratified' "
              "(by class: positives calibrate, negatives predict) or 'halves' (first / second half).",
              choices=CRC_SPLITS),
        Param("crc_topup", bool, True, "Top a calibration set short of crc_min_cal_positives up with training "
              "positives outside the batch (scored in the same step), so the CRC term runs in every step."),
        Param("crc_min_cal_positives", int, 0, "Calibration positives the top-up aims for (0 = the fewest CRC "
              "needs, ceil(1/crc_alpha) - 1; never fewer; at most the training positives).", low=0),
        Param("crc_bandwidth", float, 2.0, "Kernel bandwidth (in ranks) smoothing the CRC order statistic "
              "(0 = exact).", low=0.0),
        Param("crc_temperature", float, 0.05, "Temperature of the soft miss / non-exit indicators.", low=0.0,
              low_open=True),
        Param("lambda_crc", float, 1.0, "Weight of the soft miss rate (crc_objective='risk_and_efficiency' only).",
              low=0.0),
        Param("lambda_eff", float, 1.0, "Weight of the soft rate of negatives not exitable (efficiency).", low=0.0),
    )

    def __init__(self, **hparams: Any) -> None:
        self._topup: _PositiveTopUp | None = None
        #: (x, y, standardisation, seed) while ``fit`` runs with crc_topup on; ``make_module`` binds the top-up.
        self._topup_data: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, int] | None = None
        self._reset_counts()
        super().__init__(**hparams)

    def _check(self) -> None:
        h = self.hparams
        if h["crc_objective"] == "paper" and float(h["lambda_crc"]) != float(type(self).PARAMS["lambda_crc"].default):
            warnings.warn("crc: lambda_crc has no effect with crc_objective='paper' (the paper penalises only the "
                          "efficiency term; its weight is lambda_eff); use crc_objective='risk_and_efficiency' to "
                          "penalise the soft miss rate too", UserWarning, stacklevel=4)

    # -- the CRC term -------------------------------------------------------------------------
    def min_cal_positives(self) -> int:
        """Calibration positives a CRC threshold needs at this crc_alpha: ceil(1/crc_alpha) - 1."""
        return crc_min_positives(float(self.hparams["crc_alpha"]))

    def topup_target(self) -> int:
        """Calibration positives the top-up aims for: crc_min_cal_positives, never below the minimum."""
        return max(int(self.hparams["crc_min_cal_positives"]), self.min_cal_positives())

    def crc_terms(self, logits: torch.Tensor, y: torch.Tensor,
                  rows: torch.Tensor | None = None) -> CRCTerms | None:
        """The batch's simulated CRC step (topped up during ``fit`` when short); None: no threshold."""
        h = self.hparams
        p1 = torch.softmax(logits, dim=1)[:, 1]
        cal, pred_pos, pred_neg = split_batch(y, str(h["crc_split"]), str(h["crc_objective"]))
        p_cal = p1[cal]
        short = self.topup_target() - len(p_cal)
        new_step = self._new_step(rows)
        if short > 0 and self._topup is not None and rows is not None:
            extra = self._topup.scores(rows, short)
            if new_step and len(extra):
                self._counts["topup_steps"] += 1
                self._counts["topup_rows"] += len(extra)
            p_cal = torch.cat([p_cal, extra])
        terms = crc_soft_terms(p_cal, p1[pred_pos], p1[pred_neg], float(h["crc_alpha"]),
                               float(h["crc_bandwidth"]), float(h["crc_temperature"]))
        if new_step:
            self._counts["steps"] += 1
            if terms is not None:
                self._counts["ran"] += 1
            else:
                n = len(p_cal)
                self._counts["short_min"] = min(self._counts["short_min"], n)
                self._counts["short_max"] = max(self._counts["short_max"], n)
        return terms

    def loss(self, outputs: dict[str, torch.Tensor], y: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        """CE + the CRC term of ``crc_objective`` (CE alone when the batch has no CRC threshold).

        ``crc_row`` (from ``fit_extras``): the batch's training row ids, used to top the calibration
        set up with other training positives; without it (fine-tuning, direct calls) no top-up.
        """
        h = self.hparams
        logits = outputs["logits"]
        ce = self.ce(logits, y)
        terms = self.crc_terms(logits, y, extras.get("crc_row"))
        if terms is None:
            return ce
        eff = float(h["lambda_eff"]) * terms.keep
        if h["crc_objective"] == "paper":
            return ce + eff
        return ce + float(h["lambda_crc"]) * terms.miss + eff

    # -- counting -----------------------------------------------------------------------------
    def _reset_counts(self) -> None:
        self._counts: dict[str, int] = {"steps": 0, "ran": 0, "topup_steps": 0, "topup_rows": 0,
                                        "short_min": 1 << 62, "short_max": -1}
        self._last_rows: torch.Tensor | None = None

    def _new_step(self, rows: torch.Tensor | None) -> bool:
        """False for a repeated evaluation of the same batch (F-SAM's second pass), else True."""
        if rows is None:
            return True
        if self._last_rows is not None and torch.equal(self._last_rows, rows):
            return False
        self._last_rows = rows.clone()
        return True

    def crc_term_fraction(self) -> float | None:
        """Share of the counted training steps whose batch ran the CRC term (None before any)."""
        c = self._counts
        return c["ran"] / c["steps"] if c["steps"] else None

    # -- fitting ------------------------------------------------------------------------------
    def fit_extras(self, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor | None,
                   yv: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The training row id of every row (``crc_row``): the top-up draws positives outside the batch."""
        return {"crc_row": torch.arange(len(y))}

    def make_module(self, in_dim: int) -> nn.Module:
        """The ``mlp`` network; inside ``fit`` (top-up on) the top-up is bound to it."""
        module = super().make_module(in_dim)
        if self._topup_data is not None:
            self._topup = _PositiveTopUp(*self._topup_data, module=module)
        return module

    def _refuse_impossible(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """ConfigError when no training step could ever run the CRC term."""
        h = self.hparams
        alpha, need = float(h["crc_alpha"]), self.min_cal_positives()
        n_pos = int((y == 1).sum())
        if n_pos < need:
            hint = f"raise crc_alpha to >= {1.0 / (n_pos + 1):.3g} or train" if n_pos else "train"
            raise ConfigError(
                f"crc: crc_alpha={alpha:g} needs at least {need} calibration positives (ceil(1/alpha) - 1) for a "
                f"CRC threshold, but the training set has {n_pos} positive rows, so the CRC term could never "
                f"run; {hint} the mlp head")
        if h["crc_topup"]:
            return
        views = x.shape[1] if x.ndim == 3 else 1
        rows = len(y) * (views if h["view_mode"] == "all" else 1)
        bs = min(int(h["batch_size"]), rows)
        cap = batch_capacity(str(h["crc_split"]), str(h["crc_objective"]), bs, n_pos)
        if cap < need:
            raise ConfigError(
                f"crc: with crc_topup off, a batch of {bs} rows holds at most {cap} calibration positives "
                f"(crc_split={h['crc_split']!r}, crc_objective={h['crc_objective']!r}), fewer than the {need} "
                f"crc_alpha={alpha:g} needs, so the CRC term could never run; turn crc_topup on, raise batch_size "
                f"or crc_alpha, or use crc_split='stratified'")

    def _fit_tensors(self, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor | None, yv: torch.Tensor | None) -> None:
        """``Head`` fitting, plus: refuse when the CRC term can never run, bind the top-up to the
        module being trained, record the CRC step counts in the history, warn when some steps lacked it."""
        self._refuse_impossible(x, y)
        self._reset_counts()
        h = self.hparams
        if h["crc_topup"]:
            stats = feature_stats(x) if h["standardize"] else None
            self._topup_data = (x, y, stats, int(h["seed"]))
        try:
            super()._fit_tensors(x, y, xv, yv)
        finally:
            self._topup_data = None
            self._topup = None
        c = self._counts
        frac = self.crc_term_fraction()
        if self.history_ is not None:
            self.history_ = CRCTrainResult(**asdict(self.history_), crc_term_fraction=frac,
                                           crc_term_steps=c["ran"], crc_steps=c["steps"],
                                           crc_topup_steps=c["topup_steps"], crc_topup_rows=c["topup_rows"])
        if c["steps"] and c["ran"] < c["steps"]:
            warnings.warn(
                f"crc: the CRC term ran in {c['ran']} of {c['steps']} training steps ({frac:.1%}); the other "
                f"steps trained on cross-entropy only, like the mlp head. At crc_alpha={float(h['crc_alpha']):g} a "
                f"calibration set needs >= {self.min_cal_positives()} positives; the short ones held "
                f"{c['short_min']}-{c['short_max']} (crc_split={h['crc_split']!r}, crc_topup={bool(h['crc_topup'])}, "
                f"batch_size={int(h['batch_size'])}). Turn crc_topup on, use crc_split='stratified', or raise "
                f"batch_size / crc_alpha", UserWarning, stacklevel=3)

    def extra_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"controlled_risk": "miss_rate", "crc_alpha": float(self.hparams["crc_alpha"]),
                               "crc_objective": str(self.hparams["crc_objective"])}
        if isinstance(self.history_, CRCTrainResult):
            out["crc_term_fraction"] = self.history_.crc_term_fraction
        return out

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> "CRCHead":
        """Rebuild a fitted head; heads saved before ``crc_objective`` existed keep the objective,
        split and (no) top-up they were trained with."""
        hparams = dict(meta["hparams"])
        if "crc_objective" not in hparams:
            hparams.update(crc_objective="risk_and_efficiency", crc_split="halves", crc_topup=False)
        training = dict(meta.get("training") or {})
        crc_hist = {k: training.pop(k) for k in CRC_HISTORY_KEYS if k in training}
        with warnings.catch_warnings():  # a saved head's settings were already checked (and warned) at fit
            warnings.simplefilter("ignore")
            head = super().from_saved({**meta, "hparams": hparams, "training": training or None}, tensors)
        if head.history_ is not None and crc_hist:
            head.history_ = CRCTrainResult(**asdict(head.history_), **crc_hist)
        return head  # type: ignore[return-value]

