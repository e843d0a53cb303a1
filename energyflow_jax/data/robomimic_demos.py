"""Scripted RoboMimic demos, written in the official low_dim format, and the demo cache.

The official datasets (human demos) cannot be downloaded on machines without
internet, so the project makes its own with waypoint experts and writes them
exactly as the official files are laid out (``energyflow_jax.data.robomimic``):
``env_args``, ``states``, ``model_file``, obs and next_obs with the task's keys,
rewards, dones (1 at the success step) and train/valid masks, plus a
``provenance`` attribute like the Meta-World cache's. Replaying a written demo's
actions from its first state reproduces its success (tested).

Experts (OSC_POSE delta actions: 5 cm per step at full scale, gripper -1 open,
+1 closed): Lift hovers 8 cm above the cube with the gripper's yaw aligned to the
cube's (mod 90 degrees), descends, closes for 12 steps and lifts. Can does the
same over the can (no yaw: a cylinder), carries it above its target bin, lowers,
opens and retreats: success needs the gripper over 4 cm from the can. Square,
transport and tool_hang have no expert here; train on an official file
(``data.path``).

Demo layouts are the ``"demo"`` split of :func:`robomimic_sim.layout_seed`;
evaluations use ``"eval"``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from energyflow_jax.data import robomimic
from energyflow_jax.data.robomimic_sim import RobomimicSim, default_env_args
from energyflow_jax.io import run_dir

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_HOVER = 0.08  # m above the object before descending
_CLOSE_STEPS = 12
_GAIN = 10.0  # action per metre of position error (saturates at 10 cm)


def _yaw(quat_xyzw: np.ndarray) -> float:
    x, y, z, w = quat_xyzw
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def _wrap(angle: float, period: float) -> float:
    return (angle + period / 2) % period - period / 2


def _toward(eef: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(target) - eef) * _GAIN, -1.0, 1.0)


class PickExpert:
    """Waypoint expert for Lift (pick and lift) and Can (pick and place in its bin)."""

    def __init__(self, sim: RobomimicSim):
        self.sim = sim
        self.phase, self.t_phase = "hover", 0

    def _object(self) -> tuple[np.ndarray, float | None]:
        raw = self.sim.raw
        if self.sim.task == "lift":
            return np.asarray(raw["cube_pos"]), _wrap(
                _yaw(raw["cube_quat"]) - _yaw(raw["robot0_eef_quat"]), np.pi / 2)
        return np.asarray(raw["Can_pos"]), None

    def act(self) -> np.ndarray:
        eef = np.asarray(self.sim.raw["robot0_eef_pos"])
        obj, yaw_error = self._object()
        a = np.zeros(7)
        a[5] = 0.0 if yaw_error is None else np.clip(2 * yaw_error, -1, 1)
        self.t_phase += 1
        phase = self.phase
        if phase == "hover":
            target = obj + [0, 0, _HOVER]
            a[:3], a[6] = _toward(eef, target), -1
            if np.linalg.norm(eef - target) < 0.01 and abs(yaw_error or 0.0) < 0.05:
                self._next("descend")
        elif phase == "descend":
            target = obj + [0, 0, -0.005]
            a[:3], a[6] = _toward(eef, target), -1
            if np.linalg.norm(eef - target) < 0.01 or self.t_phase > 40:
                self._next("close")
        elif phase == "close":
            a[5], a[6] = 0.0, 1
            if self.t_phase >= _CLOSE_STEPS:
                self._next("lift")
        elif phase == "lift":
            a[5], a[6] = 0.0, 1
            if self.sim.task == "lift":
                a[:3] = _toward(eef, [eef[0], eef[1], 1.1])
            else:
                goal = np.asarray(self.sim.env.target_bin_placements[self.sim.env.object_id])
                above = np.array([goal[0], goal[1], max(goal[2] + 0.15, 1.0)])
                a[:3] = _toward(eef, [eef[0], eef[1], 1.05] if eef[2] < 0.98 else above)
                if np.linalg.norm((eef - above)[:2]) < 0.01:
                    self._next("lower")
        elif phase == "lower":
            goal = np.asarray(self.sim.env.target_bin_placements[self.sim.env.object_id])
            a[:3], a[5], a[6] = _toward(eef, goal + [0, 0, 0.1]), 0.0, 1
            if self.t_phase > 15:
                self._next("release")
        else:  # release, then retreat upward
            a[5], a[6] = 0.0, -1
            if self.t_phase > 5:
                a[:3] = _toward(eef, eef + [0, 0, 0.1])
        return a

    def _next(self, phase: str) -> None:
        self.phase, self.t_phase = phase, 0


EXPERT_TASKS = ("lift", "can")


def rollout_expert(sim: RobomimicSim, index: int, seed: int, max_steps: int) -> dict[str, Any]:
    """One expert episode from demo layout `index`, with everything the format keeps."""
    sim.reset_to_layout("demo", seed, index)
    expert = PickExpert(sim)
    obs, states, actions, rewards, dones = [sim.obs_dict()], [], [], [], []
    success = False
    for _ in range(max_steps):
        states.append(sim.state())
        action = expert.act()
        _, reward, success = sim.step(action)
        actions.append(action)
        rewards.append(reward)
        dones.append(float(success))
        obs.append(sim.obs_dict())
        if success:
            break
    stack = lambda rows: {k: np.stack([r[k] for r in rows]) for k in sim.keys}  # noqa: E731
    return {"obs": stack(obs[:-1]), "next_obs": stack(obs[1:]),
            "actions": np.stack(actions).astype(np.float64), "states": np.stack(states),
            "rewards": np.array(rewards), "dones": np.array(dones),
            "model_file": sim.model_xml(), "success": success, "layout_index": index}


_WORKER_SIM: dict[str, RobomimicSim] = {}  # in a collection worker process: its env


def _worker_rollout(task: str, index: int, seed: int, max_steps: int) -> dict[str, Any]:
    if task not in _WORKER_SIM:
        _WORKER_SIM[task] = RobomimicSim(default_env_args(task))
    return rollout_expert(_WORKER_SIM[task], index, seed, max_steps)


def collect_demos(task: str, n_demos: int, seed: int, max_steps: int | None = None,
                  progress: bool = False, num_workers: int = 0,
                  max_attempts_factor: int = 3) -> tuple[list[dict], int]:
    """The expert's first n_demos successes over demo layouts 0, 1, ...: (episodes,
    layouts tried). num_workers > 0 rolls layouts out in that many spawned processes;
    an episode depends on its layout only, so the demos are the same either way."""
    import concurrent.futures
    import multiprocessing

    from tqdm.auto import tqdm

    from energyflow_jax.data.robomimic_sim import BUDGETS

    if task not in EXPERT_TASKS:
        raise ValueError(f"no scripted expert for {task}; experts exist for "
                         f"{', '.join(EXPERT_TASKS)} (use an official file: data.path)")
    max_steps = int(max_steps or BUDGETS[task])
    pool = (concurrent.futures.ProcessPoolExecutor(num_workers, multiprocessing.get_context("spawn"))
            if num_workers > 0 else None)
    bar = tqdm(total=n_demos, desc=f"demos {task}", unit="demo", disable=not progress)
    by_index, tried, sim = {}, 0, None
    try:
        while sum(ep["success"] for ep in by_index.values()) < n_demos:
            if tried >= max_attempts_factor * n_demos:
                raise RuntimeError(f"the {task} expert succeeded in "
                                   f"{sum(ep['success'] for ep in by_index.values())} of {tried} "
                                   f"layouts; {n_demos} demos were asked for")
            # As many layouts as successes are missing, in parallel where there are workers.
            batch = range(tried, tried + n_demos - sum(ep["success"] for ep in by_index.values()))
            tried = batch.stop
            if pool is None:
                sim = sim or RobomimicSim(default_env_args(task))
                runs = (rollout_expert(sim, i, seed, max_steps) for i in batch)
            else:
                runs = (f.result() for f in concurrent.futures.as_completed(
                    [pool.submit(_worker_rollout, task, i, seed, max_steps) for i in batch]))
            for episode in runs:
                by_index[episode["layout_index"]] = episode
                bar.update(int(episode["success"]))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if sim is not None:
            sim.close()
    episodes = [by_index[i] for i in sorted(by_index) if by_index[i]["success"]]
    return episodes[:n_demos], tried


def requested_provenance(task: str, n_demos: int, seed: int, max_steps: int) -> dict[str, Any]:
    """Everything that determines a generated file's content; reused only if all match."""
    return {"format_version": CACHE_FORMAT_VERSION, "task": task, "seed": int(seed),
            "n_episodes": int(n_demos), "max_steps": int(max_steps), "layout_split": "demo",
            "expert": "scripted waypoints (energyflow_jax.data.robomimic_demos)",
            "versions": run_dir.package_versions(("robosuite", "mujoco", "numpy"))}


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    with robomimic._open(path) as f:
        raw = f["data"].attrs.get("provenance") if "data" in f else None
    return {} if raw is None else json.loads(robomimic._decode(raw))


def write_demos(path: str | os.PathLike, task: str, episodes: list[dict], provenance: dict,
                valid_fraction: float = 0.1) -> None:
    """The official layout with train/valid masks (the last valid_fraction, at least one
    demo of two or more, are valid)."""
    n_valid = max(1, int(round(valid_fraction * len(episodes)))) if len(episodes) > 1 else 0
    n_train = len(episodes) - n_valid
    masks = {"train": list(range(n_train)), "valid": list(range(n_train, len(episodes)))}
    robomimic.write_low_dim(path, episodes, default_env_args(task), masks=masks,
                            extra_attrs={"provenance": provenance})


def load_or_collect(path: str | os.PathLike, task: str, n_demos: int, seed: int,
                    max_steps: int, progress: bool = False, num_workers: int = 0) -> str:
    """A generated demo file for (task, n_demos, seed, max_steps) at `path`, made if needed.

    A file whose provenance differs from the request is rebuilt, with a warning
    saying why; the new file is written atomically. Returns the path.
    """
    path = os.fspath(path)
    wanted = requested_provenance(task, n_demos, seed, max_steps)
    if os.path.exists(path):
        found = read_provenance(path)
        mismatch = [f"{k}: file {found.get(k)!r}, requested {v!r}" for k, v in wanted.items()
                    if found.get(k) != v]
        if not mismatch:
            return path
        logger.warning("Demo file %s does not match the request (%s); rebuilding it", path,
                       "; ".join(mismatch))
    episodes, attempts = collect_demos(task, n_demos, seed, max_steps, progress=progress,
                                       num_workers=num_workers)
    provenance = dict(wanted, n_attempts=attempts, expert_success_rate=n_demos / attempts,
                      kept="successful episodes only",
                      episode_end="first step with the env's success check, else max_steps",
                      layout_indices=[ep["layout_index"] for ep in episodes],
                      n_transitions=int(sum(len(ep["actions"]) for ep in episodes)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_demos(path, task, episodes, provenance)
    return path
