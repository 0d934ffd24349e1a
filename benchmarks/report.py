"""Readings of benchmark results generated from their JSON, so the words change when the numbers do.

    python -m benchmarks.report [NAME ...]      # print the readings of benchmarks/results/NAME.json

The documentation site renders each benchmark's table from its JSON (``{{ results_table("bench:NAME") }}``,
docs/_tools/hooks.py) and appends the reading written here for that benchmark (``READINGS``), e.g. which
method is fastest in total, by how much, where gradients are invalid (non-converged solves), and how the
memory kept for the backward grows — win or lose, nothing typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from benchmarks.common import RESULTS


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ms(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (
        f"{v / 1e3:.2f} s" if v >= 1e3 else f"{v:.3g} ms")


def read_ode(d: dict[str, Any]) -> str:
    """A reading of Fig. 2 generated from ode_backward.json."""
    rows = d["rows"]
    a = {r["method"]: r for r in rows if r["panel"] == "a"}
    if not a:
        return ""
    anchor = "DOPRI5 adjoint (torchdiffeq)"
    cg = a.get("Bwd Euler IFT CG")
    fastest_total = min(a.values(), key=lambda r: r["total_ms"])
    fastest_bwd = min(a.values(), key=lambda r: r["bwd_ms"])
    fastest_fwd = min(a.values(), key=lambda r: r["fwd_ms"])
    out = ["**Reading (generated from the JSON).**"]
    out.append(f"Panel a: forward + backward is fastest for *{fastest_total['method']}* "
               f"({_ms(fastest_total['total_ms'])} median), backward alone for *{fastest_bwd['method']}* "
               f"({_ms(fastest_bwd['bwd_ms'])}), forward alone for *{fastest_fwd['method']}* "
               f"({_ms(fastest_fwd['fwd_ms'])}).")
    if cg and anchor in a:
        tot, bwd = cg["dopri5_total_over_this"], cg["dopri5_bwd_over_this"]
        word = "faster" if tot > 1 else "slower"
        fwd_note = ("DOPRI5's explicit forward is cheaper" if a[anchor]["fwd_ms"] < cg["fwd_ms"]
                    else "backward Euler's forward is not slower here")
        out.append(f"IFT CG vs the DOPRI5 adjoint: total {tot:.2f}× ({word}), backward only {bwd:.2f}× "
                   f"(medians of per-initialisation ratios); forward {_ms(cg['fwd_ms'])} vs "
                   f"{_ms(a[anchor]['fwd_ms'])} — {fwd_note}.")
    bad_a = [f"{m} {r['steps_not_converged']}" for m, r in a.items()
             if isinstance(r.get("steps_not_converged"), str)
             and not r["steps_not_converged"].startswith("0/")]
    out.append("Non-converged backward-Euler steps in panel a: " + (", ".join(bad_a) or "none") + ".")
    b = [r for r in rows if r["panel"] == "b"]
    for mu in sorted({r["mu"] for r in b}):
        skipped = [r for r in b if r["mu"] == mu and "skipped" in r]
        at = [r for r in b if r["mu"] == mu and "skipped" not in r]
        invalid = [r for r in at if not r.get("gradient_valid", True)]
        valid = [r for r in at if r.get("gradient_valid", True) and not math.isnan(r["total_ms"])]
        best = min(valid, key=lambda r: r["total_ms"]) if valid else None
        s = f"μ = {mu:g}: "
        s += (f"fastest valid gradient *{best['method']}* ({_ms(best['total_ms'])} total)" if best
              else "no method produced a valid gradient")
        if invalid:
            s += "; **invalid** (non-converged forward steps or solves): " + ", ".join(
                f"{r['method']} ({r.get('steps_not_converged', 'DOPRI5 failed')}, max ‖F‖ "
                f"{r.get('max_step_residual', float('nan')):.2g})" if "steps_not_converged" in r
                else f"{r['method']} (failed)" for r in invalid)
        if skipped:
            s += "; not measured: " + ", ".join(f"{r['method']} ({r['skipped']})" for r in skipped)
        out.append(s + ".")
    c = [r for r in rows if r["panel"] == "c"]
    if c:
        def kb(method: str, steps: Any) -> float | None:
            hit = [r["saved_for_backward_kB"] for r in c if r["method"] == method and r["steps"] == steps]
            return hit[0] if hit else None
        ift20, ift320 = kb("Bwd Euler IFT CG", 20), kb("Bwd Euler IFT CG", 320)
        adj320, unr320 = kb("Bwd Euler adjoint", 320), kb("Bwd Euler unrolled", 320)
        if None not in (ift20, ift320, adj320, unr320):
            out.append(f"Memory (panel c, kB kept for the backward between two outputs): IFT CG grows "
                       f"with the steps ({ift20:.3g} → {ift320:.3g} kB for 20 → 320 steps; it stores every "
                       f"state), the adjoints keep only the outputs ({adj320:.3g} kB at 320 steps), "
                       f"unrolling keeps every solver iterate ({unr320:.3g} kB). With every step an output "
                       "(panels a, b) IFT and adjoint store the same states.")
    return " ".join(out[:1]) + "\n\n" + "\n".join(f"* {s}" for s in out[1:]) + "\n"


def _compare(a: float, b: float, tie: float = 0.1) -> str:
    """'faster than' / 'slower than' / 'about as fast as' for times a vs b (within ``tie`` relative)."""
    if abs(a - b) <= tie * max(a, b):
        return "about as fast as"
    return "faster than" if a < b else "slower than"


def read_implicit(d: dict[str, Any]) -> str:
    by = {(r["D"], r["mode"]): r for r in d["rows"]}
    cg, dense, unroll = by.get((2000, "cg")), by.get((2000, "dense")), by.get((2000, "unroll"))
    if not (cg and dense and unroll):
        return ""
    s = (f"**Reading (generated).** At D = 2000 the CG backward takes {_ms(cg['backward_s'] * 1e3)}, dense "
         f"{_ms(dense['backward_s'] * 1e3)} ({dense['backward_s'] / cg['backward_s']:.0f}× CG), unrolling "
         f"{_ms(unroll['backward_s'] * 1e3)} — unrolling's backward is "
         + _compare(unroll["backward_s"], cg["backward_s"]) + " CG's in time here; ")
    mem = d["meta"].get("memory_vs_iterations") or []
    cgm = [r["peak_MB"] for r in mem if r["mode"] == "cg"]
    unm = [r["peak_MB"] for r in mem if r["mode"] == "unroll"]
    if cgm and unm:
        s += (f"in memory CG stays at {min(cgm):.2g}–{max(cgm):.2g} MB for K = 10…800 forward iterations "
              f"while unrolling grows {min(unm):.2g} → {max(unm):.2g} MB.")
    counted = [r for r in d["rows"] if "fwd_not_converged" in r]
    if not counted:
        return s + " (This older file does not count non-converged solves.)\n"
    bad = sum(r["fwd_not_converged"] + (r["bwd_not_converged"] if isinstance(r["bwd_not_converged"], int)
                                        else 0) for r in counted)
    return s + f" Non-converged solves in the timing table: {bad} of {sum(r['solves'] for r in counted)}.\n"


def headline(name: str, d: dict[str, Any]) -> str:
    """One line per benchmark for the summary table, computed from its JSON."""
    rows = d["rows"]
    if name == "ode_backward":
        a = {r["method"]: r for r in rows if r["panel"] == "a"}
        cg = a["Bwd Euler IFT CG"]
        bad = sorted({f"{r['mu']:g}" for r in rows if r["panel"] == "b" and not r.get("gradient_valid", True)
                      and r["method"].startswith("Bwd Euler IFT")})
        return (f"IFT CG vs DOPRI5 adjoint: total {cg['dopri5_total_over_this']:.2f}×, backward "
                f"{cg['dopri5_bwd_over_this']:.2f}× ({cg['n']} inits); IFT gradients invalid "
                f"(non-converged steps) at μ = {', '.join(bad) or 'none'}")
    if name == "implicit_backward":
        return f"CG backward {d['meta']['speedup_cg_vs_dense_D2000']:.0f}× faster than dense at D = 2000"
    if name == "dare_backward":
        timed = {r["n"]: r for r in rows if isinstance(r.get("lyapunov/scipy_fwd"), float)}
        r = timed.get(64) or timed[max(timed)]
        return f"default (lyapunov) backward {r['lyapunov/scipy_fwd']:.2g}× scipy's forward at n = {r['n']}"
    if name == "expert_latency":
        best = min(rows, key=lambda r: r["ms_per_action"])
        return f"fastest: {best['planner']} {best['ms_per_action']:.3g} ms/action"
    return "see the table"


def headlines() -> str:
    """The summary table: benchmark, command, headline, load during the run — all from the JSON files."""
    from benchmarks.run_all import MODES

    lines = ["| benchmark | command | headline | load (1 min) before / after | commit |",
             "|---|---|---|---|---|"]
    for name in MODES:
        d = _load(name)
        if d is None:
            lines.append(f"| `{name}` | – | no results file | – | – |")
            continue
        prov = d.get("provenance") or {}
        try:
            text = headline(name, d)
        except (KeyError, TypeError, ValueError):
            text = "older result format: see the table"
        load = (f"{prov['loadavg_before'][0]} / {prov['loadavg_after'][0]}"
                if prov.get("loadavg_before") else "not recorded")
        cmd = prov.get("command", d.get("meta", {}).get("command", "?"))
        lines.append(f"| `{name}` | `{cmd}` | {text} | {load} | `{(prov.get('git_commit') or '?')[:10]}` |")
    return "\n".join(lines) + "\n"


def read_dare(d: dict[str, Any]) -> str:
    rows = [r for r in d["rows"] if isinstance(r.get("lyapunov/scipy_fwd"), float)]
    at = {r["n"]: r for r in rows}
    r64 = at.get(64) or max(rows, key=lambda r: r["n"])
    worst = max((r.get("max_rel_diff_vs_lyapunov", 0.0) for r in rows), default=float("nan"))
    verdict = "met" if r64["lyapunov/scipy_fwd"] < 1 else "**not met**"
    warns = sum(r.get("warnings", 0) for r in d["rows"] if isinstance(r.get("warnings"), int))
    return (f"**Reading (generated).** At n = {r64['n']} the default (Lyapunov) backward costs "
            f"{r64['lyapunov/scipy_fwd']:.2g}× scipy's forward (target < 1×: {verdict}); all modes agree "
            f"with it to ≤ {worst:.2g} relative; ConvergenceWarnings: {warns}.\n")


READINGS = {"ode_backward": read_ode, "implicit_backward": read_implicit, "dare_backward": read_dare}


def reading(name: str, data: dict[str, Any] | None = None) -> str:
    """The generated reading of ``benchmarks/results/<name>.json`` ('' when there is none for it)."""
    fn = READINGS.get(name)
    if fn is None:
        return ""
    data = _load(name) if data is None else data
    if data is None:
        return ""
    try:
        return fn(data)
    except (KeyError, TypeError):  # an older result format
        return "_No generated reading: this result file predates the current format._\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=list(READINGS))
    args = p.parse_args(argv)
    for name in args.names:
        print(f"## {name}\n\n{reading(name) or '(no reading)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
