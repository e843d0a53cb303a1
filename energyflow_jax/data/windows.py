"""Windowed imitation datasets on device, for any task with (obs, action) episodes.

An episode is a mapping with ``obs`` (T, obs_dim) and ``actions`` (T, act_dim),
where obs[t] is the observation on which actions[t] was taken.

Windows follow the diffusion-policy convention: one window per timestep t of
every episode; the observation window is obs[t - obs_horizon + 1 .. t] (the
newest observation last), the action window is actions[t .. t + pred_horizon - 1]
(the chunk starts at the current step, so a policy executes chunk[0:exec_horizon]
directly). Indices before the episode start repeat the first observation;
indices past the end repeat the last action (the expert "holds" its final
action, which keeps chunk shapes fixed without inventing motion).

Observations and actions are standardized with a :class:`Normalizer` fitted on
the training steps (not on the windows, whose padding repeats boundary steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from energyflow_jax import training
from energyflow_jax.normalizer import DEFAULT_MIN_STD, Normalizer  # noqa: F401 (re-export)

Array = jax.Array


@struct.dataclass
class Dataset:
    """Normalized training windows on device plus the normalizers that made them.

    obs: (N, obs_horizon, obs_dim) float32, actions: (N, pred_horizon, act_dim)
    float32, both standardized. A pytree: pass it into jitted / scanned steps.
    """

    obs: Array
    actions: Array
    obs_normalizer: Normalizer
    action_normalizer: Normalizer

    @property
    def num_windows(self) -> int:
        return self.obs.shape[0]

    @property
    def obs_horizon(self) -> int:
        return self.obs.shape[1]

    @property
    def pred_horizon(self) -> int:
        return self.actions.shape[1]

    def arrays(self) -> dict[str, Array]:
        """The windows alone, as ``{"obs", "actions"}`` (the trainer's data layout)."""
        return {"obs": self.obs, "actions": self.actions}


def _describe(episode: Mapping[str, Any], index: int) -> str:
    if "config_index" in episode:
        return f"episode {index} (config_index {int(episode['config_index'])})"
    return f"episode {index}"


def validate_episodes(episodes: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """Check shapes and finiteness; return (obs_dim, act_dim). Raises ValueError naming the episode."""
    if len(episodes) == 0:
        raise ValueError("no episodes given")
    obs_dim = act_dim = None
    for i, episode in enumerate(episodes):
        name = _describe(episode, i)
        for key in ("obs", "actions"):
            if key not in episode:
                raise ValueError(f"{name} has no {key!r} array")
        obs = np.asarray(episode["obs"])
        actions = np.asarray(episode["actions"])
        if obs.ndim != 2 or actions.ndim != 2:
            raise ValueError(
                f"{name}: obs and actions must be 2-D (T, dim), got shapes {obs.shape} and {actions.shape}"
            )
        if len(obs) != len(actions):
            raise ValueError(f"{name}: {len(obs)} observations but {len(actions)} actions")
        if len(obs) == 0:
            raise ValueError(f"{name} is empty")
        if obs_dim is None:
            obs_dim, act_dim = obs.shape[1], actions.shape[1]
        elif (obs.shape[1], actions.shape[1]) != (obs_dim, act_dim):
            raise ValueError(
                f"{name} has obs_dim {obs.shape[1]} and act_dim {actions.shape[1]}, but episode 0 "
                f"has obs_dim {obs_dim} and act_dim {act_dim}; all episodes must match"
            )
        for key, values in (("obs", obs), ("actions", actions)):
            bad = ~np.isfinite(values)
            if bad.any():
                step, dim = np.argwhere(bad)[0]
                raise ValueError(
                    f"{name}: {key} has {int(bad.sum())} non-finite value(s) (NaN/inf), "
                    f"first at step {step}, dim {dim}: {values[step, dim]}"
                )
    return int(obs_dim), int(act_dim)


def window_indices(lengths, obs_horizon: int, pred_horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the concatenated steps for every window.

    lengths: (E,) episode lengths. Returns obs_idx (N, obs_horizon) and
    act_idx (N, pred_horizon), N = sum(lengths), clamped to each window's own
    episode so that padding repeats its first obs / last action.

    Integer bookkeeping done once per dataset on the host (NumPy): its shapes
    depend on the data, so as JAX ops it would only add a compile per shape.
    The gathers themselves run on device.
    """
    lengths = np.asarray(lengths, np.int64)
    starts = np.cumsum(lengths) - lengths
    episode_of_step = np.repeat(np.arange(len(lengths)), lengths)
    start = starts[episode_of_step][:, None]
    last = (lengths[episode_of_step] - 1)[:, None]
    t = np.arange(int(lengths.sum()))[:, None] - start
    obs_idx = start + np.clip(t + np.arange(-(obs_horizon - 1), 1)[None, :], 0, last)
    act_idx = start + np.clip(t + np.arange(pred_horizon)[None, :], 0, last)
    return obs_idx.astype(np.int32), act_idx.astype(np.int32)


def _concatenate(episodes: Sequence[Mapping[str, Any]]) -> tuple[Array, Array, np.ndarray]:
    obs = jnp.asarray(np.concatenate([np.asarray(ep["obs"], np.float32) for ep in episodes]))
    actions = jnp.asarray(np.concatenate([np.asarray(ep["actions"], np.float32) for ep in episodes]))
    lengths = np.array([len(ep["actions"]) for ep in episodes])
    return obs, actions, lengths


def make_windows(
    episodes: Sequence[Mapping[str, Any]], obs_horizon: int, pred_horizon: int
) -> tuple[Array, Array]:
    """Raw (unnormalized) windows: obs (N, obs_horizon, obs_dim), actions (N, pred_horizon, act_dim).

    One window per timestep of every episode, N = total steps; see the module
    docstring for alignment and padding.
    """
    if obs_horizon < 1 or pred_horizon < 1:
        raise ValueError(f"horizons must be >= 1, got obs_horizon={obs_horizon}, pred_horizon={pred_horizon}")
    validate_episodes(episodes)
    obs, actions, lengths = _concatenate(episodes)
    obs_idx, act_idx = window_indices(lengths, obs_horizon, pred_horizon)
    return jnp.take(obs, obs_idx, axis=0), jnp.take(actions, act_idx, axis=0)


def make_dataset(
    episodes: Sequence[Mapping[str, Any]],
    obs_horizon: int,
    pred_horizon: int,
    min_std: float = DEFAULT_MIN_STD,
    obs_normalizer: Normalizer | None = None,
    action_normalizer: Normalizer | None = None,
) -> Dataset:
    """Windows of ``episodes``, standardized, on device.

    Normalizers are fitted on the episodes' steps unless given (e.g. to reuse a
    training set's statistics for a held-out set).
    """
    obs_windows, action_windows = make_windows(episodes, obs_horizon, pred_horizon)
    steps_obs, steps_actions, _ = _concatenate(episodes)
    obs_normalizer = obs_normalizer or Normalizer.fit(steps_obs, min_std)
    action_normalizer = action_normalizer or Normalizer.fit(steps_actions, min_std)
    return Dataset(
        obs=obs_normalizer.normalize(obs_windows).astype(jnp.float32),
        actions=action_normalizer.normalize(action_windows).astype(jnp.float32),
        obs_normalizer=obs_normalizer,
        action_normalizer=action_normalizer,
    )


def sample_batch(dataset: Dataset, rng: Array, batch_size: int) -> dict[str, Array]:
    """A uniform minibatch (with replacement) of normalized windows, drawn on device.

    Jit-able with ``batch_size`` static, e.g. inside a scanned train step.
    """
    return training.sample_batch(dataset.arrays(), rng, batch_size)
