"""The sweep engine (diffmpc.sweep): idempotent run directories, failures per run, interrupt and resume, on
Ray (when installed) and in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffmpc import sweep
from diffmpc.errors import BadArgumentError, RunDirError
from diffmpc.sweep import RUN_FILE, Task, config_hash, load_finished, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def toy_run(config: dict, ctx: sweep.RunContext) -> dict:
    """A run that logs a loss, writes a checkpoint, and can fail, block or be interrupted on request."""
    if "raise" in config:
        raise ValueError(f"boom: {config['raise']}")
    marker = config.get("interrupt_once")
    if marker and not Path(marker).exists():
        Path(marker).write_text("interrupted once")
        raise KeyboardInterrupt
    wait = config.get("wait_for")
    t0 = time.monotonic()
    while wait and not Path(wait).exists():
        if time.monotonic() - t0 > 120:
            raise TimeoutError(f"{wait} never appeared")
        time.sleep(0.05)
    x = float(config["x"])
    for step in range(3):
        sweep.report(step=step, loss=x**2 / (step + 1))
    (ctx.dir / "checkpoint.txt").write_text(str(x))
    print("stdout of the run goes to log.txt")
    return {"loss": x**2 / 3, "pid": os.getpid(), "name": ctx.name}


def total_loss(result: sweep.SweepResult) -> float:
    return sum(r["loss"] for r in result.finished.values())


def test_config_hash_is_canonical_and_checks_json():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 1.5})
    with pytest.raises(BadArgumentError, match="JSON"):
        config_hash({"a": object()})


def test_bad_tasks_are_refused(tmp_path):
    with pytest.raises(BadArgumentError, match="unique"):
        run_sweep([Task("a", {"x": 1}), Task("a", {"x": 2})], toy_run, tmp_path, progress=False)
    with pytest.raises(BadArgumentError, match="plain directory"):
        run_sweep([Task("../a", {"x": 1})], toy_run, tmp_path, progress=False)
    with pytest.raises(BadArgumentError, match="jobs"):
        run_sweep([Task("a", {"x": 1})], toy_run, tmp_path, jobs=0, progress=False)


def test_sequential_failure_is_reported_and_rerun_is_idempotent(tmp_path, capsys):
    tasks = [Task("a", {"x": 1.0}), Task("bad", {"x": 0.0, "raise": "on purpose"}), Task("b", {"x": 2.0})]
    res = run_sweep(tasks, toy_run, tmp_path, aggregate=total_loss, progress=False)
    assert res.backend == "sequential"
    assert sorted(res.finished) == ["a", "b"] and res.ran == ["a", "b"] and not res.skipped
    assert set(res.failed) == {"bad"} and "ValueError: boom: on purpose" in res.failed["bad"]
    assert "boom: on purpose" in (tmp_path / "bad" / "error.txt").read_text()
    assert "boom: on purpose" in capsys.readouterr().err  # reported when it happens
    assert res.aggregate == pytest.approx((1 + 4) / 3)
    rec = json.loads((tmp_path / "a" / RUN_FILE).read_text())
    assert rec["status"] == "finished" and rec["config_hash"] == config_hash({"x": 1.0})
    assert rec["results"]["pid"] == os.getpid()  # in-process
    assert "stdout of the run goes to log.txt" in (tmp_path / "a" / "log.txt").read_text()
    assert json.loads((tmp_path / "a" / "progress.json").read_text())["step"] == 2

    again = run_sweep(tasks, toy_run, tmp_path, aggregate=total_loss, progress=False)
    assert sorted(again.skipped) == ["a", "b"] and again.ran == [] and set(again.failed) == {"bad"}
    assert again.aggregate == res.aggregate
    assert load_finished(tmp_path, tasks) == {k: res.finished[k] for k in ("a", "b")}


def test_mismatching_or_foreign_run_directory_is_refused_before_running(tmp_path):
    run_sweep([Task("a", {"x": 1.0})], toy_run, tmp_path, progress=False)
    before = (tmp_path / "a" / RUN_FILE).read_text()
    with pytest.raises(RunDirError, match=r"another config \(x: 1.0 -> 2.0\)"):
        run_sweep([Task("new", {"x": 3.0}), Task("a", {"x": 2.0})], toy_run, tmp_path, progress=False)
    assert not (tmp_path / "new").exists()  # checked before anything ran
    assert (tmp_path / "a" / RUN_FILE).read_text() == before  # never mixed, never overwritten
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "weights.pt").write_text("not ours")
    with pytest.raises(RunDirError, match="no run.json"):
        run_sweep([Task("foreign", {"x": 1.0})], toy_run, tmp_path, progress=False)


def test_sequential_interrupt_keeps_finished_runs_and_resumes(tmp_path):
    marker = tmp_path / "interrupted"
    tasks = [Task("a", {"x": 1.0}), Task("b", {"x": 2.0, "interrupt_once": str(marker)}),
             Task("c", {"x": 3.0})]
    seen = {}
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tasks, toy_run, tmp_path / "out", aggregate=lambda r: seen.update(r.finished),
                  progress=False)
    assert sorted(seen) == ["a"]  # the aggregate was rebuilt from the finished run before re-raising
    assert json.loads((tmp_path / "out" / "b" / RUN_FILE).read_text())["status"] == "started"
    assert not (tmp_path / "out" / "c").exists()
    res = run_sweep(tasks, toy_run, tmp_path / "out", progress=False)
    assert res.skipped == ["a"] and res.ran == ["b", "c"] and not res.failed


def test_without_ray_jobs_fall_back_to_sequential_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "ray_available", lambda: False)
    res = run_sweep([Task("a", {"x": 1.0}), Task("b", {"x": 2.0})], toy_run, tmp_path, jobs=2, progress=False)
    err = capsys.readouterr().err
    assert "Ray is not installed" in err and "diffmpc[ray]" in err
    assert res.backend == "sequential" and sorted(res.finished) == ["a", "b"]
    with pytest.raises(BadArgumentError, match="needs Ray"):
        run_sweep([Task("c", {"x": 1.0})], toy_run, tmp_path, backend="ray", progress=False)


_DRIVER = """
import sys
from diffmpc.sweep import Task, run_sweep
from test_sweep import toy_run
tasks = [Task("ok", {"x": 1.0}), Task("bad", {"x": 0.0, "raise": "in a worker"}),
         Task("slow", {"x": 2.0, "wait_for": sys.argv[2]})]
try:
    run_sweep(tasks, toy_run, sys.argv[1], jobs=2, progress=False)
except KeyboardInterrupt:
    sys.exit(130)
"""


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            out = proc.communicate(timeout=30)[0] if proc.poll() is None else proc.stdout.read()
            raise AssertionError(f"sweep driver did not get there (rc {proc.poll()}):\n{out}")
        time.sleep(0.2)


def _status(path: Path) -> str | None:
    try:
        return json.loads((path / RUN_FILE).read_text()).get("status")
    except (OSError, ValueError):
        return None


def test_ray_sweep_failure_sigterm_cancel_and_resume(tmp_path):
    """Two Ray workers: a failing run is reported, SIGTERM cancels the blocked run and keeps the finished one;
    the rerun skips the finished run and reruns the rest."""
    pytest.importorskip("ray")
    out, go = tmp_path / "out", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(out), str(go)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _status(out / "ok") == "finished" and _status(out / "bad") == "failed"
                  and _status(out / "slow") == "started", 120, proc)
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, log
    assert "boom: in a worker" in log and "1 cancelled" in log
    ok = json.loads((out / "ok" / RUN_FILE).read_text())
    assert ok["status"] == "finished" and ok["results"]["pid"] != proc.pid  # ran in a Ray worker
    assert _status(out / "slow") == "started"  # cancelled: no finished record

    go.write_text("go")
    tasks = [Task("ok", {"x": 1.0}), Task("bad", {"x": 0.0, "raise": "in a worker"}),
             Task("slow", {"x": 2.0, "wait_for": str(go)})]
    res = run_sweep(tasks, toy_run, out, jobs=2, aggregate=total_loss, progress=False)
    assert res.backend == "ray"
    assert res.skipped == ["ok"] and res.ran == ["slow"] and set(res.failed) == {"bad"}
    assert "ValueError: boom: in a worker" in res.failed["bad"]
    assert res.finished["ok"] == ok["results"]  # the finished run was left intact
    assert res.finished["slow"]["pid"] != os.getpid()
    assert res.aggregate == pytest.approx((1 + 4) / 3)


def test_sweep_command_expands_seeds_and_grid():
    from diffmpc.sweep_command import expand

    tasks = expand(["lqr-imitation", "--iterations", "5"], [0, 1], ["lr=1e-2,3e-2", "inits=2"])
    assert [t.name for t in tasks] == ["seed=0,lr=1e-2,inits=2", "seed=0,lr=3e-2,inits=2",
                                       "seed=1,lr=1e-2,inits=2", "seed=1,lr=3e-2,inits=2"]
    assert tasks[1].config == {"argv": ["lqr-imitation", "--iterations", "5", "--seed", "0", "--lr", "3e-2",
                                        "--inits", "2"]}
    with pytest.raises(BadArgumentError, match="--out"):
        expand(["lqr-imitation", "--out", "x"], [0], [])
    with pytest.raises(BadArgumentError, match="OPTION=V1"):
        expand(["lqr-imitation"], None, ["lr"])


def test_sweep_command_runs_resumes_and_reports_a_failing_run(tmp_path, capsys):
    """`diffmpc sweep` over a real command: a bad option value fails its run only; the rerun resumes."""
    from diffmpc.cli import main

    argv = ["sweep", "--out", str(tmp_path), "--no-progress", "--grid", "lr=3e-2,oops", "--", "lqr-imitation",
            "--iterations", "5", "--inits", "2", "--damping", "1", "--modes", "lyapunov", "--no-progress"]
    assert main(argv) == 1  # one run failed
    err = capsys.readouterr().err
    assert "run lr=oops failed" in err
    assert "invalid float value: 'oops'" in (tmp_path / "lr=oops" / "log.txt").read_text()
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["finished"] == ["lr=3e-2"] and summary["total"] == 2
    key = "runs.c=1/lyapunov.final_imitation_loss_mean"
    direct = json.loads((tmp_path / "lr=3e-2" / "results.json").read_text())
    assert summary["runs"]["lr=3e-2"][key] == direct["runs"]["c=1/lyapunov"]["final_imitation_loss_mean"]
    assert main(argv) == 1
    assert "1 resumed" in capsys.readouterr().err


def test_table1_tiny_preset_on_two_ray_workers_then_resumed_in_process(tmp_path):
    """The issue's CI-sized check: `diffmpc table1 --preset tiny --runs 2 --jobs 2` runs its two runs as Ray
    tasks into the same run files the sequential command uses; a rerun without Ray trains nothing."""
    pytest.importorskip("ray")
    from experiments import table1

    first = table1.run("vdp", 2, tmp_path, preset="tiny", methods=["beuler_ift_cg"], jobs=2)
    row = first["table"]["beuler_ift_cg"]
    assert row["runs_finished"] == 2 and row["failed"] == 0
    cfg = table1.make_config("vdp", "tiny")
    records = sorted((cfg.run_dir(tmp_path) / "sweep").glob("*/run.json"))
    assert [json.loads(p.read_text())["status"] for p in records] == ["finished", "finished"]
    again = table1.run("vdp", 2, tmp_path, preset="tiny", methods=["beuler_ift_cg"])  # sequential: reads back
    assert again["table"] == first["table"]
