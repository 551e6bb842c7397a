"""F-SAM: the perturbation uses g - sigma * EMA(g) and the update is a correct two-step SAM update.

Also the other shared optimisation pieces: the ``OPTIMIZERS`` registry (adamw, fsam, lion; Lion is
lion-pytorch's and must step exactly as it does), ``sam_step`` (one update, with or without F-SAM)
and ``lr_factor`` (warmup + cosine schedule).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stage1._core.errors import UnknownNameError
from stage1.heads.optim import FSAM, OPTIMIZERS, lr_factor, sam_step

A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 3.0]])
B = torch.tensor([1.0, -2.0, 0.5])


def quad_grad(w: np.ndarray) -> np.ndarray:
    """Gradient of 0.5 w^T A w - b^T w (A symmetric)."""
    return A.numpy() @ w - B.numpy()


def make(w0: np.ndarray, **kw) -> tuple[torch.nn.Parameter, FSAM]:
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float32))
    return w, FSAM([w], torch.optim.SGD, lr=0.1, **kw)


def closure_for(w: torch.nn.Parameter, calls: list[np.ndarray]):
    def closure() -> torch.Tensor:
        calls.append(w.detach().numpy().copy())
        loss = 0.5 * w @ A @ w - B @ w
        loss.backward()
        return loss

    return closure


def reference(w0: np.ndarray, steps: int, rho: float, sigma: float, lmbda: float, lr: float) -> np.ndarray:
    """F-SAM by hand (numpy): d = g - sigma*m (d = g on step 1), m <- lmbda*m + (1-lmbda)*g."""
    w, m = w0.astype(np.float64).copy(), None
    for _ in range(steps):
        g = quad_grad(w)
        if m is None:
            d, m = g.copy(), g.copy()
        else:
            d = g - sigma * m
            m = lmbda * m + (1 - lmbda) * g
        e = rho * d / (np.linalg.norm(d) + 1e-12)
        w = w - lr * quad_grad(w + e)  # SGD with the gradient taken at the perturbed point
    return w


@pytest.mark.parametrize("sigma,lmbda", [(1.0, 0.9), (0.5, 0.6), (0.0, 0.9)])
def test_matches_hand_computed_fsam(sigma: float, lmbda: float) -> None:
    w0 = np.array([0.3, -1.0, 2.0])
    w, opt = make(w0, rho=0.2, sigma=sigma, lmbda=lmbda)
    for _ in range(5):
        opt.step(closure_for(w, []))
    np.testing.assert_allclose(w.detach().numpy(), reference(w0, 5, 0.2, sigma, lmbda, 0.1), rtol=1e-5, atol=1e-6)


def test_second_pass_is_at_perturbed_point_and_weights_are_restored() -> None:
    w0 = np.array([0.3, -1.0, 2.0])
    w, opt = make(w0, rho=0.5)
    opt.param_groups[0]["lr"] = 0.0  # no base step: weights must come back exactly
    calls: list[np.ndarray] = []
    opt.step(closure_for(w, calls))
    g = quad_grad(w0)
    np.testing.assert_allclose(calls[0], w0, rtol=1e-6)
    np.testing.assert_allclose(calls[1], w0 + 0.5 * g / np.linalg.norm(g), rtol=1e-5)
    np.testing.assert_array_equal(w.detach().numpy(), w0.astype(np.float32))


def test_friendly_direction_removes_the_gradient_ema() -> None:
    """Second step: the perturbation follows g_2 - sigma * m_1 with m_1 = g_1, not g_2."""
    w0 = np.array([0.3, -1.0, 2.0])
    w, opt = make(w0, rho=0.1, sigma=1.0, lmbda=0.5)
    opt.step(closure_for(w, []))
    w1 = w.detach().numpy().astype(np.float64)
    calls: list[np.ndarray] = []
    opt.step(closure_for(w, calls))
    d = quad_grad(w1) - quad_grad(w0)
    np.testing.assert_allclose(calls[1] - calls[0], 0.1 * d / np.linalg.norm(d), rtol=1e-4, atol=1e-7)
    m = opt.state[w]["grad_ema"].numpy()
    np.testing.assert_allclose(m, 0.5 * quad_grad(w0) + 0.5 * quad_grad(w1), rtol=1e-5)


def test_explicit_two_step_api_equals_step_closure() -> None:
    w0 = np.array([1.0, 0.5, -0.5])
    wa, opa = make(w0, rho=0.05)
    wb, opb = make(w0, rho=0.05)
    for _ in range(3):
        opa.step(closure_for(wa, []))
        opb.zero_grad()
        closure_for(wb, [])()
        opb.first_step()
        opb.zero_grad()
        closure_for(wb, [])()
        opb.second_step()
    np.testing.assert_array_equal(wa.detach().numpy(), wb.detach().numpy())


def test_base_optimizer_shares_param_groups_and_validates() -> None:
    w, opt = make(np.zeros(3))
    opt.param_groups[0]["lr"] = 0.123
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.123
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="rho"):
        FSAM([w], torch.optim.SGD, rho=-1.0, lr=0.1)


def test_sam_step_is_the_fsam_update_and_a_plain_step_otherwise() -> None:
    w0 = np.array([1.0, 0.5, -0.5])
    wa, opa = make(w0, rho=0.05)
    wb, opb = make(w0, rho=0.05)
    for _ in range(3):
        calls: list[np.ndarray] = []
        loss_a = opa.step(closure_for(wa, []))
        loss_b = sam_step(opb, closure_for(wb, calls), [wb], grad_clip=0.0)
        assert len(calls) == 2 and float(loss_a.detach()) == float(loss_b.detach())  # two passes, loss at w
    np.testing.assert_array_equal(wa.detach().numpy(), wb.detach().numpy())

    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float32))
    calls = []
    sam_step(torch.optim.SGD([w], lr=0.1), closure_for(w, calls), [w], grad_clip=0.0)
    assert len(calls) == 1
    np.testing.assert_allclose(w.detach().numpy(), w0 - 0.1 * quad_grad(w0), rtol=1e-6)


def test_sam_step_clips_the_gradient_it_steps_with() -> None:
    w0 = np.array([1.0, 0.5, -0.5])
    for opt_kind in ("sgd", "fsam"):
        w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float32))
        opt = torch.optim.SGD([w], lr=1.0) if opt_kind == "sgd" else FSAM([w], torch.optim.SGD, lr=1.0, rho=0.05)
        sam_step(opt, closure_for(w, []), [w], grad_clip=0.01)
        assert np.linalg.norm(w.detach().numpy() - w0) == pytest.approx(0.01, rel=1e-3)


def test_lr_factor_endpoints() -> None:
    assert lr_factor(0, 100, 0.1, 0.0) == pytest.approx(0.1)  # first warmup step: 1 / warmup steps
    assert lr_factor(9, 100, 0.1, 0.0) == 1.0  # last warmup step reaches the peak
    assert lr_factor(10, 100, 0.1, 0.0) == 1.0  # cosine starts at the peak
    assert lr_factor(10 + 45, 100, 0.1, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, 100, 0.1, 0.2) == pytest.approx(0.2)  # ends at min_ratio
    assert lr_factor(0, 100, 0.0, 0.1) == 1.0  # no warmup: starts at the peak
    assert lr_factor(0, 100, 0.001, 0.1) == 1.0  # any warmup lasts at least one step
    assert lr_factor(0, 1, 0.0, 0.1) == 1.0 and lr_factor(0, 0, 0.5, 0.1) == 1.0  # degenerate lengths


@pytest.mark.parametrize("warmup_frac,min_ratio", [(0.1, 0.0), (0.05, 0.01), (0.0, 0.5), (0.3, 1.0)])
def test_lr_factor_rises_then_falls_monotonically(warmup_frac: float, min_ratio: float) -> None:
    total = 200
    f = [lr_factor(s, total, warmup_frac, min_ratio) for s in range(total)]
    warm = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    assert all(a < b for a, b in zip(f[:warm], f[1:warm]))  # strictly rising warmup
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))  # non-increasing after it
    assert all(min_ratio - 1e-12 <= v <= 1.0 for v in f[warm:])


def test_lr_factor_peak_scales_the_schedule() -> None:
    for step in (0, 4, 50, 99):
        assert lr_factor(step, 100, 0.05, 0.01, peak=0.003) == pytest.approx(0.003 * lr_factor(step, 100, 0.05, 0.01))


# -- the registry -------------------------------------------------------------------------------------
def _tiny_problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x = torch.randn(32, 5)
    return model, x, (x[:, 0] > 0).long()


def _train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 steps: int = 6) -> list[torch.Tensor]:
    """``steps`` updates through ``sam_step`` with a changing lr (as the loops' schedule does)."""
    params = list(model.parameters())
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = group.setdefault("peak", group["lr"]) * lr_factor(step, steps, 0.3, 0.1)

        def closure() -> torch.Tensor:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        sam_step(opt, closure, params, grad_clip=0.0)
    return [p.detach().clone() for p in params]


def test_registry_has_the_three_optimizers() -> None:
    assert OPTIMIZERS.names() == ["adamw", "fsam", "lion"]


@pytest.mark.parametrize("groups", [False, True])
def test_lion_from_the_registry_steps_exactly_as_lion_pytorch(groups: bool) -> None:
    from lion_pytorch import Lion

    def params_of(model: torch.nn.Module) -> list:
        if not groups:
            return list(model.parameters())
        return [{"params": model[0].parameters(), "lr": 2e-3}, {"params": model[2].parameters()}]

    model_a, x, y = _tiny_problem()
    model_b, _, _ = _tiny_problem()
    opt_a = OPTIMIZERS.create("lion", params=params_of(model_a), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    opt_b = Lion(params_of(model_b), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98))
    assert isinstance(opt_a, Lion)
    after_a, after_b = _train_steps(model_a, opt_a, x, y), _train_steps(model_b, opt_b, x, y)
    start = [p.detach() for p in _tiny_problem()[0].parameters()]
    assert any(not torch.equal(a, s) for a, s in zip(after_a, start))  # it did move
    for a, b in zip(after_a, after_b):
        assert torch.equal(a, b)


def test_lion_defaults_are_lion_pytorchs_and_settings_are_not_rescaled() -> None:
    model, _, _ = _tiny_problem()
    opt = OPTIMIZERS.create("lion", params=model.parameters(), lr=3e-4, weight_decay=0.3)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"])) == (3e-4, 0.3, (0.9, 0.99))


def test_one_lion_step_moves_every_weight_by_lr_times_the_sign() -> None:
    """Lion's defining update on the first step (zero momentum): w -= lr * (sign((1 - b1) g) + wd w)."""
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    opt = OPTIMIZERS.create("lion", params=[w], lr=0.01, weight_decay=0.5)
    (w * torch.tensor([3.0, -0.2, 0.0])).sum().backward()
    opt.step()
    expected = torch.tensor([0.5, -1.0, 2.0]) * (1 - 0.01 * 0.5) - 0.01 * torch.tensor([1.0, -1.0, 0.0])
    torch.testing.assert_close(w.detach(), expected)


@pytest.mark.parametrize("name", ["adamw", "fsam"])
def test_adamw_and_fsam_from_the_registry_are_the_direct_constructions(name: str) -> None:
    model_a, x, y = _tiny_problem()
    model_b, _, _ = _tiny_problem()
    opt_a = OPTIMIZERS.create(name, params=model_a.parameters(), lr=1e-2, weight_decay=0.05, rho=0.1, fused=True)
    kw = dict(lr=1e-2, weight_decay=0.05, fused=True)
    opt_b = (FSAM(model_b.parameters(), torch.optim.AdamW, rho=0.1, **kw) if name == "fsam"
             else torch.optim.AdamW(model_b.parameters(), **kw))
    for a, b in zip(_train_steps(model_a, opt_a, x, y), _train_steps(model_b, opt_b, x, y)):
        assert torch.equal(a, b)


def test_unknown_optimizer_lists_the_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown optimizer 'sgd'; choose one of: adamw, fsam, lion"):
        OPTIMIZERS.get("sgd")
