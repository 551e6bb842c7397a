"""Friendly Sharpness-Aware Minimization (F-SAM; Li et al., CVPR 2024) as an optimizer wrapper.

SAM perturbs the weights along the normalised stochastic gradient before taking the gradient it
actually steps with. F-SAM observes that the *full-gradient* part of that direction does not help
generalisation, so it estimates the full gradient by an exponential moving average ``m`` of past
stochastic gradients and perturbs along the remainder ``g - sigma * m`` (the batch-specific noise):

    d_t   = g_t - sigma * m_{t-1}          (first step: d_1 = g_1, i.e. plain SAM)
    m_t   = lmbda * m_{t-1} + (1 - lmbda) * g_t
    e_t   = rho * d_t / ||d_t||
    w    <- w + e_t ; second forward/backward at w + e_t ; w <- w ; base optimizer step.

This module is the one home of the project's optimisers, shared by both training loops (heads on
cached features, full-image fine-tuning):

* ``OPTIMIZERS``: the optimisers by name (``adamw``, ``fsam``, ``lion``), every factory with one
  signature (``OptimizerFactory``), so a loop builds whichever is asked for without an ``if`` chain;
* ``FSAM``: the one F-SAM implementation (above);
* ``sam_step``: one update, with or without F-SAM's second pass;
* ``lr_factor``: the warmup + cosine learning-rate schedule.

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") is the ``lion-pytorch``
package's implementation, not a copy. Its update is the *sign* of an interpolated momentum, so every
coordinate moves by about ``lr`` per step (AdamW's move by up to ``lr``): the usual practice is a
learning rate 3-10x smaller and a weight decay 3-10x larger than AdamW's. Nothing here rescales
the values given: ``optimizer=lion`` with AdamW's settings takes bigger steps than AdamW does.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Protocol, Sequence, Union

import torch
from torch import nn

from stage1._core.errors import EnvironmentProblem
from stage1._core.registry import Registry


class FSAM(torch.optim.Optimizer):
    """F-SAM around any base optimizer class (e.g. ``torch.optim.AdamW``).

    ``FSAM(params, torch.optim.AdamW, rho=0.05, sigma=1.0, lmbda=0.9, lr=1e-3, ...)``: keyword
    arguments other than rho / sigma / lmbda go to the base optimizer, which shares this object's
    ``param_groups`` (so setting ``group["lr"]`` here sets it for the base optimizer too).

    Two ways to use it:
    * ``loss = opt.step(closure)``: ``closure()`` must run forward + backward and return the loss;
      ``step`` zeroes gradients, calls it at ``w``, perturbs, calls it again at ``w + e``,
      restores ``w`` and steps the base optimizer. Returns the loss at ``w``.
    * explicit: gradients at ``w`` are in ``.grad``; ``opt.first_step()``; zero grads; backward at
      the perturbed point; (optionally clip); ``opt.second_step()``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"FSAM: rho must be >= 0, got {rho}")
        if not 0.0 <= lmbda < 1.0:
            raise ValueError(f"FSAM: lmbda (EMA decay) must be in [0, 1), got {lmbda}")
        super().__init__(params, dict(rho=rho, sigma=sigma, lmbda=lmbda, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _params_with_grad(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self) -> None:
        """Move to ``w + e`` with ``e = rho * d / ||d||``, ``d = g - sigma * m`` (EMA of past g)."""
        pairs = self._params_with_grad()
        directions: list[torch.Tensor] = []
        for group, p in pairs:
            state = self.state[p]
            g = p.grad
            if "grad_ema" not in state:
                d = g.clone()  # no history yet: the full gradient (plain SAM) on the first step
                state["grad_ema"] = g.clone()
            else:
                m = state["grad_ema"]
                d = g - group["sigma"] * m
                m.mul_(group["lmbda"]).add_(g, alpha=1.0 - group["lmbda"])
            directions.append(d)
        if not directions:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in directions]))
        for (group, p), d in zip(pairs, directions):
            e = d.mul_(group["rho"] / (norm + 1e-12))
            self.state[p]["old_p"] = p.detach().clone()
            self.state[p]["e"] = e
            p.add_(e)

    @torch.no_grad()
    def second_step(self) -> None:
        """Restore ``w`` (gradients from ``w + e`` stay in ``.grad``) and step the base optimizer."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "old_p" in state:
                    p.copy_(state.pop("old_p"))
                    state.pop("e", None)
        self.base_optimizer.step()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Full two-pass update; ``closure`` runs forward + backward and returns the loss."""
        if closure is None:
            raise ValueError("FSAM.step needs a closure that runs forward + backward")
        with torch.enable_grad():
            return sam_step(self, closure, (), grad_clip=0.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups


def sam_step(
    opt: torch.optim.Optimizer,
    closure: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    grad_clip: float,
    *,
    foreach: bool | None = None,
) -> torch.Tensor:
    """One update; returns the loss at the current weights.

    ``closure()`` runs forward + backward and returns the loss. With an ``FSAM`` optimiser it runs
    again at the perturbed point and the step uses those gradients; otherwise one plain step.
    ``grad_clip > 0`` clips the gradients that are stepped with (``foreach`` goes to
    ``clip_grad_norm_``; the heads trainer forces the fused kernels on CPU, None lets torch choose).
    """
    fsam = isinstance(opt, FSAM)
    opt.zero_grad(set_to_none=True)
    loss = closure()
    if fsam:
        opt.first_step()
        opt.zero_grad(set_to_none=True)
        closure()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip, foreach=foreach)
    if fsam:
        opt.second_step()
    else:
        opt.step()
    return loss


def lr_factor(step: int, total: int, warmup_frac: float, min_ratio: float, *, peak: float = 1.0) -> float:
    """Learning rate at ``step`` of ``total`` as a multiple of the peak: linear warmup, then cosine.

    Warmup lasts ``round(warmup_frac * total)`` steps (at least one when ``warmup_frac > 0``) and
    climbs to 1 at its last step; the cosine then falls to ``min_ratio`` at ``total``. ``peak``
    scales the result inside the formula (the heads trainer passes its lr, so its rounding, and
    hence its seeded weights, are those of the schedule it always had).
    """
    warm = max(1, int(round(warmup_frac * total))) if warmup_frac > 0 else 0
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- the optimisers by name -------------------------------------------------------------------------
#: what an optimiser is built on: parameters, or param groups (dicts with "params" and per-group keys
#: such as "lr"; a group's own "lr" overrides the factory's ``lr``).
ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]

#: one line per optimiser, for help texts (the CLI's ``--optimizer``, the heads' ``optimizer``).
OPTIMIZER_HELP = (
    "adamw: AdamW. fsam: AdamW inside Friendly-SAM (two forward/backward passes per step; rho sets "
    "the radius). lion: Lion (lion-pytorch), sign-of-momentum updates; it usually wants a 3-10x "
    "smaller learning rate and a 3-10x larger weight decay than AdamW, and the values given are "
    "used as they are (not rescaled)."
)


class OptimizerFactory(Protocol):
    """The one signature of every registered optimiser factory.

    ``params``: parameters or param groups. ``lr`` / ``weight_decay``: the defaults of every group.
    ``rho`` / ``sigma`` / ``lmbda``: F-SAM's radius, EMA weight and EMA decay (used by ``fsam``).
    ``betas``: the momentum coefficients (None: the optimiser's own defaults, AdamW (0.9, 0.999),
    Lion (0.9, 0.99)). ``fused``: AdamW's fused CPU kernel where this torch has it (the heads
    trainer's choice; a different kernel can differ in the last bits, so each loop keeps its own).
    Settings an optimiser has no use for are ignored.
    """

    def __call__(self, params: ParamsT, *, lr: float, weight_decay: float, rho: float = 0.05,
                 sigma: float = 1.0, lmbda: float = 0.9, betas: tuple[float, float] | None = None,
                 fused: bool = False) -> torch.optim.Optimizer: ...


#: optimisers by name; ``OPTIMIZERS.create(name, params=..., lr=..., weight_decay=...)`` builds one.
OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")


def _adamw_kwargs(lr: float, weight_decay: float, betas: tuple[float, float] | None, fused: bool) -> dict[str, Any]:
    """Keyword arguments of ``torch.optim.AdamW`` (the fused kernel, else foreach, when ``fused``)."""
    kwargs: dict[str, Any] = dict(lr=lr, weight_decay=weight_decay)
    if betas is not None:
        kwargs["betas"] = tuple(betas)
    if fused:
        kwargs.update(_adamw_kernel())
    return kwargs


def _adamw_kernel() -> dict[str, bool]:
    """The fused CPU AdamW kernel (one pass over the weights) where this torch has it."""
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - older torch
        return {"foreach": True}


@OPTIMIZERS.register("adamw")
def make_adamw(params: ParamsT, *, lr: float, weight_decay: float, rho: float = 0.05, sigma: float = 1.0,
               lmbda: float = 0.9, betas: tuple[float, float] | None = None,
               fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay; Loshchilov & Hutter 2019), torch's implementation."""
    return torch.optim.AdamW(params, **_adamw_kwargs(lr, weight_decay, betas, fused))


@OPTIMIZERS.register("fsam")
def make_fsam(params: ParamsT, *, lr: float, weight_decay: float, rho: float = 0.05, sigma: float = 1.0,
              lmbda: float = 0.9, betas: tuple[float, float] | None = None,
              fused: bool = False) -> torch.optim.Optimizer:
    """AdamW inside F-SAM (``FSAM``): two forward / backward passes per step (``sam_step``)."""
    return FSAM(params, torch.optim.AdamW, rho=rho, sigma=sigma, lmbda=lmbda,
                **_adamw_kwargs(lr, weight_decay, betas, fused))


@OPTIMIZERS.register("lion")
def make_lion(params: ParamsT, *, lr: float, weight_decay: float, rho: float = 0.05, sigma: float = 1.0,
              lmbda: float = 0.9, betas: tuple[float, float] | None = None,
              fused: bool = False) -> torch.optim.Optimizer:
    """Lion (``lion_pytorch.Lion``): ``w -= lr * (sign(b1 * m + (1 - b1) * g) + wd * w)``, then
    ``m = b2 * m + (1 - b2) * g``. Use a 3-10x smaller ``lr`` and 3-10x larger ``weight_decay``
    than for AdamW (not done for you)."""
    try:
        from lion_pytorch import Lion
    except ImportError:  # pragma: no cover - the package is a declared dependency
        raise EnvironmentProblem("optimizer 'lion' needs the lion-pytorch package: pip install lion-pytorch") from None
    kwargs: dict[str, Any] = {} if betas is None else {"betas": tuple(betas)}
    return Lion(params, lr=lr, weight_decay=weight_decay, **kwargs)
