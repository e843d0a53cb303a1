"""Gates a reward must pass before any RL: does it carry the task's signal?

Two measurements, each a few seconds, written per reward kind to reward_quality.json:

* xyz_ranking_accuracy: on held-out expert states, how often the expert action scores
  above the same action with only its x/y/z part perturbed (the gripper held at the
  expert's value). A reward whose ranking is carried by a near-constant dimension (the
  scripted experts hold the gripper still) fails it.
* return_order_kendall_tau: the discounted return the reward gives to rollouts of
  reference policies that are worse than the expert by construction (the expert with
  N(0, sigma) action noise, the expert started late, a random policy), ranked against
  the policies' true success rates and dense returns (Kendall's tau-b; ties count).
  The rollouts share their layouts, drawn from their own config stream (split
  "reward_gates"), and run the whole episode as SAC's do (no stop at success).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from energyflow_jax.data import metaworld as demos
from energyflow_jax.data.windows import make_windows
from energyflow_jax.rewards.energy import perturb_actions, reward_quality, score_transitions
from energyflow_jax.rewards.inputs import RewardInputs


def xyz_ranking_accuracy(reward, expert: RewardInputs, rng: jax.Array, num: int = 16,
                         noise_scale: float = 0.3, dims: tuple[int, ...] = (0, 1, 2)) -> float:
    """Fraction of (state, alternative) pairs where the expert action wins; alternatives
    perturb only `dims` of the expert action (clipped to [-1, 1])."""
    action = jnp.asarray(expert.action)
    perturbed = perturb_actions(rng, action, num, noise_scale)
    keep = jnp.zeros(action.shape[-1], bool).at[jnp.asarray(dims)].set(True)
    alternatives = jnp.where(keep, perturbed, action[:, None, :])
    return reward_quality(reward, expert, alternatives)["ranking_accuracy"]


@dataclasses.dataclass
class ReferenceRollouts:
    """Transitions of one reference policy: inputs (N steps), episode id per step, and
    per episode its success (any step) and undiscounted dense return."""

    inputs: RewardInputs
    episode_ids: np.ndarray
    success: np.ndarray
    dense_return: np.ndarray


def reference_policy_names(noise_scales=(0.1, 0.3, 0.6), delay: int = 30) -> list[str]:
    return (["expert"] + [f"expert+noise{s:g}" for s in noise_scales]
            + [f"expert_delayed{delay}", "random"])


def rollout_reference_policies(task: str, n_episodes: int, max_steps: int, obs_horizon: int,
                               seed: int, noise_scales=(0.1, 0.3, 0.6), delay: int = 30,
                               progress: bool = False) -> dict[str, ReferenceRollouts]:
    """Rollouts of the expert, the expert with action noise, the expert `delay` steps late
    (zero actions first) and a uniform random policy, on the same `n_episodes` layouts."""
    from metaworld.policies import ENV_POLICY_MAP

    env = demos.make_env(task, max_steps)
    rng = np.random.default_rng(seed)
    out = {}
    names = reference_policy_names(noise_scales, delay)
    bar = tqdm(total=len(names) * n_episodes, desc="reward gates: reference rollouts",
               disable=not progress, unit="ep")
    try:
        configs = [demos.sample_config(env, task, "reward_gates", seed, i)
                   for i in range(n_episodes)]
        for name in names:
            episodes, env_rewards, successes = [], [], []
            for config in configs:
                expert = ENV_POLICY_MAP[task]()
                obs = demos.reset_to_config(env, config)
                ep_obs, ep_act, ep_rew, ep_succ = [], [], [], []
                with demos.quiet_experts():
                    for t in range(max_steps):
                        if name == "random":
                            action = rng.uniform(-1.0, 1.0, demos.ACTION_DIM)
                        elif name.startswith("expert_delayed") and t < delay:
                            action = np.zeros(demos.ACTION_DIM)
                        else:
                            action = np.asarray(expert.get_action(obs), np.float64)
                            if name.startswith("expert+noise"):
                                sigma = float(name[len("expert+noise"):])
                                action = action + sigma * rng.standard_normal(action.shape)
                        action = np.clip(action, -1.0, 1.0).astype(np.float32)
                        ep_obs.append(obs)
                        ep_act.append(action)
                        obs, reward, _, truncated, info = env.step(action)
                        ep_rew.append(reward)
                        ep_succ.append(float(info["success"]))
                        if truncated:
                            break
                episodes.append({"obs": np.asarray(ep_obs, np.float32),
                                 "actions": np.asarray(ep_act, np.float32)})
                env_rewards.append(np.asarray(ep_rew, np.float32))
                successes.append(np.asarray(ep_succ, np.float32))
                bar.update(1)
            obs_windows, _ = make_windows(episodes, obs_horizon, 1)
            out[name] = ReferenceRollouts(
                inputs=RewardInputs(obs=np.asarray(obs_windows, np.float32),
                                    action=np.concatenate([e["actions"] for e in episodes]),
                                    env_reward=np.concatenate(env_rewards),
                                    success=np.concatenate(successes)),
                episode_ids=np.concatenate([np.full(len(r), i) for i, r in enumerate(env_rewards)]),
                success=np.array([float(s.max()) for s in successes]),
                dense_return=np.array([float(r.sum()) for r in env_rewards]))
    finally:
        bar.close()
        env.close()
    return out


def discounted_returns(rewards: np.ndarray, episode_ids: np.ndarray, discount: float) -> np.ndarray:
    """Per-episode sum_t discount^t r_t, episodes in order of their ids."""
    rewards, episode_ids = np.asarray(rewards, np.float64), np.asarray(episode_ids)
    out = []
    for e in np.unique(episode_ids):
        r = rewards[episode_ids == e]
        out.append(float((discount ** np.arange(len(r)) * r).sum()))
    return np.asarray(out)


def _kendall(x, y) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")  # a constant ranking orders nothing
    return float(stats.kendalltau(x, y).statistic)  # tau-b: ties handled


def return_order(reward_fn, rollouts: dict[str, ReferenceRollouts], discount: float) -> dict:
    """Kendall's tau between each policy's mean discounted return under `reward_fn`
    ((B,) rewards of RewardInputs) and its true success rate / mean dense return."""
    returns, success, dense = {}, {}, {}
    for name, r in rollouts.items():
        rewards = np.asarray(score_transitions(reward_fn, jax.tree.map(jnp.asarray, r.inputs)))
        returns[name] = float(discounted_returns(rewards, r.episode_ids, discount).mean())
        success[name], dense[name] = float(r.success.mean()), float(r.dense_return.mean())
    names = list(rollouts)
    x = [returns[n] for n in names]
    return {"kendall_tau_success": _kendall(x, [success[n] for n in names]),
            "kendall_tau_dense": _kendall(x, [dense[n] for n in names]),
            "discounted_return": returns}


def reference_summary(rollouts: dict[str, ReferenceRollouts]) -> dict:
    """Each reference policy's true success rate and mean dense return."""
    return {name: {"success": float(r.success.mean()), "dense_return": float(r.dense_return.mean())}
            for name, r in rollouts.items()}
