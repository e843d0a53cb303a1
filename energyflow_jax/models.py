"""Energy models and free vector-field models with one shared backbone.

`model.kind = "conservative"`: the network outputs one scalar energy per sample
and the score is its negative action gradient, so the field is curl-free by
construction. `model.kind = "free"`: the same backbone outputs the field
directly (the Diffusion-Policy-style baseline). Both expose `score`, so the
loss and the sampler do not care which one they get.

All methods are pure functions of `params`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from energyflow_jax import networks

KINDS = ("conservative", "free")
ARCHS = ("unet", "mlp")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConditionalNetwork(nn.Module):
    """(a, s, t) -> energy (B,) if conservative, else field (B, L, A)."""

    kind: str
    arch: str
    down_dims: Sequence[int]
    kernel_size: int
    n_groups: int
    mlp_dims: Sequence[int]
    head_dims: Sequence[int]
    state_emb_dim: int
    time_emb_dim: int
    spectral_norm: bool
    dtype: Any

    @nn.compact
    def __call__(self, a: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
        # The state and time parts of the conditioning stay separate: in the
        # sampler loop the state part is fixed, and XLA hoists it (and the
        # FiLM weights it multiplies) out of the loop.
        cond_parts = (networks.StateEncoder(self.state_emb_dim, self.dtype)(s),
                      networks.SinusoidalTimeEmbedding(self.time_emb_dim, self.dtype)(t))
        if self.arch == "unet":
            features = networks.UNet1D(self.down_dims, self.kernel_size, self.n_groups,
                                       self.dtype)(a, cond_parts)  # (B, L, C)
            if self.kind == "free":
                return networks.Conv1D(a.shape[-1], 1, dtype=self.dtype)(features)
            pooled = features.astype(jnp.float32).mean(axis=1)
        else:
            h = jnp.concatenate([a.reshape(a.shape[0], -1), *cond_parts], axis=-1)
            for width in self.mlp_dims:
                h = networks.softplus(networks.Dense(width, dtype=self.dtype)(h))
            if self.kind == "free":
                return networks.Dense(a.shape[1] * a.shape[2])(h).reshape(a.shape)
            pooled = h.astype(jnp.float32)
        return self._energy_head(pooled)

    def _energy_head(self, h: jax.Array) -> jax.Array:
        # Spectral normalization keeps the head's Lipschitz constant at 1,
        # which is what the capacity bound (Theorem 3.6) leans on.
        layer = networks.SpectralDense if self.spectral_norm else networks.Dense
        for width in self.head_dims:
            h = networks.softplus(layer(width)(h))
        return layer(1, use_bias=False)(h)[:, 0]


@dataclasses.dataclass(frozen=True)
class EnergyFlowModel:
    """A network plus the shapes it was built for; methods are pure in params."""

    network: ConditionalNetwork
    obs_shape: tuple  # (obs_horizon, obs_dim)
    action_shape: tuple  # (pred_horizon, action_dim)

    @property
    def kind(self) -> str:
        return self.network.kind

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, obs_shape, action_shape) -> "EnergyFlowModel":
        if config.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {KINDS}, got {config.kind!r}")
        if config.arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {ARCHS}, got {config.arch!r}")
        if config.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}")
        if config.arch == "unet" and any(d % config.n_groups for d in config.down_dims):
            raise ValueError(
                f"every model.down_dims entry must be divisible by model.n_groups="
                f"{config.n_groups}, got {tuple(config.down_dims)}")
        network = ConditionalNetwork(
            kind=config.kind, arch=config.arch, down_dims=tuple(config.down_dims),
            kernel_size=config.kernel_size, n_groups=config.n_groups,
            mlp_dims=tuple(config.mlp_dims), head_dims=tuple(config.head_dims),
            state_emb_dim=config.state_emb_dim, time_emb_dim=config.time_emb_dim,
            spectral_norm=config.spectral_norm, dtype=DTYPES[config.dtype],
        )
        return cls(network, tuple(obs_shape), tuple(action_shape))

    def init(self, rng: jax.Array):
        a = jnp.zeros((1, *self.action_shape), jnp.float32)
        s = jnp.zeros((1, *self.obs_shape), jnp.float32)
        return self.network.init(rng, a, s, jnp.zeros((1,), jnp.float32))

    def check_inputs(self, a: jax.Array, s: jax.Array) -> None:
        """Shape check at trace time; a mismatch names both shapes."""
        if a.shape[1:] != self.action_shape:
            raise ValueError(f"action chunk shape {a.shape[1:]} does not match the model's "
                             f"{self.action_shape} (pred_horizon, action_dim)")
        if s.shape[1:] != self.obs_shape:
            raise ValueError(f"observation shape {s.shape[1:]} does not match the model's "
                             f"{self.obs_shape} (obs_horizon, obs_dim)")

    def energy(self, params, a: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
        """Scalar energy per sample, (B,). Conservative models only."""
        if self.kind != "conservative":
            raise ValueError("a free vector-field model has no energy; use model.kind='conservative'")
        self.check_inputs(a, s)
        return self.network.apply(params, a, s, t)

    def energy_and_score(self, params, a, s, t):
        """(E, -dE/da). Samples are independent, so grad of the sum is per-sample."""
        def total(a_):
            e = self.energy(params, a_, s, t)
            return e.sum(), e

        (_, energy), grad = jax.value_and_grad(total, has_aux=True)(a)
        return energy, -grad

    def score(self, params, a: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
        """The denoising field, (B, L, A)."""
        if self.kind == "conservative":
            return -jax.grad(lambda a_: self.energy(params, a_, s, t).sum())(a)
        self.check_inputs(a, s)
        return self.network.apply(params, a, s, t)
