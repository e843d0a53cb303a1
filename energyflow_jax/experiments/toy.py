"""The toy task: a 2-D multimodal imitation problem with a closed-form energy.

Train, then compare the learned energy with the true one within each state.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from energyflow_jax import config as config_lib
from energyflow_jax.data import toy
from energyflow_jax.io import run_dir
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.normalizer import Normalizer
from energyflow_jax.objectives import dsm
from energyflow_jax.policy import Policy
from energyflow_jax.training.loop import fit, write_report


def make_energy_fn(model: EnergyFlowModel, params):
    """(a, s, t) -> E(a, s, t) with a scalar t, jitted, for evaluation and plots."""
    @jax.jit
    def energy(a, s, t):
        return model.energy(params, a, s, jnp.full((a.shape[0],), t, jnp.float32))
    return energy


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The toy task: train, then check the learned energy against the true one."""
    config_lib.validate(config)
    run_dir.check_workdir_settings(workdir, config.to_dict())  # another run's workdir: refused
    t0 = time.perf_counter()
    data = toy.make_dataset(jax.random.PRNGKey(10_000 + config.seed), config.toy.n_samples)
    model = EnergyFlowModel.create(config.model, obs_shape=(1, 2), action_shape=(1, 2))
    # The toy's states and actions are used unnormalized, and its actions are unbounded.
    state, info = fit(config, workdir, model, data, make_policy=lambda ema_params: Policy.create(
        model, config.model, config.diffusion, ema_params, Normalizer.identity(2),
        Normalizer.identity(2), action_bounds=None))
    extra = {}
    schedule = dsm.VESchedule.from_config(config.diffusion)
    if model.kind == "conservative":
        energy = make_energy_fn(model, state.ema_params)
        times = (config.diffusion.gamma, 0.3, 0.6)
        extra["toy_ranking"] = toy.ranking_report(energy, schedule, jax.random.PRNGKey(123), times)
        if run_dir.is_main_process():
            toy.plot_landscape(energy, schedule, os.path.join(workdir, "toy_landscape.png"))
    obs = toy.make_dataset(jax.random.PRNGKey(7), 512)["obs"]
    samples = jax.jit(lambda p, o, r: dsm.sample(
        model, p, o, r, schedule, config.diffusion.n_sample_steps, config.diffusion.gamma))(
        state.ema_params, obs, jax.random.PRNGKey(8))
    # Negative log-likelihood of the samples under the true mixture, a
    # check that works for both model kinds (lower is better).
    extra["sample_true_energy_mean"] = float(toy.true_energy(samples[:, 0], obs[:, 0]).mean())
    extra["data_true_energy_mean"] = float(toy.true_energy(
        toy.sample_actions(jax.random.PRNGKey(9), obs[:, 0], toy.MODE_STD), obs[:, 0]).mean())
    return write_report(workdir, config, state, info, time.perf_counter() - t0, **extra)
