r"""The differentiable MPC layer (paper Eq. 5) as an implicit ``argmin`` layer.

Problem. For an observed state ``x_obs`` the layer returns the plan

.. math::  u^*_{0:H-1} = \arg\min_{u} \sum_{t=0}^{H-1} c(x_t, u_t; θ_c) \;[+\, c_T(x_H)]
           \quad\text{s.t.}\quad x_{t+1} = h(x_t, u_t; θ_h),\; x_0 = x_{obs},\; u_{lo} \le u_t \le u_{hi}
           \qquad\text{(Eq. 5)}

with any batched callables / ``nn.Module``s ``h(x (B, n), u (B, m)) -> (B, n)`` and ``c -> (B,)``.
The dynamics are substituted into the cost (single shooting), so the only unknowns are the controls.

Cost convention (``cost_on``). A cost with two required positional arguments ``c(x, u)`` is a stage cost
on the *current* state, ``Σ_{t=0}^{H-1} c(x_t, u_t)`` (the textbook / ``mpc.pytorch`` form). A
*state-only* cost ``c(x)`` (one required positional argument, e.g. the cart-pole cost or a learned state
cost) is evaluated at the *next* state, ``Σ_{t=0}^{H-1} c(x_{t+1})`` — at the current state the last
control would not enter the objective and the Hessian would be singular. ``cost_on="next"`` with a
two-argument cost gives ``Σ c(x_{t+1}, u_t)``. An optional ``terminal_cost(x_H)`` is added.

Bounds. The box is removed by the smooth reparametrisation ``u = mid + half·tanh(z)`` (mid/half: centre and
half-width of the box) and the layer solves for ``z ∈ ℝ^{H×m}``:

.. math::  z^* = \arg\min_z J(z) = \sum_t c(\,\cdot\,) + \tfrac{ε}{2}\lVert z\rVert^2,
           \qquad u^* = \mathrm{mid} + \mathrm{half}\tanh(z^*)

The tiny ridge ``ε`` (``bound_reg``, default 1e-4) keeps the minimiser finite when a control sits at its
bound (without it z* → ±∞ and the Hessian degenerates); there ``u*`` lies within ~ε of the bound and
``∂u*/∂θ = half·sech²(z*)·∂z*/∂θ ≈ 0``, the correct derivative of an active constraint. Away from the
bounds the reparametrisation does not move the minimiser (up to the O(ε) ridge; ``bound_reg=0`` removes it)
and the IFT gradient equals the unconstrained one. Since J is smooth in z, ``diffmpc.argmin`` differentiates
``z*`` by the IFT (Eqs. 2–3; Hessian-vector products + CG), and autograd applies the chain rule through tanh.

Forward solve. (1) A sampler picks a basin: random shooting (``sampler="rs"``, the paper's planner) or CEM
over plans in the box, with the warm start ``u_init`` (e.g. the previous plan shifted by one step, see
:func:`diffmpc.sampling.shift_plan`) always among the candidates. (2) Gradient refinement from the best
sample — a modified Newton method on dense per-sample Hessians (``solver="newton"``, default,
:class:`DenseNewton`; D = H·m unknowns is small), matrix-free Newton-CG (``"newton-cg"``, for large H·m)
or L-BFGS — drives ``‖∇_z J‖`` below ``tol``: a sampled plan alone is not stationary, and the IFT would not
hold there. The layer reports the stationarity residual
per sample and warns with :class:`diffmpc.ConvergenceWarning` if it is above ``10·tol``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .implicit import ARGMIN_BACKWARDS, ImplicitInfo, argmin
from .sampling import cem, random_shooting, shift_plan
from .solvers import LBFGS, NewtonCG, default_tol

__all__ = ["MPC", "MPCInfo", "MPCSettings", "DenseNewton", "shift_plan"]

SAMPLERS = ("rs", "cem", None)
_Z_START = 2.5  # refinement starts with |z| <= 2.5 (|u - mid| <= 0.987 half): keeps tanh's gradient alive


@dataclass(frozen=True)
class MPCSettings:
    """Immutable solver settings of an :class:`MPC` layer (see its docstring)."""

    horizon: int
    action_dim: int
    cost_on: str
    state_only_cost: bool
    solver: Any
    sampler: str | None
    n_samples: int
    cem_iterations: int
    n_elites: int
    backward: str
    tol: float | None
    backward_tol: float | None
    backward_max_iter: int | None
    damping: float
    bound_reg: float
    strict: bool


@dataclass
class MPCInfo:
    """Diagnostics of one MPC solve (per sample, shape ``(B,)``).

    ``cost`` is the horizon cost of the returned plan (without the ``bound_reg`` ridge); ``sample_cost`` that
    of the sampler's best plan before refinement; ``z`` the unconstrained solution; ``implicit`` the
    :class:`diffmpc.ImplicitInfo` of the argmin layer (its ``backward`` fills in on backward).
    """

    cost: Tensor
    sample_cost: Tensor
    z: Tensor
    implicit: ImplicitInfo

    @property
    def stationarity_residual(self) -> Tensor:
        return self.implicit.stationarity_residual

    @property
    def converged(self) -> Tensor:
        return self.implicit.converged

    @property
    def forward_iterations(self) -> Tensor | None:
        return self.implicit.forward_iterations


@dataclass(frozen=True)
class DenseNewton:
    r"""Batched modified Newton for small unknowns (MPC: D = H·m), with per-sample step control.

    Each iteration builds the per-sample Hessian ``∇²J (B, D, D)`` with one *batched* double-backward (D
    Hessian-vector products vectorised by ``is_grads_batched``), takes its eigendecomposition
    ``V Λ Vᵀ`` and steps along ``d = −V |Λ|_δ⁻¹ Vᵀ ∇J`` (``|λ|`` floored at ``δ = eig_floor·max|λ|``):
    Newton's step where J is convex, a descent direction at saddles (the "saddle-free" modification), never
    uphill. Armijo backtracking and the stopping test ``‖∇J‖ ≤ tol`` are per sample. Converges
    quadratically near a non-degenerate minimum, where the IFT backward needs it.
    """

    tol: float | None = None
    max_iter: int = 100
    eig_floor: float = 1e-8
    max_backtracks: int = 30
    armijo: float = 1e-4

    def minimize(self, fun: Callable[[Tensor], Tensor], y0: Tensor,
                 differentiable: bool = False) -> tuple[Tensor, Tensor]:
        if differentiable:
            raise ValueError("DenseNewton cannot be unrolled; use NewtonCG for backward='unroll'")
        tol = self.tol if self.tol is not None else default_tol(y0.dtype)
        B, D = y0.shape[0], y0[0].numel()
        y = y0.detach().clone()
        iters = torch.zeros(B, dtype=torch.long, device=y0.device)
        eye = torch.eye(D, dtype=y0.dtype, device=y0.device)
        basis = eye.reshape(D, 1, *y0.shape[1:]).expand(D, *y0.shape).contiguous() if D else None
        for _ in range(self.max_iter):
            with torch.enable_grad():
                yr = y.requires_grad_()
                fval = fun(yr)
                (g,) = torch.autograd.grad(fval.sum(), yr, create_graph=True)
            gflat = g.detach().reshape(B, D)
            gnorm = gflat.norm(dim=1)
            active = gnorm > tol
            if not bool(active.any()):
                break
            hess = _batched_hessian(g, yr, basis).reshape(D, B, D).transpose(0, 1)
            hess = 0.5 * (hess + hess.transpose(1, 2))
            lam, V = torch.linalg.eigh(hess)
            floor = (self.eig_floor * lam.abs().amax(1, keepdim=True)).clamp_min(torch.finfo(y.dtype).tiny)
            lam_mod = lam.abs().clamp_min(floor)
            d = -(V @ ((V.transpose(1, 2) @ gflat.unsqueeze(-1)) / lam_mod.unsqueeze(-1))).squeeze(-1)
            slope = (gflat * d).sum(1)
            bad = ~(slope < 0) | ~torch.isfinite(slope)
            d = torch.where(bad.unsqueeze(1), -gflat, d)
            slope = torch.where(bad, -(gnorm**2), slope)
            f0 = fval.detach()
            alpha = torch.ones_like(f0)
            ok = ~active
            slack = 16 * torch.finfo(f0.dtype).eps * f0.abs().clamp_min(1.0)
            yd = y.detach()
            dd = d.reshape(y.shape)
            with torch.no_grad():
                for _ in range(self.max_backtracks):
                    ftry = fun(yd + alpha.view(-1, *([1] * (y.ndim - 1))) * dd)
                    ok = ok | (torch.isfinite(ftry) & (ftry <= f0 + self.armijo * alpha * slope + slack))
                    if bool(ok.all()):
                        break
                    alpha = torch.where(ok, alpha, alpha * 0.5)
            alpha = torch.where(ok & active, alpha, 0.0)
            y = (yd + alpha.view(-1, *([1] * (y.ndim - 1))) * dd).detach()
            iters = iters + active.long()
        return y.detach(), iters


def _batched_hessian(g: Tensor, y: Tensor, basis: Tensor) -> Tensor:
    """All D Hessian-vector products ``∇²J e_i`` at once: ``(D, B, *S)``; falls back to a loop if the ops
    in the objective do not support batched gradients."""
    try:
        return torch.autograd.grad(g, y, basis, retain_graph=True, is_grads_batched=True)[0]
    except RuntimeError:
        return torch.stack([torch.autograd.grad(g, y, e, retain_graph=True)[0] for e in basis])


def _positional_arity(fn: Callable) -> int:
    """Required positional parameters of ``fn`` (its ``forward`` for modules); 2 if unknown or *args.

    ``c(x)`` and ``c(x, width=0.25)`` count 1 (state-only costs), ``c(x, u)`` counts 2.
    """
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return 2
    params = list(sig.parameters.values())
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return 2
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is inspect.Parameter.empty for p in params)


def _bound(value: Any, name: str) -> Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float64).detach().flatten()
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite numbers (use None for an unbounded control), got {value!r}")
    return t


class MPC(nn.Module):
    """Differentiable model-predictive control: ``u*(x_obs; θ_h, θ_c)`` of Eq. 5 as an implicit layer.

    Args:
        dynamics: ``h(x (B, n), u (B, m)) -> x_next (B, n)``; callable or ``nn.Module`` (its parameters get
            gradients).
        cost: ``c(x, u) -> (B,)`` stage cost, or state-only ``c(x) -> (B,)`` (see ``cost_on``).
        horizon: H ≥ 1.
        u_low, u_high: control bounds (scalars or ``(m,)``); both ``None`` for unbounded controls (u = z).
        action_dim: m; inferred from the bounds' length (scalar bounds: 1) if not given.
        terminal_cost: optional ``c_T(x_H) -> (B,)``.
        cost_on: ``"auto"`` (state-only costs at the next state, ``c(x, u)`` at the current one),
            ``"current"`` or ``"next"``.
        solver: gradient refinement: ``"newton"`` (:class:`DenseNewton`, default), ``"newton-cg"``,
            ``"lbfgs"``, or a solver object with
            ``.minimize(fun, y0)`` (see :mod:`diffmpc.solvers`).
        max_iter: iteration cap of the refinement when ``solver`` is a name.
        sampler: ``"rs"`` (random shooting, default), ``"cem"`` or ``None`` (start from ``u_init`` / the box
            centre / zero).
        n_samples, cem_iterations, n_elites: sampler sizes.
        backward: IFT backward of :func:`diffmpc.argmin` (``"cg"`` default, ``"minres"``, ``"dense"``,
            ``"unroll"``).
        tol: stationarity tolerance on ‖∇_z J‖ (default by dtype).
        bound_reg: ridge ε on z (see module docstring); only used with bounds.
        params: extra tensors that ``dynamics``/``cost`` close over and that should get gradients.
        seed: seed of the sampler's generator (``None``: torch's global RNG).

    Call: ``u_plan, info = mpc(x0, u_init=None)`` with ``x0`` of shape ``(B, n)`` (or ``(n,)``), ``u_init``
    ``(B, H, m)`` (or ``(H, m)``); returns ``u_plan`` ``(B, H, m)`` (``(H, m)`` for unbatched x0) and an
    :class:`MPCInfo`. ``u_plan`` is differentiable w.r.t. ``x0`` and the parameters.
    """

    def __init__(
        self,
        dynamics: Callable[[Tensor, Tensor], Tensor],
        cost: Callable[..., Tensor],
        horizon: int,
        u_low: Any = None,
        u_high: Any = None,
        *,
        action_dim: int | None = None,
        terminal_cost: Callable[[Tensor], Tensor] | None = None,
        cost_on: str = "auto",
        solver: Any = "newton",
        max_iter: int = 100,
        sampler: str | None = "rs",
        n_samples: int = 256,
        cem_iterations: int = 4,
        n_elites: int | None = None,
        backward: str = "cg",
        tol: float | None = None,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        damping: float = 0.0,
        bound_reg: float = 1e-4,
        strict: bool = False,
        params: Sequence[Tensor] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not callable(dynamics) or not callable(cost):
            raise TypeError("dynamics and cost must be callables or nn.Modules")
        if terminal_cost is not None and not callable(terminal_cost):
            raise TypeError("terminal_cost must be callable or None")
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon must be a positive int, got {horizon!r}")
        low, high = _bound(u_low, "u_low"), _bound(u_high, "u_high")
        if (low is None) != (high is None):
            raise ValueError("give both u_low and u_high, or neither (unbounded controls)")
        m = action_dim
        if m is None:
            if low is None:
                raise ValueError("unbounded controls: pass action_dim (it cannot be inferred from bounds)")
            m = max(low.numel(), high.numel())
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"action_dim must be a positive int, got {m!r}")
        if low is not None:
            for name, t in (("u_low", low), ("u_high", high)):
                if t.numel() not in (1, m):
                    raise ValueError(f"{name} has {t.numel()} entries but action_dim is {m}")
            low, high = low.expand(m).clone(), high.expand(m).clone()
            if not bool((low < high).all()):
                raise ValueError(f"u_low must be strictly below u_high, got {low.tolist()}, {high.tolist()}")
        state_only = _positional_arity(cost) == 1
        if cost_on not in ("auto", "current", "next"):
            raise ValueError(f"cost_on must be 'auto', 'current' or 'next', got {cost_on!r}")
        if cost_on == "auto":
            cost_on = "next" if state_only else "current"
        if state_only and cost_on == "current":
            raise ValueError("a state-only cost c(x) at the current state ignores the last control (singular "
                             "Hessian); use cost_on='next' or a cost c(x, u)")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose 'rs', 'cem' or None")
        if backward not in ARGMIN_BACKWARDS:
            raise ValueError(f"unknown backward {backward!r}; choose one of {ARGMIN_BACKWARDS}")
        if n_samples < 1 or cem_iterations < 1:
            raise ValueError("n_samples and cem_iterations must be >= 1")
        if bound_reg < 0:
            raise ValueError(f"bound_reg must be >= 0, got {bound_reg}")
        if isinstance(solver, str) and solver not in ("newton", "newton-cg", "lbfgs"):
            raise ValueError(f"unknown solver {solver!r}; choose 'newton', 'newton-cg', 'lbfgs' or pass a "
                             "solver object")
        self.dynamics = dynamics
        self.cost = cost
        self.terminal_cost = terminal_cost
        self.settings = MPCSettings(
            horizon=horizon, action_dim=m, cost_on=cost_on, state_only_cost=state_only, solver=solver,
            sampler=sampler, n_samples=n_samples, cem_iterations=cem_iterations,
            n_elites=n_elites if n_elites is not None else max(1, n_samples // 10), backward=backward,
            tol=tol, backward_tol=backward_tol, backward_max_iter=backward_max_iter, damping=damping,
            bound_reg=bound_reg, strict=strict)
        self._max_iter = max_iter
        self._low, self._high = low, high
        self._extra_params = list(params or [])
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def horizon(self) -> int:
        return self.settings.horizon

    @property
    def action_dim(self) -> int:
        return self.settings.action_dim

    @property
    def bounded(self) -> bool:
        return self._low is not None

    def bounds(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(u_low, u_high)`` as ``(m,)`` tensors on ``like``'s device/dtype (±inf if unbounded)."""
        if self._low is None:
            inf = torch.full((self.action_dim,), float("inf"), dtype=like.dtype, device=like.device)
            return -inf, inf
        return self._low.to(like), self._high.to(like)

    def seed(self, seed: int | None) -> None:
        """Reseed the sampler (``None``: use torch's global RNG)."""
        self._seed = seed
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self._seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    def to_u(self, z: Tensor) -> Tensor:
        """``u = mid + half·tanh(z)`` (identity when unbounded)."""
        if not self.bounded:
            return z
        low, high = self.bounds(z)
        return (high + low) / 2 + (high - low) / 2 * torch.tanh(z)

    def to_z(self, u: Tensor, clip: float = _Z_START) -> Tensor:
        """Inverse of :meth:`to_u`, with ``|z| ≤ clip`` (the refinement's starting region)."""
        if not self.bounded:
            return u
        low, high = self.bounds(u)
        r = (u - (high + low) / 2) / ((high - low) / 2)
        lim = float(torch.tanh(torch.tensor(clip)))
        return torch.atanh(r.clamp(-lim, lim))

    def parameters_for_gradient(self) -> list[Tensor]:
        """The tensors the IFT backward differentiates: module parameters (requiring grad) + ``params``."""
        found: list[Tensor] = []
        seen: set[int] = set()
        for mod in (self.dynamics, self.cost, self.terminal_cost):
            if isinstance(mod, nn.Module):
                for p in mod.parameters():
                    if p.requires_grad and id(p) not in seen:
                        found.append(p)
                        seen.add(id(p))
        return found + [p for p in self._extra_params if id(p) not in seen]

    # ------------------------------------------------------------------ the objective
    def rollout(self, x0: Tensor, u: Tensor) -> Tensor:
        """States ``(B, H+1, n)`` of the plan ``u (B, H, m)`` from ``x0 (B, n)`` under the dynamics."""
        xs = [x0]
        for t in range(u.shape[1]):
            xs.append(self.dynamics(xs[-1], u[:, t]))
        return torch.stack(xs, 1)

    def horizon_cost(self, x0: Tensor, u: Tensor) -> Tensor:
        """``Σ_t c(·) [+ c_T(x_H)]`` of Eq. 5 for plans ``u (B, H, m)`` from ``x0 (B, n)`` → ``(B,)``."""
        s = self.settings
        x = x0
        total = x0.new_zeros(x0.shape[0])
        for t in range(u.shape[1]):
            ut = u[:, t]
            xn = self.dynamics(x, ut)
            if s.state_only_cost:
                c = self.cost(xn)
            else:
                c = self.cost(xn if s.cost_on == "next" else x, ut)
            total = total + c
            x = xn
        if self.terminal_cost is not None:
            total = total + self.terminal_cost(x)
        return total

    def objective(self, z: Tensor, x0: Tensor) -> Tensor:
        """``J(z) = horizon_cost(x0, u(z)) + ε/2 ‖z‖²`` — the function the argmin layer minimises."""
        J = self.horizon_cost(x0, self.to_u(z))
        if self.bounded and self.settings.bound_reg:
            J = J + 0.5 * self.settings.bound_reg * z.pow(2).flatten(1).sum(1)
        return J

    def _check_model(self, x0: Tensor) -> None:
        with torch.no_grad():
            u = torch.zeros(x0.shape[0], self.action_dim, dtype=x0.dtype, device=x0.device)
            if self.bounded:
                lo, hi = self.bounds(x0)
                u = u + (lo + hi) / 2
            xn = self.dynamics(x0, u)
            if not isinstance(xn, Tensor) or xn.shape != x0.shape:
                got = tuple(xn.shape) if isinstance(xn, Tensor) else type(xn).__name__
                raise ValueError(f"dynamics(x (B, n), u (B, m)) must return the next state shaped like x "
                                 f"{tuple(x0.shape)}, got {got}")
            c = self.cost(xn) if self.settings.state_only_cost else self.cost(x0, u)
            if not isinstance(c, Tensor) or c.shape != (x0.shape[0],):
                got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(f"cost must return one value per sample, shape ({x0.shape[0]},), got {got}")

    def _make_solver(self, dtype: torch.dtype):
        s = self.settings
        tol = s.tol if s.tol is not None else default_tol(dtype)
        if s.solver == "newton":
            return DenseNewton(tol=tol, max_iter=self._max_iter)
        if s.solver == "newton-cg":
            return NewtonCG(tol=tol, max_iter=self._max_iter)
        if s.solver == "lbfgs":
            return LBFGS(tol=tol, max_iter=self._max_iter)
        return s.solver

    # ------------------------------------------------------------------ forward
    def forward(self, x0: Tensor, u_init: Tensor | None = None) -> tuple[Tensor, MPCInfo]:
        s = self.settings
        if not isinstance(x0, Tensor) or not x0.is_floating_point():
            raise TypeError(f"x0 must be a floating-point torch.Tensor, got "
                            f"{x0.dtype if isinstance(x0, Tensor) else type(x0).__name__}")
        if x0.ndim not in (1, 2):
            raise ValueError(f"x0 must have shape (B, n) or (n,), got {tuple(x0.shape)}")
        unbatched = x0.ndim == 1
        xb = x0.unsqueeze(0) if unbatched else x0
        B, H, m = xb.shape[0], s.horizon, s.action_dim
        if not bool(torch.isfinite(xb).all()):
            raise ValueError("x0 contains NaN or inf")
        self._check_model(xb.detach())
        low, high = self.bounds(xb)
        if u_init is not None:
            u_init = torch.as_tensor(u_init, dtype=xb.dtype, device=xb.device).detach()
            if u_init.shape == (H, m):
                u_init = u_init.expand(B, H, m)
            if u_init.shape != (B, H, m):
                raise ValueError(f"u_init must have shape ({B}, {H}, {m}) or ({H}, {m}), got "
                                 f"{tuple(u_init.shape)}")
            u_init = torch.minimum(torch.maximum(u_init, low), high)
        x_det = xb.detach()
        with torch.no_grad():
            u_start, sample_cost = self._sample(x_det, u_init, low, high)
        z0 = self.to_z(u_start)
        z, iinfo = argmin(self.objective, z0, xb, solver=self._make_solver(xb.dtype), backward=s.backward,
                          tol=s.tol, backward_tol=s.backward_tol, backward_max_iter=s.backward_max_iter,
                          damping=s.damping, strict=s.strict, params=self.parameters_for_gradient(),
                          return_info=True)
        u = self.to_u(z)
        with torch.no_grad():
            final_cost = self.horizon_cost(x_det, u.detach())
        info = MPCInfo(cost=final_cost, sample_cost=sample_cost, z=z.detach(), implicit=iinfo)
        return (u[0] if unbatched else u), info

    def _sample(self, x0: Tensor, u_init: Tensor | None, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
        s = self.settings
        B, H, m = x0.shape[0], s.horizon, s.action_dim
        gen = self._generator(x0.device)
        if s.sampler is not None and self.bounded:
            if s.sampler == "rs":
                return random_shooting(self.horizon_cost, x0, H, low, high, s.n_samples, u_init, gen)
            return cem(self.horizon_cost, x0, H, low, high, s.n_samples, min(s.n_elites, s.n_samples),
                       s.cem_iterations, u_init=u_init, generator=gen)
        if s.sampler is not None and not self.bounded:
            raise ValueError("sampling needs a bounded control box; pass u_low/u_high or sampler=None")
        u = u_init if u_init is not None else ((low + high) / 2 if self.bounded else low.new_zeros(m)).expand(
            B, H, m).clone()
        return u, self.horizon_cost(x0, u)

    def extra_repr(self) -> str:
        s = self.settings
        return (f"horizon={s.horizon}, action_dim={s.action_dim}, bounded={self.bounded}, "
                f"cost_on={s.cost_on}, sampler={s.sampler}, solver={s.solver}, backward={s.backward}")
