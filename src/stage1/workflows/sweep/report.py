"""What a sweep reports: ``SweepResult``, trials.csv, the Pareto / importance PNGs, run dirs of the
Pareto-optimal feasible trials and summary.json under ``--out``.

The Pareto front is computed here from ``objective.feasible`` (the trial's own constraint record),
so the trials that become run dirs never depend on how an optuna release treats constraints.
"""
from __future__ import annotations

import csv
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stage1._core.errors import ExistsError
from stage1.workflows.space import SearchSpace

from .data import SweepData
from .objective import CONSTRAINTS_KEY, OBJECTIVE_NAMES, RESULT_ATTR, feasible, objective_names, trial_constraints


@dataclass
class SweepResult:
    """What ``run_sweep`` reports back (``storage`` is the URL with its credentials redacted)."""

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
        """The fields as a plain dict (the CLI prints it as JSON)."""
        return dict(self.__dict__)


def dominates(a: Any, b: Any) -> bool:
    """True when trial ``a`` is at least as good as ``b`` on both objectives and better on one
    (certified coverage maximised, AUGRC minimised)."""
    (cov_a, augrc_a), (cov_b, augrc_b) = a.values, b.values
    return cov_a >= cov_b and augrc_a <= augrc_b and (cov_a > cov_b or augrc_a < augrc_b)


def pareto_trials(study: Any) -> list[Any]:
    """Feasible Pareto-optimal complete trials, best certified coverage first (ties: lower AUGRC)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    front = [t for t in done if not any(dominates(o, t) for o in done)]
    return sorted(front, key=lambda t: (-t.values[0], t.values[1], t.number))


def trial_rows(study: Any, names: tuple[str, str] = OBJECTIVE_NAMES) -> list[dict[str, Any]]:
    """One flat dict per trial for trials.csv; ``names`` label the two objective values."""
    rows = []
    for t in study.trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        if t.values:
            row.update(dict(zip(names, t.values)))
        row["feasible"] = feasible(t) if t.values else ""
        row.update({f"constraint.{k}": v for k, v in (trial_constraints(t) or {}).items()})
        for k, v in t.user_attrs.items():
            if isinstance(v, dict):
                row.update({f"attr.{kk}": vv for kk, vv in v.items() if not (k == RESULT_ATTR and kk == CONSTRAINTS_KEY)})
            else:
                row[f"attr.{k}"] = v
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


def write_plots(study: Any, out: Path, names: tuple[str, str] = OBJECTIVE_NAMES) -> dict[str, str]:
    """Pareto-front and parameter-importance PNGs via optuna.visualization.matplotlib (``names``: the two objectives)."""
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
        ax = ovm.plot_pareto_front(study, target_names=[names[0].replace("_", " "), "AUGRC (val_select)"])
        path = out / "pareto_front.png"
        ax.figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
        plots["pareto_front"] = str(path)
        for i, name in enumerate(names):
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
    names = objective_names(space.objective)
    write_trials_csv(out / "trials.csv", trial_rows(study, names))
    result.plots = write_plots(study, out, names)
    front = pareto_trials(study)
    chosen = front[: max(0, top)]
    n_candidates = sum(1 for t in study.trials if t.state.name == "COMPLETE")
    for t in chosen:
        run_dir = out / "runs" / f"trial-{t.number:05d}"
        head, hp, pol, pp = space.resolve(t.params)
        write_trial_run(data, run_dir, head, hp, pol, pp, seed=seed, train_views=space.resolve_train(t.params)["views"],
                        sweep={"study": study.study_name, "trial": t.number, "values": list(t.values)},
                        candidates=n_candidates, certified_together=len(chosen))
        result.runs.append(str(run_dir))
    if front:
        b = front[0]
        result.best = {"trial": b.number, "values": dict(zip(names, b.values)),
                       "params": b.params, "user_attrs": b.user_attrs,
                       "run_dir": result.runs[0] if result.runs else None}
    atomic_write_json(out / "summary.json", json_safe(result.to_dict() | {
        "objective": space.objective, "space": space.source, "pareto": [
            {"trial": t.number, "values": dict(zip(names, t.values)), "params": t.params}
            for t in front]}))


def write_trial_run(data: SweepData, run_dir: Path, head: str, head_params: dict[str, Any], policy: str,
                    policy_params: dict[str, Any], seed: int, sweep: dict[str, Any], candidates: int = 1,
                    certified_together: int = 1, train_views: bool = True) -> Path:
    """Retrain a trial's head into a standard run dir (train -> calibrate -> evaluate, heads' own code).

    Training is seeded and deterministic, so the run reproduces the trial. Its policy is fitted on
    the certify part of val_calib, which no trial saw, so the choice among ``candidates`` trials
    does not void it; a ``delta`` is divided by ``certified_together`` (Bonferroni) because the
    exported runs share that part and a user may pick among them. An existing run dir of the same
    trial is kept as it is (a resumed sweep does not redo it).

    The run is built in a hidden ``.<name>.*.partial`` folder beside ``run_dir`` and renamed into place
    only when complete, so a sweep killed while writing leaves no half run dir; the next run removes
    the stale temp folder and writes the run again.
    """
    import shutil
    import tempfile

    from stage1._core.io import PARTIAL_SUFFIX, read_json
    from stage1.runs import layout

    cfg_path = run_dir / layout.CONFIG
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
        if cfg.get("sweep", {}).get("trial") == sweep["trial"]:
            return run_dir
        if not _unfinished_sweep_run(cfg, data, head):
            raise ExistsError(f"{run_dir}: holds another run; use another --out")
        sys.stderr.write(f"sweep: {run_dir} was left half-written by a killed sweep; writing it again\n")
        shutil.rmtree(run_dir)
    if run_dir.exists() and not any(run_dir.iterdir()):
        run_dir.rmdir()  # an empty folder holds nothing
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.parent.glob(f".{run_dir.name}.*{PARTIAL_SUFFIX}"):  # left by a killed sweep
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", suffix=PARTIAL_SUFFIX, dir=run_dir.parent))
    try:
        _build_trial_run(data, work, head, head_params, policy, policy_params, seed, sweep, candidates,
                         certified_together, train_views)
        os.replace(work, run_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return run_dir


def _unfinished_sweep_run(cfg: dict[str, Any], data: SweepData, head: str) -> bool:
    """True for a run dir an older sweep was killed writing: trained on this store with this head,
    but the sweep never recorded its trial (``sweep`` is the last thing written)."""
    if "sweep" in cfg or cfg.get("head") != head:
        return False
    stored = cfg.get("store", {}).get("path") if isinstance(cfg.get("store"), dict) else None
    return stored is not None and stored == str(Path(data.store_path).resolve())


def _build_trial_run(data: SweepData, run_dir: Path, head: str, head_params: dict[str, Any], policy: str,
                     policy_params: dict[str, Any], seed: int, sweep: dict[str, Any], candidates: int,
                     certified_together: int, train_views: bool) -> None:
    """train -> calibrate -> evaluate into the (new, temporary) ``run_dir``, then record ``sweep``."""
    from stage1.runs import layout
    from stage1.runs.steps import calibrate_run, evaluate_run, train_run

    from stage1.policies.selection import DEFAULT_CERTIFY_FRACTION, PART_SEED, SelectionRecord

    pp = dict(policy_params)
    score = pp.pop("score", "p")
    from stage1.policies import POLICIES

    split = max(1, int(certified_together))
    declared = POLICIES.create(policy, score=score, **pp).params()  # the delta in force, default included
    if split > 1 and declared.get("delta") is not None:
        pp["delta"] = float(declared["delta"]) / split
    record = SelectionRecord("holdout", max(1, int(candidates)), "certify", DEFAULT_CERTIFY_FRACTION, PART_SEED,
                             split, "the sweep's Pareto front (choose-part certificates, val_select coverage, AUGRC)")
    train_run(data.store_path, head, run_dir, {"seed": seed, "threads": 0, **head_params}, progress=False,
              train_views=train_views)
    calibrate_run(run_dir, policy, {"seed": seed, **pp}, score=score, part="certify", selection=record,
                  certify_fraction=DEFAULT_CERTIFY_FRACTION, part_seed=PART_SEED)
    for split in ("val_select", "test"):
        evaluate_run(run_dir, split)
    layout.update_config(run_dir, sweep=sweep)
