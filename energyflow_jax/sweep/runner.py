"""Running a sweep: every group trained (or resumed) and evaluated, then the results.

Each group (see sweep/grid.py) is trained by `training.loop.fit` with a member
axis, then all its members are scored together by the sweep task
(sweep/tasks.py). Groups run one after another, or as Ray Tune trials when
`sweep.ray_address` names a cluster (each trial asks for `sweep.ray_resources`,
GPUs included).

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

import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax

from energyflow_jax import config as config_lib
from energyflow_jax.io import run_dir
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.reporting.sweep import summarize, write_results
from energyflow_jax.sweep.grid import (VMAPPABLE, Group, config_from_dict, expand,
                                       group_members)
from energyflow_jax.sweep.compare import compare_kinds
from energyflow_jax.sweep.tasks import TASKS
from energyflow_jax.training import unstack
from energyflow_jax.training.loop import MemberRun, fit


def _group_dir(workdir: str, gid: str) -> str:
    return os.path.join(os.path.abspath(workdir), "groups", gid)


def group_finished(workdir: str, gid: str) -> bool:
    return os.path.exists(os.path.join(_group_dir(workdir, gid), "result.json"))


class TrainedGroup(NamedTuple):
    state: Any               # TrainState stacked along the member axis
    resumed_from_step: int
    model: EnergyFlowModel
    info: dict               # fit's info
    context: Any             # the task's evaluation context (held-out data, normalizers)


def train_group(config, workdir: str, group: Group,
                on_chunk: Callable[[str, int], None] | None = None) -> TrainedGroup:
    """Train (or resume) one group to total_steps with the one run loop.
    `on_chunk(gid, step)` runs after each chunk."""
    task = TASKS[config.sweep.task]
    task.check(config, group)
    gcfg = group.config
    model = EnergyFlowModel.create(gcfg.model, task.obs_shape(gcfg), task.action_shape(gcfg))
    train_data, context = task.data(config, gcfg, workdir)
    state, info = fit(gcfg, _group_dir(workdir, group.gid), model, train_data,
                      members=[MemberRun(m.config, m.seed) for m in group.members],
                      member_devices=config.sweep.member_axis_devices,
                      on_chunk=None if on_chunk is None else lambda step: on_chunk(group.gid, step))
    return TrainedGroup(state, info["resumed_from_step"], model, info, context)


def run_group(config, workdir: str, group: Group,
              on_chunk: Callable[[str, int], None] | None = None) -> dict:
    """Train (or resume) and evaluate one group; returns its result record.
    A group whose result.json exists is not touched."""
    result_path = os.path.join(_group_dir(workdir, group.gid), "result.json")
    if os.path.exists(result_path):
        return run_dir.read_json(result_path)
    t0 = time.perf_counter()
    trained = train_group(config, workdir, group, on_chunk)
    state, start = trained.state, trained.resumed_from_step
    evaluations = TASKS[config.sweep.task].evaluate(config, workdir, group, trained.model, state,
                                                    trained.context)
    members = []
    for i, (m, ev) in enumerate(zip(group.members, evaluations)):
        members.append({"member": m.index, "group": group.gid, "setting_index": m.setting_index,
                        "setting": m.setting, "seed": m.seed, "metrics": ev,
                        "steps": int(jax.device_get(state.step[i])),
                        "n_skipped_updates": int(jax.device_get(state.n_skipped[i])),
                        "ema_params_sha256": run_dir.tree_fingerprint(
                            unstack(state.ema_params, i))})
    result = {"gid": group.gid, "members": members, "resumed_from_step": start,
              "n_devices": len(trained.info["devices"]), "wall_time_s": time.perf_counter() - t0}
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


def run(config, workdir: str, on_chunk: Callable[[str, int], None] | None = None) -> dict:
    """Expand, train every unfinished group, evaluate, write results.

    `python -m energyflow_jax.main --config=sweeps/sweep_toy.py --workdir=DIR`;
    re-running the same command resumes (finished groups are skipped).
    """
    config_lib.validate(config)
    t0 = time.perf_counter()
    if config.sweep.task not in TASKS:
        raise ValueError(f"unknown sweep.task {config.sweep.task!r}; known: {sorted(TASKS)}")
    members = expand(config)
    groups = group_members(members)
    for g in groups:  # what a group cannot do fails before any group trains
        TASKS[config.sweep.task].check(config, g)
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
    results = [run_dir.read_json(os.path.join(_group_dir(workdir, g.gid), "result.json")) for g in groups]
    summary = summarize(config, [m for r in results for m in r["members"]])
    published = getattr(TASKS[config.sweep.task], "published", None)
    summary["published"] = published(summary) if published else None
    summary["kind_comparison"] = compare_kinds(summary)
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
