r"""Batched Krylov kernels and the one driver that turns them into honest solves.

Every kernel solves ``A d = r`` from ``d = 0`` for a batch of independent systems (vectors ``(B, *S)``,
``matvec`` block diagonal), stopping each sample once its *recursive* residual estimate meets the absolute
per-sample threshold, and returns ``(d, iterations, negative_curvature)``.

The driver :func:`solve` measures the *true* residual ``‖b − A x‖`` (or, for CGNR's ``stop="normal"``,
``‖Aᵀ(b − A x)‖``) after the kernel and marks a sample ``converged`` exactly when that residual is
``≤ threshold`` — the documented test, without slack. Recursive residuals drift from the true one in
floating point; when the true residual misses the threshold although the recursion met it, the driver
restarts the kernel on the correction system ``A d = b − A x`` (iterative refinement; for GMRES this *is*
its restart), while iterations remain. In the usual case (the first pass converges) this costs exactly
the one product that measures the true residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import col, default_max_iter, dot, norm

MatVec = Callable[[Tensor], Tensor]

METHODS = ("cg", "minres", "normal_cg", "gmres", "dense")
STOP_RULES = ("residual", "normal")


@dataclass(frozen=True)
class SolveInfo:
    """Per-sample report of a batched linear solve ``A x = b`` (all fields ``(B,)`` except ``method``).

    Attributes:
        residual: the residual norm the stopping rule tests, recomputed at the returned x (not a
            recursive estimate): ``‖b − A x‖``, or ``‖Aᵀ(b − A x)‖`` for ``normal_cg(stop="normal")``.
        iterations: Krylov iterations each sample took (restarts and refinement passes included; the
            matrix size D for ``dense``).
        converged: exactly ``residual ≤ threshold``.
        negative_curvature: samples where CG met ``pᵀAp ≤ 0`` (operator not positive definite).
        method: name of the solver that produced x (``"cg+minres"`` after a fallback).
        threshold: the per-sample acceptance threshold ``max(rtol·‖b‖, atol)`` (``‖Aᵀb‖`` for
            ``stop="normal"``).
    """

    residual: Tensor
    iterations: Tensor
    converged: Tensor
    negative_curvature: Tensor
    method: str
    threshold: Tensor

    def merge(self, other: SolveInfo, mask: Tensor) -> SolveInfo:
        """Take ``other``'s entries where ``mask`` is true (used when a fallback re-solves some samples)."""
        return SolveInfo(
            residual=torch.where(mask, other.residual, self.residual),
            iterations=self.iterations + torch.where(mask, other.iterations, 0),
            converged=torch.where(mask, other.converged, self.converged),
            negative_curvature=self.negative_curvature,
            method=f"{self.method}+{other.method}",
            threshold=torch.where(mask, other.threshold, self.threshold),
        )


def _zeros_long(b: Tensor) -> Tensor:
    return torch.zeros(b.shape[0], dtype=torch.long, device=b.device)


# ------------------------------------------------------------------------------------------- kernels
def cg_kernel(matvec: MatVec, b: Tensor, thresh: Tensor, active: Tensor, max_iter: int, check_every: int = 4):
    """Conjugate gradient (Hestenes & Stiefel 1952; the paper's Alg. 1) for symmetric positive-definite A.

    A sample meeting ``pᵀAp ≤ 0`` stops at its current iterate and is flagged. The host is synchronised
    every ``check_every`` iterations to test whether all samples are done.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = dot(r, r)
    active = active & (rs.sqrt() > thresh)
    negcurv = torch.zeros_like(active)
    iters = _zeros_long(b)
    for k in range(max_iter):
        Ap = matvec(p)
        pAp = dot(p, Ap)
        neg = active & (pAp <= 0)
        negcurv = negcurv | neg
        active = active & ~neg
        alpha = torch.where(active, rs / torch.where(pAp == 0, torch.ones_like(pAp), pAp), 0.0)
        x = x + col(alpha, x) * p
        r = r - col(alpha, r) * Ap
        rs_new = dot(r, r)
        iters = iters + active.long()
        beta = torch.where(active, rs_new / torch.where(rs == 0, torch.ones_like(rs), rs), 0.0)
        p = r + col(beta, p) * p
        rs = torch.where(active, rs_new, rs)
        active = active & (rs_new.sqrt() > thresh)
        if (k + 1) % check_every == 0 and not bool(active.any()):
            break
    return x, iters, negcurv


def minres_kernel(
    matvec: MatVec, b: Tensor, thresh: Tensor, active: Tensor, max_iter: int, check_every: int = 4
):
    """MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite A: minimises ‖b − A x‖ over the
    Krylov space, so it is safe where CG breaks down on negative curvature."""
    tiny = torch.finfo(b.dtype).tiny
    zeros = b.new_zeros(b.shape[0])
    x = torch.zeros_like(b)
    r1, r2, y = b.clone(), b.clone(), b.clone()
    beta1 = norm(b)
    active = active & (beta1 > thresh)
    beta, oldb = beta1.clone(), zeros.clone()
    dbar, epsln, phibar = zeros.clone(), zeros.clone(), beta1.clone()
    cs, sn = -torch.ones_like(beta1), zeros.clone()
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    iters = _zeros_long(b)
    for k in range(max_iter):
        safe_beta = torch.where(beta > tiny, beta, torch.ones_like(beta))
        v = y / col(safe_beta, y) * col(active.to(y.dtype), y)
        y = matvec(v)
        if k > 0:
            safe_oldb = torch.where(oldb > tiny, oldb, torch.ones_like(oldb))
            y = y - col(beta / safe_oldb, y) * r1
        alfa = dot(v, y)
        y = y - col(alfa / safe_beta, y) * r2
        r1, r2 = r2, y
        oldb = beta
        beta = norm(y)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar**2 + beta**2).clamp_min(tiny)
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - col(oldeps, v) * w1 - col(delta, v) * w2) / col(gamma, v)
        x = x + col(torch.where(active, phi, 0.0), x) * w
        iters = iters + active.long()
        # phibar is MINRES's running estimate of ‖b − A x‖; beta → 0 means the Krylov space is exhausted.
        active = active & (phibar.abs() > thresh) & (beta > tiny)
        if (k + 1) % check_every == 0 and not bool(active.any()):
            break
    return x, iters, torch.zeros_like(active)


def cgnr_kernel(
    matvec: MatVec,
    rmatvec: MatVec,
    b: Tensor,
    thresh: Tensor,
    active: Tensor,
    max_iter: int,
    stop: str = "residual",
):
    r"""CG on the normal equations ``AᵀA x = Aᵀb`` (CGNR; Saad 2003, Alg. 8.4), the paper's choice for
    non-symmetric systems. One ``A`` and one ``Aᵀ`` product per iteration.

    ``stop="residual"``: a sample stops once the residual of the *original* system ``‖b − A x‖`` meets
    ``thresh`` — tracked for free by the recurrence ``r ← r − αAp`` (the last ``Aᵀr`` is then skipped).
    ``stop="normal"``: it stops on the normal-equation residual ``‖Aᵀ(b − A x)‖`` instead — the test for
    least-squares problems, where ``b − A x`` cannot vanish. Tested every iteration: the two products
    dominate the cost of the host synchronisation.
    """
    if stop not in STOP_RULES:
        raise ValueError(f"unknown stop rule {stop!r}; choose one of {STOP_RULES}")
    x = torch.zeros_like(b)
    r = b.clone()
    iters = _zeros_long(b)
    negcurv = torch.zeros_like(active)
    if stop == "residual":
        active = active & (norm(r) > thresh)
        if not bool(active.any()):
            return x, iters, negcurv
        z = rmatvec(r)
    else:
        z = rmatvec(r)
        active = active & (norm(z) > thresh)
    p, zz = z, dot(z, z)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Ap = matvec(p)
        ApAp = dot(Ap, Ap)
        ok = active & (ApAp > 0)
        alpha = torch.where(ok, zz / torch.where(ApAp > 0, ApAp, torch.ones_like(ApAp)), 0.0)
        x = x + col(alpha, x) * p
        r = r - col(alpha, r) * Ap
        iters = iters + ok.long()
        if stop == "residual":
            active = ok & (norm(r) > thresh)
            if not bool(active.any()):
                break
            z = rmatvec(r)
        else:
            z = rmatvec(r)
            active = ok & (norm(z) > thresh)
        zz_new = dot(z, z)
        beta = torch.where(active, zz_new / torch.where(zz > 0, zz, torch.ones_like(zz)), 0.0)
        p = z + col(beta, p) * p
        zz = torch.where(active, zz_new, zz)
    return x, iters, negcurv


def gmres_kernel(matvec: MatVec, b: Tensor, thresh: Tensor, active: Tensor, max_iter: int):
    """One cycle of GMRES(m) (Saad & Schultz 1986), ``m = max_iter``; the driver restarts it.

    The small ``(k+1)×k`` Hessenberg least-squares problem is solved per sample by ``torch.linalg.lstsq``.
    """
    B = b.shape[0]
    beta = norm(b)
    active = active & (beta > thresh)
    iters = _zeros_long(b)
    x = torch.zeros_like(b)
    if not bool(active.any()) or max_iter < 1:
        return x, iters, torch.zeros_like(active)
    m = max_iter
    V = [b / col(torch.where(beta > 0, beta, torch.ones_like(beta)), b)]
    H = b.new_zeros(B, m + 1, m)
    e1 = b.new_zeros(B, m + 1)
    e1[:, 0] = beta
    coef = None
    for j in range(m):
        w = matvec(V[j])
        for i in range(j + 1):  # modified Gram-Schmidt
            H[:, i, j] = dot(w, V[i])
            w = w - col(H[:, i, j], w) * V[i]
        hn = norm(w)
        H[:, j + 1, j] = hn
        V.append(w / col(torch.where(hn > 0, hn, torch.ones_like(hn)), w))
        Hk = H[:, : j + 2, : j + 1]
        coef = torch.linalg.lstsq(Hk, e1[:, : j + 2, None]).solution[..., 0]
        res = torch.linalg.vector_norm(e1[:, : j + 2] - (Hk @ coef[..., None])[..., 0], dim=1)
        iters = iters + active.long()
        active = active & (res > thresh)
        if not bool(active.any()):
            break
    coef = torch.where(col(iters > 0, coef), coef, 0.0)
    Vs = torch.stack(V[: coef.shape[1]], dim=1)  # (B, k, *S)
    x = (coef.view(B, -1, *([1] * (b.ndim - 1))) * Vs).sum(1)
    return x, iters, torch.zeros_like(active)


def dense_matrix(matvec: MatVec, like: Tensor) -> Tensor:
    """Materialise the per-sample matrices ``(B, D, D)`` of a block-diagonal operator with D matvecs."""
    B, D = like.shape[0], like[0].numel()
    cols = []
    for i in range(D):
        e = like.new_zeros(B, D)
        e[:, i] = 1
        cols.append(matvec(e.view_as(like)).reshape(B, D))
    return torch.stack(cols, dim=2)


class DenseKernel:
    """Build each sample's matrix once (D products), LU-factorise it, and reuse the factors for every
    refinement pass (classic iterative refinement)."""

    def __init__(self, matvec: MatVec):
        self.matvec = matvec
        self.lu: tuple[Tensor, Tensor] | None = None

    def __call__(self, b: Tensor, thresh: Tensor, active: Tensor, max_iter: int):
        B, D = b.shape[0], b[0].numel()
        iters = _zeros_long(b)
        if self.lu is None:
            self.lu = torch.linalg.lu_factor(dense_matrix(self.matvec, b))
            iters = iters + D
        x = torch.linalg.lu_solve(*self.lu, b.reshape(B, D, 1))[..., 0].view_as(b)
        x = torch.where(col(active, x), x, 0.0)
        return x, iters, torch.zeros_like(active)


# -------------------------------------------------------------------------------------------- driver
def solve(
    method: str,
    matvec: MatVec,
    b: Tensor,
    *,
    rmatvec: MatVec | None = None,
    x0: Tensor | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    stop: str = "residual",
    restart: int = 40,
    check_every: int = 4,
    residual: Callable[[Tensor], Tensor] | None = None,
    refinements: int = 3,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``A x = b`` per sample with the named kernel and report the true residual (module docstring).

    ``residual(x)`` may replace ``b − matvec(x)`` when the caller gets it cheaper (the IFT front end gets
    it from the same VJP that yields the parameter gradients). ``refinements`` caps the extra passes of
    CG, MINRES, CGNR and dense; GMRES restarts until ``max_iter``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown linear solver {method!r}; choose one of {METHODS}")
    if method == "normal_cg" and rmatvec is None:
        raise ValueError("normal_cg needs rmatvec (the transposed operator v ↦ Aᵀv)")
    if stop != "residual" and method != "normal_cg":
        raise ValueError(f"stop={stop!r} is only defined for normal_cg")
    max_iter = default_max_iter(b, max_iter)
    if residual is None:
        residual = lambda x: b - matvec(x)
    if stop == "normal":
        measure = lambda r: norm(rmatvec(r))
        thresh = torch.clamp_min(rtol * norm(rmatvec(b)), atol)
    else:
        measure = norm
        thresh = torch.clamp_min(rtol * norm(b), atol)

    if method == "cg":
        kernel = lambda r, act, n: cg_kernel(matvec, r, thresh, act, n, check_every)
    elif method == "minres":
        kernel = lambda r, act, n: minres_kernel(matvec, r, thresh, act, n, check_every)
    elif method == "normal_cg":
        kernel = lambda r, act, n: cgnr_kernel(matvec, rmatvec, r, thresh, act, n, stop)
    elif method == "gmres":
        kernel = lambda r, act, n: gmres_kernel(matvec, r, thresh, act, min(n, restart))
        refinements = max_iter  # every pass is one restart cycle; the budget bounds them
    else:
        kernel = DenseKernel(matvec)
        kernel = (lambda k: lambda r, act, n: k(r, thresh, act, n))(kernel)

    if x0 is None:
        x, r = torch.zeros_like(b), b
    else:
        x = x0.detach().clone()
        r = residual(x)
    res = measure(r)
    iters = _zeros_long(b)
    negcurv = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    for _ in range(1 + refinements):
        todo = (res > thresh) & ~negcurv & (iters < max_iter)
        if not bool(todo.any()):
            break
        budget = int((max_iter - iters)[todo].max())
        d, it, nc = kernel(r, todo, budget)
        x = x + d
        iters = iters + it
        negcurv = negcurv | nc
        r = residual(x)
        res_new = measure(r)
        progressed = bool((res_new[todo] < res[todo]).any())
        res = res_new
        if not progressed:
            break
    converged = res <= thresh
    return x, SolveInfo(res, iters, converged, negcurv, method, thresh)
