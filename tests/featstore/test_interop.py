"""export-features (h5 | npy) and import-features (HDF5 / .npz / exported folder) round trips."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import featstore
from stage1.featstore.commands import export_features, import_features
from stage1.featstore.interop import import_features as import_file
from stage1._core.io import sha256_file
from stage1.featstore.store import StoreError, write_store


@pytest.fixture
def store(tmp_path: Path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(9, 2, 5)).astype(np.float16)
    return write_store(tmp_path / "src", feats, np.array([0, 1, -1, 0, 1, 0, 1, 0, 1]), [f"p/{i}.jpg" for i in range(9)],
                       provenance={"kind": "extracted", "feature": "cls", "backbone": {"weights_sha256": "abc"}}, chunk_rows=4)


def same_content(a, b) -> None:
    assert a.load_features(dtype=None).tobytes() == b.load_features(dtype=None).tobytes()
    assert a.labels.tolist() == b.labels.tolist() and a.ids.tolist() == b.ids.tolist()
    assert a.sha256.tolist() == b.sha256.tolist() and a.dtype == b.dtype


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_export_then_import_round_trip(store, tmp_path: Path, fmt: str) -> None:
    res = CliRunner().invoke(export_features, [str(store.path), "--format", fmt])
    assert res.exit_code == 0, res.output
    exported = tmp_path / f"src.{fmt}"
    assert exported.exists() and not list(tmp_path.rglob("*.partial"))
    res = CliRunner().invoke(import_features, [str(exported), "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    back = featstore.open_store(tmp_path / "back")
    same_content(store, back)
    prov = back.provenance
    assert prov["kind"] == "imported" and prov["source_format"] == fmt and prov["feature"] == "cls"
    assert prov["source_provenance"]["backbone"]["weights_sha256"] == "abc"
    assert prov["source_sha256"] == sha256_file(exported if fmt == "h5" else exported / "features.npy")


def test_exported_files_are_plain(store, tmp_path: Path) -> None:
    CliRunner().invoke(export_features, [str(store.path), "--format", "npy", "--out", str(tmp_path / "npy")])
    feats = np.load(tmp_path / "npy" / "features.npy", mmap_mode="r")
    assert feats.shape == (9, 2, 5) and feats.dtype == np.float16
    assert np.load(tmp_path / "npy" / "ids.npy", allow_pickle=False).tolist()[0] == "p/0.jpg"
    CliRunner().invoke(export_features, [str(store.path), "--format", "h5", "--out", str(tmp_path / "f.h5")])
    with h5py.File(tmp_path / "f.h5") as f:
        np.testing.assert_array_equal(f["features"][()], store.load_features(dtype=None))
        assert f["ids"].asstr()[0] == "p/0.jpg" and "provenance" in f.attrs


def test_import_npz_from_an_older_script(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(6, 7)).astype(np.float64)
    labels = np.array([0, 1, np.nan, 1, 0, 1])
    np.savez(tmp_path / "old.npz", features=feats, labels=labels)
    st = import_file(tmp_path / "old.npz", tmp_path / "s")
    assert (st.rows, st.views, st.dim, st.dtype) == (6, 1, 7, "float32")
    assert st.labels.tolist() == [0, 1, -1, 1, 0, 1] and st.ids.tolist()[0] == "row-000000"
    np.testing.assert_allclose(st.load_features()[:, 0], feats, rtol=1e-6)
    assert st.provenance["kind"] == "imported" and st.provenance["feature"] == "unknown"
    st16 = import_file(tmp_path / "old.npz", tmp_path / "s16", dtype="float16")
    assert st16.dtype == "float16"


def test_import_refuses_bad_files(tmp_path: Path) -> None:
    feats = np.zeros((3, 4), np.float32)
    np.savez(tmp_path / "nolabels.npz", features=feats)
    np.savez(tmp_path / "badlabels.npz", features=feats, labels=np.array([0, 2, 1]))
    np.savez(tmp_path / "short.npz", features=feats, labels=np.array([0, 1]))
    np.savez(tmp_path / "objids.npz", features=feats, labels=np.zeros(3), ids=np.array(["a", None, "c"], dtype=object))
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    cases = {
        "nolabels.npz": "no 'labels' array",
        "badlabels.npz": "labels must be 0, 1 or -1",
        "short.npz": "2 labels for 3 feature rows",
        "objids.npz": "without pickle",
        "x.csv": "unknown format",
        "junk.npz": "not a .npz",
        "junk.h5": "not a readable HDF5 file",
    }
    for name, fragment in cases.items():
        with pytest.raises(StoreError, match=fragment):
            import_file(tmp_path / name, tmp_path / f"out-{name}")
    res = CliRunner().invoke(import_features, [str(tmp_path / "badlabels.npz"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "labels must be 0, 1 or -1" in res.output
    res = CliRunner().invoke(import_features, [str(tmp_path / "badlabels.npz"), "--out", str(tmp_path / "o"), "--chunk-rows", "0"])
    assert res.exit_code == 2 and "--chunk-rows" in res.output
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["features"] = np.zeros((2, 3), np.int32)
        f["labels"] = np.zeros(2)
    with pytest.raises(StoreError, match="must be a float array"):
        import_file(tmp_path / "f.h5", tmp_path / "o2")


# -- the per-view arrays (view_levels, view_params) travel through export and import ----------------------
def _with_views(path: Path):
    rng = np.random.default_rng(3)
    n, v = 9, 3
    levels = rng.integers(-1, 4, (n, v)).astype(np.int8)
    params = rng.normal(size=(n, v, 2)).astype(np.float32)
    params[0, 0] = np.nan  # "not applicable" is NaN and must survive
    st = write_store(path, rng.normal(size=(n, v, 4)).astype(np.float32), np.arange(n) % 2, chunk_rows=4,
                     view_levels=levels, view_params=params, view_param_names=["angle", "scale"])
    return st, levels, params


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_view_arrays_round_trip(tmp_path: Path, fmt: str) -> None:
    st, levels, params = _with_views(tmp_path / "src")
    assert st.view_param_names == ["angle", "scale"]
    res = CliRunner().invoke(export_features, [str(st.path), "--format", fmt])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(import_features, [str(tmp_path / f"src.{fmt}"), "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    back = featstore.open_store(tmp_path / "back")
    np.testing.assert_array_equal(back.view_levels(), levels)
    np.testing.assert_array_equal(back.view_params(), params)  # NaN where NaN
    assert back.view_param_names == ["angle", "scale"]
    assert back.info()["view_levels"] == st.info()["view_levels"]
    same_content(st, back)


def test_exported_view_arrays_are_plain(tmp_path: Path) -> None:
    st, levels, params = _with_views(tmp_path / "src")
    CliRunner().invoke(export_features, [str(st.path), "--format", "npy", "--out", str(tmp_path / "npy")])
    assert np.load(tmp_path / "npy" / "view_levels.npy").tolist() == levels.tolist()
    assert np.load(tmp_path / "npy" / "view_param_names.npy").tolist() == ["angle", "scale"]
    CliRunner().invoke(export_features, [str(st.path), "--format", "h5", "--out", str(tmp_path / "f.h5")])
    with h5py.File(tmp_path / "f.h5") as f:
        np.testing.assert_array_equal(f["view_params"][()], params)
        assert f["view_levels"].dtype == np.int8 and f.attrs["view_param_names"] == '["angle", "scale"]'


def test_a_store_without_view_arrays_exports_none(store, tmp_path: Path) -> None:
    CliRunner().invoke(export_features, [str(store.path), "--format", "npy", "--out", str(tmp_path / "npy")])
    assert not list((tmp_path / "npy").glob("view_*"))
    back = import_file(tmp_path / "npy", tmp_path / "back")
    assert back.view_levels() is None and back.view_params() is None and back.view_param_names == []


def test_an_extracted_stores_view_arrays_round_trip(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from stage1.featstore.commands import extract
    from stage1.featstore.views import PARAM_NAMES

    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--backbone", str(tiny_backbone_dir),
                                       "--out", str(tmp_path / "s"), "--image-size", "32", "--views", "3",
                                       "--workers", "0", "--quiet", "--labels", str(image_folder / "labels.csv")])
    assert res.exit_code == 0, res.output
    st = featstore.open_store(tmp_path / "s")
    for fmt in ("h5", "npy"):
        out = tmp_path / f"x.{fmt}"
        assert CliRunner().invoke(export_features, [str(st.path), "--format", fmt, "--out", str(out)]).exit_code == 0
        back = import_file(out, tmp_path / f"back_{fmt}")
        np.testing.assert_array_equal(back.view_levels(), st.view_levels())
        np.testing.assert_array_equal(back.view_params(), st.view_params())
        assert back.view_param_names == list(PARAM_NAMES) == st.view_param_names


@pytest.mark.parametrize("arrays, match", [
    ({"view_levels": np.zeros((4, 1), np.int8)}, "come together"),
    ({"view_levels": np.full((4, 1), 7, np.int8), "view_params": np.zeros((4, 1, 1), np.float32),
      "view_param_names": np.array(["a"])}, "view_levels must be integers in -1..3"),
    ({"view_levels": np.zeros((4, 1), np.int8), "view_params": np.zeros((4, 1, 2), np.float32),
      "view_param_names": np.array(["a"])}, "view_params must be floats of shape"),
])
def test_bad_view_arrays_are_refused_naming_the_file(tmp_path: Path, arrays, match: str) -> None:
    np.savez(tmp_path / "f.npz", features=np.ones((4, 3), np.float32), labels=np.zeros(4), **arrays)
    with pytest.raises(StoreError, match=rf"f\.npz: .*{match}"):
        import_file(tmp_path / "f.npz", tmp_path / "st")
