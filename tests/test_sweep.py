"""Sweeps: expansion and grouping, vmapped members == separate runs, resume."""
import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax import training
from energyflow_jax.sweep import grid as sweep_grid_lib, runner, tasks
from energyflow_jax.models import EnergyFlowModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep_config(grid=None, settings=(), seeds=(0, 1), **overrides):
    """sweeps/sweep_toy.py:tiny with its sweep section replaced (unlocked copy, relocked)."""
    c = config_lib.load("sweeps/sweep_toy.py:tiny").copy_and_resolve_references()
    c.unlock()
    c.model.mlp_dims = (16,)
    c.sweep.seeds = tuple(seeds)
    c.sweep.settings = tuple(settings)
    c.sweep.grid = sweep_grid_lib.sweep_grid(grid or {})
    for key, value in overrides.items():
        node, leaf = sweep_grid_lib._lookup(c, key, "test")
        node[leaf] = value
    c.lock()
    return c


def test_expansion_and_grouping():
    c = sweep_config(grid={"optim.learning_rate": (1e-3, 3e-3),
                           "diffusion.sigma_max": (2.0, 5.0),
                           "model.mlp_dims": ((16,), (32, 32))},
                     settings=({"optim.ema_decay": 0.99}, {"train.batch_size": 16}),
                     seeds=(0, 1, 2))
    members = sweep_grid_lib.expand(c)
    # settings x grid x seeds
    assert len(members) == 2 * 8 * 3
    assert [m.seed for m in members[:4]] == [0, 1, 2, 0]
    m = members[-1]
    assert m.config.train.batch_size == 16 and m.config.model.mlp_dims == (32, 32)
    assert m.config.optim.learning_rate == 3e-3 and m.config.diffusion.sigma_max == 5.0
    assert m.config.seed == 2 and m.config.is_locked
    assert members[0].config.optim.ema_decay == 0.99

    groups = sweep_grid_lib.group_members(members)
    # Shape keys (widths; batch size) split groups; lr, sigma_max, ema decay and seeds do not.
    assert len(groups) == 4 and all(len(g.members) == 12 for g in groups)
    for g in groups:
        statics = {(x.config.model.mlp_dims, x.config.train.batch_size) for x in g.members}
        assert len(statics) == 1
        vm = {(x.config.optim.learning_rate, x.config.diffusion.sigma_max, x.seed)
              for x in g.members}
        assert len(vm) == 12
    assert len({g.gid for g in groups}) == 4
    # Stable ids: the same config expands to the same group directories.
    assert [g.gid for g in sweep_grid_lib.group_members(sweep_grid_lib.expand(c))] == [g.gid for g in groups]

    only_vmappable = sweep_config(grid={"optim.learning_rate": (1e-3, 3e-3, 1e-2),
                                        "diffusion.sigma_min": (0.005, 0.01),
                                        "optim.ema_decay": (0.9, 0.99)})
    assert len(sweep_grid_lib.group_members(sweep_grid_lib.expand(only_vmappable))) == 1


def test_group_ids_and_data_follow_every_setting_that_changes_training():
    """A sweepable key set outside the grid changes the group ids (a re-run in the
    same workdir must not resume or report the old groups), and a grid over the
    training set's size trains each group on its own size."""
    grid = {"optim.learning_rate": (1e-3, 3e-3)}
    base = [g.gid for g in sweep_grid_lib.group_members(sweep_grid_lib.expand(sweep_config(grid=grid)))]
    for key, value in [("diffusion.sigma_min", 0.02), ("optim.ema_decay", 0.9)]:
        other = sweep_config(grid=grid, **{key: value})
        gids = [g.gid for g in sweep_grid_lib.group_members(sweep_grid_lib.expand(other))]
        assert len(gids) == len(base) and not set(gids) & set(base), key

    c = sweep_config(grid={"toy.n_samples": (64, 96)})
    groups = sweep_grid_lib.group_members(sweep_grid_lib.expand(c))
    sizes = [tasks.ToyTask.data(c, g.config, "")[0]["actions"].shape[0] for g in groups]
    assert sizes == [64, 96]
    heldout = [tasks.ToyTask.data(c, g.config, "")[1]["actions"] for g in groups]
    np.testing.assert_array_equal(heldout[0], heldout[1])  # one held-out set for all


@pytest.mark.parametrize("grid, settings, fragment", [
    ({"optim.learnig_rate": (1e-3,)}, (), "optim.learnig_rate"),
    ({"nosuch.key": (1,)}, (), "nosuch.key"),
    ({"seed": (1, 2)}, (), "sweep.seeds"),
    ({}, ({"model.widht": 3},), "model.widht"),
    ({"diffusion.sigma_min": (20.0,)}, (), "sigma_min"),  # above sigma_max: fails at expansion
])
def test_bad_sweep_keys_fail_with_the_key_name(grid, settings, fragment):
    c = sweep_config(grid=grid, settings=settings)
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        sweep_grid_lib.expand(c)


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# Both tests below train this group shape, so its programs compile once per session.
SHAPE = {"optim.total_steps": 40, "train.steps_per_chunk": 10, "train.checkpoint_every_chunks": 2}


@pytest.mark.slow
def test_vmapped_members_match_separate_runs(tmp_path):
    """Three settings (learning rate and sigma_max) x seeds 0 and 1 (one setting)
    trained together, the member axis padded from 3 to 4 and split over the 2 test
    CPU devices, == each member trained alone by the single-run program
    (training.make_train_chunk); and the pure make_train, vmapped, agrees too."""
    c = sweep_config(settings=({"optim.learning_rate": 1e-3, "diffusion.sigma_max": 5.0},
                               {"optim.learning_rate": 3e-3, "diffusion.sigma_max": 2.0}),
                     seeds=(0, 1), **SHAPE)
    (group,) = sweep_grid_lib.group_members(sweep_grid_lib.expand(c))
    group = dataclasses.replace(group, members=group.members[:3])  # an odd member count
    trained = runner.train_group(c, str(tmp_path), group)
    together, start = trained.state, trained.resumed_from_step
    assert start == 0 and together.params is not None
    chex.assert_tree_shape_prefix(together, (3,))  # the padding copy is dropped
    if len(jax.local_devices()) > 1:
        assert len(trained.info["devices"]) == 2  # the member axis was split
    data, _ = tasks.ToyTask.data(c, group.config, str(tmp_path))
    model = EnergyFlowModel.create(c.model, (1, 2), (1, 2))
    tx = training.make_optimizer(c.optim)
    chunk = training.make_train_chunk(model, tx, c.train.batch_size, 10, training.make_mesh(1))
    create = jax.jit(training.TrainState.create, static_argnums=(0, 1))  # eager: many compiles
    singles = []
    for m in group.members:
        state = create(model, tx, training.HParams.from_config(m.config),
                       jax.random.PRNGKey(m.seed))
        for _ in range(4):
            state, _ = chunk(state, data)
        singles.append(state)
    for i, single in enumerate(singles):
        assert int(together.step[i]) == 40
        _assert_trees_close(training.unstack(together.params, i), single.params)
        _assert_trees_close(training.unstack(together.ema_params, i), single.ema_params)
    losses = [json.loads(ln)["loss"] for ln in open(tmp_path / "groups" / group.gid / "metrics.jsonl")]
    assert np.asarray(losses).shape == (4, 3)  # chunks x members
    # The checkpoint holds the 3 real members: a re-run restores it as is.
    again = runner.train_group(c, str(tmp_path), group)
    assert again.resumed_from_step == 40
    _assert_trees_close(again.state.ema_params, together.ema_params)

    # The purejaxrl-style pure function: jit(vmap(train))(rngs, hparams).
    pair = [m for m in group.members if m.setting_index == 0][:2]  # seeds 0 and 1
    train = training.make_train(c, model, data)
    state, metrics = jax.jit(jax.vmap(train))(
        jnp.stack([jax.random.PRNGKey(m.seed) for m in pair]),
        training.stack([training.HParams.from_config(m.config) for m in pair]))
    assert metrics["loss"].shape == (2, 4)
    for i in range(2):
        _assert_trees_close(training.unstack(state.ema_params, i), singles[i].ema_params)


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resume_does_not_redo_finished_groups(tmp_path):
    """Interrupt a 2-group sweep inside its second group, re-run: the finished
    group is not trained again, the second resumes from its checkpoint, and
    every member ends bitwise equal to an uninterrupted sweep."""
    # One group has the shape of the test above (programs shared); the other a
    # different batch size. Groups of 4 members: settings x seeds.
    c = sweep_config(settings=({"optim.learning_rate": 1e-3, "diffusion.sigma_max": 5.0},
                               {"optim.learning_rate": 3e-3, "diffusion.sigma_max": 2.0},
                               {"optim.learning_rate": 1e-3, "train.batch_size": 16},
                               {"optim.learning_rate": 3e-3, "train.batch_size": 16}),
                     seeds=(0, 1), **SHAPE)
    groups = sweep_grid_lib.group_members(sweep_grid_lib.expand(c))
    assert len(groups) == 2 and all(len(g.members) == 4 for g in groups)
    first, second = (g.gid for g in groups)

    reference = runner.run(c, str(tmp_path / "reference"))
    assert reference["n_members"] == 8 and reference["n_groups"] == 2

    workdir = str(tmp_path / "interrupted")

    def interrupt(gid, step):
        if gid == second and step == 30:  # after the checkpoint at step 20 and one more chunk
            raise _Interrupted

    with pytest.raises(_Interrupted):
        runner.run(c, workdir, on_chunk=interrupt)
    state = json.load(open(os.path.join(workdir, "sweep_state.json")))
    assert state["finished_groups"] == [first] and state["pending_groups"] == [second]
    assert not os.path.exists(os.path.join(workdir, "results.json"))

    report = runner.run(c, workdir)
    assert report["groups_skipped_as_finished"] == 1

    def status(gid):
        return json.load(open(os.path.join(workdir, "groups", gid, "status.json")))

    assert status(first) == {"chunks_trained": 4, "runs": 1, "step": 40, "total_steps": 40}
    # 3 chunks before the interrupt, then 2 more from the step-20 checkpoint.
    assert status(second)["chunks_trained"] == 5 and status(second)["runs"] == 2
    result = json.load(open(os.path.join(workdir, "groups", second, "result.json")))
    assert result["resumed_from_step"] == 20
    steps = [json.loads(ln)["step"] for ln in open(os.path.join(workdir, "groups", second,
                                                               "metrics.jsonl"))]
    assert steps == [10, 20, 30, 40]  # the redone chunk is logged once

    got = json.load(open(os.path.join(workdir, "results.json")))
    want = json.load(open(os.path.join(tmp_path / "reference", "results.json")))
    fingerprints = lambda r: [(m["member"], m["ema_params_sha256"]) for m in r["members"]]  # noqa: E731
    assert fingerprints(got) == fingerprints(want)
    assert got["best_setting_index"] == want["best_setting_index"]

    # Results: one row per setting with mean and std over the 2 seeds, best marked.
    assert len(got["settings"]) == 4
    row = got["settings"][0]
    assert row["seeds"] == [0, 1] and set(row["toy_spearman"]) == {"mean", "std", "n"}
    md = open(os.path.join(workdir, "results.md")).read()
    assert md.count("| ★ |") == 1 and "±" in md
    assert os.path.getsize(os.path.join(workdir, "results.png")) > 1000

    # A finished sweep re-run trains nothing.
    again = runner.run(c, workdir)
    assert again["groups_skipped_as_finished"] == 2
    assert status(first)["runs"] == 1 and status(second)["runs"] == 2


def test_ray_is_optional():
    """No Ray needed without a cluster; asking for one without Ray says how to fix it."""
    try:
        import ray  # noqa: F401
        pytest.skip("ray is installed")
    except ImportError:
        pass
    c = sweep_config(grid={"optim.learning_rate": (1e-3,)})
    c.unlock()
    c.sweep.ray_address = "auto"
    c.lock()
    with pytest.raises(ImportError, match="ray_address"):
        runner._run_groups_ray(c, "/nonexistent", sweep_grid_lib.group_members(sweep_grid_lib.expand(c)))
