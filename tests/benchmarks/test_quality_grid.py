"""The quality benchmark's test-label ceiling (``quality_grid.exit_ceiling``) against brute force."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import quality_grid  # noqa: E402
from stage1.policies.metrics import selective_risks  # noqa: E402


def brute_ceiling(s, yhat, y, risk, alpha, eps):
    """Every pair of thresholds drawn from the scores (and +inf), scored with the package's own metrics."""
    best = 0.0
    ts = [np.inf, *np.unique(s)]
    for t0 in ts:
        for t1 in ts:
            ex = ((yhat == 0) & (s >= t0)) | ((yhat == 1) & (s >= t1))
            m = selective_risks(y, yhat, ex)
            r = m[risk]
            ok = np.isnan(r) or r <= alpha + 1e-9
            if eps is not None:
                ok = ok and (np.isnan(m["selective_error"]) or m["selective_error"] <= eps + 1e-9)
            if ok:
                best = max(best, float(ex.mean()))
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 25), st.sampled_from(["fnr_exit", "selective_error", "miss_rate"]),
       st.sampled_from([0.0, 0.1, 0.3]), st.sampled_from([None, 0.2]))
def test_exit_ceiling_equals_brute_force(seed, n, risk, alpha, eps):
    rng = np.random.default_rng(seed)
    s = np.round(rng.uniform(0.5, 1.0, n), 2)  # ties included
    yhat = rng.integers(0, 2, n)
    y = rng.integers(0, 2, n)
    got = quality_grid.exit_ceiling(s, yhat, y, risk, alpha, eps)
    assert got == brute_ceiling(s, yhat, y, risk, alpha, eps)


def test_exit_ceiling_known_case():
    # predicted 1 with confidence .9 (y=1), .8 (y=0), .7 (y=1); predicted 0 with .95 (y=0), .6 (y=1).
    s = np.array([0.9, 0.8, 0.7, 0.95, 0.6])
    yhat = np.array([1, 1, 1, 0, 0])
    y = np.array([1, 0, 1, 0, 1])
    # selective error 0: exit the .9 (right) and the .95 (right) -> 2 / 5
    assert quality_grid.exit_ceiling(s, yhat, y, "selective_error", 0.0) == 0.4
    # FNR_exit 0 (no exited positive predicted 0): everything predicted 1 plus the .95 -> 4 / 5
    assert quality_grid.exit_ceiling(s, yhat, y, "fnr_exit", 0.0) == 0.8
    # with selective error <= 0.25 as well: 4 exits hold 1 error (the .8) -> 0.8 still
    assert quality_grid.exit_ceiling(s, yhat, y, "fnr_exit", 0.0, 0.25) == 0.8
    # selective error <= 0.2 forbids that set: best is .9 + .95 (+ nothing else) -> 0.4
    assert quality_grid.exit_ceiling(s, yhat, y, "fnr_exit", 0.0, 0.2) == 0.4
