"""Shift benchmark: does a certificate hold on what validators send (../shared/SUBNET.md)?

For each dataset and each clean-path preprocessing (``--preprocess squash``, today's default, and
``--preprocess validator``: centre square, 224 px, JPEG q75), one store is extracted by the real
`stage1 extract --views V`: view 0 is the clean image, views 1..V-1 are validator views (the
``validator`` recipe: level 0-3 with p 0.25, rotation / random resized crop / distortions, JPEG q75).
Four heads are trained on every cached view; the best one (lowest AUGRC on one validator view per
val_select image) is kept. Each exit policy is then fitted three ways on val_calib and evaluated
on **validator-view test images** (one view per image, the subnet's level mix, `evaluate --views
validator`):

* ``clean``: fitted on view 0 (what the product did before issue 10);
* ``validator``: `calibrate --views validator` (one validator view per val_calib image);
* ``per_level``: `calibrate --views validator --per-level` (one policy per level, each scored on
  that level's test views).

Reported per cell: certified, coverage, realised FNR_exit, selective error, miss rate, per level,
and whether each realised risk is within its target. Targets: Fashion-MNIST alpha 2%; TraCon
alpha 10% (its val_calib holds ~100 images: 2% cannot be certified from 50 positives).

Datasets: TraCon (../shared/data/tracon; its val = val_calib, train split 0.6/0.15/0/0.25 as in
quality.py) at 224 px; the two Fashion-MNIST pairs of quality.py at 112 px, a fixed subsample of
that draw (``--fmnist-rows``: train / val_select / val_calib / test per pair) to keep V views per
image affordable on 2 CPU cores.

Usage: ``python benchmarks/shift_bench.py --out DIR [--json PATH] [--only tracon,...] [--views V]``;
DIR keeps images, stores and runs, so a second call reuses the extracted stores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from quality_data import PAIRS, TRACON, DrawSizes, ensure_store, log, prepare_fmnist, prepare_tracon  # noqa: E402
from quality_grid import within_target  # noqa: E402

DELTA = 0.1
ALPHA = {"tracon": 0.10, **{p: 0.02 for p in PAIRS}}
PREPROCESS = ("squash", "validator")
HEADS: dict[str, dict[str, Any]] = {"mlp": {}, "gate": {"gate_target": "out_of_fold"}, "selectivenet": {}, "crc": {}}
CALIBRATIONS = ("clean", "validator", "per_level")
#: the Fashion-MNIST subsample per pair (train, val_select, val_calib, test); quality.py's full draw
#: is 7,000 / 1,000 / 4,000 / 2,000.
FMNIST_ROWS = (1500, 500, 2000, 2000)


def policies(alpha: float) -> dict[str, tuple[str, dict[str, Any]]]:
    """The exit policies checked: name -> (policy, params)."""
    return {"ltt_fnr_exit": ("ltt", dict(risk="fnr_exit", alpha=alpha, delta=DELTA)),
            "ltt_selective_error": ("ltt", dict(risk="selective_error", alpha=alpha, delta=DELTA)),
            "ltt_both": ("ltt", dict(risk="fnr_exit", alpha=alpha, eps=alpha, delta=DELTA))}


def subsample_csv(src: Path, dst: Path, rows: tuple[int, int, int, int]) -> Path:
    """The first ``rows`` of each split of ``src`` in path-hash order (a fixed, label-blind subsample)."""
    from stage1.featstore.labels import parse_labels_csv, write_labels_csv

    if dst.exists():
        return dst
    entries, _ = parse_labels_csv(src)
    want = dict(zip(("train", "val_select", "val_calib", "test"), rows))
    keep: list[tuple[str, int, str]] = []
    for split, n in want.items():
        mine = sorted((e for e in entries if e.split == split), key=lambda e: hashlib.sha256(e.path.encode()).hexdigest())
        keep += [(e.path, int(e.label), split) for e in mine[:n]]
    return write_labels_csv(dst, keep)


def ensure_view_store(store: Path, images: Path, labels: Path, size: int, preprocess: str, views: int,
                      fractions: str | None, batch_size: int) -> dict[str, Any]:
    """``quality_data.ensure_store`` with ``views`` views per image and the clean path ``preprocess``."""
    return ensure_store(store, images, labels, size, fractions, batch_size,
                        ("--views", str(views), "--preprocess", preprocess, "--view-seed", "0"))


def validator_augrc(run: Path, split: str = "val_select") -> float:
    """AUGRC of a run on one validator view per image of ``split`` (max-softmax or its selector, the lower)."""
    from scipy.special import softmax

    from stage1.policies import metrics as M
    from stage1.policies.views import draw_one_view, take_views
    from stage1.runs import layout

    vs, y, rows, _ = layout.split_view_scores(run, split)
    view, _ = draw_one_view(vs["view_levels"], rows)
    keep = view >= 0
    sc = take_views({k: v[keep] for k, v in vs.items()}, view[keep])
    p = softmax(sc["logits"].astype(np.float64), axis=1)[:, 1]
    err = ((p >= 0.5).astype(np.int64) != y[keep]).astype(np.int64)
    return min(M.augrc(np.maximum(p, 1 - p), err), M.augrc(sc["select"].astype(np.float64), err))


def train_best(store: Path, runs: Path) -> tuple[str, Path, dict[str, float]]:
    """Train every head on all cached views (skipping finished runs); the one with the lowest
    validator-view AUGRC on val_select, and every head's AUGRC."""
    from stage1.runs.steps import train_run

    augrc = {}
    for head, hp in HEADS.items():
        run = runs / head
        if not (run / "config.json").exists():
            t = time.perf_counter()
            train_run(store, head, run, dict(hp), progress=False, argv=["benchmarks/shift_bench.py", head])
            log(f"{store.name}/{head}: trained in {time.perf_counter() - t:.1f} s")
        augrc[head] = validator_augrc(run)
    best = min(augrc, key=augrc.get)
    return best, runs / best, augrc


LEVEL_KEYS = ("n", "coverage", "fnr_exit", "selective_error", "miss_rate")


def check_cell(run: Path, policy: str, params: dict[str, Any], calibration: str) -> dict[str, Any]:
    """Fit one policy one way (``CALIBRATIONS``), evaluate on validator-view test images; the cell."""
    from stage1.runs.steps import calibrate_run, evaluate_run

    views = "clean" if calibration == "clean" else "validator"
    cal = calibrate_run(run, policy, dict(params), score="auto", views=views, per_level=calibration == "per_level")
    m = evaluate_run(run, "test", views="validator")
    cell: dict[str, Any] = {
        "certified": bool(cal["certified"]), "n_calib": cal["n_calib"],
        "level_counts_calib": cal.get("level_counts"),
        **{k: m[k] for k in ("coverage", "fnr_exit", "selective_error", "miss_rate", "n")},
        "within_target": within_target(policy, params, m) if cal["certified"] else None,
        "levels": {f"level{lv}": {k: m.get(f"level{lv}_{k}") for k in LEVEL_KEYS} for lv in range(4)},
    }
    if calibration == "per_level":
        per = {}
        for lv in range(4):
            key = f"level{lv}_per_level"
            if f"{key}_certified" not in m:
                continue
            lm = {k: m.get(f"{key}_{k}") for k in LEVEL_KEYS}
            ok = m[f"{key}_certified"]
            per[f"level{lv}"] = {"certified": bool(ok), **lm, "within_target": within_target(policy, params, lm) if ok else None}
        cell["per_level"] = per
    return cell


def run_store(name: str, store: Path, runs: Path, alpha: float) -> dict[str, Any]:
    """Best head, then every policy x calibration on one store."""
    head, run, augrc = train_best(store, runs)
    cells: dict[str, dict[str, Any]] = {}
    for pname, (policy, params) in policies(alpha).items():
        for calibration in CALIBRATIONS:
            t = time.perf_counter()
            cells[f"{pname}/{calibration}"] = check_cell(run, policy, params, calibration)
            log(f"{name}: {pname}/{calibration} in {time.perf_counter() - t:.1f} s")
    return {"best_head": head, "validator_augrc_val_select": augrc, "cells": cells}


def verdicts(res: dict[str, Any]) -> dict[str, Any]:
    """Per calibration: certified policies, how many hold on validator-view test, and per level."""
    out: dict[str, Any] = {}
    for calibration in CALIBRATIONS:
        cells = [c for k, c in res["cells"].items() if k.endswith("/" + calibration)]
        cert = [c for c in cells if c["certified"]]
        entry = {"certified": len(cert), "of": len(cells), "within_target": sum(bool(c["within_target"]) for c in cert)}
        if calibration == "per_level":
            lv = [v for c in cells for v in c.get("per_level", {}).values() if v["certified"]]
            entry.update(levels_certified=len(lv), levels_within_target=sum(bool(v["within_target"]) for v in lv))
        out[calibration] = entry
    return out


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def print_report(results: dict[str, Any]) -> None:
    """One table per store: policy x calibration, overall and per level (coverage / FNR_exit / sel. err)."""
    for name, res in results["stores"].items():
        print(f"\n## {name} (best head {res['best_head']}, alpha {res['alpha']:g}, delta {DELTA:g}; test = "
              f"one validator view per image)\n")
        cols = ["policy / calibration", "certified", "coverage", "FNR_exit", "sel. err", "within target",
                *[f"L{lv} cov / FNR / err" for lv in range(4)]]
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for key, c in res["cells"].items():
            lv = [" / ".join(fmt(c["levels"][f"level{i}"][k]) for k in ("coverage", "fnr_exit", "selective_error"))
                  for i in range(4)]
            print("| " + " | ".join([key, fmt(c["certified"]), fmt(c["coverage"]), fmt(c["fnr_exit"]),
                                     fmt(c["selective_error"]), fmt(c["within_target"]), *lv]) + " |")
            for lvl, v in c.get("per_level", {}).items():
                print(f"|   {lvl} own policy | {fmt(v['certified'])} | {fmt(v['coverage'])} | {fmt(v['fnr_exit'])} | "
                      f"{fmt(v['selective_error'])} | {fmt(v['within_target'])} |" + " |" * 4)
        print("\nverdicts: " + json.dumps(res["verdicts"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="Work folder: images, stores, runs (reused by later calls).")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--only", default=None, help="Comma-separated datasets (tracon, fmnist_tshirt_shirt, fmnist_pullover_coat).")
    ap.add_argument("--preprocess", default=",".join(PREPROCESS), help="Comma-separated: squash, validator.")
    ap.add_argument("--views", type=int, default=4, help="Views per image (1 clean + V-1 validator views).")
    ap.add_argument("--fmnist-rows", default=",".join(map(str, FMNIST_ROWS)),
                    help="Fashion-MNIST subsample per pair: train,val_select,val_calib,test.")
    ap.add_argument("--alpha", type=float, default=None,
                    help="Risk target of every policy on every dataset (default: 0.02 Fashion-MNIST, 0.10 TraCon).")
    ap.add_argument("--prepare-only", action="store_true", help="Extract the stores, then stop.")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",") if args.only else ["tracon", *PAIRS]
    rows = tuple(int(x) for x in args.fmnist_rows.split(","))
    stores: dict[str, tuple[str, Path]] = {}
    for ds in wanted:
        for prep in args.preprocess.split(","):
            st = out / "stores" / f"{ds}_{prep}"
            if ds == "tracon":
                ensure_view_store(st, TRACON, prepare_tracon(out), 224, prep, args.views, "0.6,0.15,0,0.25", 16)
            else:
                csvs = prepare_fmnist(out, DrawSizes(4000, 8000, 1000))  # quality.py's draw
                sub = subsample_csv(csvs[ds], out / "fmnist" / f"{ds}_shift.csv", rows)  # type: ignore[arg-type]
                ensure_view_store(st, out / "fmnist", sub, 112, prep, args.views, None, 64)
            stores[f"{ds}_{prep}"] = (ds, st)
    if args.prepare_only:
        return {}
    results: dict[str, Any] = {"delta": DELTA, "views": args.views, "fmnist_rows": rows, "stores": {}}
    for name, (ds, st) in stores.items():
        log(f"policies on {name}")
        alpha = ALPHA[ds] if args.alpha is None else args.alpha
        res = run_store(name, st, out / "runs" / name, alpha)
        res["alpha"] = alpha
        res["verdicts"] = verdicts(res)
        res["splits"] = json.loads((st / "splits.json").read_text())["counts"]
        results["stores"][name] = res
    print_report(results)
    if args.json_path:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json_path, json_safe(results))
    return results


if __name__ == "__main__":
    main()
