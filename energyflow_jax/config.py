"""The shared config schema, and loading config files from Python.

Files under sweeps/ start from `base_config()`, override what their task needs,
pick a preset, and return a locked ConfigDict so a misspelt key fails loudly
with the key's name. `load("sweeps/metaworld.py:tiny", overrides)` gives the
same config as the command line does.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "toy"
    c.seed = 0

    # The published network (NOTES.md); every width, depth and kernel is here.
    c.model = ml_collections.ConfigDict(dict(
        kind="conservative",          # "conservative" (energy) | "free" (vector field)
        arch="unet",                  # "unet" | "mlp"
        down_dims=(64, 128, 256),
        kernel_size=5,
        n_groups=8,
        mlp_dims=(256, 256, 256),     # arch="mlp" only
        head_dims=(256, 128),         # energy head widths before the scalar output
        state_emb_dim=128,
        time_emb_dim=128,
        spectral_norm=True,
        dtype="float32",              # matmul compute dtype: "float32" | "bfloat16"
        conv_impl="auto",             # "auto" (by backend) | "lax" | "winograd" | "windows"
        matmul_precision="default",   # "default" (backend's) | "high" | "highest"
    ))
    c.diffusion = ml_collections.ConfigDict(dict(
        sigma_min=0.01, sigma_max=10.0, T=1.0,
        n_sample_steps=20,            # K Euler steps of the PF-ODE
        gamma=1e-3,                   # final time of the sampler and the reward
        n_candidates=1,               # chunks drawn per observation; the policy executes
                                      # the lowest-energy one (conservative models)
    ))
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, weight_decay=1e-6, warmup_steps=500, total_steps=100_000,
        grad_clip=1.0, b1=0.9, b2=0.999, ema_decay=0.9999,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=256,
        steps_per_chunk=100,          # steps per jitted lax.scan; logging in between
        checkpoint_every_chunks=10,
        max_checkpoints=2,
        num_devices=0,                # 0: every local device
        distributed=False,            # call jax.distributed.initialize() (multi-host)
        compilation_cache_dir="",     # persistent XLA compilation cache; "" = none
    ))
    c.data = ml_collections.ConfigDict(dict(obs_horizon=2, pred_horizon=16, exec_horizon=8))
    c.log = ml_collections.ConfigDict(dict(
        tensorboard=True, wandb=False, wandb_project="energyflow-jax", progress=True,
    ))
    return c


def select_preset(config: ml_collections.ConfigDict, presets: dict, name: str | None):
    """Apply presets[name] (a function editing the config) and lock the result."""
    name = name or "default"
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    presets[name](config)
    config.lock()
    return config


def _config_path(path: str) -> str:
    """`path` as given, else relative to the repository that holds sweeps/
    (so `load("sweeps/toy.py")` works from any directory of an editable install)."""
    if os.path.exists(path):
        return path
    beside_package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    if os.path.exists(beside_package):
        return beside_package
    raise FileNotFoundError(f"config file {path!r} not found (looked in {os.getcwd()} and "
                            f"{os.path.dirname(beside_package)})")


def load_module(path: str):
    """The config file at `path` (sweeps/*.py) as a module; sweeps/ is not a package."""
    path = _config_path(path)
    name = "_energyflow_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config(preset) function")
    return module


def load(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The locked config named by "path.py[:preset]", with `overrides` applied.

    `overrides` maps dotted keys to values, as on the command line
    (`{"optim.total_steps": 500}`); a key the config does not have raises
    KeyError naming it, and a value of the wrong type raises TypeError.
    """
    path, _, preset = spec.partition(":")
    config = load_module(path).get_config(preset or None)
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        node, leaf = config, parts[-1]
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise KeyError(f"config has no key {'.'.join(parts[:i + 1])!r} "
                               f"(override {key!r})")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise KeyError(f"config has no key {key!r}")
        setattr(node, leaf, value)
    return config


# --------------------------------------------------------------------------- ranges

class ConfigError(ValueError):
    """A config value outside its allowed range; one line per bad key."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_at_least(lo: int):
    return (lambda x: _is_int(x) and x >= lo), f"an integer >= {lo}"


def _number(pred, text: str):
    return (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and pred(x)), text


def _one_of(*choices):
    return (lambda x: x in choices), "one of " + ", ".join(repr(c) for c in choices)


# A key's rule applies wherever the key ends a config path, so the reward model
# nested in the SAC config and sweep grids (each value checked) are covered too.
_RANGES = {
    "optim.total_steps": _int_at_least(1),
    "optim.warmup_steps": _int_at_least(0),
    "optim.learning_rate": _number(lambda x: x > 0, "a number > 0"),
    "optim.weight_decay": _number(lambda x: x >= 0, "a number >= 0"),
    "optim.grad_clip": _number(lambda x: x > 0, "a number > 0"),
    "optim.b1": _number(lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "optim.b2": _number(lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "optim.ema_decay": _number(lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "train.batch_size": _int_at_least(1),
    "train.steps_per_chunk": _int_at_least(1),
    "train.checkpoint_every_chunks": _int_at_least(1),
    "train.max_checkpoints": _int_at_least(1),
    "train.num_devices": _int_at_least(0),
    "data.obs_horizon": _int_at_least(1),
    "data.pred_horizon": _int_at_least(1),
    "data.exec_horizon": _int_at_least(1),
    "data.n_demos": _int_at_least(1),
    "data.max_steps": _int_at_least(1),
    "data.num_workers": _int_at_least(0),
    "diffusion.sigma_min": _number(lambda x: x > 0, "a number > 0"),
    "diffusion.sigma_max": _number(lambda x: x > 0, "a number > 0"),
    "diffusion.T": _number(lambda x: x > 0, "a number > 0"),
    "diffusion.gamma": _number(lambda x: x > 0, "a number > 0"),
    "diffusion.n_sample_steps": _int_at_least(1),
    "diffusion.n_candidates": _int_at_least(1),
    "model.kind": _one_of("conservative", "free"),
    "model.arch": _one_of("unet", "mlp"),
    "model.dtype": _one_of("float32", "bfloat16"),
    "model.conv_impl": _one_of("auto", "lax", "winograd", "windows"),
    "model.matmul_precision": _one_of("default", "high", "highest"),
    "model.down_dims": _int_at_least(1),
    "model.mlp_dims": _int_at_least(1),
    "model.head_dims": _int_at_least(1),
    "model.kernel_size": _int_at_least(1),
    "model.n_groups": _int_at_least(1),
    "model.state_emb_dim": _int_at_least(1),
    "model.time_emb_dim": _int_at_least(1),
    "eval.n_episodes": _int_at_least(1),
    "eval.max_steps": _int_at_least(1),
    "eval.num_envs": _int_at_least(0),
    "eval.num_workers": _int_at_least(0),
    "eval.n_plot": _int_at_least(0),
    "eval.n_videos": _int_at_least(0),
    "toy.n_samples": _int_at_least(1),
    # capacity
    "state_dim": _int_at_least(1),
    "action_dims": _int_at_least(1),
    "hidden_widths": _int_at_least(1),
    "spectral_bound": _number(lambda x: x > 0, "a number > 0"),
    "rademacher.sample_sizes": _int_at_least(1),
    "rademacher.n_sign_draws": _int_at_least(1),
    "rademacher.n_restarts": _int_at_least(1),
    "rademacher.ascent_steps": _int_at_least(1),
    "rademacher.ascent_lr": _number(lambda x: x > 0, "a number > 0"),
    "rademacher.reference_sign_draws": _int_at_least(1),
    "generalization.action_dims": _int_at_least(1),
    "generalization.n_seeds": _int_at_least(1),
    "generalization.n_train": _int_at_least(1),
    "generalization.n_test": _int_at_least(1),
    "generalization.train_steps": _int_at_least(1),
    "generalization.train_lr": _number(lambda x: x > 0, "a number > 0"),
    "generalization.label_noise": _number(lambda x: x >= 0, "a number >= 0"),
    # SAC
    "sac.batch_size": _int_at_least(1),
    "sac.total_env_steps": _int_at_least(1),
    "sac.warmup_env_steps": _int_at_least(0),
    "sac.replay_capacity": _int_at_least(1),
    "sac.utd_ratio": _int_at_least(1),
    "sac.num_critics": _int_at_least(2),
    "sac.discount": _number(lambda x: 0 < x <= 1, "a number in (0, 1]"),
    "sac.tau": _number(lambda x: 0 < x <= 1, "a number in (0, 1]"),
    "sac.eval_episodes": _int_at_least(1),
    "sac.log_every": _int_at_least(1),
    "sac.eval_every": _int_at_least(1),
    "sac.checkpoint_every": _int_at_least(1),
    "sac.max_checkpoints": _int_at_least(1),
    "num_envs": _int_at_least(1),
    "max_episode_steps": _int_at_least(1),
}


# Where an experiment allows what the general rule does not.
_EXPERIMENT_RANGES = {
    "robomimic": {"eval.max_steps": (lambda x: _is_int(x) and x >= 0,
                                     "an integer >= 0 (0: the task's budget)")},
}


def _scalars(value):
    """The scalars in a value, a tuple, or a sweep grid's tuple of tuples."""
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _scalars(v)
    else:
        yield value


def _rule_for(key: str, experiment=None):
    for suffix, rule in _EXPERIMENT_RANGES.get(experiment, {}).items():
        if key == suffix:
            return rule
    for suffix, rule in _RANGES.items():
        if key == suffix or key.endswith("." + suffix):
            return rule
    return None


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every value against its allowed range before any work starts.

    Raises ConfigError with one line per bad key, naming the key, the value and
    what is allowed. Tuples (widths, dims, sweep grid values) are checked element
    by element.
    """
    from flax import traverse_util  # flax imports jax; config files need neither
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    errors = []
    for key, value in flat.items():
        rule = _rule_for(key, flat.get("experiment"))
        if rule is None:
            continue
        check, allowed = rule
        if not all(check(v) for v in _scalars(value)):
            errors.append(f"  {key}={value!r}: must be {allowed}"
                          + (" (each entry)" if isinstance(value, (tuple, list)) else ""))
    # Relations between keys, for every sub-config that holds them.
    for key, value in flat.items():
        prefix = key[: -len("data.pred_horizon")]
        if key.endswith("data.pred_horizon") and _is_int(value):
            exec_h = flat.get(prefix + "data.exec_horizon")
            if _is_int(exec_h) and exec_h > value:
                errors.append(f"  {prefix}data.exec_horizon={exec_h}: must be <= "
                              f"{prefix}data.pred_horizon={value} (a replan executes at most "
                              "the predicted chunk)")
        prefix = key[: -len("diffusion.gamma")]
        if key.endswith("diffusion.gamma") and isinstance(value, (int, float)):
            lo, hi = flat.get(prefix + "diffusion.sigma_min"), flat.get(prefix + "diffusion.sigma_max")
            T = flat.get(prefix + "diffusion.T")
            if isinstance(T, (int, float)) and value > T:
                errors.append(f"  {prefix}diffusion.gamma={value}: must be in (0, "
                              f"{prefix}diffusion.T={T}]")
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo >= hi:
                errors.append(f"  {prefix}diffusion.sigma_min={lo}: must be < "
                              f"{prefix}diffusion.sigma_max={hi}")
        prefix = key[: -len("model.conv_impl")]
        if key.endswith("model.conv_impl") and value == "winograd" and \
                flat.get(prefix + "model.dtype") == "bfloat16":
            errors.append(f"  {prefix}model.conv_impl='winograd': cannot run with "
                          f"{prefix}model.dtype='bfloat16' (the Winograd transforms amplify "
                          "bfloat16 rounding); use 'lax', 'windows' or 'auto'")
    if flat.get("experiment") in ("toy",) or flat.get("sweep.task") == "toy":
        for key in ("data.obs_horizon", "data.pred_horizon", "data.exec_horizon"):
            if _is_int(flat.get(key)) and flat[key] > 1:
                errors.append(f"  {key}={flat[key]!r}: must be 1 (the toy task has one state "
                              "and one action per sample)")
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(errors))
