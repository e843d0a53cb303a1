"""A workdir cannot be silently corrupted, and bad input fails before any work.

One test per way a careful user broke a workdir: bit flips in a checkpoint, a
deleted run spec, two processes on one workdir, a torn metrics log, Ctrl-C, bad
configs, bad model inputs, file permissions.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_model

from energyflow_jax import config as config_lib
from energyflow_jax.experiments import imitation, toy
from energyflow_jax.io import run_dir
from energyflow_jax.sweep.grid import sweep_grid
from energyflow_jax.training.loop import validate_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy(**overrides):
    return config_lib.load("sweeps/toy.py:tiny", {"log.progress": False, **overrides})


def _flip_bytes(step_dir):
    """XOR 64 bytes a quarter of the way into every data file of the saved state."""
    data_dir = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    names = os.listdir(data_dir)
    assert names
    for name in names:
        path = os.path.join(data_dir, name)
        with open(path, "r+b") as f:
            raw = bytearray(f.read())
            at = len(raw) // 4
            raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])
            f.seek(0)
            f.write(raw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, toy.train_and_evaluate(_toy(), workdir)


def test_corrupt_checkpoint_is_set_aside_and_the_run_resumes_from_a_good_one(
        uninterrupted, tmp_path, capfd):
    _, reference = uninterrupted
    workdir = str(tmp_path / "w")
    toy.train_and_evaluate(_toy(), workdir)
    assert run_dir.checkpoint_steps(workdir) == [40, 60]  # max_checkpoints=2
    _flip_bytes(os.path.join(workdir, "checkpoints", "60"))
    capfd.readouterr()

    report = toy.train_and_evaluate(_toy(), workdir)  # a finished run, re-run
    err = capfd.readouterr().err
    assert "checkpoint step 60" in err and "failed verification" in err
    quarantined = os.listdir(os.path.join(workdir, run_dir.QUARANTINE_DIR))
    assert len(quarantined) == 1 and quarantined[0].startswith("60-")  # set aside, not deleted
    assert report["resumed_from_step"] == 40 and report["n_skipped_updates"] == 0
    assert report["ema_params_sha256"] == reference["ema_params_sha256"]
    assert run_dir.checkpoint_steps(workdir) == [40, 60]
    assert [m["step"] for m in run_dir.read_metrics(workdir)] == [10, 20, 30, 40, 50, 60]


def test_every_bad_checkpoint_is_set_aside_and_none_left_means_a_fresh_start(tmp_path, capfd):
    workdir = str(tmp_path / "w")
    first = toy.train_and_evaluate(_toy(), workdir)
    for step in (40, 60):
        _flip_bytes(os.path.join(workdir, "checkpoints", str(step)))
    report = toy.train_and_evaluate(_toy(), workdir)
    assert capfd.readouterr().err.count("failed verification") == 2
    assert len(os.listdir(os.path.join(workdir, run_dir.QUARANTINE_DIR))) == 2
    assert report["resumed_from_step"] == 0
    assert report["ema_params_sha256"] == first["ema_params_sha256"]


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    manager = run_dir.checkpoint_manager(str(tmp_path), 2)
    spec = run_dir.run_spec({"seed": 0}, None)
    run_dir.save_checkpoint(manager, 1, {"w": jnp.ones(3)}, spec)
    with pytest.raises(FloatingPointError, match="newest good checkpoint"):
        run_dir.save_checkpoint(manager, 2, {"w": jnp.array([1.0, jnp.nan, 0.0])}, spec)
    manager.wait_until_finished()
    manager.close()
    assert run_dir.checkpoint_steps(str(tmp_path)) == [1]


def test_finished_run_rerun_checks_the_report_against_the_checkpoint(uninterrupted, tmp_path):
    import shutil
    workdir = str(tmp_path / "w")
    shutil.copytree(uninterrupted[0], workdir)
    path = os.path.join(workdir, "report.json")
    report = run_dir.read_json(path)
    report["ema_params_sha256"] = "0" * 64  # a report that describes other parameters
    run_dir.write_json(path, report)
    with pytest.raises(run_dir.WorkdirError, match="report.json describes parameters"):
        toy.train_and_evaluate(_toy(), workdir)
    assert run_dir.read_json(path)["ema_params_sha256"] == "0" * 64  # not overwritten


def test_checkpoints_without_a_run_spec_are_refused(uninterrupted, tmp_path):
    import shutil
    workdir = str(tmp_path / "w")
    shutil.copytree(uninterrupted[0], workdir)
    for step in run_dir.checkpoint_steps(workdir):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), run_dir.SPEC_ITEM))
    before = sorted(os.listdir(workdir))
    report_before = run_dir.read_json(os.path.join(workdir, "report.json"))
    for overrides in ({"optim.learning_rate": 0.05}, {}):
        with pytest.raises(ValueError, match="no readable record of the settings"):
            toy.train_and_evaluate(_toy(**overrides), workdir)
    assert sorted(os.listdir(workdir)) == before
    assert run_dir.read_json(os.path.join(workdir, "report.json")) == report_before


def test_the_run_spec_lives_in_each_checkpoint_and_eval_keys_may_change(uninterrupted):
    workdir, _ = uninterrupted
    saved = run_dir.read_checkpoint_spec(workdir, run_dir.checkpoint_steps(workdir)[-1])
    assert saved["config"]["optim"]["total_steps"] == 60 and len(saved["state_sha256"]) == 64
    assert not os.path.exists(os.path.join(workdir, run_dir.LEGACY_RUN_SPEC_FILE))
    mw = config_lib.load("sweeps/metaworld.py:tiny").to_dict()
    changed = json.loads(json.dumps(mw))
    changed["data"]["exec_horizon"] = 4
    changed["eval"]["n_episodes"] = 7
    changed["eval"]["ood_levels"] = ["M"]
    run_dir.compare_run_specs("W", run_dir.run_spec(mw, "d"), run_dir.run_spec(changed, "d"))
    changed["data"]["pred_horizon"] = 8
    with pytest.raises(ValueError, match="data.pred_horizon: 16 in the checkpointed run, 8 now"):
        run_dir.compare_run_specs("W", run_dir.run_spec(mw, "d"), run_dir.run_spec(changed, "d"))


def test_a_second_process_on_a_workdir_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    workdir = str(tmp_path / "w")
    env = {**os.environ, "PYTHONPATH": REPO}
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom energyflow_jax.io import run_dir\n"
         "with run_dir.workdir_lock(sys.argv[1]):\n    print('locked', flush=True)\n"
         "    time.sleep(120)\n", workdir],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_dir.WorkdirError,
                           match=f"in use by another run \\(pid {holder.pid}\\)"):
            with run_dir.workdir_lock(workdir):
                pass
        t0 = time.perf_counter()
        cli = subprocess.run(
            [sys.executable, "-m", "energyflow_jax.main", "--config=sweeps/toy.py:tiny",
             f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=300)
        assert cli.returncode == 2 and f"pid {holder.pid}" in cli.stderr
        assert "Traceback" not in cli.stderr
        assert time.perf_counter() - t0 < 60  # at once: no training before the refusal
        assert sorted(os.listdir(workdir)) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    with run_dir.workdir_lock(workdir):  # the killed holder's lock died with it
        with run_dir.workdir_lock(workdir):  # re-entrant within one process
            pass


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n{"step": 30, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl: dropping its torn last line"):
        assert [m["step"] for m in run_dir.read_metrics(str(tmp_path))] == [10, 20]
    with pytest.warns(UserWarning):
        run_dir.drop_metrics_after(str(path), 20)
    assert path.read_text() == '{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n'
    path.write_text('{"step": 10}\n{"step": 2\n{"step": 30}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2, is not JSON"):
        run_dir.read_metrics(str(tmp_path))


def test_a_torn_metrics_log_resumes(uninterrupted, tmp_path):
    import shutil
    workdir = str(tmp_path / "w")
    shutil.copytree(uninterrupted[0], workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    os.truncate(path, os.path.getsize(path) - 30)
    with pytest.warns(UserWarning, match="torn last line"):
        report = toy.train_and_evaluate(_toy(), workdir)
    assert report["ema_params_sha256"] == uninterrupted[1]["ema_params_sha256"]


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_saying_where_to_resume(tmp_path):
    workdir = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(
        [sys.executable, "-m", "energyflow_jax.main", "--config=sweeps/toy.py:tiny",
         f"--workdir={workdir}", "--config.optim.total_steps=100000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not run_dir.checkpoint_steps(str(workdir)) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and "re-run the same command to resume" in lines[0]


BAD_CONFIGS = [
    ("sweeps/metaworld.py:tiny", {"data.pred_horizon": 7, "data.exec_horizon": 8},
     "data.exec_horizon=8: must be <= data.pred_horizon=7"),
    ("sweeps/metaworld.py:tiny", {"train.batch_size": 0}, "train.batch_size=0: must be an integer >= 1"),
    ("sweeps/metaworld.py:tiny", {"train.batch_size": -4}, "train.batch_size=-4"),
    ("sweeps/metaworld.py:tiny", {"train.steps_per_chunk": 0}, "train.steps_per_chunk=0"),
    ("sweeps/metaworld.py:tiny", {"optim.total_steps": 0}, "optim.total_steps=0"),
    ("sweeps/metaworld.py:tiny", {"diffusion.gamma": 2.0}, "diffusion.gamma=2.0: must be in (0, diffusion.T=1.0]"),
    ("sweeps/metaworld.py:tiny", {"diffusion.sigma_min": 20.0}, "must be < diffusion.sigma_max=10.0"),
    ("sweeps/toy.py:tiny", {"data.obs_horizon": 0}, "data.obs_horizon=0: must be an integer >= 1"),
    ("sweeps/toy.py:tiny", {"data.obs_horizon": 3}, "must be 1 (the toy task"),
    ("sweeps/capacity.py:smoke", {"spectral_bound": -1.0}, "spectral_bound=-1.0: must be a number > 0"),
    ("sweeps/capacity.py:smoke", {"action_dims": (0, 4)}, "action_dims=(0, 4): must be an integer >= 1"),
    ("sweeps/sac.py:tiny", {"reward_model.optim.learning_rate": -1.0}, "reward_model.optim.learning_rate"),
]


@pytest.mark.parametrize("spec, overrides, message", BAD_CONFIGS)
def test_bad_configs_fail_before_any_work_naming_the_key(spec, overrides, message):
    config = config_lib.load(spec, overrides)
    with pytest.raises(config_lib.ConfigError, match="invalid config") as info:
        config_lib.validate(config)
    assert message in str(info.value)


def test_sweep_grid_values_are_checked_each():
    config = config_lib.load("sweeps/sweep_toy.py:tiny")
    with config.unlocked():
        config.sweep.grid = sweep_grid({"optim.learning_rate": (1e-3, 0.0)})
    with pytest.raises(config_lib.ConfigError,
                       match=r"sweep.grid.optim.learning_rate=\(0.001, 0.0\): must be a number > 0"):
        config_lib.validate(config)


def test_a_bad_metaworld_config_writes_nothing(tmp_path):
    config = config_lib.load("sweeps/metaworld.py:tiny", {"data.pred_horizon": 7})
    with pytest.raises(config_lib.ConfigError):
        imitation.train_and_evaluate(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_zero_training_windows_are_refused():
    with pytest.raises(ValueError, match="no training windows"):
        validate_data({"obs": np.zeros((0, 2, 3)), "actions": np.zeros((0, 4, 2))})


def test_model_api_checks_each_argument():
    model = tiny_model()  # obs (2, 3), actions (4, 2)
    params = model.init(jax.random.PRNGKey(0))
    a, s = jnp.ones((3, 4, 2)), jnp.ones((3, 2, 3))
    energy = jax.jit(model.energy)
    # A scalar t is one time for the whole batch.
    np.testing.assert_array_equal(energy(params, a, s, 0.5), energy(params, a, s, jnp.full((3,), 0.5)))
    cases = [((a, s, jnp.full((3, 1), 0.5)), "t: noise times must be a scalar or shape \\(3,\\)"),
             ((a[:0], s[:0], 0.5), "a: the batch is empty"),
             ((a, s[:2], 0.5), "s: batch of 2 observations for a batch of 3"),
             ((a[0], s, 0.5), "a: action chunks must be \\(batch, 4, 2\\)"),
             ((a, s[0], 0.5), "s: observations must be \\(batch, 2, 3\\)"),
             ((jnp.ones((3, 5, 2)), s, 0.5), "action chunk shape \\(5, 2\\)")]
    for args, message in cases:
        for fn in (model.energy, model.score):
            with pytest.raises(ValueError, match=message):
                fn(params, *args)


def test_files_a_run_writes_get_ordinary_permissions(uninterrupted):
    workdir, _ = uninterrupted
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for name in ("report.json", "status.json", "metrics.jsonl"):
        assert os.stat(os.path.join(workdir, name)).st_mode & 0o777 == expected, name
