"""Conservative vs free, episode by episode: the paired comparison of a sweep over
`model.kind` whose members were evaluated at OOD levels (MetaWorldTask.evaluate)."""
from __future__ import annotations

import numpy as np

from energyflow_jax.evaluation.statistics import paired_bootstrap_ci

KIND_KEY = "model.kind"


def compare_kinds(summary: dict, a: str = "conservative", b: str = "free") -> dict | None:
    """Per setting of the other swept keys and per perturbation level: each kind's success
    (mean and std over seeds) and the paired difference a - b in success over the
    episodes both ran (same seed, layout and perturbation), with a bootstrap 95% CI.
    None unless `model.kind` is swept over both kinds with per-episode results."""
    if KIND_KEY not in summary["swept_keys"]:
        return None
    members = [m for m in summary["members"] if "episode_success" in m["metrics"]]
    by_key: dict[str, dict[str, dict[int, dict]]] = {}
    labels: dict[str, dict] = {}
    for m in members:
        rest = {k: v for k, v in m["setting"].items() if k != KIND_KEY}
        key = repr(sorted(rest.items()))
        labels[key] = rest
        by_key.setdefault(key, {}).setdefault(m["setting"][KIND_KEY], {})[m["seed"]] = m
    rows = []
    for key, kinds in by_key.items():
        if a not in kinds or b not in kinds:
            continue
        seeds = sorted(set(kinds[a]) & set(kinds[b]))
        if not seeds:
            continue
        first = kinds[a][seeds[0]]["metrics"]
        levels = first.get("levels", list(first["episode_success"]))
        per_level = []
        for level in levels:
            ea = [np.asarray(kinds[a][s]["metrics"]["episode_success"][level]) for s in seeds]
            eb = [np.asarray(kinds[b][s]["metrics"]["episode_success"][level]) for s in seeds]
            if any(x.shape != y.shape for x, y in zip(ea, eb)):
                raise ValueError(f"{labels[key]} level {level}: the two kinds ran different "
                                 "episodes; they cannot be paired")
            rate_a = [float(x.mean()) for x in ea]
            rate_b = [float(x.mean()) for x in eb]
            per_level.append({
                "level": level, "n_pairs": int(sum(x.size for x in ea)),
                a: {"mean": float(np.mean(rate_a)), "std": _std(rate_a), "per_seed": rate_a},
                b: {"mean": float(np.mean(rate_b)), "std": _std(rate_b), "per_seed": rate_b},
                "difference": paired_bootstrap_ci(np.concatenate(ea), np.concatenate(eb))})
        rows.append({"setting": labels[key], "seeds": seeds, "levels": per_level})
    if not rows:
        return None
    return {"a": a, "b": b, "rows": rows}


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
