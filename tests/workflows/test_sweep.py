"""sweep: search-space parsing, the CLI end to end, resume (also after a killed run), refusals."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli
from stage1.workflows.space import SearchSpace, resolve_space_path, shipped_spaces, studies_dir
from stage1.workflows.sweep import SWEEP_SPLITS, SweepData, feasible, pareto_trials, trial_constraints

ROOT = Path(__file__).resolve().parents[2]

TINY_SPACE = """
[objective]
risk = "fnr_exit"
alpha = 0.1

[head.mlp]
hidden = { choices = [8, 16] }
lr = { low = 1e-3, high = 1e-2, log = true }
epochs = { low = 1, high = 3 }
batch_size = 32

[head.gate]
hidden = 8
epochs = 2
batch_size = 32
gate_target = "in_sample"
gate_weight = { low = 0.5, high = 1.5 }

[policy.ltt]
alpha = 0.1
delta = 0.2
calibrator = { choices = ["temperature", "platt"] }

[policy.threshold]
threshold = { low = 0.6, high = 0.95 }
"""


def _store(path: Path, n: int = 240, d: int = 8, seed: int = 0, shift: float = 1.5) -> Path:
    from stage1.featstore.splits import write_splits
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 2, d)).astype(np.float32)
    x[:, :, 0] += shift * (2 * y - 1)[:, None]
    write_store(path, x, y)
    write_splits(path, seed=0)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _store(tmp_path_factory.mktemp("sweep") / "store")


@pytest.fixture(scope="module")
def space_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("space") / "tiny.toml"
    p.write_text(TINY_SPACE)
    return p


def _complete(db: Path, study: str) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT t.state, COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
            "WHERE s.study_name = ? GROUP BY t.state", (study,)).fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()
    return {str(k): int(v) for k, v in rows}


# -- the search space ---------------------------------------------------------------------------------------
def test_shipped_spaces_parse_and_name_registered_parts() -> None:
    from stage1.heads import HEADS
    from stage1.policies import POLICIES

    assert {"default", "gate", "quick"} <= set(shipped_spaces())
    for name in shipped_spaces():
        sp = SearchSpace.load(studies_dir() / f"{name}.toml")
        sp.check_names(HEADS.names(), POLICIES.names())
        for head, params in sp.heads.items():  # every fixed value / range end is a valid hyperparameter
            HEADS.create(head, **{k: (v["choices"][0] if isinstance(v, dict) and "choices" in v else
                                      v["low"] if isinstance(v, dict) else v) for k, v in params.items()})
        for pol, params in sp.policies.items():
            POLICIES.create(pol, **{k: (v["choices"][-1] if isinstance(v, dict) and "choices" in v else
                                        v["high"] if isinstance(v, dict) else v) for k, v in params.items()})


def test_space_suggest_and_resolve_round_trip(space_file: Path) -> None:
    import optuna

    sp = SearchSpace.load(space_file)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        drawn = sp.suggest(trial)
        assert sp.resolve(trial.params) == drawn
        head, hp, pol, pp = drawn
        seen.add((head, pol))
        if head == "mlp":
            assert hp["hidden"] in (8, 16) and 1 <= hp["epochs"] <= 3 and isinstance(hp["epochs"], int)
            assert 1e-3 <= hp["lr"] <= 1e-2 and hp["batch_size"] == 32
        else:
            assert hp["gate_target"] == "in_sample" and 0.5 <= hp["gate_weight"] <= 1.5
        study.tell(trial, [0.0, 0.0])
    assert len(seen) >= 3


@pytest.mark.parametrize("text, needle", [
    ("[head.mlp]\nlr = 1\n", "at least one [head.NAME] and one [policy.NAME]"),
    ("[head.mlp]\nlr = { low = 2, high = 1 }\n[policy.ltt]\n", "low (2) must be <= high (1)"),
    ("[head.mlp]\nlr = { low = 0, high = 1, log = true }\n[policy.ltt]\n", "log = true needs low > 0"),
    ("[head.mlp]\nlr = { lo = 0 }\n[policy.ltt]\n", "needs either choices"),
    ("[head.mlp]\nhidden = { choices = [] }\n[policy.ltt]\n", "non-empty list"),
    ("[objective]\nrisk = 'accuracy'\n[head.mlp]\n[policy.ltt]\n", "risk 'accuracy'"),
    ("[objective]\ncoverage_split = 'test'\n[head.mlp]\n[policy.ltt]\n", "never test"),
    ("[heads.mlp]\n", "unknown table"),
    ("[head.mlp\n", "not valid TOML"),
])
def test_bad_spaces_are_refused_with_the_reason(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError) as exc:
        SearchSpace.load(p)
    assert needle in str(exc.value) and str(p) in str(exc.value)


@pytest.mark.parametrize("objective, policy, refused", [
    ("fnr_exit", "[policy.crc]\nalpha = 0.02\n", True),  # crc bounds E[miss rate], never FNR_exit
    ("miss_rate", "[policy.crc]\nalpha = 0.02\n", False),
    ("selective_error", "[policy.ltt]\nrisk = 'fnr_exit'\n", True),  # fnr_exit alone: no false alarms
    ("selective_error", "[policy.ltt]\nrisk = 'fnr_exit'\neps = 0.1\n", False),  # eps bounds them
    ("fnr_exit", "[policy.ltt]\nrisk = { choices = ['miss_rate', 'fnr_exit'] }\n", False),
    ("fnr_exit", "[policy.threshold]\n", False),  # a baseline certifies nothing and earns 0: allowed
])
def test_a_policy_certifying_another_risk_is_refused(tmp_path: Path, objective: str, policy: str,
                                                      refused: bool) -> None:
    from stage1.heads import HEADS
    from stage1.policies import POLICIES

    p = tmp_path / "s.toml"
    p.write_text(f"[objective]\nrisk = '{objective}'\n[head.mlp]\nepochs = 1\n{policy}")
    space = SearchSpace.load(p)
    if refused:
        with pytest.raises(ValueError, match=f"not the objective's risk {objective}"):
            space.check_names(HEADS.names(), POLICIES.names())
    else:
        space.check_names(HEADS.names(), POLICIES.names())


def test_space_resolution() -> None:
    assert resolve_space_path(None, "gate") == studies_dir() / "gate.toml"
    assert resolve_space_path(None, "my-study") == studies_dir() / "default.toml"
    assert resolve_space_path("quick", "x") == studies_dir() / "quick.toml"
    with pytest.raises(FileNotFoundError, match="shipped"):
        resolve_space_path("nope.toml", "x")


# -- data, feasibility and the Pareto front ------------------------------------------------------------------
def test_sweep_data_never_loads_test_rows(store: Path, monkeypatch) -> None:
    from stage1.featstore.splits import load_splits
    from stage1.featstore.store import Store

    asked: list[np.ndarray] = []
    real = Store.load_features

    def spy(self, rows=None, views=None, dtype=np.float32):
        assert rows is not None, "a sweep must name the rows it reads"
        asked.append(np.asarray(rows))
        return real(self, rows, views=views, dtype=dtype)

    monkeypatch.setattr(Store, "load_features", spy)
    data = SweepData.load(store)
    test_rows = set(np.asarray(load_splits(store)["test"]).tolist())
    assert "test" not in SWEEP_SPLITS and set(data.x) == set(SWEEP_SPLITS) and len(asked) == len(SWEEP_SPLITS)
    assert test_rows and not test_rows & set(np.concatenate(asked).tolist())


def test_feasibility_comes_from_the_recorded_constraint_only() -> None:
    """Pareto run dirs come from feasible trials; a trial with no constraint record is never feasible."""
    import optuna
    from optuna.trial import create_trial

    def trial(values: list[float], constraint: float | None) -> optuna.trial.FrozenTrial:
        result = {"risk": 0.0} if constraint is None else {"risk": 0.0, "constraints": {"fnr_exit": constraint}}
        return create_trial(values=values, user_attrs={"result": result})

    study = optuna.create_study(directions=["maximize", "minimize"])
    for values, c in [([0.9, 0.1], 0.05), ([0.5, 0.2], -0.01), ([0.6, 0.3], 0.0), ([0.4, 0.1], -0.02),
                      ([0.95, 0.05], None), ([0.4, 0.1], -0.03)]:
        study.add_trial(trial(values, c))
    t = study.trials
    assert [feasible(x) for x in t] == [False, True, True, True, False, True]
    assert trial_constraints(t[0]) == {"fnr_exit": 0.05} and trial_constraints(t[4]) is None
    # the infeasible 0 and the unrecorded 4 dominate everything but are excluded; ties on the front are kept
    assert [x.number for x in pareto_trials(study)] == [2, 1, 3, 5]


# -- the command -----------------------------------------------------------------------------------------
def test_sweep_cli_writes_results_and_resumes(store: Path, space_file: Path, tmp_path: Path) -> None:
    import optuna

    db = tmp_path / "studies.db"
    out = tmp_path / "out"
    args = ["sweep", str(store), "--study", "s", "--storage", f"sqlite:///{db}", "--space", str(space_file),
            "--out", str(out), "--seed", "1", "--quiet", "--top", "2", "--threads", "1"]
    res = CliRunner().invoke(cli.main, [*args, "--trials", "4"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_before"] == 0 and summary["n_after"] == 4 and summary["states"] == {"COMPLETE": 4}
    import torch

    assert summary["threads"] == 1 and summary["workers"] == 1 and torch.get_num_threads() == 1
    for f in ("trials.csv", "summary.json", "pareto_front.png"):
        assert (out / f).is_file(), f
    assert (out / "pareto_front.png").stat().st_size > 5000
    runs = sorted((out / "runs").iterdir())
    assert 1 <= len(runs) <= 2
    for run in runs:  # standard run dirs: export works on them
        for f in ("config.json", "head.safetensors", "policy.json", "metrics.json", "scores.safetensors"):
            assert (run / f).is_file(), (run, f)
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["sweep"]["study"] == "s" and cfg["hparams"]["seed"] == 1  # --seed reaches the heads
    # features imported from arrays pin no backbone: export says so instead of making a bundle
    res = CliRunner().invoke(cli.main, ["export", str(runs[0]), "--out", str(tmp_path / "bundle")])
    assert res.exit_code == 1 and "not extracted from images" in res.output and not (tmp_path / "bundle").exists()

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    t = study.trials[0]
    constraints = trial_constraints(t)
    assert set(constraints) == {"fnr_exit"}
    assert constraints["fnr_exit"] == pytest.approx(t.user_attrs["result"]["risk"] - 0.1)
    assert list(t.system_attrs["constraints"]) == [constraints["fnr_exit"]]  # the sampler got it too
    assert 0.0 <= t.values[0] <= 1.0 and t.values[1] >= 0.0
    if not t.user_attrs["result"]["certified"]:
        assert t.values[0] == 0.0  # uncertified policies earn no certified coverage
    header = (out / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"certified_coverage", "augrc", "feasible", "constraint.fnr_exit", "param.head", "attr.reason",
            "attr.certified"} <= set(header)
    best = json.loads((out / "summary.json").read_text())["best"]
    assert best["run_dir"] in map(str, runs)
    # the run dir reproduces its trial's head (seeded training): same val_select AUGRC. Its policy is
    # not the trial's: it is refitted on the certify part of val_calib, which no trial saw, with
    # delta split over the runs exported together (the trials' own fits only ranked them)
    run_metrics = json.loads((Path(best["run_dir"]) / "eval_val_select" / "metrics.json").read_text())
    trial = study.trials[best["trial"]]
    assert run_metrics["augrc"] == pytest.approx(trial.values[1], rel=1e-6)
    pol = json.loads((Path(best["run_dir"]) / "policy.json").read_text())
    assert pol["fit"]["part"] == "certify" and pol["selection"]["candidates"] == 4
    assert pol["selection"]["delta_split"] == len(runs)
    if pol["policy"] == "ltt":
        assert pol["params"]["delta"] == pytest.approx(0.2 / len(runs))
    from stage1.policies.selection import DEFAULT_CERTIFY_FRACTION, PART_SEED, holdout_parts
    from stage1.runs import layout

    sc = layout.read_scores(best["run_dir"])["val_calib"]
    keep = sc["y"] >= 0
    parts = holdout_parts(sc["rows"][keep], sc["y"][keep], DEFAULT_CERTIFY_FRACTION, PART_SEED)
    assert pol["fit"]["n"] == int(parts["certify"].sum())
    # ... and no trial ever saw those rows: SweepData holds only the choose part of val_calib
    data = SweepData.load(store)
    assert set(data.rows["val_calib"].tolist()) == set(sc["rows"][keep][parts["choose"]].tolist())

    # same study name: resumes, and the trial counts add up (the TPE seed differs per resume)
    res = CliRunner().invoke(cli.main, [*args, "--trials", "2"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_before"] == 4 and summary["n_after"] == 6
    params = [json.dumps(t.params, sort_keys=True) for t in optuna.load_study(study_name="s", storage=f"sqlite:///{db}").trials]
    assert len(set(params)) == 6


def test_sweep_refuses_resume_on_other_features(store: Path, space_file: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    base = ["--study", "r", "--storage", db, "--space", str(space_file), "--quiet"]
    res = CliRunner().invoke(cli.main, ["sweep", str(store), *base, "--trials", "1"])
    assert res.exit_code == 0, res.output
    other = _store(tmp_path / "other", seed=5)
    res = CliRunner().invoke(cli.main, ["sweep", str(other), *base, "--trials", "1"])
    assert res.exit_code != 0 and "other features or splits" in res.output


def test_sweep_usage_errors(store: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.main, ["sweep", str(store), "--study", "x", "--space", str(tmp_path / "none.toml"),
                                        "--storage", f"sqlite:///{tmp_path / 'x.db'}"])
    assert res.exit_code == 2 and "no such file" in res.output
    res = CliRunner().invoke(cli.main, ["sweep", str(store), "--study", "x", "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output
    bare = _store(tmp_path / "nosplits")
    (bare / "splits.json").unlink()
    res = CliRunner().invoke(cli.main, ["sweep", str(bare), "--study", "x", "--storage", f"sqlite:///{tmp_path / 'x.db'}"])
    assert res.exit_code != 0 and "split" in res.output


def test_sweep_refuses_an_out_holding_other_runs(store: Path, space_file: Path, tmp_path: Path) -> None:
    """A run dir of the same name from another study is not overwritten: a one-line error, no traceback."""
    out = tmp_path / "out"
    for n in range(4):
        (out / "runs" / f"trial-{n:05d}").mkdir(parents=True)
        (out / "runs" / f"trial-{n:05d}" / "config.json").write_text('{"sweep": {"study": "other", "trial": -1}}')
    res = CliRunner().invoke(cli.main, ["sweep", str(store), "--study", "o", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
                                        "--space", str(space_file), "--out", str(out), "--seed", "1", "--trials", "4",
                                        "--quiet"])
    assert res.exit_code == 2 and "holds another run" in res.output, res.output  # an --out in use: choose another (usage)
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_killed_sweep_resumes_with_two_workers(store: Path, space_file: Path, tmp_path: Path) -> None:
    """Kill a 2-worker sweep mid-way (SIGKILL to its whole process group); a second run adds its trials."""
    db = tmp_path / "studies.db"
    args = [sys.executable, "-m", "stage1", "sweep", str(store), "--study", "k", "--storage", f"sqlite:///{db}",
            "--space", str(space_file), "--trials", "400", "--workers", "2", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and _complete(db, "k").get("COMPLETE", 0) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _complete(db, "k")
    assert before.get("COMPLETE", 0) >= 2, before
    n_before = sum(before.values())
    res = CliRunner().invoke(cli.main, ["sweep", str(store), "--study", "k", "--storage", f"sqlite:///{db}",
                                        "--space", str(space_file), "--trials", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    after = _complete(db, "k")
    assert summary["n_before"] == n_before and summary["n_after"] == n_before + 3
    assert after.get("COMPLETE", 0) == before.get("COMPLETE", 0) + 3


# -- credentials in the storage URL ----------------------------------------------------------------------
def test_redact_url_hides_passwords_only() -> None:
    from stage1.workflows.sweep import redact_url

    assert redact_url("postgresql://bob:s3cret@db.example:5432/optuna") == "postgresql://bob:***@db.example:5432/optuna"
    assert redact_url("postgresql+psycopg2://u:p%40ss@h/d") == "postgresql+psycopg2://u:***@h/d"
    assert redact_url("postgresql://h/db?user=a&password=xyz") == "postgresql://h/db?user=a&password=***"
    for safe in ("sqlite:///studies.db", "sqlite:////abs/x.db", "postgresql://bob@h/db", "sqlite:///:memory:"):
        assert redact_url(safe) == safe


def test_sweep_never_shows_the_storage_password(store: Path, space_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from stage1.workflows.sweep import run as sweep_run

    real, db = sweep_run.make_storage, f"sqlite:///{tmp_path / 'pg.db'}"
    monkeypatch.setattr(sweep_run, "make_storage", lambda url: real(db))  # stands in for a PostgreSQL server
    url = "postgresql://bob:hunter2@db.example:5432/optuna"
    out = tmp_path / "out"
    res = CliRunner().invoke(cli.main, ["sweep", str(store), "--study", "p", "--storage", url, "--space",
                                        str(space_file), "--trials", "1", "--quiet", "--out", str(out), "--top", "1"])
    assert res.exit_code == 0, res.output
    assert "hunter2" not in res.output and json.loads(res.stdout)["storage"] == "postgresql://bob:***@db.example:5432/optuna"
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".csv", ".txt"):
            assert "hunter2" not in f.read_text(errors="replace"), f


def _trial_run(store: Path, run_dir: Path, trial: int = 0) -> Path:
    from stage1.workflows.sweep.data import SweepData
    from stage1.workflows.sweep.report import write_trial_run

    return write_trial_run(SweepData.load(store), run_dir, "mlp", {"hidden": 8, "epochs": 1, "batch_size": 32},
                           "threshold", {"threshold": 0.8}, seed=0,
                           sweep={"study": "s", "trial": trial, "values": [0.5, 0.1]})


def test_a_run_dir_killed_mid_write_is_written_again(store: Path, tmp_path: Path, monkeypatch) -> None:
    """A sweep that dies while writing a run dir leaves nothing that blocks the next run ("holds another run")."""
    import stage1.runs.steps as steps

    run_dir = tmp_path / "out" / "runs" / "trial-00000"
    real = steps.evaluate_run

    def dies(*a, **k):
        raise KeyboardInterrupt  # the process stops between train / calibrate and the sweep record

    monkeypatch.setattr(steps, "evaluate_run", dies)
    with pytest.raises(KeyboardInterrupt):
        _trial_run(store, run_dir)
    assert not run_dir.exists()  # built aside, renamed only when complete
    monkeypatch.setattr(steps, "evaluate_run", real)
    # what a kill -9 leaves: a stale temp folder of the same trial
    stale = run_dir.parent / ".trial-00000.x1.partial"
    (stale / "junk").mkdir(parents=True)
    _trial_run(store, run_dir)
    assert json.loads((run_dir / "config.json").read_text())["sweep"]["trial"] == 0
    assert not stale.exists() and not list(run_dir.parent.glob("*.partial"))
    assert _trial_run(store, run_dir) == run_dir  # complete: kept as it is


def test_a_half_run_dir_left_by_an_older_sweep_is_recovered(store: Path, tmp_path: Path) -> None:
    """A run dir trained on this store with this head but without its sweep record is rewritten, not refused."""
    from stage1.runs.steps import train_run

    run_dir = tmp_path / "out" / "runs" / "trial-00001"
    train_run(str(store), "mlp", run_dir, {"seed": 0, "threads": 0, "hidden": 8, "epochs": 1, "batch_size": 32},
              progress=False)
    assert "sweep" not in json.loads((run_dir / "config.json").read_text())
    _trial_run(store, run_dir, trial=1)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["sweep"]["trial"] == 1 and (run_dir / "policy.json").exists()


def test_a_run_where_every_trial_fails_is_an_error_naming_the_first_reason(store: Path, space_file: Path,
                                                                           tmp_path: Path, monkeypatch) -> None:
    from stage1.workflows.sweep import run as sweep_run

    def failing(data, space, seed):
        def objective(trial):
            raise ValueError(f"features of trial {trial.number} are degenerate")
        return objective

    monkeypatch.setattr(sweep_run, "make_objective", failing)
    db = f"sqlite:///{tmp_path / 's.db'}"
    res = CliRunner().invoke(cli.main, ["sweep", str(store), "--study", "f", "--storage", db, "--space", str(space_file),
                                        "--trials", "2", "--quiet"])
    assert res.exit_code == 1
    assert "all 2 trial(s) of this run failed" in res.output and "trial 0 are degenerate" in res.output
    assert "Traceback" not in res.output
