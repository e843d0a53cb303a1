"""Rollout videos: an evaluated episode replayed in a fresh env and rendered.

The evaluation records the actions it stepped for its first episodes
(:func:`energyflow_jax.evaluation.rollout.rollout`, ``n_record``); this module
resets a one-slot env of the same spec to the episode's layout, steps those
actions and renders a frame after each step, so a video has one frame per
episode step. Rendering stays out of the timed evaluation and out of its
worker processes, and the replay is checked: it must end with the recorded
outcome at the recorded step (MuJoCo is deterministic), or the result says so.

Headless machines need an OpenGL backend chosen before MuJoCo is imported:
``MUJOCO_GL=egl`` (Debian/Ubuntu package ``libegl1``, with Mesa's
``libegl-mesa0`` where there is no GPU driver) or ``MUJOCO_GL=osmesa``
(``libosmesa6``). The command line sets ``egl`` when no display is there;
where no backend works, :func:`gl_unavailable` gives the reason and the
evaluation writes its plots without videos.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

FPS = 20  # a 500-step episode plays in 25 s


@functools.lru_cache(maxsize=1)
def gl_unavailable() -> str | None:
    """None where MuJoCo can render offscreen in this process, else why not (once per process:
    the backend is fixed when mujoco is imported)."""
    try:
        import mujoco

        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='.1'/></worldbody></mujoco>")
        with mujoco.Renderer(model, 16, 16) as renderer:
            renderer.update_scene(mujoco.MjData(model))
            renderer.render()
    except Exception as e:  # noqa: BLE001 - any failure here means "no GL", with its message
        backend = os.environ.get("MUJOCO_GL", "") or "unset (glfw, which needs a display)"
        return (f"MuJoCo cannot render offscreen here (MUJOCO_GL={backend}: {type(e).__name__}: "
                f"{str(e)[:200]}); set MUJOCO_GL=egl (package libegl1 / libegl-mesa0) or "
                f"MUJOCO_GL=osmesa (libosmesa6) before MuJoCo is imported")
    return None


def write_video(stem: str, frames: np.ndarray, fps: int = FPS) -> str:
    """frames (n, height, width, 3) uint8 -> stem.mp4, or stem.gif where imageio has no
    ffmpeg (imageio-ffmpeg or PyAV); returns the path. A GIF merges identical
    consecutive frames, so only the mp4 keeps one frame per step."""
    import imageio.v3 as iio

    frames = np.asarray(frames, np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (n >= 1, height, width, 3) uint8, got {frames.shape}")
    # Written under a partial name and renamed, so a killed run leaves no cut video.
    partial = stem + ".partial"
    try:
        iio.imwrite(partial + ".mp4", frames, fps=fps, codec="libx264", macro_block_size=1)
        ext = ".mp4"
    except (OSError, ImportError, ValueError, TypeError):  # no ffmpeg plugin or encoder
        if os.path.exists(partial + ".mp4"):
            os.remove(partial + ".mp4")
        iio.imwrite(partial + ".gif", frames, duration=1000 / fps, loop=0)
        ext = ".gif"
    os.replace(partial + ext, stem + ext)
    return stem + ext


def replay_frames(env, layout_id: int, actions: np.ndarray) -> tuple[np.ndarray, bool, int]:
    """Reset slot 0 of a one-slot batched env to layout_id, step actions (steps, action_dim),
    render after each step; returns (frames, success, steps), stopping at the first success."""
    env.reset([int(layout_id)])
    frames, success, active = [], False, np.ones(1, bool)
    for action in np.asarray(actions, np.float32):
        result = env.step(action[None], active)
        frames.append(env.render(0))
        if result.success[0]:
            success = True
            break
    return np.stack(frames), success, len(frames)


def record_videos(spec, episodes: Sequence[dict[str, Any]], actions: dict[int, np.ndarray],
                  out_dir: str, prefix: str) -> list[dict[str, Any]]:
    """One video per episode in ``actions`` (episode index -> actions as stepped),
    replayed in ``spec(1)``; ``episodes`` are the evaluation's per-episode results.
    Returns, per video: episode, path, frames, and whether the replay matched."""
    os.makedirs(out_dir, exist_ok=True)
    env = spec(1)
    videos = []
    try:
        for ep in sorted(actions):
            r = episodes[ep]
            frames, success, steps = replay_frames(env, r["config_index"], actions[ep])
            outcome = "success" if r["success"] else "fail"
            path = write_video(os.path.join(out_dir, f"{prefix}_ep{ep:03d}_{outcome}"), frames)
            videos.append({"episode": ep, "path": path, "frames": int(len(frames)),
                           "replay_matches": bool(success == r["success"] and steps == r["steps"])})
    finally:
        env.close()
    return videos
