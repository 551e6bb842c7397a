"""Click commands of the runs package: train, calibrate, evaluate.

Only click and the stdlib load at import time (``stage1 --help`` must not import torch); numpy,
torch, the store and the policies load inside each command. Option types, choices and help come
from the parts' declared parameters (``Head.PARAMS``, ``ExitPolicy.PARAMS``), looked up only when
an option is parsed or its help is shown (``stage1.cli.params``). Errors are not caught here: the
parts raise ``ConfigError`` / ``UnknownNameError`` (exit 2) or ``DataError`` (exit 1), and
``stage1.cli.errors.command`` prints them as one line.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

import click

from stage1._core.constants import SPLIT_NAMES
from stage1._core.errors import ConfigError
from stage1.cli.errors import command
from stage1.cli.params import Found, declared_help, declared_option, lazy_help_option


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


def head_hparams(head: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` checked against head ``head``'s declared hyperparameters and converted to their types.

    UnknownNameError for an unknown head, ConfigError naming an unknown or out-of-range hyperparameter.
    """
    from stage1.heads import HEADS

    return HEADS.get(head).PARAMS.coerce(given, f"head {head!r}", "hyperparameter")


# -- option declarations --------------------------------------------------------------------------------
#: head hyperparameters with an option of their own in ``train`` (the rest go through --param).
TRAIN_OPTIONS: tuple[str, ...] = (
    "epochs", "batch_size", "lr", "weight_decay", "hidden", "depth", "dropout", "label_smoothing",
    "class_weights", "ema_decay", "grad_clip", "optimizer", "fsam_rho", "patience", "select_metric", "view_mode",
    "seed", "threads",
)


def _common_head_param(name: str) -> Callable[[], Found]:
    def find() -> Found:
        from stage1.heads.base import COMMON_PARAMS

        return [("", COMMON_PARAMS[name])]

    return find


def _policy_param(name: str) -> Callable[[], Found]:
    def find() -> Found:
        from stage1.policies import POLICIES

        return [(pol, POLICIES.get(pol).PARAMS[name]) for pol in POLICIES.names() if name in POLICIES.get(pol).PARAMS]

    return find


def _policy_names() -> Sequence[str]:
    from stage1.policies import POLICIES

    return POLICIES.names()


def _names_help(what: str, registry: str) -> Callable[[], str]:
    def help_fn() -> str:
        if registry == "heads":
            from stage1.heads import HEADS as reg
        else:
            from stage1.policies import POLICIES as reg
        names = reg.names()
        return f"{what}: {', '.join(names[:-1])} or {names[-1]}."

    return help_fn


def _common_help(name: str) -> str:
    """Help of a common head hyperparameter (for an option declared by hand, e.g. a flag)."""
    return declared_help(_common_head_param(name)())


def _train_options(fn: Any) -> Any:
    for name in reversed(TRAIN_OPTIONS):
        fn = declared_option(f"--{name.replace('_', '-')}", find=_common_head_param(name), default=None,
                             extra_help="[default: the head's]")(fn)
    return fn


def _calibrate_option(flag: str, name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return declared_option(flag, name, find=_policy_param(name), owners=_policy_names, default=None, **kwargs)


def _novelty_param(name: str) -> Callable[[], Found]:
    def find() -> Found:
        from stage1.policies.novelty import NoveltyScorer

        return [("", NoveltyScorer.PARAMS[name])]

    return find


def _novelty_param_help(name: str) -> str:
    found = _novelty_param(name)()
    return f"With --novelty: {declared_help(found)} [default: {found[0][1].default}]"


def _novelty_help() -> str:
    from stage1.policies.novelty import NoveltyScorer

    size = NoveltyScorer.PARAMS["reference_size"].default
    return ("Also defer, before the exit rule, every image whose novelty p-value is below ALPHA_N (e.g. 0.01): "
            "the distance of its features to their k-th nearest train features, ranked among val_calib's. Cost: "
            "on images like val_calib at most a share ALPHA_N of coverage; images far from everything the head and "
            f"the certificate saw are deferred. Needs the run's store; the reference (up to {size} train rows, "
            "view 0) goes into novelty.safetensors and the bundle. [default: off]")


# -- commands -------------------------------------------------------------------------------------------
def _views_options(f: Any) -> Any:
    """--views and --view-seed, shared by calibrate and evaluate (declared once)."""
    f = click.option("--view-seed", type=int, default=None,
                     help="Seed of the one-view-per-image draw (keyed on it and the store row). [default: 0; "
                          "evaluate: the seed policy.json records]")(f)
    return click.option("--views", type=click.Choice(("clean", "validator")), default="clean", show_default=True,
                        help="clean: view 0 of each image. validator: one cached view per image, its distortion "
                             "level drawn 0-3 at 0.25 each among the levels the image has (the subnet's mix), with "
                             "per-level metrics (needs a run trained on a store extracted with --views N "
                             "--view-recipe validator).")(f)


@command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@lazy_help_option("--head", "head_name", required=True, help_fn=_names_help("Head name", "heads"))
@click.option("--out", "run", required=True, type=click.Path(file_okay=False), help="Run folder to create (refused if it holds a config.json).")
@_train_options
@lazy_help_option("--fsam/--no-fsam", default=None,
                  help_fn=lambda: _common_help("fsam") + " [default: off]")
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
    from stage1.runs.steps import train_run

    given = {k: v for k, v in opts.items() if v is not None}
    given.update(parse_params(params, "--param"))
    hparams = head_hparams(head_name, given)
    summary = train_run(store, head_name, run, hparams, progress=not quiet, argv=sys.argv)
    click.echo(json.dumps(summary, indent=2, sort_keys=True))


@command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@lazy_help_option("--policy", "policy_name", required=True, help_fn=_names_help("Exit policy", "policies"))
@_calibrate_option("--risk", "risk")
@_calibrate_option("--alpha", "alpha")
@_calibrate_option("--delta", "delta")
@_calibrate_option("--eps", "eps")
@_calibrate_option("--threshold", "threshold")
@_calibrate_option("--coverage", "target_coverage")
@_calibrate_option("--calibrator", "calibrator", extra_choices=("none",),
                   extra_help="'none': no calibrator. [default: the policy's]")
@_calibrate_option("--select-calibrator", "select_calibrator")
@_calibrate_option("--prior", "prior")
@declared_option("--score", find=_policy_param("score"), owners=_policy_names, extra_choices=("auto",),
                 default="auto", show_default=True,
                 extra_help="'auto': select for heads with a learned selector (gate, selectivenet), else p.")
@_views_options
@click.option("--per-level", is_flag=True,
              help="With --views validator: also certify one policy per level, each on one view of that level "
                   "per image; each level's guarantee holds for that level separately (reported in policy.json "
                   "per_level and by evaluate --views validator; export / predict use the pooled policy).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Any other policy parameter (repeatable).")
@lazy_help_option("--novelty", "novelty", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
                  default=None, metavar="ALPHA_N", help_fn=lambda: _novelty_help())
@lazy_help_option("--novelty-k", type=int, default=None, help_fn=lambda: _novelty_param_help("k"))
def calibrate(run: str, policy_name: str, risk: str | None, alpha: float | None, delta: float | None,
              eps: float | None, threshold: float | None, target_coverage: float | None, calibrator: str | None,
              score: str, select_calibrator: str | None, params: tuple[str, ...], views: str = "clean",
              view_seed: int | None = None, per_level: bool = False, prior: float | None = None,
              novelty: float | None = None, novelty_k: int | None = None) -> None:
    """Fit an exit policy on the run's val_calib scores (only there) and write policy.json.

    When nothing can be certified (val_calib too small for alpha / delta) the policy is still
    written with certified=false, the reason and the calibration size needed; it then defers every
    image, and the command exits 0. With --novelty, images far from the training data are
    deferred first (docs/monitor.md).
    """
    from stage1.runs.steps import calibrate_run

    given: dict[str, Any] = {
        k: v for k, v in dict(risk=risk, alpha=alpha, delta=delta, eps=eps, threshold=threshold,
                              target_coverage=target_coverage, select_calibrator=select_calibrator,
                              prior=prior).items()
        if v is not None
    }
    if calibrator is not None:
        given["calibrator"] = None if calibrator == "none" else calibrator
    given.update(parse_params(params, "--param"))
    if "score" in given:
        raise ConfigError("set the score with --score, not --param score=...")
    novelty_params = {} if novelty_k is None else {"k": novelty_k}
    summary = calibrate_run(run, policy_name, given, score=score, views=views,
                            view_seed=0 if view_seed is None else view_seed, per_level=per_level,
                            novelty=novelty, novelty_params=novelty_params)
    if not summary["certified"] and summary["guarantee"] != "none":
        click.echo(f"NOT CERTIFIED: {summary['reason']}", err=True)
    else:
        click.echo(f"guarantee: {summary['statement']}", err=True)
    if "per_level_statement" in summary:
        click.echo(summary["per_level_statement"], err=True)
    click.echo(json.dumps(summary, indent=2, sort_keys=True))


@command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--split", type=click.Choice(SPLIT_NAMES), default="test", show_default=True,
              help="Split to evaluate on (test = the report; others go to RUN/eval_SPLIT/).")
@_views_options
def evaluate(run: str, split: str, views: str = "clean", view_seed: int | None = None) -> None:
    """Apply the run's policy to a split and write metrics.json, metrics.csv and PNG plots.

    metrics.json holds accuracy, mcc, nll, brier, ece, ece_top_label, aurc, eaurc, augrc, eaugrc,
    coverage, selective_error, fnr_exit, miss_rate, defer_rate, n (and more). With --views
    validator: on one drawn view per image, plus level{0-3}_* metrics, in RUN/eval_SPLIT_validator/.
    """
    from stage1.runs.steps import evaluate_run

    metrics = evaluate_run(run, split, views=views, view_seed=view_seed)
    click.echo(json.dumps(metrics, indent=2, sort_keys=True, default=str))
