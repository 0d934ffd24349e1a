r"""The differentiable MPC layer (paper Eq. 5): a box-constrained argmin over the controls.

Problem. For an observed state ``x_obs`` the layer returns the plan

.. math::  u^*_{0:H-1} = \arg\min_{u} J(u) = \sum_{t=0}^{H-1} c(x_t, u_t; θ_c) \;[+\, c_T(x_H)]
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

Forward solve (default ``bounds="box"``). (1) A sampler picks a basin: random shooting (``sampler="rs"``,
the paper's planner) or CEM over plans in the box, with the warm start ``u_init`` (e.g. the previous plan
shifted by one step, :func:`diffmpc.sampling.shift_plan`) always among the candidates. (2) A batched
**projected (box-constrained) Newton method in u** (:mod:`diffmpc._box_newton`): per iteration the box QP
on the quadratic model, the Newton step on the free controls, several step lengths in one batched
rollout, negative curvature by the absolute-eigenvalue modification with a Levenberg–Marquardt floor. The
exact gradient and Hessian of J come from per-step Jacobians/Hessians evaluated in one batched call and an
adjoint/sensitivity recursion (:mod:`diffmpc._mpc_derivatives`; ``derivatives="autograd"`` is the
double-backward reference). A solve is **converged** iff its KKT residual in the units of u,
``‖u − P(u − ∇J)‖∞ ≤ tol``, and its last box-QP Newton step ``‖d‖∞ ≤ step_tol``; others warn with
:class:`diffmpc.ConvergenceWarning` (or raise under ``strict=True``) and are counted in ``info.converged``.

Backward (active-set IFT). At a KKT point the controls on a bound (``info.active``) are fixed there and
the free ones satisfy ``∇_F J = 0``, so ``∂u_A/∂θ = 0`` and ``∂u_F/∂θ = −(∇²_{FF}J)⁻¹ ∂²J/∂u_F∂θ`` (the
derivative mpc.pytorch and OptNet use). It is computed by :func:`diffmpc.argmin` (the paper's Alg. 1: CG on
Hessian-vector products) applied at ``u*`` to the masked objective

.. math::  \tilde J(v) = J(\mathrm{where}(A, b, v)) + \tfrac12 \lVert (v - b)_A \rVert^2,

whose Hessian is ``∇²_{FF}J`` on the free block and the identity on the active one, and whose mixed
derivative vanishes on the active rows. *Degenerate case*: a control exactly on its bound with a zero
multiplier (``∂J/∂u_i = 0`` there) is not differentiable — the one-sided derivatives differ. The layer
treats every control on a bound as active and returns the derivative on that face (zero for that control;
the free block solved with it fixed), as mpc.pytorch does; ``info.active`` shows which controls those are.

``bounds="tanh"`` keeps the former smooth reparametrisation ``u = mid + half·tanh(z)`` with the ridge
``bound_reg·½‖z‖²`` (biased at the bounds by O(bound_reg); for smooth problems away from the box only), and
solvers other than ``"newton"`` (``"newton-cg"``, ``"lbfgs"``, a solver object) work on that path (or on
unbounded controls, where u = z).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._box_newton import BoxNewton
from ._impl.linesearch import armijo, round_off_slack
from ._impl.records import next_call_id
from ._mpc_derivatives import CompiledPointDerivatives, autograd_derivatives, rollout, structured_derivatives
from .backward import LinearSolve, Unroll
from .implicit import ARGMIN_BACKWARDS, ConvergenceError, ConvergenceWarning, ImplicitInfo, argmin
from .sampling import cem, random_shooting, shift_plan
from .solvers import LBFGS, NewtonCG, default_tol

__all__ = ["MPC", "MPCInfo", "MPCSettings", "DenseNewton", "BoxNewton", "shift_plan"]

SAMPLERS = ("rs", "cem", None)
BOUNDS = ("box", "tanh")
DERIVATIVES = ("structured", "autograd")
_Z_START = 2.5  # tanh path: refinement starts with |z| <= 2.5 (|u - mid| <= 0.987 half)


def box_tol(dtype: torch.dtype) -> float:
    """Default KKT tolerance (and step tolerance) of the box solve, in the units of ∇J and u."""
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 1e-2)


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
    backward: str | LinearSolve | Unroll
    tol: float | None
    backward_tol: float | None
    backward_max_iter: int | None
    damping: float | None
    bound_reg: float
    strict: bool
    bounds: str = "box"
    derivatives: str = "structured"
    step_tol: float | None = None
    compile_rollout: bool = False
    compile_derivatives: bool = False


@dataclass
class MPCInfo:
    """Diagnostics of one MPC solve (per sample, shape ``(B,)``).

    ``stationarity_residual``: the KKT residual ``‖u − P(u − ∇J)‖∞`` at the returned plan (``bounds="box"``;
    ‖∇_z J‖₂ on the tanh path); ``converged``: the documented test (KKT ≤ tol and last Newton step ≤
    step_tol); ``forward_iterations``: Newton iterations; ``cost``: the horizon cost J of the returned plan;
    ``sample_cost``: that of the sampler's best plan; ``active``: ``(B, H, m)`` controls on a bound (zero
    derivative); ``step``: ‖d‖∞ of the last Newton step; ``implicit``: the :class:`diffmpc.ImplicitInfo`
    of the backward's argmin (frozen; its backward diagnostics arrive in :func:`diffmpc.record_backward`,
    tagged with ``implicit.call_id``); ``z``: tanh path only.
    """

    cost: Tensor
    sample_cost: Tensor
    stationarity_residual: Tensor
    converged: Tensor
    forward_iterations: Tensor | None
    implicit: ImplicitInfo
    tol: float
    active: Tensor | None = None
    step: Tensor | None = None
    z: Tensor | None = None

    @property
    def kkt_residual(self) -> Tensor:
        """``‖u − P(u − ∇J)‖∞`` per sample (box path; the same tensor as ``stationarity_residual``)."""
        return self.stationarity_residual

    @property
    def converged_fraction(self) -> float:
        """Fraction of the batch that passed the convergence test (1.0 for an empty batch)."""
        return float(self.converged.double().mean()) if self.converged.numel() else 1.0


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
            yd = y.detach()
            dd = d.reshape(y.shape)
            alpha = armijo(fun, yd, dd, f0, slope, active, c=self.armijo, slack=round_off_slack(f0),
                           max_backtracks=self.max_backtracks)  # the shared line search (solvers.NewtonCG's)
            alpha = torch.where(active, alpha, 0.0)
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
            gradients). With ``derivatives="structured"`` it must work under ``torch.func`` transforms (plain
            tensor ops do; no in-place writes into inputs, no ``.item()``).
        cost: ``c(x, u) -> (B,)`` stage cost, or state-only ``c(x) -> (B,)`` (see ``cost_on``).
        horizon: H ≥ 1.
        u_low, u_high: control bounds (scalars or ``(m,)``); both ``None`` for unbounded controls.
        action_dim: m; inferred from the bounds' length (scalar bounds: 1) if not given.
        terminal_cost: optional ``c_T(x_H) -> (B,)``.
        cost_on: ``"auto"`` (state-only costs at the next state, ``c(x, u)`` at the current one),
            ``"current"`` or ``"next"``.
        solver: ``"newton"`` (default: the projected Newton method in u; Newton on the tanh variable with
            ``bounds="tanh"``), or — on the tanh path / unbounded only — ``"newton-cg"``, ``"lbfgs"``, or a
            solver object with ``.minimize(fun, y0)`` (see :mod:`diffmpc.solvers`).
        max_iter: Newton iteration cap.
        sampler: ``"rs"`` (random shooting, default), ``"cem"`` or ``None`` (start from ``u_init`` / the box
            centre / zero).
        n_samples, cem_iterations, n_elites: sampler sizes.
        backward: IFT backward of :func:`diffmpc.argmin` (``"cg"`` default, ``"minres"``, ``"dense"``;
            ``"unroll"`` only on the tanh path with an unrollable solver).
        tol: KKT tolerance ``‖u − P(u − ∇J)‖∞`` (default 1e-8 float64, 1e-4 float32); tanh path: ‖∇_z J‖.
        step_tol: tolerance on the last Newton step ``‖d‖∞`` in units of u (default: as ``tol``).
        bounds: ``"box"`` (default, constraints with an active set) or ``"tanh"`` (smooth reparametrisation).
        derivatives: ``"structured"`` (default, per-step derivatives + adjoint recursion) or ``"autograd"``
            (double backward through the rollout; the reference).
        compile_rollout: run the gradient-free rollouts (sampler, step-length trials, final cost) through
            ``torch.compile(dynamic=True)``. Pays only in long runs: on the cart-pole example each action
            after the first took 1.6–2.3× less CPU, after 43 s (warm inductor cache) to 166 s (cold) of
            compilation (``examples/mpc_compile_trial.py``). The IFT backward stays eager (it needs double
            backward, which compiled graphs do not support); see ``compile_derivatives``. Default False.
        compile_derivatives: compute the box solve's per-step Jacobians and Lagrangian Hessians with
            ``torch.func`` graphs compiled by ``torch.compile``, points padded to two sizes (the same exact
            quantities; the IFT backward stays eager). With ``compile_rollout`` too, the 64-problem
            cart-pole batch of ``python -m benchmarks.mpc_casadi --compile`` took 2.5× less CPU than eager,
            after ≈ 3 CPU minutes of compilation (docs/mpc.md). Default False.
        bound_reg: tanh path only: ridge ε on z.
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
        backward: str | LinearSolve | Unroll = "cg",
        tol: float | None = None,
        step_tol: float | None = None,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        damping: float = 0.0,
        bounds: str = "box",
        derivatives: str = "structured",
        bound_reg: float = 1e-4,
        strict: bool = False,
        params: Sequence[Tensor] | None = None,
        seed: int | None = None,
        compile_rollout: bool = False,
        compile_derivatives: bool = False,
    ) -> None:
        super().__init__()
        flags = (("compile_rollout", compile_rollout), ("compile_derivatives", compile_derivatives))
        for name, flag in flags:
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
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
        if isinstance(backward, str) and backward not in ARGMIN_BACKWARDS:
            raise ValueError(f"unknown backward {backward!r}; choose one of {ARGMIN_BACKWARDS}")
        if not isinstance(backward, (str, LinearSolve, Unroll)):
            raise TypeError(f"backward must be a name in {ARGMIN_BACKWARDS} or a diffmpc.backward strategy "
                            f"(CG(), MINRES(), Dense(), ...), got {type(backward).__name__}")
        if n_samples < 1 or cem_iterations < 1:
            raise ValueError("n_samples and cem_iterations must be >= 1")
        if bound_reg < 0:
            raise ValueError(f"bound_reg must be >= 0, got {bound_reg}")
        if not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
        for name, v in (("tol", tol), ("step_tol", step_tol)):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if bounds not in BOUNDS:
            raise ValueError(f"bounds must be 'box' or 'tanh', got {bounds!r}")
        if derivatives not in DERIVATIVES:
            raise ValueError(f"derivatives must be 'structured' or 'autograd', got {derivatives!r}")
        if isinstance(solver, str) and solver not in ("newton", "newton-cg", "lbfgs"):
            raise ValueError(f"unknown solver {solver!r}; choose 'newton', 'newton-cg', 'lbfgs' or pass a "
                             "solver object")
        if solver != "newton" and bounds == "box" and low is not None:
            raise ValueError(f"solver={solver!r} cannot handle box constraints; use the default "
                             "solver='newton' (projected Newton) or bounds='tanh'")
        unroll = backward == "unroll" or isinstance(backward, Unroll)
        if unroll and solver == "newton" and (bounds == "box" or low is None):
            raise ValueError("backward='unroll' needs an unrollable solver: solver='newton-cg' (with "
                             "bounds='tanh' if the controls are bounded)")
        self.dynamics = dynamics
        self.cost = cost
        self.terminal_cost = terminal_cost
        self.settings = MPCSettings(
            horizon=horizon, action_dim=m, cost_on=cost_on, state_only_cost=state_only, solver=solver,
            sampler=sampler, n_samples=n_samples, cem_iterations=cem_iterations,
            n_elites=n_elites if n_elites is not None else max(1, n_samples // 10), backward=backward,
            tol=tol, backward_tol=backward_tol, backward_max_iter=backward_max_iter,
            # a strategy object carries its own damping; the keyword's default (0) must then stay unset
            damping=None if not isinstance(backward, str) and damping == 0.0 else damping,
            bound_reg=bound_reg, strict=strict, bounds=bounds, derivatives=derivatives, step_tol=step_tol,
            compile_rollout=compile_rollout, compile_derivatives=compile_derivatives)
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

    @property
    def uses_box_newton(self) -> bool:
        """Whether the forward is the projected Newton method in u (else the tanh / generic-solver path)."""
        return self.settings.solver == "newton" and (self.settings.bounds == "box" or not self.bounded)

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
        """tanh path: ``u = mid + half·tanh(z)`` (identity when unbounded)."""
        if not self.bounded:
            return z
        low, high = self.bounds(z)
        return (high + low) / 2 + (high - low) / 2 * torch.tanh(z)

    def to_z(self, u: Tensor, clip: float = _Z_START) -> Tensor:
        """Inverse of :meth:`to_u`, with ``|z| ≤ clip`` (the tanh refinement's starting region)."""
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
    def step(self, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """One step of the horizon: ``(x_next (B, n), stage cost (B,))`` under the cost convention."""
        s = self.settings
        xn = self.dynamics(x, u)
        if s.state_only_cost:
            return xn, self.cost(xn)
        return xn, self.cost(xn if s.cost_on == "next" else x, u)

    def rollout(self, x0: Tensor, u: Tensor) -> Tensor:
        """States ``(B, H+1, n)`` of the plan ``u (B, H, m)`` from ``x0 (B, n)`` under the dynamics."""
        xs = [x0]
        for t in range(u.shape[1]):
            xs.append(self.dynamics(xs[-1], u[:, t]))
        return torch.stack(xs, 1)

    def horizon_cost(self, x0: Tensor, u: Tensor) -> Tensor:
        """``J = Σ_t c(·) [+ c_T(x_H)]`` of Eq. 5 for plans ``u (B, H, m)`` from ``x0 (B, n)`` → ``(B,)``."""
        return self._rollout(x0, u)[1]

    def _rollout(self, x0: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """States and J of plans; compiled (``compile_rollout``) only where no gradient is recorded."""
        if self.settings.compile_rollout and not torch.is_grad_enabled():
            fn = self.__dict__.get("_compiled_rollout")
            if fn is None:
                fn = self.__dict__["_compiled_rollout"] = torch.compile(rollout, dynamic=True)
            return fn(self.step, self.terminal_cost, x0, u)
        return rollout(self.step, self.terminal_cost, x0, u)

    def _compiled_point_derivatives(self, n: int) -> CompiledPointDerivatives:
        """The compiled per-step derivatives (``compile_derivatives``), built once per state size."""
        cache = self.__dict__.setdefault("_compiled_derivatives", {})
        if n not in cache:
            cache[n] = CompiledPointDerivatives(self.step, n)
        return cache[n]

    def objective(self, z: Tensor, x0: Tensor) -> Tensor:
        """tanh path: ``J(z) = horizon_cost(x0, u(z)) + ε/2 ‖z‖²``."""
        J = self.horizon_cost(x0, self.to_u(z))
        if self.bounded and self.settings.bound_reg:
            J = J + 0.5 * self.settings.bound_reg * z.pow(2).flatten(1).sum(1)
        return J

    def masked_objective(self, u: Tensor, x0: Tensor, active: Tensor, bound: Tensor) -> Tensor:
        """Backward's objective ``J(where(A, b, u)) + ½‖(u − b)_A‖²`` (module docstring): its IFT derivative
        at a KKT point is the active-set derivative of the box-constrained solution."""
        v = torch.where(active, bound, u)
        return self.horizon_cost(x0, v) + 0.5 * ((u - bound) * active).pow(2).flatten(1).sum(1)

    def derivatives(self, x0: Tensor, u: Tensor, structured: bool | None = None) -> tuple[Tensor, Tensor]:
        """Exact ``∇J (B, H·m)`` and ``∇²J (B, H·m, H·m)`` at plans ``u (B, H, m)`` (no autograd graph).

        ``structured`` (default: the layer's ``derivatives`` setting) uses per-step derivatives and the
        adjoint/sensitivity recursion; otherwise double backward through the rollout.
        """
        if structured is None:
            structured = self.settings.derivatives == "structured"
        with torch.no_grad():
            if structured:
                xs, _ = rollout(self.step, self.terminal_cost, x0, u)
                return structured_derivatives(self.step, self.terminal_cost, xs, u)
        return autograd_derivatives(lambda v: self.horizon_cost(x0, v), u)

    def _check_model(self, x0: Tensor) -> None:
        # Once per input signature: a shape probe on every call of a receding-horizon loop costs one more
        # model evaluation per action for nothing.
        key = (tuple(x0.shape), x0.dtype, x0.device, id(self.dynamics), id(self.cost))
        checked = self.__dict__.setdefault("_checked_signatures", set())
        if key in checked:
            return
        self._check_model_once(x0)
        if len(checked) < 64:
            checked.add(key)

    def _check_model_once(self, x0: Tensor) -> None:
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
        if B == 0:
            return self._empty_plan(xb, H, m)
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
            if not bool(torch.isfinite(u_init).all()):
                raise ValueError("u_init contains NaN or inf")
            u_init = torch.minimum(torch.maximum(u_init, low), high)
        x_det = xb.detach()
        with torch.no_grad():
            u_start, sample_cost = self._sample(x_det, u_init, low, high)
        u, info = (self._forward_box if self.uses_box_newton else self._forward_tanh)(
            xb, x_det, u_start, sample_cost, low, high)
        return (u[0] if unbatched else u), info

    def _empty_plan(self, xb: Tensor, H: int, m: int) -> tuple[Tensor, MPCInfo]:
        """B = 0: the empty ``(0, H, m)`` plan, connected to x0 and the parameters so that its backward runs
        (zero gradients of the right shapes, as torch ops do for empty tensors), with an empty info."""
        u = xb.new_zeros(0, H, m)
        for t in [xb, *self.parameters_for_gradient()]:
            if t.requires_grad:
                u = u + 0 * t.sum()
        e = xb.new_zeros(0).detach()
        no = torch.zeros(0, dtype=torch.bool, device=xb.device)
        iters = torch.zeros(0, dtype=torch.long, device=xb.device)
        tol = self.settings.tol if self.settings.tol is not None else default_tol(xb.dtype)
        implicit = ImplicitInfo(e, iters, no, tol)
        return u, MPCInfo(e, e, e, no, iters, implicit, tol, active=no.reshape(0, H, m), step=e)

    def _forward_box(self, xb, x_det, u_start, sample_cost, low, high) -> tuple[Tensor, MPCInfo]:
        s = self.settings
        B, H, m = u_start.shape
        D = H * m
        tol = s.tol if s.tol is not None else box_tol(xb.dtype)
        step_tol = s.step_tol if s.step_tol is not None else tol
        structured = s.derivatives == "structured"

        def evaluate(uf: Tensor, rows: Tensor):
            xs, J = self._rollout(x_det[rows], uf.view(-1, H, m))
            return J, xs

        compiled = self._compiled_point_derivatives(x_det.shape[-1]) if s.compile_derivatives else None

        def derivatives(uf: Tensor, xs: Tensor, rows: Tensor):
            if structured:
                return structured_derivatives(self.step, self.terminal_cost, xs, uf.view(-1, H, m),
                                              compiled=compiled)
            return autograd_derivatives(lambda v: self.horizon_cost(x_det[rows], v), uf.view(-1, H, m))

        lo, hi = low.repeat(H), high.repeat(H)
        with torch.no_grad():
            res = BoxNewton(tol=tol, step_tol=step_tol, max_iter=self._max_iter).minimize(
                derivatives, evaluate, u_start.reshape(B, D), lo, hi)
        if sample_cost is None:  # no sampler: J of the (clamped) first guess, from the solve's first rollout
            sample_cost = res.initial_cost
        u_star = res.u.view(B, H, m)
        g = res.grad.view(B, H, m)
        # Active set: controls on a bound (within step_tol; they are then put exactly on it).
        at_lo = self.bounded & (u_star - low <= step_tol) & (g >= -tol)
        at_hi = self.bounded & (high - u_star <= step_tol) & (g <= tol) & ~at_lo
        active = at_lo | at_hi
        bound = torch.where(at_lo, low, torch.where(at_hi, high, torch.zeros_like(u_star)))
        u_star = torch.where(active, bound, u_star)
        converged = res.converged
        if not bool(converged.all()):
            bad = ~converged
            idx = torch.nonzero(bad).flatten().tolist()
            shown = ", ".join(f"#{i}: kkt {res.kkt[i].item():.3g}, step {res.step[i].item():.3g}, "
                              f"{int(res.iterations[i])} it" for i in idx[:8])
            more = " ..." if len(idx) > 8 else ""
            msg = (f"MPC: {len(idx)} of {B} solves did not converge ({shown}{more}; "
                   f"test: KKT residual ‖u − P(u − ∇J)‖∞ ≤ tol={tol:g} and Newton step ≤ step_tol="
                   f"{step_tol:g}). Their IFT gradients are not valid; raise max_iter or improve the first "
                   "guess (more samples, sampler='cem', a warm start).")
            if s.strict:
                raise ConvergenceError(msg)
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        params = self.parameters_for_gradient()
        if not (torch.is_grad_enabled() and (xb.requires_grad or any(p.requires_grad for p in params))):
            # Nothing to differentiate (a policy acting, an evaluation): argmin would only re-probe the
            # objective and re-evaluate ∇ at u* to attach a backward that never runs. Its info is built from
            # the forward's own gradient instead: ∇ of the masked objective at u* is ∇J on the free controls
            # and exactly 0 on the active ones (u* = b there).
            residual = res.grad.masked_fill(active.reshape(B, D), 0).norm(dim=1)
            itol = tol * math.sqrt(D)
            iinfo = ImplicitInfo(residual, None, residual <= itol, itol, 1.0, "argmin", next_call_id())
            u_out = u_star
        else:
            u_out, iinfo = self._attach_backward(xb, u_star, active, bound, tol, D, params)
        with torch.no_grad():
            # J of the returned plan: the solve's own value where snapping onto the bounds changed nothing
            # (bit-identical plan), one more rollout only for the rows it did change.
            final_cost = res.cost.clone()
            moved = (u_star != res.u.view(B, H, m)).flatten(1).any(1)
            if bool(moved.any()):
                final_cost[moved] = self.horizon_cost(x_det[moved], u_star[moved])
        info = MPCInfo(cost=final_cost, sample_cost=sample_cost, stationarity_residual=res.kkt,
                       converged=converged, forward_iterations=res.iterations, implicit=iinfo, tol=tol,
                       active=active, step=res.step)
        return u_out, info

    def _attach_backward(self, xb, u_star, active, bound, tol, D, params) -> tuple[Tensor, ImplicitInfo]:
        """Backward: diffmpc.argmin at u* on the masked objective (the forward solve is already done)."""
        s = self.settings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported above, in the units of u
            u_out, iinfo = argmin(self.masked_objective, u_star, xb, active, bound, solver=_given,
                                  backward=s.backward, tol=tol * math.sqrt(D), backward_tol=s.backward_tol,
                                  backward_max_iter=s.backward_max_iter, damping=s.damping, strict=s.strict,
                                  params=params, return_info=True)
        return u_out, iinfo

    def _forward_tanh(self, xb, x_det, u_start, sample_cost, low, high) -> tuple[Tensor, MPCInfo]:
        s = self.settings
        z0 = self.to_z(u_start)
        z, iinfo = argmin(self.objective, z0, xb, solver=self._make_solver(xb.dtype), backward=s.backward,
                          tol=s.tol, backward_tol=s.backward_tol, backward_max_iter=s.backward_max_iter,
                          damping=s.damping, strict=s.strict, params=self.parameters_for_gradient(),
                          return_info=True)
        u = self.to_u(z)
        with torch.no_grad():
            final_cost = self.horizon_cost(x_det, u.detach())
        info = MPCInfo(cost=final_cost, sample_cost=sample_cost,
                       stationarity_residual=iinfo.stationarity_residual, converged=iinfo.converged,
                       forward_iterations=iinfo.forward_iterations, implicit=iinfo, tol=iinfo.tol,
                       z=z.detach())
        return u, info

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
        # the box solve's first evaluation is this plan's cost (one rollout saved); the tanh path computes it
        return u, (None if self.uses_box_newton else self.horizon_cost(x0, u))

    def extra_repr(self) -> str:
        s = self.settings
        return (f"horizon={s.horizon}, action_dim={s.action_dim}, bounded={self.bounded}, "
                f"bounds={s.bounds}, cost_on={s.cost_on}, sampler={s.sampler}, solver={s.solver}, "
                f"backward={s.backward}")


def _given(fun: Callable[[Tensor], Tensor], y0: Tensor) -> Tensor:
    """Black-box 'solver' for :func:`diffmpc.argmin`: the solution was computed before (the box solve)."""
    return y0
