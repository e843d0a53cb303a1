"""Toy task: state-conditioned 2-D multimodal actions with a known energy.

  python -m energyflow_jax.main --config=sweeps/toy.py --workdir=runs/toy
  python -m energyflow_jax.main --config=sweeps/toy.py:tiny --workdir=/tmp/t
"""
import ml_collections

from energyflow_jax.config import base_config, select_preset


def _default(c):
    pass


def _tiny(c):
    """Seconds, for tests."""
    c.model.mlp_dims = (32, 32)
    c.model.head_dims = (32,)
    c.model.state_emb_dim = 16
    c.model.time_emb_dim = 16
    c.toy.n_samples = 512
    c.optim.total_steps = 60
    c.optim.warmup_steps = 10
    c.train.batch_size = 32
    c.train.steps_per_chunk = 10
    c.train.checkpoint_every_chunks = 2
    c.log.tensorboard = False


PRESETS = {"default": _default, "tiny": _tiny}


def get_config(preset=None):
    c = base_config()
    c.experiment = "toy"
    c.model.arch = "mlp"
    c.model.mlp_dims = (256, 256, 256)
    c.model.head_dims = (128,)
    c.model.state_emb_dim = 64
    c.model.time_emb_dim = 64
    c.data.obs_horizon = 1
    c.data.pred_horizon = 1
    c.data.exec_horizon = 1
    c.diffusion.sigma_max = 5.0
    # The modes have std 0.2: below sigma ~ 0.05 DSM carries almost no signal.
    c.diffusion.sigma_min = 0.05
    c.optim.learning_rate = 3e-3
    # DSM on this toy sits on a plateau for a few thousand steps; 10k steps
    # (about 2 minutes on 2 CPU cores) recover the energy at small t too.
    c.optim.total_steps = 10_000
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.999
    c.train.batch_size = 256
    c.train.steps_per_chunk = 500
    c.train.checkpoint_every_chunks = 4
    c.toy = ml_collections.ConfigDict(dict(n_samples=20_000))
    return select_preset(c, PRESETS, preset)
