"""Evaluation of chunked policies on RoboMimic tasks: held-out layouts, success, plots, videos.

Episode i starts from layout i of the ``"eval"`` split of
``energyflow_jax.data.robomimic_sim.layout_seed`` (disjoint from the generated
demos' ``"demo"`` split); the env is built from the training data's
``env_args``, so a policy trained on an official file is evaluated in that
file's environment. ``exclude_starts`` (the demos' object starts) refuses, before
any episode, an evaluation layout that coincides with a demo's. Success is the
env's own check; the episode budget is the task's (400 or 700 steps) unless given.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from energyflow_jax.data import robomimic, robomimic_sim
from energyflow_jax.envs.robomimic import RobomimicSpec
from energyflow_jax.evaluation.episodes import PolicyFn, check_arguments, evaluate_spec


def eval_env_spec(env_args: Mapping[str, Any], n_episodes: int, seed: int,
                  max_steps: int | None = None) -> RobomimicSpec:
    """The env recipe of an evaluation: layout id i = eval layout i of (task, seed)."""
    task = robomimic_sim.task_of(env_args)
    make = functools.partial(robomimic_sim.make_sim, json.dumps(dict(env_args)))
    return RobomimicSpec(task=task, make_sim=make, n_layouts=int(n_episodes),
                         max_steps=int(max_steps or robomimic_sim.BUDGETS[task]), split="eval",
                         seed=int(seed))


def layout_starts(spec: RobomimicSpec) -> np.ndarray:
    """(n_layouts, 3) where each layout of `spec` puts its object (robomimic.object_start),
    from resets of a one-slot env: cheap next to the episodes."""
    env = spec(1)
    try:
        return np.stack([robomimic.object_start(spec.task, env.reset([i])[0][0])
                         for i in range(spec.n_layouts)])
    finally:
        env.close()


def assert_layouts_disjoint(starts: np.ndarray, exclude: np.ndarray, atol: float = 1e-6) -> None:
    """Refuse evaluation layouts whose object starts where a demo's did."""
    d = np.abs(np.asarray(starts)[:, None, :] - np.asarray(exclude)[None, :, :]).max(axis=-1)
    shared = np.argwhere(d <= atol)
    if len(shared):
        i, j = shared[0]
        raise ValueError(f"evaluation layout {i} starts its object where demo {j} does "
                         f"({len(shared)} shared layouts); evaluations must be held out")


def evaluate(policy_fn: PolicyFn, env_args: Mapping[str, Any], n_episodes: int, seed: int,
             obs_horizon: int = 2, exec_horizon: int = 8, max_steps: int | None = None,
             n_plot: int = 0, n_videos: int = 0, out_dir: str | None = None,
             num_envs: int | None = None, exclude_starts: np.ndarray | None = None,
             progress: bool = False, num_workers: int = 0) -> dict[str, Any]:
    """Success rate of ``policy_fn`` on ``n_episodes`` eval layouts of (task, seed).

    policy_fn: (num_envs, obs_horizon, obs_dim) float32 raw observations ->
        (num_envs, pred_horizon >= exec_horizon, action_dim) actions in [-1, 1].
    exclude_starts: (n_demos, 3) the demos' object starts (robomimic.object_start of
        their first observations); an evaluation layout equal to one raises ValueError
        before any episode runs.
    Other arguments and the result as :func:`energyflow_jax.evaluation.episodes.evaluate_spec`,
    plus task and seed.
    """
    check_arguments(n_episodes, obs_horizon, exec_horizon, n_plot, n_videos, out_dir)
    spec = eval_env_spec(env_args, n_episodes, seed, max_steps)
    starts = layout_starts(spec)
    if exclude_starts is not None:
        assert_layouts_disjoint(starts, exclude_starts)
    result = evaluate_spec(policy_fn, spec, n_episodes, name=f"{spec.task}_eval{seed}",
                           obs_horizon=obs_horizon, exec_horizon=exec_horizon,
                           max_steps=spec.max_steps, n_plot=n_plot, n_videos=n_videos,
                           out_dir=out_dir, num_envs=num_envs, num_workers=num_workers,
                           progress=progress, plot_layout=robomimic.plot_layout(spec.task),
                           episode_facts=lambda ep: {"object_start": starts[ep].tolist()})
    return {"task": spec.task, "seed": int(seed), **result}
