"""torch.compile trial for the MPC layer on examples/mpc_cartpole.py (CPU seconds, one thread; minutes).

1. the example's first ``--steps`` actions eager, then with ``MPC(compile_rollout=True)`` semantics
   (``torch.compile(rollout, dynamic=True)`` for the gradient-free rollouts): first action (compilation)
   and the mean of the others;
2. the step compiled inside the exact derivatives (reverse over reverse), or the error it raises.

Prints one JSON line per trial.
Run: ``OMP_NUM_THREADS=1 python examples/mpc_compile_trial.py [--steps 12]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _episode(tag: str, steps: int) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import mpc_cartpole as ex

    with tempfile.TemporaryDirectory() as out:
        ex.main(["--no-video", "--out", out, "--steps", str(steps)])
        r = json.loads((Path(out) / "results.json").read_text())
    cpu = r["cpu_seconds"]
    print(json.dumps({"trial": tag, "first_action_cpu_s": cpu[0],
                      "later_actions_mean_cpu_s": sum(cpu[1:]) / max(1, len(cpu) - 1),
                      "episode_cost": r["episode_cost"], "n_converged": r["n_converged"], "steps": len(cpu),
                      "loadavg_after": r["loadavg_after"], "git_commit": r["git_commit"]}), flush=True)


def _derivatives() -> None:
    import envs
    from diffmpc import MPC
    from diffmpc._mpc_derivatives import rollout, structured_derivatives

    mpc = MPC(lambda x, u: envs.cartpole_dynamics(x, u, substeps=4), envs.cartpole_cost, 10, -1.0, 1.0)
    x0 = torch.randn(1, 4, dtype=torch.float64)
    u = torch.rand(1, 10, 1, dtype=torch.float64) * 2 - 1
    xs, _ = rollout(mpc.step, None, x0, u)
    step = torch.compile(mpc.step, dynamic=True)
    try:
        _, h = structured_derivatives(step, None, xs, u)
        _, h0 = structured_derivatives(mpc.step, None, xs, u)
        res = {"max_abs_hessian_diff": float((h - h0).abs().max())}
    except Exception as e:  # the outcome of the trial, reported
        res = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    print(json.dumps({"trial": "compiled step in derivatives", **res}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import diffmpc.mpc as mpc_module
    from diffmpc._mpc_derivatives import rollout

    _episode("eager", args.steps)
    compiled = torch.compile(rollout, dynamic=True)
    original = mpc_module.MPC._rollout

    def compiled_rollout(self, x0, u):  # what compile_rollout=True does, for the example's own MPCPolicy
        if not torch.is_grad_enabled():
            return compiled(self.step, self.terminal_cost, x0, u)
        return original(self, x0, u)

    mpc_module.MPC._rollout = compiled_rollout
    try:
        _episode("compiled rollout", args.steps)
    finally:
        mpc_module.MPC._rollout = original
    _derivatives()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
