"""RoboMimic tasks (robosuite) as a :class:`~energyflow_jax.envs.base.BatchedEnv`.

How a task's env is built and observed lives with the dataset code
(``energyflow_jax.data.robomimic_sim``: ``data`` and ``envs`` are sibling layers
that may not import each other), so a :class:`RobomimicSpec` is *given* a
picklable ``make_sim`` (``functools.partial(robomimic_sim.make_sim, env_args_json)``);
the evaluation layer assembles it. Being picklable, a spec builds the same envs
in worker processes (``energyflow_jax.envs.workers``).

Layout id ``i`` is layout ``i`` of (``split``, ``seed``): the same first
observation in any slot or process. Success is the env's own success check;
episodes never end by themselves (``ignore_done``), the rollout owns the budget.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from energyflow_jax.envs.base import StepResult
from energyflow_jax.envs.rendering import FreeCameraRenderer

# The rollout videos' view (energyflow_jax.envs.rendering): in front of the table.
VIDEO_CAMERA = {"lookat": (0.0, 0.0, 0.9), "distance": 1.2, "azimuth": 180.0, "elevation": -25.0}


@dataclass(frozen=True)
class RobomimicSpec:
    """A picklable recipe for RoboMimic batched envs; ``spec(num_envs)`` builds one.

    make_sim: zero-argument callable returning a ``robomimic_sim.RobomimicSim``.
    split, seed: the layout stream ("eval" for evaluations, disjoint from "demo").
    """

    task: str
    make_sim: Callable[[], Any]
    n_layouts: int
    max_steps: int
    split: str = "eval"
    seed: int = 0

    def __call__(self, num_envs: int) -> RobomimicBatchedEnv:
        return RobomimicBatchedEnv(self, num_envs)


class RobomimicBatchedEnv:
    """``num_envs`` robosuite envs stepped in a loop on the host.

    Reset infos: ``layout`` (the layout id). Inactive slots' rows are zeros.
    ``reset_to(slot, state)`` puts a slot in a recorded dataset state.
    """

    def __init__(self, spec: RobomimicSpec, num_envs: int):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.spec = spec
        self._sims = []
        self._renderer = FreeCameraRenderer(VIDEO_CAMERA)
        try:
            for _ in range(num_envs):
                self._sims.append(spec.make_sim())
        except BaseException:
            self.close()
            raise
        self._obs_dim = int(self._sims[0].obs().shape[0])
        self._action_dim = int(self._sims[0].env.action_dim)

    @property
    def num_envs(self) -> int:
        return len(self._sims)

    @property
    def obs_dim(self) -> int:
        return self._obs_dim

    @property
    def action_dim(self) -> int:
        return self._action_dim

    @property
    def max_steps(self) -> int:
        return self.spec.max_steps

    def reset(self, layout_ids: Sequence[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        if len(layout_ids) > self.num_envs:
            raise ValueError(f"{len(layout_ids)} layout ids for {self.num_envs} envs")
        observations, infos = [], []
        for slot, layout in enumerate(layout_ids):
            layout = int(layout)
            if not 0 <= layout < self.spec.n_layouts:
                raise ValueError(f"layout id {layout} outside [0, {self.spec.n_layouts})")
            obs = self._sims[slot].reset_to_layout(self.spec.split, self.spec.seed, layout)
            observations.append(obs)
            infos.append({"layout": layout})
        return np.stack(observations).reshape(len(layout_ids), self.obs_dim), infos

    def reset_to(self, slot: int, state: np.ndarray) -> np.ndarray:
        """Put slot's simulator in a recorded dataset state; its observation."""
        return self._sims[slot].reset_to_state(state)

    def step(self, actions: np.ndarray, active: np.ndarray) -> StepResult:
        n = self.num_envs
        obs = np.zeros((n, self.obs_dim), np.float64)
        reward = np.zeros(n, np.float64)
        success = np.zeros(n, bool)
        for slot in np.flatnonzero(active):
            obs[slot], reward[slot], success[slot] = self._sims[slot].step(actions[slot])
        return StepResult(obs, reward, success)

    def render(self, slot: int) -> np.ndarray:
        """Slot's current frame, (height, width, 3) uint8, from VIDEO_CAMERA (needs MuJoCo GL)."""
        return self._renderer.frame(self._sims[slot].model, self._sims[slot].data)

    def close(self) -> None:
        self._renderer.close()
        for sim in self._sims:
            sim.close()
        self._sims = []
