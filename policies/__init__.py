"""Calibrators, exit policies and selective metrics (numpy / scipy only; no torch)."""
from __future__ import annotations

from featstore.registry import Registry

POLICIES: Registry = Registry("policy")
