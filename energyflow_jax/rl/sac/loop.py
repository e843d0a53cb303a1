"""SAC's training run: host environments, evaluation, resumable checkpoints and metrics.

`train_sac_seeds` trains a group of seeds as one vmapped program (`train_sac`: one seed):
it steps gymnasium environments on the host and scores every transition with a reward
from `energyflow_jax.rewards` (environment, energy or adversarial). Each run keeps its
own workdir: orbax checkpoints (through `io.run_dir`) of its agent, replay buffer, RNG,
learned-reward state and episode counters; metrics.jsonl through `run_dir.MetricsWriter`;
the resume guard `run_dir.restore_verified` (the run spec saved in each checkpoint).
"""

from __future__ import annotations

import contextlib
import functools
import os
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
from energyflow_jax.training import stack, unstack
from energyflow_jax.rl.sac.agent import Batch, SACAgent, eval_actions, sample_actions, scan_updates

# ------------------------------------------------------------------ host environments


def _episode_seed(seed: int, env_index: int, episode: int) -> int:
    # Distinct, reproducible reset seeds per (run, env, episode).
    return int((seed * 1_000_003 + env_index * 7_919 + episode * 104_729) % (2**31 - 1))


class _HostEnvs:
    """The envs of every run of a group stepped in lockstep on the host (like SyncVectorEnv).

    env_fns[k] are run k's envs, seeded by seeds[k]; env j = k * n + i of the flat list is
    run k's env i. Written out instead of SyncVectorEnv so that each episode starts from a
    reset seed derived from (run seed, env index, episode count): with the counts in the
    checkpoint, a resumed run restarts its environments exactly where an uninterrupted run
    would be when the checkpoint falls on an episode boundary. It also keeps the
    observation history the reward model reads (padded with the first observation at reset).
    """

    def __init__(self, env_fns: Sequence[Sequence[Callable[[], gym.Env]]], seeds: Sequence[int],
                 obs_horizon: int):
        self.num_envs = len(env_fns[0])
        if any(len(fns) != self.num_envs for fns in env_fns):
            raise ValueError("every run of a group needs the same number of envs, got "
                             f"{[len(fns) for fns in env_fns]}")
        self.envs: list[gym.Env] = []
        try:
            for fns in env_fns:
                self.envs.extend(fn() for fn in fns)
        except BaseException:
            self.close()
            raise
        self.run_seeds = [int(s) for s in seeds]
        self.obs_horizon = obs_horizon
        space = self.envs[0].action_space
        self.act_low = np.asarray(space.low, np.float32)
        self.act_high = np.asarray(space.high, np.float32)
        self.obs_dim = int(np.prod(self.envs[0].observation_space.shape))
        self.act_dim = int(np.prod(space.shape))
        total = len(self.envs)
        self.episode_counts = np.zeros(total, np.int64)
        self.obs_history = np.zeros((total, obs_horizon, self.obs_dim), np.float32)
        self.episode_return = np.zeros(total)
        self.episode_reward = np.zeros(total)  # the training reward
        self.episode_success = np.zeros(total)
        self.episode_length = np.zeros(total, np.int64)

    @property
    def obs(self) -> np.ndarray:
        return self.obs_history[:, -1]

    def reset(self, j: int) -> None:
        run, i = divmod(j, self.num_envs)
        seed = _episode_seed(self.run_seeds[run], i, int(self.episode_counts[j]))
        obs, _ = self.envs[j].reset(seed=seed)
        self.obs_history[j] = np.asarray(obs, np.float32).reshape(-1)
        self.episode_return[j] = self.episode_reward[j] = self.episode_success[j] = 0.0
        self.episode_length[j] = 0

    def reset_all(self) -> None:
        for j in range(len(self.envs)):
            self.reset(j)

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
        for j, env in enumerate(self.envs):
            o, r, term, trunc, info = env.step(env_actions[j])
            next_obs[j] = np.asarray(o, np.float32).reshape(-1)
            env_reward[j], terminated[j], truncated[j] = r, term, trunc
            success[j] = float(info.get("success", 0.0))
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


def transition_example(obs_dim: int, act_dim: int, obs_horizon: int, learned: bool) -> dict:
    """One stored transition (the replay buffer's leaf shapes): the reward itself for a
    fixed reward, the reward's inputs (re-scored at every update) for a learned one."""
    example = {
        "obs": np.zeros(obs_dim, np.float32),
        "actions": np.zeros(act_dim, np.float32),
        "masks": np.zeros((), np.float32),
        "next_obs": np.zeros(obs_dim, np.float32),
    }
    if not learned:
        example["rewards"] = np.zeros((), np.float32)
    else:
        example["reward_inputs"] = rewards_lib.RewardInputs(
            obs=np.zeros((obs_horizon, obs_dim), np.float32),
            action=np.zeros(act_dim, np.float32),
            env_reward=np.zeros((), np.float32), success=np.zeros((), np.float32))
    return example


def fresh_state(config: ml_collections.ConfigDict, obs_dim: int, act_dim: int, example: dict,
                num_envs: int, learned_reward: rewards_lib.LearnedReward | None = None) -> LoopState:
    """A new run's loop state, all drawn from config.seed."""
    rng = jax.random.PRNGKey(config.seed)
    rng, agent_key, reward_key = jax.random.split(rng, 3)
    return LoopState(
        agent=SACAgent.create(agent_key, obs_dim, act_dim, config),
        buffer=replay_lib.ReplayBuffer.create(example, config.replay_capacity),
        rng=rng,
        reward_state=None if learned_reward is None else learned_reward.init(reward_key),
        env_step=jnp.zeros((), jnp.int32),
        episode_counts=jnp.zeros((num_envs,), jnp.int32),
    )


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


# Every function of the loop state takes the runs of a group stacked on a leading axis.
_first_actions = jax.jit(jax.vmap(_act, in_axes=(0, 0, 0, None)))


@functools.partial(jax.jit, static_argnames=("num_updates", "batch_size", "learned_reward"),
                   donate_argnames=("state",))
def _step(state: LoopState, transitions: Batch, next_obs: jax.Array, reward: Any,
          num_updates: int, batch_size: int, learned_reward: Any, random: jax.Array):
    """One vector step of every run of a group (leading axis) on the device: score +
    insert the transitions, `num_updates` SAC updates, then the actions for `next_obs`
    (the observations after any resets).

    One compiled call and one host sync (actions and rewards) per environment step, with
    every RNG split inside; the loop state is donated so the buffers are updated in place.
    The runs share `reward` (a fixed reward's parameters); a learned reward's state is
    per run, inside the loop state.
    """

    def one_run(state: LoopState, transitions: Batch, next_obs: jax.Array):
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

    return jax.vmap(one_run)(state, transitions, next_obs)


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
    """Trains SAC (seed config.seed) on `len(env_fns)` environments stepped in lockstep,
    with `reward_fn`: `train_sac_seeds` for one seed; returns (final agent, last eval)."""
    [(agent, eval_metrics)] = train_sac_seeds(
        config, [config.seed], [env_fns], reward_fn, [workdir], eval_env_fn=eval_env_fn,
        evaluators=None if evaluator is None else [evaluator], progress=progress)
    return agent, eval_metrics


def _restore_group(workdirs: list[str], states: list, specs: list[dict]) -> tuple[list, int]:
    """Each run's newest good checkpoint, at one step shared by the whole group.

    The runs are saved one after another, so a kill between two saves leaves some runs a
    checkpoint ahead: those go back to the group's step (their newer checkpoints are set
    aside in checkpoints-quarantine/), or every run starts over if one has no checkpoint.
    """
    restored = [run_dir.restore_verified(w, s, spec, may_change=RESUME_MAY_CHANGE)
                for w, s, spec in zip(workdirs, states, specs)]
    while len({step for _, step in restored}) > 1:
        common = min(step for _, step in restored)
        for k, (w, (_, step)) in enumerate(zip(workdirs, restored)):
            if step > common:
                for newer in [s for s in run_dir.checkpoint_steps(w) if s > common]:
                    run_dir.quarantine_checkpoint(w, newer, "it is ahead of the other runs of "
                                                  "its group", failed=False)
                restored[k] = run_dir.restore_verified(w, states[k], specs[k],
                                                       may_change=RESUME_MAY_CHANGE)
    return [state for state, _ in restored], restored[0][1]


def train_sac_seeds(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    env_fns: Sequence[Sequence[Callable[[], gym.Env]]],
    reward_fn: rewards_lib.Reward | rewards_lib.LearnedReward,
    workdirs: Sequence[str],
    *,
    eval_env_fn: Callable[[], gym.Env] | None = None,
    evaluators: Sequence[Evaluator] | None = None,
    progress: bool = True,
) -> list[tuple[SACAgent, dict[str, float]]]:
    """Trains one SAC run per seed, all in lockstep as one vmapped program: run k has
    seed seeds[k] (config.seed is ignored), environments env_fns[k] and workdir workdirs[k].

    Each run is the run `train_sac` would make with that seed (checkpoints, metrics and
    resume work per run), but every vector step of the group is one compiled call, so the
    runs share compiling, dispatch and batched reward scoring. They share `reward_fn` (a
    learned reward keeps one state per run).

    reward_fn: a `rewards.Reward` (scored when a transition is stored) or a
        `rewards.LearnedReward` such as `adversarial.AdversarialReward` (updated and re-scored
        inside every gradient step). Its shapes are checked against the environment
        before anything else happens (ValueError on mismatch).
    workdirs: per run, metrics.jsonl and orbax checkpoints (DIR/checkpoints, each with its
        run spec), all written through `io.run_dir`. If checkpoints exist the runs resume
        from them (refused, naming the keys, if learner settings outside RESUME_MAY_CHANGE
        differ), at the newest step every run of the group has: agent, replay buffer,
        RNG, learned-reward state and episode counters are restored and environments
        restart their episodes from the saved counters. A checkpoint on an episode
        boundary of every env (e.g. checkpoint_every a multiple of num_envs * episode
        length for fixed-length tasks) makes a resumed run bit-identical to an
        uninterrupted one on CPU, for envs that honour reset(seed=) (Pendulum does;
        Meta-World v3 ignores it and draws its next task configuration from its
        make-time RNG, so there the resumed run continues with the saved agent and
        buffer but sees other task draws).
    evaluators: per run, called every config.eval_every steps and at the end with that
        run's deterministic actor and the evaluation's index (1, 2, ...); default: a
        `GymEvaluator` of config.eval_episodes episodes on `eval_env_fn` (default the
        run's first env).
    Each vector step adds num_envs transitions per run and does num_envs * utd_ratio
    updates per run once warm-up is over. Returns each run's final agent and last eval.
    """
    seeds = [int(s) for s in seeds]
    num_runs = len(seeds)
    if num_runs < 1 or len(set(seeds)) != num_runs:
        raise ValueError(f"train_sac_seeds needs distinct seeds, got {seeds}")
    if len(env_fns) != num_runs or len(workdirs) != num_runs:
        raise ValueError(f"{num_runs} seeds need as many env_fns lists and workdirs, got "
                         f"{len(env_fns)} and {len(workdirs)}")
    if len({os.path.abspath(w) for w in workdirs}) != num_runs:
        raise ValueError(f"every run needs its own workdir, got {list(workdirs)}")
    if evaluators is not None and len(evaluators) != num_runs:
        raise ValueError(f"{num_runs} seeds need as many evaluators, got {len(evaluators)}")
    learned = isinstance(reward_fn, rewards_lib.LearnedReward)
    obs_horizon = rewards_lib.reward_obs_horizon(reward_fn)
    envs = _HostEnvs(env_fns, seeds, obs_horizon)
    num_envs = envs.num_envs
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
    if evaluators is None:
        evaluators = [GymEvaluator(eval_env_fn or fns[0], config.eval_episodes, seed)
                      for fns, seed in zip(env_fns, seeds)]

    # Fresh states; also the restore targets that tell orbax every shape and dtype.
    example = transition_example(envs.obs_dim, envs.act_dim, obs_horizon, learned)
    configs = []
    for seed in seeds:
        run_config = ml_collections.ConfigDict(config.to_dict())
        run_config.seed = seed
        configs.append(run_config)
    fresh = [fresh_state(c, envs.obs_dim, envs.act_dim, example, num_envs,
                         reward_fn if learned else None) for c in configs]
    specs = [run_dir.run_spec(c.to_dict(), None) for c in configs]

    cleanup = contextlib.ExitStack()  # the envs and the workdir locks; closed last
    cleanup.callback(envs.close)
    for evaluator in evaluators:
        cleanup.callback(getattr(evaluator, "close", lambda: None))
    try:
        for workdir in workdirs:
            cleanup.enter_context(run_dir.workdir_lock(workdir))
        states, start_step = _restore_group(list(workdirs), fresh, specs)
    except BaseException:
        cleanup.close()
        raise
    del fresh
    state = stack(states)
    del states
    # Synchronous saves: the next step donates (overwrites) the arrays being saved.
    managers = [run_dir.checkpoint_manager(w, config.max_checkpoints, asynchronous=False)
                for w in workdirs]
    env_step = int(start_step)
    envs.episode_counts = np.asarray(state.episode_counts, np.int64).reshape(-1)
    envs.reset_all()

    reward_arg = None if learned else reward_fn
    learned_arg = reward_fn if learned else None
    updates_per_step = num_envs * config.utd_ratio
    eval_metrics: list[dict[str, float]] = [{} for _ in seeds]
    windows = [{"return": [], "reward": [], "success": [], "length": []} for _ in seeds]
    last_metrics: dict[str, np.ndarray] = {}
    writers = [run_dir.MetricsWriter(w, None, c.to_dict(), resume_step=start_step)
               for w, c in zip(workdirs, configs)]
    bar = tqdm(total=config.total_env_steps, initial=env_step, disable=not progress,
               desc="sac" if num_runs == 1 else f"sac x{num_runs} seeds", unit="step",
               dynamic_ncols=True)
    tick_time, tick_step = time.time(), env_step

    def by_run(x: np.ndarray) -> np.ndarray:  # flat (runs * envs, ...) -> (runs, envs, ...)
        return x.reshape((num_runs, num_envs) + x.shape[1:])

    def save(step: int) -> None:
        counts = by_run(envs.episode_counts)
        for k, manager in enumerate(managers):
            run_dir.save_checkpoint(manager, step, unstack(state, k).replace(
                env_step=jnp.asarray(step, jnp.int32),
                episode_counts=jnp.asarray(counts[k], jnp.int32)), specs[k])

    # Actions for the first step; afterwards each _step returns the next ones.
    actions = np.asarray(_first_actions(state.agent, state.rng, by_run(envs.obs),
                                        env_step < config.warmup_env_steps),
                         np.float32).reshape(num_runs * num_envs, -1)
    try:
        while env_step < config.total_env_steps:
            env_actions = envs.to_env_action(actions)
            reward_obs = envs.obs_history.copy()
            obs = envs.obs.copy()
            next_obs, env_reward, success, terminated, truncated = envs.step(env_actions)
            transitions = jax.tree.map(by_run, {
                "obs": obs,
                "actions": actions,
                "masks": 1.0 - terminated.astype(np.float32),
                "next_obs": next_obs,
                "reward_inputs": rewards_lib.RewardInputs(
                    obs=reward_obs, action=env_actions.astype(np.float32),
                    env_reward=env_reward, success=success),
            })
            env_step += num_envs

            # Host bookkeeping and resets come first: the next actions are drawn in the
            # same compiled call for the observations that follow any reset.
            envs.episode_return += env_reward
            envs.episode_success = np.maximum(envs.episode_success, success)
            envs.episode_length += 1
            envs.obs_history = np.concatenate([envs.obs_history[:, 1:], next_obs[:, None]], 1)
            done = terminated | truncated
            ended = np.flatnonzero(done)
            ended_stats = [(envs.episode_return[j], envs.episode_reward[j],
                            envs.episode_success[j], envs.episode_length[j]) for j in ended]
            for j in ended:
                envs.episode_counts[j] += 1
                envs.reset(j)

            num_updates = updates_per_step if env_step > config.warmup_env_steps else 0
            state, step_rewards, actions, update_metrics = _step(
                state, transitions, by_run(envs.obs), reward_arg, num_updates,
                config.batch_size, learned_arg, env_step < config.warmup_env_steps)
            # The step's one host sync.
            actions = np.asarray(actions, np.float32).reshape(num_runs * num_envs, -1)
            step_rewards = np.asarray(step_rewards).reshape(-1)
            if update_metrics:
                last_metrics = update_metrics
            envs.episode_reward[~done] += step_rewards[~done]  # ended ones were reset
            for j, (ret, rew, succ, length) in zip(ended, ended_stats):
                window = windows[j // num_envs]
                window["return"].append(ret)
                window["reward"].append(rew + step_rewards[j])
                window["success"].append(succ)
                window["length"].append(length)
            bar.update(num_envs)

            records: list[dict[str, float]] = [{} for _ in seeds]
            if env_step % config.log_every == 0:
                now = time.time()
                sps = (env_step - tick_step) / max(now - tick_time, 1e-9)
                tick_time, tick_step = now, env_step
                host_metrics = jax.device_get(last_metrics)
                for k, (record, window) in enumerate(zip(records, windows)):
                    record["sps"] = sps
                    record.update({f"train/{m}": float(v[k]) for m, v in host_metrics.items()})
                    if window["return"]:
                        record.update({f"episode/{m}": float(np.mean(v))
                                       for m, v in window.items()})
                        windows[k] = {m: [] for m in window}
            if env_step % config.eval_every == 0 or env_step >= config.total_env_steps:
                eval_index = -(-env_step // config.eval_every)
                for k, (record, evaluator) in enumerate(zip(records, evaluators)):
                    eval_agent = unstack(state.agent, k)
                    eval_metrics[k] = evaluator(
                        lambda obs: np.asarray(eval_actions(eval_agent,
                                                            jnp.asarray(obs, jnp.float32))),
                        eval_index)
                    record.update(eval_metrics[k])
                bar.set_postfix(ret=f"{np.mean([m['eval/return'] for m in eval_metrics]):.1f}")
            for writer, record in zip(writers, records):
                if record:
                    writer.write(env_step, record)
            if env_step % config.checkpoint_every == 0 or env_step >= config.total_env_steps:
                save(env_step)
    finally:
        bar.close()
        for writer in writers:
            writer.close()
        for manager in managers:
            manager.wait_until_finished()
            manager.close()
        cleanup.close()
    return [(unstack(state.agent, k), eval_metrics[k]) for k in range(num_runs)]
