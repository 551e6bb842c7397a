"""Optuna sweeps over head x policy x hyperparameters on a cached feature store.

Each trial trains a head on ``train`` (early stopping on ``val_select``), fits the exit policy on
``val_calib`` and scores two objectives: certified coverage (maximise; coverage on the objective
split of a policy that certified, 0 when it could not) and AUGRC of the head's selector on
``val_select`` (minimise). The risk target is a constraint: ``risk(val split) - alpha <= 0`` via
``trial.set_constraint``. Test rows are never loaded.

K worker processes share one Optuna storage (SQLite on one machine, PostgreSQL across machines);
each loads the store's rows into RAM once. A second run with the same study name resumes and adds
its trials to the ones already there.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stage1.workflows.space import SearchSpace, resolve_space_path

DIRECTIONS = ("maximize", "minimize")
OBJECTIVE_NAMES = ("certified_coverage", "augrc")
#: splits a sweep reads; test is deliberately absent.
SWEEP_SPLITS = ("train", "val_select", "val_calib")
HEARTBEAT_S = 10
GRACE_S = 60


# -- data ------------------------------------------------------------------------------------
@dataclass
class SweepData:
    """Labelled rows of the sweep splits, in RAM: train [n, V, D], val splits [n, D] (view 0)."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]
    store_path: str
    fingerprint: str

    @classmethod
    def load(cls, store_path: str | os.PathLike[str]) -> "SweepData":
        """Read train / val_select / val_calib (labelled rows only) from ``store_path`` once."""
        from stage1.featstore import open_store
        from stage1.featstore.splits import load_splits

        store = open_store(str(store_path))
        try:
            splits = load_splits(store_path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{store_path}: no splits.json; run `stage1 split {store_path}` first"
            ) from None
        labels = np.asarray(store.labels)
        x, y, rows = {}, {}, {}
        for name in SWEEP_SPLITS:
            r = np.asarray(splits[name], dtype=np.int64)
            r = r[labels[r] >= 0]
            if len(r) == 0:
                raise ValueError(f"{store_path}: split {name} has no labelled rows; a sweep needs all of "
                                 f"{', '.join(SWEEP_SPLITS)} (re-run `split` with other fractions)")
            views = None if name == "train" else 0
            feats = np.asarray(store.load_features(rows=r, views=views), dtype=np.float32)
            x[name] = feats if name == "train" else feats[:, 0]
            y[name] = labels[r].astype(np.int64)
            rows[name] = r
        return cls(x=x, y=y, rows=rows, store_path=str(Path(store_path).resolve()),
                   fingerprint=store_fingerprint(store, rows))


def store_fingerprint(store: Any, rows: dict[str, np.ndarray]) -> str:
    """A short hash of what the sweep's numbers depend on: backbone provenance, dims, split rows."""
    h = hashlib.sha256()
    prov = store.provenance or {}
    backbone = prov.get("backbone", {}) if isinstance(prov, dict) else {}
    h.update(str(backbone.get("weights_sha256", "")).encode())
    h.update(f"{store.dim}:{store.views}".encode())
    for name in SWEEP_SPLITS:
        h.update(name.encode())
        h.update(np.asarray(rows[name], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# -- one trial ---------------------------------------------------------------------------------
def fit_trial(data: SweepData, head_name: str, head_params: dict[str, Any], policy_name: str,
              policy_params: dict[str, Any], seed: int) -> tuple[Any, Any, dict[str, dict[str, np.ndarray]]]:
    """Train the head and fit the policy (on val_calib); returns (head, policy, scores per split)."""
    from stage1.heads import HEADS
    from stage1.policies import POLICIES

    # threads=0: the head keeps torch's thread count, which the worker set from --threads
    head = HEADS.create(head_name, **{"seed": seed, "threads": 0, **head_params})
    head.fit(data.x["train"], data.y["train"], X_val=data.x["val_select"], y_val=data.y["val_select"])
    scores = {s: head.predict_scores(data.x[s]) for s in ("val_select", "val_calib")}
    policy = POLICIES.create(policy_name, **{"seed": seed, **policy_params})
    policy.fit(scores["val_calib"], data.y["val_calib"])
    return head, policy, scores


def trial_metrics(data: SweepData, policy: Any, scores: dict[str, dict[str, np.ndarray]],
                  objective: dict[str, Any]) -> dict[str, Any]:
    """The objectives, the constraint and facts worth keeping, from a fitted head's scores."""
    from stage1.policies import metrics

    split = objective["coverage_split"]
    y = data.y[split]
    decision = policy.decide(scores[split])
    risks = metrics.selective_risks(y, decision.label, decision.exit)
    risk = risks[objective["risk"]]
    risk = 0.0 if risk is None or not math.isfinite(risk) else float(risk)  # nothing exits: no risk
    sel = scores["val_select"]
    errors = (np.argmax(sel["logits"], axis=1) != data.y["val_select"]).astype(np.int64)
    confidence = sel.get("select")
    if confidence is None:
        from scipy.special import softmax

        confidence = softmax(sel["logits"], axis=1).max(axis=1)
    coverage = float(risks["coverage"])
    return {
        "certified_coverage": coverage if policy.certified else 0.0,
        "augrc": float(metrics.augrc(np.asarray(confidence, dtype=np.float64), errors)),
        "constraint": risk - float(objective["alpha"]),
        "risk": risk,
        "coverage": coverage,
        "accuracy": float(metrics.accuracy(data.y["val_select"], np.argmax(sel["logits"], axis=1))),
        "certified": bool(policy.certified),
        "reason": str(policy.reason),
        "n_needed": policy.n_needed,
    }


def make_objective(data: SweepData, space: SearchSpace, seed: int):
    """The Optuna objective: suggest, fit, score; facts go to user attrs, the risk to a constraint."""

    def objective(trial: Any) -> tuple[float, float]:
        head, hp, pol, pp = space.suggest(trial)
        _, policy, scores = fit_trial(data, head, hp, pol, pp, seed)
        m = trial_metrics(data, policy, scores, space.objective)
        # one attribute (one storage write) holding every fact; trials.csv flattens it
        trial.set_user_attr("result", {k: m[k] for k in ("risk", "coverage", "accuracy", "certified", "reason", "n_needed")})
        trial.set_constraint(space.objective["risk"], m["constraint"])
        return m["certified_coverage"], m["augrc"]

    return objective


# -- storage and study -----------------------------------------------------------------------------
def make_storage(url: str) -> Any:
    """An RDB storage for ``sqlite:///...`` or ``postgresql://...`` with heartbeats (stale trials fail)."""
    import optuna

    engine_kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    if sqlite:
        engine_kwargs = {"connect_args": {"timeout": 120}}
        db = url.split("///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
            _sqlite_wal(db)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                             heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    if sqlite:
        from sqlalchemy import event

        event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # connections opened from now on get the pragmas
    return storage


def _sqlite_wal(db: str) -> None:
    """Switch the database file to WAL journaling (persistent): readers and K writers block less."""
    import sqlite3

    con = sqlite3.connect(db, timeout=120)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """synchronous=NORMAL: with WAL, a commit no longer waits for an fsync (safe from corruption;
    a power cut may lose the last trials, never the file). Cut per-trial storage time ~10x here."""
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_sampler(seed: int) -> Any:
    """Seeded multivariate TPE (grouped for the conditional head x policy space), constant liar on."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def open_study(storage: Any, name: str, seed: int) -> Any:
    """Create or resume the multi-objective study ``name``."""
    import optuna

    return optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS),
                               sampler=make_sampler(seed), load_if_exists=True)


def check_resume(study: Any, space: SearchSpace, data: SweepData) -> None:
    """Refuse to add trials scored differently (other store / splits or other risk target)."""
    attrs = study.user_attrs
    facts = {"objective": space.objective, "store_fingerprint": data.fingerprint}
    if not attrs.get("store_fingerprint"):
        for k, v in {**facts, "store": data.store_path}.items():
            study.set_user_attr(k, v)
        return
    if attrs["store_fingerprint"] != data.fingerprint:
        raise ValueError(
            f"study {study.study_name!r} was run on other features or splits (store {attrs.get('store')}); "
            "resume it on the same store, or use a new --study name"
        )
    if attrs.get("objective") != space.objective:
        raise ValueError(
            f"study {study.study_name!r} used objective {attrs.get('objective')}, this space has "
            f"{space.objective}; trials would not be comparable: use a new --study name"
        )


def worker_seed(seed: int, n_existing: int, worker: int) -> int:
    """Sampler seed of one worker: different per worker and per resume, reproducible from --seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{n_existing}:{worker}".encode()).digest()[:4], "little")


def shares(total: int, workers: int) -> list[int]:
    """Split ``total`` trials over ``workers`` (the first ones take the remainder)."""
    return [total // workers + (1 if i < total % workers else 0) for i in range(workers)]


# -- workers ---------------------------------------------------------------------------------------
def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def run_worker(store: str, study_name: str, storage_url: str, space_path: str, n_trials: int,
               seed: int, sampler_seed: int, threads: int, progress: bool = False) -> int:
    """One worker: load the store once, then run ``n_trials`` trials into the shared study."""
    import optuna

    _set_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.load(space_path)
    data = SweepData.load(store)
    study = open_study(make_storage(storage_url), study_name, sampler_seed)
    optimize(study, make_objective(data, space, seed), n_trials, progress)
    return n_trials


def optimize(study: Any, objective: Any, n_trials: int, progress: bool) -> None:
    """``study.optimize`` for ``n_trials`` trials (a failing trial is recorded, not fatal), with a tqdm bar."""
    bar = None
    callbacks = []
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_trials, desc=f"sweep {study.study_name}", unit="trial", file=sys.stderr)
        callbacks.append(lambda _s, _t: bar.update(1))
    try:
        study.optimize(objective, n_trials=n_trials, callbacks=callbacks,
                       catch=(ValueError, RuntimeError, FloatingPointError), gc_after_trial=False)
    finally:
        if bar is not None:
            bar.close()


def _worker_entry(kwargs: dict[str, Any]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")
    run_worker(**kwargs)


def _watch(processes: list[Any], study: Any, start: int, total: int) -> None:
    """Wait for worker processes, showing finished trials (read from the storage) on a bar."""
    from optuna.trial import TrialState
    from tqdm import tqdm

    done_states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    with tqdm(total=total, desc=f"sweep {study.study_name}", unit="trial", file=sys.stderr) as bar:
        while any(p.is_alive() for p in processes):
            time.sleep(0.5)
            done = len(study.get_trials(deepcopy=False, states=done_states)) - start
            bar.update(max(0, min(total, done) - bar.n))
        done = len(study.get_trials(deepcopy=False, states=done_states)) - start
        bar.update(max(0, min(total, done) - bar.n))


# -- the whole sweep -------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What ``run_sweep`` reports back."""

    study: str
    storage: str
    n_before: int
    n_after: int
    states: dict[str, int]
    seconds: float
    out: str | None
    runs: list[str]
    best: dict[str, Any] | None
    plots: dict[str, str]
    worker_exit_codes: list[int]
    workers: int = 1
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_sweep(store: str | os.PathLike[str], study_name: str, storage: str = "sqlite:///studies.db",
              trials: int = 20, space: str | os.PathLike[str] | None = None, workers: int = 1,
              out: str | os.PathLike[str] | None = None, seed: int = 0, top: int = 3,
              threads: int | None = None, progress: bool = True) -> SweepResult:
    """Run (or resume) a sweep: ``trials`` more trials over ``workers`` processes, then write results.

    ``threads`` is torch's thread count in each worker (default 1: on small heads one thread per
    process beats several threads, measured 5x under load). ``out`` receives trials.csv,
    summary.json, the Pareto / importance PNGs and run dirs of up to ``top`` Pareto-optimal
    feasible trials (``runs/trial-NNNNN``), each exportable with ``export``.
    """
    import multiprocessing as mp

    import optuna

    from stage1.heads import HEADS
    from stage1.policies import POLICIES

    if trials < 0 or workers < 1 or (threads is not None and threads < 1):
        raise ValueError(f"--trials must be >= 0, --workers and --threads >= 1 (got {trials}, {workers}, {threads})")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space_path = resolve_space_path(space, study_name)
    sp = SearchSpace.load(space_path)
    sp.check_names(HEADS.names(), POLICIES.names())
    data = SweepData.load(store)
    study = open_study(make_storage(storage), study_name, seed)
    check_resume(study, sp, data)
    n_before = len(study.trials)
    threads = threads or 1  # small heads train fastest single-threaded; parallelise with workers
    t0 = time.perf_counter()
    exit_codes: list[int] = []
    jobs = [dict(store=str(store), study_name=study_name, storage_url=storage, space_path=str(space_path),
                 n_trials=n, seed=seed, sampler_seed=worker_seed(seed, n_before, i), threads=threads)
            for i, n in enumerate(shares(trials, workers)) if n > 0]
    if workers == 1 and jobs:
        _set_threads(threads)
        wstudy = open_study(make_storage(storage), study_name, jobs[0]["sampler_seed"])
        optimize(wstudy, make_objective(data, sp, seed), trials, progress)
        exit_codes = [0]
    elif jobs:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_entry, args=(job,), daemon=False) for job in jobs]
        for p in procs:
            p.start()
        if progress:
            _watch(procs, study, sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished()), trials)
        for p in procs:
            p.join()
        exit_codes = [int(p.exitcode or 0) for p in procs]
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage))
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    result = SweepResult(study=study_name, storage=storage, n_before=n_before, n_after=len(study.trials),
                         states=states, seconds=seconds, out=None if out is None else str(out), runs=[],
                         best=None, plots={}, worker_exit_codes=exit_codes, workers=workers, threads=threads)
    if out is not None:
        _set_threads(threads)  # the same thread count as the trials: retrained runs reproduce them
        write_outputs(study, sp, data, Path(out), result, top=top, seed=seed)
    return result


# -- outputs -----------------------------------------------------------------------------------------
def feasible(trial: Any) -> bool:
    """True when every constraint of a finished trial is <= 0."""
    return all(v <= 0 for v in trial.constraints.values()) if hasattr(trial, "constraints") else True


def pareto_trials(study: Any) -> list[Any]:
    """Feasible Pareto-optimal trials, best certified coverage first (ties: lower AUGRC)."""
    return sorted(study.best_trials, key=lambda t: (-t.values[0], t.values[1], t.number))


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One flat dict per trial for trials.csv."""
    rows = []
    for t in study.trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        if t.values:
            row.update(dict(zip(OBJECTIVE_NAMES, t.values)))
        row["feasible"] = feasible(t) if t.values else ""
        row.update({f"constraint.{k}": v for k, v in t.constraints.items()})
        for k, v in t.user_attrs.items():
            row.update({f"attr.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {f"attr.{k}": v})
        row.update({f"param.{k}": v for k, v in t.params.items()})
        row["seconds"] = (t.duration.total_seconds() if t.duration else "")
        rows.append(row)
    return rows


def write_trials_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """trials.csv with the union of all columns (atomic)."""
    import io

    from stage1._core.io import atomic_write_text

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_plots(study: Any, out: Path) -> dict[str, str]:
    """Pareto-front and parameter-importance PNGs via optuna.visualization.matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    plots: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return plots
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        ax = ovm.plot_pareto_front(study, target_names=["certified coverage", "AUGRC (val_select)"])
        path = out / "pareto_front.png"
        ax.figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
        plots["pareto_front"] = str(path)
        for i, name in enumerate(OBJECTIVE_NAMES):
            try:
                ax = ovm.plot_param_importances(study, target=lambda t, i=i: t.values[i], target_name=name)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few / constant trials
                plots[f"param_importance_{name}"] = f"not drawn: {exc}"
                continue
            path = out / f"param_importance_{name}.png"
            ax.figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(ax.figure)
            plots[f"param_importance_{name}"] = str(path)
    return plots


def write_outputs(study: Any, space: SearchSpace, data: SweepData, out: Path, result: SweepResult,
                  top: int, seed: int) -> None:
    """trials.csv, plots, run dirs of the top Pareto trials and summary.json under ``out``."""
    from stage1._core.io import atomic_write_json, json_safe

    out.mkdir(parents=True, exist_ok=True)
    write_trials_csv(out / "trials.csv", trial_rows(study))
    result.plots = write_plots(study, out)
    front = pareto_trials(study)
    for t in front[: max(0, top)]:
        run_dir = out / "runs" / f"trial-{t.number:05d}"
        head, hp, pol, pp = space.resolve(t.params)
        write_trial_run(data, run_dir, head, hp, pol, pp, seed=seed,
                        sweep={"study": study.study_name, "trial": t.number, "values": list(t.values)})
        result.runs.append(str(run_dir))
    if front:
        b = front[0]
        result.best = {"trial": b.number, "values": dict(zip(OBJECTIVE_NAMES, b.values)),
                       "params": b.params, "user_attrs": b.user_attrs,
                       "run_dir": result.runs[0] if result.runs else None}
    atomic_write_json(out / "summary.json", json_safe(result.to_dict() | {
        "objective": space.objective, "space": space.source, "pareto": [
            {"trial": t.number, "values": dict(zip(OBJECTIVE_NAMES, t.values)), "params": t.params}
            for t in front]}))


def write_trial_run(data: SweepData, run_dir: Path, head: str, head_params: dict[str, Any], policy: str,
                    policy_params: dict[str, Any], seed: int, sweep: dict[str, Any]) -> Path:
    """Retrain a trial's head into a standard run dir (train -> calibrate -> evaluate, heads' own code).

    Training is seeded and deterministic, so the run reproduces the trial. An existing run dir of
    the same trial is kept as it is (a resumed sweep does not redo it).
    """
    from stage1._core.io import read_json
    from stage1.runs import layout
    from stage1.runs.steps import calibrate_run, evaluate_run, train_run

    cfg_path = run_dir / layout.CONFIG
    if cfg_path.is_file():
        if read_json(cfg_path).get("sweep", {}).get("trial") == sweep["trial"]:
            return run_dir
        raise FileExistsError(f"{run_dir}: holds another run; use another --out")
    pp = dict(policy_params)
    score = pp.pop("score", "p")
    train_run(data.store_path, head, run_dir, {"seed": seed, "threads": 0, **head_params}, progress=False)
    calibrate_run(run_dir, policy, {"seed": seed, **pp}, score=score)
    for split in ("val_select", "test"):
        evaluate_run(run_dir, split)
    layout.update_config(run_dir, sweep=sweep)
    return run_dir
