r"""Implicit layers: ``y* = argmin_y f(y; x, θ)`` and ``F(y*; x, θ) = 0``, differentiated by the IFT.

**Forward.** Any solver finds y* without autograd (a black box is fine). The layer then *checks* that y*
is stationary — ``‖∇_y f(y*)‖`` (or ``‖F(y*)‖``) per sample — because the implicit function theorem only
holds there; a sample that is not warns with :class:`ConvergenceWarning` (or raises under ``strict=True``).

**Backward** (paper Sec. 2, Eqs. 1–3). At a stationary point ``∇_y f(y*, θ) = 0``, differentiating gives

.. math::  \frac{\partial y^*}{\partial θ} = -H^{-1}\, \frac{\partial^2 f}{\partial y\, \partial θ},
           \qquad H = \nabla^2_{yy} f(y^*, θ)            \qquad\text{(Eq. 2)}

so for an upstream gradient ``v = ∂L/∂y*`` the vector-Jacobian product is ``-wᵀ ∂²f/∂y∂θ`` with
``H w = v`` (Eq. 3). ``backward="cg"`` solves for w by conjugate gradient on Hessian-vector products (the
paper's Alg. 1; H is never built), then gets ``-wᵀ∂²f/∂y∂θ`` as one more VJP of ∇_y f. For roots, ``J =
∂F/∂y`` replaces H and the transpose matters: ``Jᵀ w = v`` is solved by CG on the normal equations
(``J Jᵀ w' = J v``, paper Sec. 2.2), GMRES, or densely.

Backward strategies (``backward=``; objects from :mod:`diffmpc.backward`, or their string names):

=====================================  ===========================================================
``CG()`` / ``"cg"``                     CG on HVPs (argmin default). Negative curvature (pᵀHp ≤ 0) is
                                        detected per sample, those samples are re-solved by MINRES,
                                        and the event is reported.
``MINRES()`` / ``"minres"``             MINRES on HVPs: symmetric indefinite H (saddle points).
``NormalCG()`` / ``"normal_cg"``        CG on the normal equations (root default; ``"cg"`` is its
                                        backwards-compatible alias for ``root``).
``GMRES()`` / ``"gmres"``               restarted GMRES.
``Dense()`` / ``"dense"``               build H or J (D products per sample) and LU-solve — the
                                        paper's "naive IFT".
``Unroll()`` / ``"unroll"``             no IFT: backpropagate through the solver's iterations.
=====================================  ===========================================================

**Convergence** means exactly the documented tests: the forward check ``‖∇f(y*)‖ ≤ accept_factor·tol``
(``‖F(y*)‖`` for roots; ``accept_factor = 1`` by default), and the backward solve
``‖v − A w‖ ≤ tol_backward·‖v‖`` on the true residual. Warnings name the samples, their residuals and
the threshold.

**Diagnostics by value.** ``return_info=True`` returns a frozen :class:`ImplicitInfo` (the forward). Each
backward pass produces a frozen :class:`BackwardInfo` (tagged with the forward's ``call_id``), delivered
to every active :func:`record_backward` block::

    y, info = argmin(f, y0, x, return_info=True)
    with record_backward() as records:
        y.sum().backward()
    (rec,) = [r for r in records if r.call_id == info.call_id]
    rec.solve.residual, rec.solve.iterations

Batching: if ``f`` returns shape ``(B,)`` and ``y`` has leading dimension B, the samples are independent
problems (H is block diagonal) and every solve, tolerance and diagnostic is per sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import backward as _strategies
from ._checks import check_has_curvature, check_implicit_options, check_real, check_solver_output
from ._impl.batch import describe_failing, norm
from ._impl.ift import ift_vjp
from ._impl.records import BackwardInfo, emit, next_call_id, record_backward
from ._impl.tolerances import linear_tol, stationarity_tol
from .backward import LinearSolve, Unroll, with_defaults
from .errors import ConvergenceError, ConvergenceWarning
from .solvers import make_minimizer, make_root_solver

__all__ = ["argmin", "root", "ARGMIN_BACKWARDS", "ROOT_BACKWARDS", "ImplicitInfo", "BackwardInfo",
           "record_backward", "ConvergenceWarning", "ConvergenceError"]

#: Strategy names accepted by :func:`argmin` (canonical names; objects from :mod:`diffmpc.backward` too).
ARGMIN_BACKWARDS = tuple(_strategies.ALIASES["symmetric"])
#: Canonical strategy names for :func:`root` (``"cg"`` is accepted as the alias of ``"normal_cg"``).
ROOT_BACKWARDS = ("normal_cg", "gmres", "dense", "unroll")




@dataclass(frozen=True)
class ImplicitInfo:
    """Forward diagnostics of one implicit-layer call (immutable; per sample, shape ``(B,)``; B = 1 if
    unbatched).

    Attributes:
        stationarity_residual: ‖∇_y f(y*)‖ (argmin) or ‖F(y*)‖ (root) at the returned y*.
        forward_iterations: the solver's iterations per sample (None for a black-box callable).
        converged: exactly ``stationarity_residual ≤ accept_factor · tol``.
        tol: the stationarity tolerance; ``accept_factor`` the documented slack factor (default 1).
        layer: ``"argmin"`` or ``"root"``.
        call_id: ties this call to the :class:`BackwardInfo` records of its backward passes.

    Backward diagnostics are not stored here (an info never changes after it is returned): collect them
    with :func:`record_backward`.
    """

    stationarity_residual: Tensor
    forward_iterations: Tensor | None
    converged: Tensor
    tol: float
    accept_factor: float = 1.0
    layer: str = "argmin"
    call_id: int = 0

    @property
    def threshold(self) -> float:
        """The acceptance threshold ``accept_factor · tol``."""
        return self.accept_factor * self.tol


def report(message: str, strict: bool, stacklevel: int = 4) -> None:
    """Warn with :class:`ConvergenceWarning`, or raise :class:`ConvergenceError` under ``strict=True``."""
    if strict:
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel)


def report_solve(layer: str, info: Any, strict: bool, hint: str, stacklevel: int = 4) -> None:
    """Report a backward linear solve that missed its documented test, with residuals and thresholds."""
    if bool(info.converged.all()):
        return
    bad = ~info.converged
    ratio = info.residual / info.threshold.clamp_min(torch.finfo(info.residual.dtype).tiny)
    report(
        f"{layer} backward: the {info.method} linear solve did not converge for "
        f"{describe_failing(bad, info.residual)} (true residual ‖v − Aw‖; threshold tol·‖v‖ up to "
        f"{float(info.threshold[bad].max()):.3g}, worst residual/threshold {float(ratio[bad].max()):.3g}, "
        f"iterations {info.iterations[bad][:8].tolist()}). Gradients of these samples are inaccurate; "
        f"{hint}",
        strict,
        stacklevel,
    )


def check_accept_factor(accept_factor: float) -> float:
    """``accept_factor`` is a finite number ≥ 1 (1 = the plain test ``residual ≤ tol``)."""
    check_real("accept_factor", accept_factor, minimum=1.0)
    return float(accept_factor)


def forward_check(
    layer: str, what: str, residual: Tensor, y_star: Tensor, tol: float, accept_factor: float, strict: bool,
    hint: str = "raise the solver's max_iter, pass a better y0, or use a stronger solver",
) -> Tensor:
    """The documented forward test ``residual ≤ accept_factor·tol`` per sample; warns (or raises) naming
    the failing samples, their residuals, ``tol`` and the acceptance threshold."""
    if not bool(torch.isfinite(y_star).all()):
        bad = ~torch.isfinite(y_star.reshape(y_star.shape[0], -1)).all(1)
        raise ConvergenceError(
            f"{layer}: the forward solver returned NaN/inf for {int(bad.sum())} of {bad.numel()} samples"
        )
    converged = residual <= accept_factor * tol
    if not bool(converged.all()):
        slack = ""
        if accept_factor != 1:
            slack = f", accept_factor={accept_factor:g}: threshold {accept_factor * tol:g}"
        report(
            f"{layer}: the forward solve is not stationary for {describe_failing(~converged, residual)} "
            f"({what}; tol={tol:g}{slack}). The implicit-function-theorem gradient is only valid at a "
            f"stationary point; {hint}.",
            strict,
        )
    return converged


def _check_y0(y0: Tensor) -> None:
    if not isinstance(y0, Tensor):
        raise TypeError(f"y0 must be a torch.Tensor, got {type(y0).__name__}")
    if not y0.is_floating_point():
        raise TypeError(
            f"y0 must be a floating-point tensor (the solution is continuous), got {y0.dtype}; "
            "pass e.g. y0.double() or y0.float()"
        )
    if not bool(torch.isfinite(y0).all()):
        raise ValueError("y0 contains NaN or inf; start the solver from a finite point")


def _check_inputs(y0: Tensor, inputs: Sequence[Any]) -> None:
    for i, t in enumerate(inputs):
        if isinstance(t, Tensor):
            if t.device != y0.device:
                raise ValueError(f"input {i} is on {t.device} but y0 is on {y0.device}; move them together")
            if t.is_floating_point() and t.dtype != y0.dtype:
                raise TypeError(
                    f"input {i} has dtype {t.dtype} but y0 has {y0.dtype}; use one dtype "
                    "(mixed precision makes the stationarity test meaningless)"
                )


def module_params(fn: Any, params: Sequence[Tensor] | None) -> list[Tensor]:
    """The parameters of ``fn`` (if an ``nn.Module``) that require grad, then the extra ``params``."""
    found = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, nn.Module) else []
    extra = list(params or [])
    seen = {id(p) for p in found}
    return found + [p for p in extra if id(p) not in seen]


class _Spec:
    """Everything the autograd Function needs besides tensors (kept out of ``save_for_backward``)."""

    def __init__(self, layer, fun, inputs, params, strategy, strict, call_id):
        self.layer, self.fun, self.inputs, self.params = layer, fun, inputs, params
        self.tensor_slots = [i for i, t in enumerate(inputs) if isinstance(t, Tensor)]
        self.strategy, self.strict, self.call_id = strategy, strict, call_id

    def rebuild(self, tensors: Sequence[Tensor]) -> list[Any]:
        args = list(self.inputs)
        for slot, t in zip(self.tensor_slots, tensors, strict=True):
            args[slot] = t
        return args


class _ImplicitFunction(torch.autograd.Function):
    """Identity on y* in the forward; the IFT vector-Jacobian product in the backward."""

    @staticmethod
    def forward(ctx, spec: _Spec, y_star: Tensor, *tensors: Tensor) -> Tensor:
        ctx.spec = spec
        ctx.save_for_backward(y_star, *tensors[: len(spec.tensor_slots)])
        return y_star.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        spec: _Spec = ctx.spec
        y_star, *inputs = ctx.saved_tensors
        with torch.enable_grad():
            y = y_star.detach().requires_grad_()
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            args = spec.rebuild(leaves)
            if spec.layer == "argmin":  # optimality residual r = ∇_y f, its Jacobian the Hessian H
                (r,) = torch.autograd.grad(spec.fun(y, *args).sum(), y, create_graph=True)
            else:  # r = F, Jacobian J = ∂F/∂y (not symmetric)
                r = spec.fun(y, *args)
            targets = [t for t in leaves if t.requires_grad] + spec.params
            grads, _, sinfo, notes = ift_vjp(r, y, targets, grad_y, spec.strategy,
                                             symmetric=spec.layer == "argmin")
        emit(BackwardInfo(spec.layer, spec.call_id, repr(spec.strategy), (sinfo,), notes))
        report_solve(spec.layer, sinfo, spec.strict,
                     "raise the strategy's max_iter, add damping, or use backward='dense'.")
        it = iter(grads)
        in_grads = [next(it) if t.requires_grad else None for t in leaves]
        param_grads = [next(it) for _ in spec.params]
        return (None, None, *in_grads, *param_grads)


def _check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} returned NaN or inf at the initial point; check the objective and y0")


def _solve_forward(slv, solve_method: str, fun_b, user_fun, y0: Tensor, y0_b: Tensor, inputs, batched: bool,
                   unroll: bool):
    """Run the forward solver: on the autograd tape for ``Unroll``, else without a graph. Returns
    ``(y_b, iterations)`` with ``y_b`` batched ``(B, *S)`` (detached unless unrolling)."""
    if unroll:
        if not hasattr(slv, solve_method):
            raise ValueError(f"backward='unroll' needs a torch solver with .{solve_method}(); a black box "
                             "cannot be unrolled")
        with torch.enable_grad():
            return getattr(slv, solve_method)(lambda y: fun_b(y, *inputs), y0_b, differentiable=True)
    inputs_d = [t.detach() if isinstance(t, Tensor) else t for t in inputs]
    with torch.no_grad():
        if hasattr(slv, solve_method):
            y_b, iters = getattr(slv, solve_method)(lambda y: fun_b(y, *inputs_d), y0_b)
        else:
            y_b = check_solver_output(slv(lambda y: user_fun(y, *inputs_d), y0.detach().clone()), y0)
            y_b, iters = (y_b if batched else y_b.unsqueeze(0)), None
    return y_b.detach(), iters


def _implicit_layer(layer, fn, fun_b, y_b, iters, inputs, params, strategy, residual, tol, accept_factor,
                    strict, what, batched, return_info):
    """The part every implicit layer shares: forward check, frozen info, the IFT node, unbatching."""
    converged = forward_check(layer, what, residual, y_b.detach(), tol, accept_factor, strict)
    call_id = next_call_id()
    info = ImplicitInfo(residual, iters, converged, tol, accept_factor, layer, call_id)
    if isinstance(strategy, Unroll):
        out = y_b
    else:
        spec = _Spec(layer, fun_b, inputs, params, strategy, strict, call_id)
        tensors = [inputs[i] for i in spec.tensor_slots]
        out = _ImplicitFunction.apply(spec, y_b, *tensors, *params)
    out = out if batched else out[0]
    return (out, info) if return_info else out


def _empty_batch(layer: str, y0: Tensor, inputs: Sequence[Any], params: Sequence[Tensor], tol: float,
                 accept_factor: float, return_info: bool) -> Any:
    """B = 0: nothing to solve. An empty result of y0's shape, connected to every input that requires grad
    (so its backward runs and gives zero gradients of the right shapes, as torch ops do for empty tensors)."""
    out = y0.detach().clone()
    for t in [*inputs, *params]:
        if isinstance(t, Tensor) and t.requires_grad:
            out = out + 0 * t.sum()
    if not return_info:
        return out
    empty = torch.zeros(0, dtype=torch.bool, device=y0.device)
    return out, ImplicitInfo(y0.new_zeros(0), None, empty, tol, accept_factor, layer, next_call_id())


def _prepare(layer, fn, y0, inputs, params, backward, operator, tol, backward_tol, backward_max_iter, damping,
             accept_factor):
    check_implicit_options(tol, backward_tol, backward_max_iter, 0.0 if damping is None else damping)
    _check_y0(y0)
    _check_inputs(y0, inputs)
    if not callable(fn):
        raise TypeError(f"the {'objective' if layer == 'argmin' else 'residual'} must be callable, got "
                        f"{type(fn).__name__}")
    strategy = _strategies.resolve(backward, operator=operator, layer=layer, tol=backward_tol,
                                   max_iter=backward_max_iter, damping=damping)
    if isinstance(strategy, LinearSolve):
        strategy = with_defaults(strategy, tol=linear_tol(y0.dtype), max_iter=None)
    return module_params(fn, params), strategy, check_accept_factor(accept_factor)


def argmin(
    f: Callable[..., Tensor],
    y0: Tensor,
    *inputs: Any,
    solver: Any = None,
    backward: str | _strategies.Strategy = "cg",
    tol: float | None = None,
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    damping: float | None = None,
    strict: bool = False,
    params: Sequence[Tensor] | None = None,
    return_info: bool = False,
    accept_factor: float = 1.0,
) -> Tensor | tuple[Tensor, ImplicitInfo]:
    """Differentiable ``y* = argmin_y f(y, *inputs)`` (paper Eq. 1), backward by the IFT (Eqs. 2–3).

    Args:
        f: ``f(y, *inputs)`` → one score per problem: shape ``()`` for unbatched ``y``, ``(B,)`` when ``y``
            has leading batch dim B (samples independent). An ``nn.Module`` gets gradients for its parameters.
        y0: initial guess (its shape is the solution's shape; it receives no gradient).
        inputs: tensors (gradients flow to those requiring grad) or any other objects passed through to f.
        solver: ``"newton_cg"`` (default; alias ``"newton"``), ``"gd"``, ``"lbfgs"``, a solver object with
            ``.minimize(fun, y0)``, or a black-box callable ``solver(fun, y0) -> y`` where
            ``fun(y) = f(y, *inputs)``.
        backward: a strategy object (:class:`~diffmpc.backward.CG` (default), ``MINRES``, ``NormalCG``,
            ``GMRES``, ``Dense``, ``Unroll``) or its name (see :data:`ARGMIN_BACKWARDS`).
        tol: stationarity tolerance on ‖∇f(y*)‖ (per sample); defaults by dtype (1e-9 for float64, 1e-4
            for float32).
        backward_tol, backward_max_iter, damping: fill the fields ``tol``, ``max_iter``, ``damping`` of a
            strategy given by name (relative residual tolerance, default 1e-10 / 1e-5; iteration cap,
            default ``max(10, min(2D, 1000))``; Tikhonov term ``(H + damping·I) w = v``). With a strategy
            object, set them in the object.
        strict: raise :class:`ConvergenceError` instead of warning.
        params: extra tensors that ``f`` closes over and that should receive gradients.
        return_info: also return the frozen :class:`ImplicitInfo` of the forward solve.
        accept_factor: the forward is accepted (``converged``, no warning) when
            ``‖∇f(y*)‖ ≤ accept_factor·tol``; 1 (default) is the plain test. A slack > 1 is for solvers
            whose own stopping test differs from the layer's (e.g. black boxes); both numbers are reported.
    """
    params_l, strategy, accept_factor = _prepare("argmin", f, y0, inputs, params, backward, "symmetric", tol,
                                                 backward_tol, backward_max_iter, damping, accept_factor)
    with torch.no_grad():
        probe = f(y0, *inputs)
    if not isinstance(probe, Tensor):
        raise TypeError(f"f must return a tensor of scores, got {type(probe).__name__}")
    if probe.shape == ():
        batched = False
    elif probe.ndim == 1 and y0.ndim >= 1 and probe.shape[0] == y0.shape[0]:
        batched = True
    else:
        raise ValueError(
            f"f returned scores of shape {tuple(probe.shape)}; expected () for an unbatched y of "
            f"shape {tuple(y0.shape)} or ({y0.shape[0] if y0.ndim else 'B'},) — one score per "
            "sample along y's leading dimension"
        )
    _check_finite("f", probe)
    y0_b = y0 if batched else y0.unsqueeze(0)
    tol_v = stationarity_tol(y0.dtype, tol)
    if batched and y0.shape[0] == 0:
        return _empty_batch("argmin", y0, inputs, params_l, tol_v, accept_factor, return_info)

    def fun_b(y: Tensor, *args: Any) -> Tensor:
        out = f(y if batched else y[0], *args)
        return out if batched else out.reshape(1)

    inputs_nograd = [t.detach() if isinstance(t, Tensor) else t for t in inputs]
    check_has_curvature(lambda y: fun_b(y, *inputs_nograd), y0_b)
    slv = make_minimizer(solver, tol_v)
    y_b, iters = _solve_forward(slv, "minimize", fun_b, f, y0, y0_b, inputs, batched,
                                isinstance(strategy, Unroll))
    with torch.enable_grad():
        yr = y_b.detach().requires_grad_()
        (gr,) = torch.autograd.grad(
            fun_b(yr, *[t.detach() if isinstance(t, Tensor) else t for t in inputs]).sum(), yr
        )
    residual = norm(gr)
    nan_grad = torch.isnan(residual) & torch.isfinite(yr.detach().reshape(residual.shape[0], -1)).all(1)
    if bool(nan_grad.any()):
        # A finite y* with a NaN gradient is a property of the objective, not of the solver: the IFT needs
        # ∇f and ∇²f at y*, so a silent NaN (or a warning) would only move the failure into backward.
        raise ValueError(
            f"argmin: the objective's gradient is NaN at the solution y* for "
            f"{describe_failing(nan_grad, residual)}; f is not differentiable there (e.g. sqrt, abs or norm "
            "at 0). Smooth the objective (sqrt(y² + ε)) or start the solver elsewhere."
        )
    return _implicit_layer("argmin", f, fun_b, y_b, iters, inputs, params_l, strategy, residual, tol_v,
                           accept_factor, strict, "‖∇f(y*)‖", batched, return_info)


def root(
    F: Callable[..., Tensor],
    y0: Tensor,
    *inputs: Any,
    solver: Any = None,
    backward: str | _strategies.Strategy = "normal_cg",
    tol: float | None = None,
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    damping: float | None = None,
    batched: bool = False,
    strict: bool = False,
    params: Sequence[Tensor] | None = None,
    return_info: bool = False,
    accept_factor: float = 1.0,
) -> Tensor | tuple[Tensor, ImplicitInfo]:
    """Differentiable root ``F(y*, *inputs) = 0``, backward by the IFT with the transposed Jacobian.

    ``dy*/dθ = −J⁻¹ ∂F/∂θ`` with ``J = ∂F/∂y``; the VJP solves ``Jᵀ w = v`` matrix-free. ``backward``:
    :class:`~diffmpc.backward.NormalCG` / ``"normal_cg"`` (default; the paper's CG on the normal
    equations, one JVP + one VJP per iteration; ``"cg"`` is its backwards-compatible alias — J is not
    symmetric, so plain CG is refused), ``GMRES`` / ``"gmres"``, ``Dense`` / ``"dense"`` or ``Unroll`` /
    ``"unroll"``.

    ``F(y, *inputs)`` must return a tensor shaped like y. With ``batched=True`` the leading dimension of y
    indexes independent problems (sample b of F depends only on sample b of y): solves, tolerances and
    diagnostics are then per sample. Other arguments as in :func:`argmin` (``accept_factor`` applies to
    ``‖F(y*)‖``); solvers: ``"newton_krylov"`` (default; alias ``"newton"``), ``"fixed_point"``, an object
    with ``.find_root(F, y0)``, or a callable.
    """
    params_l, strategy, accept_factor = _prepare("root", F, y0, inputs, params, backward, "general", tol,
                                                 backward_tol, backward_max_iter, damping, accept_factor)
    if batched and y0.ndim == 0:
        raise ValueError("batched=True needs y0 with a leading batch dimension")
    with torch.no_grad():
        probe = F(y0, *inputs)
    if not isinstance(probe, Tensor) or probe.shape != y0.shape:
        shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise ValueError(f"F must return a tensor shaped like y ({tuple(y0.shape)}), got {shape}")
    _check_finite("F", probe)
    y0_b = y0 if batched else y0.unsqueeze(0)
    tol_v = stationarity_tol(y0.dtype, tol)
    if batched and y0.shape[0] == 0:
        return _empty_batch("root", y0, inputs, params_l, tol_v, accept_factor, return_info)

    def fun_b(y: Tensor, *args: Any) -> Tensor:
        return F(y, *args) if batched else F(y[0], *args).unsqueeze(0)

    slv = make_root_solver(solver, tol_v)
    y_b, iters = _solve_forward(slv, "find_root", fun_b, F, y0, y0_b, inputs, batched,
                                isinstance(strategy, Unroll))
    with torch.no_grad():
        residual = norm(fun_b(y_b.detach(), *inputs).detach())
    return _implicit_layer("root", F, fun_b, y_b, iters, inputs, params_l, strategy, residual, tol_v,
                           accept_factor, strict, "‖F(y*)‖", batched, return_info)
