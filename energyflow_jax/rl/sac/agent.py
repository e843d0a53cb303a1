"""Soft Actor-Critic in pure JAX, and a host-side training loop with resumable checkpoints.

The whole learner is one immutable pytree (`SACAgent`): actor, twin critics, their
Polyak-averaged targets, the temperature and the agent's RNG. `update` is a pure
function of (agent, batch); `scan_updates` runs several of them per environment step
with `lax.scan` (the update-to-data ratio), sampling each batch from the device-resident
replay buffer inside the compiled loop.

`train_sac` steps gymnasium environments on the host and scores every transition with a
reward from `energyflow_jax.rewards` (environment, energy or adversarial). Checkpoints
(orbax) hold the agent, replay buffer, RNG, learned-reward state and episode counters.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import gymnasium as gym
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from flax.training.train_state import TrainState
from tqdm.auto import tqdm

from energyflow_jax.rewards import energy as rewards_lib
from energyflow_jax.io import run_dir
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


# ------------------------------------------------------------------ host environments


def _episode_seed(seed: int, env_index: int, episode: int) -> int:
    # Distinct, reproducible reset seeds per (run, env, episode).
    return int((seed * 1_000_003 + env_index * 7_919 + episode * 104_729) % (2**31 - 1))


class _HostEnvs:
    """A list of gymnasium envs stepped in lockstep on the host (like SyncVectorEnv).

    Written out instead of SyncVectorEnv so that each episode starts from a reset seed
    derived from (seed, env index, episode count): with the counts in the checkpoint, a
    resumed run restarts its environments exactly where an uninterrupted run would be
    when the checkpoint falls on an episode boundary. It also keeps the observation
    history the reward model reads (padded with the first observation at reset).
    """

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], seed: int, obs_horizon: int):
        self.envs = [fn() for fn in env_fns]
        self.seed = seed
        self.obs_horizon = obs_horizon
        space = self.envs[0].action_space
        self.act_low = np.asarray(space.low, np.float32)
        self.act_high = np.asarray(space.high, np.float32)
        self.obs_dim = int(np.prod(self.envs[0].observation_space.shape))
        self.act_dim = int(np.prod(space.shape))
        self.episode_counts = np.zeros(len(self.envs), np.int64)
        self.obs_history = np.zeros((len(self.envs), obs_horizon, self.obs_dim), np.float32)
        self.episode_return = np.zeros(len(self.envs))
        self.episode_reward = np.zeros(len(self.envs))  # the training reward
        self.episode_success = np.zeros(len(self.envs))
        self.episode_length = np.zeros(len(self.envs), np.int64)

    @property
    def obs(self) -> np.ndarray:
        return self.obs_history[:, -1]

    def reset(self, i: int) -> None:
        obs, _ = self.envs[i].reset(seed=_episode_seed(self.seed, i, int(self.episode_counts[i])))
        self.obs_history[i] = np.asarray(obs, np.float32).reshape(-1)
        self.episode_return[i] = self.episode_reward[i] = self.episode_success[i] = 0.0
        self.episode_length[i] = 0

    def reset_all(self) -> None:
        for i in range(len(self.envs)):
            self.reset(i)

    def to_env_action(self, action: np.ndarray) -> np.ndarray:
        """Agent actions in [-1, 1] -> the env's box."""
        return self.act_low + 0.5 * (action + 1.0) * (self.act_high - self.act_low)

    def step(self, env_actions: np.ndarray):
        n = len(self.envs)
        next_obs = np.zeros((n, self.obs_dim), np.float32)
        env_reward = np.zeros(n, np.float32)
        success = np.zeros(n, np.float32)
        terminated = np.zeros(n, bool)
        truncated = np.zeros(n, bool)
        for i, env in enumerate(self.envs):
            o, r, term, trunc, info = env.step(env_actions[i])
            next_obs[i] = np.asarray(o, np.float32).reshape(-1)
            env_reward[i], terminated[i], truncated[i] = r, term, trunc
            success[i] = float(info.get("success", 0.0))
        return next_obs, env_reward, success, terminated, truncated

    def close(self) -> None:
        for env in self.envs:
            env.close()


def evaluate(agent: SACAgent, env_fn: Callable[[], gym.Env], num_episodes: int,
             seed: int) -> dict[str, float]:
    """Deterministic-policy return and success rate (any success in an episode)."""
    env = env_fn()
    space = env.action_space
    low, high = np.asarray(space.low, np.float32), np.asarray(space.high, np.float32)
    returns, successes, lengths = [], [], []
    for episode in range(num_episodes):
        obs, _ = env.reset(seed=_episode_seed(seed + 1, 10_007, episode))
        done, ret, succ, length = False, 0.0, 0.0, 0
        while not done:
            a = np.asarray(eval_actions(agent, jnp.asarray(obs, jnp.float32).reshape(1, -1)))[0]
            obs, r, term, trunc, info = env.step(low + 0.5 * (a + 1.0) * (high - low))
            ret, length = ret + float(r), length + 1
            succ = max(succ, float(info.get("success", 0.0)))
            done = term or trunc
        returns.append(ret), successes.append(succ), lengths.append(length)
    env.close()
    return {"eval/return": float(np.mean(returns)), "eval/success": float(np.mean(successes)),
            "eval/length": float(np.mean(lengths))}


# ---------------------------------------------------------------------- training loop


class LoopState(struct.PyTreeNode):
    """Everything a killed run needs to continue: checkpointed as one pytree."""

    agent: SACAgent
    buffer: replay_lib.ReplayBuffer
    rng: jax.Array
    reward_state: Any
    env_step: jax.Array  # int64 would need x64; env steps fit int32 for our budgets
    episode_counts: jax.Array  # (num_envs,) episodes started per env (reset seeds)


@functools.partial(jax.jit, static_argnames=("num_updates", "batch_size", "learned_reward"),
                   donate_argnames=("state",))
def _learn(state: LoopState, transitions: Batch, reward: Any, num_updates: int,
           batch_size: int, learned_reward: Any):
    """Score + insert one vector step of transitions, then `num_updates` SAC updates.

    One compiled call per environment step keeps host<->device round trips down; the
    loop state is donated so the replay buffer is updated in place.
    """
    reward_inputs = transitions["reward_inputs"]
    if learned_reward is None:  # fixed reward: score once, store only the reward
        rewards = reward(reward_inputs)
        transitions = {k: v for k, v in transitions.items() if k != "reward_inputs"}
        transitions["rewards"] = rewards
    else:  # stored inputs are re-scored at every update; this score is only logged
        rewards = learned_reward.reward(state.reward_state, reward_inputs)
    buffer = replay_lib.insert(state.buffer, transitions)
    rng, update_key = jax.random.split(state.rng)
    agent, reward_state, metrics = state.agent, state.reward_state, {}
    if num_updates > 0:
        agent, reward_state, metrics = scan_updates(agent, buffer, update_key, num_updates,
                                                    batch_size, learned_reward, reward_state)
    state = state.replace(agent=agent, buffer=buffer, rng=rng, reward_state=reward_state)
    return state, rewards, metrics


# SAC settings a resumed run may change: when it logs, evaluates and saves, and how
# long it goes on (no schedule depends on the total).
RESUME_MAY_CHANGE = ("log_every", "eval_every", "eval_episodes", "checkpoint_every",
                     "max_checkpoints", "total_env_steps")


def train_sac(
    config: ml_collections.ConfigDict,
    env_fns: Sequence[Callable[[], gym.Env]],
    reward_fn: rewards_lib.Reward | rewards_lib.LearnedReward,
    workdir: str,
    *,
    eval_env_fn: Callable[[], gym.Env] | None = None,
    progress: bool = True,
) -> tuple[SACAgent, dict[str, float]]:
    """Trains SAC on `len(env_fns)` environments stepped in lockstep, with `reward_fn`.

    reward_fn: a `rewards.Reward` (scored when a transition is stored) or a
        `rewards.LearnedReward` such as `airl.AdversarialReward` (updated and re-scored
        inside every gradient step). Its shapes are checked against the environment
        before anything else happens (ValueError on mismatch).
    workdir: metrics.jsonl and orbax checkpoints (workdir/checkpoints). If a checkpoint
        exists the run resumes from it: agent, replay buffer, RNG, learned-reward state
        and episode counters are restored and environments restart their episodes from
        the saved counters. A checkpoint on an episode boundary of every env (e.g.
        checkpoint_every a multiple of num_envs * episode length for fixed-length tasks)
        makes the resumed run bit-identical to an uninterrupted one on CPU, for envs that
        honour reset(seed=) (Pendulum does; Meta-World v3 ignores it and draws its next
        task configuration from its make-time RNG, so there the resumed run continues
        with the saved agent and buffer but sees other task draws).
    Each vector step adds num_envs transitions and does num_envs * utd_ratio updates
    once warm-up is over. Returns the final agent and the last eval metrics.
    """
    num_envs = len(env_fns)
    learned = isinstance(reward_fn, rewards_lib.LearnedReward)
    obs_horizon = rewards_lib.reward_obs_horizon(reward_fn)
    envs = _HostEnvs(env_fns, config.seed, obs_horizon)
    try:
        rewards_lib.check_reward_compatibility(reward_fn, envs.obs_dim, envs.act_dim)
        if not np.all(np.isfinite(envs.act_low)) or not np.all(np.isfinite(envs.act_high)):
            raise ValueError("SAC needs a bounded action space")
        for name in ("warmup_env_steps", "checkpoint_every", "log_every", "eval_every"):
            if config[name] % num_envs:
                raise ValueError(f"config.{name}={config[name]} must be a multiple of num_envs="
                                 f"{num_envs} (the loop advances num_envs steps at a time)")
    except ValueError:
        envs.close()
        raise
    eval_env_fn = eval_env_fn or env_fns[0]

    # Fresh state; also the restore target that tells orbax every shape and dtype.
    rng = jax.random.PRNGKey(config.seed)
    rng, agent_key, reward_key = jax.random.split(rng, 3)
    agent = SACAgent.create(agent_key, envs.obs_dim, envs.act_dim, config)
    example = {
        "obs": np.zeros(envs.obs_dim, np.float32),
        "actions": np.zeros(envs.act_dim, np.float32),
        "masks": np.zeros((), np.float32),
        "next_obs": np.zeros(envs.obs_dim, np.float32),
    }
    if not learned:
        example["rewards"] = np.zeros((), np.float32)
    else:  # the reward is recomputed from these at every update
        example["reward_inputs"] = rewards_lib.RewardInputs(
            obs=np.zeros((obs_horizon, envs.obs_dim), np.float32),
            action=np.zeros(envs.act_dim, np.float32),
            env_reward=np.zeros((), np.float32), success=np.zeros((), np.float32))
    state = LoopState(
        agent=agent,
        buffer=replay_lib.ReplayBuffer.create(example, config.replay_capacity),
        rng=rng,
        reward_state=reward_fn.init(reward_key) if learned else None,
        env_step=jnp.zeros((), jnp.int32),
        episode_counts=jnp.zeros((num_envs,), jnp.int32),
    )

    os.makedirs(workdir, exist_ok=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.max_checkpoints, create=True,
            # Synchronous: the next step donates (overwrites) the arrays being saved.
            enable_async_checkpointing=False),
    )
    latest = manager.latest_step()
    try:
        run_dir.check_resume(workdir, config.to_dict(), None, resuming=latest is not None,
                            may_change=RESUME_MAY_CHANGE)
    except ValueError:
        manager.close()
        envs.close()
        raise
    if latest is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        run_dir.drop_metrics_after(metrics_path, latest)
    env_step = int(state.env_step)
    envs.episode_counts = np.asarray(state.episode_counts, np.int64)
    envs.reset_all()

    reward_arg = None if learned else reward_fn
    learned_arg = reward_fn if learned else None
    updates_per_step = num_envs * config.utd_ratio
    eval_metrics: dict[str, float] = {}
    window = {"return": [], "reward": [], "success": [], "length": []}
    last_metrics: dict[str, float] = {}
    log_file = open(metrics_path, "a")
    bar = tqdm(total=config.total_env_steps, initial=env_step, disable=not progress,
               desc="sac", unit="step", dynamic_ncols=True)
    tick_time, tick_step = time.time(), env_step

    def save(step: int) -> None:
        manager.save(step, args=ocp.args.StandardSave(
            state.replace(env_step=jnp.asarray(step, jnp.int32),
                          episode_counts=jnp.asarray(envs.episode_counts, jnp.int32))),
            force=True)

    try:
        while env_step < config.total_env_steps:
            rng, act_key = jax.random.split(state.rng)
            state = state.replace(rng=rng)
            obs = jnp.asarray(envs.obs)
            if env_step < config.warmup_env_steps:
                actions = jax.random.uniform(act_key, (num_envs, envs.act_dim), minval=-1.0,
                                             maxval=1.0)
            else:
                actions = sample_actions(state.agent, act_key, obs)
            actions = np.asarray(actions, np.float32)
            env_actions = envs.to_env_action(actions)
            reward_obs = envs.obs_history.copy()
            next_obs, env_reward, success, terminated, truncated = envs.step(env_actions)
            transitions = {
                "obs": envs.obs.copy(),
                "actions": actions,
                "masks": 1.0 - terminated.astype(np.float32),
                "next_obs": next_obs,
                "reward_inputs": rewards_lib.RewardInputs(
                    obs=reward_obs, action=env_actions.astype(np.float32),
                    env_reward=env_reward, success=success),
            }
            env_step += num_envs
            num_updates = updates_per_step if env_step > config.warmup_env_steps else 0
            state, step_rewards, update_metrics = _learn(
                state, transitions, reward_arg, num_updates, config.batch_size, learned_arg)
            if update_metrics:
                last_metrics = update_metrics

            # Host bookkeeping: episode statistics, history, resets.
            envs.episode_return += env_reward
            envs.episode_reward += np.asarray(step_rewards)
            envs.episode_success = np.maximum(envs.episode_success, success)
            envs.episode_length += 1
            envs.obs_history = np.concatenate([envs.obs_history[:, 1:], next_obs[:, None]], 1)
            for i in np.flatnonzero(terminated | truncated):
                window["return"].append(envs.episode_return[i])
                window["reward"].append(envs.episode_reward[i])
                window["success"].append(envs.episode_success[i])
                window["length"].append(envs.episode_length[i])
                envs.episode_counts[i] += 1
                envs.reset(i)
            bar.update(num_envs)

            record: dict[str, float] = {}
            if env_step % config.log_every == 0:
                now = time.time()
                record["sps"] = (env_step - tick_step) / max(now - tick_time, 1e-9)
                tick_time, tick_step = now, env_step
                record.update({f"train/{k}": float(v) for k, v in last_metrics.items()})
                if window["return"]:
                    record.update({f"episode/{k}": float(np.mean(v)) for k, v in window.items()})
                    window = {k: [] for k in window}
            if env_step % config.eval_every == 0 or env_step >= config.total_env_steps:
                eval_metrics = evaluate(state.agent, eval_env_fn, config.eval_episodes,
                                        config.seed)
                record.update(eval_metrics)
                bar.set_postfix(ret=f"{eval_metrics['eval/return']:.1f}")
            if record:
                log_file.write(json.dumps({"step": env_step, **record}) + "\n")
                log_file.flush()
            if env_step % config.checkpoint_every == 0 or env_step >= config.total_env_steps:
                save(env_step)
    finally:
        bar.close()
        log_file.close()
        manager.wait_until_finished()
        manager.close()
        envs.close()
    return state.agent, eval_metrics
