"""The ``reward`` exit policy: abstain (-1) where that pays under the subnet's reward.

A miner's deferred image answers -1: that round pays 0, but the answer stays out of the MCC and
accuracy windows (``policies.reward``). Abstaining on the least certain images can raise the
long-run reward. This policy chooses the abstain region, two thresholds on the confidence ``s``
(the base conventions: answer as 1 when the label is 1 and ``s >= t1``, as 0 when the label is 0
and ``s >= t0``; for ``score="p"`` a band ``1 - t0 < p < t1`` around 0.5), that maximises the
simulated expected reward per round on val_calib at the deployment prior (``prior``, else the
validators' 0.5). The candidates abstain on 0 to ``max_abstain`` of each predicted class (``grid``
even steps of the share, thresholds at val_calib's quantiles of ``s``), searched by coordinate
ascent from "answer all" (best t1 for the current t0, then best t0, until neither moves: about
3 x ``grid`` pairs scored instead of ``grid`` squared). Every pair is scored on the same random
challenge streams (common random numbers), and answering everything is a candidate
that wins ties (and any gain of at most ``min_gain``), so the choice is never worse than
always-answering on val_calib's simulation. A band searched on a few hundred rows can fit their
few errors (on TraCon's 102 val_calib rows the in-sample gain was +0.12 and the test gain -0.04),
so the band is kept only when it also gains out of sample: ``folds``-fold cross-validation
(label-stratified) chooses a band on the other folds and scores it on the held-out one; a mean
gain of at most ``min_gain`` answers everything. The summary reports both rewards, the gain, the
cross-validated gain and a bootstrap interval of the gain (val_calib rows resampled per class; the
band stays fixed, so that interval is in-sample and optimistic).

``base``: a certified policy (with ``base_params``) runs first on the same scores and scoring
parameters; the images it exits are always answered and the reward rule decides the rest. The
base's calibrators and prior shift give ``p`` and ``s`` for every image.

This is an optimiser, not a certificate: ``guarantee`` is "none" and ``certifies()`` is empty; the
base's certificate covers only the images the base exits, not the answers the reward rule adds.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stage1._core.errors import ConfigError, DataError
from stage1._core.io import json_safe
from stage1._core.params import Param, Params
from stage1.policies import POLICIES
from stage1.policies.base import BASE_PARAMS, ExitPolicy, check_labels, check_scores
from stage1.policies.decision import AMBIGUOUS, CONFIDENT_0, CONFIDENT_1, SET_01, UNCERTAIN, Decision
from stage1.policies.reward import HISTORY, VALIDATOR_PRIOR, orderings, simulate_rewards

NAME = "reward"


def _base_names() -> list[str]:
    return [n for n in POLICIES.names() if n != NAME]


@POLICIES.register(NAME)
class RewardPolicy(ExitPolicy):
    """Answer p or abstain (-1), whichever maximises the simulated subnet reward on val_calib."""

    name = NAME
    guarantee = "none"
    PARAMS = Params(
        Param("base", str, None, "A policy run first (e.g. ltt): its exits are always answered, the reward rule "
              "decides the rest (None: the reward rule alone).", choices=_base_names, optional=True),
        Param("base_params", dict, {}, "The base policy's own parameters, e.g. {\"alpha\": 0.02, \"eps\": 0.02} "
              "(the scoring parameters are this policy's and pass down).", optional=True),
        Param("max_abstain", float, 0.5, "Largest share of each predicted class of val_calib the band may abstain on.",
              low=0.0, high=1.0, high_open=True),
        Param("grid", int, 11, "Candidate abstain shares per predicted class (even steps from 0 to max_abstain).",
              low=2),
        Param("n_orderings", int, 100, "Random challenge streams each candidate is scored on.", low=1),
        Param("n_rounds", int, 400, "Scored rounds per stream (after a 100-round burn-in that fills the windows).",
              low=1),
        Param("n_boot", int, 30, "Bootstrap resamples of val_calib for the gain's interval (0: none).", low=0),
        Param("folds", int, 5, "Cross-validation folds of val_calib: the band is kept only when a band chosen on "
              "the other folds gains on the held-out fold, on average (0: trust the in-sample choice).", low=0),
        Param("min_gain", float, 0.0, "Abstain only when the band beats always-answering by more than this "
              "expected reward per round on val_calib.", low=0.0),
    ) + BASE_PARAMS

    def _check(self) -> None:
        if self.folds == 1:
            raise ConfigError("policy 'reward': folds=1: expected 0 (no cross-validation) or at least 2")
        self.base_params = dict(self.base_params or {})
        if self.base is None:
            if self.base_params:
                raise ConfigError("base_params needs base (the policy they belong to)")
            return
        shared = sorted(set(self.base_params) & set(BASE_PARAMS.names()))
        if shared:
            raise ConfigError(f"base_params {shared}: scoring parameters are the reward policy's and pass down to "
                              f"the base; set them on the reward policy")
        self._make_base()  # validates base_params against the base's declaration now

    def _reset(self) -> None:
        super()._reset()
        self.base_policy: ExitPolicy | None = None

    def _make_base(self) -> ExitPolicy:
        assert self.base is not None
        decl = POLICIES.get(self.base).PARAMS
        shared = {k: getattr(self, k) for k in BASE_PARAMS.names() if k in decl}
        try:
            return POLICIES.create(self.base, **shared, **self.base_params)
        except ConfigError as exc:
            raise ConfigError(f"policy 'reward': base {self.base!r}: {exc}") from None

    def sim_prior(self) -> float:
        """The positive rate the challenge streams are drawn at: ``prior``, else the validators' 0.5."""
        return VALIDATOR_PRIOR if self.prior is None else float(self.prior)

    # fit -------------------------------------------------------------------------------------
    def fit(self, scores: dict[str, np.ndarray], y: np.ndarray) -> "RewardPolicy":
        """Fit the scoring (or the base policy) on val_calib, then choose the abstain band there."""
        if self.base is None:
            p, s, yy, _, _, _ = self._fit_calibrators(scores, y)
            forced = np.zeros(len(yy), dtype=bool)
        else:
            logits, _ = check_scores(scores, self.score == "select")
            yy = check_labels(y, len(logits))
            self._reset()
            base = self._make_base().fit(scores, yy)
            self.base_policy = base
            self.cal, self.select_cal, self.calib_prior = base.cal, base.select_cal, base.calib_prior
            bd = base.decide(scores)
            p, s, forced = bd.p_roadwork, bd.score, bd.exit
        if yy.min() == yy.max():  # nothing to simulate at the validators' mix: keep answering everything
            self.t0 = self.t1 = -np.inf
            self.reason = (f"reward: val_calib holds only y={int(yy[0])} rows, so the reward cannot be simulated at "
                           "a mix of both classes; answers every image; no risk guarantee")
            self.summary = {"n_calib": int(len(yy)), "prior": self.sim_prior(), "abstain_rate": 0.0,
                            "answer_rate": 1.0}
        else:
            self._search(p, s, (p >= 0.5).astype(np.int64), yy, forced)
        self.fitted = True
        return self

    def _candidates(self, s: np.ndarray, free: np.ndarray) -> np.ndarray:
        """Thresholds for one predicted class: -inf (answer all), then val_calib quantiles of ``s`` that
        abstain on about 1/(grid-1) .. max_abstain of its free rows."""
        v = np.sort(s[free])
        if len(v) == 0:
            return np.array([-np.inf])
        shares = np.linspace(0.0, self.max_abstain, self.grid)[1:]
        k = np.minimum(np.ceil(shares * len(v) - 1e-9).astype(np.int64), len(v) - 1)
        return np.unique(np.r_[-np.inf, v[k]])

    def _best_band(self, p: np.ndarray, s: np.ndarray, yhat: np.ndarray, y: np.ndarray, forced: np.ndarray,
                   rows: np.ndarray, seed: int) -> dict[str, Any]:
        """The best (t0, t1) on ``rows`` by coordinate ascent over the candidate grid, every pair scored on the
        same streams drawn from those rows; ties (and gains of at most ``min_gain``) go to answering more."""
        idx = rows[orderings(y[rows], self.sim_prior(), HISTORY + self.n_rounds, self.n_orderings, seed)]
        pred, lab = (np.round(p) == 1)[idx], y[idx]
        c0 = self._candidates(s[rows], ((yhat == 0) & ~forced)[rows])
        c1 = self._candidates(s[rows], ((yhat == 1) & ~forced)[rows])
        memo: dict[tuple[int, int], tuple[float, float]] = {}

        def score(i: int, j: int) -> tuple[float, float]:
            """(expected reward, -abstain share) of candidate pair (c0[i], c1[j]); larger is better."""
            if (i, j) not in memo:
                answered = forced | (s >= np.where(yhat == 1, c1[j], c0[i]))
                memo[i, j] = (float(simulate_rewards(answered[idx], pred, lab)[:, HISTORY:].mean()),
                              -float(1.0 - answered[rows].mean()))
            return memo[i, j]

        # coordinate ascent over the grid from "answer all" (index 0, -inf, on both sides): the best t1 for
        # this t0, then the best t0 for that t1, until neither moves (each step can only improve)
        i = j = 0
        for _ in range(2 * self.grid):
            j_new = max(range(len(c1)), key=lambda jj: (score(i, jj), -jj))
            i_new = max(range(len(c0)), key=lambda ii: (score(ii, j_new), -ii))
            if (i_new, j_new) == (i, j):
                break
            i, j = i_new, j_new
        always = score(0, 0)[0]
        best = (score(i, j)[0], -score(i, j)[1], float(c0[i]), float(c1[j]))
        mean, abstain, t0, t1 = best
        if mean - always <= self.min_gain:
            mean, abstain, t0, t1 = always, 0.0, -np.inf, -np.inf
        return {"t0": t0, "t1": t1, "mean": mean, "always": always, "abstain": abstain,
                "n_candidates": int(len(c0) * len(c1)), "n_scored": len(memo)}

    def _gain_on(self, p: np.ndarray, s: np.ndarray, yhat: np.ndarray, y: np.ndarray, forced: np.ndarray,
                 rows: np.ndarray, t0: float, t1: float, n_orderings: int, seed: int) -> float:
        """Expected reward of the band (t0, t1) minus always-answering, on streams drawn from ``rows``."""
        idx = rows[orderings(y[rows], self.sim_prior(), HISTORY + self.n_rounds, n_orderings, seed)]
        pred, lab = (np.round(p) == 1)[idx], y[idx]
        answered = forced | (s >= np.where(yhat == 1, t1, t0))
        ones = np.ones(idx.shape, dtype=bool)
        return float(simulate_rewards(answered[idx], pred, lab)[:, HISTORY:].mean()
                     - simulate_rewards(ones, pred, lab)[:, HISTORY:].mean())

    def _cv_gain(self, p: np.ndarray, s: np.ndarray, yhat: np.ndarray, y: np.ndarray,
                 forced: np.ndarray) -> float | None:
        """Cross-validated gain: per fold (label-stratified), the band chosen on the other folds, scored on
        this fold against always-answering; the mean over folds (None with ``folds`` = 0 or too few rows)."""
        if self.folds == 0 or min(int(y.sum()), int(len(y) - y.sum())) < self.folds:
            return None
        rng = np.random.default_rng(self.seed + 7)
        fold = np.empty(len(y), dtype=np.int64)
        for c in (0, 1):
            idx = rng.permutation(np.flatnonzero(y == c))
            fold[idx] = np.arange(len(idx)) % self.folds
        gains = []
        for k in range(self.folds):
            train, held = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            band = self._best_band(p, s, yhat, y, forced, train, self.seed + 11 + k)
            if band["t0"] == band["t1"] == -np.inf:
                gains.append(0.0)
                continue
            gains.append(self._gain_on(p, s, yhat, y, forced, held, band["t0"], band["t1"], self.n_orderings,
                                       self.seed + 31 + k))
        return float(np.mean(gains))

    def _search(self, p: np.ndarray, s: np.ndarray, yhat: np.ndarray, y: np.ndarray, forced: np.ndarray) -> None:
        """Choose the band on all of val_calib, kept only when its cross-validated gain exceeds ``min_gain``."""
        prior = self.sim_prior()
        band = self._best_band(p, s, yhat, y, forced, np.arange(len(y)), self.seed)
        answers_all = band["t0"] == band["t1"] == -np.inf
        cv = None if answers_all else self._cv_gain(p, s, yhat, y, forced)
        in_sample = band
        if cv is not None and cv <= self.min_gain:
            band = {**band, "t0": -np.inf, "t1": -np.inf, "mean": band["always"], "abstain": 0.0}
        t0, t1, mean, always, abstain = band["t0"], band["t1"], band["mean"], band["always"], band["abstain"]
        self.t0, self.t1 = t0, t1
        lo, hi = self._gain_interval(p, s, yhat, y, forced, prior)
        sides = [f"label {c} with s < {t:.4g}" for c, t in ((0, t0), (1, t1)) if np.isfinite(t)]
        band_text = (f"abstain (-1) on {' or '.join(sides)} ({abstain:.1%} of val_calib)" if sides
                     else "answer every image")
        if cv is not None and cv <= self.min_gain:
            band_text += (f" (the best band gained {in_sample['mean'] - always:+.4f} in-sample but "
                          f"{cv:+.4f} cross-validated over {self.folds} folds)")
        base = "" if self.base_policy is None else (
            f"; the base {self.base}'s exits ({forced.mean():.1%} of val_calib) are always answered")
        cv_text = "" if cv is None else f", cross-validated gain {cv:+.4f}"
        self.reason = (
            f"reward: {band_text}{base}; simulated expected reward per round on val_calib at prior {prior:g}: "
            f"{always:.4f} answering everything, {mean:.4f} with this rule (gain {mean - always:+.4f}, bootstrap 90% "
            f"interval [{lo:+.4f}, {hi:+.4f}], in-sample{cv_text}); an optimiser of the subnet reward, no risk "
            "guarantee")
        self.summary = {
            "n_calib": int(len(y)), "prior": prior, "n_candidates": band["n_candidates"],
            "reward_always": always, "reward_policy": mean, "gain": mean - always, "gain_lo": lo, "gain_hi": hi,
            "gain_cv": cv, "gain_in_sample_best": in_sample["mean"] - always,
            "abstain_rate": abstain, "answer_rate": 1.0 - abstain,
            "n_orderings": self.n_orderings, "n_rounds": self.n_rounds, "n_boot": self.n_boot, "folds": self.folds,
        }
        if self.base_policy is not None:
            bp = self.base_policy
            self.summary.update(base=self.base, base_certified=bool(bp.certified), base_reason=bp.reason,
                                base_exit_rate=float(forced.mean()))

    def _gain_interval(self, p: np.ndarray, s: np.ndarray, yhat: np.ndarray, y: np.ndarray, forced: np.ndarray,
                       prior: float) -> tuple[float, float]:
        """5% and 95% quantiles of the gain over val_calib resampled per class (the thresholds fixed)."""
        answered = forced | (s >= np.where(yhat == 1, self.t1, self.t0))
        if self.n_boot == 0 or answered.all():
            return 0.0, 0.0
        rng = np.random.default_rng(self.seed + 1)
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        gains = [self._gain_on(p, s, yhat, y, forced, np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))],
                               self.t0, self.t1, max(1, self.n_orderings // 4), self.seed + 2 + b)
                 for b in range(self.n_boot)]
        return float(np.quantile(gains, 0.05)), float(np.quantile(gains, 0.95))

    # decide ----------------------------------------------------------------------------------
    def decide(self, scores: dict[str, np.ndarray]) -> Decision:
        """Answer (exit) where the base exits or the band says so; every other image abstains (defers)."""
        if self.base_policy is None:
            return super().decide(scores)
        if not self.fitted:
            raise RuntimeError(f"policy {self.name!r} is not fitted; call fit(scores, y) on val_calib first")
        bd = self.base_policy.decide(scores)
        p, s = bd.p_roadwork, bd.score
        yhat = (p >= 0.5).astype(np.int8)
        label = np.where(bd.exit, bd.label, yhat).astype(np.int8)
        ex = bd.exit | (s >= np.where(yhat == 1, self.t1, self.t0))
        pred_set = np.where(ex, label, SET_01).astype(np.int8)
        defer_level = np.where(np.abs(p - 0.5) <= self.ambiguous_band, AMBIGUOUS, UNCERTAIN)
        level = np.where(ex, np.where(label == 1, CONFIDENT_1, CONFIDENT_0), defer_level)
        return Decision(exit=ex, label=label, pred_set=pred_set, p_roadwork=p, level=level.astype("<U11"), score=s)

    # JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.base_policy is not None:
            d["state"]["base"] = json_safe(self.base_policy.to_dict())
        return d

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if self.base is None:
            return
        from stage1.policies import policy_from_dict

        given = state.get("base")
        if not isinstance(given, dict) or given.get("policy") != self.base:
            raise DataError(f"policy JSON: the reward policy's state.base must hold the fitted {self.base!r} policy; "
                            "re-run calibrate to regenerate policy.json")
        self.base_policy = policy_from_dict(given)


__all__ = ["RewardPolicy"]
