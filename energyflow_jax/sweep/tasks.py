"""What a sweep trains on and how its members are scored, per task."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from energyflow_jax import training
from energyflow_jax.data import toy
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.objectives import dsm
from energyflow_jax.sweep.grid import Group


_toy_dataset = jax.jit(toy.make_dataset, static_argnums=1)  # one compile, not one per op


class ToyTask:
    """The toy task (energyflow_jax.data.toy): known energy, 2-D states and actions.

    A sweep task gives the model's shapes for a group's config, the group's
    training data and an evaluation context, and scores every member of a
    trained group at once.
    """

    @staticmethod
    def obs_shape(group_config) -> tuple:
        return (1, 2)

    @staticmethod
    def action_shape(group_config) -> tuple:
        return (1, 2)

    @staticmethod
    def data(config, group_config, workdir: str) -> tuple[dict, dict]:
        # Data from the sweep's base seed, so members differ only in what they
        # set and in their training seed; the training set's size is the
        # group's (a grid may set toy.n_samples), the held-out set is shared.
        make = _toy_dataset
        train = make(jax.random.PRNGKey(10_000 + config.seed), group_config.toy.n_samples)
        heldout = make(jax.random.PRNGKey(20_000 + config.seed), config.sweep.heldout_samples)
        return train, heldout

    @staticmethod
    def evaluate(config, workdir: str, group: Group, model: EnergyFlowModel,
                 state: training.TrainState, heldout: dict) -> list[dict]:
        return ToyTask.make_evaluate(model)(group, state, heldout)

    @staticmethod
    @functools.lru_cache(maxsize=16)  # per model: groups differing only in training share it
    def make_evaluate(model: EnergyFlowModel) -> Callable:
        """evaluate(group, state, heldout) -> per-member metrics: held-out DSM
        loss (each member's own noise schedule, 4 fixed noise draws) and, for
        energy models, the within-state Spearman of learned vs true energy
        (toy.ranking_report), all on EMA params. Jitted once per model."""
        keys = jax.random.split(jax.random.PRNGKey(31), 4)

        def heldout_loss(params, schedule, heldout):
            return jnp.mean(jax.vmap(
                lambda k: dsm.dsm_loss(model, params, heldout, k, schedule))(keys))

        losses_fn = jax.jit(jax.vmap(heldout_loss, in_axes=(0, 0, None)))
        energy = jax.jit(lambda p, a, s, t: model.energy(
            p, a, s, jnp.full((a.shape[0],), t, jnp.float32)))

        def evaluate(group: Group, state: training.TrainState, heldout: dict) -> list[dict]:
            losses = jax.device_get(losses_fn(state.ema_params, state.hparams.schedule, heldout))
            out = []
            for i, m in enumerate(group.members):
                metrics = {"heldout_loss": float(losses[i])}
                if model.kind == "conservative":
                    params = training.unstack(state.ema_params, i)
                    schedule = dsm.VESchedule.from_config(m.config.diffusion)
                    report = toy.ranking_report(
                        lambda a, s, t: energy(params, a, s, t), schedule,
                        jax.random.PRNGKey(123), (m.config.diffusion.gamma, 0.3, 0.6))
                    metrics["toy_spearman"] = report["spearman_mean"]
                    metrics["toy_ranking"] = report
                out.append(metrics)
            return out

        return evaluate


TASKS = {"toy": ToyTask}
