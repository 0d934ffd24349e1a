"""The ``diffmpc`` command: a dispatch table over every experiment module, and one way to fail (one line on
stderr; exit 2 for usage errors, 1 for runtime errors)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffmpc import cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_experiment_module_with_subcommands_is_in_the_dispatch_table():
    registering = set()
    for path in (ROOT / "experiments").glob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "register" for n in tree.body):
            registering.add(f"experiments.{path.stem}")
    assert registering | {"diffmpc.sweep_command"} == {job.__name__ for job in cli.JOBS}


def _run(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv, needle", [
    ([], "a COMMAND is required"),
    (["no-such-command"], "invalid choice"),
    (["kepler", "--steps", "x"], "invalid int value"),
    (["kepler", "--no-such-option"], "unrecognized arguments"),
    (["table1"], "the following arguments are required: --task"),
])
def test_usage_errors_exit_2_with_one_line(argv, needle, capsys):
    code, err = _run(argv, capsys)
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_bad_argument_from_a_job_exits_2(tmp_path, capsys):
    argv = ["train", "bc", "--dataset", "data/expert_cartpole_rs.npz", "--out", str(tmp_path)]
    code, err = _run(argv, capsys)
    assert code == 2 and "needs --dynamics" in err and len(err.splitlines()) == 1, err


def test_missing_file_exits_1_with_one_line(tmp_path, capsys):
    code, err = _run(["table1", "--task", "cmu", "--cmu-path", str(tmp_path / "none.mat"),
                      "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and err.startswith("diffmpc table1: error:") and len(err.splitlines()) == 1, err


def test_corrupt_file_exits_1(tmp_path, capsys):
    bad = tmp_path / "mocap35.mat"
    bad.write_bytes(b"not a mat file")
    argv = ["table1", "--task", "cmu", "--cmu-path", str(bad), "--out", str(tmp_path / "out")]
    code, err = _run(argv, capsys)
    assert code == 1 and "sha256" in err and len(err.splitlines()) == 1, err


def test_python_dash_m_diffmpc_is_the_same_command():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "diffmpc", "kepler", "--steps", "x"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    run = subprocess.run([sys.executable, "-m", "diffmpc", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0 and all(c in run.stdout for c in ("kepler", "table1", "table2", "demo"))
