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
each task's seeds one program with its own recipe, its table beside the published
EnergyFlow and Diffusion Policy rows), "table_free" (the same with the free vector
field: conservative vs free like for like), "ood" (conservative vs free under start
perturbations, paired episode by episode), "tiny", "table_tiny" and "ood_tiny" (seconds,
for tests, of sweeps/metaworld.py:tiny).
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


# The :table recipe per task, on top of the CPU preset's MLP with 200 demos: training
# steps, replan length and how many chunks the policy draws per observation (it executes
# the one of least energy). How it was chosen, and what it gives: docs/results.md.
TABLE_RECIPE = {
    "button-press-v3": {"optim.total_steps": 8000, "diffusion.n_candidates": 8},
    "drawer-open-v3": {"optim.total_steps": 8000, "diffusion.n_candidates": 8},
    "assembly-v3": {"optim.total_steps": 12_000, "diffusion.n_candidates": 8},
    "bin-picking-v3": {"optim.total_steps": 30_000, "data.n_demos": 400,
                       "data.exec_horizon": 4},
    "hammer-v3": {"optim.total_steps": 12_000, "diffusion.n_candidates": 8},
}


def _table(c):
    """The paper's five tasks x 3 seeds with TABLE_RECIPE; per task, the seeds are one
    program's members. Evaluated on eval seed 1's layouts, not the eval seed 0 layouts
    the recipe was chosen on."""
    c.tasks = ()
    c.sweep.grid = sweep_grid({})
    c.sweep.settings = tuple({"task": t, **TABLE_RECIPE[t]}
                             for t in config_lib.load_module(TASK_CONFIG).PAPER_TASKS)
    c.sweep.seeds = (0, 1, 2)
    c.data.n_demos = 200
    c.eval.seeds = (1,)


def _one_chunk(settings) -> tuple:
    """Per-task settings without the energy-ranked candidates (one chunk per replan)."""
    return tuple({k: v for k, v in s.items() if k != "diffusion.n_candidates"} for s in settings)


def _table_free(c):
    """:table with the free vector field (Diffusion Policy's form) on the same backbone,
    data and steps. A free field has no energy to rank chunks by: one chunk each."""
    _table(c)
    c.model.kind = "free"
    c.sweep.settings = _one_chunk(c.sweep.settings)


# Tasks of the OOD study (:ood): below 100% at level 0, where a perturbation can show.
OOD_TASKS = ("assembly-v3", "hammer-v3")


def _ood(c):
    """Conservative vs free under start perturbations (levels 0, S, M, L and 15 cm): each
    OOD_TASKS task with its :table recipe, 3 seeds, both fields drawing one chunk per
    replan (the claim is about the field, not the candidate ranking). Writes the paired
    per-level comparison and ood.png."""
    _table(c)
    c.sweep.settings = _one_chunk({"task": t, **TABLE_RECIPE[t]} for t in OOD_TASKS)
    c.sweep.grid = sweep_grid({"model.kind": ("conservative", "free")})
    c.eval.ood_levels = ("S", "M", "L", 0.15)


def _ood_tiny(c):
    c.sweep.settings = ({"task": "button-press-v3"},)
    c.sweep.grid = sweep_grid({"model.kind": ("conservative", "free")})
    c.sweep.seeds = (0, 1)
    c.eval.ood_levels = ("L",)


def _table_tiny(c):
    """Two tasks x two seeds of sweeps/metaworld.py:tiny, per-task settings as in :table."""
    c.sweep.grid = sweep_grid({})
    c.sweep.settings = ({"task": "button-press-v3", "diffusion.n_candidates": 2},
                        {"task": "drawer-open-v3", "optim.total_steps": 10})
    c.sweep.seeds = (0, 1)


PRESETS = {"default": ("default", _default), "tiny": ("tiny", _tiny),
           "paper": ("paper", _paper), "table": ("default", _table),
           "table_free": ("default", _table_free), "table_tiny": ("tiny", _table_tiny),
           "ood": ("default", _ood), "ood_tiny": ("tiny", _ood_tiny)}


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
