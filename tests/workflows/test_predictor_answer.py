"""predict's ``answer``: what a miner sends (p on exit, -1 to abstain; never 0.5 for an unscored image)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli
from workflows.tiny_bundle import make_tiny_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_bundle(tmp_path_factory.mktemp("answer"))


def _predict(tiny: dict[str, Path], *extra: str) -> list[dict]:
    res = CliRunner().invoke(cli.main, ["predict", str(tiny["bundle"]), str(tiny["images"]), *extra])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]


def test_answer_is_p_on_exit_and_abstains_on_defer_by_default(tiny: dict[str, Path]) -> None:
    recs = _predict(tiny)
    assert len(recs) == 32
    exits = [r for r in recs if r["decision"] == "exit"]
    defers = [r for r in recs if r["decision"] == "defer"]
    assert exits and defers  # the coverage-0.5 policy gives both
    for r in exits:
        assert r["answer"] == r["p_roadwork"] and round(r["answer"]) == r["label"]
    assert all(r["answer"] == -1.0 for r in defers)


def test_on_defer_answer_sends_p_for_deferred_images(tiny: dict[str, Path]) -> None:
    recs = _predict(tiny, "--on-defer", "answer")
    assert all(r["answer"] == r["p_roadwork"] for r in recs)
    assert all(0.0 <= r["answer"] <= 1.0 for r in recs)


def test_unscorable_image_answers_minus_one_under_both_choices(tiny: dict[str, Path]) -> None:
    from stage1.workflows.predictor import Stage1Predictor

    for on_defer in ("abstain", "answer"):
        pred = Stage1Predictor.from_bundle(tiny["bundle"], on_defer=on_defer)
        bad = pred.predict([b"not an image", b""])
        assert [r["answer"] for r in bad] == [-1.0, -1.0] and all("error" in r and "reason" in r for r in bad)
        feats = np.full((2, 32), np.nan, dtype=np.float32)  # a broken head output: error record, answer -1
        assert [r["answer"] for r in pred.decide_features(feats)] == [-1.0, -1.0]


def test_bad_on_defer_is_a_config_error(tiny: dict[str, Path]) -> None:
    from stage1._core.errors import ConfigError
    from stage1.workflows.predictor import answer_for

    with pytest.raises(ConfigError, match="--on-defer 'guess'"):
        answer_for({"decision": "defer", "p_roadwork": 0.3}, on_defer="guess")
    res = CliRunner().invoke(cli.main, ["predict", str(tiny["bundle"]), str(tiny["images"]), "--on-defer", "guess"])
    assert res.exit_code == 2


def test_answer_for_rules() -> None:
    from stage1.workflows.predictor import ABSTAIN, ON_DEFER, answer_for
    from stage1.workflows.commands import on_defer_option

    assert answer_for({"decision": "exit", "p_roadwork": 0.9}) == 0.9
    assert answer_for({"decision": "exit", "p_roadwork": 0.9, "error": "x"}) == ABSTAIN == -1.0
    assert answer_for({"decision": "defer", "p_roadwork": 0.6}) == -1.0
    assert answer_for({"decision": "defer", "p_roadwork": 0.6}, on_defer="answer") == 0.6
    assert answer_for({"decision": "defer", "p_roadwork": 0.5, "error": "x"}, on_defer="answer") == -1.0

    @on_defer_option
    def f(on_defer: str) -> None:  # the CLI's literal choices are the predictor's
        pass

    opt = next(p for p in f.__click_params__ if p.name == "on_defer")
    assert tuple(opt.type.choices) == ON_DEFER
