"""End-to-end `extract`: features, resume (in-process and after a real SIGKILL), quarantine, provenance."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from stage1 import featstore
from conftest import IMAGE_NAMES, ROOT, make_image
from stage1.featstore.backbones import load_backbone
from stage1.featstore.commands import extract, info
from stage1.featstore.images import load_rgb, preprocess
from stage1._core.io import sha256_file
from stage1.featstore.store import Store
from conftest import png_header_only

FAST = ["--image-size", "32", "--batch-size", "3", "--chunk-rows", "4", "--threads", "1", "--quiet"]


def run_extract(images: Path, backbone: Path, out: Path, *extra: str, labels: Path | None = None, ok: bool = True):
    args = ["--images", str(images), "--backbone", str(backbone), "--out", str(out), *FAST, *extra]
    if labels is not None or (images / "labels.csv").exists():
        args += ["--labels", str(labels or images / "labels.csv")]
    res = CliRunner().invoke(extract, args)
    if ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_extract_end_to_end_matches_direct_backbone(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0")
    assert "8 rows committed of 8 listed, 0 quarantined" in res.output
    st = featstore.open_store(out)
    assert (st.rows, st.views, st.dim, st.dtype) == (8, 1, 32, "float16")
    assert list(st.ids) == list(IMAGE_NAMES)
    assert st.labels.tolist() == [i % 2 for i in range(8)] and st.labels.dtype == np.int8
    assert list(st.sha256) == [sha256_file(image_folder / n) for n in IMAGE_NAMES]
    bb = load_backbone(tiny_backbone_dir)
    x = torch.from_numpy(np.stack([preprocess(load_rgb(image_folder / n, draft_size=32), 32, bb.mean, bb.std) for n in IMAGE_NAMES]))
    ref = bb.embed(x).numpy()
    feats = st.load_features()
    assert feats.shape == (8, 1, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[:, 0], ref, rtol=2e-3, atol=2e-3)  # float16 storage
    prov = st.attrs["provenance"]
    assert prov["kind"] == "extracted" and prov["backbone"]["weights_sha256"] == sha256_file(tiny_backbone_dir / "model.safetensors")
    assert prov["preprocessing"]["size"] == 32 and st.attrs["n_committed"] == 8 and st.complete
    # info --json carries the stable keys
    data = json.loads(CliRunner().invoke(info, [str(out), "--json"]).output)
    for key in ("rows", "committed", "dim", "views", "dtype", "provenance", "quarantined"):
        assert key in data
    assert data["rows"] == 8 and data["quarantined"] == []
    text = CliRunner().invoke(info, [str(out)]).output
    assert "8 committed of 8 listed" in text and "DINOv3ViTModel" in text
    # running it again is a no-op resume
    before = st.load_features(dtype=None).tobytes()
    assert "already complete" in run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0").output
    assert featstore.open_store(out).load_features(dtype=None).tobytes() == before


def test_decode_workers_give_identical_features(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    run_extract(image_folder, tiny_backbone_dir, tmp_path / "inline", "--workers", "0", "--dtype", "float32")
    run_extract(image_folder, tiny_backbone_dir, tmp_path / "workers", "--workers", "2", "--dtype", "float32")
    a, b = featstore.open_store(tmp_path / "inline"), featstore.open_store(tmp_path / "workers")
    assert a.dtype == "float32"
    assert a.load_features(dtype=None).tobytes() == b.load_features(dtype=None).tobytes()
    assert list(a.ids) == list(b.ids)


def test_bad_inputs_are_quarantined_and_the_rest_kept(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    d = image_folder
    (d / "zero.jpg").write_bytes(b"")
    good = (d / "img0.jpg").read_bytes()
    (d / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (d / "text.png").write_text("not an image at all")
    png_header_only(d / "bomb.png", 50_000, 50_000)
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(d / "deep16.png")
    Image.new("RGBA", (40, 40), (0, 0, 255, 128)).save(d / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    make_image(99, (48, 32)).save(d / "exif.jpg", exif=exif)
    extra = {"zero.jpg": "zero bytes", "trunc.jpg": "truncated", "text.png": "not an image",
             "bomb.png": "decompression bomb", "gone.jpg": "missing"}
    goods = ["cmyk.jpg", "deep16.png", "rgba.png", "exif.jpg"]
    csv = (d / "labels.csv").read_text() + "".join(f"{n},1\n" for n in list(extra) + goods)
    (d / "labels.csv").write_text(csv)
    out = tmp_path / "store"
    res = run_extract(d, tiny_backbone_dir, out, "--workers", "1", "--max-pixels", "1000000")
    assert "12 rows committed of 17 listed, 5 quarantined" in res.output
    st = featstore.open_store(out)
    assert st.rows == 12 and sorted(st.ids) == sorted(list(IMAGE_NAMES) + goods)
    got = {q["path"]: q["reason"] for q in st.quarantined}
    assert got == extra
    assert all(q["detail"] for q in st.quarantined)
    assert np.all(np.isfinite(st.load_features()))
    text = CliRunner().invoke(info, [str(out)]).output
    assert "quarantined  5" in text and "bomb.png: decompression bomb" in text


def test_resume_after_interruption_is_identical(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path, monkeypatch) -> None:
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    with open(image_folder / "labels.csv", "a") as fh:
        fh.write("broken.jpg,0\n")
    full = tmp_path / "full"
    run_extract(image_folder, tiny_backbone_dir, full, "--workers", "0")
    calls = {"n": 0}
    real_commit = Store.commit

    def dying_commit(self, n_committed, **attrs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_commit(self, n_committed, **attrs)

    part = tmp_path / "part"
    monkeypatch.setattr(Store, "commit", dying_commit)
    res = run_extract(image_folder, tiny_backbone_dir, part, "--workers", "0", ok=False)
    assert res.exit_code != 0
    monkeypatch.setattr(Store, "commit", real_commit)
    st = featstore.open_store(part)
    assert st.rows == 4 and not st.complete  # one 4-row chunk committed
    stale = part / "features" / "c" / "junk.partial"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half-written")
    # another --batch-size on resume would regroup the batches: the store's own batch size is kept
    res = run_extract(image_folder, tiny_backbone_dir, part, "--workers", "0", "--batch-size", "2")
    assert "5 images" in res.output  # resumed at entry 4 of 9
    assert "batch size it was started with (3; --batch-size 2 ignored)" in res.output
    assert not stale.exists()
    a, b = featstore.open_store(full), featstore.open_store(part)
    assert a.rows == b.rows == 8
    assert a.load_features(dtype=None).tobytes() == b.load_features(dtype=None).tobytes()
    assert list(a.ids) == list(b.ids) and list(a.sha256) == list(b.sha256)
    assert a.quarantined == b.quarantined and [q["path"] for q in b.quarantined] == ["broken.jpg"]


def test_provenance_mismatch_is_refused_naming_the_attribute(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0")
    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--labels", str(image_folder / "labels.csv"),
                                       "--backbone", str(tiny_backbone_dir), "--out", str(out), "--image-size", "48",
                                       "--batch-size", "3", "--chunk-rows", "4", "--quiet", "--workers", "0"])
    assert res.exit_code == 1 and "provenance attribute 'preprocessing.size' differs" in res.output
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", "--views", "2", ok=False)
    assert res.exit_code == 1 and "preprocessing.views" in res.output
    (image_folder / "labels.csv").write_text((image_folder / "labels.csv").read_text().replace("img0.jpg,0", "img0.jpg,1"))
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", ok=False)
    assert res.exit_code == 1 and "image_list_sha256" in res.output
    assert featstore.open_store(out).rows == 8  # untouched


def test_views_are_stored_and_deterministic(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        run_extract(image_folder, tiny_backbone_dir, tmp_path / name, "--workers", "0", "--views", "3", "--view-seed", "7")
    run_extract(image_folder, tiny_backbone_dir, tmp_path / "c", "--workers", "0", "--views", "3", "--view-seed", "8")
    a, b, c = (featstore.open_store(tmp_path / n) for n in "abc")
    fa = a.load_features()
    assert fa.shape == (8, 3, 32)
    assert fa.tobytes() == b.load_features().tobytes()
    assert not np.allclose(fa[:, 1:], c.load_features()[:, 1:])  # another base seed, other views
    np.testing.assert_array_equal(fa[:, 0], c.load_features()[:, 0])  # the clean view does not depend on it
    assert not np.allclose(fa[:, 0], fa[:, 1])
    assert a.attrs["provenance"]["preprocessing"]["views"] == {"n": 3, "recipe": "validator", "levels": [0, 1, 2, 3], "seed": 7}
    np.testing.assert_array_equal(a.load_features(views=2)[:, 0], fa[:, 2])


def test_cli_refuses_bad_options_and_csv(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    res = run_extract(image_folder, tiny_backbone_dir, tmp_path / "s", "--image-size", "40", ok=False)
    assert res.exit_code == 2 and "multiple of the backbone's patch size 16" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nimg0.jpg,0\n../outside.jpg,1\n")
    res = run_extract(image_folder, tiny_backbone_dir, tmp_path / "s2", labels=bad, ok=False)
    assert res.exit_code == 2 and "line 3" in res.output and "escapes --images" in res.output
    assert not (tmp_path / "s2" / "zarr.json").exists()


def test_extract_without_labels_lists_every_image(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    (image_folder / "labels.csv").unlink()
    (image_folder / "notes.txt").write_text("ignored")
    run_extract(image_folder, tiny_backbone_dir, tmp_path / "s", "--workers", "0")
    st = featstore.open_store(tmp_path / "s")
    assert sorted(st.ids) == sorted(IMAGE_NAMES) and set(st.labels.tolist()) == {-1}


def _n_committed(store: Path) -> int:
    try:
        return int(json.loads((store / "zarr.json").read_text())["attributes"]["n_committed"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_sigkill_mid_run_then_resume_is_byte_identical(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    """A real `stage1 extract` killed with SIGKILL, then re-run, equals an uninterrupted run."""
    images = tmp_path / "imgs"
    images.mkdir()
    n = 60
    rows = []
    for i in range(n):
        make_image(1000 + i, (32, 32)).save(images / f"{i:04d}.png")
        rows.append(f"{i:04d}.png,{i % 2}")
    rows.insert(37, "missing.png,1")  # a quarantined entry in the middle
    (images / "labels.csv").write_text("\n".join(rows) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "stage1", "extract", "--images", str(images), "--labels", str(images / "labels.csv"),
                "--backbone", str(tiny_backbone_dir), "--out", str(out), "--image-size", "32", "--batch-size", "3",
                "--chunk-rows", "2", "--workers", "0", "--threads", "1", "--quiet"]

    killed_at = None
    for attempt in range(3):
        victim_out = tmp_path / f"victim{attempt}"
        victim = subprocess.Popen(cmd(victim_out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while victim.poll() is None and time.monotonic() < deadline and _n_committed(victim_out) < 4:
            time.sleep(0.002)
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        killed_at = _n_committed(victim_out)
        if victim.returncode == -signal.SIGKILL and 0 < killed_at < n:
            break
    else:
        pytest.fail(f"could not kill the run mid-way (last: rc {victim.returncode}, committed {killed_at})")
    attrs_at_kill = json.loads((victim_out / "zarr.json").read_text())["attributes"]
    # the marker and the progress attributes move together (one atomic metadata write per commit)
    assert attrs_at_kill["n_consumed"] == attrs_at_kill["n_committed"] + len(attrs_at_kill["quarantined"])
    assert attrs_at_kill["n_committed"] % 2 == 0 and not attrs_at_kill["complete"]
    resumed = subprocess.run(cmd(victim_out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, (attempt, {k: attrs_at_kill[k] for k in ("n_committed", "n_consumed", "quarantined")}, resumed.stderr[-2000:])
    # the uninterrupted reference, in-process with the same options (same single torch thread)
    res = CliRunner().invoke(extract, cmd(tmp_path / "ref")[4:])
    assert res.exit_code == 0, res.output
    a, b = featstore.open_store(tmp_path / "ref"), featstore.open_store(victim_out)
    assert a.rows == b.rows == n and b.complete
    assert a.load_features(dtype=None).tobytes() == b.load_features(dtype=None).tobytes()
    ids = list(b.ids)
    assert ids == list(a.ids) and len(set(ids)) == n  # no duplicate or missing rows
    assert ids == [f"{i:04d}.png" for i in range(n)]
    assert list(a.labels) == list(b.labels) and list(a.sha256) == list(b.sha256)
    assert [q["path"] for q in b.quarantined] == ["missing.png"]
    assert not list(victim_out.rglob("*.partial"))
    processed = int(resumed.stdout.split("; ")[1].split(" images")[0])
    assert processed <= n + 1 - killed_at  # it resumed after the committed rows rather than starting over


def test_split_column_travels_from_csv_to_splits(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from stage1.featstore.splits import load_splits, write_splits

    lines = ["path,label,split"] + [f"{n},{i % 2},{'test' if i < 2 else ''}" for i, n in enumerate(IMAGE_NAMES)]
    (image_folder / "labels.csv").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # with a BOM
    run_extract(image_folder, tiny_backbone_dir, tmp_path / "s", "--workers", "0")
    st = featstore.open_store(tmp_path / "s")
    assert st.split_column.tolist() == ["test", "test"] + [""] * 6
    write_splits(tmp_path / "s", seed=1)
    assert {0, 1} <= set(load_splits(tmp_path / "s")["test"].tolist())


def test_validator_recipe_and_clean_rule_are_recorded_per_view(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from stage1.featstore.views import PARAM_NAMES

    out = tmp_path / "v"
    run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", "--views", "3", "--preprocess", "validator")
    st = featstore.open_store(out)
    pre = st.provenance["preprocessing"]
    assert pre["clean"] == "validator" and pre["views"]["recipe"] == "validator"
    levels, params = st.view_levels(), st.view_params()
    assert levels.shape == (8, 3) and params.shape == (8, 3, len(PARAM_NAMES)) and st.view_param_names == list(PARAM_NAMES)
    assert (levels[:, 0] == 0).all() and set(levels[:, 1:].ravel()) <= {0, 1, 2, 3}
    assert st.view_levels([2, 0]).tolist() == [levels[2].tolist(), levels[0].tolist()]
    moved = levels[:, 1:] >= 1
    assert np.all(params[:, 1:, PARAM_NAMES.index("hflip")][moved] == 0)  # flips never fire
    counts = st.info()["view_levels"]
    assert sum(counts.values()) == 24 and counts["0"] >= 8
    res = CliRunner().invoke(info, [str(out)])
    assert "view 0 validator" in res.output and "view levels" in res.output
    # a re-run without the options keeps the recorded recipe and clean rule (else it would be refused)
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", "--views", "3")
    assert "already complete" in res.output
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", "--views", "3", "--preprocess", "squash", ok=False)
    assert res.exit_code != 0 and "clean" in str(res.exception) + res.output


def test_resume_keeps_a_validator_v1_store_recipe(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "v1"
    run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", "--views", "2", "--view-recipe", "validator-v1")
    st = featstore.open_store(out)
    assert st.provenance["preprocessing"]["views"]["recipe"] == "validator-v1"
    assert "clean" not in st.provenance["preprocessing"] and st.view_levels()[:, 1].tolist() == [1] * 8
    assert "already complete" in run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", "--views", "2").output
    bad = run_extract(image_folder, tiny_backbone_dir, tmp_path / "x", "--view-recipe", "nope", ok=False)
    assert bad.exit_code == 2 and "--view-recipe" in bad.output


# -- "Trust nothing on disk": symlinks out of --images ---------------------------------------------
@pytest.mark.parametrize("mode", ["csv", "no-labels"])
def test_symlink_escaping_images_is_refused_naming_the_row(tmp_path: Path, tiny_backbone_dir: Path, mode: str) -> None:
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    make_image(0).save(images / "ok.png")
    make_image(1).save(outside / "inner.png")
    (images / "linkdir").symlink_to(outside, target_is_directory=True)
    (images / "inside_link.png").symlink_to(images / "ok.png")  # a link that stays inside is fine
    labels = None
    if mode == "csv":
        labels = tmp_path / "labels.csv"
        labels.write_text("path,label\nok.png,0\ninside_link.png,1\nlinkdir/inner.png,1\n")
    else:
        (images / "leak.png").symlink_to(outside / "inner.png")
    res = run_extract(images, tiny_backbone_dir, tmp_path / "store", "--workers", "0", labels=labels, ok=False)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert ("'linkdir/inner.png'" if mode == "csv" else "'leak.png'") in res.output and "outside the --images folder" in res.output
    assert not (tmp_path / "store" / "zarr.json").exists()


def _interrupted(image_folder: Path, backbone: Path, out: Path, monkeypatch, *extra: str) -> None:
    """A store with one 4-row chunk committed, then a simulated crash."""
    real_commit = Store.commit
    calls = {"n": 0}

    def dying_commit(self, n_committed, **attrs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_commit(self, n_committed, **attrs)

    monkeypatch.setattr(Store, "commit", dying_commit)
    run_extract(image_folder, backbone, out, "--workers", "0", *extra, ok=False)
    monkeypatch.setattr(Store, "commit", real_commit)
    assert featstore.open_store(out).rows == 4


def test_resume_from_another_images_folder_with_the_same_names_is_refused(
        image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    out = tmp_path / "store"
    _interrupted(image_folder, tiny_backbone_dir, out, monkeypatch)
    other = tmp_path / "other"
    shutil.copytree(image_folder, other)
    for i, name in enumerate(IMAGE_NAMES):
        make_image(100 + i, size=(40, 32)).save(other / name)  # same names, other pictures
    res = run_extract(other, tiny_backbone_dir, out, "--workers", "0", labels=other / "labels.csv", ok=False)
    assert res.exit_code == 1 and "is not the image this store was extracted from" in res.output, res.output
    assert featstore.open_store(out).rows == 4
    moved = tmp_path / "moved"  # the same files in a moved folder still resume
    shutil.copytree(image_folder, moved)
    run_extract(moved, tiny_backbone_dir, out, "--workers", "0", labels=moved / "labels.csv")
    assert featstore.open_store(out).rows == 8


def test_resume_with_another_max_pixels_is_refused(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "store"
    _interrupted(image_folder, tiny_backbone_dir, out, monkeypatch)
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", "--max-pixels", "100", ok=False)
    assert res.exit_code == 1 and "provenance attribute 'max_pixels' differs" in res.output, res.output
    st = featstore.open_store(out)
    assert st.rows == 4 and st.quarantined == []


def test_resume_with_an_edited_backbone_config_is_refused(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    bb = tmp_path / "bb"
    shutil.copytree(tiny_backbone_dir, bb)
    out = tmp_path / "store"
    _interrupted(image_folder, bb, out, monkeypatch)
    assert featstore.open_store(out).provenance["backbone"]["config_sha256"] == sha256_file(bb / "config.json")
    config = json.loads((bb / "config.json").read_text())
    config["layer_norm_eps"] = 0.5  # same weights, other features
    (bb / "config.json").write_text(json.dumps(config))
    res = run_extract(image_folder, bb, out, "--workers", "0", ok=False)
    assert res.exit_code == 1 and "'backbone.config_sha256' differs" in res.output, res.output
    assert featstore.open_store(out).rows == 4


def test_store_without_config_hash_resumes_saying_so(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "store"
    _interrupted(image_folder, tiny_backbone_dir, out, monkeypatch)
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"]["provenance"]["backbone"]["config_sha256"]  # as written before it was recorded
    (out / "zarr.json").write_text(json.dumps(meta))
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0")
    assert "does not record its backbone's config.json hash" in res.output
    assert featstore.open_store(out).rows == 8


# -- system errors are not bad images; a run that keeps nothing is an error ------------------------------
def test_memory_error_stops_the_run_instead_of_quarantining(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from stage1.featstore.preprocessing import Preprocessing

    def no_memory(self, img):
        raise MemoryError()

    monkeypatch.setattr(Preprocessing, "clean_pixels", no_memory)
    out = tmp_path / "store"
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", ok=False)
    assert res.exit_code == 1 and "system reason (MemoryError" in res.output and "--image-size" in res.output, res.output
    assert "Traceback" not in res.output
    st = featstore.open_store(out)
    assert st.quarantined == [] and not st.complete  # nothing quarantined for good
    monkeypatch.undo()
    run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0")
    assert featstore.open_store(out).rows == 8


def test_io_error_is_a_system_error_not_a_bad_image(tmp_path: Path, monkeypatch) -> None:
    import errno

    from stage1._core.errors import EnvironmentProblem
    from stage1.featstore import images as images_module

    (tmp_path / "a.png").write_bytes(b"x")

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(images_module, "open", eio, raising=False)
    with pytest.raises(EnvironmentProblem, match="Input/output error"):
        images_module.read_bytes(tmp_path / "a.png")
    assert images_module.is_system_error(MemoryError()) and not images_module.is_system_error(ValueError())


@pytest.mark.parametrize("csv_text, needle", [
    ("path;label\nimg0.jpg;0\nimg1.jpg;1\n", "comma-separated"),  # every row read as a missing path
    ("path,label\nnope0.jpg,0\nnope1.jpg,1\n", "'missing'"),
])
def test_a_run_that_keeps_no_row_is_an_error(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path,
                                              csv_text: str, needle: str) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(csv_text)
    out = tmp_path / "store"
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", labels=labels, ok=False)
    assert res.exit_code == 1 and "no image was kept" in res.output and needle in res.output, res.output
    assert not featstore.open_store(out).complete
    res = run_extract(image_folder, tiny_backbone_dir, out, "--workers", "0", labels=labels, ok=False)
    assert res.exit_code == 1 and "no image was kept" in res.output  # a re-run does not turn it into success
