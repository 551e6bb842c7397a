"""Novelty deferral through export and predict: the bundle carries and verifies novelty.safetensors,
predict records novelty_p and defers a planted far-away image."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli
from workflows.tiny_bundle import make_tiny_bundle

ALPHA_N = 0.2  # val_calib has 8 rows: p-values are multiples of 1/9, the smallest (1/9) is below it


def invoke(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(cli.main, [str(a) for a in args])
    return res.exit_code, res.output


def checkerboard(path: Path) -> Path:
    """An image unlike the generated smooth ones: a 1-pixel black-and-white checkerboard."""
    from PIL import Image

    arr = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.repeat(arr[..., None], 3, axis=2)).save(path)
    return path


@pytest.fixture(scope="module")
def nb(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny bundle's run calibrated to exit every image (coverage 1) with --novelty, exported."""
    root = tmp_path_factory.mktemp("novelty_bundle")
    tiny = make_tiny_bundle(root)
    run = shutil.copytree(tiny["run"], root / "nrun")
    code, text = invoke("calibrate", run, "--policy", "coverage", "--coverage", "1.0", "--score", "p",
                        "--novelty", ALPHA_N, "--novelty-k", "3")
    assert code == 0, text
    code, text = invoke("export", run, "--out", root / "nbundle")
    assert code == 0, text
    return {**tiny, "nrun": run, "nbundle": root / "nbundle", "far": checkerboard(root / "far.png")}


def test_bundle_carries_and_hashes_the_novelty_file(nb) -> None:
    from stage1._core.io import read_json, sha256_file

    m = read_json(nb["nbundle"] / "bundle.json")
    assert {"novelty.safetensors", "monitor.safetensors"} <= set(m["files"])
    for name, digest in m["files"].items():
        assert sha256_file(nb["nbundle"] / name) == digest
    assert m["policy"]["novelty"]["alpha_n"] == ALPHA_N and m["calibration"]["novelty"]["params"]["k"] == 3
    assert m["calibration"]["statement"].endswith(f"novelty p-value < {ALPHA_N:g} are deferred before the exit rule")


def test_predict_records_novelty_p_and_defers_the_far_image(nb) -> None:
    from stage1.workflows.predictor import Stage1Predictor

    paths = [str(nb["images"] / f"im{i:02d}.png") for i in range(32)] + [str(nb["far"])]
    pred = Stage1Predictor.from_bundle(nb["nbundle"])
    plain = Stage1Predictor(pred.manifest, pred.backbone, pred.head, pred.policy, nb["nbundle"])  # no novelty
    recs, base = pred.predict(paths), plain.predict(paths)
    n_cal = pred.novelty.calib_scores_.size
    for r, b in zip(recs, base):
        assert 1 / (n_cal + 1) <= r["novelty_p"] <= 1 and r["novelty_score"] >= 0 and "novelty_p" not in b
        novel = r["novelty_p"] < ALPHA_N
        assert r["novelty_deferred"] == (b["decision"] == "exit" and novel)
        assert r["decision"] == ("defer" if novel else b["decision"]) and r["p_roadwork"] == b["p_roadwork"]
        assert list(r)[-1] == "answer" and r["answer"] == (-1.0 if r["decision"] == "defer" else r["p_roadwork"])
    far = recs[-1]
    assert base[-1]["decision"] == "exit"  # coverage 1: the exit rule alone answers every image
    assert far["novelty_p"] == pytest.approx(1 / (n_cal + 1)) and far["novelty_deferred"] and far["answer"] == -1.0
    assert far["level"] == "UNCERTAIN" and far["label"] is None
    # an image that cannot be read keeps the bundle's keys, with null novelty figures
    bad = pred.predict([b""])[0]
    assert bad["novelty_p"] is None and bad["novelty_deferred"] is False and list(bad)[-1] == "answer"


def test_predict_cli_on_defer_answer_sends_p_for_a_novel_image(nb) -> None:
    res = CliRunner().invoke(cli.main, ["predict", str(nb["nbundle"]), str(nb["far"]), "--on-defer", "answer"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout.splitlines()[0])
    assert rec["decision"] == "defer" and rec["novelty_deferred"] and rec["answer"] == rec["p_roadwork"]


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_a_tampered_or_missing_novelty_file_is_refused(nb, tmp_path: Path) -> None:
    from stage1._core.io import atomic_write_json, read_json
    from stage1.workflows.bundle import BundleError, manifest_digest, verify_files

    tampered = shutil.copytree(nb["nbundle"], tmp_path / "t")
    _tamper(tampered / "novelty.safetensors")
    with pytest.raises(BundleError, match="novelty.safetensors: sha256"):
        verify_files(tampered)
    code, text = invoke("predict", tampered, nb["far"])
    assert code == 1 and "novelty.safetensors" in text and "Traceback" not in text

    gone = shutil.copytree(nb["nbundle"], tmp_path / "g")
    (gone / "novelty.safetensors").unlink()
    with pytest.raises(BundleError, match="novelty.safetensors: missing"):
        verify_files(gone)
    manifest = read_json(gone / "bundle.json")  # unlisted too (a digest recomputed by hand)
    del manifest["files"]["novelty.safetensors"]
    manifest["manifest_sha256"] = manifest_digest(manifest)
    atomic_write_json(gone / "bundle.json", manifest)
    with pytest.raises(BundleError, match="lists no novelty.safetensors"):
        verify_files(gone)


def test_export_refuses_a_run_whose_novelty_file_is_missing_or_altered(nb, tmp_path: Path) -> None:
    run = shutil.copytree(nb["nrun"], tmp_path / "run")
    _tamper(run / "novelty.safetensors")
    code, text = invoke("export", run, "--out", tmp_path / "b1")
    assert code == 1 and "sha256 does not match policy.json" in text and not (tmp_path / "b1").exists()
    (run / "novelty.safetensors").unlink()
    code, text = invoke("export", run, "--out", tmp_path / "b2")
    assert code == 1 and "novelty.safetensors: missing" in text and not (tmp_path / "b2").exists()
    assert len(text.strip().splitlines()) == 1


def test_monitor_uses_the_bundles_novelty_channel(nb, tmp_path: Path) -> None:
    code, text = invoke("monitor", nb["nbundle"], "--stream", nb["images"], "--out", tmp_path / "m")
    assert code == 0, text
    summary = json.loads(text[text.index("{"):])
    assert summary["channels"] == ["select", "novelty"] and summary["reference"].endswith("monitor.safetensors")
    header = (tmp_path / "m" / "monitor.csv").read_text().splitlines()[0].split(",")
    assert "novelty_p" in header and "novelty_log10_martingale" in header
