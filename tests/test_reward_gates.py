"""Reward gates before RL, the one scaling rule, and the SAC table's verdict rule."""
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.data import metaworld as md
from energyflow_jax.evaluation import statistics
from energyflow_jax.experiments import sac as sac_experiment
from energyflow_jax.rewards import energy as rewards
from energyflow_jax.rewards import gates


def _rollouts(dense_per_policy, success_per_policy, steps=10):
    """Fake reference rollouts: two episodes per policy with constant dense reward."""
    out = {}
    for name, dense, success in zip(gates.reference_policy_names(), dense_per_policy,
                                     success_per_policy):
        n = 2 * steps
        inputs = rewards.RewardInputs(obs=np.zeros((n, 1, 3), np.float32),
                                      action=np.zeros((n, 4), np.float32),
                                      env_reward=np.full(n, dense, np.float32),
                                      success=np.zeros(n, np.float32))
        out[name] = gates.ReferenceRollouts(inputs=inputs, episode_ids=np.repeat([0, 1], steps),
                                            success=np.array([success, success]),
                                            dense_return=np.array([dense * steps] * 2))
    return out


def test_return_order_ranks_policies_like_their_dense_return():
    dense = [5.0, 4.0, 3.0, 2.0, 1.5, 0.5]
    success = [1.0, 1.0, 0.6, 0.2, 0.8, 0.0]
    roll = _rollouts(dense, success)
    good = gates.return_order(rewards.dense_reward, roll, discount=0.99)
    assert good["kendall_tau_dense"] == pytest.approx(1.0)
    assert 0.5 < good["kendall_tau_success"] < 1.0  # tau-b with the expert tie
    bad = gates.return_order(lambda x: -rewards.dense_reward(x), roll, discount=0.99)
    assert bad["kendall_tau_dense"] == pytest.approx(-1.0)
    const = gates.return_order(rewards.sparse_reward, roll, discount=0.99)
    assert np.isnan(const["kendall_tau_dense"])  # a constant reward orders nothing
    np.testing.assert_allclose(
        gates.discounted_returns(np.ones(4), np.array([0, 0, 1, 1]), 0.5), [1.5, 1.5])


def test_xyz_ranking_ignores_the_gripper():
    """A reward that only checks the gripper passes an all-dims ranking but not the xyz gate;
    one that checks x/y/z passes it."""
    rng = np.random.default_rng(0)
    n = 64
    expert = rewards.RewardInputs(
        obs=rng.normal(size=(n, 1, 3)).astype(np.float32),
        action=np.concatenate([rng.uniform(-0.5, 0.5, (n, 3)), np.full((n, 1), -1.0)], 1)
        .astype(np.float32),
        env_reward=np.zeros(n, np.float32), success=np.zeros(n, np.float32))
    target = jnp.asarray(expert.action)

    def gripper_only(x):
        return -jnp.abs(x.action[:, 3] - target[:, 3])

    def xyz(x):
        return -((x.action[:, :3] - target[:, :3]) ** 2).sum(-1)

    key = __import__("jax").random.PRNGKey(0)
    all_dims = rewards.reward_quality(
        gripper_only, expert, rewards.perturb_actions(key, target, 16, 0.3))
    assert all_dims["ranking_accuracy"] > 0.7  # carried by the gripper
    assert gates.xyz_ranking_accuracy(gripper_only, expert, key) == pytest.approx(0.5)
    assert gates.xyz_ranking_accuracy(xyz, expert, key) > 0.99


@pytest.mark.slow  # six short Meta-World rollouts: ~15 s
def test_reference_rollouts_order_expert_above_random():
    task, horizon = "button-press-v3", 2
    roll = gates.rollout_reference_policies(task, n_episodes=2, max_steps=120,
                                            obs_horizon=horizon, seed=0)
    assert list(roll) == gates.reference_policy_names()
    summary = gates.reference_summary(roll)
    assert summary["expert"]["success"] == 1.0 and summary["random"]["success"] == 0.0
    assert summary["expert"]["dense_return"] > summary["random"]["dense_return"]
    for r in roll.values():
        n = len(r.inputs.action)
        assert r.inputs.obs.shape == (n, horizon, md.OBS_DIM) and r.episode_ids.shape == (n,)
        assert n == 2 * 120  # whole episodes, no stop at success
    # The same layouts for every policy: equal first observations.
    np.testing.assert_array_equal(roll["expert"].inputs.obs[0], roll["random"].inputs.obs[0])
    # The dense reward's own return order agrees with the dense return.
    assert gates.return_order(rewards.dense_reward, roll, 0.99)["kendall_tau_dense"] > 0.8


def test_scales_are_one_over_std_and_keep_rankings():
    config = config_lib.load("sweeps/sac.py:tiny")
    rng = np.random.default_rng(0)
    n = 200
    calib = rewards.RewardInputs(obs=np.zeros((n, 2, 39), np.float32),
                                 action=rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                                 env_reward=rng.normal(3.0, 2.0, n).astype(np.float32),
                                 success=(rng.uniform(size=n) < 0.2).astype(np.float32))
    scales = sac_experiment.reward_scales(["dense", "sparse"], config, calib, obs_dim=39,
                                          act_dim=4)
    assert scales["dense"]["scale"] == pytest.approx(1 / calib.env_reward.std(), rel=1e-5)
    assert scales["sparse"]["scale"] == pytest.approx(1 / calib.success.std(), rel=1e-5)
    assert scales["dense"]["success_weight"] == 0.0
    dense = sac_experiment.build_reward("dense", config, obs_dim=39, act_dim=4,
                                        scale=scales["dense"]["scale"])
    scaled = np.asarray(dense(calib))
    assert scaled.std() == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_array_equal(np.argsort(scaled), np.argsort(calib.env_reward))


def _variants(success_by_kind):
    return {kind: {"final": {"success_mean": float(np.mean(v))},
                   "per_seed": [{"seed": s, "final_success": x, "success_auc": x}
                                for s, x in enumerate(v)]}
            for kind, v in success_by_kind.items()}


def test_verdict_rule():
    quality = {"kinds": {"centered": {"gates_passed": True},
                         "centered+sparse": {"gates_passed": True}}}
    supported = _variants({"sparse": [0, 0.1, 0, 0.2, 0], "dense": [0.9, 0.8, 1, 0.9, 0.8],
                           "raw": [0, 0.1, 0, 0, 0.1], "centered": [0.5, 0.6, 0.4, 0.7, 0.5],
                           "centered+sparse": [0.8, 0.9, 0.8, 0.7, 0.9]})
    diffs = sac_experiment.comparisons(supported)
    assert diffs["centered+sparse - sparse"]["final_success"]["low"] > 0
    assert sac_experiment.verdict(supported, diffs, quality)["verdict"] == "supported"
    refuted = _variants({"sparse": [0, 0.1, 0, 0.2, 0], "dense": [0.9, 0.8, 1, 0.9, 0.8],
                         "raw": [0, 0.1, 0, 0, 0.1], "centered": [0, 0, 0, 0.1, 0],
                         "centered+sparse": [0.1, 0.0, 0.1, 0.1, 0.0]})
    diffs = sac_experiment.comparisons(refuted)
    assert sac_experiment.verdict(refuted, diffs, quality)["verdict"] == "refuted"
    failed_gates = {"kinds": {"centered": {"gates_passed": False}}}
    assert sac_experiment.verdict(refuted, diffs, failed_gates)["verdict"] == "inconclusive"
    partial = {k: v for k, v in refuted.items() if k != "raw"}
    assert sac_experiment.verdict(partial, sac_experiment.comparisons(partial),
                                  quality)["verdict"] == "inconclusive"


def test_paired_bootstrap_keeps_pairs_together():
    a, b = [0.9, 0.1, 0.5, 0.7, 0.3], [0.8, 0.0, 0.4, 0.6, 0.2]  # a = b + 0.1 in every pair
    ci = statistics.paired_bootstrap_ci(a, b)
    assert ci["low"] == pytest.approx(0.1) and ci["high"] == pytest.approx(0.1)
    ci = statistics.paired_bootstrap_ci([1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1])
    assert ci["low"] < 0 < ci["high"]


def test_demos_go_on_past_success(tmp_path):
    task = "button-press-v3"
    path = tmp_path / "demos.npz"
    episodes = md.load_or_collect(path, task, 1, seed=0, max_steps=200, progress=False,
                                  steps_after_success=7)
    ep = episodes[0]
    assert ep["success"] and len(ep["actions"]) == ep["success_step"] + 8
    inputs, _ = sac_experiment.expert_reward_inputs(episodes, 2)
    np.testing.assert_array_equal(inputs.success, np.arange(len(ep["actions"])) >= ep["success_step"])
    again, provenance = md.read_demo_cache(path)
    assert again[0]["success_step"] == ep["success_step"]
    assert provenance["steps_after_success"] == 7
    # The same request reuses the cache; another steps_after_success does not.
    assert md._provenance_mismatch(provenance, md._requested_provenance(
        task, 1, 0, 200, True, 7)) == []
    assert md._provenance_mismatch(provenance, md._requested_provenance(task, 1, 0, 200, True))


def test_bad_reward_inputs_fail_fast(tmp_path):
    config = config_lib.load("sweeps/sac.py:tiny", {"reward.action_space": "raw"})
    with pytest.raises(ValueError, match="action_space"):
        sac_experiment.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # NaN in a demo cache is refused when read, naming the array.
    episodes = md.collect_demos("button-press-v3", 1, seed=0, max_steps=200, progress=False)
    episodes[0]["actions"][3, 1] = np.nan
    path = tmp_path / "nan.npz"
    md.save_demo_cache(path, episodes, md._requested_provenance("button-press-v3", 1, 0, 200, True))
    with pytest.raises(md.DemoCacheError, match="actions holds NaN"):
        md.read_demo_cache(path)


def test_shared_reward_model_must_exist_be_complete_and_match(tmp_path):
    missing = config_lib.load("sweeps/sac.py:tiny", {"reward.model_dir": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="does not exist"):
        sac_experiment.train_and_evaluate(missing, str(tmp_path / "run"))
    partial_dir = tmp_path / "partial"
    partial_dir.mkdir()
    (partial_dir / sac_experiment.SPEC_FILE).write_text("{}")
    partial = config_lib.load("sweeps/sac.py:tiny", {"reward.model_dir": str(partial_dir)})
    with pytest.raises(ValueError, match=r"not a complete reward model: missing \['normalizers"):
        sac_experiment.train_and_evaluate(partial, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    # Trained on other reward inputs: refused by its spec.
    spec = {"task": "button-press-v3", "obs_shape": [2, 39], "action_shape": [1, 4],
            "normalization": {"obs_min_std": 0.01, "action_space": "standardized",
                              "action_min_std": 0.01}}
    (partial_dir / sac_experiment.SPEC_FILE).write_text(__import__("json").dumps(spec))
    with pytest.raises(ValueError, match="normalized as"):
        sac_experiment.check_saved_spec(str(partial_dir), "button-press-v3", (2, 39), (1, 4),
                                        sac_experiment._normalization_spec(partial))
