"""Policy: saved in the run's checkpoint, loaded back acting bitwise the same; bad input."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.io import run_dir
from energyflow_jax.models import EnergyFlowModel
from energyflow_jax.normalizer import Normalizer
from energyflow_jax.policy import Policy


def _policy(obs_dim=3, act_dim=2, obs_horizon=2, pred_horizon=4, seed=0):
    cfg = config_lib.load("sweeps/toy.py:tiny")
    model = EnergyFlowModel.create(cfg.model, (obs_horizon, obs_dim), (pred_horizon, act_dim))
    rng = np.random.default_rng(seed)
    obs_norm = Normalizer(jnp.asarray(rng.normal(size=obs_dim), jnp.float32),
                          jnp.asarray(rng.uniform(0.5, 2, obs_dim), jnp.float32))
    act_norm = Normalizer(jnp.asarray(rng.normal(size=act_dim), jnp.float32),
                          jnp.asarray(rng.uniform(0.1, 0.5, act_dim), jnp.float32))
    return Policy.create(model, cfg.model, cfg.diffusion, model.init(jax.random.PRNGKey(seed)),
                         obs_norm, act_norm, action_bounds=(-1.0, 1.0))


def _save(workdir, policy, step=10, with_policy=True):
    manager = run_dir.checkpoint_manager(str(workdir), 2)
    state = {"step": jnp.asarray(step)}
    run_dir.save_checkpoint(manager, step, state, run_dir.run_spec({"seed": 0}, None),
                            policy.checkpoint_args() if with_policy else None)
    manager.wait_until_finished()
    manager.close()


def test_save_load_round_trip_acts_bitwise_the_same(tmp_path):
    policy = _policy()
    _save(tmp_path, policy, step=10)
    _save(tmp_path, _policy(seed=1), step=20)
    obs = np.random.default_rng(3).normal(size=(5, 2, 3)).astype(np.float32)
    rng = jax.random.PRNGKey(7)

    loaded = Policy.load(str(tmp_path), step=10)
    np.testing.assert_array_equal(np.asarray(loaded.act(obs, rng)), np.asarray(policy.act(obs, rng)))
    np.testing.assert_array_equal(np.asarray(loaded.energy(obs, policy.act(obs, rng))),
                                  np.asarray(policy.energy(obs, policy.act(obs, rng))))
    chex.assert_trees_all_equal(loaded.obs_normalizer, policy.obs_normalizer)
    assert loaded.settings == policy.settings

    latest = Policy.load(str(tmp_path))  # the newest step: the other policy
    assert not np.array_equal(np.asarray(latest.act(obs, rng)), np.asarray(policy.act(obs, rng)))

    chunk = loaded.act(obs[:1], rng)  # any batch size
    chex.assert_shape(chunk, (1, 4, 2))
    assert float(jnp.max(jnp.abs(loaded.act(obs, rng)))) <= 1.0


def test_energy_reads_unnormalized_inputs():
    policy = _policy()
    obs = np.zeros((2, 2, 3), np.float32)
    a = np.zeros((2, 4, 2), np.float32)
    # energy() normalizes with the policy's statistics: equal to the model's energy of
    # normalized inputs at gamma.
    s = policy.obs_normalizer.normalize(obs)
    z = policy.action_normalizer.normalize(a)
    expected = policy.model.energy(policy.params, z, s,
                                   jnp.full((2,), policy.settings["gamma"], jnp.float32))
    np.testing.assert_allclose(policy.energy(obs, a), expected, rtol=1e-6)


def test_candidates_act_with_the_lowest_energy_chunk():
    """n_candidates=4: the executed chunk is, per observation, the candidate of least
    energy among the 4 the sampler draws with the same key (candidate-major rows)."""
    policy = _policy()
    picky = policy.with_settings(n_candidates=4)
    assert picky.settings["n_candidates"] == 4 and policy.settings["n_candidates"] == 1
    obs = np.random.default_rng(5).normal(size=(3, 2, 3)).astype(np.float32)
    rng = jax.random.PRNGKey(11)
    chosen = np.asarray(picky.act(obs, rng))
    chex.assert_shape(chosen, (3, 4, 2))
    # The candidates: the plain sampler on the tiled observations, same key.
    tiled = np.tile(obs, (4, 1, 1))
    candidates = np.asarray(policy.act(tiled, rng)).reshape(4, 3, 4, 2)
    energies = np.asarray(policy.energy(tiled, candidates.reshape(12, 4, 2))).reshape(4, 3)
    best = np.argmin(energies, axis=0)
    assert len(set(best.tolist())) > 1 or best[0] != 0  # not always the first candidate
    np.testing.assert_allclose(chosen, candidates[best, np.arange(3)], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(picky.energy(obs, chosen)) <= energies.min(axis=0) + 1e-5)


def test_candidates_need_an_energy_and_sane_settings():
    cfg = config_lib.load("sweeps/toy.py:tiny")
    cfg.model.kind = "free"
    model = EnergyFlowModel.create(cfg.model, (2, 3), (4, 2))
    cfg.diffusion.n_candidates = 2
    with pytest.raises(ValueError, match="has none"):
        Policy.create(model, cfg.model, cfg.diffusion, model.init(jax.random.PRNGKey(0)),
                      Normalizer.identity(3), Normalizer.identity(2))
    policy = _policy()
    with pytest.raises(ValueError, match="unknown sampler settings"):
        policy.with_settings(n_candidate=2)
    with pytest.raises(ValueError, match="int >= 1"):
        policy.with_settings(n_candidates=0)


def test_bad_input_and_bad_workdirs(tmp_path):
    policy = _policy()
    with pytest.raises(ValueError, match=r"observation history of shape \(5, 3, 3\)"):
        policy.act(np.zeros((5, 3, 3)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="do not match"):
        policy.energy(np.zeros((5, 2, 3)), np.zeros((5, 3, 2)))

    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Policy.load(str(missing))
    assert not missing.exists()  # nothing written

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        Policy.load(str(empty))
    # A partial workdir: a save that was killed leaves only orbax's temporary directory.
    (empty / "checkpoints" / "30.orbax-checkpoint-tmp-123").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        Policy.load(str(empty))
    assert os.listdir(empty / "checkpoints") == ["30.orbax-checkpoint-tmp-123"]

    stateless = tmp_path / "stateless"
    _save(stateless, policy, with_policy=False)  # a checkpoint of the train state alone
    with pytest.raises(ValueError, match="holds no policy.*Retrain"):
        Policy.load(str(stateless))
    with pytest.raises(ValueError, match="no checkpoint at step 99"):
        Policy.load(str(stateless), step=99)

    # A workdir from before checkpoints had items (the state saved as orbax's default
    # item, the run spec in run_spec.json): training resumes from it, and Policy.load
    # refuses it with the way out.
    old = tmp_path / "old"
    manager = run_dir.checkpoint_manager(str(old), 2)
    manager.save(5, args=run_dir.ocp.args.StandardSave({"w": jnp.arange(3.0)}))
    manager.wait_until_finished()
    manager.close()
    spec = run_dir.run_spec({"seed": 0}, None)
    with pytest.raises(ValueError, match="no readable record of the settings"):
        run_dir.restore_verified(str(old), {"w": jnp.zeros(3)}, spec)
    run_dir.write_json(str(old / run_dir.LEGACY_RUN_SPEC_FILE), spec)
    restored, step = run_dir.restore_verified(str(old), {"w": jnp.zeros(3)}, spec)
    assert step == 5 and np.array_equal(np.asarray(restored["w"]), [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="holds no policy.*Retrain"):
        Policy.load(str(old))
