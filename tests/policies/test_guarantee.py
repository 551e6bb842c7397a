"""The printed guarantee says exactly what the procedure gives, and what it does not."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stage1.policies import POLICIES
from stage1.policies.guarantee import bounded_risks, guarantee_statement, is_guarantee_for
from stage1.policies.selection import SelectionRecord


@pytest.fixture(scope="module")
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000)
    logits = np.stack([np.zeros(3000), (2 * y - 1) * rng.uniform(0, 6, 3000) + rng.normal(0, 1, 3000)], 1)
    return {"logits": logits}, y


def _fit(name, scores, **params):
    d = POLICIES.create(name, **params).fit(*scores).to_dict()
    d["fit"] = {"part": "all", "n": 3000}
    return d


def test_each_policy_states_its_own_risk_and_what_is_left_unbounded(scores) -> None:
    fnr = guarantee_statement(_fit("ltt", scores, alpha=0.05))
    assert fnr.startswith("P(fnr_exit > 0.05) <= 0.1") and "false alarms" in fnr and "not bounded" in fnr
    both = guarantee_statement(_fit("ltt", scores, alpha=0.05, eps=0.1))
    assert "P(fnr_exit > 0.05 or selective_error > 0.1) <= 0.1" in both and "false alarms" not in both
    crc = _fit("crc", scores, alpha=0.05)
    assert bounded_risks(crc) == {"miss_rate": "expectation"}
    text = guarantee_statement(crc)
    assert text.startswith("E[miss_rate] <= 0.05") and "no probability statement" in text and "fnr_exit" in text
    assert not is_guarantee_for(crc, "fnr_exit") and is_guarantee_for(crc, "miss_rate")
    assert guarantee_statement(_fit("threshold", scores)).startswith("no guarantee")
    scrc = guarantee_statement(_fit("scrc", scores, alpha=0.05, xi=0.6))
    assert "miscoverage among selected > 0.05 or selection coverage < 0.6" in scrc


def test_not_certified_and_choose_part_fits_promise_nothing(scores) -> None:
    logits, y = scores
    few = POLICIES.create("ltt", alpha=0.001).fit({"logits": logits["logits"][:60]}, y[:60]).to_dict()
    assert guarantee_statement(few).startswith("not certified: every image is deferred")
    chosen = _fit("ltt", scores, alpha=0.05)
    chosen["selection"] = SelectionRecord("holdout", 7, "choose", 0.5, 0).to_dict()
    assert "not a guarantee" in guarantee_statement(chosen) and not is_guarantee_for(chosen, "fnr_exit")
    chosen["selection"] = SelectionRecord("holdout", 7, "certify", 0.5, 0, 2, "Pareto front").to_dict()
    assert "unseen by the choice" in guarantee_statement(chosen) and is_guarantee_for(chosen, "fnr_exit")
    split = _fit("ltt", scores, alpha=0.05, delta=0.1 / 3)
    split["selection"] = SelectionRecord("bonferroni", 3, "all", 0.5, 0, 3, "coverage").to_dict()
    text = guarantee_statement(split)  # each of 3 candidates at delta / 3: the chosen one holds at 0.1
    assert text.startswith("P(fnr_exit > 0.05) <= 0.1,") and "delta / 3 (Bonferroni)" in text


def test_policy_files_written_before_bounds_were_recorded() -> None:
    legacy = json.loads((Path(__file__).parents[1] / "data" / "legacy_v0_1" / "run" / "policy.json").read_text())
    assert "bounds" not in legacy and bounded_risks(legacy) == {"fnr_exit": "pac"}
    assert guarantee_statement(legacy).startswith("not certified")  # that run certified nothing
