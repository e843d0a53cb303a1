"""Scripted-expert demo collection and its provenance-checked cache."""

import json
import logging
import os

import chex
import numpy as np
import pytest

from energyflow_jax.data import metaworld as md

TASK = "button-press-v3"
MAX_STEPS = 150  # button-press experts succeed in ~60 steps


@pytest.fixture(scope="module")
def demos():
    return md.collect_demos(TASK, 2, seed=0, max_steps=MAX_STEPS, progress=False)


def test_collect_demos_successful_and_well_formed(demos):
    assert len(demos) == 2
    for ep in demos:
        T = len(ep["actions"])
        assert 1 <= T < MAX_STEPS
        chex.assert_shape(ep["obs"], (T, md.OBS_DIM))
        chex.assert_shape(ep["actions"], (T, md.ACTION_DIM))
        chex.assert_shape(ep["rewards"], (T,))
        assert ep["obs"].dtype == np.float32 and ep["actions"].dtype == np.float32
        assert ep["success"] is True
        assert np.all(np.abs(ep["actions"]) <= 1.0)
        assert np.all(np.isfinite(ep["obs"]))
        # MT convention: the goal is observable (obs[36:39]) and matches the layout.
        assert np.any(ep["obs"][0, 36:39] != 0)
    assert [ep["config_index"] for ep in demos] == [0, 1]
    assert not np.allclose(demos[0]["rand_vec"], demos[1]["rand_vec"])
    assert md.expert_success_rate(demos) == 1.0


def test_collect_demos_reproducible_and_seed_dependent(demos):
    again = md.collect_demos(TASK, 2, seed=0, max_steps=MAX_STEPS, progress=False)
    for a, b in zip(demos, again):
        for key in ("obs", "actions", "rewards", "rand_vec"):
            np.testing.assert_array_equal(a[key], b[key])
    env = md.make_env(TASK)
    other_seed = md.config_rand_vecs(TASK, "demo", 1, [0, 1], env=env)
    assert not np.allclose(other_seed, np.stack([ep["rand_vec"] for ep in demos]))
    # Configs are drawn from the env's own randomization box.
    space = env._random_reset_space
    assert np.all((other_seed >= space.low) & (other_seed <= space.high))


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError) as err:
        md.validate_task_name("button-press")
    message = str(err.value)
    assert "did you mean 'button-press-v3'" in message
    for name in ("button-press-v3", "drawer-open-v3", "assembly-v3", "bin-picking-v3", "hammer-v3"):
        assert name in message
    assert len(md.valid_task_names()) == 50
    with pytest.raises(ValueError, match="Valid task names"):
        md.collect_demos("no-such-task-v3", 1, seed=0, progress=False)


def _fake_collect(calls):
    def collect(task, n_episodes, seed, max_steps=500, progress=True, successful_only=True,
                steps_after_success=0):
        calls.append((task, n_episodes, seed))
        rng = np.random.default_rng(seed)
        return [
            {
                "obs": rng.normal(size=(5 + i, md.OBS_DIM)).astype(np.float32),
                "actions": rng.uniform(-1, 1, (5 + i, md.ACTION_DIM)).astype(np.float32),
                "rewards": np.ones(5 + i, np.float32),
                "success": True,
                "success_step": 4 + i,
                "config_index": i,
                "rand_vec": rng.uniform(size=3),
                "n_attempts": n_episodes,
            }
            for i in range(n_episodes)
        ]

    return collect


def test_cache_reused_and_rebuilt_on_provenance_mismatch(tmp_path, monkeypatch, caplog, demos):
    path = tmp_path / "demos.npz"
    calls = []
    # Real demos for the first build: the round trip must be exact.
    monkeypatch.setattr(md, "collect_demos", lambda *a, **k: calls.append(a) or demos)
    first = md.load_or_collect(path, TASK, 2, seed=0, max_steps=MAX_STEPS, progress=False)
    assert len(calls) == 1 and path.exists()
    episodes, provenance = md.read_demo_cache(path)
    for a, b in zip(demos, episodes):
        for key in ("obs", "actions", "rewards", "rand_vec"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["config_index"] == b["config_index"] and b["success"] is True
    assert provenance["task"] == TASK and provenance["seed"] == 0 and provenance["n_episodes"] == 2
    assert provenance["expert_success_rate"] == 1.0
    assert provenance["kept"] == "successful episodes only"
    assert set(provenance["versions"]) == {"metaworld", "mujoco", "numpy"}
    assert len(first) == 2

    # Same request: reused, nothing collected.
    md.load_or_collect(path, TASK, 2, seed=0, max_steps=MAX_STEPS, progress=False)
    assert len(calls) == 1

    # Different seed / episode count / package version: rebuilt, with a logged reason.
    fake_calls = []
    monkeypatch.setattr(md, "collect_demos", _fake_collect(fake_calls))
    with caplog.at_level(logging.WARNING, logger=md.__name__):
        md.load_or_collect(path, TASK, 2, seed=1, max_steps=MAX_STEPS, progress=False)
    assert fake_calls == [(TASK, 2, 1)]
    assert "seed: cached 0, requested 1" in caplog.text and "rebuilding" in caplog.text
    assert md.read_demo_cache(path)[1]["seed"] == 1

    md.load_or_collect(path, TASK, 3, seed=1, max_steps=MAX_STEPS, progress=False)
    assert len(fake_calls) == 2 and md.read_demo_cache(path)[1]["n_episodes"] == 3

    real_versions = md.package_versions()
    monkeypatch.setattr(md, "package_versions", lambda: {**real_versions, "mujoco": "0.0.1"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=md.__name__):
        md.load_or_collect(path, TASK, 3, seed=1, max_steps=MAX_STEPS, progress=False)
    assert len(fake_calls) == 3 and "versions" in caplog.text
    # No temporary files are left behind by the atomic writes.
    assert os.listdir(tmp_path) == ["demos.npz"]


def test_failed_write_leaves_existing_cache_intact(tmp_path, monkeypatch):
    path = tmp_path / "demos.npz"
    episodes = _fake_collect([])(TASK, 2, 0)
    md.save_demo_cache(path, episodes, {"n_episodes": 2})
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(md.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        md.save_demo_cache(path, episodes, {"n_episodes": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["demos.npz"]


def test_corrupt_or_truncated_cache_raises_demo_cache_error(tmp_path):
    path = tmp_path / "demos.npz"
    md.save_demo_cache(path, _fake_collect([])(TASK, 2, 0), {"n_episodes": 2})
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(md.DemoCacheError, match=r"demos\.npz.*delete it"):
        md.load_or_collect(path, TASK, 2, seed=0, progress=False)

    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(md.DemoCacheError, match="cannot be read"):
        md.read_demo_cache(path)

    # A readable npz that is not a complete cache.
    np.savez(path, obs=np.zeros((3, md.OBS_DIM), np.float32))
    with pytest.raises(md.DemoCacheError, match="missing arrays"):
        md.read_demo_cache(path)

    # Inconsistent content: provenance and arrays disagree.
    md.save_demo_cache(path, _fake_collect([])(TASK, 2, 0), {"n_episodes": 5})
    with pytest.raises(md.DemoCacheError, match="provenance says 5 episodes"):
        md.read_demo_cache(path)

    # Corrupted bytes inside a member: zip CRC check.
    md.save_demo_cache(path, _fake_collect([])(TASK, 2, 0), {"n_episodes": 2})
    data = bytearray(path.read_bytes())
    offset = data.index(b"NUMPY") + 200  # inside the first array's payload
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(md.DemoCacheError, match="CRC"):
        md.read_demo_cache(path)


def test_config_streams_reproducible_and_disjoint():
    env = md.make_env(TASK)
    demo = md.config_rand_vecs(TASK, "demo", 0, range(10), env=env)
    evals = md.config_rand_vecs(TASK, "eval", 0, range(10), env=env)
    np.testing.assert_array_equal(demo, md.config_rand_vecs(TASK, "demo", 0, range(10), env=env))
    assert len(np.unique(demo, axis=0)) == 10
    md.assert_configs_disjoint(demo, evals)
    with pytest.raises(ValueError, match="shared between"):
        md.assert_configs_disjoint(demo, np.concatenate([evals, demo[3:4]]))
    with pytest.raises(ValueError, match="split must be"):
        md.sample_config(env, TASK, "train", 0, 0)


def test_provenance_is_json_in_cache(tmp_path):
    path = tmp_path / "demos.npz"
    md.save_demo_cache(path, _fake_collect([])(TASK, 1, 0), {"n_episodes": 1, "task": TASK})
    with np.load(path, allow_pickle=False) as npz:
        assert json.loads(str(npz["provenance"]))["task"] == TASK
