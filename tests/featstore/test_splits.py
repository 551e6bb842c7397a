"""Splits: deterministic, stratified, keyed on content hash + seed, leakage-free, split column honoured."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from stage1.featstore.commands import info, split
from stage1.featstore.splits import SPLIT_NAMES, SplitError, load_splits, make_splits, parse_fractions, write_splits
from stage1.featstore.store import write_store


def hashes(n: int, prefix: str = "h") -> np.ndarray:
    return np.array([f"{prefix}{i:06d}" for i in range(n)])


def assignment(splits: dict, n: int) -> np.ndarray:
    out = np.full(n, -1)
    for k, name in enumerate(SPLIT_NAMES):
        out[splits[name]] = k
    return out


def test_partition_is_complete_disjoint_and_stratified() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(1000) < 0.3).astype(int)
    sp = make_splits(y, hashes(1000), seed=0)
    rows = np.concatenate([sp[n] for n in SPLIT_NAMES])
    assert sorted(rows.tolist()) == list(range(1000))
    fr = parse_fractions(None)
    for label in (0, 1):
        n_label = int(np.sum(y == label))
        for name in SPLIT_NAMES:
            got = int(np.sum(y[sp[name]] == label))
            assert abs(got - fr[name] * n_label) <= 1, (name, label, got)


def test_deterministic_row_order_independent_and_seeded() -> None:
    y = np.arange(200) % 2
    sha = hashes(200)
    a = assignment(make_splits(y, sha, seed=3), 200)
    assert np.array_equal(a, assignment(make_splits(y, sha, seed=3), 200))
    perm = np.random.default_rng(1).permutation(200)
    b = assignment(make_splits(y[perm], sha[perm], seed=3), 200)
    assert np.array_equal(a[perm], b)  # each image keeps its split whatever the row order
    assert not np.array_equal(a, assignment(make_splits(y, sha, seed=4), 200))


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(st.tuples(st.integers(0, 30), st.sampled_from([-1, 0, 1])), min_size=1, max_size=80),
    seed=st.integers(0, 1000),
)
def test_identical_images_never_straddle_splits(groups, seed) -> None:
    sha = np.array([f"img{g}" for g, _ in groups])
    y = np.array([label for _, label in groups])
    a = assignment(make_splits(y, sha, seed=seed), len(groups))
    assert (a >= 0).all()
    for h in set(sha.tolist()):
        assert len(set(a[sha == h].tolist())) == 1


def test_split_column_is_honoured_and_leaks_refused() -> None:
    y = np.arange(100) % 2
    sha = hashes(100)
    col = np.array([""] * 100, dtype=object)
    col[:10] = "test"
    col[10:12] = "val_calib"
    sp = make_splits(y, sha, seed=0, split_column=col)
    a = assignment(sp, 100)
    assert (a[:10] == SPLIT_NAMES.index("test")).all() and (a[10:12] == SPLIT_NAMES.index("val_calib")).all()
    # a free copy of a forced image follows it
    sha2 = sha.copy()
    sha2[50] = sha2[0]
    assert assignment(make_splits(y, sha2, split_column=col), 100)[50] == SPLIT_NAMES.index("test")
    col2 = col.copy()
    col2[50] = "train"
    with pytest.raises(SplitError, match="identical image .* both test and train"):
        make_splits(y, sha2, split_column=col2)
    with pytest.raises(SplitError, match="not one of"):
        make_splits(y, sha, split_column=np.array(["bogus"] + [""] * 99))


def test_fraction_parsing() -> None:
    assert parse_fractions("1,1,1,1") == {n: 0.25 for n in SPLIT_NAMES}
    assert parse_fractions({"train": 3, "test": 1})["train"] == 0.75
    for bad in ("1,2", "a,b,c,d", [1, -1, 1, 1], {"dev": 1}):
        with pytest.raises(SplitError):
            parse_fractions(bad)
    sp = make_splits(np.zeros(50, int), hashes(50), fractions=[1, 0, 0, 1])
    assert len(sp["val_select"]) == len(sp["val_calib"]) == 0 and len(sp["train"]) == 25


def test_write_load_and_cli(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 4)).astype(np.float32)
    labels = np.arange(40) % 2
    split_col = ["test"] * 4 + [""] * 36
    write_store(tmp_path / "s", feats, labels, split=split_col)
    payload = write_splits(tmp_path / "s", seed=5)
    on_disk = json.loads((tmp_path / "s" / "splits.json").read_text())
    assert on_disk["seed"] == 5 and on_disk == payload
    assert sum(c["n"] for c in on_disk["counts"].values()) == 40
    loaded = load_splits(tmp_path / "s")
    assert set(loaded) == set(SPLIT_NAMES) and loaded["test"].dtype == np.int64
    assert {0, 1, 2, 3} <= set(loaded["test"].tolist())
    assert all(np.array_equal(loaded[n], load_splits(tmp_path / "s" / "splits.json")[n]) for n in SPLIT_NAMES)
    res = CliRunner().invoke(split, [str(tmp_path / "s"), "--seed", "5", "--fractions", "0.5,0.1,0.2,0.2"])
    assert res.exit_code == 0 and "val_calib" in res.output
    assert json.loads((tmp_path / "s" / "splits.json").read_text())["fractions"]["train"] == pytest.approx(0.5)
    assert json.loads(CliRunner().invoke(info, [str(tmp_path / "s"), "--json"]).output)["splits"]["test"] >= 4
    res = CliRunner().invoke(split, [str(tmp_path / "s"), "--fractions", "1,2"])
    assert res.exit_code == 2 and "give 4 fractions" in res.output
    with pytest.raises(FileNotFoundError, match="run `stage1 split"):
        load_splits(tmp_path)
