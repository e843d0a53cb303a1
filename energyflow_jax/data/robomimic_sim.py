"""RoboMimic's robosuite tasks, built from a dataset's ``env_args``: layouts, observations, states.

The environments a RoboMimic dataset was recorded in are robosuite envs whose
constructor arguments the file keeps (``data.attrs['env_args']``). This module
turns those arguments into a robosuite 1.5 env and wraps it as a
:class:`RobomimicSim`: reset to a seeded layout or to a recorded state, step,
observe with exactly the dataset's keys in order. Demos
(``energyflow_jax.data.robomimic_demos``) and evaluation
(``energyflow_jax.envs.robomimic``) share it, so both see the same observations.

robosuite 1.5 differences handled here:

* Controller configs: files from robosuite <= 1.4 hold a flat OSC_POSE dict;
  robosuite 1.5 wants the composite format and silently ignores the flat one,
  so it is converted (``refactor_composite_controller_config``).
* ``lite_physics`` defaults to True in 1.5; the official datasets were recorded
  without it, so it is False unless ``env_kwargs`` says otherwise.
* Observations are robosuite 1.5's own (the convention of the v1.5 dataset
  files; older files differ in Lift's gripper_to_cube sign and the order of
  Can/Square's object-state). The dataset key ``object`` is robosuite's
  ``object-state``. Relative object sensors (Can/Square's object-to-eef pose)
  read an observation cache filled in sensor order, so right after a reset they
  see the previous episode's values or zeros; after a reset the observation is
  computed twice, which makes it a function of the simulator state alone
  (tested: reset_to(states[0]) gives obs[0]).

Layouts: robosuite 1.5.1 samples placements and joint noise from NumPy's global
generator (its envs take no seed). A layout (task, split, seed, index) seeds
that generator for the one reset and puts the caller's generator state back;
building an env does the same with seed 0, so the caller's draws are untouched.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from energyflow_jax.data.robomimic import ACTION_DIMS, ENV_NAMES, TASKS, obs_keys, validate_task_name

BUDGETS = {"lift": 400, "can": 400, "square": 400, "transport": 700, "tool_hang": 700}
SPLIT_IDS = {"demo": 0, "eval": 1}
_LAYOUT_SALT = 0x524D4C59  # "RMLY"

# The flat OSC_POSE controller of the official datasets (robosuite <= 1.4 format):
# delta end-effector pose, 5 cm and 0.5 rad per step at full scale.
OSC_POSE = {
    "type": "OSC_POSE", "input_max": 1, "input_min": -1,
    "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
    "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
    "kp": 150, "damping": 1, "impedance_mode": "fixed", "kp_limits": [0, 300],
    "damping_limits": [0, 10], "position_limits": None, "orientation_limits": None,
    "uncouple_pos_ori": True, "control_delta": True, "interpolation": None, "ramp_ratio": 0.2,
}
# Forced whatever a file says: no rendering window, no cameras, object observations,
# episodes that never end by themselves (the evaluation owns the step budget).
_FORCED = {"has_renderer": False, "use_camera_obs": False, "use_object_obs": True,
           "ignore_done": True}


def default_env_args(task: str) -> dict[str, Any]:
    """The env_args of a task as the official low_dim datasets record them."""
    validate_task_name(task)
    kwargs: dict[str, Any] = {
        "robots": ["Panda", "Panda"] if task == "transport" else ["Panda"],
        "controller_configs": copy.deepcopy(OSC_POSE), "control_freq": 20,
        "reward_shaping": False, "reward_scale": 1.0, "lite_physics": False,
        "has_offscreen_renderer": False, **_FORCED,
    }
    if task == "transport":
        kwargs["env_configuration"] = "single-arm-opposed"
    return {"env_name": ENV_NAMES[task], "type": 1, "env_kwargs": kwargs}


def task_of(env_args: Mapping[str, Any]) -> str:
    """The task an env_args describes (its env_name), or ValueError naming the known ones."""
    by_env = {v: k for k, v in ENV_NAMES.items()}
    name = env_args.get("env_name")
    if name not in by_env:
        raise ValueError(f"env_args name env {name!r}, which is not a RoboMimic task; known: "
                         + ", ".join(f"{v} ({k})" for k, v in ENV_NAMES.items()))
    return by_env[name]


def robosuite_kwargs(env_args: Mapping[str, Any]) -> dict[str, Any]:
    """env_kwargs as robosuite 1.5 takes them (controller converted, lite_physics explicit)."""
    from robosuite.controllers.composite.composite_controller_factory import (
        refactor_composite_controller_config,
    )

    kwargs = copy.deepcopy(dict(env_args["env_kwargs"]))
    robots = kwargs.get("robots", ["Panda"])
    robots = [robots] if isinstance(robots, str) else list(robots)
    controller = kwargs.get("controller_configs")
    if controller is not None and "body_parts" not in controller:  # the flat <= 1.4 format
        kwargs["controller_configs"] = refactor_composite_controller_config(
            controller, robots[0], ["right", "left"] if robots[0] in ("GR1", "Tiago") else ["right"])
    kwargs.setdefault("lite_physics", False)
    # Videos render with mujoco.Renderer on the MjModel, not robosuite's renderer.
    kwargs.update(_FORCED, has_offscreen_renderer=False, hard_reset=False)
    for key in ("camera_names", "camera_heights", "camera_widths", "camera_depths"):
        kwargs.pop(key, None)  # no cameras: the low_dim observations only
    return kwargs


def layout_seed(task: str, split: str, seed: int, index: int) -> int:
    """The 32-bit seed of layout `index` of (task, split, seed); splits never share one."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    seq = np.random.SeedSequence([_LAYOUT_SALT, zlib.crc32(task.encode()), SPLIT_IDS[split],
                                  int(seed), int(index)])
    return int(seq.generate_state(1)[0])


@contextlib.contextmanager
def _global_numpy_seed(seed: int):
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


class RobomimicSim:
    """One robosuite env of a RoboMimic task, observed with the dataset's keys.

    ``env_args``: a dataset's env_args (JSON string or dict). ``keys``: the obs
    keys in order (default :func:`obs_keys` of the task).
    """

    def __init__(self, env_args: Mapping[str, Any] | str, keys=None):
        import robosuite

        # robosuite logs each controller config it loads at INFO, twice per env; a level
        # the user set is kept.
        robosuite_logger = logging.getLogger("robosuite_logs")
        if robosuite_logger.level <= logging.INFO:
            robosuite_logger.setLevel(logging.WARNING)
        self.env_args = json.loads(env_args) if isinstance(env_args, str) else dict(env_args)
        self.task = task_of(self.env_args)
        self.keys = tuple(keys or obs_keys(self.task))
        with _global_numpy_seed(0):  # construction draws a layout too
            self.env = robosuite.make(self.env_args["env_name"], **robosuite_kwargs(self.env_args))
        try:
            with _global_numpy_seed(0):
                self.env.reset()  # robosuite.make leaves the observables' modalities unset
            if self.env.action_dim != ACTION_DIMS[self.task]:
                raise ValueError(f"{self.task}: the env takes {self.env.action_dim}-D actions, "
                                 f"the datasets {ACTION_DIMS[self.task]}-D")
            self.raw: dict[str, np.ndarray] = {}
            self._observe(passes=2)
        except BaseException:
            self.env.close()
            raise

    def _observe(self, passes: int = 1) -> None:
        # Relative sensors read the cache of the pass before (module docstring): after a
        # reset two passes, so they see this state; a step's substeps already filled it.
        for _ in range(passes):
            self.raw = self.env._get_observations(force_update=True)

    def obs_dict(self) -> dict[str, np.ndarray]:
        """The last observation by dataset key."""
        return {k: np.asarray(self.raw["object-state" if k == "object" else k], np.float64)
                for k in self.keys}

    def obs(self) -> np.ndarray:
        """The last observation, the keys concatenated in order."""
        return np.concatenate([v.reshape(-1) for v in self.obs_dict().values()])

    def reset_to_layout(self, split: str, seed: int, index: int) -> np.ndarray:
        with _global_numpy_seed(layout_seed(self.task, split, seed, index)):
            self.env.reset()
        self._observe(passes=2)
        return self.obs()

    def reset_to_state(self, state: np.ndarray) -> np.ndarray:
        """Put the simulator in a recorded flat state ([time, qpos, qvel]) and observe it."""
        state = np.asarray(state, np.float64)
        expected = self.state().shape
        if state.shape != expected:
            raise ValueError(f"a {self.task} state has shape {expected}, got {state.shape}")
        self.env.sim.set_state_from_flattened(state)
        self.env.sim.forward()
        self._observe(passes=2)
        return self.obs()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """(observation, reward, success) after one control step."""
        _, reward, _, _ = self.env.step(np.asarray(action, np.float64))
        self._observe()
        return self.obs(), float(reward), bool(self.env._check_success())

    def state(self) -> np.ndarray:
        return np.asarray(self.env.sim.get_state().flatten(), np.float64)

    def model_xml(self) -> str:
        return self.env.sim.model.get_xml()

    @property
    def model(self):
        """The MuJoCo MjModel (for rendering)."""
        return self.env.sim.model._model

    @property
    def data(self):
        """The MuJoCo MjData (for rendering)."""
        return self.env.sim.data._data

    def close(self) -> None:
        self.env.close()


def make_sim(env_args: str) -> RobomimicSim:
    """A picklable constructor (env_args as a JSON string) for worker processes."""
    return RobomimicSim(env_args)


__all__ = ["BUDGETS", "ENV_NAMES", "TASKS", "RobomimicSim", "default_env_args", "layout_seed",
           "make_sim", "robosuite_kwargs", "task_of"]
