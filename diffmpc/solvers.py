"""Forward solvers: small immutable configs that find ``y* = argmin f`` or ``F(y*) = 0`` for a batch.

The implicit layer does not care *how* y* was found (the IFT only needs y* to be stationary), so any
callable ``solver(fun, y0) -> y`` works as a black box. These are the defaults, written in batched torch so
that each sample keeps its own step sizes and stops on its own:

=================  =====================================================================================
``"newton"``       :class:`NewtonCG` — truncated Newton: CG on Hessian-vector products, Steihaug-style
                   stop on negative curvature, Armijo backtracking; never steps uphill.
``"gd"``           :class:`GradientDescent` — fixed-step gradient descent (the simplest unrollable one).
``"lbfgs"``        :class:`LBFGS` — ``torch.optim.LBFGS`` on the summed objective (samples share steps).
=================  =====================================================================================

Root solvers (for :func:`diffmpc.root`): ``"newton"`` (:class:`NewtonRoot`: Newton steps solved with the
paper's normal-equation CG, backtracking on ‖F‖²) and ``"fixed_point"`` (:class:`FixedPoint`:
``y ← y − β F(y)``, i.e. iteration of ``G(y) = y − F(y)``).

All solvers take batched tensors ``(B, *S)``; ``fun`` returns ``(B,)`` scores, ``F`` returns ``(B, *S)``.
``minimize``/``find_root`` return ``(y, iterations)`` with ``iterations`` of shape ``(B,)``. With
``differentiable=True`` every step stays on the autograd tape (``backward="unroll"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import linalg
from .linalg import _col, _dot, _norm

Objective = Callable[[Tensor], Tensor]

__all__ = [
    "NewtonCG",
    "GradientDescent",
    "LBFGS",
    "NewtonRoot",
    "FixedPoint",
    "MINIMIZERS",
    "ROOT_SOLVERS",
    "default_tol",
    "make_minimizer",
    "make_root_solver",
]


def default_tol(dtype: torch.dtype) -> float:
    """Default stationarity tolerance ‖∇f‖ (or ‖F‖) for a dtype: ~eps^(2/3), loose enough to be reachable."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


def _grad(fun: Objective, y: Tensor, differentiable: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Return (y_leaf, f(y), ∇f(y)) with a graph kept for Hessian-vector products."""
    with torch.enable_grad():
        yr = y if (differentiable and y.requires_grad) else y.detach().requires_grad_()
        fval = fun(yr)
        (g,) = torch.autograd.grad(fval.sum(), yr, create_graph=True)
    return yr, fval, g


def _check_solver_fields(obj: Any, ints: tuple[str, ...] = (), optional_ints: tuple[str, ...] = (),
                         positive: tuple[str, ...] = ()) -> None:
    """Solver configs reject bad numbers when built (tol > 0 or None, iteration caps >= 1), naming them."""
    from ._checks import check_fields, check_int, check_real

    name = type(obj).__name__
    check_real(f"{name}.tol", obj.tol, 0.0, strict=True, allow_none=True)
    check_fields(obj, ints=ints, positive=positive)
    for k in optional_ints:
        check_int(f"{name}.{k}", getattr(obj, k), 1, allow_none=True)


@dataclass(frozen=True)
class NewtonCG:
    """Batched truncated-Newton minimiser (Nocedal & Wright, Alg. 7.1) with Armijo backtracking.

    Each iteration solves ``H d = −∇f`` inexactly by CG on Hessian-vector products (forcing term
    ``min(0.5, sqrt‖∇f‖)``). If CG meets negative curvature it stops at the last positive-curvature iterate
    (or takes ``−∇f`` on the first), and any non-descent direction is replaced by ``−∇f``: indefinite
    Hessians never send a sample uphill. Samples with ``‖∇f‖ ≤ tol`` are frozen.
    """

    tol: float | None = None
    max_iter: int = 100
    cg_max_iter: int | None = None
    max_backtracks: int = 40
    armijo: float = 1e-4

    def __post_init__(self) -> None:
        _check_solver_fields(self, ints=("max_iter", "max_backtracks"), optional_ints=("cg_max_iter",),
                             positive=("armijo",))

    def minimize(self, fun: Objective, y0: Tensor, differentiable: bool = False) -> tuple[Tensor, Tensor]:
        tol = self.tol if self.tol is not None else default_tol(y0.dtype)
        y = y0.detach().clone().requires_grad_(differentiable)
        iters = torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
        for _ in range(self.max_iter):
            yr, fval, g = _grad(fun, y, differentiable)
            gnorm = _norm(g.detach())
            active = gnorm > tol
            if not bool(active.any()):
                break
            with torch.set_grad_enabled(differentiable):

                def hvp(v: Tensor, g: Tensor = g, yr: Tensor = yr) -> Tensor:
                    return torch.autograd.grad(g, yr, v, retain_graph=True, create_graph=differentiable)[0]

                forcing = gnorm.sqrt().clamp(max=0.5).min().item()
                d, _ = linalg.cg(
                    hvp, -g if differentiable else -g.detach(), rtol=forcing, max_iter=self.cg_max_iter
                )
                slope = _dot(g.detach(), d.detach())
                bad = (slope >= 0) | ~torch.isfinite(slope)
                d = torch.where(_col(bad, d), -g, d)
                slope = torch.where(bad, -(gnorm**2), slope)
                alpha = self._line_search(fun, y, d, fval.detach(), slope, active)
            step = _col(torch.where(active, alpha, 0.0), d) * d
            y = y + step if differentiable else (y + step).detach()
            iters = iters + active.long()
        return y, iters

    def _line_search(self, fun, y, d, f0, slope, active) -> Tensor:
        alpha = torch.ones_like(f0)
        ok = ~active
        # Near the optimum f changes by O(‖∇f‖²), below f's own round-off: allow that much slack so that
        # full Newton steps are still taken there instead of backtracking to zero.
        slack = 16 * torch.finfo(f0.dtype).eps * f0.abs().clamp_min(1.0)
        with torch.no_grad():
            yd, dd = y.detach(), d.detach()
            for _ in range(self.max_backtracks):
                ftry = fun(yd + _col(alpha, dd) * dd)
                ok = ok | (torch.isfinite(ftry) & (ftry <= f0 + self.armijo * alpha * slope + slack))
                if bool(ok.all()):
                    break
                alpha = torch.where(ok, alpha, alpha * 0.5)
        # A sample whose backtracking failed takes no step rather than an uphill one.
        return torch.where(ok, alpha, 0.0)


@dataclass(frozen=True)
class GradientDescent:
    """Fixed-step gradient descent ``y ← y − lr ∇f(y)``; samples below ``tol`` are frozen."""

    lr: float = 1e-2
    max_iter: int = 1000
    tol: float | None = None

    def __post_init__(self) -> None:
        _check_solver_fields(self, ints=("max_iter",), positive=("lr",))

    def minimize(self, fun: Objective, y0: Tensor, differentiable: bool = False) -> tuple[Tensor, Tensor]:
        tol = self.tol if self.tol is not None else default_tol(y0.dtype)
        y = y0.detach().clone().requires_grad_(differentiable)
        iters = torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
        for _ in range(self.max_iter):
            _, _, g = _grad(fun, y, differentiable)
            active = _norm(g.detach()) > tol
            if not bool(active.any()):
                break
            step = self.lr * _col(active.to(g.dtype), g) * (g if differentiable else g.detach())
            y = y - step if differentiable else (y - step).detach()
            iters = iters + active.long()
        return y, iters


@dataclass(frozen=True)
class LBFGS:
    """``torch.optim.LBFGS`` with strong-Wolfe line search on ``Σ_b f_b`` (not unrollable)."""

    max_iter: int = 200
    history_size: int = 20
    tol: float | None = None

    def __post_init__(self) -> None:
        _check_solver_fields(self, ints=("max_iter", "history_size"))

    def minimize(self, fun: Objective, y0: Tensor, differentiable: bool = False) -> tuple[Tensor, Tensor]:
        if differentiable:
            raise ValueError("LBFGS cannot be unrolled; use solver='newton' or 'gd' with backward='unroll'")
        tol = self.tol if self.tol is not None else default_tol(y0.dtype)
        y = y0.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [y],
            max_iter=self.max_iter,
            history_size=self.history_size,
            tolerance_grad=tol / max(1, y0.shape[0]) ** 0.5,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                loss = fun(y).sum()
                loss.backward()
            return loss

        opt.step(closure)
        n = opt.state[opt._params[0]].get("n_iter", self.max_iter)
        return y.detach(), torch.full((y0.shape[0],), n, dtype=torch.long, device=y0.device)


@dataclass(frozen=True)
class NewtonRoot:
    """Newton's method for ``F(y) = 0`` with the Newton system ``J d = −F`` solved matrix-free.

    ``linear_solver="normal_cg"`` is the paper's choice (CG on ``JᵀJ d = −JᵀF``: one JVP and one VJP per
    iteration); ``"gmres"`` needs only JVPs. Steps backtrack on the merit ``½‖F‖²``.
    """

    tol: float | None = None
    max_iter: int = 50
    linear_solver: str = "normal_cg"
    linear_rtol: float = 1e-6
    linear_max_iter: int | None = None
    max_backtracks: int = 30

    def __post_init__(self) -> None:
        _check_solver_fields(self, ints=("max_iter", "max_backtracks"), optional_ints=("linear_max_iter",),
                             positive=("linear_rtol",))

    def find_root(self, F: Callable[[Tensor], Tensor], y0: Tensor, differentiable: bool = False):
        tol = self.tol if self.tol is not None else default_tol(y0.dtype)
        y = y0.detach().clone().requires_grad_(differentiable)
        iters = torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
        for _ in range(self.max_iter):
            with torch.enable_grad():
                yr = y if (differentiable and y.requires_grad) else y.detach().requires_grad_()
                r = F(yr)
            rn = _norm(r.detach())
            active = rn > tol
            if not bool(active.any()):
                break
            jvp, vjp = jacobian_products(r, yr, create_graph=differentiable)
            rhs = -r if differentiable else -r.detach()
            with torch.set_grad_enabled(differentiable):
                d, _ = linalg.solve(
                    self.linear_solver,
                    jvp,
                    rhs,
                    rmatvec=vjp,
                    rtol=self.linear_rtol,
                    max_iter=self.linear_max_iter,
                )
            alpha = torch.ones_like(rn)
            ok = ~active
            with torch.no_grad():
                for _ in range(self.max_backtracks):
                    rt = _norm(F(y.detach() + _col(alpha, d) * d.detach()))
                    ok = ok | (torch.isfinite(rt) & (rt < rn * (1 - 1e-4 * alpha)))
                    if bool(ok.all()):
                        break
                    alpha = torch.where(ok, alpha, alpha * 0.5)
            alpha = torch.where(ok & active, alpha, 0.0)
            step = _col(alpha, d) * d
            y = y + step if differentiable else (y + step).detach()
            iters = iters + active.long()
        return y, iters


@dataclass(frozen=True)
class FixedPoint:
    """Damped fixed-point iteration ``y ← y − β F(y)`` (= iterating ``G(y) = y − F(y)`` when β = 1).

    Converges when G is a contraction — e.g. a backward-Euler step ``y = x + Δt h(y)`` with ``Δt·Lip(h) < 1``.
    """

    tol: float | None = None
    max_iter: int = 500
    damping: float = 1.0

    def __post_init__(self) -> None:
        _check_solver_fields(self, ints=("max_iter",), positive=("damping",))

    def find_root(self, F: Callable[[Tensor], Tensor], y0: Tensor, differentiable: bool = False):
        tol = self.tol if self.tol is not None else default_tol(y0.dtype)
        y = y0.detach().clone()
        iters = torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
        with torch.set_grad_enabled(differentiable):
            for _ in range(self.max_iter):
                r = F(y)
                active = _norm(r.detach()) > tol
                if not bool(active.any()):
                    break
                y = y - self.damping * _col(active.to(r.dtype), r) * r
                iters = iters + active.long()
        return y, iters


def jacobian_products(r: Tensor, y: Tensor, create_graph: bool = False):
    """Matrix-free ``u ↦ J u`` and ``u ↦ Jᵀ u`` for ``r = F(y)`` (J = ∂r/∂y), sharing one graph.

    Jᵀu is one VJP; Ju uses the double-VJP trick (``J u = ∂/∂z ⟨Jᵀz, u⟩``), which works for every op with a
    double backward, unlike forward-mode AD.
    """
    with torch.enable_grad():
        z = torch.zeros_like(r, requires_grad=True)
        (jtz,) = torch.autograd.grad(r, y, z, create_graph=True)

    def vjp(u: Tensor) -> Tensor:
        return torch.autograd.grad(r, y, u, retain_graph=True, create_graph=create_graph)[0]

    def jvp(u: Tensor) -> Tensor:
        return torch.autograd.grad(jtz, z, u, retain_graph=True, create_graph=create_graph)[0]

    return jvp, vjp


MINIMIZERS = {"newton": NewtonCG, "gd": GradientDescent, "lbfgs": LBFGS}
ROOT_SOLVERS = {"newton": NewtonRoot, "fixed_point": FixedPoint}


def _make(solver, registry: dict, kind: str, method: str, tol: float | None):
    if solver is None:
        solver = "newton"
    if isinstance(solver, str):
        if solver not in registry:
            raise ValueError(
                f"unknown {kind} solver {solver!r}; choose one of {sorted(registry)} "
                f"or pass a solver object / callable"
            )
        return registry[solver](tol=tol)
    if hasattr(solver, method) or callable(solver):
        return solver
    raise TypeError(
        f"solver must be a name in {sorted(registry)}, an object with .{method}(), or a callable "
        f"(fun, y0) -> y; got {type(solver).__name__}"
    )


def make_minimizer(solver, tol: float | None = None):
    """Resolve ``solver`` (name, config object or black-box callable) for :func:`diffmpc.argmin`."""
    return _make(solver, MINIMIZERS, "minimisation", "minimize", tol)


def make_root_solver(solver, tol: float | None = None):
    """Resolve ``solver`` for :func:`diffmpc.root`."""
    return _make(solver, ROOT_SOLVERS, "root", "find_root", tol)
