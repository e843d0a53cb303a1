"""Batched receding-horizon evaluation of chunked policies on Meta-World v3.

N environments (a plain list of bare v3 envs, stepped in a loop on the host) run
together; every replan makes ONE ``policy_fn`` call for all of them, with a batch
of fixed shape (num_envs, obs_horizon, 39), so a jitted policy compiles once.
Each env executes the first ``exec_horizon`` actions of its chunk (clipped to
[-1, 1]) and then the policy is queried again. An episode ends at its first step
with ``info["success"] == 1`` (counted as a success) or after ``max_steps`` steps.
Finished envs are not stepped any further (stepping them would only burn
simulator time); their rows in the policy batch keep their last observation
history and the corresponding outputs are ignored.

The observation history at reset is the first observation repeated, matching
the start padding of the training windows (``energyflow_jax.data.dataset``).

Evaluation layouts come from the ``"eval"`` config stream of
``energyflow_jax.data.metaworld_demos`` (disjoint from the demos' ``"demo"``
stream; see that module): episode i uses eval config i of ``seed``.

Out-of-distribution perturbations (``perturbation=``)
-----------------------------------------------------
Applied at reset, on top of the episode's eval config:

==========  =======================  =====================
level       object shift (x-y plane)  hand start shift (3-D)
==========  =======================  =====================
"0"         0                         0
"S"         2 cm                      2 cm
"M"         5 cm                      5 cm
"L"         10 cm                     10 cm
==========  =======================  =====================

A float ``p`` means both shifts equal ``p`` metres. Directions are random per
episode (seeded by (task, seed, episode)): uniform on the circle for the object,
uniform on the sphere for the hand.

* Hand: ``env.hand_init_pos`` (read only by ``_reset_hand``, which drives the
  mocap there for 50 sim steps at every reset) is set to the env's default plus
  the offset, clipped to the env's hand/mocap bounds.
* Object: the first two components of the frozen rand vec are shifted. By
  Meta-World convention they are the main object's initial x-y; checked
  empirically for 45 of the 50 v3 tasks, including button-press, drawer-open,
  assembly, bin-picking and hammer. For plate-slide* the puck does not follow its
  rand vec, so the object shift has no effect there (disassemble moves 1.7 cm in
  y for a 2 cm request). The realized shifts are measured from the observations
  and reported per episode, and a warning is logged when the object did not move.
  Shifts can meet scene geometry: drawer-open's layout fixes the drawer at
  y = 0.9, and a shift away from the robot pushes the case against the scene, so
  the drawer starts partly open (its handle, which is what obs[4:7] reports, moves
  toward the robot). That is part of what such a perturbation does to the task;
  the realized offsets in the results show it. The goal is not shifted. If a shifted layout breaks one of the env's own
  constraints (e.g. object within 15 cm of the goal, which would make its
  ``reset_model`` loop forever on a frozen rand vec) another direction is drawn.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from energyflow_jax.data import metaworld as demos

logger = logging.getLogger(__name__)

PolicyFn = Callable[[np.ndarray], Any]

# level -> (object x-y shift, hand start shift), metres.
PERTURBATION_LEVELS: dict[str, tuple[float, float]] = {
    "0": (0.0, 0.0),
    "S": (0.02, 0.02),
    "M": (0.05, 0.05),
    "L": (0.10, 0.10),
}
_PERTURB_SALT = 0x50455254  # "PERT"
# reset_model reads the rand vec once per call and SawyerXYZEnv.reset calls it
# twice; more reads than this mean a rejection loop on an infeasible layout.
_MAX_RAND_VEC_READS = 16
_MAX_DIRECTION_TRIES = 64


@dataclass(frozen=True)
class Perturbation:
    level: str
    object_shift: float  # metres, x-y plane
    hand_shift: float  # metres, 3-D

    @property
    def active(self) -> bool:
        return self.object_shift > 0 or self.hand_shift > 0


def resolve_perturbation(perturbation: str | float | int) -> Perturbation:
    """A level name ("0", "S", "M", "L") or a shift in metres -> Perturbation."""
    if isinstance(perturbation, str):
        key = perturbation.strip().upper()
        if key not in PERTURBATION_LEVELS:
            raise ValueError(
                f"Unknown perturbation level {perturbation!r}; use one of "
                f"{list(PERTURBATION_LEVELS)} or a shift in metres"
            )
        return Perturbation(key, *PERTURBATION_LEVELS[key])
    shift = float(perturbation)
    if not math.isfinite(shift) or shift < 0:
        raise ValueError(f"perturbation shift must be a finite non-negative number, got {perturbation!r}")
    name = "0" if shift == 0 else f"{shift:g}m"
    return Perturbation(name, shift, shift)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate
    at 0 or n successes, which matters for small evaluation budgets.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)  # exact ends, no round-off
    return (low, high)


# --------------------------------------------------------------------------- resets


class _InfeasibleLayout(Exception):
    pass


def _random_unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.normal(size=dim)
    return v / max(np.linalg.norm(v), 1e-12)


def _reset_with_rand_vec(env, rand_vec: np.ndarray) -> np.ndarray:
    """Reset with ``rand_vec`` as the layout; raise _InfeasibleLayout on a rejection loop."""
    reads = 0

    def frozen_rand_vec():
        nonlocal reads
        reads += 1
        if reads > _MAX_RAND_VEC_READS:
            raise _InfeasibleLayout()
        return rand_vec.copy()

    # An instance attribute shadows the method for this reset only.
    env._get_state_rand_vec = frozen_rand_vec
    try:
        obs, _ = env.reset()
    finally:
        del env._get_state_rand_vec
    return obs


def reset_episode(env, config, default_hand_pos: np.ndarray, perturbation: Perturbation,
                  rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Reset ``env`` to ``config`` with ``perturbation`` applied; (first obs, offsets info)."""
    env.set_task(config)
    low = np.maximum(env.hand_low, env.mocap_low)
    high = np.minimum(env.hand_high, env.mocap_high)
    hand_target = np.clip(default_hand_pos + perturbation.hand_shift * _random_unit(rng, 3), low, high)
    info: dict[str, Any] = {"hand_offset": [0.0, 0.0, 0.0], "object_offset": [0.0, 0.0]}
    if not perturbation.active:
        env.hand_init_pos = default_hand_pos.copy()
        obs, _ = env.reset()
        return obs, info

    # Reference reset without perturbation: the realized shifts are measured against it.
    env.hand_init_pos = default_hand_pos.copy()
    reference, _ = env.reset()
    env.hand_init_pos = hand_target
    base = demos.config_rand_vec(config)
    if perturbation.object_shift > 0:
        for _ in range(_MAX_DIRECTION_TRIES):
            rand_vec = base.copy()
            rand_vec[:2] += perturbation.object_shift * _random_unit(rng, 2)
            try:
                obs = _reset_with_rand_vec(env, rand_vec)
                break
            except _InfeasibleLayout:
                continue
        else:
            raise RuntimeError(
                f"No feasible {perturbation.object_shift} m object shift found for {env.task_name} "
                f"in {_MAX_DIRECTION_TRIES} directions (env layout constraints reject them all)"
            )
    else:
        obs, _ = env.reset()
    info["hand_offset"] = (obs[0:3] - reference[0:3]).tolist()
    info["object_offset"] = (obs[4:6] - reference[4:6]).tolist()
    return obs, info


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


def make_random_policy_fn(pred_horizon: int = 16, seed: int = 0) -> PolicyFn:
    """Uniform random actions in [-1, 1]: a floor baseline."""
    rng = np.random.default_rng(seed)

    def policy_fn(obs_history: np.ndarray) -> np.ndarray:
        return rng.uniform(-1, 1, (len(obs_history), pred_horizon, demos.ACTION_DIM)).astype(np.float32)

    return policy_fn


# --------------------------------------------------------------------------- plots


def plot_rollout(path: str, trajectory: np.ndarray, title: str) -> None:
    """End-effector and object trajectories of one rollout: top view and heights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hand, obj, goal = trajectory[:, 0:3], trajectory[:, 4:7], trajectory[0, 36:39]
    fig, (top, side) = plt.subplots(1, 2, figsize=(9, 4))
    top.plot(hand[:, 0], hand[:, 1], "-", color="tab:blue", label="end effector")
    top.plot(obj[:, 0], obj[:, 1], "-", color="tab:orange", label="object")
    top.plot(hand[0, 0], hand[0, 1], "o", color="tab:blue")
    top.plot(obj[0, 0], obj[0, 1], "o", color="tab:orange")
    top.plot(goal[0], goal[1], "*", color="tab:green", markersize=12, label="goal")
    top.set(xlabel="x [m]", ylabel="y [m]", title="top view (o = start)")
    top.set_aspect("equal", adjustable="datalim")
    top.legend(fontsize=8)
    side.plot(hand[:, 2], color="tab:blue", label="end effector z")
    side.plot(obj[:, 2], color="tab:orange", label="object z")
    side.axhline(goal[2], color="tab:green", linestyle=":", label="goal z")
    side.set(xlabel="step", ylabel="z [m]", title="height")
    side.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- evaluation


def _perturbation_rng(task: str, seed: int, episode: int) -> np.random.Generator:
    return np.random.default_rng([_PERTURB_SALT, zlib.crc32(task.encode()), int(seed), int(episode)])


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
    out_dir: str | None = None,
    num_envs: int | None = None,
    exclude_rand_vecs: np.ndarray | None = None,
    progress: bool = False,
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

    Returns a dict with success_rate, ci95 (Wilson), n_episodes, n_successes,
    episodes (per episode: success, steps, return, config_index, rand_vec,
    hand_offset, object_offset), n_policy_calls, env_steps, env_steps_per_s
    (time inside env.step only), wall_time_s, perturbation and plot paths.
    """
    demos.validate_task_name(task)
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if obs_horizon < 1 or exec_horizon < 1:
        raise ValueError(f"obs_horizon and exec_horizon must be >= 1, got {obs_horizon}, {exec_horizon}")
    if n_plot > 0 and out_dir is None:
        raise ValueError("n_plot > 0 needs an out_dir for the plots")
    perturb = resolve_perturbation(perturbation)
    num_envs = min(int(num_envs or n_episodes), n_episodes)
    started = time.perf_counter()

    envs = [demos.make_env(task, max_steps) for _ in range(num_envs)]
    # The env's own start position, before any perturbation touches it.
    default_hand = [np.array(env.hand_init_pos, dtype=np.float64) for env in envs]
    configs = [demos.sample_config(envs[0], task, "eval", seed, i) for i in range(n_episodes)]
    rand_vecs = np.stack([demos.config_rand_vec(c) for c in configs])
    if exclude_rand_vecs is not None:
        demos.assert_configs_disjoint(rand_vecs, exclude_rand_vecs)

    results: list[dict[str, Any]] = []
    trajectories: dict[int, list[np.ndarray]] = {}
    n_policy_calls = 0
    env_steps = 0
    env_time = 0.0
    policy_time = 0.0

    from tqdm.auto import tqdm

    bar = tqdm(total=n_episodes, desc=f"eval {task} [{perturb.level}]", disable=not progress, unit="ep")
    for wave_start in range(0, n_episodes, num_envs):
        episode_ids = list(range(wave_start, min(wave_start + num_envs, n_episodes)))
        n_live = len(episode_ids)
        history = np.zeros((num_envs, obs_horizon, demos.OBS_DIM), np.float32)
        infos = []
        for slot, ep in enumerate(episode_ids):
            obs, info = reset_episode(envs[slot], configs[ep], default_hand[slot], perturb,
                                      _perturbation_rng(task, seed, ep))
            history[slot] = obs.astype(np.float32)  # start padding: first obs repeated
            infos.append(info)
            if ep < n_plot:
                trajectories[ep] = [obs.copy()]
        # Rows of an incomplete last wave copy a live row; their outputs are ignored.
        history[n_live:] = history[0]
        done = np.zeros(num_envs, bool)
        done[n_live:] = True
        success = np.zeros(num_envs, bool)
        steps = np.zeros(num_envs, np.int64)
        returns = np.zeros(num_envs, np.float64)

        while not done.all():
            t0 = time.perf_counter()
            chunk = np.asarray(policy_fn(history.copy()))
            policy_time += time.perf_counter() - t0
            n_policy_calls += 1
            if chunk.ndim != 3 or chunk.shape[0] != num_envs or chunk.shape[2] != demos.ACTION_DIM \
                    or chunk.shape[1] < exec_horizon:
                raise ValueError(
                    f"policy_fn returned shape {chunk.shape}; expected ({num_envs}, pred_horizon >= "
                    f"exec_horizon={exec_horizon}, {demos.ACTION_DIM})"
                )
            live = ~done
            if not np.all(np.isfinite(chunk[live, :exec_horizon])):
                raise ValueError("policy_fn returned non-finite actions")
            chunk = np.clip(chunk[:, :exec_horizon], -1.0, 1.0).astype(np.float32)
            for k in range(exec_horizon):
                for slot in np.flatnonzero(~done):
                    t0 = time.perf_counter()
                    obs, reward, _, _, info = envs[slot].step(chunk[slot, k])
                    env_time += time.perf_counter() - t0
                    env_steps += 1
                    steps[slot] += 1
                    returns[slot] += float(reward)
                    history[slot] = np.roll(history[slot], -1, axis=0)
                    history[slot, -1] = obs
                    ep = episode_ids[slot]
                    if ep in trajectories:
                        trajectories[ep].append(obs.copy())
                    if info["success"] >= 1.0:
                        success[slot] = done[slot] = True
                    elif steps[slot] >= max_steps:
                        done[slot] = True
                    if done[slot]:
                        bar.update(1)
                if done.all():
                    break

        for slot, ep in enumerate(episode_ids):
            results.append({
                "episode": ep,
                "success": bool(success[slot]),
                "steps": int(steps[slot]),
                "return": float(returns[slot]),
                "config_index": ep,
                "rand_vec": rand_vecs[ep].tolist(),
                **infos[slot],
            })
    bar.close()
    for env in envs:
        env.close()

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
        for ep in sorted(trajectories):
            r = results[ep]
            outcome = "success" if r["success"] else "fail"
            path = os.path.join(out_dir, f"{task}_{perturb.level}_ep{ep:03d}_{outcome}.png")
            plot_rollout(path, np.stack(trajectories[ep]),
                         f"{task}  eval config {ep}  perturbation {perturb.level}  "
                         f"{outcome} in {r['steps']} steps")
            plots.append(path)

    n_successes = sum(r["success"] for r in results)
    return {
        "task": task,
        "seed": int(seed),
        "success_rate": n_successes / n_episodes,
        "ci95": wilson_interval(n_successes, n_episodes),
        "n_episodes": n_episodes,
        "n_successes": int(n_successes),
        "episodes": results,
        "n_policy_calls": n_policy_calls,
        "num_envs": num_envs,
        "obs_horizon": obs_horizon,
        "exec_horizon": exec_horizon,
        "max_steps": max_steps,
        "env_steps": env_steps,
        "env_steps_per_s": env_steps / max(env_time, 1e-9),
        "policy_time_s": policy_time,
        "wall_time_s": time.perf_counter() - started,
        "perturbation": {"level": perturb.level, "object_shift_m": perturb.object_shift,
                         "hand_shift_m": perturb.hand_shift},
        "plots": plots,
    }


def evaluate_perturbation_levels(policy_fn: PolicyFn, task: str, n_episodes: int, seed: int,
                                 levels: Sequence[str] = ("0", "S", "M", "L"), **kwargs) -> dict[str, dict]:
    """:func:`evaluate` at each OOD level on the same eval configs."""
    return {level: evaluate(policy_fn, task, n_episodes, seed, perturbation=level, **kwargs)
            for level in levels}
