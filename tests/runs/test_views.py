"""calibrate / evaluate --views validator: one drawn view per image, per-level metrics and certification."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli
from stage1.runs import layout


def invoke(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(cli.main, [str(a) for a in args])
    return res.exit_code, res.output


def _write_view_store(path: Path, n: int = 1200, v: int = 5, d: int = 8) -> np.ndarray:
    from stage1.featstore.splits import write_splits
    from stage1.featstore.store import Store, row_hashes

    rng = np.random.default_rng(1)
    w = rng.normal(size=d)
    clean = rng.normal(size=(n, d))
    y = (clean @ w + 0.3 * rng.normal(size=n) > 0).astype(np.int8)
    y[:4] = -1
    levels = np.concatenate([np.full((n, 1), -1), rng.integers(0, 4, size=(n, v - 1))], axis=1).astype(np.int8)
    x = np.repeat(clean[:, None, :], v, axis=1) + levels[..., None].clip(0) * 0.4 * rng.normal(size=(n, v, d))
    x = x.astype(np.float32)
    with Store.create(path, n, v, d, {"kind": "arrays"}, dtype="float32", chunk_rows=256,
                      extra_attrs={"n_consumed": n}, view_param_names=["p"]) as st:
        ids = [f"row-{i:06d}" for i in range(n)]
        sha = row_hashes(x)
        for s in range(0, n, 256):
            e = min(n, s + 256)
            st.write_block(s, x[s:e], y[s:e], ids[s:e], sha[s:e], view_levels=levels[s:e],
                           view_params=np.zeros((e - s, v, 1), np.float32))
        st.commit(n, n_consumed=n)
        st.finalize()
    write_splits(path, seed=0)
    return levels


@pytest.fixture(scope="module")
def vrun(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    store = tmp_path_factory.mktemp("vstore") / "st"
    levels = _write_view_store(store)
    run = tmp_path_factory.mktemp("vruns") / "mlp"
    code, text = invoke("train", store, "--head", "mlp", "--out", run, "--epochs", "3", "--hidden", "16",
                        "--seed", "1", "--quiet")
    assert code == 0, text
    return store, run, levels


def test_train_writes_every_views_scores(vrun) -> None:
    from stage1.heads import load_head

    store, run, levels = vrun
    v0 = layout.read_scores(run)  # view-0 readers see exactly what they saw before
    assert set(v0["val_calib"]) == set(layout.SCORE_FIELDS)
    vs, y, rows, _ = layout.split_view_scores(run, "val_calib", labelled_only=False)
    n = len(rows)
    assert vs["view_logits"].shape == (n, 5, 2) and vs["view_select"].shape == (n, 5)
    np.testing.assert_array_equal(vs["view_levels"], levels[rows])
    np.testing.assert_allclose(vs["view_logits"][:, 0], v0["val_calib"]["logits"], rtol=1e-5, atol=1e-6)
    from stage1.featstore import open_store

    x3 = open_store(str(store)).load_features(rows=rows, views=3)[:, 0]
    np.testing.assert_allclose(vs["view_logits"][:, 3], load_head(run).predict_logits(x3), rtol=1e-5, atol=1e-6)
    assert layout.read_config(run)["store"]["view_levels"] is True


def test_calibrate_validator_draws_one_view_per_image(vrun) -> None:
    _, run, levels = vrun
    code, text = invoke("calibrate", run, "--policy", "threshold", "--views", "validator", "--view-seed", "5")
    assert code == 0, text
    pol = layout.read_policy(run)
    v = pol["views"]
    assert v["mode"] == "validator" and v["seed"] == 5
    rows = np.array(v["draw"]["rows"])
    assert len(rows) == len(np.unique(rows)) == pol["fit"]["n"]  # one view per image, never two
    _, y, calib_rows, _ = layout.split_scores(run, "val_calib")
    assert set(rows.tolist()) == set(calib_rows.tolist())  # every labelled image has a validator view here
    np.testing.assert_array_equal(levels[rows, np.array(v["draw"]["view"])], v["draw"]["level"])
    assert sum(v["level_counts"].values()) == len(rows)
    assert sum(m["n"] for m in v["per_level"].values()) == len(rows)
    # per-level metrics recomputed by hand from the recorded draw
    from stage1.policies import policy_from_dict

    vs, yv, rv, _ = layout.split_view_scores(run, "val_calib")
    pos = {int(r): i for i, r in enumerate(rv)}
    idx = np.array([pos[int(r)] for r in rows])
    view, lev = np.array(v["draw"]["view"]), np.array(v["draw"]["level"])
    dec = policy_from_dict(pol).decide({"logits": vs["view_logits"][idx, view], "select": vs["view_select"][idx, view]})
    for k in range(4):
        m = lev == k
        if not m.any():
            continue
        ex, yy, lab = dec.exit[m], yv[idx][m], dec.label[m]
        got = v["per_level"][f"level{k}"]
        assert got["n"] == int(m.sum())
        assert got["coverage"] == pytest.approx(ex.mean())
        if ex.any():
            assert got["selective_error"] == pytest.approx(float(np.mean(lab[ex] != yy[ex])))
    # the same seed gives the same draw; the clean fit is unchanged by the option's existence
    code, _ = invoke("calibrate", run, "--policy", "threshold", "--views", "validator", "--view-seed", "5")
    assert layout.read_policy(run)["views"]["draw"] == v["draw"]


def test_per_level_certification_and_evaluate(vrun) -> None:
    _, run, _ = vrun
    code, text = invoke("calibrate", run, "--policy", "ltt", "--alpha", "0.2", "--delta", "0.1",
                        "--views", "validator", "--per-level")
    assert code == 0, text
    assert "per level" in text
    pol = layout.read_policy(run)
    assert set(pol["per_level"]) <= {"level0", "level1", "level2", "level3"} and pol["per_level"]
    for lv, entry in pol["per_level"].items():
        assert entry["policy"]["fit"]["level"] == int(lv[-1])
        assert entry["statement"].startswith(f"level {lv[-1]} views only")
    assert "guarantee holds for" in pol["per_level_statement"]
    code, text = invoke("evaluate", run, "--views", "validator")
    assert code == 0, text
    out = run / "eval_test_validator"
    m = json.loads((out / "metrics.json").read_text())
    assert m["views"] == "validator" and m["view_seed"] == 0
    assert sum(m[f"level{k}_n"] for k in range(4) if f"level{k}_n" in m) == m["n"]
    for lv in pol["per_level"]:
        assert f"{lv}_per_level_coverage" in m and f"{lv}_per_level_certified" in m
    assert (out / "risk_coverage.png").exists() and not (run / "metrics.json").exists()


def test_view_options_refused_without_view_scores(vrun, tmp_path: Path) -> None:
    _, run, _ = vrun
    code, text = invoke("calibrate", run, "--policy", "threshold", "--per-level")
    assert code == 2 and "--per-level needs --views validator" in text
    # a run dir written before view scores existed (only the view-0 tensors): clean still works
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "splits.json", "head.safetensors", "head.json"):
        (old / name).write_bytes((run / name).read_bytes())
    layout.write_scores(old, layout.read_scores(run))
    assert not layout.has_view_scores(old, "val_calib")
    code, text = invoke("calibrate", old, "--policy", "threshold")
    assert code == 0, text
    code, text = invoke("evaluate", old)
    assert code == 0, text
    code, text = invoke("calibrate", old, "--policy", "threshold", "--views", "validator")
    assert code == 1 and "no view scores" in text and "--view-recipe validator" in text
    assert len(text.strip().splitlines()) == 1
    code, text = invoke("evaluate", old, "--views", "validator")
    assert code == 1 and "no view scores" in text


def test_train_on_view0_only(vrun, tmp_path: Path) -> None:
    from stage1.heads.base import COMMON_PARAMS  # noqa: F401  (heads import: torch is needed here anyway)
    from stage1.runs.commands import head_hparams
    from stage1.runs.steps import train_run

    store, _, _ = vrun
    out = tmp_path / "v0"
    train_run(store, "mlp", out, head_hparams("mlp", {"epochs": 1, "hidden": 8}), progress=False, train_views=False)
    cfg = layout.read_config(out)
    assert cfg["training"]["views"] == "view 0 only"
    assert layout.has_view_scores(out, "test")  # scores of every view are still written
