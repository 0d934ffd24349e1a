r"""Sampling-based planners for the MPC horizon problem: random shooting and the cross-entropy method.

Both minimise a batch of horizon costs ``J(x0, u_{0:H-1})`` over box-bounded plans without gradients.
They are *not* stationary-point solvers: the MPC layer (:class:`diffmpc.MPC`) only uses them to pick a good
basin, then refines by Newton-CG so that the implicit function theorem holds (paper Sec. 3.2).

``plan_cost(x0, u)`` takes ``x0`` of shape ``(P, n)`` and plans ``u`` of shape ``(P, H, m)`` and returns
``(P,)`` costs; the planners call it once per round on all ``B·N`` particles at once.

* :func:`random_shooting` - the paper's expert: N plans uniform in the box, keep the cheapest.
* :func:`cem` - cross-entropy method (Rubinstein 1999; as in PETS, Chua et al. 2018): a diagonal Gaussian over
  plans, truncated to the box, refitted to the ``n_elites`` cheapest samples for ``iterations`` rounds.

A warm start ``u_init`` (e.g. the previous plan shifted by one step) is always evaluated as one of the
candidates, so a warm-started planner never returns a worse plan than its warm start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["random_shooting", "cem", "shift_plan"]

PlanCost = Callable[[Tensor, Tensor], Tensor]


def shift_plan(u: Tensor, fill: Tensor | float | None = None) -> Tensor:
    """Warm start for the next MPC step: ``(u_1, …, u_{H-1}, u_fill)``; ``fill`` defaults to ``u_{H-1}``.

    ``u`` has shape ``(..., H, m)``.
    """
    last = u[..., -1:, :] if fill is None else torch.as_tensor(fill, dtype=u.dtype, device=u.device) \
        .expand_as(u[..., -1:, :])
    return torch.cat([u[..., 1:, :], last], dim=-2)


def _select(plan_cost: PlanCost, x0: Tensor, samples: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluate ``samples (B, N, H, m)`` from ``x0 (B, n)``; return costs ``(B, N)``."""
    B, N = samples.shape[:2]
    xs = x0.unsqueeze(1).expand(B, N, x0.shape[-1]).reshape(B * N, -1)
    costs = plan_cost(xs, samples.reshape(B * N, *samples.shape[2:])).reshape(B, N)
    costs = torch.where(torch.isfinite(costs), costs, torch.full_like(costs, float("inf")))
    return costs


def _check(x0: Tensor, low: Tensor, high: Tensor, n_samples: int) -> None:
    if x0.ndim != 2:
        raise ValueError(f"x0 must have shape (B, n), got {tuple(x0.shape)}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not bool((low < high).all()):
        raise ValueError("every lower bound must be strictly below its upper bound")


@torch.no_grad()
def random_shooting(plan_cost: PlanCost, x0: Tensor, horizon: int, low: Tensor, high: Tensor,
                    n_samples: int = 1000, u_init: Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random shooting: ``argmin`` over ``n_samples`` plans ``u ~ U[low, high]^{H×m}`` (+ ``u_init``).

    Args:
        plan_cost: ``(x0 (P, n), u (P, H, m)) -> (P,)`` horizon cost.
        x0: ``(B, n)`` initial states.
        low, high: ``(m,)`` control bounds.
        u_init: optional ``(B, H, m)`` warm start, evaluated as an extra candidate.

    Returns:
        ``(u_best (B, H, m), cost_best (B,))``.
    """
    _check(x0, low, high, n_samples)
    B, m = x0.shape[0], low.numel()
    r = torch.rand(B, n_samples, horizon, m, generator=generator, dtype=x0.dtype, device=x0.device)
    samples = low + (high - low) * r
    if u_init is not None:
        samples = torch.cat([u_init.reshape(B, 1, horizon, m).to(samples), samples], dim=1)
    costs = _select(plan_cost, x0, samples)
    best = costs.argmin(1)
    idx = torch.arange(B, device=x0.device)
    return samples[idx, best], costs[idx, best]


@torch.no_grad()
def cem(plan_cost: PlanCost, x0: Tensor, horizon: int, low: Tensor, high: Tensor, n_samples: int = 500,
        n_elites: int = 50, iterations: int = 5, init_std: float | None = None, momentum: float = 0.0,
        min_std: float = 1e-3, u_init: Tensor | None = None,
        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Cross-entropy method over box-bounded plans.

    Round k samples ``u ~ N(μ_k, diag σ_k²)`` clipped to the box, keeps the ``n_elites`` cheapest and refits
    ``μ_{k+1} = a μ_k + (1−a) mean(elites)``, ``σ_{k+1} = a σ_k + (1−a) std(elites)`` (a = ``momentum``).
    μ_0 is ``u_init`` (or the box centre), σ_0 = ``init_std`` (default: half the box width). The best
    plan ever evaluated is returned (the mean itself is evaluated each round as a candidate).

    Returns:
        ``(u_best (B, H, m), cost_best (B,))``.
    """
    _check(x0, low, high, n_samples)
    if not 1 <= n_elites <= n_samples:
        raise ValueError(f"n_elites must be in [1, n_samples={n_samples}], got {n_elites}")
    B, m = x0.shape[0], low.numel()
    mid, half = (high + low) / 2, (high - low) / 2
    mu = (u_init.reshape(B, horizon, m).to(x0) if u_init is not None
          else mid.expand(B, horizon, m).clone())
    sigma = (half if init_std is None else torch.full_like(half, init_std)).expand(B, horizon, m).clone()
    best_u, best_c = mu.clone(), torch.full((B,), float("inf"), dtype=x0.dtype, device=x0.device)
    idx = torch.arange(B, device=x0.device)
    for _ in range(iterations):
        eps = torch.randn(B, n_samples, horizon, m, generator=generator, dtype=x0.dtype, device=x0.device)
        samples = torch.cat([mu.unsqueeze(1), mu.unsqueeze(1) + sigma.unsqueeze(1) * eps], dim=1)
        samples = torch.minimum(torch.maximum(samples, low), high)
        costs = _select(plan_cost, x0, samples)
        order = costs.argsort(1)
        better = costs[idx, order[:, 0]] < best_c
        best_u = torch.where(better.view(B, 1, 1), samples[idx, order[:, 0]], best_u)
        best_c = torch.where(better, costs[idx, order[:, 0]], best_c)
        elites = torch.gather(samples, 1, order[:, :n_elites, None, None].expand(B, n_elites, horizon, m))
        mu = momentum * mu + (1 - momentum) * elites.mean(1)
        sigma = (momentum * sigma + (1 - momentum) * elites.std(1, unbiased=False)).clamp_min(min_std)
    return best_u, best_c
