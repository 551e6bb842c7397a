"""Atomic writes: a failed write leaves the old file/folder and no temp behind; a good one replaces it."""
from __future__ import annotations

from pathlib import Path

import pytest

from stage1._core.io import PARTIAL_SUFFIX, atomic_dir, atomic_path, atomic_write_bytes


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    with atomic_path(target, fsync=False) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(PARTIAL_SUFFIX)
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


def test_atomic_dir_swaps_in_a_whole_folder_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    with atomic_dir(target) as work:
        (work / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as work:
            (work / "y").write_text("half")
            raise RuntimeError("crash mid-write")
    assert [p.name for p in target.iterdir()] == ["x"]
    with atomic_dir(target) as work:
        (work / "z").write_text("2")
    assert [p.name for p in target.iterdir()] == ["z"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no work or old folders left


def test_atomic_dir_keep_theirs_keeps_a_finished_folder_and_replaces_a_broken_one(tmp_path: Path) -> None:
    target = tmp_path / "cache"

    def finished(path: Path) -> bool:
        return (path / "done").is_file()

    with atomic_dir(target, keep_theirs=finished) as work:  # nothing there yet: ours goes in
        (work / "done").write_text("first")
    with atomic_dir(target, keep_theirs=finished) as work:  # theirs is finished: ours is dropped
        (work / "done").write_text("second")
    assert (target / "done").read_text() == "first"
    (target / "done").unlink()  # now a broken leftover: replaced as usual
    with atomic_dir(target, keep_theirs=finished) as work:
        (work / "done").write_text("third")
    assert (target / "done").read_text() == "third"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_atomic_dir_keep_theirs_when_another_writer_wins_the_rename(tmp_path: Path, monkeypatch) -> None:
    import os

    target = tmp_path / "cache"
    real_rename = os.rename

    def finished(path: Path) -> bool:
        return (path / "done").is_file()

    def race(src, dst):  # another process renames its finished folder in just before we do
        Path(dst).mkdir()
        (Path(dst) / "done").write_text("theirs")
        real_rename(src, dst)  # fails: the target is a non-empty folder now

    monkeypatch.setattr(os, "rename", race)
    with atomic_dir(target, keep_theirs=finished) as work:
        (work / "done").write_text("ours")
    assert (target / "done").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    # without keep_theirs the failed rename is an error
    def refuse(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(OSError, match="refused"):
        with atomic_dir(tmp_path / "d") as work:
            (work / "x").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # the temp folder is gone


def test_json_safe_makes_strict_json() -> None:
    import dataclasses
    import json

    import numpy as np

    from stage1._core.io import json_safe

    @dataclasses.dataclass
    class Hist:
        loss: list

    obj = {"a": np.float32(0.5), "b": np.int64(3), "c": (np.nan, np.inf), "d": np.array([1, 2]),
           "e": np.bool_(True), "h": Hist([1.0, float("nan")]), 7: "k"}
    out = json_safe(obj)
    assert out == {"a": 0.5, "b": 3, "c": [None, None], "d": [1, 2], "e": True, "h": {"loss": [1.0, None]}, "7": "k"}
    json.dumps(out, allow_nan=False)  # strict JSON, as atomic_write_json requires


def test_atomic_outputs_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    mask = os.umask(0)
    os.umask(mask)
    atomic_write_bytes(tmp_path / "f", b"x")
    with atomic_dir(tmp_path / "d") as work:
        (work / "x").write_text("1")
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
