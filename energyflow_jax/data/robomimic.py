"""RoboMimic low_dim datasets (the official hdf5 layout), read and written with h5py alone.

The `robomimic` package imports torch, so the project reads its file format
itself. Layout (v1.5-era `low_dim_v15.hdf5`):

    data                      attrs: total (samples in all demos), env_args (JSON:
                              env_name, type, env_kwargs)
    data/demo_<i>             attrs: num_samples, model_file (optional, MJCF xml)
        actions (T, A)  states (T, S)  rewards (T,)  dones (T,)
        obs/<key> (T, d)      next_obs/<key> (T, d)
    mask/<filter>             demo names (bytes): train, valid, 20_percent, ...

A policy observes the concatenation of `obs_keys(task)` in that order, as
Diffusion Policy and the EnergyFlow authors use them. Every check names the
file, the demo and the key at fault.
"""
from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from energyflow_jax.io import run_dir

TASKS = ("lift", "can", "square", "transport", "tool_hang")
_ROBOT_KEYS = ("eef_pos", "eef_quat", "gripper_qpos")
OBS_DIMS = {"lift": 19, "can": 23, "square": 23, "transport": 59, "tool_hang": 53}
ACTION_DIMS = {"lift": 7, "can": 7, "square": 7, "transport": 14, "tool_hang": 7}
ENV_NAMES = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare",
             "transport": "TwoArmTransport", "tool_hang": "ToolHang"}

# Where the object's world position sits in the `object` observation (robosuite 1.5
# order); transport and tool_hang hold several objects and are not plotted.
OBJECT_POSITION = {"lift": 0, "can": 7, "square": 7}

# Success %, proficient-human low_dim, mean over 3 seeds, from the paper (NOTES.md).
PUBLISHED_SUCCESS = {
    "EnergyFlow": {"lift": 100.0, "can": 100.0, "square": 95.3, "transport": 89.4,
                   "tool_hang": 84.2},
    "Diffusion Policy": {"lift": 100.0, "can": 99.2, "square": 93.5, "transport": 85.9,
                         "tool_hang": 77.2},
}


class RobomimicFormatError(ValueError):
    """A file that does not hold a readable, consistent RoboMimic low_dim dataset."""


def validate_task_name(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown RoboMimic task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def plot_layout(task: str, keys: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """Where the end effector and the object sit in a concatenated observation."""
    keys = list(keys or obs_keys(task))
    widths = {"object": OBS_DIMS[task] - 9 * (2 if task == "transport" else 1),
              "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2,
              "robot1_eef_pos": 3, "robot1_eef_quat": 4, "robot1_gripper_qpos": 2}
    offsets = dict(zip(keys, np.cumsum([0] + [widths[k] for k in keys[:-1]])))
    layout = {}
    if "robot0_eef_pos" in offsets:
        layout["end effector"] = (int(offsets["robot0_eef_pos"]), int(offsets["robot0_eef_pos"]) + 3)
    if "object" in offsets and task in OBJECT_POSITION:
        start = int(offsets["object"]) + OBJECT_POSITION[task]
        layout["object"] = (start, start + 3)
    return layout


def object_start(task: str, first_obs: np.ndarray) -> np.ndarray:
    """(..., 3) where a layout puts the object: its world position (lift, can, square),
    else the first three object values (a fingerprint of the layout)."""
    start = OBJECT_POSITION.get(task, 0)
    return np.asarray(first_obs)[..., start:start + 3]


def check_file_for_task(path: str | os.PathLike, task: str) -> dict:
    """A file's env_args, after checking it exists, is hdf5 and holds `task`'s demos with
    the task's action dimension; one clear error otherwise (before any work)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.path {path!s} does not exist")
    with _open(path) as f:
        env_args = _env_args(f, path)
        names = _demo_names(f["data"])
        if not names:
            raise RobomimicFormatError(f"{path}: data holds no demo_<i> groups")
        first = f["data"][names[0]]
        if "actions" not in first:
            raise RobomimicFormatError(f"{path}: {names[0]} has no 'actions'")
        action_dim = first["actions"].shape[-1]
    if env_args["env_name"] != ENV_NAMES[validate_task_name(task)]:
        raise RobomimicFormatError(f"{path}: its env_args name env {env_args['env_name']!r}, "
                                   f"but task {task!r} is {ENV_NAMES[task]!r}")
    if action_dim != ACTION_DIMS[task]:
        raise RobomimicFormatError(f"{path}: its actions are {action_dim}-D; {task} takes "
                                   f"{ACTION_DIMS[task]}-D actions")
    return env_args


def obs_keys(task: str) -> tuple[str, ...]:
    """The observation keys a policy sees, in order (robot1_* too for transport)."""
    robots = ("robot0", "robot1") if validate_task_name(task) == "transport" else ("robot0",)
    return ("object",) + tuple(f"{r}_{k}" for r in robots for k in _ROBOT_KEYS)


def _demo_names(data: h5py.Group) -> list[str]:
    names = [n for n in data.keys() if re.fullmatch(r"demo_\d+", n)]
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def _decode(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def filter_keys(path: str | os.PathLike) -> list[str]:
    """The demo filters (`mask/<filter>`) a file offers."""
    with _open(path) as f:
        return sorted(f["mask"].keys()) if "mask" in f else []


def _open(path):
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError as e:  # not hdf5, truncated, or unreadable
        raise RobomimicFormatError(f"{path}: not a readable hdf5 file ({e})") from e


def read_env_args(path: str | os.PathLike) -> dict:
    """data.attrs['env_args'] as a dict (env_name, type, env_kwargs)."""
    with _open(path) as f:
        return _env_args(f, path)


def _env_args(f: h5py.File, path) -> dict:
    if "data" not in f:
        raise RobomimicFormatError(f"{path}: no 'data' group (not a RoboMimic dataset)")
    raw = f["data"].attrs.get("env_args")
    if raw is None:
        raise RobomimicFormatError(f"{path}: data has no 'env_args' attribute")
    try:
        env_args = json.loads(_decode(raw))
    except json.JSONDecodeError as e:
        raise RobomimicFormatError(f"{path}: data.attrs['env_args'] is not JSON ({e})") from e
    missing = [k for k in ("env_name", "env_kwargs") if k not in env_args]
    if missing:
        raise RobomimicFormatError(f"{path}: env_args lacks {', '.join(missing)}")
    return env_args


def read_low_dim(path: str | os.PathLike, task: str, filter_key: str | None = None,
                 keys: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], dict]:
    """Episodes of a low_dim file as the windowing code takes them, and the file's info.

    Each episode: "obs" (T, obs_dim), the `keys` (default obs_keys(task)) concatenated
    in order; "actions" (T, A); "states" (T, S) when present; "demo" (its name).
    filter_key selects the demos listed in mask/<filter_key> (e.g. "train").
    info: env_args, total, filter_key, obs_keys, demos, model_files (per demo or None).
    Raises RobomimicFormatError naming the demo and key for a missing key, mismatched
    lengths, non-finite values, wrong dimensions or a truncated dataset.
    """
    keys = tuple(keys or obs_keys(task))
    with _open(path) as f:
        env_args = _env_args(f, path)
        data = f["data"]
        names = _demo_names(data)
        if not names:
            raise RobomimicFormatError(f"{path}: data holds no demo_<i> groups")
        counts = {}
        for name in names:
            if "num_samples" not in data[name].attrs:
                raise RobomimicFormatError(f"{path}: {name} has no num_samples attribute")
            counts[name] = int(data[name].attrs["num_samples"])
        total = data.attrs.get("total")
        if total is not None and int(total) != sum(counts.values()):
            raise RobomimicFormatError(
                f"{path}: data.attrs['total'] is {int(total)} but the {len(names)} demos hold "
                f"{sum(counts.values())} samples (a truncated or partly written dataset)")
        if filter_key is not None:
            masks = sorted(f["mask"].keys()) if "mask" in f else []
            if filter_key not in masks:
                raise RobomimicFormatError(
                    f"{path}: no demo filter {filter_key!r}; the file has "
                    f"{', '.join(masks) if masks else 'no mask group'}")
            chosen = [_decode(n) for n in f["mask"][filter_key][()]]
            absent = [n for n in chosen if n not in counts]
            if absent:
                raise RobomimicFormatError(f"{path}: mask/{filter_key} names demos that are "
                                           f"not in data: {', '.join(absent[:5])}")
            names = sorted(chosen, key=lambda n: int(n.split("_")[1]))
        episodes, model_files = [], []
        for name in names:
            episodes.append(_read_demo(path, data[name], name, keys, counts[name], task))
            mf = data[name].attrs.get("model_file")
            model_files.append(None if mf is None else _decode(mf))
    return episodes, {"env_args": env_args, "total": sum(counts.values()),
                      "filter_key": filter_key, "obs_keys": list(keys), "demos": names,
                      "model_files": model_files}


def _array(path, demo: h5py.Group, name: str, key: str, length: int) -> np.ndarray:
    if key not in demo:
        raise RobomimicFormatError(f"{path}: {name} has no {key!r}")
    values = np.asarray(demo[key][()])
    if len(values) != length:
        raise RobomimicFormatError(f"{path}: {name}/{key} has {len(values)} rows but "
                                   f"num_samples is {length}")
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            step = int(np.argwhere(bad)[0][0])
            raise RobomimicFormatError(f"{path}: {name}/{key} has {int(bad.sum())} non-finite "
                                       f"value(s), first at step {step}")
    return values


def _read_demo(path, demo: h5py.Group, name: str, keys, length: int, task: str) -> dict:
    if length < 1:
        raise RobomimicFormatError(f"{path}: {name} is empty (num_samples {length})")
    actions = _array(path, demo, name, "actions", length).astype(np.float32)
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIMS[task]:
        raise RobomimicFormatError(f"{path}: {name}/actions has shape {actions.shape}; "
                                   f"{task} takes {ACTION_DIMS[task]}-D actions")
    parts = []
    for key in keys:
        part = _array(path, demo, name, f"obs/{key}", length).astype(np.float32)
        parts.append(part.reshape(length, -1))
    obs = np.concatenate(parts, axis=1)
    if list(keys) == list(obs_keys(task)) and obs.shape[1] != OBS_DIMS[task]:
        raise RobomimicFormatError(f"{path}: {name}: the observation keys give "
                                   f"{obs.shape[1]} dims; {task} has {OBS_DIMS[task]}")
    episode = {"obs": obs, "actions": actions, "demo": name}
    if "states" in demo:
        episode["states"] = _array(path, demo, name, "states", length)
    return episode


def write_low_dim(path: str | os.PathLike, episodes: Sequence[Mapping[str, Any]],
                  env_args: Mapping[str, Any], masks: Mapping[str, Sequence[int]] | None = None,
                  extra_attrs: Mapping[str, Any] | None = None) -> None:
    """Write episodes in the official layout, atomically (a reader never sees half a file).

    Each episode: "obs" and "next_obs" ({key: (T, d)}), "actions" (T, A), "states"
    (T, S), "rewards" (T,), "dones" (T,), optional "model_file" (str). masks maps a
    filter name to episode indices. extra_attrs go on `data` (provenance, as JSON).
    """
    buffer = io.BytesIO()  # built in memory, then written with one atomic rename
    with h5py.File(buffer, "w") as f:
        data = f.create_group("data")
        total = 0
        for i, ep in enumerate(episodes):
            demo = data.create_group(f"demo_{i}")
            for key in ("actions", "states", "rewards", "dones"):
                demo.create_dataset(key, data=np.asarray(ep[key]))
            for group in ("obs", "next_obs"):
                g = demo.create_group(group)
                for key, values in ep[group].items():
                    g.create_dataset(key, data=np.asarray(values))
            demo.attrs["num_samples"] = len(ep["actions"])
            if ep.get("model_file"):
                demo.attrs["model_file"] = ep["model_file"]
            total += len(ep["actions"])
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(dict(env_args))
        for key, value in (extra_attrs or {}).items():
            data.attrs[key] = json.dumps(value)
        if masks:
            mask = f.create_group("mask")
            for name, indices in masks.items():
                mask.create_dataset(name, data=np.array([f"demo_{i}".encode() for i in indices]))
    run_dir.atomic_write(path, lambda out: out.write(buffer.getbuffer()))
