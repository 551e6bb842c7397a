"""Hostile files on disk for the feature store: FIFOs, oversized files, a lock kept by orphans,
an interrupted store creation, files skipped by the folder scan, identical images labelled twice."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import IMAGE_NAMES
from stage1 import featstore
from stage1.featstore.commands import extract
from stage1.featstore.durability import WriterLock
from stage1.featstore.errors import StoreBusy, StoreError
from stage1.featstore.extract import label_conflicts
from stage1.featstore.images import BadImage, read_bytes
from stage1.featstore.store import Store, is_created, unfinished_creation

FAST = ["--image-size", "32", "--batch-size", "3", "--chunk-rows", "4", "--threads", "1", "--quiet", "--workers", "0"]
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
#: A hang guard: every command that might block on a FIFO runs in a child with this timeout.
GUARD_S = 120


def _python(code: str, timeout: float = GUARD_S, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def _extract_cli(images: Path, backbone: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`stage1 extract` in a child process (a FIFO must never hang the test run)."""
    args = [sys.executable, "-m", "stage1", "extract", "--images", str(images), "--backbone", str(backbone),
            "--out", str(out), *FAST, *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=GUARD_S)


# ---------------------------------------------------------------- item 12: FIFOs, size cap, lock owner
@needs_fifo
def test_read_bytes_refuses_a_fifo_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    res = _python(f"""
        from stage1.featstore.images import BadImage, read_bytes
        try:
            read_bytes({str(fifo)!r})
        except BadImage as exc:
            print("REASON", exc.reason, "|", exc)
        """, timeout=30)
    assert "REASON not a regular file" in res.stdout and "FIFO" in res.stdout, res.stdout + res.stderr


def test_read_bytes_caps_the_size(tmp_path: Path) -> None:
    f = tmp_path / "big.png"
    f.write_bytes(b"x" * 100)
    assert read_bytes(f, max_bytes=100) == b"x" * 100
    with pytest.raises(BadImage) as exc:
        read_bytes(f, max_bytes=99)
    assert exc.value.reason == "too large" and "99" in str(exc.value)
    assert read_bytes(f, max_bytes=None) == b"x" * 100


@needs_fifo
def test_extract_quarantines_a_fifo_listed_in_labels(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    os.mkfifo(image_folder / "pipe.png")
    with open(image_folder / "labels.csv", "a") as fh:
        fh.write("pipe.png,1\n")
    out = tmp_path / "s"
    res = _extract_cli(image_folder, tiny_backbone_dir, out, "--labels", str(image_folder / "labels.csv"))
    assert res.returncode == 0, res.stdout + res.stderr
    st = featstore.open_store(out)
    assert st.rows == len(IMAGE_NAMES)
    assert [(q["path"], q["reason"]) for q in st.quarantined] == [("pipe.png", "not a regular file")]


def test_extract_max_bytes_quarantines_and_is_recorded(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    labels = ["--labels", str(image_folder / "labels.csv")]
    big = max(IMAGE_NAMES, key=lambda n: (image_folder / n).stat().st_size)
    cap = (image_folder / big).stat().st_size - 1
    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--backbone", str(tiny_backbone_dir),
                                       "--out", str(tmp_path / "s"), *FAST, *labels, "--max-bytes", str(cap)])
    assert res.exit_code == 0, res.output
    st = featstore.open_store(tmp_path / "s")
    assert st.provenance["max_bytes"] == cap
    assert {q["reason"] for q in st.quarantined} == {"too large"} and big in {q["path"] for q in st.quarantined}
    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--backbone", str(tiny_backbone_dir),
                                       "--out", str(tmp_path / "t"), *FAST, *labels, "--max-bytes", "10"])
    assert res.exit_code == 1 and "too large" in res.output and "--max-bytes" in res.output, res.output
    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--backbone", str(tiny_backbone_dir),
                                       "--out", str(tmp_path / "u"), *FAST, *labels, "--max-bytes", "0"])
    assert res.exit_code == 2 and "--max-bytes" in res.output


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_the_store_lock_dies_with_its_owner_not_with_a_forked_child(tmp_path: Path) -> None:
    """The writer forks a worker (as a DataLoader does) and is killed with -9; the orphan must not keep the lock."""
    root = tmp_path / "store"
    root.mkdir()
    code = f"""
        import os, signal, sys, time
        from pathlib import Path
        from stage1.featstore.durability import WriterLock
        lock = WriterLock(Path({str(root)!r}))
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)  # the test waits for the owner's output only
            time.sleep(60)
            os._exit(0)
        print(pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    res = _python(code, timeout=30)
    child = int(res.stdout.split()[0])
    try:
        os.kill(child, 0)  # the orphan lives on
        lock = WriterLock(root)  # ... and yet the lock is free
        lock.release()
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_store_lock_still_excludes_a_second_writer(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    lock = WriterLock(root)
    try:
        res = _python(f"""
            from pathlib import Path
            from stage1.featstore.durability import WriterLock
            from stage1.featstore.errors import StoreBusy
            try:
                WriterLock(Path({str(root)!r}))
            except StoreBusy:
                print("BUSY")
            """, timeout=30)
        assert "BUSY" in res.stdout, res.stdout + res.stderr
    finally:
        lock.release()


# ---------------------------------------------------------------- item 15: a kill during store creation
def _killed_creation(out: Path) -> None:
    """Run Store.create in a child that is killed with -9 just before the attributes are written."""
    res = _python(f"""
        import os, signal, zarr
        from stage1.featstore.store import Store
        zarr.Group.update_attributes = lambda self, *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        Store.create({str(out)!r}, 5, 1, 4, {{"kind": "arrays"}}, with_split=True, view_param_names=["a"])
        """, timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert (out / "zarr.json").exists() and not is_created(out) and unfinished_creation(out)


def test_a_store_creation_killed_midway_is_started_again(tmp_path: Path) -> None:
    out = tmp_path / "s"
    _killed_creation(out)
    with pytest.raises(StoreError, match="interrupted"):
        Store.open(out)
    st = Store.create(out, 3, 1, 4, {"kind": "arrays"})
    try:
        assert st.rows == 0 and is_created(out)
    finally:
        st.close()


def test_extract_resumes_over_a_killed_creation(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    _killed_creation(out)
    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--backbone", str(tiny_backbone_dir),
                                       "--out", str(out), *FAST, "--labels", str(image_folder / "labels.csv")])
    assert res.exit_code == 0, res.output
    assert featstore.open_store(out).rows == len(IMAGE_NAMES)


def test_a_store_with_rows_is_never_taken_for_an_unfinished_creation(tmp_path: Path) -> None:
    from stage1.featstore.store import write_store

    out = tmp_path / "s"
    write_store(out, np.ones((4, 3), np.float32), [0, 1, 0, 1]).close()
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"] = {}
    (out / "zarr.json").write_text(json.dumps(meta))  # attributes lost: rows are still on disk
    assert not unfinished_creation(out)
    with pytest.raises(StoreError, match="not empty"):
        Store.create(out, 4, 1, 3, {"kind": "arrays"})
    (out / "notes.txt").write_text("mine")
    shutil.rmtree(out / "features" / "c")
    assert not unfinished_creation(out)  # a file create never writes: not ours to delete


def test_a_creation_in_progress_is_not_cleared(tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    zarr.open_group(str(out), mode="a", zarr_format=3)
    lock = WriterLock(out)  # its creator is alive
    try:
        with pytest.raises(StoreBusy):
            Store.create(out, 3, 1, 4, {"kind": "arrays"})
    finally:
        lock.release()


# ---------------------------------------------------------------- item 17: silent skips, conflicting labels
def test_the_folder_scan_reports_what_it_skips(image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    (image_folder / "labels.csv").unlink()
    shutil.copy(image_folder / IMAGE_NAMES[0], image_folder / "photo.heic")  # image bytes, other suffix
    (image_folder / "notes.txt").write_text("x")
    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--backbone", str(tiny_backbone_dir),
                                       "--out", str(tmp_path / "s"), *FAST])
    assert res.exit_code == 0, res.output
    assert "skipped 2 file(s)" in res.output and "'photo.heic'" in res.output and "'notes.txt'" in res.output
    assert featstore.open_store(tmp_path / "s").rows == len(IMAGE_NAMES)


def test_identical_images_with_conflicting_labels_are_named(image_folder: Path, tiny_backbone_dir: Path,
                                                            tmp_path: Path) -> None:
    shutil.copy(image_folder / IMAGE_NAMES[0], image_folder / "copy.png")  # IMAGE_NAMES[0] is labelled 0
    with open(image_folder / "labels.csv", "a") as fh:
        fh.write("copy.png,1\n")
    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--backbone", str(tiny_backbone_dir),
                                       "--out", str(tmp_path / "s"), *FAST, "--labels", str(image_folder / "labels.csv")])
    assert res.exit_code == 0, res.output
    assert "conflicting labels" in res.output and repr(IMAGE_NAMES[0]) in res.output and "'copy.png'" in res.output


def test_label_conflicts_ignores_agreeing_and_unlabelled_duplicates() -> None:
    ids, sha = ["a", "b", "c", "d", "e"], ["h1", "h1", "h2", "h2", "h2"]
    assert label_conflicts(ids, sha, [0, 0, -1, 1, 1]) == []
    lines = label_conflicts(ids, sha, [0, 1, 1, 0, 0])
    assert len(lines) == 2 and "'a'" in lines[0] and "'b'" in lines[0] and "'c'" in lines[1] and "'d'" in lines[1]


# ---------------------------------------------------------------- item 13: bad metadata, D = 0, pickle weights
def _small_store(path: Path, n: int = 4):
    from stage1.featstore.store import write_store

    write_store(path, np.arange(n * 3, dtype=np.float32).reshape(n, 1, 3), [i % 2 for i in range(n)]).close()
    return path


def _edit_attrs(path: Path, **attrs) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"].update(attrs)
    (path / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, needle", [
    (lambda p: _edit_attrs(p, provenance="hello"), "attribute provenance is 'hello', not an object"),
    (lambda p: _edit_attrs(p, provenance=None), "attribute provenance is None"),
    (lambda p: _edit_attrs(p, provenance=[1]), "attribute provenance is [1]"),
    (lambda p: _edit_attrs(p, quarantined="x"), "attribute quarantined"),
    (lambda p: _edit_attrs(p, quarantined=[{"path": 3}]), "attribute quarantined holds"),
    (lambda p: _edit_attrs(p, complete="yes"), "attribute complete"),
    (lambda p: (p / "zarr.json").write_text("{garbage"), "zarr.json: not valid JSON"),
    (lambda p: (p / "zarr.json").write_text(""), "zarr.json: not valid JSON"),
    (lambda p: (p / "zarr.json").write_bytes(b"\xff\xfe\x00"), "zarr.json: not UTF-8"),
    (lambda p: (p / "zarr.json").write_text("[1, 2]"), "holds a JSON list"),
    (lambda p: (p / "zarr.json").write_text('{"attributes": "x"}'), "'attributes' is a JSON str"),
    (lambda p: (p / "labels" / "zarr.json").write_text("[1,"), "labels/zarr.json: not valid JSON"),
    (lambda p: _edit_array(p, "features", shape="x"), "features/zarr.json: zarr cannot read"),
    (lambda p: _edit_array(p, "features", data_type="bogus"), "features/zarr.json: zarr cannot read"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_info_on_bad_metadata_is_one_line(tmp_path: Path, damage, needle: str, as_json: bool) -> None:
    from stage1.featstore.commands import info

    st = _small_store(tmp_path / "s")
    assert CliRunner().invoke(info, [str(st)]).exit_code == 0  # as written: fine
    damage(st)
    res = CliRunner().invoke(info, [str(st), *(["--json"] if as_json else [])])
    assert res.exit_code == 1 and needle in res.output, res.output
    assert isinstance(res.exception, SystemExit) and len(res.output.strip().splitlines()) == 1
    assert "restore it from a backup or re-extract" in res.output


def _edit_array(path: Path, name: str, **meta) -> None:
    f = path / name / "zarr.json"
    doc = json.loads(f.read_text())
    doc.update(meta)
    f.write_text(json.dumps(doc))


def test_info_shows_a_store_whose_nested_provenance_is_odd(tmp_path: Path) -> None:
    """Nested values of the wrong type (a hand-edited backbone entry) are shown as absent, never a traceback."""
    from stage1.featstore.commands import info

    st = _small_store(tmp_path / "s")
    _edit_attrs(st, provenance={"kind": "arrays", "backbone": "x", "preprocessing": [1]})
    res = CliRunner().invoke(info, [str(st)])
    assert res.exit_code == 0 and "kind         arrays" in res.output, res.output


@pytest.mark.parametrize("shape", [(4, 0), (4, 2, 0), (4, 0, 3), (0, 3)])
def test_import_refuses_empty_dimensions(tmp_path: Path, shape: tuple[int, ...]) -> None:
    from stage1.featstore.commands import import_features

    f = tmp_path / "f.npz"
    np.savez(f, features=np.ones(shape, np.float32), labels=np.zeros(shape[0]))
    res = CliRunner().invoke(import_features, [str(f), "--out", str(tmp_path / "st")])
    assert res.exit_code == 1 and "f.npz" in res.output and f"{shape}" in res.output, res.output
    assert "D >= 1" in res.output and isinstance(res.exception, SystemExit)
    assert not (tmp_path / "st").exists()


def test_non_finite_features_name_the_rows(tmp_path: Path) -> None:
    from stage1.featstore.commands import import_features
    from stage1.featstore.store import write_store

    feats = np.ones((40, 3), np.float32)
    feats[2, 1], feats[30, 0] = np.nan, np.inf
    np.savez(tmp_path / "f.npz", features=feats, labels=np.zeros(40))
    res = CliRunner().invoke(import_features, [str(tmp_path / "f.npz"), "--out", str(tmp_path / "st")])
    assert res.exit_code == 1 and "f.npz: features must be finite" in res.output and "2 row(s) (2, 30)" in res.output
    with pytest.raises(StoreError, match=r"features must be finite: 2 row\(s\) \(2, 30\)"):
        write_store(tmp_path / "w", feats, np.zeros(40))


def _pickle_backbone(src: Path, dst: Path, how: str) -> Path:
    import pickle

    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    if how == "bin":
        (dst / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    elif how == "renamed":
        (dst / "model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    else:  # a torch.save zip archive under the safetensors name
        import torch

        torch.save({"w": torch.zeros(2)}, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("how, needle", [("bin", "pytorch_model.bin: a pickle weights file"),
                                         ("renamed", "model.safetensors: not a safetensors file (a pickle)"),
                                         ("zip", "model.safetensors: not a safetensors file (a zip")])
def test_a_pickle_weights_file_is_refused_and_never_unpickled(image_folder: Path, tiny_backbone_dir: Path,
                                                              tmp_path: Path, monkeypatch, how: str, needle: str) -> None:
    import pickle

    import torch

    def never(*_a, **_k):
        raise AssertionError("a weights file was unpickled")

    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    monkeypatch.setattr(torch, "load", never)
    bb = _pickle_backbone(tiny_backbone_dir, tmp_path / "bb", how)
    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--backbone", str(bb),
                                       "--out", str(tmp_path / "s"), *FAST])
    assert res.exit_code == 1 and needle in res.output and "never unpickles" in res.output, res.output
    assert isinstance(res.exception, SystemExit) and not (tmp_path / "s").exists()


# ---------------------------------------------------------------- item 16: ENOSPC, headers, split conflicts
@pytest.mark.parametrize("errno_name, needle", [("ENOSPC", "free space on that disk or pick another --out"),
                                                ("EROFS", "pick another --out on a writable disk")])
def test_a_full_disk_during_extract_names_the_store_and_keeps_committed_rows(
        image_folder: Path, tiny_backbone_dir: Path, tmp_path: Path, monkeypatch, errno_name: str, needle: str) -> None:
    import errno

    import zarr.storage._local as local

    real_put = local._put
    writes = {"n": 0}

    def put(path, value, *args, **kwargs):  # zarr's private _put: its signature varies by release
        if "/features/c/" in str(path).replace(os.sep, "/"):
            writes["n"] += 1
            if writes["n"] > 1:  # the first chunk lands, the second meets a full disk
                raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), str(path))
        return real_put(path, value, *args, **kwargs)

    monkeypatch.setattr(local, "_put", put)
    out = tmp_path / "s"
    args = ["--images", str(image_folder), "--backbone", str(tiny_backbone_dir), "--out", str(out), *FAST,
            "--labels", str(image_folder / "labels.csv")]
    res = CliRunner().invoke(extract, args)
    assert res.exit_code == 1 and f"{out}: the disk holding the store" in res.output and needle in res.output, res.output
    assert "4 rows are committed and kept" in res.output and isinstance(res.exception, SystemExit)
    assert featstore.open_store(out).rows == 4  # nothing already written is lost
    monkeypatch.setattr(local, "_put", real_put)
    res = CliRunner().invoke(extract, args)  # disk freed: the same command resumes
    assert res.exit_code == 0, res.output
    assert featstore.open_store(out).rows == len(IMAGE_NAMES)


@pytest.mark.parametrize("header", ["filename,target", "img,class_id", "file,y"])
def test_an_unknown_header_is_reported_as_a_header(tmp_path: Path, header: str) -> None:
    from stage1.featstore.labels import LabelsError, parse_labels_csv

    f = tmp_path / "l.csv"
    f.write_text(f"{header}\na.jpg,1\n")
    with pytest.raises(LabelsError, match=r"line 1: header .* is not recognised; name the columns path,label"):
        parse_labels_csv(f)
    f.write_text("a.jpg,yes\n")  # a data row with a bad label is still a bad label
    with pytest.raises(LabelsError, match="label 'yes' is not 0, 1 or empty"):
        parse_labels_csv(f)


def test_a_split_conflict_names_the_csv_path_and_lines(image_folder: Path, tiny_backbone_dir: Path,
                                                       tmp_path: Path) -> None:
    from stage1.featstore.commands import split

    shutil.copy(image_folder / IMAGE_NAMES[0], image_folder / "copy.jpg")
    lines = ["path,label,split"] + [f"{n},{i % 2},{'test' if i == 0 else ''}" for i, n in enumerate(IMAGE_NAMES)]
    lines.append("copy.jpg,0,train")  # the same bytes as line 2, in another split
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(extract, ["--images", str(image_folder), "--backbone", str(tiny_backbone_dir),
                                       "--out", str(tmp_path / "s"), *FAST, "--labels", str(csv_path)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(split, [str(tmp_path / "s")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"{csv_path.resolve()} line 2 ({IMAGE_NAMES[0]!r})" in res.output
    assert f"{csv_path.resolve()} line 10 ('copy.jpg')" in res.output and "both test and train" in res.output
    assert "row 1" not in res.output
    csv_path.unlink()  # the CSV is gone: the message falls back to the store's rows and image paths
    res = CliRunner().invoke(split, [str(tmp_path / "s")])
    assert res.exit_code == 1 and "row 8 ('copy.jpg')" in res.output and "both test and train" in res.output


# ---------------------------------------------------------------- splits: label conflicts, store facts
def _conflicted_store(path: Path) -> Path:
    from stage1.featstore.store import write_store

    feats = np.arange(24, dtype=np.float32).reshape(6, 1, 4)
    write_store(path, feats, [0, 1, 1, 0, 1, 0], ids=[f"{c}.jpg" for c in "abcdef"],
                sha256=["h1", "h1", "h2", "h3", "h3", "h4"]).close()
    return path


def test_split_warns_about_identical_images_with_conflicting_labels(tmp_path: Path) -> None:
    from stage1.featstore.commands import split
    from stage1.featstore.splits import load_splits

    st = _conflicted_store(tmp_path / "s")
    res = CliRunner().invoke(split, [str(st)])
    assert res.exit_code == 0, res.output
    assert "split: warning: identical images with conflicting labels: row 0 ('a.jpg', label 0) and row 1 " \
           "('b.jpg', label 1)" in res.output
    assert "row 3 ('d.jpg', label 0) and row 4 ('e.jpg', label 1)" in res.output
    assert "2 identical image(s) with conflicting labels in all" in res.output
    data = json.loads((st / "splits.json").read_text())
    assert data["label_conflicts"] == 2
    sp = load_splits(st)
    for a, b in ((0, 1), (3, 4)):  # each conflicting pair still shares one split
        assert [name for name, rows in sp.items() if a in rows] == [name for name, rows in sp.items() if b in rows]


def test_split_is_quiet_without_conflicts(tmp_path: Path) -> None:
    from stage1.featstore.commands import split

    st = _small_store(tmp_path / "s", n=8)
    res = CliRunner().invoke(split, [str(st)])
    assert res.exit_code == 0 and "warning" not in res.output
    assert json.loads((st / "splits.json").read_text())["label_conflicts"] == 0


def test_splits_json_records_the_store_it_was_made_from(tmp_path: Path) -> None:
    from stage1.featstore.splits import store_fingerprint, write_splits
    from stage1.featstore.store import Store
    from stage1.runs.steps import check_splits_current

    st = _small_store(tmp_path / "s", n=20)
    payload = write_splits(st)
    facts = json.loads((st / "splits.json").read_text())["store"]
    opened = Store.open(st)
    assert facts["n_committed"] == 20 and facts["complete"] is True
    assert facts["fingerprint"] == store_fingerprint(opened) == payload["store"]["fingerprint"]
    assert len(facts["fingerprint"]) == 64
    check_splits_current(st / "splits.json", opened)  # as made: current


@pytest.mark.parametrize("change", ["label", "feature", "id"])
def test_the_fingerprint_follows_the_rows_content(tmp_path: Path, change: str) -> None:
    """A store rebuilt in place with as many rows (and the same content hashes) but other labels, features
    or ids no longer matches the splits.json made before: train would refuse it."""
    from stage1._core.errors import DataError
    from stage1.featstore.splits import store_fingerprint, write_splits
    from stage1.featstore.store import row_hashes, write_store
    from stage1.runs.steps import check_splits_current

    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(12, 1, 3)).astype(np.float32), np.arange(12) % 2
    ids, sha = [f"{i}.jpg" for i in range(12)], row_hashes(feats)
    write_store(tmp_path / "a", feats, labels, ids=ids, sha256=sha).close()
    write_splits(tmp_path / "a")
    splits_json = (tmp_path / "a" / "splits.json").read_text()
    feats2, labels2, ids2 = feats.copy(), labels.copy(), list(ids)
    if change == "label":
        labels2[3] = 1 - labels2[3]
    elif change == "feature":
        feats2[5, 0, 1] += 1.0
    else:
        ids2[7] = "other.jpg"
    shutil.rmtree(tmp_path / "a")
    write_store(tmp_path / "a", feats2, labels2, ids=ids2, sha256=sha).close()
    (tmp_path / "a" / "splits.json").write_text(splits_json)
    with pytest.raises(DataError, match="changed since the split was made"):
        check_splits_current(tmp_path / "a" / "splits.json", Store.open(tmp_path / "a"))
    write_store(tmp_path / "same", feats, labels, ids=ids, sha256=sha).close()  # the same rows: the same print
    assert store_fingerprint(Store.open(tmp_path / "same")) == json.loads(splits_json)["store"]["fingerprint"]


def test_split_of_an_incomplete_store_warns_and_train_refuses_it_later(tmp_path: Path) -> None:
    from stage1._core.errors import DataError
    from stage1.featstore.splits import write_splits
    from stage1.runs.steps import check_splits_current

    st = Store.create(tmp_path / "s", 8, 1, 3, {"kind": "arrays"}, chunk_rows=4)
    st.write_block(0, np.ones((4, 1, 3), np.float32), np.array([0, 1, 0, 1]), list("abcd"), list("abcd"))
    st.commit(4)
    st.close()
    write_splits(tmp_path / "s")
    facts = json.loads((tmp_path / "s" / "splits.json").read_text())["store"]
    assert facts["n_committed"] == 4 and facts["complete"] is False
    st = Store.open(tmp_path / "s", mode="r+")
    st.write_block(4, np.ones((4, 1, 3), np.float32), np.array([0, 1, 0, 1]), list("efgh"), list("efgh"))
    st.commit(8)
    st.finalize()
    st.close()
    with pytest.raises(DataError, match="made when the store had 4 rows, it has 8 now"):
        check_splits_current(tmp_path / "s" / "splits.json", Store.open(tmp_path / "s"))
