"""Rollout plots (png): end-effector and object trajectories of one episode."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# Where a Meta-World observation keeps the end effector, the main object and the goal.
METAWORLD_LAYOUT = {"end effector": (0, 3), "object": (4, 7), "goal": (36, 39)}


def plot_rollout(path: str, trajectory: np.ndarray, title: str,
                 layout: Mapping[str, tuple[int, int]] = METAWORLD_LAYOUT) -> None:
    """Top view and heights of the 3-D positions `layout` names in each observation.

    trajectory: (T, obs_dim) observations. layout: name -> (start, stop) of a
    position; "goal", if present, is drawn as a marker at its first value.
    """
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left alone

    fig = Figure(figsize=(9, 4))
    (top, side) = fig.subplots(1, 2)
    colors = iter(["tab:blue", "tab:orange", "tab:purple", "tab:red"])
    for name, (start, stop) in layout.items():
        xyz = trajectory[:, start:stop]
        if name == "goal":
            top.plot(xyz[0, 0], xyz[0, 1], "*", color="tab:green", markersize=12, label="goal")
            side.axhline(xyz[0, 2], color="tab:green", linestyle=":", label="goal z")
            continue
        color = next(colors)
        top.plot(xyz[:, 0], xyz[:, 1], "-", color=color, label=name)
        top.plot(xyz[0, 0], xyz[0, 1], "o", color=color)
        side.plot(xyz[:, 2], color=color, label=f"{name} z")
    top.set(xlabel="x [m]", ylabel="y [m]", title="top view (o = start)")
    top.set_aspect("equal", adjustable="datalim")
    top.legend(fontsize=8)
    side.set(xlabel="step", ylabel="z [m]", title="height")
    side.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
