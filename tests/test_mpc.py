"""Tests of the MPC layer (diffmpc.mpc), its samplers (diffmpc.sampling) and modules (diffmpc.nn).

Gradients are checked in float64 against the closed-form finite-horizon LQR solution (Riccati recursion,
differentiated by autograd) and against central finite differences of the layer itself.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from diffmpc import CG, MINRES, MPC, ConvergenceError, ConvergenceWarning, record_backward
from diffmpc.nn import MLPDynamics, QuadraticCost, SaturatingCost, TargetStateCost
from diffmpc.sampling import cem, random_shooting, shift_plan

DT = torch.float64


def lq_problem(n=3, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.eye(n, dtype=DT) + 0.2 * torch.randn(n, n, generator=g, dtype=DT)).requires_grad_()
    B = torch.randn(n, m, generator=g, dtype=DT).requires_grad_()
    q = (0.5 + torch.rand(n, generator=g, dtype=DT)).requires_grad_()
    r = (0.5 + torch.rand(m, generator=g, dtype=DT)).requires_grad_()

    def dyn(x, u):
        return x @ A.T + u @ B.T

    def cost(x, u):
        return 0.5 * (q * x * x).sum(-1) + 0.5 * (r * u * u).sum(-1)

    def terminal(x):
        return 0.5 * (q * x * x).sum(-1)

    return A, B, q, r, dyn, cost, terminal


def riccati_plan(A, B, q, r, x0, H):
    """Closed-form open-loop plan of the finite-horizon LQ problem (backward Riccati, forward rollout)."""
    Q, R = torch.diag(q), torch.diag(r)
    P, gains = Q, []
    for _ in range(H):
        K = torch.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        P = Q + A.T @ P @ (A - B @ K)
        gains.append(K)
    x, us = x0, []
    for K in reversed(gains):
        u = -x @ K.T
        us.append(u)
        x = x @ A.T + u @ B.T
    return torch.stack(us, 1)


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("backward", ["cg", "dense", "CG-object", "MINRES-object"])
def test_lq_matches_riccati_plan_and_gradients(bounded, backward):
    # strategy objects (diffmpc.backward) pass through the MPC layer like their string names
    backward = {"CG-object": CG(tol=1e-12), "MINRES-object": MINRES(tol=1e-12)}.get(backward, backward)
    H, n, m = 6, 3, 2
    A, B, q, r, dyn, cost, terminal = lq_problem(n, m)
    x0 = torch.randn(5, n, dtype=DT, generator=torch.Generator().manual_seed(1)).requires_grad_()
    kw = dict(u_low=-50.0, u_high=50.0, action_dim=m, bound_reg=0.0, n_samples=32, seed=0) if bounded else \
        dict(action_dim=m, sampler=None)
    mpc = MPC(dyn, cost, H, terminal_cost=terminal, params=[A, B, q, r], backward=backward, **kw)
    u, info = mpc(x0)
    ref = riccati_plan(A, B, q, r, x0, H)
    assert u.shape == (5, H, m)
    assert torch.allclose(u, ref, atol=1e-8)
    assert bool(info.converged.all()) and float(info.stationarity_residual.max()) < 1e-8
    w = torch.randn_like(u)
    with record_backward() as records:
        got = torch.autograd.grad((u * w).sum(), [x0, A, B, q, r])
    want = torch.autograd.grad((ref * w).sum(), [x0, A, B, q, r])
    for g1, g2 in zip(got, want, strict=True):
        assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-8)
    assert [rec.call_id for rec in records] == [info.implicit.call_id] and records[0].converged


def pendulum_problem():
    """A nonlinear, bounded, 2-state problem with learnable dynamics parameters (float64)."""
    theta = torch.tensor([0.1, 1.0, 0.5], dtype=DT, requires_grad=True)  # damping, gain, target

    def dyn(x, u):
        th, om = x[:, 0], x[:, 1]
        om2 = om + 0.1 * (-torch.sin(th) - theta[0] * om + theta[1] * u[:, 0])
        return torch.stack([th + 0.1 * om2, om2], -1)

    def cost(x, u):
        return (x[:, 0] - theta[2]) ** 2 + 0.1 * x[:, 1] ** 2 + 0.01 * u[:, 0] ** 2

    return theta, dyn, cost


def finite_difference(fn, t, eps=1e-6):
    flat = t.detach().clone().flatten()
    out = []
    for i in range(flat.numel()):
        hi, lo = flat.clone(), flat.clone()
        hi[i] += eps
        lo[i] -= eps
        out.append((fn(hi.view_as(t)) - fn(lo.view_as(t))) / (2 * eps))
    return torch.stack(out).view_as(t)


@pytest.mark.parametrize("u_max", [5.0, 0.6])  # 5: interior optimum; 0.6: several controls at the bound
def test_bounded_nonlinear_gradients_match_finite_differences(u_max):
    theta, dyn, cost = pendulum_problem()
    x0 = torch.tensor([[0.3, -0.2], [-0.4, 0.5]], dtype=DT, requires_grad=True)
    mpc = MPC(dyn, cost, 8, -u_max, u_max, params=[theta], sampler=None, tol=1e-11)
    u, info = mpc(x0)
    assert float(info.stationarity_residual.max()) < 1e-10
    at_bound = (u.abs() > u_max - 1e-2)
    assert bool(at_bound.any()) == (u_max < 1)
    w = torch.linspace(-1, 1, u.numel(), dtype=DT).view_as(u)
    gx, gth = torch.autograd.grad((u * w).sum(), [x0, theta])

    def loss_x(x):
        with torch.no_grad():
            return (mpc(x)[0] * w).sum()

    def loss_th(t):
        with torch.no_grad():
            old = theta.detach().clone()
            theta.data.copy_(t)
            try:
                return (mpc(x0.detach())[0] * w).sum()
            finally:
                theta.data.copy_(old)

    assert torch.allclose(gx, finite_difference(loss_x, x0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(gth, finite_difference(loss_th, theta), rtol=1e-4, atol=1e-6)


def test_active_bound_has_near_zero_sensitivity():
    # Target far away: the first controls saturate; their derivative w.r.t. x0 must vanish (active set).
    def dyn(x, u):
        return x + 0.1 * u

    def cost(x):  # state-only: evaluated at the next state, so every control matters
        return ((x - 10.0) ** 2).sum(-1)

    x0 = torch.zeros(1, 1, dtype=DT, requires_grad=True)
    mpc = MPC(dyn, cost, 4, -1.0, 1.0, sampler=None)
    u, info = mpc(x0)
    assert bool(info.converged.all())
    assert torch.allclose(u, torch.ones_like(u), atol=1e-3)
    (g,) = torch.autograd.grad(u[0, 0, 0], x0)
    assert abs(float(g)) < 1e-3


def test_batched_solve_equals_individual_solves():
    theta, dyn, cost = pendulum_problem()
    x0 = torch.tensor([[0.3, -0.2], [-0.4, 0.5], [1.0, 0.0]], dtype=DT)
    mpc = MPC(dyn, cost, 6, -1.0, 1.0, params=[theta], sampler=None)
    u_all, _ = mpc(x0)
    for i in range(3):
        u_i, _ = mpc(x0[i])
        assert u_i.shape == (6, 1)
        assert torch.allclose(u_all[i], u_i, atol=1e-7)


def test_samplers_and_warm_start():
    theta, dyn, cost = pendulum_problem()
    x0 = torch.tensor([[0.3, -0.2], [-0.4, 0.5]], dtype=DT)
    low, high = torch.tensor([-1.0], dtype=DT), torch.tensor([1.0], dtype=DT)
    mpc = MPC(dyn, cost, 5, -1.0, 1.0, sampler="rs", n_samples=64, seed=3)

    u_rs, c_rs = random_shooting(mpc.horizon_cost, x0, 5, low, high, 64,
                                 generator=torch.Generator().manual_seed(0))
    assert u_rs.shape == (2, 5, 1) and bool((u_rs.abs() <= 1).all())
    assert torch.allclose(c_rs, mpc.horizon_cost(x0, u_rs))
    u_cem, c_cem = cem(mpc.horizon_cost, x0, 5, low, high, 64, 8, 4,
                       generator=torch.Generator().manual_seed(0))
    assert bool((c_cem <= c_rs + 1e-12).all())  # 4 CEM rounds of 64 beat one RS round of 64 here
    # a warm start is always a candidate: the sampler can only improve on it
    u_opt, info = mpc(x0)
    _, c_warm = random_shooting(mpc.horizon_cost, x0, 5, low, high, 4, u_init=u_opt)
    assert torch.allclose(c_warm, info.cost)
    assert bool((info.cost <= info.sample_cost + 1e-12).all())  # refinement never goes uphill
    assert torch.equal(shift_plan(u_opt)[:, :-1], u_opt[:, 1:])
    assert torch.equal(shift_plan(u_opt)[:, -1], u_opt[:, -1])
    # deterministic under a seed
    mpc.seed(7)
    a, _ = mpc(x0)
    mpc.seed(7)
    b, _ = mpc(x0)
    assert torch.equal(a, b)


def test_state_only_cost_is_evaluated_at_next_state():
    calls = []

    def dyn(x, u):
        return x + u

    def cost(x):
        calls.append(x.clone())
        return (x * x).sum(-1)

    mpc = MPC(dyn, cost, 3, -5.0, 5.0, sampler=None, bound_reg=0.0)
    assert mpc.settings.cost_on == "next" and mpc.settings.state_only_cost
    x0 = torch.tensor([[1.0]], dtype=DT)
    u = torch.tensor([[[0.5], [0.5], [0.5]]], dtype=DT)
    calls.clear()
    assert torch.allclose(mpc.horizon_cost(x0, u), torch.tensor([1.5**2 + 2**2 + 2.5**2], dtype=DT))
    u_star, _ = mpc(x0)
    assert torch.allclose(u_star[0, 0], torch.tensor([-1.0], dtype=DT), atol=1e-6)
    with pytest.raises(ValueError, match="ignores the last control"):
        MPC(dyn, cost, 3, -1.0, 1.0, cost_on="current")


def test_bad_inputs_give_clear_errors():
    theta, dyn, cost = pendulum_problem()
    with pytest.raises(ValueError, match="strictly below"):
        MPC(dyn, cost, 5, 1.0, -1.0)
    with pytest.raises(ValueError, match="both u_low and u_high"):
        MPC(dyn, cost, 5, -1.0, None)
    with pytest.raises(ValueError, match="horizon"):
        MPC(dyn, cost, 0, -1.0, 1.0)
    with pytest.raises(ValueError, match="action_dim"):
        MPC(dyn, cost, 5)
    with pytest.raises(ValueError, match="sampler"):
        MPC(dyn, cost, 5, -1.0, 1.0, sampler="grid")
    mpc = MPC(dyn, cost, 5, -1.0, 1.0, sampler=None)
    with pytest.raises(ValueError, match="x0 must have shape"):
        mpc(torch.zeros(2, 2, 2, dtype=DT))
    with pytest.raises(ValueError, match="u_init must have shape"):
        mpc(torch.zeros(2, 2, dtype=DT), u_init=torch.zeros(2, 4, 1, dtype=DT))
    with pytest.raises(TypeError, match="floating-point"):
        mpc(torch.zeros(2, 2, dtype=torch.long))
    bad = MPC(lambda x, u: x[:, :1], cost, 5, -1.0, 1.0, sampler=None)
    with pytest.raises(ValueError, match="next state shaped like x"):
        bad(torch.zeros(2, 2, dtype=DT))
    bad_cost = MPC(dyn, lambda x, u: x, 5, -1.0, 1.0, sampler=None)
    with pytest.raises(ValueError, match="one value per sample"):
        bad_cost(torch.zeros(2, 2, dtype=DT))


def test_non_convergence_warns_with_residuals():
    theta, dyn, cost = pendulum_problem()
    mpc = MPC(dyn, cost, 8, -1.0, 1.0, sampler=None, max_iter=1)
    with pytest.warns(ConvergenceWarning, match="1 of 1 solves did not converge.*KKT residual"):
        _, info = mpc(torch.tensor([[0.3, -0.2]], dtype=DT))
    assert not bool(info.converged.any()) and float(info.stationarity_residual[0]) > info.tol
    with pytest.raises(ConvergenceError, match="did not converge"):
        MPC(dyn, cost, 8, -1.0, 1.0, sampler=None, max_iter=1, strict=True)(
            torch.tensor([[0.3, -0.2]], dtype=DT))


def test_neural_dynamics_and_learnable_costs_get_correct_gradients():
    torch.manual_seed(0)
    dyn = MLPDynamics(2, 1, hidden=(16,)).double()
    cost = QuadraticCost(torch.tensor([1.0, 0.1]), torch.tensor([0.05]), learn=("Q", "target")).double()
    mpc = MPC(dyn, cost, 5, -1.0, 1.0, sampler="rs", n_samples=32, seed=0, tol=1e-11)
    x0 = torch.tensor([[0.5, -0.3], [-0.2, 0.1]], dtype=DT)
    u, info = mpc(x0)
    assert bool(info.converged.all())
    params = mpc.parameters_for_gradient()
    assert len(params) == len(list(dyn.parameters())) + 2
    w = torch.linspace(-1, 1, u.numel(), dtype=DT).view_as(u)
    grads = torch.autograd.grad((u * w).sum(), params)
    # compare the gradient of the cost target (and one MLP weight) with finite differences, warm-started
    # from the solution so that the perturbed solve stays in the same basin
    plan = u.detach()
    for p, g in [(cost.target, grads[-1]), (dyn.net[-1].bias, grads[len(list(dyn.parameters())) - 1])]:
        def loss(v, p=p):
            old = p.detach().clone()
            with torch.no_grad():
                p.copy_(v)
                try:
                    return (MPC(dyn, cost, 5, -1.0, 1.0, sampler=None, tol=1e-11)(x0, plan)[0] * w).sum()
                finally:
                    p.copy_(old)
        assert torch.allclose(g, finite_difference(loss, p), rtol=1e-4, atol=1e-6)


def test_cost_modules():
    cost = QuadraticCost(torch.tensor([[2.0, 0.5], [0.5, 1.0]]), torch.tensor([[0.3]]), diag=False).double()
    assert torch.allclose(cost.Q, torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT), atol=1e-12)
    x, u = torch.tensor([[1.0, 2.0]], dtype=DT), torch.tensor([[3.0]], dtype=DT)
    assert torch.allclose(cost(x, u), torch.tensor([0.5 * (2 + 2 + 4) + 0.5 * 0.3 * 9], dtype=DT))
    tc = TargetStateCost(torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([2.0, 1.0], dtype=DT))
    assert torch.allclose(tc(x), torch.tensor([0.0 + 4.0], dtype=DT))
    sc = SaturatingCost(torch.zeros(2, dtype=DT), width=0.5)
    assert torch.allclose(sc(x), 1 - torch.exp(torch.tensor([-0.5 * (4 + 16)], dtype=DT)))
    assert float(sc(torch.zeros(1, 2, dtype=DT)).detach()) == 0.0
    with pytest.raises(ValueError, match="last dimension"):
        tc(torch.zeros(1, 3, dtype=DT))
    dyn = MLPDynamics(4, 1)
    assert dyn(torch.zeros(7, 4), torch.zeros(7, 1)).shape == (7, 4)


@pytest.mark.slow  # minutes on a shared CPU: Newton through 10 steps x 4 RK4 substeps, 9 solves
def test_cartpole_true_model_refinement_is_stationary_and_differentiable():
    envs = pytest.importorskip("envs")
    mpc = MPC(lambda x, u: envs.cartpole_dynamics(x, u), envs.cartpole_cost, 10, -1.0, 1.0,
              n_samples=200, seed=0, tol=1e-7)
    x0 = torch.tensor([[0.0, 0.0, 0.1, 0.0], [0.1, 0.2, -0.1, 0.3]], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        u, info = mpc(x0)
    assert bool((info.cost <= info.sample_cost).all())
    (g,) = torch.autograd.grad(u[:, 0, 0].sum(), x0)
    plan = u.detach()

    def first_action(x):
        with torch.no_grad():
            return MPC(lambda x, u: envs.cartpole_dynamics(x, u), envs.cartpole_cost, 10, -1.0, 1.0,
                       sampler=None, tol=1e-9)(x, plan)[0][:, 0, 0].sum()

    fd = finite_difference(first_action, x0, eps=1e-5)
    assert torch.allclose(g, fd, rtol=1e-3, atol=1e-5)


def test_dense_newton_solves_nonconvex_problems_per_sample():
    from diffmpc.mpc import DenseNewton

    def rosenbrock(y):  # (B, 2); a start on the saddle-ish ridge and one far away
        return (1 - y[:, 0]) ** 2 + 100 * (y[:, 1] - y[:, 0] ** 2) ** 2

    y0 = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [2.0, -1.0]], dtype=DT)
    y, iters = DenseNewton(tol=1e-10).minimize(rosenbrock, y0)
    assert torch.allclose(y, torch.ones_like(y), atol=1e-8)
    assert int(iters.max()) < 100

    def saddle(y):  # starts exactly at a saddle direction: x² − y² + y⁴/4 has minima at y = ±√2
        return y[:, 0] ** 2 - y[:, 1] ** 2 + 0.25 * y[:, 1] ** 4

    y, _ = DenseNewton(tol=1e-10).minimize(saddle, torch.tensor([[0.5, 0.1]], dtype=DT))
    assert torch.allclose(y.abs(), torch.tensor([[0.0, 2**0.5]], dtype=DT), atol=1e-8)


@pytest.mark.parametrize("solver", ["newton-cg", "lbfgs"])
def test_other_refinement_solvers_reach_the_riccati_plan(solver):
    H, n, m = 4, 3, 2
    A, B, q, r, dyn, cost, terminal = lq_problem(n, m)
    x0 = torch.randn(3, n, dtype=DT, generator=torch.Generator().manual_seed(2))
    mpc = MPC(dyn, cost, H, action_dim=m, terminal_cost=terminal, sampler=None, solver=solver, tol=1e-7,
              max_iter=200)
    u, info = mpc(x0)
    assert bool(info.converged.all())
    with torch.no_grad():
        assert torch.allclose(u, riccati_plan(A, B, q, r, x0, H), atol=1e-6)


def test_mpc_cartpole_example_runs_a_gymnasium_episode_and_writes_a_video(tmp_path):
    """The README's example: MPCPolicy in a plain Gymnasium loop, stationary plans, mp4 + gif written."""
    import json
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "mpc_cartpole.py"
    main = runpy.run_path(str(script))["main"]
    assert main(["--steps", "2", "--samples", "32", "--horizon", "4", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["steps"] == 2 and len(res["stationarity_residual"]) == 2
    assert max(res["stationarity_residual"]) <= 1e-6
    assert (tmp_path / "mpc_cartpole.mp4").stat().st_size > 0 and (tmp_path / "mpc_cartpole.gif").exists()


# ---------------------------------------------------------------------------------------------------------
# The box-constrained layer (issue 13): exact constrained optimum, active-set derivative, structured Hessian


def test_one_step_target_beyond_the_bound_is_exactly_on_the_bound_with_zero_derivative():
    # The tanh path returned u* = 0.995 and du*/da = 0.22 here; the box-constrained answer is 1 and 0.
    a = torch.tensor(1.01, dtype=DT, requires_grad=True)
    mpc = MPC(lambda x, u: x + u, lambda x: ((x - a) ** 2).sum(-1), 1, -1.0, 1.0, params=[a], seed=0)
    u, info = mpc(torch.zeros(1, 1, dtype=DT))
    assert float(u.detach()) == 1.0 and bool(info.active.all()) and bool(info.converged.all())
    (g,) = torch.autograd.grad(u.sum(), a)
    assert float(g) == 0.0
    # just inside the box the control is free and follows the target: du*/da = 1
    a.data.fill_(0.99)
    u, info = mpc(torch.zeros(1, 1, dtype=DT))
    assert abs(float(u.detach()) - 0.99) < 1e-12 and not bool(info.active.any())
    (g,) = torch.autograd.grad(u.sum(), a)
    assert abs(float(g) - 1.0) < 1e-10


def active_set_derivative(J, u_star, theta, low, high, atol=1e-9):
    """Independent box-constrained derivative du*/dθ (D, P) at one KKT point: the active-set KKT system
    ``H_FF du_F = −∂²J/∂u_F∂θ``, du_A = 0; H and the mixed derivative from torch.autograd.functional."""
    u_star = u_star.detach()
    hess = torch.autograd.functional.hessian(lambda v: J(v, theta.detach()), u_star)
    mixed = torch.autograd.functional.jacobian(
        lambda t: torch.autograd.grad(J(u_star.requires_grad_(), t), u_star, create_graph=True)[0],
        theta.detach())
    active = (u_star - low <= atol) | (high - u_star <= atol)
    free = torch.nonzero(~active).flatten()
    out = torch.zeros(u_star.numel(), theta.numel(), dtype=DT)
    out[free] = -torch.linalg.solve(hess[free][:, free], mixed[free])
    return out, active


def test_gradient_equals_the_active_set_kkt_derivative_with_weakly_active_bounds():
    """Default settings; bounds chosen so that the unconstrained optimum only just leaves the box: small
    multipliers ("weakly active"), where the former tanh + ridge was 57–71 % off."""
    theta, dyn, cost = pendulum_problem()
    x0 = torch.tensor([[0.3, -0.2]], dtype=DT)
    H = 8
    u_unc, _ = MPC(dyn, cost, H, -50.0, 50.0, params=[theta], sampler=None)(x0)
    u_max = 0.97 * float(u_unc.detach().abs().max())  # the largest control(s): weakly active
    mpc = MPC(dyn, cost, H, -u_max, u_max, params=[theta], seed=0, n_samples=64)
    u, info = mpc(x0)
    assert bool(info.converged.all()) and 1 <= int(info.active.sum()) < H

    def J(v, t):  # the same horizon objective as a function of the plan and of θ
        def dyn_t(x, w):
            th, om = x[:, 0], x[:, 1]
            om2 = om + 0.1 * (-torch.sin(th) - t[0] * om + t[1] * w[:, 0])
            return torch.stack([th + 0.1 * om2, om2], -1)

        def cost_t(x, w):
            return (x[:, 0] - t[2]) ** 2 + 0.1 * x[:, 1] ** 2 + 0.01 * w[:, 0] ** 2

        return MPC(dyn_t, cost_t, H, -u_max, u_max).horizon_cost(x0, v.view(1, H, 1)).sum()

    want, active = active_set_derivative(J, u.flatten(), theta, -u_max, u_max)
    assert torch.equal(active, info.active.flatten())
    got = torch.stack([torch.autograd.grad(u.flatten()[i], theta, retain_graph=True)[0]
                       for i in range(H)])
    assert float((got - want).norm() / want.norm()) <= 1e-6
    # the multipliers really are small but non-zero (strict complementarity holds)
    g, _ = mpc.derivatives(x0, u.detach())
    mult = g.flatten()[info.active.flatten()].abs()
    assert bool((mult > 1e-6).all()) and float(mult.max()) < 0.1
    # and the plan is the box optimum: scipy's L-BFGS-B from another start agrees
    scipy_opt = pytest.importorskip("scipy.optimize")

    def fg(v):
        vt = torch.tensor(v, dtype=DT, requires_grad=True)
        f = mpc.horizon_cost(x0, vt.view(1, H, 1)).sum()
        (gv,) = torch.autograd.grad(f, vt)
        return float(f), gv.numpy()

    ref = scipy_opt.minimize(fg, [0.0] * H, jac=True, method="L-BFGS-B", bounds=[(-u_max, u_max)] * H,
                             options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 1000})
    assert float(ref.fun) >= float(info.cost) - 1e-12
    assert max(abs(a - b) for a, b in zip(ref.x, u.flatten().tolist(), strict=True)) < 1e-5


def _structured_cases():
    torch.manual_seed(0)
    theta, pend, pend_cost = pendulum_problem()
    mlp = MLPDynamics(3, 2, hidden=(8,)).double()
    yield "pendulum c(x, u)", dict(dynamics=pend, cost=pend_cost), 2, 1
    yield "state-only c(x_next) + terminal", dict(
        dynamics=pend, cost=lambda x: (x ** 2).sum(-1) + torch.cos(x[:, 0]),
        terminal_cost=lambda x: torch.exp(0.3 * x).sum(-1)), 2, 1
    yield "mlp, cost_on=next c(x_next, u)", dict(
        dynamics=mlp, cost=lambda x, u: (x ** 2).sum(-1) + (u ** 3).sum(-1), cost_on="next"), 3, 2
    envs = pytest.importorskip("envs")
    yield "cart-pole RK4", dict(dynamics=lambda x, u: envs.cartpole_dynamics(x, u, substeps=2),
                                cost=envs.cartpole_cost), 4, 1


@pytest.mark.parametrize("one_pass_rows", [10**9, 0])  # one replicated graph, or Jacobian + Lagrangian
def test_structured_derivatives_equal_autograd_double_backward(one_pass_rows, monkeypatch):
    import diffmpc._mpc_derivatives as md

    monkeypatch.setattr(md, "ONE_PASS_MAX_ROWS", one_pass_rows)
    g = torch.Generator().manual_seed(0)
    for name, kw, n, m in _structured_cases():
        H = 5
        mpc = MPC(horizon=H, u_low=-1.0, u_high=1.0, action_dim=m, **kw)
        x0 = torch.randn(3, n, generator=g, dtype=DT)
        u = 2 * torch.rand(3, H, m, generator=g, dtype=DT) - 1
        g1, h1 = mpc.derivatives(x0, u, structured=True)
        g2, h2 = mpc.derivatives(x0, u, structured=False)
        scale = h2.abs().max()
        assert torch.allclose(g1, g2, rtol=0, atol=1e-12 * max(1.0, float(g2.abs().max()))), name
        assert float((h1 - h2).abs().max()) <= 1e-12 * max(1.0, float(scale)), name


@pytest.mark.parametrize("derivatives", ["structured", "autograd"])
def test_box_newton_reaches_the_same_optimum_with_either_derivative(derivatives):
    theta, dyn, cost = pendulum_problem()
    x0 = torch.tensor([[0.3, -0.2], [-0.4, 0.5], [2.0, 1.0]], dtype=DT)
    mpc = MPC(dyn, cost, 8, -0.6, 0.6, params=[theta], seed=0, n_samples=32, derivatives=derivatives)
    u, info = mpc(x0)
    assert bool(info.converged.all()) and int(info.forward_iterations.max()) <= 10
    assert float(info.stationarity_residual.max()) <= 1e-8
    ref, _ = MPC(dyn, cost, 8, -0.6, 0.6, params=[theta], seed=0, n_samples=32)(x0)
    assert torch.allclose(u, ref, atol=1e-9)


def test_tanh_bounds_option_still_works_for_smooth_interior_problems():
    theta, dyn, cost = pendulum_problem()
    x0 = torch.tensor([[0.3, -0.2]], dtype=DT)
    u_box, _ = MPC(dyn, cost, 6, -5.0, 5.0, sampler=None)(x0)
    u_tanh, info = MPC(dyn, cost, 6, -5.0, 5.0, sampler=None, bounds="tanh", bound_reg=0.0, tol=1e-11)(x0)
    assert info.z is not None and torch.allclose(u_box, u_tanh, atol=1e-8)
    with pytest.raises(ValueError, match="cannot handle box constraints"):
        MPC(dyn, cost, 6, -1.0, 1.0, solver="lbfgs")


def test_box_qp_solves_ill_conditioned_box_qps_to_their_kkt_point():
    """The box QP inside the projected Newton method (primal active set): on random SPD Hessians with
    condition numbers up to 1e8 (as single shooting through an unstable system gives) and boxes that cut
    the unconstrained minimiser, the result satisfies the QP's KKT conditions (feasible; zero gradient on
    the free coordinates; outward gradient on the ones at a bound) and beats random feasible points."""
    from diffmpc._box_newton import box_qp

    gen = torch.Generator().manual_seed(0)
    B, D = 32, 10
    Q, _ = torch.linalg.qr(torch.randn(B, D, D, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, 8, D, dtype=torch.float64).expand(B, D)
    hess = (Q * lam.unsqueeze(1)) @ Q.transpose(1, 2)
    hess = 0.5 * (hess + hess.transpose(1, 2))
    g = 1e3 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    lo = -torch.rand(B, D, generator=gen, dtype=torch.float64)
    hi = torch.rand(B, D, generator=gen, dtype=torch.float64)
    d, work = box_qp(hess, g, lo, hi)
    assert bool(((d >= lo) & (d <= hi)).all())
    grad = g + (hess @ d.unsqueeze(-1)).squeeze(-1)
    scale = 1e-8 * (g.abs() + (hess.abs() @ d.abs().unsqueeze(-1)).squeeze(-1)).amax(1, keepdim=True)
    free = (d > lo) & (d < hi)
    assert bool((grad.abs() <= scale)[free].all())
    assert bool((grad >= -scale)[d <= lo].all()) and bool((grad <= scale)[d >= hi].all())
    assert int((~free).sum()) > 0 and int(free.sum()) > 0  # both kinds occur: the test is not vacuous

    def q(v: torch.Tensor) -> torch.Tensor:
        return (g * v).sum(-1) + 0.5 * (v * (hess @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)

    rand = lo + (hi - lo) * torch.rand(B, D, generator=gen, dtype=torch.float64)
    assert bool((q(d) <= q(rand)).all())


def test_compile_rollout_rejects_non_bool():
    with pytest.raises(TypeError, match="compile_rollout"):
        MPC(lambda x, u: x + u, lambda x, u: (x * x).sum(-1), 3, -1.0, 1.0, compile_rollout="yes")


@pytest.mark.slow
def test_compiled_rollout_gives_the_eager_plan():
    """``compile_rollout=True`` (gradient-free rollouts through torch.compile) reaches the same plan, the same
    iterations and the same gradients as the eager layer (the backward stays eager)."""
    A = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    Bm = torch.tensor([[0.0], [0.1]], dtype=torch.float64)

    def dyn(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ A.T + u @ Bm.T)

    def cost(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (x * x).sum(-1) + 0.1 * (u * u).sum(-1)

    _compiled_layer_matches_eager(dyn, cost, "compile_rollout")


def _compiled_layer_matches_eager(dyn, cost, option: str) -> None:
    """``MPC(..., option=True)`` gives the eager layer's plan, iterations and IFT gradients."""
    x0 = torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=torch.float64, requires_grad=True)
    out = {}
    for flag in (False, True):
        layer = MPC(dyn, cost, 4, -0.5, 0.5, seed=0, **{option: flag})
        u, info = layer(x0)
        (g,) = torch.autograd.grad(u.sum(), x0)
        out[flag] = (u.detach(), info.forward_iterations, g)
        assert bool(info.converged.all())
    assert torch.allclose(out[True][0], out[False][0], atol=1e-10, rtol=0)
    assert torch.equal(out[True][1], out[False][1])
    assert torch.allclose(out[True][2], out[False][2], atol=1e-8, rtol=0)


def test_compile_derivatives_rejects_non_bool():
    with pytest.raises(TypeError, match="compile_derivatives"):
        MPC(lambda x, u: x + u, lambda x, u: (x * x).sum(-1), 3, -1.0, 1.0, compile_derivatives=1)


@pytest.mark.slow
def test_compiled_derivatives_match_the_eager_ones():
    """``compile_derivatives=True`` (torch.func Jacobians / Lagrangian Hessians of the step, compiled, points
    padded to two sizes) gives the eager structured gradient and Hessian, and the same plan, iterations and
    IFT gradients (the backward stays eager)."""
    from diffmpc._mpc_derivatives import CompiledPointDerivatives, rollout, structured_derivatives

    A = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    Bm = torch.tensor([[0.0], [0.1]], dtype=torch.float64)

    def dyn(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ A.T + u @ Bm.T) + 0.1 * torch.sin(u)

    def cost(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (x * x).sum(-1) + 0.1 * (u * u).sum(-1) + 0.05 * (x[:, :1] * u).sum(-1) ** 2

    mpc = MPC(dyn, cost, 4, -0.5, 0.5, seed=0)
    gen = torch.Generator().manual_seed(0)
    compiled = CompiledPointDerivatives(mpc.step, 2)
    for B in (9, 1):  # the full size, then the small padded bucket (9 → 2 samples' worth of points)
        x0 = torch.randn(B, 2, generator=gen, dtype=torch.float64)
        u = torch.rand(B, 4, 1, generator=gen, dtype=torch.float64) - 0.5
        with torch.no_grad():
            xs, _ = rollout(mpc.step, None, x0, u)
            g_e, h_e = structured_derivatives(mpc.step, None, xs, u)
            g_c, h_c = structured_derivatives(mpc.step, None, xs, u, compiled=compiled)
        assert torch.allclose(g_c, g_e, atol=1e-12, rtol=0)
        assert torch.allclose(h_c, h_e, atol=1e-11, rtol=0)
    _compiled_layer_matches_eager(dyn, cost, "compile_derivatives")
