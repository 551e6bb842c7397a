"""calibrate / evaluate --novelty: the scorer is fit on the run's store, recorded in policy.json, and
evaluate defers exactly the novel exits (clean and validator views)."""
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


@pytest.fixture(scope="module")
def nrun(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store of 600 rows x 3 views (validator levels) and an mlp run trained on it."""
    from runs.test_views import _write_view_store

    store = tmp_path_factory.mktemp("nstore") / "st"
    _write_view_store(store, n=600, v=3)
    run = tmp_path_factory.mktemp("nruns") / "mlp"
    code, text = invoke("train", store, "--head", "mlp", "--out", run, "--epochs", "2", "--hidden", "8", "--quiet")
    assert code == 0, text
    return store, run


def _features(store: Path, rows: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
    from stage1.featstore import open_store

    with open_store(str(store)) as st:
        x = st.load_features(rows=rows)
    return x[:, 0] if views is None else x[np.arange(len(rows)), views]


def test_file_names_agree() -> None:
    from stage1.policies.novelty import NOVELTY_FILE
    from stage1.workflows import bundle, monitor

    assert layout.NOVELTY == NOVELTY_FILE == bundle.NOVELTY_FILE and monitor.MONITOR_FILE == bundle.MONITOR_FILE


def test_calibrate_records_novelty_and_evaluate_defers_the_novel_exits(nrun) -> None:
    from stage1.policies import policy_from_dict
    from stage1.policies.novelty import read_novelty

    store, run = nrun
    code, text = invoke("calibrate", run, "--policy", "threshold", "--threshold", "0.6", "--novelty", "0.1",
                        "--novelty-k", "5")
    assert code == 0, text
    summary = json.loads(text[text.index("{"):])
    assert "novelty p-value < 0.1 are deferred before the exit rule" in summary["statement"]
    pol = layout.read_policy(run)
    nv = pol["novelty"]
    _, _, train_rows, _ = layout.split_scores(run, "train", labelled_only=False)
    _, _, cal_rows, _ = layout.split_scores(run, "val_calib", labelled_only=False)
    assert nv["alpha_n"] == 0.1 and nv["params"]["k"] == 5 and nv["n_reference"] == len(train_rows)
    assert nv["n_calib"] == len(cal_rows) and summary["novelty"]["n_calib"] == len(cal_rows)  # unlabelled rows too
    assert nv["calib_views"].startswith("view 0") and layout.novelty_path(run).is_file()
    scorer = read_novelty(run, nv)
    np.testing.assert_allclose(scorer.calib_scores_, np.sort(scorer.score(_features(store, cal_rows))))

    code, text = invoke("evaluate", run)
    assert code == 0, text
    m = json.loads((run / layout.METRICS).read_text())
    scores, y, rows, _ = layout.split_scores(run, "test")
    raw = policy_from_dict(pol).decide(scores).exit
    novel = scorer.pvalues(_features(store, rows)) < 0.1
    assert m["novelty_deferred"] == int((raw & novel).sum()) and m["novelty_flagged_rate"] == pytest.approx(novel.mean())
    assert m["coverage"] == pytest.approx((raw & ~novel).mean())
    assert m["coverage_without_novelty"] == pytest.approx(raw.mean()) and m["novelty_views"] == "view 0"
    assert m["guarantee_statement"].endswith("novelty p-value < 0.1 are deferred before the exit rule")
    # test is exchangeable with val_calib: about alpha_n of it is flagged (P(p < a) <= a)
    assert novel.mean() <= 0.1 + 3 * np.sqrt(0.1 * 0.9 / len(novel))


def test_recalibrate_without_novelty_drops_the_stale_file(nrun, tmp_path: Path) -> None:
    import shutil

    _, base = nrun
    run = shutil.copytree(base, tmp_path / "run")
    assert invoke("calibrate", run, "--policy", "threshold", "--novelty", "0.05", "--novelty-k", "3")[0] == 0
    assert layout.novelty_path(run).is_file()
    assert invoke("calibrate", run, "--policy", "threshold")[0] == 0
    assert not layout.novelty_path(run).exists() and "novelty" not in layout.read_policy(run)
    code, text = invoke("evaluate", run)
    assert code == 0 and "novelty_deferred" not in json.loads((run / layout.METRICS).read_text())


def test_validator_views_calibrate_and_evaluate_on_the_drawn_views(nrun, tmp_path: Path) -> None:
    import shutil

    from stage1.policies.novelty import read_novelty
    from stage1.policies.views import draw_one_view

    store, base = nrun
    run = shutil.copytree(base, tmp_path / "run")
    code, text = invoke("calibrate", run, "--policy", "threshold", "--views", "validator", "--view-seed", "3",
                        "--novelty", "0.1", "--novelty-k", "4")
    assert code == 0, text
    nv = layout.read_policy(run)["novelty"]
    vs, _, rows, _ = layout.split_view_scores(run, "val_calib", labelled_only=False)
    view, _ = draw_one_view(vs["view_levels"], rows, 3)
    keep = view >= 0
    scorer = read_novelty(run, nv)
    assert "validator view" in nv["calib_views"] and nv["n_calib"] == int(keep.sum())
    np.testing.assert_allclose(scorer.calib_scores_, np.sort(scorer.score(_features(store, rows[keep], view[keep]))))
    code, text = invoke("evaluate", run, "--views", "validator")
    assert code == 0, text
    m = json.loads((layout.eval_dir(run, "test", "validator") / layout.METRICS).read_text())
    assert m["novelty_views"] == "the drawn validator views" and m["coverage"] <= m["coverage_without_novelty"]


def test_novelty_refusals_are_one_line_and_write_nothing(nrun, tmp_path: Path) -> None:
    import shutil

    _, base = nrun
    run = shutil.copytree(base, tmp_path / "run")
    run_files = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    code, text = invoke("calibrate", run, "--policy", "threshold", "--novelty-k", "3")
    assert code == 2 and "need --novelty ALPHA_N" in text and len(text.strip().splitlines()) == 1
    code, text = invoke("calibrate", run, "--policy", "threshold", "--novelty", "0.1", "--novelty-k", "100000")
    assert code == 2 and "k" in text and len(text.strip().splitlines()) == 1
    code, text = invoke("calibrate", run, "--policy", "threshold", "--novelty", "1.5")
    assert code == 2 and "--novelty" in text
    n_train = layout.read_config(run)["splits"]["train"]["n"]
    code, text = invoke("calibrate", run, "--policy", "threshold", "--novelty", "0.1", "--novelty-k", n_train + 1)
    assert code == 2 and f"larger than the {n_train} reference (train) rows" in text
    cfg = json.loads((run / layout.CONFIG).read_text())
    cfg["store"]["path"] = str(tmp_path / "gone")
    (run / layout.CONFIG).write_text(json.dumps(cfg))
    code, text = invoke("calibrate", run, "--policy", "threshold", "--novelty", "0.1")
    assert code == 1 and "is not on this machine" in text and len(text.strip().splitlines()) == 1
    del run_files[layout.CONFIG]
    assert {f: (run / f).read_bytes() for f in run_files} == run_files  # policy.json, novelty file: unchanged
