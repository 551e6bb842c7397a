"""Calibrators, exit policies and selective metrics (numpy / scipy only; no torch).

``POLICIES.create(name, **params)`` builds a policy (threshold, coverage, crc, ltt);
``policy.fit(scores, y)`` on val_calib; ``policy.decide(scores) -> Decision``;
``policy.to_dict()`` / ``policy_from_dict(d)`` round-trip through policy.json. Every policy and
calibrator declares its parameters once (``PARAMS``); risks are objects in ``policies.risks.RISKS``.
"""
from __future__ import annotations

from typing import Any

from stage1._core.errors import ConfigError, DataError
from stage1._core.registry import Registry

POLICIES: Registry = Registry("policy")

# importing the modules registers the policies (they import POLICIES from here)
from stage1.policies import risks as _risks  # noqa: E402,F401
from stage1.policies import ltt as _ltt  # noqa: E402,F401
from stage1.policies import rules as _rules  # noqa: E402,F401
from stage1.policies.audit import audit  # noqa: E402
from stage1.policies.base import SCHEMA_VERSION, ExitPolicy  # noqa: E402
from stage1.policies.calibrators import CALIBRATORS  # noqa: E402
from stage1.policies.decision import LEVELS, Decision  # noqa: E402

__all__ = ["POLICIES", "CALIBRATORS", "Decision", "LEVELS", "ExitPolicy", "policy_from_dict", "audit"]


def policy_from_dict(d: dict[str, Any]) -> ExitPolicy:
    """Rebuild a fitted policy from ``policy.to_dict()`` (the policy.json object)."""
    if not isinstance(d, dict):
        raise DataError("policy JSON must be an object")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"policy JSON schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    for key in ("policy", "params", "state"):
        if key not in d:
            raise DataError(f"policy JSON is missing {key!r}; re-run calibrate to regenerate policy.json")
    try:
        policy = POLICIES.create(d["policy"], **d["params"])
    except (ConfigError, TypeError) as exc:
        raise DataError(f"policy JSON has parameters policy {d['policy']!r} does not accept: {exc}") from None
    policy.load_state(d["state"])
    return policy
