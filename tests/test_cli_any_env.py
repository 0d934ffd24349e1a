"""The CLI on an env nobody here wrote (issue 15): `train ifo|bco --simulator module:function`,
`train ifo --cost-restarts K`, `render` of any env, and env ids read from files never importing code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from agents.task import Task, TaskError, import_simulator
from diffmpc.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SIM = "examples.pendulum_ifo:pendulum_step"
STEPS = 10  # expert episode length of the smoke dataset


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    """`--simulator examples.pendulum_ifo:...` is imported from the current directory, as `python -m`."""
    monkeypatch.chdir(ROOT)
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pendulum_data(tmp_path_factory) -> Path:
    """Pendulum-v1 expert states written by the Python API (`diffmpc dataset --expert` does the same from
    the command line, tested below): a short-horizon CEM MPCPolicy on the true dynamics, 2 episodes of 10
    steps."""
    from agents import MPCPolicy
    from agents.dataset import generate_dataset
    from examples.pendulum_ifo import pendulum_cost, pendulum_step

    path = tmp_path_factory.mktemp("pendulum") / "expert.npz"
    env = gym.make("Pendulum-v1", max_episode_steps=STEPS)
    expert = MPCPolicy(dynamics=pendulum_step, cost=pendulum_cost, horizon=10, env=env, refine=False,
                       sampler="cem", n_samples=32, cem_iterations=2, seed=0)
    generate_dataset(path, episodes=2, seed=0, expert=expert, env=env, progress=False)
    return path


def _train(what: str, data: Path, out: Path, *extra: str) -> int:
    return cli_main(["train", what, "--dataset", str(data), "--out", str(out), "--preset", "tiny",
                     "--no-progress", *extra])


@pytest.mark.parametrize("spec, message", [
    ("pendulum_step", "is not of the form module:function"),
    (":pendulum_step", "is not of the form module:function"),
    ("examples.pendulum_ifo:", "is not of the form module:function"),
    ("examples.no_such_module:f", "module 'examples.no_such_module' not found"),
    ("no_such_package_h15e.sim:f", "module 'no_such_package_h15e.sim' not found"),
    ("examples.pendulum_ifo:no_such_function", "module 'examples.pendulum_ifo' has no attribute "
                                                "'no_such_function'"),
    ("examples.pendulum_ifo:ENV_ID", "is a str, not a callable F(x, u) -> x'"),
])
def test_bad_simulator_specs_exit_2_with_one_line_naming_the_problem(pendulum_data, tmp_path, capsys, spec,
                                                                      message):
    for what in ("ifo", "bco"):
        assert _train(what, pendulum_data, tmp_path / what, "--circle-dims", "0,1", "--simulator", spec) == 2
        err = capsys.readouterr().err
        assert message in err and f"--simulator {spec!r}" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / what / f"{what}_checkpoint.pt").exists()


def test_import_simulator_uses_the_current_directory_and_reports_a_broken_dependency(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "h15e_user_sim.py").write_text("def step(x, u):\n    return x + u\n")
    (tmp_path / "h15e_broken_sim.py").write_text("import no_such_dependency_h15e\n")
    try:
        f = import_simulator("h15e_user_sim:step")  # found only through the current directory
        assert f(torch.ones(2, 1), torch.ones(2, 1)).tolist() == [[2.0], [2.0]]
        with pytest.raises(TaskError, match="importing 'h15e_broken_sim' failed: No module named "
                                            "'no_such_dependency_h15e'"):
            import_simulator("h15e_broken_sim:step")
    finally:
        for name in ("h15e_user_sim", "h15e_broken_sim"):
            sys.modules.pop(name, None)


def test_pendulum_from_the_cli_with_a_simulator_trains_resumes_only_alike_and_renders(pendulum_data, tmp_path,
                                                                                        capsys):
    """Stock Pendulum-v1 cannot be set to a state: without --simulator the CLI says which flag to pass; with
    it IfO (with --cost-restarts 2), BCO and BC train, the spec and K are recorded and part of the run's
    identity, and `render` writes the side-by-side video of the env the checkpoints name."""
    pytest.importorskip("pygame")  # Gymnasium's classic-control renderer (the dev extra installs it)
    from agents.ifo import load_ifo_checkpoint
    from diffmpc.io import load_checkpoint

    run = tmp_path / "run"
    ifo = ["--circle-dims", "0,1", "--cost-init", "expert_mean"]
    assert _train("ifo", pendulum_data, run / "ifo", *ifo) == 2
    err = capsys.readouterr().err
    assert "Pendulum-v1 cannot be set to a state" in err and "--simulator module:function" in err, err

    ifo += ["--set", "horizon=4", "circle_distance=geodesic"]  # any IfOConfig field, recorded
    assert _train("ifo", pendulum_data, run / "ifo", *ifo, "--simulator", SIM, "--cost-restarts", "2") == 0
    res = json.loads((run / "ifo" / "results.json").read_text())
    assert res["simulator"] == SIM and res["provenance"]["simulator"] == SIM
    assert res["config"]["cost_restarts"] == 2 and [r["restart"] for r in res["cost_restarts"]] == [0, 1]
    _, _, cfg, task = load_ifo_checkpoint(run / "ifo" / "ifo_checkpoint.pt")
    assert cfg.cost_restarts == 2 and cfg.cost_init == "expert_mean" and task.env_id == "Pendulum-v1"
    assert cfg.horizon == 4 and cfg.circle_distance == "geodesic"
    stored = load_checkpoint(run / "ifo" / "ifo_checkpoint.pt", {"kind": "ifo"})
    assert stored["provenance"]["simulator"] == SIM
    capsys.readouterr()
    # a resume with another K or another simulator is not this run: refused, naming what differs
    mine = tmp_path / "h15e_other_sim.py"
    mine.write_text(f"from {SIM.partition(':')[0]} import pendulum_step as step\n")
    for flags, needle in ((["--simulator", SIM, "--cost-restarts", "3"], "cost_restarts: 2 vs 3"),
                          (["--simulator", "h15e_other_sim:step", "--cost-restarts", "2"],
                           f"simulator: '{SIM}' vs 'h15e_other_sim:step'")):
        sys.path.insert(0, str(tmp_path))
        try:
            assert _train("ifo", pendulum_data, run / "ifo", *ifo, *flags, "--resume") == 1
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("h15e_other_sim", None)
        assert needle in capsys.readouterr().err

    assert _train("bco", pendulum_data, run / "bco", "--circle-dims", "0,1", "--simulator", SIM) == 0
    assert json.loads((run / "bco" / "results.json").read_text())["provenance"]["simulator"] == SIM
    assert _train("bc", pendulum_data, run / "bc", "--dynamics", str(run / "ifo")) == 0
    assert _train("bc", pendulum_data, run / "bc2", "--dynamics", str(run / "ifo"), "--simulator", SIM) == 2
    assert "train bc queries no simulator" in capsys.readouterr().err

    out = tmp_path / "render"
    render = ["render", "--run", str(run), "--out", str(out)]
    assert cli_main([*render, "--max-steps", "6", "--seed", "1000"]) == 0
    import imageio.v3 as iio

    for suffix in (".mp4", ".gif"):  # one frame per step plus the initial one, in both files
        assert sum(1 for _ in iio.imiter(out / f"side_by_side{suffix}")) == 7
    assert (out / "trajectories.png").stat().st_size > 0
    assert cli_main([*render, "--index", "3"]) == 2
    assert "on Pendulum-v1 the episode is chosen by --seed" in capsys.readouterr().err
    assert cli_main([*render, "--env", "MountainCarContinuous-v0"]) == 2
    assert "not the env the run was trained on (Pendulum-v1)" in capsys.readouterr().err


def test_cost_restarts_flag_is_validated_and_keys_table2_runs(tmp_path, capsys):
    from experiments.table2 import ifo_config, run_config

    data = ROOT / "data" / "expert_cartpole_rs.npz"
    for argv in (["train", "ifo", "--dataset", str(data), "--out", str(tmp_path / "a")],
                 ["table2", "--dataset", str(data), "--out", str(tmp_path / "b")],
                 ["demo", "--out", str(tmp_path / "c")]):
        assert cli_main([*argv, "--cost-restarts", "0"]) == 2
        assert "--cost-restarts must be an integer >= 1, got 0" in capsys.readouterr().err
    assert cli_main(["train", "bco", "--dataset", str(data), "--out", str(tmp_path / "d"), "--cost-restarts",
                     "2"]) == 2
    assert "--cost-restarts is an IfO setting" in capsys.readouterr().err
    assert not any(tmp_path.glob("*/*checkpoint.pt"))
    assert ifo_config("tiny", cost_restarts=3).cost_restarts == 3 and ifo_config("tiny").cost_restarts == 1
    plain, k3 = (run_config(0, data, tmp_path, "tiny", "low", k) for k in (None, 3))
    assert "cost_restarts" not in plain and k3 == dict(plain, cost_restarts=3)  # another run directory key


def test_env_ids_read_from_files_never_import_a_module(tmp_path, capsys):
    """Gymnasium's `module:EnvId` imports `module`; a dataset or checkpoint naming one is refused before
    anything is imported, and an unregistered id is named."""
    from agents.dataset import ExpertDataset, load_dataset, save_dataset

    evil = "h15e_never_imported_module"
    src = load_dataset(ROOT / "data" / "expert_cartpole_rs.npz")
    bad = tmp_path / "bad.npz"
    save_dataset(bad, ExpertDataset(src.states[:2], src.diagnostic_actions[:2], src.episode_costs[:2],
                                    dict(src.meta, env_id=f"{evil}:CartPole-v0")))
    assert _train("ifo", bad, tmp_path / "ifo") == 2
    err = capsys.readouterr().err
    assert f"records the env id '{evil}:CartPole-v0', which names a module to import" in err, err
    assert evil not in sys.modules
    with pytest.raises(TaskError, match="names a module to import"):
        Task.from_dict(dict(Task.from_env("Pendulum-v1").to_dict(), env_id=f"{evil}:Pendulum-v1"))

    unknown = tmp_path / "unknown.npz"
    save_dataset(unknown, ExpertDataset(src.states[:2], src.diagnostic_actions[:2], src.episode_costs[:2],
                                        dict(src.meta, env_id="NoSuchEnvH15e-v0")))
    assert _train("bco", unknown, tmp_path / "bco", "--angle-dims", "2") == 2
    assert "env 'NoSuchEnvH15e-v0' is not registered in this process" in capsys.readouterr().err


def test_render_names_an_unregistered_env_recorded_in_the_checkpoints(tmp_path, capsys):
    from agents.bc import BCOConfig, BCOTrainer

    task = Task(2, 1, (-1.0,), (1.0,), env_id="NoSuchEnvH15e-v0")  # e.g. registered by code not imported
    x = torch.randn(50, 2, dtype=torch.float64)
    BCOTrainer(x, 0.9 * x, lambda x, u: 0.9 * x + 0.1 * u, BCOConfig(queries=64, inverse_steps=2,
               policy_steps=2), seed=0, out=tmp_path / "run" / "bco", task=task).run(progress=False)
    assert cli_main(["render", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "r")]) == 2
    assert "env 'NoSuchEnvH15e-v0' is not registered in this process" in capsys.readouterr().err
    assert not list((tmp_path / "r").glob("*.mp4"))


def test_set_overrides_any_ifo_config_field_by_its_type_and_names_bad_items(tmp_path, capsys):
    """`train ifo --set KEY=VALUE ...`: values parsed by the field's type and validated like any IfOConfig;
    an unknown key, an unparsable value or an invalid setting exits 2 naming it, before any work."""
    from agents.ifo import IFO_PRESETS
    from experiments.table2 import ifo_config

    cfg = ifo_config("tiny", overrides=["horizon=20", "cost_lr=0.02", "hidden=8,8", "sampler=none",
                                        "circle-distance=geodesic"])
    assert (cfg.horizon, cfg.cost_lr, cfg.hidden, cfg.sampler, cfg.circle_distance) == (
        20, 0.02, (8, 8), None, "geodesic")
    assert ifo_config("tiny", overrides=[]) == IFO_PRESETS["tiny"]
    data = ROOT / "data" / "expert_cartpole_rs.npz"
    train = ["train", "ifo", "--dataset", str(data), "--out", str(tmp_path / "a"), "--preset", "tiny",
             "--set"]
    for item, needle in (("horizn=20", "expected KEY=VALUE with KEY one of the IfOConfig fields"),
                         ("horizon", "expected KEY=VALUE"),
                         ("horizon=2.5", "'2.5' is not a valid int for horizon"),
                         ("horizon=0", "must be >= 1"),
                         ("circle_distance=arc", "circle_distance must be one of")):
        assert cli_main([*train, item]) == 2
        assert needle in capsys.readouterr().err
    assert cli_main(["train", "bco", "--dataset", str(data), "--out", str(tmp_path / "b"), "--set",
                     "horizon=3"]) == 2
    assert "--set is an IfO setting" in capsys.readouterr().err
    assert not any(tmp_path.glob("*/*checkpoint.pt"))


def test_the_documented_cli_command_trains_the_pendulum_example_settings():
    """docs/own_env.md's `train ifo --set ...` line for Pendulum-v1 builds exactly the IfOConfig of
    examples/pendulum_ifo.py (measured: both give the same return, -164.94, for training seed 0)."""
    import runpy

    from experiments.table2 import ifo_config

    example = runpy.run_path(str(ROOT / "examples" / "pendulum_ifo.py"))
    doc = (ROOT / "docs" / "own_env.md").read_text()
    lines = doc.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("--set hidden=64,64"))
    command = lines[start].rstrip()
    while command.endswith("\\"):  # the shell continuation lines of the same command
        start += 1
        command = command[:-1] + " " + lines[start].split("#")[0].strip()
    items = command.split("--set", 1)[1].split()
    assert ifo_config("quick", cost_init="expert_mean", overrides=items) == \
        example["ifo_settings"](example["parse"]([]))


def small_pendulum_expert(env):
    """A cheap expert for the tests: the example's make_expert with a short horizon and few samples."""
    from examples.pendulum_ifo import make_expert

    return make_expert(env, horizon=5, n_samples=16)


def test_dataset_and_expert_take_your_expert_for_any_env(tmp_path, capsys):
    """`diffmpc dataset --env Pendulum-v1 --expert module:function` writes the same states as
    generate_dataset(expert=function(env)) from Python, records the spec (a resume with another expert is
    refused by the metadata check), and `expert --expert` evaluates it; a missing --expert names the flag,
    cart-pole planner flags beside --expert and a non-callable are refused (exit 2) before any work."""
    from agents.dataset import generate_dataset, load_dataset

    spec = "tests.test_cli_any_env:small_pendulum_expert"
    out = tmp_path / "cli"
    argv = ["dataset", "--env", "Pendulum-v1", "--expert", spec, "--episodes", "2", "--max-steps", "6",
            "--seed", "3", "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    data = load_dataset(out / "expert.npz", expect={"env_id": "Pendulum-v1", "episodes": 2})
    assert data.steps == 6 and data.meta["expert"]["spec"] == spec
    env = gym.make("Pendulum-v1")
    ref = generate_dataset(tmp_path / "py.npz", episodes=2, seed=3, expert=small_pendulum_expert(env),
                           env=env, max_steps=6, progress=False)
    assert (data.states == ref.states).all() and data.states.shape == (2, 7, 3)

    assert cli_main(["expert", "--env", "Pendulum-v1", "--expert", spec, "--episodes", "1", "--out",
                     str(tmp_path / "ev"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["expert"] == spec and len(res["episode_costs"]) == 1
    capsys.readouterr()
    for extra, needle in (([], "pass your expert: --expert module:function"),
                          (["--expert", spec, "--planner", "cem"], "--planner configure the built-in"),
                          (["--expert", "examples.pendulum_ifo:ENV_ID"],
                           "is a str, not a function env -> policy"),
                          (["--expert", "nocolon"], "is not of the form module:function")):
        assert cli_main(["dataset", "--env", "Pendulum-v1", "--out", str(tmp_path / "bad"), *extra]) == 2
        assert needle in capsys.readouterr().err
    assert not list((tmp_path / "bad").rglob("*.npz"))  # refused before any episode
