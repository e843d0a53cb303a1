"""A replay buffer that lives in device memory as a pytree.

The buffer is a `flax.struct.PyTreeNode`, so it can be passed through `jax.jit`,
`lax.scan` and orbax checkpoints like any other state. Every leaf of `data` has
a leading `capacity` axis; `insert` writes a batch of transitions at the ring
position (wrapping around), `sample` draws uniformly from the filled part.

Jit `insert` with `donate_argnums=0` so XLA updates the storage in place instead
of copying the whole buffer on every environment step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


class ReplayBuffer(struct.PyTreeNode):
    data: PyTree  # leaves shaped (capacity, *transition_leaf_shape)
    insert_index: jax.Array  # int32 scalar: where the next transition goes
    size: jax.Array  # int32 scalar: number of valid transitions (<= capacity)
    capacity: int = struct.field(pytree_node=False)

    @classmethod
    def create(cls, example_transition: PyTree, capacity: int) -> "ReplayBuffer":
        """Empty buffer whose leaves match one (unbatched) example transition."""
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        data = jax.tree.map(
            lambda x: jnp.zeros((capacity, *jnp.shape(x)), jnp.asarray(x).dtype),
            example_transition,
        )
        return cls(
            data=data,
            insert_index=jnp.zeros((), jnp.int32),
            size=jnp.zeros((), jnp.int32),
            capacity=capacity,
        )


def insert(buffer: ReplayBuffer, transitions: PyTree) -> ReplayBuffer:
    """Writes a batch of transitions (leading axis n <= capacity) circularly."""
    n = jax.tree.leaves(transitions)[0].shape[0]
    if n > buffer.capacity:
        raise ValueError(f"cannot insert {n} transitions into capacity {buffer.capacity}")
    slots = (buffer.insert_index + jnp.arange(n, dtype=jnp.int32)) % buffer.capacity
    data = jax.tree.map(
        lambda store, x: store.at[slots].set(x.astype(store.dtype)), buffer.data, transitions
    )
    return buffer.replace(
        data=data,
        insert_index=(buffer.insert_index + n) % buffer.capacity,
        size=jnp.minimum(buffer.size + n, buffer.capacity),
    )


def sample(buffer: ReplayBuffer, rng: jax.Array, batch_shape: int | tuple[int, ...]) -> PyTree:
    """Uniform sample (with replacement) of the filled slots.

    `batch_shape` may be a tuple, e.g. (utd, batch) to draw the batches of several
    gradient steps at once and scan over the leading axis. Sampling an empty
    buffer returns slot 0 (zeros); callers start updating only after a warm-up.
    """
    shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    idx = jax.random.randint(rng, shape, 0, jnp.maximum(buffer.size, 1))
    return jax.tree.map(lambda store: store[idx], buffer.data)
