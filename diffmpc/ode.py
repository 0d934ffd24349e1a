r"""Neural ODEs integrated with backward (implicit) Euler, differentiated by the implicit function theorem.

One function, :func:`odeint`, in the spirit of ``torchdiffeq.odeint(func, y0, t)``: ``func(t, y)`` is the
vector field h, ``y0`` the initial state, ``t`` the 1-D grid of output times; the result has shape
``(len(t), *y0.shape)``.

**The step** (paper Eq. 4). Backward Euler advances ``x_n`` to ``x_{n+1}`` by solving

.. math::  F(x_{n+1};\, x_n, θ) \;=\; x_{n+1} - x_n - Δt\, h(t_{n+1}, x_{n+1}; θ) \;=\; 0 .

Each step is solved as one :func:`diffmpc.root` layer (``batched=True`` over the trajectories in the
leading dimension of ``y0``), and its backward is the IFT: for an upstream gradient ``v = ∂L/∂x_{n+1}``
solve ``Jᵀ w = v`` with ``J = I − Δt ∂h/∂x`` and pass ``w`` to ``x_n`` and ``Δt wᵀ ∂h/∂θ`` to θ (paper
Eqs. 2–3). By default the trajectory is one autograd node (:class:`_BackwardEulerIFT`) that runs exactly
this chain of per-step IFT products in reverse, rebuilding one graph of h per step: the forward keeps only
the states (memory O(steps·state), independent of the solver's iterations), and the backward skips the
per-layer bookkeeping. ``options["step_layers"]=True`` instead chains the ``root`` layers through
autograd (one graph of h kept per step) — the same gradient, used as the reference in tests/benchmarks.

**IFT CG** solves ``Jᵀ w = v`` by CG on the normal equations (the paper's choice;
:class:`diffmpc.backward.NormalCG`, through the shared front end ``diffmpc._impl.ift`` that
:func:`diffmpc.root`, :func:`diffmpc.argmin` and :func:`diffmpc.dare` use too), converged exactly when
``‖v − Jᵀw‖ ≤ backward_tol·‖v‖`` for the true residual. ``Jᵀu`` is a VJP and ``J u`` a JVP (double
backward) of the one graph of h; the parameter gradient and the final residual come from one more VJP.
``options["warm_start"]=True`` starts CG at ``v`` (the solution for ``J = I``); off by default, see
:class:`_BackwardEulerIFT`.

*Why a root and not the argmin of ``½‖F‖²``?* Both have the same IFT gradient at an exact root (there the
Hessian of ``½‖F‖²`` is ``JᵀJ`` and ``−(JᵀJ)⁻¹Jᵀ∂F/∂θ = −J⁻¹∂F/∂θ``), and the paper solves the same normal
equations with CG either way. The root form is preferred because (i) the layer checks ``‖F(x_{n+1})‖``
itself, whereas the stationarity check of the squared residual, ``‖JᵀF‖``, also passes at spurious local
minima with ``F ≠ 0`` where the IFT gradient is wrong; (ii) the argmin Hessian carries the term
``Σ F_i ∇²F_i``, which vanishes only at the exact root and costs an extra double backward.

**Forward solvers** (``solver=``): ``"auto"`` (default; :class:`FixedPointNewton`: fixed point while it
contracts, then Newton), ``"newton"`` (:class:`diffmpc.solvers.NewtonKrylov`, Newton
steps by the paper's normal-equation CG, for stiff fields) or ``"fixed_point"`` (iterate
``x ← x_n + Δt h(x)``, which converges when ``Δt·Lip(h) < 1``), or any solver :func:`diffmpc.root` accepts.
The initial guess is the explicit-Euler predictor ``x_n + Δt h(t_n, x_n)`` (``options["predictor"]``).

**Backward modes** (``backward=``) for ``method="backward_euler"``:

=============  ===========================================================================================
``"normal_cg"`` IFT per step, ``Jᵀw = v`` by CG on the normal equations (the paper's "IFT CG"; default).
               ``"cg"`` is its backwards-compatible alias; object :class:`~diffmpc.backward.NormalCG`.
``"dense"``    IFT per step with J materialised and solved directly (the paper's "IFT naive"; ``Dense``).
``"gmres"``    IFT per step, GMRES on ``Jᵀ`` (``GMRES``).
``"unroll"``   backpropagate through the forward solver's iterations (memory grows with iterations).
``"adjoint"``  the adjoint method of Chen et al. (2018): the augmented system ``ż = h``,
               ``ȧ = −aᵀ∂h/∂z``, ``ȧ_θ = −aᵀ∂h/∂θ`` is integrated *backward in time with backward Euler*
               (below). It is not the exact gradient of the discrete forward (it differs by O(Δt)).
=============  ===========================================================================================

**Adjoint with backward Euler.** Stepping the augmented state from ``t_{n+1}`` back to ``t_n``
(step ``−Δt``) with backward Euler gives the implicit system

.. math::  z_n = z_{n+1} - Δt\,h(t_n, z_n),\qquad
           a_n = a_{n+1} + Δt\, (\partial_z h(t_n, z_n))^{\!\top} a_n,\qquad
           a_{θ,n} = a_{θ,n+1} + Δt\, (\partial_θ h(t_n, z_n))^{\!\top} a_n .

It is block triangular, so it is solved exactly in sequence: a root for ``z_n`` (same solver as the
forward), a linear solve ``(I − Δt ∂_z h)ᵀ a_n = a_{n+1}`` (normal-equation CG) and one VJP for ``a_θ``.
As in ``torchdiffeq.odeint_adjoint``, ``z`` is reset to the stored forward solution at every output time
and ``∂L/∂y(t_i)`` is added to ``a`` there. Compare the exact (IFT) discrete gradient,
``(I − Δt ∂_z h(z_{n+1}))ᵀ w = v`` and ``Δt wᵀ∂_θh(z_{n+1})``: the adjoint evaluates the Jacobians at the
other end of the step.

Other methods: ``"euler"`` (explicit; ``backward="unroll"`` by autograd, ``"adjoint"`` via torchdiffeq)
and every torchdiffeq method (``"dopri5"``, ``"rk4"``, ...; ``backward="adjoint"`` →
``torchdiffeq.odeint_adjoint``, ``"unroll"`` → ``torchdiffeq.odeint``). torchdiffeq is imported only then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from . import backward as _strategies
from ._checks import check_implicit_options
from ._impl.batch import col as _col
from ._impl.batch import norm as _norm
from ._impl.ift import ift_vjp
from ._impl.krylov import SolveInfo
from ._impl.records import BackwardInfo, emit, next_call_id
from ._impl.tolerances import linear_tol, stationarity_tol
from .backward import LinearSolve, NormalCG, Unroll, with_defaults
from .errors import BadArgumentError
from .implicit import ImplicitInfo, check_accept_factor, module_params, report, root
from .solvers import NewtonKrylov, make_root_solver

__all__ = ["odeint", "OdeInfo", "FixedPointNewton", "IMPLICIT_METHODS", "BACKWARDS"]

IMPLICIT_METHODS = ("backward_euler", "implicit_euler")
#: Canonical backward names (``"cg"`` is accepted as the alias of ``"normal_cg"``).
BACKWARDS = ("normal_cg", "dense", "gmres", "unroll", "adjoint")
_OPTION_KEYS = ("step_size", "predictor", "tol", "backward_tol", "backward_max_iter", "batched", "strict",
                "damping", "warm_start", "step_layers", "accept_factor")


@dataclass(frozen=True)
class OdeInfo:
    """Forward diagnostics of one :func:`odeint` call with backward Euler (immutable).

    ``steps`` holds the frozen :class:`~diffmpc.ImplicitInfo` of every step's root solve, ``n_steps``
    counts the integration steps, ``forward_iterations`` the solver iterations summed over steps (max over
    samples), ``max_residual`` the largest ‖F‖ of any step. The backward's diagnostics arrive as one
    :class:`~diffmpc.BackwardInfo` per backward call (``layer="odeint"``, one solve per step in step
    order, tagged with ``call_id``) in :func:`diffmpc.record_backward`.
    """

    n_steps: int
    forward_iterations: int
    max_residual: float
    steps: tuple[ImplicitInfo, ...]
    call_id: int

    @classmethod
    def from_steps(cls, steps: Sequence[ImplicitInfo], call_id: int) -> OdeInfo:
        its = sum(int(s.forward_iterations.max()) for s in steps if s.forward_iterations is not None)
        res = max((float(s.stationarity_residual.max()) for s in steps), default=0.0)
        return cls(len(steps), its, res, tuple(steps), call_id)


# Steps one odeint call may take: each stores a state (and the backward one more), so a tiny step_size would
# otherwise allocate without bound before the first step runs.
MAX_STEPS = 10**6


def _check_vector_field(func: Callable, y0: Tensor, t: Tensor) -> None:
    """``func(t0, y0)`` must be shaped like y0: a broadcasting field silently integrates the wrong ODE."""
    if not isinstance(t, Tensor) or t.ndim != 1 or t.numel() < 1:
        return  # _grid names the problem with t
    with torch.no_grad():
        out = func(t[0], y0)
    if not isinstance(out, Tensor) or out.shape != y0.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise BadArgumentError(f"func(t, y) returned {got} for y of shape {tuple(y0.shape)}; the vector "
                               "field must return dy/dt shaped like y")


def _empty_batch(y0: Tensor, t: Tensor, params: list[Tensor], return_info: bool) -> Any:
    """B = 0: the empty ``(len(t), 0, ...)`` trajectory, connected to y0 and the parameters so its backward
    runs (zero gradients of the right shapes), as torch ops do for empty tensors."""
    ys = y0.unsqueeze(0).expand(t.shape[0], *y0.shape) * 1
    for p in params:
        ys = ys + 0 * p.sum()
    return (ys, OdeInfo.from_steps([], next_call_id())) if return_info else ys


def _grid(t: Tensor, step_size: float | None) -> tuple[list[float], list[int]]:
    """Integration grid (python floats) and the index of each output time in it."""
    if not isinstance(t, Tensor) or t.ndim != 1 or t.numel() < 1:
        what = getattr(t, "shape", type(t).__name__)
        raise ValueError(f"t must be a 1-D tensor of output times, got {what}")
    ts = [float(v) for v in t.detach().cpu().tolist()]
    if not all(math.isfinite(v) for v in ts):
        raise ValueError("t contains NaN or inf")
    if any(b <= a for a, b in pairwise(ts)):
        raise ValueError("t must be strictly increasing")
    if step_size is not None and not step_size > 0:
        raise BadArgumentError(f"options['step_size'] must be positive, got {step_size}")
    if step_size is not None:
        n_steps = sum(max(1, math.ceil((b - a) / step_size - 1e-9)) for a, b in pairwise(ts))
        if n_steps > MAX_STEPS:
            raise BadArgumentError(
                f"options['step_size']={step_size:g} needs {n_steps:.3g} steps over t in "
                f"[{ts[0]:g}, {ts[-1]:g}] (more than MAX_STEPS = {MAX_STEPS:.0e}; every step stores a "
                "state): raise step_size")
    grid, obs = [ts[0]], [0]
    for a, b in pairwise(ts):
        k = 1 if step_size is None else max(1, math.ceil((b - a) / step_size - 1e-9))
        grid += [a + (b - a) * j / k for j in range(1, k)] + [b]
        obs.append(len(grid) - 1)
    return grid, obs


class _Residual:
    """``F(y, y_prev) = y − y_prev − Δt h(t_next, y)`` (Eq. 4), a picklable closure over one step."""

    def __init__(self, func: Callable, t_next: float, dt: float):
        self.func, self.t_next, self.dt = func, t_next, dt

    def __call__(self, y: Tensor, y_prev: Tensor) -> Tensor:
        return y - y_prev - self.dt * self.func(self.t_next, y)


@dataclass(frozen=True)
class _Config:
    solver: Any
    strategy: Any  # a LinearSolve / Unroll object, or "adjoint"
    tol: float
    batched: bool
    strict: bool
    predictor: str
    warm_start: bool = False
    step_layers: bool = False
    accept_factor: float = 1.0
    adjoint_solve: LinearSolve | None = None  # the adjoint's linear solves (backward="adjoint")


def _predict(func: Callable, t: float, dt: float, y: Tensor, predictor: str) -> Tensor:
    if predictor == "euler":
        with torch.no_grad():
            guess = y + dt * func(t, y)
        return guess if bool(torch.isfinite(guess).all()) else y.detach()
    return y.detach()


def _solver(solver: Any, tol: float) -> Any:
    return FixedPointNewton(tol=tol) if solver == "auto" else make_root_solver(solver, tol)


def _be_step(func: Callable, y_prev: Tensor, t: float, t_next: float, cfg: _Config,
             params: list[Tensor]) -> tuple[Tensor, ImplicitInfo]:
    """One backward-Euler step as a :func:`diffmpc.root` layer (IFT backward)."""
    dt = t_next - t
    guess = _predict(func, t, dt, y_prev, cfg.predictor)
    # The adjoint's forward runs without a graph: the strategy of its root layers is never used.
    strategy = NormalCG() if cfg.strategy == "adjoint" else cfg.strategy
    return root(_Residual(func, t_next, dt), guess, y_prev, solver=_solver(cfg.solver, cfg.tol),
                backward=strategy, batched=cfg.batched, tol=cfg.tol, strict=cfg.strict, params=params,
                return_info=True, accept_factor=cfg.accept_factor)


def _integrate_be(func, y0, grid, cfg, params, step_infos: list[ImplicitInfo]) -> Tensor:
    """The backward-Euler states at every grid point, ``(len(grid), *y0.shape)``; appends each step's
    forward info to ``step_infos``."""
    ys, y = [y0], y0
    for n in range(len(grid) - 1):
        y, step_info = _be_step(func, y, grid[n], grid[n + 1], cfg, params)
        step_infos.append(step_info)
        ys.append(y)
    return torch.stack(ys)


def _step_vjp(func: Callable, t: float, dt: float, z: Tensor, v: Tensor, params: list[Tensor],
              strategy: LinearSolve, batched: bool, x0: Tensor | None = None,
              ) -> tuple[Tensor, list[Tensor | None], SolveInfo]:
    r"""IFT vector-Jacobian product of one backward-Euler step at ``x_{n+1} = z`` for the upstream ``v``.

    The step residual is ``F = x_{n+1} − x_n − Δt h(t, x_{n+1})`` (Eq. 4); its Jacobian in ``x_{n+1}`` is
    ``J = I − Δt ∂h/∂x`` and ``∂F/∂x_n = −I``. The shared front end solves ``Jᵀ w = v`` and returns
    ``w`` (the gradient w.r.t. ``x_n``), ``Δt wᵀ∂h/∂θ`` per parameter (``−wᵀ∂F/∂θ``) and the solve's
    report; parameter gradients and true residual come from one VJP of the one graph of h. ``x_n`` is a
    constant of the graph (it does not change J), so it is left out of F here.
    """
    with torch.enable_grad():
        zr = z.detach().requires_grad_()
        r = zr - dt * _hb(func, t, zr, batched)
        grads, w, info, _ = ift_vjp(r, zr, params, v, strategy, symmetric=False, x0=x0)
    return w, grads, info


class _IFTSpec:
    def __init__(self, func, grid, obs, cfg, call_id):
        self.func, self.grid, self.obs, self.cfg, self.call_id = func, grid, obs, cfg, call_id
        # filled by the forward, frozen into OdeInfo before odeint returns
        self.step_infos: list[ImplicitInfo] = []


class _BackwardEulerIFT(torch.autograd.Function):
    r"""The whole backward-Euler trajectory as one node: per-step IFT in the backward, no per-step graphs.

    Forward: every step is the :func:`diffmpc.root` layer of :func:`_be_step` (same solver, same
    stationarity check and warnings), run without a graph; only the states are kept. Backward: the steps
    are visited last to first with ``v_N = ∂L/∂y(t_N)``; step n rebuilds *one* graph of h at
    ``x_{n+1}``, solves ``Jᵀ w = v`` (:func:`_ift_step`), adds ``Δt wᵀ∂h/∂θ`` to θ's gradient and passes
    ``v_{n} = w + ∂L/∂x_n`` on. This is the same chain of IFT vector-Jacobian products that autograd would
    run through the per-step ``root`` layers (``options["step_layers"]=True``), minus their bookkeeping:
    one graph of h per step, one VJP for the parameter gradient *and* the residual report, CG stopped on
    the residual ‖v − Jᵀw‖ itself (checked every iteration).

    ``warm_start`` starts CG at ``v`` — the solution for ``J = I``, i.e. the previous step's solution plus
    the new observation's gradient (Δt·‖∂h/∂x‖ away from this step's). It costs one VJP (``r₀ = v − Jᵀv``).
    Measured (float32, 16 trajectories × 20 steps, MLP 30-30): with a 2-D state CG ends after 2 iterations
    either way (exact termination), so it saves nothing, and lets samples stop *at* the tolerance after one
    iteration (float32 gradients then differ from the exact solve by up to ~5e-5 relative instead of
    ~1e-7); with an 8-D state it cuts the iterations from 3 to ~2 per step. Hence off by default.
    """

    @staticmethod
    def forward(ctx, spec: _IFTSpec, y0: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            states = _integrate_be(spec.func, y0.detach(), spec.grid, spec.cfg, [], spec.step_infos)
        ctx.spec = spec
        ctx.save_for_backward(states, *params)
        return states[spec.obs]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys: Tensor):
        spec: _IFTSpec = ctx.spec
        states, *params = ctx.saved_tensors
        cfg, grid = spec.cfg, spec.grid
        batch = (lambda u: u) if cfg.batched else (lambda u: u.unsqueeze(0))
        obs_at = {g: i for i, g in enumerate(spec.obs)}
        v = batch(grad_ys[obs_at[len(grid) - 1]])
        grads: list[Tensor | None] = [None] * len(params)
        solves: list[SolveInfo] = []
        for n in range(len(grid) - 2, -1, -1):
            x0 = v if cfg.warm_start else None
            w, gp, sinfo = _step_vjp(spec.func, grid[n + 1], grid[n + 1] - grid[n], batch(states[n + 1]), v,
                                     params, cfg.strategy, cfg.batched, x0)
            solves.append(sinfo)
            grads = _accumulate(grads, gp)
            if cfg.strict and not bool(sinfo.converged.all()):
                break
            v = w + batch(grad_ys[obs_at[n]]) if n in obs_at else w
        solves.reverse()  # step order
        emit(BackwardInfo("odeint", spec.call_id, repr(cfg.strategy), tuple(solves)))
        _report_steps("odeint IFT backward", solves, len(grid) - 1, cfg.strict)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        return (None, v if cfg.batched else v[0], *grads)


def _accumulate(acc: list[Tensor | None], new: Sequence[Tensor | None]) -> list[Tensor | None]:
    return [a if g is None else (g if a is None else a + g) for a, g in zip(acc, new, strict=True)]


def _report_steps(what: str, solves: Sequence[SolveInfo], n_steps: int, strict: bool) -> None:
    """One warning for all steps whose solve missed its test: how many, the worst residual and threshold."""
    failed = [(n, s) for n, s in enumerate(solves) if not bool(s.converged.all())]
    if not failed:
        return
    n, worst = max(failed, key=lambda f: float((f[1].residual / f[1].threshold.clamp_min(1e-300)).max()))
    k = int(torch.argmax(worst.residual / worst.threshold.clamp_min(1e-300)))
    report(f"{what}: the {worst.method} solve of Jᵀw = v did not converge at {len(failed)} of {n_steps} "
           f"steps (worst: step {n}, true residual ‖v − Jᵀw‖ = {float(worst.residual[k]):.3g} > threshold "
           f"tol·‖v‖ = {float(worst.threshold[k]):.3g}, {int(worst.iterations[k])} iterations); raise "
           "options['backward_max_iter'] or use backward='dense'", strict)


class _BackwardEulerAdjoint(torch.autograd.Function):
    """Forward: backward-Euler trajectory (no graph kept). Backward: the adjoint ODE by backward Euler."""

    @staticmethod
    def forward(ctx, spec: _IFTSpec, y0: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            ys = _integrate_be(spec.func, y0.detach(), spec.grid, spec.cfg, [], spec.step_infos)[spec.obs]
        ctx.spec = spec
        ctx.save_for_backward(ys, *params)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys: Tensor):
        spec: _IFTSpec = ctx.spec
        ys, *params = ctx.saved_tensors
        func, grid, obs, cfg = spec.func, spec.grid, spec.obs, spec.cfg
        slv = _solver(cfg.solver, cfg.tol)
        unbatch = (lambda v: v) if cfg.batched else (lambda v: v[0])
        batch = (lambda v: v) if cfg.batched else (lambda v: v.unsqueeze(0))
        obs_at = {g: i for i, g in enumerate(obs)}
        a = batch(grad_ys[-1])
        a_theta: list[Tensor | None] = [None] * len(params)
        z = batch(ys[-1])
        solves: list[SolveInfo] = []
        root_iterations = 0
        for n in range(len(grid) - 2, -1, -1):
            t, dt = grid[n], grid[n + 1] - grid[n]
            # 1) z_n = z_{n+1} − Δt h(t_n, z_n): backward Euler run backward in time.
            Fz = lambda y, _z=z, _t=t, _dt=dt: y - _z + _dt * _hb(func, _t, y, cfg.batched)
            with torch.no_grad():
                if n in obs_at:
                    guess = batch(ys[obs_at[n]])
                else:
                    guess = z - dt * _hb(func, grid[n + 1], z, cfg.batched)
                z_new, its = slv.find_root(Fz, guess)
                res = _norm(Fz(z_new))
            root_iterations += int(its.max())
            _check_adjoint(res, cfg.tol, cfg.accept_factor, cfg.strict, "the backward state reconstruction")
            if n in obs_at:
                z_new = batch(ys[obs_at[n]])  # as torchdiffeq: reset to the forward solution at output times
            z = z_new.detach()
            # 2) (I − Δt ∂h/∂z)ᵀ a_n = a_{n+1} and 3) a_θ += Δt (∂h/∂θ)ᵀ a_n: the IFT product of a
            # backward-Euler step, evaluated at z_n (the exact discrete gradient evaluates it at z_{n+1}).
            a, gp, sinfo = _step_vjp(func, t, dt, z, a, params, cfg.adjoint_solve, cfg.batched)
            solves.append(sinfo)
            a_theta = _accumulate(a_theta, gp)
            if cfg.strict and not bool(sinfo.converged.all()):
                break
            if n in obs_at:
                a = a + batch(grad_ys[obs_at[n]])
        solves.reverse()
        emit(BackwardInfo("odeint", spec.call_id, "adjoint", tuple(solves), root_iterations=root_iterations))
        _report_steps("odeint adjoint", solves, len(grid) - 1, cfg.strict)
        a_theta = [torch.zeros_like(p) if g is None else g for p, g in zip(params, a_theta, strict=True)]
        return (None, unbatch(a), *a_theta)


@dataclass(frozen=True)
class FixedPointNewton:
    """Forward solver ``"auto"``: fixed-point iteration first, Newton (normal-equation CG) where it stalls.

    The fixed-point map of Eq. 4, ``x ← x_n + Δt h(x)``, is cheap (one evaluation of h per iteration) and
    converges when ``Δt·Lip(h) < 1`` (non-stiff); where the residual stops shrinking fast enough within
    ``fp_iter`` iterations (stiff samples), :class:`~diffmpc.solvers.NewtonKrylov` takes over from the current
    iterate. Solving ``F = 0`` here, the fixed-point step is ``x ← x − F(x)``.
    """

    tol: float | None = None
    fp_iter: int = 30
    newton: NewtonKrylov = field(default_factory=NewtonKrylov)

    def find_root(self, F: Callable[[Tensor], Tensor], y0: Tensor, differentiable: bool = False):
        tol = stationarity_tol(y0.dtype, self.tol)
        y = y0 if differentiable else y0.detach()
        iters = torch.zeros(y0.shape[0], dtype=torch.long, device=y0.device)
        with torch.set_grad_enabled(differentiable):
            r = F(y)
            rn = _norm(r.detach())
            for _ in range(self.fp_iter):
                active = rn > tol
                if not bool(active.any()):
                    return y, iters
                y_new = y - _col(active.to(r.dtype), r) * r
                r_new = F(y_new)
                rn_new = _norm(r_new.detach())
                if not bool(torch.isfinite(rn_new).all()) or bool((rn_new[active] > 0.7 * rn[active]).any()):
                    break  # not contracting (fast enough) for some sample: hand over to Newton
                y, r, rn, iters = y_new, r_new, rn_new, iters + active.long()
            if not bool((rn > tol).any()):
                return y, iters
        newton = NewtonKrylov(tol=tol, max_iter=self.newton.max_iter, linear_solver=self.newton.linear_solver,
                            linear_rtol=self.newton.linear_rtol)
        if differentiable:
            y2, it2 = _newton_differentiable(newton, F, y)
        else:
            y2, it2 = newton.find_root(F, y)
        return y2, iters + it2


def _newton_differentiable(newton: NewtonKrylov, F, y: Tensor):
    # NewtonRoot restarts from y.detach(); keep the fixed-point part on the tape by re-adding it.
    y2, it = newton.find_root(F, y.detach().clone().requires_grad_(), differentiable=True)
    return y2 + (y - y.detach()), it


def _hb(func: Callable, t: float, y: Tensor, batched: bool) -> Tensor:
    return func(t, y) if batched else func(t, y[0]).unsqueeze(0)


def _check_adjoint(res: Tensor, tol: float, accept_factor: float, strict: bool, what: str) -> None:
    if not bool(torch.isfinite(res).all()) or bool((res > accept_factor * tol).any()):
        report(f"odeint adjoint: {what} did not converge (‖F‖ = {float(res.max()):.3g} > threshold "
               f"{accept_factor * tol:g} = accept_factor·tol); the adjoint gradient is unreliable", strict)


def _euler(func, y0, grid, obs) -> Tensor:
    ys, y = [y0], y0
    for n in range(len(grid) - 1):
        y = y + (grid[n + 1] - grid[n]) * func(grid[n], y)
        ys.append(y)
    return torch.stack([ys[i] for i in obs])


def odeint(
    func: Callable[[float, Tensor], Tensor],
    y0: Tensor,
    t: Tensor,
    *,
    method: str = "backward_euler",
    backward: str | _strategies.Strategy = "normal_cg",
    solver: Any = "auto",
    options: dict[str, Any] | None = None,
    params: Sequence[Tensor] | None = None,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, OdeInfo]:
    """Integrate ``dy/dt = func(t, y)`` and return ``y`` at the times ``t`` (shape ``(len(t), *y0.shape)``).

    Args:
        func: the vector field ``h(t, y)`` returning a tensor shaped like ``y``; an ``nn.Module`` gets
            gradients for its parameters. With a batched ``y0`` it must act row-wise (sample b of the output
            depends only on sample b of y).
        y0: initial state, ``(D,)`` / ``(*S)`` or batched ``(B, *S)`` (trajectories are independent).
        t: strictly increasing 1-D tensor of output times; each interval is one step unless
            ``options["step_size"]`` subdivides it.
        method: ``"backward_euler"`` (alias ``"implicit_euler"``), ``"euler"``, or any torchdiffeq method.
        backward: ``"normal_cg"`` (default; alias ``"cg"``) | ``"dense"`` | ``"gmres"`` | ``"unroll"`` |
            ``"adjoint"`` (module docstring), or a strategy object (:class:`~diffmpc.backward.NormalCG`,
            ``GMRES``, ``Dense``, ``Unroll``) carrying its own ``tol``/``max_iter``/``damping``.
        solver: forward root solver of each implicit step: ``"auto"`` (fixed point, Newton where it stalls;
            :class:`FixedPointNewton`) | ``"newton"`` | ``"fixed_point"`` | an object with ``.find_root``.
        options: ``step_size`` (max step), ``predictor`` (``"euler"`` (default) or ``"none"``), ``tol``
            (‖F‖ tolerance per step; default by dtype), ``accept_factor`` (a step is converged when
            ``‖F‖ ≤ accept_factor·tol``; default 1), ``backward_tol``, ``backward_max_iter``, ``damping``,
            ``strict``, ``batched`` (default: ``y0.ndim >= 2``), ``warm_start`` (IFT CG from ``v``; default
            False), ``step_layers`` (chain per-step ``root`` layers instead of the fused backward; default
            False). For torchdiffeq methods ``options`` is passed to torchdiffeq unchanged.
        params: extra tensors ``func`` closes over that should receive gradients.
        rtol, atol: tolerances of adaptive torchdiffeq methods (unused by backward Euler).
        return_info: also return an :class:`OdeInfo` (backward Euler only).
    """
    if not isinstance(y0, Tensor) or not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor, got {getattr(y0, 'dtype', type(y0).__name__)}")
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    opts = dict(options or {})
    check_implicit_options(opts.get("tol"), opts.get("backward_tol"), opts.get("backward_max_iter"),
                           opts.get("damping", 0.0))
    _check_vector_field(func, y0, t)
    if y0.ndim >= 1 and y0.shape[0] == 0 and bool(opts.get("batched", y0.ndim >= 2)):
        return _empty_batch(y0, t, module_params(func, params), return_info)
    if method not in IMPLICIT_METHODS:
        name = "unroll" if isinstance(backward, Unroll) else backward
        if not isinstance(name, str):
            raise ValueError(f"method={method!r} is explicit: use backward='adjoint' or 'unroll', not "
                             f"{backward!r} (IFT strategies are for method='backward_euler')")
        if name not in (*BACKWARDS, "cg"):
            raise ValueError(f"unknown backward {backward!r}; choose one of {BACKWARDS}")
        return _explicit(func, y0, t, method, name, opts, rtol, atol, return_info, params)
    unknown = set(opts) - set(_OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for backward Euler; known: {_OPTION_KEYS}")
    if opts.get("predictor", "euler") not in ("euler", "none"):
        raise ValueError(f"options['predictor'] must be 'euler' or 'none', got {opts['predictor']!r}")
    strategy = _strategies.resolve(backward, operator="general", layer="odeint", tol=opts.get("backward_tol"),
                                   max_iter=opts.get("backward_max_iter"), damping=opts.get("damping"),
                                   extra=("adjoint",))
    adjoint_solve = None
    if strategy == "adjoint":
        if opts.get("damping"):
            raise ValueError("options['damping'] is not supported with backward='adjoint'")
        adjoint_solve = NormalCG(tol=linear_tol(y0.dtype, opts.get("backward_tol")),
                                 max_iter=opts.get("backward_max_iter"))
    elif isinstance(strategy, LinearSolve):
        strategy = with_defaults(strategy, tol=linear_tol(y0.dtype), max_iter=None)
    grid, obs = _grid(t, opts.get("step_size"))
    batched = bool(opts.get("batched", y0.ndim >= 2))
    if batched and y0.ndim < 1:
        raise ValueError("options['batched']=True needs y0 with a leading batch dimension")
    cfg = _Config(solver=solver, strategy=strategy, tol=stationarity_tol(y0.dtype, opts.get("tol")),
                  batched=batched, strict=bool(opts.get("strict", False)),
                  predictor=opts.get("predictor", "euler"), warm_start=bool(opts.get("warm_start", False)),
                  step_layers=bool(opts.get("step_layers", False)),
                  accept_factor=check_accept_factor(opts.get("accept_factor", 1.0)),
                  adjoint_solve=adjoint_solve)
    prm = module_params(func, params)
    spec = _IFTSpec(func, grid, obs, cfg, next_call_id())
    if strategy == "adjoint":
        ys = _BackwardEulerAdjoint.apply(spec, y0, *prm)
    elif isinstance(strategy, Unroll) or cfg.step_layers:
        ys = _integrate_be(func, y0, grid, cfg, prm, spec.step_infos)[obs]
    else:
        ys = _BackwardEulerIFT.apply(spec, y0, *prm)
    return (ys, OdeInfo.from_steps(spec.step_infos, spec.call_id)) if return_info else ys


def _explicit(func, y0, t, method, backward, opts, rtol, atol, return_info, params=None):
    if return_info:
        raise ValueError("return_info=True is only available for method='backward_euler'")
    if method == "euler" and backward == "unroll":
        grid, obs = _grid(t, opts.get("step_size"))
        return _euler(func, y0, grid, obs)
    if backward not in ("adjoint", "unroll"):
        raise ValueError(f"method={method!r} is explicit: use backward='adjoint' or 'unroll' (the IFT "
                         f"backwards {BACKWARDS[:3]} are for method='backward_euler')")
    try:
        import torchdiffeq
    except ModuleNotFoundError as err:  # pragma: no cover - torchdiffeq is a dev dependency
        raise ModuleNotFoundError(f"method={method!r} needs torchdiffeq (pip install torchdiffeq)") from err
    if backward == "adjoint":
        if not isinstance(func, nn.Module) and not params:
            raise TypeError("torchdiffeq's adjoint needs func to be an nn.Module (its parameters get "
                            "gradients) or the tensors func closes over passed as params=[...]")
        # The adjoint integrates the parameter gradients itself: it must be told about every tensor that
        # should receive one (module parameters + params=); anything else silently gets no gradient.
        adjoint_params = tuple(module_params(func, params))
        return torchdiffeq.odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method,
                                          options=opts or None, adjoint_params=adjoint_params)
    return torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=opts or None)
