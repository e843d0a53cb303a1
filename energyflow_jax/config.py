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
    ))
    c.diffusion = ml_collections.ConfigDict(dict(
        sigma_min=0.01, sigma_max=10.0, T=1.0,
        n_sample_steps=20,            # K Euler steps of the PF-ODE
        gamma=1e-3,                   # final time of the sampler and the reward
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
