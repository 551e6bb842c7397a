"""The Zarr store: write_store round trip, fast chunk reads, commit marker, locks, sweeps, provenance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from click.testing import CliRunner

from stage1 import cli, featstore
from stage1.featstore.store import ProvenanceMismatch, Store, StoreBusy, StoreError, provenance_differences, write_store


def synthetic(n: int = 11, v: int = 2, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, v, d)).astype(np.float32), rng.integers(-1, 2, size=n)


def test_write_store_round_trip(tmp_path: Path) -> None:
    feats, labels = synthetic()
    ids = [f"dir/img {i}.jpg" for i in range(11)]
    st = write_store(tmp_path / "s", feats, labels, ids, provenance={"kind": "arrays", "note": "x"}, chunk_rows=4)
    st = featstore.open_store(tmp_path / "s")
    assert (st.rows, st.views, st.dim, st.dtype, st.chunk_rows) == (11, 2, 6, "float32", 4)
    assert st.ids.tolist() == ids and st.ids.dtype.kind == "U"
    assert st.labels.tolist() == labels.tolist() and st.labels.dtype == np.int8
    assert st.sha256.dtype.kind == "U" and len(set(st.sha256)) == 11  # default: hash of each row's features
    np.testing.assert_array_equal(st.load_features(), feats)
    assert st.provenance == {"kind": "arrays", "note": "x"} and st.complete and st.quarantined == []
    # the group is plain Zarr v3 that zarr itself reads, with the stable array and attribute names
    import zarr

    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    np.testing.assert_array_equal(g["features"][:], feats)
    assert g["labels"].shape == (11,) and g["ids"].shape == (11,) and g["sha256"].shape == (11,)
    assert g.attrs["n_committed"] == 11 and g["features"].metadata.codecs[0].__class__.__name__ == "BytesCodec"


def test_two_dim_input_float16_kept_and_info_keys(tmp_path: Path) -> None:
    x = np.arange(30, dtype=np.float16).reshape(10, 3)
    st = write_store(tmp_path / "s", x, np.zeros(10, int))
    assert st.views == 1 and st.dtype == "float16"
    assert st.load_features().dtype == np.float32 and st.load_features(dtype=None).dtype == np.float16
    np.testing.assert_array_equal(st.load_features()[:, 0], x.astype(np.float32))
    info = st.info()
    for key in ("rows", "committed", "dim", "views", "dtype", "provenance", "quarantined"):
        assert key in info
    assert info["rows"] == 10 and info["labels"] == {"0": 10, "1": 0, "unlabelled": 0}
    json.dumps(info)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.integers(0, 10), max_size=30),
    view=st.one_of(st.none(), st.integers(0, 1), st.lists(st.integers(0, 1), min_size=1, max_size=3)),
    start=st.integers(0, 11),
    stop=st.integers(0, 11),
)
def test_load_features_matches_numpy_indexing(tmp_path_factory, rows, view, start, stop) -> None:
    path = tmp_path_factory.getbasetemp() / "hyp_store"
    feats, labels = synthetic()
    if not (path / "zarr.json").exists():
        write_store(path, feats, labels, chunk_rows=3)
    st = Store.open(path)

    def pick(x: np.ndarray) -> np.ndarray:
        return x if view is None else x[:, np.atleast_1d(view)]

    np.testing.assert_array_equal(st.load_features(rows, views=view), pick(feats[rows]))
    np.testing.assert_array_equal(st.load_features(slice(start, stop), views=view), pick(feats[start:stop]))


def test_out_of_range_and_bad_inputs(tmp_path: Path) -> None:
    feats, labels = synthetic()
    st = write_store(tmp_path / "s", feats, labels)
    with pytest.raises(IndexError, match="row index out of range"):
        st.load_features([11])
    with pytest.raises(IndexError, match="view"):
        st.load_features(views=2)
    with pytest.raises(StoreError, match="labels must be 0, 1 or -1"):
        write_store(tmp_path / "b1", feats, np.full(11, 2))
    with pytest.raises(StoreError, match="labels has 3 entries"):
        write_store(tmp_path / "b2", feats, [0, 1, 0])
    bad = feats.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(StoreError, match="finite"):
        write_store(tmp_path / "b3", bad, labels)
    with pytest.raises(StoreError, match="exists and is not empty"):
        write_store(tmp_path / "s", feats, labels)
    write_store(tmp_path / "s", feats[:2], labels[:2], overwrite=True)
    assert Store.open(tmp_path / "s").rows == 2
    with pytest.raises(StoreError, match="not a feature store"):
        Store.open(tmp_path / "nothing")


def test_commit_marker_bounds_what_readers_see(tmp_path: Path) -> None:
    feats, labels = synthetic(n=10)
    st = Store.create(tmp_path / "s", 10, 2, 6, {"kind": "arrays"}, dtype="float32", chunk_rows=4)
    st.write_block(0, feats[:4], labels[:4], list("abcd"), ["h"] * 4)
    st.write_block(4, feats[4:8], labels[4:8], list("efgh"), ["h"] * 4)  # written, not committed
    st.commit(4, n_consumed=4)
    reader = Store.open(tmp_path / "s")
    assert reader.rows == 4 and reader.ids.tolist() == list("abcd") and not reader.complete
    np.testing.assert_array_equal(reader.load_features(), feats[:4])
    with pytest.raises(StoreError, match="not a multiple of chunk_rows"):
        st.write_block(5, feats[:1], labels[:1], ["x"], ["h"])
    with pytest.raises(StoreError, match="read-only"):
        reader.commit(8)
    st.commit(8, n_consumed=8)
    st.write_block(8, feats[8:], labels[8:], list("ij"), ["h"] * 2)
    st.commit(10, n_consumed=10)
    st.finalize()
    st.close()
    done = Store.open(tmp_path / "s")
    assert done.rows == 10 and done.complete and done.group["features"].shape == (10, 2, 6)
    np.testing.assert_array_equal(done.load_features(), feats)


def test_writer_lock_and_partial_sweep(tmp_path: Path) -> None:
    feats, labels = synthetic()
    write_store(tmp_path / "s", feats, labels, chunk_rows=4)
    stale = tmp_path / "s" / "features" / "c" / "0.deadbeef.partial"
    stale.write_bytes(b"junk")
    Store.open(tmp_path / "s")  # readers never sweep: a live writer may own the temp file
    assert stale.exists()
    with Store.open(tmp_path / "s", mode="r+") as writer:
        assert not stale.exists()
        with pytest.raises(StoreBusy, match="another process is writing"):
            Store.open(tmp_path / "s", mode="r+")
    Store.open(tmp_path / "s", mode="r+").close()  # released on close


def test_provenance_differences_name_the_attribute(tmp_path: Path) -> None:
    a = {"kind": "extracted", "backbone": {"path": "/a", "weights_sha256": "x"}, "preprocessing": {"size": 224}}
    b = {"kind": "extracted", "backbone": {"path": "/b", "weights_sha256": "y"}, "preprocessing": {"size": 224}}
    assert provenance_differences(a, a) == []
    assert provenance_differences(a, {**a, "backbone": {**a["backbone"], "path": "/moved"}}) == []  # paths are informational
    assert provenance_differences(a, b) == [("backbone.weights_sha256", "x", "y")]
    feats, labels = synthetic()
    st = write_store(tmp_path / "s", feats, labels, provenance=a)
    with pytest.raises(ProvenanceMismatch, match="'backbone.weights_sha256' differs"):
        st.check_provenance(b)
    with pytest.raises(ProvenanceMismatch, match="'preprocessing.views' differs"):
        st.check_provenance({**a, "preprocessing": {"size": 224, "views": 3}})


def test_fast_path_equals_zarr_fallback(tmp_path: Path, monkeypatch) -> None:
    feats, labels = synthetic(n=23, v=3, d=5)
    st = write_store(tmp_path / "s", feats.astype(np.float16), labels, chunk_rows=5)
    fast = st.load_features(rows=[22, 0, 7, 7, 13])
    monkeypatch.setattr(Store, "_raw_chunks_ok", lambda self: False)
    slow = st.load_features(rows=[22, 0, 7, 7, 13])
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(st.load_features(views=1), feats.astype(np.float16)[:, 1:2].astype(np.float32))


def _foreign_store(path: Path, feats: np.ndarray, labels: np.ndarray, **features_codecs) -> Path:
    """A schema-1 store as another tool might write it: same arrays and attributes, other codecs."""
    import zarr

    n = len(feats)
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("features", shape=feats.shape, chunks=(4,) + feats.shape[1:], dtype=feats.dtype, fill_value=0,
                   **features_codecs)[:] = feats
    g.create_array("labels", shape=(n,), chunks=(4,), dtype="int8", fill_value=-1)[:] = labels
    g.create_array("ids", shape=(n,), chunks=(4,), dtype=str)[:] = np.array([f"r{i}" for i in range(n)])
    g.create_array("sha256", shape=(n,), chunks=(4,), dtype=str)[:] = np.array(["h"] * n)
    g.update_attributes({"schema_version": 1, "n_committed": n, "complete": True, "provenance": {"kind": "arrays"}})
    return path


@pytest.mark.parametrize("codecs, raw", [
    ({"compressors": None}, True),
    ({"compressors": None, "serializer": "big"}, False),  # byte order other than this machine's
    ({"compressors": "zstd"}, False),
    ({"compressors": None, "filters": "transpose"}, False),
])
def test_chunk_reader_detects_plain_chunks_by_codec_class(tmp_path: Path, codecs: dict, raw: bool) -> None:
    """The raw reader is used only for a lone BytesCodec in native order; everything else reads through zarr."""
    import sys

    from zarr.codecs import BytesCodec, TransposeCodec, ZstdCodec

    from stage1.featstore.chunks import raw_readable

    kwargs = dict(codecs)
    if kwargs.get("serializer") == "big":
        kwargs["serializer"] = BytesCodec(endian="big" if sys.byteorder == "little" else "little")
    if kwargs.get("compressors") == "zstd":
        kwargs["compressors"] = ZstdCodec(level=1)
    if kwargs.get("filters") == "transpose":
        kwargs["filters"] = TransposeCodec(order=(0, 2, 1))
    feats, labels = synthetic(n=10, v=2, d=3)
    st = Store.open(_foreign_store(tmp_path / "s", feats, labels, **kwargs))
    assert raw_readable(st.group["features"]) is raw and st._raw_chunks_ok() is raw
    np.testing.assert_array_equal(st.load_features(), feats)
    np.testing.assert_array_equal(st.load_features(rows=[9, 0, 4, 4], views=1), feats[[9, 0, 4, 4]][:, 1:2])


def test_chunk_reader_checks_codec_type_not_name() -> None:
    """A foreign class that happens to be called BytesCodec is not trusted; chunks split along D are refused."""
    from types import SimpleNamespace

    from zarr.codecs import BytesCodec

    from stage1.featstore.chunks import raw_readable

    class LittleEndianBytes(BytesCodec):  # a subclass is still zarr's plain byte layout
        pass

    def fake(codec: object, chunks: tuple = (4, 2, 3)) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(codecs=(codec,)), dtype=np.dtype("float32"),
                               chunks=chunks, shape=(10, 2, 3))

    impostor = type("BytesCodec", (), {"endian": BytesCodec().endian})()
    assert raw_readable(fake(BytesCodec()))
    assert raw_readable(fake(LittleEndianBytes()))
    assert not raw_readable(fake(impostor))
    assert not raw_readable(fake(BytesCodec(), chunks=(4, 2, 1)))


# -- "Trust nothing on disk": missing / short chunks, edited n_committed, failed fsync ------------------
def _edit_attrs(store: Path, **changes) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].update(changes)
    (store / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("victim", ["features/c/1/0/0", "labels/c/1", "ids/c/2", "sha256/c/0"])
def test_deleted_chunk_file_is_refused_at_open(tmp_path: Path, victim: str) -> None:
    feats, labels = synthetic(n=10)
    write_store(tmp_path / "s", feats, labels, chunk_rows=4)
    (tmp_path / "s" / victim).unlink()
    with pytest.raises(StoreError, match=r"chunk file of '\w+' \(rows \d+-\d+\) is missing"):
        Store.open(tmp_path / "s")


def test_all_fill_chunks_are_written_so_absence_is_damage(tmp_path: Path) -> None:
    # unlabelled rows (-1) and zero features equal the fill values: zarr would skip those files
    write_store(tmp_path / "s", np.zeros((6, 1, 3), np.float32), np.full(6, -1), chunk_rows=4)
    st = Store.open(tmp_path / "s")
    assert st.rows == 6 and st.labels.tolist() == [-1] * 6
    assert (tmp_path / "s" / "labels" / "c" / "1").is_file() and (tmp_path / "s" / "features" / "c" / "0" / "0" / "0").is_file()


def test_short_chunk_is_refused_and_verify_rehashes(tmp_path: Path) -> None:
    feats, labels = synthetic(n=10)
    write_store(tmp_path / "s", feats, labels, chunk_rows=4)
    assert Store.open(tmp_path / "s").verify() == {"files": 12, "hashed": True}
    chunk = tmp_path / "s" / "features" / "c" / "1" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-4])
    with pytest.raises(StoreError, match="has 188 bytes, expected 192"):
        Store.open(tmp_path / "s")
    chunk.write_bytes(data[:-4] + b"\0\0\0\0")  # same size, other bytes: only the hash sees it
    with pytest.raises(StoreError, match=r"features/c/1/0/0: chunk file of 'features' .*sha256"):
        Store.open(tmp_path / "s").verify()
    res = CliRunner().invoke(cli.main, ["info", str(tmp_path / "s"), "--verify"])
    assert res.exit_code == 1 and "sha256" in res.output and "Traceback" not in res.output


def test_info_verify_ok_and_legacy_store_says_not_recorded(tmp_path: Path) -> None:
    feats, labels = synthetic(n=10)
    write_store(tmp_path / "s", feats, labels, chunk_rows=4)
    res = CliRunner().invoke(cli.main, ["info", str(tmp_path / "s"), "--verify"])
    assert res.exit_code == 0 and "verified 12 chunk files" in res.output
    legacy = Path(__file__).parents[1] / "data" / "legacy_v0_1" / "store.zarr"
    res = CliRunner().invoke(cli.main, ["info", str(legacy), "--verify"])
    assert res.exit_code == 0 and "no chunk checksums recorded" in res.output


def test_legacy_store_missing_features_chunk_is_refused(tmp_path: Path) -> None:
    import shutil

    legacy = Path(__file__).parents[1] / "data" / "legacy_v0_1" / "store.zarr"
    shutil.copytree(legacy, tmp_path / "s")
    assert Store.open(tmp_path / "s").rows == 48
    (tmp_path / "s" / "features" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreError, match="is missing"):
        Store.open(tmp_path / "s")


@pytest.mark.parametrize("value, match", [
    (1000, "n_committed is 1000 but the features array has 10 rows"),
    (6, "marked complete with n_committed 6"),
    (-5, "n_committed is -5"),
    ("7", "not a row count"),
    (True, "not a row count"),
])
def test_edited_n_committed_is_refused(tmp_path: Path, value, match: str) -> None:
    feats, labels = synthetic(n=10)
    write_store(tmp_path / "s", feats, labels, chunk_rows=4)
    _edit_attrs(tmp_path / "s", n_committed=value)
    with pytest.raises(StoreError, match=match):
        Store.open(tmp_path / "s")
    with pytest.raises(StoreError, match=match):
        Store.open(tmp_path / "s", mode="r+")


def test_edited_n_committed_of_an_incomplete_store_is_refused(tmp_path: Path) -> None:
    feats, labels = synthetic(n=10)
    st = Store.create(tmp_path / "s", 10, 2, 6, {"kind": "arrays"}, dtype="float32", chunk_rows=4)
    st.write_block(0, feats[:4], labels[:4], list("abcd"), ["h"] * 4)
    st.commit(4, n_consumed=4)
    st.close()
    for value, match in ((8, r"needs row-chunks 0\.\.1"), (3, "committed chunks hold 4 rows")):
        _edit_attrs(tmp_path / "s", n_committed=value)
        with pytest.raises(StoreError, match=match):  # a resume would write after a hole / over rows
            Store.open(tmp_path / "s", mode="r+")
    _edit_attrs(tmp_path / "s", n_committed=4)
    assert Store.open(tmp_path / "s", mode="r+").rows == 4


def test_failed_fsync_fails_the_commit(tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    from stage1.featstore import durability
    from stage1.featstore.errors import NotDurable

    feats, labels = synthetic(n=8)
    st = Store.create(tmp_path / "s", 8, 2, 6, {"kind": "arrays"}, dtype="float32", chunk_rows=4)
    st.write_block(0, feats[:4], labels[:4], list("abcd"), ["h"] * 4)
    st.commit(4)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(durability.os, "fsync", broken)
    with pytest.raises(NotDurable, match="fsync failed.*Input/output error"):
        st.write_block(4, feats[4:], labels[4:], list("efgh"), ["h"] * 4)
    with pytest.raises(NotDurable, match="fsync failed"):
        st.commit(4)
    monkeypatch.undo()
    st.close()
    assert Store.open(tmp_path / "s").rows == 4
