"""Pieces of the shift benchmark that need no backbone: the Fashion-MNIST subsample and the verdicts."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import shift_bench  # noqa: E402
from stage1.featstore.labels import parse_labels_csv, write_labels_csv  # noqa: E402


def test_subsample_takes_the_first_rows_of_each_split_by_path_hash(tmp_path):
    rows = [(f"img{i:03d}.png", i % 2, split) for split in ("train", "val_select", "val_calib", "test")
            for i in range(10)]
    src = write_labels_csv(tmp_path / "all.csv", [(f"{s}/{p}", y, s) for p, y, s in rows])
    out = shift_bench.subsample_csv(src, tmp_path / "sub.csv", (3, 2, 4, 5))
    entries, _ = parse_labels_csv(out)
    counts = {s: sum(e.split == s for e in entries) for s in ("train", "val_select", "val_calib", "test")}
    assert counts == {"train": 3, "val_select": 2, "val_calib": 4, "test": 5}
    again = shift_bench.subsample_csv(src, tmp_path / "sub2.csv", (3, 2, 4, 5))
    assert [e.path for e in parse_labels_csv(again)[0]] == [e.path for e in entries]  # deterministic


def test_verdicts_count_certified_cells_and_their_levels():
    cell = lambda cert, ok, **kw: {"certified": cert, "within_target": ok if cert else None, **kw}  # noqa: E731
    res = {"cells": {
        "ltt_fnr_exit/clean": cell(True, False), "ltt_both/clean": cell(True, True),
        "ltt_fnr_exit/validator": cell(True, True), "ltt_both/validator": cell(False, None),
        "ltt_fnr_exit/per_level": cell(True, True, per_level={"level0": {"certified": True, "within_target": True},
                                                             "level3": {"certified": True, "within_target": False},
                                                             "level2": {"certified": False, "within_target": None}}),
    }}
    v = shift_bench.verdicts(res)
    assert v["clean"] == {"certified": 2, "of": 2, "within_target": 1}
    assert v["validator"] == {"certified": 1, "of": 2, "within_target": 1}
    assert v["per_level"] == {"certified": 1, "of": 1, "within_target": 1, "levels_certified": 2,
                              "levels_within_target": 1}
