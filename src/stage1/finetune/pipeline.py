"""End to end ``finetune`` and ``adapt``: list and check images, attach adapters, train, merge, save.

``adapt`` is ExPLoRA-style continued pretraining with a simplified DINO objective (CLS-token
self-distillation only, two global views; no iBOT masked-patch loss, no multi-crop unless its
experimental options ask for them; see ``selfsup``).

Fine-tuning trains on the ``train`` split and stops early on ``val_select`` of the same
deterministic split the store uses (``featstore.splits.make_splits`` on content hashes with the
same seed and fractions), so val_calib and test images are never seen and a store extracted with
the adapted backbone can be split, calibrated and tested as usual.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from stage1.featstore.preprocessing import Preprocessing

from .adapters import AdapterSpec, attach, merge, trainable
from .data import Item, ViewDataset, collect_items, content_sha256, local_size_for
from .loop import Runtime, cls_features, enable_checkpointing
from .output import check_out_dir, parent_record, save_adapted
from .selfsup import AdaptConfig, mask_token_name, objective_text, train_selfsup
from .supervised import SupervisedConfig, train_supervised
from .targets import block_indices, block_parameter_names, find_blocks, linear_targets, norm_parameter_names

#: Levels of the store's validator-style views used as augmentation (finetune / adapt defaults).
from stage1._core.constants import DEFAULT_VIEW_LEVELS as ADAPT_LEVELS
from stage1._core.constants import VIEW_LEVELS as FINETUNE_LEVELS
from stage1._core.errors import ConfigError, DataError


@dataclass
class Common:
    """Settings shared by both commands: data, input size, adapters, runtime."""

    images: str
    backbone: str
    out: str
    image_size: int = 224
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    levels: Sequence[int] = FINETUNE_LEVELS
    device: str = "cpu"
    amp: bool | None = None
    grad_checkpointing: bool | None = None
    progress: bool = False


@dataclass
class FinetuneJob(Common):
    """``finetune``: supervised PEFT on the last ``blocks`` blocks with a head from ``heads/``."""

    labels: str = ""
    peft: str = "lora"
    blocks: int = 2
    head: str = "mlp"
    head_params: dict[str, Any] = field(default_factory=dict)
    split_seed: int = 0
    fractions: str | None = None
    train: SupervisedConfig = field(default_factory=SupervisedConfig)


@dataclass
class AdaptJob(Common):
    """``adapt``: ExPLoRA continued pretraining (last ``unfreeze`` blocks full, LoRA on the others) with a
    simplified DINO objective (``train``: ``selfsup.AdaptConfig``)."""

    image_list: str | None = None
    unfreeze: int = 1
    lora_on: str = "qv"
    train_norms: bool = True
    levels: Sequence[int] = ADAPT_LEVELS
    train: AdaptConfig = field(default_factory=AdaptConfig)


def _tool() -> dict[str, str]:
    import peft
    import transformers

    from stage1 import __version__

    return {"name": "stage1-featstore", "version": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _prepare(job: Common) -> tuple[Any, Preprocessing, Path]:
    """Check the options; the backbone, the preprocessing of its clean view (as `extract` records it), out."""
    from stage1.featstore.backbones import check_image_size, load_backbone

    out = check_out_dir(job.out)
    if not Path(job.images).is_dir():
        raise ConfigError(f"--images {job.images} is not a folder")
    backbone = load_backbone(job.backbone, device="cpu")
    check_image_size(job.image_size, backbone.patch_size)
    return backbone, Preprocessing.for_backbone(backbone, job.image_size), out


def _data_record(job: Common, prep: Preprocessing, entries: Sequence[Any], items: list[Item],
                 quarantined: list[dict[str, str]]) -> dict[str, Any]:
    from stage1.featstore.labels import image_list_sha256

    return {
        "images": str(Path(job.images).resolve()),
        "image_list_sha256": image_list_sha256(entries),
        "content_sha256": content_sha256(items),
        "n_listed": len(entries),
        "n_used": len(items),
        "quarantined": quarantined,
        "augmentation": {"views": "featstore.views.make_view", "levels": [int(lv) for lv in job.levels]},
        "image_size": job.image_size,
        "preprocessing": prep.to_dict(),  # the clean view, in the store's own shape (compare with a store's)
    }


@torch.no_grad()
def _feature_stats(model: torch.nn.Module, data: ViewDataset, rt: Runtime, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean / std of the clean training features (the head's input standardisation)."""
    from .data import loader

    model.eval()
    feats = [cls_features(model, pixels[:, 0].to(rt.device)).float().cpu()
             for pixels, _, _ in loader(data, batch_size, shuffle=False, seed=0)]
    x = torch.cat(feats)
    return x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])


def run_finetune(job: FinetuneJob) -> dict[str, Any]:
    """Fine-tune, merge and save; returns a summary (also the core of provenance.json)."""
    from stage1.featstore.labels import confine_entries, parse_labels_csv
    from stage1.featstore.splits import make_splits, parse_fractions, split_counts
    from stage1.heads import HEADS

    backbone, prep, out = _prepare(job)
    head = HEADS.create(job.head, **job.head_params)
    entries, has_split = parse_labels_csv(job.labels)
    confine_entries(job.images, entries, str(job.labels))  # no symlink may lead outside --images
    items, quarantined, kept = collect_items(job.images, entries, job.image_size)
    if not items:
        raise DataError(f"{job.labels}: no readable images ({len(quarantined)} quarantined)")
    labels = np.array([it.label for it in items], dtype=np.int64)
    split_col = np.array([entries[i].split for i in kept]) if has_split else None
    splits = make_splits(labels, [it.sha256 for it in items], seed=job.split_seed,
                         fractions=job.fractions, split_column=split_col)
    train_rows = [int(r) for r in splits["train"] if labels[r] >= 0]
    val_rows = [int(r) for r in splits["val_select"] if labels[r] >= 0]
    if len(train_rows) < 2 or len(set(labels[train_rows].tolist())) < 2:
        raise DataError(f"{job.labels}: the train split needs labelled images of both classes "
                         f"(has {len(train_rows)}); label more images or change --fractions")

    model = backbone.model
    blocks = find_blocks(model)
    indices = block_indices(len(blocks), job.blocks)
    if not indices:
        raise ConfigError("--blocks must be >= 1")
    spec = AdapterSpec(job.peft, job.lora_rank, job.lora_alpha, job.lora_dropout,
                       linear_targets(model, indices, "all"), [])
    torch.manual_seed(job.train.seed)
    peft_model = attach(model, spec)
    rt = Runtime.resolve(job.device, job.amp, job.grad_checkpointing)
    peft_model.to(rt.device)
    train_data = ViewDataset.from_preprocessing([items[r] for r in train_rows], prep, seed=job.train.seed,
                                                levels=job.levels)
    val_data = ViewDataset.from_preprocessing([items[r] for r in val_rows], prep)
    head.prepare(labels[train_rows])
    module = head.make_module(backbone.hidden_size)
    if head.hparams.get("standardize"):
        clean_train = ViewDataset.from_preprocessing(train_data.items, prep)
        with rt.autocast():
            m, s = _feature_stats(peft_model, clean_train, rt, job.train.batch_size)
        module.standardize.mean.copy_(m)
        module.standardize.std.copy_(s)
    enable_checkpointing(peft_model, rt.grad_checkpointing)
    n_trainable = sum(p.numel() for p in trainable(peft_model).values())
    history = train_supervised(peft_model, module, head.loss, train_data, val_data, job.train, rt,
                               score_fn=head.scores_from_outputs, show_progress=job.progress)
    enable_checkpointing(peft_model, False)
    merged = merge(peft_model).to("cpu", dtype=torch.float32)
    head.module_ = module.cpu().eval()
    head.in_dim_ = backbone.hidden_size

    record = {
        "kind": "finetune",
        "parent": parent_record(backbone),
        "method": {
            "peft": job.peft,
            "blocks": job.blocks,
            "block_indices": indices,
            "block_list": blocks.prefix,
            **{k: v for k, v in spec.to_dict().items() if k != "unfrozen_parameters"},
            "trainable_parameters": n_trainable,
            "head": job.head,
            "head_hparams": head.hparams,
        },
        "data": {
            **_data_record(job, prep, entries, items, quarantined),
            "labels_csv": str(Path(job.labels).resolve()),
            "split": {"seed": job.split_seed, "fractions": parse_fractions(job.fractions),
                      "counts": split_counts(labels, splits), "used": ["train", "val_select"],
                      "n_train": len(train_rows), "n_val_select": len(val_rows)},
        },
        "training": {**asdict(job.train), **rt.to_dict(), "history": _jsonable(history)},
        "tool": _tool(),
    }
    save_adapted(out, merged, job.backbone, record, extra=lambda tmp: head.save(tmp / "head"))
    return record


def run_adapt(job: AdaptJob) -> dict[str, Any]:
    """ExPLoRA-style self-supervised adaptation (simplified DINO), merge and save; returns the provenance summary.

    With ``--ibot-weight`` the backbone's mask token trains too (iBOT learns its [MASK] embedding).
    """
    from stage1.featstore.labels import confine_entries, list_images, parse_labels_csv

    backbone, prep, out = _prepare(job)
    entries = parse_labels_csv(job.image_list)[0] if job.image_list else list_images(job.images)
    if job.image_list:  # list_images already confines the folder scan
        confine_entries(job.images, entries, str(job.image_list))
    items, quarantined, _ = collect_items(job.images, entries, job.image_size)
    if len(items) < job.train.batch_size:
        raise DataError(f"{job.images}: {len(items)} readable images, fewer than --batch-size "
                         f"{job.train.batch_size}; add images or lower --batch-size")
    model = backbone.model
    blocks = find_blocks(model)
    n = len(blocks)
    unfrozen_idx = block_indices(n, job.unfreeze)
    lora_idx = [i for i in range(n) if i not in unfrozen_idx]
    unfrozen = block_parameter_names(model, unfrozen_idx)
    if job.train_norms:
        unfrozen += [p for p in norm_parameter_names(model) if p not in set(unfrozen)]
    if job.train.ibot_weight > 0:
        mask_token = mask_token_name(model)
        unfrozen += [mask_token] if mask_token not in set(unfrozen) else []
    spec = AdapterSpec("lora", job.lora_rank, job.lora_alpha, job.lora_dropout,
                       linear_targets(model, lora_idx, job.lora_on), unfrozen)
    torch.manual_seed(job.train.seed)
    peft_model = attach(model, spec)
    rt = Runtime.resolve(job.device, job.amp, job.grad_checkpointing)
    peft_model.to(rt.device)
    local_size = local_size_for(job.image_size, backbone.patch_size) if job.train.multi_crop else None
    data = ViewDataset.from_preprocessing(items, prep, seed=job.train.seed, n_views=2, levels=job.levels,
                                          n_local=job.train.multi_crop, local_size=local_size)
    enable_checkpointing(peft_model, rt.grad_checkpointing)
    n_trainable = sum(p.numel() for p in trainable(peft_model).values())
    history = train_selfsup(peft_model, backbone.hidden_size, data, job.train, rt, show_progress=job.progress)
    enable_checkpointing(peft_model, False)
    merged = merge(peft_model).to("cpu", dtype=torch.float32)
    record = {
        "kind": "adapt",
        "parent": parent_record(backbone),
        "method": {
            "name": "explora-dino",
            "objective": objective_text(job.train),
            "local_crop_size": local_size,
            "unfreeze": job.unfreeze,
            "unfrozen_blocks": unfrozen_idx,
            "lora_blocks": lora_idx,
            "lora_on": job.lora_on,
            "train_norms": job.train_norms,
            "block_list": blocks.prefix,
            **{k: v for k, v in spec.to_dict().items() if k != "unfrozen_parameters"},
            "n_unfrozen_parameters": len(unfrozen),
            "trainable_parameters": n_trainable,
        },
        "data": {**_data_record(job, prep, entries, items, quarantined),
                 "image_list": str(Path(job.image_list).resolve()) if job.image_list else None},
        "training": {**asdict(job.train), **rt.to_dict(), "history": _jsonable(history)},
        "tool": _tool(),
    }
    save_adapted(out, merged, job.backbone, record)
    return record


def _jsonable(obj: Any) -> Any:
    """Floats rounded, numpy scalars to Python, NaN to None (JSON must stay strict)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return None if not np.isfinite(value) else round(value, 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj

