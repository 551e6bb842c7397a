"""Optuna sweeps over head x policy x hyperparameters on a cached feature store.

Each trial trains a head on ``train`` (early stopping on ``val_select``), fits the exit policy on
``val_calib`` and scores two objectives: certified coverage (maximise; coverage on the objective
split of a policy that certified, 0 when it could not) and AUGRC of the head's selector on
``val_select`` (minimise). The risk target is a constraint ``risk(val split) - alpha <= 0``,
recorded with the trial and given to the sampler as its ``constraints_func``. Test rows are never loaded.

K worker processes share one Optuna storage (SQLite on one machine, PostgreSQL across machines);
each loads the store's rows into RAM once. A second run with the same study name resumes and adds
its trials to the ones already there.

Modules by job: ``data`` (the rows a sweep reads), ``objective`` (one trial, its constraint and
feasibility), ``storage`` (storage URL, sampler, study create / resume), ``run`` (optimize loop,
workers, progress) and ``report`` (trials.csv, plots, Pareto run dirs, summary.json).
"""
from __future__ import annotations

from .data import SWEEP_SPLITS, SweepData, store_fingerprint
from .objective import (
    DIRECTIONS, OBJECTIVE_NAMES, constraint_values, feasible, fit_trial, make_objective, trial_constraints,
    trial_metrics,
)
from .report import (
    SweepResult, pareto_trials, trial_rows, write_outputs, write_plots, write_trial_run, write_trials_csv,
)
from .run import optimize, run_sweep, run_worker, shares, worker_seed
from .storage import GRACE_S, HEARTBEAT_S, check_resume, make_sampler, make_storage, open_study, redact_url

__all__ = [
    "DIRECTIONS", "GRACE_S", "HEARTBEAT_S", "OBJECTIVE_NAMES", "SWEEP_SPLITS", "SweepData", "SweepResult",
    "check_resume", "constraint_values", "feasible", "fit_trial", "make_objective", "make_sampler",
    "make_storage", "open_study", "redact_url", "optimize", "pareto_trials", "run_sweep", "run_worker", "shares",
    "store_fingerprint", "trial_constraints", "trial_metrics", "worker_seed", "write_outputs", "write_plots",
    "write_trial_run", "write_trials_csv",
]
