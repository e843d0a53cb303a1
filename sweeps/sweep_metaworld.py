"""A sweep of the main job: Meta-World members trained in one compiled program.

Members are seeds x learning rate x EMA decay, the settings that ride in
`TrainState.hparams`, so every member of the default grid shares one program:
the member axis is vmapped and sharded over the local devices, and evaluation
steps all members' environments together with one sampler call per replan.

  python -m energyflow_jax.main --config=sweeps/sweep_metaworld.py:tiny --workdir=/tmp/swmw
  python -m energyflow_jax.main --config=sweeps/sweep_metaworld.py --workdir=runs/sweep_mw

Presets: "default" (the Meta-World CPU preset's model and data, 3 seeds x 2
learning rates x 2 EMA decays = 12 members; an accelerator's job, or a long CPU
one), "paper" (sweeps/metaworld.py:paper on config.task, seeds 0-2 in one
program; an accelerator's job), "table" (the paper's five tasks x 3 seeds,
each task's seeds one program, its table beside the published EnergyFlow and
Diffusion Policy rows), "tiny" and "table_tiny" (seconds, for tests: 2 seeds,
and 2 tasks x 2 seeds, of sweeps/metaworld.py:tiny).
Writes results.md / results.json (per member: settings, seed, success rate,
Wilson CI; per setting: mean and std over seeds, best marked) and results.png.
"""
import os

from energyflow_jax import config as config_lib
from energyflow_jax.sweep.grid import add_sweep_section, sweep_grid

TASK_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metaworld.py")


def _default(c):
    pass


def _tiny(c):
    c.sweep.grid = sweep_grid({})
    c.sweep.seeds = (0, 1)


def _paper(c):
    """The published recipe on one task (config.task), its 3 training seeds vmapped."""
    c.tasks = ()
    c.sweep.grid = sweep_grid({})
    c.sweep.seeds = (0, 1, 2)


def _table(c):
    """The paper's five tasks x 3 seeds; per task, the seeds are one program's members.
    The recipe: the CPU preset's MLP with 200 demos and 20k steps (docs/results.md)."""
    c.tasks = ()
    c.sweep.grid = sweep_grid({"task": config_lib.load_module(TASK_CONFIG).PAPER_TASKS})
    c.sweep.seeds = (0, 1, 2)
    c.data.n_demos = 200
    c.optim.total_steps = 20_000


def _table_tiny(c):
    c.sweep.grid = sweep_grid({"task": ("button-press-v3", "drawer-open-v3")})
    c.sweep.seeds = (0, 1)


PRESETS = {"default": ("default", _default), "tiny": ("tiny", _tiny),
           "paper": ("paper", _paper), "table": ("default", _table),
           "table_tiny": ("tiny", _table_tiny)}


def get_config(preset=None):
    name = preset or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    task_preset, edit = PRESETS[name]
    c = config_lib.load(f"{TASK_CONFIG}:{task_preset}").copy_and_resolve_references()
    c.unlock()
    add_sweep_section(
        c, task="metaworld", seeds=(0, 1, 2),
        grid={"optim.learning_rate": (1e-3, 2e-3), "optim.ema_decay": (0.99, 0.999)},
        metric="success_rate", metric_mode="max")
    edit(c)
    c.lock()
    return c
