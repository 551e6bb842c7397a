"""Trust nothing on disk: stale splits, stale metrics, OS errors and bad values as one-line errors."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli
from stage1.runs import layout


def _store(path: Path, n: int, seed: int = 0) -> Path:
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 4)).astype(np.float32)
    y = (x[:, 0, 0] > 0).astype(np.int64)
    write_store(path, x, y)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stage1.featstore.splits import write_splits

    path = _store(tmp_path_factory.mktemp("trust") / "st", 300)
    write_splits(path, seed=0)
    return path


def invoke(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exc_info
    return res.exit_code, res.output


def one_line_error(code: int, text: str, *needles: str) -> None:
    assert code != 0, text
    assert "Traceback" not in text, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 or (len(lines) <= 3 and lines[0].startswith("Usage")), text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.fixture(scope="module")
def run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trustrun") / "mlp"
    code, text = invoke("train", store, "--head", "mlp", "--out", out, "--epochs", "2", "--hidden", "8", "--quiet")
    assert code == 0, text
    code, text = invoke("calibrate", out, "--policy", "coverage", "--coverage", "0.5", "--score", "p")
    assert code == 0, text
    return out


# -- item 6: derived artifacts tied to what they were derived from --------------------------------------
def test_train_refuses_splits_made_on_a_smaller_store(tmp_path: Path) -> None:
    """splits.json made while the store held 64 rows; the store now holds 297: train must refuse."""
    from stage1.featstore.splits import write_splits

    small = _store(tmp_path / "small", 64)
    write_splits(small, seed=0)
    big = _store(tmp_path / "big", 297)
    shutil.copyfile(small / "splits.json", big / "splits.json")
    code, text = invoke("train", big, "--head", "mlp", "--out", tmp_path / "r", "--epochs", "1", "--quiet")
    one_line_error(code, text, "splits.json", "64", "297", "stage1 split")
    assert not (tmp_path / "r" / "config.json").exists()


def test_train_refuses_splits_of_another_image_list(store: Path, tmp_path: Path) -> None:
    other = tmp_path / "st"
    shutil.copytree(store, other)
    data = json.loads((other / "splits.json").read_text())
    data["store"]["image_list_sha256"] = "0" * 64
    (other / "splits.json").write_text(json.dumps(data))
    code, text = invoke("train", other, "--head", "mlp", "--out", tmp_path / "r", "--epochs", "1", "--quiet")
    one_line_error(code, text, "splits.json", "image list", "stage1 split")


def test_train_refuses_a_splits_row_out_of_range(store: Path, tmp_path: Path) -> None:
    other = tmp_path / "st"
    shutil.copytree(store, other)
    data = json.loads((other / "splits.json").read_text())
    data["rows"]["test"].append(10**6)
    (other / "splits.json").write_text(json.dumps(data))
    code, text = invoke("train", other, "--head", "mlp", "--out", tmp_path / "r", "--epochs", "1", "--quiet")
    one_line_error(code, text, "splits.json", "1000000")


def test_metrics_record_the_policy_they_evaluated(run: Path, tmp_path: Path) -> None:
    from stage1._core.io import sha256_file

    r = tmp_path / "r"
    shutil.copytree(run, r)
    code, text = invoke("evaluate", r)
    assert code == 0, text
    metrics = json.loads((r / layout.METRICS).read_text())
    assert metrics["policy_sha256"] == sha256_file(r / layout.POLICY)


# -- item 13 / 16: one line naming the option or file ---------------------------------------------------
def test_unknown_policy_name_is_one_line(run: Path) -> None:
    code, text = invoke("calibrate", run, "--policy", "nope")
    one_line_error(code, text, "nope")
    assert code == 2


@pytest.mark.parametrize("value", ["1e400", "inf", "nan"])
def test_threshold_out_of_range_is_one_line(run: Path, tmp_path: Path, value: str) -> None:
    r = tmp_path / "r"
    shutil.copytree(run, r)
    code, text = invoke("calibrate", r, "--policy", "threshold", "--threshold", value)
    one_line_error(code, text, "threshold")
    code, text = invoke("calibrate", r, "--policy", "threshold", "--param", f"threshold={value}")
    one_line_error(code, text, "threshold")


@pytest.mark.parametrize("opt,value", [("--label-smoothing", "2"), ("--lr", "inf"), ("--lr", "nan"),
                                       ("--lr", "1e400"), ("--epochs", "0")])
def test_bad_training_values_are_one_line(store: Path, tmp_path: Path, opt: str, value: str) -> None:
    code, text = invoke("train", store, "--head", "mlp", "--out", tmp_path / "r", opt, value, "--quiet")
    one_line_error(code, text, opt.lstrip("-").replace("-", "_").split("_")[0])
    assert code == 2
    assert not (tmp_path / "r" / "config.json").exists()


@pytest.mark.parametrize("step", ["calibrate", "evaluate"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EBUSY])
def test_os_errors_while_writing_are_one_line_naming_the_file(run: Path, tmp_path: Path, monkeypatch,
                                                             step: str, err: int) -> None:
    import os

    from stage1._core import io

    r = tmp_path / "r"
    shutil.copytree(run, r)
    real = io.atomic_write_bytes

    def failing(path, data):  # noqa: ANN001
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(io, "atomic_write_bytes", failing)
    args = ["calibrate", r, "--policy", "coverage", "--coverage", "0.5"] if step == "calibrate" else ["evaluate", r]
    code, text = invoke(*args)
    monkeypatch.setattr(io, "atomic_write_bytes", real)
    one_line_error(code, text, str(r), os.strerror(err))


def test_os_error_during_train_is_one_line(store: Path, tmp_path: Path, monkeypatch) -> None:
    from stage1._core import io

    def failing(*a, **k):  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "head.safetensors"))

    monkeypatch.setattr(io, "save_safetensors_atomic", failing)
    import stage1.heads.base as hb

    if hasattr(hb, "save_safetensors_atomic"):
        monkeypatch.setattr(hb, "save_safetensors_atomic", failing)
    monkeypatch.setattr(layout, "save_safetensors_atomic", failing)
    code, text = invoke("train", store, "--head", "mlp", "--out", tmp_path / "r", "--epochs", "1", "--quiet")
    one_line_error(code, text, "No space left on device", "head.safetensors")


def test_non_finite_features_name_the_rows(store: Path, tmp_path: Path, monkeypatch) -> None:
    from stage1.featstore.store import Store

    real = Store.load_features

    def poisoned(self, rows=None):  # noqa: ANN001
        x = np.array(real(self, rows=rows), copy=True)
        x[3, 0, 1] = np.nan
        x[7] = np.inf
        return x

    monkeypatch.setattr(Store, "load_features", poisoned)
    code, text = invoke("train", store, "--head", "mlp", "--out", tmp_path / "r", "--epochs", "1", "--quiet")
    one_line_error(code, text, "features must be finite", "2 store row(s)", "rows 3, 7")
    assert code == 1
