"""Test-session settings, made before jax is imported anywhere in the session.

Two virtual CPU devices, so multi-device code paths run in CI without GPUs.
A persistent compilation cache for the session (this process and the CLI
subprocesses the tests start): many tests compile the same programs (a
resumed run, the same tiny model in several files), and compiling is most of
a test's time on 2 cores. Cached executables give the same results, bit for bit.
"""
import atexit
import os
import shutil
import tempfile

from energyflow_jax import xla_cpu

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
xla_cpu.configure()  # the flag the CLI sets, so tests run what users run
if not (os.environ.get("MUJOCO_GL") or os.environ.get("DISPLAY")):
    os.environ["MUJOCO_GL"] = "egl"  # as the CLI does headless: the rollout-video tests render

_CACHE = tempfile.mkdtemp(prefix="energyflow-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
