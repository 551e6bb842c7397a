"""Click commands of the heads package: train, calibrate, evaluate.

Only click and the stdlib load at import time (``stage1 --help`` must not import torch); numpy,
torch, the store and the policies load inside each command.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from stage1._core.constants import SPLIT_NAMES


def parse_params(items: tuple[str, ...], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is read as JSON when it parses (numbers, true/false, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint=option)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def coerce_hparams(given: dict[str, Any], defaults: dict[str, Any], head: str) -> dict[str, Any]:
    """Check names against the head's hyperparameters and cast values to the defaults' types."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise click.UsageError(
            f"head {head!r} has no hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(defaults))}"
        )
    out: dict[str, Any] = {}
    for key, val in given.items():
        ref = defaults[key]
        try:
            if isinstance(ref, bool):
                if isinstance(val, str):
                    if val.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(val)
                    val = val.lower() in ("true", "1", "yes")
                out[key] = bool(val)
            elif isinstance(ref, int):
                if float(val) != int(float(val)):
                    raise ValueError(val)
                out[key] = int(float(val))
            elif isinstance(ref, float):
                out[key] = float(val)
            else:
                out[key] = val
        except (TypeError, ValueError):
            raise click.UsageError(f"hyperparameter {key}={val!r}: expected {type(ref).__name__}") from None
    return out


TRAIN_OPTIONS: list[tuple[str, Any, str]] = [
    ("--epochs", int, "Maximum epochs."),
    ("--batch-size", int, "Rows per step."),
    ("--lr", float, "AdamW peak learning rate (linear warmup, cosine decay)."),
    ("--weight-decay", float, "AdamW weight decay."),
    ("--hidden", int, "Trunk width."),
    ("--depth", int, "Trunk layers (Linear-ReLU-Dropout)."),
    ("--dropout", float, "Trunk dropout."),
    ("--label-smoothing", float, "Cross-entropy label smoothing."),
    ("--class-weights", str, "'balanced', 'none' or 'w0,w1'."),
    ("--ema-decay", float, "EMA of the weights (0 = off); the EMA copy is evaluated and kept."),
    ("--grad-clip", float, "Clip the gradient norm (0 = off)."),
    ("--fsam-rho", float, "F-SAM perturbation radius (with --fsam)."),
    ("--patience", int, "Early stopping: epochs without improvement on val_select."),
    ("--select-metric", str, "Early-stopping objective on val_select: augrc, aurc or coverage_at_risk."),
    ("--view-mode", str, "'sample' (one random cached view per row and epoch) or 'all'."),
    ("--seed", int, "Seed (same seed and data -> identical weights)."),
    ("--threads", int, "Torch threads while training (0 = torch's setting)."),
]


def _train_options(fn: Any) -> Any:
    for flag, typ, help_text in reversed(TRAIN_OPTIONS):
        fn = click.option(flag, type=typ, default=None, help=help_text + " [default: the head's]")(fn)
    return fn


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--head", "head_name", required=True, help="Head name: mlp, gate, selectivenet or crc.")
@click.option("--out", "run", required=True, type=click.Path(file_okay=False), help="Run folder to create (refused if it holds a config.json).")
@_train_options
@click.option("--fsam/--no-fsam", default=None, help="Friendly-SAM two-step updates around AdamW. [default: off]")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Any other hyperparameter, e.g. gate_target=out_of_fold, folds=5, coverage=0.8, "
                   "lambda_crc=1.0 (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(store: str, head_name: str, run: str, params: tuple[str, ...], quiet: bool, **opts: Any) -> None:
    """Train a head on the cached features of STORE and write the run folder.

    Uses STORE/splits.json (make it with `split`): fits on train (every cached view), stops early
    on val_select, then writes config.json, splits.json, head.safetensors / head.json and
    scores.safetensors (logits, select, y, rows of every split, view 0).
    """
    from stage1.heads import HEADS
    from stage1.runs.layout import RunDirError
    from stage1.runs.steps import train_run

    given = {k: v for k, v in opts.items() if v is not None}
    given.update(parse_params(params, "--param"))
    try:
        defaults = HEADS.get(head_name).default_hparams()
    except KeyError as exc:
        raise click.UsageError(str(exc).strip('"')) from None
    hparams = coerce_hparams(given, defaults, head_name)
    try:
        summary = train_run(store, head_name, run, hparams, progress=not quiet, argv=sys.argv)
    except (RunDirError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    except (KeyError, ValueError) as exc:
        raise click.UsageError(str(exc).strip('"')) from None
    click.echo(json.dumps(summary, indent=2, sort_keys=True))


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--policy", "policy_name", required=True, help="Exit policy: threshold, coverage, crc or ltt.")
@click.option("--risk", default=None, help="Controlled risk: fnr_exit, selective_error or miss_rate (crc: miss_rate).")
@click.option("--alpha", type=float, default=None, help="Risk level, e.g. 0.02.")
@click.option("--delta", type=float, default=None, help="ltt: allowed probability that the risk exceeds alpha.")
@click.option("--eps", type=float, default=None, help="ltt: also bound the selective error by eps.")
@click.option("--threshold", type=float, default=None, help="threshold: exit when the confidence reaches it (seeds: 0.88).")
@click.option("--coverage", "target_coverage", type=float, default=None, help="coverage: target coverage on val_calib.")
@click.option("--calibrator", default=None, help="temperature, platt, isotonic, beta, dirichlet, matrix, or 'none'.")
@click.option("--score", default="auto", show_default=True,
              help="What is thresholded: 'p' (calibrated max probability), 'select' (the head's selector) "
                   "or 'auto' (select for heads with a learned selector: gate, selectivenet).")
@click.option("--select-calibrator", default=None, help="With --score select: calibrate the selector (platt, isotonic).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Any other policy parameter (repeatable).")
def calibrate(run: str, policy_name: str, risk: str | None, alpha: float | None, delta: float | None,
              eps: float | None, threshold: float | None, target_coverage: float | None, calibrator: str | None,
              score: str, select_calibrator: str | None, params: tuple[str, ...]) -> None:
    """Fit an exit policy on the run's val_calib scores (only there) and write policy.json.

    When nothing can be certified (val_calib too small for alpha / delta) the policy is still
    written with certified=false, the reason and the calibration size needed; it then defers every
    image, and the command exits 0.
    """
    from stage1.runs.layout import RunDirError
    from stage1.runs.steps import calibrate_run

    given: dict[str, Any] = {
        k: v for k, v in dict(risk=risk, alpha=alpha, delta=delta, eps=eps, threshold=threshold,
                              target_coverage=target_coverage, select_calibrator=select_calibrator).items()
        if v is not None
    }
    if calibrator is not None:
        given["calibrator"] = None if calibrator.lower() == "none" else calibrator
    given.update(parse_params(params, "--param"))
    try:
        summary = calibrate_run(run, policy_name, given, score=score)
    except (RunDirError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    except (KeyError, ValueError, TypeError) as exc:
        raise click.UsageError(str(exc).strip('"')) from None
    if not summary["certified"] and summary["guarantee"] != "none":
        click.echo(f"NOT CERTIFIED: {summary['reason']}", err=True)
    click.echo(json.dumps(summary, indent=2, sort_keys=True))


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--split", type=click.Choice(SPLIT_NAMES), default="test", show_default=True,
              help="Split to evaluate on (test = the report; others go to RUN/eval_SPLIT/).")
def evaluate(run: str, split: str) -> None:
    """Apply the run's policy to a split and write metrics.json, metrics.csv and PNG plots.

    metrics.json holds accuracy, mcc, nll, brier, ece, ece_top_label, aurc, eaurc, augrc, eaugrc,
    coverage, selective_error, fnr_exit, miss_rate, defer_rate, n (and more).
    """
    from stage1.runs.layout import RunDirError
    from stage1.runs.steps import evaluate_run

    try:
        metrics = evaluate_run(run, split)
    except (RunDirError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(metrics, indent=2, sort_keys=True, default=str))
