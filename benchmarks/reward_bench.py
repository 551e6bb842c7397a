"""Reward benchmark: what a miner is paid, always answering vs the ``reward`` policy vs a certified policy
plus the reward rule, on real features (Fashion-MNIST pairs and TraCon, DINOv2-S).

Per store (default: the stores of ``benchmarks/quality.py`` under /work/bench/quality/stores, with
their splits.json): an mlp head (defaults) is trained with ``runs.steps.train_run`` into ``--out``
(reused when already there), its val_calib and test scores are read from the run, and four answer
rules are fit on val_calib only:

* ``always``: answer the calibrated p (temperature) for every image;
* ``reward``: the reward policy (answer p or abstain -1, the band maximising the simulated reward);
* ``ltt``: ltt (fnr_exit, alpha 0.02, eps 0.02, delta 0.1) alone, deferring = -1 (context);
* ``ltt+reward``: the reward policy with that ltt as its base (certified exits always answered).

Each is scored on **test** by ``policies.reward.expected_reward`` at prior 0.5 (the validators'
label mix): the mean reward per round over random challenge streams of 500 rounds (after a
100-round burn-in) and the 5%-95% range of one stream's mean; the gain over ``always`` is paired
(same streams) with a 90% bootstrap interval over the test rows (resampled per class). Target:
``reward`` >= ``always`` on test for every dataset.

    python benchmarks/reward_bench.py --out WORK [--stores DIR] [--only a,b] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage1.policies import POLICIES  # noqa: E402
from stage1.policies.reward import HISTORY, expected_reward, orderings, simulate_rewards  # noqa: E402

DATASETS = ("fmnist_tshirt_shirt", "fmnist_pullover_coat", "tracon")
LTT = {"alpha": 0.02, "eps": 0.02, "delta": 0.1}
RULES = ("always", "reward", "ltt", "ltt+reward")


def train(store: Path, run: Path, seed: int) -> float:
    """Train the mlp head into ``run`` unless it is already there; seconds spent."""
    from stage1.runs.steps import train_run

    if (run / "config.json").exists():
        return 0.0
    t = time.perf_counter()
    train_run(store, "mlp", run, {"seed": seed}, progress=False)
    return time.perf_counter() - t


def answers_of(policy: Any, scores: dict[str, np.ndarray], always: bool = False) -> np.ndarray:
    """What a miner sends: p on exit, -1 on defer (``always``: p everywhere)."""
    d = policy.decide(scores)
    return d.p_roadwork.copy() if always else np.where(d.exit, d.p_roadwork, -1.0)


def paired_gain(a: np.ndarray, b: np.ndarray, y: np.ndarray, n_rounds: int, n_orderings: int, n_boot: int,
                seed: int) -> dict[str, float]:
    """Expected reward of answers ``a`` minus that of ``b`` on the same streams, and a bootstrap 90% interval
    over the rows (resampled per class, fresh streams each time)."""
    def gain(rows: np.ndarray, s: int, k: int) -> float:
        idx = rows[orderings(y[rows], 0.5, HISTORY + n_rounds, k, s)]
        pred_a, pred_b, lab = (np.round(a) == 1)[idx], (np.round(b) == 1)[idx], y[idx]
        ra = simulate_rewards((a != -1)[idx], pred_a, lab)[:, HISTORY:].mean()
        rb = simulate_rewards((b != -1)[idx], pred_b, lab)[:, HISTORY:].mean()
        return float(ra - rb)

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    point = gain(np.arange(len(y)), seed, n_orderings)
    boots = [gain(np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))], seed + 1 + b, max(1, n_orderings // 4))
             for b in range(n_boot)]
    lo, hi = (np.quantile(boots, [0.05, 0.95]) if boots else (point, point))
    return {"gain": point, "gain_lo": float(lo), "gain_hi": float(hi)}


def bench_store(name: str, store: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train, fit the four rules on val_calib, score them on test."""
    from stage1.runs import layout

    run = work / name / "mlp"
    seconds_train = train(store, run, args.seed)
    cal, yc, _, _ = layout.split_scores(run, "val_calib")
    test, yt, _, _ = layout.split_scores(run, "test")
    t = time.perf_counter()
    reward = POLICIES.create("reward", seed=args.seed).fit(cal, yc)
    ltt = POLICIES.create("ltt", **LTT).fit(cal, yc)
    combo = POLICIES.create("reward", base="ltt", base_params=LTT, seed=args.seed).fit(cal, yc)
    seconds_fit = time.perf_counter() - t
    answers = {"always": answers_of(reward, test, always=True), "reward": answers_of(reward, test),
               "ltt": answers_of(ltt, test), "ltt+reward": answers_of(combo, test)}
    kw = {"n_rounds": args.n_rounds, "n_orderings": args.n_orderings, "seed": args.seed}
    p = answers["always"]
    out: dict[str, Any] = {
        "n_calib": int(len(yc)), "n_test": int(len(yt)), "test_positive_rate": float(yt.mean()),
        "test_accuracy": float(np.mean((p > 0.5) == (yt == 1))), "seconds_train": round(seconds_train, 1),
        "seconds_fit_policies": round(seconds_fit, 2), "ltt_certified": bool(ltt.certified),
        "calib": {"reward": {k: reward.summary[k] for k in ("reward_always", "reward_policy", "gain", "gain_lo",
                                                             "gain_hi", "abstain_rate")},
                  "ltt+reward": {k: combo.summary[k] for k in ("reward_always", "reward_policy", "gain", "gain_lo",
                                                                "gain_hi", "abstain_rate", "base_exit_rate")}},
        "rules": {},
    }
    for rule in RULES:
        est = expected_reward(answers[rule], yt, prior=0.5, **kw)
        entry = {"mean": est.mean, "lo": est.lo, "hi": est.hi, "answer_rate": float(np.mean(answers[rule] != -1))}
        if rule != "always":
            entry.update(paired_gain(answers[rule], answers["always"], yt, args.n_rounds, args.n_orderings,
                                     args.n_boot, args.seed))
            base = out["rules"]["always"]["mean"]
            entry["relative_gain"] = entry["gain"] / base if base > 0 else None
        out["rules"][rule] = entry
    out["target_met"] = out["rules"]["reward"]["mean"] >= out["rules"]["always"]["mean"]
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """One row per dataset and rule."""
    head = (f"{'dataset':<22} {'rule':<11} {'answer':>7} {'reward':>8} {'stream 5-95%':>15} "
            f"{'gain vs always':>15} {'boot 90%':>19}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        for rule in RULES:
            e = r["rules"][rule]
            rel = "" if e.get("relative_gain") is None else f" ({e['relative_gain']:+.1%})"
            gain = "" if rule == "always" else f"{e['gain']:+.4f}{rel}"
            boot = "" if rule == "always" else f"[{e['gain_lo']:+.4f}, {e['gain_hi']:+.4f}]"
            print(f"{name:<22} {rule:<11} {e['answer_rate']:>7.1%} {e['mean']:>8.4f} "
                  f"{'[' + format(e['lo'], '.3f') + ', ' + format(e['hi'], '.3f') + ']':>15} {gain:>15} {boot:>19}")
        print(f"{'':<22} test n={r['n_test']}, accuracy {r['test_accuracy']:.3f}; val_calib gain of reward "
              f"{r['calib']['reward']['gain']:+.4f}; target reward >= always on test: "
              f"{'met' if r['target_met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="Work folder for the trained runs (reused).")
    ap.add_argument("--stores", type=Path, default=Path("/work/bench/quality/stores"))
    ap.add_argument("--only", default=",".join(DATASETS), help="Comma-separated store names.")
    ap.add_argument("--n-rounds", type=int, default=500)
    ap.add_argument("--n-orderings", type=int, default=400)
    ap.add_argument("--n-boot", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    for name in [s for s in args.only.split(",") if s]:
        store = args.stores / name
        if not (store / "splits.json").exists():
            print(f"skip {name}: {store} has no splits.json", file=sys.stderr)
            continue
        results[name] = bench_store(name, store, args.out, args)
    print_table(results)
    summary = {
        "settings": {"prior": 0.5, "n_rounds": args.n_rounds, "n_orderings": args.n_orderings,
                     "n_boot": args.n_boot, "seed": args.seed, "ltt": LTT, "head": "mlp (defaults)"},
        "datasets": results,
        "target_met_all": bool(results) and all(r["target_met"] for r in results.values()),
        "reward_gain": {n: r["rules"]["reward"]["gain"] for n, r in results.items()},
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
