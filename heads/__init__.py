"""Small heads trained on cached features, registered by name in ``HEADS``."""
from __future__ import annotations

from featstore.registry import Registry

HEADS: Registry = Registry("head")
