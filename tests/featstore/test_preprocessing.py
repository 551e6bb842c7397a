"""Preprocessing spec: round trip, 0.1.0's shapes, refused mismatches, draft size; legacy artifacts still work."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stage1.featstore.images import RESIZE_RULE, draft_size_for
from stage1.featstore.preprocessing import (Preprocessing, PreprocessingError, PreprocessingMismatch,
                                            ViewRecipe)

LEGACY = Path(__file__).parents[1] / "data" / "legacy_v0_1"
IMAGES = [f"images/im0{i}.jpg" for i in range(4)]


def _legacy_json(rel: str) -> dict:
    return json.loads((LEGACY / rel).read_text())


def _legacy_dicts() -> dict[str, dict]:
    """The preprocessing objects 0.1.0 wrote: store attributes, run config.json, bundle.json."""
    return {
        "store": _legacy_json("store.zarr/zarr.json")["attributes"]["provenance"]["preprocessing"],
        "run": _legacy_json("run/config.json")["store"]["provenance"]["preprocessing"],
        "bundle": _legacy_json("bundle/bundle.json")["preprocessing"],
    }


@pytest.fixture()
def legacy(tmp_path: Path) -> Path:
    dst = tmp_path / "legacy"
    shutil.copytree(LEGACY, dst)
    return dst


def test_round_trip_and_normalisation() -> None:
    prep = Preprocessing(size=32, mean=[0.5, 0.5, 0.5], std=(0.25, 0.25, 0.25), views=ViewRecipe.of(3, [1, 2], 7))
    d = prep.to_dict()
    assert d == {"size": 32, "resize": RESIZE_RULE, "mean": [0.5] * 3, "std": [0.25] * 3, "draft": True,
                 "exif_transpose": True, "alpha": "composite-on-white",
                 "views": {"n": 3, "recipe": "validator-v1", "levels": [1, 2], "seed": 7}}
    assert Preprocessing.from_dict(json.loads(json.dumps(d))) == prep
    assert hash(prep) == hash(Preprocessing.from_dict(d))  # frozen: usable as a key
    # one view: levels and seed are not part of the spec (as extract has always recorded them)
    assert ViewRecipe.of(1, [1, 2, 3], 9) == ViewRecipe(n=1)
    assert ViewRecipe.of(1, [1, 2, 3], 9).to_dict() == {"n": 1, "recipe": "validator-v1", "levels": [], "seed": 0}


def test_reads_the_shapes_0_1_0_wrote() -> None:
    dicts = _legacy_dicts()
    specs = {name: Preprocessing.from_dict(d, where=name) for name, d in dicts.items()}
    assert specs["store"] == specs["run"] == specs["bundle"]
    prep = specs["store"]
    assert prep.size == 32 and prep.mean == (0.485, 0.456, 0.406) and prep.std == (0.229, 0.224, 0.225)
    assert prep.draft and prep.views == ViewRecipe(n=2, recipe="validator-v1", levels=(1, 2, 3), seed=0)
    for d in dicts.values():  # to_dict writes back exactly what 0.1.0 stored
        assert Preprocessing.from_dict(d).to_dict() == d
    # fields 0.1.0 applied without needing them read back with the values it applied
    trimmed = {k: v for k, v in dicts["bundle"].items() if k not in ("draft", "exif_transpose", "alpha")}
    assert Preprocessing.from_dict(trimmed) == prep
    no_views = {k: v for k, v in dicts["bundle"].items() if k != "views"}
    assert Preprocessing.from_dict(no_views).views == ViewRecipe(n=1)


@pytest.mark.parametrize("bad, needle", [
    (None, "records no preprocessing"),
    ({"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, "'resize'"),
    ({"size": 32, "resize": RESIZE_RULE, "mean": [0.5] * 3, "std": [0.5] * 3, "crop": "centre"}, "crop"),
    ({"size": 32, "resize": RESIZE_RULE, "mean": [0.5] * 2, "std": [0.5] * 3}, "3 means"),
    ({"size": "big", "resize": RESIZE_RULE, "mean": [0.5] * 3, "std": [0.5] * 3}, "malformed"),
])
def test_unreadable_records_are_refused_naming_the_file(bad: object, needle: str) -> None:
    with pytest.raises(PreprocessingError, match="x/bundle.json") as err:
        Preprocessing.from_dict(bad, where="x/bundle.json")
    assert needle in str(err.value)


def test_mismatch_is_refused_naming_the_field() -> None:
    prep = Preprocessing.from_dict(_legacy_dicts()["bundle"])
    prep.require_equal(Preprocessing.from_dict(_legacy_dicts()["store"]), where="w")  # equal: no error
    other = Preprocessing(size=64, mean=prep.mean, std=prep.std, views=prep.views)
    assert prep != other and prep.differences(other) == [("size", 32, 64)]
    with pytest.raises(PreprocessingMismatch, match=r"w: preprocessing\.size differs \(recorded 32, given 64\)"):
        prep.require_equal(other, where="w")
    seeded = prep.with_views(ViewRecipe.of(2, [1, 2, 3], 5))
    with pytest.raises(PreprocessingMismatch, match=r"preprocessing\.views\.seed differs"):
        prep.require_equal(seeded, where="w")
    odd = Preprocessing(size=32, mean=prep.mean, std=prep.std, resize="bilinear-crop", alpha="black")
    with pytest.raises(PreprocessingMismatch, match=r"preprocessing\.alpha differs .*and 1 more: resize"):
        odd.require_supported("w")


def test_draft_size() -> None:
    one = Preprocessing(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert one.draft_size == draft_size_for(32, 1) == 32
    two = one.with_views(ViewRecipe.of(2, [1]))
    assert two.draft_size == draft_size_for(32, 2) == 72  # random crops of area >= 0.2 follow
    assert two.draft_size_for(1) == 32
    off = Preprocessing(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, draft=False, views=two.views)
    assert off.draft_size is None and off.draft_size_for(2) is None
    assert Preprocessing.from_dict(_legacy_dicts()["bundle"]).draft_size == 72


def test_predictor_refuses_a_bundle_with_a_rule_it_does_not_implement(legacy: Path) -> None:
    from stage1.workflows.bundle import BundleError, manifest_digest
    from stage1.workflows.predictor import Stage1Predictor

    manifest = json.loads((legacy / "bundle" / "bundle.json").read_text())
    manifest["preprocessing"]["resize"] = "bilinear-crop"
    manifest["manifest_sha256"] = manifest_digest(manifest)
    with pytest.raises(BundleError, match=r"preprocessing\.resize differs \(recorded 'bilinear-crop'"):
        Stage1Predictor(manifest, None, None, None, legacy / "bundle")


def test_legacy_bundle_predicts_the_recorded_records(legacy: Path) -> None:
    expected = [json.loads(line) for line in (legacy / "predict_expected.jsonl").read_text().splitlines()]
    res = subprocess.run([sys.executable, "-m", "stage1", "predict", "bundle", *IMAGES, "--backbone", "backbone"],
                         cwd=legacy, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        assert g.keys() == e.keys() | {"answer"}  # 0.1.0 had no answer; it is -1 (abstain) when deferred
        assert g.pop("answer") == (g["p_roadwork"] if e["decision"] == "exit" else -1.0)
        assert g["p_roadwork"] == pytest.approx(e["p_roadwork"], abs=1e-6)
        assert {k: v for k, v in g.items() if k != "p_roadwork"} == {k: v for k, v in e.items() if k != "p_roadwork"}


def test_legacy_store_opens_and_info_works(legacy: Path) -> None:
    from click.testing import CliRunner

    from stage1 import cli
    from stage1.featstore import open_store

    with open_store(str(legacy / "store.zarr")) as store:
        assert store.rows == 48 and store.views == 2 and store.dim == 32 and store.complete
        assert Preprocessing.from_dict(store.provenance["preprocessing"]).size == 32
    res = CliRunner().invoke(cli.main, ["info", str(legacy / "store.zarr")])
    assert res.exit_code == 0, res.output
    assert "48 committed" in res.output and "bicubic-square" in res.output
    res = CliRunner().invoke(cli.main, ["info", str(legacy / "store.zarr"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["provenance"]["preprocessing"] == _legacy_dicts()["store"]


def test_legacy_store_still_resumes_its_provenance(legacy: Path) -> None:
    """extract's resume check passes for the settings the store was made with, however 0.1.0 spelled them."""
    from stage1.featstore.extract import check_resume
    from stage1.featstore.store import ProvenanceMismatch, Store

    zarr_json = legacy / "store.zarr" / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    stored = meta["attributes"]["provenance"]
    prep = Preprocessing.from_dict(stored["preprocessing"])
    same = {**stored, "preprocessing": prep.to_dict()}
    with Store.open(legacy / "store.zarr", mode="r+") as store:
        check_resume(store, same)
        with pytest.raises(ProvenanceMismatch, match="'preprocessing.size' differs"):
            check_resume(store, {**stored, "preprocessing": {**prep.to_dict(), "size": 64}})
    # a record without the fields 0.1.0 applied anyway still resumes with the full spec
    del meta["attributes"]["provenance"]["preprocessing"]["exif_transpose"]
    zarr_json.write_text(json.dumps(meta))
    with Store.open(legacy / "store.zarr", mode="r+") as store:
        check_resume(store, same)


def test_legacy_run_exports_the_legacy_preprocessing(legacy: Path, tmp_path: Path) -> None:
    """A 0.1.0 run dir (its store gone) exports: the provenance comes from config.json alone."""
    from stage1.workflows.bundle import export_bundle, run_provenance

    config = legacy / "run" / "config.json"
    cfg = json.loads(config.read_text())
    cfg["store"]["path"] = str(tmp_path / "gone.zarr")  # never opened: config.json records the provenance
    config.write_text(json.dumps(cfg))
    prov = run_provenance(legacy / "run")
    assert prov["backbone"]["weights_sha256"].startswith("3690f3dc")
    out = export_bundle(legacy / "run", tmp_path / "b")
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["preprocessing"] == _legacy_dicts()["bundle"]


def test_validator_clean_rule_round_trips_and_is_applied() -> None:
    import io

    import numpy as np
    from PIL import Image

    from stage1.featstore.views import validator_clean

    squash = Preprocessing(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    val = Preprocessing(size=32, mean=(0.5,) * 3, std=(0.25,) * 3, clean="validator")
    assert "clean" not in squash.to_dict() and val.to_dict()["clean"] == "validator"
    assert Preprocessing.from_dict(val.to_dict()) == val and Preprocessing.from_dict(squash.to_dict()) == squash
    assert [d[0] for d in squash.differences(val)] == ["clean"]
    assert val.draft_size == 224 and squash.draft_size == 32  # the validator path works at 224 px
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((60, 90, 3)) * 255).astype(np.uint8))
    got = val.clean_pixels(img)
    assert got.shape == (3, 32, 32)
    np.testing.assert_array_equal(got, val.pixels(validator_clean(img)))
    np.testing.assert_array_equal(squash.clean_pixels(img), squash.pixels(img))
    # a served 224 px JPEG goes through the same steps as the training image's view 0
    buf = io.BytesIO()
    img.resize((224, 224)).save(buf, format="JPEG")
    assert val.clean_pixels(val.decode(buf.getvalue())).shape == (3, 32, 32)


def test_predictor_applies_and_checks_the_clean_rule(legacy: Path) -> None:
    import numpy as np

    from stage1.workflows.bundle import BundleError, manifest_digest
    from stage1.workflows.predictor import Stage1Predictor

    manifest = json.loads((legacy / "bundle" / "bundle.json").read_text())
    manifest["preprocessing"]["clean"] = "validator"
    manifest["manifest_sha256"] = manifest_digest(manifest)
    pred = Stage1Predictor(manifest, None, None, None, legacy / "bundle")
    prep = pred.preprocessing
    path = legacy / IMAGES[0]
    np.testing.assert_array_equal(pred.load_pixels(path), prep.clean_pixels(prep.decode(path.read_bytes())))
    manifest["preprocessing"]["clean"] = "letterbox"
    manifest["manifest_sha256"] = manifest_digest(manifest)
    with pytest.raises(BundleError, match=r"preprocessing\.clean differs \(recorded 'letterbox'"):
        Stage1Predictor(manifest, None, None, None, legacy / "bundle")


def test_legacy_store_resumes_with_its_recipe_by_default(legacy: Path) -> None:
    from stage1.featstore.extract import ExtractConfig, resolve_defaults
    from stage1.featstore.store import Store

    with Store.open(legacy / "store.zarr") as store:
        recorded = Preprocessing.from_dict(store.provenance["preprocessing"])
        assert store.view_levels() is None and store.info()["view_levels"] is None
    cfg = resolve_defaults(ExtractConfig(images=".", backbone=".", out="."), recorded)
    assert (cfg.view_recipe, cfg.preprocess, tuple(cfg.view_levels)) == (recorded.views.recipe, "squash", recorded.views.levels)
    assert recorded.views.recipe == "validator-v1"
    fresh = resolve_defaults(ExtractConfig(images=".", backbone=".", out="."))
    assert (fresh.view_recipe, fresh.preprocess, tuple(fresh.view_levels)) == ("validator", "squash", (0, 1, 2, 3))
