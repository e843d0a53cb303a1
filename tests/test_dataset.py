"""Windows, padding, normalization and on-device batch sampling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax.data.windows import (
    Dataset,
    Normalizer,
    make_dataset,
    make_windows,
    sample_batch,
    validate_episodes,
)


def _episode(length, obs_dim=3, act_dim=2, offset=0.0):
    # obs[t] = offset + t in every dim, actions[t] = offset + 100 + t: values
    # identify their step, so window contents can be checked exactly.
    t = np.arange(length, dtype=np.float32)[:, None]
    return {
        "obs": np.repeat(offset + t, obs_dim, axis=1),
        "actions": np.repeat(offset + 100.0 + t, act_dim, axis=1),
    }


def test_windows_exact_with_start_and_end_padding():
    episodes = [_episode(4), _episode(2, offset=1000.0)]
    obs, actions = make_windows(episodes, obs_horizon=2, pred_horizon=3)
    chex.assert_shape(obs, (6, 2, 3))
    chex.assert_shape(actions, (6, 3, 2))
    expected_obs_steps = [[0, 0], [0, 1], [1, 2], [2, 3], [1000, 1000], [1000, 1001]]
    expected_act_steps = [
        [100, 101, 102], [101, 102, 103], [102, 103, 103], [103, 103, 103],
        [1100, 1101, 1101], [1101, 1101, 1101],
    ]
    np.testing.assert_array_equal(obs[:, :, 0], np.array(expected_obs_steps, np.float32))
    np.testing.assert_array_equal(actions[:, :, 0], np.array(expected_act_steps, np.float32))
    # Padding never crosses episodes: all values of a window come from one episode.
    assert np.all((np.asarray(obs) >= 1000) == (np.asarray(obs)[:, :1, :1] >= 1000))


def test_windows_longer_than_episode_and_horizon_one():
    obs, actions = make_windows([_episode(1)], obs_horizon=3, pred_horizon=4)
    np.testing.assert_array_equal(obs[0, :, 0], [0, 0, 0])
    np.testing.assert_array_equal(actions[0, :, 0], [100, 100, 100, 100])
    obs, actions = make_windows([_episode(3)], obs_horizon=1, pred_horizon=1)
    np.testing.assert_array_equal(obs[:, 0, 0], [0, 1, 2])
    np.testing.assert_array_equal(actions[:, 0, 0], [100, 101, 102])


def test_normalizer_round_trip_and_std_floor():
    x = jax.random.normal(jax.random.PRNGKey(0), (500, 4)) * jnp.array([2.0, 0.5, 1.0, 0.0]) + 3.0
    norm = Normalizer.fit(x, min_std=1e-2)
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(x)), x, rtol=1e-5, atol=1e-5)
    z = norm.normalize(x)
    np.testing.assert_allclose(z[:, :3].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[:, :3].std(0), 1.0, atol=1e-4)
    assert float(norm.std[3]) == pytest.approx(1e-2)  # constant feature: floored, not 0
    assert np.all(np.isfinite(z))
    # A pytree: usable as a jit argument.
    np.testing.assert_allclose(jax.jit(lambda n, v: n.normalize(v))(norm, x), z, rtol=1e-6)


def test_dataset_normalized_and_sample_batch_jits():
    rng = np.random.default_rng(0)
    episodes = [
        {"obs": rng.normal(size=(n, 5)).astype(np.float32), "actions": rng.uniform(-1, 1, (n, 4))}
        for n in (30, 17, 41)
    ]
    data = make_dataset(episodes, obs_horizon=2, pred_horizon=16)
    assert isinstance(data, Dataset)
    assert data.num_windows == 88 and data.obs_horizon == 2 and data.pred_horizon == 16
    assert data.obs.dtype == jnp.float32 and data.actions.dtype == jnp.float32
    raw_obs, raw_actions = make_windows(episodes, 2, 16)
    np.testing.assert_allclose(data.action_normalizer.unnormalize(data.actions), raw_actions, atol=1e-5)
    np.testing.assert_allclose(data.obs_normalizer.unnormalize(data.obs), raw_obs, atol=1e-5)

    draw = jax.jit(sample_batch, static_argnums=2)
    batch = draw(data, jax.random.PRNGKey(1), 64)
    chex.assert_shape(batch["obs"], (64, 2, 5))
    chex.assert_shape(batch["actions"], (64, 16, 4))
    chex.assert_type([batch["obs"], batch["actions"]], jnp.float32)
    # Every sampled window is one of the dataset's windows.
    rows = np.asarray(data.actions).reshape(data.num_windows, -1)
    for row in np.asarray(batch["actions"]).reshape(64, -1)[:8]:
        assert np.any(np.all(np.isclose(rows, row), axis=1))
    # Different keys give different batches; also drawable inside a scan.
    other = draw(data, jax.random.PRNGKey(2), 64)
    assert not np.array_equal(batch["obs"], other["obs"])

    @jax.jit
    def scanned(dataset, key):
        def body(carry, k):
            return carry + sample_batch(dataset, k, 8)["actions"].sum(), None
        return jax.lax.scan(body, 0.0, jax.random.split(key, 3))[0]

    assert np.isfinite(float(scanned(data, jax.random.PRNGKey(3))))


def test_nan_and_shape_errors_name_the_episode():
    good = _episode(5)
    bad = _episode(5)
    bad["obs"] = bad["obs"].copy()
    bad["obs"][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"episode 1: obs has 1 non-finite"):
        make_windows([good, bad], 2, 4)
    inf_actions = {**_episode(5), "actions": np.full((5, 2), np.inf, np.float32), "config_index": 7}
    with pytest.raises(ValueError, match=r"episode 1 \(config_index 7\).*actions"):
        make_dataset([good, inf_actions], 2, 4)
    with pytest.raises(ValueError, match=r"episode 1 has obs_dim 4"):
        validate_episodes([good, _episode(5, obs_dim=4)])
    with pytest.raises(ValueError, match=r"episode 0: 5 observations but 4 actions"):
        validate_episodes([{"obs": good["obs"], "actions": good["actions"][:4]}])
    with pytest.raises(ValueError, match="no episodes"):
        validate_episodes([])
