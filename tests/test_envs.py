"""Tests of the envs package: physics vs. the issue's equations and scipy, env == torch dynamics, Gymnasium
conventions (check_env, seeding, spaces, episode length), rendering and video writing."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import scipy.linalg
import torch
from gymnasium.utils.env_checker import check_env
from scipy.integrate import solve_ivp

import envs
from envs import (
    CARTPOLE_ID,
    MSD_ID,
    CartPoleSwingUpEnv,
    MassSpringDamperEnv,
    cartpole_cost,
    cartpole_derivatives,
    cartpole_dynamics,
    cartpole_energy,
    msd_cost,
    msd_cost_matrices,
    msd_dynamics,
    msd_matrices,
)
from envs.video import compose_side_by_side, label_image, record_episode, rollout_frames, side_by_side

M, m, L, B, G = 0.5, 0.5, 0.6, 0.1, 9.82


def issue_derivatives(z, f, b=B):
    """The cart-pole equations exactly as written in the issue (an independent transcription, numpy)."""
    _, xd, th, thd = z
    s, c = np.sin(th), np.cos(th)
    xdd = (2 * m * L * thd**2 * s + 3 * m * G * s * c + 4 * f - 4 * b * xd) / (4 * (M + m) - 3 * m * c**2)
    thdd = (-3 * m * L * thd**2 * s * c - 6 * (M + m) * G * s - 6 * (f - b * xd) * c) / (
        4 * L * (M + m) - 3 * m * L * c**2
    )
    return np.array([xd, xdd, thd, thdd])


def random_states(n, seed=0, xd_max=5.0, thd_max=12.0):
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            rng.uniform(-2, 2, n),
            rng.uniform(-xd_max, xd_max, n),
            rng.uniform(-2 * np.pi, 2 * np.pi, n),
            rng.uniform(-thd_max, thd_max, n),
        ],
        axis=-1,
    )


@pytest.fixture(autouse=True)
def _quiet_checker():
    with warnings.catch_warnings():
        # check_env's advice about unbounded observation boxes / non-normalised action boxes is expected
        warnings.filterwarnings("ignore", message=".*Box observation space m.*")
        warnings.filterwarnings("ignore", message=".*symmetric and normalized space.*")
        yield


# --- cart-pole physics --------------------------------------------------------------------------------------


def test_derivatives_match_issue_equations():
    S = random_states(200, seed=1)
    F = np.random.default_rng(2).uniform(-10, 10, 200)
    out = cartpole_derivatives(torch.from_numpy(S), torch.from_numpy(F)).numpy()
    ref = np.stack([issue_derivatives(s, f) for s, f in zip(S, F, strict=True)])
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_one_step_matches_solve_ivp():
    """Default RK4 substeps: one-step error < 1e-4 vs DOP853 at rtol=atol=1e-12 (issue requirement)."""
    S = random_states(40, seed=3)
    U = np.random.default_rng(4).uniform(-1, 1, 40)
    out = cartpole_dynamics(torch.from_numpy(S), torch.from_numpy(U[:, None])).numpy()
    errs = []
    for s, u, o in zip(S, U, out, strict=True):
        ref = solve_ivp(lambda t, z, u=u: issue_derivatives(z, 10.0 * u), (0.0, envs.DT), s, method="DOP853",
                        rtol=1e-12, atol=1e-12).y[:, -1]
        errs.append(np.abs(o - ref).max())
    assert max(errs) < 1e-4, max(errs)
    # and the integrator converges at 4th order towards the same reference (so the test can fail)
    coarse = cartpole_dynamics(torch.from_numpy(S), torch.from_numpy(U[:, None]), substeps=2).numpy()
    e4 = np.abs(coarse - out)
    assert e4.max() > 10 * max(errs)


def test_energy_conserved_without_friction_and_force():
    """b = 0, f = 0 over 5 s: the cart + uniform-rod energy is conserved (to the integrator's accuracy)."""
    S = torch.tensor([[0.0, 0.5, 2.0, 8.0], [0.3, -1.0, 0.2, 0.0], [0.0, 0.0, 3.0, 0.1]], dtype=torch.float64)
    E0 = cartpole_energy(S)
    zero = torch.zeros(3, 1, dtype=torch.float64)
    for substeps, tol in ((envs.SUBSTEPS, 1e-4), (20, 1e-6)):
        x, drift = S, []
        for _ in range(50):  # 5 s
            x = cartpole_dynamics(x, zero, substeps=substeps, friction=0.0)
            drift.append(((cartpole_energy(x) - E0).abs() / E0.abs().clamp_min(1.0)).max().item())
        assert max(drift) < tol, (substeps, max(drift))
        assert x[0, 2] > 2 * np.pi  # the first pendulum went over the top: large motions were covered
    # with friction the energy decays (the friction really acts)
    y = S[:2]
    for _ in range(50):
        y = cartpole_dynamics(y, zero[:2])
    assert (cartpole_energy(y) < E0[:2] - 1e-3).all()


def test_dynamics_batched_broadcast_and_dtypes():
    S = torch.from_numpy(random_states(12, seed=5)).reshape(3, 4, 4)
    U = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4, 1)
    batched = cartpole_dynamics(S, U)
    pairs = zip(S.reshape(-1, 4), U.reshape(-1, 1), strict=True)
    single = torch.stack([cartpole_dynamics(s, u) for s, u in pairs])
    torch.testing.assert_close(batched.reshape(-1, 4), single, rtol=0, atol=1e-13)
    # one state, many actions (broadcast)
    many = cartpole_dynamics(S[0, 0], U.reshape(12, 1))
    assert many.shape == (12, 4)
    torch.testing.assert_close(many[5], cartpole_dynamics(S[0, 0], U.reshape(12, 1)[5]))
    f32 = cartpole_dynamics(S.float(), U.float())
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), batched, rtol=1e-4, atol=1e-4)
    # the dynamics do not clip: an action of 2 is twice the force of 1
    u2 = cartpole_dynamics(S[0, 0], torch.tensor([2.0], dtype=torch.float64))
    u1 = cartpole_dynamics(S[0, 0], torch.tensor([1.0], dtype=torch.float64))
    assert (u2 - u1).abs().max() > 1e-3
    with pytest.raises(ValueError, match="last dimension of 4"):
        cartpole_dynamics(S[..., :3], U)
    with pytest.raises(ValueError, match="last dimension of 1"):
        cartpole_dynamics(S, U.expand(3, 4, 2))


def test_dynamics_and_cost_gradcheck():
    s = torch.tensor([[0.1, -0.3, 2.5, 1.0], [0.0, 0.2, 0.3, -2.0]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([[0.4], [-0.7]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, u: cartpole_dynamics(s, u, substeps=2), (s, u))
    assert torch.autograd.gradgradcheck(lambda s, u: cartpole_dynamics(s, u, substeps=1), (s, u))
    assert torch.autograd.gradcheck(cartpole_cost, (s,))


def test_cost_values():
    l = envs.POLE_LENGTH
    upright = torch.tensor([0.0, 0.0, np.pi, 0.0], dtype=torch.float64)
    down = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert cartpole_cost(upright).item() == pytest.approx(0.0, abs=1e-15)
    assert cartpole_cost(down).item() == pytest.approx(1 - np.exp(-((2 * l) ** 2) / (2 * 0.25**2)))
    # upright but the cart displaced by 0.25 m: d = 0.25
    shifted = torch.tensor([0.25, 3.0, np.pi + 2 * np.pi, -1.0], dtype=torch.float64)
    assert cartpole_cost(shifted).item() == pytest.approx(1 - np.exp(-0.5))
    tip = envs.cartpole_tip(torch.tensor([0.2, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(tip, torch.tensor([0.2 + l * np.sin(0.5), -l * np.cos(0.5)]).float())


# --- cart-pole environment ----------------------------------------------------------------------------------


def test_cartpole_check_env():
    check_env(gym.make(CARTPOLE_ID, render_mode="rgb_array").unwrapped, skip_render_check=False)
    check_env(gym.make(CARTPOLE_ID, start_variance=0.08).unwrapped)


def test_env_step_equals_torch_dynamics():
    env = gym.make(CARTPOLE_ID)
    obs, info = env.reset(seed=7)
    x = torch.from_numpy(info["state"])
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = rng.uniform(-1.5, 1.5, 1).astype(np.float32)
        obs, reward, terminated, truncated, info = env.step(a)
        u = torch.from_numpy(np.clip(a, -1, 1).astype(np.float64))
        x = cartpole_dynamics(x, u)
        np.testing.assert_array_equal(info["state"], x.numpy())
        np.testing.assert_array_equal(obs, x.numpy().astype(np.float32))
        assert reward == -info["cost"] == pytest.approx(-cartpole_cost(x).item(), abs=0)
        assert not terminated
    assert truncated


def test_episode_length_and_no_termination():
    env = gym.make(CARTPOLE_ID)
    assert env.spec.max_episode_steps == 40
    env.reset(seed=0)
    for t in range(40):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        assert not term
        assert trunc == (t == 39)
    assert gym.make(MSD_ID).spec.max_episode_steps == envs.MSD_EPISODE_STEPS


def test_reset_distribution_and_exact_state():
    env = CartPoleSwingUpEnv()
    starts = np.stack([env.reset(seed=i)[1]["state"] for i in range(3000)])
    np.testing.assert_allclose(starts.mean(0), 0.0, atol=4 * np.sqrt(0.04 / 3000))
    cov = np.cov(starts.T)
    np.testing.assert_allclose(np.diag(cov), 0.04, rtol=0.1)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 0.005
    high = CartPoleSwingUpEnv(start_variance=0.08)
    starts_hi = np.stack([high.reset(seed=i)[1]["state"] for i in range(3000)])
    np.testing.assert_allclose(np.var(starts_hi, axis=0), 0.08, rtol=0.1)
    s0 = np.array([0.1, -0.2, 3.0, 0.05])
    obs, info = env.reset(options={"state": s0})
    np.testing.assert_array_equal(info["state"], s0)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    with pytest.raises(ValueError, match="options"):
        env.reset(options={"state": [0.0, np.nan, 0.0, 0.0]})
    with pytest.raises(ValueError, match="start_variance"):
        CartPoleSwingUpEnv(start_variance=np.ones(3))


def test_same_seed_same_trajectory():
    def run(seed):
        env = gym.make(CARTPOLE_ID)
        env.action_space.seed(seed)
        obs, _ = env.reset(seed=seed)
        traj = [obs]
        for _ in range(10):
            traj.append(env.step(env.action_space.sample())[0])
        return np.stack(traj)

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_actions_clipped_and_nan_rejected():
    env = CartPoleSwingUpEnv()
    s0 = np.array([0.0, 0.0, 0.5, 0.0])
    env.reset(options={"state": s0})
    big = env.step(np.array([5.0]))[4]
    env.reset(options={"state": s0})
    one = env.step(np.array([1.0]))[4]
    np.testing.assert_array_equal(big["state"], one["state"])
    np.testing.assert_array_equal(big["action"], [1.0])
    for bad in (np.array([np.nan]), np.array([np.inf]), np.array([0.1, 0.2])):
        with pytest.raises(ValueError, match="action"):
            env.step(bad)


def test_rendering_rgb_array():
    env = CartPoleSwingUpEnv(render_mode="rgb_array")
    env.reset(options={"state": [0.0, 0.0, np.pi, 0.0]})  # upright
    up = env.render()
    assert up.shape == (320, 480, 3) and up.dtype == np.uint8
    env.reset(options={"state": [0.0, 0.0, 0.0, 0.0]})  # hanging
    down = env.render()
    # the pole (brown) is above the rail when upright and below it when hanging
    brown = np.all(up == (202, 152, 101), axis=-1)
    rows = np.nonzero(brown)[0]
    assert rows.size > 50 and rows.max() < 160
    rows_down = np.nonzero(np.all(down == (202, 152, 101), axis=-1))[0]
    assert rows_down.min() > 160
    env.reset(options={"state": [1.0, 0.0, 0.0, 0.0]})
    cart_cols = np.nonzero(np.all(env.render() == 0, axis=-1))[1]
    assert abs(cart_cols.mean() - (1.0 + 2.0) / 4.0 * 480) < 5  # cart centred at x = 1 m
    with pytest.warns(UserWarning, match="render_mode"):
        assert CartPoleSwingUpEnv().render() is None


def test_human_render_headless(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    env = CartPoleSwingUpEnv(render_mode="human")
    env.reset(seed=0)
    assert env.step(np.array([0.5]))[0].shape == (4,)
    env.close()


def test_import_envs_does_not_import_diffmpc_or_agents():
    code = (
        "import sys, envs, envs.video; "
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('diffmpc', 'agents')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- mass-spring-damper -------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1.0, 0.1, -0.6])
def test_msd_paper_matrices(c):
    A, Bm = msd_matrices(damping=c)
    torch.testing.assert_close(A, torch.tensor([[0.0, 1.0], [-1.0, -c]], dtype=torch.float64))
    torch.testing.assert_close(Bm, torch.tensor([[0.0], [-1.0]], dtype=torch.float64))
    A2, B2 = msd_matrices(damping=c, mass=2.0, stiffness=3.0)
    torch.testing.assert_close(A2, torch.tensor([[0.0, 1.0], [-1.5, -c / 2]], dtype=torch.float64))
    torch.testing.assert_close(B2, torch.tensor([[0.0], [-0.5]], dtype=torch.float64))


def test_msd_zoh_is_the_exact_discretisation():
    A, Bm = msd_matrices(damping=0.5, discretization="zoh", dt=0.2)
    Ac, Bc = (t.numpy() for t in msd_matrices(damping=0.5))
    np.testing.assert_allclose(A.numpy(), scipy.linalg.expm(0.2 * Ac), rtol=1e-12)
    x0, u = np.array([0.3, -1.0]), 0.7
    sol = solve_ivp(lambda t, x: Ac @ x + Bc[:, 0] * u, (0, 0.2), x0, rtol=1e-12, atol=1e-12).y[:, -1]
    np.testing.assert_allclose(A.numpy() @ x0 + Bm.numpy()[:, 0] * u, sol, atol=1e-9)
    with pytest.raises(ValueError, match="discretization"):
        msd_matrices(discretization="euler")
    with pytest.raises(ValueError, match="mass"):
        msd_matrices(mass=0.0)


@pytest.mark.parametrize("discretization", ["paper", "zoh"])
def test_msd_matrices_batched_and_differentiable(discretization):
    c = torch.tensor([1.0, 0.1, -0.6], dtype=torch.float64, requires_grad=True)
    A, Bm = msd_matrices(damping=c, discretization=discretization)
    assert A.shape == (3, 2, 2) and Bm.shape == (3, 2, 1)
    for i in range(3):
        Ai, Bi = msd_matrices(damping=float(c.detach()[i]), discretization=discretization)
        torch.testing.assert_close(A[i], Ai)
        torch.testing.assert_close(Bm[i], Bi)
    assert torch.autograd.gradcheck(lambda c: msd_matrices(damping=c, discretization=discretization), (c,))


def test_msd_env_matches_matrices_and_cost():
    env = gym.make(MSD_ID, damping=0.1)
    obs, info = env.reset(seed=0)
    np.testing.assert_array_equal(info["state"], [0.0, 3.0])
    A, Bm = msd_matrices(damping=0.1)
    Q, R = msd_cost_matrices()
    torch.testing.assert_close(Q, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(R, torch.tensor([[2.0]], dtype=torch.float64))
    x = np.array([0.0, 3.0])
    for t in range(50):
        u = np.array([np.sin(t)])
        obs, reward, term, trunc, info = env.step(u.astype(np.float32))
        u = u.astype(np.float32).astype(np.float64)
        cost = x @ x + 2.0 * u @ u
        x = A.numpy() @ x + Bm.numpy()[:, 0] * u[0]
        np.testing.assert_allclose(info["state"], x, rtol=1e-12, atol=1e-12)
        assert reward == pytest.approx(-cost, rel=1e-12) and info["cost"] == pytest.approx(cost, rel=1e-12)
    assert trunc and not term
    xs, us = torch.randn(5, 3, 2, dtype=torch.float64), torch.randn(5, 3, 1, dtype=torch.float64)
    torch.testing.assert_close(msd_cost(xs, us), (xs**2).sum(-1) + 2 * us[..., 0] ** 2)
    torch.testing.assert_close(msd_dynamics(xs, us, A, Bm), xs @ A.T + us @ Bm.T)


def test_msd_lqr_rollout_cost_equals_dare_value():
    """Closed loop u = −K x with K from scipy's DARE: the summed env cost equals x₀ᵀ P x₀ (consistency of
    dynamics, cost, and the env's cost bookkeeping)."""
    A, Bm = (t.numpy() for t in msd_matrices(damping=1.0))
    Q, R = np.eye(2), np.array([[2.0]])
    P = scipy.linalg.solve_discrete_are(A, Bm, Q, R)
    K = np.linalg.solve(R + Bm.T @ P @ Bm, Bm.T @ P @ A)
    env = MassSpringDamperEnv()
    obs, info = env.reset()
    x, total = info["state"], 0.0
    for _ in range(400):
        _, reward, _, _, info = env.step(-K @ x)
        total -= reward
        x = info["state"]
    assert total == pytest.approx(np.array([0.0, 3.0]) @ P @ np.array([0.0, 3.0]), rel=1e-5)


def test_msd_check_env_and_bad_input():
    check_env(gym.make(MSD_ID, render_mode="rgb_array").unwrapped, skip_render_check=False)
    check_env(gym.make(MSD_ID, discretization="zoh", damping=-0.6).unwrapped)
    env = MassSpringDamperEnv(action_bound=2.0)
    env.reset()
    assert env.step(np.array([10.0]))[4]["action"][0] == 2.0
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan]))
    frame = MassSpringDamperEnv(render_mode="rgb_array")
    frame.reset()
    img = frame.render()
    assert img.shape == (160, 480, 3) and img.dtype == np.uint8 and (img == 0).any()


# --- video --------------------------------------------------------------------------------------------------


class _ActPolicy:
    def __init__(self):
        self.resets = 0

    def reset(self):
        self.resets += 1

    def act(self, obs):
        return torch.tensor([np.tanh(obs[3])])


def test_record_episode_mp4_and_gif(tmp_path):
    import imageio.v3 as iio

    env = gym.make(CARTPOLE_ID, render_mode="rgb_array")
    policy = _ActPolicy()
    stats = record_episode(env, policy, tmp_path / "ep", seed=0, max_steps=12)
    assert policy.resets == 1
    assert stats["steps"] == 12 and stats["frames"] == 13
    assert stats["cost"] == pytest.approx(-stats["return"])
    mp4, gif = (tmp_path / "ep.mp4"), (tmp_path / "ep.gif")
    assert stats["paths"] == [str(mp4), str(gif)]
    video = iio.imread(mp4)
    assert video.shape == (13, 320, 480, 3)
    first = iio.imread(gif, index=0)[..., :3]
    env.reset(seed=0)
    assert np.abs(first.astype(int) - env.render().astype(int)).mean() < 3  # GIF palette quantisation
    only_gif = record_episode(env, lambda o: np.zeros(1), tmp_path / "sub" / "zero.gif", seed=1)
    assert only_gif["steps"] == 40 and only_gif["paths"] == [str(tmp_path / "sub" / "zero.gif")]
    with pytest.raises(ValueError, match="render_mode"):
        rollout_frames(gym.make(CARTPOLE_ID), policy)
    with pytest.raises(TypeError, match="policy"):
        rollout_frames(env, object())


def test_side_by_side_labels(tmp_path):
    import imageio.v3 as iio

    env = CartPoleSwingUpEnv(render_mode="rgb_array")
    a, _ = rollout_frames(env, lambda o: np.ones(1), seed=0, max_steps=6)
    b, _ = rollout_frames(env, lambda o: -np.ones(1), seed=0, max_steps=3)
    frames = compose_side_by_side({"push right": a, "push left": b})
    assert len(frames) == 7
    H, W = 320 + 32 + 4, 2 * 480 + 4  # label strip, frame, time bar
    assert frames[0].shape == (H, W, 3)
    # the label strips carry dark text pixels; the shorter episode holds its last frame
    assert (frames[0][:32, :480] < 100).any() and (frames[0][:32, 484:] < 100).any()
    np.testing.assert_array_equal(frames[6][32:-4, 484:], b[-1])
    assert not np.array_equal(label_image("push right", 480), label_image("push left", 480))
    paths = side_by_side({"push right": a, "push left": b}, tmp_path / "cmp.mp4", fps=5)
    assert [p.name for p in paths] == ["cmp.mp4", "cmp.gif"]
    assert iio.imread(paths[0]).shape[0] == 7
    assert iio.imread(paths[1], index=None).shape[0] == 7  # the held last frame is not merged in the gif
    with pytest.raises(ValueError, match="render_fps"):
        side_by_side({"push right": a}, tmp_path / "nofps")
    with pytest.raises(ValueError, match="frame"):
        side_by_side({"bad": [np.zeros((4, 4), dtype=np.uint8)]}, tmp_path / "bad")


def test_record_video_wrapper(tmp_path):
    pytest.importorskip("moviepy")
    env = gym.wrappers.RecordVideo(gym.make(CARTPOLE_ID, render_mode="rgb_array"), str(tmp_path))
    env.reset(seed=0)
    for _ in range(40):
        env.step(env.action_space.sample())
    env.close()
    assert list(tmp_path.glob("*.mp4"))
