"""Shared, cheap fixtures: a tiny random DINOv3 backbone folder and a folder of generated images.

``tiny_backbone_dir`` (session): DINOv3ViTModel, hidden 32, 2 layers, patch 16, saved with
save_pretrained; use ``--image-size 32`` with it. ``image_folder``: 8 small RGB images (JPEG and PNG,
one in a sub-folder) plus ``labels.csv`` (``path,label``; labels alternate 0/1, paths relative).
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Names of the images ``image_folder`` writes, in labels.csv order.
IMAGE_NAMES = (
    "img0.jpg",
    "img1.png",
    "img2.jpg",
    "img3.png",
    "sub/img4.jpg",
    "img5.png",
    "img6.jpg",
    "img7.png",
)


def make_backbone_dir(path: Path, kind: str = "dinov3", hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny random backbone (``dinov3`` or ``dinov2``) to ``path`` and return it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "dinov3":
        cfg = transformers.DINOv3ViTConfig(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
            patch_size=16, image_size=32, num_register_tokens=0,
        )
        model = transformers.DINOv3ViTModel(cfg)
    elif kind == "dinov2":
        cfg = transformers.Dinov2Config(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            patch_size=16, image_size=32,
        )
        model = transformers.Dinov2Model(cfg)
    else:  # pragma: no cover - test helper misuse
        raise ValueError(kind)
    model.save_pretrained(str(path))
    return path


def make_image(seed: int, size: tuple[int, int] = (40, 32)):
    """A deterministic smooth-ish RGB test image (distinct per seed)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, size=3)
    grad = rng.uniform(-3, 3, size=(2, 3))
    arr = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + rng.normal(0, 8, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DINOv3ViTModel folder (hidden 32, patch 16), built once per session."""
    return make_backbone_dir(tmp_path_factory.mktemp("tiny_dinov3"))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A folder with 8 generated images and ``labels.csv`` (path,label; labels 0,1,0,1,...)."""
    folder = tmp_path / "images"
    lines = ["path,label"]
    for i, name in enumerate(IMAGE_NAMES):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        make_image(i, size=(40 + 4 * i, 32 + 2 * i)).save(target)
        lines.append(f"{name},{i % 2}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression-bomb stand-in)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path
