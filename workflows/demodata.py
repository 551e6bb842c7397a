"""The demo's embedded data: scikit-learn's bundled digits (real 8x8 scans) as a binary task.

Written as PNG files plus ``labels.csv`` (``path,label``) so the demo goes through exactly the same
image pipeline as a user's folder. Label 1 = digits 5-9, label 0 = digits 0-4 (about balanced).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

#: digits whose images are labelled 1 ("positive", the stand-in for roadwork).
POSITIVE_DIGITS = (5, 6, 7, 8, 9)


def binary_labels(target: np.ndarray) -> np.ndarray:
    """0/1 labels from digit classes: 1 when the digit is in ``POSITIVE_DIGITS``."""
    return np.isin(np.asarray(target), POSITIVE_DIGITS).astype(np.int8)


def subsample(labels: np.ndarray, max_images: int | None, seed: int = 0) -> np.ndarray:
    """Sorted row indices keeping at most ``max_images`` rows, stratified by label (all when None)."""
    n = len(labels)
    if max_images is None or max_images >= n:
        return np.arange(n)
    if max_images < 2:
        raise ValueError(f"--max-images must be >= 2, got {max_images}")
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        share = max(1, int(round(max_images * len(idx) / n)))
        keep.append(rng.choice(idx, size=min(share, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))[:max_images]


def write_digits(out_dir: str | os.PathLike[str], max_images: int | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Write the digits as ``out_dir/images/dNNNN.png`` + ``out_dir/labels.csv``; returns (images, csv).

    Idempotent: existing PNGs with the right name are kept, the CSV is rewritten atomically, so
    re-running on the same folder is cheap and never leaves a half-written file.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    from featstore.io import atomic_write_bytes, atomic_write_text

    digits = load_digits()
    labels = binary_labels(digits.target)
    rows = subsample(labels, max_images, seed)
    images_dir = Path(out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    lines = ["path,label"]
    for i in rows:
        name = f"d{i:04d}.png"
        target = images_dir / name
        if not target.is_file():
            pixels = np.clip(np.rint(digits.images[i] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            atomic_write_bytes(target, buf.getvalue())
        lines.append(f"{name},{int(labels[i])}")
    csv = Path(out_dir) / "labels.csv"
    atomic_write_text(csv, "\n".join(lines) + "\n")
    return images_dir, csv
