"""Failure modes (issue 14): every bad input gets a typed error whose message names the offending input.

One case per input class; each asserts the exception type and that the message names what was wrong. The table
in docs/failure_modes.md lists the same classes with what the user gets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from diffmpc.errors import BadArgumentError, BadFileError, ConvergenceError, DiffmpcError, RunDirError
from diffmpc.io import (
    CheckpointError,
    Terminated,
    load_checkpoint,
    refuse_overwrite,
    run_lock,
    save_checkpoint,
    sigterm_as_interrupt,
    write_results,
)


# ------------------------------------------------------------------------------------------------ families
def test_error_families_keep_builtin_bases():
    # existing `pytest.raises(ValueError)` / `except RuntimeError` keep working
    assert issubclass(BadArgumentError, ValueError) and issubclass(BadFileError, ValueError)
    assert issubclass(ConvergenceError, RuntimeError) and issubclass(RunDirError, RuntimeError)
    for cls in (BadArgumentError, BadFileError, ConvergenceError, RunDirError, CheckpointError):
        assert issubclass(cls, DiffmpcError)
    import diffmpc
    from agents.dataset import DatasetError
    from agents.training import CheckpointError as TrainingCheckpointError

    assert diffmpc.ConvergenceError is ConvergenceError  # one class, re-exported
    assert issubclass(DatasetError, BadFileError) and TrainingCheckpointError is CheckpointError


# ------------------------------------------------------------------------------------------------ checkpoints
class _Payload:
    """Unpickling this runs ``os.system('touch MARKER')``: what an attacker would plant in a .pt file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "ifo_checkpoint.pt"
    torch.save({"kind": "ifo", "config": {}, "payload": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="not a safe checkpoint") as err:
        load_checkpoint(evil)
    assert str(evil) in str(err.value)
    assert not marker.exists(), "loading the checkpoint executed its payload"


def test_malicious_checkpoint_through_the_agents_loaders_runs_nothing(tmp_path):
    from agents.bc import load_bc_policy
    from agents.ifo import load_ifo_models

    marker = tmp_path / "pwned"
    for name, loader in (("ifo_checkpoint.pt", load_ifo_models), ("bc_checkpoint.pt", load_bc_policy)):
        torch.save({"kind": name[:-14], "payload": _Payload(marker)}, tmp_path / name)
        with pytest.raises(BadFileError, match=name):
            loader(tmp_path / name)
    assert not marker.exists()


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="junk.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_checkpoint_of_wrong_structure(tmp_path):
    save_checkpoint(tmp_path / "list.pt", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt")
    save_checkpoint(tmp_path / "c.pt", {"iteration": "3", "weights": torch.zeros(2, 5)})
    with pytest.raises(CheckpointError, match="lacks the entry 'seed'"):
        load_checkpoint(tmp_path / "c.pt", schema={"seed": int})
    with pytest.raises(CheckpointError, match="'iteration' should be int"):
        load_checkpoint(tmp_path / "c.pt", schema={"iteration": int})
    with pytest.raises(CheckpointError, match=r"'weights' has shape \(2, 5\), expected \('\*', 4\)"):
        load_checkpoint(tmp_path / "c.pt", schema={"weights": (None, 4)})


def test_checkpoint_of_other_settings_names_the_difference(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"config": {"lr": 0.1, "steps": 5}})
    with pytest.raises(CheckpointError, match=r"differs in lr: 0.1 vs 0.2"):
        load_checkpoint(tmp_path / "c.pt", expect={"config": {"lr": 0.2, "steps": 5}})


def test_saving_a_non_plain_checkpoint_is_refused(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"state\['rng'\] \(ndarray\)"):
        save_checkpoint(tmp_path / "c.pt", {"rng": np.zeros(3)})
    assert not (tmp_path / "c.pt").exists()


# ------------------------------------------------------------------------------------------------ run dirs
def test_second_writer_is_refused(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from diffmpc.io import run_lock
        with run_lock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert proc.stdout.readline().strip() == "locked"
        want = rf"{tmp_path} is in use by another diffmpc run \(pid {proc.pid}\)"
        with pytest.raises(RunDirError, match=want):
            with run_lock(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
    with run_lock(tmp_path), run_lock(tmp_path):  # released when the holder died; re-entrant in one process
        pass


def test_out_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        with run_lock(blocker):
            pass
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(RunDirError, match="is not writable"):
            with run_lock(ro / "sub"):
                pass


def test_fresh_run_over_a_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "ifo_checkpoint.pt"
    save_checkpoint(ckpt, {"kind": "ifo"})
    with pytest.raises(RunDirError, match="already holds a checkpoint; pass --resume .* or --overwrite"):
        refuse_overwrite(ckpt, resume=False, overwrite=False)
    refuse_overwrite(ckpt, resume=True, overwrite=False)
    refuse_overwrite(ckpt, resume=False, overwrite=True)


def test_sigterm_becomes_keyboard_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as err:
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    assert isinstance(err.value, KeyboardInterrupt) and err.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_write_results_is_atomic(tmp_path, monkeypatch):
    write_results(tmp_path, {"a": 1})
    import json

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        write_results(tmp_path, {"a": 2})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp file left


# ------------------------------------------------------------------------------------------- interrupted jobs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = os.path.join(ROOT, "data", "expert_cartpole_rs.npz")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible small runs
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pairs():
    from agents.dataset import load_dataset

    x, xn = load_dataset(DATASET).transitions()
    return x[:600], xn[:600]


def _interrupt(obj, method, at, how):
    """Make the ``at``-th call of ``obj.method`` be interrupted by Ctrl-C or by a real SIGTERM."""
    original, calls = getattr(obj, method), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**7):  # the Python-level handler runs at the next bytecode boundary
                pass
            raise AssertionError("SIGTERM was not delivered")
        return original(*args, **kwargs)

    setattr(obj, method, wrapper)


def _weights(*modules):
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


def _assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
@pytest.mark.parametrize("phase", ["ifo-warmup", "ifo-iteration", "bc"])
def test_interrupt_then_resume_is_bit_exact(pairs, tmp_path, one_thread, how, phase):
    from dataclasses import replace

    from agents.bc import BC_PRESETS, BCTrainer
    from agents.ifo import IFO_PRESETS, IfOTrainer

    x, xn = pairs
    cfg = replace(IFO_PRESETS["tiny"], iterations=4, warmup_steps=60, checkpoint_every=100)
    bcfg = replace(BC_PRESETS["tiny"], steps=30, checkpoint_every=100)
    prov = {"dataset_sha256": "d" * 64}
    if phase.startswith("ifo"):
        full = IfOTrainer(x, xn, cfg, seed=2)
        full.run(progress=False)
        part = IfOTrainer(x, xn, cfg, seed=2, out=tmp_path, provenance=prov)
        if phase == "ifo-warmup":
            _interrupt(part, "dynamics_steps", 25, how)  # mid warm-up
        else:
            _interrupt(part, "cost_step", 3, how)  # third cost iteration
        with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
            part.run(progress=False)
        state = load_checkpoint(tmp_path / "ifo_checkpoint.pt", {"kind": "ifo"})
        assert state["warmed_up"] == (phase == "ifo-iteration")
        assert state["iteration"] == (2 if phase == "ifo-iteration" else 0)
        resumed = IfOTrainer(x, xn, cfg, seed=2, out=tmp_path, provenance=prov)
        resumed.run(progress=False, resume=True)
        _assert_bitwise(_weights(full.dynamics, full.cost), _weights(resumed.dynamics, resumed.cost))
        assert resumed.history == full.history and resumed.dyn_history == full.dyn_history
    else:
        base = IfOTrainer(x, xn, replace(cfg, iterations=1), seed=0)
        base.warmup()
        full = BCTrainer(x, xn, base.dynamics, bcfg, seed=1)
        full.run(progress=False)
        part = BCTrainer(x, xn, base.dynamics, bcfg, seed=1, out=tmp_path, provenance=prov)
        _interrupt(part.opt, "step", 17, how)
        with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
            part.run(progress=False)
        assert load_checkpoint(tmp_path / "bc_checkpoint.pt")["step"] == 16
        resumed = BCTrainer(x, xn, base.dynamics, bcfg, seed=1, out=tmp_path, provenance=prov)
        resumed.run(progress=False, resume=True)
        _assert_bitwise(_weights(full.policy), _weights(resumed.policy))
        assert resumed.history == full.history


def test_cli_sigterm_saves_exits_nonzero_and_resumes_bit_exact(tmp_path, one_thread, monkeypatch, capsys):
    from agents.ifo import IfOTrainer
    from diffmpc.cli import main

    out = tmp_path / "ifo"
    args = ["train", "ifo", "--dataset", DATASET, "--out", str(out), "--preset", "tiny", "--no-progress"]
    original, calls = IfOTrainer.cost_step, [0]

    def cost_step(self):
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**7):
                pass
        return original(self)

    monkeypatch.setattr(IfOTrainer, "cost_step", cost_step)
    assert main(args) == 128 + signal.SIGTERM
    assert "terminated" in capsys.readouterr().err
    assert load_checkpoint(out / "ifo_checkpoint.pt")["iteration"] == 3
    monkeypatch.setattr(IfOTrainer, "cost_step", original)
    # a fresh `train` into that directory would lose the work: refused without --resume / --overwrite
    assert main(args) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert main([*args[:5], str(tmp_path / "ref"), *args[6:]]) == 0
    a = load_checkpoint(out / "ifo_checkpoint.pt")
    b = load_checkpoint(tmp_path / "ref" / "ifo_checkpoint.pt")
    _assert_bitwise([*a["dynamics"].values(), *a["cost"].values()],
                    [*b["dynamics"].values(), *b["cost"].values()])
    assert a["history"] == b["history"]


def test_resume_on_another_dataset_or_dynamics_is_refused(tmp_path, one_thread, monkeypatch):
    import shutil

    from experiments import table2

    other = tmp_path / "other.npz"
    shutil.copy(DATASET, other)
    with open(other, "ab") as fh:  # same arrays, different bytes: another file identity
        fh.write(b"\0")
    from dataclasses import replace

    from agents.bc import BC_PRESETS
    from agents.ifo import IFO_PRESETS

    monkeypatch.setitem(IFO_PRESETS, "tiny", replace(IFO_PRESETS["tiny"], iterations=1, warmup_steps=5))
    monkeypatch.setitem(BC_PRESETS, "tiny", replace(BC_PRESETS["tiny"], steps=2))
    table2.train_ifo(DATASET, tmp_path / "ifo", "tiny", progress=False)
    with pytest.raises(CheckpointError, match=r"differs in dataset_sha256"):
        table2.train_ifo(other, tmp_path / "ifo", "tiny", progress=False)
    table2.train_ifo(DATASET, tmp_path / "ifo2", "tiny", seed=5, progress=False)
    table2.train_bc(DATASET, tmp_path / "bc", tmp_path / "ifo", "tiny", progress=False)
    with pytest.raises(CheckpointError, match=r"differs in dynamics_sha256"):
        table2.train_bc(DATASET, tmp_path / "bc", tmp_path / "ifo2", "tiny", progress=False)
    with pytest.raises(CheckpointError, match=r"differs in dataset_sha256"):
        table2.train_bc(other, tmp_path / "bc", tmp_path / "ifo", "tiny", progress=False)


# ------------------------------------------------------------------------------------------------ dare
def _lqr_problem():
    A = torch.tensor([[1.1, 0.2], [0.0, 0.9]], dtype=torch.float64)
    B = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    return A, B, torch.eye(2, dtype=torch.float64), torch.eye(1, dtype=torch.float64)


@pytest.mark.parametrize("case, err, match", [
    # SDA hits a singular matrix; scipy returns an S with a 36 % Riccati residual: refused, cause named
    ("Q=-I", "NoStabilizingSolutionError", r"Q is indefinite \(smallest eigenvalue -1\)"),
    ("B*1e-300", "IllConditionedError", r"‖B‖ = 1e-300"),  # stabilizable, but not in float64
    ("B=0", "NotStabilizableError", r"not stabilizable"),
    ("A*1e200", "IllConditionedError", r"‖A‖ = 1.\d+e\+200"),
    ("A*1e30", "IllConditionedError", r"‖A‖ = 1.\d+e\+30"),  # used to return a wrong S
    ("A*1e8", "IllConditionedError", r"rescale the states"),  # used to blame (Q, A) observability
    ("Q=0 on the unit circle", "NoStabilizingSolutionError", r"unobservable mode on the unit circle"),
])
def test_dare_failures_map_to_the_right_lqr_error(case, err, match):
    import diffmpc.lqr as lqr

    A, B, Q, R = _lqr_problem()
    if case == "Q=-I":
        Q = -Q
    elif case == "B*1e-300":
        B = B * 1e-300
    elif case == "B=0":
        B = B * 0
    elif case.startswith("A*"):
        A = A * float(case[2:])
    else:
        A = B = R = torch.ones(1, 1, dtype=torch.float64)  # scipy silently returns S = 0 here
        Q = torch.zeros(1, 1, dtype=torch.float64)
    with pytest.raises(getattr(lqr, err), match=match):
        lqr.dare(A, B, Q, R)
    assert issubclass(getattr(lqr, err), lqr.LQRError)


# -------------------------------------------------------------------------------------------- implicit layers
F64 = torch.float64


def _quadratic(y, x):
    return ((y - x) ** 2).sum(-1)


@pytest.mark.parametrize("kwargs, match", [
    ({"damping": -1.0}, r"damping must be >= 0, got -1.0"),
    ({"tol": float("nan")}, r"tol must be a finite number, got nan"),
    ({"tol": -1e-9}, r"tol must be > 0.0, got -1e-09"),
    ({"backward_tol": 0.0}, r"backward_tol must be > 0.0"),
    ({"backward_max_iter": -1}, r"backward_max_iter must be an integer >= 1, got -1"),
])
@pytest.mark.parametrize("layer", ["argmin", "root"])
def test_implicit_layer_options_are_validated(layer, kwargs, match):
    import diffmpc

    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    with pytest.raises(BadArgumentError, match=match):
        if layer == "argmin":
            diffmpc.argmin(_quadratic, torch.zeros(2, dtype=F64), x, **kwargs)
        else:
            diffmpc.root(lambda y, x: y - x, torch.zeros(2, dtype=F64), x, **kwargs)


def test_solver_configs_are_validated():
    from diffmpc import solvers

    with pytest.raises(BadArgumentError, match=r"NewtonCG.max_iter must be an integer >= 1, got -1"):
        solvers.NewtonCG(max_iter=-1)
    with pytest.raises(BadArgumentError, match=r"NewtonKrylov.tol must be a finite number, got nan"):
        solvers.NewtonRoot(tol=float("nan"))
    with pytest.raises(BadArgumentError, match=r"GradientDescent.lr must be > 0"):
        solvers.GradientDescent(lr=0.0)


def test_linear_objective_has_no_hessian():
    import diffmpc

    x = torch.tensor([1.0, 2.0], dtype=F64)
    with pytest.raises(BadArgumentError, match="f has no curvature in y"):
        diffmpc.argmin(lambda y, x: (y * x).sum(), torch.zeros(2, dtype=F64), x)


@pytest.mark.parametrize("answer", [torch.zeros(3, dtype=F64), torch.zeros(3, 2, dtype=F64)])
def test_black_box_solver_returning_the_wrong_shape(answer):
    import diffmpc

    y0 = torch.zeros(2, 3, dtype=F64)  # a (3, 2) answer has as many elements: it used to be reshaped silently
    import re

    want = re.escape(f"black-box solver returned shape {tuple(answer.shape)}")
    with pytest.raises(BadArgumentError, match=want):
        diffmpc.argmin(lambda y: (y**2).sum(), y0, solver=lambda fun, y: answer)
    with pytest.raises(BadArgumentError, match=r"must return y shaped like y0 \(2, 3\)"):
        diffmpc.root(lambda y: y, y0, solver=lambda fun, y: answer)


def test_empty_batch_gives_empty_results_with_working_backward():
    import diffmpc

    x = torch.zeros(0, 3, dtype=F64, requires_grad=True)
    y = diffmpc.argmin(_quadratic, torch.zeros(0, 3, dtype=F64), x)
    assert y.shape == (0, 3)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == (0, 3)
    y = diffmpc.root(lambda y, x: y - x, torch.zeros(0, 3, dtype=F64), x, batched=True)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert y.shape == g.shape == (0, 3)
    W = torch.eye(3, dtype=F64, requires_grad=True)
    y0 = torch.zeros(0, 3, dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=F64)
    ys = diffmpc.odeint(lambda t, y: y @ W, y0, t, params=[W])
    gy0, gW = torch.autograd.grad(ys.sum(), [y0, W])
    assert ys.shape == (4, 0, 3) and gy0.shape == (0, 3) and gW.shape == (3, 3) and not gW.any()


def test_odeint_vector_field_of_the_wrong_shape():
    import diffmpc

    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(BadArgumentError, match=r"func\(t, y\) returned \(1, 2\) for y of shape \(2,\)"):
        diffmpc.odeint(lambda t, y: y.reshape(1, 2), torch.ones(2, dtype=F64), t)  # used to broadcast


def test_odeint_tiny_step_size_is_refused_before_allocating():
    import diffmpc

    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(BadArgumentError, match=r"options\['step_size'\]=1e-12 needs 1e\+12 steps"):
        diffmpc.odeint(lambda t, y: -y, torch.ones(2, dtype=F64), t, options={"step_size": 1e-12})
    with pytest.raises(BadArgumentError, match=r"damping must be >= 0"):
        diffmpc.odeint(lambda t, y: -y, torch.ones(2, dtype=F64), t, options={"damping": -0.5})


# ------------------------------------------------------------------------------------------------ envs
@pytest.mark.parametrize("env_id, kwargs, match", [
    ("diffmpc/CartPoleSwingUp-v0", {"start_mean": [float("nan"), 0, 0, 0]}, "start_mean must be 4 finite"),
    ("diffmpc/CartPoleSwingUp-v0", {"start_variance": float("inf")}, "start_variance must be finite"),
    ("diffmpc/MassSpringDamper-v0", {"damping": float("nan")}, "damping must be finite, got nan"),
    ("diffmpc/MassSpringDamper-v0", {"stiffness": float("inf")}, "stiffness must be finite, got inf"),
    ("diffmpc/MassSpringDamper-v0", {"mass": 0.0}, "mass must be positive"),
])
def test_env_constructor_arguments(env_id, kwargs, match):
    import gymnasium as gym

    import envs  # noqa: F401 - registers the ids

    with pytest.raises(ValueError, match=match):
        gym.make(env_id, **kwargs)


def test_env_reset_state_and_diverging_step():
    import gymnasium as gym
    import numpy as np

    import envs  # noqa: F401

    env = gym.make("diffmpc/CartPoleSwingUp-v0")
    with pytest.raises(ValueError, match=r"options\['state'\] must be 4 finite numbers .* float32"):
        env.reset(options={"state": [0.0, 1e200, 0.0, 0.0]})  # its float32 observation would be inf
    env.reset(options={"state": [0.0, 0.0, 0.0, 1e30]})
    with pytest.raises(ValueError, match="the cart-pole state diverged: a step from"):
        for _ in range(3):  # used to return NaN observations forever
            env.step(np.array([0.0]))
    msd = gym.make("diffmpc/MassSpringDamper-v0", damping=-1e18)
    msd.reset()
    with pytest.raises(ValueError, match="state diverged: a step from"):
        for _ in range(10):
            msd.step(np.array([0.0]))


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("argv, match", [
    (["kepler", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["kepler", "--init-e", "0"], "--init-e must be > 0.0, got 0.0"),
    (["table2", "--runs", "0"], "--runs must be an integer >= 1, got 0"),
    (["lqr-imitation", "--damping", "nan"], "--damping must be a finite number, got nan"),
    (["render", "--run", "RUN", "--index", "99"], r"--index 99 is out of range: there are 50 test starts"),
    (["render", "--run", "RUN"], r"holds none of ifo/, bc/, bco/"),
    (["expert", "--episodes", "0"], "--episodes must be an integer >= 1, got 0"),
    (["expert", "--env", "diffmpc/MassSpringDamper-v0"], "cannot plan for it"),
    (["dataset", "--episodes", "0"], "--episodes must be an integer >= 1, got 0"),
    (["evaluate", "--policy", "expert", "--out", "/dev/null/x"], r"--out /dev/null/x is not writable"),
])
def test_cli_rejects_bad_numbers_before_work_with_one_line(tmp_path, capsys, argv, match):
    import re

    from diffmpc.cli import main

    argv = [a.replace("RUN", str(tmp_path / "no-run")) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code in (1, 2)
    assert re.search(match, err), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_mpc_and_mpc_policy_empty_batch():
    import numpy as np

    from agents.expert import sampling_expert
    from agents.mpc_policy import MPCPolicy
    from diffmpc.mpc import MPC

    W = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def dyn(x, u):
        return x + 0.1 * W * torch.cat([x[..., 1:2], u], -1)

    def cost(x, u):
        return (x**2).sum(-1) + 0.1 * (u**2).sum(-1)

    x = torch.zeros(0, 2, dtype=F64, requires_grad=True)
    u, info = MPC(dyn, cost, 5, -1.0, 1.0, action_dim=1, params=[W])(x)
    gx, gW = torch.autograd.grad(u.sum(), [x, W])
    assert u.shape == (0, 5, 1) and gx.shape == (0, 2) and gW.shape == () and info.converged_fraction == 1.0
    pol = MPCPolicy(dynamics=dyn, cost=cost, horizon=4, u_low=-1.0, u_high=1.0, dtype=F64, action_dim=1)
    assert pol.act(np.zeros((0, 2))).shape == (0, 1)
    assert sampling_expert().act(np.zeros((0, 4))).shape == (0, 1)


# ------------------------------------------------------------------------------------------------ datasets
def test_dataset_with_nan_states_is_refused_even_with_a_matching_hash(tmp_path):
    from dataclasses import replace

    from agents.dataset import DatasetError, load_dataset, save_dataset

    data = load_dataset(DATASET)
    states = data.states.copy()
    states[3, 7, 1] = float("nan")
    path = save_dataset(tmp_path / "nan.npz", replace(data, states=states))  # the stored SHA-256 matches
    want = r"nan.npz: the states contain NaN or inf \(first at episode 3, step 7\)"
    with pytest.raises(DatasetError, match=want):
        load_dataset(path)


def test_dataset_resume_with_other_episodes_is_refused(tmp_path, monkeypatch):
    from agents import dataset as ds
    from agents.dataset import DatasetError, generate_dataset, load_dataset

    target = tmp_path / "d.npz"
    calls = [0]
    original = ds.run_episode

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    # a cheap expert on the mass-spring-damper: zero control
    kwargs = dict(env_id="diffmpc/MassSpringDamper-v0", expert=lambda obs: [0.0], progress=False, max_steps=5)
    monkeypatch.setattr(ds, "run_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(target, episodes=8, **kwargs)
    monkeypatch.setattr(ds, "run_episode", original)
    with pytest.raises(DatasetError, match=r"interrupted run of 8 episodes \(2 done\), not episodes=2"):
        generate_dataset(target, episodes=2, **kwargs)  # used to write the 2 done (or 7) episodes
    assert generate_dataset(target, episodes=8, **kwargs).episodes == 8  # same settings: resumes
    assert load_dataset(target).episodes == 8


@pytest.mark.parametrize("cls, kwargs, match", [
    ("agents.ifo:IfOConfig", {"cost_lr": 0.0}, r"IfOConfig.cost_lr must be > 0.0, got 0.0"),
    ("agents.ifo:IfOConfig", {"sampler": "ilqr"}, r"IfOConfig.sampler must be one of"),
    ("agents.bc:BCConfig", {"lr": float("nan")}, r"BCConfig.lr must be a finite number"),
    ("agents.bc:BCConfig", {"steps": 0}, r"BCConfig.steps must be an integer >= 1, got 0"),
    ("agents.expert:ExpertConfig", {"dt": 0.0}, r"ExpertConfig.dt must be > 0.0"),
    ("agents.expert:ExpertConfig", {"cem_init_std": -1.0}, r"ExpertConfig.cem_init_std must be > 0.0"),
])
def test_agent_configs_validate_every_field(cls, kwargs, match):
    import importlib

    module, name = cls.split(":")
    with pytest.raises(BadArgumentError, match=match):
        getattr(importlib.import_module(module), name)(**kwargs)
