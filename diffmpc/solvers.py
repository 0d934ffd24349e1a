"""Forward solvers: small immutable configs that find ``y* = argmin f`` or ``F(y*) = 0`` for a batch.

The implicit layer does not care *how* y* was found (the IFT only needs y* to be stationary), so any
callable ``solver(fun, y0) -> y`` works as a black box. These are the defaults, written in batched torch so
that each sample keeps its own step sizes and stops on its own:

=================  =====================================================================================
``"newton_cg"``    :class:`NewtonCG` — truncated Newton: CG on Hessian-vector products, Steihaug-style
                   stop on negative curvature, Armijo backtracking; never steps uphill. Default;
                   ``"newton"`` is its alias.
``"gd"``           :class:`GradientDescent` — fixed-step gradient descent (the simplest unrollable one).
``"lbfgs"``        :class:`LBFGS` — ``torch.optim.LBFGS`` on the summed objective (samples share steps).
=================  =====================================================================================

Root solvers (for :func:`diffmpc.root`): ``"newton_krylov"`` (:class:`NewtonKrylov`, default, alias
``"newton"``; formerly ``NewtonRoot``: Newton steps solved matrix-free with the paper's normal-equation
CG, backtracking on ‖F‖) and ``"fixed_point"`` (:class:`FixedPoint`: ``y ← y − β F(y)``, i.e. iteration
of ``G(y) = y − F(y)``).

"newton" used to name three different algorithms (this minimiser, this root finder, and the MPC layer's
dense Newton); the names above say which is which, and ``"newton"`` stays accepted as an alias of the
respective default. Default tolerances come from one table (:func:`default_tol`).

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

from ._impl import krylov
from ._impl.batch import col as _col
from ._impl.batch import dot as _dot
from ._impl.batch import norm as _norm
from ._impl.ift import AdjointOperator
from ._impl.linesearch import armijo, round_off_slack
from ._impl.tolerances import stationarity_tol

Objective = Callable[[Tensor], Tensor]

__all__ = [
    "NewtonCG",
    "GradientDescent",
    "LBFGS",
    "NewtonKrylov",
    "NewtonRoot",
    "FixedPoint",
    "MINIMIZERS",
    "ROOT_SOLVERS",
    "default_tol",
    "make_minimizer",
    "make_root_solver",
]


def default_tol(dtype: torch.dtype) -> float:
    """Default stationarity tolerance ‖∇f‖ (or ‖F‖) for a dtype: ~eps^(2/3), loose enough to be reachable
    (1e-9 in float64, 1e-4 in float32, 1e-2 in half precision)."""
    return stationarity_tol(dtype)


def _start(y0: Tensor, tol: float | None, differentiable: bool) -> tuple[float, Tensor, Tensor]:
    """Every iterative solver's start: its tolerance, the iterate (on the tape if unrolling), per-sample
    iteration counts."""
    iters = torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
    return stationarity_tol(y0.dtype, tol), y0.detach().clone().requires_grad_(differentiable), iters


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
        tol, y, iters = _start(y0, self.tol, differentiable)
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
                d, _ = krylov.solve(
                    "cg", hvp, -g if differentiable else -g.detach(), rtol=forcing, max_iter=self.cg_max_iter,
                    refinements=0,
                )
                slope = _dot(g.detach(), d.detach())
                bad = (slope >= 0) | ~torch.isfinite(slope)
                d = torch.where(_col(bad, d), -g, d)
                slope = torch.where(bad, -(gnorm**2), slope)
                f0 = fval.detach()
                alpha = armijo(fun, y, d, f0, slope, active, c=self.armijo, slack=round_off_slack(f0),
                               max_backtracks=self.max_backtracks)
            step = _col(torch.where(active, alpha, 0.0), d) * d
            y = y + step if differentiable else (y + step).detach()
            iters = iters + active.long()
        return y, iters


@dataclass(frozen=True)
class GradientDescent:
    """Fixed-step gradient descent ``y ← y − lr ∇f(y)``; samples below ``tol`` are frozen."""

    lr: float = 1e-2
    max_iter: int = 1000
    tol: float | None = None

    def __post_init__(self) -> None:
        _check_solver_fields(self, ints=("max_iter",), positive=("lr",))

    def minimize(self, fun: Objective, y0: Tensor, differentiable: bool = False) -> tuple[Tensor, Tensor]:
        tol, y, iters = _start(y0, self.tol, differentiable)
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
        tol = stationarity_tol(y0.dtype, self.tol)
        y = y0.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [y],
            max_iter=self.max_iter,
            history_size=self.history_size,
            # LBFGS stops on max|∇Σf| ≤ tolerance_grad; each sample's ‖∇f_b‖ ≤ √N·max|·| (N = y.numel()),
            # so this makes every sample meet the layer's test ‖∇f_b‖ ≤ tol.
            tolerance_grad=tol / max(1, y0.numel()) ** 0.5,
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
class NewtonKrylov:
    """Newton–Krylov root finder for ``F(y) = 0``: the Newton system ``J d = −F`` solved matrix-free.

    ``linear_solver="normal_cg"`` is the paper's choice (CG on ``JᵀJ d = −JᵀF``: one JVP and one VJP per
    iteration); ``"gmres"`` needs only JVPs. Steps backtrack (Armijo) on the merit ``‖F‖``, whose slope
    along an exact Newton step is ``−‖F‖``.
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
        tol, y, iters = _start(y0, self.tol, differentiable)
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
                d, _ = krylov.solve(
                    self.linear_solver,
                    jvp,
                    rhs,
                    rmatvec=vjp,
                    rtol=self.linear_rtol,
                    max_iter=self.linear_max_iter,
                    refinements=0,
                )
            alpha = armijo(lambda z: _norm(F(z)), y, d, rn, -rn, active, max_backtracks=self.max_backtracks)
            alpha = torch.where(active, alpha, 0.0)
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
        tol, y, iters = _start(y0, self.tol, False)  # on the tape through F when unrolling, not via y0
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
    double backward, unlike forward-mode AD. (The operator of the IFT front end, built lazily.)
    """
    op = AdjointOperator(r, y, 0.0, symmetric=False, create_graph=create_graph)
    return op.rmatvec, op.matvec


NewtonRoot = NewtonKrylov  # the former name, kept as an alias

MINIMIZERS = {"newton_cg": NewtonCG, "gd": GradientDescent, "lbfgs": LBFGS}
ROOT_SOLVERS = {"newton_krylov": NewtonKrylov, "fixed_point": FixedPoint}
# "newton" named a different algorithm in each registry: kept as an alias of each registry's Newton.
SOLVER_ALIASES = {"minimisation": {"newton": "newton_cg"}, "root": {"newton": "newton_krylov"}}


def _make(solver, registry: dict, kind: str, method: str, tol: float | None):
    if solver is None:
        solver = next(iter(registry))
    if isinstance(solver, str):
        solver = SOLVER_ALIASES[kind].get(solver, solver)
        if solver not in registry:
            raise ValueError(
                f"unknown {kind} solver {solver!r}; choose one of {sorted(registry)} (alias 'newton') "
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
