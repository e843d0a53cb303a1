"""SAC on Meta-World v3 with a chosen reward: sparse, dense, energy (raw / centered,
optionally + sparse) or adversarial. The energy doubles as an RL reward.

  python -m energyflow_jax.main --config=sweeps/sac.py --workdir=runs/sac
  python -m energyflow_jax.main --config=sweeps/sac.py --workdir=runs/sac \
      --config.reward.kinds="('sparse','centered','centered+sparse')"

Steps of one invocation:
  1. validate the task and reward kinds, read the env's obs/action dims;
  2. load (or collect, cached) scripted-expert demos; the last `data.n_heldout` demos are
     held out for the reward-quality report, the rest train the reward model;
  3. energy kinds: train (or resume) the reward model in <reward.model_dir or
     workdir/reward_model> with pred_horizon = 1 (see rewards/energy.py), then check its shapes
     against the env (ValueError) before any SAC training;
  4. reward_quality.json: each reward, without RL (expert vs perturbed / random actions on
     held-out demo states; correlation with the env's dense reward along held-out expert
     and random-policy trajectories);
  5. for each kind and seed, `train_sac` in workdir/<kind>/seed<k> (resumes from its
     checkpoints), then results.json, results.md, curves.png and report.json.
"""
from __future__ import annotations

import functools
import json
import os
import time

import gymnasium as gym
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from energyflow_jax import config as config_lib
from energyflow_jax.io import run_dir
from energyflow_jax.io.run_dir import read_metrics  # run_seed's run_dir is a path
from energyflow_jax.rewards import energy as rewards
from energyflow_jax.data import metaworld as demos
from energyflow_jax.data.windows import make_dataset, make_windows
from energyflow_jax.normalizer import Normalizer
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.rl.sac.loop import train_sac
from energyflow_jax.training.loop import fit

ENERGY_KINDS = ("raw", "centered", "raw+sparse", "centered+sparse")
SPEC_FILE = "spec.json"


# --------------------------------------------------------------------------- config


def reward_kinds(config) -> list[str]:
    kinds = list(config.reward.kinds) if config.reward.kinds else [config.reward.kind]
    for kind in kinds:  # before any work: a typo should fail in seconds
        if kind not in rewards.REWARD_KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; expected one of {rewards.REWARD_KINDS}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"config.reward.kinds has duplicates: {kinds}")
    return kinds


def seeds_of(config) -> list[int]:
    return [int(s) for s in config.seeds] if config.seeds else [int(config.sac.seed)]


def make_env_fn(task: str, seed: int, max_episode_steps: int):
    """A gymnasium Meta-World MT1 env; its 50 task configurations are drawn from `seed`."""
    def env_fn() -> gym.Env:
        import metaworld  # noqa: F401  (registers the Meta-World/* envs)

        return gym.make("Meta-World/MT1", env_name=task, seed=seed,
                        max_episode_steps=max_episode_steps, disable_env_checker=True)
    return env_fn


def env_dims(task: str) -> tuple[int, int]:
    env = make_env_fn(task, 0, 1)()
    dims = (int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape)))
    env.close()
    return dims


# The reward model's standardization, kept beside its checkpoints.
NORMALIZERS_FILE = "normalizers.npz"


def save_normalizers(path: str, obs_normalizer: Normalizer, action_normalizer: Normalizer) -> None:
    """Write both normalizers to one .npz atomically (temp file + rename)."""
    arrays = {"obs_mean": obs_normalizer.mean, "obs_std": obs_normalizer.std,
              "action_mean": action_normalizer.mean, "action_std": action_normalizer.std}
    run_dir.atomic_write(path, lambda f: np.savez(
        f, **{k: np.asarray(v, np.float32) for k, v in arrays.items()}))


def load_normalizers(path: str) -> tuple[Normalizer, Normalizer]:
    """(obs_normalizer, action_normalizer) saved by :func:`save_normalizers`."""
    with np.load(path, allow_pickle=False) as npz:
        missing = {"obs_mean", "obs_std", "action_mean", "action_std"} - set(npz.files)
        if missing:
            raise ValueError(f"{path} is not a normalizer file: missing {sorted(missing)}")
        obs = Normalizer(mean=jnp.asarray(npz["obs_mean"]), std=jnp.asarray(npz["obs_std"]))
        action = Normalizer(mean=jnp.asarray(npz["action_mean"]), std=jnp.asarray(npz["action_std"]))
    return obs, action



# --------------------------------------------------------------------------- reward model


def reward_model_dir(config, workdir: str) -> str:
    return config.reward.model_dir or os.path.join(workdir, "reward_model")


def reward_model_shapes(config, obs_dim: int, act_dim: int) -> tuple[tuple, tuple]:
    """(obs_shape, action_shape) of the reward model for this env: one action per chunk."""
    if config.reward_model.data.pred_horizon != 1:
        raise ValueError("reward_model.data.pred_horizon must be 1: SAC scores one action at "
                         f"a time (got {config.reward_model.data.pred_horizon})")
    return (config.reward_model.data.obs_horizon, obs_dim), (1, act_dim)


def check_saved_spec(model_dir: str, task: str, obs_shape: tuple, action_shape: tuple) -> None:
    """Refuses a reward model saved for another task or other shapes (another obs_horizon)."""
    path = os.path.join(model_dir, SPEC_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        spec = json.load(f)
    saved = (tuple(spec["obs_shape"]), tuple(spec["action_shape"]))
    if saved != (tuple(obs_shape), tuple(action_shape)):
        raise ValueError(
            f"the reward model in {model_dir} was trained for obs_shape={saved[0]}, "
            f"action_shape={saved[1]} (obs_horizon, dim), but this run needs "
            f"obs_shape={tuple(obs_shape)}, action_shape={tuple(action_shape)}; use another "
            "reward.model_dir (or --workdir) or the reward model's obs_horizon")
    if spec.get("task", task) != task:  # Meta-World tasks share shapes: compare names
        raise ValueError(f"the reward model in {model_dir} was trained on {spec['task']}, but "
                         f"this run is {task}; use another reward.model_dir (or --workdir)")


def train_reward_model(config, model_dir: str, episodes: list[dict], task: str):
    """fit() (or resume) the pred_horizon = 1 energy model; (model, ema_params, obs_n, act_n)."""
    rm = config.reward_model
    dataset = make_dataset(episodes, rm.data.obs_horizon, 1)
    obs_shape = tuple(dataset.obs.shape[1:])
    action_shape = tuple(dataset.actions.shape[1:])
    check_saved_spec(model_dir, task, obs_shape, action_shape)
    normalizer_path = os.path.join(model_dir, NORMALIZERS_FILE)
    if os.path.exists(normalizer_path):  # a resumed / shared model keeps its statistics
        obs_norm, act_norm = load_normalizers(normalizer_path)
        dataset = make_dataset(episodes, rm.data.obs_horizon, 1, obs_normalizer=obs_norm,
                               action_normalizer=act_norm)
    elif run_dir.is_main_process():
        save_normalizers(normalizer_path, dataset.obs_normalizer, dataset.action_normalizer)
        run_dir.write_json(os.path.join(model_dir, SPEC_FILE),
                          {"task": task, "obs_shape": obs_shape, "action_shape": action_shape,
                           "n_train_episodes": len(episodes)})
    model = EnergyFlowModel.create(rm.model, obs_shape=obs_shape, action_shape=action_shape)
    state, info = fit(rm, model_dir, model, dataset.arrays())
    params = jax.device_put(jax.device_get(state.ema_params))
    return model, params, dataset.obs_normalizer, dataset.action_normalizer, info


# --------------------------------------------------------------------------- reward inputs


def expert_reward_inputs(episodes: list[dict], obs_horizon: int) -> tuple[rewards.RewardInputs,
                                                                          np.ndarray]:
    """Raw demo steps as RewardInputs (success on an episode's final, successful step)."""
    obs, _ = make_windows(episodes, obs_horizon, 1)
    actions = np.concatenate([ep["actions"] for ep in episodes]).astype(np.float32)
    env_reward = np.concatenate([ep["rewards"] for ep in episodes]).astype(np.float32)
    success = np.concatenate([
        np.r_[np.zeros(len(ep["actions"]) - 1), float(ep["success"])] for ep in episodes])
    ids = np.concatenate([np.full(len(ep["actions"]), i) for i, ep in enumerate(episodes)])
    return rewards.RewardInputs(obs=np.asarray(obs, np.float32), action=actions,
                                env_reward=env_reward, success=success.astype(np.float32)), ids


def random_policy_inputs(task: str, n_episodes: int, n_steps: int, obs_horizon: int,
                         seed: int) -> tuple[rewards.RewardInputs, np.ndarray]:
    """Uniform-random-action trajectories with the observation history the reward reads."""
    rng = np.random.default_rng(seed)
    env = make_env_fn(task, seed, n_steps)()
    episodes, env_rewards, successes, ids = [], [], [], []
    for episode in range(n_episodes):
        obs, _ = env.reset()
        ep_obs, ep_actions = [], []
        for _ in range(n_steps):
            action = rng.uniform(-1.0, 1.0, env.action_space.shape).astype(np.float32)
            ep_obs.append(np.asarray(obs, np.float32))
            ep_actions.append(action)
            obs, reward, terminated, truncated, info = env.step(action)
            env_rewards.append(reward)
            successes.append(float(info.get("success", 0.0)))
            ids.append(episode)
            if terminated or truncated:
                break
        episodes.append({"obs": np.stack(ep_obs), "actions": np.stack(ep_actions)})
    env.close()
    obs_windows, _ = make_windows(episodes, obs_horizon, 1)  # the same history as the demos
    return rewards.RewardInputs(
        obs=np.asarray(obs_windows, np.float32),
        action=np.concatenate([ep["actions"] for ep in episodes]),
        env_reward=np.asarray(env_rewards, np.float32),
        success=np.asarray(successes, np.float32)), np.asarray(ids)


def build_reward(kind: str, config, *, obs_dim: int, act_dim: int, energy=None,
                 expert_inputs: rewards.RewardInputs | None = None, energy_scale: float = 1.0):
    """The reward object for `kind`; `energy` = (model, params, obs_norm, act_norm)."""
    kwargs = dict(scale=energy_scale, obs_horizon=config.reward_model.data.obs_horizon, obs_dim=obs_dim,
                  act_dim=act_dim, gamma=config.reward.gamma,
                  num_reference=config.reward.num_reference,
                  reference_rng=jax.random.PRNGKey(config.reward.reference_seed),
                  success_weight=config.reward.success_weight)
    if kind in ENERGY_KINDS:
        model, params, obs_norm, act_norm = energy
        kwargs.update(energy_fn=functools.partial(model.energy, params),
                      pred_horizon=model.action_shape[0],
                      obs_horizon=model.obs_shape[0], obs_dim=model.obs_shape[1],
                      act_dim=model.action_shape[1],
                      normalize_obs=obs_norm.normalize, normalize_action=act_norm.normalize)
    if kind == "adversarial":
        kwargs.update(expert_inputs=expert_inputs, adversarial_config=config.reward.adversarial)
    return rewards.make_reward_fn(kind, **kwargs)


def auto_energy_scale(raw_reward, expert: rewards.RewardInputs, num_states: int,
                      seed: int) -> float:
    """1 / mean over expert states of [r_raw(expert action) - r_raw(uniform random action)].

    Scaled so, an expert action earns about 1 more than a random one in the same state
    (the same gap for raw and centered: the centering term cancels within a state), which
    puts energy rewards on the scale of the +1 success bonus instead of thousands.
    """
    key_states, key_actions = jax.random.split(jax.random.PRNGKey(seed))
    n = expert.action.shape[0]
    idx = np.asarray(jax.random.choice(key_states, n, (min(num_states, n),), replace=False))
    subset = jax.tree.map(lambda x: jnp.asarray(x)[idx], expert)
    alternatives = rewards.random_actions(key_actions, len(idx), 4, subset.action.shape[1])
    q = rewards.reward_quality(raw_reward, subset, alternatives)
    gap = q["expert_reward_mean"] - q["alternative_reward_mean"]
    if not np.isfinite(gap) or gap <= 0:
        raise ValueError(f"the reward model does not prefer expert actions (gap {gap}); "
                         "train it longer before using it as a reward")
    return 1.0 / gap


def quality_report(reward_objects: dict, held_out: rewards.RewardInputs, held_out_ids,
                   random_traj: rewards.RewardInputs, random_ids, config) -> dict:
    """reward_quality for every fixed reward: ranking vs perturbed / random actions on held-out
    expert states; correlation with the dense reward along expert / random trajectories."""
    q = config.quality
    key = jax.random.PRNGKey(q.seed)
    perturb_key, random_key = jax.random.split(key)
    action = jnp.asarray(held_out.action)
    alternatives = {
        "perturbed": rewards.perturb_actions(perturb_key, action, q.n_alternatives, q.noise_scale),
        "random": rewards.random_actions(random_key, action.shape[0], q.n_alternatives,
                                         action.shape[1]),
    }
    out = {}
    for kind, reward in reward_objects.items():
        if isinstance(reward, rewards.LearnedReward):
            continue  # learned during RL: nothing fixed to measure beforehand
        expert_traj = rewards.reward_quality(reward, held_out, alternatives["perturbed"],
                                             held_out, held_out_ids)
        random_rank = rewards.reward_quality(reward, held_out, alternatives["random"],
                                             random_traj, random_ids)
        out[kind] = {
            "ranking_accuracy_vs_perturbed": expert_traj["ranking_accuracy"],
            "ranking_accuracy_vs_random": random_rank["ranking_accuracy"],
            "expert_reward_mean": expert_traj["expert_reward_mean"],
            "perturbed_reward_mean": expert_traj["alternative_reward_mean"],
            "random_reward_mean": random_rank["alternative_reward_mean"],
            "expert_traj": {k: expert_traj[k] for k in ("pearson", "spearman",
                                                        "spearman_within_episode")},
            "random_traj": {k: random_rank[k] for k in ("pearson", "spearman",
                                                        "spearman_within_episode")},
        }
    return {"n_heldout_steps": int(action.shape[0]), "n_random_steps": int(len(random_ids)),
            "noise_scale": q.noise_scale, "n_alternatives": q.n_alternatives,
            "note": "sparse/dense score the recorded transition only (not a counterfactual "
                    "action), so their ranking accuracy is 0.5 by construction; null = "
                    "undefined correlation (a constant reward)",
            "kinds": _nan_to_none(out)}


def _nan_to_none(tree):
    """NaN (e.g. the correlation of a constant reward) -> None, so the file is strict JSON."""
    if isinstance(tree, dict):
        return {k: _nan_to_none(v) for k, v in tree.items()}
    return None if isinstance(tree, float) and not np.isfinite(tree) else tree


# --------------------------------------------------------------------------- results


def eval_curve(metrics: list[dict]) -> dict[str, list[float]]:
    """(step, eval/success, eval/return) of one run's metrics.jsonl lines that have them."""
    rows = [m for m in metrics if "eval/success" in m]
    return {"step": [int(m["step"]) for m in rows],
            "success": [float(m["eval/success"]) for m in rows],
            "return": [float(m["eval/return"]) for m in rows]}


def aggregate_curves(curves: list[dict]) -> dict[str, list[float]]:
    """Mean and std over seeds at the eval steps every seed reached."""
    steps = sorted(set.intersection(*(set(c["step"]) for c in curves))) if curves else []
    out = {"step": steps}
    for name in ("success", "return"):
        values = np.array([[dict(zip(c["step"], c[name]))[s] for s in steps] for c in curves])
        out[f"{name}_mean"] = values.mean(0).tolist() if steps else []
        out[f"{name}_std"] = values.std(0).tolist() if steps else []
    return out


def summarize_variant(per_seed: list[dict]) -> dict[str, float]:
    """Final success / return mean +- std over seeds (std: population, ddof = 0)."""
    success = np.array([r["final_success"] for r in per_seed])
    ret = np.array([r["final_return"] for r in per_seed])
    return {"success_mean": float(success.mean()), "success_std": float(success.std()),
            "return_mean": float(ret.mean()), "return_std": float(ret.std()),
            "n_seeds": len(per_seed)}


def results_markdown(results: dict) -> str:
    lines = [f"# SAC on {results['task']} ({results['env_steps']} env steps, "
             f"{len(results['seeds'])} seeds, {results['eval_episodes']} eval episodes each)", "",
             "| reward | success (mean ± std) | return (mean ± std) | seeds | wall time, this invocation (s) |",
             "|---|---|---|---|---|"]
    for kind, v in results["variants"].items():
        f = v["final"]
        lines.append(f"| {kind} | {f['success_mean']:.2f} ± {f['success_std']:.2f} | "
                     f"{f['return_mean']:.1f} ± {f['return_std']:.1f} | {f['n_seeds']} | "
                     f"{v['wall_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_curves(path: str, results: dict) -> None:
    """Success and return vs env steps, one line per reward (mean, ±std band over seeds)."""
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left alone

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for kind, v in results["variants"].items():
        c = v["curve"]
        steps = np.asarray(c["step"])
        for ax, name in zip(axes, ("success", "return")):
            mean, std = np.asarray(c[f"{name}_mean"]), np.asarray(c[f"{name}_std"])
            ax.plot(steps, mean, label=kind)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axes[0].set(xlabel="env steps", ylabel="eval success rate", ylim=(-0.05, 1.05))
    axes[1].set(xlabel="env steps", ylabel="eval return (env dense reward)")
    axes[0].legend()
    fig.suptitle(f"SAC on {results['task']}: mean ± std over seeds {results['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


# --------------------------------------------------------------------------- entry point


def run_seed(config, run_dir: str, task: str, seed: int, reward) -> dict:
    """train_sac for one seed (resumes); final eval metrics read back from metrics.jsonl."""
    sac_config = ml_collections.ConfigDict(config.sac.to_dict())
    sac_config.seed = seed
    # Distinct MT1 config draws per env and for evaluation, all derived from the seed.
    env_fns = [make_env_fn(task, 1000 * seed + i, config.max_episode_steps)
               for i in range(config.num_envs)]
    eval_fn = make_env_fn(task, 1000 * seed + 999, config.max_episode_steps)
    train_sac(sac_config, env_fns, reward, run_dir, eval_env_fn=eval_fn,
              progress=bool(config.log.progress))
    curve = eval_curve(read_metrics(run_dir))
    if not curve["step"]:
        raise RuntimeError(f"{run_dir}: no eval in metrics.jsonl")
    return {"seed": seed, "final_step": curve["step"][-1], "final_success": curve["success"][-1],
            "final_return": curve["return"][-1], "curve": curve}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    config_lib.validate(config)
    t_start = time.perf_counter()
    task = demos.validate_task_name(config.task)
    kinds = reward_kinds(config)
    seeds = seeds_of(config)
    obs_dim, act_dim = env_dims(task)
    needs_energy = any(k in ENERGY_KINDS for k in kinds)
    model_dir = reward_model_dir(config, workdir)
    obs_shape, action_shape = reward_model_shapes(config, obs_dim, act_dim)
    if needs_energy:  # a saved model for other shapes fails now, not after collecting demos
        check_saved_spec(model_dir, task, obs_shape, action_shape)
    os.makedirs(workdir, exist_ok=True)
    progress = bool(config.log.progress)

    episodes = demos.load_or_collect(demos.demo_cache_path(config, workdir, task), task,
                                     config.data.n_demos, config.data.demo_seed,
                                     max_steps=config.data.max_steps, progress=progress)
    n_train = len(episodes) - config.data.n_heldout
    if n_train < 1 or config.data.n_heldout < 1:
        raise ValueError(f"data.n_demos={config.data.n_demos} must exceed "
                         f"data.n_heldout={config.data.n_heldout} >= 1")
    train_episodes, heldout_episodes = episodes[:n_train], episodes[n_train:]
    horizon = config.reward_model.data.obs_horizon

    timing = {}
    energy, reward_model_info = None, None
    if needs_energy:
        t0 = time.perf_counter()
        *energy, reward_model_info = train_reward_model(config, model_dir, train_episodes, task)
        timing["reward_model_s"] = time.perf_counter() - t0
    expert_train, _ = expert_reward_inputs(train_episodes, horizon)

    # Every reward is built and checked against the env before any SAC training.
    # Quality report: the kinds run, plus raw vs centered whenever there is an energy.
    quality_kinds = ["raw", "centered"] if energy is not None else []
    energy_scale = float(config.reward.energy_scale)
    if energy is not None and energy_scale <= 0:
        raw = build_reward("raw", config, obs_dim=obs_dim, act_dim=act_dim, energy=energy)
        energy_scale = auto_energy_scale(raw, expert_train, 2048, config.quality.seed)
    timing["energy_scale"] = energy_scale
    reward_objects = {}
    for kind in dict.fromkeys(kinds + quality_kinds):
        reward = build_reward(kind, config, obs_dim=obs_dim, act_dim=act_dim, energy=energy,
                              expert_inputs=expert_train, energy_scale=energy_scale)
        rewards.check_reward_compatibility(reward, obs_dim, act_dim)
        reward_objects[kind] = reward

    t0 = time.perf_counter()
    held_out, held_out_ids = expert_reward_inputs(heldout_episodes, horizon)
    random_traj, random_ids = random_policy_inputs(task, config.quality.n_random_episodes,
                                                   config.max_episode_steps, horizon,
                                                   config.quality.seed)
    quality = quality_report(reward_objects, held_out, held_out_ids, random_traj, random_ids,
                             config)
    run_dir.write_json(os.path.join(workdir, "reward_quality.json"), quality)
    timing["reward_quality_s"] = time.perf_counter() - t0

    variants = {}
    for kind in kinds:
        t0 = time.perf_counter()
        per_seed = [run_seed(config, os.path.join(workdir, kind, f"seed{seed}"), task, seed,
                             reward_objects[kind]) for seed in seeds]
        variants[kind] = {
            "final": summarize_variant(per_seed),
            "per_seed": [{k: v for k, v in r.items() if k != "curve"} for r in per_seed],
            "curve": aggregate_curves([r["curve"] for r in per_seed]),
            "wall_time_s": time.perf_counter() - t0,  # this invocation (resumed seeds are fast)
        }
        print(f"{kind}: {variants[kind]['final']} in {variants[kind]['wall_time_s']:.0f} s",
              flush=True)

    results = {"task": task, "seeds": seeds, "env_steps": int(config.sac.total_env_steps),
               "num_envs": int(config.num_envs), "eval_episodes": int(config.sac.eval_episodes),
               "max_episode_steps": int(config.max_episode_steps), "variants": variants}
    markdown = results_markdown(results)
    wall = time.perf_counter() - t_start
    report = {"config": config.to_dict(), "task": task, "kinds": kinds, "seeds": seeds,
              "final_metrics": {k: v["final"] for k, v in variants.items()},
              "reward_quality": {k: {m: v[m] for m in ("ranking_accuracy_vs_perturbed",
                                                       "ranking_accuracy_vs_random")}
                                 for k, v in quality["kinds"].items()},
              "reward_model": reward_model_info, "timing": timing,
              "variant_wall_time_s": {k: v["wall_time_s"] for k, v in variants.items()},
              "wall_time_s": wall}
    if run_dir.is_main_process():
        run_dir.write_json(os.path.join(workdir, "results.json"), results)
        run_dir.atomic_write_text(os.path.join(workdir, "results.md"), markdown)
        plot_curves(os.path.join(workdir, "curves.png"), results)
        run_dir.write_json(os.path.join(workdir, "report.json"), report)
    print(markdown)
    return report
