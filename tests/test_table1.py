"""Table 1 (neural ODEs): data, the CMU metric and its calibration, presets, keyed caches and checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffmpc.io import CheckpointError
from experiments import table1
from experiments.ode_data import CMU_DEFAULT_PATH, load_cmu, make_task
from experiments.table1 import PRESETS, StopRequest, make_config, run, run_one, train_cmu, train_series

D64 = torch.float64
TINY = PRESETS["tiny"]


def _real_cmu() -> dict:
    if not CMU_DEFAULT_PATH.is_file():
        pytest.skip(f"CMU walking data not available at {CMU_DEFAULT_PATH} (set DIFFMPC_CMU_PATH)")
    return load_cmu()


# --- data ---------------------------------------------------------------------------------------------------
def test_generated_series_follow_the_footnotes():
    from scipy.integrate import solve_ivp

    from experiments.ode_data import SPIRAL_A

    vdp = make_task("vdp")
    assert vdp.x.shape == (320, 2) and (vdp.n_train, vdp.n_val, vdp.n_test) == (107, 106, 107)
    assert abs(vdp.dt - 0.1) < 1e-12 and abs(vdp.x[:, 0]).max() < 2.1  # on the μ=3 limit cycle
    ref = solve_ivp(lambda _, s: [s[1], 3 * (1 - s[0] ** 2) * s[1] - s[0]], (0, 5.0), [2.0, 0.0],
                    method="DOP853", rtol=1e-11, atol=1e-12).y[:, -1]
    assert abs(vdp.x[50] - ref).max() < 1e-6
    sp = make_task("spiral")
    assert sp.x.shape == (300, 2) and (sp.n_train, sp.n_val, sp.n_test) == (100, 50, 150)
    ref = solve_ivp(lambda _, s: (s**3) @ SPIRAL_A, (0, 10.0), [2.0, 0.0], method="DOP853", rtol=1e-11,
                    atol=1e-12).y[:, -1]
    assert abs(sp.x[100] - ref).max() < 1e-6


def _fake_mat(path, n=(3, 2, 2), frames=12, feat=5, drop=None):
    from scipy.io import savemat

    rng = torch.Generator().manual_seed(0)
    arrays = {k: torch.randn(m, frames, feat, generator=rng, dtype=D64).numpy()
              for k, m in zip(("Xtr", "Xval", "Xtest"), n, strict=True)}
    if drop:
        arrays.pop(drop)
    savemat(str(path), arrays)
    return path


def test_cmu_loader_checks_sha_keys_and_presence(tmp_path):


    path = _fake_mat(tmp_path / "fake.mat")
    data = load_cmu(path, sha256=None)
    assert data["Xtr"].shape == (3, 12, 5) and data["Xtest"].shape == (2, 12, 5)
    with pytest.raises(ValueError, match="sha256"):
        load_cmu(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_cmu(tmp_path / "absent.mat")
    with pytest.raises(ValueError, match="Xval"):
        load_cmu(_fake_mat(tmp_path / "bad.mat", drop="Xval"), sha256=None)


def test_real_cmu_file_if_present():
    data = _real_cmu()
    assert [data[k].shape for k in ("Xtr", "Xval", "Xtest")] == [(16, 300, 50), (3, 300, 50), (4, 300, 50)]


# --- the CMU metric, its units and the calibration baselines -----------------------------------------------
def test_cmu_metric_pins_units_zeros_give_33_67():
    """Raw units (degrees, unscaled), frames 3–299: zeros (the mean frame) on the test walks give 33.67."""
    data = _real_cmu()
    walks = torch.tensor(data["Xtest"], dtype=torch.float32)
    zeros = torch.zeros_like(walks)
    assert float(table1.cmu_extrapolation_mse(zeros, walks, 3)) == pytest.approx(33.67, abs=0.01)
    # The model works on data / scale; the metric scales back: the same number from scaled inputs.
    s = float(data["Xtr"].std())
    assert float(table1.cmu_extrapolation_mse(zeros, walks / s, 3, s)) == pytest.approx(33.67, abs=0.01)
    # ODE²VAE's script averages all 300 frames: under 1 % apart.
    all_frames = float(table1.cmu_extrapolation_mse(zeros, walks, 0))
    assert abs(all_frames / 33.67 - 1) < 0.01
    # The calibration: hold the last observed frame 61.3, copy the nearest training walk 23.1.
    base = table1.cmu_baselines(data)
    assert base["mean frame (zeros)"] == pytest.approx(33.67, abs=0.01)
    assert base["hold last observed frame"] == pytest.approx(61.3, abs=0.05)
    assert base["nearest training walk"] == pytest.approx(23.1, abs=0.05)


def test_cmu_baselines_on_a_synthetic_set():
    """The three baselines computed by hand on a small set where each one's answer is known."""
    rng = torch.Generator().manual_seed(3)
    tr = torch.randn(4, 10, 2, generator=rng, dtype=D64)
    te = tr[[2, 0]].clone()
    te[:, 3:] += 1.0  # test walks = training walks 2 and 0 shifted by one after frame 3
    base = table1.cmu_baselines({"Xtr": tr.numpy(), "Xtest": te.numpy()})
    assert base["nearest training walk"] == pytest.approx(1.0)  # (te − tr)² = 1 on frames 3..9
    assert base["mean frame (zeros)"] == pytest.approx(float(te[:, 3:].pow(2).mean()))
    assert base["hold last observed frame"] == pytest.approx(float((te[:, 3:] - te[:, 2:3]).pow(2).mean()))


# --- presets ------------------------------------------------------------------------------------------------
def test_presets_say_what_they_are():
    cmu = PRESETS["table1"]["cmu"]  # issue 17: 200-frame random windows, batch 16, 3e-3 → 3e-4, 600 it.
    assert (cmu.window, cmu.batch, cmu.lr, cmu.lr_final, cmu.iters, cmu.eval_every) == (200, 16, 3e-3, 3e-4,
                                                                                          600, 50)
    assert 1500 <= PRESETS["table1"]["vdp"].iters <= 2000
    with pytest.warns(DeprecationWarning, match="table1"):
        name, p = table1.resolve_preset("paper", "vdp")
    assert name == "table1" and p == PRESETS["table1"]["vdp"]
    with pytest.raises(ValueError, match="unknown preset"):
        table1.resolve_preset("fast", "vdp")
    with pytest.raises(ValueError, match="positive"):
        replace(TINY["vdp"], lr=float("nan"))


# --- training, checkpoints, resume --------------------------------------------------------------------------
def test_training_checkpoint_resumes(tmp_path):
    p = replace(TINY["spiral"], iters=2)
    ck = tmp_path / "run.ckpt"
    first = train_series(make_task("spiral"), "beuler_ift_cg", 0, p, ck)
    assert ck.is_file() and first["iters"] == 2 and len(first["history"]) == 2
    more = train_series(make_task("spiral"), "beuler_ift_cg", 0, replace(p, iters=3), ck)
    assert more["iters"] == 3 and [h["iter"] for h in more["history"]] == [1, 2, 3]
    assert more["history"][:2] == first["history"]


def test_stop_request_saves_and_resume_is_bit_exact(tmp_path):
    """Ctrl-C / SIGTERM (a StopRequest) saves after the current iteration; the resumed run equals an
    uninterrupted one bit for bit."""
    p = replace(TINY["vdp"], iters=4, ckpt_every=100)
    whole = train_series(make_task("vdp"), "beuler_ift_cg", 5, p)
    stop = StopRequest()
    stop.requested = "SIGTERM"
    ck = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt, match="saved at iteration 1"):
        train_series(make_task("vdp"), "beuler_ift_cg", 5, p, ck, stop=stop)
    resumed = train_series(make_task("vdp"), "beuler_ift_cg", 5, p, ck)
    assert resumed["test_mse"] == whole["test_mse"] and resumed["history"] == whole["history"]


def test_cmu_model_trains_on_synthetic_data():
    rng = torch.Generator().manual_seed(1)
    data = {k: torch.randn(m, 12, 5, generator=rng, dtype=D64).numpy()
            for k, m in (("Xtr", 3), ("Xval", 2), ("Xtest", 2))}
    p = replace(TINY["cmu"], iters=2)
    res = train_cmu(data, "beuler_ift_cg", 0, p)
    assert res["iters"] == 2 and res["test_mse"] > 0 and res["final_test_mse"] > 0
    # The MSE is reported in the data's units (training sees data / std): scaling the data by 10 trains
    # the same model and multiplies both MSEs by 100.
    scaled = train_cmu({k: 10 * v for k, v in data.items()}, "beuler_ift_cg", 0, p)
    assert scaled["test_mse"] == pytest.approx(100 * res["test_mse"], rel=1e-3)
    assert scaled["best_val_mse"] == pytest.approx(100 * res["best_val_mse"], rel=1e-3)
    # ... and it is measured on the test split: other test data change it, the validation MSE stays.
    other = train_cmu(data | {"Xtest": 2 * data["Xtest"]}, "beuler_ift_cg", 0, p)
    assert other["best_val_mse"] == res["best_val_mse"] and other["test_mse"] != res["test_mse"]
    with pytest.raises(ValueError, match="window"):
        train_cmu(data, "beuler_ift_cg", 0, replace(TINY["cmu"], window=12))


# --- jobs keyed on their whole config ----------------------------------------------------------------------
def _job(tmp_path, **kw):
    args = dict(task="spiral", runs=2, out=tmp_path / "t1", preset="tiny", methods=["beuler_ift_cg"])
    args.update(kw)
    return run(**args)


def test_key_covers_seed_preset_overrides_and_data():
    base = make_config("spiral", "tiny", 0)
    others = [make_config("spiral", "tiny", 1), make_config("spiral", "quick", 0),
              make_config("spiral", "tiny", 0, {"iters": 4}), make_config("vdp", "tiny", 0)]
    hashes = {c.key_hash() for c in [base, *others]}
    assert len(hashes) == 5
    assert base.key()["data_sha256"] == table1.series_sha256(make_task("spiral"))
    # An override equal to the preset's value is still recorded (the key says what was asked).
    assert make_config("spiral", "tiny", 0, {"iters": 3}).key()["overrides"] == {"iters": 3}
    with pytest.raises(ValueError, match="unknown preset overrides"):
        make_config("spiral", "tiny", 0, {"iterations": 4})


def test_other_config_recomputes_and_never_mixes(tmp_path):
    a = _job(tmp_path)
    b = _job(tmp_path, iters=2)  # same --out, other budget: its own runs, not a's
    assert a["key_hash"] != b["key_hash"]
    assert a["per_run"]["beuler_ift_cg"][0]["iters"] == 3 and b["per_run"]["beuler_ift_cg"][0]["iters"] == 2
    runs_dir = tmp_path / "t1" / "runs"
    assert len(list(runs_dir.iterdir())) == 2
    again = _job(tmp_path)  # back to a's config: read back, nothing retrained
    assert again["table"] == a["table"]


def test_tampered_run_result_is_refused(tmp_path):
    a = _job(tmp_path)
    config = make_config("spiral", "tiny", 0)
    path = config.run_dir(tmp_path / "t1") / "beuler_ift_cg_run01.json"
    res = json.loads(path.read_text())
    res["key"]["seed"] = 7  # a result written under another seed
    path.write_text(json.dumps(res))
    with pytest.raises(CheckpointError, match="another config.*seed"):
        _job(tmp_path)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable run result"):
        _job(tmp_path)
    assert a["table"]["beuler_ift_cg"]["n"] == 2


def test_checkpoint_of_another_config_is_refused(tmp_path):
    config = make_config("spiral", "tiny", 0)
    other = make_config("spiral", "tiny", 1)
    ckpt = config.run_dir(tmp_path) / "beuler_ift_cg_run00.ckpt"
    ident = {"key": other.key(), "method": "beuler_ift_cg", "run_index": 0}
    train_series(make_task("spiral"), "beuler_ift_cg", 1, replace(TINY["spiral"], iters=1), ckpt, ident=ident)
    assert ckpt.is_file()
    with pytest.raises(CheckpointError, match="written with key"):
        run_one(config, "beuler_ift_cg", 0, tmp_path)


class _Payload:
    """Unpickling this would call ``Path.touch(marker)``: what a planted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_is_rejected_and_runs_nothing(tmp_path):
    config = make_config("spiral", "tiny", 0)
    marker = tmp_path / "pwned"
    ckpt = config.run_dir(tmp_path / "out") / "beuler_ift_cg_run00.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"key": config.key(), "model": _Payload(marker)}, ckpt)
    with pytest.raises(CheckpointError, match="not a safe checkpoint"):
        run_one(config, "beuler_ift_cg", 0, tmp_path / "out")
    assert not marker.exists()
    torch.save({"key": config.key(), "method": "beuler_ift_cg"}, ckpt)  # safe but malformed
    with pytest.raises(CheckpointError, match="lacks the entry"):
        run_one(config, "beuler_ift_cg", 0, tmp_path / "out")


def test_run_held_by_a_live_process_is_skipped(tmp_path):
    import os

    config = make_config("spiral", "tiny", 0)
    lock = config.run_dir(tmp_path) / "beuler_ift_cg_run00.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getpid()))
    assert run_one(config, "beuler_ift_cg", 0, tmp_path) is None
    lock.write_text("999999999")  # a dead holder: stale, taken over
    assert run_one(config, "beuler_ift_cg", 0, tmp_path)["status"] == "ok" and not lock.exists()


def test_table1_cli_writes_results_publishes_and_resumes(tmp_path):
    from diffmpc.cli import main

    out, pub = tmp_path / "t1", tmp_path / "pub"
    argv = ["table1", "--task", "spiral", "--preset", "tiny", "--runs", "2", "--iters", "2", "--methods",
            "beuler_ift_cg", "beuler_ift_dense", "--out", str(out), "--publish", str(pub)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["table"]["beuler_ift_cg"]["n"] == 2 and res["runs"] == 2 and "--iters 2" in res["command"]
    assert res["cg_vs_dense_max_rel_diff"] < 1e-3  # one gradient, two linear solvers
    assert json.loads((pub / "table1_spiral_tiny.json").read_text()) == res
    assert (pub / "table1_spiral_tiny.md").read_text() == (out / "table1_spiral.md").read_text()
    assert not (pub / "table1_spiral.json").exists() and (pub / "table1.md").is_file()
    run_file = next((out / "runs").glob("*/beuler_ift_cg_run01.json"))
    stamp = run_file.stat().st_mtime_ns
    assert main(argv) == 0  # everything is done: nothing is retrained
    assert run_file.stat().st_mtime_ns == stamp
    assert main([*argv[:-2], "--report-only"]) == 0


def test_table1_cmu_missing_file_is_a_clean_error(tmp_path, capsys):
    from diffmpc.cli import main

    rc = main(["table1", "--task", "cmu", "--out", str(tmp_path), "--cmu-path", str(tmp_path / "no.mat")])
    assert rc == 1 and "not found" in capsys.readouterr().err


def test_example_script_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "neural_ode.py"
    spec = importlib.util.spec_from_file_location("neural_ode_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--iters", "2", "--window", "3", "--plot", str(tmp_path / "spiral.png")]) == 0
    assert "test extrapolation MSE" in capsys.readouterr().out and (tmp_path / "spiral.png").is_file()


def test_interrupted_job_reports_its_unfinished_run_and_resumes(tmp_path):
    config = make_config("spiral", "tiny", 0)
    stop = StopRequest()
    stop.requested = "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        run_one(config, "beuler_ift_cg", 0, tmp_path, stop=stop)
    assert not (config.run_dir(tmp_path) / "beuler_ift_cg_run00.lock").exists()  # released
    payload = table1.summarise(config, tmp_path, 1)
    assert payload["table"] == {} and [(r["method"], r["iter"]) for r in payload["in_progress"]] == [
        ("beuler_ift_cg", 1)]
    assert "Unfinished: beuler_ift_cg run 0 at iteration 1 / 3" in table1.markdown(payload)
    done = run_one(config, "beuler_ift_cg", 0, tmp_path)
    assert done["iters"] == 3 and table1.summarise(config, tmp_path, 1)["in_progress"] == []
