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

PUBLISHED_TASKS = ("button-press-v3", "drawer-open-v3", "assembly-v3", "bin-picking-v3", "hammer-v3")


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


@pytest.mark.slow
def test_table_preset_trains_each_task_as_one_program_and_writes_the_published_rows(tmp_path):
    cfg = config_lib.load("sweeps/sweep_metaworld.py:table_tiny")
    groups = grid.group_members(grid.expand(cfg))
    assert [(g.config.task, [m.seed for m in g.members]) for g in groups] == [
        ("button-press-v3", [0, 1]), ("drawer-open-v3", [0, 1])]
    # Each task's own settings reach its members (as :table's per-task recipe does).
    assert [(g.config.diffusion.n_candidates, g.config.optim.total_steps) for g in groups] == [
        (2, 20), (1, 10)]
    runner.run(cfg, str(tmp_path))
    results = json.load(open(tmp_path / "results.json"))
    table = results["published"]
    assert table["columns"] == ["button-press", "drawer-open"]
    for row in results["settings"]:  # ours: mean and std over the two seeds of each task
        rates = [m["metrics"]["success_rate"] for m in results["members"]
                 if m["setting"]["task"] == row["setting"]["task"]]
        assert len(rates) == 2
        short = row["setting"]["task"][:-3]
        np.testing.assert_allclose(table["ours"][short], (100 * np.mean(rates), 100 * np.std(rates, ddof=1)))
    md = (tmp_path / "results.md").read_text()
    assert "| EnergyFlow (paper) | 100.0 | 94.2 | 97.1 |" in md
    assert "| Diffusion Policy (paper) | 100.0 | 93.6 | 96.8 |" in md
    assert "| ours (mean ± std over seeds) |" in md and "95% CI (Wilson)" in md


def test_published_numbers_match_the_notes():
    """The paper's Meta-World table as NOTES.md gives it (averages 92.5 and 90.7)."""
    from energyflow_jax.data.metaworld import PUBLISHED_SUCCESS

    ef, dp = PUBLISHED_SUCCESS["EnergyFlow"], PUBLISHED_SUCCESS["Diffusion Policy"]
    assert list(ef) == ["button-press", "drawer-open", "assembly", "bin-picking", "hammer"]
    assert [ef[t] for t in ef] == [100.0, 94.2, 82.6, 90.9, 94.6]
    assert [dp[t] for t in ef] == [100.0, 93.6, 76.4, 89.6, 94.0]
    assert round(np.mean(list(ef.values())), 1) == 92.5 and round(np.mean(list(dp.values())), 1) == 90.7


def test_table_free_is_the_table_recipe_with_the_free_field():
    """Like for like: the same tasks, seeds, data, steps and evaluation; only the field
    differs, and the free one draws one chunk (it has no energy to rank candidates)."""
    def groups(preset):
        return grid.group_members(grid.expand(config_lib.load(f"sweeps/sweep_metaworld.py:{preset}")))

    cons, free = groups("table"), groups("table_free")
    assert [g.config.task for g in cons] == list(PUBLISHED_TASKS)
    assert [g.config.task for g in free] == list(PUBLISHED_TASKS)
    for c, f in zip(cons, free):
        assert (c.config.model.kind, f.config.model.kind) == ("conservative", "free")
        assert f.config.diffusion.n_candidates == 1
        cd, fd = c.config.to_dict(), f.config.to_dict()
        for d in (cd, fd):
            d["model"].pop("kind"), d["diffusion"].pop("n_candidates"), d.pop("sweep")
        assert cd == fd
        assert [m.seed for m in c.members] == [m.seed for m in f.members] == [0, 1, 2]


def test_misspelt_task_in_the_table_and_duplicate_seeds_fail_before_any_work(tmp_path):
    cfg = config_lib.load("sweeps/sweep_metaworld.py:table_tiny")
    with cfg.unlocked():
        cfg.sweep.settings = ({"task": "button-press-v3"}, {"task": "drawer-opne-v3"})
    with pytest.raises(ValueError, match="drawer-opne-v3.*drawer-open-v3"):
        runner.run(cfg, str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()  # no demos, no sweep.json
    cfg = config_lib.load("sweeps/sweep_metaworld.py:table_tiny", {"sweep.seeds": (0, 1, 0)})
    with pytest.raises(ValueError, match="duplicates"):
        runner.run(cfg, str(tmp_path / "dup"))
    assert not (tmp_path / "dup").exists()
