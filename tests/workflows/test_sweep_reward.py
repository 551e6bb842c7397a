"""sweep --objective reward: the expected simulated subnet reward on val_select as the maximised objective."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli

SPACE = """
[objective]
risk = "fnr_exit"
alpha = 0.2

[head.mlp]
hidden = 8
epochs = { low = 4, high = 6 }
batch_size = 32
lr = 0.01

[policy.threshold]
threshold = { low = 0.5, high = 0.7 }

[policy.reward]
n_orderings = 20
n_rounds = 100
n_boot = 0
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stage1.featstore.splits import write_splits
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(0)
    n, d = 300, 8
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 1, d)).astype(np.float32)
    x[:, :, 0] += 1.5 * (2 * y - 1)[:, None]
    path = tmp_path_factory.mktemp("sweep_reward") / "st"
    write_store(path, x, y)
    write_splits(path, seed=0)
    return path


def test_two_trial_sweep_maximises_the_simulated_reward(store: Path, tmp_path: Path) -> None:
    import optuna

    from stage1.workflows.sweep import SweepData, fit_trial
    from stage1.workflows.sweep.objective import simulated_reward

    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    args = ["sweep", str(store), "--study", "r", "--storage", db, "--space", str(space), "--trials", "2",
            "--quiet"]
    res = CliRunner().invoke(cli.main, [*args, "--objective", "reward", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    # the outputs name the first value after the objective it is, not certified coverage
    header = (tmp_path / "out" / "trials.csv").read_text().splitlines()[0].split(",")
    assert "reward" in header and "certified_coverage" not in header
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert all(set(p["values"]) == {"reward", "augrc"} for p in summary["pareto"]) and summary["pareto"]
    study = optuna.load_study(study_name="r", storage=db)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2
    assert study.user_attrs["objective"]["primary"] == "reward"
    data = SweepData.load(store)
    for t in done:
        # the first value is the trial's recorded reward, and re-fitting the trial gives the same number
        assert t.values[0] == t.user_attrs["result"]["reward"] and 0.0 < t.values[0] <= 1.0
        head, hp = "mlp", {k.split(".", 1)[1]: v for k, v in t.params.items() if k.startswith("mlp.")}
        pol = t.params["policy"]
        pp = {k.split(".", 1)[1]: v for k, v in t.params.items() if k.startswith(f"{pol}.")}
        fixed = {"threshold": {}, "reward": {"n_orderings": 20, "n_rounds": 100, "n_boot": 0}}[pol]
        _, policy, scores = fit_trial(data, head, {"hidden": 8, "batch_size": 32, "lr": 0.01, **hp}, pol, {**fixed, **pp}, seed=0)
        assert simulated_reward(policy, scores["val_select"], data.y["val_select"], seed=0) == pytest.approx(t.values[0])
    assert json.loads(res.stdout)["n_after"] == 2
    # the study keeps its objective: resuming it under certified coverage is refused
    again = CliRunner().invoke(cli.main, args)
    assert again.exit_code == 1 and "objective" in again.output


def test_simulated_reward_is_zero_without_both_classes() -> None:
    from stage1.policies import POLICIES
    from stage1.policies.audit import synthetic_scores
    from stage1.workflows.sweep.objective import simulated_reward, with_primary

    sc, y = synthetic_scores(200, seed=1)
    pol = POLICIES.create("threshold", threshold=0.8).fit(sc, y)
    assert simulated_reward(pol, sc, np.ones(200, dtype=int), seed=0) == 0.0
    assert 0.0 < simulated_reward(pol, sc, y, seed=0) <= 1.0
    assert with_primary({"risk": "fnr_exit"}, "certified_coverage") == {"risk": "fnr_exit"}
    from stage1._core.errors import ConfigError

    with pytest.raises(ConfigError, match="--objective"):
        with_primary({}, "accuracy")
