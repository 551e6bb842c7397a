"""The Head protocol: sklearn-style estimators on cached features, saved as safetensors + JSON.

A head subclass declares its hyperparameters once (``PARAMS``: ``COMMON_PARAMS`` plus its own, each
with type, default, range and help; ``stage1._core.params``), builds an ``nn.Module`` mapping
features [B, D] to a dict of output tensors (``make_module``), defines its training ``loss`` and
how outputs become ``(logits, select)`` (``scores_from_outputs``). Everything else (input
standardisation, class weights, training with ``heads.trainer``, prediction, save / load) lives
here once.
"""
from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stage1._core.errors import ConfigError, DataError
from stage1._core.params import Param, Params

from .optim import OPTIMIZER_HELP, OPTIMIZERS
from .trainer import SELECT_METRICS, TrainConfig, TrainResult, predict_outputs, train_module

SCHEMA_VERSION = 1
HEAD_WEIGHTS = "head.safetensors"
HEAD_JSON = "head.json"

VIEW_MODES = ("sample", "all")

#: help and range of the trainer's settings; their names, types and defaults are ``TrainConfig``'s.
_TRAINER_DECL: dict[str, dict[str, Any]] = {
    "epochs": dict(help="Maximum epochs.", low=1),
    "batch_size": dict(help="Rows per step.", low=2),
    "lr": dict(help="Peak learning rate (linear warmup, cosine decay); Lion usually wants 3-10x less than AdamW.",
               low=0.0, low_open=True),
    "weight_decay": dict(help="Decoupled weight decay; Lion usually wants 3-10x more than AdamW.", low=0.0),
    "warmup_frac": dict(help="Share of the steps that warm the learning rate up.", low=0.0, high=1.0),
    "min_lr_ratio": dict(help="Final learning rate as a share of the peak.", low=0.0, high=1.0),
    "ema_decay": dict(help="EMA of the weights (0 = off); the EMA copy is evaluated and kept.",
                      low=0.0, high=1.0, high_open=True),
    "grad_clip": dict(help="Clip the gradient norm (0 = off).", low=0.0),
    "optimizer": dict(help="Optimiser. " + OPTIMIZER_HELP, choices=OPTIMIZERS.names),
    "fsam": dict(help="Older switch for optimizer=fsam (Friendly-SAM two-step updates around AdamW)."),
    "fsam_rho": dict(help="F-SAM perturbation radius (with fsam).", low=0.0),
    "fsam_sigma": dict(help="F-SAM: weight of the gradient's running mean removed before perturbing.", low=0.0),
    "fsam_lmbda": dict(help="F-SAM: EMA decay of the gradient's running mean.", low=0.0, high=1.0, high_open=True),
    "patience": dict(help="Early stopping: epochs without improvement on val_select.", low=0),
    "early_stopping": dict(help="Stop early on val_select (off: run every epoch, keep the last weights)."),
    "select_metric": dict(help="Early-stopping objective on val_select.", choices=SELECT_METRICS),
    "target_risk": dict(help="Selective risk target of select_metric=coverage_at_risk.", low=0.0, high=1.0),
    "view_mode": dict(help="'sample' (one random cached view per row and epoch) or 'all'.", choices=VIEW_MODES),
    "seed": dict(help="Seed (same seed and data -> identical weights).", low=0),
    "threads": dict(help="Torch threads while training (0 = torch's setting).", low=0),
}

#: the trainer's settings as declared parameters (a TrainConfig field without an entry above is
#: still a parameter, typed by its default; the head contract test asks for its help and range).
TRAINER_PARAMS = Params(*(Param(f.name, type(f.default), f.default, **_TRAINER_DECL.get(f.name, {}))
                          for f in fields(TrainConfig)))


def _class_weights(value: Any) -> Any:
    """``class_weights``: 'balanced', 'none' or two positive numbers ('w0,w1' or a list)."""
    if value in ("balanced", "none"):
        return value
    try:
        vals = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 2 or min(vals) <= 0:
        raise ValueError("'balanced', 'none' or two positive numbers 'w0,w1'")
    return value


#: hyperparameters every head has: the trainer's plus input / loss handling and the trunk.
COMMON_PARAMS = TRAINER_PARAMS + Params(
    Param("hidden", int, 256, "Trunk width.", low=1),
    Param("depth", int, 1, "Trunk layers (Linear-ReLU-Dropout); 0 = none.", low=0),
    Param("dropout", float, 0.1, "Trunk dropout.", low=0.0, high=1.0, high_open=True),
    Param("standardize", bool, True, "Standardise features with the training mean / std (kept in the head)."),
    Param("label_smoothing", float, 0.0, "Cross-entropy label smoothing.", low=0.0, high=1.0),
    Param("class_weights", str, "balanced", "'balanced', 'none' or 'w0,w1'.", also=(list,), check=_class_weights),
)
#: their defaults, as a plain dict.
COMMON_HPARAMS: dict[str, Any] = COMMON_PARAMS.defaults()


def _to_tensor(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)


class Standardize(nn.Module):
    """Per-feature (x - mean) / std with the statistics stored as buffers; identity until set.

    The trainer standardises the whole training matrix once and trains with this layer inactive
    (two fewer passes per step), then activates it so saved heads take raw features.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.active = False

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.active else x


class FastDropout(nn.Module):
    """Inverted dropout whose mask comes from random *bytes* (8 per int64 draw).

    torch's CPU dropout draws one Bernoulli per element and costs more than the layer's matmul
    on small heads; random bytes are ~10x cheaper. The drop probability is rounded to a multiple
    of 1/256 (``effective_p``). Uses the global torch RNG, so it is seeded like ``nn.Dropout``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {p}")
        self.cut = int(round(p * 256))
        self.effective_p = self.cut / 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        n = x.numel()
        # full-range int64 draws viewed as bytes: 8 uniform random bytes per draw, no copy
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= self.cut
        return x * keep.to(x.dtype).mul_(256.0 / (256 - self.cut))  # backward: one multiply

    def extra_repr(self) -> str:
        return f"p={self.effective_p}"


def make_trunk(in_dim: int, hidden: int, depth: int, dropout: float) -> nn.Sequential:
    """``depth`` x (Linear-ReLU-Dropout); output width ``hidden`` (``in_dim`` when depth is 0)."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(), FastDropout(dropout)]
        width = hidden
    return nn.Sequential(*layers)


def class_weight_vector(spec: Any, y: np.ndarray | None) -> torch.Tensor | None:
    """Class weights from "balanced" (n / (2 * n_c), from ``y``), "none", or two numbers."""
    if spec is None or spec == "none":
        return None
    if spec == "balanced":
        if y is None:
            return None
        counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=2).astype(np.float64)
        counts = np.maximum(counts, 1.0)
        return torch.tensor(counts.sum() / (2.0 * counts), dtype=torch.float32)
    vals = [float(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(vals) != 2 or min(vals) <= 0:
        raise ConfigError(f"class_weights must be 'balanced', 'none' or two positive numbers, got {spec!r}")
    return torch.tensor(vals, dtype=torch.float32)


class Head:
    """Base of every registered head; subclasses set ``PARAMS`` and the four module hooks.

    ``__init__(**hparams)`` checks the given values against ``PARAMS`` (unknown names, type, range:
    a ConfigError naming the hyperparameter), fills in the defaults, then runs ``_check`` for rules
    involving several hyperparameters.
    """

    registry_name: ClassVar[str] = "head"
    #: True when ``select`` is a learned selector (policies then threshold it by default).
    HAS_SELECTOR: ClassVar[bool] = False
    #: the declared hyperparameters: COMMON_PARAMS (defaults may be overridden) plus the head's own.
    PARAMS: ClassVar[Params] = COMMON_PARAMS

    def __init__(self, **hparams: Any) -> None:
        self.hparams: dict[str, Any] = type(self).PARAMS.resolve(hparams, self._owner(), "hyperparameter")
        self._check()
        self.module_: nn.Module | None = None
        self.in_dim_: int | None = None
        self.class_weight_: torch.Tensor | None = None
        self.history_: TrainResult | None = None
        #: optional ``callback(epoch, train_loss, val_objective)`` after each epoch (progress bars).
        self.progress_callback: Callable[[int, float, float | None], None] | None = None

    def _owner(self) -> str:
        return f"head {self.registry_name!r}"

    def _check(self) -> None:
        """Rules involving several hyperparameters (each one alone is already checked); ConfigError."""

    # -- sklearn-style parameters -------------------------------------------------------------
    @classmethod
    def default_hparams(cls) -> dict[str, Any]:
        """All hyperparameters of this head with their defaults."""
        return cls.PARAMS.defaults()

    def get_params(self) -> dict[str, Any]:
        """All hyperparameters (sklearn style); ``HEADS.create(name, **get_params())`` rebuilds the head."""
        return dict(self.hparams)

    def set_params(self, **hparams: Any) -> "Head":
        """Change hyperparameters (checked like the constructor's); returns self."""
        self.hparams.update(type(self).PARAMS.coerce(hparams, self._owner(), "hyperparameter"))
        self._check()
        return self

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The trainer settings taken from this head's hyperparameters."""
        keys = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{**{k: self.hparams[k] for k in keys}, **overrides})

    # -- hooks for subclasses -----------------------------------------------------------------
    def build_layers(self, width: int) -> nn.ModuleDict:
        """Output layers on top of the trunk (width = trunk output width)."""
        raise NotImplementedError

    @staticmethod
    def forward_outputs(layers: nn.ModuleDict, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trunk features -> dict of output tensors (must contain ``logits`` [B, 2]).

        A static method so the module holds no reference to the estimator (cheap deep copies).
        """
        raise NotImplementedError

    def loss(self, outputs: dict[str, torch.Tensor], y: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        """Scalar training loss for one batch."""
        raise NotImplementedError

    def scores_from_outputs(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [n, 2], select [n]); default select = max softmax."""
        logits = outputs["logits"]
        return logits, torch.softmax(logits, dim=1).amax(dim=1)

    # -- shared machinery ---------------------------------------------------------------------
    def make_module(self, in_dim: int) -> nn.Module:
        """A fresh ``nn.Module`` mapping features [B, in_dim] to this head's output dict."""
        h = self.hparams
        trunk = make_trunk(in_dim, int(h["hidden"]), int(h["depth"]), float(h["dropout"]))
        width = int(h["hidden"]) if int(h["depth"]) > 0 else in_dim
        return HeadModule(in_dim, trunk, self.build_layers(width), self)

    def ce(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy with this head's label smoothing and class weights.

        ``reduction="none"`` gives per-sample losses already multiplied by the class weight, scaled
        so their mean over the batch equals the weighted mean.
        """
        w = self.class_weight_
        per = F.cross_entropy(logits, y, weight=w, reduction="none", label_smoothing=float(self.hparams["label_smoothing"]))
        if w is None:
            return per.mean() if reduction == "mean" else per
        norm = w[y].mean()
        return per.mean() / norm if reduction == "mean" else per / norm

    def prepare(self, y: np.ndarray | torch.Tensor | None) -> None:
        """Set data-dependent loss state (class weights) from training labels ``y``."""
        arr = None if y is None else np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
        self.class_weight_ = class_weight_vector(self.hparams["class_weights"], arr)

    def _check_xy(self, X: Any, y: Any | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = _to_tensor(X)
        if x.ndim not in (2, 3):
            raise DataError(f"{self.registry_name}: X must be [n, D] or [n, V, D], got shape {tuple(x.shape)}")
        if y is None:
            return x, None
        yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
        if yt.ndim != 1 or len(yt) != len(x):
            raise DataError(f"{self.registry_name}: y must be [n] with n = {len(x)}, got {tuple(yt.shape)}")
        if len(yt) and (int(yt.min()) < 0 or int(yt.max()) > 1):
            raise DataError(f"{self.registry_name}: labels must be 0 or 1 (unlabelled rows must be removed first)")
        return x, yt

    def fit(self, X: Any, y: Any, *, X_val: Any = None, y_val: Any = None) -> "Head":
        """Train on X [n, D] or [n, V, D] (all views used) and y [n]; val = early stopping."""
        x, yt = self._check_xy(X, y)
        assert yt is not None
        if (X_val is None) != (y_val is None):
            raise DataError(f"{self.registry_name}: give both X_val and y_val (early stopping needs labels) or neither")
        xv, yv = (None, None) if X_val is None else self._check_xy(X_val, y_val)
        self._fit_tensors(x, yt, xv, yv)
        return self

    def _fit_tensors(self, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor | None, yv: torch.Tensor | None) -> None:
        self.in_dim_ = int(x.shape[-1])
        self.prepare(y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.hparams["seed"]))
            module = self.make_module(self.in_dim_)
            extras = self.fit_extras(x, y, xv, yv)
            stats = None
            if self.hparams["standardize"]:
                flat = x.reshape(-1, x.shape[-1])
                stats = (flat.mean(0), flat.std(0).clamp_min(1e-6))
                x = (x - stats[0]) / stats[1]  # once, not per step; the layer is set after training
                xv = None if xv is None else (xv - stats[0]) / stats[1]
            self.history_ = train_module(module, self._loss_for_training, self.scores_from_outputs, x, y,
                                         self.train_config(), x_val=xv, y_val=yv, extras=extras,
                                         on_epoch=self.progress_callback)
            if stats is not None:
                module.standardize.set_stats(*stats)
        self.module_ = module

    def _loss_for_training(self, outputs: dict[str, torch.Tensor], y: torch.Tensor, **extras: torch.Tensor) -> torch.Tensor:
        return self.loss(outputs, y, **extras)

    def fit_extras(self, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor | None,
                   yv: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-row tensors the loss needs beyond (outputs, y); none by default."""
        return {}

    def _require_fitted(self) -> nn.Module:
        if self.module_ is None:
            raise RuntimeError(f"{self.registry_name}: call fit() or load_head() before predicting")
        return self.module_

    def predict_scores(self, X: Any) -> dict[str, np.ndarray]:
        """``{"logits": [n, 2] float32, "select": [n] float32}`` on view 0 when X is [n, V, D]."""
        module = self._require_fitted()
        x, _ = self._check_xy(X, None)
        if x.ndim == 3:
            x = x[:, 0]
        if x.shape[1] != self.in_dim_:
            raise DataError(f"{self.registry_name}: features have width {x.shape[1]}, head expects {self.in_dim_}")
        logits, select = self.scores_from_outputs(predict_outputs(module, x))
        return {"logits": logits.numpy().astype(np.float32), "select": select.numpy().astype(np.float32)}

    def predict_logits(self, X: Any) -> np.ndarray:
        """Class logits [n, 2] (view 0 when X is [n, V, D])."""
        return self.predict_scores(X)["logits"]

    def extra_json(self) -> dict[str, Any]:
        """Head-specific facts recorded in head.json."""
        return {}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``head.safetensors`` (weights, buffers) and ``head.json`` (config) into ``path``."""
        from stage1._core.io import atomic_write_json, json_safe, save_safetensors_atomic

        module = self._require_fitted()
        os.makedirs(path, exist_ok=True)
        tensors = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        if self.class_weight_ is not None:
            tensors["_class_weight"] = self.class_weight_.numpy()
        save_safetensors_atomic(tensors, os.path.join(path, HEAD_WEIGHTS), metadata={"head": self.registry_name})
        meta = {
            "schema_version": SCHEMA_VERSION,
            "head": self.registry_name,
            "in_dim": self.in_dim_,
            "hparams": self.hparams,
            "standardize_active": bool(module.standardize.active),
            "outputs": sorted(k for k in predict_outputs(module, torch.zeros(1, int(self.in_dim_ or 0))).keys()),
            "training": None if self.history_ is None else self.history_.to_dict(),
            **self.extra_json(),
        }
        atomic_write_json(os.path.join(path, HEAD_JSON), json_safe(meta))

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> "Head":
        """Rebuild a fitted head from head.json contents and head.safetensors arrays."""
        head = cls(**meta["hparams"])
        head.in_dim_ = int(meta["in_dim"])
        cw = tensors.pop("_class_weight", None)
        head.class_weight_ = None if cw is None else torch.from_numpy(np.array(cw))
        if cw is not None and (np.shape(cw) != (2,) or not np.all(np.asarray(cw) > 0)):
            raise DataError(f"head.safetensors: _class_weight must be two positive numbers, got shape {np.shape(cw)}")
        module = head.make_module(head.in_dim_)
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise DataError(f"head.safetensors does not match head.json's config: missing {missing or 'none'}, "
                            f"unexpected {extra or 'none'}")
        for k, shape in expected.items():
            if tuple(np.shape(tensors[k])) != shape:
                raise DataError(f"head.safetensors: {k} has shape {tuple(np.shape(tensors[k]))}, but head.json's "
                                f"config (in_dim {head.in_dim_}, hparams) builds {shape}")
        module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=True)
        module.standardize.active = bool(meta.get("standardize_active", head.hparams["standardize"]))
        module.eval()
        head.module_ = module
        if meta.get("training"):
            head.history_ = TrainResult(**meta["training"])
        return head


class HeadModule(nn.Module):
    """Standardize -> trunk -> head-specific output layers; forward returns a dict of tensors."""

    def __init__(self, in_dim: int, trunk: nn.Sequential, layers: nn.ModuleDict, head: Head) -> None:
        super().__init__()
        self.standardize = Standardize(in_dim)
        self.trunk = trunk
        self.layers = layers
        self._forward_outputs = type(head).forward_outputs

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._forward_outputs(self.layers, self.trunk(self.standardize(x)))
