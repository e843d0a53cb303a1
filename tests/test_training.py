import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax import training
from energyflow_jax.training.loop import fit, validate_data
from helpers import gaussian_data, tiny_config
from energyflow_jax.models import EnergyFlowModel


def _step(model, tx, state, batch):
    """train_step, jitted: op by op, every primitive of the double backprop compiles alone."""
    return jax.jit(training.train_step, static_argnums=(0, 1))(model, tx, state, batch)


def _setup(arch="mlp", kind="conservative"):
    c = tiny_config(kind, arch)
    model = EnergyFlowModel.create(c.model, (2, 3), (4, 2))
    tx = training.make_optimizer(c.optim)
    state = training.TrainState.create(model, tx, training.HParams.from_config(c),
                                       jax.random.PRNGKey(0))
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    data = {"obs": jax.random.normal(k1, (256, 2, 3)), "actions": jax.random.normal(k2, (256, 4, 2))}
    return model, tx, state, data


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_sharded_training_on_two_devices_matches_one_device(arch):
    assert len(jax.devices()) >= 2, "conftest sets two host devices"
    model, tx, state, data = _setup(arch)
    results = []
    for n_devices in (1, 2):
        mesh = training.make_mesh(n_devices)
        chunk = training.make_train_chunk(model, tx, 16, 5, mesh)
        s = training.replicate(jax.tree.map(jnp.copy, state), mesh)
        d = training.replicate(data, mesh)
        for _ in range(2):
            s, metrics = chunk(s, d)
        results.append(jax.device_get(s))
    chex.assert_trees_all_close(results[0].params, results[1].params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(results[0].ema_params, results[1].ema_params, rtol=1e-5, atol=1e-6)
    assert int(results[1].step) == 10
    # Training moved the params (the comparison is not between two no-ops).
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), results[0].params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_non_finite_gradients_are_skipped_and_counted():
    model, tx, state, data = _setup()
    batch = {k: v[:8] for k, v in data.items()}
    bad = {**batch, "actions": batch["actions"].at[0, 0, 0].set(jnp.inf)}
    after_bad, metrics = _step(model, tx, state, bad)
    assert int(after_bad.n_skipped) == 1
    chex.assert_trees_all_equal(after_bad.params, state.params)
    # Two good steps: warmup starts at lr 0, and the skipped step did not
    # advance the schedule.
    after_good, _ = _step(model, tx, after_bad, batch)
    after_good, _ = _step(model, tx, after_good, batch)
    assert int(after_good.n_skipped) == 1
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), after_good.params, state.params)
    assert any(jax.tree.leaves(changed))


def test_ema_warms_up_then_follows_decay():
    np.testing.assert_allclose(training.ema_decay_at(jnp.array(0), jnp.array(0.999)), 0.1)
    np.testing.assert_allclose(training.ema_decay_at(jnp.array(10**6), jnp.array(0.999)), 0.999)
    model, tx, state, data = _setup()
    batch = {k: v[:8] for k, v in data.items()}
    new, _ = _step(model, tx, state, batch)
    # ema = 0.1 * old + 0.9 * new params at step 0.
    expected = jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, state.ema_params, new.params)
    chex.assert_trees_all_close(new.ema_params, expected, rtol=1e-6)


def test_bad_training_inputs_are_refused():
    model, tx, state, data = _setup()
    with pytest.raises(ValueError, match="NaN or inf"):
        validate_data({**data, "obs": data["obs"].at[3, 0, 0].set(jnp.nan)})
    with pytest.raises(ValueError, match="number of windows"):
        validate_data({**data, "obs": data["obs"][:10]})
    with pytest.raises(ValueError, match="needs key 'actions'"):
        validate_data({"obs": data["obs"]})
    with pytest.raises(ValueError, match="not divisible"):
        training.make_train_chunk(model, tx, 15, 2, training.make_mesh(2))
    with pytest.raises(ValueError, match="only 2 devices"):
        training.make_mesh(3)


def test_fit_reruns_a_finished_run_and_refuses_other_settings(tmp_path):
    """Re-running a finished run (total_steps not a multiple of steps_per_chunk)
    trains nothing and reports its last metrics; a checkpoint trained with other
    settings or other data is refused with what differs; a change of
    checkpoint cadence or logging is not."""
    def config(**overrides):
        c = tiny_config()
        c.optim.total_steps, c.train.steps_per_chunk, c.train.batch_size = 25, 10, 16
        for key, value in overrides.items():
            section, leaf = key.split(".")
            c[section][leaf] = value
        return c

    model = EnergyFlowModel.create(config().model, (1, 1), (1, 2))
    data, workdir = gaussian_data(64), str(tmp_path)
    state, info = fit(config(), workdir, model, data)
    assert info["steps"] == 25 and info["resumed_from_step"] == 0
    state2, again = fit(config(**{"train.checkpoint_every_chunks": 1, "log.progress": True}),
                        workdir, model, data)
    assert again["steps"] == 25 and again["resumed_from_step"] == 25
    assert again["final_metrics"] == info["final_metrics"] and "loss" in info["final_metrics"]
    chex.assert_trees_all_equal(state2.ema_params, state.ema_params)

    with pytest.raises(ValueError, match=r"optim\.learning_rate: 0\.0001 .*, 0\.003 now"):
        fit(config(**{"optim.learning_rate": 3e-3}), workdir, model, data)
    with pytest.raises(ValueError, match="the training data"):
        fit(config(), workdir, model, gaussian_data(64, seed=1))


def test_compilation_cache_dir_keeps_compiled_programs(tmp_path):
    """train.compilation_cache_dir: a compiled program lands in the named folder,
    which wins over a cache dir set in the environment (the suite sets one)."""
    cache = tmp_path / "xla_cache"
    code = ("import sys, jax, jax.numpy as jnp\n"
            "from energyflow_jax.training.loop import use_compilation_cache\n"
            "use_compilation_cache(sys.argv[1])\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64))).block_until_ready()\n")
    subprocess.run([sys.executable, "-c", code, str(cache)], check=True, timeout=120)
    assert cache.is_dir() and any(cache.iterdir())
