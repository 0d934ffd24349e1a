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

from .ifo import normalized_error
from .task import CARTPOLE, Task
from .training import load_checkpoint, save_checkpoint

__all__ = ["BCConfig", "BCPolicy", "BCTrainer", "BC_PRESETS", "load_bc_policy"]


@dataclass(frozen=True)
class BCConfig:
    """Settings of :class:`BCTrainer` (defaults: the ``"quick"`` preset)."""

    hidden: tuple[int, ...] = (64, 64)
    steps: int = 3000
    batch: int = 256
    lr: float = 3e-3
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        check_fields(self, ints=("steps", "batch", "checkpoint_every"), positive=("lr",))
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
    "quick": BCConfig(),
    "paper": BCConfig(hidden=(128, 128), steps=10000),
    "tiny": BCConfig(hidden=(16, 16), steps=40, batch=32, checkpoint_every=10),
}


class BCPolicy(nn.Module):
    """``π(x) = mid + half·tanh(MLP(φ(x)))``: batched ``(B, n) -> (B, m)`` of ``task`` (any float dtype)."""

    def __init__(self, hidden: tuple[int, ...] = (64, 64), task: Task | None = None) -> None:
        super().__init__()
        task = task or CARTPOLE
        self.task = task
        self.features = task.features()
        sizes = [self.features.out_dim, *hidden, task.action_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        low, high = task.bounds()
        self.register_buffer("u_mid", (high + low) / 2)
        self.register_buffer("u_half", (high - low) / 2)

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
    ) -> None:
        self.config = config or BCConfig()
        self.task = task = task or CARTPOLE
        # What BC was trained on (dataset SHA-256, the learned dynamics' identity): checked on resume.
        self.provenance = dict(provenance or {})
        p = next(dynamics.parameters())
        self.x = torch.as_tensor(np.asarray(x), dtype=p.dtype)
        self.x_next = torch.as_tensor(np.asarray(x_next), dtype=p.dtype)
        task.check_states(self.x, self.x_next, what="expert pairs")
        if self.x.shape != self.x_next.shape:
            raise ValueError(f"expert pairs must have equal shapes, got {tuple(self.x.shape)} and "
                             f"{tuple(self.x_next.shape)}")
        self.dynamics = dynamics.requires_grad_(False)
        self.seed = seed
        self.out = None if out is None else Path(out)
        torch.manual_seed(seed)
        c = self.config
        self.policy = BCPolicy(c.hidden, task).to(p.dtype)
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
        scale = torch.ones(self.task.state_dim) if scale is None else scale
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
                b = torch.randint(0, self.x.shape[0], (c.batch,), generator=self.generator)
                x, xn = self.x[b], self.x_next[b]
                loss = normalized_error(self.dynamics(x, self.policy(x)), xn, scale).mean()
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.step += 1
                if self.step % 50 == 0 or self.step == c.steps:
                    self.history.append(float(loss.detach()))
                    bar.set_postfix(loss=f"{self.history[-1]:.3g}")
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
