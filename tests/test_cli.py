"""The CLI end to end on the toy task: report, resume, a real SIGKILL, errors."""
import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *overrides, env_extra=None, preset="tiny", config=None):
    env = {**os.environ, "PYTHONPATH": REPO, **(env_extra or {})}
    # One device, what a user's plain run gets; conftest's other XLA flags stay.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "host_platform_device_count" not in f)
    config = config or f"sweeps/toy.py:{preset}"
    cmd = [sys.executable, "-m", "energyflow_jax.main", f"--config={config}",
           f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _report(workdir):
    with open(os.path.join(workdir, "report.json")) as f:
        return json.load(f)


def _metric_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.mark.slow
def test_run_report_resume_and_sigkill(tmp_path):
    full = tmp_path / "full"
    proc = _run(full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _report(full)
    assert report["steps"] == 60 and report["resumed_from_step"] == 0
    assert len(report["ema_params_sha256"]) == 64
    assert report["config"]["optim"]["total_steps"] == 60
    assert report["wall_time_s"] > 0 and report["n_skipped_updates"] == 0
    assert set(report["toy_ranking"]) >= {"spearman_mean", "t=0.001"}
    assert report["kernels"] == {"conv_impl": "windows+winograd", "matmul_precision": "default",
                                 "backend": "cpu"}
    assert _metric_steps(full) == [10, 20, 30, 40, 50, 60]
    assert os.path.exists(full / "toy_landscape.png")

    # Re-running the finished command resumes at the end: same parameters. The
    # convolution form may change on resume (the same parameters), and is reported.
    again = _run(full, "--config.model.conv_impl=lax")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _report(full)["kernels"]["conv_impl"] == "lax"
    assert _report(full)["resumed_from_step"] == 60
    assert _report(full)["ema_params_sha256"] == report["ema_params_sha256"]
    assert _report(full)["final_metrics"] == report["final_metrics"]

    # The same workdir with another setting is refused, naming it; nothing is rewritten.
    other = _run(full, "--config.optim.learning_rate=0.01")
    assert other.returncode != 0 and "optim.learning_rate" in other.stderr
    assert _report(full)["resumed_from_step"] == 60 and _metric_steps(full) == [10, 20, 30, 40, 50, 60]

    # Another experiment in the same workdir: refused before any work, nothing written.
    before = sorted(os.listdir(full))
    foreign = _run(full, config="sweeps/metaworld.py:tiny")
    assert foreign.returncode != 0 and "experiment: 'toy' in the checkpointed run" in foreign.stderr
    assert sorted(os.listdir(full)) == before  # no demos/ collected, no files touched

    # SIGKILL after chunk 3; checkpoints every 2 chunks, so chunk 3 is lost
    # and redone. The resumed run must end bitwise identical.
    killed = tmp_path / "killed"
    proc = _run(killed, env_extra={"ENERGYFLOW_TEST_SIGKILL_AFTER_CHUNK": "3"})
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(killed / "report.json")
    assert _metric_steps(killed) == [10, 20, 30]
    proc = _run(killed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = _report(killed)
    assert resumed["resumed_from_step"] == 20
    assert resumed["ema_params_sha256"] == report["ema_params_sha256"]
    assert _metric_steps(killed) == [10, 20, 30, 40, 50, 60]


@pytest.mark.parametrize("args, message", [
    (["--config.optim.lerning_rate=0.1"], "lerning_rate"),
    (["--config.model.kind=curly"], "model.kind='curly': must be one of"),
    (["--config.data.obs_horizon=0"], "data.obs_horizon=0: must be an integer >= 1"),
])
def test_bad_config_fails_loudly(tmp_path, args, message):
    proc = _run(tmp_path / "bad", *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not os.path.exists(tmp_path / "bad" / "report.json")


def test_unknown_preset_lists_presets(tmp_path):
    proc = _run(tmp_path / "p", preset="nope")
    assert proc.returncode != 0
    assert "unknown preset 'nope'" in proc.stderr and "tiny" in proc.stderr
