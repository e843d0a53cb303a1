"""Train state, optimizer and the jitted, data-parallel DSM update.

Everything here is a pure function of pytrees. Hyperparameters that a sweep
may vary within one compiled program (learning rate, EMA decay, noise levels)
live in `TrainState.hparams` as arrays, so `jax.vmap` over a stacked state
trains several settings at once; everything that changes shapes or control
flow stays static in the config.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from energyflow_jax import diffusion
from energyflow_jax.models import EnergyFlowModel

Batch = dict


@flax.struct.dataclass
class HParams:
    learning_rate: jax.Array
    ema_decay: jax.Array
    schedule: diffusion.VESchedule

    @classmethod
    def from_config(cls, config) -> "HParams":
        return cls(
            learning_rate=jnp.asarray(config.optim.learning_rate, jnp.float32),
            ema_decay=jnp.asarray(config.optim.ema_decay, jnp.float32),
            schedule=diffusion.VESchedule.from_config(config.diffusion),
        )


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    hparams: HParams

    @classmethod
    def create(cls, model: EnergyFlowModel, tx: optax.GradientTransformation,
               hparams: HParams, rng: jax.Array) -> "TrainState":
        init_rng, rng = jax.random.split(rng)
        params = model.init(init_rng)
        # A copy, not an alias: the train step donates the state's buffers.
        ema_params = jax.tree.map(jnp.copy, params)
        return cls(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                   opt_state=tx.init(params), rng=rng, hparams=hparams)

    @property
    def n_skipped(self) -> jax.Array:
        """Updates skipped so far because the gradient was not finite."""
        return self.opt_state.total_notfinite


def make_optimizer(optim_config) -> optax.GradientTransformation:
    """Clip -> Adam -> decoupled weight decay -> warmup+cosine shape.

    The peak learning rate is not baked in: `train_step` multiplies by
    `hparams.learning_rate`, so it can differ across vmapped sweep members.
    Non-finite gradients skip the whole update (counted in `total_notfinite`).
    """
    warmup = min(optim_config.warmup_steps, max(optim_config.total_steps - 1, 0))
    shape = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=1.0, warmup_steps=warmup,
        decay_steps=max(optim_config.total_steps, warmup + 1), end_value=0.0)
    inner = optax.chain(
        optax.clip_by_global_norm(optim_config.grad_clip),
        optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=1e-8),
        optax.add_decayed_weights(optim_config.weight_decay),
        optax.scale_by_schedule(lambda count: -shape(count)),
    )
    # A large cap: never fall back to applying non-finite updates.
    return optax.apply_if_finite(inner, max_consecutive_errors=2**30)


def ema_decay_at(step: jax.Array, decay: jax.Array) -> jax.Array:
    """Warm the EMA up so short runs are not dominated by the initial weights."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(model: EnergyFlowModel, tx: optax.GradientTransformation,
               state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    rng, loss_rng = jax.random.split(state.rng)
    loss, grads = jax.value_and_grad(
        lambda p: diffusion.dsm_loss(model, p, batch, loss_rng, state.hparams.schedule)
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

