"""evaluation_metrics (stable keys, peer agreement) and the metrics / plot writers."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, matthews_corrcoef

from stage1.policies import POLICIES
from stage1.policies import metrics as M
from stage1.policies.audit import synthetic_scores
from stage1.policies.evaluate import STABLE_KEYS, evaluation_metrics
from stage1.policies.reports import plot_reliability, plot_risk_coverage, write_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted():
    cal, y = synthetic_scores(2000, overconfidence=2.0, seed=1)
    test, ty = synthetic_scores(1500, overconfidence=2.0, seed=2)
    pol = POLICIES.create("ltt", alpha=0.05, eps=0.1).fit(cal, y)
    return pol, test, ty


def test_stable_keys_and_values(fitted):
    pol, test, ty = fitted
    d = pol.decide(test)
    m = evaluation_metrics(ty, test, d)
    assert set(STABLE_KEYS) <= set(m)
    assert m["n"] == len(ty)
    label = d.label.astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(ty, label))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(ty, label))
    assert m["nll"] == pytest.approx(log_loss(ty, d.p_roadwork))
    assert m["brier"] == pytest.approx(brier_score_loss(ty, d.p_roadwork))
    assert m["nll"] < m["nll_uncalibrated"]  # the temperature calibrator helps overconfident scores
    errors = (label != ty).astype(float)
    assert m["augrc"] == M.augrc(d.score, errors) and m["eaurc"] == M.eaurc(d.score, errors)
    assert m["coverage"] == pytest.approx(d.exit.mean()) and m["defer_rate"] == pytest.approx(1 - d.exit.mean())
    assert m["mean_set_size"] == pytest.approx(1 + (~d.exit).mean())
    assert sum(m[f"n_{k}"] for k in ("confident_0", "confident_1", "uncertain", "ambiguous")) == len(ty)
    assert m["coverage_at_risk_5pct"] == M.coverage_at_risk(d.score, errors, 0.05)
    with pytest.raises(ValueError, match="rows"):
        evaluation_metrics(ty[:10], {"logits": test["logits"][:10]}, d)


def test_write_metrics_json_and_csv(tmp_path, fitted):
    pol, test, ty = fitted
    m = evaluation_metrics(ty, test, pol.decide(test))
    m["fnr_exit"] = float("nan")  # undefined ratios are written as null / empty
    paths = write_metrics(tmp_path, m)
    obj = json.loads(paths["json"].read_text())  # strict JSON parses
    assert obj["fnr_exit"] is None and obj["n"] == len(ty) and obj["aurc"] == m["aurc"]
    rows = list(csv.reader(paths["csv"].read_text().splitlines()))
    assert rows[0][: len(STABLE_KEYS)] == list(STABLE_KEYS)
    values = dict(zip(rows[0], rows[1]))
    assert values["fnr_exit"] == "" and float(values["aurc"]) == m["aurc"] and int(values["n"]) == len(ty)
    with pytest.raises(ValueError, match="stable keys"):
        write_metrics(tmp_path, {"accuracy": 1.0})
    with pytest.raises(ValueError, match="flat"):
        write_metrics(tmp_path, {**m, "nested": {"a": 1}})


def test_plots_are_pngs(tmp_path, fitted):
    pol, test, ty = fitted
    out = write_report(tmp_path / "run", ty, test, pol.decide(test))
    for key in ("json", "csv", "risk_coverage", "reliability"):
        assert out["paths"][key].exists()
    for key in ("risk_coverage", "reliability"):
        data = out["paths"][key].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    rng = np.random.default_rng(0)
    conf, err = np.round(rng.random(300), 1), (rng.random(300) < 0.2).astype(float)
    p = plot_risk_coverage(tmp_path / "nothing.png", conf, err, operating_point=(0.0, float("nan")))
    assert p.read_bytes()[:8] == PNG_MAGIC
    q = plot_reliability(tmp_path / "rel.png", (rng.random(300) < 0.5).astype(int), np.r_[0.0, 1.0, rng.random(298)])
    assert q.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("**/*.partial"))
