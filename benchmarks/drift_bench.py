"""Drift benchmark: does the product notice when challenge images stop looking like val_calib?

On a feature store with validator views (TraCon by default: /work/bench/shift/stores/tracon_squash,
4 views per image, view 0 clean, views 1-3 validator views with recorded levels):

1. train an mlp (``stage1.runs.steps.train_run``) and fit ``ltt`` (FNR_exit, alpha 0.1, delta 0.1)
   on val_calib (``calibrate_run``); fit the novelty scorer on train (reference) and val_calib
   (calibration) view-0 features (``policies.novelty``);
2. **exchangeable streams**: view 0 of the held-out test rows in ``--orders`` random orders: the
   share of orders on which the exchangeability alarm fires (select + novelty channels, level
   ``--level``): Ville bounds it by the level;
3. **shifted streams**: the level-3 validator views of the test rows (one per row that has one) in
   random orders, and, when ``--other-store`` has the same feature width, rows of another store
   (Fashion-MNIST features of the same backbone): alarm rate and median detection delay;
4. FNR_exit / coverage / selective error of the policy on the clean test views and on the shifted
   views, without and with novelty deferral (``alpha_n`` in ``--alpha-n``), and the live-risk
   alarm (lower bound of FNR_exit > alpha) on the shifted stream in file order.

Nothing is tuned on the shifted streams: alpha, alpha_n, k and the level are fixed up front.
Usage: ``python benchmarks/drift_bench.py [--store S] [--other-store S] [--out DIR] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

STORE = Path("/work/bench/shift/stores/tracon_squash")
OTHER = Path("/work/bench/quality/stores/fmnist_tshirt_shirt")
ALPHA, DELTA = 0.1, 0.1


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[drift {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def store_ready(store: Path) -> tuple[bool, str]:
    """(ready, why not): committed == rows > 0 and splits.json exists."""
    from stage1.featstore import open_store

    if not (store / "zarr.json").is_file():
        return False, f"{store}: not a store"
    with open_store(str(store)) as s:
        rows, complete = int(s.rows), bool(s.complete)
    if rows == 0 or not complete:
        return False, f"{store}: {rows} rows committed, extraction not complete"
    if not (store / "splits.json").is_file():
        return False, f"{store}: no splits.json yet"
    return True, ""


def selective(y: np.ndarray, label: np.ndarray, ex: np.ndarray) -> dict[str, float]:
    """coverage, FNR_exit, selective error, miss rate and counts of one decision set."""
    pos_ex = ex & (y == 1)
    miss = pos_ex & (label == 0)
    wrong = ex & (label != y)
    return {"n": int(len(y)), "coverage": float(ex.mean()) if len(y) else math.nan,
            "fnr_exit": float(miss.sum() / pos_ex.sum()) if pos_ex.any() else math.nan,
            "selective_error": float(wrong.sum() / ex.sum()) if ex.any() else math.nan,
            "miss_rate": float(miss.sum() / (y == 1).sum()) if (y == 1).any() else math.nan,
            "exited_positives": int(pos_ex.sum()), "misses": int(miss.sum())}


def stream_alarms(calib: dict[str, np.ndarray], streams: dict[str, np.ndarray], orders: int, level: float,
                  seed: int, martingale: str) -> dict[str, Any]:
    """Alarm rate and detection delays of the monitor over ``orders`` random orders of ``streams``."""
    from stage1.policies.monitor import ExchangeabilityMonitor

    n = len(next(iter(streams.values())))
    rng = np.random.default_rng(seed)
    times = []
    for i in range(orders):
        perm = rng.permutation(n)
        mon = ExchangeabilityMonitor(calib, {c: {"select": "low"}.get(c, "high") for c in calib}, level=level,
                                     martingale=martingale, seed=seed + i)
        times.append(mon.update({c: v[perm] for c, v in streams.items()}).alarm_time)
    fired = [t for t in times if t is not None]
    rate = len(fired) / orders
    return {"n_items": int(n), "orders": orders, "alarm_rate": rate,
            "alarm_rate_se": math.sqrt(rate * (1 - rate) / orders),
            "median_delay": float(np.median(fired)) if fired else None,
            "median_delay_all": float(np.median([t if t is not None else n + 1 for t in times])),
            "max_delay": int(max(fired)) if fired else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=STORE)
    ap.add_argument("--other-store", type=Path, default=OTHER, help="a far-shift stream (same feature width)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/drift_bench"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--orders", type=int, default=200)
    ap.add_argument("--level", type=float, default=0.01)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--alpha-n", default="0.05,0.1")
    ap.add_argument("--martingale", default="simple_jumper")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-views", choices=("all", "clean"), default="all",
                    help="train the mlp on every cached view (train_run's default) or on view 0 only")
    args = ap.parse_args(argv)

    from stage1.heads import load_head
    from stage1.policies import policy_from_dict
    from stage1.policies.monitor import live_risk
    from stage1.policies.novelty import defer_mask, fit_novelty
    from stage1.runs import layout
    from stage1.runs.steps import calibrate_run, load_split_arrays, train_run
    from stage1.workflows.monitor import run_select_reference

    ok, why = store_ready(args.store)
    if not ok:
        raise SystemExit(f"drift_bench: {why}; wait for `stage1 info {args.store} --json` to show committed == rows "
                         "and for splits.json")
    t0 = time.time()
    run = args.out / f"run_{int(t0)}"
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"train mlp on {args.store} -> {run}")
    train_run(args.store, "mlp", run, {}, progress=False, train_views=args.train_views == "all")
    cal = calibrate_run(run, "ltt", {"alpha": ALPHA, "delta": DELTA, "risk": "fnr_exit"})
    log(f"ltt: certified={cal['certified']} ({cal['reason']})")
    head = load_head(run)
    policy = policy_from_dict(layout.read_policy(run))
    data = load_split_arrays(args.store)
    tr, vc, te = data["train"], data["val_calib"], data["test"]
    novelty = fit_novelty(tr["x"][:, 0], vc["x"][:, 0], k=args.k)
    calib = {"select": run_select_reference(run), "novelty": novelty.calib_scores_}

    def score(x: np.ndarray) -> dict[str, np.ndarray]:
        d = policy.decide(head.predict_scores(x.astype(np.float32)))
        return {"select": d.score, "exit": d.exit, "label": d.label.astype(np.int64),
                "novelty": novelty.score(x), "novelty_p": novelty.pvalues(x)}

    clean = score(te["x"][:, 0])
    y_clean = te["y"]
    out: dict[str, Any] = {"store": str(args.store), "n_train": int(len(tr["y"])), "n_val_calib": int(len(vc["y"])),
                           "n_test": int(len(te["y"])), "n_calib_select_reference": int(len(calib["select"])),
                           "policy": {"name": "ltt", "alpha": ALPHA, "delta": DELTA, "certified": cal["certified"],
                                      "reason": cal["reason"]},
                           "level": args.level, "martingale": args.martingale, "novelty_k": args.k,
                           "train_views": args.train_views}
    streams: dict[str, dict[str, Any]] = {"clean_test": {"scores": clean, "y": y_clean}}
    if "levels" in te:
        lv = np.asarray(te["levels"])
        has3 = (lv == 3).any(axis=1)
        view = np.argmax(lv == 3, axis=1)
        rows = np.flatnonzero(has3)
        if len(rows):
            streams["level3_views"] = {"scores": score(te["x"][rows, view[rows]]), "y": te["y"][rows]}
        else:
            log("no test row has a level-3 view: no level-3 stream")
    else:
        log("the store has no view levels: no level-3 stream")
    if args.other_store and (args.other_store / "zarr.json").is_file():
        from stage1.featstore import open_store

        with open_store(str(args.other_store)) as other:
            if other.dim == data["dim"] and other.rows > 0:
                pick = np.sort(np.random.default_rng(args.seed).choice(other.rows, min(other.rows, 500), replace=False))
                xo = other.load_features(rows=pick)[:, 0]
                streams["other_store"] = {"scores": score(xo), "y": None}
                out["other_store_path"] = str(args.other_store)
            else:
                log(f"{args.other_store}: width {other.dim} != {data['dim']} or empty; skipped")
    alpha_ns = [float(a) for a in args.alpha_n.split(",") if a]
    for name, st in streams.items():
        sc, y = st["scores"], st["y"]
        log(f"stream {name}: {len(sc['select'])} items")
        res: dict[str, Any] = {"alarm": stream_alarms(calib, {"select": sc["select"], "novelty": sc["novelty"]},
                                                      args.orders, args.level, args.seed, args.martingale),
                               "alarm_select_only": stream_alarms({"select": calib["select"]},
                                                                  {"select": sc["select"]}, args.orders, args.level,
                                                                  args.seed, args.martingale)}
        for a in alpha_ns:
            res[f"novelty_deferred_share_at_{a:g}"] = float(defer_mask(sc["novelty_p"], a).mean())
        if y is not None:
            res["without_novelty"] = selective(y, sc["label"], sc["exit"])
            for a in alpha_ns:
                res[f"with_novelty_{a:g}"] = selective(y, sc["label"], sc["exit"] & ~defer_mask(sc["novelty_p"], a))
            live = live_risk(y, sc["label"], sc["exit"], "fnr_exit", ALPHA, args.level)
            res["live_fnr_exit"] = {"alarm_time": live.alarm_time, "lower": float(live.lower[-1]),
                                    "upper": float(live.upper[-1]), "trials": int(live.n[-1])}
        out[name] = res
    if "level3_views" in out and "without_novelty" in out["level3_views"]:
        base = out["level3_views"]["without_novelty"]["fnr_exit"]
        out["fnr_exit_cut"] = {f"{a:g}": (None if not (base and base > 0) else
                                          1 - out["level3_views"][f"with_novelty_{a:g}"]["fnr_exit"] / base)
                               for a in alpha_ns}
    out["seconds"] = round(time.time() - t0, 1)
    print_report(out, alpha_ns)
    if args.json:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json, json_safe(out))
    return out


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_report(out: dict[str, Any], alpha_ns: list[float]) -> None:
    print(f"store {out['store']}: train {out['n_train']}, val_calib {out['n_val_calib']}, test {out['n_test']}; "
          f"ltt alpha {ALPHA} delta {DELTA}: certified {out['policy']['certified']}")
    print(f"head trained on {out['train_views']} views; monitor: {out['martingale']}, level {out['level']}, "
          f"novelty k {out['novelty_k']}")
    print(f"{'stream':14} {'items':>5} {'alarm rate':>11} {'med delay':>9} {'select-only':>11} | "
          f"{'cov':>6} {'FNR_exit':>8} {'sel err':>7} | " + " | ".join(f"nov {a:g}: cov FNR" for a in alpha_ns))
    for name in ("clean_test", "level3_views", "other_store"):
        if name not in out:
            continue
        r = out[name]
        a = r["alarm"]
        line = (f"{name:14} {a['n_items']:>5} {fmt(a['alarm_rate']):>11} {fmt(a['median_delay']):>9} "
                f"{fmt(r['alarm_select_only']['alarm_rate']):>11} | ")
        if "without_novelty" in r:
            w = r["without_novelty"]
            line += f"{fmt(w['coverage']):>6} {fmt(w['fnr_exit']):>8} {fmt(w['selective_error']):>7} | "
            line += " | ".join(f"{fmt(r[f'with_novelty_{x:g}']['coverage'])} {fmt(r[f'with_novelty_{x:g}']['fnr_exit'])}"
                               for x in alpha_ns)
        else:
            line += " | ".join(f"deferred {fmt(r[f'novelty_deferred_share_at_{x:g}'])}" for x in alpha_ns)
        print(line)
    if "fnr_exit_cut" in out:
        print("shifted FNR_exit cut by novelty deferral: " + ", ".join(f"alpha_n {k}: {fmt(v)}"
                                                                        for k, v in out["fnr_exit_cut"].items()))


if __name__ == "__main__":
    main()
