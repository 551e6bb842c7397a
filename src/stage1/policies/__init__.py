"""Calibrators, exit policies and selective metrics (numpy / scipy only; no torch).

``POLICIES.create(name, **params)`` builds a policy (threshold, coverage, crc, ltt, scrc, reward);
``policy.fit(scores, y)`` on val_calib; ``policy.decide(scores) -> Decision``;
``policy.to_dict()`` / ``policy_from_dict(d)`` round-trip through policy.json. Every policy and
calibrator declares its parameters once (``PARAMS``); risks are objects in ``policies.risks.RISKS``.

Examples
--------
``POLICIES.create(name, **params)`` checks the parameters against the policy's declaration. Fit on
val_calib scores (a head's logits, and its ``select`` score for selector policies), then decide:

>>> import numpy as np
>>> from stage1.policies import POLICIES, policy_from_dict
>>> rng = np.random.default_rng(0)
>>> y = rng.integers(0, 2, 4000)
>>> logits = np.stack([np.zeros(4000), (2 * y - 1) * rng.uniform(1, 8, 4000) + rng.normal(0, 1, 4000)], 1)
>>> policy = POLICIES.create("ltt", alpha=0.05, delta=0.1, eps=0.05).fit({"logits": logits}, y)
>>> policy.certified, policy.certifies()
(True, {'fnr_exit': 'pac', 'selective_error': 'pac'})
>>> d = policy.decide({"logits": logits[:4]})
>>> y[:4].tolist(), d.label.tolist(), d.exit.tolist()
([1, 1, 1, 0], [1, 1, 1, 0], [True, True, True, True])
>>> policy_from_dict(policy.to_dict()).decide({"logits": logits}).equals(policy.decide({"logits": logits}))
True
>>> POLICIES.create("ltt", alpha=2)
Traceback (most recent call last):
...
stage1._core.errors.ConfigError: policy 'ltt': alpha=2: expected float in (0, 1)
"""
from __future__ import annotations

from typing import Any

from stage1._core.errors import ConfigError, DataError, UnknownNameError
from stage1._core.registry import Registry

POLICIES: Registry = Registry("policy")

# importing the modules registers the policies (they import POLICIES from here)
from stage1.policies import risks as _risks  # noqa: E402,F401
from stage1.policies import ltt as _ltt  # noqa: E402,F401
from stage1.policies import rules as _rules  # noqa: E402,F401
from stage1.policies import scrc_policy as _scrc  # noqa: E402,F401
from stage1.policies import reward_policy as _reward  # noqa: E402,F401
from stage1.policies.audit import audit  # noqa: E402
from stage1.policies.base import SCHEMA_VERSION, ExitPolicy  # noqa: E402
from stage1.policies.calibrators import CALIBRATORS  # noqa: E402
from stage1.policies.decision import LEVELS, Decision  # noqa: E402

__all__ = ["POLICIES", "CALIBRATORS", "Decision", "LEVELS", "ExitPolicy", "policy_from_dict", "audit"]


def policy_from_dict(d: dict[str, Any], where: str | None = None) -> ExitPolicy:
    """Rebuild a fitted policy from ``policy.to_dict()`` (the policy.json object).

    Everything is validated here, at load: the parameters through the policy's declaration
    (``PARAMS``: types, ranges, finiteness), the fitted state by ``ExitPolicy.load_state`` (the
    calibrators' states, thresholds, certified, n_needed, summary). Any problem is a one-line
    DataError, prefixed by ``where`` (the file it came from) when given.
    """
    try:
        return _policy_from_dict(d)
    except DataError as exc:
        if where is None:
            raise
        raise DataError(f"{where}: {exc}") from None


def _policy_from_dict(d: dict[str, Any]) -> ExitPolicy:
    if not isinstance(d, dict):
        raise DataError("policy JSON must be an object")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"policy JSON schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    for key in ("policy", "params", "state"):
        if key not in d:
            raise DataError(f"policy JSON is missing {key!r}; re-run calibrate to regenerate policy.json")
    if not isinstance(d["policy"], str) or d["policy"] not in POLICIES:
        raise DataError(f"policy JSON: unknown policy {d['policy']!r}; known: {', '.join(POLICIES.names())}")
    if not isinstance(d["params"], dict):
        raise DataError("policy JSON: params must be an object; re-run calibrate to regenerate policy.json")
    try:
        policy = POLICIES.create(d["policy"], **d["params"])
    except (ConfigError, UnknownNameError, TypeError) as exc:
        raise DataError(f"policy JSON has parameters policy {d['policy']!r} does not accept: {exc}") from None
    policy.load_state(d["state"])
    return policy
