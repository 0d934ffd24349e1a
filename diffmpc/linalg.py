"""Matrix-free, batched Krylov solvers for the implicit-function-theorem backward.

Every solver here works on a *batch of independent systems*: vectors have shape ``(B, *S)`` (B problems,
each an arbitrary-shaped unknown), ``matvec`` maps such a batch to a batch of the same shape and must act
block-diagonally (sample b of the output depends only on sample b of the input). Dot products, step sizes
and stopping are therefore per sample: a well-conditioned sample stops as soon as it has converged and never
waits for, nor is polluted by, a hard one.

**Convergence** means exactly ``‖b − A x‖ ≤ max(rtol·‖b‖, atol)`` for the *true* residual at the
returned x (recomputed with one product, never a recursive estimate), and :class:`SolveInfo` reports both
numbers (``residual``, ``threshold``). Where the recursion met the threshold but the true residual did not
(floating-point drift), the solver refines on ``A d = b − A x`` while iterations remain.

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

from torch import Tensor

from ._impl import krylov
from ._impl.krylov import METHODS, SolveInfo, dense_matrix

MatVec = Callable[[Tensor], Tensor]

__all__ = ["SolveInfo", "cg", "minres", "normal_cg", "gmres", "dense", "dense_matrix", "solve", "METHODS"]


def cg(matvec: MatVec, b: Tensor, x0: Tensor | None = None, *, rtol: float = 1e-6, atol: float = 0.0,
       max_iter: int | None = None, check_every: int = 4) -> tuple[Tensor, SolveInfo]:
    """Batched conjugate gradient for ``A x = b`` with A symmetric positive definite per sample.

    Samples stop individually once ``‖r‖ ≤ max(rtol·‖b‖, atol)``; a sample meeting ``pᵀAp ≤ 0`` stops at
    its current iterate and is flagged in ``info.negative_curvature``. The host is synchronised only every
    ``check_every`` iterations to test whether all samples are done. ``max_iter`` defaults to
    ``max(10, min(2D, 1000))`` for D unknowns per sample.
    """
    return krylov.solve("cg", matvec, b, x0=x0, rtol=rtol, atol=atol, max_iter=max_iter,
                        check_every=check_every)


def minres(matvec: MatVec, b: Tensor, *, rtol: float = 1e-6, atol: float = 0.0, max_iter: int | None = None,
           check_every: int = 4) -> tuple[Tensor, SolveInfo]:
    """Batched MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite, A.

    Minimises ‖b − A x‖ over the Krylov space, so it is safe where CG breaks down on negative curvature.
    """
    return krylov.solve("minres", matvec, b, rtol=rtol, atol=atol, max_iter=max_iter, check_every=check_every)


def normal_cg(matvec: MatVec, rmatvec: MatVec, b: Tensor, x0: Tensor | None = None, *, rtol: float = 1e-6,
              atol: float = 0.0, max_iter: int | None = None,
              stop: str = "residual") -> tuple[Tensor, SolveInfo]:
    """Solve a non-symmetric ``A x = b`` by CG on the normal equations ``AᵀA x = Aᵀb`` (CGNR).

    This is the paper's treatment of non-PSD systems (Newton steps, root finding): each iteration costs one
    ``matvec`` (A v) and one ``rmatvec`` (Aᵀ v). Stopping rule ``stop``:

    * ``"residual"`` (default): ``‖b − A x‖ ≤ max(rtol·‖b‖, atol)``, the residual of the *original*
      system (tracked by the CGNR recurrence, confirmed on the true residual) — the test every IFT
      backward reports;
    * ``"normal"``: ``‖Aᵀ(b − A x)‖ ≤ max(rtol·‖Aᵀb‖, atol)``, the least-squares optimality test, for
      systems without an exact solution. ``info.residual`` then reports ``‖Aᵀ(b − A x)‖``.

    ``x0`` warm-starts the iteration (one extra product).
    """
    return krylov.solve("normal_cg", matvec, b, rmatvec=rmatvec, x0=x0, rtol=rtol, atol=atol,
                        max_iter=max_iter, stop=stop)


def gmres(matvec: MatVec, b: Tensor, *, rtol: float = 1e-6, atol: float = 0.0, max_iter: int | None = None,
          restart: int = 40) -> tuple[Tensor, SolveInfo]:
    """Batched restarted GMRES(m) for non-symmetric A (Saad & Schultz 1986), ``m = restart``.

    The small ``(k+1)×k`` Hessenberg least-squares problem is solved per sample with ``torch.linalg.lstsq``;
    every restart starts from the true residual.
    """
    return krylov.solve("gmres", matvec, b, rtol=rtol, atol=atol, max_iter=max_iter, restart=restart)


def dense(
    matvec: MatVec, b: Tensor, *, rtol: float = 1e-6, atol: float = 0.0, **_: object
) -> tuple[Tensor, SolveInfo]:
    """Reference solver: build each sample's matrix explicitly (D products), LU-factorise and solve (with
    iterative refinement on the same factors if the true residual misses the threshold)."""
    return krylov.solve("dense", matvec, b, rtol=rtol, atol=atol)


def solve(method: str, matvec: MatVec, b: Tensor, *, rmatvec: MatVec | None = None, rtol: float = 1e-6,
          atol: float = 0.0, max_iter: int | None = None) -> tuple[Tensor, SolveInfo]:
    """Dispatch a batched linear solve by name (one of :data:`METHODS`)."""
    return krylov.solve(method, matvec, b, rmatvec=rmatvec, rtol=rtol, atol=atol, max_iter=max_iter)
