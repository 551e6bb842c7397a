"""Frozen vision backbones behind a registry; the feature is the CLS token of the last layer.

``hf`` loads any transformers ``AutoModel`` vision backbone from a local folder (DINOv3ViTModel,
Dinov2Model, ViTModel, ...). Provenance pins the weights and config.json by sha256 so a store can refuse features
computed by a different model.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from stage1._core.errors import ConfigError, DataError, EnvironmentProblem, MissingError
from stage1._core.io import sha256_file
from stage1._core.registry import Registry

#: ImageNet statistics, used when the folder has no preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Weight files, most preferred first.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
#: Weight files that are pickles: named only to be refused (never loaded).
PICKLE_WEIGHT_FILES = ("pytorch_model.bin",)


def resolve_device(name: str | torch.device) -> torch.device:
    """``--device`` as a torch device: cpu, cuda or cuda:N; a clear error when it cannot be used."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(f"--device {name} was asked for but torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EnvironmentProblem(f"--device {name}: torch sees only {torch.cuda.device_count()} CUDA device(s)")
    return dev


class Backbone:
    """A frozen feature extractor: images [B,3,H,W] (normalised) -> features [B,D]."""

    model: torch.nn.Module
    hidden_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


BACKBONES: Registry[Backbone] = Registry("backbone")


#: Longest safetensors JSON header accepted (the format's own readers cap it at 100 MB).
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def check_safetensors(path: Path) -> None:
    """DataError unless ``path`` starts like a safetensors file (an 8-byte header length, then a JSON
    object), read without unpickling anything: a pickle or a torch zip renamed to .safetensors is refused."""
    fix = ("point --backbone at a folder saved with save_pretrained(..., safe_serialization=True); "
           "stage1 never unpickles weights (a pickle file can run code)")
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc}); {fix}") from None
    kind = "a pickle" if head[:1] == b"\x80" else "a zip (torch.save) archive" if head[:2] == b"PK" else "not safetensors"
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) < 9 or not 2 <= n <= min(size - 8, MAX_SAFETENSORS_HEADER) or head[8:9] != b"{":
        raise DataError(f"{path}: not a safetensors file ({kind}); {fix}")


def weights_sha256(folder: str | os.PathLike[str]) -> tuple[str, str]:
    """(file name, sha256) of a HF folder's weights; for sharded weights, a hash over every shard's hash.

    Only safetensors weights are accepted: a pickle file (``pytorch_model.bin``, or any file that is
    not safetensors inside) is refused with a DataError before anything loads it.
    """
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.exists():
            continue
        if name in PICKLE_WEIGHT_FILES:
            raise DataError(f"{path}: a pickle weights file; stage1 never unpickles weights (a pickle can run "
                            "code): convert it to model.safetensors (save_pretrained(..., safe_serialization=True) "
                            "in an environment you trust) and point --backbone at that folder")
        if name.endswith(".index.json"):
            try:
                index = json.loads(path.read_text(encoding="utf-8"))
                shards = sorted(set(index["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataError(f"{path}: not a safetensors index (a JSON object with a 'weight_map'); "
                                "save the model again with save_pretrained") from None
            h = hashlib.sha256()
            for shard in shards:
                shard_path = folder / str(shard)
                if not str(shard).endswith(".safetensors") or not shard_path.is_file():
                    raise DataError(f"{path}: shard {shard!r} is not a .safetensors file in {folder}; "
                                    "save the model again with save_pretrained(..., safe_serialization=True)")
                check_safetensors(shard_path)
                h.update(f"{shard}:{sha256_file(shard_path)}\n".encode())
            return name, h.hexdigest()
        check_safetensors(path)
        return name, sha256_file(path)
    raise MissingError(
        f"{folder}: no weights file ({', '.join(WEIGHT_FILES)}); point --backbone at a saved HF model folder"
    )


def config_sha256(folder: str | os.PathLike[str]) -> str:
    """sha256 of a HF folder's config.json: the same weights under another config (``hidden_act``,
    ``layer_norm_eps``, ...) compute other features. (preprocessor_config.json matters only through
    its mean / std, which the store's preprocessing records.)"""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MissingError(f"{folder}: no config.json; --backbone must be a local Hugging Face model folder")
    return sha256_file(path)


def _preprocessor_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from preprocessor_config.json, ImageNet defaults otherwise."""
    cfg_path = folder / "preprocessor_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if mean and std and len(mean) == 3 and len(std) == 3:
            return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return IMAGENET_MEAN, IMAGENET_STD


@BACKBONES.register("hf")
class HFBackbone(Backbone):
    """A transformers vision model from a local folder; CLS = ``last_hidden_state[:, 0]``.

    On CUDA the forward pass runs under bf16 autocast; the returned features are float32.
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu") -> None:
        from transformers import AutoModel

        folder = Path(path)
        if not (folder / "config.json").exists():
            raise MissingError(
                f"{folder}: no config.json; --backbone must be a local Hugging Face model folder"
            )
        self.path = folder.resolve()
        self.device = resolve_device(device)
        self.weights_file, self.weights_sha256 = weights_sha256(folder)
        self.config_sha256 = config_sha256(folder)
        # safetensors only: transformers never falls back to a pickle file (weights_sha256 refused them)
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        model.eval().requires_grad_(False)
        self.model = model.to(self.device, dtype=torch.float32)
        cfg = model.config
        self.config = cfg
        self.hidden_size = int(cfg.hidden_size)
        patch = getattr(cfg, "patch_size", 16)
        self.patch_size = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        mean, std = _preprocessor_stats(folder)
        self.mean, self.std = mean, std  # type: ignore[assignment]

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """CLS features [B, D] (float32) of normalised images [B, 3, H, W]."""
        x = x.to(self.device, dtype=torch.float32, non_blocking=True)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.model(pixel_values=x)
        else:
            out = self.model(pixel_values=x)
        return out.last_hidden_state[:, 0].float()

    def precision(self) -> str:
        """How the forward pass computes: recorded so a resume never mixes bf16 and fp32 features."""
        return "bf16-autocast" if self.device.type == "cuda" else "float32"

    def provenance(self) -> dict[str, Any]:
        """What identifies these features' model: class, sizes, weights sha256 (path is informational)."""
        return {
            "kind": "hf",
            "path": str(self.path),
            "class": type(self.model).__name__,
            "model_type": getattr(self.config, "model_type", ""),
            "hidden_size": self.hidden_size,
            "patch_size": self.patch_size,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "config_sha256": self.config_sha256,
            "feature": "cls",
            "precision": self.precision(),
        }


def load_backbone(path: str | os.PathLike[str], device: str = "cpu", kind: str = "hf") -> Backbone:
    """Build the backbone registered as ``kind`` from ``path`` on ``device``."""
    return BACKBONES.create(kind, path=path, device=device)


def check_image_size(size: int, patch_size: int) -> None:
    """Refuse an input size that is not a positive multiple of the patch size."""
    if size <= 0 or size % patch_size:
        raise ConfigError(
            f"image size {size} is not a multiple of the backbone's patch size {patch_size}; "
            f"use e.g. {max(patch_size, round(size / patch_size) * patch_size)}"
        )

