"""Benchmark tooling: `make bench` coverage and anchors, provenance, convergence counting, Fig. 2 checks."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from benchmarks import common, figures, report, run_all
from diffmpc import ConvergenceWarning

# gpu_check is not a CPU benchmark: the prepared GPU check of issue 19 (python -m benchmarks.gpu_check)
HELPERS = {"__init__", "common", "run_all", "figures", "report", "gpu_check"}


def test_run_all_lists_every_benchmark_script():
    scripts = {p.stem for p in (Path(run_all.__file__).parent).glob("*.py")} - HELPERS
    assert scripts == set(run_all.MODES)


def test_run_all_commands_quick_full_and_seed(capsys):
    quick = {cmd[0]: cmd[1:] for cmd in run_all.commands()}
    assert quick["benchmarks.implicit_backward"] == ["--quick"]
    assert quick["benchmarks.dare_backward"] == []
    full = {cmd[0]: cmd[1:] for cmd in run_all.commands(full=True, seed=3)}
    assert full["benchmarks.dare_backward"] == ["--full", "--seed", "3"]
    assert all("--quick" not in flags for flags in full.values())
    assert run_all.main(["--dry-run", "--only", "ode_backward"]) == 0
    assert capsys.readouterr().out.strip() == "== python -m benchmarks.ode_backward --quick"


def test_missing_anchor_fails_before_running_anything(monkeypatch, capsys):
    monkeypatch.setitem(run_all.ANCHORS, "implicit_backward",
                        [("an anchor", "self", "no_such_module_h16", "pip install it")])
    ran = []
    monkeypatch.setattr(run_all.subprocess, "run", _probe_only(ran))
    assert run_all.main(["--only", "implicit_backward"]) == 2
    err = capsys.readouterr().err
    assert "no_such_module_h16" in err and "pip install it" in err and ran == []


def _probe_only(ran):
    import subprocess

    real = subprocess.run

    def fake(cmd, *a, **k):
        if cmd[1] == "-c":  # the anchor import probe runs for real
            return real(cmd, *a, **k)
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    return fake


def test_failed_benchmark_makes_run_all_exit_nonzero(monkeypatch):
    import subprocess

    monkeypatch.setattr(run_all.subprocess, "run", lambda cmd, *a, **k: subprocess.CompletedProcess(cmd, 3))
    assert run_all.main(["--only", "implicit_backward"]) == 1


def test_provenance_is_measured_and_written(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    run = common.Run.start("benchmarks.example", ["--quick", "--seed", "2"])
    common.write_table("example", [{"a": 1.5, "b": None}], {"k": 1}, ["a", "b"], run=run)
    d = json.loads((tmp_path / "example.json").read_text())
    prov = d["provenance"]
    assert prov["command"].endswith("python -m benchmarks.example --quick --seed 2")
    assert len(prov["git_commit"]) == 40 and isinstance(prov["git_dirty"], bool)
    assert len(prov["loadavg_before"]) == 3 and all(v >= 0 for v in prov["loadavg_after"])
    assert d["machine"]["torch"] == torch.__version__ and "numpy" in d["machine"]
    md = (tmp_path / "example.md").read_text()
    assert prov["git_commit"][:10] in md and "| 1.5 |  |" in md and "idle" not in md


def test_convergence_counter_counts_and_passes_other_warnings():
    c = common.ConvergenceCounter()
    with pytest.warns(UserWarning, match="other"):
        with c.count("x"):
            for i in range(3):
                warnings.warn(f"bad {i}", ConvergenceWarning, stacklevel=1)
            warnings.warn("other", UserWarning, stacklevel=1)
    with c.count("y"):
        pass
    assert c.totals == {"x": 3, "y": 0} and c.messages["x"][0] == "bad 0"


def test_step_residuals_flag_exactly_the_perturbed_steps():
    from benchmarks.ode_backward import step_residuals

    A = torch.tensor([[-1.0, 2.0], [-2.0, -0.5]], dtype=torch.float64)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    M = torch.linalg.inv(torch.eye(2, dtype=torch.float64) - 0.1 * A)
    ys = [torch.tensor([[1.0, 0.0], [0.5, -1.0]], dtype=torch.float64)]
    for _ in range(10):
        ys.append(ys[-1] @ M.T)
    ys = torch.stack(ys)
    field = lambda _t, y: y @ A.T  # noqa: E731
    assert float(step_residuals(field, ys, t).max()) < 1e-12
    ys[4, 1] += 1e-3  # state 4 of trajectory 1: steps 3 -> 4 and 4 -> 5 are off
    bad = step_residuals(field, ys, t) > 1e-5
    assert bad.nonzero().tolist() == [[3, 1], [4, 1]]


def test_saved_bytes_ift_grows_with_steps_adjoint_does_not():
    from benchmarks.ode_backward import SavedBytes
    from diffmpc import odeint

    A = torch.tensor([[-1.0, 2.0], [-2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    field = lambda _t, y: y @ A.T  # noqa: E731
    y0 = torch.ones(4, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    kept = {}
    for bw in ("cg", "adjoint"):
        for h in (0.1, 0.025):
            s = SavedBytes([y0, t, A])
            with s.hooks():
                odeint(field, y0, t, backward=bw, params=[A], options={"step_size": h, "tol": 1e-10})
            kept[bw, h] = s.bytes
    assert kept["cg", 0.025] > 3 * kept["cg", 0.1]  # IFT: every state (11 vs 41 of them)
    assert kept["adjoint", 0.025] == kept["adjoint", 0.1]  # adjoint: the outputs only


def test_implicit_backward_seed_changes_the_problem():
    from benchmarks.implicit_backward import problem

    assert not torch.equal(problem(10, 0)[0], problem(10, 1)[0])
    assert torch.equal(problem(10, 1)[1], problem(10, 1)[1])


def _ode_rows(cg_total, cg_bwd, mu_invalid):
    a = [{"panel": "a", "method": "DOPRI5 adjoint (torchdiffeq)", "fwd_ms": 10.0, "bwd_ms": 100.0,
          "total_ms": 110.0, "dopri5_total_over_this": 1.0, "dopri5_bwd_over_this": 1.0},
         {"panel": "a", "method": "Bwd Euler IFT CG", "fwd_ms": 20.0, "bwd_ms": cg_bwd, "total_ms": cg_total,
          "dopri5_total_over_this": 110.0 / cg_total, "dopri5_bwd_over_this": 100.0 / cg_bwd,
          "steps_not_converged": "0/320"}]
    b = [{"panel": "b", "method": "Bwd Euler IFT CG", "mu": 30.0, "total_ms": 50.0,
          "gradient_valid": not mu_invalid, "steps_not_converged": "7/320" if mu_invalid else "0/320",
          "max_step_residual": 5.2 if mu_invalid else 1e-6}]
    return {"rows": a + b, "meta": {}}


def test_report_wording_follows_the_numbers():
    win = report.read_ode(_ode_rows(cg_total=55.0, cg_bwd=35.0, mu_invalid=False))
    assert "total 2.00× (faster)" in win and "invalid" not in win
    lose = report.read_ode(_ode_rows(cg_total=220.0, cg_bwd=200.0, mu_invalid=True))
    assert "total 0.50× (slower)" in lose
    assert "**invalid**" in lose and "7/320" in lose and "5.2" in lose
    assert "fastest valid gradient" not in lose.split("μ = 30")[1]


def test_figures_summary_is_code_and_dry_run_lists_commands(capsys):
    res = {"config": {"seed": 0}, "systems": {"1": {}}, "mode_agreement": {"c=1/cg": 0.0},
           "runs": {"c=1/cg": {"final_model_loss_mean": 1e-4, "imitation_loss": [[1.0]], "A_hat": [[0]]}},
           "figure": "runs/x.png"}
    s = figures.lqr_summary(res)
    assert "imitation_loss" not in s["runs"]["c=1/cg"]
    assert s["runs"]["c=1/cg"]["final_model_loss_mean"] == 1e-4
    assert figures.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"== {name}" in out for name in figures.FIGURES)
    for name, fig in figures.FIGURES.items():  # every committed docs/figures file has a producer
        assert set(fig.copies.values()) | set(fig.summaries), name
    produced = {v for f in figures.FIGURES.values() for v in [*f.copies.values(), *f.summaries]}
    committed = {p.name for p in figures.DOCS.iterdir() if p.is_file()}
    assert committed <= produced, committed - produced
