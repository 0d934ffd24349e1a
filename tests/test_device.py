"""Devices: ``--device`` / ``device=`` resolve with clear errors; on a GPU the batched paths (MPC layer, DARE,
odeint, IfO/BC trainers, evaluation rollouts) run there and match the CPU (the CUDA tests skip without one).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from diffmpc.device import resolve_device
from diffmpc.errors import BadArgumentError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DT = torch.float64


def test_resolve_device_names_the_problem():
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(BadArgumentError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(BadArgumentError, match="no CUDA device is visible"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cli_device_cuda_without_gpu_is_a_usage_error(tmp_path, capsys):
    from diffmpc.cli import main

    code = main(["evaluate", "--policy", "expert", "--out", str(tmp_path), "--device", "cuda"])
    assert code == 2 and "no CUDA device is visible" in capsys.readouterr().err


def _pairs(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from envs import cartpole_dynamics

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT) * torch.tensor([0.5, 0.5, 3.0, 1.0], dtype=DT)
    u = 2 * torch.rand(n, 1, generator=g, dtype=DT) - 1
    return x.numpy(), cartpole_dynamics(x, u).numpy()


def _tiny_ifo(device: str):
    from agents.ifo import IFO_PRESETS, IfOTrainer

    x, xn = _pairs()
    cfg = dataclasses.replace(IFO_PRESETS["tiny"], warmup_queries=200, warmup_steps=5, iterations=2)
    return IfOTrainer(x, xn, cfg, seed=0, device=device)


def test_ifo_trainer_keeps_everything_on_its_device_cpu():
    tr = _tiny_ifo("cpu")
    tr.run(progress=False)
    assert tr.device == torch.device("cpu") and tr.x.device.type == "cpu"
    assert {p.device.type for p in tr.dynamics.parameters()} == {"cpu"}
    assert all(t.device.type == "cpu" for t in tr.buffer)


@needs_cuda
def test_cuda_ifo_bc_and_evaluation_run_on_the_gpu(tmp_path):
    from agents.bc import BC_PRESETS, BCTrainer
    from agents.evaluation import evaluate_policy, mpc_policy

    tr = _tiny_ifo("cuda")
    summary = tr.run(progress=False)
    assert summary["iterations"] == 2
    assert tr.x.is_cuda and all(t.is_cuda for t in tr.buffer)
    assert all(p.is_cuda for p in tr.dynamics.parameters()) and all(p.is_cuda for p in tr.cost.parameters())
    x, xn = _pairs(seed=1)
    bc = BCTrainer(x, xn, tr.dynamics, BC_PRESETS["tiny"], seed=0)
    bc.run(progress=False)
    assert all(p.is_cuda for p in bc.policy.parameters())
    pol = mpc_policy(tr.dynamics, tr.cost, tr.config, device="cuda")
    res = evaluate_policy(pol, 0.04, n=4, device="cuda")
    assert len(res["episode_costs"]) == 4 and np.isfinite(res["mean_cost"])


@needs_cuda
def test_cuda_mpc_layer_matches_cpu():
    """The MPC layer (Newton forward from a fixed start, active-set IFT backward) on CUDA equals the CPU."""
    from diffmpc import MPC
    from diffmpc.nn import MLPDynamics

    torch.manual_seed(0)
    mlp = MLPDynamics(4, 1, hidden=(16, 16), out_scale=0.5).double()
    x0 = 0.5 * torch.randn(8, 4, dtype=DT)
    out = {}
    for dev in ("cpu", "cuda"):
        m = MLPDynamics(4, 1, hidden=(16, 16), out_scale=0.5).double().to(dev)
        m.load_state_dict(mlp.state_dict())
        q = torch.tensor([1.0, 0.1, 1.0, 0.1], dtype=DT, device=dev)

        def cost(x, u, q=q):
            return 0.5 * (q * x * x).sum(-1) + 0.05 * (u * u).sum(-1)

        mpc = MPC(m, cost, 5, -1.0, 1.0, sampler=None, tol=1e-9)
        x = x0.to(dev).requires_grad_()
        u, info = mpc(x)
        assert u.device.type == dev and bool(info.converged.all())
        grads = torch.autograd.grad(u.sum(), [x, *m.parameters()])
        out[dev] = [u.detach().cpu()] + [g.cpu() for g in grads]
    for a, c in zip(out["cpu"], out["cuda"], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-8)


@needs_cuda
def test_cuda_odeint_backward_euler_matches_cpu():
    from diffmpc import odeint

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    y0 = torch.randn(5, 3, dtype=DT)
    t = torch.linspace(0, 1, 6, dtype=DT)
    out = {}
    for dev in ("cpu", "cuda"):
        f = copy.deepcopy(net).to(dev)
        y = odeint(lambda _t, y, f=f: f(y), y0.to(dev), t.to(dev), backward="cg", params=list(f.parameters()))
        assert y.device.type == dev
        grads = torch.autograd.grad(y.pow(2).sum(), list(f.parameters()))
        out[dev] = [y.detach().cpu()] + [g.cpu() for g in grads]
    for a, c in zip(out["cpu"], out["cuda"], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-8)


@needs_cuda
def test_cuda_lqr_imitation_matches_cpu():
    """The DARE-layer imitation learner trains to the same Â on the GPU (same inits and starts)."""
    from experiments.lqr_imitation import ImitationConfig, train

    cfg = ImitationConfig(iterations=5, inits=2, eval_every=5)
    cpu = train(cfg, 1.0, "lyapunov", progress=False, device="cpu")
    gpu = train(cfg, 1.0, "lyapunov", progress=False, device="cuda")
    np.testing.assert_allclose(gpu["A_hat"], cpu["A_hat"], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(gpu["train_loss"], cpu["train_loss"], rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_cpu(tmp_path):
    """The prepared GPU benchmark (benchmarks/gpu_check.py) in its CPU smoke mode: every section runs and
    the JSON + markdown come out (slow: ~1-2 min of solves on a loaded 2-core machine)."""
    import json

    from benchmarks import gpu_check

    assert gpu_check.main(["--device", "cpu", "--quick", "--skip-tests", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_check_cpu_quick.json").read_text())
    assert [r["batch"] for r in res["mpc_layer"]] == [8, 32]
    assert all(r["converged"] == 1.0 and r["backward_ms"] > 0 for r in res["mpc_layer"])
    assert [r["D"] for r in res["implicit_backward"]] == [1000, 10000]
    assert all(r["backward_converged"] and r["cg_iters"] > 0 for r in res["implicit_backward"])
    assert res["ifo_iteration"][0]["iteration_ms"] > 0
    assert "MPC layer" in (tmp_path / "gpu_check_cpu_quick.md").read_text()
