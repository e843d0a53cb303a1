"""Sweep configs: the `sweep` section, expansion into members, grouping by program shape.

A sweep config is a task config plus a `sweep` section (see `add_sweep_section`):

  seeds     members are settings x seeds
  grid      {dotted key: values}; the cartesian product of the values
  settings  explicit override dicts; crossed with the grid when both are given

Members whose configs differ only in seed and in VMAPPABLE keys share every
shape and static choice, so they form one *group*: one compiled program that
trains all of them at once (`training.loop.fit(..., members=...)`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any

import ml_collections
import numpy as np

from energyflow_jax import training

# Config keys whose values are array leaves of TrainState.hparams: they can
# differ between members of one compiled program.
VMAPPABLE = ("optim.learning_rate", "optim.ema_decay", "diffusion.sigma_max",
             "diffusion.sigma_min")


def add_sweep_section(config: ml_collections.ConfigDict, *, task: str = "toy",
                      seeds=(0,), grid: dict | None = None, settings=(),
                      metric: str = "toy_spearman", metric_mode: str = "max"):
    """Adds the `sweep` section to an unlocked task config (for sweeps/*.py)."""
    config.experiment = "sweep"
    config.sweep = ml_collections.ConfigDict(dict(
        task=task,
        seeds=tuple(seeds),
        settings=tuple(dict(s) for s in settings),
        member_axis_devices=0,   # 0: every local device; 1: no sharding of the member axis
        ray_address="",          # e.g. "auto" or "ray://head:10001": groups become Tune trials
        ray_resources=ml_collections.ConfigDict(dict(cpu=1.0, gpu=0.0)),  # per trial
        metric=metric,           # the member metric that picks the best setting
        metric_mode=metric_mode,  # "max" | "min"
        heldout_samples=4096,
    ))
    config.sweep.grid = sweep_grid(grid or {})
    return config


def sweep_grid(grid: dict) -> ml_collections.ConfigDict:
    """{dotted key: values} as a ConfigDict (dotted keys need their own flag;
    the rest of the config stays strict)."""
    return ml_collections.ConfigDict(dict(grid), allow_dotted_keys=True)


# ----------------------------------------------------------------------------
# Expansion and grouping


@dataclasses.dataclass(frozen=True)
class Member:
    index: int
    setting_index: int
    setting: dict            # {dotted key: value}, JSON-able
    seed: int
    config: Any              # the full, locked member config


@dataclasses.dataclass(frozen=True)
class Group:
    gid: str                 # stable directory name: a hash of what the group trains
    members: tuple

    @property
    def config(self):
        """The shape-defining config (any member's; they agree on everything static)."""
        return self.members[0].config


def _lookup(config, key: str, where: str):
    """(parent ConfigDict, leaf name) of a dotted key, or a ValueError naming it."""
    if key == "seed" or key.startswith("sweep.") or key == "sweep":
        raise ValueError(f"{where} may not set {key!r}: list seeds in sweep.seeds")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f"unknown config key {key!r} in {where}: no section "
                             f"{'.'.join(parents[:i + 1])!r}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(f"unknown config key {key!r} in {where}; "
                         f"{'.'.join(parents) or 'the config'} has {known}")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ValueError(f"{where} key {key!r} names a section, not a value")
    return node, leaf


def _plain(value):
    """Lists -> tuples (config fields hold tuples), numpy scalars -> Python."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _settings(config) -> list[dict]:
    sweep = config.sweep
    grid = {k: tuple(v) for k, v in sweep.grid.items()}
    for key, values in grid.items():
        _lookup(config, key, "sweep.grid")
        if not values:
            raise ValueError(f"sweep.grid[{key!r}] is empty")
    explicit = [dict(s) for s in sweep.settings] or [{}]
    for s in explicit:
        for key in s:
            _lookup(config, key, "sweep.settings")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [{k: _plain(v) for k, v in {**s, **g}.items()} for s in explicit for g in combos]


def member_config(config, setting: dict, seed: int):
    """A locked copy of `config` with the setting's overrides and the seed."""
    c = config.copy_and_resolve_references()
    for key, value in setting.items():
        node, leaf = _lookup(c, key, "the sweep")
        if isinstance(node[leaf], float) and isinstance(value, int):
            value = float(value)  # keep the field's type (1 for a float field means 1.0)
        node[leaf] = value
    c.seed = int(seed)
    c.lock()
    return c


def expand(config) -> list[Member]:
    """Members = settings x seeds, in that order; validates every key up front."""
    seeds = [int(s) for s in config.sweep.seeds]
    if not seeds:
        raise ValueError("sweep.seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"sweep.seeds has duplicates: {seeds}")
    members = []
    for si, setting in enumerate(_settings(config)):
        for seed in seeds:
            mc = member_config(config, setting, seed)
            training.HParams.from_config(mc)  # bad noise levels fail before any training
            members.append(Member(len(members), si, setting, seed, mc))
    return members


def _static_key(member_cfg) -> str:
    """Everything that shapes the compiled program: the config minus seed,
    the sweep section and the vmappable keys."""
    d = member_cfg.to_dict()
    d.pop("sweep", None)
    d.pop("seed", None)
    for key in VMAPPABLE:
        section, leaf = key.split(".")
        d[section].pop(leaf)
    return json.dumps(d, sort_keys=True, default=list)


def _vmapped_values(member_cfg) -> dict:
    return {key: member_cfg[key] for key in VMAPPABLE}  # ConfigDict reads dotted keys


def group_members(members: list[Member]) -> list[Group]:
    """One group per distinct static config, in order of first appearance."""
    by_key: dict[str, list[Member]] = {}
    for m in members:
        by_key.setdefault(_static_key(m.config), []).append(m)
    groups = []
    for key, ms in by_key.items():
        # Each member's vmapped values, not only its grid setting: a sweepable
        # key overridden outside the grid must change the id too, or a re-run
        # would resume (or report) the groups trained with the old value.
        ident = json.dumps([key, [[_vmapped_values(m.config), m.seed] for m in ms]],
                           sort_keys=True, default=list)
        gid = f"g{len(groups):02d}-" + hashlib.sha256(ident.encode()).hexdigest()[:10]
        groups.append(Group(gid, tuple(ms)))
    return groups


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """Inverse of `to_dict()` for sweep configs (the grid keeps its dotted keys)."""
    d = json.loads(json.dumps(d, default=list))  # a deep copy; tuples become lists
    grid = d["sweep"].pop("grid")
    c = ml_collections.ConfigDict(_tuples(d))
    c.sweep.grid = sweep_grid(_tuples(grid))
    c.lock()
    return c


def _tuples(x):
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x
