"""export / predict: bundle round trip, JSON lines, bad images, and every refusal case."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from stage1 import cli
from conftest import make_backbone_dir, make_image

PREDICT_KEYS = {"path", "p_roadwork", "decision", "label", "pred_set", "select_score", "level", "answer"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibrated run on 48 generated images through the tiny backbone (extract -> split -> train -> calibrate)."""
    from workflows.tiny_bundle import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("bundle"), n=48, seed=1000)


@pytest.fixture(scope="module")
def bundle(trained_run: dict[str, Path]) -> Path:
    res = CliRunner().invoke(cli.main, ["export", str(trained_run["run"]), "--out", str(trained_run["root"] / "bundle")])
    assert res.exit_code == 0, res.output
    return trained_run["root"] / "bundle"


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_files_and_manifest(bundle: Path, trained_run: dict[str, Path]) -> None:
    from stage1._core.io import read_json, sha256_file

    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "head.json", "head.safetensors",
                                                        "monitor.safetensors", "policy.json"]
    m = read_json(bundle / "bundle.json")
    assert m["schema_version"] == 1
    assert m["backbone"]["hidden_size"] == 32 and len(m["backbone"]["weights_sha256"]) == 64
    assert m["preprocessing"]["size"] == 32 and m["head"]["name"] == "mlp" and m["head"]["in_dim"] == 32
    assert m["policy"]["policy"] == "coverage" and "certified" in m["calibration"]
    for name, digest in m["files"].items():
        assert sha256_file(bundle / name) == digest


def test_round_trip_gives_the_runs_decisions(bundle: Path, trained_run: dict[str, Path]) -> None:
    """Predicting the store's images from disk reproduces the run's own decisions on every split."""
    from stage1.featstore import open_store
    from stage1.runs import layout
    from stage1.policies import policy_from_dict
    from stage1.workflows.predictor import Stage1Predictor

    pred = Stage1Predictor.from_bundle(bundle, backbone=trained_run["backbone"])
    store = open_store(str(trained_run["store"]))
    policy = policy_from_dict(layout.read_policy(trained_run["run"]))
    n_exit = 0
    for split, d in layout.read_scores(trained_run["run"]).items():
        if not len(d["rows"]):
            continue
        ref = policy.decide({"logits": d["logits"], "select": d["select"]})
        paths = [str(trained_run["images"] / store.ids[int(r)]) for r in d["rows"]]
        recs = pred.predict(paths, batch_size=5)
        assert [r["path"] for r in recs] == paths
        assert [r["decision"] for r in recs] == ["exit" if e else "defer" for e in ref.exit]
        assert [r["label"] for r in recs] == [int(lab) if e else None for lab, e in zip(ref.label, ref.exit)]
        np.testing.assert_allclose([r["p_roadwork"] for r in recs], ref.p_roadwork, atol=1e-5)
        n_exit += int(ref.exit.sum())
    assert n_exit > 0  # the coverage policy exits some images, so exits are compared too


def test_predict_cli_streams_json_lines_and_reports_bad_images(bundle: Path, trained_run: dict[str, Path],
                                                               tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    make_image(1, size=(50, 40)).save(folder / "a.jpg")
    make_image(2, size=(20, 64)).convert("RGBA").save(folder / "sub" / "b.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    res = CliRunner().invoke(cli.main, ["predict", str(bundle), str(folder), str(tmp_path / "missing.jpg"),
                                        "--backbone", str(trained_run["backbone"]), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    by_name = {Path(r["path"]).name: r for r in lines}
    assert set(by_name) == {"a.jpg", "b.png", "broken.png", "empty.jpg", "missing.jpg"}
    for name in ("a.jpg", "b.png"):
        r = by_name[name]
        assert set(r) == PREDICT_KEYS and 0.0 <= r["p_roadwork"] <= 1.0
        assert r["decision"] in ("exit", "defer") and r["label"] in (0, 1, None)
        assert (r["label"] is None) == (r["decision"] == "defer")
    assert by_name["empty.jpg"]["reason"] == "zero bytes" and "error" in by_name["empty.jpg"]
    assert by_name["missing.jpg"]["reason"] == "missing"
    assert "error" in by_name["broken.png"]
    for name in ("broken.png", "empty.jpg", "missing.jpg"):  # still a full, deferred answer
        r = by_name[name]
        assert PREDICT_KEYS <= set(r) and r["p_roadwork"] == 0.5 and r["decision"] == "defer"
        assert r["label"] is None and r["pred_set"] == [0, 1] and r["level"] == "AMBIGUOUS"
        assert r["answer"] == -1.0  # abstains: a 0.5 would be scored as class 0
    assert "5 image(s), 3 error(s)" in res.stderr


@pytest.fixture(scope="module")
def predictor(bundle: Path, trained_run: dict[str, Path]):
    from stage1.workflows.predictor import Stage1Predictor

    return Stage1Predictor.from_bundle(bundle, backbone=trained_run["backbone"])


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(min_value=1e-3, max_value=1e6), seed=st.integers(0, 1000))
def test_p_roadwork_always_in_unit_interval(scale: float, seed: int, predictor) -> None:
    pred = predictor
    feats = np.random.default_rng(seed).normal(size=(6, 32)).astype(np.float32) * np.float32(scale)
    feats[0] = np.nan  # a broken feature row gives an error record, not a crash or a NaN
    recs = pred.decide_features(feats)
    assert "error" in recs[0] and recs[0]["decision"] == "defer" and recs[0]["p_roadwork"] == 0.5
    assert recs[0]["answer"] == -1.0
    for r in recs[1:]:
        assert 0.0 <= r["p_roadwork"] <= 1.0 and r["decision"] in ("exit", "defer")


def _refused(args: list[str], *needles: str) -> None:
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code != 0, res.output
    text = res.output.lower()
    assert "traceback" not in text
    for needle in needles:
        assert needle.lower() in text, (needle, res.output)


def test_tampered_file_is_refused(bundle: Path, trained_run: dict[str, Path], tmp_path: Path) -> None:
    for name in ("head.safetensors", "policy.json", "head.json"):
        b = _copy(bundle, tmp_path / name)
        data = bytearray((b / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (b / name).write_bytes(bytes(data))
        _refused(["predict", str(b), str(trained_run["images"] / "im00.png"), "--backbone", str(trained_run["backbone"])],
                 name, "sha256", "modified")


def test_missing_file_and_edited_manifest_are_refused(bundle: Path, trained_run: dict[str, Path], tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path / "missing")
    (b / "policy.json").unlink()
    _refused(["predict", str(b), str(trained_run["images"]), "--backbone", str(trained_run["backbone"])], "missing")
    b = _copy(bundle, tmp_path / "edited")
    m = json.loads((b / "bundle.json").read_text())
    m["preprocessing"]["size"] = 64
    (b / "bundle.json").write_text(json.dumps(m))
    _refused(["predict", str(b), str(trained_run["images"]), "--backbone", str(trained_run["backbone"])],
             "manifest_sha256", "edited")


def test_manifest_listing_a_file_outside_the_bundle_is_refused(
        bundle: Path, trained_run: dict[str, Path], tmp_path: Path) -> None:
    from stage1.workflows.bundle import manifest_digest

    b = _copy(bundle, tmp_path / "b")
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of a bundle")
    m = json.loads((b / "bundle.json").read_text())
    from stage1._core.io import sha256_file

    m["files"]["../outside.txt"] = sha256_file(outside)  # a correct hash of a file outside the bundle
    m["manifest_sha256"] = manifest_digest(m)
    (b / "bundle.json").write_text(json.dumps(m))
    _refused(["predict", str(b), str(trained_run["images"]), "--backbone", str(trained_run["backbone"])],
             "../outside.txt", "does not hold")


def test_unknown_schema_version_is_refused(bundle: Path, trained_run: dict[str, Path], tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "bundle.json").read_text())
    m["schema_version"] = 99
    (b / "bundle.json").write_text(json.dumps(m))
    _refused(["predict", str(b), str(trained_run["images"]), "--backbone", str(trained_run["backbone"])],
             "schema_version 99", "not supported")


def test_backbone_with_other_weights_or_width_is_refused(bundle: Path, trained_run: dict[str, Path], tmp_path: Path) -> None:
    other = make_backbone_dir(tmp_path / "other", seed=1)
    _refused(["predict", str(bundle), str(trained_run["images"]), "--backbone", str(other)], "weights sha256")
    wide = make_backbone_dir(tmp_path / "wide", hidden=48)
    _refused(["predict", str(bundle), str(trained_run["images"]), "--backbone", str(wide)], "width 48", "expects 32")


def test_missing_recorded_backbone_asks_for_one(bundle: Path, trained_run: dict[str, Path], tmp_path: Path) -> None:
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "bundle.json").read_text())
    m["backbone"]["path"] = str(tmp_path / "gone")
    from stage1.workflows.bundle import manifest_digest

    m["manifest_sha256"] = manifest_digest(m)
    (b / "bundle.json").write_text(json.dumps(m))
    _refused(["predict", str(b), str(trained_run["images"])], "not on this machine", "--backbone")


def test_export_refusals(bundle: Path, trained_run: dict[str, Path], tmp_path: Path) -> None:
    _refused(["export", str(trained_run["run"]), "--out", str(bundle)], "already exists", "--force")
    res = CliRunner().invoke(cli.main, ["export", str(trained_run["run"]), "--out", str(tmp_path / "b2")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli.main, ["export", str(trained_run["run"]), "--out", str(tmp_path / "b2"), "--force"])
    assert res.exit_code == 0, res.output
    assert not list(tmp_path.glob(".b2*"))  # no temp folders left behind
    run = tmp_path / "uncalibrated"
    shutil.copytree(trained_run["run"], run)
    (run / "policy.json").unlink()
    _refused(["export", str(run), "--out", str(tmp_path / "b3")], "policy.json", "calibrate")
    assert not (tmp_path / "b3").exists()


def test_predict_accepts_pil_images_and_bytes(predictor, trained_run: dict[str, Path]) -> None:
    from PIL import Image

    path = trained_run["images"] / "im03.png"
    from_path = predictor.predict(str(path))
    from_bytes, from_pil = predictor.predict([path.read_bytes(), Image.open(path)])
    assert len(from_path) == 1 and from_bytes["path"] == "<image 0>"
    for rec in (from_bytes, from_pil):
        assert rec["decision"] == from_path[0]["decision"]
        assert abs(rec["p_roadwork"] - from_path[0]["p_roadwork"]) < 1e-6
    with pytest.raises(ValueError, match="batch_size"):
        predictor.predict([str(path)], batch_size=0)


def test_imgfocus_bundles_fall_back_to_the_cached_backbone(monkeypatch, tmp_path: Path) -> None:
    from stage1.workflows import imgfocus
    from stage1.workflows.bundle import IMGFOCUS_WEIGHTS_SHA256, BundleError
    from stage1.workflows.predictor import resolve_backbone

    called = []
    monkeypatch.setattr(imgfocus, "ensure_backbone", lambda: called.append(1) or tmp_path / "cached")
    manifest = {"backbone": {"path": str(tmp_path / "gone"), "weights_sha256": IMGFOCUS_WEIGHTS_SHA256}}
    assert resolve_backbone(manifest, None) == tmp_path / "cached" and called == [1]
    assert resolve_backbone(manifest, tmp_path / "given") == tmp_path / "given"
    manifest["backbone"]["weights_sha256"] = "0" * 64
    with pytest.raises(BundleError, match="not on this machine"):
        resolve_backbone(manifest, None)


def test_predict_device_option(bundle: Path, trained_run: dict[str, Path]) -> None:
    import torch

    img = str(trained_run["images"] / "im00.png")
    res = CliRunner().invoke(cli.main, ["predict", str(bundle), img, "--backbone", str(trained_run["backbone"]),
                                        "--device", "cpu"])
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[0])["path"] == img
    if not torch.cuda.is_available():
        _refused(["predict", str(bundle), img, "--backbone", str(trained_run["backbone"]), "--device", "cuda"],
                 "cuda")


def test_run_provenance_reads_config_then_falls_back_to_the_store(trained_run: dict[str, Path], tmp_path: Path) -> None:
    """config.json["store"]["provenance"] is used as recorded; only without it is the store opened."""
    from stage1.featstore import open_store
    from stage1.workflows.bundle import BundleError, run_provenance

    with open_store(str(trained_run["store"])) as store:
        stored = store.provenance
    assert run_provenance(trained_run["run"]) == stored
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["store"]["provenance"]
    (run / "config.json").write_text(json.dumps(cfg))
    assert run_provenance(run) == stored  # opened the store it names
    cfg["store"]["path"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="records no store provenance"):
        run_provenance(run)
    del cfg["store"]
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="names no store"):
        run_provenance(run)


def test_failed_records_keep_the_full_deferred_schema(predictor) -> None:
    """An image that cannot be scored gets exactly the record 0.1.0 gave (now built by Decision.deferred)."""
    rec = predictor.predict([b""])[0]
    assert rec == {"path": "<image 0>", "p_roadwork": 0.5, "decision": "defer", "label": None, "pred_set": [0, 1],
                   "select_score": None, "level": "AMBIGUOUS", "error": "zero bytes: <bytes> is empty",
                   "reason": "zero bytes", "answer": -1.0}
    assert list(rec) == ["path", "p_roadwork", "decision", "label", "pred_set", "select_score", "level",
                         "error", "reason", "answer"]


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["state"].update(t1=float("nan")), "t1"),
    (lambda d: d["state"].update(certified="yes"), "certified"),
    (lambda d: d["state"]["calibrator"]["state"].update(temperature=-1.0), "temperature"),
])
def test_export_refuses_a_hand_edited_policy(trained_run: dict[str, Path], tmp_path: Path, edit, needle: str) -> None:
    run = tmp_path / "edited"
    shutil.copytree(trained_run["run"], run)
    d = json.loads((run / "policy.json").read_text())
    edit(d)
    (run / "policy.json").write_text(json.dumps(d))
    _refused(["export", str(run), "--out", str(tmp_path / "b")], "policy.json", needle)
    assert not (tmp_path / "b").exists()


# -- trust nothing on disk: stale metrics, an interrupted --force, broken files --------------------------
def _export(run: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli.main, ["export", str(run), "--out", str(out), *extra])


def test_export_copies_metrics_only_of_the_policy_they_evaluated(trained_run: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    res = CliRunner().invoke(cli.main, ["evaluate", str(run)])
    assert res.exit_code == 0, res.output
    res = _export(run, tmp_path / "b1")
    assert res.exit_code == 0, res.output
    cal = json.loads((tmp_path / "b1" / "bundle.json").read_text())["calibration"]
    assert cal["metrics"]["policy_sha256"] == json.loads((run / "metrics.json").read_text())["policy_sha256"]
    res = CliRunner().invoke(cli.main, ["calibrate", str(run), "--policy", "coverage", "--coverage", "0.8", "--score", "p"])
    assert res.exit_code == 0, res.output
    res = _export(run, tmp_path / "b2")
    assert res.exit_code == 0, res.output
    cal = json.loads((tmp_path / "b2" / "bundle.json").read_text())["calibration"]
    assert "metrics" not in cal and "evaluate" in cal["metrics_omitted"]
    assert "evaluate" in res.stderr and "metrics.json" in res.stderr


def test_export_refuses_non_finite_metrics_naming_the_field(trained_run: dict[str, Path], tmp_path: Path) -> None:
    from stage1._core.io import sha256_file

    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    (run / "metrics.json").write_text(json.dumps({"coverage": float("inf"),
                                                  "policy_sha256": sha256_file(run / "policy.json")}))
    _refused(["export", str(run), "--out", str(tmp_path / "b")], "metrics.json", "calibration.metrics.coverage")
    assert not (tmp_path / "b").exists()


def _interrupt_force(out: Path) -> Path:
    """What a crash inside `export --force` leaves: the old bundle swapped aside, no OUT."""
    old = out.parent / f".{out.name}.old.abc123.partial"
    old.mkdir()
    out.rename(old / out.name)
    (out.parent / f".{out.name}.zz9.partial").mkdir()  # the new bundle's unfinished build folder
    return old


def test_interrupted_force_export_recovers_on_the_next_export(trained_run: dict[str, Path], tmp_path: Path) -> None:
    from stage1.workflows.bundle import verify_files

    out = tmp_path / "b"
    assert _export(trained_run["run"], out).exit_code == 0
    before = (out / "bundle.json").read_bytes()
    _interrupt_force(out)
    _refused(["export", str(trained_run["run"]), "--out", str(out)], "already exists", "--force")
    assert (out / "bundle.json").read_bytes() == before
    verify_files(out)
    assert not list(tmp_path.glob(f".{out.name}.old.*"))
    res = _export(trained_run["run"], out, "--force")
    assert res.exit_code == 0, res.output
    verify_files(out)


def test_interrupted_force_export_recovers_on_the_next_predict(trained_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert _export(trained_run["run"], out).exit_code == 0
    _interrupt_force(out)
    from stage1.workflows.predictor import Stage1Predictor

    # (the `predict` CLI checks BUNDLE exists before it gets here: workflows/commands.py must call
    # recover_bundle first; the library entry point recovers by itself)
    pred = Stage1Predictor.from_bundle(out, backbone=trained_run["backbone"])
    assert len(pred.predict([str(trained_run["images"] / "im03.png")])) == 1
    assert (out / "bundle.json").is_file() and not list(tmp_path.glob(f".{out.name}.old.*"))


@pytest.mark.parametrize("content", [b"", b"\x00" * 40, b"\x80\x04\x95garbage-pickle", b"{\"not\": \"safetensors\"}"])
def test_export_refuses_a_corrupt_head_file(trained_run: dict[str, Path], tmp_path: Path, content: bytes) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    (run / "head.safetensors").write_bytes(content)
    res = _export(run, tmp_path / "b")
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert "head.safetensors" in res.output
    assert not (tmp_path / "b").exists()


def test_export_os_error_is_one_line_naming_the_file(trained_run: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    import errno

    from stage1._core import io

    def failing(path, data):  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "atomic_write_bytes", failing)
    res = _export(trained_run["run"], tmp_path / "b")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    # the first file export writes itself (the copies use shutil) is the monitor's reference
    assert "No space left on device" in res.output and "monitor.safetensors" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_predict_dir_names_the_files_it_skips(tmp_path: Path, capsys) -> None:
    """`predict DIR` takes image files and says which others it left out (a .heic holding JPEG bytes)."""
    from stage1.workflows.predictor import expand_inputs

    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.heic").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.PNG").write_bytes(b"x")
    assert expand_inputs([tmp_path]) == [str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "c.PNG")]
    err = capsys.readouterr().err
    assert "skipped 1 file(s)" in err and "'b.heic'" in err
