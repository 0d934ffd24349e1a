"""``diffmpc train ifo|bc``, ``evaluate``, ``render``, ``table2`` and ``demo``: the paper's cart-pole
imitation-from-observation experiment (Sec. 5, Table 2, Fig. 3) from the command line.

Layout of a ``table2``/``demo`` output directory::

    OUT/dataset/expert_cartpole.npz        expert states (generated unless --dataset is given)
    OUT/run_<seed>/ifo/ifo_checkpoint.pt   learned dynamics + cost (IfO, Alg. 2), resumable
    OUT/run_<seed>/bc/bc_checkpoint.pt     BC policy trained through that run's learned dynamics
    OUT/run_<seed>/bco/bco_checkpoint.pt   BCO policy (inverse-dynamics labels + supervised BC)
    OUT/run_<seed>/results.json            that run's evaluation (expert, BC, BCO, MPC_IFT at each variance)
    OUT/run_<seed>/run.json, log.txt       its sweep record (config + hash, status) and output
    OUT/results.json, OUT/table2.md        mean ± standard error over runs, gaps to the expert, the paper
    OUT/fig3.mp4, OUT/fig3.gif, OUT/trajectories.png   one start rolled out by each policy (first run)

Every step resumes: finished runs are skipped, interrupted trainings continue from their checkpoints. The
training runs go through :func:`diffmpc.sweep.run_sweep` (``--jobs N``: a local Ray; ``--address``: a
cluster; without Ray installed, one after another in this process).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffmpc.errors import BadArgumentError, BadFileError

if TYPE_CHECKING:
    import torch

from diffmpc.device import add_device_argument, resolve_device
from diffmpc.sweep import add_sweep_arguments

__all__ = ["PAPER_TABLE2", "run_pipeline", "aggregate_runs", "convergence_summary", "table2_markdown",
           "register"]

# Paper Table 2: average episode cost (low / high start variance).
PAPER_TABLE2 = {"expert": (9.2, 9.3), "bc": (14.6, 18.4), "mpc_ift": (13.7, 14.7)}
POLICY_NAMES = {"expert": "Expert (RS, true model)", "bc": "BC", "bco": "BCO (Torabi et al. 2018)",
                "mpc_ift": "MPC_IFT (ours)"}


# ---------------------------------------------------------------------------------------------- pieces
def _pairs(dataset: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from agents.dataset import load_dataset

    data = load_dataset(dataset)
    x, xn = data.transitions()
    return x, xn, data.meta


def dataset_identity(dataset: str | Path) -> dict[str, str]:
    """What a trained run depends on in its dataset: the file's SHA-256 (stored in checkpoints, results)."""
    from diffmpc.io import file_sha256

    return {"dataset_sha256": file_sha256(dataset)}


def dynamics_identity(dynamics: torch.nn.Module) -> str:
    """SHA-256 of a learned dynamics model's weights: the identity of the ``--dynamics`` BC trains through
    (independent of the checkpoint file's other contents, e.g. its timing fields)."""
    h = hashlib.sha256()
    for k, v in sorted(dynamics.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _variances(which: str) -> dict[str, float]:
    from agents.evaluation import START_VARIANCES

    if which == "both":
        return dict(START_VARIANCES)
    if which not in START_VARIANCES:
        raise ValueError(f"unknown variance {which!r}; choose low, high or both")
    return {which: START_VARIANCES[which]}


def task_of_dataset(meta: dict[str, Any], angle_dims: list[int] | None = None,
                    circle_dims: list[tuple[int, int]] | None = None) -> Any:
    """The :class:`agents.task.Task` of a dataset: its env's spaces and the recorded state dimension; the
    cart-pole's angle (dimension 2) unless ``angle_dims`` or ``circle_dims`` (``(cos, sin)`` observation
    pairs, e.g. ``[(0, 1)]`` for Pendulum-v1) say otherwise. Bad dims raise :class:`agents.task.TaskError`
    naming the index."""
    import envs
    from agents.task import CARTPOLE, Task, recorded_env_id

    env_id = recorded_env_id(meta.get("env_id") or envs.CARTPOLE_ID, "the dataset's metadata")
    if env_id == envs.CARTPOLE_ID and angle_dims is None and not circle_dims:
        return CARTPOLE
    return Task.from_env(env_id, angle_dims or (), state_dim=meta.get("state_dim"),
                         circle_dims=circle_dims or ())


def train_ifo(
    dataset: str | Path,
    out: str | Path,
    preset: str = "quick",
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    angle_dims: list[int] | None = None,
    device: str | None = None,
    circle_dims: list[tuple[int, int]] | None = None,
    cost_init: str | None = None,
    cost_restarts: int | None = None,
    simulator: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Alg. 2 on the dataset's expert pairs on ``device``; checkpoint and ``results.json`` under ``out``.

    A checkpoint already under ``out`` is continued (``resume``) only if it was trained on the same dataset
    file (SHA-256), config, task, simulator and seed; without ``resume`` it is refused unless ``overwrite``.
    The simulator query is ``simulator = "module:function"`` (:func:`agents.task.import_simulator`, recorded
    in the checkpoint's provenance), else the env itself, which must then be settable
    (``reset(options={"state": x})``). The task comes from the dataset's metadata and
    ``angle_dims``/``circle_dims`` (:func:`task_of_dataset`) and is stored in the checkpoint, so evaluation
    and BC load it back without them. ``cost_init`` and ``cost_restarts`` override the preset's
    :attr:`agents.ifo.IfOConfig.cost_init` / :attr:`~agents.ifo.IfOConfig.cost_restarts` (part of the
    recorded config: a resume with another value is refused), and so do ``overrides``, the ``KEY=VALUE``
    items of ``--set`` (any :class:`agents.ifo.IfOConfig` field, e.g. ``horizon=20``)."""
    from agents.ifo import IfOTrainer
    from diffmpc.io import refuse_overwrite, write_results

    cfg = ifo_config(preset, cost_init, cost_restarts, overrides)
    refuse_overwrite(Path(out) / "ifo_checkpoint.pt", resume, overwrite)
    sim, provenance = _simulator(simulator, dataset_identity(dataset))
    x, xn, meta = _pairs(dataset)
    trainer = IfOTrainer(x, xn, cfg, seed=seed, simulator=sim, out=Path(out), provenance=provenance,
                         task=task_of_dataset(meta, angle_dims, circle_dims), device=device)
    summary = trainer.run(progress=progress, resume=resume)
    summary.update(
        command="train ifo",
        simulator=simulator,
        device=str(trainer.device),
        preset=preset,
        dataset=str(dataset),
        provenance=trainer.provenance,
        dataset_meta=meta,
        checkpoint=str(trainer.checkpoint_path),
    )
    write_results(out, summary)
    return summary


def ifo_config(preset: str, cost_init: str | None = None, cost_restarts: int | None = None,
               overrides: list[str] | None = None) -> Any:
    """The preset's :class:`agents.ifo.IfOConfig` with the command line's overrides (``None``: the preset's);
    ``cost_restarts`` must be an integer >= 1 (:class:`~diffmpc.errors.BadArgumentError` otherwise);
    ``overrides`` are ``KEY=VALUE`` items of ``--set`` (:meth:`agents.ifo.IfOConfig.with_overrides`)."""
    from dataclasses import replace

    from agents.ifo import IFO_PRESETS
    from diffmpc._checks import check_int

    check_int("--cost-restarts", cost_restarts, 1, allow_none=True)
    named = {"cost_init": cost_init, "cost_restarts": cost_restarts}
    cfg = replace(IFO_PRESETS[preset], **{k: v for k, v in named.items() if v is not None})
    return cfg.with_overrides(overrides or [])


def _simulator(spec: str | None, provenance: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The simulator query named on the command line (``module:function``; ``None``: the trainer's default)
    and the run's provenance with the spec added (so a resume with another simulator is refused). Imported
    first: a user's module may register its env (``gymnasium.register``) as it is imported."""
    if spec is None:
        return None, provenance
    from agents.task import import_simulator

    return import_simulator(spec), dict(provenance, simulator=spec)


def train_bc(
    dataset: str | Path,
    out: str | Path,
    dynamics: str | Path,
    preset: str = "quick",
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    rollout_steps: int | None = None,
    hidden: tuple[int, ...] | None = None,
    steps: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """BC through the learned dynamics of the IfO checkpoint ``dynamics`` (on ``device``); results under
    ``out``.

    ``rollout_steps``, ``hidden`` and ``steps`` override the preset (``rollout_steps`` > 1: the multi-step
    rollout loss on the dataset's trajectories). The checkpoint records the dataset's SHA-256 and the
    learned dynamics' identity; resuming with another dataset or another ``dynamics`` is refused, naming
    what differs."""
    from dataclasses import replace

    from agents.bc import BC_PRESETS, BCTrainer
    from agents.dataset import load_dataset
    from agents.ifo import load_ifo_checkpoint
    from diffmpc.io import refuse_overwrite, write_results

    refuse_overwrite(Path(out) / "bc_checkpoint.pt", resume, overwrite)
    x, xn, meta = _pairs(dataset)
    dyn, _, _, task = load_ifo_checkpoint(_checkpoint(dynamics, "ifo_checkpoint.pt"))
    provenance = dict(dataset_identity(dataset), dynamics_sha256=dynamics_identity(dyn))
    dyn = dyn.to(device or "cpu")  # BC trains where its dynamics live
    overrides = {"rollout_steps": rollout_steps, "hidden": hidden, "steps": steps}
    cfg = replace(BC_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    traj = load_dataset(dataset).states if cfg.rollout_steps > 1 else None
    trainer = BCTrainer(x, xn, dyn, cfg, seed=seed, out=Path(out), task=task, provenance=provenance,
                        trajectories=traj)
    summary = trainer.run(progress=progress, resume=resume)
    summary.update(
        command="train bc",
        preset=preset,
        dataset=str(dataset),
        dataset_meta=meta,
        dynamics=str(dynamics),
        provenance=provenance,
        checkpoint=str(trainer.checkpoint_path),
    )
    write_results(out, summary)
    return summary


def train_bco(
    dataset: str | Path,
    out: str | Path,
    preset: str = "quick",
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    angle_dims: list[int] | None = None,
    circle_dims: list[tuple[int, int]] | None = None,
    simulator: str | None = None,
) -> dict[str, Any]:
    """BCO (inverse-dynamics labels, then supervised BC) on the dataset's expert pairs, querying the
    simulator as IfO does (``simulator``: ``module:function``, as for :func:`train_ifo`); results under
    ``out`` (the task, as for :func:`train_ifo`, in the checkpoint)."""
    from agents.bc import BCO_PRESETS, BCOTrainer
    from agents.task import simulator_for
    from diffmpc.io import refuse_overwrite, write_results

    refuse_overwrite(Path(out) / "bco_checkpoint.pt", resume, overwrite)
    sim, provenance = _simulator(simulator, dataset_identity(dataset))
    x, xn, meta = _pairs(dataset)
    task = task_of_dataset(meta, angle_dims, circle_dims)
    trainer = BCOTrainer(x, xn, simulator_for(task, sim), BCO_PRESETS[preset], seed=seed, out=Path(out),
                         task=task, provenance=provenance)
    summary = trainer.run(progress=progress, resume=resume)
    summary.update(command="train bco", simulator=simulator, preset=preset, dataset=str(dataset),
                   dataset_meta=meta,
                   provenance=trainer.provenance, checkpoint=str(trainer.checkpoint_path))
    write_results(out, summary)
    return summary


def _checkpoint(path: str | Path, name: str) -> Path:
    """A checkpoint file, or the directory holding ``name``."""
    p = Path(path)
    return p / name if p.is_dir() else p


def make_policy(spec: str, device: str | None = None) -> Any:
    """``expert``, ``ifo:PATH`` (MPC_IFT from an IfO checkpoint/dir) or ``bc:PATH`` -> a batched policy
    (learned modules moved to ``device``; the expert plans wherever its observations are)."""
    from agents.evaluation import expert_policy, mpc_policy

    kind, _, path = spec.partition(":")
    if kind == "expert" and path in ("", "rs"):
        return expert_policy()
    if kind == "expert" and path == "cem":
        # CEM 200 × 4 on the true model: the sampling budget of MPC_IFT's test-time planner.
        return expert_policy(planner="cem", n_samples=200)
    if kind in ("ifo", "mpc_ift") and path:
        from agents.ifo import load_ifo_checkpoint

        dyn, cost, cfg, task = load_ifo_checkpoint(_checkpoint(path, "ifo_checkpoint.pt"))
        return mpc_policy(dyn, cost, cfg, task, device=device)
    if kind == "bc" and path:
        from agents.bc import load_bc_policy

        return load_bc_policy(_checkpoint(path, "bc_checkpoint.pt")).to(device or "cpu").requires_grad_(False)
    if kind == "bco" and path:
        from agents.bc import load_bco_policy

        policy = load_bco_policy(_checkpoint(path, "bco_checkpoint.pt"))
        return policy.to(device or "cpu").requires_grad_(False)
    raise ValueError(f"unknown policy {spec!r}; use expert, expert:cem, ifo:PATH, bc:PATH or bco:PATH")


def evaluate_policies(
    policies: dict[str, Any], variances: dict[str, float], seed: int = 0, progress: bool = False,
    device: str | None = None,
) -> dict[str, dict[str, Any]]:
    """``{policy: {variance_name: evaluate_policy(...)}}`` over the fixed 50 starts."""
    from tqdm import tqdm

    from agents.evaluation import evaluate_policy

    out: dict[str, dict[str, Any]] = {}
    jobs = [(n, v) for n in policies for v in variances]
    for name, vname in tqdm(jobs, desc="evaluation", disable=not progress, leave=False):
        out.setdefault(name, {})[vname] = evaluate_policy(policies[name], variances[vname], seed=seed,
                                                          device=device)
    return out


def run_one(
    seed: int,
    dataset: str | Path,
    out: str | Path,
    preset: str = "quick",
    variances: str = "both",
    progress: bool = True,
    device: str | None = None,
    cost_restarts: int | None = None,
) -> dict[str, Any]:
    """One training run of the pipeline (IfO, BC, evaluation of expert/BC/MPC_IFT) in the run directory
    ``out`` (its IfO/BC checkpoints resume); returns the run's results (also in ``out/results.json``).
    ``cost_restarts`` overrides the preset's :attr:`agents.ifo.IfOConfig.cost_restarts`."""
    from diffmpc.io import write_results

    run_dir = Path(out)
    t0 = time.perf_counter()
    ifo = train_ifo(dataset, run_dir / "ifo", preset, seed, resume=True, progress=progress, device=device,
                    cost_restarts=cost_restarts)
    bc = train_bc(dataset, run_dir / "bc", run_dir / "ifo", preset, seed, resume=True, progress=progress,
                  device=device)
    bco = train_bco(dataset, run_dir / "bco", preset, seed, resume=True, progress=progress)
    t_train = time.perf_counter() - t0
    policies = {
        "expert": make_policy("expert", device),
        "bc": make_policy(f"bc:{run_dir / 'bc'}", device),
        "bco": make_policy(f"bco:{run_dir / 'bco'}", device),
        "mpc_ift": make_policy(f"ifo:{run_dir / 'ifo'}", device),
    }
    ev = evaluate_policies(policies, _variances(variances), seed=seed, progress=progress, device=device)
    res = {
        "seed": seed,
        "preset": preset,
        **({"cost_restarts": cost_restarts} if cost_restarts is not None else {}),
        "device": str(device or "cpu"),
        "dataset": str(dataset),
        "provenance": dataset_identity(dataset),
        "train_time_s": t_train,
        "wall_time_s": time.perf_counter() - t0,
        "ifo_train_s": ifo["elapsed_s"],
        "bc_train_s": bc["elapsed_s"],
        "bco_train_s": bco["elapsed_s"],
        "ifo_converged_fraction": ifo["converged_fraction"],
        "ifo_mpc_solves": ifo["mpc_solves"],
        "ifo_mpc_unconverged": ifo["mpc_unconverged"],
        "learned_target": ifo["learned_target"],
        "learned_weights": ifo["learned_weights"],
        "evaluation": ev,
    }
    write_results(run_dir, res)
    return res


def run_task(config: dict[str, Any], ctx: Any, device: str | None = None) -> dict[str, Any]:
    """A Table 2 training run as a sweep task (:func:`diffmpc.sweep.run_sweep`); ``config`` from
    :func:`run_config`, the run directory is ``ctx.dir``. The device is where it runs, not what it is:
    it is recorded in the results but not part of the run's key."""
    from diffmpc.io import file_sha256

    dataset = ctx.dir.parent / config["dataset"]  # relative to the sweep directory unless absolute
    if file_sha256(dataset) != config["dataset_sha256"]:
        raise RuntimeError(f"{dataset} changed since the sweep was set up; rerun the command")
    return run_one(config["seed"], dataset, ctx.dir, config["preset"], config["variances"], False, device,
                   config.get("cost_restarts"))


def run_config(seed: int, dataset: str | Path, out: str | Path, preset: str, variances: str,
               cost_restarts: int | None = None) -> dict[str, Any]:
    """Everything a run depends on, the dataset by content hash: what its run directory is keyed on. The
    dataset's path is relative to the sweep directory ``out`` when it lies inside (so ``out`` can move).
    ``cost_restarts`` (``--cost-restarts``) is part of the key when given, so runs with another K are not
    reused (without it, the key is that of the runs made before the option existed)."""
    from diffmpc.io import file_sha256

    dataset, out = Path(dataset).resolve(), Path(out).resolve()
    where = str(dataset.relative_to(out)) if dataset.is_relative_to(out) else str(dataset)
    return {"seed": seed, "preset": preset, "variances": variances, "dataset": where,
            "dataset_sha256": file_sha256(dataset), "policies": ["expert", "bc", "bco", "mpc_ift"],
            **({"cost_restarts": cost_restarts} if cost_restarts is not None else {})}


def aggregate_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± standard error over runs of each policy's mean episode cost, and the paired gap to the expert.

    With one run, the standard error is over the 50 episodes instead (``stderr_over``)."""
    table: dict[str, Any] = {}
    variances = list(runs[0]["evaluation"]["expert"])
    for name in runs[0]["evaluation"]:
        row = {}
        for v in variances:
            means = np.array([r["evaluation"][name][v]["mean_cost"] for r in runs])
            gaps = means - np.array([r["evaluation"]["expert"][v]["mean_cost"] for r in runs])
            if len(runs) > 1:
                se, gse, over = (
                    means.std(ddof=1) / np.sqrt(len(runs)),
                    gaps.std(ddof=1) / np.sqrt(len(runs)),
                    "runs",
                )
            else:
                se, gse, over = runs[0]["evaluation"][name][v]["stderr"], float("nan"), "episodes"
            row[v] = {
                "mean": float(means.mean()),
                "stderr": float(se),
                "gap_to_expert": float(gaps.mean()),
                "gap_stderr": float(gse),
                "per_run": means.tolist(),
                "stderr_over": over,
            }
        table[name] = row
    return table


def convergence_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """How many MPC solves met ``diffmpc.MPC``'s convergence test, over all runs: during IfO training
    (every cost batch, Alg. 2; per run and per iteration) and in the evaluation of each policy that plans
    with the layer (MPC_IFT: the fraction of the receding-horizon plans, one per action, that converged within
    the test-time budget ``eval_newton_iters``; an unconverged plan is still applied)."""
    solves = [int(r.get("ifo_mpc_solves", 0)) for r in runs]
    unconv = [int(r.get("ifo_mpc_unconverged", 0)) for r in runs]
    per_iter = [r.get("ifo_converged_fraction") or [] for r in runs]
    lowest = [min(f) for f in per_iter if f]
    evaluation: dict[str, dict[str, float]] = {}
    for name in runs[0]["evaluation"]:
        for v in runs[0]["evaluation"][name]:
            fr = [r["evaluation"][name][v].get("converged_fraction") for r in runs]
            if all(f is not None for f in fr):
                evaluation.setdefault(name, {})[v] = float(np.mean(fr))
    total = sum(solves)
    return {
        "ifo_training": {
            "solves": total,
            "unconverged": sum(unconv),
            "converged_fraction": (total - sum(unconv)) / total if total else float("nan"),
            "lowest_iteration_fraction": min(lowest) if lowest else float("nan"),
            "per_run": [{"seed": r["seed"], "solves": n, "unconverged": u, "per_iteration": f}
                        for r, n, u, f in zip(runs, solves, unconv, per_iter, strict=True)],
        },
        "evaluation_converged_fraction": evaluation,
    }


def convergence_markdown(conv: dict[str, Any]) -> str:
    """One paragraph under Table 2: the converged counts of :func:`convergence_summary`."""
    t = conv["ifo_training"]
    text = (f"MPC solves that met the layer's convergence test (KKT residual and Newton step ≤ tol): IfO "
            f"training {t['solves'] - t['unconverged']} of {t['solves']} "
            f"({100 * t['converged_fraction']:.1f} %; lowest fraction in one iteration's cost batch "
            f"{100 * t['lowest_iteration_fraction']:.1f} %).")
    for name, by_v in conv["evaluation_converged_fraction"].items():
        cells = ", ".join(f"{v} {100 * f:.1f} %" for v, f in by_v.items())
        text += (f" {POLICY_NAMES.get(name, name)} at test time, plans converged within the per-action "
                 f"budget (`eval_newton_iters` Newton iterations after CEM; an unconverged plan is still "
                 f"applied): {cells}.")
    return text


def table2_markdown(table: dict[str, Any], runs: int, command: str, minutes: float,
                    convergence: dict[str, Any] | None = None, run_minutes: list[float] | None = None) -> str:
    """The Table 2 comparison: ours (mean ± s.e., gap to our expert) next to the paper's numbers/gaps."""
    variances = list(table["expert"])
    idx = {"low": 0, "high": 1}
    head = "| policy | " + " | ".join(f"{v} variance: ours (gap) | paper (gap)" for v in variances) + " |"
    lines = [head, "|---|" + "---|---|" * len(variances)]
    for name, row in table.items():
        cells = []
        for v in variances:
            r = row[v]
            gap = "" if name == "expert" else f" ({r['gap_to_expert']:+.2f})"
            if name in PAPER_TABLE2:
                p = PAPER_TABLE2[name][idx.get(v, 0)]
                pgap = "" if name == "expert" else f" ({p - PAPER_TABLE2['expert'][idx.get(v, 0)]:+.1f})"
                paper = f"{p:.1f}{pgap}"
            else:
                paper = "—"  # not in the paper
            cells += [f"{r['mean']:.2f} ± {r['stderr']:.2f}{gap}", paper]
        lines.append(f"| {POLICY_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    over = table["expert"][variances[0]]["stderr_over"]
    lines += [
        "",
        f"Average episode cost over 50 fixed starts (40 steps), mean ± standard error over {over} "
        f"({runs} training run(s)); gap = policy − expert, paired per run. Produced by `{command}` in "
        f"{minutes:.1f} min"
        + (f"; one training run (IfO, BC, BCO, evaluation) took {np.median(run_minutes):.1f} min of wall "
           f"time on median, {max(run_minutes):.1f} at most (finished runs of an earlier invocation are "
           "reused, not re-timed)." if run_minutes else "."),
    ]
    if convergence is not None:
        lines += ["", convergence_markdown(convergence)]
    return "\n".join(lines) + "\n"


# The learned policies a run directory may hold: (label, sub-directory), in the videos' order.
RUN_POLICIES = (("BC", "bc"), ("BCO", "bco"), ("MPC_IFT", "ifo"))


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[dict[str, Any], str | None]:
    """The learned policies under ``run_dir`` (``ifo/``, ``bc/``, ``bco/``: whichever exist, at least one)
    and the env id their checkpoints record (the task's; the same for all of them, else
    :class:`~diffmpc.errors.BadFileError`)."""
    from agents.bc import load_bc_policy, load_bco_policy
    from agents.evaluation import mpc_policy
    from agents.ifo import load_ifo_checkpoint

    run_dir = Path(run_dir)
    found = [d for _, d in RUN_POLICIES if (run_dir / d).is_dir()]
    if not found:
        raise BadFileError(f"--run {run_dir} holds none of ifo/, bc/, bco/: pass a run directory made by "
                           "`diffmpc table2`/`demo`, or the parent of the --out directories RUN/ifo, RUN/bc, "
                           "RUN/bco of `diffmpc train`")
    policies: dict[str, Any] = {}
    env_ids: dict[str, str | None] = {}
    for name, sub in RUN_POLICIES:
        if sub not in found:
            continue
        if sub == "ifo":
            dyn, cost, cfg, task = load_ifo_checkpoint(_checkpoint(run_dir / sub, "ifo_checkpoint.pt"))
            policies[name] = mpc_policy(dyn, cost, cfg, task, device=device)
        else:
            load = load_bc_policy if sub == "bc" else load_bco_policy
            policy = load(_checkpoint(run_dir / sub, f"{sub}_checkpoint.pt"))
            task = policy.task
            policies[name] = policy.to(device or "cpu").requires_grad_(False)
        env_ids[sub] = task.env_id
    if len(set(env_ids.values())) > 1:
        raise BadFileError(f"the checkpoints under {run_dir} were trained on different envs: {env_ids}")
    return policies, next(iter(env_ids.values()))


def render_run(
    run_dir: str | Path, out: str | Path, variance: float | None = None, index: int | None = None,
    seed: int = 0, env: str | None = None, max_steps: int | None = None,
) -> list[Path]:
    """One episode of each learned policy of a run (and, on the cart-pole, the expert), side by side.

    The env is the one the run's checkpoints record (``env`` overrides it: an id, or ``module:EnvId`` to
    import the module that registers it; it must name the recorded env). On the cart-pole: Fig. 3, the
    ``index``-th fixed test start at start ``variance`` (default 0.04) rolled out by the expert, BC, BCO and
    MPC_IFT, written as ``fig3.mp4``/``fig3.gif`` and ``trajectories.png`` (pole angle and cart position).
    Any other env: the episode of seed ``seed`` (the first episode of ``diffmpc evaluate --env ID --seed
    SEED``) in the Gymnasium loop, written as ``side_by_side.mp4``/``.gif`` (fps from the env's metadata) and
    ``trajectories.png`` (one panel per observation dimension). ``seed`` also seeds the sampling planners;
    ``max_steps`` cuts the episodes."""
    import envs
    from agents.evaluation import EVAL_EPISODES
    from diffmpc._checks import check_int

    check_int("--index", index, 0, allow_none=True)
    check_int("--max-steps", max_steps, 1, allow_none=True)
    if index is not None and index >= EVAL_EPISODES:
        raise BadArgumentError(f"--index {index} is out of range: there are {EVAL_EPISODES} test starts "
                               f"(0 … {EVAL_EPISODES - 1})")
    policies, env_id = load_run(run_dir)
    if env is not None:
        named = env.rpartition(":")[2]  # Gymnasium's module:EnvId (the user's own command line)
        if env_id is not None and named != env_id:
            raise BadArgumentError(f"--env {env} is not the env the run was trained on ({env_id})")
        env_id = named
    if env_id is None:
        raise BadFileError(f"the checkpoints under {run_dir} record no env id (trained on an env instance "
                           "without a spec?); pass --env ID")
    out = Path(out)
    if env_id == envs.CARTPOLE_ID:
        return _render_cartpole(policies, out, 0.04 if variance is None else variance, index or 0, seed,
                                max_steps)
    if variance is not None or index is not None:
        raise BadArgumentError(f"--variance and --index choose one of the cart-pole's fixed test starts; on "
                               f"{env_id} the episode is chosen by --seed")
    return _render_env(policies, env or env_id, out, seed, max_steps)


def _render_cartpole(policies: dict[str, Any], out: Path, variance: float, index: int, seed: int,
                     max_steps: int | None) -> list[Path]:
    """Fig. 3 (see :func:`render_run`): the expert and the run's policies from one fixed start."""
    from agents.evaluation import plot_trajectories, render_comparison, rollout, start_states

    out.mkdir(parents=True, exist_ok=True)
    x0 = start_states(variance)[index : index + 1]
    rolls = {}
    for name, pol in {"Expert": make_policy("expert"), **policies}.items():
        if hasattr(pol, "reset"):
            pol.reset(seed)
        r = rollout(pol, x0, steps=max_steps)
        rolls[f"{name} (cost {float(r['episode_cost'][0]):.1f})"] = r
    paths = render_comparison(rolls, out / "fig3")
    paths.append(Path(plot_trajectories(rolls, out / "trajectories.png")))
    return paths


def _render_env(policies: dict[str, Any], env: str, out: Path, seed: int, max_steps: int | None
                ) -> list[Path]:
    """Any env (see :func:`render_run`): one episode per policy, video + per-dimension trajectory plot."""
    import gymnasium as gym

    from agents.evaluation import plot_state_trajectories, record_side_by_side
    from agents.task import make_env_by_id

    def make() -> Any:
        return make_env_by_id(env, render_mode="rgb_array")

    make().close()  # an unknown env fails here, naming the id, before any rollout
    rollouts: dict[str, dict[str, Any]] = {}
    try:
        paths = record_side_by_side(policies, make, out / "side_by_side", seed=seed, max_steps=max_steps,
                                    rollouts=rollouts)
    except gym.error.DependencyNotInstalled as err:
        raise BadArgumentError(f"rendering {env} needs a package that is not installed: {err}") from err
    labels = {f"{name} (return {r['return']:.1f})": r["observations"] for name, r in rollouts.items()}
    paths.append(Path(plot_state_trajectories(labels, out / "trajectories.png", title=f"{env}, seed {seed}")))
    return paths


def run_pipeline(
    out: str | Path,
    runs: int = 10,
    preset: str = "quick",
    seed: int = 0,
    dataset: str | Path | None = None,
    episodes: int = 100,
    variances: str = "both",
    jobs: int = 1,
    progress: bool = True,
    command: str = "diffmpc table2",
    address: str | None = None,
    device: str | None = None,
    cost_restarts: int | None = None,
) -> dict[str, Any]:
    """The whole Table 2 / Fig. 3 pipeline (see the module docstring); returns the aggregated results.

    The training runs are a sweep (:func:`diffmpc.sweep.run_sweep`): ``jobs`` one-CPU Ray tasks on this
    machine, or an existing Ray cluster at ``address``; in-process with ``jobs=1``. Each run directory is
    keyed on its full config (seed, preset, variances, dataset hash): finished runs are skipped, a failed run
    is reported and left out of the table (the table is built from the runs that finished). ``cost_restarts``
    overrides the preset's :attr:`agents.ifo.IfOConfig.cost_restarts` (K > 1 is part of the runs' key)."""
    from diffmpc._checks import check_int
    from diffmpc.io import write_results

    check_int("--runs", runs, 1)
    check_int("--episodes", episodes, 1)
    check_int("--jobs", jobs, 1)
    if ifo_config(preset, cost_restarts=cost_restarts).cost_restarts == 1:  # checked before any work
        cost_restarts = None  # K = 1 is the plain run: the same run directories as without the option
    _variances(variances)
    if dataset is not None:
        _pairs(dataset)  # a bad --dataset fails now, not after minutes of work
    out = Path(out)
    t0 = time.perf_counter()
    if dataset is None:
        from agents.dataset import generate_dataset

        dataset = out / "dataset" / "expert_cartpole.npz"
        if not dataset.is_file():
            generate_dataset(dataset, episodes=episodes, seed=seed, progress=progress)
    seeds = [seed + i for i in range(runs)]
    from diffmpc.sweep import Task, run_sweep

    tasks = [Task(f"run_{s}", run_config(s, dataset, out, preset, variances, cost_restarts)) for s in seeds]
    gpus = 1.0 / jobs if str(device or "cpu").startswith("cuda") else 0.0  # the runs share one GPU
    sweep = run_sweep(tasks, functools.partial(run_task, device=device), out, jobs=jobs, address=address,
                      progress=progress, desc="training runs", gpus_per_run=gpus)
    if not sweep.finished:
        raise RuntimeError(f"no Table 2 run finished ({len(sweep.failed)} failed; tracebacks in "
                           f"{out}/run_*/error.txt)")
    results = [sweep.finished[t.name] for t in tasks if t.name in sweep.finished]
    seeds = [r["seed"] for r in results]
    table = aggregate_runs(results)
    minutes = (time.perf_counter() - t0) / 60
    convergence = convergence_summary(results)
    md = table2_markdown(table, len(results), command, minutes, convergence,
                         [r["wall_time_s"] / 60 for r in results if "wall_time_s" in r])
    (out / "table2.md").write_text(md)
    media = render_run(out / f"run_{seeds[0]}", out, seed=seeds[0])
    res = {
        "command": command,
        "runs": len(results),
        "seeds": seeds,
        "failed_runs": sorted(sweep.failed),
        "preset": preset,
        **({"cost_restarts": cost_restarts} if cost_restarts is not None else {}),
        "dataset": str(dataset),
        "table": table,
        "convergence": convergence,
        "paper": PAPER_TABLE2,
        "wall_time_min": minutes,
        "media": [str(p) for p in media],
        "per_run": [
            {k: r[k] for k in ("seed", "wall_time_s", "ifo_train_s", "bc_train_s", "bco_train_s",
                               "learned_target", "learned_weights") if k in r} for r in results
        ],
    }
    write_results(out, res)
    print(md)
    print("video:", ", ".join(str(p) for p in media))
    return res


# ---------------------------------------------------------------------------------------------- CLI
def _common(p: Any, out_default: str | None = None, preset: bool = True, seed_help: str = "") -> None:
    p.add_argument("--out", required=out_default is None, default=out_default, help="output directory")
    p.add_argument("--seed", type=int, default=0, help=seed_help or "training seed (runs: SEED, SEED+1, ...)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if not preset:
        return
    add_device_argument(p)
    p.add_argument(
        "--preset",
        choices=("quick", "paper", "tiny"),
        default="quick",
        help="quick: minutes on 2 CPU cores; paper: the full budget; tiny: a smoke test",
    )


def _cmd_train(args: Any) -> int:
    device = str(resolve_device(args.device))
    for flag, value in (("--cost-init", args.cost_init), ("--cost-restarts", args.cost_restarts),
                        ("--set", args.set)):
        if args.what != "ifo" and value is not None:
            raise BadArgumentError(f"{flag} is an IfO setting (of the learned cost); train {args.what} has "
                                   "no learned cost")
    if args.what == "bc" and args.simulator is not None:
        raise BadArgumentError("train bc queries no simulator (it maps its controls through the --dynamics "
                               "model); drop --simulator (train ifo and train bco take it)")
    if args.what == "ifo":
        s = train_ifo(args.dataset, args.out, args.preset, args.seed, args.resume, not args.no_progress,
                      overwrite=args.overwrite, angle_dims=args.angle_dims, device=device,
                      circle_dims=args.circle_dims, cost_init=args.cost_init,
                      cost_restarts=args.cost_restarts, simulator=args.simulator, overrides=args.set)
        print(
            f"IfO: {s['iterations']} iterations in {s['elapsed_s']:.0f} s; learned target "
            f"{np.round(s['learned_target'], 3).tolist()} -> {args.out}"
        )
    elif args.what == "bco":
        s = train_bco(args.dataset, args.out, args.preset, args.seed, args.resume, not args.no_progress,
                      overwrite=args.overwrite, angle_dims=args.angle_dims, circle_dims=args.circle_dims,
                      simulator=args.simulator)
        print(f"BCO: inverse-dynamics loss {s['inverse_loss_final']:.4g}, policy loss "
              f"{s['policy_loss_final']:.4g} in {s['elapsed_s']:.0f} s -> {args.out}")
    else:
        if not args.dynamics:
            raise BadArgumentError(
                "train bc needs --dynamics IFO_DIR (the learned model BC maps its controls through)"
            )
        if args.angle_dims is not None or args.circle_dims is not None:
            raise BadArgumentError("train bc takes its task (angles, (cos, sin) pairs) from the --dynamics "
                                   "checkpoint; drop --angle-dims/--circle-dims (train ifo records them)")
        s = train_bc(
            args.dataset, args.out, args.dynamics, args.preset, args.seed, args.resume, not args.no_progress,
            overwrite=args.overwrite, rollout_steps=args.rollout_steps, hidden=args.hidden, steps=args.steps,
            device=device,
        )
        print(
            f"BC: {s['steps']} steps in {s['elapsed_s']:.0f} s, final loss {s['loss_final']:.4g} "
            f"-> {args.out}"
        )
    return 0


def _cost_restarts_argument(p: Any) -> None:
    p.add_argument("--cost-restarts", type=int, default=None, metavar="K",
                   help="IfO: run the cost learning after the dynamics warm-up K times and keep the restart "
                        "with the lowest training imitation loss (IfOConfig.cost_restarts; default: the "
                        "preset's, 1). Part of the run's recorded config: a resume with another K is refused")


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _index_pair(text: str) -> tuple[int, int]:
    """``I,J`` -> ``(I, J)`` (argparse reports anything else as a usage error)."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pair I,J of dimensions (cos, sin)")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pair I,J of integer dimensions") from None


def _cmd_evaluate(args: Any) -> int:
    import envs
    from diffmpc.io import write_results

    device = str(resolve_device(args.device))
    if args.env != envs.CARTPOLE_ID:  # any registered env: episodes in the Gymnasium loop, fixed seeds
        from agents.evaluation import evaluate_in_env
        from diffmpc.errors import BadArgumentError

        if any(spec.partition(":")[0] == "expert" for spec in args.policy):
            raise BadArgumentError(f"--policy expert plans on the cart-pole's true model, not {args.env}; "
                                   "evaluate ifo:/bc:/bco: checkpoints trained on it")
        seeds = list(range(args.seed, args.seed + args.episodes))
        res = {spec: evaluate_in_env(make_policy(spec), args.env, seeds, progress=not args.no_progress)
               for spec in args.policy}
        path = write_results(args.out, {"command": "evaluate", "env": args.env, "seeds": seeds,
                                        "evaluation": res})
        for spec, r in res.items():
            print(f"{spec:>30s}: return {r['mean_return']:.2f} ± {r['return_stderr']:.2f}, cost "
                  f"{r['mean_cost']:.2f} over {len(seeds)} episodes")
        print(f"-> {path}")
        return 0
    policies = {spec: make_policy(spec, device) for spec in args.policy}
    res = evaluate_policies(
        policies, _variances(args.variance), seed=args.seed, progress=not args.no_progress, device=device
    )
    path = write_results(args.out, {"command": "evaluate", "seed": args.seed, "evaluation": res})
    for spec, rows in res.items():
        for v, r in rows.items():
            print(f"{spec:>30s} {v:>4s} variance: {r['mean_cost']:.3f} ± {r['stderr']:.3f}")
    print(f"-> {path}")
    return 0


def _cmd_render(args: Any) -> int:
    from agents.evaluation import START_VARIANCES

    variance = None if args.variance is None else START_VARIANCES[args.variance]
    paths = render_run(args.run, args.out, variance, args.index, args.seed, args.env, args.max_steps)
    print("wrote", ", ".join(str(p) for p in paths))
    return 0


def _cmd_table2(args: Any) -> int:
    cmd = f"diffmpc table2 --runs {args.runs} --preset {args.preset} --seed {args.seed} --jobs {args.jobs}"
    cmd += f" --dataset {args.dataset}" if args.dataset else f" --episodes {args.episodes}"
    cmd += f" --cost-restarts {args.cost_restarts}" if args.cost_restarts is not None else ""
    run_pipeline(
        args.out,
        args.runs,
        args.preset,
        args.seed,
        args.dataset,
        args.episodes,
        args.variance,
        args.jobs,
        not args.no_progress,
        command=cmd,
        address=args.address,
        device=str(resolve_device(args.device)),
        cost_restarts=args.cost_restarts,
    )
    return 0


def _cmd_demo(args: Any) -> int:
    cmd = f"diffmpc demo --preset {args.preset} --seed {args.seed}"
    cmd += f" --cost-restarts {args.cost_restarts}" if args.cost_restarts is not None else ""
    run_pipeline(
        args.out, 1, args.preset, args.seed, None, args.episodes, "low", 1, not args.no_progress, command=cmd,
        device=str(resolve_device(args.device)), cost_restarts=args.cost_restarts,
    )
    print(f"side-by-side video (expert | BC | MPC_IFT): {Path(args.out) / 'fig3.mp4'}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``train``, ``evaluate``, ``render``, ``table2`` and ``demo`` subcommands."""
    t = subparsers.add_parser(
        "train",
        help="train an imitation-from-observation agent (ifo) or a baseline (bc, bco)",
        description="Train MPC_IFT (paper Alg. 2) or the BC / BCO baselines on expert states.",
    )
    t.add_argument("what", choices=("ifo", "bc", "bco"))
    t.add_argument("--dataset", required=True, help="expert dataset (.npz from `diffmpc dataset`)")
    t.add_argument(
        "--dynamics", help="bc: IfO output dir/checkpoint whose learned dynamics BC trains through"
    )
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint under --out")
    t.add_argument("--overwrite", action="store_true", help="discard a checkpoint under --out, start afresh")
    t.add_argument("--rollout-steps", type=int, default=None,
                   help="bc: k-step rollout loss through the learned model (default: the preset's; 5 for "
                        "quick and paper, 1 for tiny)")
    t.add_argument("--hidden", type=lambda v: tuple(_int_list(v)), default=None, metavar="W,W",
                   help="bc: hidden layer widths (default: the preset's)")
    t.add_argument("--steps", type=int, default=None, help="bc: Adam steps (default: the preset's)")
    t.add_argument("--angle-dims", type=_int_list, default=None, metavar="I,J",
                   help="ifo/bco: state dimensions that are raw angles (default: 2 for the cart-pole, none "
                        "otherwise; '' for none)")
    t.add_argument("--circle-dims", type=_index_pair, nargs="+", default=None, metavar="I,J",
                   help="ifo/bco: observation dimension pairs holding (cos φ, sin φ) of one angle, e.g. 0,1 "
                        "for Pendulum-v1's (cos θ, sin θ, θ̇); the learned cost keeps each pair's target on "
                        "the unit circle with one weight. Recorded in the checkpoint: evaluate and train bc "
                        "read it from there")
    t.add_argument("--cost-init", choices=("random", "expert_mean"), default=None,
                   help="ifo: where the learned cost's target starts (default: the preset's, random); "
                        "expert_mean: the mean expert state (advised with --circle-dims, docs/own_env.md)")
    _cost_restarts_argument(t)
    t.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                   help="ifo: override any IfOConfig field of the preset, e.g. --set horizon=20 "
                        "cost_batch=128 circle_distance=geodesic hidden=64,64 (recorded in the checkpoint: "
                        "a resume with other values is refused)")
    t.add_argument("--simulator", default=None, metavar="MODULE:FUNCTION",
                   help="ifo/bco: the simulator query, a batched torch function F(x (N, n), u (N, m)) -> "
                        "x' (N, n) imported from MODULE (the current directory is on the path, as for "
                        "python -m), e.g. examples.pendulum_ifo:pendulum_step; needed for an env that "
                        "cannot be set to a state (default: the cart-pole's dynamics, else the env itself). "
                        "Recorded in the checkpoint: a resume with another one is refused")
    _common(t)
    t.set_defaults(handler=_cmd_train)

    e = subparsers.add_parser(
        "evaluate",
        help="average episode cost over the 50 fixed test starts",
        description="Evaluate policies: expert, expert:cem, ifo:PATH, bc:PATH, bco:PATH (repeatable).",
    )
    e.add_argument(
        "--policy", action="append", required=True,
        help="expert (the paper's RS planner) | expert:cem | ifo:PATH | bc:PATH | bco:PATH",
    )
    e.add_argument("--variance", choices=("low", "high", "both"), default="both")
    e.add_argument("--env", default="diffmpc/CartPoleSwingUp-v0",
                   help="any registered env id; other than the cart-pole: --episodes episodes in the "
                        "Gymnasium loop with seeds SEED, SEED+1, ... (return from the env's reward)")
    e.add_argument("--episodes", type=int, default=10, help="episodes per policy for an --env other than the "
                   "cart-pole (the cart-pole uses its 50 fixed starts)")
    _common(e, preset=False, seed_help="seed of the sampling planners (expert, MPC_IFT)")
    add_device_argument(e)
    e.set_defaults(handler=_cmd_evaluate)

    r = subparsers.add_parser(
        "render", help="side-by-side video + trajectory plot of a run (paper Fig. 3 on the cart-pole)",
        description="One episode of each learned policy of a run (ifo/, bc/, bco/) side by side, on the env "
                    "its checkpoints record: the cart-pole's Fig. 3 (with the expert; fig3.mp4/.gif, "
                    "trajectories.png), any other env in the Gymnasium loop (side_by_side.mp4/.gif, "
                    "trajectories.png with one panel per observation dimension).")
    r.add_argument("--run", required=True,
                   help="a run directory holding ifo/, bc/ and/or bco/ (from table2/demo, or the parent of "
                        "train's --out directories)")
    r.add_argument("--variance", choices=("low", "high"), default=None,
                   help="cart-pole: start variance of the test start (default: low)")
    r.add_argument("--index", type=int, default=None,
                   help="cart-pole: which of the 50 test starts (default 0)")
    r.add_argument("--env", default=None, metavar="ID",
                   help="the env to render in (default: the one the checkpoints record); module:ID imports "
                        "module first (Gymnasium's syntax), for an env your own code registers")
    r.add_argument("--max-steps", type=int, default=None,
                   help="cut the episodes after this many steps (default: the env's episode length)")
    _common(r, preset=False, seed_help="episode seed on envs other than the cart-pole (as `evaluate --env "
            "ID --seed SEED`'s first episode), and seed of the sampling planners (expert, MPC_IFT)")
    r.set_defaults(handler=_cmd_render)

    p = subparsers.add_parser(
        "table2",
        help="the whole Table 2 pipeline over several training runs",
        description="Dataset, IfO + BC training per seed, evaluation, table, video.",
    )
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--dataset", help="expert dataset (default: generate OUT/dataset/expert_cartpole.npz)")
    p.add_argument("--episodes", type=int, default=100, help="expert trajectories when generating")
    p.add_argument("--variance", choices=("low", "high", "both"), default="both")
    _cost_restarts_argument(p)
    add_sweep_arguments(p, "training runs in parallel (one CPU each) on a local Ray")
    _common(p, "runs/table2")
    p.set_defaults(handler=_cmd_table2)

    d = subparsers.add_parser(
        "demo",
        help="the quick cart-pole pipeline end to end, with a video",
        description="Expert data, IfO and BC training, evaluation, side-by-side video.",
    )
    d.add_argument("--episodes", type=int, default=30, help="expert trajectories to generate")
    _cost_restarts_argument(d)
    _common(d, "runs/demo")
    d.set_defaults(handler=_cmd_demo)
