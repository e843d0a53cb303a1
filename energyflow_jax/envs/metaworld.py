"""Meta-World v3 as a :class:`~energyflow_jax.envs.base.BatchedEnv`, with OOD start perturbations.

What this module does not know
------------------------------
How to build a Meta-World env and how evaluation layouts are drawn live with
the demo collection in ``energyflow_jax.data.metaworld`` (``make_env``,
``sample_config``; demos and evaluation share them, and ``data`` and ``envs`` are
sibling layers that may not import each other). A :class:`MetaWorldSpec` is
therefore *given* a picklable env constructor and the layouts (metaworld
``Task`` configs, one per layout id); the evaluation layer, which sees both
siblings, assembles it (``energyflow_jax.evaluation.metaworld_eval``). Being
picklable, a spec can build the same envs in a worker process
(``energyflow_jax.envs.workers``).

Layout id ``i`` is config ``spec.configs[i]`` with the perturbation drawn from
generator (task, seed, i): resetting to it is deterministic in any slot.

Out-of-distribution perturbations
---------------------------------
Applied at reset, on top of the layout's config:

==========  =======================  =====================
level       object shift (x-y plane)  hand start shift (3-D)
==========  =======================  =====================
"0"         0                         0
"S"         2 cm                      2 cm
"M"         5 cm                      5 cm
"L"         10 cm                     10 cm
==========  =======================  =====================

A float ``p`` means both shifts equal ``p`` metres. Directions are random per
episode (seeded by (task, seed, layout id)): uniform on the circle for the
object, uniform on the sphere for the hand.

* Hand: ``env.hand_init_pos`` (read only by ``_reset_hand``, which drives the
  mocap there for 50 sim steps at every reset) is set to the env's default plus
  the offset, clipped to the env's hand/mocap bounds.
* Object: the first two components of the frozen rand vec are shifted. By
  Meta-World convention they are the main object's initial x-y; checked
  empirically for 45 of the 50 v3 tasks, including button-press, drawer-open,
  assembly, bin-picking and hammer. For plate-slide* the puck does not follow its
  rand vec, so the object shift has no effect there (disassemble moves 1.7 cm in
  y for a 2 cm request). The realized shifts are measured from the observations
  and reported per episode (the reset infos), and the evaluation logs a warning
  when the object did not move.
  Shifts can meet scene geometry: drawer-open's layout fixes the drawer at
  y = 0.9, and a shift away from the robot pushes the case against the scene, so
  the drawer starts partly open (its handle, which is what obs[4:7] reports, moves
  toward the robot). That is part of what such a perturbation does to the task;
  the realized offsets in the results show it. The goal is not shifted. If a
  shifted layout breaks one of the env's own constraints (e.g. object within
  15 cm of the goal, which would make its ``reset_model`` loop forever on a
  frozen rand vec) another direction is drawn. So is a start from which the env's
  reward is undefined (hammer raises "margin must be non-negative" when the hand
  starts too close to the object), which would otherwise fail the first step.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from energyflow_jax.envs.base import StepResult
from energyflow_jax.envs.rendering import FreeCameraRenderer

# The rollout videos' view (energyflow_jax.envs.rendering): over the table; the
# xml's fixed cameras render rotated or upside down.
VIDEO_CAMERA = {"lookat": (0.0, 0.65, 0.15), "distance": 1.5, "azimuth": 135.0, "elevation": -25.0}

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


def resolve_perturbation(perturbation: str | float | Perturbation) -> Perturbation:
    """A level name ("0", "S", "M", "L"), a shift in metres or a Perturbation -> Perturbation."""
    if isinstance(perturbation, Perturbation):
        return perturbation
    if isinstance(perturbation, str):
        key = perturbation.strip().upper()
        if key.endswith("M") and _is_float(key[:-1]):  # a shift's own name, e.g. "0.15m"
            return resolve_perturbation(float(key[:-1]))
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


def evaluation_levels(ood_levels: Sequence[str | float]) -> dict[str, Perturbation]:
    """{name: Perturbation} in evaluation order: level "0" first, then `ood_levels`
    (names or metres) without repeats. Raises on an unknown level."""
    resolved = [resolve_perturbation(lv) for lv in ood_levels]
    return {"0": resolve_perturbation("0"), **{p.level: p for p in resolved if p.level != "0"}}


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def perturbation_rng(task: str, seed: int, layout_id: int) -> np.random.Generator:
    """The generator of the perturbation directions of one layout."""
    return np.random.default_rng([_PERTURB_SALT, zlib.crc32(task.encode()), int(seed), int(layout_id)])


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


def _reset_shifted(env, base: np.ndarray, object_shift: float, rng: np.random.Generator) -> np.ndarray:
    """Reset with the object moved object_shift metres from layout ``base`` (a feasible
    direction drawn from ``rng``); a plain reset when object_shift is 0."""
    if object_shift <= 0:
        return env.reset()[0]
    for _ in range(_MAX_DIRECTION_TRIES):
        rand_vec = base.copy()
        rand_vec[:2] += object_shift * _random_unit(rng, 2)
        try:
            return _reset_with_rand_vec(env, rand_vec)
        except _InfeasibleLayout:
            continue
    raise RuntimeError(
        f"No feasible {object_shift} m object shift found for {env.task_name} "
        f"in {_MAX_DIRECTION_TRIES} directions (env layout constraints reject them all)"
    )


def _reward_defined(env, obs: np.ndarray) -> bool:
    # Some v3 rewards take margins from the start positions and raise when a perturbed
    # hand starts too close to the object (hammer: "margin must be non-negative"), which
    # would fail the episode's first step.
    try:
        env.evaluate_state(obs, np.zeros(env.action_space.shape, np.float64))
    except ValueError:
        return False
    return True


def reset_episode(env, config, default_hand_pos: np.ndarray, perturbation: Perturbation,
                  rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Reset ``env`` to ``config`` with ``perturbation`` applied; (first obs, offsets info)."""
    env.set_task(config)
    base = np.array(env._last_rand_vec, dtype=np.float64)  # the config's frozen layout
    low = np.maximum(env.hand_low, env.mocap_low)
    high = np.minimum(env.hand_high, env.mocap_high)
    info: dict[str, Any] = {"hand_offset": [0.0, 0.0, 0.0], "object_offset": [0.0, 0.0]}
    if not perturbation.active:
        env.hand_init_pos = default_hand_pos.copy()
        obs, _ = env.reset()
        return obs, info

    # Reference reset without perturbation: the realized shifts are measured against it.
    env.hand_init_pos = default_hand_pos.copy()
    reference, _ = env.reset()
    # Another hand direction while a start leaves the env's reward undefined.
    for _ in range(_MAX_DIRECTION_TRIES):
        env.hand_init_pos = np.clip(
            default_hand_pos + perturbation.hand_shift * _random_unit(rng, 3), low, high)
        obs = _reset_shifted(env, base, perturbation.object_shift, rng)
        if _reward_defined(env, obs):
            break
    else:
        raise RuntimeError(f"No {perturbation.level} start of {env.task_name} in "
                           f"{_MAX_DIRECTION_TRIES} directions has a defined reward")
    info["hand_offset"] = (obs[0:3] - reference[0:3]).tolist()
    info["object_offset"] = (obs[4:6] - reference[4:6]).tolist()
    return obs, info


# --------------------------------------------------------------------------- batched env


@dataclass(frozen=True)
class MetaWorldSpec:
    """A picklable recipe for Meta-World batched envs; ``spec(num_envs)`` builds one.

    make_env: picklable zero-argument callable returning a bare v3 env of
        ``task`` whose own step budget (``max_path_length``) is at least
        ``max_steps`` (e.g. ``functools.partial(data.metaworld.make_env, task, max_steps)``).
    configs: the metaworld ``Task`` of each layout id.
    seed: enters the perturbation generators (with the task and the layout id).
    """

    task: str
    make_env: Callable[[], Any]
    configs: tuple
    max_steps: int
    seed: int = 0
    perturbation: Perturbation = Perturbation("0", 0.0, 0.0)

    def __call__(self, num_envs: int) -> MetaWorldBatchedEnv:
        return MetaWorldBatchedEnv(self, num_envs)


class MetaWorldBatchedEnv:
    """``num_envs`` bare Meta-World v3 envs stepped in a loop on the host.

    ``step`` counts success as ``info["success"] >= 1``; the obs rows of inactive
    slots are zeros. Reset infos: ``hand_offset`` (3,) and ``object_offset`` (2,),
    the realized perturbation in metres.
    """

    def __init__(self, spec: MetaWorldSpec, num_envs: int):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.spec = spec
        self._envs = [spec.make_env() for _ in range(num_envs)]
        for env in self._envs:
            if env.max_path_length < spec.max_steps:
                raise ValueError(f"env step budget {env.max_path_length} < max_steps {spec.max_steps}")
        # The env's own start position, before any perturbation touches it.
        self._default_hand = [np.array(env.hand_init_pos, dtype=np.float64) for env in self._envs]
        self._obs_dim = int(self._envs[0].observation_space.shape[0])
        self._action_dim = int(self._envs[0].action_space.shape[0])
        self._renderer = FreeCameraRenderer(VIDEO_CAMERA)

    @property
    def num_envs(self) -> int:
        return len(self._envs)

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
        spec = self.spec
        observations, infos = [], []
        for slot, layout in enumerate(layout_ids):
            layout = int(layout)
            if not 0 <= layout < len(spec.configs):
                raise ValueError(f"layout id {layout} outside [0, {len(spec.configs)})")
            obs, info = reset_episode(self._envs[slot], spec.configs[layout], self._default_hand[slot],
                                      spec.perturbation, perturbation_rng(spec.task, spec.seed, layout))
            observations.append(obs)
            infos.append(info)
        return np.stack(observations).reshape(len(layout_ids), self.obs_dim), infos

    def step(self, actions: np.ndarray, active: np.ndarray) -> StepResult:
        n = self.num_envs
        obs = np.zeros((n, self.obs_dim), np.float64)
        reward = np.zeros(n, np.float64)
        success = np.zeros(n, bool)
        for slot in np.flatnonzero(active):
            o, r, _, _, info = self._envs[slot].step(actions[slot])
            obs[slot] = o
            reward[slot] = float(r)
            success[slot] = info["success"] >= 1.0
        return StepResult(obs, reward, success)

    def render(self, slot: int) -> np.ndarray:
        """Slot's current frame, (height, width, 3) uint8, from the VIDEO_CAMERA view
        (needs MuJoCo GL: MUJOCO_GL=egl or osmesa when headless)."""
        return self._renderer.frame(self._envs[slot].model, self._envs[slot].data)

    def close(self) -> None:
        self._renderer.close()
        for env in self._envs:
            env.close()
        self._envs = []
