"""Does full-image adaptation help the cached-feature heads? And what does a training step cost?

On a labelled image folder (default ../shared/data/tracon) with a backbone (default DINOv2-S from
../shared/assets), in ONE run and through the product's own CLI:

1. base:      extract -> split -> train a gate head -> calibrate (one fixed policy) -> evaluate test
2. adapted:   ``adapt`` (ExPLoRA, DINO self-distillation) on the train + val_select images only,
              then the same extract -> ... -> evaluate
3. finetuned: ``finetune`` (LoRA on the last blocks, mlp head) on train, early stop on val_select,
              then the same pipeline
4. explora:   ``finetune`` on top of the adapted backbone (ExPLoRA's full recipe), same pipeline

Every variant uses the same split (the store split, seed 0: finetune recomputes it from content
hashes) and the same gate head and policy settings; test images are never trained on. Then it
times a training step of each mode on a fixed batch (forward + backward + update) next to a frozen
forward pass (what extraction costs), as images per second and ratios.

    python benchmarks/finetune_bench.py [--json PATH] [--image-size 112] [--epochs 2] ...

``--ablate-adapt`` instead measures adapt's objective options on a CPU-sized budget: adapt (1 epoch,
the student's weights kept) on ``--n-adapt`` TraCon train images with the simplified DINO objective
alone, with ``--multi-crop 2`` and with ``--ibot-weight 1``; then a logistic-regression probe on the
clean CLS features of those images, scored on the held-out val.csv images (never adapted on), next
to the base backbone's:

    python benchmarks/finetune_bench.py --ablate-adapt [--n-adapt 128] [--image-size 112] [--json PATH]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = ROOT.parent / "shared"
METRIC_KEYS = ("accuracy", "mcc", "nll", "brier", "ece", "aurc", "augrc", "coverage", "selective_error",
               "fnr_exit", "miss_rate", "n")


def cli(args: list[str]) -> str:
    """Run one product command in-process; raise with its output when it fails."""
    from click.testing import CliRunner

    from stage1 import cli as product

    res = CliRunner().invoke(product.main, args)
    if res.exit_code != 0:
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        raise RuntimeError(f"`{' '.join(args[:1])}` failed ({res.exit_code}): {res.output[-2000:]}")
    return res.stdout


def labels_csv(images: Path, work: Path) -> Path:
    """All labelled images of the folder in one CSV (train.csv + val.csv for tracon)."""
    sources = [images / "labels.csv"] if (images / "labels.csv").exists() else sorted(images.glob("*.csv"))
    rows: list[tuple[str, str]] = []
    for src in sources:
        with open(src, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                rows.append((row["path"], row["label"]))
    out = work / "labels.csv"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return out


def evaluate_backbone(name: str, backbone: Path, images: Path, labels: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """extract -> split -> train gate -> calibrate -> evaluate (test); returns test metrics + timings."""
    from stage1._core.io import read_json

    store, run = work / f"store_{name}", work / f"run_{name}"
    t0 = time.perf_counter()
    cli(["extract", "--images", str(images), "--labels", str(labels), "--backbone", str(backbone), "--out", str(store),
         "--image-size", str(args.image_size), "--batch-size", "32", "--workers", str(args.workers), "--quiet"])
    t_extract = time.perf_counter() - t0
    cli(["split", str(store), "--seed", "0"])
    cli(["train", str(store), "--head", "gate", "--out", str(run), "--seed", "0", "--quiet"])
    cli(["calibrate", str(run), "--policy", args.policy, *args.policy_args])
    cli(["evaluate", str(run), "--split", "test"])
    metrics = read_json(run / "metrics.json")
    policy = read_json(run / "policy.json")
    return {
        "test": {k: metrics.get(k) for k in METRIC_KEYS},
        "val_select_best_objective": read_json(run / "head.json").get("training", {}).get("best_objective"),
        "policy_certified": policy.get("certified"),
        "extract_s": round(t_extract, 2),
        "splits": read_json(store / "splits.json")["counts"],
    }


def adapt_list(store: Path, work: Path) -> Path:
    """CSV of the train + val_select images of the base store (adapt never sees val_calib / test)."""
    from stage1.featstore import open_store
    from stage1.featstore.splits import load_splits

    st = open_store(store)
    splits = load_splits(store)
    ids = st.ids
    out = work / "adapt_images.csv"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for name in ("train", "val_select"):
            for row in splits[name]:
                writer.writerow([str(ids[row]), ""])
    return out


def step_throughput(backbone_dir: Path, image_size: int, batch: int, steps: int, blocks: int, unfreeze: int) -> dict[str, float]:
    """Images per second of: a frozen forward (extraction), a finetune step, an adapt step."""
    import torch

    from stage1.featstore.backbones import load_backbone
    from stage1.finetune.adapters import AdapterSpec, attach, trainable
    from stage1.finetune.dino import DinoHead, DinoLoss
    from stage1.finetune.loop import cls_features
    from stage1.finetune.targets import block_indices, block_parameter_names, find_blocks, linear_targets, norm_parameter_names
    from stage1.heads import HEADS

    torch.manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.arange(batch) % 2

    def timed(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return batch * steps / (time.perf_counter() - t0)

    out: dict[str, float] = {}
    bb = load_backbone(backbone_dir)
    out["frozen_forward"] = timed(lambda: bb.embed(x))

    model = attach(bb.model, AdapterSpec("lora", 8, 16, targets=linear_targets(bb.model, block_indices(len(find_blocks(bb.model)), blocks), "all")))
    head = HEADS.create("mlp")
    head.prepare(y.numpy())
    module = head.make_module(bb.hidden_size)
    params = list(trainable(model).values()) + list(module.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def finetune_step() -> None:
        opt.zero_grad()
        head.loss(module(cls_features(model, x)), y).backward()
        opt.step()

    out["finetune_step"] = timed(finetune_step)

    bb = load_backbone(backbone_dir)
    n = len(find_blocks(bb.model))
    unfrozen_idx = block_indices(n, unfreeze)
    unfrozen = block_parameter_names(bb.model, unfrozen_idx)
    unfrozen += [p for p in norm_parameter_names(bb.model) if p not in set(unfrozen)]
    lora_idx = [i for i in range(n) if i not in unfrozen_idx]
    student = attach(bb.model, AdapterSpec("lora", 8, 16, targets=linear_targets(bb.model, lora_idx, "qv"), unfrozen=unfrozen))
    dino_head = DinoHead(bb.hidden_size)
    teacher = load_backbone(backbone_dir).model  # frozen stand-in of the EMA teacher: same forward cost
    teacher_head = DinoHead(bb.hidden_size)
    crit = DinoLoss(1024)
    params = list(trainable(student).values()) + list(dino_head.parameters())
    opt2 = torch.optim.AdamW(params, lr=1e-4)
    student.train()
    views = torch.cat([x, x.flip(-1)])

    def adapt_step() -> None:
        opt2.zero_grad()
        with torch.no_grad():
            t_out = teacher_head(cls_features(teacher, views))
        crit(dino_head(cls_features(student, views)), t_out).backward()
        opt2.step()

    out["adapt_step"] = timed(adapt_step)  # images (not views) per second
    out["finetune_vs_frozen_forward"] = out["finetune_step"] / out["frozen_forward"]
    out["adapt_vs_frozen_forward"] = out["adapt_step"] / out["frozen_forward"]
    return {k: round(v, 3) for k, v in out.items()}


#: adapt's objective variants compared by ``--ablate-adapt`` (extra ``adapt`` options; None = no adapt)
ABLATION: dict[str, list[str] | None] = {
    "base": None,
    "dino": [],
    "dino+multicrop2": ["--multi-crop", "2"],
    "dino+ibot1": ["--ibot-weight", "1"],
}


def clean_pixels(images: Path, entries: list[Any], backbone: Path, image_size: int) -> tuple[Any, Any]:
    """The clean (view 0) pixels [n, 3, S, S] of ``entries`` as ``extract`` preprocesses them, and the labels."""
    import numpy as np
    import torch

    from stage1.featstore.backbones import load_backbone
    from stage1.featstore.preprocessing import Preprocessing
    from stage1.finetune.data import ViewDataset, collect_items

    items, quarantined, _ = collect_items(images, entries, image_size)
    if quarantined:
        raise RuntimeError(f"unreadable images: {quarantined[:3]}")
    data = ViewDataset.from_preprocessing(items, Preprocessing.for_backbone(load_backbone(backbone), image_size))
    return torch.stack([data[i][0][0] for i in range(len(data))]), np.array([it.label for it in items])


def probe_quality(backbone: Path, x_train: Any, y_train: Any, x_test: Any, y_test: Any,
                  base_test: Any | None = None) -> dict[str, Any]:
    """Logistic-regression probe (standardised CLS features, C by 5-fold CV) fit on train, scored on test.

    Returns test accuracy, AUROC and log loss, the features (to compare variants) and, given the
    base backbone's test features, their mean cosine similarity to those (how far adapt moved them).
    """
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stage1.featstore.backbones import load_backbone

    bb = load_backbone(backbone)
    with torch.no_grad():
        f_train, f_test = (torch.cat([bb.embed(x[i:i + 32]) for i in range(0, len(x), 32)]).numpy()
                           for x in (x_train, x_test))
    probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=5, max_iter=5000, scoring="neg_log_loss"))
    with warnings.catch_warnings():  # sklearn's notices of coming default changes
        warnings.simplefilter("ignore", FutureWarning)
        probe.fit(f_train, y_train)
    p = probe.predict_proba(f_test)[:, 1]
    out: dict[str, Any] = {
        "accuracy": float(((p > 0.5) == y_test).mean()),
        "auroc": float(roc_auc_score(y_test, p)),
        "log_loss": float(log_loss(y_test, p, labels=[0, 1])),
        "n_train": int(len(y_train)), "n_test": int(len(y_test)),
    }
    if base_test is not None:
        a, b = f_test / np.linalg.norm(f_test, axis=1, keepdims=True), base_test / np.linalg.norm(base_test, axis=1, keepdims=True)
        out["cosine_to_base"] = float((a * b).sum(1).mean())
    out["_test_features"], out["_test_proba"] = f_test, p
    return out


def paired_bootstrap(y: Any, p_base: Any, p_variant: Any, n: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95% intervals of (variant - base) test accuracy and AUROC over bootstrap resamples of the test images."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    acc, auc = [], []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if len(set(y[i].tolist())) < 2:
            continue
        acc.append(((p_variant[i] > 0.5) == y[i]).mean() - ((p_base[i] > 0.5) == y[i]).mean())
        auc.append(roc_auc_score(y[i], p_variant[i]) - roc_auc_score(y[i], p_base[i]))
    return {k: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
            for k, v in (("accuracy_diff_ci95", acc), ("auroc_diff_ci95", auc))}


def ablate_adapt(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--ablate-adapt``: probe quality after adapt with each objective option (see the module docstring)."""
    import numpy as np

    from stage1._core.io import read_json
    from stage1.featstore.labels import parse_labels_csv

    train_entries, _ = parse_labels_csv(args.images / "train.csv")
    test_entries, _ = parse_labels_csv(args.images / "val.csv")
    pick = np.random.default_rng(args.ablate_seed).permutation(len(train_entries))[: args.n_adapt]
    adapt_entries = [train_entries[i] for i in sorted(pick)]
    listing = work / "adapt_images.csv"
    with open(listing, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows([e.path, ""] for e in adapt_entries)  # adapt is unsupervised: no labels given
    t0 = time.perf_counter()
    x_train, y_train = clean_pixels(args.images, adapt_entries, args.backbone, args.image_size)
    x_test, y_test = clean_pixels(args.images, test_entries, args.backbone, args.image_size)
    result: dict[str, Any] = {"decode_s": round(time.perf_counter() - t0, 1), "variants": {}}
    base_test = None
    for name, extra in ABLATION.items():
        t0 = time.perf_counter()
        backbone = args.backbone
        record: dict[str, Any] = {}
        if extra is not None:
            backbone = work / f"adapted_{name}"
            cli(["adapt", "--images", str(args.images), "--list", str(listing), "--backbone", str(args.backbone),
                 "--out", str(backbone), "--epochs", str(args.adapt_epochs), "--keep", "student",
                 "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                 "--workers", str(args.workers), "--device", args.device, "--seed", "0", *extra])
            hist = read_json(backbone / "provenance.json")["training"]["history"]
            record.update(adapt_s=round(time.perf_counter() - t0, 1), train_loss=hist["train_loss"],
                          step_loss=hist["step_loss"], step_ibot_loss=hist.get("step_ibot_loss"))
        t1 = time.perf_counter()
        probe = probe_quality(backbone, x_train, y_train, x_test, y_test, base_test)
        proba = probe.pop("_test_proba")
        features = probe.pop("_test_features")
        if base_test is None:
            base_test, base_proba = features, proba
        else:
            probe.update(paired_bootstrap(y_test, base_proba, proba))
        record.update(probe=probe, probe_s=round(time.perf_counter() - t1, 1))
        result["variants"][name] = record
        print(f"{name:<16} acc {probe['accuracy']:.3f}  auroc {probe['auroc']:.4f}  log loss {probe['log_loss']:.4f}"
              + (f"  cos to base {probe['cosine_to_base']:.4f}" if "cosine_to_base" in probe else "")
              + (f"  auroc - base 95% CI {probe['auroc_diff_ci95']}" if "auroc_diff_ci95" in probe else "")
              + (f"  adapt {record['adapt_s']} s" if "adapt_s" in record else ""), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="Write the figures here as one JSON object.")
    ap.add_argument("--images", type=Path, default=SHARED / "data" / "tracon")
    ap.add_argument("--backbone", type=Path, default=SHARED / "assets" / "dinov2s-imgfocus")
    ap.add_argument("--work", type=Path, default=None, help="Working folder (default: a new temp folder).")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=2, help="finetune epochs")
    ap.add_argument("--adapt-epochs", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--unfreeze", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--policy", default="coverage")
    ap.add_argument("--policy-args", nargs="*", default=["--coverage", "0.7"])
    ap.add_argument("--step-batch", type=int, default=8)
    ap.add_argument("--step-repeats", type=int, default=3)
    ap.add_argument("--adapt-keep", choices=("teacher", "student"), default="teacher",
                    help="Which adapt weights to export (short runs barely move the EMA teacher).")
    ap.add_argument("--skip-explora", action="store_true", help="Skip finetune-on-adapted (saves time).")
    ap.add_argument("--skip-finetune", action="store_true", help="Only base and adapted (saves time).")
    ap.add_argument("--ablate-adapt", action="store_true",
                    help="Compare adapt's objective options by a probe on held-out images (see above).")
    ap.add_argument("--n-adapt", type=int, default=128, help="--ablate-adapt: train images adapted on and probed.")
    ap.add_argument("--ablate-seed", type=int, default=0, help="--ablate-adapt: seed of the image subset.")
    args = ap.parse_args()
    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="finetune_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.ablate_adapt:
        t_all = time.perf_counter()
        ablation = ablate_adapt(args, work)
        ablation.update(settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
                        machine={"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                 "load_avg": os.getloadavg()[0]},
                        total_s=round(time.perf_counter() - t_all, 1))
        print(f"total {ablation['total_s']} s (CPU shared with other jobs)")
        if args.json:
            from stage1._core.io import atomic_write_json, json_safe

            atomic_write_json(args.json, json_safe(ablation))
        return
    labels = labels_csv(args.images, work)
    common = ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
              "--workers", str(args.workers), "--device", args.device]
    result: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_start": os.getloadavg()[0], "note": "timings under load (CPU shared with other jobs)"},
        "variants": {},
        "train_s": {},
    }
    t_all = time.perf_counter()
    result["variants"]["base"] = evaluate_backbone("base", args.backbone, args.images, labels, work, args)

    t0 = time.perf_counter()
    adapted = work / "adapted"
    cli(["adapt", "--images", str(args.images), "--list", str(adapt_list(work / "store_base", work)),
         "--backbone", str(args.backbone), "--out", str(adapted), "--epochs", str(args.adapt_epochs),
         "--unfreeze", str(args.unfreeze), "--keep", args.adapt_keep, *common])
    result["train_s"]["adapt"] = round(time.perf_counter() - t0, 1)
    result["variants"]["adapted"] = evaluate_backbone("adapted", adapted, args.images, labels, work, args)

    parents = {} if args.skip_finetune else {"finetuned": args.backbone}
    if not (args.skip_finetune or args.skip_explora):
        parents["explora"] = adapted
    for name, parent in parents.items():
        t0 = time.perf_counter()
        cli(["finetune", "--images", str(args.images), "--labels", str(labels), "--backbone", str(parent),
             "--out", str(work / name), "--peft", "lora", "--blocks", str(args.blocks), "--epochs", str(args.epochs),
             *common])
        result["train_s"][name] = round(time.perf_counter() - t0, 1)
        result["variants"][name] = evaluate_backbone(name, work / name, args.images, labels, work, args)

    from stage1._core.io import read_json

    histories = {}
    for name in ("adapted", *parents):
        prov = read_json(work / name / "provenance.json")
        hist = prov["training"]["history"]
        histories[name] = {"train_loss": hist["train_loss"], "images_per_s_with_decoding": hist["images_per_s"],
                           "best_epoch": hist.get("best_epoch"), "val_objective": hist.get("val_objective"),
                           "split": prov["data"].get("split", {}).get("counts")}
    result["training_histories"] = histories
    result["step_images_per_s"] = step_throughput(args.backbone, args.image_size, args.step_batch, args.step_repeats,
                                                  args.blocks, args.unfreeze)
    result["machine"]["load_avg_end"] = os.getloadavg()[0]
    result["total_s"] = round(time.perf_counter() - t_all, 1)

    # same split check: finetune's own split must equal the store's
    store_counts = result["variants"]["base"]["splits"]
    for name in parents:
        ft_counts = histories[name]["split"]
        result.setdefault("split_matches_store", {})[name] = ft_counts == store_counts

    print(f"finetune_bench (under load; {os.cpu_count()} CPUs shared), image size {args.image_size}, "
          f"policy {args.policy} {' '.join(args.policy_args)}; test n = {result['variants']['base']['test']['n']}")
    keys = ("accuracy", "mcc", "augrc", "aurc", "ece", "coverage", "selective_error")
    print(f"{'variant':<10}" + "".join(f"{k:>16}" for k in keys))
    for name, v in result["variants"].items():
        print(f"{name:<10}" + "".join(f"{v['test'][k]:>16.4f}" if isinstance(v['test'][k], (int, float)) else f"{'-':>16}" for k in keys))
    base = result["variants"]["base"]["test"]
    for name, v in result["variants"].items():
        if name != "base":
            print(f"{name} - base: accuracy {v['test']['accuracy'] - base['accuracy']:+.4f}, "
                  f"augrc {v['test']['augrc'] - base['augrc']:+.4f} (lower is better)")
    s = result["step_images_per_s"]
    print(f"training step images/s (batch {args.step_batch}): frozen forward {s['frozen_forward']:.1f}, "
          f"finetune {s['finetune_step']:.1f} ({s['finetune_vs_frozen_forward']:.2f}x), "
          f"adapt {s['adapt_step']:.1f} ({s['adapt_vs_frozen_forward']:.2f}x)")
    print(f"wall seconds: {result['train_s']}, total {result['total_s']}")
    if args.json:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json, json_safe(result))


if __name__ == "__main__":
    main()
