"""Backward strategies as immutable objects, their string aliases, the shared IFT front end, and what
``converged`` means (exactly the documented test; slack only through a named ``accept_factor``)."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import warnings

import pytest
import torch
from test_implicit import DT, quad, spd
from test_implicit import kepler_residual as kepler
from torch.autograd import gradcheck

import diffmpc
from diffmpc import CG, GMRES, MINRES, ConvergenceWarning, Dense, NormalCG, Unroll, argmin, dare, odeint, root
from diffmpc._impl.linesearch import armijo
from diffmpc.solvers import NewtonCG, NewtonKrylov, NewtonRoot, default_tol, make_minimizer, make_root_solver

# ------------------------------------------------------------------------------ strategy objects + aliases


@pytest.mark.parametrize("strategy", [CG(), MINRES(), NormalCG(), GMRES(), Dense(), Unroll(),
                                      CG(tol=1e-12, max_iter=50), GMRES(restart=2, max_iter=60)])
def test_argmin_strategy_objects_gradcheck(strategy):
    A = spd(4, 0).requires_grad_()
    b = torch.randn(4, dtype=DT, requires_grad=True)
    fn = lambda A, b: argmin(quad, torch.zeros(4, dtype=DT), A, b, backward=strategy)
    assert gradcheck(fn, (A, b), nondet_tol=1e-12)  # GMRES's LAPACK lstsq may differ in the last bit


def test_string_and_object_give_the_same_gradient_and_report_the_algorithm():
    A = spd(5, 1, (3,))
    b = torch.randn(3, 5, dtype=DT, requires_grad=True)
    f = lambda y, A, b: 0.5 * torch.einsum("bi,bij,bj->b", y, A, y) - (b * y).sum(-1) + 0.1 * (y**4).sum(-1)
    grads, methods = {}, {}
    for key, bw in [("cg", "cg"), ("CG", CG()), ("minres", "minres"), ("MINRES", MINRES()),
                    ("dense", Dense()), ("normal_cg", NormalCG())]:
        y = argmin(f, torch.zeros(3, 5, dtype=DT), A, b, backward=bw)
        with diffmpc.record_backward() as recs:
            (grads[key],) = torch.autograd.grad(y.pow(2).sum(), b)
        methods[key] = recs[0].solve.method
    assert methods == {"cg": "cg", "CG": "cg", "minres": "minres", "MINRES": "minres", "dense": "dense",
                       "normal_cg": "normal_cg"}
    for key in grads:
        torch.testing.assert_close(grads[key], grads["dense"], rtol=1e-8, atol=1e-10)


def test_root_cg_is_the_normal_cg_alias_and_plain_cg_is_refused():
    e = torch.tensor([0.1, 0.5, 0.9], dtype=DT, requires_grad=True)
    M = torch.tensor([0.3, 1.0, 2.5], dtype=DT)
    out = {}
    for bw in ("cg", "normal_cg", NormalCG(), GMRES(), Dense()):
        E = root(kepler, M.clone(), e, M, batched=True, backward=bw)
        with diffmpc.record_backward() as recs:
            (out[repr(bw)],) = torch.autograd.grad(E.sum(), e)
        assert recs[0].layer == "root"
        if bw in ("cg", "normal_cg") or isinstance(bw, NormalCG):
            assert recs[0].solve.method == "normal_cg"  # the alias reports the algorithm that ran
    Ed = E.detach()
    closed = torch.sin(Ed) / (1 - e.detach() * torch.cos(Ed))
    for g in out.values():
        torch.testing.assert_close(g, closed)
    for sym in (CG(), MINRES()):
        with pytest.raises(ValueError, match="needs a symmetric operator.*NormalCG"):
            root(kepler, M.clone(), e, M, batched=True, backward=sym)


def test_dare_strategy_objects_match_the_closed_form():
    torch.manual_seed(3)
    A = torch.randn(3, 3, dtype=DT) * 0.5
    B = torch.randn(3, 2, dtype=DT)
    Q, R = torch.eye(3, dtype=DT), torch.eye(2, dtype=DT)
    leaves = [t.clone().requires_grad_() for t in (A, B, Q, R)]
    W = torch.randn(3, 3, dtype=DT)
    ref = torch.autograd.grad((dare(*leaves, backward="lyapunov") * W).sum(), leaves)
    for bw in ("cg", NormalCG(), GMRES(), Dense(), NormalCG(tol=1e-12, max_iter=500)):
        with diffmpc.record_backward() as recs:
            got = torch.autograd.grad((dare(*leaves, backward=bw) * W).sum(), leaves)
        assert recs[0].layer == "dare" and recs[0].converged
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="symmetric operator"):
        dare(*leaves, backward=CG())
    with pytest.raises(ValueError, match="not available here"):
        dare(*leaves, backward=Unroll())


def test_odeint_strategy_objects_and_alias():
    torch.manual_seed(4)
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=DT, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=DT)
    t = torch.linspace(0, 1, 6, dtype=DT)
    field = lambda t, y: y @ A.T
    grads = {}
    for bw in ("cg", "normal_cg", NormalCG(tol=1e-12), GMRES(), Dense(), Unroll()):
        ys = odeint(field, y0, t, backward=bw, params=[A], solver="newton", options={"tol": 1e-12})
        (grads[repr(bw)],) = torch.autograd.grad(ys.pow(2).sum(), A)
    for g in grads.values():
        torch.testing.assert_close(g, grads["'normal_cg'"], rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="set them in the object"):
        odeint(field, y0, t, backward=NormalCG(), options={"backward_tol": 1e-6})


def test_legacy_keywords_fill_a_named_strategy_but_conflict_with_an_object():
    A, b = spd(3, 2), torch.randn(3, dtype=DT, requires_grad=True)
    y = argmin(quad, torch.zeros(3, dtype=DT), A, b, backward="cg", backward_tol=1e-6, backward_max_iter=7,
               damping=1e-3)
    with diffmpc.record_backward() as recs:
        y.sum().backward()
    assert recs[0].strategy == repr(CG(tol=1e-6, max_iter=7, damping=1e-3))
    with pytest.raises(ValueError, match="backward_tol.*set them in the object"):
        argmin(quad, torch.zeros(3, dtype=DT), A, b, backward=CG(), backward_tol=1e-6)
    with pytest.raises(ValueError, match="unknown backward 'magic'"):
        argmin(quad, torch.zeros(3, dtype=DT), A, b, backward="magic")
    with pytest.raises(TypeError, match="strategy object"):
        argmin(quad, torch.zeros(3, dtype=DT), A, b, backward=42)


def test_default_tolerances_come_from_one_table():
    defaults = [default_tol(dt) for dt in (torch.float64, torch.float32, torch.float16)]
    assert defaults == [1e-9, 1e-4, 1e-2]
    A = spd(3, 5)
    for dtype, linear in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        b = torch.randn(3, dtype=dtype, requires_grad=True)
        y, info = argmin(quad, torch.zeros(3, dtype=dtype), A.to(dtype), b, return_info=True)
        assert info.tol == default_tol(dtype)
        with diffmpc.record_backward() as recs:
            y.sum().backward()
        assert recs[0].strategy == repr(CG(tol=linear))


@pytest.mark.parametrize("bad", [dict(tol=-1.0), dict(tol=float("nan")), dict(max_iter=0), dict(damping=-1.0),
                                 dict(damping=float("inf"))])
def test_strategy_fields_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        CG(**bad)


def test_strategies_are_immutable_and_hashable():
    s = NormalCG(tol=1e-8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tol = 1.0
    assert {s: 1}[NormalCG(tol=1e-8)] == 1 and NormalCG(tol=1e-8) != NormalCG(tol=1e-7)
    with pytest.raises(ValueError, match="stop"):
        NormalCG(stop="sometimes")
    with pytest.raises(ValueError, match="restart"):
        GMRES(restart=0)


def test_solver_names_are_honest_and_newton_stays_an_alias():
    assert isinstance(make_minimizer("newton"), NewtonCG)
    assert isinstance(make_minimizer("newton_cg"), NewtonCG)
    assert isinstance(make_root_solver("newton"), NewtonKrylov)
    assert isinstance(make_root_solver("newton_krylov"), NewtonKrylov) and NewtonRoot is NewtonKrylov
    assert isinstance(make_minimizer(None), NewtonCG) and isinstance(make_root_solver(None), NewtonKrylov)


# ------------------------------------------------------------------------------------ converged semantics


@pytest.mark.parametrize("method", diffmpc.linalg.METHODS)
@pytest.mark.parametrize("max_iter", [None, 2])
def test_linalg_converged_is_exactly_the_documented_test(method, max_iter):
    g = torch.Generator().manual_seed(7)
    if method in ("cg", "minres"):
        A = spd(12, 8, (4,)) + 50 * torch.diag(torch.linspace(0, 1, 12, dtype=DT))
    else:
        A = torch.randn(4, 12, 12, dtype=DT, generator=g) + 5 * torch.eye(12, dtype=DT)
    b = torch.randn(4, 12, dtype=DT, generator=g)
    mv = lambda v: torch.einsum("bij,bj->bi", A, v)
    rmv = lambda v: torch.einsum("bji,bj->bi", A, v)
    rtol = 1e-9
    x, info = diffmpc.linalg.solve(method, mv, b, rmatvec=rmv, rtol=rtol, max_iter=max_iter)
    true = torch.linalg.vector_norm(b - mv(x), dim=-1)
    torch.testing.assert_close(info.residual, true)  # the true residual, not a recursive estimate
    torch.testing.assert_close(info.threshold, rtol * torch.linalg.vector_norm(b, dim=-1))
    assert torch.equal(info.converged, info.residual <= info.threshold)  # no hidden slack
    if max_iter is None:
        assert bool(info.converged.all())
    elif method != "dense":
        assert not bool(info.converged.all())  # 2 iterations cannot solve these 12×12 systems


def test_normal_cg_stopping_rules_on_a_least_squares_problem():
    # A singular 3×3 system with b outside range(A): ‖b − Ax‖ cannot reach 0, ‖Aᵀ(b − Ax)‖ can.
    A = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]], dtype=DT)
    b = torch.tensor([[1.0, 1.0, 1.0]], dtype=DT)
    mv = lambda v: torch.einsum("bij,bj->bi", A, v)
    rmv = lambda v: torch.einsum("bji,bj->bi", A, v)
    _, info = diffmpc.linalg.normal_cg(mv, rmv, b, rtol=1e-10, max_iter=20)
    assert not bool(info.converged.any()) and float(info.residual) == pytest.approx(1.0)
    x, info = diffmpc.linalg.normal_cg(mv, rmv, b, rtol=1e-10, max_iter=20, stop="normal")
    assert bool(info.converged.all()) and float(info.residual) <= 1e-10 * 1.0
    torch.testing.assert_close(x, torch.tensor([[1.0, 0.5, 0.0]], dtype=DT))  # the minimum-norm solution


def test_forward_accept_factor_is_named_documented_and_reported():
    A, b = spd(4, 7), torch.randn(4, dtype=DT)
    y_exact = torch.linalg.solve(A, b)
    # A black box that stops a little short of the tolerance: ‖∇f‖ ≈ 3e-9 > tol = 1e-9.
    near = lambda fun, y0: y_exact + 3e-9 * torch.linalg.solve(A, torch.ones(4, dtype=DT)) / 2.0
    res = float(torch.linalg.vector_norm(A @ near(None, None) - b))
    assert 1e-9 < res < 1e-8
    with pytest.warns(ConvergenceWarning, match=r"not stationary.*tol=1e-09"):
        _, info = argmin(quad, torch.zeros(4, dtype=DT), A, b, solver=near, return_info=True)
    assert not bool(info.converged.all()) and info.accept_factor == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        _, info = argmin(quad, torch.zeros(4, dtype=DT), A, b, solver=near, return_info=True,
                         accept_factor=10)
    assert bool(info.converged.all()) and info.threshold == pytest.approx(1e-8)
    with pytest.warns(ConvergenceWarning, match=r"tol=1e-09, accept_factor=2: threshold 2e-09"):
        argmin(quad, torch.zeros(4, dtype=DT), A, b, solver=near, accept_factor=2)
    with pytest.raises(ValueError, match="accept_factor"):
        argmin(quad, torch.zeros(4, dtype=DT), A, b, accept_factor=0.5)


def test_lbfgs_meets_the_per_sample_test_without_slack():
    # LBFGS stops on max|∇Σ_b f_b|; its threshold is set so that each sample's ‖∇f_b‖ ≤ tol follows.
    A, b = spd(6, 9, (3,)), torch.randn(3, 6, dtype=DT)
    f = lambda y, A, b: 0.5 * torch.einsum("bi,bij,bj->b", y, A, y) - (b * y).sum(-1) + 0.05 * (y**4).sum(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        _, info = argmin(f, torch.zeros(3, 6, dtype=DT), A, b, solver="lbfgs", tol=1e-7, return_info=True)
    assert bool((info.stationarity_residual <= info.tol).all())


def test_backward_nonconvergence_message_reports_residual_and_threshold():
    A = spd(30, 8) + 1e4 * torch.diag(torch.linspace(0, 1, 30, dtype=DT))
    b = torch.randn(30, dtype=DT, requires_grad=True)
    y = argmin(quad, torch.zeros(30, dtype=DT), A, b, backward=CG(max_iter=2))
    with pytest.warns(ConvergenceWarning, match=r"did not converge.*threshold tol·‖v‖.*residual/threshold"), \
            diffmpc.record_backward() as recs:
        y.sum().backward()
    s = recs[0].solve
    assert not recs[0].converged and bool((s.residual > s.threshold).all())


# ------------------------------------------------------------------------------------------ shared pieces


def test_armijo_line_search():
    f = lambda y: 0.5 * (y**2).sum(-1)
    y = torch.tensor([[2.0], [2.0], [2.0]], dtype=DT)
    d = torch.tensor([[-2.0], [-1.0], [4.0]], dtype=DT)  # Newton step, half step, ascent direction
    f0, slope = f(y), (y * d).sum(-1)
    active = torch.tensor([True, True, True])
    alpha = armijo(f, y, d, f0, slope, active)
    assert alpha.tolist()[:2] == [1.0, 1.0] and alpha[2] == 0.0  # never uphill
    alpha = armijo(f, y, d, f0, slope, torch.tensor([True, True, False]))
    assert alpha[2] == 1.0  # inactive samples are left alone


def test_no_private_helper_is_imported_across_public_modules():
    """Private helpers live in diffmpc._impl; a public module never imports another's ``_name``."""
    root_dir = pathlib.Path(diffmpc.__file__).parent
    offenders = []
    for path in root_dir.rglob("*.py"):
        if "_impl" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            internal = (node.module or "").startswith("_impl") if isinstance(node, ast.ImportFrom) else True
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and not internal:
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert offenders == []


def test_record_backward_collects_from_other_threads_and_nests():
    """Autograd may run a backward on another thread (CUDA): records are process-wide, not thread-local."""
    import threading

    A, b = spd(3, 11), torch.randn(3, dtype=DT, requires_grad=True)
    y, info = argmin(quad, torch.zeros(3, dtype=DT), A, b, return_info=True)
    with diffmpc.record_backward() as outer:
        with diffmpc.record_backward() as inner:
            worker = threading.Thread(target=lambda: y.sum().backward())
            worker.start()
            worker.join()
    assert [r.call_id for r in outer] == [r.call_id for r in inner] == [info.call_id]
    assert outer[0] is inner[0]  # the same immutable record, delivered to both blocks


@pytest.mark.parametrize("method", diffmpc.linalg.METHODS)
def test_linalg_empty_batch(method):
    b = torch.zeros(0, 3, dtype=DT)
    x, info = diffmpc.linalg.solve(method, lambda v: 2 * v, b, rmatvec=lambda v: 2 * v)
    assert x.shape == (0, 3) and info.residual.shape == (0,) and info.converged.shape == (0,)
