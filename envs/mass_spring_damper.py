"""Mass-spring-damper of the paper's Appx. C (the differentiable-LQR imitation experiment).

``x_{t+1} = A x_t + B u_t`` with the Appx. C matrices

    A = [[0, 1], [−k/m, −c/m]],   B = [0, −1/m]ᵀ,

used *as written* as a discrete-time map (``discretization="paper"``, the default). The physically
discretised alternative — zero-order hold of the continuous system ``ẋ = A x + B u`` (same A, B) over ``dt`` —
is available as ``discretization="zoh"``; it is **not** what the paper uses.

Stage cost ``xᵀ Q x + uᵀ R u`` with ``Q = I₂`` and ``R = 2``.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from .cartpole_swingup import _check_action, _observable
from .rendering import BLACK, BLUE, GREEN, GREY, LIGHT_GREY, RED, Canvas, FrameRenderMixin, HumanViewer

MASS = 1.0  # m
STIFFNESS = 1.0  # k
DAMPING = 1.0  # c (the paper also uses 0.1 and -0.6)
DT = 0.1  # only used by discretization="zoh" (and for render_fps)
X0 = (0.0, 3.0)  # initial [position, velocity]
MSD_Q = ((1.0, 0.0), (0.0, 1.0))  # state cost Q = I
MSD_R = ((2.0,),)  # control cost R = 2
STATE_DIM = 2
ACTION_DIM = 1
DISCRETIZATIONS = ("paper", "zoh")


def msd_matrices(
    damping: float | torch.Tensor = DAMPING,
    mass: float | torch.Tensor = MASS,
    stiffness: float | torch.Tensor = STIFFNESS,
    discretization: str = "paper",
    dt: float = DT,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(A, B)`` of the map ``x_{t+1} = A x_t + B u_t``, shapes ``(..., 2, 2)`` and ``(..., 2, 1)``.

    - ``"paper"`` (Appx. C): ``A = [[0, 1], [−k/m, −c/m]]``, ``B = [0, −1/m]ᵀ``, used directly as the map
      (``dt`` is ignored).
    - ``"zoh"``: zero-order hold of ``ẋ = A_c x + B_c u`` with ``A_c, B_c`` the matrices above, i.e.
      ``A = e^{A_c dt}``, ``B = ∫₀^dt e^{A_c s} ds B_c`` via the block-matrix exponential
      ``exp([[A_c, B_c], [0, 0]] dt) = [[A, B], [0, I]]``. Not the paper's dynamics.

    The physical parameters may be tensors (batched over their broadcast shape ``...``, and differentiable:
    gradients flow to ``damping`` etc. when they require grad); plain floats give ``(2, 2)`` and ``(2, 1)``.
    """
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
    kw = {"dtype": dtype, "device": device}
    c, m, k = (torch.as_tensor(v, **kw) for v in (damping, mass, stiffness))
    for name, v, raw in (("damping", c, damping), ("mass", m, mass), ("stiffness", k, stiffness)):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite, got {raw}")
    if not bool((m > 0).all()):
        raise ValueError(f"mass must be positive, got {mass}")
    c, m, k = torch.broadcast_tensors(c, m, k)
    zero, one = torch.zeros_like(m), torch.ones_like(m)
    A = torch.stack((torch.stack((zero, one), -1), torch.stack((-k / m, -c / m), -1)), -2)
    B = torch.stack((zero, -1.0 / m), -1).unsqueeze(-1)
    if discretization == "paper":
        return A, B
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt must be positive and finite for discretization='zoh', got {dt}")
    block = torch.cat((torch.cat((A, B), -1), torch.zeros(*A.shape[:-2], 1, 3, **kw)), -2)
    E = torch.linalg.matrix_exp(block * dt)
    return E[..., :2, :2], E[..., :2, 2:]


def msd_cost_matrices(
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, R)`` of the stage cost: ``Q = I₂`` (2×2) and ``R = [[2]]`` (1×1)."""
    return torch.tensor(MSD_Q, dtype=dtype, device=device), torch.tensor(MSD_R, dtype=dtype, device=device)


def msd_dynamics(state: torch.Tensor, action: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x_{t+1} = A x_t + B u_t``, batched ``(..., 2), (..., 1) → (..., 2)``; A, B may carry batch dims."""
    if state.shape[-1:] != (STATE_DIM,) or action.shape[-1:] != (ACTION_DIM,):
        raise ValueError(
            f"expected state (..., 2) and action (..., 1), got {tuple(state.shape)} and {tuple(action.shape)}"
        )
    return (A @ state.unsqueeze(-1) + B @ action.unsqueeze(-1)).squeeze(-1)


def msd_cost(
    state: torch.Tensor, action: torch.Tensor, Q: torch.Tensor | None = None, R: torch.Tensor | None = None
) -> torch.Tensor:
    """Stage cost ``xᵀ Q x + uᵀ R u`` (default Q = I, R = 2), batched ``(..., 2), (..., 1) → (...)``."""
    if Q is None or R is None:
        Q0, R0 = msd_cost_matrices(state.dtype, state.device)
        Q = Q0 if Q is None else Q
        R = R0 if R is None else R
    xQx = ((Q @ state.unsqueeze(-1)).squeeze(-1) * state).sum(-1)
    uRu = ((R @ action.unsqueeze(-1)).squeeze(-1) * action).sum(-1)
    return xQx + uRu


class MassSpringDamperEnv(FrameRenderMixin, gym.Env):
    r"""Mass-spring-damper with the paper's Appx. C linear dynamics and quadratic cost.

    ## Description
    A unit mass on a unit spring with damping c, ``x_{t+1} = A x_t + B u_t`` with
    ``A = [[0, 1], [−k/m, −c/m]]``, ``B = [0, −1/m]ᵀ`` (m = k = 1). With ``discretization="paper"`` (default)
    these matrices are the discrete-time map exactly as written in Appx. C; ``discretization="zoh"`` uses the
    zero-order hold of ``ẋ = A x + B u`` over ``dt`` instead (physical, **not** the paper's).
    The dynamics are ``msd_dynamics(state, action, *msd_matrices(...))``.

    ## Action space
    ``Box(-action_bound, action_bound, (1,), float32)`` (default bound 100: effectively unconstrained, as in
    the paper's LQR). Actions outside are **clipped**; NaN/inf raises ``ValueError``.

    ## Observation space
    ``Box(-inf, inf, (2,), float32)``: ``[position, velocity]`` (the float64 state is ``info["state"]``).

    ## Reward
    ``reward = −(x_tᵀ Q x_t + u_tᵀ R u_t)`` with ``Q = I``, ``R = 2``, on the state *before* the step and the
    (clipped) action — the LQR stage cost (``msd_cost``); ``info["cost"]`` carries it.

    ## Starting state
    ``x₀ = [0, 3]`` deterministically (``start_noise`` > 0 adds ``N(0, start_noise² I)``);
    ``reset(options={"state": s})`` starts exactly at ``s``.

    ## Episode end
    Never terminates; ``diffmpc/MassSpringDamper-v0`` truncates after 50 steps. A non-finite state (possible
    for unstable dampings) raises on the next step.

    ## Arguments
    ``gymnasium.make("diffmpc/MassSpringDamper-v0", damping=1.0, discretization="paper", dt=0.1,
    action_bound=100.0, start_noise=0.0, render_mode=None)``.

    ## Version history
    - v0: initial version (Appx. C matrices as a discrete map; optional ZOH variant).
    """

    metadata = {"render_modes": ["human", "rgb_array"], "render_fps": int(round(1.0 / DT))}
    viewer_title = "MassSpringDamper"

    def __init__(
        self,
        render_mode: str | None = None,
        damping: float = DAMPING,
        mass: float = MASS,
        stiffness: float = STIFFNESS,
        discretization: str = "paper",
        dt: float = DT,
        action_bound: float = 100.0,
        start_noise: float = 0.0,
        width: int = 480,
        height: int = 160,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be in {self.metadata['render_modes']}, got {render_mode!r}")
        if not action_bound > 0:
            raise ValueError(f"action_bound must be positive, got {action_bound}")
        if not (start_noise >= 0 and math.isfinite(start_noise)):
            raise ValueError(f"start_noise must be finite and >= 0, got {start_noise}")
        if int(width) < 1 or int(height) < 1:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        self.render_mode = render_mode
        self.damping, self.mass, self.stiffness = float(damping), float(mass), float(stiffness)
        self.discretization, self.dt = discretization, float(dt)
        A, B = msd_matrices(damping, mass, stiffness, discretization, dt)
        self.A, self.B = A, B
        self.Q, self.R = msd_cost_matrices()
        self.start_noise = float(start_noise)
        self.width, self.height = int(width), int(height)
        self.action_space = spaces.Box(-action_bound, action_bound, shape=(1,), dtype=np.float32)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.state = np.array(X0, dtype=np.float64)
        self._viewer: HumanViewer | None = None
        self._last_action = 0.0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        if options.get("state") is not None:
            state = np.asarray(options["state"], dtype=np.float64)
            if state.shape != (2,) or not _observable(state):
                raise ValueError(f"options['state'] must be 2 finite numbers [position, velocity] within "
                                 f"float32 range (observations are float32): {state}")
            self.state = state.copy()
        else:
            self.state = np.array(X0, dtype=np.float64)
            if self.start_noise > 0:
                self.state = self.state + self.start_noise * self.np_random.standard_normal(2)
        self._last_action = 0.0
        if self.render_mode == "human":
            self.render()
        return self.state.astype(np.float32), {"state": self.state.copy()}

    def step(self, action):
        a = _check_action(action, 1)
        a = np.clip(a, self.action_space.low, self.action_space.high)
        if not np.all(np.isfinite(self.state)):
            raise ValueError(f"state diverged to {self.state}; reset the environment")
        x, u = torch.from_numpy(self.state), torch.from_numpy(a)
        cost = float(msd_cost(x, u, self.Q, self.R))
        nxt = msd_dynamics(x, u, self.A, self.B)
        if not _observable(nxt.numpy()):  # raise at the step that diverges, not one step later
            raise ValueError(f"state diverged: a step from {self.state.tolist()} with action {a.tolist()} "
                             f"gave {nxt.tolist()}; reset the environment")
        self.state = nxt.numpy().copy()
        self._last_action = float(a[0])
        if self.render_mode == "human":
            self.render()
        info = {"cost": cost, "state": self.state.copy(), "action": a.copy()}
        return self.state.astype(np.float32), -cost, False, False, info

    def draw_frame(self) -> np.ndarray:
        return draw_msd(self.state, self._last_action, self.width, self.height)


def draw_msd(state: np.ndarray, action: float = 0.0, width: int = 480, height: int = 160) -> np.ndarray:
    """Draw the mass (position ``state[0]``, world window x ∈ [−6, 6]) on a spring from a wall at x = −5.5."""
    half_w = 6.0
    half_h = half_w * height / width
    cv = Canvas(width, height, (-half_w, half_w), (-half_h, half_h))
    pos = float(np.clip(state[0], -1e3, 1e3))
    wall = -5.5
    cv.hline(-0.5, GREY, 2)
    cv.rect(wall - 0.1, 0.0, 0.2, 1.6, BLACK)
    cv.vline(0.0, LIGHT_GREY)
    cv.circle(0.0, -0.7, 0.1, GREEN)  # equilibrium marker
    # zig-zag spring from the wall to the mass
    left, right = wall, pos - 0.4
    n = 12
    xs = np.linspace(left, right, n + 1)
    ys = np.zeros(n + 1)
    ys[1:-1:2], ys[2:-1:2] = 0.25, -0.25
    for i in range(n):
        cv.line(xs[i], ys[i], xs[i + 1], ys[i + 1], 0.05, BLUE)
    cv.rect(pos, 0.0, 0.8, 0.8, BLACK)
    if action != 0.0:
        cv.line(pos, 0.0, pos + 0.3 * float(np.clip(action, -10, 10)), 0.0, 0.1, RED)
    return cv.image
