"""Heads x exit policies of the decision-quality benchmark (``quality.py``), on one dataset's store.

Trains every head run (the package's heads with defaults and the seeds' recipe) with the real
``train_run``, fits each policy on val_calib and scores it on test, and summarises per risk family
how the best new head compares with the seed MLP.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from quality_data import cli, log

ALPHA, DELTA = 0.02, 0.1

SEED_RECIPE: dict[str, Any] = dict(
    hidden=768, dropout=0.3, label_smoothing=0.1, class_weights="balanced", lr=1e-4, epochs=15,
    early_stopping=False, ema_decay=0.0, standardize=False, warmup_frac=0.0, min_lr_ratio=1.0,
    grad_clip=0.0, batch_size=64, weight_decay=0.01,
)
HEAD_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {}),
    "gate_oof": ("gate", {"gate_target": "out_of_fold"}),
    "selectivenet": ("selectivenet", {}),
    "crc": ("crc", {}),
    "seed_mlp": ("mlp", SEED_RECIPE),
    "seed_gate": ("gate", {**SEED_RECIPE, "gate_target": "in_sample"}),
}
LTT = {
    "ltt_fnr_exit": dict(risk="fnr_exit", alpha=ALPHA, delta=DELTA),
    "ltt_selective_error": dict(risk="selective_error", alpha=ALPHA, delta=DELTA),
    "ltt_both": dict(risk="fnr_exit", alpha=ALPHA, eps=ALPHA, delta=DELTA),
}


def train_all(store: Path, runs: Path) -> dict[str, Path]:
    """Train every head run (skipping runs already complete); run folders by name."""
    from stage1.runs.steps import train_run

    out = {}
    for name, (head, hp) in HEAD_RUNS.items():
        run = runs / name
        if not (run / "config.json").exists():
            t = time.perf_counter()
            train_run(store, head, run, dict(hp), progress=False, argv=["benchmarks/quality.py", name])
            log(f"{store.name}/{name}: trained in {time.perf_counter() - t:.1f} s")
        out[name] = run
    return out


CALIBRATION_VARIANTS = {"cal": "temperature", "raw": None}


def policy_specs(head_run: str, has_selector: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """Policies evaluated for one head run: name -> (policy, params).

    Names are ``{family}/{variant}[@select]``: family ltt_fnr_exit / ltt_selective_error / ltt_both /
    crc_miss_rate; variant ``cal`` = the policies' default (temperature fit on 30% of val_calib,
    thresholds certified on the other 70%) or ``raw`` = no calibrator, all of val_calib certifies
    (max-softmax is monotone in the temperature, so the same exit sets are reachable);
    ``@select`` thresholds the head's learned selector instead of the probability.
    """
    scores = ["select", "p"] if has_selector else ["p"]
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    for sc in scores:
        tag = "" if sc == "p" else "@select"
        for variant, cal in CALIBRATION_VARIANTS.items():
            for name, params in LTT.items():
                specs[f"{name}/{variant}{tag}"] = ("ltt", {**params, "score": sc, "calibrator": cal})
            specs[f"crc_miss_rate/{variant}{tag}"] = ("crc", {"alpha": ALPHA, "score": sc, "calibrator": cal})
    if head_run == "seed_mlp":
        specs["seed_softmax_0.88"] = ("threshold", {"threshold": 0.88, "score": "p", "calibrator": None})
    if head_run == "seed_gate":
        specs["seed_gate_0.90"] = ("threshold", {"threshold": 0.90, "score": "select", "calibrator": None})
    return specs


def family(policy_name: str) -> str:
    """The risk family of a policy name (``ltt_both/cal@select`` -> ``ltt_both``)."""
    return policy_name.split("/")[0]


def evaluate_policies(run: Path) -> list[dict[str, Any]]:
    """Fit each policy on val_calib, score on test; one row per policy (what calibrate + evaluate do)."""
    from stage1.policies import POLICIES
    from stage1.policies.evaluate import evaluation_metrics
    from stage1.policies.metrics import selective_risks

    from stage1.runs import layout

    cfg = layout.read_config(run)
    cal_scores, cal_y, _, _ = layout.split_scores(run, "val_calib")
    te_scores, te_y, _, _ = layout.split_scores(run, "test")
    vs_scores, vs_y, _, _ = layout.split_scores(run, "val_select")
    rows = []
    for pname, (policy, params) in policy_specs(run.name, bool(cfg["head_has_selector"])).items():
        pol = POLICIES.create(policy, **params).fit(cal_scores, cal_y)
        m = evaluation_metrics(te_y, te_scores, pol.decide(te_scores))
        dv = pol.decide(vs_scores)
        mv = selective_risks(vs_y, dv.label.astype(np.int64), dv.exit)
        certifying = pol.guarantee != "none"
        rows.append({
            "head_run": run.name, "head": cfg["head"], "policy": pname, "guarantee": pol.guarantee,
            "certified": bool(pol.certified) if certifying else None, "n_needed": pol.n_needed,
            "reason": pol.reason,
            **{k: m[k] for k in ("accuracy", "augrc", "ece", "ece_uncalibrated", "coverage", "selective_error",
                                 "fnr_exit", "miss_rate", "n", "n_pos")},
            "certified_coverage": (m["coverage"] if pol.certified else 0.0) if certifying else None,
            "within_target": within_target(policy, params, m) if certifying and pol.certified else None,
            **{f"val_select_{k}": mv[k] for k in ("coverage", "fnr_exit", "selective_error", "miss_rate")},
        })
    return rows


def within_target(policy: str, params: dict[str, Any], m: dict[str, Any]) -> bool:
    """Realised test risks of a certified policy at or under its targets (NaN = nothing exited: ok)."""
    def ok(v: float, target: float) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v)) or v <= target + 1e-12

    if policy == "crc":
        return ok(m["miss_rate"], params["alpha"])
    risk = {"fnr_exit": "fnr_exit", "selective_error": "selective_error"}[params["risk"]]
    good = ok(m[risk], params["alpha"])
    if params.get("eps") is not None:
        good = good and ok(m["selective_error"], params["eps"])
    return good


def family_targets(fam: str) -> tuple[str, float, float | None]:
    """(risk, alpha, eps) a risk family's policies target (``ltt_both``: fnr_exit 2% and selective error 2%)."""
    if fam == "crc_miss_rate":
        return "miss_rate", ALPHA, None
    p = LTT[fam]
    return p["risk"], p["alpha"], p.get("eps")


def exit_ceiling(s: np.ndarray, yhat: np.ndarray, y: np.ndarray, risk: str, alpha: float,
                 eps: float | None = None) -> float:
    """Diagnostic ceiling, NOT a policy: the largest coverage any threshold pair on ``s`` reaches with
    ``risk`` <= alpha (and selective error <= eps) measured with the labels ``y`` themselves.

    The exit sets are the ones ltt searches (exit as 0 where yhat = 0 and s >= t0, exit as 1 where
    yhat = 1 and s >= t1), over every distinct score value instead of ltt's grid, so no rule on the
    same scores does better on these rows. A risk with nothing to count (no exited positive) is
    within target, as ``within_target`` scores it.
    """
    from stage1.policies.risks import get_risk

    s, yhat, y = (np.asarray(a) for a in (s, yhat, y))

    def side(pred: int) -> tuple[np.ndarray, np.ndarray]:
        """Exits with y=1 and with y=0 among rows predicted ``pred``, per threshold (inf first, then descending)."""
        m = yhat == pred
        t = np.r_[np.inf, np.unique(s[m])[::-1]]
        out = []
        for c in (1, 0):
            v = np.sort(s[m & (y == c)])
            out.append(len(v) - np.searchsorted(v, t, side="left"))
        return out[0], out[1]

    miss, ok0 = side(0)
    hit, fa = side(1)
    miss, ok0, hit, fa = miss[:, None], ok0[:, None], hit[None, :], fa[None, :]
    exited = {(1, 0): miss, (0, 0): ok0, (1, 1): hit, (0, 1): fa}
    total = {(yc, pc): int(np.sum((y == yc) & (yhat == pc))) for yc, pc in exited}
    events, trials = get_risk(risk).from_cells(exited, total)
    exits = miss + ok0 + hit + fa
    ok = (trials == 0) | (events <= alpha * trials + 1e-9)
    if eps is not None:
        ok &= (exits == 0) | ((miss + fa) <= eps * exits + 1e-9)
    return float((np.where(ok, exits, 0)).max() / max(len(y), 1))


def score_views(scores: dict[str, np.ndarray], score: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence the exit rule thresholds, predicted label): max-softmax or the learned selector.
    The policies' calibrators (temperature here) are monotone, so the raw scores rank rows alike."""
    from scipy.special import softmax

    p = softmax(np.asarray(scores["logits"], dtype=np.float64), axis=1)[:, 1]
    yhat = (p >= 0.5).astype(np.int64)
    conf = np.maximum(p, 1 - p) if score == "p" else np.asarray(scores["select"], dtype=np.float64)
    return conf, yhat


def ceiling_on_test(run: Path, score: str, fam: str) -> float:
    """``exit_ceiling`` of one head run's test scores (``score`` "p" or "select") for a risk family."""
    from stage1.runs import layout

    s, y, _, _ = layout.split_scores(run, "test")
    conf, yhat = score_views(s, score)
    return exit_ceiling(conf, yhat, y, *family_targets(fam))


#: How the product may choose a head x policy without voiding the certificate (see ``product_choice``).
CHOICE_RULES = ("split_delta", "select_only")


def product_choice(runs: dict[str, Path], fam: str, rule: str = "split_delta") -> dict[str, Any]:
    """What the product itself would ship for one risk family, scored once on test.

    Candidates: every new head (not the seed recipe) x every policy variant of the family. Rules:

    * ``split_delta`` (the demo's, ``policies.selection.choose_split_delta``): each candidate's ltt is
      certified on all of val_calib at delta / K, so whichever is chosen holds at delta; the choice
      is the largest certified coverage on val_select, then the lowest val_select AUGRC.
    * ``select_only``: each candidate's policy is fitted on val_select alone and ranked the same way
      there; only the winner is certified, once, on all of val_calib at the full delta (the choice
      never saw val_calib, so nothing is split).

    Test is looked at once, for the winner. crc has no delta: ``split_delta`` is then unadjusted.
    ``efficiency`` = the winner's certified test coverage / ``exit_ceiling`` on the winner's own
    test scores (the test-label ceiling).
    """
    from stage1.policies import POLICIES
    from stage1.policies import metrics as M
    from stage1.policies.evaluate import evaluation_metrics
    from stage1.runs import layout

    cands = []
    for name, run in runs.items():
        if name.startswith("seed"):
            continue
        cfg = layout.read_config(run)
        for pname, (policy, params) in policy_specs(name, bool(cfg["head_has_selector"])).items():
            if family(pname) == fam:
                cands.append((name, run, pname, policy, params))
    k = len(cands)
    has_delta = "delta" in cands[0][4]
    tried = []
    for name, run, pname, policy, params in cands:
        vs_s, vs_y, _, _ = layout.split_scores(run, "val_select")
        if rule == "split_delta":
            cal_s, cal_y, _, _ = layout.split_scores(run, "val_calib")
            pol = POLICIES.create(policy, **{**params, **({"delta": params["delta"] / k} if has_delta else {})})
            pol.fit(cal_s, cal_y)
        else:
            pol = POLICIES.create(policy, **params).fit(vs_s, vs_y)
        dv = pol.decide(vs_s)
        conf, yhat = score_views(vs_s, params["score"])
        tried.append({"head_run": name, "policy": pname, "certified": bool(pol.certified),
                      "val_select_coverage": float(np.mean(dv.exit)) if pol.certified else 0.0,
                      "val_select_augrc": M.augrc(conf, (yhat != vs_y).astype(np.int64)),
                      "_pol": pol, "_run": run, "_params": params, "_policy": policy})
    win = max(tried, key=lambda r: (r["certified"], r["val_select_coverage"], -r["val_select_augrc"]))
    policy, params, pol = win["_policy"], win["_params"], win["_pol"]
    if rule == "select_only":
        cal_s, cal_y, _, _ = layout.split_scores(win["_run"], "val_calib")
        pol = POLICIES.create(policy, **params).fit(cal_s, cal_y)
    te_s, te_y, _, _ = layout.split_scores(win["_run"], "test")
    m = evaluation_metrics(te_y, te_s, pol.decide(te_s))
    cov = m["coverage"] if pol.certified else 0.0
    ceiling = ceiling_on_test(win["_run"], params["score"], fam)
    best_any = max(ceiling_on_test(r["_run"], r["_params"]["score"], fam) for r in tried)
    how = {"split_delta": "bonferroni (delta / K on all of val_calib)" if has_delta else "unadjusted",
           "select_only": "chosen on val_select alone; the winner certified once on all of val_calib at delta"}[rule]
    return {
        "rule": rule, "candidates": k, "selection": how,
        "chosen_by": "val_select certified coverage, then val_select AUGRC",
        "head_run": win["head_run"], "policy": win["policy"], "certified": bool(pol.certified),
        "val_select_coverage": win["val_select_coverage"],
        "certified_coverage": cov,
        **{k2: m[k2] for k2 in ("fnr_exit", "selective_error", "miss_rate")},
        "within_target": within_target(policy, params, m) if pol.certified else None,
        "ceiling": ceiling, "efficiency": cov / ceiling if ceiling > 0 else None,
        "ceiling_any_candidate": best_any,
        "tried": [{k2: v for k2, v in r.items() if not k2.startswith("_")} for r in tried],
    }


def cli_roundtrip(run: Path) -> dict[str, Any]:
    """The primary policy once through the real `calibrate` and `evaluate` commands."""
    out = cli("calibrate", str(run), "--policy", "ltt", "--risk", "fnr_exit", "--alpha", str(ALPHA),
              "--eps", str(ALPHA), "--delta", str(DELTA), "--score", "p")
    cli("evaluate", str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    return {"calibrate": json.loads(out[out.index("{"):]), "coverage": metrics["coverage"],
            "fnr_exit": metrics["fnr_exit"], "selective_error": metrics["selective_error"]}


def best_calibrated_ece(run: Path) -> dict[str, float]:
    """Positive-class test ECE of each calibrator fit on val_calib (identity = raw softmax)."""
    from scipy.special import softmax

    from stage1.runs import layout
    from stage1.policies import metrics as M
    from stage1.policies.calibrators import CALIBRATORS

    cal_scores, cal_y, _, _ = layout.split_scores(run, "val_calib")
    te_scores, te_y, _, _ = layout.split_scores(run, "test")
    out = {"identity": M.ece(te_y, softmax(te_scores["logits"].astype(np.float64), axis=1)[:, 1])}
    for name in ("temperature", "platt", "isotonic", "beta"):
        cal = CALIBRATORS.create(name).fit(cal_scores["logits"].astype(np.float64), cal_y)
        out[name] = M.ece(te_y, cal.p1(te_scores["logits"].astype(np.float64)))
    return out


def head_metrics(run: Path) -> dict[str, Any]:
    """Head-level test metrics independent of any policy: accuracy and AUGRC of its own ``select``
    score and of max-softmax, and the positive-class ECE after each calibrator (fit on val_calib)."""
    from scipy.special import softmax

    from stage1.runs import layout
    from stage1.policies import metrics as M

    s, y, _, _ = layout.split_scores(run, "test")
    p = softmax(s["logits"].astype(np.float64), axis=1)[:, 1]
    err = ((p >= 0.5).astype(np.int64) != y).astype(np.int64)
    ece = best_calibrated_ece(run)
    best_cal = min((k for k in ece if k != "identity"), key=ece.get)
    return {"accuracy": float(1 - err.mean()), "augrc_select": M.augrc(s["select"].astype(np.float64), err),
            "augrc_maxp": M.augrc(np.maximum(p, 1 - p), err), "ece_by_calibrator": ece,
            "ece_best_calibrated": ece[best_cal], "best_calibrator": best_cal,
            **{f"ceiling_test_coverage_{fam}": max(ceiling_on_test(run, sc, fam) for sc in ("p", "select"))
               for fam in (*LTT, "crc_miss_rate")}}


def summarise(rows: list[dict[str, Any]], heads_info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per risk family: best certified coverage of the new heads (any variant / score) vs the seed
    MLP's best under the same ltt family; AUGRC of the best head vs the seed MLP."""
    out: dict[str, Any] = {}
    for fam in [*LTT, "crc_miss_rate"]:
        fam_rows = [r for r in rows if family(r["policy"]) == fam]
        seed = [r for r in fam_rows if r["head_run"] == "seed_mlp"]
        new = [r for r in fam_rows if not r["head_run"].startswith("seed")]
        best_seed = max(seed, key=lambda r: r["certified_coverage"] or 0.0) if seed else None
        best = max(new, key=lambda r: r["certified_coverage"] or 0.0) if new else None
        seed_cov = best_seed["certified_coverage"] if best_seed else None
        best_cov = best["certified_coverage"] if best else None
        ratio = None
        if seed_cov and best_cov is not None:
            ratio = best_cov / seed_cov
        elif best_cov:
            ratio = math.inf
        keys = ("head_run", "policy", "certified_coverage", "fnr_exit", "selective_error", "miss_rate", "within_target")
        out[fam] = {"seed_mlp": None if best_seed is None else {k: best_seed[k] for k in keys},
                    "best_new_head": None if best is None else {k: best[k] for k in keys},
                    "ratio_vs_seed": ratio,
                    "all_certified_within_target": all(r["within_target"] for r in fam_rows if r["certified"])}
    new_heads = {k: v for k, v in heads_info.items() if not k.startswith("seed")}
    best_run = min(new_heads, key=lambda k: min(new_heads[k]["augrc_select"], new_heads[k]["augrc_maxp"]))
    best_augrc = min(new_heads[best_run]["augrc_select"], new_heads[best_run]["augrc_maxp"])
    seed_augrc = heads_info["seed_mlp"]["augrc_maxp"]
    out["augrc"] = {"seed_mlp": seed_augrc, "best_head": best_run, "best": best_augrc,
                    "ratio_vs_seed": best_augrc / seed_augrc}
    out["ece_best_calibrated"] = {k: {"ece": v["ece_best_calibrated"], "calibrator": v["best_calibrator"]}
                                  for k, v in heads_info.items()}
    return out


def run_dataset(name: str, store: Path, runs_root: Path) -> dict[str, Any]:
    """Train, evaluate and summarise every head x policy on one store; the dataset's result object."""
    runs = train_all(store, runs_root / name)
    rows: list[dict[str, Any]] = []
    for run in runs.values():
        rows += evaluate_policies(run)
    heads_info = {n: head_metrics(r) for n, r in runs.items()}
    return {"rows": rows, "heads": heads_info, "summary": summarise(rows, heads_info),
            "product_choice": {f"{fam}/{rule}": product_choice(runs, fam, rule)
                               for fam in (*LTT, "crc_miss_rate") for rule in CHOICE_RULES},
            "cli_roundtrip_mlp": cli_roundtrip(runs["mlp"]),
            "training_seconds": {n: json.loads((r / "config.json").read_text())["training"]["seconds_fit"]
                                 for n, r in runs.items()}}
