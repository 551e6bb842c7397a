"""Extra views per image: the distortions subnet validators apply to challenge images, in PIL/numpy.

Levels follow the validators' recipe: 0 = centre square crop only; 1 = rotation (<= 20 deg),
random square crop (area 0.2-1.0), horizontal / vertical flips; 2 = level 1 + mild colour
saturation, contrast and JPEG-like downsampling (each on or off at random); 3 = level 1 + those
plus colour noise and Gaussian blur at up to the second intensity. Every random draw comes from
one seed, so a view is a pure function of (image, seed, level).
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from stage1._core.constants import DEFAULT_VIEW_LEVELS  # noqa: F401 (re-exported)
from stage1._core.constants import VIEW_LEVELS as LEVELS

#: Recipe name stored in provenance; bump it whenever a view's pixels could change.
RECIPE = "validator-v1"


# Intensity tables (mildest first), DeeperForensics-style as the validators use them.
SATURATION = (0.4, 0.3)  # chroma scale: lower = more washed out
CONTRAST = (0.85, 0.725)  # pixel scale: lower = flatter / darker
JPEG_FACTOR = (2, 3)  # downsample factor before upsampling back
NOISE_VAR = (0.001, 0.002)  # variance of colour noise in YCbCr, on a 0-1 scale
BLUR_KERNEL = (7, 9)  # Gaussian kernel size; sigma = kernel / 6


def view_seed(sha256: str, view: int, base_seed: int = 0) -> int:
    """A 63-bit seed for view ``view`` of the image with content hash ``sha256``."""
    digest = hashlib.sha256(f"{base_seed}:{sha256}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def view_level(view: int, levels: Sequence[int] = DEFAULT_VIEW_LEVELS) -> int:
    """The distortion level of extra view ``view`` (1-based), cycling through ``levels``."""
    if view < 1:
        raise ValueError("view 0 is the clean image; extra views start at 1")
    return int(levels[(view - 1) % len(levels)])


def _center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    m = min(w, h)
    left, top = (w - m) // 2, (h - m) // 2
    return img.crop((left, top, left + m, top + m))


def _random_square_crop(img: Image.Image, rng: np.random.Generator, scale: tuple[float, float] = (0.2, 1.0)) -> Image.Image:
    """A square crop covering a uniform(scale) fraction of the area (centre square if none fits)."""
    w, h = img.size
    for _ in range(10):
        side = int(round(math.sqrt(rng.uniform(*scale) * w * h)))
        if 0 < side <= w and side <= h:
            left = int(rng.integers(0, w - side + 1))
            top = int(rng.integers(0, h - side + 1))
            return img.crop((left, top, left + side, top + side))
    return _center_square(img)


def _ycbcr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("YCbCr"), dtype=np.float32)


def _from_ycbcr(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "YCbCr").convert("RGB")


def saturation(img: Image.Image, factor: float) -> Image.Image:
    """Scale chroma (Cb, Cr) around neutral by ``factor`` (0 = greyscale)."""
    arr = _ycbcr(img)
    arr[..., 1:] = 128.0 + (arr[..., 1:] - 128.0) * factor
    return _from_ycbcr(arr)


def contrast(img: Image.Image, factor: float) -> Image.Image:
    """Multiply pixel values by ``factor`` (the validators' contrast reduction)."""
    arr = np.asarray(img, dtype=np.float32) * factor
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def jpeg_like(img: Image.Image, factor: int) -> Image.Image:
    """Downsample by ``factor`` and upsample back (bilinear): the loss of fine detail of heavy JPEG."""
    w, h = img.size
    small = img.resize((max(1, w // factor), max(1, h // factor)), Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR)


def colour_noise(img: Image.Image, variance: float, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise (std = sqrt(variance) on a 0-1 scale) in YCbCr."""
    arr = _ycbcr(img)
    arr += rng.normal(0.0, math.sqrt(variance) * 255.0, size=arr.shape).astype(np.float32)
    return _from_ycbcr(arr)


def blur(img: Image.Image, kernel: int) -> Image.Image:
    """Gaussian blur with sigma = kernel / 6."""
    return img.filter(ImageFilter.GaussianBlur(radius=kernel / 6.0))


def make_view(img: Image.Image, seed: int, level: int, size: int | None = None) -> Image.Image:
    """A validator-style distorted view of ``img`` (RGB), deterministic in (img, seed, level).

    ``size``: resize the crop to ``size`` x ``size`` before the photometric distortions, as the
    validators do (their blur and downsampling act at the served resolution); None keeps the crop size.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    rng = np.random.default_rng(seed)
    out = img.convert("RGB") if img.mode != "RGB" else img
    if level == 0:
        out = _center_square(out)
    else:
        angle = float(rng.uniform(-20.0, 20.0))
        out = out.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=(0, 0, 0))
        out = _random_square_crop(out, rng)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_TOP_BOTTOM)
    if size is not None and out.size != (size, size):
        out = out.resize((size, size), Image.BICUBIC)
    if level >= 2:
        top = 1 if level == 2 else 2  # highest intensity index + 1 (0 = off)
        s, c, j = (int(rng.integers(0, top + 1)) for _ in range(3))
        if s:
            out = saturation(out, SATURATION[s - 1])
        if c:
            out = contrast(out, CONTRAST[c - 1])
        if j:
            out = jpeg_like(out, JPEG_FACTOR[j - 1])
        if level == 3:
            n, b = (int(rng.integers(0, top + 1)) for _ in range(2))
            if n:
                out = colour_noise(out, NOISE_VAR[n - 1], rng)
            if b:
                out = blur(out, BLUR_KERNEL[b - 1])
    return out.copy() if out is img else out
