"""Policies vs peers, side by side in one run: certified exit (LTT) vs MAPIE, calibrators vs
scikit-learn / netcal; dirichletcal and torch-uncertainty when they import.

The LTT comparison certifies the same thing on the same scores and the same threshold-pair grid:
exit as 1 when p >= t1, exit as 0 when p <= 1 - t0, P(FNR_exit > alpha) <= delta, maximum coverage.
MAPIE gets it through ``BinaryClassificationController`` with multi-dimensional parameters (NaN =
abstain), a custom FNR_exit ``BinaryRisk`` and ``abstention_rate`` as the secondary objective.

    python benchmarks/policies_bench.py [--n 20000] [--repeats 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.special import softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage1.policies import POLICIES  # noqa: E402
from stage1.policies.audit import synthetic_scores  # noqa: E402
from stage1.policies.calibrators import CALIBRATORS, as_logits  # noqa: E402
from stage1.policies.metrics import nll, selective_risks  # noqa: E402


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(last result, median seconds over ``repeats`` calls)."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def _test_risks(t0: float | None, t1: float | None, p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    t0 = np.inf if t0 is None else t0
    t1 = np.inf if t1 is None else t1
    label = (p >= 0.5).astype(np.int64)
    ex = np.where(label == 1, p >= t1, 1 - p >= t0)
    r = selective_risks(y, label, ex)
    return {k: r[k] for k in ("coverage", "fnr_exit", "selective_error")}


def bench_ltt(
    n: int, alpha: float, delta: float, eps: float | None, repeats: int, seed: int
) -> dict[str, Any]:
    """Our LTT (default 'auto', holm, bonferroni) vs MAPIE (bonferroni_holm, bonferroni) on one grid."""
    shape = {"prevalence": 0.3, "separation": 3.0}
    cal, y = synthetic_scores(n, seed=seed, **shape)
    test, ty = synthetic_scores(n, seed=seed + 1, **shape)
    p = softmax(cal["logits"], axis=1)[:, 1]
    pt = softmax(test["logits"], axis=1)[:, 1]
    template = POLICIES.create("ltt", calibrator=None, alpha=alpha, delta=delta, eps=eps)
    thresholds = template.thresholds()  # inf (never) + our default grid, shared with MAPIE
    grid = [float(v) for v in thresholds[1:]]
    out: dict[str, Any] = {
        "n_calib": n, "n_pairs": len(thresholds) ** 2, "alpha": alpha, "delta": delta, "eps": eps,
        "data": {"n": n, **shape, "positives": int(y.sum())},
    }
    ours: dict[str, Any] = {}
    for mt in ("auto", "holm", "bonferroni"):
        def fit(mt: str = mt):
            return POLICIES.create(
                "ltt", calibrator=None, alpha=alpha, delta=delta, eps=eps, multiple_testing=mt, grid=grid
            ).fit(cal, y)

        pol, sec = _timed(fit, repeats)
        ours[mt] = {
            "procedure": pol.procedure(), "fit_s": sec, "certified": pol.certified, "t0": pol.t0, "t1": pol.t1,
            "calib_coverage": float(pol.decide(cal).exit.mean()),
            **{f"test_{k}": v for k, v in _test_risks(pol.t0, pol.t1, pt, ty).items()},
        }
    out["ours"] = ours
    try:
        import mapie.risk_control as mrc
    except ImportError as exc:  # pragma: no cover - dev extra
        out["mapie"] = {"skipped": f"mapie not importable: {exc}"}
        return out

    def predict(X, t0, t1):
        x = np.asarray(X)[:, 0]
        pred = np.full(len(x), np.nan)
        pred[(x >= 0.5) & (x >= t1)] = 1
        pred[(x < 0.5) & (1 - x >= t0)] = 0
        return pred

    fnr_exit = mrc.BinaryRisk(
        risk_occurrence=lambda yt, yp: yp == 0,
        risk_condition=lambda yt, yp: (yt == 1) & ~np.isnan(yp),
        higher_is_better=False,
    )
    sel_error = mrc.BinaryRisk(
        risk_occurrence=lambda yt, yp: yp != yt,
        risk_condition=lambda yt, yp: ~np.isnan(yp),
        higher_is_better=False,
    )
    risk: Any = fnr_exit if eps is None else [fnr_exit, sel_error]
    level: Any = alpha if eps is None else [alpha, eps]
    pairs = np.array([(a, b) for a in thresholds for b in thresholds])
    mapie: dict[str, Any] = {}
    for fwer in ("bonferroni_holm", "bonferroni"):
        def calibrate(fwer: str = fwer):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctl = mrc.BinaryClassificationController(
                    predict, risk, level, confidence_level=1 - delta,
                    best_predict_param_choice=mrc.abstention_rate, list_predict_params=pairs,
                    fwer_method=fwer,
                )
                return ctl.calibrate(p[:, None], y)

        ctl, sec = _timed(calibrate, max(1, repeats // 5))
        best = ctl.best_predict_param
        t0, t1 = (None, None) if best is None else best
        mapie[fwer] = {
            "fit_s": sec, "certified": best is not None, "t0": t0, "t1": t1,
            "calib_coverage": _test_risks(t0, t1, p, y)["coverage"],
            "n_valid": len(ctl.valid_predict_params),
            "n_nan_pvalues": int(np.isnan(np.asarray(ctl.p_values, dtype=float)).sum()),
            **{f"test_{k}": v for k, v in _test_risks(t0, t1, pt, ty).items()},
        }
    out["mapie"] = mapie
    out["speedup_default_vs_mapie_default"] = mapie["bonferroni_holm"]["fit_s"] / ours["auto"]["fit_s"]
    out["speedup_bonferroni_vs_mapie_bonferroni"] = mapie["bonferroni"]["fit_s"] / ours["bonferroni"]["fit_s"]
    out["coverage_gain_default_vs_mapie_default"] = (
        ours["auto"]["calib_coverage"] - mapie["bonferroni_holm"]["calib_coverage"]
    )
    out["speedup_default_vs_fastest_mapie"] = min(m["fit_s"] for m in mapie.values()) / ours["auto"]["fit_s"]
    out["coverage_gain_default_vs_best_mapie"] = ours["auto"]["calib_coverage"] - max(
        m["calib_coverage"] for m in mapie.values()
    )
    mb = mapie["bonferroni"]
    out["same_pair_bonferroni"] = (ours["bonferroni"]["t0"], ours["bonferroni"]["t1"]) == (
        np.inf if mb["t0"] is None else mb["t0"], np.inf if mb["t1"] is None else mb["t1"]
    )
    return out


def bench_calibrators(n: int, repeats: int, seed: int) -> dict[str, Any]:
    """Fit time and test NLL: temperature vs scikit-learn, beta vs netcal, matrix/dirichlet ours."""
    cal, y = synthetic_scores(n, prevalence=0.3, overconfidence=2.5, seed=seed + 10)
    test, ty = synthetic_scores(n, prevalence=0.3, overconfidence=2.5, seed=seed + 11)
    z, zt = cal["logits"][:, 1] - cal["logits"][:, 0], test["logits"][:, 1] - test["logits"][:, 0]
    out: dict[str, Any] = {"n": n, "raw_test_nll": nll(ty, 1 / (1 + np.exp(-zt)))}
    for name in ("temperature", "platt", "isotonic", "beta", "dirichlet", "matrix"):
        # two-column logits: every calibrator reads them as logits (platt reads a 1-D input as a score in [0, 1])
        c, sec = _timed(lambda name=name: CALIBRATORS.create(name).fit(as_logits(z), y), repeats)
        out[f"ours_{name}"] = {"fit_s": sec, "test_nll": nll(ty, c.p1(as_logits(zt)))}
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator
    from sklearn.linear_model import LogisticRegression

    margin = LogisticRegression().fit(z[:200, None], y[:200])
    margin.coef_, margin.intercept_ = np.array([[1.0]]), np.array([0.0])
    for method in ("temperature", "sigmoid", "isotonic"):
        sk, sec = _timed(
            lambda m=method: CalibratedClassifierCV(FrozenEstimator(margin), method=m).fit(z[:, None], y), repeats
        )
        out[f"sklearn_{method}"] = {"fit_s": sec, "test_nll": nll(ty, np.clip(sk.predict_proba(zt[:, None])[:, 1], 0, 1))}
    try:
        from netcal.scaling import BetaCalibration

        p, pt = 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(-zt))

        def netcal_fit():
            b = BetaCalibration()
            b.fit(p, y)
            return b

        b, sec = _timed(netcal_fit, max(1, repeats // 2))
        out["netcal_beta"] = {"fit_s": sec, "test_nll": nll(ty, np.clip(b.transform(pt), 0, 1))}
    except ImportError as exc:  # pragma: no cover - dev extra
        out["netcal_beta"] = {"skipped": f"netcal not importable: {exc}"}
    for mod, label in (("dirichletcal", "dirichletcal"), ("torch_uncertainty.post_processing", "torch_uncertainty")):
        try:
            __import__(mod)
            out[label] = {"skipped": "importable but not wired into this benchmark"}
        except Exception as exc:  # noqa: BLE001 - report any import failure as a skip reason
            out[label] = {"skipped": f"not importable here ({type(exc).__name__}: {exc})"}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="calibration points (default 20000)")
    ap.add_argument("--alpha", type=float, default=0.02)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--eps", type=float, default=0.05, help="selective-error bound of the second scenario")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (median; MAPIE gets repeats//5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write all figures here as one JSON object")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {
        "ltt_fnr_exit": bench_ltt(args.n, args.alpha, args.delta, None, args.repeats, args.seed),
        "ltt_fnr_exit_and_selective_error": bench_ltt(args.n, args.alpha, args.delta, args.eps, args.repeats, args.seed),
        "calibrators": bench_calibrators(args.n, args.repeats, args.seed),
        "note": "timings on a shared 2-core CPU (other jobs running); ratios are measured in this one run",
    }
    for key in ("ltt_fnr_exit", "ltt_fnr_exit_and_selective_error"):
        ltt = res[key]
        print(f"\n{key}: {ltt['n_calib']} calibration points, {ltt['n_pairs']} threshold pairs, "
              f"alpha={ltt['alpha']}, delta={ltt['delta']}, eps={ltt['eps']}")
        rows = [(f"ours {k} ({v['procedure']})" if k == "auto" else "ours " + k, v) for k, v in ltt["ours"].items()]
        rows += [("mapie " + k, v) for k, v in ltt.get("mapie", {}).items() if isinstance(v, dict)]
        print(f"{'method':30s} {'fit s':>8s} {'cert':>5s} {'t0':>7s} {'t1':>7s} {'cal cov':>7s} "
              f"{'test cov':>8s} {'test fnr':>8s} {'test sel':>8s}")
        for name, v in rows:
            f = lambda t: "never" if t is None or t == np.inf else f"{t:.4f}"  # noqa: E731
            print(f"{name:30s} {v['fit_s']:8.4f} {str(v['certified']):>5s} {f(v['t0']):>7s} {f(v['t1']):>7s} "
                  f"{v['calib_coverage']:7.4f} {v['test_coverage']:8.4f} {v['test_fnr_exit']:8.4f} "
                  f"{v['test_selective_error']:8.4f}")
        if "speedup_default_vs_mapie_default" in ltt:
            print(f"speedup ours default vs MAPIE default (bonferroni_holm): "
                  f"{ltt['speedup_default_vs_mapie_default']:.1f}x; vs fastest MAPIE "
                  f"{ltt['speedup_default_vs_fastest_mapie']:.1f}x; coverage gain "
                  f"{ltt['coverage_gain_default_vs_mapie_default']:+.4f} (vs best MAPIE "
                  f"{ltt['coverage_gain_default_vs_best_mapie']:+.4f})")
            print(f"speedup bonferroni vs bonferroni: {ltt['speedup_bonferroni_vs_mapie_bonferroni']:.1f}x, "
                  f"same certified pair: {ltt['same_pair_bonferroni']}; MAPIE NaN p-values (bonferroni_holm): "
                  f"{ltt['mapie']['bonferroni_holm']['n_nan_pvalues']}")
    print(f"\nCalibrators on {res['calibrators']['n']} points (raw test NLL {res['calibrators']['raw_test_nll']:.4f})")
    for k, v in res["calibrators"].items():
        if isinstance(v, dict):
            print(f"  {k:22s} " + (f"skipped: {v['skipped']}" if "skipped" in v
                                   else f"fit {v['fit_s']:.4f}s  test NLL {v['test_nll']:.5f}"))
    print("(timings under load: shared 2-core CPU)")
    if args.json is not None:
        from stage1._core.io import atomic_write_json, json_safe

        atomic_write_json(args.json, json_safe(res))
    return res


if __name__ == "__main__":
    main()
