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
