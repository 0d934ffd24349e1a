"""Differentiable DARE / LQR layer: values vs scipy and python-control, every backward mode vs finite
differences, gradcheck, mutual agreement, batching, typed errors, and the imitation experiment (short)."""

from __future__ import annotations

import json
import warnings

import control
import numpy as np
import pytest
import scipy.linalg
import torch

import diffmpc
from diffmpc.lqr import (
    BACKWARDS,
    LQRError,
    NoStabilizingSolutionError,
    NotPositiveDefiniteError,
    NotStabilizableError,
    dare,
    dlqr,
    riccati_residual,
    sda,
    stein,
)

F64 = torch.float64


def problem(n=3, m=2, batch=(), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, n, n, generator=g, dtype=dtype)
    B = torch.randn(*batch, n, m, generator=g, dtype=dtype)
    L = torch.randn(*batch, n, n, generator=g, dtype=dtype)
    Q = L @ L.transpose(-1, -2) / n + 0.1 * torch.eye(n, dtype=dtype)
    Q = Q + 0.05 * torch.randn(*batch, n, n, generator=g, dtype=dtype)  # slightly asymmetric on purpose
    M = torch.randn(*batch, m, m, generator=g, dtype=dtype)
    R = M @ M.transpose(-1, -2) / m + torch.eye(m, dtype=dtype)
    return A, B, Q, R


def sym(X):
    return 0.5 * (X + X.transpose(-1, -2))


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("forward", ["sda", "scipy"])
def test_values_match_scipy_and_control(forward):
    A, B, Q, R = problem(4, 2, seed=1)
    S = dare(A, B, Q, R, forward=forward)
    K = dlqr(A, B, Q, R, forward=forward)
    S_ref = scipy.linalg.solve_discrete_are(A.numpy(), B.numpy(), sym(Q).numpy(), R.numpy())
    K_ref, S_ctrl, _ = control.dlqr(A.numpy(), B.numpy(), sym(Q).numpy(), R.numpy())
    np.testing.assert_allclose(S.numpy(), S_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(S.numpy(), S_ctrl, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(K.numpy(), K_ref, rtol=1e-9, atol=1e-9)
    assert torch.allclose(S, S.T)
    assert riccati_residual(S, A, B, sym(Q), R).abs().max() < 1e-9 * S.abs().max()
    assert torch.linalg.eigvals(A - B @ K).abs().max() < 1


def test_batched_broadcast_and_dtype():
    A, B, Q, R = problem(3, 1, batch=(2, 3), seed=2)
    S = dare(A, B[0, 0], Q, R[:, :1])  # B and R broadcast over the batch
    assert S.shape == (2, 3, 3, 3)
    for i in range(2):
        for j in range(3):
            ref = dare(A[i, j], B[0, 0], Q[i, j], R[i, 0])
            assert torch.allclose(S[i, j], ref, atol=1e-12)
    S32 = dare(*(t.float() for t in (A, B[0, 0], Q, R[:, :1])))
    assert S32.dtype == torch.float32 and torch.allclose(S32.double(), S, rtol=1e-4, atol=1e-4)


def test_lazy_export():
    assert diffmpc.dare is dare and diffmpc.dlqr is dlqr


def test_stein_and_sda_helpers():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(4, 5, 5, generator=g, dtype=F64)
    M = 0.95 * M / torch.linalg.eigvals(M).abs().amax(-1)[:, None, None]
    C = torch.randn(4, 5, 5, generator=g, dtype=F64)
    X, res = stein(M, C)
    for i in range(4):
        ref = scipy.linalg.solve_discrete_lyapunov(M[i].numpy(), C[i].numpy())
        np.testing.assert_allclose(X[i].numpy(), ref, rtol=1e-8, atol=1e-8)
    assert res.max() < 1e-12
    A, B, Q, R = problem(5, 2, batch=(3,), seed=4)
    S, ok = sda(A, B, sym(Q), R)
    assert ok.all()
    for i in range(3):
        ref = scipy.linalg.solve_discrete_are(A[i].numpy(), B[i].numpy(), sym(Q)[i].numpy(), R[i].numpy())
        np.testing.assert_allclose(S[i].numpy(), ref, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------- gradients
def _fd_grads(fn, args, eps=1e-6):
    """Central differences of a scalar fn; Q and R (indices 2, 3) are perturbed symmetrically."""
    out = []
    for k, X in enumerate(args):
        G = torch.zeros_like(X)
        for idx in np.ndindex(*X.shape):
            E = torch.zeros_like(X)
            E[idx] = eps
            if k >= 2:
                E = sym(E)
            plus = [a + E if i == k else a for i, a in enumerate(args)]
            minus = [a - E if i == k else a for i, a in enumerate(args)]
            G[idx] = (fn(*plus) - fn(*minus)) / (2 * eps)
        if k >= 2:
            G = sym(G)  # d/dX[i,j] of f(sym X): the symmetric part of the gradient
        out.append(G)
    return out


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("what", ["dare", "dlqr"])
def test_every_backward_matches_finite_differences(backward, what):
    A, B, Q, R = problem(3, 2, seed=5)
    g = torch.Generator().manual_seed(6)
    layer = dare if what == "dare" else dlqr
    W = torch.randn(layer(A, B, Q, R).shape, generator=g, dtype=F64)
    f = lambda *a: float((layer(*a) * W).sum())
    fd = _fd_grads(f, [A, B, Q, R])
    leaves = [t.clone().requires_grad_() for t in (A, B, Q, R)]
    grads = torch.autograd.grad((layer(*leaves, backward=backward) * W).sum(), leaves)
    for name, got, ref in zip("ABQR", grads, fd, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7, msg=f"{what} {backward} d/d{name}")
    assert torch.allclose(grads[2], grads[2].T) and torch.allclose(grads[3], grads[3].T)


def test_backward_modes_agree_batched():
    A, B, Q, R = problem(4, 2, batch=(3,), seed=7)
    W = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(8), dtype=F64)
    results = {}
    for mode in BACKWARDS:
        leaves = [t.clone().requires_grad_() for t in (A, B, Q, R)]
        results[mode] = torch.autograd.grad((dare(*leaves, backward=mode) * W).sum(), leaves)
    for mode in BACKWARDS:
        for got, ref in zip(results[mode], results["lyapunov"], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradcheck_unconstrained(backward):
    """Unconstrained (asymmetric) perturbations of Q and R: the layer sees only their symmetric parts."""
    A, B, Q, R = problem(2, 1, seed=9)
    leaves = [t.clone().requires_grad_() for t in (A, B, Q, R)]
    assert torch.autograd.gradcheck(lambda *a: dlqr(*a, backward=backward), leaves, nondet_tol=1e-10)
    assert torch.autograd.gradcheck(lambda *a: dare(*a, backward=backward), leaves, nondet_tol=1e-10)


def test_asymmetric_q_equals_symmetric_part():
    A, B, Q, R = problem(3, 1, seed=10)
    assert not torch.allclose(Q, Q.T)
    torch.testing.assert_close(dare(A, B, Q, R), dare(A, B, sym(Q), R))


def test_float32_gradients_close_to_float64():
    A, B, Q, R = problem(3, 2, seed=11)
    grads = {}
    for dt in (torch.float32, F64):
        leaves = [t.to(dt).requires_grad_() for t in (A, B, Q, R)]
        grads[dt] = torch.autograd.grad(dlqr(*leaves).sum(), leaves)
    for a, b in zip(grads[torch.float32], grads[F64], strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


def test_cg_nonconvergence_warns():
    A, B, Q, R = problem(4, 2, seed=12)
    leaves = [t.clone().requires_grad_() for t in (A, B, Q, R)]
    with pytest.warns(diffmpc.ConvergenceWarning, match="did not converge"):
        torch.autograd.grad(dare(*leaves, backward="cg", backward_max_iter=1).sum(), leaves)


# ------------------------------------------------------------------------------------------------ errors
def t(*rows):
    return torch.tensor(rows, dtype=F64)


def test_scipy_silent_zero_is_rejected():
    # scipy returns S = 0 here although ρ(A − BK) = 1: not a stabilising solution.
    assert np.allclose(scipy.linalg.solve_discrete_are([[1.0]], [[1.0]], [[0.0]], [[1.0]]), 0)
    for forward in ("sda", "scipy"):
        with pytest.raises(NoStabilizingSolutionError, match="not stabilising"):
            dare(t([1.0]), t([1.0]), t([0.0]), t([1.0]), forward=forward)


def test_unstabilizable_pair():
    A, B = t([2.0, 0.0], [0.0, 0.5]), t([0.0], [1.0])
    for forward in ("sda", "scipy"):
        with pytest.raises(NotStabilizableError, match="not stabilizable"):
            dlqr(A, B, torch.eye(2, dtype=F64), t([1.0]), forward=forward)


@pytest.mark.parametrize("case, err, match", [
    ("R_indefinite", NotPositiveDefiniteError, "positive definite"),
    ("R_asym_not_pd", NotPositiveDefiniteError, "positive definite"),
    ("nan", LQRError, "NaN or inf"),
    ("inf", LQRError, "NaN or inf"),
    ("shape", LQRError, "shape mismatch"),
    ("batch", LQRError, "do not broadcast"),
    ("int", TypeError, "floating-point"),
    ("mixed_dtype", TypeError, "one dtype"),
    ("backward", ValueError, "unknown backward"),
])
def test_bad_input_errors(case, err, match):
    A, B, Q, R = problem(2, 1, seed=13)
    kw = {}
    if case == "R_indefinite":
        R = -R
    elif case == "R_asym_not_pd":
        R = torch.tensor([[0.0]], dtype=F64)
    elif case == "nan":
        A = A.clone()
        A[0, 0] = float("nan")
    elif case == "inf":
        Q = Q.clone()
        Q[1, 0] = float("inf")
    elif case == "shape":
        Q = torch.eye(3, dtype=F64)
    elif case == "batch":
        A, B = A.expand(2, 2, 2), B.expand(3, 2, 1)
    elif case == "int":
        A = A.long()
    elif case == "mixed_dtype":
        A = A.float()
    elif case == "backward":
        kw = {"backward": "magic"}
    with pytest.raises(err, match=match):
        dare(A, B, Q, R, **kw)
    assert issubclass(LQRError, ValueError)


def test_error_names_batch_entry():
    A, B, Q, R = problem(2, 1, batch=(3,), seed=14)
    A = A.clone()
    A[2] = t([2.0, 0.0], [0.0, 0.5])
    B = B.clone()
    B[2] = t([0.0], [1.0])
    with pytest.raises(NotStabilizableError, match="batch entry 2"):
        dare(A, B, Q, R)


# ------------------------------------------------------------------------------------------- experiment
@pytest.mark.parametrize("c", [1.0, 0.1, -0.6])
def test_mass_spring_damper_is_stabilizable_and_solvable(c):
    from experiments.lqr_imitation import system_report

    rep = system_report(c)
    assert rep["stabilizable"] and rep["dare_solvable"] and rep["controllability_rank"] == 2
    np.testing.assert_allclose(rep["eig_abs_A"], [1.0, 1.0])  # det A = k/m = 1: modes on the unit circle
    assert rep["spectral_radius_closed_loop"] < 0.7


def test_imitation_learning_improves_and_modes_agree(tmp_path):
    from experiments.lqr_imitation import ImitationConfig, run

    cfg = ImitationConfig(dampings=(1.0,), modes=("lyapunov", "dense"), iterations=30, inits=2, eval_every=10,
                          lr=5e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffmpc.ConvergenceWarning)
        res = run(cfg, tmp_path, progress=False)
    r = res["runs"]["c=1/lyapunov"]
    imit = np.asarray(r["imitation_loss"])
    assert imit[-1].mean() < 0.5 * imit[0].mean()  # learning reduces the imitation loss
    assert r["failed_steps"] == 0
    assert res["mode_agreement"]["c=1/dense"] < 1e-10  # same gradients → same trajectory of Â
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["runs"]) == {"c=1/lyapunov", "c=1/dense"}
    assert (tmp_path / "lqr_imitation.png").stat().st_size > 10_000
    # resume: a second call with one more mode trains only that one
    cfg2 = ImitationConfig(dampings=(1.0,), modes=("lyapunov", "dense", "analytic"), iterations=30, inits=2,
                           eval_every=10, lr=5e-2)
    res2 = run(cfg2, tmp_path, progress=False)
    assert res2["runs"]["c=1/lyapunov"]["wall_s"] == r["wall_s"]
    assert res2["mode_agreement"]["c=1/analytic"] < 1e-10


def test_cli_registers_subcommand(tmp_path):
    from diffmpc.cli import build_parser

    args = build_parser().parse_args(["lqr-imitation", "--out", str(tmp_path), "--seed", "3",
                                      "--iterations", "7", "--inits", "2", "--damping", "-0.6"])
    assert args.iterations == 7 and args.inits == 2 and args.damping == [-0.6] and args.seed == 3
    assert callable(args.handler)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    A, B, Q, R = problem(4, 2, batch=(2,), seed=15)
    W = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(16), dtype=F64)
    out = {}
    for dev in ("cpu", "cuda"):
        leaves = [x.to(dev).requires_grad_() for x in (A, B, Q, R)]
        K = dlqr(*leaves)
        assert K.device.type == dev
        out[dev] = [K.detach().cpu()] + [g.cpu() for g in torch.autograd.grad((K * W.to(dev)).sum(), leaves)]
    for a, b in zip(out["cpu"], out["cuda"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
