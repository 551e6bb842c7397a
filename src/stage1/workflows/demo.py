"""``demo``: the whole main job on real data in one command, through the same functions as the CLI.

extract -> split -> train (several heads) -> calibrate -> evaluate -> export -> predict, then a
readable report. The head that goes into the bundle is chosen on val_select (certified coverage,
then AUGRC), never on test; test numbers are only reported. Re-running on the same --out reuses
the store when its provenance matches and replaces the runs, the bundle and the report.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1._core.errors import ConfigError, DataError, MissingError

if TYPE_CHECKING:  # pragma: no cover
    from stage1.policies.selection import SelectionRecord

#: 4 x 4 patches of 14 px: enough for 8x8 scans (and 28x28 Fashion-MNIST), and DINOv2-S embeds the
#: 1797 digits in 1-2 minutes on 2 cores.
DEFAULT_IMAGE_SIZE = 56
#: photos in a user's folder (e.g. TraCon street scenes) need the backbone's usual resolution.
PHOTO_IMAGE_SIZE = 224
#: train / val_select / val_calib / test. val_calib is large so a 2% - 5% risk can be certified on ~1800 images.
DEMO_FRACTIONS = (0.45, 0.10, 0.30, 0.15)
#: per-head settings that keep the demo fast (gate: 3 cross-fitting folds instead of 5).
DEMO_HEAD_PARAMS: dict[str, dict[str, Any]] = {"gate": {"folds": 3}}


@dataclass
class DemoConfig:
    """Options of ``demo`` (see ``workflows.commands.demo``)."""

    backbone: str | None = None
    images: str | None = None
    labels: list[str] = field(default_factory=list)
    out: str = "demo_out"
    image_size: int | None = None
    heads: list[str] = field(default_factory=lambda: ["mlp", "gate", "selectivenet"])
    epochs: int = 20
    policy: str = "ltt"
    alpha: float = 0.05
    delta: float = 0.1
    eps: float | None = 0.1
    max_images: int | None = None
    batch_size: int = 32
    seed: int = 0
    n_predict: int = 8
    progress: bool = True


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def default_image_size(patch_size: int, target: int = DEFAULT_IMAGE_SIZE) -> int:
    """The multiple of ``patch_size`` nearest to ``target`` (56 -> 56 for patch-14 ViTs, 64 for patch 16)."""
    return max(patch_size, int(round(target / patch_size)) * patch_size)


def merge_labels(specs: list[str], images: str, out_csv: Path) -> Path:
    """One labels CSV from several: ``PATH`` keeps its rows (and split column), ``PATH=SPLIT`` forces a split.

    E.g. TraCon: ``--labels train.csv --labels val.csv=test`` keeps its val set as our test set.
    """
    from stage1.featstore.labels import parse_labels_csv, write_labels_csv
    from stage1.featstore.splits import SPLIT_NAMES

    rows: list[tuple[str, int, str]] = []
    for spec in specs:
        path, forced = spec, ""
        if not Path(spec).is_file() and "=" in spec:
            path, forced = spec.rsplit("=", 1)
            if forced not in SPLIT_NAMES:
                raise ConfigError(f"--labels {spec}: split {forced!r} is not one of {', '.join(SPLIT_NAMES)}")
        if not Path(path).is_file():
            raise MissingError(f"--labels {path}: file not found")
        entries, _ = parse_labels_csv(path)
        rows += [(e.path, e.label, forced or e.split) for e in entries]
    if len(specs) == 1 and not any(s for _, _, s in rows) and "=" not in specs[0]:
        return Path(specs[0])
    seen: set[str] = set()
    for p, _, _ in rows:
        if p in seen:
            raise DataError(f"--labels: image {p} is listed twice across the CSVs; list each image once")
        seen.add(p)
    return write_labels_csv(out_csv, rows)


# -- steps ---------------------------------------------------------------------------------------------
def prepare_data(cfg: DemoConfig, out: Path) -> tuple[str, Path, str]:
    """(images dir, labels CSV, description) for the demo's data."""
    if cfg.images is None:
        from stage1.workflows.demodata import POSITIVE_DIGITS, write_digits

        images, csv = write_digits(out / "data", max_images=cfg.max_images, seed=cfg.seed)
        return str(images), csv, f"scikit-learn digits (8x8 scans), label 1 = digits {POSITIVE_DIGITS}"
    if not cfg.labels:
        from stage1.workflows.demodata import FASHION_POSITIVE, find_idx, write_idx_images

        if not find_idx(cfg.images):
            raise ConfigError(f"--images {cfg.images}: give --labels CSV (path,label), or point it at a folder "
                             "of Fashion-MNIST-style IDX files")
        images, csv = write_idx_images(cfg.images, out / "data", max_images=cfg.max_images, seed=cfg.seed)
        return str(images), csv, (f"IDX images from {cfg.images} (Fashion-MNIST: label 1 = classes "
                                  f"{FASHION_POSITIVE}, footwear; t10k rows -> test)")
    csv = merge_labels(cfg.labels, cfg.images, out / "labels.csv")
    if cfg.max_images is not None:
        csv = _subsample_csv(csv, cfg.max_images, cfg.seed, out / "labels_subsample.csv")
    return cfg.images, csv, f"{cfg.images} ({', '.join(cfg.labels)})"


def _subsample_csv(csv: Path, max_images: int, seed: int, out_csv: Path) -> Path:
    from stage1.featstore.labels import parse_labels_csv, write_labels_csv
    from stage1.workflows.demodata import subsample

    entries, _ = parse_labels_csv(csv)
    keep = subsample(np.array([e.label for e in entries]), max_images, seed)
    return write_labels_csv(out_csv, [entries[i] for i in keep])


def extract_store(cfg: DemoConfig, images: str, labels: Path, backbone: Any, backbone_path: str,
                  image_size: int, store: Path) -> dict[str, Any]:
    """Extract (or resume / reuse) the store; a store made with other settings is rebuilt."""
    from stage1.featstore.extract import ExtractConfig, run_extract
    from stage1.featstore.store import ProvenanceMismatch

    ecfg = ExtractConfig(images=images, backbone=backbone_path, out=str(store), labels=str(labels),
                         batch_size=cfg.batch_size, image_size=image_size, dtype="float32", views=1,
                         workers=0 if cfg.images is None else min(2, os.cpu_count() or 1),
                         progress=cfg.progress)
    try:
        return run_extract(ecfg, backbone=backbone)
    except ProvenanceMismatch as exc:
        _log(f"{store} was made with other settings ({str(exc)[:200]}); rebuilding it")
        shutil.rmtree(store)
        return run_extract(ecfg, backbone=backbone)


def _policy_params(cfg: DemoConfig) -> dict[str, Any]:
    """The policy's parameters; with K heads to choose from, ltt's delta is split K ways (Bonferroni)
    so that the chosen head's certificate still holds at --delta."""
    params: dict[str, Any] = {"alpha": cfg.alpha, "seed": cfg.seed}
    if cfg.policy == "ltt":  # FNR_exit and, with eps, the selective error (false alarms included)
        params.update(delta=cfg.delta / max(1, len(cfg.heads)), risk="fnr_exit", eps=cfg.eps)
    return params


def _selection(cfg: DemoConfig) -> "SelectionRecord":
    from stage1.policies.selection import DEFAULT_CERTIFY_FRACTION, PART_SEED, SelectionRecord

    k = len(cfg.heads)
    if k == 1:
        return SelectionRecord("none", 1, "all", DEFAULT_CERTIFY_FRACTION, PART_SEED)
    # ltt's delta is split over the heads (_policy_params); other policies have no delta to split
    method = "bonferroni" if cfg.policy == "ltt" else "unadjusted"
    return SelectionRecord(method, k, "all", DEFAULT_CERTIFY_FRACTION, PART_SEED, k,
                           "val_select certified coverage, then AUGRC")


def train_heads(cfg: DemoConfig, store: Path, runs: Path) -> dict[str, dict[str, Any]]:
    """train -> calibrate -> evaluate (val_select and test) for every head; results per head.

    Choosing one of K heads by how they certified would void the certificate, so each head's
    policy is certified on all of val_calib at delta / K (``policies.selection.choose_split_delta``
    is the same rule): no head is falsely certified with probability >= 1 - delta. (The sweep, with
    many candidates, holds out a certify part instead.) crc's guarantee is an expectation for a
    fixed rule and gets no such correction: the report says so.
    """
    from stage1.runs.steps import calibrate_run, evaluate_run, train_run

    if runs.exists():
        shutil.rmtree(runs)  # the demo's own folder: a re-run replaces its runs
    results: dict[str, dict[str, Any]] = {}
    for name in cfg.heads:
        run = runs / name
        t0 = time.perf_counter()
        _log(f"train {name}")
        hparams = {**DEMO_HEAD_PARAMS.get(name, {}), "epochs": cfg.epochs, "seed": cfg.seed}
        trained = train_run(store, name, run, hparams, progress=cfg.progress)
        cal = calibrate_run(run, cfg.policy, _policy_params(cfg), score="auto", selection=_selection(cfg))
        val = evaluate_run(run, "val_select")
        test = evaluate_run(run, "test")
        results[name] = {"run": str(run), "train": trained, "calibration": cal, "val_select": val, "test": test,
                         "seconds": time.perf_counter() - t0}
    return results


def choose_head(results: dict[str, dict[str, Any]]) -> str:
    """The head for the bundle: highest certified coverage on val_select, then lowest AUGRC (never test)."""
    def key(name: str) -> tuple[float, float]:
        r = results[name]
        cov = float(r["val_select"]["coverage"]) if r["calibration"]["certified"] else 0.0
        return (-cov, float(r["val_select"]["augrc"]))

    return min(results, key=key)


def predict_check(bundle: Path, backbone_path: str, run: Path, store: Path, n: int, batch_size: int
                  ) -> tuple[list[dict[str, Any]], int, int]:
    """Predict ``n`` test images from files with the bundle; count agreement with the run's own decisions."""
    from stage1.featstore import open_store
    from stage1.runs import layout
    from stage1.policies import policy_from_dict
    from stage1.workflows.predictor import Stage1Predictor

    st = open_store(str(store))
    scores, _, rows, _ = layout.split_scores(run, "test")
    rows = rows[:n]
    root = Path(st.provenance.get("images_root", ""))
    paths = [str(root / st.ids[int(r)]) for r in rows]
    predictor = Stage1Predictor.from_bundle(bundle, backbone=backbone_path)
    records = predictor.predict(paths, batch_size=batch_size)
    ref = policy_from_dict(layout.read_policy(run)).decide({k: v[: len(rows)] for k, v in scores.items()})
    agree = sum(int(rec.get("decision") == ("exit" if ref.exit[i] else "defer")
                    and (not ref.exit[i] or rec.get("label") == int(ref.label[i])))
                for i, rec in enumerate(records))
    return records, agree, len(records)


# -- the whole demo ---------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig) -> str:
    """Run every step, write OUT/report.md and return the report text."""
    import json

    from stage1.featstore.backbones import check_image_size, load_backbone
    from stage1._core.io import atomic_write_text
    from stage1.featstore.splits import write_splits
    from stage1.workflows.bundle import export_bundle

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [h for h in cfg.heads if h not in _head_names()]
    if not cfg.heads or unknown:
        raise ConfigError(f"--heads: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(_head_names())}")
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if cfg.backbone is None:
        from stage1.workflows.imgfocus import ensure_backbone

        backbone_path = str(ensure_backbone())
    else:
        backbone_path = cfg.backbone
    backbone = load_backbone(backbone_path)
    timings["backbone"] = time.perf_counter() - t

    t = time.perf_counter()
    images, labels, data_desc = prepare_data(cfg, out)
    timings["data"] = time.perf_counter() - t
    photos = cfg.images is not None and bool(cfg.labels)  # a user's photo folder, not small scans
    image_size = cfg.image_size or default_image_size(backbone.patch_size, PHOTO_IMAGE_SIZE if photos else DEFAULT_IMAGE_SIZE)
    check_image_size(image_size, backbone.patch_size)

    t = time.perf_counter()
    store = out / "store"
    _log(f"extract {data_desc} at {image_size}px with {backbone_path}")
    extracted = extract_store(cfg, images, labels, backbone, backbone_path, image_size, store)
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    splits = write_splits(store, seed=cfg.seed, fractions=DEMO_FRACTIONS)
    timings["split"] = time.perf_counter() - t

    t = time.perf_counter()
    results = train_heads(cfg, store, out / "runs")
    timings["train+calibrate+evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    best = choose_head(results)
    bundle = export_bundle(results[best]["run"], out / "bundle", force=True)
    timings["export"] = time.perf_counter() - t

    t = time.perf_counter()
    records, agree, n_pred = predict_check(bundle, backbone_path, Path(results[best]["run"]), store,
                                           cfg.n_predict, cfg.batch_size)
    timings["predict"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    report = format_report(cfg, data_desc, backbone_path, image_size, extracted, splits, results, best,
                           bundle, records, agree, n_pred, timings)
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return report


def _head_names() -> list[str]:
    from stage1.heads import HEADS

    return HEADS.names()


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{100 * float(v):.1f}%" if pct else f"{float(v):.4f}"


def format_report(cfg: DemoConfig, data_desc: str, backbone_path: str, image_size: int, extracted: dict[str, Any],
                  splits: dict[str, Any], results: dict[str, dict[str, Any]], best: str, bundle: Path,
                  records: list[dict[str, Any]], agree: int, n_pred: int, timings: dict[str, float]) -> str:
    """The readable report: data, splits, one row per head, the chosen bundle, predictions, plots, timings."""
    import json

    counts = splits.get("counts", {})
    split_line = ", ".join(f"{k} {v.get('n', v) if isinstance(v, dict) else v}" for k, v in counts.items())
    risk = "FNR_exit" if cfg.policy == "ltt" else "miss rate"
    lines = [
        "# Stage-1 demo report", "",
        f"Data: {data_desc}",
        f"Backbone: {backbone_path} (input {image_size}px)",
        f"Store: {Path(cfg.out) / 'store'} ({_extract_summary(extracted)})",
        f"Splits: {split_line}",
        f"Policy: {cfg.policy}, target {risk} <= {cfg.alpha:g}"
        + (f" and selective error <= {cfg.eps:g}" if cfg.policy == "ltt" and cfg.eps is not None else "")
        + (f", delta {cfg.delta:g}" if cfg.policy == "ltt" else "") + " (fit on val_calib only)",
        (f"Each head certified at delta / {len(cfg.heads)} (Bonferroni), so the chosen head's certificate holds "
         f"at {cfg.delta:g}." if cfg.policy == "ltt" and len(cfg.heads) > 1 else ""), "",
        "| head | val acc | val AUGRC | certified | test acc | test coverage | test FNR_exit | test miss rate | test sel. error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        v, te = r["val_select"], r["test"]
        mark = " (bundle)" if name == best else ""
        lines.append(f"| {name}{mark} | {_fmt(v['accuracy'], True)} | {_fmt(v['augrc'])} | "
                     f"{'yes' if r['calibration']['certified'] else 'no'} | {_fmt(te['accuracy'], True)} | "
                     f"{_fmt(te['coverage'], True)} | {_fmt(te['fnr_exit'], True)} | {_fmt(te['miss_rate'], True)} | "
                     f"{_fmt(te['selective_error'], True)} |")
    cal = results[best]["calibration"]
    lines += ["", f"Chosen on val_select (certified coverage, then AUGRC): {best}.",
              f"Guarantee of the bundle: {cal['statement']}"]
    if not cal["certified"] and cal.get("n_needed"):
        lines.append(f"  -> not certifiable at this size; about {cal['n_needed']} calibration positives needed.")
    lines += [f"Bundle: {bundle}", "",
              f"predict on {n_pred} test images read from disk (agrees with the run's own decisions on {agree}/{n_pred}):"]
    lines += ["  " + json.dumps(r) for r in records]
    lines += ["", "Plots:"]
    for name, r in results.items():
        run = Path(r["run"])
        lines.append(f"  {name}: {run / 'risk_coverage.png'}, {run / 'reliability.png'}")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
    return "\n".join(lines)


def _extract_summary(extracted: dict[str, Any]) -> str:
    keys = [k for k in ("rows", "quarantined", "processed", "img_per_s", "seconds") if k in extracted]
    parts = []
    for k in keys:
        v = extracted[k]
        parts.append(f"{k} {len(v) if isinstance(v, list) else (round(v, 1) if isinstance(v, float) else v)}")
    return ", ".join(parts) or "ok"
