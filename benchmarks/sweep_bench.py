"""Sweep throughput: trials/s of the gate head x ltt on Fashion-MNIST-sized features (12k x 384).

Runs the real ``run_sweep`` (SQLite storage, the shipped ``gate`` space) with 1 worker x 1 thread,
1 worker x 2 threads and 2 workers x 1 thread in one go and prints them side by side. With
``--storage postgresql://...`` it runs 1 worker and 2 workers on that database too and reports
PostgreSQL / SQLite trials/s (target: >= 0.8; its studies are deleted afterwards). Two rates per run: wall (including worker start-up
and loading the store) and steady state (finished trials / span from the first trial's start to the
last trial's end, read from the storage). Target: >= 2 trials/s with 2 workers on a 2-core CPU.

Features: a store given with --store (e.g. Fashion-MNIST features), else the first complete store
whose path mentions fashion/fmnist, with width 384, >= 12k rows and splits.json, under bench_out/ or
OUT/stores/ of a sibling folder of the repo (where ``benchmarks/quality.py --out OUT`` puts them),
else synthetic features of that size (said so in the output).

    python benchmarks/sweep_bench.py [--trials 30] [--store STORE] [--json PATH] [--storage postgresql://...]
    # a throwaway server: python benchmarks/sweep_bench.py --storage "$(.ci/postgres.sh start)"; .ci/postgres.sh stop
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def find_fashion_store() -> Path | None:
    """A Fashion-MNIST feature store made by another benchmark (bench_out/**), if one exists."""
    from stage1.featstore import open_store

    # benchmarks/quality.py --out OUT writes OUT/stores/fmnist_*; look in bench_out/ and in the repo's siblings
    candidates = sorted((ROOT / "bench_out").glob("**/zarr.json")) + sorted(ROOT.parent.glob("*/stores/*/zarr.json"))
    for marker in candidates:
        folder = marker.parent
        if not any(k in str(folder).lower() for k in ("fashion", "fmnist")):
            continue
        try:
            st = open_store(str(folder))
        except Exception:
            continue
        if st.dim == 384 and st.rows >= 12000 and st.complete and (folder / "splits.json").is_file():
            return folder
    return None


def synthetic_store(path: Path, n: int = 12000, d: int = 384, seed: int = 0) -> Path:
    """Two classes, each a mixture of 5 Gaussian clusters in 384-d, ~90 % linearly separable."""
    import numpy as np

    from stage1.featstore.splits import write_splits
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    centres = rng.normal(size=(2, 5, d)) * 0.35
    cluster = rng.integers(0, 5, n)
    x = centres[y, cluster] + rng.normal(size=(n, d))
    write_store(path, x[:, None, :].astype(np.float16), y)
    write_splits(path, seed=0)
    return path


def steady_rate(storage: str, study: str) -> tuple[int, float]:
    """(finished trials, finished / span of their start..complete times) from the storage."""
    import optuna

    from stage1.workflows.sweep import make_storage

    trials = [t for t in optuna.load_study(study_name=study, storage=make_storage(storage)).trials
              if t.datetime_complete]
    if not trials:
        return 0, 0.0
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return len(trials), len(trials) / span if span > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--space", default="gate")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--storage", default=None,
                    help="also run 1 and 2 workers on this (postgresql://) storage and compare with SQLite")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stage1.workflows.sweep import run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="sweep_bench."))
    store = args.store or find_fashion_store()
    source = f"store {store}" if store else "synthetic 12000 x 384 (no Fashion-MNIST store found)"
    if store is None:
        store = synthetic_store(tmp / "store")
    from stage1.featstore import open_store

    st = open_store(str(store))
    print(f"features: {source}; rows {st.rows}, dim {st.dim}, views {st.views}; space {args.space}; "
          f"{args.trials} trials; cpus {os.cpu_count()}")
    results = {"features": source, "rows": st.rows, "dim": st.dim, "trials": args.trials, "space": args.space,
               "cpus": os.cpu_count(), "runs": {}}
    runs = [(1, 1, None), (1, 2, None), (2, 1, None)]
    if args.storage:
        from stage1.workflows.sweep import redact_url

        results["other_storage"] = redact_url(args.storage)
        runs += [(1, 1, args.storage), (2, 1, args.storage)]
    for workers, threads, other in runs:
        key = f"workers_{workers}_threads_{threads}" + ("_other_storage" if other else "")
        storage = other or f"sqlite:///{tmp / f'{key}.db'}"
        study = f"{key}-{uuid.uuid4().hex[:8]}" if other else key  # a shared database may hold old studies
        t0 = time.perf_counter()
        res = run_sweep(store, study, storage=storage, trials=args.trials, space=args.space, workers=workers,
                        threads=threads, out=None, seed=0, progress=False)
        wall = time.perf_counter() - t0
        n, steady = steady_rate(storage, study)
        if other:
            delete_study(other, study)
        results["runs"][key] = {"wall_s": round(wall, 2), "wall_trials_per_s": round(n / wall, 3),
                                "steady_trials_per_s": round(steady, 3), "finished": n, "states": res.states}
        print(f"{'storage ' + results['other_storage'] + ': ' if other else ''}workers={workers} threads={threads}: "
              f"{n} trials, wall {wall:.1f} s -> {n / wall:.2f} trials/s; steady state {steady:.2f} trials/s; "
              f"states {res.states}")
    w1, w2 = results["runs"]["workers_1_threads_1"], results["runs"]["workers_2_threads_1"]
    w1t2 = results["runs"]["workers_1_threads_2"]
    results["one_worker_1_vs_2_threads_steady"] = round(w1["steady_trials_per_s"] / w1t2["steady_trials_per_s"], 3)
    print(f"1 worker, 1 thread / 2 threads (steady): {results['one_worker_1_vs_2_threads_steady']:.2f}x")
    results["speedup_2_vs_1_steady"] = round(w2["steady_trials_per_s"] / w1["steady_trials_per_s"], 3)
    results["target_trials_per_s"] = 2.0
    results["meets_target_steady_2_workers"] = w2["steady_trials_per_s"] >= 2.0
    print(f"2 workers / 1 worker (steady): {results['speedup_2_vs_1_steady']:.2f}x; target >= 2 trials/s with "
          f"2 workers: {'met' if results['meets_target_steady_2_workers'] else 'NOT met'} "
          f"({w2['steady_trials_per_s']:.2f} trials/s)")
    if args.storage:
        results["other_vs_sqlite_target"] = 0.8
        for workers in (1, 2):
            base, other = (results["runs"][f"workers_{workers}_threads_1{s}"] for s in ("", "_other_storage"))
            ratio = {k: round(other[k] / base[k], 3) for k in ("steady_trials_per_s", "wall_trials_per_s")}
            results[f"other_vs_sqlite_workers_{workers}"] = ratio
            print(f"{results['other_storage']} / SQLite, {workers} worker(s): steady {ratio['steady_trials_per_s']:.2f}x, "
                  f"wall {ratio['wall_trials_per_s']:.2f}x (target >= 0.8: "
                  f"{'met' if ratio['steady_trials_per_s'] >= 0.8 else 'NOT met'})")
    if args.json:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json, json_safe(results))
    shutil.rmtree(tmp, ignore_errors=True)  # the generated store, runs and databases


def delete_study(storage: str, study: str) -> None:
    """Remove a benchmark study from a shared database (its trials would only pile up)."""
    import optuna

    from stage1.workflows.sweep import make_storage

    optuna.delete_study(study_name=study, storage=make_storage(storage))


if __name__ == "__main__":
    main()
