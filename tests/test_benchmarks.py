"""`make bench` (benchmarks/run_all.py) covers every benchmark, in one consistent mode."""

from pathlib import Path

from benchmarks import run_all

HELPERS = {"__init__", "common", "run_all"}


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
