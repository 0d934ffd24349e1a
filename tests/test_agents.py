"""Tests of agents.MPCPolicy, the sampling expert, the expert dataset format and the expert/dataset CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from agents import MPCPolicy
from agents.dataset import DatasetError, ExpertDataset, generate_dataset, load_dataset, save_dataset
from agents.expert import ExpertConfig, SamplingExpert, cartpole_plan_cost, make_env, run_episode
from agents.mpc_policy import SamplingPlanner
from diffmpc.cli import main as cli_main

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def msd_policy(env, **kw):
    A, B = env.unwrapped.A, env.unwrapped.B
    return MPCPolicy(dynamics=lambda x, u: envs.msd_dynamics(x, u, A, B), cost=envs.msd_cost, horizon=5,
                     action_space=env.action_space, n_samples=32, seed=0, **kw)


def test_mpc_policy_in_a_gymnasium_loop_is_deterministic_and_beats_zero_action():
    env = gym.make(envs.MSD_ID)

    def episode(policy):
        obs, _ = env.reset(seed=0, options=None)
        if policy is not None:
            policy.reset(seed=1)
        total, actions = 0.0, []
        for _ in range(6):
            a = policy.act(obs) if policy is not None else np.zeros(1, np.float32)
            assert env.action_space.contains(a)
            actions.append(a)
            obs, r, term, trunc, info = env.step(a)
            total += -r
        return total, np.stack(actions)

    policy = msd_policy(env)
    c1, a1 = episode(policy)
    c2, a2 = episode(policy)
    c0, _ = episode(None)
    assert np.array_equal(a1, a2)  # deterministic under a seed, warm start reset by reset()
    assert c1 < c0
    assert policy.plan is not None and policy.plan.shape == (1, 5, 1)
    assert bool(policy.last_info.converged.all())


def test_mpc_policy_vector_env_and_differentiable_tensor_path():
    vec = gym.vector.SyncVectorEnv([lambda: gym.make(envs.MSD_ID) for _ in range(3)])
    single = gym.make(envs.MSD_ID)
    policy = msd_policy(single)
    obs, _ = vec.reset(seed=0)
    for _ in range(2):
        a = policy.act(obs)
        assert a.shape == (3, 1) and a.dtype == np.float32
        obs, *_ = vec.step(a)
    # batch size change drops the warm start instead of failing
    assert policy.act(obs[0]).shape == (1,)
    # tensor in, differentiable tensor out: check d u0 / d obs against central finite differences
    policy.reset(seed=0)
    x = torch.tensor([[0.7, -0.3]], dtype=DT, requires_grad=True)
    u0 = policy.act(x)
    (g,) = torch.autograd.grad(u0.sum(), x)
    fd = []
    for i in range(2):
        e = torch.zeros_like(x)
        e[0, i] = 1e-6
        with torch.no_grad():
            up = policy.mpc(x.detach() + e)[0][:, 0].sum()
            um = policy.mpc(x.detach() - e)[0][:, 0].sum()
        fd.append((up - um) / 2e-6)
    assert torch.allclose(g[0], torch.stack(fd), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="give an MPC layer"):
        MPCPolicy(dynamics=lambda x, u: x)


def test_expert_plan_cost_matches_the_environment_and_is_seeded():
    cfg = ExpertConfig(n_samples=64)
    expert = SamplingExpert(cfg, seed=3)
    env = make_env()
    obs, info = env.reset(seed=5)
    assert isinstance(expert, MPCPolicy) and isinstance(expert.mpc, SamplingPlanner)  # one agent
    expert.act(info["state"])
    plan = expert.plan[0]
    assert plan.shape == (10, 1) and bool((plan.abs() <= 1).all())
    total = 0.0
    for t in range(10):  # the plan's predicted cost is what the env charges for it, open loop
        _, _, _, _, step_info = env.step(plan[t].numpy())
        total += step_info["cost"]
    assert total == pytest.approx(float(expert.last_info.cost[0]), rel=1e-6)
    assert expert.last_info.converged is None and expert.solves == 0  # sampling: no convergence test
    expert.reset(seed=3)
    a1 = expert.act(info["state"])
    expert.reset(seed=3)
    assert np.array_equal(a1, expert.act(info["state"])) and a1.dtype == np.float32
    x = torch.zeros(2, 4, dtype=DT)
    assert cartpole_plan_cost(x, torch.zeros(2, 3, 1, dtype=DT)).shape == (2,)
    with pytest.raises(ValueError, match="planner"):
        ExpertConfig(planner="ilqr")
    with pytest.raises(ValueError, match="finite"):
        expert.act(np.array([np.nan, 0, 0, 0]))


def test_warm_started_cem_never_returns_a_worse_plan_than_its_warm_start():
    x = np.array([0.0, 0.0, 0.3, 0.0])
    rs = SamplingExpert(ExpertConfig(planner="rs", n_samples=200), seed=0)
    ce = SamplingExpert(ExpertConfig(planner="cem", n_samples=40, n_elites=5, cem_iterations=3), seed=0)
    rs.act(x)
    plan = rs.plan
    ce._plan = torch.cat([plan[:, -1:], plan[:, :-1]], 1)  # shifting this by one step gives back the RS plan
    ce.act(x)
    assert float(ce.last_info.cost[0]) <= float(rs.last_info.cost[0])


def _tiny(tmp_path, episodes=2, **kw):
    cfg = ExpertConfig(n_samples=16, horizon=3)
    return generate_dataset(tmp_path / "d.npz", episodes=episodes, seed=7, config=cfg, progress=False, **kw)


def test_dataset_round_trip_and_clear_errors(tmp_path):
    data = _tiny(tmp_path)
    assert data.states.shape == (2, 41, 4) and data.diagnostic_actions.shape == (2, 40, 1)
    assert data.meta["seed"] == 7 and data.meta["version"] == 2 and data.meta["expert"]["n_samples"] == 16
    x, y = data.transitions()
    assert x.shape == (80, 4) and np.array_equal(x[1], y[0])
    # the states are the env's: replaying the diagnostic actions from x0 reproduces them
    env = make_env()
    env.reset(options={"state": data.states[1, 0]})
    for t in range(5):
        _, _, _, _, info = env.step(data.diagnostic_actions[1, t])
        assert np.allclose(info["state"], data.states[1, t + 1], atol=1e-12)
    # episode i is reproducible from its seed
    res = run_episode(env, SamplingExpert(ExpertConfig(n_samples=16, horizon=3)), 7 + 1)
    assert np.array_equal(res["states"], data.states[1])
    assert load_dataset(tmp_path / "d.npz", expect={"episodes": 2, "steps": 40}).episodes == 2
    with pytest.raises(DatasetError, match="episodes=2 but 100"):
        load_dataset(tmp_path / "d.npz", expect={"episodes": 100})
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.npz")
    raw = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_dataset(tmp_path / "trunc.npz")
    tampered = ExpertDataset(data.states.copy(), data.diagnostic_actions, data.episode_costs, data.meta)
    save_dataset(tmp_path / "t.npz", tampered)
    with np.load(tmp_path / "t.npz") as z:
        arrays = dict(z)
    arrays["states"][0, 0, 0] += 1.0
    np.savez(tmp_path / "t.npz", **arrays)
    with pytest.raises(DatasetError, match="SHA-256"):
        load_dataset(tmp_path / "t.npz")
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps(dict(meta, version=99)))
    np.savez(tmp_path / "v.npz", **arrays)
    with pytest.raises(DatasetError, match="version 99"):
        load_dataset(tmp_path / "v.npz")


def test_dataset_resumes_from_checkpoint(tmp_path):
    _tiny(tmp_path, episodes=1)
    (tmp_path / "d.npz").rename(tmp_path / "d.npz.partial.npz")  # as if interrupted after one trajectory
    first = load_dataset(tmp_path / "d.npz.partial.npz").states[0].copy()
    data = _tiny(tmp_path, episodes=2)
    assert np.array_equal(data.states[0], first) and data.episodes == 2
    assert not (tmp_path / "d.npz.partial.npz").exists()
    with pytest.raises(DatasetError, match="other settings"):
        old = ExpertDataset(data.states[:1], data.diagnostic_actions[:1], data.episode_costs[:1],
                            dict(data.meta, seed=1))
        save_dataset(tmp_path / "e.npz.partial.npz", old)
        generate_dataset(tmp_path / "e.npz", episodes=2, seed=7, config=ExpertConfig(n_samples=16, horizon=3),
                         progress=False)


def test_cli_expert_and_dataset(tmp_path):
    assert cli_main(["expert", "--episodes", "1", "--samples", "16", "--horizon", "3", "--seed", "2",
                     "--no-progress", "--out", str(tmp_path / "e")]) == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert len(res["episode_costs"]) == 1 and res["config"]["n_samples"] == 16 and res["mean_cost"] > 0
    assert cli_main(["dataset", "--episodes", "1", "--samples", "16", "--horizon", "3", "--no-progress",
                     "--out", str(tmp_path / "d")]) == 0
    assert load_dataset(tmp_path / "d" / "expert_cartpole.npz", expect={"episodes": 1}).steps == 40


def test_committed_paper_dataset_loads():
    path = ROOT / "data" / "expert_cartpole_rs.npz"
    if not path.exists():
        pytest.skip("the paper dataset has not been generated (diffmpc dataset --out ...)")
    data = load_dataset(path, expect={"episodes": 100, "steps": 40, "seed": 0, "start_variance": 0.04})
    assert data.meta["expert"]["planner"] == "rs" and data.meta["expert"]["n_samples"] == 1000
    assert np.isfinite(data.states).all() and np.abs(data.diagnostic_actions).max() <= 1


# ---------------------------------------------------------------------------------------- any env (issue 15)
def pendulum_dynamics(x, u):
    """Pendulum-v1's step in its observation coordinates (cos θ, sin θ, θ̇), batched torch."""
    th, thdot = torch.atan2(x[:, 1], x[:, 0]), x[:, 2]
    u = u[:, 0].clamp(-2.0, 2.0)
    thdot = (thdot + (3 * 10.0 / 2 * torch.sin(th) + 3.0 * u) * 0.05).clamp(-8.0, 8.0)
    th = th + thdot * 0.05
    return torch.stack([torch.cos(th), torch.sin(th), thdot], 1)


def test_mpc_policy_reads_the_single_action_space_and_rejects_a_batched_one():
    vec = gym.vector.SyncVectorEnv([lambda: gym.make(envs.MSD_ID) for _ in range(5)])
    A, B = vec.envs[0].unwrapped.A, vec.envs[0].unwrapped.B

    def make(**kw):
        return MPCPolicy(dynamics=lambda x, u: envs.msd_dynamics(x, u, A, B), cost=envs.msd_cost, horizon=3,
                         n_samples=16, seed=0, **kw)

    with pytest.raises(ValueError, match="single_action_space"):
        make(action_space=vec.action_space)  # the batched (5, 1) space
    policy = make(env=vec)
    assert policy.action_space.shape == (1,) and policy.mpc.action_dim == 1
    obs, _ = vec.reset(seed=0)
    assert policy.act(obs).shape == (5, 1)


def test_mpc_policy_counts_unconverged_plans_and_warns_in_its_own_words():
    env = gym.make(envs.MSD_ID)
    policy = msd_policy(env, max_iter=1, tol=1e-14)  # one Newton step cannot reach this tolerance
    obs, _ = env.reset(seed=0)
    with pytest.warns(diffmpc_convergence_warning(), match="MPCPolicy: 1 of 1 plans did not meet") as rec:
        policy.act(obs)
    assert not any("implicit-function-theorem" in str(w.message) for w in rec)  # no gradient talk in no_grad
    assert policy.solves == 1 and policy.converged_solves == 0 and policy.converged_fraction == 0.0
    quiet = msd_policy(env, max_iter=1, tol=1e-14, warn=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.act(obs)
    assert quiet.solves == 1 and quiet.converged_fraction == 0.0  # silent, but counted


def diffmpc_convergence_warning():
    from diffmpc import ConvergenceWarning

    return ConvergenceWarning


def test_task_from_env_and_simulator_errors():
    from agents.task import CARTPOLE, Task, TaskError, env_simulator, simulator_for

    t = Task.from_env("Pendulum-v1")
    assert (t.state_dim, t.action_dim, t.u_low, t.u_high, t.angle_dims) == (3, 1, (-2.0,), (2.0,), ())
    assert Task.from_dict(t.to_dict()) == t
    with pytest.raises(TaskError, match="pass a simulator"):
        simulator_for(t)  # Pendulum-v1 cannot be reset to a given state
    msd = Task.from_env(envs.MSD_ID)
    sim = env_simulator(envs.MSD_ID)  # our envs can: reset(options={"state": x})
    x, u = torch.tensor([[0.3, -0.1], [1.0, 0.5]], dtype=DT), torch.tensor([[2.0], [-1.0]], dtype=DT)
    env = gym.make(envs.MSD_ID).unwrapped
    want = envs.msd_dynamics(x, u, env.A, env.B)
    torch.testing.assert_close(sim(x, u), want)
    assert msd.state_dim == 2 and CARTPOLE.feature_dim == 5
    with pytest.raises(TaskError, match="angle_dims"):
        Task(3, 1, (-1.0,), (1.0,), (3,))


def test_dataset_of_any_env_from_any_policy(tmp_path):
    env = gym.make("Pendulum-v1", max_episode_steps=12)
    policy = MPCPolicy(dynamics=pendulum_dynamics, cost=lambda x, u: 1 - x[:, 0] + 0.1 * x[:, 2] ** 2,
                       horizon=4, env=env, refine=False, sampler="cem", n_samples=32, cem_iterations=2,
                       seed=0)
    data = generate_dataset(tmp_path / "p.npz", episodes=2, seed=3, expert=policy, env=env, progress=False)
    assert data.states.shape == (2, 13, 3) and data.diagnostic_actions.shape == (2, 12, 1)
    assert data.meta["state_dim"] == 3 and data.meta["env_id"] == "Pendulum-v1" and data.meta["env_spec"]
    assert data.meta["expert"]["policy"] == "MPCPolicy"
    # cost from the reward when there is no info["cost"]: replay the actions
    env.reset(seed=3)
    total = sum(-env.step(a.astype(np.float32))[1] for a in data.diagnostic_actions[0])
    assert total == pytest.approx(data.episode_costs[0], rel=1e-6)
    x, xn = data.transitions()
    assert x.shape == (24, 3)
    with pytest.raises(DatasetError, match="state_dim=3"):
        load_dataset(tmp_path / "p.npz", expect={"state_dim": 4})
    with np.load(tmp_path / "p.npz") as z:
        arrays = dict(z)
    arrays["meta"] = np.array(json.dumps(dict(json.loads(str(arrays["meta"])), state_dim=4)))
    np.savez(tmp_path / "q.npz", **arrays)
    with pytest.raises(DatasetError, match=r"states has shape \(2, 13, 3\) but the metadata"):
        load_dataset(tmp_path / "q.npz")
    with pytest.raises(ValueError, match="no default expert"):
        generate_dataset(tmp_path / "r.npz", episodes=1, env_id="Pendulum-v1", progress=False)


def test_written_files_follow_the_umask(tmp_path):
    import os
    import stat

    from diffmpc.io import write_results

    old = os.umask(0o027)
    try:
        data = ExpertDataset(np.zeros((1, 2, 3)), np.zeros((1, 1, 1)), np.zeros(1), {"env_id": "x"})
        for path in (save_dataset(tmp_path / "d.npz", data), write_results(tmp_path, {"a": 1})):
            assert stat.S_IMODE(path.stat().st_mode) == 0o640, path  # not mkstemp's 0o600
    finally:
        os.umask(old)
