"""Variance-exploding diffusion: schedule, denoising score matching, PF-ODE sampler.

An objective module provides `loss(model, params, batch, rng, schedule)` (what
`training.loop.fit` minimises) and `sample(model, params, obs, rng, schedule,
n_steps, gamma)` (what `Policy.act` draws with; a Policy names its objective).

sigma(t) = sigma_min * (sigma_max / sigma_min) ** (t / T). The noise levels are
pytree leaves so a sweep can vmap over them; T is static.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from energyflow_jax.models import EnergyFlowModel


@flax.struct.dataclass
class VESchedule:
    sigma_min: jax.Array | float = 0.01
    sigma_max: jax.Array | float = 10.0
    T: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def from_config(cls, config) -> "VESchedule":
        if not 0 < config.sigma_min < config.sigma_max:
            raise ValueError("need 0 < diffusion.sigma_min < diffusion.sigma_max, got "
                             f"{config.sigma_min}, {config.sigma_max}")
        return cls(sigma_min=float(config.sigma_min), sigma_max=float(config.sigma_max),
                   T=float(config.T))

    def sigma(self, t: jax.Array) -> jax.Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** (t / self.T)

    def dsigma2_dt(self, t: jax.Array) -> jax.Array:
        return 2.0 * self.sigma(t) ** 2 * jnp.log(self.sigma_max / self.sigma_min) / self.T


def _expand(x: jax.Array, like: jax.Array) -> jax.Array:
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def dsm_loss(model: EnergyFlowModel, params, batch: dict, rng: jax.Array,
             schedule: VESchedule) -> jax.Array:
    """mean((sigma(t) * score(a_t, s, t) + eps) ** 2), t ~ U[0, T].

    For a conservative model this differentiates through grad_a E (second
    order) when the caller takes its gradient in params.
    """
    a0, s = batch["actions"], batch["obs"]
    t_rng, eps_rng = jax.random.split(rng)
    t = jax.random.uniform(t_rng, (a0.shape[0],), minval=0.0, maxval=schedule.T)
    eps = jax.random.normal(eps_rng, a0.shape, a0.dtype)
    sigma = _expand(schedule.sigma(t), a0)
    score = model.score(params, a0 + sigma * eps, s, t)
    return jnp.mean((sigma * score + eps) ** 2)


def sample_times(schedule: VESchedule, n_steps: int, gamma: float) -> jax.Array:
    """The n_steps times the Euler steps start from: T, T - dt, ..., gamma + dt."""
    dt = (schedule.T - gamma) / n_steps
    return schedule.T - dt * jnp.arange(n_steps, dtype=jnp.float32)


def integrate_pf_ode(score_fn, a: jax.Array, schedule: VESchedule, n_steps: int,
                     gamma: float) -> jax.Array:
    """Euler steps of the probability-flow ODE from a at t = T down to gamma.

    score_fn(a, k, t) is the field at step k (time t); a <- a + dt * 0.5 * d(sigma^2)/dt * score.
    """
    dt = (schedule.T - gamma) / n_steps
    times = sample_times(schedule, n_steps, gamma)

    def step(k, a):
        drift = 0.5 * schedule.dsigma2_dt(times[k]) * score_fn(a, k, times[k])
        return a + dt * drift

    return jax.lax.fori_loop(0, n_steps, step, a)


def sample(model: EnergyFlowModel, params, obs: jax.Array, rng: jax.Array,
           schedule: VESchedule, n_steps: int = 20, gamma: float = 1e-3,
           return_energy: bool = False):
    """Euler steps of the probability-flow ODE from t = T down to gamma.

    a_T ~ N(0, sigma_max^2 I); a <- a + dt * 0.5 * d(sigma^2)/dt * score.
    Returns the action chunks (B, L, A), and their energy at gamma when asked
    (conservative models only).
    """
    batch = obs.shape[0]
    a = schedule.sigma_max * jax.random.normal(rng, (batch, *model.action_shape), jnp.float32)
    # Everything that does not depend on the chunk is computed once for all
    # steps: each step then only runs the trunk (and its backward pass).
    cond = model.conditioning(params, obs, sample_times(schedule, n_steps, gamma))
    a = integrate_pf_ode(
        lambda a, k, t: model.score_given(params, a, cond.at(k, model.policy)),
        a, schedule, n_steps, gamma)
    if return_energy:
        return a, model.energy(params, a, obs, jnp.full((batch,), gamma, jnp.float32))
    return a


loss = dsm_loss  # the objective interface's name for the training loss
