"""Layers of the energy and free-field backbones (the 1-D U-Net's pieces, dense layers, embeddings).

Layout is channels-last: an action chunk is (batch, horizon, action_dim).

How convolutions and dots are computed is the `policy` attribute
(nn.kernels.KernelPolicy: the convolution form and the matmul precision,
chosen per backend); every form has the same parameters.

`dtype` is the compute dtype of the matmuls (parameters stay float32).
bfloat16 is for GPUs: on our CPU it is slower than float32. Normalization
statistics, the energy head and all reductions stay float32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from energyflow_jax.nn.kernels import HIGHEST, KernelPolicy, _matmul, conv1d


def torch_uniform_init(fan_in: int):
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Kept so that the published recipe starts from the same distribution.
    """
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@jax.custom_jvp
def sigmoid(x: jax.Array) -> jax.Array:
    """Logistic sigmoid from one exp(-|x|); never overflows."""
    e = jnp.exp(-jnp.abs(x))
    return jnp.where(x >= 0, 1.0, e) / (1.0 + e)


@sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    s = sigmoid(primals[0])
    return s, s * (1.0 - s) * tangents[0]


@jax.custom_jvp
def softplus(x: jax.Array) -> jax.Array:
    """log(1 + e^x), about 1.7x faster than jax.nn.softplus in score and DSM passes on CPU.

    jax.nn.softplus goes through logaddexp, whose derivatives recompute exp
    in several fusions; here the forward is max(x, 0) + log(1 + exp(-|x|))
    (absolute error about 5e-7, like log1p's) and the derivative is sigmoid,
    whose own derivative is s(1 - s), so double backprop stays cheap too.
    """
    return jnp.maximum(x, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


softplus.defjvp(lambda primals, tangents: (softplus(primals[0]), sigmoid(primals[0]) * tangents[0]))


class Dense(nn.Module):
    """Linear layer with PyTorch's init and float32 accumulation.

    `fan_in` overrides the init's fan-in, for a layer that is one part of a
    wider one (see CondProjection).
    """

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    fan_in: int | None = None
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = torch_uniform_init(self.fan_in or x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        y = _matmul(x, kernel, self.dtype, self.policy)
        if self.use_bias:
            y = y + self.param("bias", init, (self.features,)).astype(y.dtype)
        return y


class CondProjection(nn.Module):
    """A linear layer of concat(state_emb, time_emb), returned as its two terms.

    (state_emb @ K_state + bias, time_emb @ K_time): the layer's output is their
    sum. Kept apart because they vary along different axes: in the sampler the
    state term is fixed across steps and the time term is shared by the batch,
    so both are computed once before the loop (see models.Conditioning).
    `fan_in` is the width of the whole layer's input, for PyTorch's init.
    """

    features: int
    fan_in: int
    dtype: jnp.dtype = jnp.float32
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, state_emb: jax.Array, time_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
        init = torch_uniform_init(self.fan_in)
        n_state = state_emb.shape[-1]
        kernel = self.param("kernel", init, (n_state + time_emb.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        state_term = (_matmul(state_emb, kernel[:n_state], self.dtype, self.policy)
                      + bias.astype(self.dtype))
        return state_term, _matmul(time_emb, kernel[n_state:], self.dtype, self.policy)




class Conv1D(nn.Module):
    """'Same'-padded 1-D convolution in the form `policy.conv` names (nn.kernels.conv1d).

    On CPU (the measured choice): Winograd minimal filtering for stride-1
    float32 batches of at least WINOGRAD_MIN_BATCH (2.5x fewer multiplies than
    the direct form at k = 5), shifted windows and one dot otherwise. The
    kernel is stored (kernel_size * C, N), taps major, for every form.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = self.kernel_size * x.shape[-1]
        init = torch_uniform_init(fan_in)
        kernel = self.param("kernel", init, (fan_in, self.features))
        bias = self.param("bias", init, (self.features,))
        y = conv1d(x, kernel, self.kernel_size, self.stride, self.dtype, self.policy)
        return y + bias.astype(y.dtype)


def _power_iteration(w: jax.Array, n_iter: int) -> tuple[jax.Array, jax.Array]:
    """Top singular vectors (u, v) of w by power iteration from a fixed start.

    The vectors are re-derived from the weights on every call instead of being
    carried as state, so any set of weights (the live ones, the EMA ones, a
    restored checkpoint) is normalized consistently. They are constants under
    differentiation, as in PyTorch's spectral_norm. The loop is unrolled so
    XLA can hoist it out of a sampler loop: it depends on the weights only.
    """
    w = jax.lax.stop_gradient(w.astype(jnp.float32))
    v = jnp.ones((w.shape[1],), jnp.float32) / math.sqrt(w.shape[1])
    dot = lambda a, b: jnp.dot(a, b, precision=HIGHEST)
    for _ in range(n_iter):
        u = dot(w, v)
        u = u / (jnp.linalg.norm(u) + 1e-12)
        v = dot(w.T, u)
        v = v / (jnp.linalg.norm(v) + 1e-12)
    u = dot(w, v)
    return u / (jnp.linalg.norm(u) + 1e-12), v


class SpectralDense(nn.Module):
    """Dense layer whose kernel is divided by its spectral norm."""

    features: int
    use_bias: bool = True
    n_power_iter: int = 20
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = torch_uniform_init(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        u, v = _power_iteration(kernel, self.n_power_iter)
        sigma = jnp.dot(jnp.dot(u, kernel, precision=HIGHEST), v, precision=HIGHEST)
        y = jnp.dot(x.astype(jnp.float32), kernel / sigma, precision=self.policy.dot_precision)
        if self.use_bias:
            y = y + self.param("bias", init, (self.features,))
        return y


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal features of t followed by a 2-layer MLP (Softplus)."""

    dim: int = 128
    dtype: jnp.dtype = jnp.float32
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        half = self.dim // 2
        freqs = jnp.exp(-math.log(1e4) * jnp.arange(half, dtype=jnp.float32) / half)
        angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
        h = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        h = softplus(Dense(self.dim, dtype=self.dtype, policy=self.policy)(h))
        return Dense(self.dim, dtype=self.dtype, policy=self.policy)(h)


class StateEncoder(nn.Module):
    """Flattened observation history -> embedding (2 Softplus layers)."""

    dim: int = 128
    dtype: jnp.dtype = jnp.float32
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, s: jax.Array) -> jax.Array:
        h = s.reshape(s.shape[0], -1)
        h = softplus(Dense(self.dim, dtype=self.dtype, policy=self.policy)(h))
        return softplus(Dense(self.dim, dtype=self.dtype, policy=self.policy)(h))


class GroupNorm(nn.Module):
    """flax's nn.GroupNorm over (B, L, C) (same parameters, same statistics).

    CPU forms spread the per-group statistics to channels by a dot with a
    constant 0/1 (groups, channels) matrix (at HIGHEST precision) instead of a
    broadcast: XLA on CPU fuses a broadcast + reshape into the elementwise
    consumer, where its index arithmetic stops the loop vectorising (the
    normalise -> Softplus -> FiLM fusion ran about 5x slower, 0.87 against
    0.15 ms at 256 x 4 x 256). The plain (accelerator) form broadcasts.
    """

    num_groups: int
    epsilon: float = 1e-5
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, channels = x.shape
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide "
                             f"{channels} channels")
        size = channels // self.num_groups
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        groups = x32.reshape(batch, length, self.num_groups, size)
        mean = groups.mean((1, 3))
        # E[x^2] - E[x]^2, clipped at 0 against round-off, as flax's fast variance.
        var = jnp.maximum(0.0, jnp.square(groups).mean((1, 3)) - jnp.square(mean))
        inv = jax.lax.rsqrt(var + self.epsilon)
        if self.policy.plain:
            normed = (groups - mean[:, None, :, None]) * inv[:, None, :, None]
            return normed.reshape(batch, length, channels) * scale + bias
        spread = jnp.asarray(np.kron(np.eye(self.num_groups), np.ones((1, size))), x32.dtype)
        mean_c = jnp.dot(mean, spread, precision=HIGHEST)[:, None, :]
        mul = jnp.dot(inv, spread, precision=HIGHEST)[:, None, :] * scale
        return (x32 - mean_c) * mul + bias


class ConvBlock(nn.Module):
    """Conv -> GroupNorm -> Softplus."""

    features: int
    kernel_size: int
    n_groups: int
    dtype: jnp.dtype = jnp.float32
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Conv1D(self.features, self.kernel_size, dtype=self.dtype, policy=self.policy)(x)
        h = GroupNorm(num_groups=self.n_groups, epsilon=1e-5, policy=self.policy)(h)
        return softplus(h)


class FiLMResBlock(nn.Module):
    """Two conv blocks with FiLM between: h * (1 + scale) + bias, film = [scale, bias]."""

    features: int
    kernel_size: int
    n_groups: int
    dtype: jnp.dtype = jnp.float32
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, x: jax.Array, film: jax.Array) -> jax.Array:
        block = lambda: ConvBlock(self.features, self.kernel_size, self.n_groups, self.dtype,
                                  self.policy)
        h = block()(x)
        scale, bias = jnp.split(film.astype(h.dtype), 2, axis=-1)
        h = h * (1.0 + scale[:, None, :]) + bias[:, None, :]
        h = block()(h)
        if x.shape[-1] != self.features:
            x = Conv1D(self.features, 1, dtype=self.dtype, policy=self.policy)(x)
        return h + x


def unet_block_features(down_dims: Sequence[int]) -> list[int]:
    """Channel width of each FiLMResBlock of UNet1D, in the order it applies them."""
    down = [f for f in down_dims for _ in range(2)]
    mid = [down_dims[-1]] * 2
    up = [f for f in reversed(down_dims[:-1]) for _ in range(2)]
    return down + mid + up


class UNet1D(nn.Module):
    """The published 1-D conditional U-Net; returns (B, L, down_dims[0]) features.

    It takes the FiLM inputs of its blocks ((B, 2 * width) each, in the order of
    unet_block_features) instead of the conditioning vector, so that a sampler
    can compute them outside its loop. Like the reference, the skip connection
    of the first level is not consumed.
    """

    down_dims: Sequence[int] = (64, 128, 256)
    kernel_size: int = 5
    n_groups: int = 8
    dtype: jnp.dtype = jnp.float32
    policy: KernelPolicy = KernelPolicy()

    @nn.compact
    def __call__(self, a: jax.Array, films: Sequence[jax.Array]) -> jax.Array:
        widths = unet_block_features(self.down_dims)
        if len(films) != len(widths):
            raise ValueError(f"UNet1D has {len(widths)} FiLM blocks, got {len(films)} inputs")
        films = iter(films)
        res = lambda f: FiLMResBlock(f, self.kernel_size, self.n_groups, self.dtype, self.policy)
        conv = lambda f, **kw: Conv1D(f, 3, dtype=self.dtype, policy=self.policy, **kw)
        x = a
        skips = []
        n_levels = len(self.down_dims)
        for level, features in enumerate(self.down_dims):
            x = res(features)(x, next(films))
            x = res(features)(x, next(films))
            skips.append(x)
            if level < n_levels - 1:
                x = conv(features, stride=2)(x)
        mid = self.down_dims[-1]
        x = res(mid)(x, next(films))
        x = res(mid)(x, next(films))
        for features in reversed(self.down_dims[:-1]):
            skip = skips.pop()
            x = jnp.concatenate([_match_length(x, skip.shape[1]), skip], axis=-1)
            x = res(features)(x, next(films))
            x = res(features)(x, next(films))
            x = jnp.repeat(x, 2, axis=1)  # nearest-neighbour x2
            x = conv(features)(x)
        return _match_length(x, a.shape[1])


def _match_length(x: jax.Array, length: int) -> jax.Array:
    """Zero-pad or crop the time axis; odd horizons do not halve evenly."""
    if x.shape[1] < length:
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))
    return x[:, :length]
