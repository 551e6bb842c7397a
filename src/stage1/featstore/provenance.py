"""Provenance comparison: which attributes of two stores' provenance differ, and the refusal that names them.

A resume or append must see the same backbone, preprocessing and image list as the store it adds
to. Nested provenance is compared key by key (``backbone.weights_sha256``), and keys that only say
where something lives (``INFORMATIONAL_KEYS``) are ignored, so a moved folder still resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ProvenanceMismatch

#: Provenance keys that describe where something lives, not what it is: never compared on resume.
INFORMATIONAL_KEYS = ("backbone.path", "images_root", "source_path", "labels_csv")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def provenance_differences(stored: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(attribute, stored value, new value) for every provenance attribute that differs."""
    a, b = flatten(stored), flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in INFORMATIONAL_KEYS:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            diffs.append((key, va, vb))
    return diffs


def check_provenance(where: Path, stored: dict[str, Any], new: dict[str, Any]) -> None:
    """Raise ``ProvenanceMismatch`` naming the first differing attribute (and how many more) of store ``where``."""
    diffs = provenance_differences(stored, new)
    if diffs:
        key, old, value = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
        raise ProvenanceMismatch(
            f"{where}: provenance attribute '{key}' differs (store has {old!r}, this run has {value!r}){more}; "
            "re-run with the store's settings to resume, or write to a new --out"
        )
