"""What a reward may look at: one batch of transitions."""
from __future__ import annotations

import jax
from flax import struct


class RewardInputs(struct.PyTreeNode):
    """What a reward may look at for a batch of transitions (s_t, a_t)."""

    obs: jax.Array  # (B, obs_horizon, obs_dim) raw observations, oldest first, s_t last
    action: jax.Array  # (B, act_dim) raw environment action a_t
    env_reward: jax.Array  # (B,) the environment's dense reward for (s_t, a_t)
    success: jax.Array  # (B,) 1.0 where the environment reports success, else 0.0
