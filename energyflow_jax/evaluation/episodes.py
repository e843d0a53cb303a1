"""Evaluate a chunked policy on the layouts of any batched-env spec: success, plots, videos.

The environment-independent part of an evaluation: build the batched env
(in-process or over worker processes), run :func:`rollout` over layout ids
``0 .. n_episodes - 1`` with a progress bar, then write trajectory plots and
rollout videos of the first episodes. Each benchmark's evaluation module
(``metaworld_eval``, ``robomimic_eval``) picks the layouts and the spec and
adds its own facts to the result.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from energyflow_jax.envs.workers import make_batched_env
from energyflow_jax.evaluation import video
from energyflow_jax.evaluation.plots import METAWORLD_LAYOUT, plot_rollout
from energyflow_jax.evaluation.rollout import rollout
from energyflow_jax.evaluation.statistics import wilson_interval
from energyflow_jax.policy import Policy

logger = logging.getLogger(__name__)

PolicyFn = Callable[[np.ndarray], Any]


def make_policy(config, model, dataset, ema_params) -> Policy:
    """An imitation run's policy: EMA params (stacked for sweep members), the normalizers
    the windows were made with, the sampler settings; actions clipped to the env's box."""
    return Policy.create(model, config.model, config.diffusion, ema_params,
                         dataset.obs_normalizer, dataset.action_normalizer, (-1.0, 1.0))


def policy_rng(train_seed: int, eval_seed: int):
    """The sampling key of a trained policy's evaluation on eval stream `eval_seed`;
    replan i samples with fold_in(key, i). One rule for single runs and sweeps, so a
    sweep member's episodes are the single run's."""
    import jax

    return jax.random.fold_in(jax.random.PRNGKey(int(train_seed)), 1_000 + int(eval_seed))


def check_arguments(n_episodes: int, obs_horizon: int, exec_horizon: int, n_plot: int,
                    n_videos: int, out_dir: str | None) -> None:
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if obs_horizon < 1 or exec_horizon < 1:
        raise ValueError(f"obs_horizon and exec_horizon must be >= 1, got {obs_horizon}, {exec_horizon}")
    if (n_plot > 0 or n_videos > 0) and out_dir is None:
        raise ValueError("n_plot > 0 or n_videos > 0 needs an out_dir for the plots and videos")


def evaluate_spec(policy_fn: PolicyFn, spec: Callable[[int], Any], n_episodes: int, *,
                  name: str, obs_horizon: int, exec_horizon: int, max_steps: int,
                  n_plot: int = 0, n_videos: int = 0, out_dir: str | None = None,
                  num_envs: int | None = None, num_workers: int = 0, progress: bool = False,
                  plot_layout: dict | None = None, episode_facts: Callable[[int], dict] | None = None) -> dict[str, Any]:
    """Success of ``policy_fn`` on layouts 0 .. n_episodes - 1 of ``spec``.

    name: names the progress bar, the plots and the videos (e.g. "lift_eval0").
    plot_layout: where the plotted positions sit in an observation (plots.plot_rollout).
    episode_facts(i): extra per-episode entries (e.g. the layout's parameters).
    Returns success_rate, ci95 (Wilson), n_episodes, n_successes, episodes (per
    episode: success, steps, return, config_index = the layout id, the env's reset
    info and episode_facts), policy and env timings, plots, videos, videos_skipped.
    """
    check_arguments(n_episodes, obs_horizon, exec_horizon, n_plot, n_videos, out_dir)
    num_envs = min(int(num_envs or n_episodes), n_episodes)
    started = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=n_episodes, desc=f"eval {name}", disable=not progress, unit="ep")
    env = make_batched_env(spec, num_envs, num_workers)
    try:
        out = rollout(env, policy_fn, list(range(n_episodes)), obs_horizon, exec_horizon, max_steps,
                      n_record=max(n_plot, n_videos), on_episode_end=lambda: bar.update(1))
    finally:
        env.close()
        bar.close()

    episodes = [{"episode": ep, "success": bool(out.success[ep]), "steps": int(out.steps[ep]),
                 "return": float(out.returns[ep]), "config_index": ep, **out.reset_infos[ep],
                 **(episode_facts(ep) if episode_facts else {})} for ep in range(n_episodes)]

    plots = []
    if n_plot > 0:
        os.makedirs(out_dir, exist_ok=True)
        for ep in sorted(out.trajectories)[:n_plot]:
            r = episodes[ep]
            outcome = "success" if r["success"] else "fail"
            path = os.path.join(out_dir, f"{name}_ep{ep:03d}_{outcome}.png")
            plot_rollout(path, out.trajectories[ep],
                         f"{name}  layout {ep}  {outcome} in {r['steps']} steps",
                         plot_layout or METAWORLD_LAYOUT)
            plots.append(path)

    videos, videos_skipped = [], None
    if n_videos > 0:
        videos_skipped = video.gl_unavailable()
        if videos_skipped:
            logger.warning("No rollout videos: %s", videos_skipped)
        else:
            videos = video.record_videos(spec, episodes, {ep: a for ep, a in out.actions.items()
                                                          if ep < n_videos}, out_dir, name)
            for v in videos:
                if not v["replay_matches"]:
                    logger.warning("The replay of episode %d for its video did not end as the "
                                   "evaluation did; the video may differ from it", v["episode"])

    n_successes = sum(r["success"] for r in episodes)
    return {
        "success_rate": n_successes / n_episodes,
        "ci95": wilson_interval(n_successes, n_episodes),
        "n_episodes": n_episodes,
        "n_successes": int(n_successes),
        "episodes": episodes,
        "n_policy_calls": out.n_policy_calls,
        "num_envs": num_envs,
        "obs_horizon": obs_horizon,
        "exec_horizon": exec_horizon,
        "max_steps": max_steps,
        "env_steps": out.env_steps,
        "env_steps_per_s": out.env_steps / max(out.env_time_s, 1e-9),
        "policy_time_s": out.policy_time_s,
        "wall_time_s": time.perf_counter() - started,
        "plots": plots,
        "videos": videos,
        "videos_skipped": videos_skipped,
    }
