"""Paper Appx. C / Fig. 4: learn the mass-spring-damper's A by imitating an LQR expert through a DARE layer.

    python examples/lqr_imitation.py --seed 0 --iterations 3000      # the paper's setting (slow on a laptop)
    python examples/lqr_imitation.py --iterations 300 --damping 1    # a quick look

Same as ``diffmpc lqr-imitation``; writes ``results.json`` and ``lqr_imitation.png`` under ``--out``.
"""

from __future__ import annotations

import argparse

import torch

from experiments.lqr_imitation import DAMPINGS, MODES, ImitationConfig, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/lqr-imitation-example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=3000)
    p.add_argument("--inits", type=int, default=5)
    p.add_argument("--damping", type=float, nargs="+", default=list(DAMPINGS))
    args = p.parse_args()
    torch.set_num_threads(1)

    # The learner's Â starts at A + U[-0.5, 0.5]; every backward mode trains from the same inits.
    cfg = ImitationConfig(dampings=tuple(args.damping), modes=MODES, iterations=args.iterations,
                          inits=args.inits, seed=args.seed)
    res = run(cfg, args.out)

    for key, r in res["runs"].items():
        imit = f"{r['final_imitation_loss_mean']:.2e} ± {r['final_imitation_loss_std']:.1e}"
        model = f"{r['final_model_loss_mean']:.2e} ± {r['final_model_loss_std']:.1e}"
        print(f"{key:16s} imitation loss {imit}   ‖A − Â‖ {model}   {r['wall_s']:.0f}s")
    print(f"figure: {res['figure']}")


if __name__ == "__main__":
    main()
