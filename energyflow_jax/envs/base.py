"""The interface evaluation steps: a fixed-size batch of environments.

A :class:`BatchedEnv` holds ``num_envs`` environments ("slots") that are reset
and stepped together, so one policy call can serve all of them. It knows
nothing about policies, episode budgets or success bookkeeping; that is
:func:`energyflow_jax.evaluation.rollout.rollout`'s business.

Layouts
    An episode starts from a *layout id*, a non-negative integer that names
    an initial state (for Meta-World: eval config ``i`` of a seeded stream, plus
    its perturbation). Resetting a slot to the same layout id gives the same
    first observation every time, whichever slot, process or wave does it.

Partial batches
    ``reset(layout_ids)`` may name fewer ids than ``num_envs``: slots
    ``0 .. len(layout_ids) - 1`` are reset, the others keep their state.
    ``step(actions, active)`` steps only the slots where ``active`` is True
    (a finished episode is never stepped again); the returned rows of inactive
    slots are unspecified and must be ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np


class StepResult(NamedTuple):
    """What one batched step returns; rows of inactive slots are unspecified."""

    obs: np.ndarray  # (num_envs, obs_dim), the observation after the step
    reward: np.ndarray  # (num_envs,) float64
    success: np.ndarray  # (num_envs,) bool: the task counts as solved at this step


@runtime_checkable
class BatchedEnv(Protocol):
    """``num_envs`` environments reset to given layouts and stepped together."""

    @property
    def num_envs(self) -> int: ...

    @property
    def obs_dim(self) -> int: ...

    @property
    def action_dim(self) -> int: ...

    @property
    def max_steps(self) -> int:
        """Most steps an episode may take (an env may refuse to step further)."""
        ...

    def reset(self, layout_ids: Sequence[int]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Reset slot i to layout ``layout_ids[i]`` (len(layout_ids) <= num_envs).

        Returns the first observations (len(layout_ids), obs_dim) and one info
        dict per reset slot (environment-specific facts about the start state,
        JSON-serialisable; may be empty).
        """
        ...

    def step(self, actions: np.ndarray, active: np.ndarray) -> StepResult:
        """Apply ``actions[i]`` (num_envs, action_dim) to every slot i with ``active[i]``."""
        ...

    def close(self) -> None: ...
