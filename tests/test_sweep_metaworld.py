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

    # The main job with two training seeds: one run after another, each in DIR/<task>/seed<k>.
    cfg = config_lib.load("sweeps/metaworld.py:tiny", {"seeds": (0, 1), "data.cache_dir": demos_dir})
    aggregate = imitation.train_and_evaluate(cfg, str(tmp_path / "singles"))
    assert [r for r in aggregate["tasks"][0]["reports"]] == [
        "button-press-v3/seed0/report.json", "button-press-v3/seed1/report.json"]
    singles = []
    for seed in (0, 1):
        run = tmp_path / "singles" / "button-press-v3" / f"seed{seed}"
        singles.append((json.load(open(run / "report.json")), Policy.load(str(run))))

    sweep_dir = str(tmp_path / "sweep")
    trained = runner.train_group(sweep_cfg, sweep_dir, group)
    state = trained.state
    assert trained.resumed_from_step == 0
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
