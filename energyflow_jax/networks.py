"""Backbones shared by the energy and free-field models.

Layout is channels-last: an action chunk is (batch, horizon, action_dim).

1-D convolutions are written as a concatenation of shifted windows followed by
one matrix multiply. XLA's CPU convolution kernels are about 10x slower than
its matmuls on our machines, and double backprop through them is worse (see
NOTES.md); the shifted-window form is the same convolution and lowers to dense
dots on every backend.

`dtype` is the compute dtype of the matmuls (parameters stay float32). bfloat16
roughly doubles matmul throughput on CPUs with AVX512-BF16 and on GPUs;
normalization statistics, the energy head and all reductions stay float32.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def torch_uniform_init(fan_in: int):
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Kept so that the published recipe starts from the same distribution.
    """
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x @ w in the compute dtype, returning that dtype.

    Returning the compute dtype (not float32) matters under bfloat16: the
    cotangents flowing back are then bfloat16 too, so the backward and
    second-order dots also run as bfloat16 matmuls (accumulated in float32 by
    the backends) instead of falling back to float32 with converts.
    """
    return jnp.dot(x.astype(dtype), w.astype(dtype))


def _shifted_windows(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
    """(B, L, C) -> (B, ceil(L / stride), kernel_size * C), zero padded 'same'."""
    pad = kernel_size // 2
    length = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
    out_len = -(-length // stride)
    taps = [
        jax.lax.slice_in_dim(xp, i, i + stride * (out_len - 1) + 1, stride=stride, axis=1)
        for i in range(kernel_size)
    ]
    return jnp.concatenate(taps, axis=-1)


class Dense(nn.Module):
    """Linear layer with PyTorch's init and float32 accumulation."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = torch_uniform_init(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        y = _matmul(x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", init, (self.features,)).astype(y.dtype)
        return y


def _toeplitz_kernel(kernel: jax.Array, kernel_size: int, length: int) -> jax.Array:
    """(k*C, N) conv kernel -> (L*C, L*N) matrix of the same 'same'-padded conv.

    Block (i, j) maps input position i to output position j: tap i - j + k//2.
    """
    pad = kernel_size // 2
    taps = kernel.reshape(kernel_size, -1, kernel.shape[-1])  # (k, C, N)
    offset = np.arange(length)[:, None] - np.arange(length)[None, :] + pad
    valid = (offset >= 0) & (offset < kernel_size)
    blocks = jnp.where(valid[:, :, None, None], taps[np.clip(offset, 0, kernel_size - 1)], 0.0)
    c, n = taps.shape[1:]
    return blocks.transpose(0, 2, 1, 3).reshape(length * c, length * n)


# Batch size from which the Toeplitz matrix's build cost is repaid (measured on
# CPU: at batch 1 the rebuild dominated sampling latency).
TOEPLITZ_MIN_BATCH = 32


class Conv1D(nn.Module):
    """'Same'-padded 1-D convolution lowered to dense matmuls.

    Long sequences: shifted windows + one dot (k*C inputs per position).
    Sequences no longer than the kernel, in large batches: one dot of the
    flattened sequence with a block-Toeplitz matrix, which skips most
    zero-padding taps (16 vs 20 blocks at length 4, kernel 5) and the window
    copies. Building that matrix costs about L^2 * C * N memory traffic per
    call (XLA does not hoist it out of a sampler loop), so small batches, where
    the saving is smaller than that, keep the window form. Same parameters and
    the same function either way.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, channels = x.shape
        fan_in = self.kernel_size * channels
        init = torch_uniform_init(fan_in)
        kernel = self.param("kernel", init, (fan_in, self.features))
        bias = self.param("bias", init, (self.features,))
        if self.stride == 1 and 1 < length <= self.kernel_size and batch >= TOEPLITZ_MIN_BATCH:
            matrix = _toeplitz_kernel(kernel, self.kernel_size, length)
            y = _matmul(x.reshape(batch, length * channels), matrix, self.dtype)
            return y.reshape(batch, length, self.features) + bias.astype(y.dtype)
        if self.kernel_size == 1 and self.stride == 1:
            windows = x
        else:
            windows = _shifted_windows(x, self.kernel_size, self.stride)
        return _matmul(windows, kernel, self.dtype) + bias.astype(self.dtype)


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
    for _ in range(n_iter):
        u = w @ v
        u = u / (jnp.linalg.norm(u) + 1e-12)
        v = w.T @ u
        v = v / (jnp.linalg.norm(v) + 1e-12)
    u = w @ v
    return u / (jnp.linalg.norm(u) + 1e-12), v


class SpectralDense(nn.Module):
    """Dense layer whose kernel is divided by its spectral norm."""

    features: int
    use_bias: bool = True
    n_power_iter: int = 20

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = torch_uniform_init(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        u, v = _power_iteration(kernel, self.n_power_iter)
        sigma = u @ kernel @ v
        y = x.astype(jnp.float32) @ (kernel / sigma)
        if self.use_bias:
            y = y + self.param("bias", init, (self.features,))
        return y


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal features of t followed by a 2-layer MLP (Softplus)."""

    dim: int = 128
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        half = self.dim // 2
        freqs = jnp.exp(-math.log(1e4) * jnp.arange(half, dtype=jnp.float32) / half)
        angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
        h = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        h = nn.softplus(Dense(self.dim, dtype=self.dtype)(h))
        return Dense(self.dim, dtype=self.dtype)(h)


class StateEncoder(nn.Module):
    """Flattened observation history -> embedding (2 Softplus layers)."""

    dim: int = 128
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, s: jax.Array) -> jax.Array:
        h = s.reshape(s.shape[0], -1)
        h = nn.softplus(Dense(self.dim, dtype=self.dtype)(h))
        return nn.softplus(Dense(self.dim, dtype=self.dtype)(h))


class ConvBlock(nn.Module):
    """Conv -> GroupNorm -> Softplus."""

    features: int
    kernel_size: int
    n_groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Conv1D(self.features, self.kernel_size, dtype=self.dtype)(x)
        h = nn.GroupNorm(num_groups=self.n_groups, epsilon=1e-5)(h)
        return nn.softplus(h)


class FiLMResBlock(nn.Module):
    """Two conv blocks with FiLM (scale, bias) from the conditioning between."""

    features: int
    kernel_size: int
    n_groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        h = ConvBlock(self.features, self.kernel_size, self.n_groups, self.dtype)(x)
        film = Dense(2 * self.features, dtype=self.dtype)(cond)
        scale, bias = jnp.split(film, 2, axis=-1)
        h = h * (1.0 + scale[:, None, :]) + bias[:, None, :]
        h = ConvBlock(self.features, self.kernel_size, self.n_groups, self.dtype)(h)
        if x.shape[-1] != self.features:
            x = Conv1D(self.features, 1, dtype=self.dtype)(x)
        return h + x


class UNet1D(nn.Module):
    """The published 1-D conditional U-Net; returns (B, L, down_dims[0]) features.

    Like the reference, the skip connection of the first level is not consumed.
    """

    down_dims: Sequence[int] = (64, 128, 256)
    kernel_size: int = 5
    n_groups: int = 8
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, a: jax.Array, cond: jax.Array) -> jax.Array:
        res = lambda f: FiLMResBlock(f, self.kernel_size, self.n_groups, self.dtype)  # noqa: E731
        x = a
        skips = []
        n_levels = len(self.down_dims)
        for level, features in enumerate(self.down_dims):
            x = res(features)(x, cond)
            x = res(features)(x, cond)
            skips.append(x)
            if level < n_levels - 1:
                x = Conv1D(features, 3, stride=2, dtype=self.dtype)(x)
        mid = self.down_dims[-1]
        x = res(mid)(x, cond)
        x = res(mid)(x, cond)
        for features in reversed(self.down_dims[:-1]):
            skip = skips.pop()
            x = jnp.concatenate([_match_length(x, skip.shape[1]), skip], axis=-1)
            x = res(features)(x, cond)
            x = res(features)(x, cond)
            x = jnp.repeat(x, 2, axis=1)  # nearest-neighbour x2
            x = Conv1D(features, 3, dtype=self.dtype)(x)
        return _match_length(x, a.shape[1])


def _match_length(x: jax.Array, length: int) -> jax.Array:
    """Zero-pad or crop the time axis; odd horizons do not halve evenly."""
    if x.shape[1] < length:
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))
    return x[:, :length]
