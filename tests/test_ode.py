"""Backward-Euler neural ODE (diffmpc.ode): forward, IFT / unrolled / adjoint gradients, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffmpc import ConvergenceWarning, odeint, record_backward
from diffmpc.solvers import FixedPoint

D64 = torch.float64
TIGHT = {"tol": 1e-13, "backward_tol": 1e-13}
IFT = ("cg", "dense", "gmres")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only contend with the other jobs on the machine (3-4x slower here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def linear_field(A):
    return lambda t, y: y @ A.T


def closed_form(A, y0, dt, n):
    """Backward Euler on y' = A y: y_{k+1} = (I − Δt A)⁻¹ y_k, differentiable by plain autograd."""
    M = torch.linalg.inv(torch.eye(A.shape[0], dtype=A.dtype) - dt * A)
    ys = [y0]
    for _ in range(n):
        ys.append(ys[-1] @ M.T)
    return torch.stack(ys)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    A = (torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=D64) + 0.1 * torch.randn(2, 2, dtype=D64))
    y0 = torch.randn(3, 2, dtype=D64)
    t = torch.linspace(0, 1.5, 16, dtype=D64)
    return A.requires_grad_(), y0.requires_grad_(), t


@pytest.mark.parametrize("backward", [*IFT, "unroll"])
def test_linear_closed_form_values_and_gradients(linear, backward):
    A, y0, t = linear
    w = torch.randn(16, 3, 2, dtype=D64)
    ref = closed_form(A, y0, 0.1, 15)
    g_ref = torch.autograd.grad((w * ref).sum(), [A, y0])
    ys = odeint(linear_field(A), y0, t, backward=backward, solver="newton", params=[A], options=TIGHT)
    assert ys.shape == (16, 3, 2)
    torch.testing.assert_close(ys, ref, atol=1e-11, rtol=0)
    g = torch.autograd.grad((w * ys).sum(), [A, y0])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


class TinyField(torch.nn.Module):
    def __init__(self, dim=2, hidden=5, dtype=D64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, dim))
        self.to(dtype)

    def forward(self, t, y):
        return self.net(y) - 0.5 * y


@pytest.mark.parametrize("backward", ["cg", "dense"])
def test_gradcheck_float64(backward):
    torch.manual_seed(1)
    W = torch.randn(4, 2, dtype=D64, requires_grad=True)
    b = torch.randn(2, dtype=D64, requires_grad=True)
    y0 = torch.randn(2, 2, dtype=D64, requires_grad=True)
    t = torch.tensor([0.0, 0.2, 0.3, 0.6], dtype=D64)

    def run(y0, W, b):
        f = lambda t, y: torch.tanh(y @ W.T) @ W + b - y
        return odeint(f, y0, t, backward=backward, solver="newton", params=[W, b], options=TIGHT)

    assert torch.autograd.gradcheck(run, (y0, W, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_ift_unroll_and_finite_differences_agree_on_a_neural_field():
    torch.manual_seed(2)
    f = TinyField(hidden=8)
    y0 = torch.randn(4, 2, dtype=D64)
    t = torch.linspace(0, 1, 11, dtype=D64)
    params = list(f.parameters())
    grads = {}
    for bw in [*IFT, "unroll"]:
        loss = odeint(f, y0, t, backward=bw, solver="newton", options=TIGHT).pow(2).sum()
        grads[bw] = torch.autograd.grad(loss, params)
    for bw in ("dense", "gmres", "unroll"):
        for a, b in zip(grads[bw], grads["cg"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)
    # central finite difference along a random direction in parameter space
    d = [torch.randn_like(p) for p in params]
    eps = 1e-6

    def loss_at(s):
        with torch.no_grad():
            for p, di in zip(params, d, strict=True):
                p.add_(s * di)
            out = odeint(f, y0, t, solver="newton", options=TIGHT).pow(2).sum()
            for p, di in zip(params, d, strict=True):
                p.sub_(s * di)
        return out

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = sum((g * di).sum() for g, di in zip(grads["cg"], d, strict=True))
    assert abs(float(fd - analytic)) < 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("backward", IFT)
def test_fused_backward_equals_chained_root_layers(backward):
    """The default one-node backward runs the same IFT chain as autograd through per-step root layers."""
    torch.manual_seed(8)
    f = TinyField(dim=3, hidden=7)
    y0 = torch.randn(4, 3, dtype=D64, requires_grad=True)
    t = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.6], dtype=D64)
    w = torch.randn(5, 4, 3, dtype=D64)
    targets = [y0, *f.parameters()]
    grads = {}
    for name, extra in (("layers", {"step_layers": True}), ("fused", {}), ("warm", {"warm_start": True})):
        ys, info = odeint(f, y0, t, backward=backward, solver="newton", return_info=True,
                          options={**TIGHT, "step_size": 0.1, **extra})
        with record_backward() as records:
            grads[name] = torch.autograd.grad((w * ys).sum(), targets)
        solves = [s for r in records for s in r.solves]
        assert info.n_steps == 7 and len(solves) == 7 and all(bool(s.converged.all()) for s in solves)
        if name == "layers":  # one record per step's root layer, tied to that step's forward info
            assert sorted(r.call_id for r in records) == sorted(s.call_id for s in info.steps)
            assert all(r.layer == "root" for r in records)
        else:  # one record for the fused node, one solve per step
            assert [(r.layer, r.call_id) for r in records] == [("odeint", info.call_id)]
        if backward == "cg":  # normal-equation CG on a 3×3 system: exact termination in ≤ 3 (+1) steps
            assert all(s.method == "normal_cg" and int(s.iterations.max()) <= 4 for s in solves)
    for name in ("fused", "warm"):
        for a, b in zip(grads[name], grads["layers"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_unbatched_gradients_match_batched():
    torch.manual_seed(9)
    f = TinyField()
    y0 = torch.randn(2, dtype=D64, requires_grad=True)
    t = torch.linspace(0, 0.5, 6, dtype=D64)
    g1 = torch.autograd.grad(odeint(f, y0, t, options=TIGHT).pow(2).sum(), [y0, *f.parameters()])
    g2 = torch.autograd.grad(odeint(f, y0.unsqueeze(0), t, options=TIGHT).pow(2).sum(),
                             [y0, *f.parameters()])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_field_independent_of_state_gives_identity_jacobian():
    c = torch.tensor([0.5, -1.0], dtype=D64, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=D64, requires_grad=True)
    t = torch.linspace(0, 1, 6, dtype=D64)
    ys = odeint(lambda t, y: c.expand_as(y), y0, t, params=[c], options=TIGHT)
    torch.testing.assert_close(ys[-1], y0 + c, atol=1e-12, rtol=0)
    gy, gc = torch.autograd.grad(ys[-1].sum(), [y0, c])
    torch.testing.assert_close(gy, torch.ones_like(y0))
    torch.testing.assert_close(gc, torch.full_like(c, 3.0))  # 3 trajectories × Δt·5 steps = 3 · 1


def test_backward_non_convergence_warns_or_raises():
    from diffmpc import ConvergenceError

    torch.manual_seed(10)
    f = TinyField(dim=6, hidden=12)
    y0 = torch.randn(2, 6, dtype=D64)
    t = torch.linspace(0, 0.3, 4, dtype=D64)
    opts = {**TIGHT, "backward_max_iter": 1}
    with pytest.warns(ConvergenceWarning, match=r"did not converge at 3 of 3 steps"):
        odeint(f, y0, t, options=opts).sum().backward()
    with pytest.raises(ConvergenceError, match="did not converge"):
        odeint(f, y0, t, options={**opts, "strict": True}).sum().backward()


def test_adjoint_exact_in_y0_for_linear_and_first_order_in_theta(linear):
    A, y0, t = linear
    w = torch.randn(16, 3, 2, dtype=D64)
    errs = []
    t = t[:6]  # 0 .. 0.5
    w = w[:6]
    for h in (0.05, 0.025, 0.0125):
        opts = {**TIGHT, "step_size": h}
        ift = odeint(linear_field(A), y0, t, backward="cg", solver="newton", params=[A], options=opts)
        adj = odeint(linear_field(A), y0, t, backward="adjoint", solver="newton", params=[A], options=opts)
        torch.testing.assert_close(adj, ift, atol=1e-12, rtol=0)  # same forward
        gi = torch.autograd.grad((w * ift).sum(), [A, y0])
        ga = torch.autograd.grad((w * adj).sum(), [A, y0])
        # For a linear field ∂h/∂z = A is constant, so the adjoint state (the y0 gradient) is exact ...
        torch.testing.assert_close(ga[1], gi[1], atol=1e-10, rtol=1e-10)
        # ... while ∂h/∂A = z is evaluated at the other end of each step: an O(Δt) difference.
        errs.append(float((ga[0] - gi[0]).norm() / gi[0].norm()))
    assert errs[0] > 1e-4
    assert 1.6 < errs[0] / errs[1] < 2.5 and 1.6 < errs[1] / errs[2] < 2.5


def test_adjoint_on_neural_field_close_to_ift():
    torch.manual_seed(3)
    f = TinyField(hidden=6)
    y0 = torch.randn(3, 2, dtype=D64)
    t = torch.linspace(0, 0.5, 6, dtype=D64)
    opts = {**TIGHT, "step_size": 0.02}
    gs = [torch.autograd.grad(odeint(f, y0, t, backward=bw, solver="newton", options=opts).pow(2).sum(),
                              list(f.parameters())) for bw in ("cg", "adjoint")]
    num = sum(float((a - b).norm() ** 2) for a, b in zip(*gs, strict=True)) ** 0.5
    den = sum(float(a.norm() ** 2) for a in gs[0]) ** 0.5
    assert num / den < 2e-2


def test_stiff_step_auto_solver_falls_back_to_newton():
    A = torch.diag(torch.tensor([-60.0, -0.5], dtype=D64)).requires_grad_()
    y0 = torch.tensor([[1.0, 1.0]], dtype=D64)
    t = torch.linspace(0, 1, 11, dtype=D64)  # Δt·60 = 6: the fixed-point map is no contraction
    ys, info = odeint(linear_field(A), y0, t, params=[A], options=TIGHT, return_info=True)
    torch.testing.assert_close(ys, closed_form(A.detach(), y0, 0.1, 10), atol=1e-11, rtol=0)
    assert info.n_steps == 10 and info.max_residual <= 1e-12
    with pytest.warns(ConvergenceWarning):
        odeint(linear_field(A.detach()), y0, t, solver=FixedPoint(max_iter=20))


def test_auto_solver_is_cheap_on_nonstiff_problems_and_matches_newton():
    torch.manual_seed(4)
    f = TinyField()
    y0 = torch.randn(5, 2, dtype=D64)
    t = torch.linspace(0, 1, 11, dtype=D64)
    a, ia = odeint(f, y0, t, options={"tol": 1e-12}, return_info=True)
    b, ib = odeint(f, y0, t, solver="newton", options={"tol": 1e-12}, return_info=True)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert ia.forward_iterations > 0 and ib.forward_iterations > 0


def test_unbatched_and_substeps_match_batched_fine_grid():
    torch.manual_seed(5)
    f = TinyField()
    y0 = torch.randn(2, dtype=D64)
    t = torch.tensor([0.0, 0.3, 0.5], dtype=D64)
    coarse = odeint(f, y0, t, solver="newton", options={**TIGHT, "step_size": 0.1})
    fine = odeint(f, y0.unsqueeze(0), torch.linspace(0, 0.5, 6, dtype=D64), solver="newton", options=TIGHT)
    assert coarse.shape == (3, 2)
    torch.testing.assert_close(coarse, fine[[0, 3, 5], 0], atol=1e-12, rtol=0)


def test_float32_cg_matches_dense_and_backward_info():
    torch.manual_seed(6)
    f = TinyField(hidden=10, dtype=torch.float32)
    y0 = torch.randn(8, 2)
    t = torch.arange(11) * 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        out = {}
        for bw in ("cg", "dense"):
            ys, info = odeint(f, y0, t, backward=bw, return_info=True)
            with record_backward() as records:
                out[bw] = torch.autograd.grad(ys.pow(2).mean(), list(f.parameters()))
            assert records[0].call_id == info.call_id and records[0].iterations > 0 and records[0].converged
    for a, b in zip(out["cg"], out["dense"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_explicit_euler_matches_torchdiffeq_and_dopri5_adjoint_runs():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(7)
    f = TinyField()
    y0 = torch.randn(3, 2, dtype=D64)
    t = torch.linspace(0, 1, 6, dtype=D64)
    ours = odeint(f, y0, t, method="euler", backward="unroll")
    torch.testing.assert_close(ours, torchdiffeq.odeint(f, y0, t, method="euler"))
    ys = odeint(f, y0, t, method="dopri5", backward="adjoint", rtol=1e-9, atol=1e-10)
    ys.sum().backward()
    assert all(p.grad is not None for p in f.parameters())


@pytest.mark.parametrize("method,backward",
                         [("dopri5", "adjoint"), ("dopri5", "unroll"), ("euler", "unroll")])
def test_explicit_methods_pass_params_to_the_gradient(method, backward):
    """``params=[k]`` for a closure over k: k.grad is set and matches central finite differences."""
    pytest.importorskip("torchdiffeq")
    k = torch.tensor([0.7, -0.3], dtype=D64, requires_grad=True)
    field = lambda t, y: -k[0] * y + k[1] * torch.sin(y)  # noqa: E731
    y0 = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=D64)
    t = torch.linspace(0, 1, 5, dtype=D64)
    w = torch.linspace(-1, 1, 5 * 2 * 2, dtype=D64).view(5, 2, 2)

    def loss(kk):
        f = lambda t_, y: -kk[0] * y + kk[1] * torch.sin(y)  # noqa: E731
        # the forward values do not depend on the backward mode
        return (odeint(f, y0, t, method=method, backward="unroll", rtol=1e-10, atol=1e-12) * w).sum()

    ys = odeint(field, y0, t, method=method, backward=backward, params=[k], rtol=1e-10, atol=1e-12)
    (ys * w).sum().backward()
    assert k.grad is not None
    eps = 1e-6
    with torch.no_grad():
        fd = torch.stack([(loss(k + eps * e) - loss(k - eps * e)) / (2 * eps)
                          for e in torch.eye(2, dtype=D64)])
    torch.testing.assert_close(k.grad, fd, rtol=1e-5, atol=1e-7)


def test_dopri5_adjoint_without_module_or_params_raises():
    pytest.importorskip("torchdiffeq")
    with pytest.raises(TypeError, match="params"):
        odeint(lambda t, y: -y, torch.ones(1, 2, dtype=D64), torch.linspace(0, 1, 3, dtype=D64),
               method="dopri5", backward="adjoint")


def test_bad_inputs_raise_clear_errors():
    f = TinyField()
    y0 = torch.zeros(1, 2, dtype=D64)
    t = torch.linspace(0, 1, 3, dtype=D64)
    with pytest.raises(ValueError, match="strictly increasing"):
        odeint(f, y0, t.flip(0))
    with pytest.raises(ValueError, match="unknown backward"):
        odeint(f, y0, t, backward="magic")
    with pytest.raises(ValueError, match="unknown options"):
        odeint(f, y0, t, options={"stepsize": 0.1})
    with pytest.raises(TypeError, match="floating-point"):
        odeint(f, torch.zeros(1, 2, dtype=torch.long), t)
    with pytest.raises(ValueError, match="1-D"):
        odeint(f, y0, t.view(1, -1))
    with pytest.raises(ValueError, match="explicit"):
        odeint(f, y0, t, method="euler", backward="cg")

