"""The demo's embedded data: scikit-learn's bundled digits (real 8x8 scans) as a binary task.

Written as PNG files plus ``labels.csv`` (``path,label``) so the demo goes through exactly the same
image pipeline as a user's folder. Label 1 = digits 5-9, label 0 = digits 0-4 (about balanced).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from stage1._core.errors import ConfigError, DataError, MissingError

#: digits whose images are labelled 1 ("positive", the stand-in for roadwork).
POSITIVE_DIGITS = (5, 6, 7, 8, 9)
#: written last into a finished image folder.
DONE_MARKER = ".complete"


def binary_labels(target: np.ndarray) -> np.ndarray:
    """0/1 labels from digit classes: 1 when the digit is in ``POSITIVE_DIGITS``."""
    return np.isin(np.asarray(target), POSITIVE_DIGITS).astype(np.int8)


def subsample(labels: np.ndarray, max_images: int | None, seed: int = 0) -> np.ndarray:
    """Sorted row indices keeping at most ``max_images`` rows, stratified by label (all when None)."""
    n = len(labels)
    if max_images is None or max_images >= n:
        return np.arange(n)
    if max_images < 2:
        raise ConfigError(f"--max-images must be >= 2, got {max_images}")
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        share = max(1, int(round(max_images * len(idx) / n)))
        keep.append(rng.choice(idx, size=min(share, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))[:max_images]


def write_digits(out_dir: str | os.PathLike[str], max_images: int | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Write the digits as ``out_dir/images/dNNNN.png`` + ``out_dir/labels.csv``; returns (images, csv).

    The PNGs (all 1797) are written once into a temp folder that is renamed into place, so re-running
    is cheap and a crash never leaves a half-written folder; ``max_images`` only trims the CSV.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    from stage1._core.io import atomic_dir, atomic_write_text

    digits = load_digits()
    labels = binary_labels(digits.target)
    images_dir = Path(out_dir) / "images"
    if not (images_dir / DONE_MARKER).is_file():
        with atomic_dir(images_dir) as work:  # an unfinished folder (no marker) is replaced whole
            for i, img in enumerate(digits.images):
                pixels = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(work / f"d{i:04d}.png", format="PNG")
            (work / DONE_MARKER).write_text(f"{len(digits.images)} images from sklearn.datasets.load_digits\n")
    rows = subsample(labels, max_images, seed)
    lines = ["path,label"] + [f"d{i:04d}.png,{int(labels[i])}" for i in rows]
    csv = Path(out_dir) / "labels.csv"
    atomic_write_text(csv, "\n".join(lines) + "\n")
    return images_dir, csv


# -- Fashion-MNIST (Debian package dataset-fashion-mnist: IDX files) -----------------------------------
#: Fashion-MNIST classes labelled 1 in the binary task: footwear (5 sandal, 7 sneaker, 9 ankle boot).
FASHION_POSITIVE = (5, 7, 9)
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)


def find_idx(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """IDX image / label files in ``folder`` (plain or .gz): ``{"train-images": path, ...}``."""
    out: dict[str, Path] = {}
    for p in sorted(Path(folder).glob("*-idx[13]-ubyte*")):
        stem = p.name.split("-idx")[0]  # train-images, train-labels, t10k-images, t10k-labels
        out[stem] = p
    return out


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (uint8 data; optionally gzip-compressed) into an array of its stated shape."""
    import gzip

    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {data.size} bytes; the file is truncated")
    return data.reshape(dims)


def write_idx_images(idx_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                     positive: tuple[int, ...] = FASHION_POSITIVE, max_images: int | None = None,
                     seed: int = 0) -> tuple[Path, Path]:
    """Fashion-MNIST-style IDX files -> PNGs + labels.csv (train/t10k kept apart: t10k rows go to test)."""
    from PIL import Image

    from stage1._core.io import atomic_path
    from stage1.featstore.labels import write_labels_csv

    found = find_idx(idx_dir)
    parts = [p for p in ("train", "t10k") if f"{p}-images" in found and f"{p}-labels" in found]
    if not parts:
        raise MissingError(f"{idx_dir}: no *-images-idx3-ubyte / *-labels-idx1-ubyte pairs")
    images_dir = Path(out_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    all_rows: list[tuple[str, int, str, np.ndarray]] = []
    for part in parts:
        imgs, labs = read_idx(found[f"{part}-images"]), read_idx(found[f"{part}-labels"])
        if len(imgs) != len(labs):
            raise DataError(f"{idx_dir}: {part} has {len(imgs)} images but {len(labs)} labels")
        split = "test" if part == "t10k" and "train" in parts else ""
        all_rows += [(f"{part}-{i:05d}.png", int(c in positive), split, imgs[i]) for i, c in enumerate(labs)]
    keep = subsample(np.array([r[1] for r in all_rows]), max_images, seed)
    for i in keep:
        name, _, _, pixels = all_rows[i]
        target = images_dir / name
        if not target.is_file():  # temp name + rename: never a half-written PNG (no fsync per file)
            with atomic_path(target, fsync=False) as tmp:
                Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
    csv = write_labels_csv(Path(out_dir) / "labels.csv", [all_rows[i][:3] for i in keep])
    return images_dir, csv
