"""The Meta-World experiment end to end: CLI run, task validation, saved
normalizers, policy chunk shapes."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.experiments import imitation as mwx
from energyflow_jax.experiments import sac as sac_experiment
from energyflow_jax.io.run_dir import tree_fingerprint as run_io_fingerprint
from energyflow_jax.policy import Policy, as_numpy_policy
from energyflow_jax.data import metaworld as md
from energyflow_jax.data.windows import Normalizer
from energyflow_jax.models import EnergyFlowModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
mw_sweep = config_lib.load_module("sweeps/metaworld.py")


@pytest.mark.slow
def test_tiny_cli_run_writes_a_sane_report(tmp_path):
    workdir = tmp_path / "run"
    # XLA_FLAGS from conftest carry over: two CPU devices, so the sharded
    # training path and the gather of the EMA params for evaluation both run.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "energyflow_jax.main", "--config=sweeps/metaworld.py:tiny",
         f"--workdir={workdir}", "--config.eval.n_videos=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())

    for key in ("task", "success_rate", "ci95", "n_episodes", "n_successes", "episodes",
                "episodes_path", "timing", "steps", "ema_params_sha256", "config"):
        assert key in report, key
    assert report["task"] == "button-press-v3"
    assert report["config"]["experiment"] == "metaworld"
    assert report["steps"] == report["config"]["optim"]["total_steps"]
    n = report["config"]["eval"]["n_episodes"]
    assert report["n_episodes"] == n == len(report["episodes"])
    assert 0.0 <= report["success_rate"] <= 1.0
    assert report["n_successes"] == sum(ep["success"] for ep in report["episodes"])
    assert report["success_rate"] == pytest.approx(report["n_successes"] / n)
    lo, hi = report["ci95"]
    assert 0.0 <= lo <= report["success_rate"] <= hi <= 1.0
    max_steps = report["config"]["eval"]["max_steps"]
    assert all(1 <= ep["steps"] <= max_steps for ep in report["episodes"])
    assert all(report["timing"][k] >= 0 for k in ("collect_s", "train_s", "eval_s"))
    assert report["ood"] == {}

    # Provenance of the cached demos, and evaluation layouts disjoint from them.
    provenance = report["demos"]["provenance"]
    assert provenance["task"] == "button-press-v3"
    assert provenance["n_episodes"] == report["config"]["data"]["n_demos"]
    episodes = json.loads((workdir / "eval_episodes.json").read_text())["0"][0]["episodes"]
    cached, _ = md.read_demo_cache(report["demos"]["cache_path"])
    md.assert_configs_disjoint(np.array([ep["rand_vec"] for ep in episodes]),
                               np.stack([ep["rand_vec"] for ep in cached]))

    for name in ("summary.md", "summary.png", "metrics.jsonl"):
        assert (workdir / name).stat().st_size > 0, name
    # The run's policy is in its checkpoint: loaded, it acts like the evaluated one.
    policy = Policy.load(str(workdir))
    assert policy.obs_shape == (report["config"]["data"]["obs_horizon"], md.OBS_DIM)
    assert run_io_fingerprint(policy.params) == report["ema_params_sha256"]
    assert "| 0 |" in (workdir / "summary.md").read_text()
    assert len(report["rollout_plots"]) == 1 and os.path.exists(report["rollout_plots"][0])
    # The rollout video, or the reason there is none (no GL backend) in the summary.
    if report["videos_skipped"]:
        assert report["rollout_videos"] == []
        assert "no rollout videos: MuJoCo cannot render" in (workdir / "summary.md").read_text()
    else:
        (v,) = report["rollout_videos"]
        assert v["frames"] == report["episodes"][0]["steps"] and v["replay_matches"]
        assert os.path.exists(v["path"]) and "rollout videos" in (workdir / "summary.md").read_text()


def test_unknown_task_fails_first_and_lists_valid_names(tmp_path):
    config = mw_sweep.get_config("tiny")
    with config.unlocked():
        config.task = "button-pres-v3"
    with pytest.raises(ValueError) as err:
        mwx.train_and_evaluate(config, str(tmp_path))
    message = str(err.value)
    assert "button-pres-v3" in message
    assert "button-press-v3" in message and "door-open-v3" in message
    assert os.listdir(tmp_path) == []  # rejected before any collection or training

    config = mw_sweep.get_config("tiny")
    with config.unlocked():
        config.tasks = ("button-press-v3", "hammer")
    with pytest.raises(ValueError, match="did you mean 'hammer-v3'"):
        mwx.train_and_evaluate(config, str(tmp_path))

    config = mw_sweep.get_config("tiny")
    with config.unlocked():
        config.eval.ood_levels = ("S", "XL")
    with pytest.raises(ValueError, match="Unknown perturbation level 'XL'"):
        mwx.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_normalizers_round_trip_through_the_saved_file(tmp_path):
    rng = np.random.default_rng(0)
    obs = Normalizer.fit(rng.normal(3.0, 2.0, (100, md.OBS_DIM)))
    action = Normalizer.fit(rng.normal(-0.5, 0.3, (100, md.ACTION_DIM)))
    path = str(tmp_path / "normalizers.npz")
    sac_experiment.save_normalizers(path, obs, action)
    assert [p.name for p in tmp_path.iterdir()] == ["normalizers.npz"]  # no temp file left
    obs_loaded, action_loaded = sac_experiment.load_normalizers(path)
    chex.assert_trees_all_close(obs_loaded, obs)
    chex.assert_trees_all_close(action_loaded, action)
    x = jnp.asarray(rng.normal(size=(5, 2, md.OBS_DIM)), jnp.float32)
    np.testing.assert_allclose(obs_loaded.unnormalize(obs.normalize(x)), x, rtol=1e-5, atol=1e-5)

    np.savez(tmp_path / "other.npz", obs_mean=np.zeros(3))
    with pytest.raises(ValueError, match="missing"):
        sac_experiment.load_normalizers(str(tmp_path / "other.npz"))


@pytest.mark.parametrize("kind", ["conservative", "free"])
def test_policy_chunks_have_env_shape_and_range(kind):
    config = mw_sweep.get_config("tiny")
    with config.unlocked():
        config.model.kind = kind
    obs_horizon, pred_horizon = config.data.obs_horizon, config.data.pred_horizon
    model = EnergyFlowModel.create(config.model, (obs_horizon, md.OBS_DIM), (pred_horizon, md.ACTION_DIM))
    params = model.init(jax.random.PRNGKey(0))
    # A large action std makes unnormalized chunks overflow [-1, 1] before clipping.
    obs_norm = Normalizer(jnp.zeros(md.OBS_DIM), jnp.ones(md.OBS_DIM))
    act_norm = Normalizer(jnp.full(md.ACTION_DIM, 0.2), jnp.full(md.ACTION_DIM, 5.0))
    policy = Policy.create(model, config.model, config.diffusion, params, obs_norm, act_norm)
    obs = np.random.default_rng(0).normal(size=(3, obs_horizon, md.OBS_DIM)).astype(np.float32)

    chunk = policy.act(obs, jax.random.PRNGKey(1))
    chex.assert_shape(chunk, (3, pred_horizon, md.ACTION_DIM))
    chex.assert_type(chunk, jnp.float32)
    chex.assert_tree_all_finite(chunk)
    assert float(jnp.max(jnp.abs(chunk))) <= 1.0

    # The evaluator's callable: numpy in, numpy out, fresh noise on every call.
    policy_fn = as_numpy_policy(policy, jax.random.PRNGKey(2))
    first, second = policy_fn(obs), policy_fn(obs)
    assert isinstance(first, np.ndarray) and first.shape == (3, pred_horizon, md.ACTION_DIM)
    assert not np.array_equal(first, second)
