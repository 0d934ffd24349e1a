"""Regenerate the committed figures and result summaries under ``docs/figures`` (``make figures``).

    python -m benchmarks.figures [--only NAME ...] [--dry-run] [--copy-only] [--runs-dir runs/figures]

Every file under ``docs/figures`` comes from one entry of ``FIGURES``: a command (run from the repository
root into ``<runs-dir>/<name>``), then a copy of named outputs into ``docs/figures`` — verbatim, or through a
summary function written here (never trimmed by hand). Each JSON copy gets a ``provenance`` record (command,
git commit, load; see :mod:`benchmarks.common`). ``--copy-only`` redoes the copies from an existing run
directory. The commands are long (``minutes`` below, on 2 CPU cores); the benchmark tables are made by
``make bench`` and ``docs/benchmarks.md`` by ``python -m benchmarks.report``. Table 1's files
(``benchmarks/results/table1_*``) are written by ``diffmpc table1`` itself (see the neural-ODE docs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Run, _atomic_write

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "figures"


def lqr_summary(results: dict[str, Any]) -> dict[str, Any]:
    """``results.json`` of ``diffmpc lqr-imitation`` without the learning curves (kept: the final numbers
    per run, the systems and the agreement of the backward modes)."""
    keep = ("final_imitation_loss_mean", "final_imitation_loss_std", "final_model_loss_mean",
            "final_model_loss_std", "wall_s", "backward_s", "failed_steps", "A_hat")
    return {"config": results["config"], "systems": results["systems"],
            "runs": {k: {f: r[f] for f in keep if f in r} for k, r in results["runs"].items()},
            "mode_agreement": results.get("mode_agreement", {})}


@dataclass(frozen=True)
class Figure:
    args: list[str]  # after `python`; "{out}" is replaced by the run directory
    copies: dict[str, str]  # output file (relative to the run directory) -> file under docs/figures
    summaries: dict[str, tuple[str, Callable[[dict], dict]]] = field(default_factory=dict)
    minutes: str = ""


FIGURES: dict[str, Figure] = {
    "kepler": Figure(
        ["-m", "diffmpc", "kepler", "--out", "{out}", "--seed", "0"],
        {"results.json": "kepler_results.json", "kepler.png": "kepler.png"},
        minutes="~1"),
    "lqr_imitation": Figure(
        ["-m", "diffmpc", "lqr-imitation", "--out", "{out}", "--seed", "0", "--no-progress"],
        {"lqr_imitation.png": "lqr_imitation.png"},
        {"lqr_imitation_summary.json": ("results.json", lqr_summary)},
        minutes="~30 (3 dampings × 4 backward modes × 5 inits × 3000 iterations)"),
    "table2": Figure(
        ["-m", "diffmpc", "table2", "--runs", "10", "--preset", "quick", "--seed", "0", "--jobs", "2",
         "--dataset", "data/expert_cartpole_rs.npz", "--out", "{out}"],
        {"results.json": "table2_results.json", "table2.md": "table2.md", "fig3.gif": "fig3_swingup.gif",
         "trajectories.png": "fig3_trajectories.png"},
        minutes="~45 (10 IfO + BC training runs and their evaluation, 2 jobs)"),
    "pendulum_ifo": Figure(
        ["examples/pendulum_ifo.py", "--out", "{out}"],
        {"results.json": "pendulum_ifo_results.json",
         "pendulum_side_by_side.mp4": "pendulum_side_by_side.mp4"},
        minutes="~3 (expert data ~0.3, IfO + BC + BCO on Pendulum-v1 ~2, evaluation, video)"),
    # reads the pendulum_ifo run above (run that entry first)
    "pendulum_ifo_diagnosis": Figure(
        ["examples/pendulum_ifo_diagnose.py", "--run", "runs/figures/pendulum_ifo", "--out", "{out}"],
        {"results.json": "pendulum_ifo_diagnosis.json"},
        minutes="~5 (learned vs true cost and dynamics, swapped)"),
    # training-seed variability: K runs on the expert data of the entry above, same evaluation episodes
    "pendulum_ifo_seeds": Figure(
        ["examples/pendulum_ifo.py", "--out", "{out}", "--seeds", "10"],
        {"results.json": "pendulum_ifo_seeds.json"},
        minutes="~16 (expert data ~0.3, then ~1.5 CPU min per training seed: IfO + BC + BCO + evaluation)"),
    # ablations of the cost learning (same expert data, seeds and evaluation episodes as the entry above):
    # the squared-chord angle term (the default before issue 15's last session) at 128 and at 32 expert
    # pairs per cost step (the settings of before), and 32 with IfOConfig.cost_restarts = 3
    "pendulum_ifo_seeds_chord": Figure(
        ["examples/pendulum_ifo.py", "--out", "{out}", "--seeds", "10", "--circle-distance", "chord"],
        {"results.json": "pendulum_ifo_seeds_chord.json"},
        minutes="~16 (expert data ~0.3, then ~1.5 CPU min per training seed)"),
    "pendulum_ifo_seeds_batch32": Figure(
        ["examples/pendulum_ifo.py", "--out", "{out}", "--seeds", "10", "--circle-distance", "chord",
         "--cost-batch", "32"],
        {"results.json": "pendulum_ifo_seeds_batch32.json"},
        minutes="~10 (expert data ~0.3, then ~1 CPU min per training seed)"),
    "pendulum_ifo_seeds_batch32_restarts": Figure(
        ["examples/pendulum_ifo.py", "--out", "{out}", "--seeds", "10", "--circle-distance", "chord",
         "--cost-batch", "32", "--cost-restarts", "3"],
        {"results.json": "pendulum_ifo_seeds_batch32_restarts.json"},
        minutes="~18 (expert data ~0.3, then ~1.7 CPU min per training seed)"),
    # reads seed 2 of the batch-32 entry above (a seed where MPC_IFT fails): which learned part is wrong
    "pendulum_ifo_diagnosis_seed2": Figure(
        ["examples/pendulum_ifo_diagnose.py", "--run", "runs/figures/pendulum_ifo_seeds_batch32/seed_2",
         "--out", "{out}", "--seeds", "10"],
        {"results.json": "pendulum_ifo_diagnosis_seed2.json"},
        minutes="~3"),
    "mpc_cartpole": Figure(
        ["examples/mpc_cartpole.py", "--seed", "0", "--out", "{out}"],
        {"mpc_cartpole.gif": "mpc_cartpole.gif"},
        minutes="~5 (one 40-step episode of the MPC layer on the true model)"),
}


def copy_outputs(name: str, fig: Figure, out: Path, run: Run) -> list[Path]:
    """Copy (or summarise) ``fig``'s outputs from ``out`` into docs/figures; JSON copies get provenance."""
    written = []
    DOCS.mkdir(parents=True, exist_ok=True)
    for src, dst in fig.copies.items():
        if not (out / src).exists():
            raise FileNotFoundError(f"{name}: {out / src} is missing — run without --copy-only first")
        if src.endswith(".json"):
            data = json.loads((out / src).read_text())
            _atomic_write(DOCS / dst, json.dumps({**data, "provenance": run.provenance()}, indent=1) + "\n")
        else:
            shutil.copyfile(out / src, DOCS / dst)
        written.append(DOCS / dst)
    for dst, (src, summarise) in fig.summaries.items():
        data = summarise(json.loads((out / src).read_text()))
        _atomic_write(DOCS / dst, json.dumps({**data, "provenance": run.provenance()}, indent=1) + "\n")
        written.append(DOCS / dst)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(FIGURES), metavar="NAME",
                   help=f"only these ({', '.join(FIGURES)})")
    p.add_argument("--runs-dir", default="runs/figures", help="where the commands write (gitignored)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--copy-only", action="store_true", help="copy from existing run directories")
    args = p.parse_args(argv)
    failed = []
    for name, fig in FIGURES.items():
        if args.only and name not in args.only:
            continue
        out = ROOT / args.runs_dir / name
        cmd = [a.replace("{out}", str(out.relative_to(ROOT))) for a in fig.args]
        print(f"== {name} ({fig.minutes} min): python {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        run = Run.start(cmd[1] if cmd[0] == "-m" else cmd[0], cmd[2:] if cmd[0] == "-m" else cmd[1:])
        if not args.copy_only:
            rc = subprocess.run([sys.executable, *cmd], cwd=ROOT).returncode
            if rc != 0:
                failed.append(f"{name} (exit {rc})")
                continue
        for path in copy_outputs(name, fig, out, run):
            print(f"   wrote {path.relative_to(ROOT)}")
    if failed:
        print("make figures: failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
