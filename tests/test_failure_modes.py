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
