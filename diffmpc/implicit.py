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

Backward modes (``argmin``):

============  ==================================================================================
``"cg"``      CG on HVPs (default). Negative curvature (pᵀHp ≤ 0) is detected per sample, those
              samples are re-solved by MINRES, and the event is reported.
``"minres"``  MINRES on HVPs: symmetric indefinite H (saddle points).
``"dense"``   build H (D HVPs per sample) and ``torch.linalg.solve`` — the paper's "naive IFT".
``"unroll"``  no IFT: backpropagate through the solver's iterations (memory grows with iterations).
============  ==================================================================================

Batching: if ``f`` returns shape ``(B,)`` and ``y`` has leading dimension B, the samples are independent
problems (H is block diagonal) and every solve, tolerance and diagnostic is per sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import linalg
from ._checks import check_has_curvature, check_implicit_options, check_solver_output
from .errors import ConvergenceError, ConvergenceWarning
from .linalg import SolveInfo, _norm
from .solvers import default_tol, jacobian_products, make_minimizer, make_root_solver

__all__ = [
    "argmin",
    "root",
    "ImplicitInfo",
    "ConvergenceWarning",
    "ConvergenceError",
    "ARGMIN_BACKWARDS",
    "ROOT_BACKWARDS",
]

ARGMIN_BACKWARDS = ("cg", "minres", "dense", "unroll")
ROOT_BACKWARDS = ("normal_cg", "gmres", "dense", "unroll")




@dataclass
class ImplicitInfo:
    """Diagnostics of one implicit-layer call (all per sample, shape ``(B,)``; B = 1 if unbatched).

    ``stationarity_residual`` is ‖∇_y f(y*)‖ (argmin) or ‖F(y*)‖ (root) at the returned y*.
    ``backward`` is filled in when the backward pass runs (linear-solve residual, iterations, negative
    curvature); it stays ``None`` until then, and for ``backward="unroll"``.
    """

    stationarity_residual: Tensor
    forward_iterations: Tensor | None
    converged: Tensor
    tol: float
    backward: SolveInfo | None = None
    backward_calls: int = 0
    notes: list[str] = field(default_factory=list)


def _report(message: str, strict: bool) -> None:
    if strict:
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=4)


def _failing(mask: Tensor, values: Tensor, limit: int = 8) -> str:
    idx = torch.nonzero(mask).flatten().tolist()
    shown = ", ".join(f"#{i}: {values[i].item():.3g}" for i in idx[:limit])
    more = f" (+{len(idx) - limit} more)" if len(idx) > limit else ""
    return f"{len(idx)} of {mask.numel()} samples [{shown}{more}]"


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


def _module_params(fn: Any, params: Sequence[Tensor] | None) -> list[Tensor]:
    found = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, nn.Module) else []
    extra = list(params or [])
    seen = {id(p) for p in found}
    return found + [p for p in extra if id(p) not in seen]


def _as_batched(y0: Tensor, batched: bool):
    """Internal convention: everything is ``(B, *S)``. Unbatched problems get B = 1."""
    return (y0, lambda y: y) if batched else (y0.unsqueeze(0), lambda y: y[0])


class _Spec:
    """Everything the autograd Function needs besides tensors (kept out of ``save_for_backward``)."""

    def __init__(
        self, fun, inputs, tensor_slots, n_params, method, rtol, max_iter, damping, strict, info, kind
    ):
        self.fun, self.inputs, self.tensor_slots, self.n_params = fun, inputs, tensor_slots, n_params
        self.method, self.rtol, self.max_iter, self.damping = method, rtol, max_iter, damping
        self.strict, self.info, self.kind = strict, info, kind
        self.params: list[Tensor] = []

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
        n_in = len(spec.tensor_slots)
        ctx.save_for_backward(y_star, *tensors[:n_in])
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
            if spec.kind == "argmin":
                fval = spec.fun(y, *args)
                (g,) = torch.autograd.grad(fval.sum(), y, create_graph=True)

                def matvec(v: Tensor) -> Tensor:
                    hv = torch.autograd.grad(g, y, v, retain_graph=True)[0]
                    return hv + spec.damping * v if spec.damping else hv

                rmatvec = matvec
                residual_map = g
            else:
                residual_map = spec.fun(y, *args)
                jvp, vjp = jacobian_products(residual_map, y)
                # We need Jᵀ w = v: the operator is Jᵀ (a VJP), its transpose J (a JVP).
                matvec, rmatvec = vjp, jvp
                if spec.damping:
                    matvec = lambda v, _m=vjp: _m(v) + spec.damping * v
                    rmatvec = lambda v, _m=jvp: _m(v) + spec.damping * v
            w, sinfo = _linear_solve(spec, matvec, rmatvec, grad_y)
            targets = [t for t in leaves if t.requires_grad] + spec.params
            grads = (
                torch.autograd.grad(residual_map, targets, grad_outputs=-w, allow_unused=True)
                if targets
                else []
            )
        spec.info.backward = sinfo
        spec.info.backward_calls += 1
        it = iter(grads)
        in_grads = [next(it) if t.requires_grad else None for t in leaves]
        param_grads = [next(it) for _ in spec.params]
        return (None, None, *in_grads, *param_grads)


def _linear_solve(spec: _Spec, matvec, rmatvec, rhs: Tensor) -> tuple[Tensor, SolveInfo]:
    method = spec.method
    w, info = linalg.solve(method, matvec, rhs, rmatvec=rmatvec, rtol=spec.rtol, max_iter=spec.max_iter)
    if method == "cg" and bool(info.negative_curvature.any()):
        # H is not positive definite at these samples (a saddle, or f non-convex there): CG's answer is
        # meaningless for them, MINRES is not.
        w2, info2 = linalg.minres(matvec, rhs, rtol=spec.rtol, max_iter=spec.max_iter)
        mask = info.negative_curvature
        w = torch.where(mask.view(-1, *([1] * (w.ndim - 1))), w2, w)
        neg = _failing(mask, info.residual)
        spec.info.notes.append(f"negative curvature in CG for {neg}; re-solved with MINRES")
        info = info.merge(info2, mask)
        warnings.warn(
            f"implicit backward: the Hessian is not positive definite for {neg}; the solution may be "
            "a saddle point, not a minimum. Re-solved those samples with MINRES.",
            ConvergenceWarning,
            stacklevel=3,
        )
    if not bool(info.converged.all()):
        bad = ~info.converged
        _report(
            f"implicit backward: the {info.method} linear solve did not converge for "
            f"{_failing(bad, info.residual)} (residual ‖r‖; rtol={spec.rtol:g}). Gradients of these "
            "samples are inaccurate; raise backward_max_iter, add damping, or use backward='dense'.",
            spec.strict,
        )
    return w, info


def _check_finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} returned NaN or inf at the initial point; check the objective and y0")


def _forward_check(
    kind: str, residual: Tensor, y_star: Tensor, tol: float, slack: float, strict: bool
) -> Tensor:
    if not bool(torch.isfinite(y_star).all()):
        bad = ~torch.isfinite(y_star.reshape(y_star.shape[0], -1)).all(1)
        raise ConvergenceError(
            f"{kind}: the forward solver returned NaN/inf for {int(bad.sum())} of {bad.numel()} samples"
        )
    converged = residual <= tol * slack
    if not bool(converged.all()):
        what = "‖∇f(y*)‖" if kind == "argmin" else "‖F(y*)‖"
        _report(
            f"{kind}: the forward solve is not stationary for {_failing(~converged, residual)} "
            f"({what}, tol={tol:g}). The implicit-function-theorem gradient is only valid at a stationary "
            "point; raise the solver's max_iter, pass a better y0, or use a stronger solver.",
            strict,
        )
    return converged


def _prepare(fn, y0, inputs, backward, valid_backwards, params):
    _check_y0(y0)
    _check_inputs(y0, inputs)
    if backward not in valid_backwards:
        raise ValueError(f"unknown backward {backward!r}; choose one of {valid_backwards}")
    if not callable(fn):
        raise TypeError(f"the objective must be callable, got {type(fn).__name__}")
    return _module_params(fn, params)


def _empty_batch(y0: Tensor, inputs: Sequence[Any], params: Sequence[Tensor], tol: float | None,
                 return_info: bool) -> Any:
    """B = 0: nothing to solve. An empty result of y0's shape, connected to every input that requires grad
    (so its backward runs and gives zero gradients of the right shapes, as torch ops do for empty tensors)."""
    out = y0.detach().clone()
    for t in [*inputs, *params]:
        if isinstance(t, Tensor) and t.requires_grad:
            out = out + 0 * t.sum()
    if not return_info:
        return out
    empty = y0.new_zeros(0)
    tol_v = tol if tol is not None else default_tol(y0.dtype)
    return out, ImplicitInfo(empty, None, torch.zeros(0, dtype=torch.bool, device=y0.device), tol_v)


def _attach(kind, fun_b, y_star_b, inputs, params, method, rtol, max_iter, damping, strict, info):
    slots = [i for i, t in enumerate(inputs) if isinstance(t, Tensor)]
    spec = _Spec(fun_b, inputs, slots, len(params), method, rtol, max_iter, damping, strict, info, kind)
    spec.params = params
    tensors = [inputs[i] for i in slots]
    return _ImplicitFunction.apply(spec, y_star_b, *tensors, *params)


def argmin(
    f: Callable[..., Tensor],
    y0: Tensor,
    *inputs: Any,
    solver: Any = None,
    backward: str = "cg",
    tol: float | None = None,
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    damping: float = 0.0,
    strict: bool = False,
    params: Sequence[Tensor] | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, ImplicitInfo]:
    """Differentiable ``y* = argmin_y f(y, *inputs)`` (paper Eq. 1), backward by the IFT (Eqs. 2–3).

    Args:
        f: ``f(y, *inputs)`` → one score per problem: shape ``()`` for unbatched ``y``, ``(B,)`` when ``y``
            has leading batch dim B (samples independent). An ``nn.Module`` gets gradients for its parameters.
        y0: initial guess (its shape is the solution's shape; it receives no gradient).
        inputs: tensors (gradients flow to those requiring grad) or any other objects passed through to f.
        solver: ``"newton"`` (default), ``"gd"``, ``"lbfgs"``, a solver object with ``.minimize(fun, y0)``,
            or a black-box callable ``solver(fun, y0) -> y`` where ``fun(y) = f(y, *inputs)``.
        backward: ``"cg"`` | ``"minres"`` | ``"dense"`` | ``"unroll"`` (see module docstring).
        tol: stationarity tolerance on ‖∇f(y*)‖ (per sample); defaults by dtype (1e-9 for float64, 1e-4
            for float32). A forward result above ``10·tol`` warns.
        backward_tol: relative residual tolerance of the backward linear solve (default 1e-10 / 1e-5).
        backward_max_iter: iteration cap of the backward Krylov solve (default ~2D, at most 1000).
        damping: solve ``(H + damping·I) w = v`` — Tikhonov regularisation for singular Hessians.
        strict: raise :class:`ConvergenceError` instead of warning.
        params: extra tensors that ``f`` closes over and that should receive gradients.
        return_info: also return an :class:`ImplicitInfo` (its ``backward`` field fills in on backward).
    """
    check_implicit_options(tol, backward_tol, backward_max_iter, damping)
    params_l = _prepare(f, y0, inputs, backward, ARGMIN_BACKWARDS, params)
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
    y0_b, unbatch = _as_batched(y0, batched)
    if batched and y0.shape[0] == 0:
        return _empty_batch(y0, inputs, params_l, tol, return_info)

    def fun_b(y: Tensor, *args: Any) -> Tensor:
        out = f(y if batched else y[0], *args)
        return out if batched else out.reshape(1)

    inputs_nograd = [t.detach() if isinstance(t, Tensor) else t for t in inputs]
    check_has_curvature(lambda y: fun_b(y, *inputs_nograd), y0_b)

    tol_v = tol if tol is not None else default_tol(y0.dtype)
    rtol = backward_tol if backward_tol is not None else (1e-10 if y0.dtype == torch.float64 else 1e-5)
    slv = make_minimizer(solver, tol_v)
    if backward == "unroll":
        if not hasattr(slv, "minimize"):
            raise ValueError(
                "backward='unroll' needs a torch solver ('newton', 'gd'); a black box cannot be unrolled"
            )
        with torch.enable_grad():
            y_b, iters = slv.minimize(lambda y: fun_b(y, *inputs), y0_b, differentiable=True)
    else:
        inputs_d = [t.detach() if isinstance(t, Tensor) else t for t in inputs]
        fun_d = lambda y: fun_b(y, *inputs_d)
        with torch.no_grad():
            if hasattr(slv, "minimize"):
                y_star, iters = slv.minimize(fun_d, y0_b)
            else:
                y_user = slv(lambda y: f(y, *inputs_d), y0.detach().clone())
                y_star = check_solver_output(y_user, y0)
                y_star, iters = (y_star if batched else y_star.unsqueeze(0)), None
        y_star = y_star.detach()
    with torch.enable_grad():
        yr = (y_b if backward == "unroll" else y_star).detach().requires_grad_()
        (gr,) = torch.autograd.grad(
            fun_b(yr, *[t.detach() if isinstance(t, Tensor) else t for t in inputs]).sum(), yr
        )
    residual = _norm(gr)
    nan_grad = torch.isnan(residual) & torch.isfinite(yr.detach().reshape(residual.shape[0], -1)).all(1)
    if bool(nan_grad.any()):
        # A finite y* with a NaN gradient is a property of the objective, not of the solver: the IFT needs
        # ∇f and ∇²f at y*, so a silent NaN (or a warning) would only move the failure into backward.
        raise ValueError(
            f"argmin: the objective's gradient is NaN at the solution y* for {_failing(nan_grad, residual)}; "
            "f is not differentiable there (e.g. sqrt, abs or norm at 0). Smooth the objective "
            "(sqrt(y² + ε)) or start the solver elsewhere."
        )
    converged = _forward_check("argmin", residual, yr.detach(), tol_v, 10.0, strict)
    info = ImplicitInfo(residual, iters, converged, tol_v)
    if backward == "unroll":
        out = y_b
    else:
        out = _attach(
            "argmin",
            fun_b,
            y_star,
            inputs,
            params_l,
            backward,
            rtol,
            backward_max_iter,
            damping,
            strict,
            info,
        )
    out = unbatch(out)
    return (out, info) if return_info else out


def root(
    F: Callable[..., Tensor],
    y0: Tensor,
    *inputs: Any,
    solver: Any = None,
    backward: str = "normal_cg",
    batched: bool = False,
    tol: float | None = None,
    backward_tol: float | None = None,
    backward_max_iter: int | None = None,
    damping: float = 0.0,
    strict: bool = False,
    params: Sequence[Tensor] | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, ImplicitInfo]:
    """Differentiable root ``F(y*, *inputs) = 0``, backward by the IFT with the transposed Jacobian.

    ``dy*/dθ = −J⁻¹ ∂F/∂θ`` with ``J = ∂F/∂y``; the VJP solves ``Jᵀ w = v`` matrix-free. ``backward``:
    ``"normal_cg"`` (default; the paper's CG on the normal equations, one JVP + one VJP per iteration; the
    alias ``"cg"`` means the same), ``"gmres"``, ``"dense"`` or ``"unroll"``.

    ``F(y, *inputs)`` must return a tensor shaped like y. With ``batched=True`` the leading dimension of y
    indexes independent problems (sample b of F depends only on sample b of y): solves, tolerances and
    diagnostics are then per sample. Other arguments as in :func:`argmin`; solvers: ``"newton"`` (default,
    normal-equation CG Newton), ``"fixed_point"``, an object with ``.find_root(F, y0)``, or a callable.
    """
    if backward == "cg":
        backward = "normal_cg"
    check_implicit_options(tol, backward_tol, backward_max_iter, damping)
    params_l = _prepare(F, y0, inputs, backward, ROOT_BACKWARDS, params)
    if batched and y0.ndim == 0:
        raise ValueError("batched=True needs y0 with a leading batch dimension")
    with torch.no_grad():
        probe = F(y0, *inputs)
    if not isinstance(probe, Tensor) or probe.shape != y0.shape:
        shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise ValueError(f"F must return a tensor shaped like y ({tuple(y0.shape)}), got {shape}")
    _check_finite("F", probe)
    y0_b, unbatch = _as_batched(y0, batched)
    if batched and y0.shape[0] == 0:
        return _empty_batch(y0, inputs, params_l, tol, return_info)

    def fun_b(y: Tensor, *args: Any) -> Tensor:
        return F(y, *args) if batched else F(y[0], *args).unsqueeze(0)

    tol_v = tol if tol is not None else default_tol(y0.dtype)
    rtol = backward_tol if backward_tol is not None else (1e-10 if y0.dtype == torch.float64 else 1e-5)
    slv = make_root_solver(solver, tol_v)
    if backward == "unroll":
        if not hasattr(slv, "find_root"):
            raise ValueError("backward='unroll' needs a torch solver ('newton', 'fixed_point')")
        with torch.enable_grad():
            y_b, iters = slv.find_root(lambda y: fun_b(y, *inputs), y0_b, differentiable=True)
        y_star = y_b.detach()
    else:
        inputs_d = [t.detach() if isinstance(t, Tensor) else t for t in inputs]
        with torch.no_grad():
            if hasattr(slv, "find_root"):
                y_star, iters = slv.find_root(lambda y: fun_b(y, *inputs_d), y0_b)
            else:
                y_user = slv(lambda y: F(y, *inputs_d), y0.detach().clone())
                y_star = check_solver_output(y_user, y0)
                y_star, iters = (y_star if batched else y_star.unsqueeze(0)), None
        y_star = y_star.detach()
    with torch.no_grad():
        residual = _norm(fun_b(y_star, *inputs).detach())
    converged = _forward_check("root", residual, y_star, tol_v, 10.0, strict)
    info = ImplicitInfo(residual, iters, converged, tol_v)
    if backward == "unroll":
        out = y_b
    else:
        out = _attach(
            "root", fun_b, y_star, inputs, params_l, backward, rtol, backward_max_iter, damping, strict, info
        )
    out = unbatch(out)
    return (out, info) if return_info else out
