r"""The behavioural-cloning baseline of the paper (Sec. 3.2), trained from observation only.

The expert's controls are unknown, so BC cannot regress ``u``. Instead a policy ``π(x; ψ)`` is trained so that
its control, mapped through the *same* learned dynamics ``h(·; θ_h)`` as the IfO agent (frozen), reproduces
the expert's next state:

.. math::  L(ψ) = \frac{1}{|B|} \sum_{(x, x') ∈ B} \lVert (x' − h(x, π(x; ψ))) ⊘ σ \rVert^2

``π(x) = mid + half · tanh(MLP(φ(x)))`` keeps the control in the box; ``φ`` are the same angle features.
Unlike MPC_IFT, the policy has no lookahead: it imitates one step at a time and cannot plan a swing-up.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffmpc._checks import check_fields
from diffmpc.errors import BadArgumentError
from diffmpc.io import CheckpointError, check_state_dict
from diffmpc.sweep import report

from .ifo import normalized_error
from .task import CARTPOLE, Task
from .training import load_checkpoint, save_checkpoint

__all__ = ["BCConfig", "BCPolicy", "BCTrainer", "BC_PRESETS", "load_bc_policy", "BCOConfig", "BCOTrainer",
           "InverseDynamics", "load_bco_policy", "BCO_PRESETS"]


@dataclass(frozen=True)
class BCConfig:
    """Settings of :class:`BCTrainer` (defaults: the ``"quick"`` preset)."""

    hidden: tuple[int, ...] = (64, 64)
    steps: int = 3000
    batch: int = 256
    lr: float = 3e-3
    checkpoint_every: int = 500
    # k > 1: the loss rolls the policy k steps through the learned model from an expert state and compares
    # with the expert's next k states (needs the trajectories); 1 is the paper's one-step loss.
    rollout_steps: int = 1

    def __post_init__(self) -> None:
        check_fields(self, ints=("steps", "batch", "checkpoint_every", "rollout_steps"), positive=("lr",))
        if not all(isinstance(h, int) and h >= 1 for h in self.hidden):
            raise BadArgumentError(f"BCConfig.hidden must be layer widths >= 1, got {self.hidden!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BCConfig:
        d = {k: v for k, v in d.items() if k not in ("u_low", "u_high")}  # bounds live in the Task now
        d["hidden"] = tuple(d.get("hidden", cls.hidden))
        return cls(**d)


BC_PRESETS = {
    "quick": BCConfig(rollout_steps=5),  # the strongest states-only BC we found (docs/table2.md)
    "paper": BCConfig(hidden=(128, 128), steps=10000, rollout_steps=5),
    "tiny": BCConfig(hidden=(16, 16), steps=40, batch=32, checkpoint_every=10),
}


class BCPolicy(nn.Module):
    """``π(x) = mid + half·tanh(MLP(φ(x)))``: batched ``(B, n) -> (B, m)`` of ``task`` (any float dtype)."""

    def __init__(self, hidden: tuple[int, ...] = (64, 64), task: Task | None = None) -> None:
        super().__init__()
        task = task or CARTPOLE
        self.task = task
        self.features = task.features()
        _tanh_mlp_into_box(self, self.features.out_dim, hidden, task)

    def forward(self, x: Tensor) -> Tensor:
        p = next(self.parameters())
        return self.u_mid + self.u_half * torch.tanh(self.net(self.features(x.to(p.dtype))))


class BCTrainer:
    """Trains :class:`BCPolicy` on expert pairs through frozen learned dynamics.

    Checkpoints to ``out/bc_checkpoint.pt`` every ``checkpoint_every`` steps and on Ctrl-C;
    ``run(resume=True)`` continues."""

    def __init__(
        self,
        x: Any,
        x_next: Any,
        dynamics: nn.Module,
        config: BCConfig | None = None,
        seed: int = 0,
        out: str | Path | None = None,
        task: Task | None = None,
        provenance: dict[str, Any] | None = None,
        trajectories: Any = None,
    ) -> None:
        self.config = config or BCConfig()
        self.task = task = task or CARTPOLE
        # What BC was trained on (dataset SHA-256, the learned dynamics' identity): checked on resume.
        self.provenance = dict(provenance or {})
        p = next(dynamics.parameters())  # BC trains on the dynamics' device and dtype
        self.x = torch.as_tensor(np.asarray(x), dtype=p.dtype).to(p.device)
        self.x_next = torch.as_tensor(np.asarray(x_next), dtype=p.dtype).to(p.device)
        task.check_states(self.x, self.x_next, what="expert pairs")
        if self.x.shape != self.x_next.shape:
            raise ValueError(f"expert pairs must have equal shapes, got {tuple(self.x.shape)} and "
                             f"{tuple(self.x_next.shape)}")
        self.trajectories = None
        if self.config.rollout_steps > 1:
            if trajectories is None:
                raise BadArgumentError(f"BCConfig.rollout_steps={self.config.rollout_steps} needs the expert "
                                       "trajectories (N, T+1, n): pass trajectories=dataset.states")
            traj = torch.as_tensor(np.asarray(trajectories), dtype=p.dtype).to(p.device)
            k = self.config.rollout_steps
            if traj.ndim != 3 or traj.shape[2] != task.state_dim or traj.shape[1] <= k:
                raise BadArgumentError(f"trajectories must be (N, T+1, {task.state_dim}) with T >= "
                                       f"rollout_steps={self.config.rollout_steps}, got {tuple(traj.shape)}")
            self.trajectories = traj
        self.dynamics = dynamics.requires_grad_(False)
        self.seed = seed
        self.out = None if out is None else Path(out)
        torch.manual_seed(seed)
        c = self.config
        self.policy = BCPolicy(c.hidden, task).to(p.device, p.dtype)
        self.opt = torch.optim.Adam(self.policy.parameters(), c.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.history: list[float] = []
        self.elapsed = 0.0

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out is None else self.out / "bc_checkpoint.pt"

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "bc",
            "config": self.config.to_dict(),
            "task": self.task.to_dict(),
            "seed": self.seed,
            "provenance": dict(self.provenance),
            "step": self.step,
            "policy": self.policy.state_dict(),
            "opt": self.opt.state_dict(),
            "generator": self.generator.get_state(),
            "history": self.history,
            "elapsed": self.elapsed,
        }

    def save(self) -> Path | None:
        return (
            None if self.checkpoint_path is None else save_checkpoint(self.checkpoint_path, self.state_dict())
        )

    def resume(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        s = load_checkpoint(path, {"kind": "bc", "config": self.config.to_dict(), "seed": self.seed,
                                "task": self.task.to_dict(), "provenance": self.provenance},
                            schema=_BC_SCHEMA)
        self.policy.load_state_dict(s["policy"])
        self.opt.load_state_dict(s["opt"])
        self.generator.set_state(s["generator"])
        self.step, self.history, self.elapsed = s["step"], list(s["history"]), float(s["elapsed"])
        return True

    def _loss(self, scale: Tensor) -> Tensor:
        c = self.config
        if self.trajectories is None:  # the paper's one-step loss on expert pairs
            b = torch.randint(0, self.x.shape[0], (c.batch,), generator=self.generator).to(self.x.device)
            x, xn = self.x[b], self.x_next[b]
            return normalized_error(self.dynamics(x, self.policy(x)), xn, scale).mean()
        # k-step rollout loss: roll π through the learned model from expert states x_t, compare x̂_{t+j}
        traj, k = self.trajectories, c.rollout_steps
        n, t1 = traj.shape[0], traj.shape[1]
        i = torch.randint(0, n, (c.batch,), generator=self.generator).to(traj.device)
        t = torch.randint(0, t1 - k, (c.batch,), generator=self.generator).to(traj.device)
        x = traj[i, t]
        total = x.new_zeros(())
        for j in range(1, k + 1):
            x = self.dynamics(x, self.policy(x))
            total = total + normalized_error(x, traj[i, t + j], scale).mean()
        return total / k

    def run(
        self, progress: bool = True, resume: bool = False, stop_after: int | None = None
    ) -> dict[str, Any]:
        """Adam on the next-state loss with a cosine learning rate; returns a summary."""
        from tqdm import tqdm

        c = self.config
        if resume:
            self.resume()
        t0 = time.perf_counter() - self.elapsed
        scale = getattr(self.dynamics, "out_scale", None)
        scale = torch.ones(self.task.state_dim, device=self.x.device) if scale is None else scale
        bar = tqdm(
            total=c.steps, initial=self.step, desc="BC (through learned dynamics)", disable=not progress
        )
        snapshot = copy.deepcopy(self.state_dict())  # Ctrl-C saves the last whole step (see agents.ifo)
        try:
            while self.step < c.steps and (stop_after is None or self.step < stop_after):
                snapshot = copy.deepcopy(self.state_dict())
                lr = c.lr * 0.5 * (1 + math.cos(math.pi * self.step / c.steps))
                for group in self.opt.param_groups:
                    group["lr"] = lr
                loss = self._loss(scale)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.step += 1
                if self.step % 50 == 0 or self.step == c.steps:
                    self.history.append(float(loss.detach()))  # host sync every 50 steps (logging)
                    bar.set_postfix(loss=f"{self.history[-1]:.3g}")
                    report(step=self.step, loss=self.history[-1])  # shown by a sweep's bar
                bar.update(1)
                if self.step % c.checkpoint_every == 0:
                    self.elapsed = time.perf_counter() - t0
                    self.save()
        except KeyboardInterrupt:
            if self.checkpoint_path is not None:
                save_checkpoint(self.checkpoint_path, snapshot)
            raise
        bar.close()
        self.elapsed = time.perf_counter() - t0
        self.save()
        return {
            "steps": self.step,
            "elapsed_s": self.elapsed,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "loss_final": self.history[-1] if self.history else None,
            "history": self.history,
        }


def load_bc_policy(path: str | Path) -> BCPolicy:
    """The trained policy of a BC checkpoint."""
    s = load_checkpoint(path, {"kind": "bc"}, schema=_BC_SCHEMA)
    try:
        cfg = BCConfig.from_dict(s["config"])
        task = Task.from_dict(s["task"]) if "task" in s else CARTPOLE  # before issue 15: cart-pole only
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: the stored config/task is not valid ({err})") from err
    pol = BCPolicy(cfg.hidden, task)
    state = dict(s["policy"])
    low, high = task.bounds(next(iter(state.values())).dtype)
    state.setdefault("u_mid", (high + low) / 2)  # older checkpoints kept the box as plain floats
    state.setdefault("u_half", (high - low) / 2)
    check_state_dict(pol, state, "policy", path)
    pol.load_state_dict(state)
    return pol.to(next(iter(s["policy"].values())).dtype)


# What a BC checkpoint must hold before any of it is used (diffmpc.io.load_checkpoint validates it).
_BC_SCHEMA = {"config": dict, "seed": int, "step": int, "policy": dict, "opt": dict, "generator": (None,),
              "history": list, "elapsed": float}


# ---------------------------------------------------------------------------------------------- BCO
@dataclass(frozen=True)
class BCOConfig:
    """Settings of :class:`BCOTrainer` (behavioural cloning from observation, Torabi et al. 2018)."""

    queries: int = 20000  # simulator triplets (x from the expert states, u uniform): IfO's warm-up budget
    hidden: tuple[int, ...] = (64, 64)
    inverse_steps: int = 3000
    policy_steps: int = 3000
    batch: int = 256
    lr: float = 3e-3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


BCO_PRESETS = {
    "quick": BCOConfig(),
    "paper": BCOConfig(queries=40000, hidden=(128, 128), inverse_steps=10000, policy_steps=10000),
    "tiny": BCOConfig(queries=500, hidden=(16, 16), inverse_steps=40, policy_steps=40, batch=32),
}


class _BoxMLP(nn.Module):
    """``mid + half·tanh(MLP(z))`` into the task's action box."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], task: Task) -> None:
        super().__init__()
        _tanh_mlp_into_box(self, in_dim, hidden, task)

    def forward(self, z: Tensor) -> Tensor:
        return self.u_mid + self.u_half * torch.tanh(self.net(z))


class InverseDynamics(nn.Module):
    """``u = g(x, x')``: the control that takes ``x`` to ``x'`` (inputs: ``φ(x)`` and the normalised
    increment ``(x' − x − μ)/σ``, both fitted on the queried triplets)."""

    def __init__(self, hidden: tuple[int, ...], task: Task) -> None:
        super().__init__()
        self.features = task.features()
        self.mlp = _BoxMLP(self.features.out_dim + task.state_dim, hidden, task)
        self.register_buffer("in_mean", torch.zeros(self.features.out_dim + task.state_dim))
        self.register_buffer("in_scale", torch.ones(self.features.out_dim + task.state_dim))

    def inputs(self, x: Tensor, x_next: Tensor) -> Tensor:
        return torch.cat([self.features(x), x_next - x], -1)

    @torch.no_grad()
    def fit_normalization(self, x: Tensor, x_next: Tensor) -> None:
        z = self.inputs(x, x_next)
        self.in_mean.copy_(z.mean(0))
        self.in_scale.copy_(z.std(0).clamp_min(1e-6))

    def forward(self, x: Tensor, x_next: Tensor) -> Tensor:
        return self.mlp((self.inputs(x, x_next) - self.in_mean) / self.in_scale)


class BCOTrainer:
    r"""BCO (Torabi et al. 2018, "Behavioral Cloning from Observation") in the paper's setting.

    (1) Query the simulator ``x' = F(x, u)`` at expert states with ``u`` uniform in the box (the same access
    IfO has) and fit an inverse-dynamics model ``g(x, x') ≈ u`` by regression. (2) Label each expert pair
    with ``û = g(x, x')`` and fit the policy :class:`BCPolicy` ``π(x) ≈ û`` by supervised regression
    (errors in units of the box half-width). Both stages use Adam with a cosine learning rate. The
    checkpoint ``out/bco_checkpoint.pt`` is written after each stage; ``run(resume=True)`` skips a finished
    stage.
    """

    def __init__(self, x: Any, x_next: Any, simulator: Any, config: BCOConfig | None = None, seed: int = 0,
                 out: str | Path | None = None, task: Task | None = None, dtype: torch.dtype = torch.float64,
                 provenance: dict[str, Any] | None = None) -> None:
        self.config = c = config or BCOConfig()
        self.provenance = dict(provenance or {})
        self.task = task = task or CARTPOLE
        self.x = torch.as_tensor(np.asarray(x), dtype=dtype)
        self.x_next = torch.as_tensor(np.asarray(x_next), dtype=dtype)
        task.check_states(self.x, self.x_next, what="expert pairs")
        self.simulator, self.seed = simulator, seed
        self.out = None if out is None else Path(out)
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.inverse = InverseDynamics(c.hidden, task).to(dtype)
        self.policy = BCPolicy(c.hidden, task).to(dtype)
        self.stage = 0  # stages done
        self.history: dict[str, list[float]] = {"inverse": [], "policy": []}
        self.elapsed = 0.0

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out is None else self.out / "bco_checkpoint.pt"

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`run` needs to resume (plain data)."""
        return {"kind": "bco", "config": self.config.to_dict(), "task": self.task.to_dict(),
                "seed": self.seed, "provenance": dict(self.provenance), "stage": self.stage,
                "inverse": self.inverse.state_dict(), "policy": self.policy.state_dict(),
                "generator": self.generator.get_state(), "history": self.history, "elapsed": self.elapsed}

    def _fit(self, module: nn.Module, loss_fn: Any, n: int, steps: int, name: str, progress: bool) -> None:
        from tqdm import tqdm

        c = self.config
        opt = torch.optim.Adam(module.parameters(), c.lr)
        for step in tqdm(range(steps), desc=f"BCO {name}", disable=not progress, leave=False):
            for group in opt.param_groups:
                group["lr"] = c.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            b = torch.randint(0, n, (c.batch,), generator=self.generator)
            loss = loss_fn(b)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                self.history[name].append(float(loss.detach()))

    def run(self, progress: bool = True, resume: bool = False) -> dict[str, Any]:
        """Both stages (see the class docstring); returns a summary."""
        c, task = self.config, self.task
        path = self.checkpoint_path
        if resume and path is not None and path.is_file():
            s = load_checkpoint(path, {"kind": "bco", "config": c.to_dict(), "seed": self.seed,
                                       "task": task.to_dict(), "provenance": self.provenance},
                                schema=_BCO_SCHEMA)
            self.inverse.load_state_dict(s["inverse"])
            self.policy.load_state_dict(s["policy"])
            self.generator.set_state(s["generator"])
            self.stage, self.history, self.elapsed = s["stage"], dict(s["history"]), float(s["elapsed"])
        t0 = time.perf_counter() - self.elapsed
        low, high = task.bounds(self.x.dtype)
        half = (high - low) / 2
        if self.stage < 1:
            idx = torch.randint(0, self.x.shape[0], (c.queries,), generator=self.generator)
            xq = self.x[idx]
            uq = task.sample_actions(c.queries, self.generator, xq.dtype)
            xq_next = torch.as_tensor(self.simulator(xq, uq)).to(xq.dtype)
            self.inverse.fit_normalization(xq, xq_next)
            def inverse_loss(b: Tensor) -> Tensor:
                return (((self.inverse(xq[b], xq_next[b]) - uq[b]) / half) ** 2).mean()

            self._fit(self.inverse, inverse_loss, c.queries, c.inverse_steps, "inverse", progress)
            self.stage, self.elapsed = 1, time.perf_counter() - t0
            if path is not None:
                save_checkpoint(path, self.state_dict())
        if self.stage < 2:
            with torch.no_grad():
                labels = self.inverse(self.x, self.x_next)
            self._fit(self.policy, lambda b: (((self.policy(self.x[b]) - labels[b]) / half) ** 2).mean(),
                      self.x.shape[0], c.policy_steps, "policy", progress)
            self.stage, self.elapsed = 2, time.perf_counter() - t0
            if path is not None:
                save_checkpoint(path, self.state_dict())
        return {"elapsed_s": self.elapsed, "config": c.to_dict(), "task": task.to_dict(), "seed": self.seed,
                "inverse_loss_final": self.history["inverse"][-1],
                "policy_loss_final": self.history["policy"][-1],
                "history": self.history}


def load_bco_policy(path: str | Path) -> BCPolicy:
    """The trained policy of a BCO checkpoint."""
    s = load_checkpoint(path, {"kind": "bco"}, schema=_BCO_SCHEMA)
    pol = BCPolicy(tuple(s["config"]["hidden"]), Task.from_dict(s["task"]))
    pol.load_state_dict(s["policy"])
    return pol.to(next(iter(s["policy"].values())).dtype)


_BCO_SCHEMA = {"config": dict, "task": dict, "seed": int, "stage": int, "inverse": dict, "policy": dict,
               "generator": (None,), "history": dict, "elapsed": float}


def _tanh_mlp_into_box(module: nn.Module, in_dim: int, hidden: tuple[int, ...], task: Task) -> None:
    """Give ``module`` an MLP ``net`` (tanh hidden layers, in_dim → task.action_dim) and the buffers
    ``u_mid``/``u_half`` of the task's action box, for ``u = mid + half·tanh(net(·))``."""
    sizes = [in_dim, *hidden, task.action_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    module.net = nn.Sequential(*layers)
    low, high = task.bounds()
    module.register_buffer("u_mid", (high + low) / 2)
    module.register_buffer("u_half", (high - low) / 2)
