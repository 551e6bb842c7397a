"""Running a sweep: the optimize loop, K worker processes sharing one storage, the progress bar.

``run_sweep`` is the whole command: check the space and the store, create or resume the study,
split the trials over workers (each loads the store into RAM once and gets its own sampler seed),
wait for them, then hand the finished study to ``report.write_outputs``.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from stage1._core.errors import ConfigError, DataError
from stage1.workflows.space import SearchSpace, resolve_space_path

from .data import SweepData
from .objective import PRIMARY_OBJECTIVES, make_objective, with_primary
from .report import SweepResult, write_outputs
from .storage import check_resume, make_storage, open_study, redact_url


def worker_seed(seed: int, n_existing: int, worker: int) -> int:
    """Sampler seed of one worker: different per worker and per resume, reproducible from --seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{n_existing}:{worker}".encode()).digest()[:4], "little")


def shares(total: int, workers: int) -> list[int]:
    """Split ``total`` trials over ``workers`` (the first ones take the remainder)."""
    return [total // workers + (1 if i < total % workers else 0) for i in range(workers)]


def _set_threads(threads: int) -> None:
    """Torch's intra-op thread count for this process (heads train with it)."""
    import torch

    torch.set_num_threads(max(1, threads))


def run_worker(store: str, study_name: str, storage_url: str, space_path: str, n_trials: int,
               seed: int, sampler_seed: int, threads: int, progress: bool = False,
               objective: str = PRIMARY_OBJECTIVES[0]) -> int:
    """One worker: load the store once, then run ``n_trials`` trials into the shared study."""
    import optuna

    _set_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.load(space_path)
    space.objective = with_primary(space.objective, objective)
    data = SweepData.load(store)
    study = open_study(make_storage(storage_url), study_name, sampler_seed)
    optimize(study, make_objective(data, space, seed), n_trials, progress)
    return n_trials


#: trial user attribute holding why a failed trial failed.
FAIL_REASON = "fail_reason"


def check_not_all_failed(study: Any, n_before: int) -> None:
    """A DataError when every trial this run added failed (a sweep that learnt nothing must not exit 0)."""
    new = [t for t in study.trials if t.number >= n_before]
    if new and all(t.state.name == "FAIL" for t in new):
        reason = next((t.user_attrs.get(FAIL_REASON) for t in new if t.user_attrs.get(FAIL_REASON)), "no reason recorded")
        raise DataError(f"sweep {study.study_name}: all {len(new)} trial(s) of this run failed (first: {reason}); "
                        "fix the store or the search space, then run again (the failed trials stay in the study)")


def optimize(study: Any, objective: Callable[[Any], Any], n_trials: int, progress: bool) -> None:
    """``study.optimize`` for ``n_trials`` trials (a failing trial is recorded, not fatal), with a tqdm bar."""
    bar = None
    callbacks = []
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_trials, desc=f"sweep {study.study_name}", unit="trial", file=sys.stderr)
        callbacks.append(lambda _s, _t: bar.update(1))
    caught = (ValueError, RuntimeError, FloatingPointError)

    def recorded(trial: Any) -> Any:
        try:
            return objective(trial)
        except caught as exc:  # kept on the trial, so a run where every trial fails can say why
            trial.set_user_attr(FAIL_REASON, f"{type(exc).__name__}: {str(exc)[:300]}")
            raise

    try:
        study.optimize(recorded, n_trials=n_trials, callbacks=callbacks, catch=caught, gc_after_trial=False)
    finally:
        if bar is not None:
            bar.close()


def _worker_entry(kwargs: dict[str, Any]) -> None:
    """Entry point of a spawned worker process (offline, warnings off)."""
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


def run_sweep(store: str | os.PathLike[str], study_name: str, storage: str = "sqlite:///studies.db",
              trials: int = 20, space: str | os.PathLike[str] | None = None, workers: int = 1,
              out: str | os.PathLike[str] | None = None, seed: int = 0, top: int = 3,
              threads: int | None = None, progress: bool = True, objective: str = PRIMARY_OBJECTIVES[0]) -> SweepResult:
    """Run (or resume) a sweep: ``trials`` more trials over ``workers`` processes, then write results.

    ``threads`` is torch's thread count in each worker (default 1: on small heads one thread per
    process beats several threads, measured 5x under load). ``objective`` is the primary (maximised)
    objective: certified_coverage or reward (recorded in the study's objective facts). ``out`` receives trials.csv,
    summary.json, the Pareto / importance PNGs and run dirs of up to ``top`` Pareto-optimal
    feasible trials (``runs/trial-NNNNN``), each exportable with ``export``.
    """
    import multiprocessing as mp

    import optuna

    from stage1.heads import HEADS
    from stage1.policies import POLICIES

    if trials < 0 or workers < 1 or (threads is not None and threads < 1):
        raise ConfigError(f"--trials must be >= 0, --workers and --threads >= 1 (got {trials}, {workers}, {threads})")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space_path = resolve_space_path(space, study_name)
    sp = SearchSpace.load(space_path)
    sp.objective = with_primary(sp.objective, objective)
    sp.check_names(HEADS.names(), POLICIES.names())
    data = SweepData.load(store)
    study = open_study(make_storage(storage), study_name, seed)
    check_resume(study, sp, data)
    n_before = len(study.trials)
    threads = threads or 1  # small heads train fastest single-threaded; parallelise with workers
    t0 = time.perf_counter()
    exit_codes: list[int] = []
    jobs = [dict(store=str(store), study_name=study_name, storage_url=storage, space_path=str(space_path),
                 n_trials=n, seed=seed, sampler_seed=worker_seed(seed, n_before, i), threads=threads,
                 objective=objective)
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
    check_not_all_failed(study, n_before)
    result = SweepResult(study=study_name, storage=redact_url(storage), n_before=n_before, n_after=len(study.trials),
                         states=states, seconds=seconds, out=None if out is None else str(out), runs=[],
                         best=None, plots={}, worker_exit_codes=exit_codes, workers=workers, threads=threads)
    if out is not None:
        _set_threads(threads)  # the same thread count as the trials: retrained runs reproduce them
        write_outputs(study, sp, data, Path(out), result, top=top, seed=seed)
    return result
