"""DSM and the PF-ODE sampler against closed-form Gaussian scores."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax import training
from energyflow_jax.objectives import dsm
from helpers import gaussian_data, tiny_config
from energyflow_jax.models import Conditioning, EnergyFlowModel
from energyflow_jax.nn import kernels

MEAN, STD = 0.5, 0.2
SCHEDULE = dsm.VESchedule(sigma_min=0.01, sigma_max=5.0)


class TimeConditioned:
    """The sampler's view of a model: the time reaches score_given only
    through the Conditioning it builds once for all steps, as in the network."""

    policy = kernels.KernelPolicy()  # how the sampler picks a step's conditioning

    def conditioning(self, params, s, t):
        return Conditioning(state=(jnp.zeros((s.shape[0], 1)),), time=(t[:, None],))

    def score_given(self, params, a, cond):
        return self.score(params, a, None, cond[0][:, 0])


@dataclasses.dataclass(frozen=True)
class AnalyticGaussian(TimeConditioned):
    """Stand-in model: c * the exact score of N(MEAN, STD^2) noised to time t."""
    action_shape: tuple = (1, 2)

    def score(self, c, a, s, t):
        var = STD ** 2 + SCHEDULE.sigma(t)[:, None, None] ** 2
        return -c * (a - MEAN) / var


@dataclasses.dataclass(frozen=True)
class AnalyticMixture(TimeConditioned):
    """Exact noised score of 0.5 N(-1, STD^2) + 0.5 N(+1, STD^2) per coordinate."""
    action_shape: tuple = (1, 1)

    def score(self, params, a, s, t):
        var = STD ** 2 + SCHEDULE.sigma(t)[:, None, None] ** 2
        logits = jnp.stack([-(a + 1) ** 2, -(a - 1) ** 2]) / (2 * var)
        w = jax.nn.softmax(logits, axis=0)
        return (w[0] * -(a + 1) + w[1] * -(a - 1)) / var


def test_dsm_loss_is_minimised_by_the_analytic_score():
    model = AnalyticGaussian()
    batch = gaussian_data(200_000, MEAN, STD)
    rng = jax.random.PRNGKey(0)
    cs = np.array([0.8, 0.9, 1.0, 1.1, 1.2])
    losses = np.array([float(dsm.dsm_loss(model, c, batch, rng, SCHEDULE)) for c in cs])
    assert np.argmin(losses) == 2, losses
    quad = np.polyfit(cs, losses, 2)
    assert abs(-quad[1] / (2 * quad[0]) - 1.0) < 0.03, losses


def test_trained_free_field_recovers_the_gaussian_score():
    c = tiny_config("free", "mlp")
    c.optim.learning_rate = 3e-3
    c.optim.total_steps = 1500
    c.optim.ema_decay = 0.99
    c.diffusion.sigma_max = 5.0
    model = EnergyFlowModel.create(c.model, (1, 1), (1, 2))
    tx = training.make_optimizer(c.optim)
    mesh = training.make_mesh(1)
    state = training.TrainState.create(model, tx, training.HParams.from_config(c),
                                       jax.random.PRNGKey(1))
    chunk = training.make_train_chunk(model, tx, 256, c.optim.total_steps, mesh)

    def relative_error(params, t):
        sigma = float(SCHEDULE.sigma(t))
        a = MEAN + np.sqrt(STD ** 2 + sigma ** 2) * jax.random.normal(jax.random.PRNGKey(2), (512, 1, 2))
        tt = jnp.full((512,), t)
        truth = AnalyticGaussian().score(1.0, a, None, tt)
        est = model.score(params, a, jnp.zeros((512, 1, 1)), tt)
        return float(jnp.linalg.norm(est - truth) / jnp.linalg.norm(truth))

    # sigma(t) = 0.78 and 2.7. Far below the data's std, sigma * score is a
    # small part of the DSM target next to the unit noise, so the loss barely
    # constrains it and short training leaves it loose (that is DSM, not a bug).
    times = (0.7, 0.9)
    assert min(relative_error(state.params, t) for t in times) > 0.5  # untrained
    state, _ = chunk(state, gaussian_data(8192, MEAN, STD))
    for t in times:
        assert relative_error(state.ema_params, t) < 0.2, t


def test_sampler_reproduces_gaussian_and_mixture():
    obs = jnp.zeros((4000, 1, 1))
    # With many steps the Euler PF-ODE converges to the data distribution, up
    # to the prior's offset: a_T ~ N(0, sigma_max^2) is centred at 0, not at
    # MEAN, and the flow shrinks that offset by STD / sqrt(STD^2 + sigma_max^2).
    expected_mean = MEAN * (1 - STD / np.sqrt(STD ** 2 + SCHEDULE.sigma_max ** 2))
    a = dsm.sample(AnalyticGaussian(), 1.0, obs, jax.random.PRNGKey(0), SCHEDULE,
                         n_steps=400, gamma=1e-3)
    np.testing.assert_allclose(np.asarray(a.mean(axis=(0, 1))), expected_mean, atol=0.006)
    np.testing.assert_allclose(np.asarray(a.std(axis=(0, 1))), STD, rtol=0.05)
    # The published K = 20 keeps the mean but contracts the spread: each Euler
    # step shrinks deviations more than the exact flow does (a "cold" sampler).
    a20 = dsm.sample(AnalyticGaussian(), 1.0, obs, jax.random.PRNGKey(0), SCHEDULE,
                           n_steps=20, gamma=1e-3)
    np.testing.assert_allclose(np.asarray(a20.mean(axis=(0, 1))), MEAN, atol=0.025)
    assert 0.3 * STD < float(a20.std()) < 0.8 * STD

    a = np.asarray(dsm.sample(AnalyticMixture(), None, obs, jax.random.PRNGKey(1),
                                    SCHEDULE, n_steps=400, gamma=1e-3)).ravel()
    right = a > 0
    assert abs(right.mean() - 0.5) < 0.05
    np.testing.assert_allclose(a[right].mean(), 1.0, atol=0.05)
    np.testing.assert_allclose(a[~right].mean(), -1.0, atol=0.05)
    np.testing.assert_allclose(a[right].std(), STD, rtol=0.2)


def test_sampler_returns_energy_at_gamma():
    c = tiny_config()
    model = EnergyFlowModel.create(c.model, (2, 3), (4, 2))
    params = model.init(jax.random.PRNGKey(0))
    obs = jnp.ones((5, 2, 3))
    a, energy = dsm.sample(model, params, obs, jax.random.PRNGKey(1), SCHEDULE,
                                 n_steps=3, gamma=1e-3, return_energy=True)
    expected = model.energy(params, a, obs, jnp.full((5,), 1e-3))
    np.testing.assert_allclose(np.asarray(energy), np.asarray(expected), rtol=1e-5)


@pytest.mark.slow
def test_sampler_with_precomputed_conditioning_matches_per_step_scores():
    """The sampler builds the conditioning once for all K times and picks row
    k per step; that must be the Euler loop over model.score(a, s, t_k)."""
    obs = jax.random.normal(jax.random.PRNGKey(3), (3, 2, 3))
    n_steps, gamma = 4, 1e-3
    dt = (SCHEDULE.T - gamma) / n_steps
    for kind, arch in [("conservative", "unet"), ("free", "unet"), ("conservative", "mlp")]:
        model = EnergyFlowModel.create(tiny_config(kind, arch).model, (2, 3), (4, 2))
        params = model.init(jax.random.PRNGKey(0))
        got = jax.jit(lambda p: dsm.sample(model, p, obs, jax.random.PRNGKey(1), SCHEDULE,
                                           n_steps, gamma))(params)
        a = SCHEDULE.sigma_max * jax.random.normal(jax.random.PRNGKey(1), (3, 4, 2))
        score = jax.jit(model.score)  # jitted: op by op, each primitive compiles alone
        for k in range(n_steps):
            t = jnp.full((3,), SCHEDULE.T - k * dt)
            drift = 0.5 * SCHEDULE.dsigma2_dt(t)[:, None, None] * score(params, a, obs, t)
            a = a + dt * drift
        np.testing.assert_allclose(np.asarray(got), np.asarray(a), rtol=1e-4, atol=1e-4,
                                   err_msg=f"{kind} {arch}")
