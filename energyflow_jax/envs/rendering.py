"""Offscreen frames of a MuJoCo scene from a free camera, for rollout videos.

A free camera, not one of the scene's own: the benchmark xmls' fixed cameras
render rotated or from afar. Shadows, reflections and the skybox are off: in
software GL (llvmpipe) they cost most of a frame's time for little a viewer needs.
Needs an OpenGL backend for MuJoCo (MUJOCO_GL=egl or osmesa when headless).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

VIDEO_SIZE = (240, 320)  # height, width; multiples of 16 for the mp4 encoder


class FreeCameraRenderer:
    """Frames of (model, data) from ``camera`` (lookat, distance, azimuth, elevation);
    the GL context is made on the first frame and freed by close()."""

    def __init__(self, camera: Mapping[str, Any], size: tuple[int, int] = VIDEO_SIZE):
        self.camera_settings = dict(camera)
        self.size = size
        self._renderer = None

    def frame(self, model, data) -> np.ndarray:
        """(height, width, 3) uint8."""
        import mujoco

        if self._renderer is None:
            self._renderer = mujoco.Renderer(model, *self.size)
            self._camera = mujoco.MjvCamera()
            self._camera.lookat[:] = self.camera_settings["lookat"]
            for key in ("distance", "azimuth", "elevation"):
                setattr(self._camera, key, self.camera_settings[key])
        self._renderer.update_scene(data, camera=self._camera)
        for flag in ("mjRND_SHADOW", "mjRND_REFLECTION", "mjRND_SKYBOX"):
            self._renderer.scene.flags[getattr(mujoco.mjtRndFlag, flag)] = 0
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
