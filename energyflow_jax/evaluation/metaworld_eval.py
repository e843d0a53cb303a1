"""Evaluation of chunked policies on Meta-World v3: eval layouts, OOD levels, rollout plots.

A thin layer over the environment-agnostic evaluation core
(:func:`energyflow_jax.evaluation.episodes.evaluate_spec`) and rollout
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
from collections.abc import Sequence
from typing import Any

import numpy as np

from energyflow_jax.data import metaworld as demos
from energyflow_jax.envs.metaworld import (  # noqa: F401 - PERTURBATION_LEVELS, resolve_perturbation, evaluation_levels re-exported
    PERTURBATION_LEVELS,
    MetaWorldSpec,
    evaluation_levels,
    resolve_perturbation,
)
from energyflow_jax.evaluation.episodes import PolicyFn, check_arguments, evaluate_spec
from energyflow_jax.evaluation.statistics import pooled_success, wilson_interval  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)



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
        with demos.quiet_experts():
            actions = np.stack([expert.get_action(o[-1].astype(np.float64)) for o in obs_history])
        return np.repeat(actions[:, None, :], pred_horizon, axis=1).astype(np.float32)

    return policy_fn


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
    check_arguments(n_episodes, obs_horizon, exec_horizon, n_plot, n_videos, out_dir)
    perturb = resolve_perturbation(perturbation)
    spec = eval_env_spec(task, n_episodes, seed, max_steps, perturb)
    rand_vecs = np.stack([demos.config_rand_vec(c) for c in spec.configs])
    if exclude_rand_vecs is not None:
        demos.assert_configs_disjoint(rand_vecs, exclude_rand_vecs)

    result = evaluate_spec(policy_fn, spec, n_episodes, name=f"{task}_{perturb.level}",
                           obs_horizon=obs_horizon, exec_horizon=exec_horizon,
                           max_steps=max_steps, n_plot=n_plot, n_videos=n_videos,
                           out_dir=out_dir, num_envs=num_envs, num_workers=num_workers,
                           progress=progress,
                           episode_facts=lambda ep: {"rand_vec": rand_vecs[ep].tolist()})
    if perturb.object_shift > 0:
        moved = [np.linalg.norm(r["object_offset"]) for r in result["episodes"]]
        if np.median(moved) < 0.5 * perturb.object_shift:
            logger.warning(
                "Object perturbation of %.3f m had little effect on %s (median realized shift "
                "%.3f m): this task's object does not follow its layout vector", perturb.object_shift,
                task, float(np.median(moved)))
    return {"task": task, "seed": int(seed), **result,
            "perturbation": {"level": perturb.level, "object_shift_m": perturb.object_shift,
                             "hand_shift_m": perturb.hand_shift}}


def evaluate_perturbation_levels(policy_fn: PolicyFn, task: str, n_episodes: int, seed: int,
                                 levels: Sequence[str] = ("0", "S", "M", "L"), **kwargs) -> dict[str, dict]:
    """:func:`evaluate` at each OOD level on the same eval configs."""
    return {level: evaluate(policy_fn, task, n_episodes, seed, perturbation=level, **kwargs)
            for level in levels}
