"""A Meta-World sweep: two seeds in one program equal two separate runs of the main job."""
import json
import os

import chex
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.experiments import imitation
from energyflow_jax.policy import Policy
from energyflow_jax.sweep import grid, runner
from energyflow_jax.training import unstack


@pytest.mark.slow
def test_two_seed_tiny_sweep_equals_two_separate_tiny_runs(tmp_path):
    sweep_cfg = config_lib.load("sweeps/sweep_metaworld.py:tiny")
    demos_dir = str(tmp_path / "demos")  # one demo cache for all runs: same data
    with sweep_cfg.unlocked():
        sweep_cfg.data.cache_dir = demos_dir
    (group,) = grid.group_members(grid.expand(sweep_cfg))
    assert [m.seed for m in group.members] == [0, 1]

    singles = []
    for seed in (0, 1):
        cfg = config_lib.load("sweeps/metaworld.py:tiny", {"seed": seed, "data.cache_dir": demos_dir})
        workdir = str(tmp_path / f"single{seed}")
        singles.append((imitation.train_and_evaluate(cfg, workdir), Policy.load(workdir)))

    sweep_dir = str(tmp_path / "sweep")
    state, start, _, _ = runner.train_group(sweep_cfg, sweep_dir, group)
    assert start == 0
    for i, (_, policy) in enumerate(singles):
        chex.assert_trees_all_close(unstack(state.ema_params, i), policy.params,
                                    rtol=1e-4, atol=1e-6)

    report = runner.run(sweep_cfg, sweep_dir)  # the trained group is resumed, then evaluated
    assert report["n_members"] == 2
    results = json.load(open(os.path.join(sweep_dir, "results.json")))
    for member, (single, _) in zip(results["members"], singles):
        assert member["seed"] == single["config"]["seed"]
        got = member["metrics"]
        assert got["n_episodes"] == single["n_episodes"]
        assert got["success_rate"] == single["success_rate"]
        np.testing.assert_allclose(got["ci95"], single["ci95"])
    md = open(os.path.join(sweep_dir, "results.md")).read()
    assert "## Members" in md and "95% CI (Wilson)" in md and md.count("| ★ |") == 1
    assert os.path.getsize(os.path.join(sweep_dir, "results.png")) > 1000
