import json
import os

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from energyflow_jax.normalizer import Normalizer
from energyflow_jax.rewards import adversarial
from energyflow_jax.rewards import energy as rewards
from energyflow_jax.rl.sac import agent as sac
from energyflow_jax.rl.sac import loop as sac_loop


def toy_inputs(rng, n, expert: bool):
    """2-D states in [-1, 1]^2; the expert acts a = -s, the 'policy' uniformly at random."""
    k_state, k_action = jax.random.split(rng)
    s = jax.random.uniform(k_state, (n, 1, 2), minval=-1, maxval=1)
    a = -s[:, 0] if expert else jax.random.uniform(k_action, (n, 2), minval=-1, maxval=1)
    return rewards.RewardInputs(obs=s, action=a, env_reward=jnp.zeros(n), success=jnp.zeros(n))


def small_disc_config():
    config = adversarial.default_config()
    config.hidden_dims = (64, 64)
    config.batch_size = 128
    config.learning_rate = 1e-3
    config.grad_penalty = 0.0  # test the separation itself (the default 0.1 smooths it)
    return config


def test_discriminator_separates_expert_from_random_actions():
    expert = toy_inputs(jax.random.PRNGKey(0), 2048, expert=True)
    reward = rewards.make_reward_fn("adversarial", expert_inputs=expert,
                                    adversarial_config=small_disc_config())
    assert isinstance(reward, adversarial.AdversarialReward)
    assert isinstance(reward, rewards.LearnedReward)
    assert (reward.obs_dim, reward.act_dim, reward.obs_horizon) == (2, 2, 1)
    state = reward.init(jax.random.PRNGKey(1))

    @jax.jit
    def train(state, rng):
        def step(state, key):
            policy = toy_inputs(key, 128, expert=False)
            return reward.update(state, policy, jax.random.fold_in(key, 1))
        return jax.lax.scan(step, state, jax.random.split(rng, 500))

    state, metrics = train(state, jax.random.PRNGKey(2))
    assert metrics["disc/loss"][-50:].mean() < metrics["disc/loss"][:50].mean()

    held_expert = toy_inputs(jax.random.PRNGKey(10), 1000, expert=True)
    held_random = toy_inputs(jax.random.PRNGKey(11), 1000, expert=False)
    r_expert, r_random = reward.reward(state, held_expert), reward.reward(state, held_random)
    accuracy = 0.5 * (float((r_expert > 0).mean()) + float((r_random < 0).mean()))
    assert accuracy > 0.95, accuracy
    # The reward is on a unit-std scale (f over its running std): with the two classes
    # separated, their means sit about 2 std apart.
    assert float(r_expert.mean()) > float(r_random.mean()) + 1.5
    assert abs(float(state.logit_std) - float(metrics["disc/logit_std"][-20:].mean())) < 0.3 * float(state.logit_std)
    # As a reward: in the same states, the expert action beats random ones.
    alternatives = jax.random.uniform(jax.random.PRNGKey(12), (1000, 4, 2), minval=-1, maxval=1)
    quality = rewards.reward_quality(lambda x: reward.reward(state, x), held_expert,
                                     alternatives)
    assert quality["ranking_accuracy"] > 0.9


def test_adversarial_reward_trains_inside_sac_loop(tmp_path):
    # A Pendulum 'expert' that just pushes against the angular velocity: enough to check
    # the wiring (discriminator updated and rewards relabelled within the SAC step).
    rng = np.random.default_rng(0)
    theta = rng.uniform(-np.pi, np.pi, 512)
    omega = rng.uniform(-8, 8, 512)
    obs = np.stack([np.cos(theta), np.sin(theta), omega], -1)[:, None].astype(np.float32)
    actions = np.clip(-0.25 * omega, -2, 2)[:, None].astype(np.float32)
    config = small_disc_config()
    config.batch_size = 32
    reward = rewards.make_reward_fn("adversarial",
                                    expert_inputs=adversarial.expert_inputs_from_arrays(obs, actions),
                                    adversarial_config=config)

    sac_config = sac.default_config()
    sac_config.hidden_dims = (32, 32)
    sac_config.batch_size = 32
    sac_config.total_env_steps = 300
    sac_config.warmup_env_steps = 100
    sac_config.log_every = 100
    sac_config.eval_every = 300
    sac_config.eval_episodes = 1
    sac_config.checkpoint_every = 300
    sac_config.replay_capacity = 1000
    env = lambda: gym.make("Pendulum-v1", max_episode_steps=50)
    workdir = str(tmp_path / "run")
    sac_loop.train_sac(sac_config, [env], reward, workdir, progress=False)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert np.isfinite(last["train/disc/loss"]) and "train/disc/accuracy" in last
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["300"]

    # The discriminator state (with its expert data) is checkpointed: a longer run resumes.
    sac_config.total_env_steps = 400
    sac_config.eval_every = 400
    sac_loop.train_sac(sac_config, [env], reward, workdir, progress=False)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [100, 200, 300, 400]


def test_adversarial_features_use_the_reward_models_normalizers():
    expert = toy_inputs(jax.random.PRNGKey(0), 64, expert=True)
    obs_norm = Normalizer(mean=jnp.array([0.5, -0.5]), std=jnp.array([0.2, 4.0]))
    act_norm = Normalizer(mean=jnp.array([0.1, 0.0]), std=jnp.array([1.0, 0.5]))
    reward = rewards.make_reward_fn("adversarial", expert_inputs=expert,
                                    adversarial_config=small_disc_config(),
                                    obs_normalizer=obs_norm,
                                    action_normalizer=act_norm)
    state = reward.init(jax.random.PRNGKey(1))
    batch = toy_inputs(jax.random.PRNGKey(2), 8, expert=False)
    expected = jnp.concatenate([obs_norm.normalize(batch.obs).reshape(8, -1),
                                act_norm.normalize(batch.action)], -1)
    np.testing.assert_allclose(adversarial._features(state, batch), expected, rtol=1e-6)
