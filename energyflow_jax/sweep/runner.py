"""Hyperparameter sweeps: many training runs per compiled program.

A sweep config is a task config plus a `sweep` section (see `add_sweep_section`):

  seeds     members are settings x seeds
  grid      {dotted key: values}; the cartesian product of the values
  settings  explicit override dicts; crossed with the grid when both are given

Members whose configs differ only in seed and in VMAPPABLE keys share every
shape and static choice, so they form one *group*: one compiled program that
trains all of them at once via `jax.vmap` over a stacked `TrainState` (the
per-member values ride in `TrainState.hparams`). Groups that differ in anything
else (widths, horizons, batch size, model kind, step counts) run one after
another, or as Ray Tune trials when `sweep.ray_address` names a cluster.

Workdir layout (re-running the same command resumes):
  sweep.json                     the expansion: members and groups
  sweep_state.json               which groups are finished
  groups/<gid>/checkpoints/      orbax checkpoints of the stacked state
  groups/<gid>/status.json       steps and chunks trained so far
  groups/<gid>/metrics.jsonl     per-chunk, per-member training metrics
  groups/<gid>/result.json       per-member evaluation; written last = finished
  results.json, results.md, results.png

  python -m energyflow_jax.main --config=sweeps/sweep_toy.py:small --workdir=runs/sweep_toy
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from energyflow_jax import training
from energyflow_jax.data import toy
from energyflow_jax.io import run_dir
from energyflow_jax.objectives import dsm
from energyflow_jax.models import EnergyFlowModel

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


# ----------------------------------------------------------------------------
# The per-member training program (pure; vmapped over members)


class MemberProgram(NamedTuple):
    init: Callable       # (rng, hparams) -> TrainState
    run_steps: Callable  # (state, data, n_steps) -> (state, metrics); n_steps static


def member_program(config, model: EnergyFlowModel) -> MemberProgram:
    """One member's training as pure functions. The step is exactly the one in
    `training.make_train_chunk` (same rng splits), so a member trained here
    equals a single `train.fit` run with that member's config and seed on the
    same data."""
    tx = training.make_optimizer(config.optim)
    batch_size = config.train.batch_size

    def init(rng, hparams):
        return training.TrainState.create(model, tx, hparams, rng)

    def run_steps(state, data, n_steps: int):
        def body(state, _):
            rng, batch_rng = jax.random.split(state.rng)
            batch = training.sample_batch(data, batch_rng, batch_size)
            return training.train_step(model, tx, state.replace(rng=rng), batch)

        state, metrics = jax.lax.scan(body, state, None, length=n_steps)
        return state, jax.tree.map(jnp.mean, metrics) | {"skipped": metrics["skipped"][-1]}

    return MemberProgram(init, run_steps)


def make_train(config, model: EnergyFlowModel, data) -> Callable:
    """train(rng, hparams) -> (final TrainState, per-chunk metrics), pure.

    Runs config.optim.total_steps as a lax.scan over chunks of
    train.steps_per_chunk steps (the data is closed over, purejaxrl style), so
    `jax.jit(jax.vmap(train))(rngs, stacked_hparams)` trains a whole group in
    one program. The resumable driver (`run_group`) uses the same
    `member_program` chunk by chunk instead, checkpointing in between.
    """
    program = member_program(config, model)
    n_full, rest = divmod(config.optim.total_steps, config.train.steps_per_chunk)

    def train(rng, hparams):
        state = program.init(rng, hparams)
        state, metrics = jax.lax.scan(
            lambda s, _: program.run_steps(s, data, config.train.steps_per_chunk),
            state, None, length=n_full)
        if rest:  # a shorter last chunk, as in train.fit
            state, last = program.run_steps(state, data, rest)
            metrics = jax.tree.map(lambda m, x: jnp.concatenate([m, x[None]]), metrics, last)
        return state, metrics

    return train


def stack(trees: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def member_mesh(n_members: int, requested: int = 0) -> Mesh:
    """A 1-D 'member' mesh over the largest device count (<= requested, 0 = all)
    that divides the group, so every device holds whole members."""
    devices = jax.local_devices()
    limit = min(requested or len(devices), len(devices))
    k = max(d for d in range(1, limit + 1) if n_members % d == 0)
    return Mesh(np.asarray(devices[:k]), ("member",))


def make_group_chunk(program: MemberProgram, n_steps: int, mesh: Mesh) -> Callable:
    """jit(vmap(run_steps)): (stacked state, data) -> (stacked state, metrics (n,)).

    The member axis is split over the mesh (every leaf of the state and the
    metrics leads with it); the data is replicated. The state is donated.
    """
    by_member = NamedSharding(mesh, P("member"))
    replicated = NamedSharding(mesh, P())
    fn = jax.vmap(functools.partial(program.run_steps, n_steps=n_steps), in_axes=(0, None))
    return jax.jit(fn, in_shardings=(by_member, replicated), out_shardings=by_member,
                   donate_argnums=0)


# ----------------------------------------------------------------------------
# Tasks: data and per-member evaluation


_toy_dataset = jax.jit(toy.make_dataset, static_argnums=1)  # one compile, not one per op


class ToyTask:
    """The toy task (energyflow_jax.toy): known energy, 2-D states and actions."""

    obs_shape = (1, 2)
    action_shape = (1, 2)
    metrics = ("toy_spearman", "heldout_loss")

    @staticmethod
    def data(config, group_config) -> tuple[dict, dict]:
        # Data from the sweep's base seed, so members differ only in what they
        # set and in their training seed; the training set's size is the
        # group's (a grid may set toy.n_samples), the held-out set is shared.
        make = _toy_dataset
        train = make(jax.random.PRNGKey(10_000 + config.seed), group_config.toy.n_samples)
        heldout = make(jax.random.PRNGKey(20_000 + config.seed), config.sweep.heldout_samples)
        return train, heldout

    @staticmethod
    @functools.lru_cache(maxsize=16)  # per model: groups differing only in training share it
    def make_evaluate(model: EnergyFlowModel) -> Callable:
        """evaluate(group, state, heldout) -> per-member metrics: held-out DSM
        loss (each member's own noise schedule, 4 fixed noise draws) and, for
        energy models, the within-state Spearman of learned vs true energy
        (toy.ranking_report), all on EMA params. Jitted once per model."""
        keys = jax.random.split(jax.random.PRNGKey(31), 4)

        def heldout_loss(params, schedule, heldout):
            return jnp.mean(jax.vmap(
                lambda k: dsm.dsm_loss(model, params, heldout, k, schedule))(keys))

        losses_fn = jax.jit(jax.vmap(heldout_loss, in_axes=(0, 0, None)))
        energy = jax.jit(lambda p, a, s, t: model.energy(
            p, a, s, jnp.full((a.shape[0],), t, jnp.float32)))

        def evaluate(group: Group, state: training.TrainState, heldout: dict) -> list[dict]:
            losses = jax.device_get(losses_fn(state.ema_params, state.hparams.schedule, heldout))
            out = []
            for i, m in enumerate(group.members):
                metrics = {"heldout_loss": float(losses[i])}
                if model.kind == "conservative":
                    params = unstack(state.ema_params, i)
                    schedule = dsm.VESchedule.from_config(m.config.diffusion)
                    report = toy.ranking_report(
                        lambda a, s, t: energy(params, a, s, t), schedule,
                        jax.random.PRNGKey(123), (m.config.diffusion.gamma, 0.3, 0.6))
                    metrics["toy_spearman"] = report["spearman_mean"]
                    metrics["toy_ranking"] = report
                out.append(metrics)
            return out

        return evaluate


TASKS = {"toy": ToyTask}


# ----------------------------------------------------------------------------
# Running groups (resumable)


def _group_dir(workdir: str, gid: str) -> str:
    return os.path.join(os.path.abspath(workdir), "groups", gid)


def _read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def group_finished(workdir: str, gid: str) -> bool:
    return os.path.exists(os.path.join(_group_dir(workdir, gid), "result.json"))


def _append_metrics(path: str, step: int, metrics: dict, truncate_after: int | None) -> None:
    """Per-member metrics as lists; on resume, drop lines for steps that are redone."""
    if truncate_after is not None:
        run_dir.drop_metrics_after(path, truncate_after)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **{k: np.asarray(v).tolist()
                                             for k, v in metrics.items()}}) + "\n")


class _GroupPrograms:
    """The jitted functions of one group shape, built once per process so a
    resumed or repeated group in the same process does not compile again."""

    def __init__(self, task, gcfg, n_members: int, mesh: Mesh):
        self.model = EnergyFlowModel.create(gcfg.model, task.obs_shape, task.action_shape)
        self.program = member_program(gcfg, self.model)
        self.mesh = mesh
        self.by_member = NamedSharding(mesh, P("member"))
        self.replicated = NamedSharding(mesh, P())
        # Members are initialised one at a time by the single-member program:
        # vmapping the init compiles several times slower, for no gain.
        self.init = jax.jit(self.program.init)
        self.evaluate = task.make_evaluate(self.model)
        self._chunks: dict[int, Callable] = {}

    def chunk(self, n_steps: int) -> Callable:
        if n_steps not in self._chunks:  # the last chunk may be shorter: a second program
            self._chunks[n_steps] = make_group_chunk(self.program, n_steps, self.mesh)
        return self._chunks[n_steps]

    def abstract_state(self, rngs, hparams):
        shapes = jax.eval_shape(jax.vmap(self.program.init), rngs, hparams)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=self.by_member), shapes)


_PROGRAMS: dict[tuple, _GroupPrograms] = {}


def _programs(config, group: Group) -> _GroupPrograms:
    mesh = member_mesh(len(group.members), config.sweep.member_axis_devices)
    key = (config.sweep.task, _static_key(group.config), len(group.members),
           tuple(d.id for d in mesh.devices.flat))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _GroupPrograms(TASKS[config.sweep.task], group.config,
                                        len(group.members), mesh)
    return _PROGRAMS[key]


def train_group(config, workdir: str, group: Group,
                on_chunk: Callable[[str, int], None] | None = None):
    """Train (or resume) one group to total_steps: (stacked state, resumed-from step).

    Resumes from the group's latest checkpoint; `on_chunk(gid, step)` runs
    after each chunk (and its checkpoint, if any): progress, or a test's interrupt.
    """
    gdir = _group_dir(workdir, group.gid)
    gcfg = group.config
    fns = _programs(config, group)
    train_data, _ = TASKS[config.sweep.task].data(config, gcfg)
    train_data = jax.device_put(train_data, fns.replicated)

    rngs = jnp.stack([jax.random.PRNGKey(m.seed) for m in group.members])
    hparams = stack([training.HParams.from_config(m.config) for m in group.members])
    manager = run_dir.checkpoint_manager(gdir, gcfg.train.max_checkpoints)
    if manager.latest_step() is None:
        state = jax.device_put(stack([fns.init(rngs[i], unstack(hparams, i))
                                      for i in range(len(group.members))]), fns.by_member)
        start = 0
    else:  # restore needs only shapes and shardings: skip the real init
        state, start = run_dir.restore_latest(manager, fns.abstract_state(rngs, hparams))

    total, per_chunk = gcfg.optim.total_steps, gcfg.train.steps_per_chunk
    if start % per_chunk and start != total:
        raise RuntimeError(f"group {group.gid}: checkpoint step {start} is not a multiple of "
                           f"train.steps_per_chunk={per_chunk}")
    status_path = os.path.join(gdir, "status.json")
    status = _read_json(status_path, {"chunks_trained": 0, "runs": 0})
    status.update(runs=status["runs"] + 1, step=start, total_steps=total)
    run_dir.write_json(status_path, status)
    metrics_path = os.path.join(gdir, "metrics.jsonl")
    n_chunks = math.ceil(total / per_chunk)
    step, truncate = start, start
    for chunk_index in range(start // per_chunk, n_chunks):
        n = min(per_chunk, total - step)
        state, metrics = fns.chunk(n)(state, train_data)
        step += n
        _append_metrics(metrics_path, step, jax.device_get(metrics), truncate)
        truncate = None
        if chunk_index == n_chunks - 1 or (chunk_index + 1) % gcfg.train.checkpoint_every_chunks == 0:
            manager.save(step, args=run_dir.ocp.args.StandardSave(state))
            manager.wait_until_finished()
        status.update(chunks_trained=status["chunks_trained"] + 1, step=step)
        run_dir.write_json(status_path, status)
        if on_chunk is not None:
            on_chunk(group.gid, step)
    manager.wait_until_finished()
    manager.close()
    return state, start


def run_group(config, workdir: str, group: Group,
              on_chunk: Callable[[str, int], None] | None = None) -> dict:
    """Train (or resume) and evaluate one group; returns its result record.
    A group whose result.json exists is not touched."""
    result_path = os.path.join(_group_dir(workdir, group.gid), "result.json")
    if os.path.exists(result_path):
        return _read_json(result_path)
    t0 = time.perf_counter()
    state, start = train_group(config, workdir, group, on_chunk)
    fns = _programs(config, group)
    _, heldout = TASKS[config.sweep.task].data(config, group.config)
    evaluations = fns.evaluate(group, state, heldout)
    members = []
    for i, (m, ev) in enumerate(zip(group.members, evaluations)):
        members.append({"member": m.index, "group": group.gid, "setting_index": m.setting_index,
                        "setting": m.setting, "seed": m.seed, "metrics": ev,
                        "steps": int(jax.device_get(state.step[i])),
                        "n_skipped_updates": int(jax.device_get(state.n_skipped[i])),
                        "ema_params_sha256": run_dir.tree_fingerprint(
                            unstack(state.ema_params, i))})
    result = {"gid": group.gid, "members": members, "resumed_from_step": start,
              "n_devices": fns.mesh.size, "wall_time_s": time.perf_counter() - t0}
    run_dir.write_json(result_path, result)  # last: its existence marks the group finished
    return result


def _run_groups_ray(config, workdir: str, groups: list[Group]) -> None:
    """Each unfinished group is one Ray Tune trial on the cluster at
    sweep.ray_address. The workdir must be on storage every node sees (trials
    write their results and checkpoints there, and resume from them), and the
    cluster's Python environment must have energyflow_jax installed."""
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise ImportError(f"sweep.ray_address={config.sweep.ray_address!r} needs Ray: "
                          "pip install 'ray[tune]' (or leave sweep.ray_address empty to "
                          "run the groups locally)") from e
    pending = [g.gid for g in groups if not group_finished(workdir, g.gid)]
    if not pending:
        return
    workdir = os.path.abspath(workdir)
    # Plain data for the trial processes (ConfigDicts with dotted keys do not pickle).
    config_dict = config.to_dict()

    def trial(params):
        cfg = config_from_dict(config_dict)
        group = {g.gid: g for g in group_members(expand(cfg))}[params["gid"]]
        result = run_group(cfg, workdir, group)
        tune.report({"gid": group.gid, "n_members": len(result["members"])})

    ray.init(address=config.sweep.ray_address, ignore_reinit_error=True)
    resources = {k: float(v) for k, v in config.sweep.ray_resources.items() if v}
    tuner = tune.Tuner(tune.with_resources(trial, resources),
                       param_space={"gid": tune.grid_search(pending)})
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} Ray trial(s) failed; first: {grid.errors[0]!r}")


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


# ----------------------------------------------------------------------------
# Results


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_fmt(v) for v in value) + ")"
    return str(value)


def summarize(config, members: list[dict]) -> dict:
    """Mean and std over seeds per setting; the best setting by sweep.metric."""
    by_setting: dict[int, list[dict]] = {}
    for m in members:
        by_setting.setdefault(m["setting_index"], []).append(m)
    names = sorted({k for m in members for k, v in m["metrics"].items()
                    if isinstance(v, (int, float))})
    rows = []
    for si in sorted(by_setting):
        ms = by_setting[si]
        row = {"setting_index": si, "setting": ms[0]["setting"],
               "seeds": [m["seed"] for m in ms], "group": ms[0]["group"]}
        for name in names:
            vals = np.asarray([m["metrics"][name] for m in ms if name in m["metrics"]], float)
            if vals.size:
                # Sample std over seeds (0 for a single seed).
                row[name] = {"mean": float(vals.mean()),
                             "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                             "n": int(vals.size)}
        rows.append(row)
    metric, mode = config.sweep.metric, config.sweep.metric_mode
    if mode not in ("max", "min"):
        raise ValueError(f"sweep.metric_mode must be 'max' or 'min', got {mode!r}")
    ranked = [r for r in rows if metric in r and math.isfinite(r[metric]["mean"])]
    best = None
    if ranked:
        pick = max if mode == "max" else min
        best = pick(ranked, key=lambda r: r[metric]["mean"])["setting_index"]
    swept = sorted({k for r in rows for k in r["setting"]})
    return {"metric": metric, "metric_mode": mode, "best_setting_index": best,
            "swept_keys": swept, "metric_names": names, "settings": rows, "members": members}


def results_markdown(summary: dict) -> str:
    keys, names = summary["swept_keys"], summary["metric_names"]
    lines = ["# Sweep results", "",
             f"{len(summary['members'])} members, {len(summary['settings'])} settings; "
             f"mean ± std over seeds; best by {summary['metric']} ({summary['metric_mode']}) "
             "marked ★.", ""]
    if "heldout_loss" in names and any(k.startswith("diffusion.") for k in keys):
        lines += ["heldout_loss is measured under each member's own noise schedule, so it "
                  "is not comparable across sigma settings.", ""]
    header = ["", *keys, "seeds", *names, "group"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary["settings"]:
        mark = "★" if r["setting_index"] == summary["best_setting_index"] else ""
        cells = [mark, *[_fmt(r["setting"].get(k, "")) for k in keys], str(len(r["seeds"]))]
        for name in names:
            cells.append(f"{r[name]['mean']:.4f} ± {r[name]['std']:.4f}" if name in r else "")
        cells.append(r["group"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(summary: dict, path: str) -> None:
    """One panel per (metric, swept key): mean ± std vs that key's value, one
    line per combination of the other swept keys."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = summary["swept_keys"] or ["setting_index"]
    names = summary["metric_names"]
    fig, axes = plt.subplots(len(names), len(keys), figsize=(4.5 * len(keys), 3.5 * len(names)),
                             squeeze=False)
    rows = summary["settings"]
    for j, key in enumerate(keys):
        def value(r, k=key):
            return r["setting_index"] if k == "setting_index" else r["setting"].get(k)
        values = [value(r) for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({_fmt(v) for v in values}) if not numeric else None
        others = [k for k in keys if k != key and k != "setting_index"]
        lines: dict[str, list[dict]] = {}
        for r in rows:
            lines.setdefault(", ".join(f"{k}={_fmt(r['setting'].get(k))}" for k in others), []).append(r)
        for i, name in enumerate(names):
            ax = axes[i, j]
            for label, rs in lines.items():
                rs = [r for r in rs if name in r]
                if not rs:
                    continue
                xs = [value(r) if numeric else labels.index(_fmt(value(r))) for r in rs]
                order = np.argsort(xs)
                ax.errorbar(np.asarray(xs, float)[order], [rs[o][name]["mean"] for o in order],
                            yerr=[rs[o][name]["std"] for o in order], marker="o", capsize=3,
                            label=label or None)
                best = [k for k, r in enumerate(rs) if r["setting_index"] == summary["best_setting_index"]]
                if best and name == summary["metric"]:
                    ax.scatter([xs[best[0]]], [rs[best[0]][name]["mean"]], s=150,
                               facecolors="none", edgecolors="red", zorder=5)
            if numeric and min(values) > 0 and max(values) / min(values) >= 10:
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
            ax.set_xlabel(key)
            ax.set_ylabel(name)
            if i == 0 and len(lines) > 1:
                ax.legend(fontsize=6)
    fig.suptitle(f"Sweep: mean ± std over seeds (best by {summary['metric']} circled)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_results(workdir: str, summary: dict) -> None:
    run_dir.write_json(os.path.join(workdir, "results.json"), summary)
    run_dir.atomic_write_text(os.path.join(workdir, "results.md"), results_markdown(summary))
    plot_results(summary, os.path.join(workdir, "results.png"))


# ----------------------------------------------------------------------------
# Entry point


def run(config, workdir: str, on_chunk: Callable[[str, int], None] | None = None) -> dict:
    """Expand, train every unfinished group, evaluate, write results.

    `python -m energyflow_jax.main --config=sweeps/sweep_toy.py --workdir=DIR`;
    re-running the same command resumes (finished groups are skipped).
    """
    t0 = time.perf_counter()
    if config.sweep.task not in TASKS:
        raise ValueError(f"unknown sweep.task {config.sweep.task!r}; known: {sorted(TASKS)}")
    members = expand(config)
    groups = group_members(members)
    os.makedirs(workdir, exist_ok=True)
    plan = {"config": config.to_dict(), "vmappable": list(VMAPPABLE),
            "groups": [{"gid": g.gid, "members": [m.index for m in g.members]} for g in groups],
            "members": [{"member": m.index, "setting_index": m.setting_index,
                         "setting": m.setting, "seed": m.seed} for m in members]}
    run_dir.write_json(os.path.join(workdir, "sweep.json"), plan)
    already = [g.gid for g in groups if group_finished(workdir, g.gid)]

    def record_state():
        run_dir.write_json(os.path.join(workdir, "sweep_state.json"), {
            "finished_groups": [g.gid for g in groups if group_finished(workdir, g.gid)],
            "pending_groups": [g.gid for g in groups if not group_finished(workdir, g.gid)]})

    if config.sweep.ray_address:
        _run_groups_ray(config, workdir, groups)
    else:
        for g in groups:
            run_group(config, workdir, g, on_chunk)
            record_state()
    record_state()
    results = [_read_json(os.path.join(_group_dir(workdir, g.gid), "result.json")) for g in groups]
    summary = summarize(config, [m for r in results for m in r["members"]])
    summary["groups"] = [{"gid": g.gid, "n_members": len(g.members),
                          "skipped_as_finished": g.gid in already,
                          "wall_time_s": r["wall_time_s"]} for g, r in zip(groups, results)]
    write_results(workdir, summary)
    best = summary["best_setting_index"]
    best_row = next((r for r in summary["settings"] if r["setting_index"] == best), None)
    report = {"results": os.path.join(workdir, "results.json"),
              "n_members": len(members), "n_groups": len(groups),
              "groups_skipped_as_finished": len(already),
              "best_setting": json.dumps(best_row["setting"]) if best_row else None,
              f"best_{summary['metric']}_mean":
                  best_row[summary["metric"]]["mean"] if best_row else None,
              "wall_time_s": time.perf_counter() - t0,
              "config": config.to_dict()}
    run_dir.write_json(os.path.join(workdir, "report.json"), report)  # what main.py points to
    return report


# ----------------------------------------------------------------------------
# Benchmark


def bench_sweep(n_members: int = 8, steps: int = 20, batch_size: int = 256,
                mlp_dims=(256, 256, 256), repeats: int = 3,
                obs_shape=(2, 39), action_shape=(16, 4)) -> dict:
    """Aggregate DSM steps/s: n_members trained in one vmapped program vs the
    same members one after another with the single-run program
    (`training.make_train_chunk`), in this process.

    Model: the energy MLP (mlp_dims, head 128, embeddings 64, spectral-norm
    head) on the published shapes (obs 2x39, chunk 16x4), batch 256. Compile
    time is excluded from both (reported separately); members differ in seed
    and learning rate.
    """
    from energyflow_jax.config import base_config

    config = base_config()
    config.model.arch = "mlp"
    config.model.mlp_dims = tuple(mlp_dims)
    config.model.head_dims = (128,)
    config.model.state_emb_dim = 64
    config.model.time_emb_dim = 64
    config.optim.warmup_steps = 10
    config.train.batch_size = batch_size
    obs_shape, action_shape = tuple(obs_shape), tuple(action_shape)
    model = EnergyFlowModel.create(config.model, obs_shape, action_shape)
    data = {"obs": jax.random.normal(jax.random.PRNGKey(0), (4096, *obs_shape)),
            "actions": jax.random.normal(jax.random.PRNGKey(1), (4096, *action_shape))}
    lrs = np.geomspace(1e-4, 1e-3, n_members)

    def hparams(i):  # fresh arrays per use: the single-run chunk donates its state
        return training.HParams.from_config(config).replace(learning_rate=jnp.float32(lrs[i]))

    rngs = [jax.random.PRNGKey(i) for i in range(n_members)]
    program = member_program(config, model)

    def timed(fn):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t

    # Vmapped: one program for all members.
    mesh = member_mesh(n_members, 1)  # one device: compare like with like
    vm_chunk = make_group_chunk(program, steps, mesh)
    vm = {"state": jax.jit(jax.vmap(program.init))(
        jnp.stack(rngs), stack([hparams(i) for i in range(n_members)]))}

    def vm_call():
        vm["state"], m = vm_chunk(vm["state"], data)
        return m

    # One after another: the single-run program, compiled once, called per member.
    tx = training.make_optimizer(config.optim)
    chunk = training.make_train_chunk(model, tx, batch_size, steps, training.make_mesh(1))
    states = [training.TrainState.create(model, tx, hparams(i), rngs[i])
              for i in range(n_members)]

    def seq_call():
        out = None
        for i in range(n_members):
            states[i], out = chunk(states[i], data)
            jax.block_until_ready(out)
        return out

    vm_first, seq_first = timed(vm_call), timed(seq_call)  # compiles
    # Interleaved repeats, median: other load on the machine hits both alike.
    vm_times, seq_times = [], []
    for _ in range(repeats):
        vm_times.append(timed(vm_call))
        seq_times.append(timed(seq_call))
    vm_s, seq_s = float(np.median(vm_times)), float(np.median(seq_times))
    total = n_members * steps
    n_params = sum(x.size for x in jax.tree.leaves(states[0].params))
    return {"model": f"mlp{tuple(mlp_dims)} energy, obs {obs_shape}, chunk {action_shape}",
            "n_params": int(n_params),
            "batch_size": batch_size, "n_members": n_members, "steps_per_member": steps,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "vmapped_steps_per_s": round(total / vm_s, 2),
            "sequential_steps_per_s": round(total / seq_s, 2),
            "speedup": round(seq_s / vm_s, 3),
            "vmapped_compile_s": round(vm_first - vm_s, 1),
            "sequential_compile_s": round(seq_first - seq_s, 1),
            "repeats": repeats}
