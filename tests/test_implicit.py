"""The core implicit layers: gradients against finite differences and closed forms, modes agree,
batching is exact, diagnostics and errors fire."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import diffmpc
from diffmpc import ConvergenceError, ConvergenceWarning, argmin, root

DT = torch.float64


def spd(n: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(*batch, n, n, generator=g, dtype=DT)
    return M @ M.transpose(-1, -2) + n * torch.eye(n, dtype=DT)


def quad(y, A, b):
    return 0.5 * y @ A @ y - b @ y


def quad_batched(y, A, b):
    return 0.5 * torch.einsum("bi,bij,bj->b", y, A, y) - (b * y).sum(-1)


def kepler_residual(E, e, M):
    """Kepler's equation M = E − e sin E as a root problem in E (paper Fig. 1)."""
    return E - e * torch.sin(E) - M


# ---------------------------------------------------------------- argmin: correctness of gradients


@pytest.mark.parametrize("backward", diffmpc.ARGMIN_BACKWARDS)
def test_quadratic_gradcheck_all_backwards(backward):
    A = spd(4, 0).requires_grad_()
    b = torch.randn(4, dtype=DT, requires_grad=True)
    fn = lambda A, b: argmin(quad, torch.zeros(4, dtype=DT), A, b, backward=backward)
    # GMRES's small least-squares solve (LAPACK) may differ in the last bit between identical calls
    assert gradcheck(fn, (A, b), nondet_tol=1e-12)


def test_quadratic_matches_closed_form():
    A = spd(5, 1).requires_grad_()
    b = torch.randn(5, dtype=DT, requires_grad=True)
    w = torch.randn(5, dtype=DT)
    y = argmin(quad, torch.zeros(5, dtype=DT), A, b)
    (y @ w).backward()
    A2, b2 = A.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (torch.linalg.solve(A2, b2) @ w).backward()
    # The score sees only the symmetric part of A, so compare symmetrised gradients.
    sym = lambda G: 0.5 * (G + G.T)
    torch.testing.assert_close(sym(A.grad), sym(A2.grad))
    torch.testing.assert_close(b.grad, b2.grad)


def test_nonquadratic_batched_equals_one_by_one_and_gradcheck():
    B, n = 3, 4
    A = spd(n, 2, (B,)).requires_grad_()
    b = torch.randn(B, n, dtype=DT, requires_grad=True)

    def f(y, A, b):  # strictly convex, non-quadratic
        return quad_batched(y, A, b) + 0.25 * (y**4).sum(-1)

    y = argmin(f, torch.zeros(B, n, dtype=DT), A, b)
    w = torch.randn(B, n, dtype=DT)
    gA, gb = torch.autograd.grad((y * w).sum(), (A, b))
    for i in range(B):
        fi = lambda y, A, b: 0.5 * y @ A @ y - b @ y + 0.25 * (y**4).sum()
        yi = argmin(fi, torch.zeros(n, dtype=DT), A[i], b[i])
        torch.testing.assert_close(yi, y[i])
        gAi, gbi = torch.autograd.grad(yi @ w[i], (A, b))
        torch.testing.assert_close(gAi[i], gA[i])
        torch.testing.assert_close(gbi[i], gb[i])
    assert gradcheck(lambda A, b: argmin(f, torch.zeros(B, n, dtype=DT), A, b), (A, b))


def test_backward_modes_agree_on_module_parameters():
    torch.manual_seed(0)

    class Score(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3).double()
            self.log_scale = torch.nn.Parameter(torch.zeros(3, dtype=DT))

        def forward(self, y, x):
            return (self.log_scale.exp() * (y - self.lin(x)) ** 2).sum(-1) + 0.1 * (y**4).sum(-1)

    score = Score()
    x = torch.randn(2, 3, dtype=DT)
    w = torch.randn(2, 3, dtype=DT)
    grads = {}
    for mode in diffmpc.ARGMIN_BACKWARDS:
        score.zero_grad()
        y = argmin(score, torch.zeros(2, 3, dtype=DT), x, backward=mode)
        (y * w).sum().backward()
        grads[mode] = torch.cat(
            [p.grad.flatten() for p in (score.lin.weight, score.lin.bias, score.log_scale)]
        )
    for mode in ("minres", "dense", "unroll"):
        torch.testing.assert_close(grads[mode], grads["cg"], rtol=1e-6, atol=1e-9)
    # and against central finite differences on one parameter entry
    p = score.lin.weight
    eps = 1e-6
    with torch.no_grad():
        p[0, 1] += eps
        yp = argmin(score, torch.zeros(2, 3, dtype=DT), x)
        p[0, 1] -= 2 * eps
        ym = argmin(score, torch.zeros(2, 3, dtype=DT), x)
        p[0, 1] += eps
    fd = ((yp - ym) * w).sum() / (2 * eps)
    torch.testing.assert_close(grads["cg"][1], fd, rtol=1e-5, atol=1e-8)


def test_gradient_wrt_input_of_nonconvex_problem_at_local_minimum():
    # f(y; x) = (y² − 1)² − x y : two minima; dy/dx = 1 / f''(y*) at whichever minimum is found.
    f = lambda y, x: ((y**2 - 1) ** 2 - x * y).sum()
    x = torch.tensor(0.3, dtype=DT, requires_grad=True)
    y = argmin(f, torch.tensor([0.9], dtype=DT), x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, 1 / (12 * y.detach()[0] ** 2 - 4))


def test_black_box_scipy_solver():
    scipy_opt = pytest.importorskip("scipy.optimize")
    A = spd(3, 3).requires_grad_()
    b = torch.randn(3, dtype=DT, requires_grad=True)

    def bfgs(fun, y0):
        def value_and_grad(z):
            zt = torch.tensor(z, requires_grad=True)
            with torch.enable_grad():
                v = fun(zt)
                (g,) = torch.autograd.grad(v, zt)
            return v.item(), g.numpy()

        return torch.tensor(
            scipy_opt.minimize(value_and_grad, y0.numpy(), jac=True, method="BFGS", options={"gtol": 1e-12}).x
        )

    assert gradcheck(lambda A, b: argmin(quad, torch.zeros(3, dtype=DT), A, b, solver=bfgs), (A, b))


@pytest.mark.parametrize(
    "solver", ["newton", "lbfgs", diffmpc.solvers.GradientDescent(lr=0.05, max_iter=5000)]
)
def test_forward_solvers_reach_stationarity(solver):
    A, b = spd(4, 4), torch.randn(4, dtype=DT)
    y, info = argmin(quad, torch.zeros(4, dtype=DT), A, b, solver=solver, return_info=True)
    torch.testing.assert_close(y, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-7)
    assert bool(info.converged.all())


def test_newton_never_goes_uphill_on_indefinite_start():
    # Rosenbrock from a point where the Hessian is indefinite.
    f = lambda y: (1 - y[..., 0]) ** 2 + 100 * (y[..., 1] - y[..., 0] ** 2) ** 2
    y0 = torch.tensor([[-1.2, 1.0], [0.0, 0.5]], dtype=DT)
    y, info = argmin(lambda y: f(y), y0, return_info=True)
    torch.testing.assert_close(y, torch.ones(2, 2, dtype=DT), atol=1e-6, rtol=0)
    assert bool(info.converged.all())


# ---------------------------------------------------------------- root


@pytest.mark.parametrize("backward", diffmpc.ROOT_BACKWARDS)
def test_root_nonsymmetric_gradcheck(backward):
    M = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(5)) + 3 * torch.eye(4, dtype=DT)
    M.requires_grad_()
    b = torch.randn(4, dtype=DT, requires_grad=True)
    F = lambda y, M, b: M @ y + 0.1 * y**3 - b
    fn = lambda M, b: root(F, torch.zeros(4, dtype=DT), M, b, backward=backward)
    assert gradcheck(fn, (M, b), nondet_tol=1e-9)


def test_kepler_root_matches_closed_form_derivative():
    e = torch.tensor([0.1, 0.5, 0.9], dtype=DT, requires_grad=True)
    M = torch.tensor([0.3, 1.0, 2.5], dtype=DT)
    E = root(kepler_residual, M.clone(), e, M, batched=True)
    (gE,) = torch.autograd.grad(E.sum(), e)
    Ed = E.detach()
    torch.testing.assert_close(gE, torch.sin(Ed) / (1 - e.detach() * torch.cos(Ed)))
    assert gradcheck(lambda e: root(kepler_residual, M.clone(), e, M, batched=True), (e,))


def test_root_fixed_point_solver():
    b = torch.randn(2, 3, dtype=DT, requires_grad=True)
    G = lambda y, b: y - (0.5 * torch.tanh(y) + b)  # contraction: y = 0.5 tanh(y) + b
    y = root(G, torch.zeros(2, 3, dtype=DT), b, solver="fixed_point", batched=True)
    torch.testing.assert_close(G(y.detach(), b.detach()), torch.zeros(2, 3, dtype=DT), atol=1e-8, rtol=0)
    assert gradcheck(
        lambda b: root(G, torch.zeros(2, 3, dtype=DT), b, solver="fixed_point", batched=True), (b,)
    )


# ---------------------------------------------------------------- diagnostics, warnings, errors


def test_info_reports_forward_and_backward_by_value():
    A, b = spd(6, 6, (2,)).requires_grad_(), torch.randn(2, 6, dtype=DT)
    y, info = argmin(quad_batched, torch.zeros(2, 6, dtype=DT), A, b, return_info=True)
    assert info.stationarity_residual.shape == (2,) and bool((info.stationarity_residual < 1e-8).all())
    assert info.layer == "argmin" and info.threshold == info.tol
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.tol = 1.0  # frozen: an info never changes after it is returned
    snapshot = dataclasses.asdict(info)
    with diffmpc.record_backward() as records:
        y.sum().backward(retain_graph=True)
        y.sum().backward()
    assert dataclasses.asdict(info).keys() == snapshot.keys() and not hasattr(info, "backward")
    # one immutable record per backward call, tied to the forward by call_id
    assert len(records) == 2 and all(r.call_id == info.call_id and r.layer == "argmin" for r in records)
    rec = records[0]
    assert rec.solve.method == "cg" and rec.strategy.startswith("CG(")
    assert bool(rec.solve.converged.all()) and bool((rec.solve.iterations <= 12).all())
    assert bool((rec.solve.residual < 1e-8).all()) and bool((rec.solve.residual <= rec.solve.threshold).all())
    assert rec.converged and rec.iterations == int(rec.solve.iterations.max())
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.notes = ("x",)
    # outside a record_backward block nothing is collected
    y2 = argmin(quad_batched, torch.zeros(2, 6, dtype=DT), A, b)
    y2.sum().backward()
    assert len(records) == 2


def test_warns_when_forward_not_stationary_and_strict_raises():
    A, b = spd(4, 7), torch.randn(4, dtype=DT)
    weak = diffmpc.solvers.GradientDescent(lr=1e-3, max_iter=3)
    with pytest.warns(ConvergenceWarning, match="not stationary"):
        argmin(quad, torch.zeros(4, dtype=DT), A, b, solver=weak)
    with pytest.raises(ConvergenceError, match="not stationary"):
        argmin(quad, torch.zeros(4, dtype=DT), A, b, solver=weak, strict=True)


def test_warns_when_backward_solve_does_not_converge():
    A = spd(30, 8) + 1e4 * torch.diag(torch.linspace(0, 1, 30, dtype=DT))
    b = torch.randn(30, dtype=DT, requires_grad=True)
    y = argmin(quad, torch.zeros(30, dtype=DT), A, b, backward_max_iter=2)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        y.sum().backward()


def test_negative_curvature_is_detected_and_minres_used():
    # A saddle point: H = diag(1, −1). The Newton solver lands on it (quadratic), CG sees pᵀHp < 0.
    H = torch.diag(torch.tensor([1.0, -1.0], dtype=DT))
    b = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    saddle = lambda y, b: 0.5 * y @ H @ y - b @ y
    solve_exact = lambda fun, y0: torch.linalg.solve(H, b.detach())
    y = argmin(saddle, torch.zeros(2, dtype=DT), b, solver=solve_exact)
    with pytest.warns(ConvergenceWarning, match="not positive definite"), diffmpc.record_backward() as recs:
        (g,) = torch.autograd.grad(y.sum(), b)
    torch.testing.assert_close(g, torch.linalg.solve(H, torch.ones(2, dtype=DT)))
    assert bool(recs[0].solve.negative_curvature.any()) and recs[0].solve.method == "cg+minres"
    assert any("MINRES" in n for n in recs[0].notes)


def test_damping_regularises_singular_hessian():
    # f = ½(y₁ − b)² is flat in y₂: H singular. With damping the system is solvable; dy₁/db = 1/(1+ε).
    f = lambda y, b: 0.5 * (y[0] - b) ** 2
    b = torch.tensor(1.0, dtype=DT, requires_grad=True)
    y = argmin(f, torch.zeros(2, dtype=DT), b, damping=1e-8)
    (g,) = torch.autograd.grad(y[0], b)
    torch.testing.assert_close(g, torch.tensor(1.0, dtype=DT), rtol=1e-6, atol=0)


def test_bad_inputs_raise_clear_errors():
    A, b = spd(3, 9), torch.randn(3, dtype=DT)
    with pytest.raises(ValueError, match="scores of shape"):
        argmin(lambda y, A, b: torch.stack([y.sum(), y.sum()]), torch.zeros(3, dtype=DT), A, b)
    with pytest.raises(ValueError, match="NaN or inf"):
        argmin(lambda y, A, b: quad(y, A, b) * float("nan"), torch.zeros(3, dtype=DT), A, b)
    with pytest.raises(ValueError, match="y0 contains NaN"):
        argmin(quad, torch.full((3,), float("nan"), dtype=DT), A, b)
    with pytest.raises(TypeError, match="floating-point"):
        argmin(quad, torch.zeros(3, dtype=torch.long), A, b)
    with pytest.raises(TypeError, match="dtype"):
        argmin(quad, torch.zeros(3, dtype=torch.float32), A, b)
    with pytest.raises(ValueError, match="unknown backward 'adjoint'.*'cg'"):
        argmin(quad, torch.zeros(3, dtype=DT), A, b, backward="adjoint")
    with pytest.raises(ValueError, match="unknown minimisation solver 'adam'.*newton"):
        argmin(quad, torch.zeros(3, dtype=DT), A, b, solver="adam")
    with pytest.raises(ValueError, match="shaped like y"):
        root(lambda y: y.sum(), torch.zeros(3, dtype=DT))
    with pytest.raises(ConvergenceError, match="NaN/inf"):
        argmin(quad, torch.zeros(3, dtype=DT), A, b, solver=lambda fun, y0: y0 * float("inf"))
    # finite score, NaN gradient at y* (√|y| at 0): an error naming non-differentiability, not a warning
    with pytest.raises(ValueError, match="gradient is NaN at the solution"):
        argmin(lambda y: torch.sqrt(y.abs()).sum(), torch.zeros(3, dtype=DT))


def test_float32_works_and_no_warning():
    A, b = spd(4, 10).float(), torch.randn(4).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        y = argmin(quad, torch.zeros(4), A, b)
        (g,) = torch.autograd.grad(y.sum(), b)
    torch.testing.assert_close(g, torch.linalg.solve(A, torch.ones(4)), rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 6), batch=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_random_well_conditioned_problems_match_dense(n, batch, seed):
    A = spd(n, seed, (batch,))
    b = torch.randn(batch, n, dtype=DT, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    w = torch.randn(batch, n, dtype=DT)
    y_cg = argmin(quad_batched, torch.zeros(batch, n, dtype=DT), A, b)
    (g_cg,) = torch.autograd.grad((y_cg * w).sum(), b)
    torch.testing.assert_close(g_cg, torch.linalg.solve(A, w.unsqueeze(-1)).squeeze(-1))


# ---------------------------------------------------------------- the linear solvers themselves


@pytest.mark.parametrize("method", diffmpc.linalg.METHODS)
def test_linear_solvers_batched(method):
    g = torch.Generator().manual_seed(11)
    if method in ("cg",):
        A = spd(7, 12, (3,))
    elif method == "minres":
        A = spd(7, 12, (3,)) - 8 * torch.eye(7, dtype=DT)  # symmetric indefinite
    else:
        A = torch.randn(3, 7, 7, dtype=DT, generator=g) + 4 * torch.eye(7, dtype=DT)
    b = torch.randn(3, 7, dtype=DT, generator=g)
    mv = lambda v: torch.einsum("bij,bj->bi", A, v)
    rmv = lambda v: torch.einsum("bji,bj->bi", A, v)
    x, info = diffmpc.linalg.solve(method, mv, b, rmatvec=rmv, rtol=1e-10)
    torch.testing.assert_close(x, torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1))
    assert bool(info.converged.all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """argmin (CG backward) and root (Kepler, normal-equation CG backward) on CUDA equal the CPU run."""
    A, b = spd(4, 21, batch=(3,)), torch.randn(3, 4, generator=torch.Generator().manual_seed(22), dtype=DT)
    e, M = torch.tensor([0.1, 0.5, 0.9], dtype=DT), torch.tensor([0.3, 1.0, 2.5], dtype=DT)
    out = {}
    for dev in ("cpu", "cuda"):
        Ad, bd, ed, Md = (t.to(dev).requires_grad_() for t in (A, b, e, M))
        y = argmin(quad_batched, torch.zeros(3, 4, dtype=DT, device=dev), Ad, bd)
        E = root(kepler_residual, Md.detach().clone(), ed, Md)
        assert y.device.type == dev and E.device.type == dev
        grads = torch.autograd.grad(y.pow(2).sum() + E.sum(), (Ad, bd, ed, Md))
        out[dev] = [y.detach().cpu(), E.detach().cpu()] + [g.cpu() for g in grads]
    for a, c in zip(out["cpu"], out["cuda"], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-8, atol=1e-9)
