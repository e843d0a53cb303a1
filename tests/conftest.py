"""Test-session settings, made before jax is imported anywhere in the session.

Two virtual CPU devices, so multi-device code paths run in CI without GPUs.
A persistent compilation cache for the session (this process, the xdist
workers and the CLI subprocesses the tests start): many tests compile the same
programs (a resumed run, the same tiny model in several files), and compiling
is most of a test's time on 2 cores. Cached executables give the same results,
bit for bit.

XLA's CPU backend compiles without LLVM optimizations here
(--xla_backend_optimization_level=0): the suite is compile-bound, and this
roughly halves compile time (a tiny U-Net's init: 10.5 s -> 5.9 s) at the cost
of slower execution of the tiny programs the tests run. The XLA graph
optimizations, and so what the tests check, are the same; users' runs keep
the default level. ENERGYFLOW_TEST_XLA_OPT=1 keeps the default in tests too.
"""
import atexit
import os
import shutil
import tempfile

from energyflow_jax import xla_cpu

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=2"
if "xla_backend_optimization_level" not in _flags and os.environ.get("ENERGYFLOW_TEST_XLA_OPT") != "1":
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
xla_cpu.configure()  # the flag the CLI sets, so tests run what users run
if not (os.environ.get("MUJOCO_GL") or os.environ.get("DISPLAY")):
    os.environ["MUJOCO_GL"] = "egl"  # as the CLI does headless: the rollout-video tests render

# Made by the first process (pytest itself, or the xdist controller, whose
# environment the workers inherit) and removed when that process exits.
if "ENERGYFLOW_TEST_JAX_CACHE" not in os.environ:
    os.environ["ENERGYFLOW_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="energyflow-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["ENERGYFLOW_TEST_JAX_CACHE"], ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ["ENERGYFLOW_TEST_JAX_CACHE"],
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
