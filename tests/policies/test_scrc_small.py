"""scrc on a val_calib too small to split (1-2 rows): certified false and the size needed, never an error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1.policies import POLICIES, policy_from_dict


@pytest.mark.parametrize("labels", [[1], [0], [0, 1], [1, 0]])
def test_scrc_on_one_or_two_rows_is_not_certified_and_says_what_it_needs(labels: list[int]) -> None:
    y = np.array(labels)
    logits = np.stack([np.zeros(len(y)), (2 * y - 1) * 3.0], 1)
    pol = POLICIES.create("scrc").fit({"logits": logits}, y)
    assert pol.certified is False and pol.fitted
    big = POLICIES.create("scrc").fit({"logits": np.zeros((4, 2))}, np.array([0, 1, 0, 1]))
    assert pol.n_needed == big.n_needed and pol.n_needed > 30  # rows for the calibrator and the certificate
    assert "too few to split calib_fraction=0.3" in pol.reason and f"about {pol.n_needed} rows" in pol.reason
    assert "every image is deferred" in pol.reason
    d = pol.decide({"logits": logits})
    assert not d.exit.any() and (d.pred_set == 2).all()
    back = policy_from_dict(json.loads(json.dumps(pol.to_dict())))
    assert back.decide({"logits": logits}).equals(d) and back.n_needed == pol.n_needed


def test_calibrate_scrc_on_two_val_calib_rows_exits_zero(tmp_path: Path) -> None:
    from stage1 import cli
    from stage1.featstore.splits import write_splits
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    x = rng.normal(size=(100, 1, 4)).astype(np.float32)
    x[:, 0, 0] += 2 * y
    write_store(tmp_path / "st", x, y).close()
    assert write_splits(tmp_path / "st", seed=0, fractions="0.8,0.18,0.02,0")["counts"]["val_calib"]["n"] == 2
    res = CliRunner().invoke(cli.main, ["train", str(tmp_path / "st"), "--head", "mlp", "--out", str(tmp_path / "run"),
                                        "--epochs", "1", "--hidden", "8", "--quiet"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli.main, ["calibrate", str(tmp_path / "run"), "--policy", "scrc"])
    assert res.exit_code == 0, res.output
    state = json.loads((tmp_path / "run" / "policy.json").read_text())["state"]
    assert state["certified"] is False and isinstance(state["n_needed"], int) and state["n_needed"] > 30
    assert f"about {state['n_needed']} rows" in state["reason"]
