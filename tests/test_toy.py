"""Training on the toy task recovers the known energy's ranking of actions."""
import os

import jax
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.data import toy
from energyflow_jax.experiments import toy as toy_experiment
from energyflow_jax.io import run_dir
from energyflow_jax.objectives import dsm
from energyflow_jax.policy import Policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy_config(preset=None):
    return config_lib.load(f"sweeps/toy.py:{preset or 'default'}")


def test_true_energy_matches_mixture_density():
    s = toy.sample_states(jax.random.PRNGKey(0), 3)
    centres = np.asarray(toy.mode_centres(s))
    # At a mode centre the energy is lowest among nearby points.
    at_mode = toy.true_energy(centres[:, 0], s)
    off_mode = toy.true_energy(centres[:, 0] + 0.3, s)
    assert np.all(np.asarray(at_mode) < np.asarray(off_mode))
    data = toy.make_dataset(jax.random.PRNGKey(1), 20_000)
    # Samples sit within a few std of some mode.
    d = np.min(np.linalg.norm(np.asarray(data["actions"])[:, 0, None, :]
                              - np.asarray(toy.mode_centres(data["obs"][:, 0])), axis=-1), axis=-1)
    assert 0.15 < np.median(d) < 0.3


@pytest.mark.slow
def test_toy_run_ranks_actions_like_the_true_energy(tmp_path):
    config = _toy_config()
    config.unlock()
    config.optim.total_steps = 600  # spearman 0.997 at 600 steps, 0.998 at 1500
    config.train.steps_per_chunk = 300
    config.log.progress = False
    config.log.tensorboard = False
    report = toy_experiment.train_and_evaluate(config, str(tmp_path))
    ranking = report["toy_ranking"]
    # Where DSM has signal (sigma(0.6) = 0.8, four times the modes' std) the
    # learned energy orders actions within each state like -log p_t.
    assert ranking["t=0.6"]["spearman_mean"] > 0.9, ranking
    assert ranking["t=0.6"]["spearman_min"] > 0.8, ranking
    assert os.path.exists(tmp_path / "toy_landscape.png")
    # The run's checkpoint holds its policy: the EMA params, and energies that rank
    # actions like the report's.
    policy = Policy.load(str(tmp_path))
    assert run_dir.tree_fingerprint(policy.params) == report["ema_params_sha256"]
    s = np.zeros((3, 1, 2), np.float32)
    a = np.stack([toy.mode_centres(s[:, 0])[:, 0], np.full((3, 2), 3.0, np.float32)], 1)
    e = np.asarray(policy.energy(np.repeat(s, 2, 0), a.reshape(6, 1, 2), t=0.6)).reshape(3, 2)
    assert np.all(e[:, 0] < e[:, 1])  # a mode centre is likelier than a point far outside
    # An untrained network does not (the check can fail).
    from energyflow_jax.models import EnergyFlowModel
    model = EnergyFlowModel.create(config.model, (1, 2), (1, 2))
    energy = toy_experiment.make_energy_fn(model, model.init(jax.random.PRNGKey(3)))
    schedule = dsm.VESchedule.from_config(config.diffusion)
    untrained = toy.ranking_report(energy, schedule, jax.random.PRNGKey(123), (0.6,))
    assert untrained["t=0.6"]["spearman_mean"] < 0.9
