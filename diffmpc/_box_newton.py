r"""Batched box-constrained (projected) Newton method for small bounded problems (private; used by MPC).

Problem: ``min_u J(u)`` s.t. ``lo ≤ u ≤ hi`` per sample, ``u ∈ ℝ^D`` (MPC: D = H·m), with the exact
gradient ``g`` and Hessian ``∇²J`` supplied by a callback. Iteration (Bertsekas' projected Newton in the
box-QP form of Tassa et al.'s control-limited DDP):

1. **Model.** ``∇²J = V Λ Vᵀ``; the model Hessian is ``V max(|Λ|, δ) Vᵀ`` — Newton's matrix where J is
   convex, the absolute-value ("saddle-free") modification at negative curvature, so the model is always
   convex. ``δ = max(μ, 10³·ε_mach·max|λ|)``: the second term only guards the factorisation, the floor
   that matters is the Levenberg–Marquardt / trust-region parameter ``μ``, which starts at 0 (pure Newton)
   and grows only when no step length decreases J, from ``μ₀ = 10⁻⁴·mean|diag ∇²J|``.
2. **Box QP.** ``d = argmin gᵀd + ½ dᵀ H_mod d`` s.t. ``lo − u ≤ d ≤ hi − u``, solved exactly by a
   primal active-set method (:func:`box_qp`): the free controls take the Newton step with the free block
   of H_mod, the ones in the working set stay on their bound.
3. **Step lengths.** ``P(u + α d)`` for ten α ∈ {4, 2, 1, …, 10⁻³} in *one batched evaluation*; among
   those that satisfy Armijo's condition (along the projected path) the lowest J is taken per sample.

Stopping test (per sample, in the units of u): the KKT residual ``‖u − P(u − ∇J)‖∞ ≤ tol`` (the projected
gradient; ∇J on free controls, the wrong-signed part on clamped ones) **and** the Newton step of the box QP
``‖d‖∞ ≤ step_tol`` (u is within ~step_tol of the model's optimum, also along flat directions). The test is
made at the returned point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Step lengths tried at once along the projected path P(u + α d); α > 1 extrapolates (the box cuts it).
ALPHAS = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01, 3e-3, 1e-3, 2.0, 4.0)


def kkt_residual(u: Tensor, g: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``‖u − P_[lo,hi](u − g)‖∞`` per sample (``u, g: (B, D)``)."""
    return (u - torch.minimum(torch.maximum(u - g, lo), hi)).abs().amax(1)


def box_qp(hess: Tensor, g: Tensor, lo: Tensor, hi: Tensor, fixed: Tensor | None = None,
           max_iter: int = 50) -> tuple[Tensor, Tensor]:
    """Batched ``argmin_d gᵀd + ½ dᵀ hess d`` s.t. ``lo ≤ d ≤ hi`` (``lo ≤ hi``; ``hess`` SPD on the
    non-``fixed`` block; ``fixed`` coordinates stay at ``lo = hi``).

    Primal active-set method (Nocedal & Wright, Alg. 16.3, specialised to bounds): a working set W of
    coordinates held on a bound; each iteration takes the Newton step of the model on the free block,
    shortened by the ratio test to the first bound it hits (that coordinate joins W); at the minimiser of
    the current free subspace the W coordinate with the most wrong-signed gradient (pushing into the box)
    leaves W; with none left the point is the QP's solution. Every step decreases the model, so the method
    ends after finitely many iterations (≈ one per change of the active set) — unlike projected Newton,
    whose projected Newton step is an ascent direction on the ill-conditioned (cond ≈ 1e8) shooting
    Hessians of an unstable system and crawls into its cap. Returns ``(d (B, D), W (B, D) bool)``.
    """
    B, D = g.shape
    fixed = torch.zeros_like(g, dtype=torch.bool) if fixed is None else fixed
    d = torch.minimum(torch.maximum(torch.zeros_like(g), lo), hi)
    tol = torch.finfo(g.dtype).eps ** 0.75 * (1 + g.abs().amax(1))
    grad = g + (hess @ d.unsqueeze(-1)).squeeze(-1)
    work = fixed | ((d <= lo) & (grad > 0)) | ((d >= hi) & (grad < 0))
    todo = torch.ones(B, dtype=torch.bool, device=g.device)
    at_min = torch.zeros(B, dtype=torch.bool, device=g.device)
    inf = torch.full_like(g, float("inf"))
    rows = torch.arange(B, device=g.device)
    for _ in range(max_iter):
        grad = g + (hess @ d.unsqueeze(-1)).squeeze(-1)
        pg = (d - torch.minimum(torch.maximum(d - grad, lo), hi)).masked_fill(fixed, 0).abs().amax(1)
        # at the free-subspace minimiser: release the most wrong-signed bound (gradient pointing inwards)
        wrong = work & ~fixed & (((d <= lo) & (grad < 0)) | ((d >= hi) & (grad > 0)))
        wrong_size = torch.where(wrong, grad.abs(), torch.zeros_like(grad))
        release = at_min & wrong.any(1)
        todo = todo & (pg > tol) & ~(at_min & ~release)
        if not bool(todo.any()):
            break
        out = torch.zeros_like(work).scatter_(1, wrong_size.argmax(1, keepdim=True), True)
        work = torch.where((release & todo).unsqueeze(1), work & ~out, work)
        free = (~work).to(g.dtype)
        M = hess * free.unsqueeze(1) * free.unsqueeze(2) + torch.diag_embed(1 - free)
        rhs = -(g + (hess @ (d * (1 - free)).unsqueeze(-1)).squeeze(-1)) * free
        L, bad = torch.linalg.cholesky_ex(M)
        sol = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
        if bool(bad.any()):  # not SPD numerically (should not happen with the modified Hessian)
            sol = torch.where((bad > 0).unsqueeze(-1), torch.linalg.lstsq(M, rhs.unsqueeze(-1)).solution
                              .squeeze(-1), sol)
        p = torch.where(work, torch.zeros_like(d), sol - d)
        # ratio test: the longest step ≤ 1 that stays in the box; the blocking coordinate joins W
        t = torch.where(p < 0, (lo - d) / p, torch.where(p > 0, (hi - d) / p, inf)).clamp_min(0)
        t = torch.where(work, inf, t)
        t_min, block = t.min(1)
        alpha = t_min.clamp(max=1.0)
        new = torch.minimum(torch.maximum(d + alpha.unsqueeze(1) * p, lo), hi)
        blocked = t_min < 1
        hit = blocked.unsqueeze(1) & (torch.arange(D, device=g.device) == block.unsqueeze(1))
        new = torch.where(hit, torch.where(p[rows, block].unsqueeze(1) < 0, lo, hi), new)
        go = todo.unsqueeze(1)
        d = torch.where(go, new, d)
        work = torch.where(go, work | hit, work)
        at_min = torch.where(todo, ~blocked, at_min)
    return d, work


@dataclass
class BoxNewtonResult:
    u: Tensor  # (B, D)
    grad: Tensor  # (B, D), ∇J at u
    cost: Tensor  # (B,)
    kkt: Tensor  # (B,) KKT residual at u
    step: Tensor  # (B,) ‖d‖∞ of the last box-QP Newton step at u
    converged: Tensor  # (B,) bool
    iterations: Tensor  # (B,) long
    initial_cost: Tensor  # (B,) J at the clamped starting point


@dataclass(frozen=True)
class BoxNewton:
    """Settings of the batched projected Newton method (see module docstring)."""

    tol: float = 1e-8
    step_tol: float = 1e-8
    max_iter: int = 100
    armijo: float = 1e-4
    active_eps: float = 0.0

    def minimize(self, derivatives: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
                 evaluate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], u0: Tensor, lo: Tensor,
                 hi: Tensor, callback: Callable[..., None] | None = None) -> BoxNewtonResult:
        """Minimise from ``u0 (B, D)`` within ``lo ≤ u ≤ hi`` (``(D,)`` or ``(B, D)``, ±inf allowed).

        ``evaluate(u (P, D), rows (P,)) -> (J (P,), state (P, ...))`` evaluates plans of the samples
        ``rows``; ``derivatives(u (b, D), state (b, ...), rows (b,)) -> (∇J (b, D), ∇²J (b, D, D))``. The
        ``state`` (e.g. the rollout) of the accepted plans is handed to ``derivatives`` so that nothing is
        recomputed. Only the samples still iterating are evaluated (finished ones drop out of the batch).
        ``callback(iteration, u=..., cost=..., kkt=..., step=..., active=..., mu=...)`` (full-batch
        tensors) is called after each derivative evaluation (diagnostics, time-to-objective benchmarks).
        """
        B, D = u0.shape
        dt = u0.dtype
        dev = u0.device
        lo, hi = lo.expand(B, D), hi.expand(B, D)
        u = torch.minimum(torch.maximum(u0, lo), hi)
        J, state = evaluate(u, torch.arange(B, device=dev))
        J_start = J.clone()
        alphas = torch.tensor(ALPHAS, dtype=dt, device=dev)
        K = len(ALPHAS)
        mu = torch.zeros(B, dtype=dt, device=dev)
        active = torch.ones(B, dtype=torch.bool, device=dev)
        iters = torch.zeros(B, dtype=torch.long, device=dev)
        kkt = torch.full((B,), float("inf"), dtype=dt, device=dev)
        step = kkt.clone()
        g = torch.zeros_like(u)
        eps = torch.finfo(dt).eps
        for it in range(self.max_iter + 1):
            rows = torch.nonzero(active).flatten()
            if rows.numel() == 0:
                break
            ua, la, ha_, mua = u[rows], lo[rows], hi[rows], mu[rows]
            ga, hess = derivatives(ua, state[rows], rows)
            g[rows] = ga
            kkt_a = kkt_residual(ua, ga, la, ha_)
            # Clamped set: on a bound (within ε = min(active_eps, KKT); default: exactly on it) with the
            # gradient pushing outward. These controls are fixed on the bound; only the free block's curvature
            # is modified (an indefinite Hessian on the clamped block does not matter at a constrained
            # minimum). A positive ε (Bertsekas' ε-active set) snaps near-bound controls early, which stalls
            # when such a control is in fact free at the optimum; the box QP clamps controls exactly instead.
            eps_k = torch.minimum(kkt_a, torch.full_like(kkt_a, self.active_eps)).unsqueeze(1)
            at_lo, at_hi = (ua - la <= eps_k) & (ga > 0), (ha_ - ua <= eps_k) & (ga < 0)
            fixed = at_lo | at_hi
            free = (~fixed).to(dt)
            ff = free.unsqueeze(1) * free.unsqueeze(2)
            scale = hess.diagonal(dim1=1, dim2=2).abs().mean(1).clamp_min(eps)
            block = hess * ff + torch.diag_embed((1 - free) * scale.unsqueeze(1))
            lam, V = torch.linalg.eigh(block)
            amax = lam.abs().amax(1)
            floor = torch.maximum(mua, 1e3 * eps * amax).clamp_min(torch.finfo(dt).tiny)
            lam_mod = torch.maximum(lam.abs(), floor.unsqueeze(1))
            hmod = (V * lam_mod.unsqueeze(1)) @ V.transpose(1, 2)
            hmod = 0.5 * (hmod + hmod.transpose(1, 2)) * ff + hess * (1 - ff)
            target = torch.where(at_lo, la - ua, ha_ - ua)
            d, _ = box_qp(hmod, ga, torch.where(fixed, target, la - ua), torch.where(fixed, target, ha_ - ua),
                          fixed=fixed)
            step_a = d.abs().amax(1)
            kkt[rows], step[rows] = kkt_a, step_a
            go = ~((kkt_a <= self.tol) & (step_a <= self.step_tol))
            active[rows] = go
            if callback is not None:
                callback(it, u=u, cost=J, kkt=kkt, step=step, active=active, mu=mu)
            if it == self.max_iter or not bool(go.any()):
                break
            # several step lengths in one batched evaluation (only the samples still iterating)
            rows, ua, ga, d, J0 = rows[go], ua[go], ga[go], d[go], J[rows][go]
            la, ha_, mua, scale = la[go], ha_[go], mua[go], scale[go]
            b = rows.numel()
            cand = ua.unsqueeze(1) + alphas.view(1, K, 1) * d.unsqueeze(1)  # (b, K, D)
            cand = torch.minimum(torch.maximum(cand, la.unsqueeze(1)), ha_.unsqueeze(1))
            # u + (b − u) may miss the bound b by an ulp: put controls that the box QP clamped exactly on it
            # (before evaluating, so that J and the rollout handed on belong to exactly the stored plan)
            tiny = 8 * eps
            lo3, hi3 = la.unsqueeze(1).expand_as(cand), ha_.unsqueeze(1).expand_as(cand)
            near_lo = torch.isfinite(lo3) & ((cand - lo3).abs() <= tiny * lo3.abs().clamp_min(1.0))
            near_hi = torch.isfinite(hi3) & ((hi3 - cand).abs() <= tiny * hi3.abs().clamp_min(1.0))
            cand = torch.where(near_lo, lo3, torch.where(near_hi, hi3, cand))
            Jc, states = evaluate(cand.reshape(b * K, D), rows.repeat_interleave(K))
            Jc = Jc.reshape(b, K)
            slope = (ga.unsqueeze(1) * (cand - ua.unsqueeze(1))).sum(-1)  # (b, K), along the projected path
            slack = 16 * eps * J0.abs().clamp_min(1.0)
            bound = (J0 + slack).unsqueeze(1) + self.armijo * slope
            ok = torch.isfinite(Jc) & (Jc <= bound)
            take = ok.any(1)
            # the lowest J among the step lengths that pass Armijo's test (not just the longest one)
            first = torch.where(ok, Jc, torch.full_like(Jc, float("inf"))).argmin(1)
            idx = torch.arange(b, device=dev)
            pick = idx * K + first
            u[rows] = torch.where(take.unsqueeze(1), cand[idx, first], ua)
            J[rows] = torch.where(take, Jc[idx, first], J0)
            keep = take.view(-1, *([1] * (state.ndim - 1)))
            state[rows] = torch.where(keep, states[pick], state[rows])
            full = take & (alphas[first] >= 1)
            mu0 = 1e-4 * scale
            mua = torch.where(full, mua / 10, mua)
            mua = torch.where(full & (mua < 1e-3 * mu0), torch.zeros_like(mua), mua)
            mu[rows] = torch.where(~take, torch.maximum(10 * mua, mu0), mua)
            iters[rows] += 1
        return BoxNewtonResult(u=u, grad=g, cost=J, kkt=kkt, step=step,
                               converged=(kkt <= self.tol) & (step <= self.step_tol), iterations=iters,
                               initial_cost=J_start)


