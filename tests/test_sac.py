import json
import os
import shutil
import time

import chex
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax.rewards import energy as rewards
from energyflow_jax.rl.sac import agent as sac
from energyflow_jax.rl.sac import loop as sac_loop
from energyflow_jax.rl.sac import replay

DENSE = rewards.make_reward_fn("dense")  # one object, so compiled steps are reused


def pendulum():
    return gym.make("Pendulum-v1")


# ----------------------------------------------------------------------------- replay


def test_replay_insert_wraps_around_and_samples_filled_slots():
    example = {"x": np.zeros(2, np.float32), "r": np.zeros((), np.float32)}
    buf = replay.ReplayBuffer.create(example, capacity=5)
    insert = jax.jit(replay.insert, donate_argnums=0)
    for start in (0, 3):  # 3 + 3 rows: the second insert wraps to slots 3, 4, 0
        rows = jnp.arange(start, start + 3, dtype=jnp.float32)
        buf = insert(buf, {"x": jnp.stack([rows, rows], 1), "r": rows})
    assert int(buf.size) == 5 and int(buf.insert_index) == 1
    np.testing.assert_array_equal(buf.data["r"], [5, 1, 2, 3, 4])
    np.testing.assert_array_equal(buf.data["x"][:, 1], [5, 1, 2, 3, 4])

    part = replay.ReplayBuffer.create(example, capacity=100)
    part = insert(part, {"x": jnp.ones((3, 2)), "r": jnp.arange(1.0, 4.0)})
    batch = jax.jit(replay.sample, static_argnums=2)(part, jax.random.PRNGKey(0), (4, 64))
    assert batch["r"].shape == (4, 64) and batch["x"].shape == (4, 64, 2)
    assert set(np.unique(batch["r"]).tolist()) == {1.0, 2.0, 3.0}  # never an empty slot


# ------------------------------------------------------------------------------ agent


def small_config(**overrides):
    config = sac.default_config()
    config.hidden_dims = (32, 32)
    config.batch_size = 32
    for key, value in overrides.items():
        config[key] = value
    return config


def test_update_is_pure_and_moves_targets_by_tau():
    obs_dim, act_dim = 3, 2
    agent = sac.SACAgent.create(jax.random.PRNGKey(0), obs_dim, act_dim, small_config())
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    batch = {
        "obs": jax.random.normal(keys[0], (32, obs_dim)),
        "actions": jax.random.uniform(keys[1], (32, act_dim), minval=-1, maxval=1),
        "rewards": jax.random.normal(keys[2], (32,)),
        "masks": jnp.ones(32),
        "next_obs": jax.random.normal(keys[0], (32, obs_dim)),
    }
    step = jax.jit(sac.update)
    new_agent, metrics = step(agent, batch)
    again, _ = step(agent, batch)  # same input -> same output: no hidden state
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), new_agent, again)
    assert all(jax.tree.leaves(chex_equal))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    expected_target = jax.tree.map(lambda new, old: 0.005 * new + 0.995 * old,
                                   new_agent.critic.params, agent.target_critic_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 new_agent.target_critic_params, expected_target)
    assert new_agent.target_entropy == -act_dim

    obs = jax.random.normal(keys[0], (7, obs_dim))
    stochastic = sac.sample_actions(new_agent, jax.random.PRNGKey(2), obs)
    deterministic = sac.eval_actions(new_agent, obs)
    for actions in (stochastic, deterministic):
        assert actions.shape == (7, act_dim) and float(jnp.abs(actions).max()) <= 1.0


def test_scan_updates_runs_utd_steps_from_buffer():
    obs_dim, act_dim = 3, 1
    agent = sac.SACAgent.create(jax.random.PRNGKey(0), obs_dim, act_dim, small_config())
    example = {"obs": np.zeros(obs_dim, np.float32), "actions": np.zeros(act_dim, np.float32),
               "rewards": np.zeros((), np.float32), "masks": np.zeros((), np.float32),
               "next_obs": np.zeros(obs_dim, np.float32)}
    buf = replay.ReplayBuffer.create(example, 64)
    buf = replay.insert(buf, jax.tree.map(lambda x: jnp.ones((64, *x.shape)), example))
    run = jax.jit(sac.scan_updates, static_argnums=(3, 4))
    new_agent, _, metrics = run(agent, buf, jax.random.PRNGKey(1), 4, 16)
    assert int(new_agent.critic.step) == 4 and int(new_agent.actor.step) == 4
    assert metrics["critic_loss"].shape == ()


# ---------------------------------------------------------------------- training loop


def test_mismatched_reward_model_is_refused_before_training(tmp_path):
    energy = lambda a, s, t: (a ** 2).sum((1, 2)) + 0 * s.sum((1, 2))
    metaworld_reward = rewards.make_reward_fn("centered", energy_fn=energy, obs_dim=39,
                                              act_dim=4, obs_horizon=2)
    with pytest.raises(ValueError, match="obs_dim=39 but the environment has obs_dim=3"):
        sac_loop.train_sac(small_config(), [pendulum], metaworld_reward, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # nothing started, nothing written


class _KillAfter(gym.Wrapper):
    """Raises (like a SIGKILL would stop the run) once `counter` env steps were taken."""

    def __init__(self, env, counter, limit):
        super().__init__(env)
        self.counter, self.limit = counter, limit

    def step(self, action):
        self.counter["steps"] += 1
        if self.counter["steps"] > self.limit:
            raise KeyboardInterrupt("simulated kill")
        return self.env.step(action)


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        r.pop("sps", None)  # wall-clock dependent
    return records


def short_pendulum():
    return gym.make("Pendulum-v1", max_episode_steps=50)


def test_killed_run_resumes_bit_identically(tmp_path):
    # 2 envs x 50-step episodes: every 100 env steps is an episode boundary of both.
    config = small_config(total_env_steps=400, warmup_env_steps=100, checkpoint_every=200,
                          log_every=100, eval_every=200, eval_episodes=1,
                          replay_capacity=1000)
    envs = [short_pendulum] * 2
    full_dir, killed_dir = str(tmp_path / "full"), str(tmp_path / "killed")
    full_agent, full_eval = sac_loop.train_sac(config, envs, DENSE, full_dir, progress=False)

    counter = {"steps": 0}
    killing = lambda: _KillAfter(short_pendulum(), counter, limit=300)  # between checkpoints
    with pytest.raises(KeyboardInterrupt):
        sac_loop.train_sac(config, [killing] * 2, DENSE, killed_dir,
                           eval_env_fn=short_pendulum, progress=False)
    assert sorted(os.listdir(os.path.join(killed_dir, "checkpoints"))) == ["200"]

    resumed_agent, resumed_eval = sac_loop.train_sac(config, envs, DENSE, killed_dir,
                                                     progress=False)
    full_leaves, resumed_leaves = jax.tree.leaves(full_agent), jax.tree.leaves(resumed_agent)
    assert len(full_leaves) == len(resumed_leaves)
    assert all(np.array_equal(a, b) for a, b in zip(full_leaves, resumed_leaves))
    assert resumed_eval == full_eval
    assert _read_metrics(killed_dir) == _read_metrics(full_dir)  # log trimmed, then redone

    # Other learner settings must not continue this run's checkpoint.
    other = small_config(**{**config.to_dict(), "actor_lr": 1e-3})
    with pytest.raises(ValueError, match="actor_lr"):
        sac_loop.train_sac(other, envs, DENSE, killed_dir, progress=False)


def _group_config():
    # 2 envs x 50-step episodes: every 100 env steps is an episode boundary of both.
    return small_config(total_env_steps=400, warmup_env_steps=100, checkpoint_every=200,
                        log_every=100, eval_every=200, eval_episodes=1, replay_capacity=1000)


def test_seed_group_runs_each_seed_as_its_own_run(tmp_path):
    config = _group_config()
    config.seed = 1
    alone, alone_eval = sac_loop.train_sac(config, [short_pendulum] * 2, DENSE,
                                           str(tmp_path / "alone"), progress=False)
    group = sac_loop.train_sac_seeds(config, [0, 1], [[short_pendulum] * 2] * 2, DENSE,
                                     [str(tmp_path / "g0"), str(tmp_path / "g1")], progress=False)
    (agent0, _), (agent1, eval1) = group
    chex.assert_trees_all_equal_shapes(agent1, alone)
    # The same run as seed 1 alone, up to float rounding (the batched matmuls of a group
    # of 2 round differently from those of a group of 1) ...
    chex.assert_trees_all_close(agent1, alone, rtol=1e-4, atol=1e-5)
    assert eval1["eval/return"] == pytest.approx(alone_eval["eval/return"], rel=1e-4)
    # ... and not seed 0's.
    assert not np.allclose(agent0.actor.params["Dense_0"]["kernel"],
                           agent1.actor.params["Dense_0"]["kernel"])
    assert _read_metrics(str(tmp_path / "g1"))[0]["step"] == 100  # one log per run


def test_group_resumes_at_the_step_all_its_runs_saved(tmp_path, capfd):
    config = _group_config()
    envs = [[short_pendulum] * 2] * 2
    full = [str(tmp_path / f"full{k}") for k in range(2)]
    killed = [str(tmp_path / f"killed{k}") for k in range(2)]
    full_out = sac_loop.train_sac_seeds(config, [0, 1], envs, DENSE, full, progress=False)
    sac_loop.train_sac_seeds(config, [0, 1], envs, DENSE, killed, progress=False)
    # A kill between the two saves of step 400: run 0 saved it, run 1 did not.
    shutil.rmtree(os.path.join(killed[1], "checkpoints", "400"))
    capfd.readouterr()
    resumed = sac_loop.train_sac_seeds(config, [0, 1], envs, DENSE, killed, progress=False)
    assert "checkpoint step 400" in capfd.readouterr().err
    assert [n.split("-")[0] for n in os.listdir(os.path.join(killed[0], "checkpoints-quarantine"))] == ["400"]
    for (agent, evals), (full_agent, full_evals) in zip(resumed, full_out):
        chex.assert_trees_all_equal(agent, full_agent)  # same group: bit-identical
        assert evals == full_evals
    assert [_read_metrics(w) for w in killed] == [_read_metrics(w) for w in full]


def test_seed_group_refuses_shared_workdirs_and_repeated_seeds(tmp_path):
    config = _group_config()
    with pytest.raises(ValueError, match="distinct seeds"):
        sac_loop.train_sac_seeds(config, [0, 0], [[short_pendulum]] * 2, DENSE,
                                 [str(tmp_path / "a"), str(tmp_path / "b")], progress=False)
    with pytest.raises(ValueError, match="its own workdir"):
        sac_loop.train_sac_seeds(config, [0, 1], [[short_pendulum]] * 2, DENSE,
                                 [str(tmp_path / "a")] * 2, progress=False)
    assert not os.path.exists(tmp_path / "a")


@pytest.mark.slow  # ~70 s on 2 cores
def test_sac_learns_pendulum(tmp_path):
    # Random policy: about -1200. 6k env steps, 128-unit nets: ~1 minute on 2 cores.
    config = sac.default_config()
    config.hidden_dims = (128, 128)
    config.total_env_steps = 6_000
    config.warmup_env_steps = 1_000
    config.eval_every = 6_000
    config.eval_episodes = 5
    config.log_every = 1_000
    config.checkpoint_every = 6_000
    config.replay_capacity = 10_000
    start = time.time()
    _, eval_metrics = sac_loop.train_sac(config, [pendulum], DENSE, str(tmp_path / "run"),
                                         progress=False)
    print(f"pendulum eval return {eval_metrics['eval/return']:.1f} "
          f"after {config.total_env_steps} steps in {time.time() - start:.0f}s")
    assert eval_metrics["eval/return"] > -400


def test_metaworld_evaluator_runs_the_horizon_on_new_layouts_each_evaluation():
    from energyflow_jax.experiments.sac import MetaWorldEvaluator

    def zero_actor(obs):
        assert obs.shape == (2, 39) and obs.dtype == np.float32  # one batched call per step
        return np.zeros((len(obs), 4), np.float32)

    make = lambda: MetaWorldEvaluator("coffee-button-v3", 4, seed=3, max_steps=12,  # noqa: E731
                                      n_evaluations=2, num_envs=2)
    first, again = make(), make()
    try:
        one, two = first(zero_actor, 1), first(zero_actor, 2)
        assert one["eval/length"] == two["eval/length"] == 12  # the full horizon
        assert one["eval/success"] == 0.0
        # Evaluation 2 plays other layouts; a new evaluator replays evaluation 1's exactly.
        assert one["eval/return"] != two["eval/return"]
        assert again(zero_actor, 1) == one
        with pytest.raises(ValueError, match="planned for 2"):
            first(zero_actor, 3)
    finally:
        first.close(), again.close()
