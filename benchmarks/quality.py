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
early stopping; its gate trained in-sample), all via ``heads.training.train_run`` (what `train`
runs). Policies are fit on val_calib only and scored on test: ltt (FNR_exit <= 2%; selective error
<= 2%; both), crc (miss rate <= 2%), and the seeds' fixed rules (softmax >= 0.88 or <= 0.12; gate
>= 0.90). `certified_coverage_ratio_vs_seed` = min over the two Fashion-MNIST pairs of (best
certified coverage of a head / the seed MLP's certified coverage under the same ltt).

Usage: ``python benchmarks/quality.py --out DIR [--json PATH] [--only fmnist_tshirt_shirt,...]``;
DIR keeps the images, stores and runs, so a second call reuses the extracted stores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
BACKBONE = SHARED / "assets" / "dinov2s-imgfocus"
TRACON = SHARED / "data" / "tracon"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
PAIRS = {"fmnist_tshirt_shirt": (0, 6), "fmnist_pullover_coat": (2, 4)}  # (negative, positive)
N_CALIB, N_TRAIN, N_SELECT = 4000, 8000, 1000
SEED = 20240
ALPHA, DELTA = 0.02, 0.1

SEED_RECIPE: dict[str, Any] = dict(
    hidden=768, dropout=0.3, label_smoothing=0.1, class_weights="balanced", lr=1e-4, epochs=15,
    early_stopping=False, ema_decay=0.0, standardize=False, warmup_frac=0.0, min_lr_ratio=1.0,
    grad_clip=0.0, batch_size=64, weight_decay=0.01,
)
HEAD_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {}),
    "gate_oof": ("gate", {"gate_target": "out_of_fold"}),
    "selectivenet": ("selectivenet", {}),
    "crc": ("crc", {}),
    "seed_mlp": ("mlp", SEED_RECIPE),
    "seed_gate": ("gate", {**SEED_RECIPE, "gate_target": "in_sample"}),
}
LTT = {
    "ltt_fnr_exit": dict(risk="fnr_exit", alpha=ALPHA, delta=DELTA),
    "ltt_selective_error": dict(risk="selective_error", alpha=ALPHA, delta=DELTA),
    "ltt_both": dict(risk="fnr_exit", alpha=ALPHA, eps=ALPHA, delta=DELTA),
}


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ data preparation
def _pixel_hash(img: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()


def fmnist_draw(train_labels: np.ndarray, train_hashes: list[str], test_labels: np.ndarray,
                test_hashes: list[str], neg: int, pos: int, seed: int) -> dict[str, np.ndarray]:
    """Indices into the official train / test sets for one pair: train, val_select, val_calib, test.

    val_calib: N_CALIB/2 per class; val_select: N_SELECT/2 per class; train: the rest (<= N_TRAIN -
    N_SELECT). Duplicates of test images and repeated pool images are left out of the pool.
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
        k_cal, k_sel = N_CALIB // 2, N_SELECT // 2
        k_tr = min(len(pool) - k_cal - k_sel, (N_TRAIN - N_SELECT) // 2)
        out["val_calib"] += pool[:k_cal].tolist()
        out["val_select"] += pool[k_cal:k_cal + k_sel].tolist()
        out["train"] += pool[k_cal + k_sel:k_cal + k_sel + k_tr].tolist()
    res = {k: np.sort(np.array(v, dtype=np.int64)) for k, v in out.items()}
    res["test"] = test_idx
    return res


def prepare_fmnist(out: Path) -> dict[str, Path]:
    """Write the pair images once as PNG and one labels CSV (path,label,split) per pair."""
    from PIL import Image

    from stage1._core.io import atomic_path, atomic_write_json, atomic_write_text
    from stage1.workflows.demodata import find_idx, read_idx

    root = out / "fmnist"
    img_dir = root / "images"
    csvs = {name: root / f"{name}.csv" for name in PAIRS}
    if all(p.exists() for p in csvs.values()):
        return csvs
    found = find_idx(FMNIST)
    tr_x, tr_y = read_idx(found["train-images"]), read_idx(found["train-labels"])
    te_x, te_y = read_idx(found["t10k-images"]), read_idx(found["t10k-labels"])
    tr_h = [_pixel_hash(a) for a in tr_x]
    te_h = [_pixel_hash(a) for a in te_x]
    img_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"seed": SEED, "pairs": {}}
    for name, (neg, pos) in PAIRS.items():
        draw = fmnist_draw(tr_y, tr_h, te_y, te_h, neg, pos, SEED)
        lines = ["path,label,split"]
        for split, idx in draw.items():
            part, xs, ys = ("t10k", te_x, te_y) if split == "test" else ("train", tr_x, tr_y)
            for i in idx:
                rel = f"images/{part}-{i:05d}.png"
                target = root / rel
                if not target.exists():
                    with atomic_path(target, fsync=False) as tmp:
                        Image.fromarray(xs[i], mode="L").save(tmp, format="PNG")
                lines.append(f"{rel},{int(ys[i] == pos)},{split}")
        atomic_write_text(csvs[name], "\n".join(lines) + "\n")
        manifest["pairs"][name] = {"negative_class": neg, "positive_class": pos,
                                   **{k: int(len(v)) for k, v in draw.items()}}
        log(f"{name}: " + ", ".join(f"{k} {len(v)}" for k, v in draw.items()))
    atomic_write_json(root / "manifest.json", manifest)
    return csvs


def prepare_tracon(out: Path) -> Path:
    """One labels CSV for TraCon: val rows forced to val_calib, train rows left to `split`."""
    from stage1._core.io import atomic_write_text

    path = out / "tracon" / "labels.csv"
    if path.exists():
        return path
    lines = ["path,label,split"]
    for name, split in (("train.csv", ""), ("val.csv", "val_calib")):
        rows = (TRACON / name).read_text(encoding="utf-8").splitlines()[1:]
        for row in rows:
            p, lab = row.rsplit(",", 1)
            lines.append(f"{p},{lab},{split}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def cli(*args: str) -> str:
    """Run `stage1 ARGS` (the real commands); its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "stage1", *args], env=env, text=True,
                         stdout=subprocess.PIPE, cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"`stage1 {' '.join(args)}` failed with exit code {res.returncode}")
    return res.stdout


def ensure_store(store: Path, images: Path, labels: Path, image_size: int, fractions: str | None,
                 batch_size: int) -> dict[str, Any]:
    """Extract (or resume / reuse) the store, then split it once; the `info --json` object."""
    done = False
    if (store / "zarr.json").exists():
        info = json.loads(cli("info", str(store), "--json"))
        done = info.get("committed") == info.get("rows") and info.get("complete", True)
    if not done:
        log(f"extract {store.name} ({image_size} px)")
        t = time.perf_counter()
        cli("extract", "--images", str(images), "--labels", str(labels), "--backbone", str(BACKBONE),
            "--out", str(store), "--image-size", str(image_size), "--batch-size", str(batch_size),
            "--workers", "1", "--dtype", "float16")
        log(f"extract {store.name}: {time.perf_counter() - t:.0f} s")
    if not (store / "splits.json").exists():
        cli("split", str(store), "--seed", "0", *(["--fractions", fractions] if fractions else []))
    return json.loads(cli("info", str(store), "--json"))


# ------------------------------------------------------------------------------ heads x policies
def train_all(store: Path, runs: Path) -> dict[str, Path]:
    """Train every head run (skipping runs already complete); run folders by name."""
    from stage1.runs.steps import train_run

    out = {}
    for name, (head, hp) in HEAD_RUNS.items():
        run = runs / name
        if not (run / "config.json").exists():
            t = time.perf_counter()
            train_run(store, head, run, dict(hp), progress=False, argv=["benchmarks/quality.py", name])
            log(f"{store.name}/{name}: trained in {time.perf_counter() - t:.1f} s")
        out[name] = run
    return out


CALIBRATION_VARIANTS = {"cal": "temperature", "raw": None}


def policy_specs(head_run: str, has_selector: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """Policies evaluated for one head run: name -> (policy, params).

    Names are ``{family}/{variant}[@select]``: family ltt_fnr_exit / ltt_selective_error / ltt_both /
    crc_miss_rate; variant ``cal`` = the policies' default (temperature fit on 30% of val_calib,
    thresholds certified on the other 70%) or ``raw`` = no calibrator, all of val_calib certifies
    (max-softmax is monotone in the temperature, so the same exit sets are reachable);
    ``@select`` thresholds the head's learned selector instead of the probability.
    """
    scores = ["select", "p"] if has_selector else ["p"]
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    for sc in scores:
        tag = "" if sc == "p" else "@select"
        for variant, cal in CALIBRATION_VARIANTS.items():
            for name, params in LTT.items():
                specs[f"{name}/{variant}{tag}"] = ("ltt", {**params, "score": sc, "calibrator": cal})
            specs[f"crc_miss_rate/{variant}{tag}"] = ("crc", {"alpha": ALPHA, "score": sc, "calibrator": cal})
    if head_run == "seed_mlp":
        specs["seed_softmax_0.88"] = ("threshold", {"threshold": 0.88, "score": "p", "calibrator": None})
    if head_run == "seed_gate":
        specs["seed_gate_0.90"] = ("threshold", {"threshold": 0.90, "score": "select", "calibrator": None})
    return specs


def family(policy_name: str) -> str:
    return policy_name.split("/")[0]


def evaluate_policies(run: Path) -> list[dict[str, Any]]:
    """Fit each policy on val_calib, score on test; one row per policy (what calibrate + evaluate do)."""
    from stage1.policies import POLICIES
    from stage1.policies.evaluate import evaluation_metrics
    from stage1.policies.metrics import selective_risks

    from stage1.runs import layout

    cfg = layout.read_config(run)
    cal_scores, cal_y, _, _ = layout.split_scores(run, "val_calib")
    te_scores, te_y, _, _ = layout.split_scores(run, "test")
    vs_scores, vs_y, _, _ = layout.split_scores(run, "val_select")
    rows = []
    for pname, (policy, params) in policy_specs(run.name, bool(cfg["head_has_selector"])).items():
        pol = POLICIES.create(policy, **params).fit(cal_scores, cal_y)
        m = evaluation_metrics(te_y, te_scores, pol.decide(te_scores))
        dv = pol.decide(vs_scores)
        mv = selective_risks(vs_y, dv.label.astype(np.int64), dv.exit)
        certifying = pol.guarantee != "none"
        rows.append({
            "head_run": run.name, "head": cfg["head"], "policy": pname, "guarantee": pol.guarantee,
            "certified": bool(pol.certified) if certifying else None, "n_needed": pol.n_needed,
            "reason": pol.reason,
            **{k: m[k] for k in ("accuracy", "augrc", "ece", "ece_uncalibrated", "coverage", "selective_error",
                                 "fnr_exit", "miss_rate", "n", "n_pos")},
            "certified_coverage": (m["coverage"] if pol.certified else 0.0) if certifying else None,
            "within_target": within_target(policy, params, m) if certifying and pol.certified else None,
            **{f"val_select_{k}": mv[k] for k in ("coverage", "fnr_exit", "selective_error", "miss_rate")},
        })
    return rows


def within_target(policy: str, params: dict[str, Any], m: dict[str, Any]) -> bool:
    """Realised test risks of a certified policy at or under its targets (NaN = nothing exited: ok)."""
    def ok(v: float, target: float) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v)) or v <= target + 1e-12

    if policy == "crc":
        return ok(m["miss_rate"], params["alpha"])
    risk = {"fnr_exit": "fnr_exit", "selective_error": "selective_error"}[params["risk"]]
    good = ok(m[risk], params["alpha"])
    if params.get("eps") is not None:
        good = good and ok(m["selective_error"], params["eps"])
    return good


def oracle_coverage_fnr_exit(run: Path, alpha: float = ALPHA) -> float:
    """Diagnostic ceiling, NOT a policy: the largest test coverage any threshold pair on the raw p
    reaches with test FNR_exit <= alpha, chosen with the test labels themselves."""
    from scipy.special import softmax

    from stage1.runs import layout

    s, y, _, _ = layout.split_scores(run, "test")
    p = softmax(s["logits"].astype(np.float64), axis=1)[:, 1]
    pos_exit1 = int(((p >= 0.5) & (y == 1)).sum())
    best = float((p >= 0.5).mean())
    for t in np.unique(p[p < 0.5]):
        miss = int(((p <= t) & (y == 1)).sum())
        if miss <= alpha * (pos_exit1 + miss):
            best = max(best, float(((p >= 0.5) | (p <= t)).mean()))
    return best


def cli_roundtrip(run: Path) -> dict[str, Any]:
    """The primary policy once through the real `calibrate` and `evaluate` commands."""
    out = cli("calibrate", str(run), "--policy", "ltt", "--risk", "fnr_exit", "--alpha", str(ALPHA),
              "--eps", str(ALPHA), "--delta", str(DELTA), "--score", "p")
    cli("evaluate", str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    return {"calibrate": json.loads(out[out.index("{"):]), "coverage": metrics["coverage"],
            "fnr_exit": metrics["fnr_exit"], "selective_error": metrics["selective_error"]}


def best_calibrated_ece(run: Path) -> dict[str, float]:
    """Positive-class test ECE of each calibrator fit on val_calib (identity = raw softmax)."""
    from scipy.special import softmax

    from stage1.runs import layout
    from stage1.policies import metrics as M
    from stage1.policies.calibrators import CALIBRATORS

    cal_scores, cal_y, _, _ = layout.split_scores(run, "val_calib")
    te_scores, te_y, _, _ = layout.split_scores(run, "test")
    out = {"identity": M.ece(te_y, softmax(te_scores["logits"].astype(np.float64), axis=1)[:, 1])}
    for name in ("temperature", "platt", "isotonic", "beta"):
        cal = CALIBRATORS.create(name).fit(cal_scores["logits"].astype(np.float64), cal_y)
        out[name] = M.ece(te_y, cal.p1(te_scores["logits"].astype(np.float64)))
    return out


def head_metrics(run: Path) -> dict[str, Any]:
    """Head-level test metrics independent of any policy: accuracy and AUGRC of its own ``select``
    score and of max-softmax, and the positive-class ECE after each calibrator (fit on val_calib)."""
    from scipy.special import softmax

    from stage1.runs import layout
    from stage1.policies import metrics as M

    s, y, _, _ = layout.split_scores(run, "test")
    p = softmax(s["logits"].astype(np.float64), axis=1)[:, 1]
    err = ((p >= 0.5).astype(np.int64) != y).astype(np.int64)
    ece = best_calibrated_ece(run)
    best_cal = min((k for k in ece if k != "identity"), key=ece.get)
    return {"accuracy": float(1 - err.mean()), "augrc_select": M.augrc(s["select"].astype(np.float64), err),
            "augrc_maxp": M.augrc(np.maximum(p, 1 - p), err), "ece_by_calibrator": ece,
            "ece_best_calibrated": ece[best_cal], "best_calibrator": best_cal,
            "oracle_test_coverage_fnr_exit": oracle_coverage_fnr_exit(run),
            "oracle_test_coverage_selective_error": max(M.coverage_at_risk(np.maximum(p, 1 - p), err, ALPHA),
                                                        M.coverage_at_risk(s["select"].astype(np.float64), err, ALPHA))}


def summarise(rows: list[dict[str, Any]], heads_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per risk family: best certified coverage of the new heads (any variant / score) vs the seed
    MLP's best under the same ltt family; AUGRC of the best head vs the seed MLP."""
    out: dict[str, Any] = {}
    for fam in [*LTT, "crc_miss_rate"]:
        fam_rows = [r for r in rows if family(r["policy"]) == fam]
        seed = [r for r in fam_rows if r["head_run"] == "seed_mlp"]
        new = [r for r in fam_rows if not r["head_run"].startswith("seed")]
        best_seed = max(seed, key=lambda r: r["certified_coverage"] or 0.0) if seed else None
        best = max(new, key=lambda r: r["certified_coverage"] or 0.0) if new else None
        seed_cov = best_seed["certified_coverage"] if best_seed else None
        best_cov = best["certified_coverage"] if best else None
        ratio = None
        if seed_cov and best_cov is not None:
            ratio = best_cov / seed_cov
        elif best_cov:
            ratio = math.inf
        keys = ("head_run", "policy", "certified_coverage", "fnr_exit", "selective_error", "miss_rate", "within_target")
        out[fam] = {"seed_mlp": None if best_seed is None else {k: best_seed[k] for k in keys},
                    "best_new_head": None if best is None else {k: best[k] for k in keys},
                    "ratio_vs_seed": ratio,
                    "all_certified_within_target": all(r["within_target"] for r in fam_rows if r["certified"])}
    new_heads = {k: v for k, v in heads_info.items() if not k.startswith("seed")}
    best_run = min(new_heads, key=lambda k: min(new_heads[k]["augrc_select"], new_heads[k]["augrc_maxp"]))
    best_augrc = min(new_heads[best_run]["augrc_select"], new_heads[best_run]["augrc_maxp"])
    seed_augrc = heads_info["seed_mlp"]["augrc_maxp"]
    out["augrc"] = {"seed_mlp": seed_augrc, "best_head": best_run, "best": best_augrc,
                    "ratio_vs_seed": best_augrc / seed_augrc}
    out["ece_best_calibrated"] = {k: {"ece": v["ece_best_calibrated"], "calibrator": v["best_calibrator"]}
                                  for k, v in heads_info.items()}
    return out


def run_dataset(name: str, store: Path, runs_root: Path) -> dict[str, Any]:
    runs = train_all(store, runs_root / name)
    rows: list[dict[str, Any]] = []
    for run in runs.values():
        rows += evaluate_policies(run)
    heads_info = {n: head_metrics(r) for n, r in runs.items()}
    return {"rows": rows, "heads": heads_info, "summary": summarise(rows, heads_info),
            "cli_roundtrip_mlp": cli_roundtrip(runs["mlp"]),
            "training_seconds": {n: json.loads((r / "config.json").read_text())["training"]["seconds_fit"]
                                 for n, r in runs.items()}}


# ------------------------------------------------------------------------------ report
def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Every (head run, policy) row."""
    cols = ["head_run", "policy", "coverage", "certified", "fnr_exit", "selective_error", "miss_rate",
            "within_target", "n_needed", "val_select_miss_rate"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def summary_table(res: dict[str, Any]) -> str:
    """One row per head run: head metrics and its best certified coverage per risk family."""
    cols = ["head_run", "accuracy", "AUGRC select / maxp", "ECE raw -> best calibrated",
            "cert. cov. FNR_exit<=2%", "cert. cov. sel.err<=2%", "cert. cov. both", "test FNR_exit / sel.err (both)",
            "CRC cov. / test miss", "oracle cov. FNR_exit / sel.err (test labels)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for run, h in res["heads"].items():
        mine = [r for r in res["rows"] if r["head_run"] == run]

        def best(fam: str) -> dict[str, Any] | None:
            rs = [r for r in mine if family(r["policy"]) == fam]
            return max(rs, key=lambda r: r["certified_coverage"] or 0.0) if rs else None

        def cov(fam: str) -> str:
            b = best(fam)
            if b is None or not b["certified"]:
                return "0 (n_needed " + fmt(min((r["n_needed"] or 10**9) for r in mine if family(r["policy"]) == fam)) + ")"
            return f"{b['certified_coverage']:.3f} ({b['policy'].split('/', 1)[1]})"

        both = best("ltt_both")
        crc = best("crc_miss_rate")
        lines.append("| " + " | ".join([
            run, fmt(h["accuracy"]), f"{h['augrc_select']:.4f} / {h['augrc_maxp']:.4f}",
            f"{h['ece_by_calibrator']['identity']:.3f} -> {h['ece_best_calibrated']:.3f} ({h['best_calibrator']})",
            cov("ltt_fnr_exit"), cov("ltt_selective_error"), cov("ltt_both"),
            "-" if not both or not both["certified"] else f"{fmt(both['fnr_exit'])} / {fmt(both['selective_error'])}",
            "-" if not crc or not crc["certified"] else f"{crc['coverage']:.3f} / {crc['miss_rate']:.3f}",
            f"{h['oracle_test_coverage_fnr_exit']:.3f} / {h['oracle_test_coverage_selective_error']:.3f}",
        ]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
        csvs = prepare_fmnist(out)
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
    for fam in LTT:
        ratios = [results["datasets"][p]["summary"][fam]["ratio_vs_seed"] for p in PAIRS if p in results["datasets"]]
        ok = ratios and all(r is not None for r in ratios)
        results[f"certified_coverage_ratio_vs_seed_{fam}"] = min(ratios) if ok else None
    results["certified_coverage_ratio_vs_seed"] = results["certified_coverage_ratio_vs_seed_ltt_both"]
    for name, res in results["datasets"].items():
        print(f"\n## {name}\n")
        print(summary_table(res))
        print(f"\n<details><summary>all policies</summary>\n\n{markdown_table(res['rows'])}\n\n</details>")
        print(json.dumps(res["summary"], indent=1, default=str))
    for fam in LTT:
        print(f"certified_coverage_ratio_vs_seed_{fam} = {results[f'certified_coverage_ratio_vs_seed_{fam}']}")
    if args.json_path:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json_path, json_safe(results))
    return results


if __name__ == "__main__":
    main()
