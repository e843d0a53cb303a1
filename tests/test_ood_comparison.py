"""Conservative vs free out of distribution: a Meta-World sweep over model.kind evaluated at
OOD levels, compared episode by episode (sweep/compare.py)."""
import json
import os

import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.sweep import grid, runner


@pytest.mark.slow
def test_ood_preset_pairs_conservative_and_free_episode_by_episode(tmp_path):
    cfg = config_lib.load("sweeps/sweep_metaworld.py:ood_tiny", {"eval.ood_levels": ("S", "L")})
    groups = grid.group_members(grid.expand(cfg))
    assert [g.config.model.kind for g in groups] == ["conservative", "free"]
    runner.run(cfg, str(tmp_path))
    results = json.load(open(tmp_path / "results.json"))
    members = {(m["setting"]["model.kind"], m["seed"]): m["metrics"] for m in results["members"]}
    for metrics in members.values():
        episodes = metrics["episode_success"]
        assert metrics["levels"] == ["0", "S", "L"]  # the config's order, not the file's
        assert sorted(episodes) == ["0", "L", "S"] and all(len(e) == 2 for e in episodes.values())
        assert metrics["success_rate"] == np.mean(episodes["0"])  # level 0 is the usual metric
        assert metrics["success_rate_L"] == np.mean(episodes["L"])
    (row,) = results["kind_comparison"]["rows"]
    assert row["setting"] == {"task": "button-press-v3"} and row["seeds"] == [0, 1]
    assert [lv["level"] for lv in row["levels"]] == ["0", "S", "L"]
    for lv in row["levels"]:
        cons = np.concatenate([members[("conservative", s)]["episode_success"][lv["level"]] for s in (0, 1)])
        free = np.concatenate([members[("free", s)]["episode_success"][lv["level"]] for s in (0, 1)])
        assert lv["n_pairs"] == 4
        assert lv["difference"]["mean"] == pytest.approx(np.mean(cons - free))
        assert lv["difference"]["low"] <= lv["difference"]["mean"] <= lv["difference"]["high"]
    md = (tmp_path / "results.md").read_text()
    assert "## conservative vs free, episode by episode" in md and "| task=button-press-v3 | L |" in md
    assert os.path.getsize(tmp_path / "ood.png") > 1000


def _member(kind, seed, episodes):
    return {"setting": {"task": "t", "model.kind": kind}, "seed": seed,
            "metrics": {"episode_success": episodes}}


def test_compare_kinds_pairs_by_seed_and_refuses_unequal_episodes():
    from energyflow_jax.sweep.compare import compare_kinds

    members = [_member("conservative", 0, {"0": [1, 1, 1, 1], "L": [1, 1, 0, 1]}),
               _member("free", 0, {"0": [1, 1, 1, 1], "L": [0, 0, 0, 1]}),
               _member("conservative", 1, {"0": [1, 1, 1, 0], "L": [1, 0, 1, 1]}),
               _member("free", 1, {"0": [1, 1, 1, 1], "L": [0, 0, 1, 0]})]
    summary = {"swept_keys": ["model.kind", "task"], "members": members}
    (row,) = compare_kinds(summary)["rows"]
    level0, levelL = row["levels"]
    assert level0["difference"]["mean"] == pytest.approx(-1 / 8)
    assert levelL["difference"]["mean"] == pytest.approx(4 / 8)
    assert levelL["conservative"]["per_seed"] == [0.75, 0.75] and levelL["free"]["per_seed"] == [0.25, 0.25]
    assert 0 < levelL["difference"]["low"] <= 0.5 <= levelL["difference"]["high"]
    assert compare_kinds({"swept_keys": ["task"], "members": members}) is None
    members[1] = _member("free", 0, {"0": [1, 1, 1], "L": [0, 0, 1]})
    with pytest.raises(ValueError, match="cannot be paired"):
        compare_kinds(summary)
