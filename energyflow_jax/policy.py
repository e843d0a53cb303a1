"""A trained policy: model, EMA parameters, normalizers and sampler settings in one pytree.

    policy = Policy.load("runs/metaworld")                   # latest checkpoint, or step=N
    chunk = policy.act(obs_history, jax.random.PRNGKey(0))   # raw obs -> env actions
    energy = policy.energy(obs_history, chunk)               # (B,) at the reward time gamma

A run saves its policy inside each orbax checkpoint, beside the train state:
the item "policy" holds the arrays (EMA params, normalizer statistics, noise
levels) and "policy_spec" the JSON that rebuilds the model and sampler. So a
checkpoint step is self-describing: loading needs no config file.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import struct

from energyflow_jax.io import run_dir
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.normalizer import Normalizer
from energyflow_jax.objectives import dsm

SPEC_FORMAT = 1
POLICY_ITEM = "policy"
SPEC_ITEM = "policy_spec"


class Policy(struct.PyTreeNode):
    """Acts from raw observation histories; every array it needs is a leaf.

    `model` and the sampler settings (noise levels, steps, final time, action
    bounds) are static, as they were compiled in before; params and
    normalizers are leaves, so a policy passes through jit as an argument.
    """

    params: Any
    obs_normalizer: Normalizer
    action_normalizer: Normalizer
    model: EnergyFlowModel = struct.field(pytree_node=False)
    spec: str = struct.field(pytree_node=False)  # JSON: model config, shapes, sampler

    # ----------------------------------------------------------------- building

    @classmethod
    def create(cls, model: EnergyFlowModel, model_config, diffusion_config, params,
               obs_normalizer: Normalizer, action_normalizer: Normalizer,
               action_bounds: tuple[float, float] | None = (-1.0, 1.0),
               objective: str = "dsm") -> "Policy":
        """`action_bounds` clips the unnormalized chunk (None: no clipping).
        `objective` names the module of energyflow_jax.objectives whose `sample`
        draws the chunks (the one the model was trained with).
        `diffusion_config.n_candidates` > 1 draws that many chunks per observation and
        acts with the lowest-energy one (conservative models: the energy ranks them)."""
        n_candidates = int(diffusion_config.get("n_candidates", 1))
        _check_candidates(model, n_candidates)
        spec = {
            "format": SPEC_FORMAT, "objective": objective,
            "model": _plain(model_config),
            "obs_shape": list(model.obs_shape), "action_shape": list(model.action_shape),
            "n_sample_steps": int(diffusion_config.n_sample_steps),
            "gamma": float(diffusion_config.gamma), "T": float(diffusion_config.T),
            "n_candidates": n_candidates,
            "sigma_min": float(diffusion_config.sigma_min),
            "sigma_max": float(diffusion_config.sigma_max),
            "action_bounds": None if action_bounds is None else [float(b) for b in action_bounds],
        }
        return cls(params=params, obs_normalizer=obs_normalizer,
                   action_normalizer=action_normalizer, model=model,
                   spec=json.dumps(spec, sort_keys=True))

    @property
    def settings(self) -> dict:
        return json.loads(self.spec)

    def with_settings(self, **changes) -> "Policy":
        """The same arrays with other sampler settings (n_sample_steps, n_candidates), e.g.
        to re-evaluate a saved policy: `Policy.load(dir).with_settings(n_candidates=8)`."""
        allowed = ("n_sample_steps", "n_candidates")
        unknown = sorted(set(changes) - set(allowed))
        if unknown:
            raise ValueError(f"unknown sampler settings {unknown}; these can change: {allowed}")
        for key, value in changes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        _check_candidates(self.model, changes.get("n_candidates", 1))
        return self.replace(spec=json.dumps(self.settings | changes, sort_keys=True))

    @property
    def schedule(self) -> dsm.VESchedule:
        s = self.settings
        return dsm.VESchedule(sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], T=s["T"])

    @property
    def obs_shape(self) -> tuple:
        return self.model.obs_shape

    @property
    def action_shape(self) -> tuple:
        return self.model.action_shape

    # ----------------------------------------------------------------- acting

    def act(self, obs_history, rng: jax.Array) -> jax.Array:
        """Raw observations (B, obs_horizon, obs_dim) -> action chunks (B, pred_horizon,
        action_dim) in the environment's units. Jitted; any batch size."""
        obs = self._check_obs(obs_history)
        return _act(self, obs, rng)

    def energy(self, obs_history, actions, t: float | None = None) -> jax.Array:
        """E(a, s, t) (B,) of raw action chunks under raw observations, at time t
        (the reward time gamma by default). Conservative models only."""
        obs = self._check_obs(obs_history)
        actions = jnp.asarray(actions, jnp.float32)
        if actions.shape[1:] != self.action_shape or actions.shape[0] != obs.shape[0]:
            raise ValueError(f"actions of shape {actions.shape} do not match observations "
                             f"{obs.shape}: expected ({obs.shape[0]}, *{self.action_shape})")
        t = self.settings["gamma"] if t is None else float(t)
        return _energy(self, obs, actions, jnp.float32(t))

    def _check_obs(self, obs_history) -> jax.Array:
        obs = jnp.asarray(obs_history)
        if obs.ndim != 3 or obs.shape[1:] != self.obs_shape:
            raise ValueError(f"observation history of shape {obs.shape}; this policy takes "
                             f"(batch, obs_horizon, obs_dim) = (B, *{self.obs_shape})")
        return obs.astype(jnp.float32)

    # ----------------------------------------------------------------- saving

    def checkpoint_args(self) -> dict:
        """The orbax items a checkpoint step stores this policy in."""
        return {POLICY_ITEM: ocp.args.StandardSave(self._arrays()),
                SPEC_ITEM: ocp.args.JsonSave(self.settings)}

    def _arrays(self) -> dict:
        return {"params": self.params, "obs_normalizer": self.obs_normalizer,
                "action_normalizer": self.action_normalizer}

    @classmethod
    def load(cls, workdir: str, step: int | None = None) -> "Policy":
        """The policy saved in `workdir`'s checkpoints (the latest step, or `step`)."""
        steps = run_dir.checkpoint_steps(workdir)
        if not steps:
            what = "does not exist" if not os.path.isdir(workdir) else "holds no finished checkpoint"
            raise FileNotFoundError(f"{workdir} {what}: train a policy there first "
                                    "(python -m energyflow_jax.main --config=... --workdir=...)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"{workdir} has no checkpoint at step {step}; it has {steps}")
        step_dir = run_dir.step_dir(workdir, step)
        if not os.path.isdir(os.path.join(step_dir, SPEC_ITEM)):
            raise ValueError(
                f"checkpoint step {step} in {workdir} holds no policy: it was written by an "
                "energyflow-jax from before policies were saved in checkpoints, or by an "
                "experiment that trains no policy (a sweep group's members, say). Retrain it "
                "with the same command and a fresh --workdir; an unfinished run re-run in this "
                "workdir resumes, and its next checkpoint saves the policy.")
        spec = run_dir.read_items(workdir, step, **{SPEC_ITEM: ocp.args.JsonRestore()})[SPEC_ITEM]
        if spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"{step_dir}: policy format {spec.get('format')!r}, "
                             f"this energyflow-jax reads format {SPEC_FORMAT}")
        template = cls.from_spec(spec)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template._arrays())
        arrays = run_dir.read_items(
            workdir, step, **{POLICY_ITEM: ocp.args.StandardRestore(abstract)})[POLICY_ITEM]
        return template.replace(**arrays)

    @classmethod
    def from_spec(cls, spec: dict) -> "Policy":
        """A policy with the spec's shapes and freshly initialised arrays (a restore target)."""
        model_config = ml_collections.ConfigDict(spec["model"])
        model = EnergyFlowModel.create(model_config, spec["obs_shape"], spec["action_shape"])
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
        params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
        diffusion = ml_collections.ConfigDict({k: spec[k] for k in (
            "sigma_min", "sigma_max", "T", "n_sample_steps", "gamma")})
        diffusion.n_candidates = int(spec.get("n_candidates", 1))  # older specs: 1
        bounds = spec["action_bounds"]
        return cls.create(model, model_config, diffusion, params,
                          Normalizer.identity(spec["obs_shape"][-1]),
                          Normalizer.identity(spec["action_shape"][-1]),
                          action_bounds=None if bounds is None else tuple(bounds),
                          objective=spec["objective"])


def _check_candidates(model: EnergyFlowModel, n_candidates: int) -> None:
    if n_candidates > 1 and model.kind != "conservative":
        raise ValueError(f"n_candidates={n_candidates} ranks chunks by their energy; a "
                         f"{model.kind!r} model has none (use n_candidates=1)")


def _plain(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=list))


@jax.jit
def _act(policy: Policy, obs: jax.Array, rng: jax.Array) -> jax.Array:
    settings = policy.settings
    s = policy.obs_normalizer.normalize(obs)
    objective = importlib.import_module(f"energyflow_jax.objectives.{settings['objective']}")
    n = int(settings.get("n_candidates", 1))
    if n == 1:
        a = objective.sample(policy.model, policy.params, s, rng, policy.schedule,
                             settings["n_sample_steps"], settings["gamma"])
    else:  # n chunks per observation (candidate-major rows); keep the lowest energy
        a, e = objective.sample(policy.model, policy.params, jnp.tile(s, (n, 1, 1)), rng,
                                policy.schedule, settings["n_sample_steps"], settings["gamma"],
                                return_energy=True)
        a, e = a.reshape(n, s.shape[0], *a.shape[1:]), e.reshape(n, s.shape[0])
        a = jnp.take_along_axis(a, jnp.argmin(e, axis=0)[None, :, None, None], axis=0)[0]
    a = policy.action_normalizer.unnormalize(a)
    if settings["action_bounds"] is not None:
        a = jnp.clip(a, *settings["action_bounds"])
    return a


@jax.jit
def _energy(policy: Policy, obs: jax.Array, actions: jax.Array, t: jax.Array) -> jax.Array:
    s = policy.obs_normalizer.normalize(obs)
    a = policy.action_normalizer.normalize(actions)
    return policy.model.energy(policy.params, a, s, jnp.full((obs.shape[0],), t, jnp.float32))


def as_numpy_policy(policy: Policy, rng: jax.Array):
    """obs_history (numpy) -> chunk (numpy) for host-side rollouts; call i samples with
    fold_in(rng, i), so a rollout's randomness does not depend on its batch layout."""
    calls = 0

    def act(obs_history: np.ndarray) -> np.ndarray:
        nonlocal calls
        key = jax.random.fold_in(rng, calls)
        calls += 1
        return np.asarray(policy.act(obs_history, key))

    return act


@jax.jit
def act_stacked(policy: Policy, obs: jax.Array, rngs: jax.Array) -> jax.Array:
    """Members' policies in one sampler call: policy.params stacked along a leading
    member axis (normalizers shared), obs (M, B, obs_horizon, obs_dim), rngs (M,)
    -> chunks (M, B, pred_horizon, action_dim). Member m's rows equal
    `unstacked_m.act(obs[m], rngs[m])` up to float rounding."""
    return jax.vmap(lambda p, o, r: _act(policy.replace(params=p), o, r))(policy.params, obs, rngs)
