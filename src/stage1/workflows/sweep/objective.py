"""One trial: fit a head and an exit policy, score the two objectives, record the risk constraint.

The objectives are a primary one, maximised, and the selector's AUGRC on val_select (minimised).
The primary objective is certified coverage (the default) or ``reward``: the expected simulated
subnet reward per round on val_select (``policies.reward.expected_reward`` of the policy's answers,
p on exit and -1 on defer, at the policy's ``prior`` or the validators' 0.5). A study records a
non-default primary objective in its objective facts (``objective["primary"]``), so a study is
never resumed with the other one. Every trial also records its reward among its facts. The risk target is a constraint ``risk - alpha <= 0``, recorded with the trial's other
facts in its ``result`` user attribute (``result["constraints"]``). That record is the one source
of feasibility: ``feasible`` and the Pareto front read it, and the sampler learns it through
``constraint_values`` passed as the TPE sampler's ``constraints_func`` (optuna >= 3.0), which also
copies it into optuna's own constraint attribute (the Pareto plot greys infeasible trials from it).
A trial without a record is never called feasible.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from stage1._core.errors import ConfigError, DataError
from stage1.workflows.space import SearchSpace

from .data import SweepData

DIRECTIONS = ("maximize", "minimize")
OBJECTIVE_NAMES = ("certified_coverage", "augrc")
#: the primary (maximised) objectives a sweep can choose; the first is the default.
PRIMARY_OBJECTIVES = ("certified_coverage", "reward")
#: streams and rounds of one trial's reward estimate (a few ms; the same streams for every trial).
REWARD_SIM = {"n_orderings": 100, "n_rounds": 400}
#: the user attribute holding a trial's facts, and its key holding {risk name: risk - alpha}.
RESULT_ATTR = "result"
CONSTRAINTS_KEY = "constraints"
#: result facts kept per trial (trials.csv flattens them to attr.NAME).
RESULT_FACTS = ("risk", "coverage", "accuracy", "certified", "reason", "n_needed", "reward")
#: optuna's system-attribute prefix of ``Trial.set_constraint`` (optuna >= 5), read for studies this
#: package wrote with it before constraints moved into ``result``.
_OPTUNA_CONSTRAINT_PREFIX = "constraints:"


def primary_objective(objective: dict[str, Any]) -> str:
    """The primary objective of a space's objective facts (certified_coverage unless recorded)."""
    return str(objective.get("primary", PRIMARY_OBJECTIVES[0]))


def with_primary(objective: dict[str, Any], primary: str) -> dict[str, Any]:
    """The objective facts with ``primary`` recorded (left out for the default, so older studies resume)."""
    if primary not in PRIMARY_OBJECTIVES:
        raise ConfigError(f"--objective {primary!r}: choose one of {', '.join(PRIMARY_OBJECTIVES)}")
    out = {k: v for k, v in objective.items() if k != "primary"}
    return out if primary == PRIMARY_OBJECTIVES[0] else {**out, "primary": primary}


def objective_names(objective: dict[str, Any]) -> tuple[str, str]:
    """The names of a trial's two values under these objective facts."""
    return primary_objective(objective), OBJECTIVE_NAMES[1]


def simulated_reward(policy: Any, scores: dict[str, np.ndarray], y: np.ndarray, seed: int) -> float:
    """Expected reward per round of the policy's answers (p on exit, -1 on defer) on a labelled split,
    at the policy's prior or the validators' 0.5; 0 when the split lacks a class (nothing to simulate)."""
    from stage1.policies.reward import VALIDATOR_PRIOR, expected_reward

    yy = np.asarray(y)
    if len(yy) == 0 or yy.min() == yy.max():
        return 0.0
    d = policy.decide(scores)
    answers = np.where(d.exit, d.p_roadwork, -1.0)
    prior = getattr(policy, "prior", None) or VALIDATOR_PRIOR
    return float(expected_reward(answers, yy, prior=prior, seed=seed, **REWARD_SIM).mean)


def fit_trial(data: SweepData, head_name: str, head_params: dict[str, Any], policy_name: str,
              policy_params: dict[str, Any], seed: int, train_views: bool = True
              ) -> tuple[Any, Any, dict[str, dict[str, np.ndarray]]]:
    """Train the head (on every cached train view, or view 0 only when ``train_views`` is False) and
    fit the policy (on val_calib's choose part: ``SweepData`` holds no other val_calib rows);
    returns (head, policy, scores per split)."""
    from stage1.heads import HEADS
    from stage1.policies import POLICIES

    # threads=0: the head keeps torch's thread count, which the worker set from --threads
    head = HEADS.create(head_name, **{"seed": seed, "threads": 0, **head_params})
    x_train = data.x["train"] if train_views else data.x["train"][:, :1]
    head.fit(x_train, data.y["train"], X_val=data.x["val_select"], y_val=data.y["val_select"])
    scores = {s: head.predict_scores(data.x[s]) for s in ("val_select", "val_calib")}
    policy = POLICIES.create(policy_name, **{"seed": seed, **policy_params})
    policy.fit(scores["val_calib"], data.y["val_calib"])
    return head, policy, scores


def trial_metrics(data: SweepData, policy: Any, scores: dict[str, dict[str, np.ndarray]],
                  objective: dict[str, Any]) -> dict[str, Any]:
    """The objectives, the constraint and facts worth keeping, from a fitted head's scores."""
    from stage1.policies import metrics

    split = objective["coverage_split"]
    y = data.y[split]
    decision = policy.decide(scores[split])
    risks = metrics.selective_risks(y, decision.label, decision.exit)
    risk = risks[objective["risk"]]
    risk = 0.0 if risk is None or not math.isfinite(risk) else float(risk)  # nothing exits: no risk
    sel = scores["val_select"]
    errors = (np.argmax(sel["logits"], axis=1) != data.y["val_select"]).astype(np.int64)
    confidence = sel.get("select")
    if confidence is None:
        from scipy.special import softmax

        confidence = softmax(sel["logits"], axis=1).max(axis=1)
    coverage = float(risks["coverage"])
    # a certificate counts only for the risk it bounds (crc bounds E[miss rate], not FNR_exit); it
    # was fitted on the choose part of val_calib, so it ranks trials and is not itself a guarantee
    certified = bool(policy.certified) and objective["risk"] in policy.certifies()
    return {
        "certified_coverage": coverage if certified else 0.0,
        "augrc": float(metrics.augrc(np.asarray(confidence, dtype=np.float64), errors)),
        "constraint": risk - float(objective["alpha"]),
        "risk": risk,
        "coverage": coverage,
        "accuracy": float(metrics.accuracy(data.y["val_select"], np.argmax(sel["logits"], axis=1))),
        "certified": certified,
        "reason": str(policy.reason),
        "n_needed": policy.n_needed,
        "reward": simulated_reward(policy, sel, data.y["val_select"], seed=0),
    }


def make_objective(data: SweepData, space: SearchSpace, seed: int) -> Callable[[Any], tuple[float, float]]:
    """The Optuna objective: suggest, fit, score; facts and the constraint go to one user attribute.
    Its first value is the space's primary objective (``primary_objective(space.objective)``)."""
    primary = primary_objective(space.objective)

    def objective(trial: Any) -> tuple[float, float]:
        head, hp, pol, pp = space.suggest(trial)
        train = space.suggest_train(trial)
        _, policy, scores = fit_trial(data, head, hp, pol, pp, seed, train_views=train["views"])
        m = trial_metrics(data, policy, scores, space.objective)
        # one attribute (one storage write) holding every fact and the constraint; trials.csv flattens it
        trial.set_user_attr(RESULT_ATTR, {**{k: m[k] for k in RESULT_FACTS},
                                          CONSTRAINTS_KEY: {space.objective["risk"]: m["constraint"]}})
        return m[primary], m["augrc"]

    return objective


def trial_constraints(trial: Any) -> dict[str, float] | None:
    """{risk name: risk - alpha} recorded by a trial, or None when it recorded none (failed, foreign)."""
    result = trial.user_attrs.get(RESULT_ATTR)
    if isinstance(result, dict) and isinstance(result.get(CONSTRAINTS_KEY), dict):
        return {str(k): float(v) for k, v in result[CONSTRAINTS_KEY].items()}
    legacy = {k[len(_OPTUNA_CONSTRAINT_PREFIX):]: float(v) for k, v in trial.system_attrs.items()
              if k.startswith(_OPTUNA_CONSTRAINT_PREFIX)}
    return legacy or None


def constraint_values(trial: Any) -> list[float]:
    """The sampler's ``constraints_func``: the recorded constraint values (<= 0 is feasible), by name."""
    constraints = trial_constraints(trial)
    if constraints is None:  # the objective records it before returning, so a finished trial has it
        raise DataError(f"trial {trial.number} finished without a recorded constraint")
    return [constraints[k] for k in sorted(constraints)]


def feasible(trial: Any) -> bool:
    """True when the trial recorded its constraints and every one is <= 0 (no record: not feasible)."""
    constraints = trial_constraints(trial)
    return constraints is not None and all(v <= 0 for v in constraints.values())
