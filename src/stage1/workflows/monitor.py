"""``stage1 monitor``: is the stream still exchangeable with val_calib, and is the live risk still below alpha?

A bundle's guarantee assumes challenge images are exchangeable with its val_calib. This module
feeds a stream (a folder of images run through the bundle, or a JSONL of predict records) to the
conformal test martingales of ``policies.monitor`` (channels: the policy's select score, and the
novelty score when the bundle has a novelty scorer) and, with labels, to the anytime-valid bounds
on FNR_exit and selective error; it writes the running figures (CSV), a plot (PNG) and a summary.

Reference data the monitor ranks the stream against (``load_reference``):
- select: the val_calib select scores the policy was certified on (only the certification part
  when the policy fit its calibrator on part of val_calib: those rows are exchangeable with new
  images, the calibrator's own rows are not). From ``MONITOR_FILE`` in the bundle when it has one
  (``write_monitor_reference`` makes it at export), else from the bundle's source run folder.
- novelty: ``policies.novelty.NOVELTY_FILE`` and policy.json["novelty"], when calibrate recorded one.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from stage1._core.errors import ConfigError, DataError, ExistsError
from stage1.policies.monitor import ExchangeabilityMonitor, live_risk
from stage1.policies.novelty import NoveltyScorer
from stage1.workflows.bundle import MONITOR_FILE  # the monitor's reference scores in a bundle

#: tensor of val_calib select scores (the certification part) inside MONITOR_FILE.
CALIB_SELECT_TENSOR = "calib_select_score"
#: files ``monitor --out`` writes.
MONITOR_CSV, MONITOR_PNG, MONITOR_JSON = "monitor.csv", "monitor.png", "monitor.json"
#: default alpha of a live risk when the policy names none.
DEFAULT_ALPHA = 0.1


@dataclass
class MonitorReference:
    """What a stream is compared with: val_calib select scores, an optional novelty scorer, risk levels."""

    select: np.ndarray
    novelty: NoveltyScorer | None
    alphas: dict[str, float]
    source: str
    policy: dict[str, Any] = field(default_factory=dict)


# -- reference -------------------------------------------------------------------------------------
def certify_select_scores(policy_json: dict[str, Any], scores: dict[str, np.ndarray], y: np.ndarray) -> np.ndarray:
    """The policy's select score on the val_calib rows it certified on (not the calibrator's rows)."""
    from stage1.policies import policy_from_dict
    from stage1.policies.base import stratified_split

    policy = policy_from_dict(policy_json)
    s = policy.decide(scores).score
    frac = float(policy._fraction())  # the share of val_calib that fit the calibrator (0: none)
    if frac > 0:
        _, cert = stratified_split(np.asarray(y), frac, policy.seed)
        if len(cert):
            s = s[cert]
    return np.asarray(s, dtype=np.float64)


def run_select_reference(run: str | os.PathLike[str]) -> np.ndarray:
    """val_calib select scores of a run folder (its scores.safetensors and policy.json)."""
    from stage1.runs import layout

    scores, y, _, _ = layout.split_scores(run, "val_calib")
    return certify_select_scores(layout.read_policy(run), scores, y)


def write_monitor_reference(folder: str | os.PathLike[str], run: str | os.PathLike[str]) -> dict[str, Any]:
    """Write MONITOR_FILE (the run's val_calib select scores) into ``folder``; its entry {file, sha256, n}."""
    from stage1._core.io import save_safetensors_atomic, sha256_file

    s = run_select_reference(run)
    path = Path(folder) / MONITOR_FILE
    save_safetensors_atomic({CALIB_SELECT_TENSOR: np.ascontiguousarray(s)}, path,
                            metadata={"format": "stage1-monitor", "schema_version": "1"})
    return {"file": MONITOR_FILE, "sha256": sha256_file(path), "n": int(len(s))}


def policy_alphas(policy_json: dict[str, Any]) -> dict[str, float]:
    """The level each live risk is held to: the policy's alpha for its risk (fnr_exit by default),
    eps for selective error; DEFAULT_ALPHA where the policy names none."""
    params = policy_json.get("params") or {}
    alpha, risk, eps = params.get("alpha"), params.get("risk", "fnr_exit"), params.get("eps")
    out = {"fnr_exit": DEFAULT_ALPHA, "selective_error": DEFAULT_ALPHA}
    if isinstance(alpha, (int, float)) and risk in out:
        out[risk] = float(alpha)
    if isinstance(eps, (int, float)):
        out["selective_error"] = float(eps)
    return out


def load_reference(bundle: str | os.PathLike[str]) -> MonitorReference:
    """The bundle's monitor reference (MONITOR_FILE, else its source run) and novelty scorer (if any)."""
    from stage1._core.io import load_safetensors, read_json, sha256_file
    from stage1.policies.novelty import read_novelty
    from stage1.workflows.bundle import BundleError, verify_files

    bundle = Path(bundle)
    manifest = verify_files(bundle)
    policy_json = read_json(bundle / "policy.json")
    files = manifest.get("files") or {}
    path = bundle / MONITOR_FILE
    if path.is_file():
        if files.get(MONITOR_FILE) != sha256_file(path):  # verify_files checked a listed one: an unlisted file
            raise BundleError(f"{path}: not listed in bundle.json (or altered); re-export the run")
        tensors = load_safetensors(path)
        if CALIB_SELECT_TENSOR not in tensors:
            raise BundleError(f"{path}: no {CALIB_SELECT_TENSOR} array; re-export the run")
        select, source = np.asarray(tensors[CALIB_SELECT_TENSOR], dtype=np.float64), str(path)
    else:
        run = Path(str(manifest.get("source_run", "")))
        if not (run / "policy.json").is_file() or not (run / "scores.safetensors").is_file():
            raise BundleError(f"{bundle}: holds no {MONITOR_FILE} and its source run {run} is not on this machine; "
                              "the monitor needs the val_calib scores: re-export the run with this version")
        if sha256_file(run / "policy.json") != files.get("policy.json"):
            raise BundleError(f"{run}/policy.json differs from the bundle's (calibrate ran since the export); "
                              "re-export the run so the monitor uses the policy the bundle holds")
        select, source = run_select_reference(run), str(run)
    if len(select) == 0 or not np.isfinite(select).all():
        raise BundleError(f"{source}: the val_calib select scores are empty or not finite; re-export the run")
    novelty = None
    if isinstance(policy_json.get("novelty"), dict):
        novelty = read_novelty(bundle, policy_json["novelty"])
    return MonitorReference(select, novelty, policy_alphas(policy_json), source, policy_json)


# -- streams ---------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Predict records, one JSON object a line (blank lines skipped); a DataError naming the bad line."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i}: not JSON ({exc.msg}); expected one predict record per line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i}: expected a JSON object (a predict record)")
            out.append(rec)
    return out


def predict_folder(bundle: str | os.PathLike[str], folder: str | os.PathLike[str],
                   backbone: str | os.PathLike[str] | None = None, device: str = "cpu",
                   batch_size: int = 16) -> list[dict[str, Any]]:
    """Predict records for a folder's images (sorted); with ``novelty_score`` / ``novelty_p`` when the
    bundle has a novelty scorer (the predictor adds them)."""
    from stage1.workflows.predictor import Stage1Predictor, expand_inputs

    predictor = Stage1Predictor.from_bundle(bundle, backbone=backbone, device=device)
    return list(predictor.iter_predict(expand_inputs([folder]), batch_size=batch_size))


def labels_for(records: Sequence[dict[str, Any]], labels_csv: str | os.PathLike[str],
               base: str | os.PathLike[str]) -> np.ndarray:
    """y per record (-1 = unlabelled) from a labels CSV (path,label): a record matches its path, its
    path relative to ``base`` (the stream folder, or the JSONL's folder), or the longest path suffix."""
    from stage1.featstore.labels import parse_labels_csv

    entries, _ = parse_labels_csv(labels_csv)
    table = {e.path: e.label for e in entries}
    y = np.full(len(records), -1, dtype=np.int64)
    for i, rec in enumerate(records):
        path = str(rec.get("path", ""))
        posix = Path(path).as_posix()
        cands = [posix]
        try:
            cands.append(Path(os.path.relpath(path, base)).as_posix())
        except ValueError:  # another drive (Windows)
            pass
        parts = posix.split("/")
        cands += ["/".join(parts[j:]) for j in range(1, len(parts))]
        hit = next((c for c in cands if c in table), None)
        if hit is not None:
            y[i] = table[hit]
    if not (y >= 0).any():
        raise DataError(f"{labels_csv}: matches none of the {len(records)} stream record(s) by path; give paths "
                        f"relative to {base}")
    return y


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class MonitorResult:
    """Everything ``run_monitor`` computed: the usable records, figures and a summary."""

    records: list[dict[str, Any]]
    exchangeability: Any
    risks: dict[str, Any]
    summary: dict[str, Any]


def run_monitor(bundle: str | os.PathLike[str], stream: str | os.PathLike[str],
                labels: str | os.PathLike[str] | None = None, level: float = 0.01, out: str | os.PathLike[str] | None = None,
                martingale: str = "simple_jumper", alpha: float | None = None, backbone: str | None = None,
                device: str = "cpu", batch_size: int = 16, seed: int = 0) -> MonitorResult:
    """Monitor ``stream`` (an image folder or a predict JSONL) against ``bundle``; write ``out`` if given."""
    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise ExistsError(f"--out {out} already exists and is not empty; choose another folder")
    if alpha is not None and not 0.0 < alpha < 1.0:
        raise ConfigError(f"--alpha {alpha}: expected a risk level in (0, 1)")
    ref = load_reference(bundle)
    stream = Path(stream)
    if stream.is_dir():
        records, base = predict_folder(bundle, stream, backbone, device, batch_size), stream
    elif stream.is_file():
        records, base = read_jsonl(stream), stream.parent
    else:
        raise DataError(f"--stream {stream}: no such folder or JSONL file")
    usable = [r for r in records if "error" not in r and _finite(r.get("select_score"))]
    skipped = len(records) - len(usable)
    if not usable:
        raise DataError(f"--stream {stream}: none of its {len(records)} record(s) has a select_score to monitor")
    select = np.array([float(r["select_score"]) for r in usable])
    calib = {"select": ref.select}
    scores = {"select": select}
    strange = {"select": "low"}
    novelty_note = "no novelty scorer in the bundle: select-score channel only"
    if ref.novelty is not None:
        have = [_finite(r.get("novelty_score")) for r in usable]
        if all(have):
            calib["novelty"] = ref.novelty.calib_scores_
            scores["novelty"] = np.array([float(r["novelty_score"]) for r in usable])
            strange["novelty"] = "high"
            novelty_note = "select and novelty channels, averaged"
        else:
            novelty_note = f"{len(have) - sum(have)} record(s) lack novelty_score: select-score channel only"
    mon = ExchangeabilityMonitor(calib, strange, level=level, martingale=martingale, seed=seed)
    fig = mon.update(scores)
    risks: dict[str, Any] = {}
    y = None
    if labels is not None:
        y = labels_for(usable, labels, base)
        label = np.array([-1 if r.get("label") is None else int(r["label"]) for r in usable])
        exit_ = np.array([r.get("decision") == "exit" for r in usable])
        for risk in ("fnr_exit", "selective_error"):
            a = float(alpha) if alpha is not None else ref.alphas[risk]
            risks[risk] = live_risk(y, np.where(exit_, label, 0), exit_, risk, a, level)
    summary = _summary(stream, ref, fig, risks, len(usable), skipped, level, martingale, novelty_note, y)
    result = MonitorResult(usable, fig, risks, summary)
    if out is not None:
        write_outputs(out, result)
        summary["out"] = str(out)
    return result


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _summary(stream: Path, ref: MonitorReference, fig: Any, risks: dict[str, Any], n: int, skipped: int,
             level: float, martingale: str, note: str, y: np.ndarray | None) -> dict[str, Any]:
    m = fig.log_martingale
    out: dict[str, Any] = {
        "stream": str(stream), "n": n, "skipped_unscored": skipped, "reference": ref.source,
        "n_calib": int(len(ref.select)), "channels": list(fig.pvalues), "channels_note": note,
        "level": level, "martingale": martingale, "threshold": fig.threshold,
        "martingale_final": float(np.exp(min(m[-1], 690.0))), "martingale_max": float(np.exp(min(m.max(), 690.0))),
        "alarm": fig.alarm_time is not None, "alarm_time": fig.alarm_time,
    }
    if fig.alarm_time is not None:
        out["statement"] = (f"exchangeability alarm at item {fig.alarm_time} of {n}: the stream is not exchangeable "
                            f"with val_calib (a false alarm has probability <= {level:g}); the certificate's "
                            "assumption is broken")
    else:
        out["statement"] = (f"no exchangeability alarm over {n} item(s) (max martingale "
                            f"{out['martingale_max']:.3g} < {fig.threshold:g})")
    if y is not None:
        out["labelled"] = int((y >= 0).sum())
    for name, r in risks.items():
        out[name] = {"alpha": r.alpha, "trials": int(r.n[-1]), "events": int(r.k[-1]),
                     "rate": None if not np.isfinite(r.rate[-1]) else float(r.rate[-1]),
                     "lower": float(r.lower[-1]), "upper": float(r.upper[-1]), "alarm_time": r.alarm_time,
                     "certified_from": r.certified_from,
                     "statement": (f"{name} is above {r.alpha:g} (lower bound {r.lower[-1]:.3g}, anytime-valid at "
                                   f"{1 - level:g}) from item {r.alarm_time}" if r.alarm_time is not None else
                                   f"{name} upper bound {r.upper[-1]:.3g} ({'<=' if r.upper[-1] <= r.alpha else '>'} "
                                   f"alpha {r.alpha:g}) after {int(r.n[-1])} trial(s)")}
    return out


def figure_rows(result: MonitorResult) -> tuple[list[str], list[list[Any]]]:
    """CSV header and rows of the running figures, one row per stream item."""
    fig = result.exchangeability
    n = len(result.records)
    cols: dict[str, Sequence[Any]] = {"t": range(1, n + 1), "path": [r.get("path", "") for r in result.records],
                                      "decision": [r.get("decision") for r in result.records]}
    for c in fig.pvalues:
        cols[f"{c}_score"] = [r.get("select_score" if c == "select" else f"{c}_score") for r in result.records]
        cols[f"{c}_p"] = fig.pvalues[c]
        cols[f"{c}_log10_martingale"] = fig.log_martingales[c] / math.log(10)
    cols["log10_martingale"] = fig.log_martingale / math.log(10)
    cols["alarm"] = (fig.log_martingale >= math.log(fig.threshold) - 1e-12).astype(int)
    for name, r in result.risks.items():
        for key in ("n", "k", "rate", "lower", "upper"):
            cols[f"{name}_{key}"] = getattr(r, key)
    header = list(cols)
    rows = [[_cell(cols[h][i]) for h in header] for i in range(n)]
    return header, rows


def _cell(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    if isinstance(v, np.integer):
        return int(v)
    return "" if v is None else v


def write_outputs(out: str | os.PathLike[str], result: MonitorResult) -> dict[str, Path]:
    """monitor.csv (running figures), monitor.png (plot) and monitor.json (summary), written atomically."""
    from stage1._core.io import atomic_dir, json_safe

    out = Path(out)
    with atomic_dir(out) as work:
        header, rows = figure_rows(result)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        (work / MONITOR_CSV).write_text(buf.getvalue(), encoding="utf-8")
        (work / MONITOR_PNG).write_bytes(plot_png(result))
        (work / MONITOR_JSON).write_text(json.dumps(json_safe(result.summary), indent=2, sort_keys=True,
                                                    allow_nan=False) + "\n", encoding="utf-8")
    return {name: out / name for name in (MONITOR_CSV, MONITOR_PNG, MONITOR_JSON)}


def plot_png(result: MonitorResult) -> bytes:
    """The martingale(s) against the alarm threshold; with labels, the risk bounds against alpha."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = result.exchangeability
    panels = 1 + bool(result.risks)
    figure = Figure(figsize=(7.0, 3.2 * panels), dpi=100)
    FigureCanvasAgg(figure)
    t = np.arange(1, len(fig.log_martingale) + 1)
    ax = figure.add_subplot(panels, 1, 1)
    for c, lm in fig.log_martingales.items():
        ax.plot(t, lm / math.log(10), lw=0.8, alpha=0.6, label=f"{c} martingale")
    ax.plot(t, fig.log_martingale / math.log(10), lw=1.6, color="black", label="combined (average)")
    ax.axhline(math.log10(fig.threshold), color="red", ls="--", lw=1, label=f"alarm: 1/level = {fig.threshold:g}")
    if fig.alarm_time is not None:
        ax.axvline(fig.alarm_time, color="red", lw=0.8, alpha=0.5)
    ax.set_ylabel("log10 martingale")
    ax.set_title("Exchangeability with val_calib (conformal test martingale)")
    ax.legend(fontsize=7, loc="upper left")
    if result.risks:
        ax2 = figure.add_subplot(panels, 1, 2)
        for (name, r), color in zip(result.risks.items(), ("tab:blue", "tab:orange")):
            ax2.fill_between(t, r.lower, r.upper, color=color, alpha=0.2, step="post")
            ax2.plot(t, r.rate, color=color, lw=1, label=f"{name} (running rate, bounds)")
            ax2.axhline(r.alpha, color=color, ls="--", lw=1)
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("stream item")
        ax2.set_ylabel("risk")
        ax2.set_title("Live risk: anytime-valid bounds (alarm when the lower bound > alpha)")
        ax2.legend(fontsize=7, loc="upper right")
    else:
        ax.set_xlabel("stream item")
    buf = io.BytesIO()
    figure.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def stream_statement(summary: dict[str, Any]) -> Iterable[str]:
    """Human lines for the terminal: the alarm, each risk."""
    yield summary["statement"]
    for name in ("fnr_exit", "selective_error"):
        if name in summary:
            yield summary[name]["statement"]
