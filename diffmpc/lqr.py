r"""Differentiable infinite-horizon discrete-time LQR: :func:`dare` and :func:`dlqr`.

**Forward.** The stabilising solution S of the discrete algebraic Riccati equation (DARE)

.. math::  F(S; A, B, Q, R) = AᵀSA − S − AᵀSB\,(R + BᵀSB)^{-1}BᵀSA + Q = 0           \qquad (1)

is found in float64 by the batched structured doubling algorithm (:func:`sda`, torch, any device;
``forward="sda"``, default) or by ``scipy.linalg.solve_discrete_are`` (QZ, on the CPU; ``forward="scipy"``,
also the fallback for samples SDA does not solve), cast back to the inputs' dtype, and then *checked*:
finite, symmetric, small residual (1), and stabilising, ρ(A − BK) < 1 with the gain

.. math::  K = (R + BᵀSB)^{-1} BᵀSA, \qquad u = −Kx.                                       \qquad (2)

A failed check raises a typed :class:`LQRError` (never a garbage matrix): :class:`NotStabilizableError` if
(A, B) fails the PBH test ``rank[A − λI, B] = n`` for some ``|λ| ≥ 1``, otherwise
:class:`NoStabilizingSolutionError` (e.g. A = B = R = 1, Q = 0, where scipy silently returns S = 0 although
ρ(A − BK) = 1). Only the symmetric parts of Q and R matter (they enter as xᵀQx, uᵀRu), so both are
symmetrised first; sym(R) must be positive definite (:class:`NotPositiveDefiniteError`).

**Backward** (the implicit function theorem on (1), paper Sec. 2). With A_cl = A − BK, the Jacobian of
(1) in S is the Stein operator ``J(X) = A_clᵀ X A_cl − X`` (the terms through K cancel because K minimises
the Bellman right-hand side), and the partial differential of F at fixed S is

.. math::  ∂F = ∂Q + Kᵀ ∂R\, K + A_clᵀ S(∂A − ∂B\,K) + (∂A − ∂B\,K)ᵀ S A_cl.                \qquad (3)

For an upstream gradient G = ∂L/∂S (symmetrised), the IFT gives ``∂L/∂θ = −wᵀ ∂F/∂θ`` with ``Jᵀw = G``.
``backward`` selects how that linear system is solved:

==============  ============================================================================================
``"lyapunov"``  default: ``−w = Y`` solves one discrete Lyapunov (Stein) equation ``Y = A_cl Y A_clᵀ + G``
                (batched torch squared Smith / doubling iteration, O(n³ log κ)), then (3) in closed form:
                ``∂L/∂Q = Y``, ``∂L/∂R = K Y Kᵀ``, ``∂L/∂A = 2 S A_cl Y``, ``∂L/∂B = −2 S A_cl Y Kᵀ``.
``"normal_cg"`` the paper's matrix-free IFT: Jᵀw = G by CG on the normal equations (J is not symmetric),
                J and Jᵀ as autograd JVP/VJP of the Riccati residual (1); ``−wᵀ∂F/∂θ`` as one more VJP.
                ``"cg"`` is its backwards-compatible alias; the object is :class:`diffmpc.backward.NormalCG`.
``"gmres"``     as ``"normal_cg"`` but restarted GMRES on Jᵀ (needs only VJPs);
                :class:`~diffmpc.backward.GMRES`.
``"dense"``     the naive IFT: the explicit n²×n² Jacobian ∂F/∂S (n² autograd VJPs) and a dense solve, O(n⁶);
                :class:`~diffmpc.backward.Dense`.
``"analytic"``  East et al. (2020)'s closed form: the full Kronecker-product Jacobians
                ``∂vec S/∂vec θ = (I − A_clᵀ⊗A_clᵀ)^{-1} ∂vec F/∂vec θ`` for all θ, contracted with G, O(n⁶).
==============  ============================================================================================

``"normal_cg"``, ``"gmres"`` and ``"dense"`` run through the shared implicit-differentiation front end
(``diffmpc._impl.ift``, the same as :func:`diffmpc.root`), so they report the same per-sample true
residual; converged means ``‖G − Jᵀw‖ ≤ backward_tol·‖G‖``. ``"lyapunov"`` accepts a Stein relative
residual ``≤ max(backward_tol, 1000·eps)`` (the doubling's attainable accuracy). Each backward emits a
:class:`diffmpc.BackwardInfo` (``layer="dare"``) to :func:`diffmpc.record_backward`.

All functions are batched over leading dimensions (broadcast between A, B, Q, R).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from . import backward as _strategies
from ._impl.ift import ift_vjp
from ._impl.records import BackwardInfo, emit, next_call_id
from ._impl.tolerances import linear_tol
from .backward import with_defaults
from .implicit import ConvergenceWarning, report_solve

__all__ = [
    "dare", "dlqr", "BACKWARDS", "LQRError", "NotStabilizableError", "NoStabilizingSolutionError",
    "NotPositiveDefiniteError", "IllConditionedError", "riccati_residual", "stein", "sda", "is_stabilizable",
    "FORWARDS",
]

#: Canonical backward names (``"cg"`` is accepted as the alias of ``"normal_cg"``).
BACKWARDS = ("lyapunov", "normal_cg", "gmres", "dense", "analytic")
_CLOSED_FORMS = ("lyapunov", "analytic")


class LQRError(ValueError):
    """Bad input to :func:`dare` / :func:`dlqr`, or a DARE without a (stabilising) solution."""


class NotStabilizableError(LQRError):
    """(A, B) is not stabilisable: an eigenvalue |λ| ≥ 1 of A is uncontrollable (PBH test)."""


class NoStabilizingSolutionError(LQRError):
    """The DARE has no stabilising solution (e.g. (Q, A) has an unobservable mode on the unit circle)."""


class NotPositiveDefiniteError(LQRError):
    """The symmetric part of R is not positive definite."""


class IllConditionedError(LQRError):
    """A stabilising solution exists in exact arithmetic, but the problem is too badly scaled or conditioned
    (e.g. ‖A‖ ~ 1e8 with ‖B‖ ~ 1, or a near-zero B) for the forward solvers to find it in float64."""


def _sym(X: Tensor) -> Tensor:
    return 0.5 * (X + X.transpose(-1, -2))


# ----------------------------------------------------------------------------------------------- checks
def _check(A: Tensor, B: Tensor, Q: Tensor, R: Tensor) -> tuple[int, int, torch.Size]:
    names = ("A", "B", "Q", "R")
    for name, t in zip(names, (A, B, Q, R), strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a real floating-point tensor, got {t.dtype}")
        if t.ndim < 2:
            raise LQRError(f"{name} must be a matrix (..., rows, cols), got shape {tuple(t.shape)}")
    n, m = B.shape[-2], B.shape[-1]
    want = {"A": (n, n), "Q": (n, n), "R": (m, m)}
    for name, t in (("A", A), ("Q", Q), ("R", R)):
        if tuple(t.shape[-2:]) != want[name]:
            raise LQRError(f"shape mismatch: B is {n}×{m} (n={n} states, m={m} inputs), so {name} must be "
                           f"{want[name][0]}×{want[name][1]}, got {tuple(t.shape[-2:])}")
    if len({A.dtype, B.dtype, Q.dtype, R.dtype}) != 1:
        raise TypeError(f"A, B, Q, R must share one dtype, got {A.dtype}, {B.dtype}, {Q.dtype}, {R.dtype}")
    if len({A.device, B.device, Q.device, R.device}) != 1:
        raise LQRError("A, B, Q, R must be on one device")
    try:
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2], Q.shape[:-2], R.shape[:-2])
    except RuntimeError as err:
        shapes = ", ".join(f"{k} {tuple(t.shape[:-2])}" for k, t in zip(names, (A, B, Q, R), strict=True))
        raise LQRError(f"batch dimensions do not broadcast: {shapes}") from err
    for name, t in zip(names, (A, B, Q, R), strict=True):
        if not bool(torch.isfinite(t).all()):
            raise LQRError(f"{name} contains NaN or inf")
    return n, m, batch


def _check_r(R: Tensor) -> None:
    _, info = torch.linalg.cholesky_ex(R)
    if bool((info != 0).any()):
        bad = torch.nonzero(info != 0).flatten().tolist()
        eig = torch.linalg.eigvalsh(R[bad[0]]).min().item()
        raise NotPositiveDefiniteError(
            f"the symmetric part of R must be positive definite; it is not for batch entries {bad[:8]} "
            f"(smallest eigenvalue of entry {bad[0]}: {eig:.3g})")


def is_stabilizable(A: np.ndarray, B: np.ndarray, tol: float = 1e-9) -> bool:
    """PBH test: (A, B) is stabilisable iff ``rank[A − λI, B] = n`` for every eigenvalue with |λ| ≥ 1."""
    n = A.shape[0]
    scale = max(1.0, float(np.linalg.norm(np.hstack([A, B]), 2)))
    for lam in np.linalg.eigvals(A):
        if abs(lam) >= 1 - tol:
            M = np.hstack([A - lam * np.eye(n), B.astype(complex)])
            if np.linalg.svd(M, compute_uv=False)[-1] <= 1e-10 * scale:
                return False
    return True


# ---------------------------------------------------------------------------------------------- algebra
def riccati_residual(S: Tensor, A: Tensor, B: Tensor, Q: Tensor, R: Tensor) -> Tensor:
    """The DARE residual F(S; A, B, Q, R) of Eq. (1), batched; differentiable in every argument."""
    At = A.transpose(-1, -2)
    SB = S @ B
    G = R + B.transpose(-1, -2) @ SB
    K = torch.linalg.solve(G, B.transpose(-1, -2) @ S @ A)
    return At @ S @ A - S - (At @ SB) @ K + Q


def _gain(S: Tensor, A: Tensor, B: Tensor, R: Tensor) -> Tensor:
    Bt = B.transpose(-1, -2)
    return torch.linalg.solve(R + Bt @ S @ B, Bt @ S @ A)


def stein(M: Tensor, C: Tensor, *, rtol: float | None = None, max_iter: int = 64) -> tuple[Tensor, Tensor]:
    """Solve the Stein (discrete Lyapunov) equation ``X = M X Mᵀ + C`` for ρ(M) < 1, batched, in torch.

    Squared Smith (doubling) iteration: ``X ← X + M_k X M_kᵀ``, ``M_k ← M_k²`` sums ``Σ_{j<2^k} M^j C Mᵀʲ``
    (the same series as ``scipy.linalg.solve_discrete_lyapunov``) in k = O(log(log ε / log ρ)) steps of two
    matmuls each. Returns ``(X, residual)`` with the relative residual ``‖X − MXMᵀ − C‖ / ‖X‖`` per sample.
    """
    if rtol is None:
        rtol = torch.finfo(C.dtype).eps
    X, Mk = C, M
    for _ in range(max_iter):
        inc = Mk @ X @ Mk.transpose(-1, -2)
        X = X + inc
        small = torch.linalg.matrix_norm(inc) <= rtol * torch.linalg.matrix_norm(X).clamp_min(1e-300)
        if bool(small.all()):
            break
        Mk = Mk @ Mk
    res = torch.linalg.matrix_norm(X - M @ X @ M.transpose(-1, -2) - C)
    return X, res / torch.linalg.matrix_norm(X).clamp_min(torch.finfo(X.dtype).tiny)


# ---------------------------------------------------------------------------------------------- forward
FORWARDS = ("sda", "scipy")


def sda(A: Tensor, B: Tensor, Q: Tensor, R: Tensor, *, rtol: float | None = None,
        max_iter: int = 100) -> tuple[Tensor, Tensor]:
    r"""Structured doubling algorithm (Chu, Fan & Lin 2005) for the DARE (1), batched, in torch.

    With ``A₀ = A``, ``G₀ = BR⁻¹Bᵀ``, ``H₀ = Q`` and ``W_k = I + G_k H_k``:
    ``A_{k+1} = A_k W_k⁻¹ A_k``, ``G_{k+1} = G_k + A_k W_k⁻¹ G_k A_kᵀ``,
    ``H_{k+1} = H_k + A_kᵀ H_k W_k⁻¹ A_k``;
    ``H_k → S`` quadratically, the error shrinking like ρ(A − BK)^{2^k}. Returns ``(S, converged)``.
    """
    if rtol is None:
        rtol = 10 * torch.finfo(A.dtype).eps
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    Ak, Hk = A, Q
    Gk = B @ torch.linalg.solve(R, B.transpose(-1, -2))
    converged = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    for _ in range(max_iter):
        WA, WG = torch.linalg.solve(eye + Gk @ Hk, torch.cat([Ak, Gk], -1)).split(n, -1)
        H_new = Hk + Ak.transpose(-1, -2) @ Hk @ WA
        Gk = Gk + Ak @ WG @ Ak.transpose(-1, -2)
        Ak = Ak @ WA
        step = torch.linalg.matrix_norm(H_new - Hk)
        Hk = H_new
        converged = step <= rtol * torch.linalg.matrix_norm(Hk)
        if bool(converged.all()) or not bool(torch.isfinite(Hk).all()):
            break
    return _sym(Hk), converged & torch.isfinite(Hk).flatten(1).all(1)


def _forward(A: Tensor, B: Tensor, Q: Tensor, R: Tensor, method: str = "sda") -> Tensor:
    """Batched DARE solve + checks; inputs (N, ...) already symmetrised; computed in float64."""
    A64, B64, Q64, R64 = (t.detach().to(torch.float64) for t in (A, B, Q, R))
    if method == "sda":
        try:
            S, ok = sda(A64, B64, Q64, R64)
        except torch.linalg.LinAlgError:  # a singular I + G_k H_k (e.g. indefinite Q): scipy decides
            S, ok = torch.empty_like(Q64), torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    else:
        S, ok = torch.empty_like(Q64), torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    if not bool(ok.all()):  # scipy for the samples SDA did not solve (it also names what is wrong)
        idx = torch.nonzero(~ok).flatten().tolist()
        An, Bn, Qn, Rn = (t[idx].cpu().numpy() for t in (A64, B64, Q64, R64))
        sol = [_solve_scipy(i, An[j], Bn[j], Qn[j], Rn[j]) for j, i in enumerate(idx)]
        S[idx] = torch.from_numpy(np.stack(sol)).to(S.device)
    _check_solution(S, A64, B64, Q64, R64)
    return S.to(A.dtype)


def _solve_scipy(i: int, A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray) -> np.ndarray:
    where = f" (batch entry {i})"
    try:
        with np.errstate(all="ignore"):
            S = scipy.linalg.solve_discrete_are(A, B, Q, R)
    except (np.linalg.LinAlgError, ValueError) as err:
        _diagnose(A, B, where, f"scipy.linalg.solve_discrete_are failed: {err}", Q)
    if not np.isfinite(S).all():
        _diagnose(A, B, where, "the DARE solver returned NaN/inf", Q)
    return 0.5 * (S + S.T)


def _check_solution(S: Tensor, A: Tensor, B: Tensor, Q: Tensor, R: Tensor) -> None:
    """Stabilising (ρ(A − BK) < 1) and a small residual (1), per sample, in float64."""
    try:
        K = _gain(S, A, B, R)
        rho = torch.linalg.eigvals(A - B @ K).abs().amax(-1)
        res = torch.linalg.matrix_norm(riccati_residual(S, A, B, Q, R))
    except torch.linalg.LinAlgError:  # R + BᵀSB singular: S is no DARE solution; find the first culprit
        G = R + B.transpose(-1, -2) @ S @ B
        i = int(torch.nonzero(torch.linalg.matrix_rank(G) < G.shape[-1])[0]) if G.numel() else 0
        _diagnose(A[i].cpu().numpy(), B[i].cpu().numpy(), f" (batch entry {i})", "R + BᵀSB is singular",
                  Q[i].cpu().numpy())
    bad = ~(rho < 1 - 1e-9)  # also catches NaN
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        _diagnose(A[i].cpu().numpy(), B[i].cpu().numpy(), f" (batch entry {i})",
                  f"the solution is not stabilising: ρ(A − BK) = {rho[i].item():.12g} ≥ 1",
                  Q[i].cpu().numpy())
    scale = (torch.linalg.matrix_norm(Q) + torch.linalg.matrix_norm(A.transpose(-1, -2) @ S @ A)
             + torch.linalg.matrix_norm(S))
    rel = res / scale.clamp_min(1e-300)
    if bool((rel > 1e-4).any()) or not bool(torch.isfinite(rel).all()):  # not a solution at all
        i = int(torch.nonzero(~(rel <= 1e-4))[0])
        _diagnose(A[i].cpu().numpy(), B[i].cpu().numpy(), f" (batch entry {i})",
                  f"relative Riccati residual {rel[i].item():.3g}", Q[i].cpu().numpy())
    if bool((rel > 1e-8).any()):
        warnings.warn(f"dare: relative Riccati residual up to {rel.max().item():.3g} (batch entries "
                      f"{torch.nonzero(rel > 1e-8).flatten()[:8].tolist()}); the problem is ill-conditioned "
                      "and gradients may be inaccurate", ConvergenceWarning, stacklevel=5)


def _diagnose(A: np.ndarray, B: np.ndarray, where: str, what: str, Q: np.ndarray | None = None):
    """Raise the :class:`LQRError` subclass that names why no stabilising solution was found."""
    na, nb = float(np.linalg.norm(A, 2)), float(np.linalg.norm(B, 2))
    # Stabilisability is invariant to scaling B, so test it with ‖B‖ = ‖A‖: a merely tiny B is not
    # "uncontrollable" (that is ill-conditioning, below), only an exactly uncontrollable mode is.
    if nb == 0 or not is_stabilizable(A, B * (max(na, 1.0) / nb)):
        raise NotStabilizableError(f"(A, B) is not stabilizable{where}: an eigenvalue of A with |λ| ≥ 1 "
                                   f"is uncontrollable (PBH rank test), so no stabilising LQR gain exists "
                                   f"({what})")
    if Q is not None:
        q_min = float(np.linalg.eigvalsh(0.5 * (Q + Q.T)).min())
        if q_min < -1e-12 * max(float(np.linalg.norm(Q, 2)), 1e-300):
            raise NoStabilizingSolutionError(
                f"the DARE has no stabilising solution{where}: {what}. Q is indefinite (smallest eigenvalue "
                f"{q_min:.3g}); the LQR cost needs Q positive semidefinite")
        if not _unit_circle_observable(A, Q):
            raise NoStabilizingSolutionError(
                f"the DARE has no stabilising solution{where}: {what}. (A, B) is stabilizable, but (Q, A) "
                "has an unobservable mode on the unit circle")
        raise IllConditionedError(
            f"the DARE{where} has a stabilising solution in exact arithmetic ((A, B) is stabilizable, Q ⪰ 0 "
            f"and (Q, A) has no unobservable mode on the unit circle), but it could not be computed in "
            f"float64 ({what}); ‖A‖ = {na:.3g}, ‖B‖ = {nb:.3g}: rescale the states and inputs")
    raise NoStabilizingSolutionError(f"the DARE has no stabilising solution{where}: {what}. (A, B) is "
                                     "stabilizable, so (Q, A) likely has an unobservable mode on the unit "
                                     "circle")


def _unit_circle_observable(A: np.ndarray, Q: np.ndarray, tol: float = 1e-9) -> bool:
    """PBH test on the unit circle: no eigenvector of A with |λ| = 1 lies in the kernel of Q (Q ⪰ 0)."""
    n = A.shape[0]
    scale = max(1.0, float(np.linalg.norm(np.vstack([A, Q]), 2)))
    for lam in np.linalg.eigvals(A):
        if abs(abs(lam) - 1) <= tol * max(1.0, abs(lam)) + 1e-7:
            M = np.vstack([A - lam * np.eye(n), Q.astype(complex)])
            if np.linalg.svd(M, compute_uv=False)[-1] <= 1e-10 * scale:
                return False
    return True


# --------------------------------------------------------------------------------------------- backward
def _backward_lyapunov(S, A, B, Q, R, G, opts):
    K = _gain(S, A, B, R)
    Acl = A - B @ K
    Y, res = stein(Acl, G)
    _warn_solve("lyapunov (Stein doubling)", res, opts["rtol"])
    SAY = S @ Acl @ Y
    emit(BackwardInfo("dare", opts["call_id"], "lyapunov"))
    return 2 * SAY, -2 * SAY @ K.transpose(-1, -2), Y, K @ Y @ K.transpose(-1, -2)


def _backward_krylov(S, A, B, Q, R, G, opts):
    """The shared IFT front end on the Riccati residual (1): Jᵀ w = G, then −wᵀ∂F/∂θ."""
    strategy = opts["backward"]
    if strategy.max_iter is None:  # the normal equations square the condition number: allow more than 2n²
        strategy = with_defaults(strategy, tol=strategy.tol, max_iter=min(10 * S[0].numel() + 50, 2000))
    with torch.enable_grad():
        Sl = S.detach().requires_grad_()
        leaves = [t.detach().requires_grad_() for t in (A, B, Q, R)]
        F = riccati_residual(Sl, *leaves)
        grads, _, info, notes = ift_vjp(F, Sl, leaves, G, strategy, symmetric=False)
    emit(BackwardInfo("dare", opts["call_id"], repr(strategy), (info,), notes))
    report_solve("dare", info, False, "raise backward_max_iter or use backward='lyapunov'.")
    return grads


def _bkron(a: Tensor, b: Tensor) -> Tensor:
    """Batched Kronecker product (N, p, q) ⊗ (N, r, s) -> (N, p r, q s)."""
    N, p, q = a.shape
    r, s = b.shape[-2:]
    return (a[:, :, None, :, None] * b[:, None, :, None, :]).reshape(N, p * r, q * s)


def _backward_analytic(S, A, B, Q, R, G, opts):
    """East et al. (2020): ∂vec S/∂vec θ in closed form (row-major vec: vec(X M Y) = (X ⊗ Yᵀ) vec M)."""
    N, n, m = B.shape
    K = _gain(S, A, B, R)
    Acl = A - B @ K
    At, Kt = Acl.transpose(-1, -2), K.transpose(-1, -2)
    eye_n = torch.eye(n, dtype=S.dtype, device=S.device).expand(N, n, n)
    L = torch.eye(n * n, dtype=S.dtype, device=S.device) - _bkron(At, At)  # vec(X − A_clᵀ X A_cl)

    def sym_op(E: Tensor) -> Tensor:  # (I + T) E: vec M ↦ vec(M + Mᵀ), T the commutation matrix
        k = E.shape[-1]
        return E + E.reshape(N, n, n, k).transpose(1, 2).reshape(N, n * n, k)

    AtS = At @ S
    E_A = sym_op(_bkron(AtS, eye_n))                    # ∂vec F/∂vec A
    E_B = -sym_op(_bkron(AtS, Kt))                      # ∂vec F/∂vec B
    E_Q = torch.eye(n * n, dtype=S.dtype, device=S.device).expand(N, -1, -1)
    E_R = _bkron(Kt, Kt)                                # ∂vec F/∂vec R
    E = torch.cat([E_A, E_B, E_Q, E_R], dim=-1)
    dS = torch.linalg.solve(L, E)                       # full Jacobian ∂vec S/∂vec θ (up to sign of J)
    g = (G.reshape(N, 1, n * n) @ dS)[:, 0]
    gA, gB, gQ, gR = torch.split(g, [n * n, n * m, n * n, m * m], dim=-1)
    return gA.reshape(N, n, n), gB.reshape(N, n, m), gQ.reshape(N, n, n), gR.reshape(N, m, m)


def _warn_solve(what: str, res: Tensor, rtol: float) -> None:
    bad = res > max(rtol, 1e3 * torch.finfo(res.dtype).eps)  # the documented acceptance (module docstring)
    if bool(bad.any()):
        warnings.warn(f"dare backward: {what} relative residual {res[bad][:8].tolist()} for {int(bad.sum())} "
                      f"of {bad.numel()} samples (ρ(A − BK) close to 1?)", ConvergenceWarning, stacklevel=4)


def _backward_closed_form_analytic(S, A, B, Q, R, G, opts):
    emit(BackwardInfo("dare", opts["call_id"], "analytic"))
    return _backward_analytic(S, A, B, Q, R, G, opts)


_CLOSED_FORM_IMPL = {"lyapunov": _backward_lyapunov, "analytic": _backward_closed_form_analytic}


class _DARE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: Tensor, B: Tensor, Q: Tensor, R: Tensor, opts: dict) -> Tensor:
        S = _forward(A, B, Q, R, opts["forward"])
        ctx.save_for_backward(A, B, Q, R, S)
        ctx.opts = opts
        return S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_S: Tensor):
        A, B, Q, R, S = ctx.saved_tensors
        G = _sym(grad_S)  # S is symmetric: only the symmetric part of ∂L/∂S acts on it
        impl = _CLOSED_FORM_IMPL.get(ctx.opts["backward"], _backward_krylov)
        gA, gB, gQ, gR = impl(S, A, B, Q, R, G, ctx.opts)
        return gA, gB, _sym(gQ), _sym(gR), None


# ------------------------------------------------------------------------------------------------ public
def _prepare(A, B, Q, R, backward, backward_tol, backward_max_iter, forward):
    strategy = _strategies.resolve(backward, operator="general", layer="dare", tol=backward_tol,
                                   max_iter=backward_max_iter, extra=_CLOSED_FORMS,
                                   allowed=("normal_cg", "cg", "gmres", "dense"))
    if forward not in FORWARDS:
        raise ValueError(f"unknown forward {forward!r}; choose one of {FORWARDS}")
    n, m, batch = _check(A, B, Q, R)
    flat = [t.expand(*batch, *t.shape[-2:]).reshape(-1, *t.shape[-2:]) for t in (A, B, Q, R)]
    A_, B_, Q_, R_ = flat
    Q_, R_ = _sym(Q_), _sym(R_)
    _check_r(R_.detach())
    if isinstance(strategy, _strategies.LinearSolve):
        strategy = with_defaults(strategy, tol=linear_tol(A.dtype), max_iter=None)
    opts = {"backward": strategy, "rtol": linear_tol(A.dtype, backward_tol), "max_iter": backward_max_iter,
            "forward": forward, "call_id": next_call_id()}
    return A_, B_, Q_, R_, batch, opts


def dare(A: Tensor, B: Tensor, Q: Tensor, R: Tensor, *, backward: str | _strategies.Strategy = "lyapunov",
         backward_tol: float | None = None, backward_max_iter: int | None = None,
         forward: str = "sda") -> Tensor:
    """Differentiable stabilising solution S of the DARE, Eq. (1); batched over leading dimensions.

    Args:
        A: ``(..., n, n)`` dynamics, ``x' = Ax + Bu``.  B: ``(..., n, m)``.
        Q: ``(..., n, n)`` state cost (its symmetric part is used).  R: ``(..., m, m)`` input cost
            (symmetric part must be positive definite).
        backward: one of :data:`BACKWARDS` (alias ``"cg"`` = ``"normal_cg"``) or a strategy object
            :class:`~diffmpc.backward.NormalCG`, ``GMRES``, ``Dense`` (see the module docstring); all give
            the same gradient.
        backward_tol: relative tolerance of the backward linear solve (default 1e-10 in float64, 1e-5 else).
        backward_max_iter: iteration cap for ``"cg"`` / ``"gmres"`` (default ``min(10 n² + 50, 2000)``).
        forward: ``"sda"`` (batched torch doubling, default) or ``"scipy"`` (``solve_discrete_are`` per
            sample).

    Returns:
        ``(..., n, n)`` symmetric S, same dtype and device as the inputs.

    Raises:
        LQRError: (a ValueError) and its subclasses on bad shapes, NaN/inf, a non-positive-definite R, an
            unstabilizable (A, B) or a DARE without stabilising solution.
        TypeError: on non-float tensors.
    """
    A_, B_, Q_, R_, batch, opts = _prepare(A, B, Q, R, backward, backward_tol, backward_max_iter,
                                                  forward)
    S = _DARE.apply(A_, B_, Q_, R_, opts)
    return S.reshape(*batch, *S.shape[-2:])


def dlqr(A: Tensor, B: Tensor, Q: Tensor, R: Tensor, *, backward: str | _strategies.Strategy = "lyapunov",
         backward_tol: float | None = None, backward_max_iter: int | None = None,
         forward: str = "sda") -> Tensor:
    """Differentiable infinite-horizon LQR gain ``K = (R + BᵀSB)⁻¹BᵀSA`` (Eq. 2), control ``u = −Kx``.

    Same arguments as :func:`dare`; returns ``(..., m, n)``. The gradient flows through S (by the chosen
    IFT ``backward``) and through the explicit dependence of Eq. (2) on A, B, R (ordinary autograd).
    """
    A_, B_, Q_, R_, batch, opts = _prepare(A, B, Q, R, backward, backward_tol, backward_max_iter,
                                                  forward)
    S = _DARE.apply(A_, B_, Q_, R_, opts)
    K = _gain(S, A_, B_, R_)
    return K.reshape(*batch, *K.shape[-2:])
