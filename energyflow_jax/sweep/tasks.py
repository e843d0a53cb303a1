"""What a sweep trains on and how its members are scored, per task."""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from energyflow_jax import training
from energyflow_jax.data import metaworld as demos
from energyflow_jax.data import toy
from energyflow_jax.data.windows import make_dataset
from energyflow_jax.envs.workers import make_batched_env
from energyflow_jax.evaluation import metaworld_eval
from energyflow_jax.evaluation.episodes import make_policy, policy_rng
from energyflow_jax.evaluation.rollout import rollout
from energyflow_jax.evaluation.statistics import pooled_success
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.objectives import dsm
from energyflow_jax.policy import act_stacked
from energyflow_jax.sweep.grid import Group


_toy_dataset = jax.jit(toy.make_dataset, static_argnums=1)  # one compile, not one per op


class ToyTask:
    """The toy task (energyflow_jax.data.toy): known energy, 2-D states and actions.

    A sweep task gives the model's shapes for a group's config, the group's
    training data and an evaluation context, and scores every member of a
    trained group at once.
    """

    @staticmethod
    def obs_shape(group_config) -> tuple:
        return (1, 2)

    @staticmethod
    def action_shape(group_config) -> tuple:
        return (1, 2)

    @staticmethod
    def check(config, group: Group) -> None:
        """Every toy group can be trained and scored."""

    @staticmethod
    def data(config, group_config, workdir: str) -> tuple[dict, dict]:
        # Data from the sweep's base seed, so members differ only in what they
        # set and in their training seed; the training set's size is the
        # group's (a grid may set toy.n_samples), the held-out set is shared.
        make = _toy_dataset
        train = make(jax.random.PRNGKey(10_000 + config.seed), group_config.toy.n_samples)
        heldout = make(jax.random.PRNGKey(20_000 + config.seed), config.sweep.heldout_samples)
        return train, heldout

    @staticmethod
    def evaluate(config, workdir: str, group: Group, model: EnergyFlowModel,
                 state: training.TrainState, heldout: dict) -> list[dict]:
        return ToyTask.make_evaluate(model)(group, state, heldout)

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
                    params = training.unstack(state.ema_params, i)
                    schedule = dsm.VESchedule.from_config(m.config.diffusion)
                    report = toy.ranking_report(
                        lambda a, s, t: energy(params, a, s, t), schedule,
                        jax.random.PRNGKey(123), (m.config.diffusion.gamma, 0.3, 0.6))
                    metrics["toy_spearman"] = report["spearman_mean"]
                    metrics["toy_ranking"] = report
                out.append(metrics)
            return out

        return evaluate



class MetaWorldTask:
    """Meta-World imitation (sweeps/sweep_metaworld.py): the main job's demos and windows,
    and every member of a group evaluated together on the same held-out layouts."""

    @staticmethod
    def obs_shape(group_config) -> tuple:
        return (group_config.data.obs_horizon, demos.OBS_DIM)

    @staticmethod
    def action_shape(group_config) -> tuple:
        return (group_config.data.pred_horizon, demos.ACTION_DIM)

    @staticmethod
    def check(config, group: Group) -> None:
        """Before training: what joint evaluation cannot do, refused with the reason."""
        gcfg = group.config
        demos.validate_task_name(gcfg.task)  # a grid over "task" is checked before any demo
        if not gcfg.eval.seeds:
            raise ValueError("config.eval.seeds is empty; give at least one eval seed, e.g. (0,)")
        MetaWorldTask.levels(gcfg)  # an unknown OOD level fails before any training
        if gcfg.eval.num_envs and gcfg.eval.num_envs < gcfg.eval.n_episodes:
            raise ValueError("a Meta-World sweep steps every episode of every member in one "
                             "wave (so member m's keys are its single run's); leave "
                             "eval.num_envs at 0")
        schedules = {(m.config.diffusion.sigma_min, m.config.diffusion.sigma_max)
                     for m in group.members}
        if len(schedules) > 1:
            raise ValueError("members of a Meta-World sweep group must share the noise "
                             f"schedule (its sampler is compiled once): got {sorted(schedules)}")

    @staticmethod
    def data(config, group_config, workdir: str) -> tuple[dict, dict]:
        task = demos.validate_task_name(group_config.task)  # "task" may be a swept key
        episodes = demos.load_or_collect(
            demos.demo_cache_path(group_config, workdir, task), task, group_config.data.n_demos,
            group_config.data.demo_seed, max_steps=group_config.data.max_steps)
        dataset = make_dataset(episodes, group_config.data.obs_horizon,
                               group_config.data.pred_horizon)
        return dataset.arrays(), {"dataset": dataset, "task": task,
                                  "demo_rand_vecs": np.stack([ep["rand_vec"] for ep in episodes])}

    @staticmethod
    def levels(group_config) -> dict:
        """{name: perturbation}: level "0" first, then eval.ood_levels (names or metres)."""
        return metaworld_eval.evaluation_levels(group_config.eval.ood_levels)

    @staticmethod
    def evaluate(config, workdir: str, group: Group, model: EnergyFlowModel,
                 state: training.TrainState, context: dict) -> list[dict]:
        """Success of every member's EMA policy, pooled over config.eval.seeds, at level 0
        and at each eval.ood_levels perturbation of the same layouts.

        All members x episodes step together, and each replan is one sampler call
        for all of them (`policy.act_stacked`). Member m samples with the keys a
        single run of its seed uses (fold_in(PRNGKey(seed), 1000 + eval seed), then
        the call index), so its level-0 episodes match that run's up to float rounding.
        Per member: level 0's pooled success; with OOD levels also `success_rate_<level>`
        and, per level, every episode's success in layout order (`episode_success`), so
        members of two settings with the same seed can be compared episode by episode.
        """
        gcfg, dataset, task = group.config, context["dataset"], context["task"]
        n_members, n = len(group.members), gcfg.eval.n_episodes
        params = jax.device_put(jax.device_get(state.ema_params))
        policy = make_policy(gcfg, model, dataset, params)
        seeds = [m.seed for m in group.members]
        levels = MetaWorldTask.levels(gcfg)
        per_level = {lv: [[] for _ in group.members] for lv in levels}
        episodes = {lv: [[] for _ in group.members] for lv in levels}
        for eval_seed in gcfg.eval.seeds:
            for level, perturbation in levels.items():
                spec = metaworld_eval.eval_env_spec(task, n, int(eval_seed), gcfg.eval.max_steps,
                                                    perturbation)
                rand_vecs = np.stack([demos.config_rand_vec(c) for c in spec.configs])
                demos.assert_configs_disjoint(rand_vecs, context["demo_rand_vecs"])
                # Layout id m * n + i is member m's episode i on eval config i.
                spec = dataclasses.replace(spec, configs=spec.configs * n_members)
                success = MetaWorldTask._rollout_members(gcfg, policy, spec, seeds, eval_seed)
                for m in range(n_members):
                    per_level[level][m].append({
                        "seed": int(eval_seed), "n_episodes": n,
                        "n_successes": int(success[m].sum()),
                        "success_rate": float(success[m].mean())})
                    episodes[level][m] += [int(x) for x in success[m]]
        out = []
        for m in range(n_members):
            record = {**pooled_success(per_level["0"][m]), "per_eval_seed": per_level["0"][m]}
            if len(levels) > 1:
                for level in list(levels)[1:]:
                    record[f"success_rate_{level}"] = pooled_success(per_level[level][m])["success_rate"]
                record["episode_success"] = {lv: episodes[lv][m] for lv in levels}
                record["levels"] = list(levels)  # their order: JSON files sort the dict's keys
            out.append(record)
        return out

    @staticmethod
    def _rollout_members(gcfg, policy, spec, seeds: list[int], eval_seed: int) -> np.ndarray:
        """(members, episodes) successes of one wave: replan i is call i for every member."""
        n_members = len(seeds)
        base = jnp.stack([policy_rng(s, eval_seed) for s in seeds])
        calls = itertools.count()

        def act(obs_history):
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(base, next(calls))
            obs = np.asarray(obs_history).reshape(n_members, -1, *obs_history.shape[1:])
            chunks = act_stacked(policy, obs, keys)
            return np.asarray(chunks).reshape(-1, *chunks.shape[2:])

        num_envs = len(spec.configs)
        env = make_batched_env(spec, num_envs, gcfg.eval.num_workers)
        try:
            out = rollout(env, act, list(range(num_envs)), gcfg.data.obs_horizon,
                          gcfg.data.exec_horizon, gcfg.eval.max_steps)
        finally:
            env.close()
        return out.success.reshape(n_members, -1)

    @staticmethod
    def published(summary: dict) -> dict | None:
        """With "task" swept: per task, our mean success % over seeds beside the paper's
        EnergyFlow and Diffusion Policy rows (Meta-World v2), for the results table."""
        if "task" not in summary["swept_keys"]:
            return None
        tasks = [r["setting"]["task"] for r in summary["settings"]]
        ours = {demos.short_name(r["setting"]["task"]): (100 * r["success_rate"]["mean"],
                                                         100 * r["success_rate"]["std"])
                for r in summary["settings"] if "success_rate" in r}
        return {"columns": [demos.short_name(t) for t in tasks], "ours": ours,
                "published": demos.PUBLISHED_SUCCESS,
                "source": "the paper, mean over 3 seeds, Meta-World v2 (we run v3)"}


TASKS = {"toy": ToyTask, "metaworld": MetaWorldTask}
