"""The Soft Actor-Critic learner in pure JAX: one immutable pytree and pure updates.

The whole learner is one immutable pytree (`SACAgent`): actor, twin critics, their
Polyak-averaged targets, the temperature and the agent's RNG. `update` is a pure
function of (agent, batch); `scan_updates` runs several of them per environment step
with `lax.scan` (the update-to-data ratio), sampling each batch from the device-resident
replay buffer inside the compiled loop.

The host-side training loop that steps environments and checkpoints runs is
`energyflow_jax.rl.sac.loop.train_sac`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from flax.training.train_state import TrainState

from energyflow_jax.rewards import energy as rewards_lib
from energyflow_jax.training.state import strong_types
from energyflow_jax.rl.sac import replay as replay_lib
from energyflow_jax.rl.sac.networks import CriticEnsemble, TanhGaussianActor, Temperature

Batch = dict[str, jax.Array]

def default_config() -> ml_collections.ConfigDict:
    """SAC hyperparameters and training-loop settings (env steps count all envs)."""
    c = ml_collections.ConfigDict()
    # Learner.
    c.hidden_dims = (256, 256)
    c.num_critics = 2
    c.critic_layer_norm = False
    c.actor_lr = 3e-4
    c.critic_lr = 3e-4
    c.temp_lr = 3e-4
    c.discount = 0.99
    c.tau = 0.005  # Polyak rate of the target critics
    c.init_temperature = 1.0
    c.target_entropy = ml_collections.config_dict.placeholder(float)  # None -> -act_dim
    c.backup_entropy = True  # include -alpha log pi in the critic target
    # Loop.
    c.seed = 0
    c.total_env_steps = 100_000
    c.warmup_env_steps = 1_000  # uniform random actions, no updates
    c.batch_size = 256
    c.utd_ratio = 1  # gradient updates per environment step
    c.replay_capacity = 1_000_000
    c.log_every = 1_000
    c.eval_every = 10_000
    c.eval_episodes = 5
    c.checkpoint_every = 10_000
    c.max_checkpoints = 2
    return c


# ------------------------------------------------------------------------------ agent


# apply_fn and tx are static fields of the agent pytree, compared by identity when jit
# looks up a compiled step. Sharing one module / optimizer object per configuration lets
# agents created again in the same process (a resumed run, a sweep, tests) reuse it.
@functools.lru_cache(maxsize=None)
def _module(cls, *args):
    return cls(*args)


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


class SACAgent(struct.PyTreeNode):
    rng: jax.Array
    actor: TrainState
    critic: TrainState
    target_critic_params: Any
    temp: TrainState
    discount: float = struct.field(pytree_node=False)
    tau: float = struct.field(pytree_node=False)
    target_entropy: float = struct.field(pytree_node=False)
    backup_entropy: bool = struct.field(pytree_node=False)

    @classmethod
    def create(cls, rng: jax.Array, obs_dim: int, act_dim: int,
               config: ml_collections.ConfigDict) -> "SACAgent":
        rng, actor_key, critic_key, temp_key = jax.random.split(rng, 4)
        obs = jnp.zeros((1, obs_dim))
        act = jnp.zeros((1, act_dim))
        hidden = tuple(config.hidden_dims)

        actor_def = _module(TanhGaussianActor, hidden, act_dim)
        actor = TrainState.create(apply_fn=actor_def.apply,
                                  params=actor_def.init(actor_key, obs)["params"],
                                  tx=_adam(config.actor_lr))
        critic_def = _module(CriticEnsemble, hidden, config.num_critics,
                             config.critic_layer_norm)
        critic_params = critic_def.init(critic_key, obs, act)["params"]
        critic = TrainState.create(apply_fn=critic_def.apply, params=critic_params,
                                   tx=_adam(config.critic_lr))
        temp_def = _module(Temperature, float(config.init_temperature))
        temp = TrainState.create(apply_fn=temp_def.apply,
                                 params=temp_def.init(temp_key)["params"],
                                 tx=_adam(config.temp_lr))
        target_entropy = config.target_entropy
        if target_entropy is None:
            target_entropy = -float(act_dim)
        # A copy, not an alias: the training step donates the agent's buffers.
        target_params = jax.tree.map(jnp.copy, critic_params)
        agent = cls(rng=rng, actor=actor, critic=critic, target_critic_params=target_params,
                    temp=temp, discount=float(config.discount), tau=float(config.tau),
                    target_entropy=float(target_entropy),
                    backup_entropy=bool(config.backup_entropy))
        return strong_types(agent)


def _critic_loss(critic_params, agent: SACAgent, batch: Batch, rng: jax.Array):
    next_dist = agent.actor.apply_fn({"params": agent.actor.params}, batch["next_obs"])
    next_actions, next_log_probs = next_dist.sample_and_log_prob(seed=rng)
    next_q = agent.critic.apply_fn({"params": agent.target_critic_params},
                                   batch["next_obs"], next_actions).min(axis=0)
    if agent.backup_entropy:
        alpha = agent.temp.apply_fn({"params": agent.temp.params})
        next_q = next_q - alpha * next_log_probs
    # masks = 0 only on true termination; time-limit truncation still bootstraps.
    target_q = batch["rewards"] + agent.discount * batch["masks"] * next_q
    q = agent.critic.apply_fn({"params": critic_params}, batch["obs"], batch["actions"])
    loss = ((q - jax.lax.stop_gradient(target_q)[None]) ** 2).mean()
    return loss, {"critic_loss": loss, "q": q.mean(), "target_q": target_q.mean()}


def _actor_loss(actor_params, agent: SACAgent, batch: Batch, rng: jax.Array):
    dist = agent.actor.apply_fn({"params": actor_params}, batch["obs"])
    actions, log_probs = dist.sample_and_log_prob(seed=rng)
    q = agent.critic.apply_fn({"params": agent.critic.params}, batch["obs"], actions).mean(0)
    alpha = agent.temp.apply_fn({"params": agent.temp.params})
    loss = (alpha * log_probs - q).mean()
    return loss, {"actor_loss": loss, "entropy": -log_probs.mean()}


def _temp_loss(temp_params, agent: SACAgent, entropy: jax.Array):
    alpha = agent.temp.apply_fn({"params": temp_params})
    # Raise alpha when the policy's entropy falls below the target, lower it otherwise.
    loss = alpha * (entropy - agent.target_entropy)
    return loss, {"temp_loss": loss, "alpha": alpha}


def update(agent: SACAgent, batch: Batch) -> tuple[SACAgent, dict[str, jax.Array]]:
    """One SAC gradient step: critics, then actor against the new critics, then alpha.

    batch: obs (B, obs_dim), actions (B, act_dim) in [-1, 1], rewards (B,),
    masks (B,) = 1 - terminated, next_obs (B, obs_dim).
    """
    rng, critic_key, actor_key = jax.random.split(agent.rng, 3)

    grads, critic_info = jax.grad(_critic_loss, has_aux=True)(
        agent.critic.params, agent, batch, critic_key)
    critic = agent.critic.apply_gradients(grads=grads)
    target_critic_params = optax.incremental_update(critic.params, agent.target_critic_params,
                                                    agent.tau)
    agent = agent.replace(critic=critic, target_critic_params=target_critic_params)

    grads, actor_info = jax.grad(_actor_loss, has_aux=True)(
        agent.actor.params, agent, batch, actor_key)
    agent = agent.replace(actor=agent.actor.apply_gradients(grads=grads))

    grads, temp_info = jax.grad(_temp_loss, has_aux=True)(
        agent.temp.params, agent, jax.lax.stop_gradient(actor_info["entropy"]))
    agent = agent.replace(temp=agent.temp.apply_gradients(grads=grads), rng=rng)
    return agent, {**critic_info, **actor_info, **temp_info}


def scan_updates(
    agent: SACAgent,
    buffer: replay_lib.ReplayBuffer,
    rng: jax.Array,
    num_updates: int,
    batch_size: int,
    learned_reward: rewards_lib.LearnedReward | None = None,
    reward_state: Any = None,
) -> tuple[SACAgent, Any, dict[str, jax.Array]]:
    """`num_updates` SAC steps on fresh uniform replay batches, as one `lax.scan`.

    With a learned reward (adversarial), each step first updates the reward on the
    sampled policy transitions (buffer field "reward_inputs"), then relabels the batch
    with the current reward, because stored rewards go stale as the reward learns.
    Returns metrics averaged over the steps.
    """

    def step(carry, key):
        agent, reward_state = carry
        sample_key, reward_key = jax.random.split(key)
        batch = replay_lib.sample(buffer, sample_key, batch_size)
        metrics = {}
        if learned_reward is not None:
            reward_state, metrics = learned_reward.update(reward_state, batch["reward_inputs"],
                                                          reward_key)
            batch = {**batch, "rewards": learned_reward.reward(reward_state,
                                                               batch["reward_inputs"])}
        agent, sac_metrics = update(agent, batch)
        return (agent, reward_state), {**metrics, **sac_metrics}

    (agent, reward_state), metrics = jax.lax.scan(
        step, (agent, reward_state), jax.random.split(rng, num_updates))
    return agent, reward_state, jax.tree.map(jnp.mean, metrics)


@jax.jit
def sample_actions(agent: SACAgent, rng: jax.Array, obs: jax.Array) -> jax.Array:
    """Stochastic actions in [-1, 1] for exploration; obs (B, obs_dim)."""
    return agent.actor.apply_fn({"params": agent.actor.params}, obs).sample(seed=rng)


@jax.jit
def eval_actions(agent: SACAgent, obs: jax.Array) -> jax.Array:
    """Deterministic actions tanh(mean) in [-1, 1]."""
    dist = agent.actor.apply_fn({"params": agent.actor.params}, obs)
    return jnp.tanh(dist.distribution.mode())
