"""A sweep over the toy task (energyflow_jax.experiments.toy): learning rate and
sigma_max share one compiled program per width; the MLP width is a shape-changing
key, so each width is its own group.

  python -m energyflow_jax.main --config=sweeps/sweep_toy.py:small --workdir=runs/sweep_toy_small
  python -m energyflow_jax.main --config=sweeps/sweep_toy.py --workdir=runs/sweep_toy
  # on a Ray cluster (workdir on shared storage):
  python -m energyflow_jax.main --config=sweeps/sweep_toy.py --workdir=/shared/sweep_toy \
      --config.sweep.ray_address=auto

Presets: "default" (3 lr x 3 sigma_max x 2 widths x 3 seeds = 54 members in 2
groups, the toy's full 10k steps; an accelerator's job), "small" (CPU, a few
minutes: 2 x 2 x 2 widths x 2 seeds, 600 steps), "tiny" (seconds; tests).
"""
import os

from energyflow_jax import config as config_lib
from energyflow_jax.sweep.grid import add_sweep_section, sweep_grid

TASK_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy.py")


def _default(c):
    pass


def _small(c):
    c.sweep.seeds = (0, 1)
    c.sweep.grid = sweep_grid({"optim.learning_rate": (1e-3, 3e-3),
                               "diffusion.sigma_max": (2.0, 5.0),
                               "model.mlp_dims": ((64, 64), (128, 128))})
    c.model.head_dims = (64,)
    c.model.state_emb_dim = 32
    c.model.time_emb_dim = 32
    c.toy.n_samples = 5000
    c.optim.total_steps = 600
    c.optim.warmup_steps = 50
    c.train.steps_per_chunk = 100
    c.train.checkpoint_every_chunks = 2


def _tiny(c):
    """Seconds, for tests: 2 lr x 2 widths x 2 seeds, 2 groups."""
    c.sweep.seeds = (0, 1)
    c.sweep.grid = sweep_grid({"optim.learning_rate": (1e-3, 3e-3),
                               "model.mlp_dims": ((16, 16), (32, 32))})
    c.model.head_dims = (16,)
    c.model.state_emb_dim = 8
    c.model.time_emb_dim = 8
    c.toy.n_samples = 512
    c.sweep.heldout_samples = 512
    c.optim.total_steps = 40
    c.optim.warmup_steps = 5
    c.train.batch_size = 32
    c.train.steps_per_chunk = 10
    c.train.checkpoint_every_chunks = 2
    c.log.progress = False


PRESETS = {"default": _default, "small": _small, "tiny": _tiny}


def get_config(preset=None):
    name = preset or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    c = config_lib.load(TASK_CONFIG)  # locked; unlock a copy to add the sweep section
    c = c.copy_and_resolve_references()
    c.unlock()
    c.log.tensorboard = False
    add_sweep_section(
        c, task="toy", seeds=(0, 1, 2),
        grid={"optim.learning_rate": (1e-3, 3e-3, 1e-2),
              "diffusion.sigma_max": (2.0, 5.0, 10.0),
              "model.mlp_dims": ((128, 128, 128), (256, 256, 256))},
        metric="toy_spearman", metric_mode="max")
    PRESETS[name](c)
    c.lock()
    return c
