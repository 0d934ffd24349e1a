"""Matrix-free, batched Krylov solvers for the implicit-function-theorem backward.

Every solver here works on a *batch of independent systems*: vectors have shape ``(B, *S)`` (B problems,
each an arbitrary-shaped unknown), ``matvec`` maps such a batch to a batch of the same shape and must act
block-diagonally (sample b of the output depends only on sample b of the input). Dot products, step sizes
and stopping are therefore per sample: a well-conditioned sample stops as soon as it has converged and never
waits for, nor is polluted by, a hard one.

Solvers (all return ``(x, SolveInfo)``):

* :func:`cg` - conjugate gradient for symmetric positive-definite operators (the paper's Alg. 1); detects
  negative curvature ``pᵀAp ≤ 0`` per sample and reports it instead of diverging silently.
* :func:`minres` - MINRES (Paige & Saunders 1975) for symmetric *indefinite* operators.
* :func:`normal_cg` - CG on the normal equations ``AᵀA x = Aᵀb`` (CGNR) for non-symmetric operators: the
  paper's choice for Newton steps and roots. Needs ``matvec`` and ``rmatvec`` (two products per iteration).
* :func:`gmres` - restarted GMRES for non-symmetric operators with only ``matvec``.
* :func:`dense` - materialise the per-sample matrix (D matvecs) and solve it directly: the reference.

``solve(method, ...)`` dispatches by name; :data:`METHODS` lists the names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]

__all__ = ["SolveInfo", "cg", "minres", "normal_cg", "gmres", "dense", "dense_matrix", "solve", "METHODS"]


@dataclass
class SolveInfo:
    """Per-sample report of a batched linear solve.

    Attributes:
        residual: ``(B,)`` true residual norm ‖b − A x‖ at the returned x.
        iterations: ``(B,)`` iterations each sample took.
        converged: ``(B,)`` whether ``residual ≤ max(rtol·‖b‖, atol)``.
        negative_curvature: ``(B,)`` samples where CG met ``pᵀAp ≤ 0`` (operator not positive definite).
        method: name of the solver that produced x.
    """

    residual: Tensor
    iterations: Tensor
    converged: Tensor
    negative_curvature: Tensor
    method: str

    def merge(self, other: SolveInfo, mask: Tensor) -> SolveInfo:
        """Take ``other``'s entries where ``mask`` is true (used when a fallback re-solves some samples)."""
        return SolveInfo(
            residual=torch.where(mask, other.residual, self.residual),
            iterations=self.iterations + torch.where(mask, other.iterations, 0),
            converged=torch.where(mask, other.converged, self.converged),
            negative_curvature=self.negative_curvature,
            method=f"{self.method}+{other.method}",
        )


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two ``(B, *S)`` batches -> ``(B,)``."""
    return (a * b).reshape(a.shape[0], -1).sum(1)


def _norm(a: Tensor) -> Tensor:
    return _dot(a, a).clamp_min(0).sqrt()


def _col(s: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample scalar ``(B,)`` to broadcast against ``(B, *S)``."""
    return s.view(-1, *([1] * (like.ndim - 1)))


def _threshold(b: Tensor, rtol: float, atol: float) -> Tensor:
    return torch.clamp_min(rtol * _norm(b), atol)


def _default_max_iter(b: Tensor, max_iter: int | None) -> int:
    if max_iter is not None:
        return int(max_iter)
    # In exact arithmetic CG/MINRES finish in D steps; allow 2D for round-off, capped for huge D.
    return max(10, min(2 * b[0].numel(), 1000))


def _finish(
    matvec: MatVec, b: Tensor, x: Tensor, iters: Tensor, thresh: Tensor, negcurv: Tensor, method: str
):
    # One extra product buys an honest (true, not recursive) residual for the report.
    res = _norm(b - matvec(x))
    # Converged = the true residual is within 10x of the target (the recursive one may drift below it).
    return x, SolveInfo(res, iters, res <= 10 * thresh + 1e-300, negcurv, method)


def cg(
    matvec: MatVec,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    check_every: int = 4,
) -> tuple[Tensor, SolveInfo]:
    """Batched conjugate gradient for ``A x = b`` with A symmetric positive definite per sample.

    Samples stop individually once ``‖r‖ ≤ max(rtol·‖b‖, atol)``; a sample meeting ``pᵀAp ≤ 0`` stops at
    its current iterate and is flagged in ``info.negative_curvature``. The host is synchronised only every
    ``check_every`` iterations to test whether all samples are done.
    """
    max_iter = _default_max_iter(b, max_iter)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b.clone() if x0 is None else b - matvec(x)
    p = r.clone()
    rs = _dot(r, r)
    thresh = _threshold(b, rtol, atol)
    active = rs.sqrt() > thresh
    negcurv = torch.zeros_like(active)
    iters = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    for k in range(max_iter):
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        neg = active & (pAp <= 0)
        negcurv = negcurv | neg
        active = active & ~neg
        alpha = torch.where(active, rs / torch.where(pAp == 0, torch.ones_like(pAp), pAp), 0.0)
        x = x + _col(alpha, x) * p
        r = r - _col(alpha, r) * Ap
        rs_new = _dot(r, r)
        iters = iters + active.long()
        beta = torch.where(active, rs_new / torch.where(rs == 0, torch.ones_like(rs), rs), 0.0)
        p = r + _col(beta, p) * p
        rs = torch.where(active, rs_new, rs)
        active = active & (rs_new.sqrt() > thresh)
        if (k + 1) % check_every == 0 and not bool(active.any()):
            break
    return _finish(matvec, b, x, iters, thresh, negcurv, "cg")


def minres(
    matvec: MatVec,
    b: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    check_every: int = 4,
) -> tuple[Tensor, SolveInfo]:
    """Batched MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite, A.

    Minimises ‖b − A x‖ over the Krylov space, so it is safe where CG breaks down on negative curvature.
    """
    max_iter = _default_max_iter(b, max_iter)
    tiny = torch.finfo(b.dtype).tiny
    B = b.shape[0]
    zeros = b.new_zeros(B)
    x = torch.zeros_like(b)
    r1 = b.clone()
    r2 = b.clone()
    y = b.clone()
    beta1 = _norm(b)
    thresh = _threshold(b, rtol, atol)
    active = beta1 > thresh
    beta, oldb = beta1.clone(), zeros.clone()
    dbar, epsln, phibar = zeros.clone(), zeros.clone(), beta1.clone()
    cs, sn = -torch.ones_like(beta1), zeros.clone()
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    iters = torch.zeros(B, dtype=torch.long, device=b.device)
    for k in range(max_iter):
        safe_beta = torch.where(beta > tiny, beta, torch.ones_like(beta))
        v = y / _col(safe_beta, y) * _col(active.to(y.dtype), y)
        y = matvec(v)
        if k > 0:
            safe_oldb = torch.where(oldb > tiny, oldb, torch.ones_like(oldb))
            y = y - _col(beta / safe_oldb, y) * r1
        alfa = _dot(v, y)
        y = y - _col(alfa / safe_beta, y) * r2
        r1, r2 = r2, y
        oldb = beta
        beta = _norm(y)
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
        w = (v - _col(oldeps, v) * w1 - _col(delta, v) * w2) / _col(gamma, v)
        x = x + _col(torch.where(active, phi, 0.0), x) * w
        iters = iters + active.long()
        # phibar is MINRES's running estimate of ‖b − A x‖; beta → 0 means the Krylov space is exhausted.
        active = active & (phibar.abs() > thresh) & (beta > tiny)
        if (k + 1) % check_every == 0 and not bool(active.any()):
            break
    return _finish(matvec, b, x, iters, thresh, torch.zeros_like(active), "minres")


def normal_cg(
    matvec: MatVec,
    rmatvec: MatVec,
    b: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    check_every: int = 4,
) -> tuple[Tensor, SolveInfo]:
    """Solve a non-symmetric ``A x = b`` by CG on the normal equations ``AᵀA x = Aᵀb`` (CGNR).

    This is the paper's treatment of non-PSD systems (Newton steps, root finding): each iteration costs one
    ``matvec`` (A v) and one ``rmatvec`` (Aᵀ v). The condition number is squared, so the normal system is
    solved to ``rtol²``-consistent accuracy: we stop on the residual of the *original* system.
    """
    Atb = rmatvec(b)
    # ‖Aᵀr‖ ≤ ‖A‖‖r‖: tighten the normal-equation tolerance so the original residual meets rtol.
    x, info = cg(
        lambda v: rmatvec(matvec(v)),
        Atb,
        rtol=rtol * 1e-2,
        atol=atol * 1e-2,
        max_iter=max_iter,
        check_every=check_every,
    )
    thresh = _threshold(b, rtol, atol)
    return _finish(matvec, b, x, info.iterations, thresh, info.negative_curvature, "normal_cg")


def gmres(
    matvec: MatVec,
    b: Tensor,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    restart: int = 40,
) -> tuple[Tensor, SolveInfo]:
    """Batched restarted GMRES(m) for non-symmetric A (Saad & Schultz 1986).

    The small ``(k+1)×k`` Hessenberg least-squares problem is solved per sample with ``torch.linalg.lstsq``.
    """
    max_iter = _default_max_iter(b, max_iter)
    B = b.shape[0]
    thresh = _threshold(b, rtol, atol)
    x = torch.zeros_like(b)
    iters = torch.zeros(B, dtype=torch.long, device=b.device)
    done = 0
    while done < max_iter:
        r = b - matvec(x)
        beta = _norm(r)
        active = beta > thresh
        if not bool(active.any()):
            break
        m = min(restart, max_iter - done)
        V = [r / _col(torch.where(beta > 0, beta, torch.ones_like(beta)), r)]
        H = b.new_zeros(B, m + 1, m)
        e1 = b.new_zeros(B, m + 1)
        e1[:, 0] = beta
        coef = None
        for j in range(m):
            w = matvec(V[j])
            for i in range(j + 1):  # modified Gram-Schmidt
                H[:, i, j] = _dot(w, V[i])
                w = w - _col(H[:, i, j], w) * V[i]
            hn = _norm(w)
            H[:, j + 1, j] = hn
            V.append(w / _col(torch.where(hn > 0, hn, torch.ones_like(hn)), w))
            Hk = H[:, : j + 2, : j + 1]
            coef = torch.linalg.lstsq(Hk, e1[:, : j + 2, None]).solution[..., 0]
            res = torch.linalg.vector_norm(e1[:, : j + 2] - (Hk @ coef[..., None])[..., 0], dim=1)
            iters = iters + active.long()
            active = active & (res > thresh)
            done += 1
            if not bool(active.any()):
                break
        Vs = torch.stack(V[: coef.shape[1]], dim=1)  # (B, k, *S)
        x = x + (coef.view(B, -1, *([1] * (b.ndim - 1))) * Vs).sum(1)
    return _finish(matvec, b, x, iters, thresh, torch.zeros(B, dtype=torch.bool, device=b.device), "gmres")


def dense_matrix(matvec: MatVec, like: Tensor) -> Tensor:
    """Materialise the per-sample matrices ``(B, D, D)`` of a block-diagonal operator with D matvecs."""
    B, D = like.shape[0], like[0].numel()
    cols = []
    for i in range(D):
        e = like.new_zeros(B, D)
        e[:, i] = 1
        cols.append(matvec(e.view_as(like)).reshape(B, D))
    return torch.stack(cols, dim=2)


def dense(
    matvec: MatVec, b: Tensor, *, rtol: float = 1e-6, atol: float = 0.0, **_: object
) -> tuple[Tensor, SolveInfo]:
    """Reference solver: build each sample's matrix explicitly and call ``torch.linalg.solve``."""
    A = dense_matrix(matvec, b)
    B = b.shape[0]
    x = torch.linalg.solve(A, b.reshape(B, -1, 1))[..., 0].view_as(b)
    iters = torch.full((B,), b[0].numel(), dtype=torch.long, device=b.device)
    thresh = _threshold(b, rtol, atol)
    return _finish(matvec, b, x, iters, thresh, torch.zeros(B, dtype=torch.bool, device=b.device), "dense")


METHODS = ("cg", "minres", "normal_cg", "gmres", "dense")


def solve(
    method: str,
    matvec: MatVec,
    b: Tensor,
    *,
    rmatvec: MatVec | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Dispatch a batched linear solve by name (one of :data:`METHODS`)."""
    if method == "cg":
        return cg(matvec, b, rtol=rtol, atol=atol, max_iter=max_iter)
    if method == "minres":
        return minres(matvec, b, rtol=rtol, atol=atol, max_iter=max_iter)
    if method == "gmres":
        return gmres(matvec, b, rtol=rtol, atol=atol, max_iter=max_iter)
    if method == "dense":
        return dense(matvec, b, rtol=rtol, atol=atol)
    if method == "normal_cg":
        if rmatvec is None:
            raise ValueError("normal_cg needs rmatvec (the transposed operator v ↦ Aᵀv)")
        return normal_cg(matvec, rmatvec, b, rtol=rtol, atol=atol, max_iter=max_iter)
    raise ValueError(f"unknown linear solver {method!r}; choose one of {METHODS}")
