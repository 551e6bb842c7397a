"""CLI: ``finetune`` (supervised LoRA / DoRA with a head) and ``adapt`` (ExPLoRA-style self-supervised,
a simplified DINO objective).

Module-level imports stay light (click, stdlib): torch, transformers and peft load inside the
commands, so ``stage1 --help`` stays fast.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from stage1.cli.errors import command
from stage1.cli.options import batch_size_option, device_option, image_size_option, seed_option, workers_option
from stage1.cli.params import lazy_help_option

PEFT_CHOICES = ("lora", "dora")
LORA_ON_CHOICES = ("qv", "attention", "all")
KEEP_CHOICES = ("teacher", "student")


def _levels(value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in value.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated levels from 0-3, e.g. 0,1,2,3") from None
    if not levels or any(lv not in (0, 1, 2, 3) for lv in levels):
        raise click.BadParameter(f"{value!r}: levels must be from 0-3, e.g. 1,2,3")
    return levels


def _optimizer_help() -> str:
    """Help of ``--optimizer``: the registered names and what each is (read when help is shown)."""
    from stage1.heads.optim import OPTIMIZER_HELP, OPTIMIZERS

    return f"One of {', '.join(OPTIMIZERS.names())}. {OPTIMIZER_HELP}"


def _common_job(kw: dict[str, Any]) -> dict[str, Any]:
    """The ``pipeline.Common`` fields both jobs take from the shared options (``_runtime_options``)."""
    return dict(images=kw["images"], backbone=kw["backbone"], out=kw["out"], image_size=kw["image_size"],
                lora_rank=kw["lora_rank"], lora_alpha=kw["lora_alpha"], lora_dropout=kw["lora_dropout"],
                levels=_levels(kw["aug_levels"]), device=kw["device"], amp=kw["amp"],
                grad_checkpointing=kw["grad_checkpointing"], progress=True)


def _runtime_options(f: Any) -> Any:
    options = [
        device_option(),
        click.option("--amp/--no-amp", default=None,
                     help="bf16 autocast; default on for cuda, off for cpu."),
        click.option("--grad-checkpointing/--no-grad-checkpointing", default=None,
                     help="Recompute activations in backward to save memory; default on for cuda."),
        workers_option(0, help="DataLoader worker processes decoding images."),
        seed_option(help="Seed of adapter init, shuffling and view distortions."),
        batch_size_option(16, help="Images per training step."),
        image_size_option(help="Input side in pixels (multiple of the patch size); use the size you extract with."),
        click.option("--lora-dropout", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True),
        click.option("--lora-alpha", type=click.FloatRange(min=0.0, min_open=True), default=16.0, show_default=True,
                     help="LoRA scaling numerator (scale = alpha / rank)."),
        click.option("--lora-rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA / DoRA rank."),
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="New folder for the adapted backbone (must not exist or be empty)."),
        click.option("--backbone", required=True, type=click.Path(exists=True, file_okay=False),
                     help="Parent backbone: a local Hugging Face model folder (or a previous finetune/adapt output)."),
        click.option("--images", required=True, type=click.Path(exists=True, file_okay=False),
                     help="Folder the image paths are relative to."),
    ]
    for option in options:
        f = option(f)
    return f


@command("finetune")
@_runtime_options
@click.option("--labels", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Labels CSV: path,label[,split] with paths relative to --images.")
@click.option("--peft", "peft_method", type=click.Choice(PEFT_CHOICES), default="lora", show_default=True,
              help="LoRA, or DoRA (magnitude + direction) through the peft library.")
@click.option("--blocks", type=click.IntRange(min=1), default=2, show_default=True,
              help="Adapt the attention and MLP projections of the last N transformer blocks.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=2e-4, show_default=True,
              help="Learning rate of the adapters.")
@click.option("--head-lr", type=click.FloatRange(min=0.0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.01, show_default=True)
@click.option("--head", "head_name", default="mlp", show_default=True,
              help="Head from stage1.heads/ trained jointly (e.g. mlp; gate needs --head-param gate_target=in_sample).")
@click.option("--head-param", "head_param", multiple=True, metavar="KEY=VALUE",
              help="Head hyperparameter (repeatable), e.g. --head-param hidden=128.")
@lazy_help_option("--optimizer", default="adamw", show_default=True, help_fn=lambda: _optimizer_help())
@click.option("--fsam-rho", type=click.FloatRange(min=0.0), default=0.05, show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=2, show_default=True,
              help="Stop after this many epochs without a better val_select AUGRC.")
@click.option("--aug-levels", default="0,1,2,3", show_default=True,
              help="Store view distortion levels sampled per training image (featstore.views).")
@click.option("--split-seed", type=int, default=0, show_default=True,
              help="Seed of the store's train/val_select/val_calib/test split; match `split --seed`.")
@click.option("--fractions", default=None,
              help="Split fractions train,val_select,val_calib,test (default as `split`); match `split`.")
def finetune(**kw: Any) -> None:
    """Supervised PEFT fine-tuning of a ViT backbone with a head, on labelled images.

    LoRA or DoRA adapters (peft) on the attention and MLP projections of the last --blocks blocks;
    the head from stage1.heads/ trains jointly on validator-style distorted views. Trains on the store's
    train split, stops early on val_select (never touches val_calib / test), then merges the
    adapters and writes --out: config.json + model.safetensors (a valid --backbone for extract),
    preprocessor_config.json, provenance.json and head/ (the jointly trained head).
    """
    from stage1.runs.commands import head_hparams, parse_params

    from .pipeline import FinetuneJob, run_finetune
    from .supervised import SupervisedConfig

    head_params = parse_params(kw["head_param"], "--head-param")
    if head_params:
        head_params = head_hparams(kw["head_name"], head_params)

    train = SupervisedConfig(
        epochs=kw["epochs"], lr=kw["lr"], head_lr=kw["head_lr"], weight_decay=kw["weight_decay"],
        batch_size=kw["batch_size"], optimizer=kw["optimizer"], fsam_rho=kw["fsam_rho"],
        patience=kw["patience"], seed=kw["seed"], workers=kw["workers"],
    )
    job = FinetuneJob(
        **_common_job(kw), labels=kw["labels"],
        peft=kw["peft_method"], blocks=kw["blocks"], head=kw["head_name"],
        head_params=head_params, split_seed=kw["split_seed"], fractions=kw["fractions"],
        train=train,
    )
    record = run_finetune(job)
    _report(kw["out"], record)


@command("adapt")
@_runtime_options
@click.option("--list", "image_list", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Optional CSV (path[,label]) restricting which images under --images are used; labels ignored.")
@click.option("--unfreeze", type=click.IntRange(min=0), default=1, show_default=True,
              help="Train the last N blocks fully (ExPLoRA: 1-2); LoRA on all other blocks.")
@click.option("--lora-on", type=click.Choice(LORA_ON_CHOICES), default="qv", show_default=True,
              help="Projections of the other blocks that get LoRA: query+value (ExPLoRA), attention, or all.")
@click.option("--train-norms/--no-train-norms", default=True, show_default=True,
              help="Also train every LayerNorm (as ExPLoRA does).")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=5e-5, show_default=True,
              help="Learning rate of the backbone (LoRA, unfrozen blocks, norms).")
@click.option("--head-lr", type=click.FloatRange(min=0.0, min_open=True), default=1e-3, show_default=True,
              help="Learning rate of the DINO projection head.")
@click.option("--head-warmup", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.2, show_default=True,
              help="Fraction of steps that train only the (fresh) DINO head before the backbone moves.")
@click.option("--out-dim", type=click.IntRange(min=2), default=1024, show_default=True, help="DINO prototypes.")
@click.option("--teacher-temp", type=click.FloatRange(min=0.0, min_open=True), default=0.04, show_default=True)
@click.option("--student-temp", type=click.FloatRange(min=0.0, min_open=True), default=0.1, show_default=True)
@click.option("--ema", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.996, show_default=True,
              help="Starting teacher EMA momentum (cosine schedule to 1).")
@click.option("--keep", type=click.Choice(KEEP_CHOICES), default="teacher", show_default=True,
              help="Export the EMA teacher's weights (DINO practice) or the student's.")
@click.option("--aug-levels", default="1,2,3", show_default=True,
              help="Store view distortion levels the views are drawn from (featstore.views).")
@click.option("--multi-crop", type=click.IntRange(min=0), default=0, show_default=True,
              help="DINO multi-crop: N extra local crops per image (about 3/7 of --image-size, 1-40% of the "
                   "image), seen by the student only. Experimental: not shown to help in our measurement.")
@click.option("--ibot-weight", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Weight of the iBOT masked-patch term (0 = off): the student's global views get 10-50% of "
                   "their patches (on half of the views) replaced by the mask token, and a patch head learns "
                   "the teacher's patch-token distributions there; the mask token trains too. Needs a backbone "
                   "with bool_masked_pos (Dinov2, DINOv3). Experimental: not shown to help in our measurement.")
def adapt(**kw: Any) -> None:
    """ExPLoRA-style continued self-supervised pretraining on unlabelled images.

    The last --unfreeze blocks train fully, LoRA (--lora-rank) adapts the other blocks, and a
    simplified DINO objective distils an EMA teacher into the student: CLS-token self-distillation
    only (projection head, centring, sharpening) across two validator-style distorted global views;
    no iBOT masked-patch loss and no multi-crop unless --ibot-weight / --multi-crop add them.
    Writes --out like finetune (merged weights + provenance.json), a valid --backbone for extract
    or for a following finetune.
    """
    from .pipeline import AdaptJob, run_adapt
    from .selfsup import AdaptConfig

    train = AdaptConfig(
        epochs=kw["epochs"], lr=kw["lr"], head_lr=kw["head_lr"], batch_size=kw["batch_size"],
        head_warmup_frac=kw["head_warmup"], out_dim=kw["out_dim"], student_temp=kw["student_temp"],
        teacher_temp=kw["teacher_temp"], ema=kw["ema"], keep=kw["keep"], multi_crop=kw["multi_crop"],
        ibot_weight=kw["ibot_weight"], seed=kw["seed"], workers=kw["workers"],
    )
    job = AdaptJob(
        **_common_job(kw), image_list=kw["image_list"],
        unfreeze=kw["unfreeze"], lora_on=kw["lora_on"], train_norms=kw["train_norms"], train=train,
    )
    record = run_adapt(job)
    _report(kw["out"], record)


def _report(out: str, record: dict[str, Any]) -> None:
    """One JSON summary line on stdout; details are in OUT/provenance.json."""
    history = record["training"]["history"]
    summary = {
        "out": out,
        "kind": record["kind"],
        "trainable_parameters": record["method"]["trainable_parameters"],
        "n_images": record["data"]["n_used"],
        "quarantined": len(record["data"]["quarantined"]),
        "epochs_run": history.get("epochs_run"),
        "best_epoch": history.get("best_epoch"),
        "train_loss": history.get("train_loss"),
    }
    click.echo(json.dumps(summary))
    if record["data"]["quarantined"]:
        click.echo(f"{len(record['data']['quarantined'])} image(s) quarantined; see {out}/provenance.json",
                   err=True)
    sys.stdout.flush()
