"""Shared machinery of every exit policy: scoring, the two-threshold exit rule, JSON state.

Scoring (the same for all policies): a calibrator (by name, optional) maps the logits to
``p = P(y=1)``; the predicted label is ``p >= 0.5``; the confidence ``s`` is ``max(p, 1-p)`` for
``score="p"`` or the head's selector for ``score="select"`` (optionally calibrated by Platt /
isotonic into P(prediction correct)). A policy learns two thresholds: exit as 1 when the label is 1
and ``s >= t1``, exit as 0 when the label is 0 and ``s >= t0`` (for ``score="p"`` this is ``p >= t1``
or ``p <= 1 - t0``). Deferred rows are AMBIGUOUS when ``|p - 0.5| <= ambiguous_band`` (the model
cannot tell the classes apart: flag for review) and UNCERTAIN otherwise.

Prior shift (``prior``, default None): the calibrated p holds at val_calib's positive rate pi_c; with a
deployment rate pi it is Bayes-corrected on the odds, odds' = odds * (pi / (1 - pi)) / (pi_c / (1 - pi_c))
(``calibrators.shift_prior``), before anything is thresholded. pi_c is recorded in the state
(``calib_prior``), so policy.json, the bundle and ``predict`` apply the same shift; the fit summary adds
the certification rows' metrics re-weighted to pi (``calib_at_prior``). A certificate still holds at
val_calib's own mix: the shift moves the thresholds, not the distribution the guarantee is about.

Certifying policies (crc, ltt) fit calibrators on a stratified ``calib_fraction`` of val_calib and
certify thresholds on the rest, so the certificate does not reuse the calibrator's data; when they
cannot certify anything they record why and ``decide`` defers every row.

Parameters are declared once per policy (``PARAMS``: the policy's own, then ``BASE_PARAMS``); the
constructor validates against it, ``params()`` reads it, and the CLI and sweep spaces derive from it.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from scipy.special import softmax

from stage1._core.errors import ConfigError, DataError
from stage1._core.io import json_safe
from stage1._core.params import Param, Params
from stage1.policies.calibrators import CALIBRATORS, Calibrator, calibrator_from_dict, shift_prior
from stage1.policies.decision import AMBIGUOUS, CONFIDENT_0, CONFIDENT_1, SET_01, UNCERTAIN, Decision

SCHEMA_VERSION = 1
SCORES = ("p", "select")


#: calibrators that read a selector score in [0, 1] as such (the others read 1-D input as a logit).
SELECT_CALIBRATORS: tuple[str, ...] = ("platt", "isotonic")


def _calibrator_names() -> list[str]:
    return CALIBRATORS.names()


#: parameters every policy has (scoring, calibration, the val_calib split, the ambiguous band).
BASE_PARAMS = Params(
    Param("calibrator", str, "temperature", "Calibrator of the logits into p = P(y=1) (None: plain softmax).",
          choices=_calibrator_names, optional=True),
    Param("calibrator_params", dict, {}, "Keyword arguments of the calibrator, e.g. {\"lam\": 1.0}.", optional=True),
    Param("score", str, "p", "What is thresholded: 'p' (calibrated max probability) or 'select' (the head's selector).",
          choices=SCORES),
    Param("select_calibrator", str, None, "With score='select': calibrate the selector score in [0, 1] into "
          "P(correct); only platt (on its logit) and isotonic read such a score.",
          choices=SELECT_CALIBRATORS, optional=True),
    Param("calib_fraction", float, None, "Share of val_calib that fits the calibrators, the rest certifies "
          "(None: 0.3 for certifying policies with a fitted calibrator, else 0).", low=0.0, high=1.0, high_open=True,
          optional=True),
    Param("seed", int, 0, "Seed of the stratified calibrator / certification split of val_calib.", low=0),
    Param("ambiguous_band", float, 0.1, "Deferred rows with |p - 0.5| <= band are AMBIGUOUS (flag for review).",
          low=0.0, high=0.5),
    Param("prior", float, None, "Deployment positive rate (the subnet: 0.5): Bayes-correct the calibrated p from "
          "val_calib's positive rate to it, on the odds (None: no shift).", low=0.0, high=1.0, low_open=True,
          high_open=True, optional=True),
)


def _enc_threshold(t: float) -> float | str:
    return float(t) if math.isfinite(t) else ("inf" if t > 0 else "-inf")


def _dec_threshold(v: Any, key: str = "threshold") -> float:
    """A threshold read from policy.json: a finite number, or "inf" / "-inf" (never NaN, never a
    bool or other text: those would make every exit decision and metric meaningless)."""
    if isinstance(v, str):
        if v not in ("inf", "-inf"):
            raise DataError(f"policy JSON: state.{key}={v!r}: expected a number, 'inf' or '-inf'; {_REFIT}")
        return math.inf if v == "inf" else -math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise DataError(f"policy JSON: state.{key}={v!r}: expected a number, 'inf' or '-inf'; {_REFIT}")
    return float(v)


_REFIT = "re-run calibrate to regenerate policy.json"


def check_scores(scores: dict[str, np.ndarray], need_select: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Validated (logits [n, 2] float64, select [n] or None) from a scores dict."""
    if not isinstance(scores, dict) or "logits" not in scores:
        raise DataError("scores must be a dict with 'logits' [n, 2] (and 'select' [n] for score='select')")
    logits = np.asarray(scores["logits"], dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise DataError(f"scores['logits'] must have shape [n, 2], got {logits.shape}")
    if not np.all(np.isfinite(logits)):
        raise DataError("scores['logits'] contains NaN or infinite values")
    select = None
    if need_select:
        if scores.get("select") is None:
            raise DataError("score='select' needs scores['select'] [n]; this head gave none (use score='p')")
        select = np.asarray(scores["select"], dtype=np.float64)
        if select.shape != (len(logits),):
            raise DataError(f"scores['select'] must have shape ({len(logits)},), got {select.shape}")
        if not np.all(np.isfinite(select)):
            raise DataError("scores['select'] contains NaN or infinite values")
    return logits, select


def check_labels(y: np.ndarray, n: int) -> np.ndarray:
    """0/1 int64 labels of length n, or a clear error."""
    yy = np.asarray(y)
    if yy.shape != (n,):
        raise DataError(f"y must have shape ({n},) to match the scores, got {yy.shape}")
    if not np.isin(yy, (0, 1)).all():
        raise DataError("y must hold 0/1 labels (unlabelled rows, -1, cannot calibrate a policy)")
    return yy.astype(np.int64)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: (``fraction`` of each class, the rest), sorted indices."""
    rng = np.random.default_rng(seed)
    first, rest = [], []
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(round(fraction * len(idx)))
        first.append(idx[:cut])
        rest.append(idx[cut:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(rest))


class ExitPolicy:
    """Base of all policies; subclasses set ``name``, ``guarantee``, ``PARAMS`` and ``_fit_thresholds``.

    ``__init__(**params)`` validates the given parameters against ``PARAMS`` (unknown names, types,
    ranges: a ConfigError naming the parameter), stores each as an attribute and then runs
    ``_check`` for rules that involve several parameters. ``calibrator="default"`` means the
    declared default.
    """

    name = "base"
    guarantee = "none"  # "none" | "crc" | "ltt" | "scrc"
    #: the declared parameters: the policy's own first, then BASE_PARAMS.
    PARAMS: ClassVar[Params] = BASE_PARAMS

    def __init__(self, **params: Any) -> None:
        decl = type(self).PARAMS
        if params.get("calibrator") == "default":
            params = {**params, "calibrator": decl["calibrator"].default}
        values = decl.resolve(params, f"policy {self.name!r}")
        values["calibrator_params"] = dict(values["calibrator_params"] or {})
        for key, value in values.items():
            setattr(self, key, value)
        if self.select_calibrator is not None and self.score != "select":
            raise ConfigError("select_calibrator only applies with score='select'")
        if self.calibrator is not None:
            try:
                CALIBRATORS.create(self.calibrator, **self.calibrator_params)  # validate params now
            except ConfigError as exc:
                raise ConfigError(
                    f"calibrator_params {sorted(self.calibrator_params)} are not accepted by {self.calibrator!r}: {exc}"
                ) from None
        self._check()
        self._reset()

    def _check(self) -> None:
        """Rules involving several parameters (each one alone is already checked); ConfigError."""

    def _reset(self) -> None:
        self.cal: Calibrator | None = None
        self.select_cal: Calibrator | None = None
        #: val_calib's positive rate, the prior the calibrated p holds at (set by fit when ``prior`` is).
        self.calib_prior: float | None = None
        self.t0 = math.inf
        self.t1 = math.inf
        self.certified = False
        self.reason = "not fitted"
        self.n_needed: int | None = None
        self.summary: dict[str, Any] = {}
        self.fitted = False

    # parameters ----------------------------------------------------------------------------
    def _own_params(self) -> dict[str, Any]:
        """Parameters a subclass keeps outside ``PARAMS`` (none for the declared policies)."""
        return {}

    def params(self) -> dict[str, Any]:
        """All constructor parameters; ``POLICIES.create(name, **params())`` rebuilds the policy."""
        return {**self._own_params(), **{name: getattr(self, name) for name in type(self).PARAMS.names()}}

    def certifies(self) -> dict[str, str]:
        """{risk name: "pac" | "expectation"}: the risks this policy's certificate bounds, by its
        parameters. Empty for rules that give no guarantee. A sweep or report may only call a
        policy certified *for* a risk listed here (crc bounds the expected miss rate, not FNR_exit)."""
        return {}

    # scoring -------------------------------------------------------------------------------
    def _p(self, logits: np.ndarray) -> np.ndarray:
        p = self.cal.p1(logits) if self.cal is not None else softmax(logits, axis=1)[:, 1]
        if self.prior is not None and self.calib_prior is not None:
            p = shift_prior(p, self.calib_prior, self.prior)
        return p

    def _s(self, p: np.ndarray, select: np.ndarray | None) -> np.ndarray:
        if self.score == "p":
            return np.maximum(p, 1.0 - p)
        assert select is not None
        return self.select_cal.p1(select) if self.select_cal is not None else select

    def _fraction(self) -> float:
        has_fit = (self.calibrator not in (None, "identity")) or self.select_calibrator is not None
        if not has_fit:
            return 0.0
        if self.calib_fraction is not None:
            return self.calib_fraction
        return 0.3 if self.guarantee != "none" else 0.0

    # fit / decide --------------------------------------------------------------------------
    def _fit_calibrators(self, scores: dict[str, np.ndarray], y: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """Check the inputs, split val_calib into the calibrator part and the certify part (label
        stratified, ``calib_fraction``), fit the calibrators on the first; (p, s, y, fit rows,
        certify rows, fraction). Every policy's ``fit`` starts here."""
        logits, select = check_scores(scores, self.score == "select")
        yy = check_labels(y, len(logits))
        if len(yy) == 0:
            raise DataError("cannot fit a policy on zero calibration rows")
        self._reset()
        if self.prior is not None:
            self.calib_prior = float(yy.mean())
            if not 0.0 < self.calib_prior < 1.0:
                raise DataError(f"prior={self.prior:g} needs both classes in val_calib (its positive rate is "
                                f"{self.calib_prior:g}, the rate the shift starts from); label more images")
        frac = self._fraction()
        if frac > 0:
            fit_idx, cert_idx = stratified_split(yy, frac, self.seed)
            if len(fit_idx) == 0 or len(cert_idx) == 0:
                if self.guarantee == "none":
                    raise DataError(f"calib_fraction={frac} leaves an empty part of {len(yy)} rows")
                # too few rows to split: fit the calibrators on all of them, certify nothing (see fit)
                fit_idx, cert_idx = np.arange(len(yy)), np.zeros(0, dtype=np.int64)
        else:
            fit_idx = cert_idx = np.arange(len(yy))
        if self.calibrator is not None:
            self.cal = CALIBRATORS.create(self.calibrator, **self.calibrator_params)
            self.cal.fit(logits[fit_idx], yy[fit_idx])
        p = self._p(logits)
        if self.select_calibrator is not None:
            correct = ((p >= 0.5).astype(np.int64) == yy).astype(np.int64)
            self.select_cal = CALIBRATORS.create(self.select_calibrator).fit(select[fit_idx], correct[fit_idx])
        return p, self._s(p, select), yy, fit_idx, cert_idx, frac

    def min_positives(self) -> int | None:
        """Calibration positives (y=1) this policy needs to certify anything even when it observes no
        error at all (a lower bound on ``n_needed``); None for policies that certify nothing."""
        return None

    def _too_few(self, yy: np.ndarray, frac: float) -> None:
        """The not-certified state of a val_calib too small to split into a calibrator part and a
        certification part: certified false, every row deferred, and the size needed (not an error:
        the contract of calibrate is exit 0 and a report of what is missing)."""
        self.n_needed = self.min_positives()
        need = (f"at least {self.n_needed} calibration positives (y=1) are needed in the certification part "
                f"(the {1 - frac:g} of val_calib that does not fit the calibrator)"
                if self.n_needed is not None else "more rows are needed")
        self.reason = (f"not certifiable: val_calib has {len(yy)} rows ({int(yy.sum())} positives), too few to "
                       f"split calib_fraction={frac:g} into a calibrator part and a certification part; {need}; "
                       "every image is deferred")
        self.summary = {"n_calib": int(len(yy)), "n_fit_calibrator": int(len(yy)), "n_certify": 0,
                        "n_pos_certify": 0}
        self.fitted = True

    def fit(self, scores: dict[str, np.ndarray], y: np.ndarray) -> "ExitPolicy":
        """Fit calibrators and thresholds on val_calib scores and labels; returns self."""
        p, s, yy, fit_idx, cert_idx, frac = self._fit_calibrators(scores, y)
        if len(cert_idx) == 0:
            self._too_few(yy, frac)
            return self
        yhat = (p >= 0.5).astype(np.int64)
        self._fit_thresholds(s[cert_idx], yhat[cert_idx], yy[cert_idx])
        ex = s[cert_idx] >= np.where(yhat[cert_idx] == 1, self.t1, self.t0)
        from stage1.policies.metrics import selective_risks

        self.summary = {
            **self.summary,
            "n_calib": int(len(yy)),
            "n_fit_calibrator": int(len(fit_idx)) if frac > 0 else int(len(yy)),
            "n_certify": int(len(cert_idx)),
            "n_pos_certify": int(yy[cert_idx].sum()),
            **{f"calib_{k}": v for k, v in selective_risks(yy[cert_idx], yhat[cert_idx], ex).items()},
            **self._at_prior(yy[cert_idx], yhat[cert_idx], ex),
        }
        self.fitted = True
        return self

    def _at_prior(self, y: np.ndarray, yhat: np.ndarray, ex: np.ndarray) -> dict[str, Any]:
        """With ``prior``: the certification rows' selective metrics re-weighted to it (summary key
        ``calib_at_prior``; ``policies.reward.metrics_at_prior``); nothing without a prior."""
        if self.prior is None or y.min() == y.max():
            return {}
        from stage1.policies.reward import metrics_at_prior

        return {"calib_at_prior": metrics_at_prior(y, yhat, ex, self.prior)}

    def _fit_thresholds(self, s: np.ndarray, yhat: np.ndarray, y: np.ndarray) -> None:
        """Set t0, t1, certified, reason, n_needed (and summary) from certification rows."""
        raise NotImplementedError

    def decide(self, scores: dict[str, np.ndarray]) -> Decision:
        """Exit / defer, label, prediction set, calibrated p and level for every row."""
        if not self.fitted:
            raise RuntimeError(f"policy {self.name!r} is not fitted; call fit(scores, y) on val_calib first")
        logits, select = check_scores(scores, self.score == "select")
        p = self._p(logits)
        yhat = (p >= 0.5).astype(np.int8)
        s = self._s(p, select)
        ex = s >= np.where(yhat == 1, self.t1, self.t0)
        if self.guarantee != "none" and not self.certified:
            ex = np.zeros(len(p), dtype=bool)
        pred_set = np.where(ex, yhat, SET_01).astype(np.int8)
        defer_level = np.where(np.abs(p - 0.5) <= self.ambiguous_band, AMBIGUOUS, UNCERTAIN)
        level = np.where(ex, np.where(yhat == 1, CONFIDENT_1, CONFIDENT_0), defer_level)
        return Decision(exit=ex, label=yhat, pred_set=pred_set, p_roadwork=p, level=level.astype("<U11"), score=s)

    # JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON dict (policy.json); ``policy_from_dict`` rebuilds identical decisions."""
        if not self.fitted:
            raise RuntimeError(f"policy {self.name!r} is not fitted; nothing to save")
        return {
            "schema_version": SCHEMA_VERSION,
            "policy": self.name,
            "guarantee": self.guarantee,
            "bounds": self.certifies(),
            "params": json_safe(self.params()),
            "state": {
                "calibrator": self.cal.to_dict() if self.cal is not None else None,
                "select_calibrator": self.select_cal.to_dict() if self.select_cal is not None else None,
                "t0": _enc_threshold(self.t0),
                "t1": _enc_threshold(self.t1),
                "certified": bool(self.certified),
                "reason": self.reason,
                "n_needed": self.n_needed,
                "summary": json_safe(self.summary),
                **({"calib_prior": self.calib_prior} if self.prior is not None else {}),
            },
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the fitted state written by ``to_dict()['state']``, validating every field here, at
        load (a hand-edited policy.json must not yield meaningless decisions): the calibrators'
        names match the parameters and their states are checked (``calibrator_from_dict``); t0 / t1
        are numbers or +-inf, never NaN; certified is a JSON boolean; reason a string; n_needed a
        non-negative integer or null; summary an object. A DataError names the field and the fix."""
        if not isinstance(state, dict):
            raise DataError(f"policy JSON: state must be an object; {_REFIT}")
        self._reset()
        missing = [k for k in ("t0", "t1", "certified", "reason") if k not in state]
        if missing:
            raise DataError(f"policy JSON: state is missing {', '.join(missing)}; {_REFIT}")
        cal, scal = state.get("calibrator"), state.get("select_calibrator")
        for key, given, declared in (("calibrator", cal, self.calibrator),
                                     ("select_calibrator", scal, self.select_calibrator)):
            if (given is None) != (declared is None):
                raise DataError(f"policy JSON: {key} state does not match the {key} parameter; {_REFIT}")
            if given is not None and (not isinstance(given, dict) or given.get("name") != declared):
                name = given.get("name") if isinstance(given, dict) else given
                raise DataError(f"policy JSON: state.{key} is {name!r} but the parameter says {declared!r}; {_REFIT}")
        self.cal = calibrator_from_dict(cal) if cal is not None else None
        self.select_cal = calibrator_from_dict(scal) if scal is not None else None
        self.t0 = _dec_threshold(state["t0"], "t0")
        self.t1 = _dec_threshold(state["t1"], "t1")
        certified = state["certified"]
        if not isinstance(certified, bool):
            raise DataError(f"policy JSON: state.certified={certified!r}: expected true or false; {_REFIT}")
        if certified and self.guarantee == "none":
            raise DataError(f"policy JSON: state.certified is true but policy {self.name!r} certifies nothing; {_REFIT}")
        self.certified = certified
        if not isinstance(state["reason"], str):
            raise DataError(f"policy JSON: state.reason must be a string; {_REFIT}")
        self.reason = state["reason"]
        n_needed = state.get("n_needed")
        if n_needed is not None and (isinstance(n_needed, bool) or not isinstance(n_needed, int) or n_needed < 0):
            raise DataError(f"policy JSON: state.n_needed={n_needed!r}: expected an integer >= 0 or null; {_REFIT}")
        self.n_needed = n_needed
        summary = state.get("summary")
        if summary is not None and not isinstance(summary, dict):
            raise DataError(f"policy JSON: state.summary must be an object; {_REFIT}")
        self.summary = dict(summary or {})
        if self.prior is not None:
            cp = state.get("calib_prior")
            if isinstance(cp, bool) or not isinstance(cp, (int, float)) or not 0.0 < cp < 1.0:
                raise DataError(f"policy JSON: state.calib_prior={cp!r}: the prior parameter needs val_calib's "
                                f"positive rate in (0, 1); {_REFIT}")
            self.calib_prior = float(cp)
        self.fitted = True

    def __repr__(self) -> str:
        status = f"certified={self.certified}, t0={self.t0:.6g}, t1={self.t1:.6g}" if self.fitted else "unfitted"
        return f"<{type(self).__name__} {self.name!r} {status}>"
