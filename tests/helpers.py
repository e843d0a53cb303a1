"""Small shared builders for the core tests."""
import jax.numpy as jnp

from energyflow_jax.config import base_config
from energyflow_jax.models import EnergyFlowModel


def tiny_config(kind="conservative", arch="mlp"):
    c = base_config()
    c.model.kind = kind
    c.model.arch = arch
    c.model.down_dims = (8, 16)
    c.model.kernel_size = 3
    c.model.n_groups = 4
    c.model.mlp_dims = (32, 32)
    c.model.head_dims = (32,)
    c.model.state_emb_dim = 8
    c.model.time_emb_dim = 8
    c.optim.warmup_steps = 10
    c.optim.total_steps = 100
    c.log.tensorboard = False
    c.log.progress = False
    return c


def tiny_model(kind="conservative", arch="mlp", obs_shape=(2, 3), action_shape=(4, 2)):
    return EnergyFlowModel.create(tiny_config(kind, arch).model, obs_shape, action_shape)


def gaussian_data(n, mean=0.5, std=0.2, action_shape=(1, 2), seed=0):
    import jax
    a = mean + std * jax.random.normal(jax.random.PRNGKey(seed), (n, *action_shape))
    return {"obs": jnp.zeros((n, 1, 1)), "actions": a}
