"""Decision-quality benchmark: heads x exit policies vs the seeds' recipe, on real features.

Features: DINOv2-S (../shared/assets/dinov2s-imgfocus) extracted by the real `stage1
extract`, on
* Fashion-MNIST (Debian dataset-fashion-mnist, IDX files): pairs T-shirt(0) vs Shirt(6, +) and
  Pullover(2) vs Coat(4, +). From the official train set, with a fixed seed: val_calib 4,000
  (2,000 per class) and train 8,000, of which 1,000 are carved off as val_select (early stopping).
  test = the official 2,000 test images of the pair. Exact duplicate images are kept out of the
  draw (a copy of a test image never enters train / val; repeats within the pool count once).
  Images are written once as PNG under DIR/fmnist/images and extracted at --image-size 112 (a
  multiple of the patch 14; a 224 px pass over 28,000 images is too slow on 2 CPU cores).
* TraCon (../shared/data/tracon): its val as val_calib; train split by `split --fractions
  0.6,0.15,0,0.25` into train / val_select / test. 224 px.

Per dataset: heads (mlp, gate out-of-fold, selectivenet, crc with defaults) and the seed recipe
(MLP 768, dropout 0.3, label smoothing 0.1, balanced class weights, AdamW lr 1e-4, 15 epochs, no
early stopping; its gate trained in-sample), all via ``runs.steps.train_run`` (what `train` runs).
Policies are fit on val_calib only and scored on test: ltt (FNR_exit <= 2%; selective error <= 2%;
both), crc (miss rate <= 2%), and the seeds' fixed rules (softmax >= 0.88 or <= 0.12; gate >= 0.90).

Honest selection (the headline): per risk family, what the product itself would ship, chosen
among every new head x policy variant by certified coverage on **val_select** (then AUGRC) and
scored once on test, under two valid rules: ``split_delta`` (the demo's: every candidate certified
on all of val_calib at delta / K) and ``select_only`` (candidates fitted and ranked on val_select
alone; only the winner certified on val_calib, at the full delta). Each is set against the
test-label ceiling: the best coverage any threshold pair on the winner's own test scores reaches
within the targets, computed with the test labels. ``efficiency`` = certified test coverage /
ceiling; ``efficiency_min_fmnist_ltt_both/RULE`` is its minimum over the two pairs (target >= 0.9).
The per-row table and ``certified_coverage_ratio_vs_seed`` (maxima over test rows, optimistic for
both sides alike) are kept as diagnostics.

Usage: ``python benchmarks/quality.py --out DIR [--json PATH] [--only fmnist_tshirt_shirt,...]``;
DIR keeps the images, stores and runs, so a second call reuses the extracted stores.

This file is the entry point; the work is split by job beside it: ``quality_data`` (images,
labels CSVs, stores), ``quality_grid`` (heads x policies on one store), ``quality_report``
(headline ratios, tables).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:  # the sibling quality_* modules, also when imported from elsewhere
    sys.path.insert(0, str(HERE))

import quality_data  # noqa: E402
from quality_data import PAIRS, TRACON, DrawSizes, ensure_store, log, prepare_fmnist, prepare_tracon  # noqa: E402
from quality_grid import ALPHA, DELTA, run_dataset  # noqa: E402
from quality_report import headline_ratios, print_report  # noqa: E402

#: Fashion-MNIST draw sizes per pair (both classes together): val_calib, train incl. val_select, val_select.
#: Read when the draw runs, so a caller may shrink them (tests do).
N_CALIB, N_TRAIN, N_SELECT = 4000, 8000, 1000


def draw_sizes() -> DrawSizes:
    """This benchmark's draw sizes (``N_CALIB``, ``N_TRAIN``, ``N_SELECT`` as they are now)."""
    return DrawSizes(N_CALIB, N_TRAIN, N_SELECT)


def fmnist_draw(train_labels: np.ndarray, train_hashes: list[str], test_labels: np.ndarray,
                test_hashes: list[str], neg: int, pos: int, seed: int) -> dict[str, np.ndarray]:
    """One pair's train / val_select / val_calib / test indices at this benchmark's sizes (see
    ``quality_data.fmnist_draw``)."""
    return quality_data.fmnist_draw(train_labels, train_hashes, test_labels, test_hashes, neg, pos, seed,
                                    draw_sizes())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Prepare the datasets, run heads x policies on each, print the report; the results object."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="Work folder: images, stores, runs (reused by later calls).")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--only", default=None, help="Comma-separated dataset names to run.")
    ap.add_argument("--prepare-only", action="store_true", help="Write images and extract stores, then stop.")
    ap.add_argument("--fmnist-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else set(PAIRS) | {"tracon"}
    stores: dict[str, tuple[Path, dict[str, Any]]] = {}
    if wanted & set(PAIRS):
        csvs = prepare_fmnist(out, draw_sizes())
        for name in PAIRS:
            if name in wanted:
                st = out / "stores" / name
                stores[name] = (st, ensure_store(st, out / "fmnist", csvs[name], args.fmnist_size, None, args.batch_size))
    if "tracon" in wanted:
        st = out / "stores" / "tracon"
        stores["tracon"] = (st, ensure_store(st, TRACON, prepare_tracon(out), 224, "0.6,0.15,0,0.25", 16))
    if args.prepare_only:
        return {}
    results: dict[str, Any] = {"alpha": ALPHA, "delta": DELTA, "fmnist_image_size": args.fmnist_size,
                               "datasets": {}}
    for name, (st, info) in stores.items():
        log(f"heads x policies on {name}")
        res = run_dataset(name, st, out / "runs")
        res["store"] = {k: info.get(k) for k in ("rows", "dim", "views", "dtype")}
        res["splits"] = json.loads((st / "splits.json").read_text())["counts"]
        results["datasets"][name] = res
    headline_ratios(results)
    print_report(results)
    if args.json_path:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json_path, json_safe(results))
    return results


if __name__ == "__main__":
    main()
