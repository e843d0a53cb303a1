"""Imitation on Meta-World v3 or RoboMimic: demos -> train -> evaluate -> report.

  python -m energyflow_jax.main --config=sweeps/metaworld.py --workdir=runs/mw
  python -m energyflow_jax.main --config=sweeps/metaworld.py --workdir=runs/mw_free \
      --config.model.kind=free        # the vector-field baseline, same everything else
  python -m energyflow_jax.main --config=sweeps/robomimic.py --workdir=runs/lift

What differs between the benchmarks (where demos come from, how a policy is
evaluated, which perturbation levels exist, the published numbers) is a
:class:`MetaWorld` or :class:`Robomimic` benchmark object below; training,
evaluation bookkeeping, reports and summaries are shared.

One run per (task, training seed). With one task and one seed the run lives in
--workdir itself; with `config.tasks` and/or `config.seeds` each run gets
workdir/<task>/seed<k>/ and workdir/report.json aggregates them beside the
published numbers. Re-running a command resumes training from the checkpoints
and reuses the cached demos.

Files of one run: checkpoints/ (each step holds the train state and the Policy:
`Policy.load(workdir)`), metrics.jsonl, eval_episodes.json (every rollout),
rollouts/*.png, report.json, summary.md, summary.png.
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from energyflow_jax import config as config_lib
from energyflow_jax.io import run_dir
from energyflow_jax.data import metaworld as demos
from energyflow_jax.data import robomimic, robomimic_demos, robomimic_sim
from energyflow_jax.data.windows import make_dataset, validate_episodes
from energyflow_jax.evaluation import metaworld_eval, robomimic_eval
from energyflow_jax.evaluation.episodes import make_policy, policy_rng
from energyflow_jax.evaluation.statistics import pooled_success
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.policy import as_numpy_policy
from energyflow_jax.training.loop import fit, write_report


# --------------------------------------------------------------------------- helpers


def _seeds(config) -> list[int]:
    return [int(s) for s in config.seeds] if config.seeds else [int(config.seed)]


def _requested_tasks(config) -> list[str]:
    return list(config.tasks) if config.tasks else [config.task]


def _check_eval_seeds(config) -> None:
    if not config.eval.seeds:
        raise ValueError("config.eval.seeds is empty; give at least one eval seed, e.g. (0,)")


class MetaWorld:
    """Meta-World v3: scripted-expert demos (cached .npz), eval configs disjoint from the
    demos', OOD perturbation levels, the published (v2) table."""

    name = "Meta-World v3"
    published = demos.PUBLISHED_SUCCESS
    published_note = "published numbers: Meta-World v2"
    short_name = staticmethod(demos.short_name)

    @staticmethod
    def tasks(config) -> list[str]:
        tasks = _requested_tasks(config)
        for task in tasks:  # before any work: a typo should fail in seconds, not after training
            demos.validate_task_name(task)
        return tasks

    @staticmethod
    def eval_levels(config) -> list[str]:
        """Level "0" first, then the requested OOD levels; checked before any work."""
        _check_eval_seeds(config)
        return list(metaworld_eval.evaluation_levels(config.eval.ood_levels))

    @staticmethod
    def load_demos(config, workdir: str, task: str, progress: bool) -> tuple[list[dict], dict]:
        cache_path = demos.demo_cache_path(config, workdir, task)
        episodes = demos.load_or_collect(cache_path, task, config.data.n_demos,
                                         config.data.demo_seed, max_steps=config.data.max_steps,
                                         progress=progress)
        _, provenance = demos.read_demo_cache(cache_path)
        return episodes, {"cache_path": cache_path, "provenance": provenance,
                          "rand_vecs": np.stack([ep["rand_vec"] for ep in episodes])}

    @staticmethod
    def evaluate(config, policy_fn, task: str, eval_seed: int, level: str, demo_info: dict,
                 **kwargs) -> dict:
        return metaworld_eval.evaluate(policy_fn, task, config.eval.n_episodes, int(eval_seed),
                                       perturbation=level, max_steps=config.eval.max_steps,
                                       exclude_rand_vecs=demo_info["rand_vecs"], **kwargs)


class Robomimic:
    """RoboMimic (robosuite): an official low_dim file (`data.path`) or scripted demos
    written in that format; held-out eval layouts; no perturbation levels."""

    name = "RoboMimic"
    published = robomimic.PUBLISHED_SUCCESS
    published_note = "published numbers: proficient-human datasets"
    short_name = staticmethod(str)

    @staticmethod
    def tasks(config) -> list[str]:
        tasks = _requested_tasks(config)
        for task in tasks:
            robomimic.validate_task_name(task)
            if not config.data.path and task not in robomimic_demos.EXPERT_TASKS:
                raise ValueError(f"no scripted expert for {task} (experts: "
                                 f"{', '.join(robomimic_demos.EXPERT_TASKS)}); give an official "
                                 f"file with --config.data.path=FILE.hdf5")
        if config.data.path:
            if len(tasks) > 1:
                raise ValueError("data.path holds one task's demos; give one task")
            robomimic.check_file_for_task(config.data.path, tasks[0])
        return tasks

    @staticmethod
    def eval_levels(config) -> list[str]:
        _check_eval_seeds(config)
        return ["0"]

    @staticmethod
    def load_demos(config, workdir: str, task: str, progress: bool) -> tuple[list[dict], dict]:
        if config.data.path:
            path, provenance = config.data.path, {"source": "official file"}
        else:
            cache_dir = config.data.cache_dir or os.path.join(workdir, "demos")
            path = os.path.join(cache_dir, f"{task}_n{config.data.n_demos}"
                                           f"_seed{config.data.demo_seed}.hdf5")
            robomimic_demos.load_or_collect(path, task, config.data.n_demos, config.data.demo_seed,
                                            robomimic_sim.BUDGETS[task], progress=progress,
                                            num_workers=config.data.num_workers)
            provenance = robomimic_demos.read_provenance(path)
        episodes, info = robomimic.read_low_dim(path, task, filter_key=config.data.filter_key or None)
        provenance = dict(provenance, n_episodes=len(episodes), filter_key=info["filter_key"])
        return episodes, {"cache_path": path, "provenance": provenance,
                          "env_args": info["env_args"],
                          "starts": robomimic.object_start(task, np.stack([ep["obs"][0] for ep in episodes]))}

    @staticmethod
    def evaluate(config, policy_fn, task: str, eval_seed: int, level: str, demo_info: dict,
                 **kwargs) -> dict:
        return robomimic_eval.evaluate(policy_fn, demo_info["env_args"], config.eval.n_episodes,
                                       int(eval_seed), max_steps=config.eval.max_steps or None,
                                       exclude_starts=demo_info["starts"], **kwargs)


BENCHMARKS = {"metaworld": MetaWorld, "robomimic": Robomimic}


# --------------------------------------------------------------------------- one run


def run_single(config: ml_collections.ConfigDict, workdir: str, task: str) -> dict:
    """Demos -> windows + normalizers -> fit -> evaluate EMA params -> report files."""
    bench = BENCHMARKS[config.experiment]
    run_dir.check_workdir_settings(workdir, config.to_dict())  # before collecting anything
    os.makedirs(workdir, exist_ok=True)
    t_start = time.perf_counter()
    timing = {}
    progress = bool(config.log.progress) and run_dir.is_main_process()

    t0 = time.perf_counter()
    episodes, demo_info = bench.load_demos(config, workdir, task, progress)
    obs_dim, action_dim = validate_episodes(episodes)
    timing["collect_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dataset = make_dataset(episodes, config.data.obs_horizon, config.data.pred_horizon)
    model = EnergyFlowModel.create(
        config.model, obs_shape=(config.data.obs_horizon, obs_dim),
        action_shape=(config.data.pred_horizon, action_dim))
    state, info = fit(config, workdir, model, dataset.arrays(),
                      make_policy=lambda ema_params: make_policy(
                          config, model, dataset, ema_params))
    timing["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # Gathered onto the default device: training may have replicated them over a mesh.
    policy = make_policy(config, model, dataset,
                                        jax.device_put(jax.device_get(state.ema_params)))
    # Compile once up front, at the evaluator's batch shape, so latency excludes it.
    num_envs = min(config.eval.num_envs or config.eval.n_episodes, config.eval.n_episodes)
    t_compile = time.perf_counter()
    jax.block_until_ready(policy.act(np.zeros((num_envs, *model.obs_shape)), jax.random.PRNGKey(0)))
    timing["policy_compile_s"] = time.perf_counter() - t_compile
    eval_kwargs = dict(obs_horizon=config.data.obs_horizon, exec_horizon=config.data.exec_horizon,
                       num_envs=config.eval.num_envs or None, num_workers=config.eval.num_workers,
                       progress=progress)
    levels = bench.eval_levels(config)
    results: dict[str, list[dict]] = {lv: [] for lv in levels}
    for eval_seed in config.eval.seeds:
        for level in levels:
            plot = level == "0" and eval_seed == config.eval.seeds[0]
            rng = policy_rng(config.seed, eval_seed)
            policy_fn = as_numpy_policy(policy, rng)
            results[level].append(bench.evaluate(
                config, policy_fn, task, eval_seed, level, demo_info,
                n_plot=config.eval.n_plot if plot else 0,
                n_videos=config.eval.n_videos if plot else 0,
                out_dir=os.path.join(workdir, "rollouts"), **eval_kwargs))
    timing["eval_s"] = time.perf_counter() - t0

    main = pooled_success(results["0"])
    episodes_path = os.path.join(workdir, "eval_episodes.json")
    if run_dir.is_main_process():
        run_dir.write_json(episodes_path, {lv: rs for lv, rs in results.items()})
    extra = {
        "task": task,
        "model_kind": config.model.kind,
        **main,
        "per_eval_seed": [{"seed": r["seed"], "success_rate": r["success_rate"], "ci95": list(r["ci95"]),
                           "n_episodes": r["n_episodes"]} for r in results["0"]],
        "episodes": [{"seed": r["seed"], "episode": ep["episode"], "success": ep["success"],
                      "steps": ep["steps"]} for r in results["0"] for ep in r["episodes"]],
        "episodes_path": episodes_path,
        "ood": ({lv: pooled_success(rs) for lv, rs in results.items()} if len(levels) > 1 else {}),
        "policy_latency_ms": 1e3 * sum(r["policy_time_s"] for rs in results.values() for r in rs)
        / max(1, sum(r["n_policy_calls"] for rs in results.values() for r in rs)),
        "demos": {"cache_path": demo_info["cache_path"], "provenance": demo_info["provenance"],
                  "n_windows": int(dataset.num_windows)},
        "rollout_plots": [p for r in results["0"] for p in r["plots"]],
        "rollout_videos": [v for r in results["0"] for v in r["videos"]],
        "videos_skipped": next((r["videos_skipped"] for r in results["0"] if r["videos_skipped"]), None),
        "timing": timing,
    }
    report = write_report(workdir, config, state, info, time.perf_counter() - t_start, **extra)
    if run_dir.is_main_process():
        run_dir.atomic_write_text(os.path.join(workdir, "summary.md"), run_summary_markdown(report))
        plot_summary(os.path.join(workdir, "summary.png"), report, run_dir.read_metrics(workdir))
    return report


# --------------------------------------------------------------------------- summaries


def _pct(rate: float) -> str:
    return f"{100 * rate:.1f}"


def run_summary_markdown(report: dict) -> str:
    lines = [f"# {report['task']} ({report['model_kind']})", "",
             "| perturbation | success % | 95% CI (Wilson) | episodes |", "|---|---|---|---|"]
    table = report["ood"] or {"0": report}
    for level, r in table.items():
        lines.append(f"| {level} | {_pct(r['success_rate'])} | "
                     f"[{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}] | {r['n_episodes']} |")
    t = report["timing"]
    final = report.get("final_metrics") or {}
    lines += ["", f"- train steps: {report['steps']}, parameters: {report['n_params']}, "
                  f"final loss: {final.get('loss', float('nan')):.4f}",
              f"- wall time: {report['wall_time_s']:.0f} s (collect {t['collect_s']:.0f} s, "
              f"train {t['train_s']:.0f} s, eval {t['eval_s']:.0f} s)",
              f"- policy latency: {report['policy_latency_ms']:.1f} ms per batched call",
              f"- demos: {report['demos']['provenance'].get('n_episodes')} "
              f"(expert success {report['demos']['provenance'].get('expert_success_rate')})"]
    if report.get("rollout_videos"):
        lines.append("- rollout videos: " + ", ".join(
            f"rollouts/{os.path.basename(v['path'])}" for v in report["rollout_videos"]))
    elif report.get("videos_skipped"):
        lines.append(f"- no rollout videos: {report['videos_skipped']}")
    return "\n".join(lines + [""])


def plot_summary(path: str, report: dict, metrics: list[dict]) -> None:
    """Success (with Wilson CI) per perturbation level beside the training loss curve."""
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left alone

    table = report["ood"] or {"0": report}
    fig = Figure(figsize=(10, 4))
    (left, right) = fig.subplots(1, 2)
    levels = list(table)
    rates = np.array([table[lv]["success_rate"] for lv in levels])
    lows = np.array([table[lv]["ci95"][0] for lv in levels])
    highs = np.array([table[lv]["ci95"][1] for lv in levels])
    left.bar(levels, 100 * rates, yerr=100 * np.stack([rates - lows, highs - rates]), capsize=4,
             color="tab:blue")
    left.set(ylim=(0, 105), xlabel="perturbation level", ylabel="success %",
             title=f"{report['task']} ({report['n_episodes']} episodes at level 0)")
    if metrics:
        right.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], color="tab:orange")
        right.set_yscale("log")
    right.set(xlabel="step", ylabel="DSM loss", title="training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def aggregate_markdown(rows: list[dict], kind: str, bench=MetaWorld) -> str:
    """Mean success over training seeds per task, beside the published numbers."""
    lines = [f"# {bench.name}, model.kind={kind} ({bench.published_note})", "",
             "| task | ours % (mean over seeds) | seeds | per seed % | EnergyFlow (paper) | "
             "Diffusion Policy (paper) |", "|---|---|---|---|---|---|"]
    ours_all, paper_all = [], []
    for row in rows:
        short = bench.short_name(row["task"])
        paper = {name: table.get(short) for name, table in bench.published.items()}
        ours_all.append(row["mean_success_rate"])
        if paper["EnergyFlow"] is not None:
            paper_all.append(paper)
        per_seed = ", ".join(_pct(r) for r in row["per_seed_success_rate"])
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {short} | {_pct(row['mean_success_rate'])} | {len(row['per_seed_success_rate'])}"
                     f" | {per_seed} | {fmt(paper['EnergyFlow'])} | {fmt(paper['Diffusion Policy'])} |")
    if len(rows) > 1:
        avg = lambda name: (f"{np.mean([p[name] for p in paper_all]):.1f}"  # noqa: E731
                            if len(paper_all) == len(rows) else "-")
        lines.append(f"| avg | {_pct(float(np.mean(ours_all)))} | | | {avg('EnergyFlow')} | "
                     f"{avg('Diffusion Policy')} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point


def check(config: ml_collections.ConfigDict) -> list[str]:
    """Everything that can be refused before any work: values, tasks, eval levels and
    (RoboMimic) the data file; returns the tasks. Raises ValueError (or
    FileNotFoundError) naming the problem."""
    config_lib.validate(config)
    bench = BENCHMARKS[config.experiment]
    bench.eval_levels(config)
    return bench.tasks(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The CLI entry: every (task, training seed) run, then the aggregate table."""
    tasks = check(config)
    bench = BENCHMARKS[config.experiment]
    seeds = _seeds(config)
    if len(tasks) == 1 and len(seeds) == 1:
        with config.unlocked():
            config.seed = seeds[0]
        report = run_single(config, workdir, tasks[0])
        print(run_summary_markdown(report))
        return report

    t0 = time.perf_counter()
    rows = []
    for task in tasks:
        reports = []
        for seed in seeds:
            run_config = ml_collections.ConfigDict(config.to_dict())  # per-run copy
            run_config.seed = seed
            # One demo cache per task, shared by its training seeds.
            run_config.data.cache_dir = config.data.cache_dir or os.path.join(workdir, "demos")
            run_config.lock()
            reports.append(run_single(run_config, os.path.join(workdir, task, f"seed{seed}"),
                                      task))
        rates = [r["success_rate"] for r in reports]
        rows.append({"task": task, "mean_success_rate": float(np.mean(rates)),
                     "per_seed_success_rate": rates,
                     "reports": [os.path.join(task, f"seed{s}", "report.json") for s in seeds]})
    markdown = aggregate_markdown(rows, config.model.kind, bench)
    aggregate = {"config": config.to_dict(), "tasks": rows,
                 "mean_success_rate": float(np.mean([r["mean_success_rate"] for r in rows])),
                 "published_success": bench.published,
                 "wall_time_s": time.perf_counter() - t0}
    if run_dir.is_main_process():
        run_dir.write_json(os.path.join(workdir, "report.json"), aggregate)
        run_dir.atomic_write_text(os.path.join(workdir, "summary.md"), markdown)
    print(markdown)
    return aggregate
