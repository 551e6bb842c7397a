"""The one training loop for heads on cached features (features already in RAM as tensors).

An optimiser from ``optim.OPTIMIZERS`` (AdamW, AdamW inside F-SAM, or Lion), linear warmup + cosine
decay, an EMA of the weights (the EMA copy is what gets evaluated and kept), gradient clipping, and
early stopping on val_select by a selective objective computed from the head's own ``select`` score.
Seeded: the same seed, data and thread count give bit-identical weights. The optimisers, the F-SAM
step and the schedule (``optim``) and the early-stopping bookkeeping (``early_stopping``) are the
ones full-image fine-tuning uses too.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .early_stopping import SELECT_METRICS, EarlyStopping, validation_objective
from stage1._core.errors import ConfigError

from .optim import OPTIMIZERS, lr_factor, sam_step

LossFn = Callable[..., torch.Tensor]
ScoreFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainConfig:
    """Optimiser / schedule / stopping settings shared by every head."""

    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.01
    ema_decay: float = 0.99
    grad_clip: float = 1.0
    #: a name of ``optim.OPTIMIZERS``: adamw, fsam (AdamW inside F-SAM) or lion. Lion usually wants
    #: ``lr`` 3-10x smaller and ``weight_decay`` 3-10x larger than AdamW; they are not rescaled.
    optimizer: str = "adamw"
    #: the older switch for ``optimizer="fsam"`` (True turns an ``adamw`` into ``fsam``), kept so
    #: saved heads and ``--fsam`` keep their meaning; ``__post_init__`` folds it into ``optimizer``.
    fsam: bool = False
    fsam_rho: float = 0.05
    fsam_sigma: float = 1.0
    fsam_lmbda: float = 0.9
    patience: int = 8
    early_stopping: bool = True
    select_metric: str = "augrc"
    target_risk: float = 0.02
    view_mode: str = "sample"
    seed: int = 0
    #: torch intra-op threads while training (0 = leave torch's setting). Small heads gain little
    #: from a second thread, and on a shared CPU every op's thread barrier can stall for a whole
    #: scheduler slice (measured here: 0.3 s with 1 thread vs 26 s with 2 under load).
    threads: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"epochs must be >= 1 and batch_size >= 2 (got {self.epochs}, {self.batch_size})")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric {self.select_metric!r}; choose one of {', '.join(SELECT_METRICS)}")
        if self.view_mode not in ("sample", "all"):
            raise ValueError(f"view_mode {self.view_mode!r}; choose 'sample' or 'all'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        OPTIMIZERS.get(self.optimizer)  # UnknownNameError listing the optimisers
        if self.fsam:
            if self.optimizer not in ("adamw", "fsam"):
                raise ConfigError(f"fsam=True means optimizer='fsam'; it cannot be combined with "
                                  f"optimizer={self.optimizer!r}")
            self.optimizer = "fsam"


@dataclass
class TrainResult:
    """What a training run reports: the history and where it stopped."""

    best_epoch: int = -1
    epochs_run: int = 0
    best_objective: float | None = None
    train_loss: list[float] = field(default_factory=list)
    val_objective: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "best_objective": self.best_objective,
            "train_loss": [round(v, 6) for v in self.train_loss],
            "val_objective": [round(v, 6) for v in self.val_objective],
        }


def _as_views(x: torch.Tensor) -> torch.Tensor:
    return x[:, None, :] if x.ndim == 2 else x


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``module``'s state dict (the best epoch's weights)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def predict_outputs(module: nn.Module, x: torch.Tensor, batch: int = 8192) -> dict[str, torch.Tensor]:
    """Run ``module`` in eval mode over ``x`` [n, D] in batches; concatenated output dict."""
    was_training = module.training
    module.eval()
    parts: list[dict[str, torch.Tensor]] = [module(x[i : i + batch]) for i in range(0, len(x), batch)]
    module.train(was_training)
    if not parts:
        parts = [module(x[:0])]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def train_module(
    module: nn.Module,
    loss_fn: LossFn,
    score_fn: ScoreFn,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    extras: dict[str, torch.Tensor] | None = None,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
) -> TrainResult:
    """Train ``module`` in place on ``x`` [n, D] or [n, V, D] and ``y`` [n]; returns the history.

    ``loss_fn(outputs, y_batch, **extras_batch)`` gives the scalar loss; ``extras`` holds per-row
    ([n]) or per-(row, view) ([n, V]) tensors gathered alongside each batch (e.g. out-of-fold
    gate targets). ``score_fn(outputs) -> (logits, select)`` feeds the selective objective on
    (x_val view 0, y_val); ``on_epoch(epoch, train_loss, val_objective)`` reports progress.
    On return the module holds the EMA weights of the best epoch.
    """
    previous = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(module, loss_fn, score_fn, x, y, cfg, x_val, y_val, extras, on_epoch)
    finally:
        torch.set_num_threads(previous)


def _train(module: nn.Module, loss_fn: LossFn, score_fn: ScoreFn, x: torch.Tensor, y: torch.Tensor,
           cfg: TrainConfig, x_val: torch.Tensor | None, y_val: torch.Tensor | None,
           extras: dict[str, torch.Tensor] | None,
           on_epoch: Callable[[int, float, float | None], None] | None) -> TrainResult:
    x = _as_views(x)
    n, n_views, dim = x.shape
    x_flat = x.reshape(n * n_views, dim).contiguous()
    extras = extras or {}
    gen = torch.Generator().manual_seed(int(cfg.seed))
    params = [p for p in module.parameters() if p.requires_grad]
    # the fused CPU AdamW kernel: the heads' kernel since the start, so seeded weights stay identical
    opt = OPTIMIZERS.create(cfg.optimizer, params=params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            rho=cfg.fsam_rho, sigma=cfg.fsam_sigma, lmbda=cfg.fsam_lmbda, fused=True)
    ema = module
    ema_params: list[torch.Tensor] = []
    if cfg.ema_decay > 0:  # a frozen copy that tracks the EMA; it is what gets evaluated and kept
        ema = copy.deepcopy(module)
        ema_params = [p for p in ema.parameters() if p.requires_grad]
        for p in ema_params:
            p.requires_grad_(False)

    rows_per_epoch = n * n_views if cfg.view_mode == "all" else n
    bs = min(cfg.batch_size, rows_per_epoch)
    steps_per_epoch = max(1, rows_per_epoch // bs)  # drop the ragged tail: stable batch statistics
    total = steps_per_epoch * cfg.epochs
    xv = None if x_val is None else _as_views(x_val)[:, 0]
    yv = None if y_val is None else y_val.detach().cpu().numpy()
    result = TrainResult()
    stopper: EarlyStopping[dict[str, torch.Tensor]] = EarlyStopping(cfg.patience)
    step = 0
    module.train()
    for epoch in range(cfg.epochs):
        if cfg.view_mode == "all":
            flat = torch.randperm(n * n_views, generator=gen)
            rows_all, views_all = flat // n_views, flat % n_views
        else:
            rows_all = torch.randperm(n, generator=gen)
            views_all = torch.randint(0, n_views, (n,), generator=gen) if n_views > 1 else torch.zeros(n, dtype=torch.long)
        losses = []
        for s in range(steps_per_epoch):
            rows = rows_all[s * bs : (s + 1) * bs]
            flat_idx = rows * n_views + views_all[s * bs : (s + 1) * bs]
            xb = torch.index_select(x_flat, 0, flat_idx)  # ~100x faster than x[rows, views] on CPU
            yb = torch.index_select(y, 0, rows)
            eb = {k: torch.index_select(v.reshape(-1), 0, flat_idx if v.ndim == 2 else rows) for k, v in extras.items()}
            lr = lr_factor(step, total, cfg.warmup_frac, cfg.min_lr_ratio, peak=cfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr

            def closure() -> torch.Tensor:
                loss = loss_fn(module(xb), yb, **eb)
                loss.backward()
                return loss

            loss = sam_step(opt, closure, params, cfg.grad_clip, foreach=True)
            if ema is not module:
                decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
                torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
            losses.append(float(loss.detach()))
            step += 1
        result.train_loss.append(float(np.mean(losses)))
        result.epochs_run = epoch + 1
        if xv is None or yv is None:
            if on_epoch is not None:
                on_epoch(epoch, result.train_loss[-1], None)
            continue
        logits, select = score_fn(predict_outputs(ema, xv))
        obj = validation_objective(cfg.select_metric, logits, select, yv, cfg.target_risk)
        result.val_objective.append(obj)
        if on_epoch is not None:
            on_epoch(epoch, result.train_loss[-1], obj)
        # without early stopping: fixed epochs, final weights kept; the objective is only logged
        if cfg.early_stopping and stopper.update(obj, epoch, lambda: _clone_state(ema)):
            break
    best_state = stopper.best_state
    if best_state is None:  # no validation data or early_stopping=False: the last epoch
        best_state = _clone_state(ema)
        result.best_epoch = result.epochs_run - 1
        result.best_objective = result.val_objective[-1] if result.val_objective else None
    else:
        result.best_epoch, result.best_objective = stopper.best_epoch, stopper.best_value
    module.load_state_dict(best_state)
    module.eval()
    return result
