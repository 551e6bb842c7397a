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
