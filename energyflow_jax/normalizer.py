"""Per-feature standardization of observations and actions, fitted on training data."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
DEFAULT_MIN_STD = 1e-2


@struct.dataclass
class Normalizer:
    """Per-feature standardization ``(x - mean) / std`` over the last axis.

    ``std`` is floored when fitted: features that are (nearly) constant in the
    training data, such as zero-padded observation slots or an unused gripper
    action, would otherwise be divided by ~0.
    """

    mean: Array
    std: Array

    @classmethod
    def fit(cls, x: Array, min_std: float = DEFAULT_MIN_STD) -> "Normalizer":
        """Fit on ``x`` (..., dim): statistics over all leading axes."""
        x = jnp.asarray(x, jnp.float32)
        flat = x.reshape(-1, x.shape[-1])
        return cls(mean=flat.mean(axis=0), std=jnp.maximum(flat.std(axis=0), min_std))

    @classmethod
    def identity(cls, dim: int) -> "Normalizer":
        return cls(mean=jnp.zeros((dim,), jnp.float32), std=jnp.ones((dim,), jnp.float32))

    def normalize(self, x: Array) -> Array:
        return (x - self.mean) / self.std

    def unnormalize(self, z: Array) -> Array:
        return z * self.std + self.mean
