"""`train` / `calibrate` / `evaluate` on a synthetic store, and the run-folder layout (heads.rundir)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli
from stage1.heads import load_head
from stage1.runs import layout


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stage1.featstore.splits import write_splits
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(0)
    n, d = 800, 8
    w = rng.normal(size=d)
    x = rng.normal(size=(n, 2, d)).astype(np.float32)
    y = (x[:, 0] @ w + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
    y[:5] = -1  # a few unlabelled rows
    path = tmp_path_factory.mktemp("store") / "st"
    write_store(path, x, y)
    write_splits(path, seed=0)
    return path


def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli.main, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mlp"
    code, text = invoke("train", store, "--head", "mlp", "--out", out, "--epochs", "4", "--hidden", "16",
                        "--lr", "0.01", "--seed", "7", "--param", "standardize=false", "--quiet")
    assert code == 0, text
    return out


def test_train_writes_the_run_folder(run: Path, store: Path) -> None:
    for name in ("config.json", "splits.json", "head.safetensors", "head.json", "scores.safetensors"):
        assert (run / name).exists(), name
    cfg = layout.read_config(run)
    assert cfg["head"] == "mlp" and cfg["hparams"]["epochs"] == 4 and cfg["hparams"]["seed"] == 7
    assert cfg["hparams"]["standardize"] is False and cfg["hparams"]["hidden"] == 16
    assert cfg["store"]["views"] == 2 and cfg["store"]["dim"] == 8
    assert (run / "splits.json").read_bytes() == (store / "splits.json").read_bytes()
    assert cfg["training"]["history"]["epochs_run"] >= 1
    assert cfg["training"]["early_stopping_on"] == "val_select"
    assert cfg["splits"]["train"]["labelled"] + cfg["training"]["unlabelled_train_rows_skipped"] == cfg["splits"]["train"]["n"]


def test_scores_match_the_saved_head_on_view0(run: Path, store: Path) -> None:
    from stage1.featstore import open_store
    from stage1.featstore.splits import load_splits

    scores = layout.read_scores(run)
    assert set(scores) == {"train", "val_select", "val_calib", "test"}
    st = open_store(str(store))
    splits = load_splits(store)
    head = load_head(run)
    for split, d in scores.items():
        np.testing.assert_array_equal(d["rows"], splits[split])
        np.testing.assert_array_equal(d["y"], st.labels[splits[split]])
        x0 = st.load_features(rows=splits[split], views=0)[:, 0]
        np.testing.assert_allclose(d["logits"], head.predict_logits(x0), rtol=1e-6)
        assert d["logits"].dtype == np.float32 and d["y"].dtype == np.int8


def test_train_refuses_overwrite_and_bad_input(run: Path, store: Path, tmp_path: Path) -> None:
    code, text = invoke("train", store, "--head", "mlp", "--out", run)
    assert code != 0 and "refusing to overwrite" in text
    code, text = invoke("train", store, "--head", "nope", "--out", tmp_path / "a")
    assert code == 2 and "unknown head 'nope'" in text
    code, text = invoke("train", store, "--head", "gate", "--out", tmp_path / "b", "--param", "fold=3")
    assert code == 2 and "no hyperparameter(s) fold" in text and "folds" in text
    code, text = invoke("train", store, "--head", "mlp", "--out", tmp_path / "c", "--param", "epochs=2.5")
    assert code == 2 and "expected int" in text
    nosplit = tmp_path / "nosplit"
    from stage1.featstore.store import write_store

    write_store(nosplit, np.zeros((10, 1, 4), np.float32), np.arange(10) % 2)
    code, text = invoke("train", nosplit, "--head", "mlp", "--out", tmp_path / "d")
    assert code == 1 and "split" in text and "first" in text
    assert not (tmp_path / "d" / "config.json").exists()


def test_calibrate_ltt_not_certifiable_exits_zero(run: Path) -> None:
    code, text = invoke("calibrate", run, "--policy", "ltt", "--risk", "fnr_exit", "--alpha", "0.001", "--delta", "0.01")
    assert code == 0, text
    pol = json.loads((run / "policy.json").read_text())
    assert pol["policy"] == "ltt" and pol["state"]["certified"] is False
    assert pol["state"]["n_needed"] and "needed" in pol["state"]["reason"]
    assert pol["fit"]["split"] == "val_calib" and pol["fit"]["n"] == int((layout.read_scores(run)["val_calib"]["y"] >= 0).sum())
    assert "NOT CERTIFIED" in text


def test_calibrate_fits_on_val_calib_only(run: Path) -> None:
    """Changing test scores must not change the policy; changing val_calib scores must."""
    from stage1.policies import POLICIES

    code, text = invoke("calibrate", run, "--policy", "coverage", "--coverage", "0.5")
    assert code == 0, text
    pol = json.loads((run / "policy.json").read_text())
    scores, y, _, _ = layout.split_scores(run, "val_calib")
    want = POLICIES.create("coverage", target_coverage=0.5, score="p").fit(scores, y).to_dict()
    assert pol["state"]["t1"] == want["state"]["t1"]
    code, text = invoke("calibrate", run, "--policy", "threshold", "--delta", "0.1")
    assert code == 2 and "does not accept" in text
    code, text = invoke("calibrate", run, "--policy", "bogus")
    assert code == 2 and "unknown policy" in text


def test_rundir_scores_roundtrip_and_errors(tmp_path: Path) -> None:
    per = {"test": {"logits": np.ones((3, 2)), "select": np.array([0.1, 0.2, 0.3]), "y": np.array([0, 1, -1]),
                    "rows": np.array([5, 6, 7])}}
    layout.write_scores(tmp_path, per)
    back = layout.read_scores(tmp_path)
    np.testing.assert_array_equal(back["test"]["rows"], [5, 6, 7])
    scores, y, rows, dropped = layout.split_scores(tmp_path, "test")
    assert dropped == 1 and list(y) == [0, 1] and scores["logits"].shape == (2, 2)
    with pytest.raises(layout.RunDirError, match="no split 'train'"):
        layout.split_scores(tmp_path, "train")
    with pytest.raises(ValueError, match="lack"):
        layout.write_scores(tmp_path, {"x": {"logits": np.ones((1, 2))}})
    layout.start_run(tmp_path / "r", {"head": "mlp"})
    with pytest.raises(layout.RunDirError, match="refusing"):
        layout.start_run(tmp_path / "r", {"head": "mlp"})
    layout.update_config(tmp_path / "r", result=1)
    with pytest.raises(layout.RunDirError, match="already set"):
        layout.update_config(tmp_path / "r", head="gate")
    with pytest.raises(layout.RunDirError, match="calibrate"):
        layout.read_policy(tmp_path / "r")


def test_evaluate_writes_metrics_and_plots(run: Path, tmp_path: Path) -> None:
    from stage1.policies import policy_from_dict
    from stage1.policies.evaluate import STABLE_KEYS, evaluation_metrics

    code, text = invoke("calibrate", run, "--policy", "threshold", "--threshold", "0.88")
    assert code == 0, text
    code, text = invoke("evaluate", run)
    assert code == 0, text
    m = json.loads((run / "metrics.json").read_text())
    assert set(STABLE_KEYS) <= set(m) and m["split"] == "test" and m["policy"] == "threshold"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[: len(STABLE_KEYS)] == list(STABLE_KEYS)
    for png in ("risk_coverage.png", "reliability.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores, y, _, _ = layout.split_scores(run, "test")
    policy = policy_from_dict(json.loads((run / "policy.json").read_text()))
    want = evaluation_metrics(y, scores, policy.decide(scores))
    assert m["coverage"] == pytest.approx(want["coverage"]) and m["augrc"] == pytest.approx(want["augrc"])
    assert m["n"] == len(y)
    code, text = invoke("evaluate", run, "--split", "val_select")
    assert code == 0 and (run / "eval_val_select" / "metrics.json").exists()
    empty = tmp_path / "nopolicy"
    layout.start_run(empty, {"head": "mlp"})
    code, text = invoke("evaluate", empty)
    assert code == 1 and "calibrate" in text


def test_selector_heads_calibrate_on_select_by_default(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "gate"
    code, text = invoke("train", store, "--head", "gate", "--out", out, "--epochs", "2", "--hidden", "8",
                        "--param", "folds=2", "--quiet")
    assert code == 0, text
    assert layout.read_config(out)["head_has_selector"] is True
    assert json.loads((out / "head.json").read_text())["gate_target"] == "out_of_fold"
    code, text = invoke("calibrate", out, "--policy", "coverage", "--coverage", "0.7", "--calibrator", "none")
    assert code == 0, text
    pol = json.loads((out / "policy.json").read_text())
    assert pol["params"]["score"] == "select" and pol["params"]["calibrator"] is None


def test_selectivenet_threshold_defaults_to_its_target_coverage(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "sn"
    code, text = invoke("train", store, "--head", "selectivenet", "--out", out, "--epochs", "2", "--hidden", "8",
                        "--param", "coverage=0.6", "--quiet")
    assert code == 0, text
    assert json.loads((out / "head.json").read_text())["selective_risk_divided_by_coverage"] is True
    code, text = invoke("calibrate", out, "--policy", "coverage")
    assert code == 0, text
    pol = json.loads((out / "policy.json").read_text())
    assert pol["params"]["target_coverage"] == 0.6 and pol["params"]["score"] == "select"
    assert pol["state"]["summary"]["calib_coverage"] >= 0.6


@pytest.mark.parametrize("policy", ["ltt", "crc"])
def test_calibrate_on_two_val_calib_rows_exits_zero_not_certified(tmp_path: Path, policy: str) -> None:
    from stage1.featstore.splits import write_splits
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    x = rng.normal(size=(100, 1, 4)).astype(np.float32)
    x[:, 0, 0] += 2 * y
    write_store(tmp_path / "st", x, y)
    assert write_splits(tmp_path / "st", seed=0, fractions="0.8,0.18,0.02,0")["counts"]["val_calib"]["n"] == 2
    code, text = invoke("train", tmp_path / "st", "--head", "mlp", "--out", tmp_path / "run", "--epochs", "1", "--quiet")
    assert code == 0, text
    code, text = invoke("calibrate", tmp_path / "run", "--policy", policy)
    assert code == 0, text
    state = json.loads((tmp_path / "run" / "policy.json").read_text())["state"]
    assert state["certified"] is False and isinstance(state["n_needed"], int) and state["n_needed"] > 1
    assert f"{state['n_needed']} calibration positives" in state["reason"]
