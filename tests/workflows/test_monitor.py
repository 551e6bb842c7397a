"""``stage1 monitor``: a tiny random-backbone bundle, image-folder and JSONL streams, novelty, CLI."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from workflows.tiny_bundle import make_tiny_bundle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("monitor"))


@pytest.fixture(scope="module")
def records(tiny):
    from stage1.workflows.predictor import Stage1Predictor, expand_inputs

    return Stage1Predictor.from_bundle(tiny["bundle"]).predict(expand_inputs([tiny["images"]]))


def _jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _without_monitor_file(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` as an export before monitor.safetensors existed made it."""
    from stage1._core.io import atomic_write_json, read_json
    from stage1.workflows.bundle import manifest_digest
    from stage1.workflows.monitor import MONITOR_FILE

    shutil.copytree(bundle, dest)
    (dest / MONITOR_FILE).unlink()
    manifest = read_json(dest / "bundle.json")
    del manifest["files"][MONITOR_FILE]
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write_json(dest / "bundle.json", manifest)
    return dest


def test_reference_is_the_certification_part_of_val_calib(tiny, tmp_path):
    from stage1.runs import layout
    from stage1.workflows.monitor import MONITOR_FILE, load_reference, run_select_reference

    ref = load_reference(tiny["bundle"])  # export wrote the reference into the bundle
    assert ref.novelty is None and ref.source == str(Path(tiny["bundle"]) / MONITOR_FILE)
    scores, y, _, _ = layout.split_scores(tiny["run"], "val_calib")
    np.testing.assert_array_equal(ref.select, run_select_reference(tiny["run"]))
    assert 0 < len(ref.select) <= len(y) and set(ref.alphas) == {"fnr_exit", "selective_error"}
    old = load_reference(_without_monitor_file(tiny["bundle"], tmp_path / "old"))  # an older bundle: from its run
    assert old.source == str(Path(tiny["run"]).resolve())
    np.testing.assert_array_equal(old.select, ref.select)


def test_an_unlisted_or_altered_monitor_file_is_refused(tiny, tmp_path):
    from stage1.workflows.bundle import BundleError
    from stage1.workflows.monitor import MONITOR_FILE, load_reference

    old = _without_monitor_file(tiny["bundle"], tmp_path / "old")
    shutil.copyfile(Path(tiny["bundle"]) / MONITOR_FILE, old / MONITOR_FILE)  # dropped in, not in bundle.json
    with pytest.raises(BundleError, match="not listed in bundle.json"):
        load_reference(old)
    bad = shutil.copytree(tiny["bundle"], tmp_path / "bad")
    data = bytearray((bad / MONITOR_FILE).read_bytes())
    data[-1] ^= 1
    (bad / MONITOR_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="monitor.safetensors: sha256"):
        load_reference(bad)


def test_folder_stream_with_labels_writes_figures(tiny, tmp_path):
    from stage1.policies.monitor import ExchangeabilityMonitor
    from stage1.workflows.monitor import MONITOR_CSV, MONITOR_JSON, MONITOR_PNG, load_reference, run_monitor

    out = tmp_path / "out"
    res = run_monitor(tiny["bundle"], tiny["images"], labels=tiny["images"] / "labels.csv", level=0.05, out=out)
    s = res.summary
    assert s["n"] == 32 and s["channels"] == ["select"] and "no novelty scorer" in s["channels_note"]
    assert s["labelled"] == 32 and set(s) >= {"fnr_exit", "selective_error", "alarm_time", "martingale_final"}
    # the martingale is the policies' monitor on the records' select scores against val_calib
    ref = load_reference(tiny["bundle"])
    want = ExchangeabilityMonitor({"select": ref.select}, {"select": "low"}, level=0.05).update(
        {"select": np.array([r["select_score"] for r in res.records])})
    np.testing.assert_allclose(res.exchangeability.log_martingale, want.log_martingale)
    rows = list(csv.DictReader((out / MONITOR_CSV).open()))
    assert len(rows) == 32 and {"select_p", "log10_martingale", "fnr_exit_upper", "selective_error_lower"} <= set(rows[0])
    exits = sum(r["decision"] == "exit" for r in res.records)
    assert int(rows[-1]["selective_error_n"]) == exits == s["selective_error"]["trials"]
    assert (out / MONITOR_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / MONITOR_JSON).read_text())["n"] == 32


def test_jsonl_stream_matches_folder_and_alarms_on_a_planted_shift(tiny, records, tmp_path):
    from stage1.workflows.monitor import run_monitor

    same = run_monitor(tiny["bundle"], _jsonl(tmp_path / "s.jsonl", records))
    folder = run_monitor(tiny["bundle"], tiny["images"])
    np.testing.assert_allclose(same.exchangeability.log_martingale, folder.exchangeability.log_martingale)
    # a shifted stream: confidence far below anything in val_calib, 60 items
    low = min(r["select_score"] for r in records) - 0.01
    shifted = [{**records[i % len(records)], "select_score": low - 1e-4 * i} for i in range(60)]
    res = run_monitor(tiny["bundle"], _jsonl(tmp_path / "shift.jsonl", shifted), level=0.01)
    assert res.summary["alarm"] and res.summary["alarm_time"] <= 30 and "alarm at item" in res.summary["statement"]
    fast = run_monitor(tiny["bundle"], tmp_path / "shift.jsonl", level=0.01, martingale="power_mixture")
    assert fast.summary["alarm_time"] < res.summary["alarm_time"]
    # error records are skipped and counted, not fatal
    mixed = [*records[:5], {"path": "x.png", "error": "bad", "decision": "defer"}]
    assert run_monitor(tiny["bundle"], _jsonl(tmp_path / "m.jsonl", mixed)).summary["skipped_unscored"] == 1


def _bundle_with_novelty(tiny, dest: Path) -> Path:
    """`calibrate --novelty` on a copy of the run, then `export`: novelty.safetensors in the bundle."""
    from stage1.policies.novelty import NOVELTY_FILE
    from stage1.runs.steps import calibrate_run
    from stage1.workflows.bundle import export_bundle

    run = shutil.copytree(tiny["run"], dest.with_name(dest.name + "_run"))
    calibrate_run(run, "coverage", {"target_coverage": 0.5}, score="p", novelty=0.05, novelty_params={"k": 3})
    export_bundle(run, dest)
    assert (dest / NOVELTY_FILE).is_file()
    return dest


def test_novelty_channel_when_the_bundle_has_a_scorer(tiny, tmp_path):
    from stage1.workflows.monitor import MONITOR_FILE, load_reference, run_monitor

    bundle = _bundle_with_novelty(tiny, tmp_path / "bundle")
    ref = load_reference(bundle)
    assert ref.novelty is not None and ref.source == str(bundle / MONITOR_FILE)
    res = run_monitor(bundle, tiny["images"], labels=tiny["images"] / "labels.csv")
    assert res.summary["channels"] == ["select", "novelty"]
    assert all(0 < r["novelty_p"] <= 1 and r["novelty_score"] >= 0 for r in res.records)
    lm = res.exchangeability.log_martingales
    np.testing.assert_allclose(res.exchangeability.log_martingale,
                               np.log((np.exp(lm["select"]) + np.exp(lm["novelty"])) / 2))
    # a JSONL whose records lack novelty_score falls back to the select channel, and says so
    jl = _jsonl(tmp_path / "r.jsonl", [{k: v for k, v in r.items() if not k.startswith("novelty")} for r in res.records])
    assert run_monitor(bundle, jl).summary["channels"] == ["select"]


def test_bundle_without_reference_is_refused(tiny, tmp_path):
    from stage1.workflows.bundle import BundleError
    from stage1.workflows.monitor import load_reference

    old = _without_monitor_file(tiny["bundle"], tmp_path / "old")
    run = Path(tiny["run"])
    aside = run.with_name("run_aside")
    run.rename(aside)
    try:
        load_reference(tiny["bundle"])  # a bundle exported now carries its reference: the run is not needed
        with pytest.raises(BundleError, match="holds no monitor.safetensors"):
            load_reference(old)
    finally:
        aside.rename(run)


def test_cli_monitor(tiny, records, tmp_path):
    from stage1.workflows.commands import monitor

    jl = _jsonl(tmp_path / "s.jsonl", records)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{Path(r['path']).name},{int(Path(r['path']).stem[2:]) % 2}\n"
                                               for r in records))
    out = tmp_path / "out"
    r = CliRunner().invoke(monitor, [str(tiny["bundle"]), "--stream", str(jl), "--labels", str(labels),
                                     "--out", str(out), "--level", "0.05", "--alpha", "0.2"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["labelled"] == 32 and summary["fnr_exit"]["alpha"] == 0.2 and (out / "monitor.png").is_file()
    again = CliRunner().invoke(monitor, [str(tiny["bundle"]), "--stream", str(jl), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"select_score": 0.9}\nnot json\n')
    r = CliRunner().invoke(monitor, [str(tiny["bundle"]), "--stream", str(bad)])
    assert r.exit_code == 1 and "bad.jsonl:2: not JSON" in r.output
    nolab = tmp_path / "nolab.csv"
    nolab.write_text("path,label\nnothere.png,1\n")
    r = CliRunner().invoke(monitor, [str(tiny["bundle"]), "--stream", str(jl), "--labels", str(nolab)])
    assert r.exit_code == 1 and "matches none" in r.output
