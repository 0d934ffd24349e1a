"""Kepler's equation as a differentiable root layer (paper Sec. 3.1, Fig. 1), with the library alone.

    python examples/kepler.py [--steps 200] [--seed 0]

The eccentric anomaly E solves F(E; e, M) = E − e sin E − M = 0. ``diffmpc.root`` finds it with Newton and
differentiates it by the implicit function theorem, so dE/de must equal sin E / (1 − e cos E). Then we learn e
(through a sigmoid, Adam) so that E(e; M_i) hits targets made with e = 0.6. The full reproduction with its
figure and results.json is ``diffmpc kepler`` (experiments/kepler.py).
"""

from __future__ import annotations

import argparse

import torch

import diffmpc


def eccentric_anomaly(e: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """E(e, M) for a batch of mean anomalies M, differentiable in e by the IFT."""
    return diffmpc.root(lambda E, e, M: E - e * torch.sin(E) - M, M.clone(), e, M, batched=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    # 1. One solve and its derivative against the closed form.
    e = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    M = torch.linspace(0.1, 3.0, 8, dtype=torch.float64)
    E = eccentric_anomaly(e, M)
    (dE_de,) = torch.autograd.grad(E.sum(), e)
    closed = (torch.sin(E) / (1 - e * torch.cos(E))).sum()
    print(f"dE/de: layer {dE_de.item():.12f}, closed form {closed.item():.12f}")

    # 2. Learn e from targets.
    M = torch.rand(16, dtype=torch.float64) * 2 * torch.pi
    with torch.no_grad():
        target = eccentric_anomaly(torch.tensor(0.6, dtype=torch.float64), M)
    logit = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)  # e = sigmoid(logit) starts at 0.12
    opt = torch.optim.Adam([logit], lr=0.05)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = (eccentric_anomaly(torch.sigmoid(logit), M) - target).square().mean()
        loss.backward()
        opt.step()
    print(f"learned e = {torch.sigmoid(logit).item():.6f} (true 0.6), final loss {loss.item():.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
