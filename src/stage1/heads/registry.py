"""The ``HEADS`` registry object itself (light: no torch), filled by the head modules on import."""
from __future__ import annotations

from stage1._core.registry import Registry

HEADS: Registry = Registry("head")
