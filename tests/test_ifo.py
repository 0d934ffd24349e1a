"""Imitation from observation (paper Alg. 2), the BC baseline, evaluation, checkpoints and the Table 2 CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.envs.classic_control.pendulum import PendulumEnv

import envs
from agents.bc import BC_PRESETS, BCTrainer
from agents.dataset import load_dataset
from agents.evaluation import evaluate_policy, expert_policy, mpc_policy, rollout, start_states
from agents.ifo import (
    IFO_PRESETS,
    CircleTargetCost,
    IfOConfig,
    IfOTrainer,
    load_ifo_checkpoint,
    load_ifo_models,
    make_cost,
)
from agents.task import Task, TaskError
from agents.training import CheckpointError, load_checkpoint, save_checkpoint
from diffmpc.cli import main as cli_main
from diffmpc.errors import BadArgumentError
from diffmpc.nn import AngleFeatures, MLPDynamics, TargetStateCost
from experiments.table2 import aggregate_runs, convergence_summary, make_policy, table2_markdown

ROOT = Path(__file__).resolve().parents[1]
TINY = IFO_PRESETS["tiny"]


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster and makes runs bit-reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pairs():
    x, xn = load_dataset(ROOT / "data" / "expert_cartpole_rs.npz").transitions()
    return x[:800], xn[:800]


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.state_dict().values()]


# ------------------------------------------------------------------------------------------ learned modules
def test_angle_features_are_periodic_and_ordered():
    f = AngleFeatures(4, [2])
    x = torch.tensor([[0.3, -0.2, 1.0, 2.0]], dtype=torch.float64)
    y = x.clone()
    y[0, 2] += 2 * math.pi
    torch.testing.assert_close(f(x), f(y))
    torch.testing.assert_close(
        f(x)[0], torch.tensor([0.3, -0.2, 2.0, math.sin(1.0), math.cos(1.0)], dtype=torch.float64)
    )
    assert f.out_dim == 5
    with pytest.raises(ValueError, match="distinct indices"):
        AngleFeatures(4, [2, 2])


def test_mlp_dynamics_normalisation_and_gradients():
    torch.manual_seed(0)
    dyn = MLPDynamics(4, 1, hidden=(8,), features=AngleFeatures(4, [2])).double()
    x, u = torch.randn(200, 4, dtype=torch.float64), torch.rand(200, 1, dtype=torch.float64)
    xn = x + torch.tensor([0.1, 5.0, 0.2, 3.0], dtype=torch.float64) * torch.randn(
        200, 4, dtype=torch.float64
    )
    dyn.fit_normalization(x, u, xn)
    torch.testing.assert_close(dyn.out_scale, (xn - x).std(0))
    inp = torch.cat([AngleFeatures(4, [2])(x), u], 1)
    torch.testing.assert_close(
        ((inp - dyn.in_mean) / dyn.in_scale).mean(0), torch.zeros(6, dtype=torch.float64)
    )
    xs, us = x[:3].requires_grad_(), u[:3].requires_grad_()
    assert torch.autograd.gradcheck(dyn, (xs, us))


def test_target_state_cost_normalized_weights_sum_to_k():
    c = TargetStateCost(
        torch.zeros(5, dtype=torch.float64),
        learn_weights=True,
        normalize_weights=True,
        features=AngleFeatures(4, [2]),
    )
    with torch.no_grad():
        c.w_raw.copy_(torch.randn(5, dtype=torch.float64))
    assert float(c.weights.detach().sum()) == pytest.approx(5.0)
    x = torch.randn(7, 4, dtype=torch.float64)
    phi = AngleFeatures(4, [2])(x)
    torch.testing.assert_close(c(x), (c.weights * phi**2).sum(-1))


# ------------------------------------------------------------------------------------------ IfO trainer
def test_ifo_trainer_learns_dynamics_and_reduces_the_imitation_loss(pairs):
    x, xn = pairs
    cfg = replace(TINY, iterations=12, horizon=2, curriculum_iters=2, cost_lr=0.1)
    tr = IfOTrainer(x, xn, cfg, seed=0)
    tr.warmup()
    assert tr.dyn_history[-1] < 0.2 * tr.dyn_history[0]  # the one-step model fits the simulator
    before = tr.imitation_loss(x[:200], xn[:200], horizon=2)
    summary = tr.run(progress=False)
    after = tr.imitation_loss(x[:200], xn[:200], horizon=2)
    assert 0.0 <= tr.last_imitation_converged <= 1.0
    assert after < before - 0.01, (before, after)  # the IFT gradient through the MPC layer helps
    assert summary["iterations"] == 12
    assert [h["horizon"] for h in summary["history"]][:3] == [1, 2, 2]  # curriculum starts at H = 1
    # the logged fraction counts solves of the batch (k / cost_batch), and the converged-only loss is
    # undefined exactly when none converged
    for h in summary["history"]:
        assert h["converged"] * cfg.cost_batch == pytest.approx(round(h["converged"] * cfg.cost_batch))
        assert math.isnan(h["loss_converged"]) == (h["converged"] == 0)
    assert max(h["converged"] for h in summary["history"]) > 0  # else no IFT step was taken
    # one Newton step to an unreachable tolerance: no solve can pass the KKT test, and the log must say so
    tr.config = replace(tr.config, newton_iters=1, tol=1e-300)
    rec = tr.cost_step()
    assert rec["converged"] == 0.0 and math.isnan(rec["loss_converged"])


def test_ifo_checkpoint_resume_equals_uninterrupted_run(pairs, tmp_path):
    x, xn = pairs
    full = IfOTrainer(x, xn, TINY, seed=3)
    full.run(progress=False)

    part = IfOTrainer(x, xn, TINY, seed=3, out=tmp_path)
    part.run(progress=False, stop_after=3)
    resumed = IfOTrainer(x, xn, TINY, seed=3, out=tmp_path)
    resumed.run(progress=False, resume=True)
    assert resumed.iteration == full.iteration == TINY.iterations
    for a, b in zip(
        params(full.dynamics) + params(full.cost),
        params(resumed.dynamics) + params(resumed.cost),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ctrl_c_leaves_a_usable_checkpoint(pairs, tmp_path):
    x, xn = pairs
    calls = {"n": 0}

    def flaky_simulator(xb, ub):  # the user presses Ctrl-C during the 4th simulator query
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return envs.cartpole_dynamics(xb, ub)

    tr = IfOTrainer(x, xn, TINY, seed=1, out=tmp_path, simulator=flaky_simulator)
    with pytest.raises(KeyboardInterrupt):
        tr.run(progress=False)
    state = load_checkpoint(tmp_path / "ifo_checkpoint.pt", {"kind": "ifo"})
    assert state["iteration"] == 2 and state["warmed_up"]
    resumed = IfOTrainer(x, xn, TINY, seed=1, out=tmp_path)
    resumed.run(progress=False, resume=True)
    full = IfOTrainer(x, xn, TINY, seed=1)
    full.run(progress=False)
    for a, b in zip(params(full.cost), params(resumed.cost), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_refuses_another_configuration(pairs, tmp_path):
    x, xn = pairs
    IfOTrainer(x, xn, TINY, seed=0, out=tmp_path).run(progress=False, stop_after=1)
    other = IfOTrainer(x, xn, replace(TINY, cost_lr=0.5), seed=0, out=tmp_path)
    with pytest.raises(CheckpointError, match="cost_lr|config"):
        other.run(progress=False, resume=True)


def test_bad_inputs_raise_clear_errors(pairs, tmp_path):
    x, xn = pairs
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        IfOTrainer(x[:, :3], xn[:, :3], TINY)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        IfOTrainer(bad, xn, TINY)
    with pytest.raises(ValueError, match=">= 1"):
        IfOConfig(iterations=0)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("ppo")
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("expert:ilqr")
    with pytest.raises(ValueError, match="unknown expert planner"):
        expert_policy(planner="ilqr")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")


def test_save_checkpoint_is_atomic(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"a": torch.ones(2)})
    save_checkpoint(path, {"a": torch.zeros(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary files left behind
    torch.testing.assert_close(load_checkpoint(path)["a"], torch.zeros(2))


# ------------------------------------------------------------------------------------------ BC
def test_bc_reduces_its_loss_and_resumes_exactly(pairs, tmp_path):
    x, xn = pairs
    tr = IfOTrainer(x, xn, TINY, seed=0)
    tr.warmup()
    cfg = replace(BC_PRESETS["tiny"], steps=200)
    full = BCTrainer(x, xn, tr.dynamics, cfg, seed=0)
    res = full.run(progress=False)
    assert res["history"][-1] < 0.7 * res["history"][0]
    BCTrainer(x, xn, tr.dynamics, cfg, seed=0, out=tmp_path).run(progress=False, stop_after=70)
    resumed = BCTrainer(x, xn, tr.dynamics, cfg, seed=0, out=tmp_path)
    resumed.run(progress=False, resume=True)
    for a, b in zip(params(full.policy), params(resumed.policy), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    u = full.policy(torch.randn(10, 4, dtype=torch.float64) * 3)
    assert u.shape == (10, 1) and bool((u.abs() <= 1).all())


# ------------------------------------------------------------------------------------------ evaluation
def test_batched_rollout_equals_the_gymnasium_episode(pairs):
    x, xn = pairs
    tr = IfOTrainer(x, xn, TINY, seed=0)
    tr.warmup()
    policy = BCTrainer(x, xn, tr.dynamics, BC_PRESETS["tiny"], seed=0).policy.requires_grad_(False)
    x0 = start_states(0.08, n=3)
    batch = rollout(policy, x0)
    env = gym.make(envs.CARTPOLE_ID)
    for i in range(3):
        _, info = env.reset(options={"state": x0[i].numpy()})
        total, state, done, t = 0.0, info["state"], False, 0
        while not done:
            a = policy(torch.as_tensor(state).reshape(1, 4))[0].numpy()
            np.testing.assert_allclose(a, batch["actions"][i, t].numpy(), rtol=0, atol=1e-12)
            _, _, term, trunc, info = env.step(a)
            state, total, done, t = info["state"], total + info["cost"], term or trunc, t + 1
        assert t == batch["costs"].shape[1] == envs.CARTPOLE_EPISODE_STEPS
        assert total == pytest.approx(float(batch["episode_cost"][i]), abs=1e-10)


def test_start_states_are_fixed_and_scaled():
    a, b = start_states(0.04), start_states(0.04)
    torch.testing.assert_close(a, b)
    assert a.shape == (50, 4)
    assert 0.1 < float(a.std()) < 0.3
    assert not torch.equal(start_states(0.04, seed=1), a)


def test_evaluation_is_deterministic_under_a_seed(pairs):
    x, xn = pairs
    tr = IfOTrainer(x, xn, replace(TINY, iterations=2), seed=0)
    tr.run(progress=False)
    for make in (
        lambda: mpc_policy(tr.dynamics, tr.cost, tr.config),
        lambda: expert_policy(n_samples=64),
        lambda: expert_policy(n_samples=32, planner="cem", cem_iterations=2),
    ):
        r1 = evaluate_policy(make(), 0.04, seed=5, n=4)
        r2 = evaluate_policy(make(), 0.04, seed=5, n=4)
        assert r1["episode_costs"] == r2["episode_costs"]
        costs = np.asarray(r1["episode_costs"])
        assert costs.shape == (4,) and len(set(costs.tolist())) > 1  # one cost per (different) start
        assert r1["mean_cost"] == pytest.approx(costs.mean())
        assert r1["stderr"] == pytest.approx(costs.std(ddof=1) / 2)  # over sqrt(n) = 2
    r3 = evaluate_policy(expert_policy(n_samples=64), 0.04, seed=6, n=4)
    assert r3["episode_costs"] != r1["episode_costs"]  # the seed reaches the sampler


def test_aggregate_runs_pairs_gaps_and_reports_stderr():
    def run(e, b, m):
        ev = {
            k: {"low": {"mean_cost": v, "stderr": 0.1}} for k, v in (("expert", e), ("bc", b), ("mpc_ift", m))
        }
        return {"evaluation": ev}

    table = aggregate_runs([run(10, 20, 12), run(12, 21, 13)])
    low = table["mpc_ift"]["low"]
    assert low["mean"] == pytest.approx(12.5) and low["gap_to_expert"] == pytest.approx(1.5)
    assert low["stderr"] == pytest.approx(0.5) and low["gap_stderr"] == pytest.approx(0.5)
    md = table2_markdown(table, 2, "diffmpc table2 --runs 2", 1.0)
    assert "MPC_IFT" in md and "(+1.50)" in md and "13.7 (+4.5)" in md


def test_convergence_summary_counts_every_solve():
    def run(seed, solves, unconverged, per_iter, fr):
        ev = {"expert": {"low": {"mean_cost": 1.0, "stderr": 0.1, "converged_fraction": None}},
              "mpc_ift": {"low": {"mean_cost": 1.0, "stderr": 0.1, "converged_fraction": fr}}}
        return {"seed": seed, "ifo_mpc_solves": solves, "ifo_mpc_unconverged": unconverged,
                "ifo_converged_fraction": per_iter, "evaluation": ev}

    conv = convergence_summary([run(0, 100, 3, [1.0, 0.97], 0.5), run(1, 50, 0, [1.0, 1.0], 0.25)])
    t = conv["ifo_training"]
    assert (t["solves"], t["unconverged"]) == (150, 3)
    assert t["converged_fraction"] == pytest.approx(147 / 150)
    assert t["lowest_iteration_fraction"] == pytest.approx(0.97)
    # only policies that plan with the layer report a fraction; the evaluation fraction is the mean over runs
    assert conv["evaluation_converged_fraction"] == {"mpc_ift": {"low": pytest.approx(0.375)}}
    md = table2_markdown(aggregate_runs([run(0, 100, 3, [1.0, 0.97], 0.5)]), 1, "cmd", 1.0, conv)
    assert "147 of 150" in md and "97.0 %" in md and "low 37.5 %" in md


def test_cli_train_evaluate_render(pairs, tmp_path):
    data = ROOT / "data" / "expert_cartpole_rs.npz"
    ifo, bc = tmp_path / "ifo", tmp_path / "bc"
    assert (
        cli_main(
            ["train", "ifo", "--dataset", str(data), "--out", str(ifo), "--preset", "tiny", "--no-progress"]
        )
        == 0
    )
    assert json.loads((ifo / "results.json").read_text())["iterations"] == TINY.iterations
    assert (
        cli_main(
            [
                "train",
                "bc",
                "--dataset",
                str(data),
                "--dynamics",
                str(ifo),
                "--out",
                str(bc),
                "--preset",
                "tiny",
                "--no-progress",
                "--rollout-steps",
                "3",
                "--hidden",
                "8,8",
            ]
        )
        == 0
    )
    bc_res = json.loads((bc / "results.json").read_text())
    assert bc_res["config"]["rollout_steps"] == 3 and bc_res["config"]["hidden"] == [8, 8]
    dyn, cost, cfg = load_ifo_models(ifo / "ifo_checkpoint.pt")
    assert cfg == TINY
    out = tmp_path / "eval"
    assert (
        cli_main(
            ["evaluate", "--policy", f"bc:{bc}", "--variance", "low", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())["evaluation"]
    assert set(res) == {f"bc:{bc}"} and len(res[f"bc:{bc}"]["low"]["episode_costs"]) == 50
    assert cli_main(["train", "bc", "--dataset", str(data), "--out", str(bc)]) == 2  # no --dynamics: usage
    # Fig. 3 of this run (tmp_path holds ifo/ and bc/): the expert and both policies from one fixed start
    media = tmp_path / "media"
    assert cli_main(["render", "--run", str(tmp_path), "--out", str(media), "--index", "2",
                     "--max-steps", "5", "--no-progress"]) == 0
    import imageio.v3 as iio

    for suffix in (".mp4", ".gif"):  # the initial state and one frame per step
        assert sum(1 for _ in iio.imiter(media / f"fig3{suffix}")) == 6
    assert (media / "trajectories.png").stat().st_size > 0


@pytest.mark.slow
def test_demo_pipeline_writes_table_and_video(tmp_path):
    assert (
        cli_main(["demo", "--preset", "tiny", "--episodes", "2", "--out", str(tmp_path), "--no-progress"])
        == 0
    )
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["table"]) == {"expert", "bc", "bco", "mpc_ift"}
    for name in ("fig3.mp4", "fig3.gif", "trajectories.png", "table2.md"):
        assert (tmp_path / name).stat().st_size > 0


def test_ifo_and_bc_on_another_task_record_it_and_load_back(tmp_path):
    """A 2-state env without angles (the mass-spring-damper), its env as the simulator: every module is
    sized from the task, the checkpoints record it and load back without knowing the env."""
    from agents.bc import load_bc_policy
    from agents.ifo import load_ifo_checkpoint
    from agents.task import Task

    task = Task.from_env(envs.MSD_ID)
    env = gym.make(envs.MSD_ID).unwrapped
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    xn = envs.msd_dynamics(x, -0.3 * x[:, :1] * 10, env.A, env.B)
    tr = IfOTrainer(x, xn, replace(TINY, iterations=2, warmup_queries=64, warmup_steps=20), seed=0,
                    out=tmp_path / "ifo", task=task)  # simulator: the env itself, reset to each state
    summary = tr.run(progress=False)
    assert summary["task"]["state_dim"] == 2 and len(summary["converged_fraction"]) == 2
    assert summary["mpc_solves"] == 2 * TINY.cost_batch
    dyn, cost, cfg, loaded = load_ifo_checkpoint(tmp_path / "ifo" / "ifo_checkpoint.pt")
    assert loaded == task and dyn.state_dim == 2 and cost.target.shape == (2,)
    torch.testing.assert_close(dyn(x[:3], x[:3, :1]), tr.dynamics(x[:3], x[:3, :1]))
    bc = BCTrainer(x, xn, dyn, BC_PRESETS["tiny"], seed=0, out=tmp_path / "bc", task=task)
    bc.run(progress=False)
    pol = load_bc_policy(tmp_path / "bc" / "bc_checkpoint.pt")
    u = pol(torch.randn(5, 2, dtype=torch.float64) * 100).detach()
    assert u.shape == (5, 1) and bool((u.abs() <= 100 + 1e-9).all()) and float(u.abs().max()) > 1.0
    policy = mpc_policy(dyn, cost, cfg, loaded)
    assert policy(x[:4]).shape == (4, 1) and policy.solves == 4
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        IfOTrainer(x[:, :1], xn[:, :1], TINY, task=task)


def test_pendulum_example_smoke(tmp_path):
    """examples/pendulum_ifo.py end to end on a stock env (tiny settings): expert data from an MPCPolicy on
    the true dynamics, IfO / BC / BCO from states only, evaluation over fixed seeds, side-by-side video."""
    import runpy

    pytest.importorskip("pygame")  # Gymnasium's classic-control renderer (the dev extra installs it)
    script = ROOT / "examples" / "pendulum_ifo.py"
    res = runpy.run_path(str(script))["main"](["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["evaluation"].keys() == {"expert", "BC", "BCO", "MPC_IFT"} == res["evaluation"].keys()
    for r in saved["evaluation"].values():
        assert len(r["episode_returns"]) == 2 and r["episode_lengths"] == [20, 20]
    assert saved["task"]["state_dim"] == 3 and len(saved["ifo_converged_fraction"]) == 2
    assert 0.0 <= saved["evaluation"]["MPC_IFT"]["converged_fraction"] <= 1.0
    assert (tmp_path / "pendulum_side_by_side.mp4").stat().st_size > 0
    assert saved["task"]["circle_dims"] == [[0, 1]]  # the (cos, sin) pair: cost target on the circle
    _, cost, _, task = load_ifo_checkpoint(tmp_path / "ifo" / "ifo_checkpoint.pt")
    assert task.circle_dims == ((0, 1),) and abs(float(cost.target.detach()[:2].norm()) - 1.0) < 1e-12


def test_pendulum_example_seeds_pairs_each_training_seed_with_the_same_episodes(tmp_path):
    """`--seeds 2`: two training seeds on the same expert data, evaluated on the same episode seeds; the
    paired differences are the per-seed means of per-episode differences, the expert evaluated once; a
    rerun keeps the finished seeds."""
    import runpy

    main = runpy.run_path(str(ROOT / "examples" / "pendulum_ifo.py"))["main"]
    res = main(["--smoke", "--seeds", "2", "--out", str(tmp_path)])
    assert res["training_seeds"] == [0, 1] and res["eval_seeds"] == [1000, 1001]
    per = res["per_seed"]
    assert per["0"]["evaluation"]["MPC_IFT"]["seeds"] == per["1"]["evaluation"]["MPC_IFT"]["seeds"]
    expert = np.array(res["expert"]["evaluation"]["episode_returns"])
    for a, b in (("MPC_IFT", "BC"), ("BC", "expert")):
        ret = {n: np.array([per[s]["evaluation"][n]["episode_returns"] if n != "expert" else expert
                            for s in ("0", "1")]) for n in (a, b)}
        want = (ret[a] - ret[b]).mean(1)
        got = res["paired_differences"][f"{a} - {b}"]
        np.testing.assert_allclose(got["per_seed"], want, rtol=1e-12)
        assert math.isclose(got["mean"], want.mean(), rel_tol=1e-12)
        assert math.isclose(got["stderr_over_seeds"], want.std(ddof=1) / math.sqrt(2), rel_tol=1e-9)
    assert len({json.dumps(per[s]["evaluation"]["BC"]["episode_returns"]) for s in ("0", "1")}) == 2
    mtime = (tmp_path / "seed_1" / "results.json").stat().st_mtime_ns
    again = main(["--smoke", "--seeds", "2", "--out", str(tmp_path)])
    assert (tmp_path / "seed_1" / "results.json").stat().st_mtime_ns == mtime  # finished seeds are kept
    assert again["paired_differences"] == res["paired_differences"]


def test_bco_inverse_model_labels_the_true_controls():
    """BCO's inverse-dynamics model recovers the control of a transition it did not see (cart-pole)."""
    from agents.bc import BCOConfig, BCOTrainer

    x = start_states(0.5, n=400, seed=1)
    u_true = torch.rand(400, 1, dtype=torch.float64) * 2 - 1
    xn = envs.cartpole_dynamics(x, u_true)
    cfg = BCOConfig(queries=4000, inverse_steps=600, policy_steps=10)
    tr = BCOTrainer(x, xn, envs.cartpole_dynamics, cfg, seed=0)
    tr.run(progress=False)
    with torch.no_grad():
        err = (tr.inverse(x, xn) - u_true).abs().mean()
    assert float(err) < 0.1, float(err)  # vs 0.5 for a constant guess


def test_cli_train_bco_and_evaluate(tmp_path):
    data = ROOT / "data" / "expert_cartpole_rs.npz"
    out = tmp_path / "bco"
    assert cli_main(["train", "bco", "--dataset", str(data), "--out", str(out), "--preset", "tiny",
                     "--no-progress"]) == 0
    assert cli_main(["train", "bco", "--dataset", str(data), "--out", str(out), "--preset", "tiny",
                     "--no-progress", "--resume"]) == 0  # finished stages are skipped
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == "train bco" and res["provenance"]["dataset_sha256"]
    pol = make_policy(f"bco:{out}")
    assert pol(start_states(0.04, n=3)).shape == (3, 1)


def test_cli_trains_and_evaluates_on_another_env(tmp_path):
    """`--env`/metadata-driven CLI on the mass-spring-damper: the dataset names its env, the trainer sizes the
    task from it and queries the env itself; evaluate runs the Gymnasium loop over seeds."""
    from agents.dataset import generate_dataset

    env = gym.make(envs.MSD_ID, max_episode_steps=10)
    generate_dataset(tmp_path / "msd.npz", episodes=2, seed=0, env=env, progress=False,
                     expert=lambda obs: np.clip(-np.asarray(obs)[..., :1] * 20, -100, 100).astype(np.float32))
    ifo = tmp_path / "ifo"
    assert cli_main(["train", "ifo", "--dataset", str(tmp_path / "msd.npz"), "--out", str(ifo), "--preset",
                     "tiny", "--no-progress"]) == 0
    assert json.loads((ifo / "results.json").read_text())["task"]["state_dim"] == 2
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--env", envs.MSD_ID, "--episodes", "2", "--policy", f"ifo:{ifo}", "--out",
                     str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())["evaluation"][f"ifo:{ifo}"]
    assert len(res["episode_returns"]) == 2 and res["episode_lengths"] == [50, 50]
    assert cli_main(["evaluate", "--env", envs.MSD_ID, "--policy", "expert", "--out", str(out)]) == 2


def test_bc_multistep_rollout_loss_needs_trajectories_and_learns(pairs):
    x, xn = pairs
    tr = IfOTrainer(x, xn, TINY, seed=0)
    tr.warmup()
    traj = load_dataset(ROOT / "data" / "expert_cartpole_rs.npz").states[:20]
    cfg = replace(BC_PRESETS["tiny"], steps=150, rollout_steps=4, batch=128)
    with pytest.raises(ValueError, match="needs the expert trajectories"):
        BCTrainer(x, xn, tr.dynamics, cfg, seed=0)
    bc = BCTrainer(x, xn, tr.dynamics, cfg, seed=0, trajectories=traj)

    def loss_on_a_fixed_batch() -> float:
        g, bc.generator = bc.generator, torch.Generator().manual_seed(5)
        with torch.no_grad():
            value = float(bc._loss(tr.dynamics.out_scale))
        bc.generator = g
        return value

    before = loss_on_a_fixed_batch()
    bc.run(progress=False)
    assert loss_on_a_fixed_batch() < 0.5 * before  # the 4-step rollout through the learned model improves


def test_two_dimensional_actions_end_to_end():
    """Nothing assumes a 1-D action: queries, learned model, MPC layer, BC and BCO with m = 2."""
    from agents.bc import BCOConfig, BCOTrainer
    from agents.task import Task

    task = Task(3, 2, (-1.0, -2.0), (1.0, 2.0), (), None)

    def sim(x, u):
        return x + 0.1 * torch.stack([u[:, 0], u[:, 1], u[:, 0] - u[:, 1]], 1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=g, dtype=torch.float64)
    xn = sim(x, -x[:, :2].clamp(-1, 1))
    cfg = replace(TINY, iterations=1, warmup_queries=256, warmup_steps=30)
    tr = IfOTrainer(x, xn, cfg, seed=0, simulator=sim, task=task)
    tr.run(progress=False)
    u = tr.buffer[1]
    assert u.shape[1] == 2 and float(u[:, 1].abs().max()) > 1.0  # the second box is [-2, 2]
    agent = mpc_policy(tr.dynamics, tr.cost, cfg, task)
    a = agent(x[:5])
    assert a.shape == (5, 2) and bool((a[:, 0].abs() <= 1 + 1e-6).all())
    bc = BCTrainer(x, xn, tr.dynamics, BC_PRESETS["tiny"], seed=0, task=task)
    bc.run(progress=False)
    assert bc.policy(x[:5]).shape == (5, 2)
    bco_cfg = BCOConfig(queries=300, inverse_steps=20, policy_steps=20, batch=32)
    bco = BCOTrainer(x, xn, sim, bco_cfg, task=task)
    bco.run(progress=False)
    assert bco.policy(x[:5]).shape == (5, 2)


def _circle_cost_gradcheck(x: torch.Tensor, distance: str) -> bool:
    """float64 gradcheck of a CircleTargetCost's value at ``x`` in its parameters (angle 0.7, plain target
    0.3, weight logits (0.4, −0.2))."""

    def f(angle, plain, w_raw):
        c = CircleTargetCost(3, ((0, 1),), angle.detach(), plain.detach(), distance=distance)
        del c.angle, c.plain_target, c.w_raw
        c.angle, c.plain_target, c.w_raw = angle, plain, w_raw
        return c(x)

    params = (torch.tensor([0.7]).double().requires_grad_(), torch.tensor([0.3]).double().requires_grad_(),
              torch.tensor([0.4, -0.2]).double().requires_grad_())
    return torch.autograd.gradcheck(f, params)


def test_circle_target_cost_is_the_angle_cost_on_valid_observations():
    """On (cos φ, sin φ, v) the cost is 2 w_p (1 − cos(φ − φ̄)) + w_v (v − v̄)² (monotone in |φ − φ̄|), and its
    gradients in the parameters match finite differences (float64 gradcheck)."""
    g = torch.Generator().manual_seed(0)
    cost = CircleTargetCost(3, ((0, 1),), torch.tensor([0.7], dtype=torch.float64),
                            torch.tensor([0.3], dtype=torch.float64))
    with torch.no_grad():
        cost.w_raw.copy_(torch.tensor([0.4, -0.2], dtype=torch.float64))
    phi, v = torch.rand(50, generator=g, dtype=torch.float64) * 6 - 3, torch.randn(50, generator=g).double()
    x = torch.stack([phi.cos(), phi.sin(), v], 1)
    w = 2 * torch.softmax(cost.w_raw.detach(), 0)
    expected = 2 * w[0] * (1 - torch.cos(phi - 0.7)) + w[1] * (v - 0.3) ** 2
    torch.testing.assert_close(cost(x).detach(), expected)
    assert torch.allclose(cost.target.detach()[:2], torch.tensor([math.cos(0.7), math.sin(0.7)]).double())
    assert cost.weights[0] == cost.weights[1]  # one weight for the pair

    assert _circle_cost_gradcheck(x, "chord")


def test_circle_target_cost_geodesic_is_the_squared_wrapped_angle():
    """distance="geodesic": w_p wrap(φ − φ̄)² + w_v (v − v̄)² (wrap onto (−π, π]; e.g. Pendulum-v1's θ² term),
    parameter gradients match finite differences away from the kink opposite the target, the config keeps
    the choice through to_dict/from_dict and a checkpoint rebuilds it; an unknown distance is refused."""
    g = torch.Generator().manual_seed(1)
    phi, v = torch.rand(60, generator=g, dtype=torch.float64) * 6 - 3, torch.randn(60, generator=g).double()
    phi = phi[(phi - 0.7 + math.pi).remainder(2 * math.pi) > 0.2]  # away from the kink at φ̄ + π
    v = v[: len(phi)]
    x = torch.stack([phi.cos(), phi.sin(), v], 1)
    cost = CircleTargetCost(3, ((0, 1),), torch.tensor([0.7], dtype=torch.float64),
                            torch.tensor([0.3], dtype=torch.float64), distance="geodesic")
    with torch.no_grad():
        cost.w_raw.copy_(torch.tensor([0.4, -0.2], dtype=torch.float64))
    w = 2 * torch.softmax(cost.w_raw.detach(), 0)
    wrapped = (phi - 0.7 + math.pi).remainder(2 * math.pi) - math.pi
    torch.testing.assert_close(cost(x).detach(), w[0] * wrapped**2 + w[1] * (v - 0.3) ** 2)

    assert _circle_cost_gradcheck(x, "geodesic")
    cfg = replace(TINY, circle_distance="geodesic")
    assert IfOConfig.from_dict(cfg.to_dict()) == cfg and "circle_distance" not in TINY.to_dict()
    t = Task.from_env("Pendulum-v1", circle_dims=[(0, 1)])
    assert make_cost(cfg, torch.Generator().manual_seed(0), task=t).distance == "geodesic"
    with pytest.raises(BadArgumentError, match="circle_distance"):
        IfOConfig(circle_distance="arc")


def test_circle_task_and_expert_mean_cost_init():
    """circle_dims round-trip and are validated; cost_init="expert_mean" starts the target at the expert's
    mean state (a (cos, sin) pair: the direction of its mean), "random" keeps the pair on the circle too."""
    t = Task.from_env("Pendulum-v1", circle_dims=[(0, 1)])
    assert Task.from_dict(t.to_dict()) == t and t.circle_dims == ((0, 1),)
    assert Task.from_dict({k: v for k, v in t.to_dict().items() if k != "circle_dims"}).circle_dims == ()
    with pytest.raises(TaskError, match="circle_dims"):
        Task.from_env("Pendulum-v1", circle_dims=[(0, 3)])
    with pytest.raises(TaskError, match="not both"):
        Task.from_env("Pendulum-v1", circle_dims=[(0, 1)], angle_dims=[2])
    with pytest.raises(BadArgumentError, match="cost_init"):
        IfOConfig(cost_init="zero")
    states = torch.tensor([[0.0, 2.0, 1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    cost = make_cost(IfOConfig(cost_init="expert_mean"), task=t, expert_states=states)
    torch.testing.assert_close(cost.target.detach(), torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    rnd = make_cost(IfOConfig(), torch.Generator().manual_seed(1), task=t)
    assert abs(float(rnd.target.detach()[:2].norm()) - 1.0) < 1e-12
    plain = make_cost(IfOConfig(cost_init="expert_mean"), task=Task.from_env("Pendulum-v1"),
                      expert_states=states)
    assert isinstance(plain, TargetStateCost)
    torch.testing.assert_close(plain.target.detach(), states.mean(0))


class _SettablePendulum(PendulumEnv):
    """Pendulum-v1 that can be set to an observed state: ``reset(options={"state": (cos θ, sin θ, θ̇)})``
    (so the CLI's learners can query the env itself; stock Pendulum-v1 cannot)."""

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if options is None or "state" not in options:
            return super().reset(seed=seed, options=options)
        super().reset(seed=seed)
        c, s, thdot = (float(v) for v in options["state"])
        self.state = np.array([math.atan2(s, c), thdot])
        return self._get_obs(), {}


SETTABLE_PENDULUM = "tests/SettablePendulum-v0"


def test_cli_circle_dims_are_validated_recorded_and_loaded_back(tmp_path, capsys):
    """`train ifo --circle-dims 0,1` on a (cos θ, sin θ, θ̇) env: the checkpoint records the pair (a circle
    cost), `evaluate`/`train bc` load it without the flag, bad pairs exit 2 naming the problem, and a resume
    with another declaration is refused."""
    from agents.dataset import generate_dataset

    if SETTABLE_PENDULUM not in gym.registry:
        gym.register(SETTABLE_PENDULUM, entry_point=_SettablePendulum, max_episode_steps=10)
    generate_dataset(tmp_path / "p.npz", episodes=2, seed=0, env=gym.make(SETTABLE_PENDULUM), progress=False,
                     expert=lambda obs: np.clip(-2 * np.asarray(obs)[..., 2:], -2, 2).astype(np.float32))
    data, ifo = str(tmp_path / "p.npz"), tmp_path / "ifo"
    base = ["train", "ifo", "--dataset", data, "--out", str(ifo), "--preset", "tiny", "--no-progress"]
    for bad, needle in ((["0,3"], "index 3 is out of range"), (["0,1", "1,2"], "index 1 appears more than"),
                        (["0"], "not a pair"), (["0,x"], "not a pair")):
        assert cli_main([*base, "--circle-dims", *bad]) == 2
        assert needle in capsys.readouterr().err
    assert cli_main([*base, "--circle-dims", "0,1", "--angle-dims", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert not ifo.exists() or not (ifo / "ifo_checkpoint.pt").exists()  # refused before any training

    assert cli_main([*base, "--circle-dims", "0,1", "--cost-init", "expert_mean"]) == 0
    res = json.loads((ifo / "results.json").read_text())
    assert res["task"]["circle_dims"] == [[0, 1]] and res["task"]["env_id"] == SETTABLE_PENDULUM
    dyn, cost, cfg, task = load_ifo_checkpoint(ifo / "ifo_checkpoint.pt")
    assert isinstance(cost, CircleTargetCost) and task.circle_dims == ((0, 1),)
    assert cfg.cost_init == "expert_mean"
    assert abs(float(cost.target.detach()[:2].norm()) - 1.0) < 1e-12  # the pair's target stays on the circle
    # resuming with another declaration of the same data is refused (the task is part of the run's identity)
    assert cli_main([*base, "--resume", "--cost-init", "expert_mean"]) == 1
    assert "task" in capsys.readouterr().err

    # evaluate / train bc read the task from the checkpoint: no flag
    assert cli_main(["train", "bc", "--dataset", data, "--dynamics", str(ifo), "--out", str(tmp_path / "bc"),
                     "--preset", "tiny", "--no-progress"]) == 0
    from agents.bc import load_bc_policy

    assert load_bc_policy(tmp_path / "bc" / "bc_checkpoint.pt").task == task
    assert cli_main(["train", "bc", "--dataset", data, "--dynamics", str(ifo), "--out", str(tmp_path / "bc2"),
                     "--circle-dims", "0,1"]) == 2
    assert "from the --dynamics checkpoint" in capsys.readouterr().err
    assert cli_main(["train", "bco", "--dataset", data, "--out", str(tmp_path / "bco"), "--preset", "tiny",
                     "--no-progress", "--circle-dims", "0,1"]) == 0
    assert json.loads((tmp_path / "bco" / "results.json").read_text())["task"]["circle_dims"] == [[0, 1]]
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--env", SETTABLE_PENDULUM, "--episodes", "2", "--policy", f"ifo:{ifo}",
                     "--policy", f"bc:{tmp_path / 'bc'}", "--out", str(out), "--no-progress"]) == 0
    ev = json.loads((out / "results.json").read_text())["evaluation"]
    assert [len(r["episode_returns"]) for r in ev.values()] == [2, 2]


def test_cost_restarts_keep_the_lowest_training_loss_and_resume(pairs, tmp_path):
    """`cost_restarts`: K = 1 is the plain run (restart 0 of K > 1 replays it exactly, the config dict has no
    new keys); the restart with the lowest selection loss is the one whose models and history are kept;
    an interrupted K > 1 run resumes to the uninterrupted one."""
    x, xn = pairs
    cfg1, cfg2 = TINY, replace(TINY, cost_restarts=2)
    assert "cost_restarts" not in cfg1.to_dict() and IfOConfig.from_dict(cfg2.to_dict()) == cfg2
    one = IfOTrainer(x, xn, cfg1, seed=2)
    one.run(progress=False)
    two = IfOTrainer(x, xn, cfg2, seed=2)
    s = two.run(progress=False)
    losses = [r["selection_loss"] for r in s["cost_restarts"]]
    assert [r["restart"] for r in s["cost_restarts"]] == [0, 1] and losses[0] == one.selection_loss()
    assert losses[0] != losses[1] and s["kept_restart"] == int(np.argmin(losses))
    assert two.selection_loss() == min(losses) and two.iteration == TINY.iterations
    assert all(r["solves"] == TINY.iterations * TINY.cost_batch >= r["solves_converged"]
               for r in s["cost_restarts"])

    class Forced(IfOTrainer):  # selection losses chosen by the test: restart 1 must be kept
        def selection_loss(self):
            return (0.3, 0.1, 0.2)[self.restart]

    kept = {}
    for k in (2, 3):
        tr = Forced(x, xn, replace(TINY, cost_restarts=k), seed=2)
        assert tr.run(progress=False)["kept_restart"] == 1
        kept[k] = params(tr.dynamics) + params(tr.cost) + [torch.tensor([h["loss"] for h in tr.history])]
    first = params(one.dynamics) + params(one.cost)
    assert any(not torch.equal(a, b) for a, b in zip(first, kept[3], strict=False))  # not restart 0
    for a, b in zip(kept[2], kept[3], strict=True):  # restart 1 of K = 2 and of K = 3: the same state
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    part = IfOTrainer(x, xn, cfg2, seed=2, out=tmp_path)
    part.run(progress=False, stop_after=3)
    resumed = IfOTrainer(x, xn, cfg2, seed=2, out=tmp_path)
    assert resumed.run(progress=False, resume=True)["cost_restarts"] == s["cost_restarts"]
    for a, b in zip(params(two.dynamics) + params(two.cost), params(resumed.dynamics) + params(resumed.cost),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(BadArgumentError, match="cost_restarts"):
        IfOConfig(cost_restarts=0)
