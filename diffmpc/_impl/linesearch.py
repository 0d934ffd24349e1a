"""The one batched Armijo backtracking line search (used by every Newton-type forward solver)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .batch import col


def round_off_slack(f0: Tensor) -> Tensor:
    """Near an optimum f changes by O(‖∇f‖²), below f's own round-off: a Newton method accepts that much
    increase (16 eps·max(|f|, 1)) so that full steps are still taken there instead of backtracking to zero."""
    return 16 * torch.finfo(f0.dtype).eps * f0.abs().clamp_min(1.0)


def armijo(
    merit: Callable[[Tensor], Tensor],
    y: Tensor,
    d: Tensor,
    f0: Tensor,
    slope: Tensor,
    active: Tensor,
    *,
    c: float = 1e-4,
    slack: Tensor | float = 0.0,
    max_backtracks: int = 40,
    shrink: float = 0.5,
) -> Tensor:
    r"""Per-sample step ``α ∈ {1, ½, ¼, …}`` with ``m(y + αd) ≤ m(y) + c·α·slope + slack`` (Armijo 1966).

    ``merit`` maps a batch ``(B, *S)`` to ``(B,)``; ``f0 = m(y)``, ``slope`` the directional derivative
    ``∇m·d`` (< 0 for a descent direction). Samples not ``active`` keep α = 1 and are never evaluated
    further; a sample whose backtracking fails returns α = 0 — no step rather than an uphill one.
    Runs without autograd (the step size is not differentiated, even when unrolling).
    """
    alpha = torch.ones_like(f0)
    ok = ~active
    with torch.no_grad():
        yd, dd = y.detach(), d.detach()
        for _ in range(max_backtracks):
            trial = merit(yd + col(alpha, dd) * dd)
            ok = ok | (torch.isfinite(trial) & (trial <= f0 + c * alpha * slope + slack))
            if bool(ok.all()):
                break
            alpha = torch.where(ok, alpha, alpha * shrink)
    return torch.where(ok, alpha, 0.0)
