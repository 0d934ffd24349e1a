r"""Exact gradient and Hessian of the single-shooting MPC objective from per-step derivatives (private).

The horizon objective of :class:`diffmpc.MPC` is, with the dynamics substituted (single shooting),

.. math::  J(u) = \sum_{t=0}^{H-1} \ell(x_t, u_t) + c_T(x_H),\qquad x_{t+1} = f(x_t, u_t),

where the *step* ``(x, u) ↦ (f(x, u), ℓ(x, u))`` already contains the cost convention (a state-only cost
``c(x)`` charged at the next state is ``ℓ(x, u) = c(f(x, u))``). Its derivatives follow from the step's
derivatives at the ``B·H`` points ``(x_t, u_t)`` of the rollout, each evaluated **once, batched over all
steps and samples** (the samples and steps are independent, so the Jacobian of the *sum* over points is the
stack of the per-point Jacobians — no ``vmap`` requirement on the user's functions beyond ``torch.func``):

* adjoint (costate) recursion ``λ_H = ∇c_T(x_H)``, ``λ_t = ∂ℓ/∂x_t + A_tᵀ λ_{t+1}`` with ``A_t = ∂f/∂x``,
  ``B_t = ∂f/∂u``, gives the gradient ``∂J/∂u_t = ∂ℓ/∂u_t + B_tᵀ λ_{t+1}``;
* forward sensitivities ``S_0 = 0``, ``S_{t+1} = A_t S_t + B_t E_t`` (``S_t = ∂x_t/∂u``, ``E_t`` selects
  ``u_t``) and the Hessians ``L_t = ∇²_{(x,u)} [ℓ + λ_{t+1}ᵀ f](x_t, u_t)`` of the stage Lagrangian give the
  exact Hessian ``∇²J = Σ_t Z_tᵀ L_t Z_t + S_Hᵀ ∇²c_T S_H`` with ``Z_t = [S_t; E_t]`` — one einsum.

This replaces a dense double-backward through the whole rollout (D = H·m Hessian-vector products, each a
reverse sweep over all H steps). :func:`autograd_derivatives` is that reference (used in the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ONE_PASS_MAX_ROWS = 512  # replicated rows up to which one graph for all second derivatives was faster (CPU)
Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x (P, n), u (P, m)) -> (x_next (P, n), ℓ (P,))


def rollout(step: Step, terminal: Callable[[Tensor], Tensor] | None, x0: Tensor,
            u: Tensor) -> tuple[Tensor, Tensor]:
    """States ``(B, H+1, n)`` and the objective ``J (B,)`` of plans ``u (B, H, m)`` from ``x0 (B, n)``."""
    xs, total = [x0], x0.new_zeros(x0.shape[0])
    for t in range(u.shape[1]):
        xn, c = step(xs[-1], u[:, t])
        xs.append(xn)
        total = total + c
    if terminal is not None:
        total = total + terminal(xs[-1])
    return torch.stack(xs, 1), total


class CompiledPointDerivatives:
    """Compiled per-point derivatives of the step (opt-in: ``MPC(compile_derivatives=True)``).

    Two graphs, written with ``torch.func`` so that the derivatives are part of one forward graph (compiled
    graphs cannot be double-backwarded, so the eager path's reverse-over-reverse cannot be compiled):
    ``jacobian(XU) -> (n+1, P, n+m)``, the Jacobian of ``Σ_p step_out(p)`` w.r.t. the points (= the stack of
    per-point Jacobians, the points being independent), and ``lagrangian_hessian(XU, W) -> (n+m, P, n+m)``,
    the per-point Hessians of ``Σ_i W_i step_out_i`` (W = [λ_{t+1}, 1]).

    Shapes: torch 2.13 recompiles these graphs for every new number of points P even with
    ``dynamic=True`` (≈ 80 CPU s each time on the cart-pole step), while the box solve's P shrinks as
    samples finish. The points are therefore padded (with copies of the last point) to one of two sizes:
    the largest P seen so far, or an eighth of it for the last few samples — two compilations per batch size.
    """

    def __init__(self, step: Step, n: int) -> None:
        from torch.func import grad, jacrev

        def step_out(xu: Tensor) -> Tensor:
            xn, c = step(xu[:, :n], xu[:, n:])
            return torch.cat([xn, c.unsqueeze(-1)], -1)

        def jacobian(XU: Tensor) -> Tensor:
            return jacrev(lambda z: step_out(z).sum(0))(XU)

        def lagrangian_hessian(XU: Tensor, W: Tensor) -> Tensor:
            g = grad(lambda z: (step_out(z) * W).sum())
            return jacrev(lambda z: g(z).sum(0))(XU)

        self._jacobian = torch.compile(jacobian, dynamic=False)
        self._lagrangian_hessian = torch.compile(lagrangian_hessian, dynamic=False)
        self.full = 0

    def _padded(self, *ts: Tensor) -> tuple[int, list[Tensor]]:
        P = ts[0].shape[0]
        self.full = max(self.full, P)
        small = -(-self.full // 8)
        target = small if P <= small else self.full
        if target == P:
            return P, list(ts)
        return P, [torch.cat([t, t[-1:].expand(target - P, *t.shape[1:])]) for t in ts]

    def jacobian(self, XU: Tensor) -> Tensor:
        P, (xu,) = self._padded(XU)
        return self._jacobian(xu)[:, :P]

    def lagrangian_hessian(self, XU: Tensor, W: Tensor) -> Tensor:
        P, (xu, w) = self._padded(XU, W)
        return self._lagrangian_hessian(xu, w)[:, :P]


def structured_derivatives(step: Step, terminal: Callable[[Tensor], Tensor] | None, xs: Tensor,
                           u: Tensor, hessian: bool = True,
                           compiled: CompiledPointDerivatives | None = None) -> tuple[Tensor, Tensor | None]:
    """Exact ``∇J (B, H·m)`` and ``∇²J (B, H·m, H·m)`` at the rollout ``xs (B, H+1, n)`` of ``u (B, H, m)``.

    See the module docstring for the recursion; every step derivative is computed in one batched call
    (through ``compiled`` if given: same quantities, compiled graphs; gradient-free callers only).
    """
    B, H, m = u.shape
    n = xs.shape[-1]
    D = H * m
    X = xs[:, :H].reshape(B * H, n)
    U = u.reshape(B * H, m)
    XU = torch.cat([X, U], -1)

    def step_out(xu: Tensor) -> Tensor:  # (P, n + m) -> (P, n + 1): next state and stage cost
        xn, c = step(xu[:, :n], xu[:, n:])
        return torch.cat([xn, c.unsqueeze(-1)], -1)

    # Small problems (op overhead dominates): first and second derivatives of all n + 1 outputs from one
    # replicated graph. Large batches (arithmetic dominates): the Jacobian, then only the λ-weighted
    # Lagrangian Hessian (n + m instead of (n + 1)(n + m) replicas).
    one_pass = compiled is None and hessian and B * H * (n + 1) * (n + m) <= ONE_PASS_MAX_ROWS
    if compiled is not None:
        jac, second = compiled.jacobian(XU), None
    else:
        with torch.enable_grad():
            if one_pass:
                jac, second = _point_second_derivatives(step_out, XU, n + 1)
            else:
                jac, second = _point_jacobian(step_out, XU, n + 1), None
    jac = jac.reshape(n + 1, B, H, n + m).permute(1, 2, 0, 3)  # (B, H, n + 1, n + m)
    A, Bu = jac[:, :, :n, :n], jac[:, :, :n, n:]
    lx, lu = jac[:, :, n, :n], jac[:, :, n, n:]
    lam_H = torch.zeros(B, n, dtype=u.dtype, device=u.device)
    phi = None
    if terminal is not None:
        with torch.enable_grad():
            if hessian:
                phi, lam_H = _point_hessian(terminal, xs[:, H], with_grad=True)
            else:
                lam_H = _point_jacobian(lambda x: terminal(x).unsqueeze(-1), xs[:, H], 1)[0]
    lams = [lam_H]  # λ_{t+1} for t = H-1 .. 0
    for t in range(H - 1, 0, -1):
        lams.append(lx[:, t] + (A[:, t].transpose(1, 2) @ lams[-1].unsqueeze(-1)).squeeze(-1))
    lam_next = torch.stack(lams[::-1], 1)  # (B, H, n): λ_{t+1}
    grad = (lu + (Bu.transpose(2, 3) @ lam_next.unsqueeze(-1)).squeeze(-1)).reshape(B, D)
    if not hessian:
        return grad, None

    # Hessian of the stage Lagrangian ℓ + λ_{t+1}ᵀ f at every point: (B, H, n + m, n + m)
    if one_pass:
        second = second.reshape(n + 1, B, H, n + m, n + m)
        L = second[n] + torch.einsum("bti,ibtjk->btjk", lam_next, second[:n])
    elif compiled is not None:
        W = torch.cat([lam_next.reshape(B * H, n), XU.new_ones(B * H, 1)], -1)
        L = compiled.lagrangian_hessian(XU, W).transpose(0, 1).reshape(B, H, n + m, n + m)
        L = 0.5 * (L + L.transpose(2, 3))
    else:
        lam_rep = lam_next.reshape(B * H, n).repeat(n + m, 1)

        def lagrangian(xu: Tensor) -> Tensor:  # per point ℓ + λ_{t+1}ᵀ f (on the replicated points)
            xn, c = step(xu[:, :n], xu[:, n:])
            return c + (lam_rep * xn).sum(-1)

        with torch.enable_grad():
            L, _ = _point_hessian(lagrangian, XU)
        L = L.reshape(B, H, n + m, n + m)

    # Z_t = [S_t; E_t]: (B, H, n + m, D)
    eye = torch.eye(D, dtype=u.dtype, device=u.device).reshape(H, m, D)
    S = [torch.zeros(B, n, D, dtype=u.dtype, device=u.device)]
    for t in range(H):
        S.append(A[:, t] @ S[-1] + Bu[:, t] @ eye[t])
    S_all = torch.stack(S[:H], 1)
    Z = torch.cat([S_all, eye.unsqueeze(0).expand(B, H, m, D)], 2)
    hess = torch.einsum("btid,btij,btje->bde", Z, L, Z)
    if phi is not None:
        hess = hess + S[H].transpose(1, 2) @ phi @ S[H]
    return grad, 0.5 * (hess + hess.transpose(1, 2))


def _point_jacobian(fn: Callable[[Tensor], Tensor], pts: Tensor, n_out: int) -> Tensor:
    """Per-point Jacobians ``(n_out, P, k)`` of a point-wise ``fn: (P, k) -> (P, n_out)``: the points are
    replicated ``n_out`` times and one reverse sweep with a one-hot cotangent per copy gives all rows —
    plain autograd on one batched graph (no per-op vmap overhead)."""
    P, k = pts.shape
    rep = pts.detach().repeat(n_out, 1).requires_grad_()
    out = fn(rep)
    cot = torch.eye(n_out, dtype=pts.dtype, device=pts.device).repeat_interleave(P, 0)
    (jac,) = torch.autograd.grad(out, rep, cot)
    return jac.reshape(n_out, P, k)


def _point_second_derivatives(fn: Callable[[Tensor], Tensor], pts: Tensor,
                              n_out: int) -> tuple[Tensor, Tensor]:
    """Per-point Jacobians ``(n_out, P, k)`` and Hessians ``(n_out, P, k, k)`` of every output of a
    point-wise ``fn: (P, k) -> (P, n_out)``, reverse over reverse on ``n_out·k`` replicas of the points
    (replica (i, j) selects output i and direction j): one forward, one backward, one double backward."""
    P, k = pts.shape
    r = n_out * k
    rep = pts.detach().repeat(r, 1).requires_grad_()
    eye_out = torch.eye(n_out, dtype=pts.dtype, device=pts.device)
    select = eye_out.repeat_interleave(k * P, 0)  # replica block (i, j) -> output i
    (g,) = torch.autograd.grad((fn(rep) * select).sum(), rep, create_graph=True)
    dirs = torch.eye(k, dtype=pts.dtype, device=pts.device).repeat_interleave(P, 0).repeat(n_out, 1)
    (h,) = torch.autograd.grad(g, rep, dirs)
    jac = g.detach().reshape(n_out, k, P, k)[:, 0]
    hess = h.reshape(n_out, k, P, k).transpose(1, 2)  # (n_out, P, direction j, k)
    return jac, 0.5 * (hess + hess.transpose(2, 3))


def _point_hessian(fn: Callable[[Tensor], Tensor], pts: Tensor,
                   with_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-point Hessians ``(P, k, k)`` (and gradients ``(P, k)``) of a point-wise scalar ``fn: (P', k) ->
    (P',)`` evaluated on ``k`` replicas of the points (``fn`` must accept the replicated batch ``k·P``):
    reverse over reverse with one-hot directions, one batched graph."""
    P, k = pts.shape
    rep = pts.detach().repeat(k, 1).requires_grad_()
    (g,) = torch.autograd.grad(fn(rep).sum(), rep, create_graph=True)
    dirs = torch.eye(k, dtype=pts.dtype, device=pts.device).repeat_interleave(P, 0)
    (h,) = torch.autograd.grad(g, rep, dirs)
    hess = h.reshape(k, P, k).transpose(0, 1)
    return 0.5 * (hess + hess.transpose(1, 2)), (g[:P].detach() if with_grad else None)


def autograd_derivatives(objective: Callable[[Tensor], Tensor], u: Tensor) -> tuple[Tensor, Tensor]:
    """Reference ``∇J (B, D)`` and ``∇²J (B, D, D)`` by autograd double backward through the whole rollout."""
    B = u.shape[0]
    D = u[0].numel()
    with torch.enable_grad():
        ur = u.detach().requires_grad_()
        (g,) = torch.autograd.grad(objective(ur).sum(), ur, create_graph=True)
        basis = torch.eye(D, dtype=u.dtype, device=u.device).reshape(D, 1, *u.shape[1:]).expand(D, *u.shape)
        try:
            hv = torch.autograd.grad(g, ur, basis, is_grads_batched=True)[0]
        except RuntimeError:  # ops without batching rules: one HVP at a time
            hv = torch.stack([torch.autograd.grad(g, ur, e, retain_graph=True)[0] for e in basis])
    hess = hv.reshape(D, B, D).transpose(0, 1)
    return g.detach().reshape(B, D), 0.5 * (hess + hess.transpose(1, 2)).detach()
