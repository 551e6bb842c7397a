"""Write an adapted backbone: merged weights (``save_pretrained``) + provenance, atomically.

The folder is a plain transformers model folder (config.json, model.safetensors, the parent's
preprocessor_config.json) so ``AutoModel.from_pretrained`` and ``extract --backbone`` load it as
any other backbone; ``provenance.json`` names the parent weights, the method and the data.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from torch import nn

from stage1._core.io import atomic_dir, atomic_write_json, utc_timestamp
from stage1._core.errors import ExistsError

SCHEMA_VERSION = 1
PROVENANCE_FILE = "provenance.json"
#: Files copied from the parent folder when present (preprocessing statistics travel with the weights).
COPIED_FILES = ("preprocessor_config.json",)


def check_out_dir(out: str | os.PathLike[str]) -> Path:
    """Refuse to overwrite: ``out`` must not exist, or be an empty folder."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExistsError(f"{path} already exists and is not empty; choose a new --out folder")
    return path


def save_adapted(
    out: str | os.PathLike[str],
    model: nn.Module,
    parent_dir: str | os.PathLike[str],
    provenance: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save merged ``model`` + copied parent files + provenance into a new folder ``out``.

    Everything is written into a temporary sibling folder renamed into place at the end, so a crash
    never leaves a half-written backbone that ``extract`` could pick up. ``extra(tmp_dir)`` may add
    files (e.g. the trained head) before the rename.
    """
    from stage1.featstore.backbones import weights_sha256

    out_path = check_out_dir(out)  # refuses a non-empty folder, so only an empty one is replaced
    with atomic_dir(out_path) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for name in COPIED_FILES:
            src = Path(parent_dir) / name
            if src.exists():
                shutil.copyfile(src, tmp / name)
        if extra is not None:
            extra(tmp)
        weights_file, sha = weights_sha256(tmp)
        record = {
            "schema_version": SCHEMA_VERSION,
            "created": utc_timestamp(),
            **provenance,
            "output": {"weights_file": weights_file, "weights_sha256": sha},
        }
        atomic_write_json(tmp / PROVENANCE_FILE, record)
    return out_path


def parent_record(backbone: Any) -> dict[str, Any]:
    """The parent backbone as provenance: its own provenance plus its lineage when it was adapted."""
    from stage1._core.io import read_json

    record = dict(backbone.provenance())
    lineage = Path(record["path"]) / PROVENANCE_FILE if record.get("path") else None
    if lineage is not None and lineage.exists():
        record["lineage"] = read_json(lineage)
    return record
