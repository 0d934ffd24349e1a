"""Kepler's equation through a differentiable root layer (paper Fig. 1).

    python examples/kepler.py --out runs/kepler

M = E − e·sin E defines the eccentric anomaly E implicitly. We learn the eccentricity e so that E(e; M)
hits targets, with gradients from the implicit function theorem, and check them against the closed form
dE/de = sin E / (1 − e cos E).
"""

import argparse
import math
from pathlib import Path

import torch

import diffmpc
from experiments.kepler import KeplerConfig, closed_form_dE_de, kepler_residual, run

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="runs/kepler")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--grid", type=int, default=60, help="resolution of the gradient-field plot")
args = parser.parse_args()

# 1. One solve, by hand: E for e = 0.5 at M = 1, and its derivative from the layer vs the closed form.
e = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
M = torch.tensor(1.0, dtype=torch.float64)
E = diffmpc.root(kepler_residual, M.clone(), e, M)
(dE_de,) = torch.autograd.grad(E, e)
print(f"E = {E.item():.12f}  (M = E − e sin E holds to {abs(E.item() - 0.5 * math.sin(E.item()) - 1):.1e})")
closed = closed_form_dE_de(E.detach(), e.detach())
print(f"dE/de: layer {dE_de.item():.12f}, closed form {closed.item():.12f}")

# 2. Learn e from targets and draw the gradient field.
res = run(KeplerConfig(steps=args.steps, grid=args.grid, seed=args.seed), Path(args.out))
print(f"learned e = {res['learned_e']:.6f} (true 0.6), figure: {res['figure']}")
