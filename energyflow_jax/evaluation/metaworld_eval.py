"""Evaluation of chunked policies on Meta-World v3: eval layouts, OOD levels, rollout plots.

A thin layer over the environment-agnostic rollout
(:func:`energyflow_jax.evaluation.rollout.rollout`, which documents the
receding-horizon loop) and the Meta-World batched env
(:mod:`energyflow_jax.envs.metaworld`, which documents the OOD perturbation
levels). This module picks the layouts and assembles the env:

Evaluation layouts come from the ``"eval"`` config stream of
``energyflow_jax.data.metaworld`` (disjoint from the demos' ``"demo"`` stream;
see that module): episode i uses eval config i of ``seed`` (layout id i).

``num_workers > 0`` steps the envs in that many worker processes
(:mod:`energyflow_jax.envs.workers`); the results are the in-process ones,
bit for bit.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from energyflow_jax.data import metaworld as demos
from energyflow_jax.envs.metaworld import (  # noqa: F401 - PERTURBATION_LEVELS, resolve_perturbation re-exported
    PERTURBATION_LEVELS,
    MetaWorldSpec,
    resolve_perturbation,
)
from energyflow_jax.envs.workers import make_batched_env
from energyflow_jax.evaluation import video
from energyflow_jax.evaluation.plots import plot_rollout
from energyflow_jax.evaluation.rollout import rollout
from energyflow_jax.policy import Policy
from energyflow_jax.evaluation.statistics import pooled_success, wilson_interval  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

PolicyFn = Callable[[np.ndarray], Any]


# --------------------------------------------------------------------------- policies


def make_expert_policy_fn(task: str, pred_horizon: int = 16) -> PolicyFn:
    """A chunked policy from the scripted expert: its action at the newest obs, repeated.

    Open-loop within a chunk, so it is a sanity baseline for the evaluation
    loop, not an upper bound; with short exec horizons it solves easy tasks.
    """
    from metaworld.policies import ENV_POLICY_MAP

    demos.validate_task_name(task)
    expert = ENV_POLICY_MAP[task]()

    def policy_fn(obs_history: np.ndarray) -> np.ndarray:
        with demos._quiet_experts():
            actions = np.stack([expert.get_action(o[-1].astype(np.float64)) for o in obs_history])
        return np.repeat(actions[:, None, :], pred_horizon, axis=1).astype(np.float32)

    return policy_fn


def make_policy(config, model, dataset, ema_params) -> Policy:
    """A Meta-World run's policy: EMA params (stacked for sweep members), the normalizers
    the windows were made with, the sampler settings; actions clipped to the env's box."""
    return Policy.create(model, config.model, config.diffusion, ema_params,
                         dataset.obs_normalizer, dataset.action_normalizer, (-1.0, 1.0))


def policy_rng(train_seed: int, eval_seed: int):
    """The sampling key of a trained policy's evaluation on eval stream `eval_seed`;
    replan i samples with fold_in(key, i). One rule for single runs and sweeps, so a
    sweep member's episodes are the single run's."""
    import jax

    return jax.random.fold_in(jax.random.PRNGKey(int(train_seed)), 1_000 + int(eval_seed))


def make_random_policy_fn(pred_horizon: int = 16, seed: int = 0, action_dim: int = demos.ACTION_DIM) -> PolicyFn:
    """Uniform random actions in [-1, 1]: a floor baseline."""
    rng = np.random.default_rng(seed)

    def policy_fn(obs_history: np.ndarray) -> np.ndarray:
        return rng.uniform(-1, 1, (len(obs_history), pred_horizon, action_dim)).astype(np.float32)

    return policy_fn


# --------------------------------------------------------------------------- envs


def eval_env_spec(task: str, n_episodes: int, seed: int, max_steps: int = 500,
                  perturbation: str | float = 0.0) -> MetaWorldSpec:
    """The env recipe of an evaluation: layout id i = eval config i of (task, seed)."""
    demos.validate_task_name(task)
    scratch = demos.make_env(task, max_steps)
    try:
        configs = tuple(demos.sample_config(scratch, task, "eval", seed, i) for i in range(n_episodes))
    finally:
        scratch.close()
    return MetaWorldSpec(task=task, make_env=functools.partial(demos.make_env, task, max_steps),
                         configs=configs, max_steps=int(max_steps), seed=int(seed),
                         perturbation=resolve_perturbation(perturbation))


# --------------------------------------------------------------------------- evaluation


def evaluate(
    policy_fn: PolicyFn,
    task: str,
    n_episodes: int,
    seed: int,
    obs_horizon: int = 2,
    exec_horizon: int = 8,
    max_steps: int = 500,
    perturbation: str | float = 0.0,
    n_plot: int = 0,
    n_videos: int = 0,
    out_dir: str | None = None,
    num_envs: int | None = None,
    exclude_rand_vecs: np.ndarray | None = None,
    progress: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Success rate of ``policy_fn`` on ``n_episodes`` eval configs of (task, seed).

    policy_fn: (num_envs, obs_horizon, 39) float32 raw observations ->
        (num_envs, pred_horizon >= exec_horizon, 4) actions in the env's action
        space (normalization is the caller's business). Called once per replan
        for all envs together.
    num_envs: envs stepped together (default: all episodes in one wave). With
        fewer, episodes run in waves; the policy batch is always num_envs rows.
    exclude_rand_vecs: layouts that must not be evaluated on (e.g. the demos'
        ``rand_vec``s); a shared layout raises ValueError.
    n_plot / out_dir: save trajectory plots (png) of the first n_plot episodes.
    n_videos: render the first n_videos episodes to out_dir (mp4, or gif without
        ffmpeg; :mod:`energyflow_jax.evaluation.video`); where MuJoCo cannot
        render, a warning says why and ``videos_skipped`` holds the reason.
    num_workers: worker processes stepping the envs (0: in this process).

    Returns a dict with success_rate, ci95 (Wilson), n_episodes, n_successes,
    episodes (per episode: success, steps, return, config_index, rand_vec,
    hand_offset, object_offset), n_policy_calls, env_steps, env_steps_per_s
    (time inside the batched env step only), wall_time_s, perturbation and plot paths.
    """
    demos.validate_task_name(task)
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if obs_horizon < 1 or exec_horizon < 1:
        raise ValueError(f"obs_horizon and exec_horizon must be >= 1, got {obs_horizon}, {exec_horizon}")
    if (n_plot > 0 or n_videos > 0) and out_dir is None:
        raise ValueError("n_plot > 0 or n_videos > 0 needs an out_dir for the plots and videos")
    perturb = resolve_perturbation(perturbation)
    num_envs = min(int(num_envs or n_episodes), n_episodes)
    started = time.perf_counter()

    spec = eval_env_spec(task, n_episodes, seed, max_steps, perturb)
    rand_vecs = np.stack([demos.config_rand_vec(c) for c in spec.configs])
    if exclude_rand_vecs is not None:
        demos.assert_configs_disjoint(rand_vecs, exclude_rand_vecs)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_episodes, desc=f"eval {task} [{perturb.level}]", disable=not progress, unit="ep")
    env = make_batched_env(spec, num_envs, num_workers)
    try:
        out = rollout(env, policy_fn, list(range(n_episodes)), obs_horizon, exec_horizon, max_steps,
                      n_record=max(n_plot, n_videos), on_episode_end=lambda: bar.update(1))
    finally:
        env.close()
        bar.close()

    results: list[dict[str, Any]] = [{
        "episode": ep,
        "success": bool(out.success[ep]),
        "steps": int(out.steps[ep]),
        "return": float(out.returns[ep]),
        "config_index": ep,
        "rand_vec": rand_vecs[ep].tolist(),
        **out.reset_infos[ep],
    } for ep in range(n_episodes)]

    if perturb.object_shift > 0:
        moved = [np.linalg.norm(r["object_offset"]) for r in results]
        if np.median(moved) < 0.5 * perturb.object_shift:
            logger.warning(
                "Object perturbation of %.3f m had little effect on %s (median realized shift "
                "%.3f m): this task's object does not follow its layout vector", perturb.object_shift,
                task, float(np.median(moved)))

    plots = []
    if n_plot > 0:
        os.makedirs(out_dir, exist_ok=True)
        for ep in sorted(out.trajectories)[:n_plot]:
            r = results[ep]
            outcome = "success" if r["success"] else "fail"
            path = os.path.join(out_dir, f"{task}_{perturb.level}_ep{ep:03d}_{outcome}.png")
            plot_rollout(path, out.trajectories[ep],
                         f"{task}  eval config {ep}  perturbation {perturb.level}  "
                         f"{outcome} in {r['steps']} steps")
            plots.append(path)

    videos, videos_skipped = [], None
    if n_videos > 0:
        videos_skipped = video.gl_unavailable()
        if videos_skipped:
            logger.warning("No rollout videos: %s", videos_skipped)
        else:
            videos = video.record_videos(spec, results, {ep: a for ep, a in out.actions.items()
                                                         if ep < n_videos},
                                         out_dir, f"{task}_{perturb.level}")
            for v in videos:
                if not v["replay_matches"]:
                    logger.warning("The replay of episode %d for its video did not end as the "
                                   "evaluation did; the video may differ from it", v["episode"])

    n_successes = sum(r["success"] for r in results)
    return {
        "task": task,
        "seed": int(seed),
        "success_rate": n_successes / n_episodes,
        "ci95": wilson_interval(n_successes, n_episodes),
        "n_episodes": n_episodes,
        "n_successes": int(n_successes),
        "episodes": results,
        "n_policy_calls": out.n_policy_calls,
        "num_envs": num_envs,
        "obs_horizon": obs_horizon,
        "exec_horizon": exec_horizon,
        "max_steps": max_steps,
        "env_steps": out.env_steps,
        "env_steps_per_s": out.env_steps / max(out.env_time_s, 1e-9),
        "policy_time_s": out.policy_time_s,
        "wall_time_s": time.perf_counter() - started,
        "perturbation": {"level": perturb.level, "object_shift_m": perturb.object_shift,
                         "hand_shift_m": perturb.hand_shift},
        "plots": plots,
        "videos": videos,
        "videos_skipped": videos_skipped,
    }


def evaluate_perturbation_levels(policy_fn: PolicyFn, task: str, n_episodes: int, seed: int,
                                 levels: Sequence[str] = ("0", "S", "M", "L"), **kwargs) -> dict[str, dict]:
    """:func:`evaluate` at each OOD level on the same eval configs."""
    return {level: evaluate(policy_fn, task, n_episodes, seed, perturbation=level, **kwargs)
            for level in levels}
