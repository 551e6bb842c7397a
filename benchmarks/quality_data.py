"""Datasets of the decision-quality benchmark (``quality.py``): Fashion-MNIST pairs and TraCon as feature stores.

Writes the images and one labels CSV per dataset (through ``stage1.featstore.labels.write_labels_csv``,
the same writer the demo uses), then extracts and splits each store with the real ``stage1``
commands. Everything lands under the benchmark's work folder and is reused by later calls.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BACKBONE = SHARED / "assets" / "dinov2s-imgfocus"
TRACON = SHARED / "data" / "tracon"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
PAIRS = {"fmnist_tshirt_shirt": (0, 6), "fmnist_pullover_coat": (2, 4)}  # (negative, positive)
SEED = 20240


@dataclass(frozen=True)
class DrawSizes:
    """Rows drawn per Fashion-MNIST pair, both classes together: val_calib, train (incl. val_select), val_select."""

    n_calib: int
    n_train: int
    n_select: int


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(*args: str) -> str:
    """Run `stage1 ARGS` (the real commands); its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "stage1", *args], env=env, text=True,
                         stdout=subprocess.PIPE, cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"`stage1 {' '.join(args)}` failed with exit code {res.returncode}")
    return res.stdout


def _pixel_hash(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()


def fmnist_draw(train_labels: np.ndarray, train_hashes: list[str], test_labels: np.ndarray,
                test_hashes: list[str], neg: int, pos: int, seed: int, sizes: DrawSizes) -> dict[str, np.ndarray]:
    """Indices into the official train / test sets for one pair: train, val_select, val_calib, test.

    val_calib: n_calib/2 per class; val_select: n_select/2 per class; train: the rest (<= n_train -
    n_select). Duplicates of test images and repeated pool images are left out of the pool.
    """
    rng = np.random.default_rng(seed)
    test_idx = np.flatnonzero(np.isin(test_labels, (neg, pos)))
    banned = {test_hashes[i] for i in test_idx}
    out: dict[str, list[int]] = {"train": [], "val_select": [], "val_calib": []}
    for c in (neg, pos):
        seen: set[str] = set()
        pool = []
        for i in np.flatnonzero(train_labels == c):
            h = train_hashes[i]
            if h in banned or h in seen:
                continue
            seen.add(h)
            pool.append(i)
        pool = np.array(pool)[rng.permutation(len(pool))]
        k_cal, k_sel = sizes.n_calib // 2, sizes.n_select // 2
        k_tr = min(len(pool) - k_cal - k_sel, (sizes.n_train - sizes.n_select) // 2)
        out["val_calib"] += pool[:k_cal].tolist()
        out["val_select"] += pool[k_cal:k_cal + k_sel].tolist()
        out["train"] += pool[k_cal + k_sel:k_cal + k_sel + k_tr].tolist()
    res = {k: np.sort(np.array(v, dtype=np.int64)) for k, v in out.items()}
    res["test"] = test_idx
    return res


def prepare_fmnist(out: Path, sizes: DrawSizes) -> dict[str, Path]:
    """Write the pair images once as PNG and one labels CSV (path,label,split) per pair."""
    from PIL import Image

    from stage1._core.io import atomic_path, atomic_write_json
    from stage1.featstore.labels import write_labels_csv
    from stage1.workflows.demodata import find_idx, read_idx

    root = out / "fmnist"
    img_dir = root / "images"
    csvs = {name: root / f"{name}.csv" for name in PAIRS}
    if all(p.exists() for p in csvs.values()):
        return csvs
    found = find_idx(FMNIST)
    if not {"train-images", "train-labels", "t10k-images", "t10k-labels"} <= set(found):
        raise SystemExit(f"{FMNIST}: Fashion-MNIST IDX files not found; install them with "
                         "`apt-get install dataset-fashion-mnist`, or run with --only tracon")
    tr_x, tr_y = read_idx(found["train-images"]), read_idx(found["train-labels"])
    te_x, te_y = read_idx(found["t10k-images"]), read_idx(found["t10k-labels"])
    tr_h = [_pixel_hash(a) for a in tr_x]
    te_h = [_pixel_hash(a) for a in te_x]
    img_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"seed": SEED, "pairs": {}}
    for name, (neg, pos) in PAIRS.items():
        draw = fmnist_draw(tr_y, tr_h, te_y, te_h, neg, pos, SEED, sizes)
        rows: list[tuple[str, int, str]] = []
        for split, idx in draw.items():
            part, xs, ys = ("t10k", te_x, te_y) if split == "test" else ("train", tr_x, tr_y)
            for i in idx:
                rel = f"images/{part}-{i:05d}.png"
                target = root / rel
                if not target.exists():
                    with atomic_path(target, fsync=False) as tmp:
                        Image.fromarray(xs[i], mode="L").save(tmp, format="PNG")
                rows.append((rel, int(ys[i] == pos), split))
        write_labels_csv(csvs[name], rows)
        manifest["pairs"][name] = {"negative_class": neg, "positive_class": pos,
                                   **{k: int(len(v)) for k, v in draw.items()}}
        log(f"{name}: " + ", ".join(f"{k} {len(v)}" for k, v in draw.items()))
    atomic_write_json(root / "manifest.json", manifest)
    return csvs


def prepare_tracon(out: Path) -> Path:
    """One labels CSV for TraCon: val rows forced to val_calib, train rows left to `split`."""
    from stage1.featstore.labels import parse_labels_csv, write_labels_csv

    path = out / "tracon" / "labels.csv"
    if path.exists():
        return path
    rows: list[tuple[str, int, str]] = []
    for name, split in (("train.csv", ""), ("val.csv", "val_calib")):
        entries, _ = parse_labels_csv(TRACON / name)
        rows += [(e.path, e.label, split) for e in entries]
    return write_labels_csv(path, rows)


def ensure_store(store: Path, images: Path, labels: Path, image_size: int, fractions: str | None,
                 batch_size: int, extract_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Extract (or resume / reuse) the store, then split it once; the `info --json` object.
    ``extract_args``: more `extract` options (views, preprocessing)."""
    done = False
    if (store / "zarr.json").exists():
        info = json.loads(cli("info", str(store), "--json"))
        done = info.get("committed") == info.get("rows") and info.get("complete", True)
    if not done:
        log(f"extract {store.name} ({image_size} px{', ' + ' '.join(extract_args) if extract_args else ''})")
        t = time.perf_counter()
        cli("extract", "--images", str(images), "--labels", str(labels), "--backbone", str(BACKBONE),
            "--out", str(store), "--image-size", str(image_size), "--batch-size", str(batch_size),
            "--workers", "1", "--dtype", "float16", *extract_args)
        log(f"extract {store.name}: {time.perf_counter() - t:.0f} s")
    if not (store / "splits.json").exists():
        cli("split", str(store), "--seed", "0", *(["--fractions", fractions] if fractions else []))
    return json.loads(cli("info", str(store), "--json"))
