"""The ``scrc`` exit policy: SCRC-I (selective conformal risk control, calibration-only) as an ExitPolicy.

The math lives in ``policies.scrc`` (pure functions); this module wires it into the policy contract.
Scoring is the base class's: a calibrator maps the logits to ``p = P(y=1)``; the selector ``s`` is
``max(p, 1-p)`` (``score="p"``) or the head's selector (``score="select"``, optionally calibrated).
``fit`` fits the calibrators on a stratified ``calib_fraction`` of val_calib (0.3 by default when a
calibrator is fitted) and runs SCRC-I on the rest:

* stage 1: select iff ``s > threshold1`` (the K-th largest certification selector score), so that
  P(selected) >= ``xi``;
* stage 2: on the selected certification rows, the set threshold ``lambda2`` with
  P(y not in C(x) | selected) <= ``alpha``, ``C(x) = {k : P(y=k | x) >= 1 - lambda2}``.

With both stages PAC (the default) the two statements hold together with probability >= 1 - delta
over the draw of the certification rows (``delta_split`` of delta on stage 1); see ``policies.scrc``.

``decide``: exit iff selected and the set is a singleton (the label is that class, CONFIDENT_0/1);
selected with the set {0, 1} is AMBIGUOUS (deferred, flagged: the certified set holds both classes);
not selected is UNCERTAIN (deferred). ``pred_set`` is the singleton on exits and {0, 1} on every
deferred row; an empty set (only with ``nonempty=False``) is deferred as AMBIGUOUS with {0, 1}, which
only lowers the miscoverage. ``t0 = t1`` is the selection threshold in the base convention (``s >= t``);
an exit also needs a singleton set. An uncertified policy (too few selected certification rows)
keeps full sets: it exits nothing, its selected rows are AMBIGUOUS, and ``n_needed`` is the number
of val_calib rows it would need.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from stage1._core.errors import DataError
from stage1._core.io import json_safe
from stage1._core.params import Param, Params
from stage1.policies import POLICIES
from stage1.policies.base import BASE_PARAMS, ExitPolicy, check_scores
from stage1.policies.decision import AMBIGUOUS, CONFIDENT_0, CONFIDENT_1, SET_1, SET_01, UNCERTAIN, Decision
from stage1.policies.scrc import RISK_BOUNDS, SELECTION_BOUNDS, SCRCState, fit_scrc, scrc_sets

#: the name of the risk the certificate bounds (``certifies``): the prediction set misses the label,
#: among the selected rows.
MISCOVERAGE_SELECTED = "miscoverage_selected"
#: the base parameters without ``ambiguous_band``: SCRC's AMBIGUOUS comes from the certified {0, 1} sets.
_BASE = Params(*(p for p in BASE_PARAMS if p.name != "ambiguous_band"))


@POLICIES.register("scrc")
class SCRCPolicy(ExitPolicy):
    """SCRC-I: P(selected) >= xi and P(y not in set | selected) <= alpha, together w.p. >= 1 - delta."""

    name = "scrc"
    guarantee = "scrc"
    PARAMS = Params(
        Param("xi", float, 0.7, "Selection coverage target: certify P(selected) >= xi.", low=0.0, high=1.0,
              low_open=True),
        Param("alpha", float, 0.1, "Bound on the miscoverage among selected images, P(y not in set | selected).",
              low=0.0, high=1.0, low_open=True, high_open=True),
        Param("delta", float, 0.1, "Allowed probability that a PAC bound fails (the PAC stages share it).",
              low=0.0, high=1.0, low_open=True, high_open=True),
        Param("delta_split", float, 0.5, "Share of delta spent on the selection stage when both stages are PAC.",
              low=0.0, high=1.0, low_open=True, high_open=True),
        Param("selection_bound", str, "binomial", "Stage-1 bound: binomial / hoeffding (PAC) or expectation.",
              choices=SELECTION_BOUNDS),
        Param("risk_bound", str, "binomial", "Stage-2 bound: binomial (Clopper-Pearson) / hoeffding (PAC) or "
              "crc (in expectation, split-conformal).", choices=RISK_BOUNDS),
        Param("nonempty", bool, True, "Never output an empty set (lambda2 >= 1/2); keeps the guarantee."),
    ) + _BASE

    def certifies(self) -> dict[str, str]:
        """The miscoverage of the prediction set among selected rows, P(y not in C(x) | selected) <= alpha:
        "pac" with a PAC stage 2 (binomial, hoeffding), "expectation" with crc. The selection coverage
        (P(selected) >= xi) is certified alongside; none of the exit risks of ``policies.risks`` is
        bounded (exits are the selected singletons: P(wrong | exit) <= alpha P(selected) / P(exit))."""
        return {MISCOVERAGE_SELECTED: "pac" if self.risk_bound in ("binomial", "hoeffding") else "expectation"}

    def _reset(self) -> None:
        super()._reset()
        self.state: SCRCState | None = None

    # fit -------------------------------------------------------------------------------------
    def fit(self, scores: dict[str, np.ndarray], y: np.ndarray) -> "SCRCPolicy":
        """Fit the calibrators on a part of val_calib and SCRC-I on the rest (the base conventions)."""
        p, s, yy, fit_idx, cert_idx, frac = self._fit_calibrators(scores, y)
        # too few rows to split (1-2 rows): no certification row, so SCRC-I on none certifies nothing
        # and says how many rows it needs (the contract: certified false and the size needed, not an error)
        st = fit_scrc(
            s[cert_idx], p[cert_idx], yy[cert_idx], xi=self.xi, alpha=self.alpha, delta=self.delta,
            delta_split=self.delta_split, selection_bound=self.selection_bound, risk_bound=self.risk_bound,
            nonempty=self.nonempty,
        )
        self._set_state(st)
        self.reason = st.reason
        if len(cert_idx) == 0:
            self.reason = (f"not certifiable: val_calib has {len(yy)} rows ({int(yy.sum())} positives), too few "
                           f"to split calib_fraction={frac:g} into a calibrator part and a certification part")
        if not st.certified:  # n_needed: val_calib rows (the calibrator's share included), not positives
            if frac > 0:
                self.n_needed = int(math.ceil(st.n_calib_needed / (1.0 - frac) - 1e-9))
                need = f"about {self.n_needed} rows ({frac:g} of them fit the calibrator)"
            else:
                self.n_needed = st.n_calib_needed
                need = f"at least {self.n_needed} rows"
            self.reason += f"; val_calib needs {need}; every image is deferred"
        from stage1.policies.metrics import selective_risks

        d = self._decide(p[cert_idx], s[cert_idx])
        sel = d.level != UNCERTAIN
        miss = sel & ~_covers(d.pred_set, yy[cert_idx])
        self.summary = {
            "scrc_threshold1": st.threshold1, "scrc_lambda1": st.lambda1, "scrc_lambda2": st.lambda2,
            "scrc_order_k": st.order_k, "n_selected": st.n_selected, "risk_bound": st.risk_bound,
            "coverage_bound": st.coverage_bound, "delta1": st.delta1, "delta2": st.delta2,
            "n_calib": int(len(yy)),
            "n_fit_calibrator": int(len(fit_idx)) if frac > 0 else int(len(yy)),
            "n_certify": int(len(cert_idx)),
            "n_pos_certify": int(yy[cert_idx].sum()),
            "calib_selection_coverage": float(sel.mean()) if sel.size else float("nan"),
            "calib_miscoverage_selected": float(miss.sum() / sel.sum()) if sel.any() else float("nan"),
            **{f"calib_{k}": v for k, v in selective_risks(yy[cert_idx], d.label.astype(np.int64), d.exit).items()},
        }
        self.fitted = True
        return self

    def _set_state(self, st: SCRCState) -> None:
        self.state = st
        self.certified = bool(st.certified)
        t = float(np.nextafter(st.threshold1, math.inf)) if math.isfinite(st.threshold1) else -math.inf
        self.t0 = self.t1 = t  # s >= t  <=>  s > threshold1 (selected); an exit also needs a singleton

    # decide ----------------------------------------------------------------------------------
    def _decide(self, p: np.ndarray, s: np.ndarray) -> Decision:
        assert self.state is not None
        ex, sets = scrc_sets(s, p, self.state)  # uncertified states have full sets and never exit
        selected = s > self.state.threshold1
        label = np.where(ex, sets, (p >= 0.5)).astype(np.int8)  # a singleton is always the argmax
        pred_set = np.where(ex, sets, SET_01).astype(np.int8)
        level = np.where(ex, np.where(sets == SET_1, CONFIDENT_1, CONFIDENT_0),
                         np.where(selected, AMBIGUOUS, UNCERTAIN))
        return Decision(exit=ex, label=label, pred_set=pred_set, p_roadwork=p, level=level.astype("<U11"), score=s)

    def decide(self, scores: dict[str, np.ndarray]) -> Decision:
        """Exit iff selected with a singleton set; AMBIGUOUS iff selected with {0, 1}; else UNCERTAIN."""
        if not self.fitted:
            raise RuntimeError(f"policy {self.name!r} is not fitted; call fit(scores, y) on val_calib first")
        logits, select = check_scores(scores, self.score == "select")
        p = self._p(logits)
        return self._decide(p, self._s(p, select))

    # JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        assert self.state is not None
        d["state"]["scrc"] = json_safe(self.state.to_dict())
        return d

    def load_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state.get("scrc"), dict):
            raise DataError("policy JSON: the scrc policy's state has no 'scrc' certificate; re-run calibrate")
        super().load_state(state)
        try:
            st = SCRCState.from_dict(state["scrc"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"policy JSON: bad scrc certificate: {exc}") from None
        self._set_state(st)  # certified comes from the certificate itself (the same flag to_dict wrote)

    def __repr__(self) -> str:
        if not self.fitted or self.state is None:
            return f"<{type(self).__name__} {self.name!r} unfitted>"
        st = self.state
        return (f"<{type(self).__name__} {self.name!r} certified={self.certified}, select > {st.threshold1:.6g}, "
                f"lambda2={st.lambda2:.6g}>")


def _covers(pred_set: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether each set code (0 = {0}, 1 = {1}, 2 = {0, 1}) holds the label."""
    return (pred_set == SET_01) | (pred_set == y)


__all__ = ["MISCOVERAGE_SELECTED", "SCRCPolicy"]
