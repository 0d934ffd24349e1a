"""mkdocs hooks of the diffmpc site (``hooks:`` in mkdocs.yml).

* Result tables are generated, not pasted: a page writes ``{{ results_table("NAME") }}`` (alone on a line)
  and the hook replaces it by the markdown table rendered from the committed results JSON (``RENDERERS``
  below), followed by the file it came from. An unknown name or a missing file fails the build.
* Public API without a docstring fails the strict build: after the config is loaded, every public function
  and class of the documented packages (their ``__all__`` if they define one) is checked with griffe.

Run by ``make docs``; the renderers are also imported by ``tests/test_docs.py`` (no mkdocs needed there).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
# A placeholder stands alone on its line (so that prose can quote the syntax inside backticks).
PLACEHOLDER = re.compile(r"^\{\{\s*results_table\(\s*[\"']([\w:.-]+)[\"']\s*\)\s*\}\}[ \t]*$", re.M)
DOCUMENTED_PACKAGES = ("diffmpc", "envs", "agents", "experiments")

log = logging.getLogger("mkdocs.hooks.diffmpc")


class ResultsError(Exception):
    """A placeholder names no renderer, or its results file is missing or malformed."""


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ResultsError(f"results file {path.relative_to(ROOT)} is missing (regenerate it by its command)")
    return json.loads(path.read_text())


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def _source(path: Path, command: Any = None) -> str:
    line = f"Generated from `{path.relative_to(ROOT)}`"
    if command:
        cmds = command if isinstance(command, list) else [command]
        line += " — command: " + "; ".join(f"`{c}`" for c in cmds)
    return line + "\n"


def rows_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table with one column per key (in first-seen order) and one row per dict."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def bench(name: str) -> str:
    """``bench:NAME``: the rows of ``benchmarks/results/NAME.json`` (written by ``benchmarks/NAME.py``), its
    provenance (command, commit, measured load) and the reading generated from it (``benchmarks.report``)."""
    from benchmarks.report import reading

    path = RESULTS / f"{name}.json"
    data = _load(path)
    if "rows" not in data:
        raise ResultsError(f"{path.name} has no 'rows'")
    prov = data.get("provenance")
    if prov:
        load = prov.get("loadavg_before") or ["?"]
        where = (f"Measured at commit `{(prov.get('git_commit') or '?')[:10]}`"
                 + (" (dirty tree)" if prov.get("git_dirty") else "")
                 + f", {prov.get('started_utc', '?')}, load average (1 min) {load[0]} before / "
                 + f"{prov['loadavg_after'][0]} after on {prov.get('cpu_count', '?')} CPUs, "
                 + f"{prov.get('wall_seconds', '?')} s wall.\n")
    else:
        where = "This file has no provenance record (written before benchmarks.common.Run).\n"
    text = reading(name, data)
    return (rows_table(data["rows"]) + "\n" + _source(path, (prov or {}).get("command")
                                                      or data.get("meta", {}).get("command"))
            + "\n" + where + ("\n" + text if text else ""))


def table1() -> str:
    """Table 1 (methods × tasks) from ``benchmarks/results/table1_<task>.json``, rendered by the experiment's
    own :func:`experiments.table1.combined_markdown` (one place knows the payload's layout)."""
    from experiments.table1 import TASKS, combined_markdown

    paths = {t: RESULTS / f"table1_{t}.json" for t in TASKS if (RESULTS / f"table1_{t}.json").is_file()}
    if not paths:
        raise ResultsError("no benchmarks/results/table1_<task>.json (diffmpc table1 ... --publish)")
    md = combined_markdown({t: _load(p) for t, p in paths.items()})
    return md + "\n" + "\n".join(_source(p) for p in paths.values())


def table1_quick() -> str:
    """Table 1, VdP at the ``quick`` budget (20 runs of all five methods; ``table1_vdp_quick.json``)."""
    from experiments.table1 import combined_markdown

    path = RESULTS / "table1_vdp_quick.json"
    data = _load(path)
    return combined_markdown({"vdp": data}) + "\n" + _source(path, data.get("command"))


def table2() -> str:
    """Table 2: average episode cost per policy and start variance (``docs/figures/table2_results.json``)."""
    from experiments.table2 import table2_markdown

    path = FIGURES / "table2_results.json"
    data = _load(path)
    md = table2_markdown(data["table"], data["runs"], data["command"], data["wall_time_min"])
    return md + "\n" + _source(path)


def pendulum_ifo() -> str:
    """``examples/pendulum_ifo.py`` on Pendulum-v1: return per policy over fixed seeds, gap to the expert, the
    converged fraction of the MPC solves, wall time (``docs/figures/pendulum_ifo_results.json``)."""
    path = FIGURES / "pendulum_ifo_results.json"
    d = _load(path)
    ev = d["evaluation"]
    expert = ev["expert"]["mean_return"]
    lines = ["| policy | return (mean ± s.e.) | vs expert | MPC plans converged |", "|---|---|---|---|"]
    for name, r in ev.items():
        gap = "" if name == "expert" else f"{100 * (r['mean_return'] - expert) / abs(expert):+.1f} %"
        conv = r.get("converged_fraction")
        conv = "–" if conv is None else f"{100 * conv:.1f} %"
        lines.append(f"| {name} | {r['mean_return']:.1f} ± {r['return_stderr']:.1f} | {gap} | {conv} |")
    seeds, t = ev["expert"]["seeds"], d["time_s"]
    ifo_conv, solves = d["ifo_converged_fraction"], d["ifo_mpc_solves"]
    steps = ev["expert"]["episode_lengths"][0]
    lines += ["", f"{len(seeds)} episodes of {steps} steps (seeds {seeds[0]}–{seeds[-1]}). IfO training: "
              f"{solves - d['ifo_mpc_unconverged']} of {solves} MPC solves converged (per iteration min "
              f"{100 * min(ifo_conv):.0f} %). Wall time ({d['threads']} thread, shared machine): IfO "
              f"{t['ifo'] / 60:.1f} min, BC {t['bc'] / 60:.1f} min, BCO {t['bco'] / 60:.1f} min, whole "
              f"script {t['total'] / 60:.1f} min"
              + (" (expert data reused from the first run)." if d.get("dataset_reused") else ".")]
    return "\n".join(lines) + "\n\n" + _source(path, d.get("command"))


def pendulum_ifo_seeds(name: str = "pendulum_ifo_seeds.json") -> str:
    """``examples/pendulum_ifo.py --seeds K``: each policy's return over K training seeds (same expert data,
    same evaluation episodes) and the paired differences with their standard errors over the seeds; with
    ``--cost-restarts`` also each restart's selection loss per seed (the kept one in bold)."""
    path = FIGURES / name
    d = _load(path)
    k, summary = len(d["training_seeds"]), d["summary"]
    lines = [f"| policy | return: mean over {k} training seeds ± s.e. | min … max over seeds |",
             "|---|---|---|"]
    for name in ("expert", "BC", "BCO", "MPC_IFT"):
        r = summary[name]
        lo, hi = min(r["per_seed"]), max(r["per_seed"])
        spread = "– (one evaluation)" if name == "expert" else f"{lo:.1f} … {hi:.1f}"
        lines.append(f"| {name} | {r['mean_return']:.2f} ± {r['stderr_over_seeds']:.2f} | {spread} |")
    lines += ["", "| paired difference (same episodes) | mean ± s.e. over seeds | relative to the second "
              "| seeds where the first is better |", "|---|---|---|---|"]
    for name, r in d["paired_differences"].items():
        lines.append(f"| {name} | {r['mean']:+.2f} ± {r['stderr_over_seeds']:.2f} | "
                     f"{100 * r['relative_to_b']:+.2f} % | {r['seeds_a_better']} of {k} |")
    restarts = d["ifo_config"].get("cost_restarts", 1) > 1
    extra = (" per restart (selection loss; kept in bold)", "---|") if restarts else ("", "")
    lines += ["", "| training seed | MPC_IFT return | BC return | learned weights (cos θ, sin θ, θ̇) | IfO "
              f"imitation loss, last 10 iterations |{extra[0] and ' IfO imitation loss' + extra[0] + ' |'}",
              "|---|---|---|---|---|" + extra[1]]
    for seed, r in d["per_seed"].items():
        w = ", ".join(f"{v:.3f}" for v in r["learned_weights"])
        ret = {n: r["evaluation"][n]["mean_return"] for n in ("MPC_IFT", "BC")}
        row = (f"| {seed} | {ret['MPC_IFT']:.1f} | {ret['BC']:.1f} | ({w}) | "
               f"{r['imitation_loss_last_10']:.4f} |")
        if restarts:
            row += " " + ", ".join(f"**{c['selection_loss']:.4f}**" if c["restart"] == r["kept_restart"]
                                   else f"{c['selection_loss']:.4f}" for c in r["cost_restarts"]) + " |"
        lines.append(row)
    ev, cpu = d["eval_seeds"], d["cpu_s_per_seed"]
    lines += ["", f"Training seeds {d['training_seeds'][0]}–{d['training_seeds'][-1]} on one expert dataset "
              f"(seed {d['data_seed']}); every policy on the same {len(ev)} episodes (seeds "
              f"{ev[0]}–{ev[-1]}), "
              f"the expert evaluated once. IfO: {d['ifo_mpc_solves'] - d['ifo_mpc_unconverged']} of "
              f"{d['ifo_mpc_solves']} MPC solves converged{_all_restarts(d)}. CPU per training seed (IfO + "
              "BC + BCO + "
              f"evaluation, {d['threads']} thread): {min(cpu):.0f}–{max(cpu):.0f} s."]
    return "\n".join(lines) + "\n\n" + _source(path, d.get("command"))


def _all_restarts(d: dict) -> str:
    """With restarts: the converged count over every restart's solves (the count above: the kept ones)."""
    runs = [c for r in d["per_seed"].values() for c in r.get("cost_restarts", [])]
    if not runs or any("solves" not in c for c in runs):
        return ""
    n, ok = sum(c["solves"] for c in runs), sum(c["solves_converged"] for c in runs)
    return f" in the kept restarts, {ok} of {n} in all restarts"


def pendulum_ifo_diagnosis(name: str = "pendulum_ifo_diagnosis.json") -> str:
    """``examples/pendulum_ifo_diagnose.py``: MPC_IFT with one learned part replaced by the truth."""
    path = FIGURES / name
    d = _load(path)
    lines = ["| MPC policy on | return (mean) | per episode |", "|---|---|---|"]
    for name, r in d["evaluation"].items():
        per = ", ".join(f"{v:.0f}" for v in r["episode_returns"])
        lines.append(f"| {name} | {r['mean_return']:.1f} | {per} |")
    target = ", ".join(f"{v:.3f}" for v in d["learned_target"])
    weights = ", ".join(f"{v:.3f}" for v in d["learned_weights"])
    err = ", ".join(f"{v:.3f}" for v in d["one_step_model_mean_abs_error"])
    lines += ["", f"Learned cost: target φ̄ = ({target}), weights w = ({weights}) on (cos θ, sin θ, θ̇). "
              f"One-step model error (mean |·| over 2000 random states and controls): ({err})."]
    return "\n".join(lines) + "\n\n" + _source(path, d.get("command"))


def lqr_imitation() -> str:
    """Appx. C: final imitation / model loss (mean ± std over inits), backward time per damping and mode."""
    path = FIGURES / "lqr_imitation_summary.json"
    data = _load(path)
    cfg, runs = data["config"], data["runs"]
    modes = cfg["modes"]
    lines = ["| c | imitation loss (final) | model loss ‖A − Â‖_F | backward ms/iter: "
             + " / ".join(modes) + " | failed steps |", "|---|---|---|---|---|"]
    for c in cfg["dampings"]:
        key = f"c={c:g}"
        ref = runs[f"{key}/{modes[-1]}"]
        ms = " / ".join(f"{1e3 * runs[f'{key}/{m}']['backward_s'] / cfg['iterations']:.1f}" for m in modes)
        failed = sum(runs[f"{key}/{m}"]["failed_steps"] for m in modes)
        imitation = f"{ref['final_imitation_loss_mean']:.2g} ± {ref['final_imitation_loss_std']:.2g}"
        model = f"{ref['final_model_loss_mean']:.2g} ± {ref['final_model_loss_std']:.2g}"
        lines.append(f"| {c:g} | {imitation} | {model} | {ms} | {failed} |")
    worst = max(data["mode_agreement"].values())
    return ("\n".join(lines) + f"\n\nLosses of the `{modes[-1]}` mode ({cfg['inits']} inits, "
            f"{cfg['iterations']} iterations); the other modes' final Â differ from it by at most "
            f"{worst:.2g}.\n\n"
            + _source(path, data.get("command")))


def kepler() -> str:
    """Fig. 1: the learned eccentricity and the layer's dE/de against the closed form."""
    path = FIGURES / "kepler_results.json"
    data = _load(path)
    cfg = data["config"]
    rows = [{"true e": cfg["true_e"], "initial e": cfg["init_e"], "learned e": f"{data['learned_e']:.6f}",
             "Adam steps": cfg["steps"], "final loss": data["final_loss"],
             f"max |dE/de − closed form| ({cfg['grid']}×{cfg['grid']} grid)":
                 data["max_abs_error_dE_de_vs_closed_form"], "train s": data["train_seconds"]}]
    return rows_table(rows) + "\n" + _source(path, data.get("command"))


def bench_headlines() -> str:
    """One headline per benchmark (``benchmarks.report.headlines``), with the command and measured load."""
    from benchmarks.report import headlines

    return headlines() + "\n" + "Generated from `benchmarks/results/*.json` by `benchmarks/report.py`.\n"


def cli_help() -> str:
    """``diffmpc --help`` and every subcommand's ``--help``, from the parser itself (never out of date)."""
    import argparse

    from diffmpc.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = ["```text", parser.format_help().rstrip(), "```", ""]
    for name, p in sub.choices.items():
        out += [f"### `diffmpc {name}`", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


RENDERERS: dict[str, Callable[[], str]] = {
    "pendulum_ifo": pendulum_ifo,
    "pendulum_ifo_diagnosis": pendulum_ifo_diagnosis,
    "pendulum_ifo_seeds": pendulum_ifo_seeds,
    "pendulum_ifo_seeds_chord": lambda: pendulum_ifo_seeds("pendulum_ifo_seeds_chord.json"),
    "pendulum_ifo_seeds_batch32": lambda: pendulum_ifo_seeds("pendulum_ifo_seeds_batch32.json"),
    "pendulum_ifo_seeds_batch32_restarts":
        lambda: pendulum_ifo_seeds("pendulum_ifo_seeds_batch32_restarts.json"),
    # the same diagnosis on a training seed where MPC_IFT failed (seed 2 of the multi-seed run)
    "pendulum_ifo_diagnosis_seed2": lambda: pendulum_ifo_diagnosis("pendulum_ifo_diagnosis_seed2.json"),
    "bench_headlines": bench_headlines,
    "cli": cli_help,
    "kepler": kepler,
    "table1": table1,
    "table1_quick": table1_quick,
    "table2": table2,
    "lqr_imitation": lqr_imitation,
}


def render(name: str) -> str:
    """The markdown for ``{{ results_table("name") }}``; ``bench:NAME`` renders a benchmark's rows."""
    if name.startswith("bench:"):
        return bench(name.removeprefix("bench:"))
    if name not in RENDERERS:
        raise ResultsError(f"no results table named {name!r}; known: {sorted(RENDERERS)} or bench:NAME")
    return RENDERERS[name]()


def render_page(markdown: str) -> str:
    """Replace every ``{{ results_table("NAME") }}`` in a page."""
    return PLACEHOLDER.sub(lambda m: render(m.group(1)), markdown)


def missing_docstrings(packages: tuple[str, ...] = DOCUMENTED_PACKAGES) -> list[str]:
    """Public functions and classes (module ``__all__`` if defined, else names without ``_``) lacking a
    docstring, over every module of ``packages``."""
    import griffe

    missing: list[str] = []

    def visit(module: Any) -> None:
        if module.name.startswith("_") and module.name != "__init__":
            return
        if not module.docstring:
            missing.append(module.path)
        public = module.exports
        for name, member in module.members.items():
            if member.is_alias or name.startswith("_") or (public is not None and name not in public):
                continue
            if member.is_module:
                visit(member)
            elif (member.is_function or member.is_class) and not member.docstring:
                missing.append(member.path)

    for pkg in packages:
        visit(griffe.load(pkg, search_paths=[str(ROOT)], try_relative_path=False))
    return missing


# ----------------------------------------------------------------------------------------------- mkdocs hooks


def on_config(config: Any) -> Any:
    for path in missing_docstrings():
        log.warning(f"public API without a docstring: {path}")
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from mkdocs.exceptions import PluginError

    try:
        return render_page(markdown)
    except (ResultsError, KeyError, TypeError) as err:
        raise PluginError(f"{page.file.src_path}: {err}") from err
