"""Scripted-expert demonstrations for Meta-World v3, with a provenance-checked cache.

Task configurations ("configs")
-------------------------------
A Meta-World v3 environment randomizes its layout (object position, goal position,
...) through a "rand vec" drawn uniformly from the env's ``_random_reset_space``,
re-drawn inside ``reset_model`` until task-specific constraints hold (e.g. object
and goal at least 15 cm apart). ``metaworld.MT1`` draws 50 such vectors once, with
the global NumPy RNG, and freezes one of them into the env per episode through
``env.set_task(Task)``.

Fifty configurations are too few for this project: 200 demos would repeat each
config four times (the scripted expert and the simulator are deterministic, so the
repeats are bit-identical trajectories), and carving evaluation configs out of the
same 50 leaves only a handful. We therefore draw configs the same way MT1 does (the
env's own ``reset_model`` with an unfrozen rand vec, so every rejection constraint
is honoured and the distribution is exactly MT1's), but from an indexed, seeded
stream:

    config (task, split, seed, index) -> rand vec drawn with
        numpy.random.default_rng([_CONFIG_SALT, crc32(task), SPLIT_ID[split], seed, index])

Demonstrations use split ``"demo"``, evaluation uses split ``"eval"``. The split id is
part of the RNG entropy, so the two sets are independent continuous draws: no eval
layout is a demo layout (an exact coincidence has probability zero, and
:func:`assert_configs_disjoint` checks it explicitly against the rand vecs stored
with every demo). Each config is a pure function of its key, so any episode can be
re-created from the ``config_index`` stored with it.

Demonstrations
--------------
Only successful expert episodes are kept by default (``successful_only=True``): the
model imitates the expert, and a failed scripted rollout (rare) is not behaviour we
want to clone. Collection draws consecutive config indices until ``n_episodes``
successes are gathered; the expert's success rate over all attempts is recorded in
the provenance. An episode ends at the first step with ``info["success"] == 1``
(that step included), as evaluation does, unless ``steps_after_success`` asks the
expert to go on for that many steps (a reward model then also sees states after
success, which RL visits); ``success_step`` records the first success's index. Expert actions are clipped to [-1, 1]
before stepping and stored clipped: the env clips the xyz part itself and the
gripper actuators have ctrlrange [-1, 1], so the clipped action is exactly what
was executed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import warnings
import zipfile
import zlib
from typing import Any

import numpy as np

from energyflow_jax.io import run_dir

logger = logging.getLogger(__name__)

OBS_DIM = 39
ACTION_DIM = 4

# Success %, mean over 3 seeds, from the paper (Meta-World v2; we run v3). NOTES.md.
PUBLISHED_SUCCESS = {
    "EnergyFlow": {"button-press": 100.0, "drawer-open": 94.2, "assembly": 82.6,
                   "bin-picking": 90.9, "hammer": 94.6},
    "Diffusion Policy": {"button-press": 100.0, "drawer-open": 93.6, "assembly": 76.4,
                         "bin-picking": 89.6, "hammer": 94.0},
}


def short_name(task: str) -> str:
    """"button-press-v3" -> "button-press", the name the paper's table uses."""
    return task[:-3] if task.endswith("-v3") else task
CACHE_FORMAT_VERSION = 1

# Splits of the config stream (demos, imitation evaluation, the reward gates of
# rewards/gates.py); the integer ids enter the RNG entropy.
SPLIT_IDS = {"demo": 0, "eval": 1, "reward_gates": 2}
# Fixed salt so that our config streams do not coincide with other uses of the seeds.
_CONFIG_SALT = 0x45464A58  # "EFJX"

# Episode keys and the cache arrays that hold them.
_EPISODE_ARRAYS = ("obs", "actions", "rewards")
_CACHE_KEYS = (
    "obs",
    "actions",
    "rewards",
    "episode_lengths",
    "success",
    "config_index",
    "rand_vec",
    "provenance",
)
# Added later: caches without it hold episodes that end at their first success.
_OPTIONAL_CACHE_KEYS = ("success_step",)
# Provenance keys added later, with the value every older cache implies.
_PROVENANCE_DEFAULTS = {"steps_after_success": 0}


class DemoCacheError(RuntimeError):
    """A demo cache file exists but cannot be used (corrupt, truncated, malformed)."""


# --------------------------------------------------------------------------- tasks


def valid_task_names() -> list[str]:
    """All Meta-World v3 task names that have both an env and a scripted expert."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.policies import ENV_POLICY_MAP

    return sorted(set(ALL_V3_ENVIRONMENTS) & set(ENV_POLICY_MAP))


def validate_task_name(name: str) -> str:
    """Return ``name`` if it is a Meta-World v3 task, else raise ValueError listing valid names."""
    names = valid_task_names()
    if name not in names:
        hint = ""
        if isinstance(name, str) and not name.endswith("-v3") and f"{name}-v3" in names:
            hint = f" (did you mean '{name}-v3'?)"
        raise ValueError(
            f"Unknown Meta-World v3 task {name!r}{hint}. Valid task names: {', '.join(names)}"
        )
    return name


def make_env(task: str, max_steps: int = 500):
    """A bare Meta-World v3 env for ``task`` (no gymnasium wrappers).

    We step the raw env ourselves: the TimeLimit / task-sampling wrappers of
    ``gymnasium.make("Meta-World/MT1")`` would pick configs from MT1's fixed 50,
    which is exactly what we avoid. ``max_path_length`` is the env's own step
    budget (stepping past it raises), so it is set to ``max_steps``.
    """
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    validate_task_name(task)
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    env = ALL_V3_ENVIRONMENTS[task]()
    env.max_path_length = int(max_steps)
    return env


def _config_rng(task: str, split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    # crc32, not hash(): Python's string hash is salted per process.
    entropy = [_CONFIG_SALT, zlib.crc32(task.encode()), SPLIT_IDS[split], int(seed), int(index)]
    return np.random.default_rng(entropy)


def sample_config(env, task: str, split: str, seed: int, index: int):
    """The metaworld ``Task`` for config ``index`` of stream (task, split, seed).

    The rand vec is drawn by the env's own ``reset_model`` (unfrozen, seeded with
    this config's private generator), which applies the env's rejection
    constraints exactly as ``metaworld.MT1`` does. The returned ``Task`` freezes
    it, goal observable (MT convention: obs[36:39] is the goal position).
    This resets ``env``; call :func:`reset_to_config` afterwards to start an episode.
    """
    from metaworld.env_dict import ML1_ARGS_KWARGS
    from metaworld.types import Task

    task_kwargs = dict(ML1_ARGS_KWARGS[task]["kwargs"])
    task_kwargs.pop("task_id", None)
    saved_rng = env.np_random
    env._set_task_called = True
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env.np_random = _config_rng(task, split, seed, index)
    try:
        env._set_task_inner(**task_kwargs)
        env.reset()
        rand_vec = np.array(env._last_rand_vec, dtype=np.float64)
    finally:
        env.np_random = saved_rng
        env.seeded_rand_vec = False
    data = dict(task_kwargs, rand_vec=rand_vec, env_cls=type(env), partially_observable=False)
    return Task(env_name=task, data=pickle.dumps(data))


def config_rand_vec(config) -> np.ndarray:
    """The frozen rand vec stored in a metaworld ``Task``."""
    return np.asarray(pickle.loads(config.data)["rand_vec"], dtype=np.float64)


def config_rand_vecs(task: str, split: str, seed: int, indices, env=None) -> np.ndarray:
    """Rand vecs (len(indices), d) of configs ``indices`` of stream (task, split, seed)."""
    env = env if env is not None else make_env(task)
    return np.stack([config_rand_vec(sample_config(env, task, split, seed, i)) for i in indices])


def assert_configs_disjoint(rand_vecs_a: np.ndarray, rand_vecs_b: np.ndarray, atol: float = 1e-6):
    """Raise ValueError if any layout in ``a`` coincides (within ``atol``) with one in ``b``."""
    a = np.asarray(rand_vecs_a, dtype=np.float64)
    b = np.asarray(rand_vecs_b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"rand vec shapes differ: {a.shape} vs {b.shape}")
    gap = np.max(np.abs(a[:, None, :] - b[None, :, :]), axis=-1)
    clashes = np.argwhere(gap <= atol)
    if clashes.size:
        i, j = clashes[0]
        raise ValueError(
            f"{len(clashes)} configuration(s) shared between the two sets, e.g. a[{i}] == b[{j}] "
            f"= {a[i]}; evaluation configs must not be demonstration configs"
        )


def reset_to_config(env, config) -> np.ndarray:
    """Freeze ``config`` into ``env`` and reset; returns the first observation (float64)."""
    env.set_task(config)
    obs, _ = env.reset()
    return obs


# --------------------------------------------------------------------------- collection


@contextlib.contextmanager
def quiet_experts():
    # The scripted experts warn on every saturated step ("Constant(s) may be too
    # high"); the env clips anyway, and we clip before stepping.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
        yield


def rollout_expert(env, task: str, config, max_steps: int,
                   steps_after_success: int = 0) -> dict[str, Any]:
    """One scripted-expert episode from ``config``; stops ``steps_after_success`` steps
    after the first success (or at ``max_steps``)."""
    from metaworld.policies import ENV_POLICY_MAP

    expert = ENV_POLICY_MAP[task]()
    obs = reset_to_config(env, config)
    observations, actions, rewards = [], [], []
    success_step = -1
    with quiet_experts():
        for t in range(max_steps):
            action = np.clip(expert.get_action(obs), -1.0, 1.0).astype(np.float32)
            observations.append(obs)
            actions.append(action)
            obs, reward, _, truncated, info = env.step(action)
            rewards.append(reward)
            if success_step < 0 and info["success"] >= 1.0:
                success_step = t
            if truncated or (success_step >= 0 and t - success_step >= steps_after_success):
                break
    return {
        "obs": np.asarray(observations, dtype=np.float32),
        "actions": np.asarray(actions, dtype=np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "success": success_step >= 0,
        "success_step": success_step,
    }


def collect_demos(
    task: str,
    n_episodes: int,
    seed: int,
    max_steps: int = 500,
    progress: bool = True,
    successful_only: bool = True,
    max_attempts: int | None = None,
    steps_after_success: int = 0,
) -> list[dict[str, Any]]:
    """Collect ``n_episodes`` scripted-expert episodes on demo configs of (task, seed).

    Each episode is a dict: obs (T, 39) float32 (obs[t] is seen before actions[t]),
    actions (T, 4) float32 in [-1, 1], rewards (T,) float32, success (bool),
    config_index (int, into the "demo" config stream of ``seed``) and rand_vec
    (the layout, float64), success_step (index of the first success, -1 if none;
    the expert goes on ``steps_after_success`` steps after it). With ``successful_only`` (default) failed expert
    episodes are dropped and further configs are tried, up to ``max_attempts``
    (default 2 * n_episodes + 10); too few successes raise RuntimeError. The
    attempt count is attached to each episode as ``n_attempts`` of the whole run,
    so callers can compute the expert success rate (see :func:`expert_success_rate`).
    """
    from tqdm.auto import tqdm

    validate_task_name(task)
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if steps_after_success < 0:
        raise ValueError(f"steps_after_success must be >= 0, got {steps_after_success}")
    max_attempts = max_attempts if max_attempts is not None else 2 * n_episodes + 10
    env = make_env(task, max_steps)
    episodes: list[dict[str, Any]] = []
    n_attempts = 0
    bar = tqdm(total=n_episodes, desc=f"expert demos {task}", disable=not progress, unit="ep")
    try:
        while len(episodes) < n_episodes:
            if n_attempts >= max_attempts:
                raise RuntimeError(
                    f"Scripted expert for {task} succeeded in only {len(episodes)} of "
                    f"{n_attempts} attempts (needed {n_episodes} successes, max_attempts="
                    f"{max_attempts}, max_steps={max_steps})"
                )
            config = sample_config(env, task, "demo", seed, n_attempts)
            episode = rollout_expert(env, task, config, max_steps, steps_after_success)
            episode["config_index"] = n_attempts
            episode["rand_vec"] = config_rand_vec(config)
            n_attempts += 1
            if episode["success"] or not successful_only:
                episodes.append(episode)
                bar.update(1)
            bar.set_postfix(attempts=n_attempts)
    finally:
        bar.close()
        env.close()
    for episode in episodes:
        episode["n_attempts"] = n_attempts
    return episodes


def expert_success_rate(episodes: list[dict[str, Any]]) -> float:
    """Successes over attempted episodes of one collect_demos run."""
    n_attempts = max(int(ep.get("n_attempts", len(episodes))) for ep in episodes)
    return sum(bool(ep["success"]) for ep in episodes) / max(n_attempts, 1)


# --------------------------------------------------------------------------- cache


def package_versions() -> dict[str, str]:
    """Versions of the packages the demos depend on (part of the cache provenance)."""
    return run_dir.package_versions(("metaworld", "mujoco", "numpy"))


def _requested_provenance(task, n_episodes, seed, max_steps, successful_only,
                          steps_after_success=0) -> dict[str, Any]:
    # Everything that determines the cache content; a cache is reused only if all match.
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "task": task,
        "seed": int(seed),
        "n_episodes": int(n_episodes),
        "max_steps": int(max_steps),
        "successful_only": bool(successful_only),
        "steps_after_success": int(steps_after_success),
        "config_split": "demo",
        "versions": package_versions(),
    }


def save_demo_cache(path: str | os.PathLike, episodes: list[dict[str, Any]], provenance: dict) -> None:
    """Write episodes + provenance to one .npz, atomically (tmp file, fsync, os.replace)."""
    path = os.fspath(path)
    lengths = np.array([len(ep["actions"]) for ep in episodes], dtype=np.int64)
    arrays = {
        "obs": np.concatenate([ep["obs"] for ep in episodes]).astype(np.float32),
        "actions": np.concatenate([ep["actions"] for ep in episodes]).astype(np.float32),
        "rewards": np.concatenate([ep["rewards"] for ep in episodes]).astype(np.float32),
        "episode_lengths": lengths,
        "success": np.array([bool(ep["success"]) for ep in episodes]),
        "config_index": np.array([int(ep["config_index"]) for ep in episodes], dtype=np.int64),
        "success_step": np.array([int(ep["success_step"]) for ep in episodes], dtype=np.int64),
        "rand_vec": np.stack([np.asarray(ep["rand_vec"], np.float64) for ep in episodes]),
        # A 0-d unicode array: readable with allow_pickle=False.
        "provenance": np.array(json.dumps(provenance, sort_keys=True)),
    }
    run_dir.atomic_write(path, lambda f: np.savez(f, **arrays))


def read_demo_cache(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a cache written by :func:`save_demo_cache`: (episodes, provenance).

    Raises DemoCacheError (naming the file, the problem and the fix) for anything
    that is not a complete, self-consistent cache.
    """
    path = os.fspath(path)

    def fail(problem: str) -> DemoCacheError:
        return DemoCacheError(
            f"Demo cache {path!r} is unusable: {problem}. It is probably corrupt or "
            f"truncated (e.g. an interrupted copy); delete it (rm {path!r}) and it will "
            f"be rebuilt by load_or_collect."
        )

    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _CACHE_KEYS if k not in npz.files]
            if missing:
                raise fail(f"missing arrays {missing}")
            # Read everything now: zip member CRCs are checked as members are read.
            data = {k: npz[k] for k in _CACHE_KEYS + _OPTIONAL_CACHE_KEYS if k in npz.files}
    except DemoCacheError:
        raise
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise fail(f"cannot be read as .npz ({type(err).__name__}: {err})") from err

    try:
        provenance = json.loads(str(data["provenance"]))
    except (json.JSONDecodeError, TypeError) as err:
        raise fail(f"provenance is not valid JSON ({err})") from err
    lengths = data["episode_lengths"]
    n = len(lengths)
    total = int(lengths.sum()) if n else 0
    checks = [
        (n > 0, "holds no episodes"),
        (bool(np.all(lengths > 0)), "has empty episodes"),
        (data["obs"].shape == (total, OBS_DIM), f"obs shape {data['obs'].shape} != ({total}, {OBS_DIM})"),
        (data["actions"].shape == (total, ACTION_DIM),
         f"actions shape {data['actions'].shape} != ({total}, {ACTION_DIM})"),
        (data["rewards"].shape == (total,), f"rewards shape {data['rewards'].shape} != ({total},)"),
        (data["success"].shape == (n,) and data["config_index"].shape == (n,) and len(data["rand_vec"]) == n,
         "per-episode arrays disagree on the episode count"),
        (provenance.get("n_episodes") == n, f"provenance says {provenance.get('n_episodes')} episodes, file has {n}"),
    ]
    for key in ("obs", "actions", "rewards"):
        checks.append((bool(np.all(np.isfinite(data[key]))), f"{key} holds NaN or inf"))
    if "success_step" in data:
        checks.append((data["success_step"].shape == (n,)
                       and bool(np.all(data["success_step"] < lengths)),
                       "success_step does not fit the episode lengths"))
    else:  # an older cache: episodes end at their first success
        data["success_step"] = np.where(data["success"], lengths - 1, -1)
    for ok, problem in checks:
        if not ok:
            raise fail(problem)

    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n_attempts = int(provenance.get("n_attempts", n))
    episodes = []
    for i, (start, length) in enumerate(zip(starts, lengths)):
        stop = start + length
        episodes.append({
            "obs": data["obs"][start:stop],
            "actions": data["actions"][start:stop],
            "rewards": data["rewards"][start:stop],
            "success": bool(data["success"][i]),
            "success_step": int(data["success_step"][i]),
            "config_index": int(data["config_index"][i]),
            "rand_vec": data["rand_vec"][i],
            "n_attempts": n_attempts,
        })
    return episodes, provenance


def _provenance_mismatch(found: dict, wanted: dict) -> list[str]:
    return [f"{k}: cached {found.get(k)!r}, requested {v!r}" for k, v in wanted.items()
            if found.get(k, _PROVENANCE_DEFAULTS.get(k)) != v]


def demo_cache_path(config, workdir: str, task: str) -> str:
    """Where a run with this config caches its demos (config.data.cache_dir or DIR/demos)."""
    cache_dir = config.data.cache_dir or os.path.join(workdir, "demos")
    after = int(config.data.get("steps_after_success", 0))
    return os.path.join(cache_dir, f"{task}_n{config.data.n_demos}_seed{config.data.demo_seed}"
                                   f"_T{config.data.max_steps}" + (f"_after{after}" if after else "")
                        + ".npz")


def load_or_collect(
    cache_path: str | os.PathLike,
    task: str,
    n_episodes: int,
    seed: int,
    max_steps: int = 500,
    progress: bool = True,
    successful_only: bool = True,
    steps_after_success: int = 0,
) -> list[dict[str, Any]]:
    """Demos for (task, n_episodes, seed) from ``cache_path``, collecting them if needed.

    A cache whose provenance (task, seed, episode count, budget, success filter,
    config split, format and metaworld/mujoco/numpy versions) differs from the
    request is rebuilt, with a logged warning saying why; it is never reused
    silently. A corrupt or truncated cache raises DemoCacheError. The new cache
    is written atomically. Use :func:`read_demo_cache` for the provenance.
    """
    validate_task_name(task)
    cache_path = os.fspath(cache_path)
    wanted = _requested_provenance(task, n_episodes, seed, max_steps, successful_only,
                                   steps_after_success)
    if os.path.exists(cache_path):
        episodes, found = read_demo_cache(cache_path)
        mismatch = _provenance_mismatch(found, wanted)
        if not mismatch:
            logger.info("Reusing demo cache %s (%d episodes of %s)", cache_path, len(episodes), task)
            return episodes
        logger.warning("Demo cache %s does not match the request (%s); rebuilding it",
                       cache_path, "; ".join(mismatch))
    else:
        logger.info("No demo cache at %s; collecting %d %s demos", cache_path, n_episodes, task)

    episodes = collect_demos(task, n_episodes, seed, max_steps=max_steps, progress=progress,
                             successful_only=successful_only,
                             steps_after_success=steps_after_success)
    provenance = dict(wanted)
    provenance.update(
        n_attempts=int(episodes[0]["n_attempts"]),
        expert_success_rate=expert_success_rate(episodes),
        kept="successful episodes only" if successful_only else "all episodes",
        episode_end=(f"{steps_after_success} steps after the first step with info['success'] "
                     "== 1, else max_steps"),
        n_transitions=int(sum(len(ep["actions"]) for ep in episodes)),
    )
    save_demo_cache(cache_path, episodes, provenance)
    return episodes
