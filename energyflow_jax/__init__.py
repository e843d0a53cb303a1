"""EnergyFlow in JAX: energy-based diffusion policies whose energy is also a reward."""
from energyflow_jax import xla_cpu as _xla_cpu

__version__ = "0.1.0"

_xla_cpu.configure()  # before any JAX computation; see xla_cpu.py
