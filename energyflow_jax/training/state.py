"""The train state and its optimizer: params, EMA params, optimizer state, RNG and
the hyperparameters a sweep may vary within one compiled program.

Hyperparameters that differ between vmapped members (learning rate, EMA decay,
noise levels) live in `TrainState.hparams` as arrays; everything that changes
shapes or control flow stays static in the config.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.objectives import dsm


@flax.struct.dataclass
class HParams:
    learning_rate: jax.Array
    ema_decay: jax.Array
    schedule: dsm.VESchedule

    @classmethod
    def from_config(cls, config) -> "HParams":
        return cls(
            learning_rate=jnp.asarray(config.optim.learning_rate, jnp.float32),
            ema_decay=jnp.asarray(config.optim.ema_decay, jnp.float32),
            schedule=dsm.VESchedule.from_config(config.diffusion),
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




def strong_types(tree: Any) -> Any:
    """Every leaf as a non-weakly-typed array (Python ints/floats become int32/float32).

    A fresh pytree holds weak types (TrainState.step = 0, scalar params); after one update,
    or after an orbax restore, they are strong, and jit would compile every step twice.
    """
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.asarray(x).dtype), tree)
