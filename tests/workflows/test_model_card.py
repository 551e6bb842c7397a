"""``export --model-card``: the subnet's model_card.json beside the bundle's files, validated."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from stage1 import cli
from workflows.tiny_bundle import make_tiny_bundle

HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"  # a well-known SS58 development address
CARD = ["--model-card", "--model-name", "stage1-dinov2s-mlp", "--description", "DINOv2-S + mlp head, ltt exit",
        "--model-version", "1.2.3", "--submitted-by", HOTKEY]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("card"))["run"]


def _export(run: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli.main, ["export", str(run), "--out", str(out), *extra])


def test_model_card_written_with_the_subnet_fields(run: Path, tmp_path: Path) -> None:
    from stage1.workflows.bundle import MODEL_CARD_FIELDS, verify_files

    before = int(time.time())
    res = _export(run, tmp_path / "b", *CARD)
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "b" / "model_card.json").read_text())
    assert set(card) == set(MODEL_CARD_FIELDS)
    assert card["model_name"] == "stage1-dinov2s-mlp" and card["version"] == "1.2.3" and card["submitted_by"] == HOTKEY
    assert isinstance(card["submission_time"], int) and before <= card["submission_time"] <= int(time.time())
    assert json.loads(res.stdout)["model_card"].endswith("model_card.json")
    verify_files(tmp_path / "b")  # the card is not a hashed file: the bundle still verifies
    assert not list(tmp_path.glob(".*partial*"))  # written inside the atomic build folder


def test_explicit_submission_time_and_no_card_without_the_flag(run: Path, tmp_path: Path) -> None:
    res = _export(run, tmp_path / "b", *CARD, "--submission-time", "1767225600")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b" / "model_card.json").read_text())["submission_time"] == 1767225600
    assert _export(run, tmp_path / "plain").exit_code == 0
    assert not (tmp_path / "plain" / "model_card.json").exists()


@pytest.mark.parametrize("drop_or_change, needle", [
    (("--model-name", None), "--model-name"),
    (("--submitted-by", None), "--submitted-by"),
    (("--description", "  "), "--description"),
    (("--model-version", "1.2"), "X.Y.Z"),
    (("--model-version", "v1.2.3"), "X.Y.Z"),
    (("--submitted-by", "0xdeadbeef"), "SS58"),
    (("--model-name", "a\nb"), "one line"),
])
def test_invalid_or_missing_fields_are_refused_before_writing(run: Path, tmp_path: Path, drop_or_change,
                                                              needle: str) -> None:
    opt, value = drop_or_change
    args = list(CARD)
    i = args.index(opt)
    if value is None:
        del args[i:i + 2]
    else:
        args[i + 1] = value
    res = _export(run, tmp_path / "b", *args)
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "b").exists()


def test_submission_time_in_the_future_or_in_ms_is_refused(run: Path, tmp_path: Path) -> None:
    for when in (str(int(time.time()) + 10 * 86_400), str(int(time.time() * 1000)), "12"):
        res = _export(run, tmp_path / "b", *CARD, "--submission-time", when)
        assert res.exit_code == 2 and "--submission-time" in res.output


def test_card_options_without_the_flag_are_refused(run: Path, tmp_path: Path) -> None:
    res = _export(run, tmp_path / "b", "--model-name", "x")
    assert res.exit_code == 2 and "add --model-card" in res.output and not (tmp_path / "b").exists()
