"""Which learned part limits MPC_IFT on Pendulum-v1? Swap each for the truth and evaluate.

Loads the IfO checkpoint of ``examples/pendulum_ifo.py`` and runs its evaluation-time MPC policy with
(a) the true dynamics and the learned cost, (b) the learned dynamics and the true cost, over the first
evaluation seeds; prints the learned cost's target and weights and the one-step model error.

    python examples/pendulum_ifo_diagnose.py --run runs/pendulum_ifo --out runs/pendulum_ifo/diagnosis
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import numpy as np
import torch

from agents import MPCPolicy
from agents.evaluation import evaluate_in_env
from agents.ifo import load_ifo_checkpoint, make_mpc
from diffmpc.io import write_results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/pendulum_ifo")
    p.add_argument("--out", default="runs/pendulum_ifo/diagnosis")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    example = runpy.run_path(str(Path(__file__).with_name("pendulum_ifo.py")))
    true_step, true_cost = example["pendulum_step"], example["pendulum_cost"]
    dyn, cost, cfg, task = load_ifo_checkpoint(Path(args.run) / "ifo" / "ifo_checkpoint.pt")
    rng = np.random.default_rng(0)
    th = rng.uniform(-np.pi, np.pi, 2000)
    x = torch.tensor(np.stack([np.cos(th), np.sin(th), rng.uniform(-8, 8, 2000)], 1))
    u = torch.tensor(rng.uniform(-2, 2, (2000, 1)))
    with torch.no_grad():
        model_error = (dyn(x, u) - true_step(x, u)).abs().mean(0).tolist()
    seeds = list(range(1000, 1000 + args.seeds))
    given = sys.argv[1:] if argv is None else argv
    command = "python examples/pendulum_ifo_diagnose.py " + " ".join(given)
    res = {"command": command, "learned_target": cost.target.detach().tolist(),
           "learned_weights": cost.weights.detach().tolist(),
           "one_step_model_mean_abs_error": model_error, "seeds": seeds, "evaluation": {}}
    for name, d, c in (("true dynamics + learned cost", true_step, cost),
                       ("learned dynamics + true cost", dyn, true_cost)):
        policy = MPCPolicy(make_mpc(d, c, cfg, evaluation=True, seed=0, task=task), seed=0, warn=False,
                           dtype=torch.float64)
        r = evaluate_in_env(policy, "Pendulum-v1", seeds)
        res["evaluation"][name] = r
        print(f"{name}: return {r['mean_return']:.1f} {np.round(r['episode_returns'], 1).tolist()}")
    print("learned target (cos, sin, θ̇):", np.round(res["learned_target"], 3).tolist(), "weights:",
          np.round(res["learned_weights"], 3).tolist())
    write_results(args.out, res)
    return res


if __name__ == "__main__":
    main()
