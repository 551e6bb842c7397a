"""Know when the guarantee no longer holds: an exchangeability alarm and a live risk bound.

Every certificate assumes new images are exchangeable with val_calib. Two anytime-valid checks:

(a) **Exchangeability alarm** (unlabelled stream). Each stream score (the policy's select score, the
novelty score) gets a smoothed conformal p-value computed online (``OnlineConformal``): its rank
among the val_calib scores *and every earlier stream score*, ties broken by an independent uniform.
Under exchangeability of (val_calib, stream) these p-values are i.i.d. uniform (Vovk, Nouretdinov &
Gammerman 2003, "Testing exchangeability on-line"), so a product of betting functions with mean 1
under the uniform is a test martingale (nonnegative, starts at 1). Ranking against val_calib alone
would give p-values that are each uniform but dependent (they share val_calib), and the product of
such is not a martingale. Betting: the Simple Jumper (Vovk 2021, "Testing randomness online",
Algorithm 1; betting functions 1 + e (p - 1/2), e in {-1, 0, 1}, jump rate ``jump``), two-sided: it
grows when p-values pile up near 0 or near 1; or ``power_mixture``, the average of power
martingales e p^(e - 1) over a fixed grid of e in (0, 1], one-sided (strange = small p). Several
channels (select, novelty) are combined by averaging their martingales: an average of test
martingales on one filtration is one (each channel's p-value is uniform and independent of every
earlier p-value of both channels under exchangeability). Ville's inequality: P(sup_t M_t >=
1/level) <= level, so "alarm when M_t >= 1/level" fires, ever, with probability <= level when the
stream is exchangeable with val_calib.

(b) **Live risk** (labelled stream): a Bernoulli rate (FNR_exit: misses among exited positives;
selective error: errors among exits) with anytime-valid one-sided confidence bounds from a
beta-binomial mixture martingale (Robbins 1970; the conjugate mixture of Howard et al. 2021,
"Time-uniform, nonparametric, nonasymptotic confidence sequences"), with the mixture restricted to
the side tested, so each bound also holds when the rate drifts (``bernoulli_bounds``):
``upper``: P(exists t: upper_t < rate) <= level; ``lower``: P(exists t: lower_t > rate) <= level.
Alarm rule: **lower_t > alpha** (the risk is above alpha with confidence 1 - level, anytime): it
fires falsely with probability <= level while the risk stays <= alpha, and it needs no warm-up. The
other rule, "upper_t > alpha" (not yet shown to be below alpha), holds from the first image (the
upper bound starts at 1) and says only that evidence is still short, so it is reported as
``certified_from`` (the first time upper_t <= alpha), not as an alarm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from stage1._core.errors import ConfigError, DataError
from stage1._core.params import Param, Params

MARTINGALES = ("simple_jumper", "power_mixture")
#: stream scores whose *large* values are strange (novelty distance); the select score is strange when small.
STRANGE_WHEN = ("high", "low")
#: grid of the power mixture's exponents (as in Vovk's "simple mixture", a uniform grid on (0, 1]).
POWER_GRID = np.linspace(0.01, 1.0, 100)
#: beta prior of the mixture martingale (Jeffreys): a tight bound for rates near 0 or 1 alike.
PRIOR_A = PRIOR_B = 0.5

MONITOR_PARAMS = Params(
    Param("level", float, 0.01, "Alarm level: P(alarm ever | exchangeable) <= level (alarm at M >= 1/level).",
          low=0.0, high=0.5, low_open=True),
    Param("martingale", str, "simple_jumper", "Betting: simple_jumper (two-sided) or power_mixture (small p).",
          choices=MARTINGALES),
    Param("jump", float, 0.01, "Simple Jumper's jump rate (how fast it switches bets).", low=0.0, high=1.0,
          low_open=True),
    Param("seed", int, 0, "Seed of the tie-breaking uniforms of the smoothed p-values.", low=0),
)


# -- (a) online conformal p-values -----------------------------------------------------------------
class OnlineConformal:
    """Smoothed conformal p-values of a stream, each ranked among val_calib and all earlier stream scores.

    ``strange="high"``: large scores are strange (small p); ``"low"``: small scores are. p_t =
    (#{earlier > s_t} + U_t (#{earlier = s_t} + 1)) / (n_earlier + 1) on the strangeness, with
    U_t uniform: exactly uniform and independent under exchangeability (no conservative ties).
    """

    def __init__(self, calib_scores: np.ndarray, strange: str = "high", seed: int = 0, block: int = 256) -> None:
        if strange not in STRANGE_WHEN:
            raise ConfigError(f"strange must be one of {STRANGE_WHEN}, got {strange!r}")
        cal = _finite_1d(calib_scores, "calibration scores")
        if len(cal) == 0:
            raise DataError("monitor: no calibration scores to rank the stream against")
        self.sign = 1.0 if strange == "high" else -1.0
        self._seen = np.sort(self.sign * cal)
        self.n_calib = int(len(cal))
        self._rng = np.random.default_rng(seed)
        self._block = int(block)

    @property
    def n_seen(self) -> int:
        """Scores ranked so far, val_calib included."""
        return int(len(self._seen))

    def update(self, scores: np.ndarray) -> np.ndarray:
        """p-values of ``scores`` taken in order (each joins the history after it is ranked)."""
        s_all = self.sign * _finite_1d(scores, "stream scores")
        out = np.empty(len(s_all))
        for start in range(0, len(s_all), self._block):
            s = s_all[start:start + self._block]
            b = len(s)
            prev = self._seen
            lo = np.searchsorted(prev, s, side="left")
            hi = np.searchsorted(prev, s, side="right")
            greater = len(prev) - hi
            equal = hi - lo
            earlier = np.tri(b, k=-1, dtype=bool)  # earlier[i, j]: j comes before i in this block
            greater = greater + (earlier & (s[None, :] > s[:, None])).sum(axis=1)
            equal = equal + (earlier & (s[None, :] == s[:, None])).sum(axis=1)
            n_earlier = len(prev) + np.arange(b)
            u = self._rng.random(b)
            out[start:start + b] = (greater + u * (equal + 1)) / (n_earlier + 1)
            order = np.sort(s)
            self._seen = np.insert(prev, np.searchsorted(prev, order), order)
        return out


# -- (a) test martingales --------------------------------------------------------------------------
def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


class TestMartingale:
    """A conformal test martingale over a stream of p-values, kept in log space; ``update`` extends it.

    Works on one stream (p-values [T]) or many at once (p-values [S, T]); returns log M_t for each
    new step. Starts at M_0 = 1; E[M_t | past] = M_{t-1} when the p-values are i.i.d. uniform.
    """

    __test__ = False  # not a pytest class

    def __init__(self, kind: str = "simple_jumper", jump: float = 0.01, streams: int | None = None) -> None:
        if kind not in MARTINGALES:
            raise ConfigError(f"martingale must be one of {', '.join(MARTINGALES)}, got {kind!r}")
        if not 0.0 < jump <= 1.0:
            raise ConfigError(f"jump must be in (0, 1], got {jump}")
        self.kind = kind
        self.jump = float(jump)
        shape = () if streams is None else (int(streams),)
        if kind == "simple_jumper":
            self._log_c = np.full(shape + (3,), np.log(1.0 / 3.0))  # capital behind e = -1, 0, 1
        else:
            self._log_c = np.zeros(shape + (len(POWER_GRID),))  # log capital of each power martingale

    def update(self, p: np.ndarray) -> np.ndarray:
        """log M_t after each p-value of ``p`` ([T] or [S, T]; in [0, 1])."""
        p = np.asarray(p, dtype=np.float64)
        if p.size and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
            raise DataError("monitor: p-values must lie in [0, 1]")
        if self.kind == "power_mixture":
            steps = np.log(POWER_GRID) + (POWER_GRID - 1.0) * np.log(np.maximum(p, 1e-300))[..., None]
            log_c = self._log_c[..., None, :] + np.cumsum(steps, axis=-2)
            if p.shape[-1]:
                self._log_c = log_c[..., -1, :]
            return _logsumexp(log_c, axis=-1) - np.log(len(POWER_GRID))
        if p.ndim == 1:
            return self._jumper_one(p)
        eps = np.array([-1.0, 0.0, 1.0])
        out = np.empty(p.shape)
        log_stay, log_jump = np.log1p(-self.jump) if self.jump < 1 else -np.inf, np.log(self.jump / 3.0)
        for t in range(p.shape[-1]):
            total = _logsumexp(self._log_c, axis=-1)[..., None]
            mixed = np.logaddexp(log_stay + self._log_c, log_jump + total)
            self._log_c = mixed + np.log1p(eps * (p[..., t, None] - 0.5))
            out[..., t] = _logsumexp(self._log_c, axis=-1)
        return out


    def _jumper_one(self, p: np.ndarray) -> np.ndarray:
        """The Simple Jumper on one stream in plain floats (numpy per step is slower for 3 numbers):
        capital rescaled by its running log so it never overflows."""
        import math

        log_scale = float(_logsumexp(self._log_c, axis=-1))
        c = [math.exp(v - log_scale) for v in self._log_c]  # components, summing to 1
        stay, jump = 1.0 - self.jump, self.jump / 3.0
        out = np.empty(len(p))
        for t, pt in enumerate(p.tolist()):
            total = c[0] + c[1] + c[2]
            share = jump * total
            c = [(stay * c[0] + share) * (1.5 - pt), stay * c[1] + share, (stay * c[2] + share) * (0.5 + pt)]
            total = c[0] + c[1] + c[2]
            log_scale += math.log(total)
            c = [v / total for v in c]
            out[t] = log_scale
        self._log_c = np.log(np.maximum(np.asarray(c), 1e-300)) + log_scale
        return out


@dataclass
class ExchangeabilityFigures:
    """Running figures of an exchangeability monitor (one entry per stream item, arrays)."""

    pvalues: dict[str, np.ndarray]
    log_martingales: dict[str, np.ndarray]
    log_martingale: np.ndarray
    threshold: float
    alarm_time: int | None  # 1-based index of the first item with M_t >= 1/level, None if never

    @property
    def martingale(self) -> np.ndarray:
        """The combined martingale M_t (linear scale, capped at 1e300)."""
        return np.exp(np.minimum(self.log_martingale, 690.0))


class ExchangeabilityMonitor:
    """Averaged conformal test martingales over channels (e.g. select, novelty); alarm at M >= 1/level.

    ``calib``: channel name -> val_calib scores; ``strange``: channel -> "high" | "low" (default
    "high"). ``update(scores)`` takes channel -> stream scores (same length for every channel) and
    can be called again as the stream grows; ``figures()`` gives everything so far.
    """

    def __init__(self, calib: Mapping[str, np.ndarray], strange: Mapping[str, str] | None = None,
                 **params: Any) -> None:
        p = MONITOR_PARAMS.resolve(params, owner="monitor")
        self.level: float = p["level"]
        self.martingale: str = p["martingale"]
        self.jump: float = p["jump"]
        self.seed: int = p["seed"]
        if not calib:
            raise ConfigError("monitor needs at least one channel of calibration scores")
        strange = dict(strange or {})
        unknown = sorted(set(strange) - set(calib))
        if unknown:
            raise ConfigError(f"monitor: strange names channels without calibration scores: {', '.join(unknown)}")
        self.channels = list(calib)
        seeds = np.random.SeedSequence(self.seed).spawn(len(self.channels))
        self._conformal = {c: OnlineConformal(calib[c], strange.get(c, "high"), seed=int(sd.generate_state(1)[0]))
                           for c, sd in zip(self.channels, seeds)}
        self._mart = {c: TestMartingale(self.martingale, self.jump) for c in self.channels}
        self._p: dict[str, list[np.ndarray]] = {c: [] for c in self.channels}
        self._m: dict[str, list[np.ndarray]] = {c: [] for c in self.channels}

    @property
    def threshold(self) -> float:
        """The alarm threshold 1/level on the martingale."""
        return 1.0 / self.level

    def update(self, scores: Mapping[str, np.ndarray]) -> ExchangeabilityFigures:
        """Add stream items (channel -> scores, in stream order); the figures so far."""
        missing = [c for c in self.channels if c not in scores]
        if missing:
            raise DataError(f"monitor: the stream lacks scores for channel(s) {', '.join(missing)}")
        lengths = {len(np.asarray(scores[c])) for c in self.channels}
        if len(lengths) != 1:
            raise DataError(f"monitor: channels have different lengths {sorted(lengths)}")
        for c in self.channels:
            p = self._conformal[c].update(scores[c])
            self._p[c].append(p)
            self._m[c].append(self._mart[c].update(p))
        return self.figures()

    def figures(self) -> ExchangeabilityFigures:
        """p-values, per-channel and combined log martingales, and the alarm time so far."""
        pv = {c: np.concatenate(self._p[c]) if self._p[c] else np.zeros(0) for c in self.channels}
        lm = {c: np.concatenate(self._m[c]) if self._m[c] else np.zeros(0) for c in self.channels}
        stacked = np.stack([lm[c] for c in self.channels])
        combined = _logsumexp(stacked, axis=0) - np.log(len(self.channels)) if stacked.shape[1] else np.zeros(0)
        return ExchangeabilityFigures(pv, lm, combined, self.threshold, first_crossing(combined, np.log(self.threshold)))


def first_crossing(log_m: np.ndarray, log_threshold: float) -> int | None:
    """1-based index of the first log_m >= log_threshold (None if never)."""
    hit = np.flatnonzero(np.asarray(log_m) >= log_threshold - 1e-12)
    return int(hit[0]) + 1 if len(hit) else None


# -- (b) anytime-valid bounds for a Bernoulli rate -------------------------------------------------
def _log_mixture_ratio(s: np.ndarray, f: np.ndarray, p: np.ndarray, side: str, log_b: np.ndarray) -> np.ndarray:
    """log of the one-sided beta-binomial mixture martingale at rate ``p`` after s events in s + f trials.

    side "lower": the mixture over rates theta >= p (evidence that the rate exceeds p; a
    supermartingale whenever every conditional rate is <= p). side "upper": over theta <= p.
    ``log_b``: log B(a + s, b + f) - log B(a, b) (precomputed: it does not depend on p).
    """
    from scipy.special import betainc, betaincc

    a, b = PRIOR_A, PRIOR_B
    prior_cdf = 2.0 / np.pi * np.arcsin(np.sqrt(p))  # I_p(1/2, 1/2), the arcsine law
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if side == "lower":
            log_mass = np.log(betaincc(a + s, b + f, p)) - np.log1p(-prior_cdf)
        else:
            log_mass = np.log(betainc(a + s, b + f, p)) - np.log(prior_cdf)
        out = (log_b + log_mass - np.where(s > 0, s * np.log(p), 0.0)
               - np.where(f > 0, f * np.log1p(-p), 0.0))
    return np.where(np.isnan(out), -np.inf, out)


def bernoulli_bounds(events: np.ndarray, level: float, iters: int = 32,
                     every_step: bool = False) -> dict[str, np.ndarray]:
    """Running anytime-valid bounds on the rate of a Bernoulli stream ``events`` [T] (0/1).

    Returns arrays [T]: ``n`` (trials so far), ``k`` (events), ``rate`` (k / n), ``lower``,
    ``upper`` (each a one-sided bound at ``level``, running intersection over time: a valid
    confidence sequence stays valid when intersected; bisection to 2^-iters, rounded outwards).
    Before any trial: lower 0, upper 1. With k fixed the lower bound falls as failures add up
    (each mixture term (1 - theta) / (1 - p) <= 1), and with the failures fixed the upper bound
    rises with k, so the running max / min only move at events / non-events: only those steps are
    solved (``every_step`` solves all, for checks).
    """
    from scipy.special import betaln

    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    x = np.asarray(events, dtype=np.float64)
    if x.ndim != 1 or (x.size and not np.isin(x, (0.0, 1.0)).all()):
        raise DataError("monitor: Bernoulli events must be a 1-D array of 0 / 1")
    n = np.arange(1, len(x) + 1, dtype=np.float64)
    k = np.cumsum(x)
    f = n - k
    rate = k / np.maximum(n, 1)
    c = np.log(1.0 / level)
    lower, upper = np.zeros_like(rate), np.ones_like(rate)
    at = np.flatnonzero(x == 1) if not every_step else np.flatnonzero(k > 0)
    if len(at):  # lower: the crossing in (0, rate]: the ratio is >= c near 0 when k > 0, <= 0 at p = rate
        kk, ff = k[at], f[at]
        log_b = betaln(PRIOR_A + kk, PRIOR_B + ff) - betaln(PRIOR_A, PRIOR_B)
        lo, hi = np.zeros(len(at)), rate[at].copy()
        for _ in range(iters):
            mid = (lo + hi) / 2
            reject = _log_mixture_ratio(kk, ff, np.maximum(mid, 1e-300), "lower", log_b) >= c
            lo, hi = np.where(reject, mid, lo), np.where(reject, hi, mid)
        lower[at] = lo
    at = np.flatnonzero(x == 0) if not every_step else np.flatnonzero(f > 0)
    if len(at):  # upper: the crossing in [rate, 1)
        kk, ff = k[at], f[at]
        log_b = betaln(PRIOR_A + kk, PRIOR_B + ff) - betaln(PRIOR_A, PRIOR_B)
        lo, hi = rate[at].copy(), np.ones(len(at))
        for _ in range(iters):
            mid = (lo + hi) / 2
            reject = _log_mixture_ratio(kk, ff, np.minimum(mid, 1 - 1e-16), "upper", log_b) >= c
            lo, hi = np.where(reject, lo, mid), np.where(reject, mid, hi)
        upper[at] = hi
    return {"n": n.astype(np.int64), "k": k.astype(np.int64), "rate": rate,
            "lower": np.maximum.accumulate(lower) if len(x) else lower,
            "upper": np.minimum.accumulate(upper) if len(x) else upper}


#: the risks the live monitor follows: name -> (which rows are trials, which trials are events).
LIVE_RISKS = ("fnr_exit", "selective_error")


@dataclass
class RiskFigures:
    """Running figures of one risk on a labelled stream, indexed by stream position (arrays [T])."""

    risk: str
    alpha: float
    level: float
    n: np.ndarray
    k: np.ndarray
    rate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    alarm_time: int | None  # first stream position (1-based) with lower > alpha
    certified_from: int | None  # first stream position with upper <= alpha
    extra: dict[str, Any] = field(default_factory=dict)


def live_risk(y: np.ndarray, label: np.ndarray, exit_: np.ndarray, risk: str, alpha: float,
              level: float = 0.01) -> RiskFigures:
    """Anytime-valid bounds on ``risk`` (fnr_exit | selective_error) over a labelled stream, in order.

    fnr_exit: trials are exited images with y = 1, events those labelled 0 (misses); selective
    error: trials are exited images, events the wrong ones. Unlabelled rows (y < 0) are skipped.
    Alarm when the lower bound exceeds ``alpha`` (see the module docstring for why that rule).
    """
    if risk not in LIVE_RISKS:
        raise ConfigError(f"risk must be one of {', '.join(LIVE_RISKS)}, got {risk!r}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    y = np.asarray(y, dtype=np.int64)
    label = np.asarray(label, dtype=np.int64)
    ex = np.asarray(exit_, dtype=bool)
    if not (len(y) == len(label) == len(ex)):
        raise DataError(f"monitor: y, label and exit have different lengths ({len(y)}, {len(label)}, {len(ex)})")
    labelled = y >= 0
    trial = ex & labelled & (y == 1) if risk == "fnr_exit" else ex & labelled
    event = trial & (label != y)
    b = bernoulli_bounds(event[trial].astype(np.float64), level)
    # carry the figures of the last trial forward to every stream position
    idx = np.cumsum(trial) - 1
    has = idx >= 0
    take = np.maximum(idx, 0)

    def spread(a: np.ndarray, before: float) -> np.ndarray:
        return np.where(has, a[take] if len(a) else before, before)

    lower, upper = spread(b["lower"], 0.0), spread(b["upper"], 1.0)
    return RiskFigures(risk, float(alpha), float(level), spread(b["n"], 0).astype(np.int64),
                       spread(b["k"], 0).astype(np.int64), spread(b["rate"], np.nan), lower, upper,
                       _first(lower > alpha), _first(upper <= alpha))


def _first(mask: np.ndarray) -> int | None:
    hit = np.flatnonzero(mask)
    return int(hit[0]) + 1 if len(hit) else None


def _finite_1d(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise DataError(f"monitor: {what} must be a 1-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(f"monitor: {what} hold {int((~np.isfinite(a)).sum())} NaN or infinite value(s); drop "
                        "records that could not be scored")
    return a
