"""A plain ReLU MLP with orthogonal init (SAC's actor and critics, the adversarial discriminator)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    hidden_dims: Sequence[int]
    activate_final: bool = False
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden_dims):
            x = nn.Dense(width, kernel_init=nn.initializers.orthogonal(jnp.sqrt(2.0)))(x)
            if i + 1 < len(self.hidden_dims) or self.activate_final:
                if self.layer_norm:
                    x = nn.LayerNorm()(x)
                x = nn.relu(x)
        return x
