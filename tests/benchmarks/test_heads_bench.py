"""Pure helpers of the heads benchmarks: the Fashion-MNIST draw and the FLOP count."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import heads_bench  # noqa: E402
import quality  # noqa: E402


def test_fmnist_draw_sizes_disjoint_and_duplicate_free(monkeypatch) -> None:
    monkeypatch.setattr(quality, "N_CALIB", 40)
    monkeypatch.setattr(quality, "N_TRAIN", 60)
    monkeypatch.setattr(quality, "N_SELECT", 10)
    tr_y = np.repeat([0, 6, 3], 60)
    te_y = np.repeat([0, 6, 3], 10)
    tr_h = [f"tr{i}" for i in range(len(tr_y))]
    te_h = [f"te{i}" for i in range(len(te_y))]
    tr_h[5] = te_h[2]  # a train copy of a test image: must stay out
    tr_h[7] = tr_h[8]  # a repeat inside the pool: counted once
    d = quality.fmnist_draw(tr_y, tr_h, te_y, te_h, 0, 6, seed=1)
    assert len(d["val_calib"]) == 40 and len(d["val_select"]) == 10 and len(d["test"]) == 20
    pools = [set(d[k].tolist()) for k in ("train", "val_select", "val_calib")]
    assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])
    used = set().union(*pools)
    assert 5 not in used and not {7, 8} <= used
    assert set(tr_y[list(used)]) == {0, 6} and set(te_y[d["test"]]) == {0, 6}
    assert sum(tr_y[d["val_calib"]] == 6) == 20  # balanced
    again = quality.fmnist_draw(tr_y, tr_h, te_y, te_h, 0, 6, seed=1)
    assert all(np.array_equal(d[k], again[k]) for k in d)


def test_step_flops_matches_flop_counter() -> None:
    assert heads_bench.step_flops(64, 32, 48) == heads_bench.measured_step_flops(64, 32, 48)
