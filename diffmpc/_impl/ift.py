r"""The one implicit-function-theorem front end (TorchOpt ``custom_root``-like), shared by ``argmin``,
``root``, ``dare`` and ``odeint``.

Given the optimality residual ``r(y*, θ)`` *with its autograd graph* (``∇_y f`` built with
``create_graph=True`` for an argmin, ``F`` for a root, the Riccati residual for the DARE, the
backward-Euler step residual for an ODE step), the solution leaf ``y`` and the leaves ``θ`` to
differentiate, :func:`ift_vjp` returns the IFT vector-Jacobian product (paper Eqs. 2–3)

.. math::  \frac{\partial L}{\partial θ} = -w^{\top}\frac{\partial r}{\partial θ},
           \qquad \Big(\frac{\partial r}{\partial y}\Big)^{\!\top} w + \text{damping}\cdot w = v .

The adjoint operator ``A = (∂r/∂y)ᵀ`` is one VJP of the recorded graph; its transpose ``J = ∂r/∂y``
(needed by normal-equation CG only) is a JVP by the double-VJP trick, built lazily on first use. The
parameter gradients *and* the true residual ``v − A w`` come from one VJP ``∂(wᵀr)/∂(y, θ)``, which
the Krylov driver uses as its residual check — so confirming convergence costs no extra product.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ..backward import CG, LinearSolve
from ..errors import ConvergenceWarning
from . import krylov
from .batch import col, describe_failing
from .krylov import SolveInfo


class AdjointOperator:
    """Products with ``A = (∂r/∂y)ᵀ + damping·I`` and ``Aᵀ`` from one recorded graph of r."""

    def __init__(self, r: Tensor, y: Tensor, damping: float, symmetric: bool, create_graph: bool = False):
        self.r, self.y, self.damping, self.symmetric = r, y, damping, symmetric
        self.create_graph = create_graph  # keep the products on the tape (unrolled Newton steps)
        self._s: Tensor | None = None
        self._jts: Tensor | None = None

    def _damped(self, u: Tensor, au: Tensor | None) -> Tensor:
        out = torch.zeros_like(u) if au is None else au
        return out + self.damping * u if self.damping else out

    def matvec(self, u: Tensor) -> Tensor:
        """``A u = (∂r/∂y)ᵀ u`` (+ damping·u): one VJP."""
        (au,) = torch.autograd.grad(self.r, self.y, u, retain_graph=True, allow_unused=True,
                                    create_graph=self.create_graph)
        return self._damped(u, au)

    def rmatvec(self, u: Tensor) -> Tensor:
        """``Aᵀ u = (∂r/∂y) u`` (+ damping·u): a JVP by double backward (``J u = ∂/∂s ⟨Jᵀs, u⟩``), which works
        for every op with a double backward, unlike forward-mode AD."""
        if self.symmetric:
            return self.matvec(u)
        with torch.enable_grad():
            if self._jts is None:
                self._s = torch.zeros_like(self.r, requires_grad=True)
                (self._jts,) = torch.autograd.grad(self.r, self.y, self._s, create_graph=True,
                                                   allow_unused=True)
            if self._jts is None or not self._jts.requires_grad:  # r does not depend on y (or only via 0)
                return self._damped(u, None)
            (ju,) = torch.autograd.grad(self._jts, self._s, u, retain_graph=True,
                                        create_graph=self.create_graph)
        return self._damped(u, ju)


class _FinalVJP:
    """``w ↦ v − A w`` from the VJP ``∂(wᵀr)/∂(y, θ)``, keeping the θ part for the latest w."""

    def __init__(self, op: AdjointOperator, targets: Sequence[Tensor], v: Tensor):
        self.op, self.targets, self.v = op, list(targets), v
        self.w: Tensor | None = None
        self.grads: list[Tensor | None] = []

    def __call__(self, w: Tensor) -> Tensor:
        au, *grads = torch.autograd.grad(self.op.r, [self.op.y, *self.targets], w, retain_graph=True,
                                         allow_unused=True)
        self.w, self.grads = w, grads
        return self.v - self.op._damped(w, au)

    def grads_at(self, w: Tensor) -> list[Tensor | None]:
        if self.w is not w:
            self(w)
        return self.grads


def ift_vjp(
    r: Tensor,
    y: Tensor,
    targets: Sequence[Tensor],
    v: Tensor,
    strategy: LinearSolve,
    *,
    symmetric: bool,
    x0: Tensor | None = None,
) -> tuple[list[Tensor | None], Tensor, SolveInfo, tuple[str, ...]]:
    """IFT VJP for the residual ``r`` (graph to ``y`` and ``targets``) and upstream gradient ``v``.

    Returns ``(grads, w, info, notes)``: ``grads[i] = −wᵀ ∂r/∂targets[i]`` (None if unused), the adjoint
    solution w, the solve report, and notes (negative curvature events). ``strategy`` must have ``tol``
    set (the caller fills defaults). Must run under ``torch.enable_grad()``.
    """
    op = AdjointOperator(r, y, strategy.damping, symmetric)
    final = _FinalVJP(op, targets, v)
    kw = {"rtol": strategy.tol, "max_iter": strategy.max_iter, "residual": final, "x0": x0}
    if strategy.method == "normal_cg":
        kw["stop"] = strategy.stop
    if strategy.method == "gmres":
        kw["restart"] = strategy.restart
    w, info = krylov.solve(strategy.method, op.matvec, v, rmatvec=op.rmatvec, **kw)
    notes: tuple[str, ...] = ()
    if isinstance(strategy, CG) and strategy.minres_fallback and bool(info.negative_curvature.any()):
        # H is not positive definite at these samples (a saddle, or f non-convex there): CG's answer is
        # meaningless for them, MINRES's is not.
        mask = info.negative_curvature
        w2, info2 = krylov.solve("minres", op.matvec, v, rtol=strategy.tol, max_iter=strategy.max_iter,
                                 residual=final)
        w = torch.where(col(mask, w), w2, w)
        which = describe_failing(mask, info.residual)
        notes = (f"negative curvature in CG for {which}; re-solved with MINRES",)
        info = info.merge(info2, mask)
        warnings.warn(
            f"implicit backward: the Hessian is not positive definite for {which}; the solution may be "
            "a saddle point, not a minimum. Re-solved those samples with MINRES.",
            ConvergenceWarning,
            stacklevel=4,
        )
    grads = [None if g is None else -g for g in final.grads_at(w)]
    return grads, w, info, notes
