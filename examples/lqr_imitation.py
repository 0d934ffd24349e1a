"""Imitate an LQR expert through a differentiable DARE (paper Appx. C, Fig. 4), with the library alone.

    python examples/lqr_imitation.py [--iterations 300] [--damping 1.0] [--seed 0]

The expert controls the mass-spring-damper x' = A x + B u with u = −K(A) x, K from the discrete-time
algebraic Riccati equation. The learner knows B, Q, R but not A: it holds Â, acts with u = −K(Â) x and fits
Â to the expert's controls; ``diffmpc.dlqr`` carries the gradient through the DARE by the implicit function
theorem. Matching the controls along one trajectory does not pin A down (other Â give the same gain on it);
the reproduction rolls the learner's closed loop out for 6 steps from random expert states, which does. That
one, with all dampings, every backward mode and the figure, is ``diffmpc lqr-imitation``
(experiments/lqr_imitation.py).
"""

from __future__ import annotations

import argparse

import torch

import diffmpc
from envs import msd_cost_matrices, msd_matrices


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    A, B = msd_matrices(damping=args.damping)
    Q, R = msd_cost_matrices()
    K = diffmpc.dlqr(A, B, Q, R)
    xs = [torch.tensor([0.0, 3.0], dtype=torch.float64)]  # the expert's 50-step trajectory
    for _ in range(49):
        xs.append(A @ xs[-1] - B @ (K @ xs[-1]))
    x = torch.stack(xs)
    u = -x @ K.T

    A_hat = (A + torch.rand(2, 2, dtype=torch.float64) - 0.5).requires_grad_()
    print(f"start: ‖A − Â‖_F = {torch.linalg.norm(A - A_hat).item():.3f}")
    opt = torch.optim.Adam([A_hat], lr=1e-2)
    for _ in range(args.iterations):
        opt.zero_grad()
        loss = (-x @ diffmpc.dlqr(A_hat, B, Q, R).T - u).square().mean()  # IFT through the DARE
        loss.backward()
        opt.step()
    print(f"after {args.iterations} steps: imitation loss {loss.item():.2e}, "
          f"‖A − Â‖_F = {torch.linalg.norm(A - A_hat.detach()).item():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
