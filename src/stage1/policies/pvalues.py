"""Binomial-tail p-values for H0: risk > alpha, and the sample size a certificate would need.

A risk here is a ratio of counts ``k / n`` (misses over exited positives, ...). Conditional on the
number of trials ``n``, the events are i.i.d. Bernoulli(risk), so ``P(Bin(n, alpha) <= k)`` is a
valid p-value (Clopper-Pearson, exact). Hoeffding-Bentkus (Bates et al. 2021, the LTT paper) is
``min(exp(-n h1(min(r, alpha), alpha)), e * P(Bin(n, alpha) <= ceil(n r)))``; it is valid for any
loss in [0, 1] and never smaller than the exact tail. ``n = 0`` (nothing to test, e.g. a threshold
with no exited positives) gives p = 1: such a hypothesis is simply not rejected.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import binom

from stage1._core.errors import ConfigError

PVALUES = ("clopper_pearson", "hoeffding_bentkus")


def _h1(r: np.ndarray, a: float) -> np.ndarray:
    """KL divergence between Bernoulli(r) and Bernoulli(a), with 0 ln 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0) / a), 0.0)
        t2 = np.where(r < 1, (1 - r) * np.log(np.where(r < 1, 1 - r, 1.0) / (1 - a)), 0.0)
    return t1 + t2


def binomial_pvalue(k: np.ndarray, n: np.ndarray, alpha: float, method: str = "clopper_pearson") -> np.ndarray:
    """p-values for H0: risk > alpha given ``k`` events in ``n`` trials (arrays broadcast)."""
    if method not in PVALUES:
        raise ConfigError(f"pvalue must be one of {PVALUES}, got {method!r}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    k, n = np.broadcast_arrays(k, n)
    safe_n = np.where(n > 0, n, 1.0)
    exact = binom.cdf(k, safe_n, alpha)
    if method == "hoeffding_bentkus":
        r = k / safe_n
        hoeff = np.exp(-safe_n * _h1(np.minimum(r, alpha), alpha))
        exact = np.minimum(hoeff, np.e * exact)  # k is an integer, so ceil(n r) = k
    return np.where(n > 0, np.minimum(exact, 1.0), 1.0)


_CANDIDATES = np.unique(np.round(np.logspace(0, 8, 800)).astype(np.int64)).astype(np.float64)


def trials_needed(rate: np.ndarray, alpha: float, level: float, method: str = "clopper_pearson") -> np.ndarray:
    """Smallest n (on a ~2% geometric grid up to 1e8) whose p-value at ``k = floor(rate n)``
    is <= ``level``, by a vectorised bisection (the p-value falls with n at a fixed rate < alpha);
    ``inf`` where ``rate >= alpha`` or 1e8 is not enough (more data cannot certify it)."""
    rate = np.atleast_1d(np.asarray(rate, dtype=np.float64))
    out = np.full(rate.shape, np.inf)
    ok = rate < alpha
    if not ok.any():
        return out
    r = rate[ok]

    def passes(idx: np.ndarray) -> np.ndarray:
        n = _CANDIDATES[idx]
        return binomial_pvalue(np.floor(r * n), n, alpha, method) <= level

    lo = np.zeros(len(r), dtype=np.int64)
    hi = np.full(len(r), len(_CANDIDATES) - 1, dtype=np.int64)
    reachable = passes(hi)
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        good = passes(mid)
        hi = np.where(good, mid, hi)
        lo = np.where(good, lo, np.minimum(mid + 1, hi))
    out[ok] = np.where(reachable, _CANDIDATES[hi], np.inf)
    return out
