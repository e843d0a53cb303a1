"""Rollout plots (png) of Meta-World episodes."""

from __future__ import annotations

import numpy as np


def plot_rollout(path: str, trajectory: np.ndarray, title: str) -> None:
    """End-effector and object trajectories of one Meta-World rollout: top view and heights.

    trajectory: (T, 39) observations; Meta-World layout: [0:3] end effector,
    [4:7] main object, [36:39] goal.
    """
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left alone

    hand, obj, goal = trajectory[:, 0:3], trajectory[:, 4:7], trajectory[0, 36:39]
    fig = Figure(figsize=(9, 4))
    (top, side) = fig.subplots(1, 2)
    top.plot(hand[:, 0], hand[:, 1], "-", color="tab:blue", label="end effector")
    top.plot(obj[:, 0], obj[:, 1], "-", color="tab:orange", label="object")
    top.plot(hand[0, 0], hand[0, 1], "o", color="tab:blue")
    top.plot(obj[0, 0], obj[0, 1], "o", color="tab:orange")
    top.plot(goal[0], goal[1], "*", color="tab:green", markersize=12, label="goal")
    top.set(xlabel="x [m]", ylabel="y [m]", title="top view (o = start)")
    top.set_aspect("equal", adjustable="datalim")
    top.legend(fontsize=8)
    side.plot(hand[:, 2], color="tab:blue", label="end effector z")
    side.plot(obj[:, 2], color="tab:orange", label="object z")
    side.axhline(goal[2], color="tab:green", linestyle=":", label="goal z")
    side.set(xlabel="step", ylabel="z [m]", title="height")
    side.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
