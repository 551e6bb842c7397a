"""policies.views: the one-view-per-image draw and per-level (Mondrian) metrics."""
from __future__ import annotations

import numpy as np
import pytest

from stage1.policies.views import draw_one_view, level_views, per_level_metrics, take_views


def test_draw_one_view_per_image_level_mix_and_determinism() -> None:
    n = 4000
    rng = np.random.default_rng(0)
    # 6 views per image: view 0 clean squash (-1), then levels 0..3 plus a random repeat
    levels = np.concatenate([np.full((n, 1), -1), np.tile([0, 1, 2, 3], (n, 1)),
                             rng.integers(0, 4, size=(n, 1))], axis=1).astype(np.int8)
    rows = np.arange(100, 100 + n)
    view, level = draw_one_view(levels, rows, seed=3)
    assert view.shape == (n,) and level.shape == (n,)  # exactly one view per image
    assert np.all(view >= 1)  # never the non-validator view
    np.testing.assert_array_equal(levels[np.arange(n), view], level)  # the view has the drawn level
    freq = np.bincount(level, minlength=4) / n
    np.testing.assert_allclose(freq, 0.25, atol=0.03)  # subnet mix, not the view mix (level of view 5 is extra)
    v2, l2 = draw_one_view(levels, rows, seed=3)
    np.testing.assert_array_equal(view, v2)
    np.testing.assert_array_equal(level, l2)
    v3, _ = draw_one_view(levels, rows, seed=4)
    assert not np.array_equal(view, v3)
    # keyed on the store row: a subset draws the same views
    sub = np.arange(0, n, 7)
    vs, ls = draw_one_view(levels[sub], rows[sub], seed=3)
    np.testing.assert_array_equal(vs, view[sub])


def test_draw_uses_only_the_levels_an_image_has() -> None:
    levels = np.array([[-1, 2, 2, 3], [-1, -1, -1, -1], [0, -1, -1, -1]], dtype=np.int8)
    view, level = draw_one_view(levels, np.arange(3), seed=0)
    assert level[0] in (2, 3) and view[0] in (1, 2, 3)
    assert view[1] == -1 and level[1] == -1
    assert view[2] == 0 and level[2] == 0
    counts = np.zeros(4, int)
    many = np.tile(levels[:1], (2000, 1))
    _, lv = draw_one_view(many, np.arange(2000), seed=1)
    counts = np.bincount(lv, minlength=4)
    assert counts[0] == counts[1] == 0 and abs(counts[2] / 2000 - 0.5) < 0.05  # level 2 is not doubled


def test_a_level0_view_0_does_not_skew_the_mix() -> None:
    # --preprocess validator: view 0 is level 0 on every image; 3 distorted views at i.i.d. uniform levels
    n = 8000
    rng = np.random.default_rng(5)
    levels = np.concatenate([np.zeros((n, 1)), rng.integers(0, 4, size=(n, 3))], axis=1).astype(np.int8)
    view, level = draw_one_view(levels, np.arange(n), seed=2)
    assert np.all(view >= 1)
    np.testing.assert_allclose(np.bincount(level, minlength=4) / n, 0.25, atol=0.02)
    # counted with view 0 in the draw, level 0 would take about 0.39 of the rows (the skew this avoids)
    # distorted views at levels 1-3 only: view 0 is the only source of level 0 and stays in the draw
    only = np.concatenate([np.zeros((n, 1)), rng.integers(1, 4, size=(n, 3))], axis=1).astype(np.int8)
    _, lv = draw_one_view(only, np.arange(n), seed=2)
    assert np.mean(lv == 0) > 0.25


def test_level_views_and_take_views() -> None:
    levels = np.array([[-1, 1, 1, 3], [-1, 2, 3, 0]], dtype=np.int8)
    v1 = level_views(levels, np.arange(2), 1, seed=0)
    assert v1[0] in (1, 2) and v1[1] == -1
    np.testing.assert_array_equal(level_views(levels, np.arange(2), 3), [3, 2])
    vl = np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2)
    vsel = np.arange(8, dtype=np.float32).reshape(2, 4)
    sc = take_views({"view_logits": vl, "view_select": vsel}, np.array([3, 1]))
    np.testing.assert_array_equal(sc["logits"], [vl[0, 3], vl[1, 1]])
    np.testing.assert_array_equal(sc["select"], [3.0, 5.0])


def test_per_level_metrics_against_a_hand_count() -> None:
    y = np.array([1, 1, 0, 0, 1, 1, 1, 0])
    label = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    exit_ = np.array([1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    level = np.array([0, 0, 0, 0, 2, 2, 2, 2])
    m = per_level_metrics(y, label, exit_, level)
    assert set(m) == {"level0", "level2"}
    l0, l2 = m["level0"], m["level2"]
    assert l0["n"] == 4 and l0["positives"] == 2
    assert l0["coverage"] == pytest.approx(3 / 4)
    assert l0["fnr_exit"] == pytest.approx(1 / 2)  # exited positives: rows 0, 1; row 1 missed
    assert l0["selective_error"] == pytest.approx(1 / 3)
    assert l2["coverage"] == pytest.approx(2 / 4)
    assert l2["fnr_exit"] == pytest.approx(1 / 2)
    assert l2["selective_error"] == pytest.approx(1 / 2)
