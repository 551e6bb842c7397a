"""What a fitted policy promises, in one sentence that is true: the only place reports get it from.

Read from the policy.json object (``ExitPolicy.to_dict()`` plus the ``fit`` / ``selection`` records
that ``stage1 calibrate`` adds), so the CLI, evaluate, the bundle, the demo and predict all print
the same words. It names each bounded risk with its level and kind (PAC: P(risk > a) <= delta over
the draw of the certification rows; expectation: E[risk] <= a), says which risks are *not* bounded,
and says when a choice among candidates was made on the same rows (then it is not a guarantee).
"""
from __future__ import annotations

from typing import Any, Mapping

from stage1.policies.risks import all_risks
from stage1.policies.selection import SelectionRecord

#: what each kind of policy bounds, for policy.json files written before ``bounds`` was recorded.
_LEGACY_BOUNDS = {"ltt": "pac", "crc": "expectation"}


def bounded_risks(policy: Mapping[str, Any]) -> dict[str, str]:
    """{risk: "pac" | "expectation"} the policy's certificate covers (empty: no guarantee)."""
    bounds = policy.get("bounds")
    if isinstance(bounds, Mapping):
        return {str(k): str(v) for k, v in bounds.items()}
    params = policy.get("params", {}) or {}
    kind = _LEGACY_BOUNDS.get(str(policy.get("guarantee")))
    if kind is None:
        return {}
    out = {str(params.get("risk", "fnr_exit" if kind == "pac" else "miss_rate")): kind}
    if kind == "pac" and params.get("eps") is not None:
        out["selective_error"] = "pac"
    return out


def _event(risk: str, params: Mapping[str, Any]) -> str:
    """The failure event of one bounded risk, as printed."""
    if risk == "miscoverage_selected":  # scrc: the set misses y among selected rows; coverage certified too
        return (f"miscoverage among selected > {float(params['alpha']):g} or selection coverage < "
                f"{float(params['xi']):g}")
    return f"{risk} > {_level(risk, params):g}"


def _level(risk: str, params: Mapping[str, Any]) -> float:
    if risk == "selective_error" and params.get("risk") != "selective_error" and params.get("eps") is not None:
        return float(params["eps"])
    return float(params["alpha"])


def selection_record(policy: Mapping[str, Any]) -> SelectionRecord | None:
    """The ``selection`` record of a policy.json, if it has one."""
    sel = policy.get("selection")
    return SelectionRecord.from_dict(sel) if isinstance(sel, Mapping) else None


def is_guarantee_for(policy: Mapping[str, Any], risk: str) -> bool:
    """True when the policy is certified, bounds ``risk`` and was not fitted to compare candidates."""
    state = policy.get("state", {}) or {}
    sel = selection_record(policy)
    return bool(state.get("certified")) and risk in bounded_risks(policy) and (sel is None or sel.is_guarantee)


def _reward_statement(policy: Mapping[str, Any]) -> str:
    """The reward policy's sentence: an optimiser with no certificate; what its base's certificate covers."""
    state = policy.get("state", {}) or {}
    summary = state.get("summary", {}) or {}
    text = ("no guarantee: reward is an optimiser of the simulated subnet reward, not a certificate; it answers "
            "p or abstains (-1), and no risk of its answers is bounded")
    if "gain" in summary:
        text += (f" (expected reward per round on val_calib at prior {float(summary['prior']):g}: "
                 f"{float(summary['reward_policy']):.4f} vs {float(summary['reward_always']):.4f} answering "
                 "everything, in-sample)")
    base = state.get("base")
    if isinstance(base, Mapping):
        if bounded_risks(base) and not (base.get("state", {}) or {}).get("certified"):
            text += (f"; its base {base.get('policy')} certified nothing ({(base.get('state') or {}).get('reason')}), "
                     "so the reward rule decides every image")
        else:
            text += (f"; its base {base.get('policy')} covers only the images the base exits, not the answers the "
                     f"reward rule adds: {guarantee_statement(base)}")
    return text


def guarantee_statement(policy: Mapping[str, Any]) -> str:
    """One honest sentence: what is bounded (level, delta, kind, data), what is not, or why nothing is."""
    params = policy.get("params", {}) or {}
    state = policy.get("state", {}) or {}
    bounds = bounded_risks(policy)
    sel = selection_record(policy)
    if policy.get("policy") == "reward":
        return _reward_statement(policy)
    if not bounds:
        return f"no guarantee: {policy.get('policy')} is a rule without a certificate (it still exits)"
    if not state.get("certified"):
        return "not certified: every image is deferred (" + str(state.get("reason", "")) + ")"
    if sel is not None and not sel.is_guarantee:
        return sel.statement()
    fit = policy.get("fit", {}) or {}
    where = f"the {fit['part']} part of val_calib" if fit.get("part") in ("choose", "certify") else "val_calib"
    n = f", {fit['n']} rows" if "n" in fit else ""
    pac = [r for r, k in bounds.items() if k == "pac"]
    exp = [r for r, k in bounds.items() if k == "expectation"]
    parts = []
    if pac:
        delta = float(params["delta"])
        if sel is not None and sel.method == "bonferroni":  # each candidate at delta / K: the choice holds at delta
            delta *= sel.delta_split
        # several PAC risks are certified jointly (intersection-union test per pair): one event
        joint = " or ".join(_event(r, params) for r in pac)
        parts.append(f"P({joint}) <= {delta:g}")
    if exp:
        parts.append(" and ".join(f"E[{'miscoverage among selected' if r == 'miscoverage_selected' else r}] <= "
                                  f"{_level(r, params):g}" for r in exp) +
                     " in expectation (no probability statement)")
    unbounded = [r.name for r in all_risks() if r.name not in bounds]
    text = "; ".join(parts) + f", over the draw of {where}{n} (rows exchangeable with what is scored)"
    if unbounded:
        text += "; not bounded: " + ", ".join(unbounded)
        if "selective_error" in unbounded and any(r in bounds for r in ("fnr_exit", "miss_rate")):
            text += " (false alarms, exits as 1 of y=0 images, are not limited)"
    if sel is not None and sel.method in ("holdout", "bonferroni"):
        text += "; " + sel.statement()
    return text
