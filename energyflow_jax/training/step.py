"""The one training step and the one scan body over it, data-parallel or member-parallel.

Everything here is a pure function of pytrees: state and data in, state and
metrics out.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.objectives import dsm
from energyflow_jax.training.state import TrainState, ema_decay_at, make_optimizer

Batch = dict


LossFn = Callable[..., jax.Array]  # (model, params, batch, rng, schedule) -> scalar


def train_step(model: EnergyFlowModel, tx: optax.GradientTransformation,
               state: TrainState, batch: Batch,
               loss_fn: LossFn = dsm.dsm_loss) -> tuple[TrainState, dict]:
    """One update of params, optimizer state and EMA under the objective's loss."""
    rng, loss_rng = jax.random.split(state.rng)
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, batch, loss_rng, state.hparams.schedule)
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


def make_run_steps(model: EnergyFlowModel, tx: optax.GradientTransformation, batch_size: int,
                   loss_fn: LossFn = dsm.dsm_loss, batch_sharding=None) -> Callable:
    """run_steps(state, data, n_steps) -> (state, chunk metrics): the one scan body.

    Each step draws its minibatch on device from `data` (arrays with a leading
    window axis) and applies `train_step`. Metrics are means over the chunk,
    except `skipped`, the running count of skipped non-finite updates.
    """
    def run_steps(state: TrainState, data: Batch, n_steps: int):
        def body(state, _):
            rng, batch_rng = jax.random.split(state.rng)
            batch = sample_batch(data, batch_rng, batch_size)
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            return train_step(model, tx, state.replace(rng=rng), batch, loss_fn)

        state, metrics = jax.lax.scan(body, state, None, length=n_steps)
        return state, jax.tree.map(jnp.mean, metrics) | {"skipped": metrics["skipped"][-1]}

    return run_steps


def make_train_chunk(model: EnergyFlowModel, tx: optax.GradientTransformation,
                     batch_size: int, n_steps: int, mesh: Mesh,
                     loss_fn: LossFn = dsm.dsm_loss) -> Callable:
    """jit((state, data) -> (state, metrics)) running n_steps updates of one run.

    Batches are split over the mesh's 'data' axis; params are replicated. The
    global batch is the same for any number of devices, so sharded training
    matches single-device training. The state is donated: use the returned one.
    """
    if batch_size % mesh.size:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the "
                         f"{mesh.size} devices of the mesh")
    replicated = NamedSharding(mesh, P())
    run_steps = make_run_steps(model, tx, batch_size, loss_fn, NamedSharding(mesh, P("data")))
    return jax.jit(functools.partial(run_steps, n_steps=n_steps),
                   in_shardings=(replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def member_mesh(n_members: int, requested: int = 0) -> Mesh:
    """A 1-D 'member' mesh over min(requested (0 = all local devices), n_members)
    devices. The member axis is padded to a multiple of its size (pad_members)."""
    devices = jax.local_devices()
    k = max(1, min(requested or len(devices), len(devices), n_members))
    return Mesh(np.asarray(devices[:k]), ("member",))


def pad_members(tree, mesh: Mesh):
    """Stacked members padded, with copies of the last one, to a multiple of the
    member mesh's size, so every device holds as many members as the others
    (the copies are dropped with tree[:n] afterwards)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    extra = -n % mesh.devices.size
    if not extra:
        return tree
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)]), tree)


def make_member_chunk(model: EnergyFlowModel, tx: optax.GradientTransformation,
                      batch_size: int, n_steps: int, mesh: Mesh,
                      loss_fn: LossFn = dsm.dsm_loss) -> Callable:
    """jit(vmap(run_steps)): (stacked state, data) -> (stacked state, metrics (members,)).

    Members (seeds, learning rates, noise levels in `TrainState.hparams`) train
    together in one program; the member axis is split over the 'member' mesh and
    the data is replicated. The state is donated.
    """
    by_member = NamedSharding(mesh, P("member"))
    replicated = NamedSharding(mesh, P())
    run_steps = make_run_steps(model, tx, batch_size, loss_fn)
    fn = jax.vmap(functools.partial(run_steps, n_steps=n_steps), in_axes=(0, None))
    return jax.jit(fn, in_shardings=(by_member, replicated), out_shardings=by_member,
                   donate_argnums=0)


def make_train(config, model: EnergyFlowModel, data: Batch,
               loss_fn: LossFn = dsm.dsm_loss) -> Callable:
    """train(rng, hparams) -> (final TrainState, per-chunk metrics), pure.

    All of config.optim.total_steps as a lax.scan over chunks of
    train.steps_per_chunk steps, with the data closed over, so
    `jax.jit(jax.vmap(train))(rngs, stacked_hparams)` trains many members in
    one program. It runs the same steps as `fit`, without checkpoints between.
    """
    tx = make_optimizer(config.optim)
    run_steps = make_run_steps(model, tx, config.train.batch_size, loss_fn)
    per_chunk = config.train.steps_per_chunk
    n_full, rest = divmod(config.optim.total_steps, per_chunk)

    def train(rng, hparams):
        state = TrainState.create(model, tx, hparams, rng)
        state, metrics = jax.lax.scan(lambda s, _: run_steps(s, data, per_chunk),
                                      state, None, length=n_full)
        if rest:  # a shorter last chunk, as in fit
            state, last = run_steps(state, data, rest)
            metrics = jax.tree.map(lambda m, x: jnp.concatenate([m, x[None]]), metrics, last)
        return state, metrics

    return train


def stack(trees: list):
    """Stack pytrees of equal structure along a new leading (member) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))

