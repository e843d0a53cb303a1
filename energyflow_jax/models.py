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
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from energyflow_jax.nn import kernels, layers

KINDS = ("conservative", "free")
ARCHS = ("unet", "mlp")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Conditioning(NamedTuple):
    """The conditioning of every conditioned layer, split by what it depends on.

    Layer i receives state[i] + time[i]. state[i] (B, D_i) comes from the
    observation (and holds the layer's bias); time[i] (T, D_i) from the time
    embedding, one row per time. In training T == B (a time per sample); the
    sampler builds it once for its K step times, and `at(k)` picks step k.
    """

    state: tuple
    time: tuple

    def combined(self) -> tuple:
        return tuple(s + t for s, t in zip(self.state, self.time))

    def at(self, k, policy: kernels.KernelPolicy = kernels.KernelPolicy()) -> tuple:
        if policy.plain:
            return tuple(s + t[k] for s, t in zip(self.state, self.time))
        # CPU forms: row k as a one-hot product, not t[k]: XLA on CPU fuses a
        # dynamic slice into every elementwise consumer, which then runs about 4x
        # slower (measured: the sampler's FiLM fusions at batch 256). The
        # product is exact for finite rows at HIGHEST precision.
        return tuple(s + jnp.dot(jax.nn.one_hot(k, t.shape[0], dtype=t.dtype), t,
                                 precision=kernels.HIGHEST)
                     for s, t in zip(self.state, self.time))


class ConditionalNetwork(nn.Module):
    """(a, s, t) -> energy (B,) if conservative, else field (B, L, A).

    Split in two methods: `conditioning(s, t)` (everything that does not
    depend on the action chunk) and `trunk(a, cond)`. The conditioning enters
    every layer it feeds through a linear map, so it is carried as that map's
    output, in state and time terms (see Conditioning).
    """

    kind: str
    arch: str
    action_shape: tuple
    down_dims: Sequence[int]
    kernel_size: int
    n_groups: int
    mlp_dims: Sequence[int]
    head_dims: Sequence[int]
    state_emb_dim: int
    time_emb_dim: int
    spectral_norm: bool
    dtype: Any
    policy: kernels.KernelPolicy = kernels.KernelPolicy()

    def setup(self):
        dtype, policy = self.dtype, self.policy
        self.state_encoder = layers.StateEncoder(self.state_emb_dim, dtype, policy)
        self.time_embedding = layers.SinusoidalTimeEmbedding(self.time_emb_dim, dtype, policy)
        cond_dim = self.state_emb_dim + self.time_emb_dim
        action_size = math.prod(self.action_shape)
        if self.arch == "unet":
            self.unet = layers.UNet1D(self.down_dims, self.kernel_size, self.n_groups, dtype,
                                      policy)
            self.cond_layers = [layers.CondProjection(2 * f, cond_dim, dtype, policy)
                                for f in layers.unet_block_features(self.down_dims)]
            if self.kind == "free":
                self.field_out = layers.Conv1D(self.action_shape[-1], 1, dtype=dtype,
                                               policy=policy)
        else:
            # The first MLP layer reads concat(a, state_emb, time_emb): its
            # action part is mlp_in, its conditioning part cond_layers[0].
            fan_in = action_size + cond_dim
            self.cond_layers = [layers.CondProjection(self.mlp_dims[0], fan_in, dtype, policy)]
            self.mlp_in = layers.Dense(self.mlp_dims[0], use_bias=False, dtype=dtype,
                                       fan_in=fan_in, policy=policy)
            self.mlp_hidden = [layers.Dense(w, dtype=dtype, policy=policy)
                               for w in self.mlp_dims[1:]]
            if self.kind == "free":
                self.field_out = layers.Dense(action_size, policy=policy)
        if self.kind == "conservative":
            # Spectral normalization keeps the head's Lipschitz constant at 1,
            # which is what the capacity bound (Theorem 3.6) leans on.
            layer = layers.SpectralDense if self.spectral_norm else layers.Dense
            self.head = ([layer(w, policy=policy) for w in self.head_dims]
                         + [layer(1, use_bias=False, policy=policy)])

    def __call__(self, a: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
        return self.trunk(a, self.conditioning(s, t).combined())

    def conditioning(self, s: jax.Array, t: jax.Array) -> Conditioning:
        """s (B, *obs_shape), t (T,) -> the Conditioning of every layer."""
        state_emb, time_emb = self.state_encoder(s), self.time_embedding(t)
        terms = [layer(state_emb, time_emb) for layer in self.cond_layers]
        return Conditioning(tuple(st for st, _ in terms), tuple(tt for _, tt in terms))

    def trunk(self, a: jax.Array, cond: Sequence[jax.Array]) -> jax.Array:
        """a (B, L, A) and each layer's conditioning input (B, D_i)."""
        if self.arch == "unet":
            features = self.unet(a, cond)  # (B, L, C)
            if self.kind == "free":
                return self.field_out(features)
            pooled = features.astype(jnp.float32).mean(axis=1)
        else:
            h = layers.softplus(self.mlp_in(a.reshape(a.shape[0], -1)) + cond[0])
            for layer in self.mlp_hidden:
                h = layers.softplus(layer(h))
            if self.kind == "free":
                return self.field_out(h).reshape(a.shape)
            pooled = h.astype(jnp.float32)
        h = pooled
        for layer in self.head[:-1]:
            h = layers.softplus(layer(h))
        return self.head[-1](h)[:, 0]


@dataclasses.dataclass(frozen=True)
class EnergyFlowModel:
    """A network plus the shapes it was built for; methods are pure in params."""

    network: ConditionalNetwork
    obs_shape: tuple  # (obs_horizon, obs_dim)
    action_shape: tuple  # (pred_horizon, action_dim)

    @property
    def kind(self) -> str:
        return self.network.kind

    @property
    def policy(self) -> kernels.KernelPolicy:
        """The resolved convolution form and matmul precision (nn.kernels)."""
        return self.network.policy

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, obs_shape, action_shape,
               backend: str | None = None) -> "EnergyFlowModel":
        """The model of config (the `model` section) for these shapes; `model.conv_impl`
        "auto" resolves for `backend` (default: jax.default_backend())."""
        if config.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {KINDS}, got {config.kind!r}")
        if config.arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {ARCHS}, got {config.arch!r}")
        if config.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}")
        if config.arch == "mlp" and not config.mlp_dims:
            raise ValueError("model.arch='mlp' needs at least one model.mlp_dims layer")
        if config.arch == "unet" and any(d % config.n_groups for d in config.down_dims):
            raise ValueError(
                f"every model.down_dims entry must be divisible by model.n_groups="
                f"{config.n_groups}, got {tuple(config.down_dims)}")
        policy = kernels.resolve_policy(config.get("conv_impl", "auto"),
                                        config.get("matmul_precision", "default"),
                                        config.dtype, backend)
        network = ConditionalNetwork(
            kind=config.kind, arch=config.arch, action_shape=tuple(action_shape),
            down_dims=tuple(config.down_dims),
            kernel_size=config.kernel_size, n_groups=config.n_groups,
            mlp_dims=tuple(config.mlp_dims), head_dims=tuple(config.head_dims),
            state_emb_dim=config.state_emb_dim, time_emb_dim=config.time_emb_dim,
            spectral_norm=config.spectral_norm, dtype=DTYPES[config.dtype], policy=policy,
        )
        return cls(network, tuple(obs_shape), tuple(action_shape))

    def init(self, rng: jax.Array):
        a = jnp.zeros((1, *self.action_shape), jnp.float32)
        s = jnp.zeros((1, *self.obs_shape), jnp.float32)
        # Jitted: op by op, a U-Net's init takes several times longer than compiling it.
        return jax.jit(self.network.init)(rng, a, s, jnp.zeros((1,), jnp.float32))

    def check_actions(self, a: jax.Array) -> None:
        """Shape check at trace time; a mismatch names both shapes."""
        if a.shape[1:] != self.action_shape:
            raise ValueError(f"action chunk shape {a.shape[1:]} does not match the model's "
                             f"{self.action_shape} (pred_horizon, action_dim)")

    def check_obs(self, s: jax.Array) -> None:
        if s.shape[1:] != self.obs_shape:
            raise ValueError(f"observation shape {s.shape[1:]} does not match the model's "
                             f"{self.obs_shape} (obs_horizon, obs_dim)")

    def conditioning(self, params, s: jax.Array, t: jax.Array) -> Conditioning:
        """The action-independent part of the network for states s (B, ...) and times t (T,)."""
        self.check_obs(s)
        return self.network.apply(params, s, t, method=ConditionalNetwork.conditioning)

    def energy_given(self, params, a: jax.Array, cond: Sequence[jax.Array]) -> jax.Array:
        """Energy (B,) of chunks a under per-layer conditioning (Conditioning.combined/at)."""
        if self.kind != "conservative":
            raise ValueError("a free vector-field model has no energy; use model.kind='conservative'")
        self.check_actions(a)
        return self.network.apply(params, a, cond, method=ConditionalNetwork.trunk)

    def score_given(self, params, a: jax.Array, cond: Sequence[jax.Array]) -> jax.Array:
        """The denoising field (B, L, A) under per-layer conditioning."""
        if self.kind == "conservative":
            # Samples are independent, so the gradient of the sum is per sample.
            return -jax.grad(lambda a_: self.energy_given(params, a_, cond).sum())(a)
        self.check_actions(a)
        return self.network.apply(params, a, cond, method=ConditionalNetwork.trunk)

    def check_inputs(self, a, s, t) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(a, s, t) with t as (B,): each argument's shape checked at trace time, and a
        mismatch named by argument (a scalar t is one time for the whole batch)."""
        a, s, t = jnp.asarray(a), jnp.asarray(s), jnp.asarray(t, jnp.float32)
        if a.ndim != 3:
            raise ValueError(f"a: action chunks must be (batch, {', '.join(map(str, self.action_shape))})"
                             f", got shape {a.shape}")
        self.check_actions(a)
        if s.ndim != 1 + len(self.obs_shape):
            raise ValueError(f"s: observations must be (batch, {', '.join(map(str, self.obs_shape))})"
                             f", got shape {s.shape}")
        self.check_obs(s)
        batch = a.shape[0]
        if batch < 1:
            raise ValueError("a: the batch is empty; give at least one action chunk")
        if s.shape[0] != batch:
            raise ValueError(f"s: batch of {s.shape[0]} observations for a batch of {batch} "
                             "action chunks in a; they must be equal")
        if t.ndim == 0:
            t = jnp.full((batch,), t)
        elif t.shape != (batch,):
            raise ValueError(f"t: noise times must be a scalar or shape ({batch},), one per "
                             f"sample, got shape {t.shape}")
        return a, s, t

    def energy(self, params, a: jax.Array, s: jax.Array, t) -> jax.Array:
        """Scalar energy per sample, (B,), at times t (a scalar or (B,)). Conservative
        models only."""
        a, s, t = self.check_inputs(a, s, t)
        return self.energy_given(params, a, self.conditioning(params, s, t).combined())

    def score(self, params, a: jax.Array, s: jax.Array, t) -> jax.Array:
        """The denoising field, (B, L, A), at times t (a scalar or (B,))."""
        a, s, t = self.check_inputs(a, s, t)
        return self.score_given(params, a, self.conditioning(params, s, t).combined())
