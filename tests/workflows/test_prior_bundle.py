"""`calibrate --prior`: recorded in policy.json, carried by the bundle, applied by predict (no bundle code involved)."""
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
    return make_tiny_bundle(tmp_path_factory.mktemp("prior"))


def test_calibrate_prior_reaches_predict_through_the_bundle(tiny: dict[str, Path]) -> None:
    from stage1.policies.calibrators import shift_prior
    from stage1.workflows.bundle import export_bundle
    from stage1.workflows.predictor import Stage1Predictor

    run = tiny["run"]
    res = CliRunner().invoke(cli.main, ["calibrate", str(run), "--policy", "coverage", "--coverage", "0.5",
                                        "--score", "p", "--prior", "0.8"])
    assert res.exit_code == 0, res.output
    policy = json.loads((run / "policy.json").read_text())
    calib_prior = policy["state"]["calib_prior"]
    assert policy["params"]["prior"] == 0.8 and 0.0 < calib_prior < 1.0
    shifted = export_bundle(run, run.parent / "bundle_prior")
    assert json.loads((shifted / "policy.json").read_text())["state"]["calib_prior"] == calib_prior
    images = sorted(str(p) for p in tiny["images"].glob("*.png"))
    before = Stage1Predictor.from_bundle(tiny["bundle"]).predict(images)
    after = Stage1Predictor.from_bundle(shifted).predict(images)
    p0 = np.array([r["p_roadwork"] for r in before])
    p1 = np.array([r["p_roadwork"] for r in after])
    np.testing.assert_allclose(p1, shift_prior(p0, calib_prior, 0.8), rtol=1e-6, atol=1e-9)
    assert np.all(p1 >= p0 - 1e-12) and np.any(p1 > p0)  # towards the larger prior


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_calibrate_refuses_a_prior_outside_0_1(tiny: dict[str, Path], value: str) -> None:
    res = CliRunner().invoke(cli.main, ["calibrate", str(tiny["run"]), "--policy", "threshold", "--prior", value])
    assert res.exit_code == 2 and "prior" in res.output
