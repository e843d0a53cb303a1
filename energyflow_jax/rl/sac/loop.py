"""SAC's training run: host environments, evaluation, resumable checkpoints and metrics.

`train_sac` steps gymnasium environments on the host and scores every transition with a
reward from `energyflow_jax.rewards` (environment, energy or adversarial). Checkpoints
(orbax, through `io.run_dir`) hold the agent, replay buffer, RNG, learned-reward state
and episode counters; metrics go to workdir/metrics.jsonl through `run_dir.MetricsWriter`
and the resume guard is `run_dir.restore_verified` (the run spec saved in each checkpoint).
"""

from __future__ import annotations

import contextlib

import functools
import time
from typing import Any, Callable, Sequence

import gymnasium as gym
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from tqdm.auto import tqdm

from energyflow_jax.io import run_dir
from energyflow_jax.rewards import energy as rewards_lib
from energyflow_jax.rl.sac import replay as replay_lib
from energyflow_jax.rl.sac.agent import Batch, SACAgent, eval_actions, sample_actions, scan_updates

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


# obs (n, obs_dim) float32 -> the deterministic policy's actions (n, act_dim) in [-1, 1].
Actor = Callable[[np.ndarray], np.ndarray]
# (actor, evaluation index 1, 2, ...) -> {"eval/return", "eval/success", "eval/length"}.
Evaluator = Callable[[Actor, int], dict[str, float]]


class GymEvaluator:
    """Episodes one after another on one gymnasium env, made at the first evaluation and
    kept for the run; success = any step with info["success"].

    Meta-World's gymnasium env draws each episode's layout from its own generator, so
    successive evaluations see different layouts. `experiments.sac.MetaWorldEvaluator`
    is the faster Meta-World one (all episodes in lockstep on held-out layouts).
    """

    def __init__(self, env_fn: Callable[[], gym.Env], num_episodes: int, seed: int):
        self.env_fn, self.num_episodes, self.seed = env_fn, num_episodes, seed
        self.env: gym.Env | None = None

    def __call__(self, actor: Actor, eval_index: int) -> dict[str, float]:
        if self.env is None:
            self.env = self.env_fn()
        env = self.env
        space = env.action_space
        low, high = np.asarray(space.low, np.float32), np.asarray(space.high, np.float32)
        returns, successes, lengths = [], [], []
        for episode in range(self.num_episodes):
            obs, _ = env.reset(seed=_episode_seed(self.seed + 1, 10_007, episode))
            done, ret, succ, length = False, 0.0, 0.0, 0
            while not done:
                a = actor(np.asarray(obs, np.float32).reshape(1, -1))[0]
                obs, r, term, trunc, info = env.step(low + 0.5 * (a + 1.0) * (high - low))
                ret, length = ret + float(r), length + 1
                succ = max(succ, float(info.get("success", 0.0)))
                done = term or trunc
            returns.append(ret), successes.append(succ), lengths.append(length)
        return {"eval/return": float(np.mean(returns)), "eval/success": float(np.mean(successes)),
                "eval/length": float(np.mean(lengths))}

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


# ---------------------------------------------------------------------- training loop


class LoopState(struct.PyTreeNode):
    """Everything a killed run needs to continue: checkpointed as one pytree."""

    agent: SACAgent
    buffer: replay_lib.ReplayBuffer
    rng: jax.Array
    reward_state: Any
    env_step: jax.Array  # int64 would need x64; env steps fit int32 for our budgets
    episode_counts: jax.Array  # (num_envs,) episodes started per env (reset seeds)


def _act(agent: SACAgent, rng: jax.Array, obs: jax.Array, random: jax.Array) -> jax.Array:
    """The next actions in [-1, 1]: uniform while `random` (warm-up), else the policy's.

    The key is folded from the loop's RNG as it stands after a step, so a resumed run
    draws the same first actions as the uninterrupted one did. `random` is traced (both
    are drawn; they are cheap) so warm-up and training share one compiled step.
    """
    key = jax.random.fold_in(rng, 1)
    policy = sample_actions(agent, key, obs)
    uniform = jax.random.uniform(key, policy.shape, minval=-1.0, maxval=1.0)
    return jnp.where(random, uniform, policy)


_first_actions = jax.jit(_act)


@functools.partial(jax.jit, static_argnames=("num_updates", "batch_size", "learned_reward"),
                   donate_argnames=("state",))
def _step(state: LoopState, transitions: Batch, next_obs: jax.Array, reward: Any,
          num_updates: int, batch_size: int, learned_reward: Any, random: jax.Array):
    """One vector step on the device: score + insert the transitions, `num_updates` SAC
    updates, then the actions for `next_obs` (the observations after any resets).

    One compiled call and one host sync (actions and rewards) per environment step, with
    every RNG split inside; the loop state is donated so the buffer is updated in place.
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
    return state, rewards, _act(agent, rng, next_obs, random), metrics


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
    evaluator: Evaluator | None = None,
    progress: bool = True,
) -> tuple[SACAgent, dict[str, float]]:
    """Trains SAC on `len(env_fns)` environments stepped in lockstep, with `reward_fn`.

    reward_fn: a `rewards.Reward` (scored when a transition is stored) or a
        `rewards.LearnedReward` such as `adversarial.AdversarialReward` (updated and re-scored
        inside every gradient step). Its shapes are checked against the environment
        before anything else happens (ValueError on mismatch).
    workdir: metrics.jsonl and orbax checkpoints (workdir/checkpoints, each with its run spec),
        all written through `io.run_dir`. If a checkpoint exists the run resumes from it
        (refused, naming the keys, if learner settings outside RESUME_MAY_CHANGE differ):
        agent, replay buffer, RNG, learned-reward state and episode counters are restored
        and environments restart their episodes from the saved counters. A checkpoint on an episode boundary of every env (e.g.
        checkpoint_every a multiple of num_envs * episode length for fixed-length tasks)
        makes the resumed run bit-identical to an uninterrupted one on CPU, for envs that
        honour reset(seed=) (Pendulum does; Meta-World v3 ignores it and draws its next
        task configuration from its make-time RNG, so there the resumed run continues
        with the saved agent and buffer but sees other task draws).
    evaluator: called every config.eval_every steps and at the end with the deterministic
        actor and the evaluation's index (1, 2, ...); default: a `GymEvaluator` of
        config.eval_episodes episodes on `eval_env_fn` (default env_fns[0]).
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
    if evaluator is None:
        evaluator = GymEvaluator(eval_env_fn or env_fns[0], config.eval_episodes, config.seed)

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

    spec = run_dir.run_spec(config.to_dict(), None)
    cleanup = contextlib.ExitStack()  # the envs and the workdir lock; closed last
    cleanup.callback(envs.close)
    cleanup.callback(getattr(evaluator, "close", lambda: None))
    try:
        cleanup.enter_context(run_dir.workdir_lock(workdir))
        state, start_step = run_dir.restore_verified(workdir, state, spec,
                                                     may_change=RESUME_MAY_CHANGE)
    except BaseException:
        cleanup.close()
        raise
    # Synchronous saves: the next step donates (overwrites) the arrays being saved.
    manager = run_dir.checkpoint_manager(workdir, config.max_checkpoints, asynchronous=False)
    env_step = int(state.env_step)  # == start_step
    envs.episode_counts = np.asarray(state.episode_counts, np.int64)
    envs.reset_all()

    reward_arg = None if learned else reward_fn
    learned_arg = reward_fn if learned else None
    updates_per_step = num_envs * config.utd_ratio
    eval_metrics: dict[str, float] = {}
    window = {"return": [], "reward": [], "success": [], "length": []}
    last_metrics: dict[str, float] = {}
    writer = run_dir.MetricsWriter(workdir, None, config.to_dict(), resume_step=start_step)
    bar = tqdm(total=config.total_env_steps, initial=env_step, disable=not progress,
               desc="sac", unit="step", dynamic_ncols=True)
    tick_time, tick_step = time.time(), env_step

    def save(step: int) -> None:
        run_dir.save_checkpoint(manager, step, state.replace(
            env_step=jnp.asarray(step, jnp.int32),
            episode_counts=jnp.asarray(envs.episode_counts, jnp.int32)), spec)

    # Actions for the first step; afterwards each _step returns the next ones.
    actions = np.asarray(_first_actions(state.agent, state.rng, envs.obs,
                                        env_step < config.warmup_env_steps), np.float32)
    try:
        while env_step < config.total_env_steps:
            env_actions = envs.to_env_action(actions)
            reward_obs = envs.obs_history.copy()
            obs = envs.obs.copy()
            next_obs, env_reward, success, terminated, truncated = envs.step(env_actions)
            transitions = {
                "obs": obs,
                "actions": actions,
                "masks": 1.0 - terminated.astype(np.float32),
                "next_obs": next_obs,
                "reward_inputs": rewards_lib.RewardInputs(
                    obs=reward_obs, action=env_actions.astype(np.float32),
                    env_reward=env_reward, success=success),
            }
            env_step += num_envs

            # Host bookkeeping and resets come first: the next actions are drawn in the
            # same compiled call for the observations that follow any reset.
            envs.episode_return += env_reward
            envs.episode_success = np.maximum(envs.episode_success, success)
            envs.episode_length += 1
            envs.obs_history = np.concatenate([envs.obs_history[:, 1:], next_obs[:, None]], 1)
            done = terminated | truncated
            ended = np.flatnonzero(done)
            ended_stats = [(envs.episode_return[i], envs.episode_reward[i],
                            envs.episode_success[i], envs.episode_length[i]) for i in ended]
            for i in ended:
                envs.episode_counts[i] += 1
                envs.reset(i)

            num_updates = updates_per_step if env_step > config.warmup_env_steps else 0
            state, step_rewards, actions, update_metrics = _step(
                state, transitions, envs.obs, reward_arg, num_updates,
                config.batch_size, learned_arg, env_step < config.warmup_env_steps)
            actions = np.asarray(actions, np.float32)  # the step's one host sync
            step_rewards = np.asarray(step_rewards)
            if update_metrics:
                last_metrics = update_metrics
            envs.episode_reward[~done] += step_rewards[~done]  # ended ones were reset
            for i, (ret, rew, succ, length) in zip(ended, ended_stats):
                window["return"].append(ret)
                window["reward"].append(rew + step_rewards[i])
                window["success"].append(succ)
                window["length"].append(length)
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
                eval_agent = state.agent
                eval_metrics = evaluator(
                    lambda obs: np.asarray(eval_actions(eval_agent, jnp.asarray(obs, jnp.float32))),
                    -(-env_step // config.eval_every))
                record.update(eval_metrics)
                bar.set_postfix(ret=f"{eval_metrics['eval/return']:.1f}")
            if record:
                writer.write(env_step, record)
            if env_step % config.checkpoint_every == 0 or env_step >= config.total_env_steps:
                save(env_step)
    finally:
        bar.close()
        writer.close()
        manager.wait_until_finished()
        manager.close()
        cleanup.close()
    return state.agent, eval_metrics
