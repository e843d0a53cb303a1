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
  5. for each kind, its seeds in groups of `vmap_seeds`, each group one vmapped
     `train_sac_seeds` program, run k in workdir/<kind>/seed<k> (resumes from its
     checkpoints); then results.json, results.md, curves.png and report.json.
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
from tqdm.auto import tqdm

from energyflow_jax import config as config_lib
from energyflow_jax.io import run_dir
from energyflow_jax.io.run_dir import read_metrics  # run_seeds' run_dirs are paths
from energyflow_jax.rewards import energy as rewards
from energyflow_jax.rewards import gates
from energyflow_jax.data import metaworld as demos
from energyflow_jax.objectives import dsm
from energyflow_jax.data.windows import make_dataset, make_windows
from energyflow_jax.normalizer import Normalizer
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.rl.sac.loop import train_sac_seeds
from energyflow_jax.evaluation import metaworld_eval, statistics
from energyflow_jax.evaluation.rollout import rollout
from energyflow_jax.training.loop import fit

ENERGY_KINDS = rewards.ENERGY_KINDS
SPEC_FILE = "spec.json"
ACTION_SPACES = ("box", "standardized")


# --------------------------------------------------------------------------- config


def reward_kinds(config) -> list[str]:
    kinds = list(config.reward.kinds) if config.reward.kinds else [config.reward.kind]
    for kind in kinds:  # before any work: a typo should fail in seconds
        if kind not in rewards.REWARD_KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; expected one of {rewards.REWARD_KINDS}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"config.reward.kinds has duplicates: {kinds}")
    if config.reward.action_space not in ACTION_SPACES:
        raise ValueError(f"config.reward.action_space={config.reward.action_space!r}; expected "
                         f"one of {ACTION_SPACES}")
    if config.reward.scale_rule not in ("std", "none"):
        raise ValueError(f"config.reward.scale_rule={config.reward.scale_rule!r}; expected "
                         "'std' or 'none'")
    return kinds


def seeds_of(config) -> list[int]:
    return [int(s) for s in config.seeds] if config.seeds else [int(config.sac.seed)]


def seed_groups(config) -> list[tuple[int, ...]]:
    """The seeds in groups of config.vmap_seeds (0: one group), each one vmapped program."""
    seeds, size = seeds_of(config), int(config.vmap_seeds)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.seeds has duplicates: {seeds}")
    if size < 0:
        raise ValueError(f"config.vmap_seeds={size} must be >= 0 (0: all seeds together)")
    size = size or len(seeds)
    return [tuple(seeds[i:i + size]) for i in range(0, len(seeds), size)]


def make_env_fn(task: str, seed: int, max_episode_steps: int):
    """A gymnasium Meta-World MT1 env; its 50 task configurations are drawn from `seed`."""
    def env_fn() -> gym.Env:
        import metaworld  # noqa: F401  (registers the Meta-World/* envs)

        return gym.make("Meta-World/MT1", env_name=task, seed=seed,
                        max_episode_steps=max_episode_steps, disable_env_checker=True)
    return env_fn


class MetaWorldEvaluator:
    """SAC's evaluation on Meta-World (a `rl.sac.loop.Evaluator`): evaluation k of run
    `seed` plays the deterministic actor on held-out layouts (k - 1) n .. k n - 1 of the
    eval config stream of (task, seed) (`evaluation.metaworld_eval`, disjoint from the
    demos'), so layouts differ between evaluations and runs. The episodes step in
    lockstep waves on `num_envs` bare envs built once per run, one batched actor call
    per step, for the full max_steps (a fixed-horizon return; success = any successful
    step). n_evaluations: how many the run makes (the layouts are drawn up front).
    """

    def __init__(self, task: str, n_episodes: int, seed: int, max_steps: int,
                 n_evaluations: int, num_envs: int = 10):
        self.n_episodes, self.n_evaluations, self.max_steps = n_episodes, n_evaluations, max_steps
        self.num_envs = min(num_envs, n_episodes)
        self.spec = metaworld_eval.eval_env_spec(task, n_episodes * n_evaluations, seed, max_steps)
        self.env = None

    def __call__(self, actor, eval_index: int) -> dict[str, float]:
        if not 1 <= eval_index <= self.n_evaluations:
            raise ValueError(f"evaluation {eval_index} of a run planned for {self.n_evaluations}")
        if self.env is None:
            self.env = self.spec(self.num_envs)
        first = (eval_index - 1) * self.n_episodes
        out = rollout(self.env, lambda history: actor(history[:, -1])[:, None, :],
                      range(first, first + self.n_episodes), obs_horizon=1, exec_horizon=1,
                      max_steps=self.max_steps, stop_at_success=False)
        return {"eval/return": float(out.returns.mean()), "eval/success": float(out.success.mean()),
                "eval/length": float(out.steps.mean())}

    def close(self) -> None:
        if self.env is not None:
            self.env.close()


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



def reward_normalizers(config, episodes: list[dict], act_dim: int) -> tuple[Normalizer, Normalizer]:
    """The reward inputs' standardization, shared by the energy model and the discriminator.

    Observations: std floored at reward.obs_min_std, so a dimension the demos barely move
    (27 of Meta-World's 39) cannot turn a small change into many standard deviations.
    Actions: the raw [-1, 1] box (reward.action_space="box"), or standardized with the
    floor reward.action_min_std; never a floor that makes the experts' constant gripper
    action dominate (the old 1e-2 floor made a gripper change of 0.1 ten std).
    """
    obs = np.concatenate([ep["obs"] for ep in episodes])
    obs_norm = Normalizer.fit(obs, float(config.reward.obs_min_std))
    if config.reward.action_space == "box":
        return obs_norm, Normalizer.identity(act_dim)
    actions = np.concatenate([ep["actions"] for ep in episodes])
    return obs_norm, Normalizer.fit(actions, float(config.reward.action_min_std))


def _normalization_spec(config) -> dict:
    return {"obs_min_std": float(config.reward.obs_min_std),
            "action_space": str(config.reward.action_space),
            "action_min_std": float(config.reward.action_min_std)}


# --------------------------------------------------------------------------- reward model


def reward_model_dir(config, workdir: str) -> str:
    return config.reward.model_dir or os.path.join(workdir, "reward_model")


def check_shared_model_dir(config) -> None:
    """A reward.model_dir given by the user must hold a complete reward model (its spec,
    normalizers and a checkpoint): a missing or half-copied one is refused, not retrained."""
    model_dir = config.reward.model_dir
    if not model_dir:
        return
    if not os.path.isdir(model_dir):
        raise ValueError(f"reward.model_dir={model_dir!r} does not exist; leave it empty to "
                         "train a reward model in <workdir>/reward_model")
    checkpoints = os.path.join(model_dir, "checkpoints")
    missing = [name for name in (SPEC_FILE, NORMALIZERS_FILE)
               if not os.path.isfile(os.path.join(model_dir, name))]
    if not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        missing.append("checkpoints/<step>")
    if missing:
        raise ValueError(f"reward.model_dir={model_dir!r} is not a complete reward model: "
                         f"missing {missing}")


def reward_model_shapes(config, obs_dim: int, act_dim: int) -> tuple[tuple, tuple]:
    """(obs_shape, action_shape) of the reward model for this env: one action per chunk."""
    if config.reward_model.data.pred_horizon != 1:
        raise ValueError("reward_model.data.pred_horizon must be 1: SAC scores one action at "
                         f"a time (got {config.reward_model.data.pred_horizon})")
    return (config.reward_model.data.obs_horizon, obs_dim), (1, act_dim)


def check_saved_spec(model_dir: str, task: str, obs_shape: tuple, action_shape: tuple,
                     normalization: dict | None = None) -> None:
    """Refuses a reward model saved for another task, other shapes (another obs_horizon)
    or another input normalization."""
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
    saved_norm = spec.get("normalization")
    if normalization is not None and saved_norm is not None and saved_norm != normalization:
        raise ValueError(f"the reward model in {model_dir} was trained with reward inputs "
                         f"normalized as {saved_norm}, but this run asks for {normalization}; "
                         "use another reward.model_dir (or --workdir)")


def train_reward_model(config, model_dir: str, episodes: list[dict], task: str,
                       normalizers: tuple[Normalizer, Normalizer]):
    """fit() (or resume) the pred_horizon = 1 energy model; (model, ema_params, obs_n, act_n)."""
    rm = config.reward_model
    normalizer_path = os.path.join(model_dir, NORMALIZERS_FILE)
    if os.path.exists(normalizer_path):  # a resumed / shared model keeps its statistics
        normalizers = load_normalizers(normalizer_path)
    dataset = make_dataset(episodes, rm.data.obs_horizon, 1, obs_normalizer=normalizers[0],
                           action_normalizer=normalizers[1])
    obs_shape = tuple(dataset.obs.shape[1:])
    action_shape = tuple(dataset.actions.shape[1:])
    check_saved_spec(model_dir, task, obs_shape, action_shape, _normalization_spec(config))
    if not os.path.exists(normalizer_path) and run_dir.is_main_process():
        save_normalizers(normalizer_path, dataset.obs_normalizer, dataset.action_normalizer)
        run_dir.write_json(os.path.join(model_dir, SPEC_FILE),
                          {"task": task, "obs_shape": obs_shape, "action_shape": action_shape,
                           "n_train_episodes": len(episodes),
                           "normalization": _normalization_spec(config)})
    model = EnergyFlowModel.create(rm.model, obs_shape=obs_shape, action_shape=action_shape)
    state, info = fit(rm, model_dir, model, dataset.arrays())
    params = jax.device_put(jax.device_get(state.ema_params))
    return model, params, dataset.obs_normalizer, dataset.action_normalizer, info


# --------------------------------------------------------------------------- reward inputs


def expert_reward_inputs(episodes: list[dict], obs_horizon: int) -> tuple[rewards.RewardInputs,
                                                                          np.ndarray]:
    """Raw demo steps as RewardInputs (success from the first successful step on)."""
    obs, _ = make_windows(episodes, obs_horizon, 1)
    actions = np.concatenate([ep["actions"] for ep in episodes]).astype(np.float32)
    env_reward = np.concatenate([ep["rewards"] for ep in episodes]).astype(np.float32)
    success = np.concatenate([
        (np.arange(len(ep["actions"])) >= ep["success_step"]) & (ep["success_step"] >= 0)
        for ep in episodes])
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
                 normalizers: tuple[Normalizer, Normalizer] | None = None,
                 expert_inputs: rewards.RewardInputs | None = None, scale: float = 1.0,
                 success_weight: float | None = None):
    """The reward object for `kind`; `energy` = (model, params, obs_norm, act_norm).

    scale multiplies the kind's own term and success_weight the "+sparse" bonus
    (default reward.success_weight); see reward_scales for the rule that sets them.
    """
    success_weight = config.reward.success_weight if success_weight is None else success_weight
    kwargs = dict(scale=scale, obs_horizon=config.reward_model.data.obs_horizon, obs_dim=obs_dim,
                  act_dim=act_dim, gamma=config.reward.gamma,
                  num_reference=config.reward.num_reference,
                  reference_rng=jax.random.PRNGKey(config.reward.reference_seed),
                  success_weight=success_weight)
    if kind in ENERGY_KINDS:
        model, params, obs_norm, act_norm = energy
        kwargs.update(energy_fn=functools.partial(model.energy, params),
                      pred_horizon=model.action_shape[0],
                      obs_horizon=model.obs_shape[0], obs_dim=model.obs_shape[1],
                      act_dim=model.action_shape[1],
                      obs_normalizer=obs_norm, action_normalizer=act_norm,
                      schedule=dsm.VESchedule.from_config(config.reward_model.diffusion),
                      n_sample_steps=int(config.reward.n_sample_steps))
    if kind == "adversarial":
        obs_norm, act_norm = normalizers
        kwargs.update(expert_inputs=expert_inputs, adversarial_config=config.reward.adversarial,
                      obs_normalizer=obs_norm, action_normalizer=act_norm)
    return rewards.make_reward_fn(kind, **kwargs)


def _std_scale(values) -> float:
    std = float(np.std(np.asarray(values, np.float64)))
    return 1.0 / std if np.isfinite(std) and std > 1e-12 else 1.0


def reward_scales(kinds, config, calibration: rewards.RewardInputs, **build_kwargs) -> dict:
    """One rule for every fixed reward: each term is divided by its std over `calibration`
    (demo transitions plus random-policy transitions, which stand in for SAC's warm-up).

    Returns {kind: {"scale": s, "success_weight": w}}: a "+sparse" kind is its base term
    at unit std plus reward.success_weight times the unit-std success indicator.
    reward.scale_rule="none" leaves every term unscaled. The adversarial reward scales
    itself online by the same rule (rewards/adversarial.py).
    """
    out = {}
    sparse_scale = _std_scale(calibration.success)
    batch = jax.tree.map(jnp.asarray, calibration)
    for kind in kinds:
        if kind == "adversarial":
            out[kind] = {"scale": None, "success_weight": None, "rule": "online running std"}
            continue
        base = kind.removesuffix("+sparse")
        if config.reward.scale_rule == "none":
            scale, bonus_scale = 1.0, 1.0
        else:
            unscaled = build_reward(base, config, scale=1.0, **build_kwargs)
            scale = _std_scale(rewards.score_transitions(unscaled, batch))
            bonus_scale = sparse_scale
        bonus = float(config.reward.success_weight) * bonus_scale if kind != base else 0.0
        out[kind] = {"scale": scale, "success_weight": bonus}
    return out


def quality_report(reward_objects: dict, held_out: rewards.RewardInputs, held_out_ids,
                   random_traj: rewards.RewardInputs, random_ids, config,
                   reference: dict[str, gates.ReferenceRollouts] | None = None) -> dict:
    """reward_quality for every fixed reward: ranking vs perturbed / random actions on held-out
    expert states; correlation with the dense reward along expert / random trajectories;
    and the gates (rewards/gates.py): xyz ranking and the return order of `reference`
    rollouts, with `gates_passed` against quality.gate_xyz_accuracy / gate_kendall_tau."""
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
        gate = {}
        if kind not in ("sparse", "dense"):  # they score the recorded transition only
            gate["xyz_ranking_accuracy"] = gates.xyz_ranking_accuracy(
                reward, held_out, jax.random.fold_in(key, 2), q.n_alternatives, q.noise_scale)
        if reference is not None:
            order = gates.return_order(reward, reference, float(config.sac.discount))
            gate["return_order_kendall_tau"] = {k: order[k] for k in ("kendall_tau_success",
                                                                       "kendall_tau_dense")}
            gate["reference_discounted_return"] = order["discounted_return"]
            taus = list(gate["return_order_kendall_tau"].values())
            gate["gates_passed"] = bool(
                gate.get("xyz_ranking_accuracy", 1.0) >= q.gate_xyz_accuracy
                and all(np.isfinite(t) and t >= q.gate_kendall_tau for t in taus))
        out[kind] = {
            **gate,
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
            "gate_thresholds": {"xyz_ranking_accuracy": q.gate_xyz_accuracy,
                                "kendall_tau": q.gate_kendall_tau},
            "reference_policies": (gates.reference_summary(reference)
                                   if reference is not None else None),
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


def success_auc(curve: dict) -> float:
    """Mean eval success over training: the area under the success curve over its steps."""
    steps, success = np.asarray(curve["step"], np.float64), np.asarray(curve["success"])
    if len(steps) < 2:
        return float(success.mean()) if len(success) else float("nan")
    return float(np.trapezoid(success, steps) / (steps[-1] - steps[0]))


def summarize_variant(per_seed: list[dict]) -> dict[str, float]:
    """Final success / success AUC / return, mean +- std over seeds (population, ddof = 0)."""
    out = {"n_seeds": len(per_seed)}
    for name, key in (("success", "final_success"), ("auc", "success_auc"),
                      ("return", "final_return")):
        values = np.array([r[key] for r in per_seed], np.float64)
        out[f"{name}_mean"], out[f"{name}_std"] = float(values.mean()), float(values.std())
    return out


# The paper's claim, as differences of final success paired by seed (a minus b).
COMPARISONS = (("centered+sparse", "sparse"), ("centered", "raw"), ("centered+sparse", "dense"),
               ("advantage", "centered"), ("centered+sparse", "adversarial"))


def comparisons(variants: dict) -> dict:
    """Paired-bootstrap 95% CIs of final-success and AUC differences for COMPARISONS whose
    kinds both ran, over the seeds both have."""
    out = {}
    for a, b in COMPARISONS:
        if a not in variants or b not in variants:
            continue
        seeds_a = {r["seed"]: r for r in variants[a]["per_seed"]}
        seeds_b = {r["seed"]: r for r in variants[b]["per_seed"]}
        common = sorted(set(seeds_a) & set(seeds_b))
        out[f"{a} - {b}"] = {
            metric: statistics.paired_bootstrap_ci([seeds_a[s][key] for s in common],
                                                   [seeds_b[s][key] for s in common])
            for metric, key in (("final_success", "final_success"), ("success_auc", "success_auc"))}
        out[f"{a} - {b}"]["n_seeds"] = len(common)
    return out


def verdict(variants: dict, diffs: dict, quality: dict) -> dict:
    """The rule fixed before running (README): supported / refuted / inconclusive."""
    needed = ("sparse", "dense", "raw", "centered", "centered+sparse")
    missing = [k for k in needed if k not in variants]
    if missing:
        return {"verdict": "inconclusive", "why": f"kinds not run: {missing}"}
    gates_pass = all(quality["kinds"].get(k, {}).get("gates_passed") for k in
                     ("centered", "centered+sparse"))
    dense = variants["dense"]["final"]["success_mean"]
    cs = variants["centered+sparse"]["final"]["success_mean"]
    d_sparse = diffs["centered+sparse - sparse"]["final_success"]
    d_raw = diffs["centered - raw"]["final_success"]
    checks = {"centered+sparse - sparse >= 0.3 with CI above 0":
              d_sparse["mean"] >= 0.3 and d_sparse["low"] > 0,
              "centered - raw CI above 0": d_raw["low"] > 0,
              "centered+sparse within 0.15 of dense": dense - cs <= 0.15}
    refute = {"gates pass (centered, centered+sparse)": gates_pass,
              "dense >= 0.7": dense >= 0.7,
              "CI of centered+sparse - sparse includes 0, upper bound < 0.15":
              d_sparse["low"] <= 0 <= d_sparse["high"] and d_sparse["high"] < 0.15}
    if all(checks.values()):
        result = "supported"
    elif all(refute.values()):
        result = "refuted"
    else:
        result = "inconclusive"
    return {"verdict": result, "supported_if": checks, "refuted_if": refute}


def results_markdown(results: dict) -> str:
    lines = [f"# SAC on {results['task']} ({results['env_steps']} env steps, "
             f"{len(results['seeds'])} seeds, {results['eval_episodes']} eval episodes each)", "",
             "| reward | final success (mean ± std) | success AUC | return (mean ± std) "
             "| gates | seeds | SAC time, summed over seeds (s) |",
             "|---|---|---|---|---|---|---|"]
    for kind, v in results["variants"].items():
        f = v["final"]
        gate = {True: "pass", False: "fail", None: "n/a"}[v.get("gates_passed")]
        lines.append(f"| {kind} | {f['success_mean']:.2f} ± {f['success_std']:.2f} | "
                     f"{f['auc_mean']:.2f} ± {f['auc_std']:.2f} | "
                     f"{f['return_mean']:.1f} ± {f['return_std']:.1f} | {gate} | {f['n_seeds']} | "
                     f"{v['wall_time_s']:.0f} |")
    if results.get("comparisons"):
        lines += ["", "Differences of final success (and AUC), paired by seed, mean "
                  "[95% paired-bootstrap CI]:", "", "| a - b | final success | success AUC | seeds |",
                  "|---|---|---|---|"]
        for name, d in results["comparisons"].items():
            fs, auc = d["final_success"], d["success_auc"]
            lines.append(f"| {name} | {fs['mean']:+.2f} [{fs['low']:+.2f}, {fs['high']:+.2f}] | "
                         f"{auc['mean']:+.2f} [{auc['low']:+.2f}, {auc['high']:+.2f}] | "
                         f"{d['n_seeds']} |")
    if results.get("verdict"):
        v = results["verdict"]
        lines += ["", f"**Verdict on the paper's claim: {v['verdict']}.**"]
        for rule in ("supported_if", "refuted_if"):
            for check, ok in v.get(rule, {}).items():
                lines.append(f"- {rule.replace('_', ' ')}: {check}: {'yes' if ok else 'no'}")
        if "why" in v:
            lines.append(f"- {v['why']}")
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


def sac_throughput(config, n_runs: int, wall_s: float) -> dict[str, float]:
    """Env steps/s and gradient updates/s of n_runs SAC runs in wall_s (evaluation and
    warm-up included; a resumed invocation counts only what it ran, so read it fresh)."""
    steps = int(config.sac.total_env_steps)
    updates = max(steps - int(config.sac.warmup_env_steps), 0) * int(config.sac.utd_ratio)
    wall_s = max(wall_s, 1e-9)
    return {"env_steps_per_s": n_runs * steps / wall_s, "updates_per_s": n_runs * updates / wall_s}


def build_reward_objects(kinds, config, scales: dict, **build_kwargs) -> dict:
    """{kind: reward} scaled by `scales` (reward_scales), each checked against the env."""
    out = {}
    for kind in kinds:
        scaling = ({} if kind == "adversarial" else
                   dict(scale=scales[kind]["scale"], success_weight=scales[kind]["success_weight"]))
        reward = build_reward(kind, config, **build_kwargs, **scaling)
        rewards.check_reward_compatibility(reward, build_kwargs["obs_dim"], build_kwargs["act_dim"])
        out[kind] = reward
    return out


_WORKER: dict = {}  # a SAC worker process's config and rewards, built once by _worker_init


def _worker_init(config, workdir: str, task: str, build_kwargs: dict, scales: dict) -> None:
    """Rebuilds the rewards in a spawned worker from host arrays (no reward-model training:
    the parent trained it; energy = (host params, obs normalizer, action normalizer))."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.log.progress = False
    if build_kwargs["energy"] is not None:
        params, obs_norm, act_norm = build_kwargs["energy"]
        obs_shape, action_shape = reward_model_shapes(config, build_kwargs["obs_dim"],
                                                      build_kwargs["act_dim"])
        model = EnergyFlowModel.create(config.reward_model.model, obs_shape=obs_shape,
                                       action_shape=action_shape)
        build_kwargs = build_kwargs | {"energy": (model, jax.device_put(params), obs_norm, act_norm)}
    _WORKER.update(config=config, workdir=workdir, task=task,
                   rewards=build_reward_objects(list(scales), config, scales, **build_kwargs))


def _worker_run(kind: str, seeds: tuple[int, ...]) -> list[dict]:
    w = _WORKER
    return run_seeds(w["config"], [os.path.join(w["workdir"], kind, f"seed{seed}") for seed in seeds],
                     w["task"], seeds, w["rewards"][kind])


def _run_in_workers(config, workdir: str, task: str, runs: list, build_kwargs: dict,
                    scales: dict) -> dict:
    """The (kind, seed group) runs spread over config.num_workers spawned processes;
    results by run."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds XLA threads
    with ProcessPoolExecutor(int(config.num_workers), mp_context=ctx, initializer=_worker_init,
                             initargs=(config, workdir, task, build_kwargs, scales)) as pool:
        futures = {run: pool.submit(_worker_run, *run) for run in runs}
        bar = tqdm(total=len(runs), desc="sac runs", disable=not config.log.progress, unit="run")
        out = {}
        try:
            for run, future in futures.items():
                out[run] = future.result()
                bar.update(1)
        finally:
            bar.close()
    return out


def run_seeds(config, run_dirs: list[str], task: str, seeds, reward) -> list[dict]:
    """train_sac_seeds for a group of seeds (resumes); each run's eval metrics read back from
    its metrics.jsonl. wall_time_s: the run's share of the group's time."""
    sac_config = ml_collections.ConfigDict(config.sac.to_dict())
    # Distinct MT1 config draws per training env, derived from the seed; evaluation on
    # held-out layouts of the eval stream (MetaWorldEvaluator).
    env_fns = [[make_env_fn(task, 1000 * seed + i, config.max_episode_steps)
                for i in range(config.num_envs)] for seed in seeds]
    n_evaluations = -(-int(config.sac.total_env_steps) // int(config.sac.eval_every))
    evaluators = [MetaWorldEvaluator(task, int(config.sac.eval_episodes), seed,
                                     int(config.max_episode_steps), n_evaluations)
                  for seed in seeds]
    t0 = time.perf_counter()
    train_sac_seeds(sac_config, seeds, env_fns, reward, run_dirs, evaluators=evaluators,
                    progress=bool(config.log.progress))
    wall = (time.perf_counter() - t0) / len(seeds)
    out = []
    for seed, path in zip(seeds, run_dirs):
        curve = eval_curve(read_metrics(path))
        if not curve["step"]:
            raise RuntimeError(f"{path}: no eval in metrics.jsonl")
        out.append({"seed": seed, "final_step": curve["step"][-1],
                    "final_success": curve["success"][-1], "success_auc": success_auc(curve),
                    "final_return": curve["return"][-1], "wall_time_s": wall, "curve": curve})
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    config_lib.validate(config)
    t_start = time.perf_counter()
    task = demos.validate_task_name(config.task)
    kinds = reward_kinds(config)
    seeds = seeds_of(config)
    groups = seed_groups(config)  # a bad seed list fails before any work
    obs_dim, act_dim = env_dims(task)
    needs_energy = any(k in ENERGY_KINDS for k in kinds)
    model_dir = reward_model_dir(config, workdir)
    obs_shape, action_shape = reward_model_shapes(config, obs_dim, act_dim)
    if needs_energy:  # a saved model for other shapes fails now, not after collecting demos
        check_shared_model_dir(config)
        check_saved_spec(model_dir, task, obs_shape, action_shape, _normalization_spec(config))
    os.makedirs(workdir, exist_ok=True)
    progress = bool(config.log.progress)

    episodes = demos.load_or_collect(demos.demo_cache_path(config, workdir, task), task,
                                     config.data.n_demos, config.data.demo_seed,
                                     max_steps=config.data.max_steps, progress=progress,
                                     steps_after_success=int(config.data.steps_after_success))
    n_train = len(episodes) - config.data.n_heldout
    if n_train < 1 or config.data.n_heldout < 1:
        raise ValueError(f"data.n_demos={config.data.n_demos} must exceed "
                         f"data.n_heldout={config.data.n_heldout} >= 1")
    train_episodes, heldout_episodes = episodes[:n_train], episodes[n_train:]
    horizon = config.reward_model.data.obs_horizon

    timing = {}
    normalizers = reward_normalizers(config, train_episodes, act_dim)
    energy, reward_model_info = None, None
    if needs_energy:
        t0 = time.perf_counter()
        *energy, reward_model_info = train_reward_model(config, model_dir, train_episodes, task,
                                                        normalizers)
        normalizers = tuple(energy[2:])  # a resumed or shared model's own statistics
        timing["reward_model_s"] = time.perf_counter() - t0
    expert_train, _ = expert_reward_inputs(train_episodes, horizon)
    random_traj, random_ids = random_policy_inputs(task, config.quality.n_random_episodes,
                                                   config.max_episode_steps, horizon,
                                                   config.quality.seed)

    # Every reward is scaled by one rule, built and checked against the env before any
    # SAC training. The quality report also covers the environment's rewards and, with an
    # energy, raw, centered and advantage.
    quality_kinds = ["sparse", "dense"] + (["raw", "centered", "advantage"] if energy else [])
    build_kwargs = dict(obs_dim=obs_dim, act_dim=act_dim, energy=energy,
                        normalizers=normalizers, expert_inputs=expert_train)
    all_kinds = list(dict.fromkeys(kinds + quality_kinds))
    calibration = jax.tree.map(lambda a, b: np.concatenate([a, b]), expert_train, random_traj)
    scales = reward_scales(all_kinds, config, calibration, **build_kwargs)
    timing["reward_scales"] = scales
    reward_objects = build_reward_objects(all_kinds, config, scales, **build_kwargs)

    t0 = time.perf_counter()
    held_out, held_out_ids = expert_reward_inputs(heldout_episodes, horizon)
    q = config.quality
    reference = gates.rollout_reference_policies(
        task, q.n_gate_episodes, config.max_episode_steps, horizon, q.seed,
        noise_scales=tuple(q.gate_noise_scales), delay=q.gate_delay, progress=progress)
    quality = quality_report(reward_objects, held_out, held_out_ids, random_traj, random_ids,
                             config, reference)
    run_dir.write_json(os.path.join(workdir, "reward_quality.json"), quality)
    timing["reward_quality_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    runs = [(kind, group) for kind in kinds for group in groups]
    if int(config.num_workers) > 1:
        # Longest first, so no worker is left with a long run at the end: a learned
        # reward trains inside every update, energy kinds score with the reward model.
        runs.sort(key=lambda run: (not isinstance(reward_objects[run[0]], rewards.LearnedReward),
                                   run[0] not in ENERGY_KINDS, -len(run[1])))
        host_energy = None if energy is None else (jax.device_get(energy[1]), *energy[2:])
        by_group = _run_in_workers(config, workdir, task, runs, build_kwargs | {"energy": host_energy},
                                   {k: scales[k] for k in kinds})
    else:
        by_group = {(kind, group): run_seeds(config, [os.path.join(workdir, kind, f"seed{seed}")
                                                      for seed in group],
                                             task, group, reward_objects[kind])
                    for kind, group in runs}
    outcomes = {(kind, outcome["seed"]): outcome
                for (kind, _), group_outcomes in by_group.items() for outcome in group_outcomes}
    timing["sac_s"] = time.perf_counter() - t0
    timing["sac_throughput"] = sac_throughput(config, len(kinds) * len(seeds), timing["sac_s"])
    variants = {}
    for kind in kinds:
        per_seed = [outcomes[kind, seed] for seed in seeds]
        variants[kind] = {
            "final": summarize_variant(per_seed),
            "per_seed": [{k: v for k, v in r.items() if k != "curve"} for r in per_seed],
            "curve": aggregate_curves([r["curve"] for r in per_seed]),
            "wall_time_s": sum(r["wall_time_s"] for r in per_seed),  # summed over its runs
            "gates_passed": quality["kinds"].get(kind, {}).get("gates_passed"),
            "reward_scale": scales[kind],
        }
        print(f"{kind}: {variants[kind]['final']}", flush=True)

    results = {"task": task, "seeds": seeds, "env_steps": int(config.sac.total_env_steps),
               "num_envs": int(config.num_envs), "eval_episodes": int(config.sac.eval_episodes),
               "max_episode_steps": int(config.max_episode_steps), "variants": variants}
    results["comparisons"] = comparisons(variants)
    results["verdict"] = verdict(variants, results["comparisons"], quality)
    markdown = results_markdown(results)
    wall = time.perf_counter() - t_start
    report = {"config": config.to_dict(), "task": task, "kinds": kinds, "seeds": seeds,
              "final_metrics": {k: v["final"] for k, v in variants.items()},
              "reward_quality": {k: {m: v.get(m) for m in (
                                     "gates_passed", "xyz_ranking_accuracy",
                                     "return_order_kendall_tau",
                                     "ranking_accuracy_vs_perturbed",
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
