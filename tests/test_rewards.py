import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import chex
import scipy.stats

from energyflow_jax.objectives import dsm
from energyflow_jax.rewards import energy as rewards

OBS_DIM, ACT_DIM, OBS_HORIZON = 3, 2, 2


def quadratic_energy(params, a, s, t):
    """Stand-in energy: E = ||a - tanh(s W)||^2 / 2 + c(s), a (B, 1, A), s (B, H, O)."""
    target = jnp.tanh(s.reshape(s.shape[0], -1) @ params["w"])  # the 'expert' action
    offset = params["offset_scale"] * jnp.sin(3.0 * s).sum(axis=(1, 2))  # state-only c(s)
    return 0.5 * ((a[:, 0] - target) ** 2).sum(-1) / (1.0 + t) + offset


def make_params(offset_scale=0.0, obs_dim=OBS_DIM):
    w = jax.random.normal(jax.random.PRNGKey(1), (OBS_HORIZON * obs_dim, ACT_DIM))
    return {"w": w, "offset_scale": jnp.asarray(offset_scale)}


def random_inputs(rng, batch=8):
    k1, k2, k3 = jax.random.split(rng, 3)
    return rewards.RewardInputs(
        obs=jax.random.normal(k1, (batch, OBS_HORIZON, OBS_DIM)),
        action=jax.random.uniform(k2, (batch, ACT_DIM), minval=-1, maxval=1),
        env_reward=jax.random.normal(k3, (batch,)),
        success=(jnp.arange(batch) % 2).astype(jnp.float32),
    )


def energy_reward(kind, offset_scale=0.0, **kwargs):
    return rewards.make_reward_fn(
        kind, energy_fn=functools.partial(quadratic_energy, make_params(offset_scale)),
        obs_dim=OBS_DIM, act_dim=ACT_DIM, obs_horizon=OBS_HORIZON, **kwargs)


def test_centered_reward_invariant_to_state_offset_raw_is_not():
    inputs = random_inputs(jax.random.PRNGKey(0))
    raw0, raw1 = energy_reward("raw")(inputs), energy_reward("raw", offset_scale=5.0)(inputs)
    cen0 = energy_reward("centered")(inputs)
    cen1 = energy_reward("centered", offset_scale=5.0)(inputs)
    assert np.max(np.abs(raw0 - raw1)) > 1.0  # c(s) moves the raw reward ...
    np.testing.assert_allclose(cen0, cen1, atol=1e-5)  # ... and cancels when centered


def test_pure_functions_match_definitions():
    params = make_params(2.0)
    energy = functools.partial(quadratic_energy, params)
    s = jax.random.normal(jax.random.PRNGKey(0), (4, OBS_HORIZON, OBS_DIM))
    a = jax.random.normal(jax.random.PRNGKey(1), (4, 1, ACT_DIM))
    refs = rewards.make_reference_actions(jax.random.PRNGKey(2), 16, 1, ACT_DIM)
    assert refs.shape == (16, 1, ACT_DIM)
    gamma = 1e-3
    t = jnp.full((4,), gamma)
    np.testing.assert_allclose(rewards.raw_energy_reward(energy, s, a, gamma), -energy(a, s, t))
    expected = -(energy(a, s, t) - jnp.stack(
        [energy(jnp.broadcast_to(r, a.shape), s, t) for r in refs]).mean(0))
    got = jax.jit(rewards.centered_energy_reward, static_argnums=0)(energy, s, a, refs, gamma)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_environment_kinds_and_success_bonus():
    inputs = random_inputs(jax.random.PRNGKey(0))
    np.testing.assert_allclose(rewards.make_reward_fn("sparse")(inputs), inputs.success)
    np.testing.assert_allclose(rewards.make_reward_fn("dense")(inputs), inputs.env_reward)
    raw = energy_reward("raw")(inputs)
    np.testing.assert_allclose(energy_reward("raw+sparse", success_weight=3.0)(inputs),
                               raw + 3.0 * inputs.success, rtol=1e-6)
    cen = energy_reward("centered")(inputs)
    np.testing.assert_allclose(energy_reward("centered+sparse")(inputs), cen + inputs.success,
                               rtol=1e-6)
    bonus = rewards.with_success_bonus(rewards.dense_reward, 2.0)
    np.testing.assert_allclose(bonus(inputs), inputs.env_reward + 2.0 * inputs.success)


def test_reward_is_a_pytree_with_traced_energy_params():
    reward = energy_reward("centered")
    leaves = jax.tree.leaves(reward)
    assert any(leaf.shape == (OBS_HORIZON * OBS_DIM, ACT_DIM) for leaf in leaves)
    inputs = random_inputs(jax.random.PRNGKey(0))
    np.testing.assert_allclose(jax.jit(lambda r, x: r(x))(reward, inputs), reward(inputs),
                               atol=1e-5)


def test_make_reward_fn_refuses_bad_requests():
    with pytest.raises(ValueError, match="unknown reward kind"):
        rewards.make_reward_fn("shaped")
    with pytest.raises(ValueError, match="pred_horizon=1"):
        energy_reward("raw", pred_horizon=16)
    with pytest.raises(ValueError, match="energy_fn"):
        rewards.make_reward_fn("centered", obs_dim=3, act_dim=2)


def test_compatibility_check():
    reward = energy_reward("raw")
    rewards.check_reward_compatibility(reward, OBS_DIM, ACT_DIM)
    with pytest.raises(ValueError, match="obs_dim=3 but the environment has obs_dim=39"):
        rewards.check_reward_compatibility(reward, 39, ACT_DIM)
    # Declared dims that lie about the model: caught by tracing it on the env's shapes.
    liar = rewards.make_reward_fn(
        "raw", energy_fn=functools.partial(quadratic_energy, make_params(obs_dim=5)),
        obs_dim=OBS_DIM, act_dim=ACT_DIM, obs_horizon=OBS_HORIZON)
    with pytest.raises(ValueError, match="cannot score transitions"):
        rewards.check_reward_compatibility(liar, OBS_DIM, ACT_DIM)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 50).astype(float)
    y = x + rng.normal(size=50)
    np.testing.assert_allclose(rewards._spearman(x, y), scipy.stats.spearmanr(x, y)[0])
    np.testing.assert_allclose(rewards._pearson(x, y), scipy.stats.pearsonr(x, y)[0])
    # Undefined correlations are NaN (a constant reward, a one-step episode).
    assert np.isnan(rewards._spearman(np.ones(5), y[:5]))
    assert np.isnan(rewards._pearson(x[:1], y[:1]))


def test_reward_quality_on_a_known_energy():
    params = make_params(offset_scale=5.0)
    rng = jax.random.PRNGKey(0)
    states = jax.random.normal(rng, (64, OBS_HORIZON, OBS_DIM))
    expert_actions = jnp.tanh(states.reshape(64, -1) @ params["w"])  # energy minimizers
    expert = rewards.RewardInputs(obs=states, action=expert_actions,
                                  env_reward=jnp.zeros(64), success=jnp.zeros(64))
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    alternatives = jnp.concatenate([
        rewards.perturb_actions(k1, expert_actions, 4, noise_scale=0.3),
        rewards.random_actions(k2, 64, 4, ACT_DIM)], axis=1)
    # Trajectory transitions whose dense reward is exactly the within-state ranking.
    traj_actions = rewards.random_actions(jax.random.PRNGKey(4), 64, 1, ACT_DIM)[:, 0]
    dense = -0.5 * ((traj_actions - expert_actions) ** 2).sum(-1)
    traj = expert.replace(action=traj_actions, env_reward=dense)
    episode_ids = np.repeat(np.arange(4), 16)

    raw = rewards.reward_quality(energy_reward("raw", offset_scale=5.0), expert, alternatives,
                                 traj, episode_ids)
    assert raw["ranking_accuracy"] > 0.99  # within a state the offset does not matter
    assert raw["spearman"] < 0.9  # across states c(s) scrambles the raw reward
    exact = rewards.reward_quality(energy_reward("raw", offset_scale=0.0), expert, alternatives,
                                   traj, episode_ids)
    np.testing.assert_allclose([exact["spearman"], exact["pearson"],
                                exact["spearman_within_episode"]], 1.0, atol=1e-5)
    flipped = rewards.reward_quality(lambda x: -energy_reward("raw")(x), expert, alternatives)
    assert flipped["ranking_accuracy"] < 0.01


SMALL_SCHEDULE = dsm.VESchedule(sigma_min=0.01, sigma_max=1.0)  # stable Euler steps on E


def test_advantage_is_zero_at_the_models_own_action_and_ignores_state_offsets():
    inputs = random_inputs(jax.random.PRNGKey(0))
    params = make_params(offset_scale=5.0)
    energy = functools.partial(quadratic_energy, params)
    s = inputs.obs
    a_hat = rewards.model_action(energy, s, jnp.zeros((8, 1, ACT_DIM)), SMALL_SCHEDULE)
    chex.assert_shape(a_hat, (8, 1, ACT_DIM))
    reward = energy_reward("advantage", offset_scale=5.0, schedule=SMALL_SCHEDULE)
    own = reward(inputs.replace(action=a_hat[:, 0]))
    np.testing.assert_allclose(own, 0.0, atol=1e-5)
    # Any other action: the energy gap to the model's sample, free of the state offset c(s).
    other = reward(inputs)
    t = jnp.full((8,), 1e-3)
    expected = -(energy(inputs.action[:, None], s, t) - energy(a_hat, s, t))
    np.testing.assert_allclose(other, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(other, energy_reward("advantage", schedule=SMALL_SCHEDULE)(inputs),
                               atol=1e-4)
    # The energy's minimizer scores at least as well as the model's own sample.
    target = jnp.tanh(s.reshape(8, -1) @ params["w"])
    assert np.all(np.asarray(reward(inputs.replace(action=target))) >= -1e-6)
    with pytest.raises(ValueError, match="schedule"):
        energy_reward("advantage")


def test_scale_leaves_rankings_unchanged():
    params = make_params(offset_scale=1.0)
    states = jax.random.normal(jax.random.PRNGKey(0), (32, OBS_HORIZON, OBS_DIM))
    actions = jax.random.uniform(jax.random.PRNGKey(1), (32, ACT_DIM), minval=-1, maxval=1)
    expert = rewards.RewardInputs(obs=states, action=actions, env_reward=jnp.zeros(32),
                                  success=jnp.zeros(32))
    alternatives = rewards.perturb_actions(jax.random.PRNGKey(2), actions, 8, 0.3)
    for kind in ("raw", "centered", "advantage"):
        kwargs = dict(offset_scale=1.0, schedule=SMALL_SCHEDULE)
        base = rewards.reward_quality(energy_reward(kind, **kwargs), expert, alternatives)
        scaled = rewards.reward_quality(energy_reward(kind, scale=0.01, **kwargs), expert,
                                        alternatives)
        assert scaled["ranking_accuracy"] == base["ranking_accuracy"]
        np.testing.assert_allclose(scaled["expert_reward_mean"], 0.01 * base["expert_reward_mean"],
                                   rtol=1e-4, atol=1e-7)
    del params
