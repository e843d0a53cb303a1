"""The one training step and the one scan body over it, data-parallel or member-parallel.

Everything here is a pure function of pytrees: state and data in, state and
metrics out.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.objectives import dsm
from energyflow_jax.training.state import TrainState, ema_decay_at

Batch = dict


def train_step(model: EnergyFlowModel, tx: optax.GradientTransformation,
               state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    rng, loss_rng = jax.random.split(state.rng)
    loss, grads = jax.value_and_grad(
        lambda p: dsm.dsm_loss(model, p, batch, loss_rng, state.hparams.schedule)
    )(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: state.hparams.learning_rate * u, updates)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, state.hparams.ema_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                              state.ema_params, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "skipped": opt_state.total_notfinite}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=opt_state, rng=rng)
    return new_state, metrics


def sample_batch(data: Batch, rng: jax.Array, batch_size: int) -> Batch:
    """Uniform minibatch drawn on device from arrays with a leading sample axis."""
    n = jax.tree.leaves(data)[0].shape[0]
    idx = jax.random.randint(rng, (batch_size,), 0, n)
    return jax.tree.map(lambda x: x[idx], data)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D 'data' mesh over the first num_devices devices (all by default)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"train.num_devices={num_devices} but only {len(devices)} "
                             f"devices are visible: {devices}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), ("data",))


def make_train_chunk(model: EnergyFlowModel, tx: optax.GradientTransformation,
                     batch_size: int, n_steps: int, mesh: Mesh) -> Callable:
    """jit((state, data) -> (state, metrics)) running n_steps updates in a scan.

    Batches are drawn on device inside the scan and split over the mesh's
    'data' axis; params are replicated. The global batch is the same for any
    number of devices, so sharded training matches single-device training.
    The state buffer is donated: the caller must use the returned state.
    """
    if batch_size % mesh.size:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the "
                         f"{mesh.size} devices of the mesh")
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def chunk(state: TrainState, data: Batch):
        def body(state, _):
            rng, batch_rng = jax.random.split(state.rng)
            batch = sample_batch(data, batch_rng, batch_size)
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            return train_step(model, tx, state.replace(rng=rng), batch)

        state, metrics = jax.lax.scan(body, state, None, length=n_steps)
        return state, jax.tree.map(jnp.mean, metrics) | {"skipped": metrics["skipped"][-1]}

    return jax.jit(chunk, in_shardings=(replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))

