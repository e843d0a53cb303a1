"""Two virtual CPU devices, so multi-device code paths run in CI without GPUs.

Must be set before jax is imported anywhere in the test session.
"""
import os

from energyflow_jax import xla_cpu

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
xla_cpu.configure()  # the flag the CLI sets, so tests run what users run
