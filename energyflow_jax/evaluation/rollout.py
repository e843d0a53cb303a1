"""Receding-horizon rollouts of a chunked policy on any :class:`BatchedEnv`.

The env's ``num_envs`` slots run episodes together; every replan makes ONE
``act`` call for all of them, with a batch of fixed shape (num_envs,
obs_horizon, obs_dim) float32, so a jitted policy compiles once. Each live slot
executes the first ``exec_horizon`` actions of its chunk (clipped to [-1, 1])
and then the policy is queried again. An episode ends at its first step with
``success`` (counted as a success) or after ``max_steps`` steps; with
``stop_at_success=False`` every episode runs ``max_steps`` steps (a fixed-horizon
return, as RL reports it) and succeeds if any step did. Finished slots
are not stepped any further; their rows in the policy batch keep their last
observation history and the corresponding outputs are ignored.

The observation history at reset is the first observation repeated, matching
the start padding of the training windows (``energyflow_jax.data.windows``).

With more layouts than slots, episodes run in waves of ``num_envs``; in an
incomplete last wave the spare rows copy row 0's history (outputs ignored).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from energyflow_jax.envs.base import BatchedEnv

# obs history (num_envs, obs_horizon, obs_dim) float32 -> chunk (num_envs, pred_horizon, action_dim)
ActFn = Callable[[np.ndarray], Any]


@dataclass
class RolloutResult:
    """Per-episode outcomes, in the order of the ``layout_ids`` given to :func:`rollout`."""

    success: np.ndarray  # (n,) bool
    steps: np.ndarray  # (n,) int64, steps taken (success step included)
    returns: np.ndarray  # (n,) float64, summed rewards
    final_obs: np.ndarray  # (n, obs_dim), the observation after the last step
    reset_infos: list[dict[str, Any]]  # the env's reset info of each episode
    trajectories: dict[int, np.ndarray] = field(default_factory=dict)  # episode -> (steps + 1, obs_dim)
    actions: dict[int, np.ndarray] = field(default_factory=dict)  # episode -> (steps, action_dim), as stepped
    n_policy_calls: int = 0
    env_steps: int = 0
    env_time_s: float = 0.0  # inside env.step
    policy_time_s: float = 0.0  # inside act


def rollout(
    env: BatchedEnv,
    act: ActFn,
    layout_ids: Sequence[int],
    obs_horizon: int,
    exec_horizon: int,
    max_steps: int,
    n_record: int = 0,
    on_episode_end: Callable[[], None] | None = None,
    stop_at_success: bool = True,
) -> RolloutResult:
    """Run one episode per entry of ``layout_ids`` on ``env``; see the module docstring.

    n_record: keep the observation trajectories and the executed (clipped) actions
        of the first n_record episodes.
    on_episode_end: called once per finished episode (e.g. a progress bar).
    """
    n_episodes = len(layout_ids)
    num_envs, obs_dim, action_dim = env.num_envs, env.obs_dim, env.action_dim
    if n_episodes < 1:
        raise ValueError("rollout needs at least one layout id")
    if obs_horizon < 1 or exec_horizon < 1:
        raise ValueError(f"obs_horizon and exec_horizon must be >= 1, got {obs_horizon}, {exec_horizon}")
    if not 1 <= max_steps <= env.max_steps:
        raise ValueError(f"max_steps must be in [1, env.max_steps={env.max_steps}], got {max_steps}")

    success = np.zeros(n_episodes, bool)
    steps = np.zeros(n_episodes, np.int64)
    returns = np.zeros(n_episodes, np.float64)
    final_obs = np.zeros((n_episodes, obs_dim), np.float64)
    reset_infos: list[dict[str, Any]] = []
    trajectories: dict[int, list[np.ndarray]] = {}
    actions: dict[int, list[np.ndarray]] = {}
    out = RolloutResult(success, steps, returns, final_obs, reset_infos)

    for wave_start in range(0, n_episodes, num_envs):
        episodes = np.arange(wave_start, min(wave_start + num_envs, n_episodes))
        n_live = len(episodes)
        first_obs, infos = env.reset([layout_ids[e] for e in episodes])
        reset_infos.extend(infos)
        history = np.zeros((num_envs, obs_horizon, obs_dim), np.float32)
        history[:n_live] = first_obs.astype(np.float32)[:, None, :]  # start padding: first obs repeated
        history[n_live:] = history[0]
        final_obs[episodes] = first_obs
        for slot, e in enumerate(episodes):
            if e < n_record:
                trajectories[int(e)] = [first_obs[slot].copy()]
                actions[int(e)] = []
        done = np.zeros(num_envs, bool)
        done[n_live:] = True
        w_success = np.zeros(num_envs, bool)
        w_steps = np.zeros(num_envs, np.int64)
        w_returns = np.zeros(num_envs, np.float64)

        while not done.all():
            t0 = time.perf_counter()
            chunk = np.asarray(act(history.copy()))
            out.policy_time_s += time.perf_counter() - t0
            out.n_policy_calls += 1
            if chunk.ndim != 3 or chunk.shape[0] != num_envs or chunk.shape[2] != action_dim \
                    or chunk.shape[1] < exec_horizon:
                raise ValueError(
                    f"policy_fn returned shape {chunk.shape}; expected ({num_envs}, pred_horizon >= "
                    f"exec_horizon={exec_horizon}, {action_dim})"
                )
            if not np.all(np.isfinite(chunk[~done, :exec_horizon])):
                raise ValueError("policy_fn returned non-finite actions")
            chunk = np.clip(chunk[:, :exec_horizon], -1.0, 1.0).astype(np.float32)
            for k in range(exec_horizon):
                live = ~done
                t0 = time.perf_counter()
                result = env.step(chunk[:, k], live)
                out.env_time_s += time.perf_counter() - t0
                out.env_steps += int(live.sum())
                w_steps[live] += 1
                w_returns[live] += result.reward[live]
                history[live] = np.roll(history[live], -1, axis=1)
                history[live, -1] = result.obs[live]
                for slot in np.flatnonzero(live):
                    e = episodes[slot]
                    final_obs[e] = result.obs[slot]
                    if e in trajectories:
                        trajectories[e].append(result.obs[slot].copy())
                        actions[e].append(chunk[slot, k].copy())
                    if result.success[slot]:
                        w_success[slot] = True
                        done[slot] = stop_at_success or w_steps[slot] >= max_steps
                    elif w_steps[slot] >= max_steps:
                        done[slot] = True
                    if done[slot] and on_episode_end is not None:
                        on_episode_end()
                if done.all():
                    break
        success[episodes] = w_success[:n_live]
        steps[episodes] = w_steps[:n_live]
        returns[episodes] = w_returns[:n_live]

    out.trajectories = {e: np.stack(t) for e, t in trajectories.items()}
    out.actions = {e: np.stack(a).reshape(len(a), action_dim) for e, a in actions.items()}
    return out
