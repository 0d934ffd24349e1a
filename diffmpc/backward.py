r"""Backward strategies: *how* an implicit layer solves its adjoint linear system (small immutable configs).

Every implicit layer — :func:`diffmpc.argmin`, :func:`diffmpc.root`, :func:`diffmpc.dare`,
:func:`diffmpc.odeint` — differentiates its solution y* by the implicit function theorem (paper Eqs. 2–3):
with the optimality residual ``r(y, θ)`` (``∇_y f`` for an argmin, ``F`` for a root) and an upstream
gradient ``v = ∂L/∂y*``, solve the *adjoint system*

.. math::  A\,w = v, \qquad A = (\partial r/\partial y)^{\top} + \text{damping}\cdot I,

then return ``−wᵀ ∂r/∂θ`` (one more vector-Jacobian product). A strategy object says how ``A w = v`` is
solved; it is chosen independently of the forward solver (as in optimistix/lineax) and passed as
``backward=``:

==================  ==========================  =========================================================
object              string (aliases)            algorithm
==================  ==========================  =========================================================
:class:`CG`         ``"cg"`` (argmin only)      conjugate gradient on A (Hessian-vector products; the
                                                paper's Alg. 1). Needs A symmetric positive definite —
                                                argmin's Hessian; samples with negative curvature are
                                                re-solved by MINRES and reported.
:class:`MINRES`     ``"minres"``                MINRES on A: symmetric indefinite (saddle points).
:class:`NormalCG`   ``"normal_cg"``; ``"cg"``   CG on the normal equations ``AᵀA w = Aᵀv`` (CGNR): one
                    for root/dare/odeint        product with A and one with Aᵀ per iteration; any
                                                non-singular A (the paper's choice for roots).
:class:`GMRES`      ``"gmres"``                 restarted GMRES on A: only products with A.
:class:`Dense`      ``"dense"``                 build A (D products per sample) and LU-solve it: the
                                                paper's "naive IFT", for validation and tiny problems.
:class:`Unroll`     ``"unroll"``                no IFT: backpropagate through the forward solver's
                                                iterations (argmin, root, odeint; memory grows with them).
==================  ==========================  =========================================================

**One name, one algorithm.** ``"cg"`` historically meant CG on the Hessian for ``argmin`` but CG on the
normal equations for ``root``, ``dare`` and ``odeint`` (whose Jacobians are not symmetric, so plain CG
does not apply). The objects are unambiguous: :class:`CG` is always plain CG (and is refused where the
operator is not symmetric); ``"cg"`` stays accepted by ``root``/``dare``/``odeint`` as a
backwards-compatible alias of :class:`NormalCG`, which is what it always ran there. Diagnostics report
the algorithm that ran (``"normal_cg"``), never the alias.

**Fields.** ``tol``: relative residual tolerance, converged means ``‖v − A w‖ ≤ tol·‖v‖`` for the true
residual (default from the dtype table: 1e-10 in float64, 1e-5 in float32). ``max_iter``: iteration cap
(default ``max(10, min(2D, 1000))``; ``dare`` allows ``min(10n² + 50, 2000)``). ``damping``: Tikhonov
term added to A (regularises a singular Hessian / Jacobian; it biases the gradient by O(damping)).

Front-end specific choices stay strings: ``dare`` also has ``"lyapunov"`` (default) and ``"analytic"``
(closed forms), ``odeint`` has ``"adjoint"``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ._checks import check_choice, check_int, check_real
from .errors import BadArgumentError

__all__ = ["CG", "NormalCG", "MINRES", "GMRES", "Dense", "Unroll", "LinearSolve", "Strategy", "resolve",
           "ALIASES"]


def _check_common(obj: Any) -> None:
    name = type(obj).__name__
    check_real(f"{name}(tol=...)", obj.tol, minimum=0.0, strict=True, allow_none=True)
    check_int(f"{name}(max_iter=...)", obj.max_iter, minimum=1, allow_none=True)
    check_real(f"{name}(damping=...)", obj.damping, minimum=0.0)


@dataclass(frozen=True)
class LinearSolve:
    """Base of the strategies that solve the adjoint system ``A w = v`` (not used directly)."""

    tol: float | None = None
    max_iter: int | None = None
    damping: float = 0.0

    method: ClassVar[str] = ""
    needs_symmetric: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass(frozen=True)
class CG(LinearSolve):
    """Conjugate gradient on the symmetric adjoint operator (argmin's Hessian; the paper's Alg. 1).

    ``minres_fallback``: samples where CG meets ``pᵀAp ≤ 0`` (H not positive definite: a saddle point
    or a non-convex region) are re-solved by MINRES, with a :class:`~diffmpc.ConvergenceWarning`.
    """

    minres_fallback: bool = True

    method: ClassVar[str] = "cg"
    needs_symmetric: ClassVar[bool] = True


@dataclass(frozen=True)
class MINRES(LinearSolve):
    """MINRES (Paige & Saunders 1975) on a symmetric, possibly indefinite adjoint operator."""

    method: ClassVar[str] = "minres"
    needs_symmetric: ClassVar[bool] = True


@dataclass(frozen=True)
class NormalCG(LinearSolve):
    """CG on the normal equations (CGNR) — any non-singular operator, one A- and one Aᵀ-product per
    iteration. ``stop="residual"`` (default) stops on ``‖v − Aw‖``, ``"normal"`` on ``‖Aᵀ(v − Aw)‖``
    (see :func:`diffmpc.linalg.normal_cg`)."""

    stop: str = "residual"

    method: ClassVar[str] = "normal_cg"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("NormalCG(stop=...)", self.stop, ("residual", "normal"))


@dataclass(frozen=True)
class GMRES(LinearSolve):
    """Restarted GMRES(``restart``) on the adjoint operator; only products with A."""

    restart: int = 40

    method: ClassVar[str] = "gmres"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("GMRES(restart=...)", self.restart, minimum=1)


@dataclass(frozen=True)
class Dense(LinearSolve):
    """Materialise A (D products per sample) and LU-solve it — the paper's "naive IFT" (reference).

    ``tol`` is only the acceptance test of the (refined) solution; ``max_iter`` is unused."""

    method: ClassVar[str] = "dense"


@dataclass(frozen=True)
class Unroll:
    """No implicit differentiation: backpropagate through the forward solver's iterations (the solver must
    be a torch solver that supports ``differentiable=True``)."""

    method: ClassVar[str] = "unroll"


Strategy = LinearSolve | Unroll

# String aliases, per operator kind. "symmetric": argmin's Hessian; "general": root, dare, odeint Jacobians.
ALIASES: dict[str, dict[str, type]] = {
    "symmetric": {"cg": CG, "minres": MINRES, "normal_cg": NormalCG, "gmres": GMRES, "dense": Dense,
                  "unroll": Unroll},
    "general": {"normal_cg": NormalCG, "cg": NormalCG, "gmres": GMRES, "dense": Dense, "unroll": Unroll},
}


def resolve(backward: Any, *, operator: str, layer: str, tol: float | None = None,
            max_iter: int | None = None, damping: float | None = None, extra: tuple[str, ...] = (),
            allowed: tuple[str, ...] | None = None) -> Strategy | str:
    """Turn ``backward`` (a strategy object or a string) into a strategy object (or one of the front end's
    ``extra`` strings, returned unchanged).

    ``operator`` is ``"symmetric"`` or ``"general"`` (whether the adjoint operator is symmetric);
    ``tol``/``max_iter``/``damping`` are the layer's legacy keyword arguments (``backward_tol``, ...),
    which fill a string's object; with an object they must be left unset (they live in the object).
    ``allowed`` restricts the string names (a front end that cannot unroll, say).
    """
    table = ALIASES[operator]
    names = tuple(n for n in table if allowed is None or n in allowed) + extra
    if isinstance(backward, str):
        if backward in extra:
            return backward
        if backward not in names:
            raise BadArgumentError(f"{layer}: unknown backward {backward!r}; choose one of {names} or a "
                                   "strategy object from diffmpc.backward (CG, NormalCG, MINRES, GMRES, "
                                   "Dense, Unroll)")
        cls = table[backward]
        if cls is Unroll:
            return Unroll()
        kwargs = {"tol": tol, "max_iter": max_iter}
        if damping is not None:
            kwargs["damping"] = float(damping)
        return cls(**kwargs)
    if isinstance(backward, LinearSolve | Unroll):
        legacy = (("backward_tol", tol), ("backward_max_iter", max_iter), ("damping", damping))
        given = [k for k, val in legacy if val is not None]
        if given:
            raise BadArgumentError(f"{layer}: {', '.join(given)} given together with the strategy object "
                                   f"{backward!r}; set them in the object instead, e.g. "
                                   f"{type(backward).__name__}(tol=..., max_iter=..., damping=...)")
        if allowed is not None and backward.method not in allowed:
            raise BadArgumentError(f"{layer}: backward {type(backward).__name__} is not available here; "
                                   f"choose one of {names}")
        if getattr(backward, "needs_symmetric", False) and operator != "symmetric":
            raise BadArgumentError(f"{layer}: {type(backward).__name__} needs a symmetric operator, but this "
                                   "layer's Jacobian is not symmetric; use NormalCG() (what the string 'cg' "
                                   "means here), GMRES() or Dense()")
        return backward
    raise TypeError(f"{layer}: backward must be a string {names} or a strategy object from "
                    f"diffmpc.backward, got {type(backward).__name__}")


def with_defaults(strategy: LinearSolve, *, tol: float, max_iter: int | None) -> LinearSolve:
    """The strategy with its unset ``tol``/``max_iter`` filled from the front end's defaults."""
    return replace(strategy, tol=strategy.tol if strategy.tol is not None else tol,
                   max_iter=strategy.max_iter if strategy.max_iter is not None else max_iter)
