"""SAC-with-learned-reward experiment: CLI end to end, shape refusal, reward quality."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.experiments import sac as sac_experiment
from energyflow_jax.rewards import gates
from energyflow_jax.data.windows import Normalizer
from energyflow_jax.models import EnergyFlowModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("centered+sparse", "sparse")


def tiny_config(**overrides):
    return config_lib.load("sweeps/sac.py:tiny", overrides)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CLI run with two reward variants of two seeds (one vmapped group each),
    shared by the tests below."""
    workdir = tmp_path_factory.mktemp("sac")
    cmd = [sys.executable, "-m", "energyflow_jax.main", "--config=sweeps/sac.py:tiny",
           f"--workdir={workdir}", f"--config.reward.kinds={KINDS!r}", "--config.seeds=(0, 1)"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def _load(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow  # the shared tiny CLI run: ~3 min on 2 cores
def test_cli_writes_results_report_and_plot(tiny_run):
    results = _load(tiny_run / "results.json")
    assert list(results["variants"]) == list(KINDS)
    for kind, variant in results["variants"].items():
        final = variant["final"]
        assert 0.0 <= final["success_mean"] <= 1.0 and final["success_std"] >= 0.0
        assert np.isfinite(final["return_mean"]) and final["return_std"] >= 0.0
        assert final["n_seeds"] == len(results["seeds"]) == 2
        curve = variant["curve"]
        assert curve["step"][-1] == results["env_steps"] == 160
        assert len(curve["success_mean"]) == len(curve["step"]) == len(curve["return_std"])
        per_seed = variant["per_seed"]
        assert [r["seed"] for r in per_seed] == [0, 1]
        assert per_seed[0]["final_return"] != per_seed[1]["final_return"]  # two runs, not one
        for seed in (0, 1):
            assert os.path.exists(tiny_run / kind / f"seed{seed}" / "metrics.jsonl")
    report = _load(tiny_run / "report.json")
    assert {"config", "final_metrics", "wall_time_s", "variant_wall_time_s",
            "reward_quality"} <= set(report)
    assert set(report["final_metrics"]) == set(KINDS) and report["wall_time_s"] > 0
    assert report["config"]["reward"]["kinds"] == list(KINDS)
    table = (tiny_run / "results.md").read_text()
    assert all(f"| {kind} |" in table for kind in KINDS)
    assert (tiny_run / "curves.png").stat().st_size > 0


@pytest.mark.slow  # the shared tiny CLI run: ~3 min on 2 cores
def test_reward_quality_expert_above_random(tiny_run):
    """The tiny reward model (600 DSM steps on the raw action box, 4 demos) ranks held-out
    expert actions above uniform random ones (measured: 0.93; 300 steps gave 0.77)."""
    quality = _load(tiny_run / "reward_quality.json")
    assert set(quality["kinds"]) == {"centered+sparse", "sparse", "dense", "raw", "centered",
                                     "advantage"}
    # The gates ran on every reference policy; xyz ranking only where actions matter.
    assert list(quality["reference_policies"]) == gates.reference_policy_names()
    for kind, q in quality["kinds"].items():
        assert ("xyz_ranking_accuracy" in q) == (kind not in ("sparse", "dense")), kind
        assert set(q["reference_discounted_return"]) == set(quality["reference_policies"])
        assert isinstance(q["gates_passed"], bool)
    results = _load(tiny_run / "results.json")
    assert set(results["comparisons"]) == {"centered+sparse - sparse"}
    assert results["verdict"]["verdict"] == "inconclusive"  # dense, raw, centered not run
    for kind, q in quality["kinds"].items():
        for name in ("ranking_accuracy_vs_perturbed", "ranking_accuracy_vs_random"):
            assert 0.0 <= q[name] <= 1.0, (kind, name)
    for kind in ("raw", "centered", "advantage", "centered+sparse"):
        assert quality["kinds"][kind]["ranking_accuracy_vs_random"] > 0.9, kind
        assert quality["kinds"][kind]["expert_reward_mean"] > quality["kinds"][kind]["random_reward_mean"]
    # The sparse reward cannot tell actions apart in a state: a tie, half credit.
    assert quality["kinds"]["sparse"]["ranking_accuracy_vs_random"] == pytest.approx(0.5)


def test_mismatched_reward_model_refused_before_training(tmp_path):
    """A saved reward model for other shapes fails at once: no demos, no SAC run dirs."""
    model_dir = tmp_path / "reward_model"
    model_dir.mkdir()
    (model_dir / sac_experiment.SPEC_FILE).write_text(json.dumps(
        {"task": "other", "obs_shape": [2, 38], "action_shape": [1, 4]}))
    config = tiny_config()
    with pytest.raises(ValueError, match="obs_shape"):
        sac_experiment.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["reward_model"]


def test_reward_model_of_another_task_is_refused(tmp_path):
    """Meta-World tasks share shapes: a saved reward model is matched by task name too."""
    config = tiny_config()
    model_dir = tmp_path / "reward_model"
    model_dir.mkdir()
    (model_dir / sac_experiment.SPEC_FILE).write_text(json.dumps(
        {"task": "door-open-v3", "obs_shape": [config.reward_model.data.obs_horizon, 39],
         "action_shape": [1, 4]}))
    assert config.task != "door-open-v3"
    with pytest.raises(ValueError, match="trained on door-open-v3"):
        sac_experiment.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["reward_model"]


def test_reward_built_for_other_env_is_refused():
    """An energy model built for 38-dim observations cannot score a 39-dim env."""
    from energyflow_jax.rewards import energy as rewards

    config = tiny_config()
    model = EnergyFlowModel.create(config.reward_model.model, obs_shape=(2, 38), action_shape=(1, 4))
    params = model.init(jax.random.PRNGKey(0))
    energy = (model, params, Normalizer.identity(38), Normalizer.identity(4))
    reward = sac_experiment.build_reward("centered", config, obs_dim=39, act_dim=4, energy=energy)
    with pytest.raises(ValueError, match="obs_dim=38"):
        rewards.check_reward_compatibility(reward, 39, 4)


def test_seed_groups_split_the_seeds_and_refuse_bad_lists():
    assert sac_experiment.seed_groups(tiny_config(seeds=(0, 1, 2))) == [(0, 1, 2)]
    assert sac_experiment.seed_groups(tiny_config(seeds=(0, 1, 2), vmap_seeds=2)) == [(0, 1), (2,)]
    with pytest.raises(ValueError, match="duplicates"):
        sac_experiment.seed_groups(tiny_config(seeds=(0, 0)))
    with pytest.raises(ValueError, match="vmap_seeds"):
        sac_experiment.seed_groups(tiny_config(vmap_seeds=-1))


def test_unknown_kind_and_pred_horizon_fail_fast(tmp_path):
    config = tiny_config()
    with config.unlocked():
        config.reward.kinds = ("sparse", "centred")
    with pytest.raises(ValueError, match="unknown reward kind"):
        sac_experiment.train_and_evaluate(config, str(tmp_path))
    config = tiny_config()
    with config.unlocked():
        config.reward_model.data.pred_horizon = 16
    with pytest.raises(ValueError, match="pred_horizon"):
        sac_experiment.train_and_evaluate(config, str(tmp_path))
