"""Flax modules for SAC: tanh-Gaussian actor, critic ensemble, temperature (trunks: nn/mlp.py)."""

from __future__ import annotations

from typing import Sequence

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp

from energyflow_jax.nn.mlp import MLP


class TanhGaussianActor(nn.Module):
    """pi(a | s) = tanh(N(mu(s), diag sigma(s)^2)); actions in [-1, 1]^act_dim."""

    hidden_dims: Sequence[int]
    act_dim: int
    log_std_min: float = -5.0
    log_std_max: float = 2.0

    @nn.compact
    def __call__(self, obs: jax.Array, temperature: float = 1.0) -> distrax.Distribution:
        x = MLP(self.hidden_dims, activate_final=True)(obs)
        small_init = nn.initializers.orthogonal(1e-2)  # start near the uniform-ish policy
        mean = nn.Dense(self.act_dim, kernel_init=small_init)(x)
        log_std = nn.Dense(self.act_dim, kernel_init=small_init)(x)
        # Smoothly bound log_std instead of clipping, so its gradient never vanishes.
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (
            jnp.tanh(log_std) + 1.0
        )
        base = distrax.MultivariateNormalDiag(mean, jnp.exp(log_std) * temperature)
        return distrax.Transformed(base, distrax.Block(distrax.Tanh(), ndims=1))


class Critic(nn.Module):
    hidden_dims: Sequence[int]
    layer_norm: bool = False

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, action], axis=-1)
        x = MLP(self.hidden_dims, activate_final=True, layer_norm=self.layer_norm)(x)
        return nn.Dense(1)(x)[..., 0]


class CriticEnsemble(nn.Module):
    """`num_critics` independent critics evaluated in one vmapped call -> (num_critics, B)."""

    hidden_dims: Sequence[int]
    num_critics: int = 2
    layer_norm: bool = False

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        ensemble = nn.vmap(
            Critic,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.num_critics,
        )
        return ensemble(self.hidden_dims, self.layer_norm)(obs, action)


class Temperature(nn.Module):
    """alpha = exp(log_alpha), a single learned scalar."""

    initial_temperature: float = 1.0

    @nn.compact
    def __call__(self) -> jax.Array:
        log_alpha = self.param(
            "log_alpha", lambda _: jnp.full((), jnp.log(self.initial_temperature))
        )
        return jnp.exp(log_alpha)
