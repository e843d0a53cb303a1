"""EnergyFlow in JAX: energy-based diffusion policies whose energy is also a reward."""

__version__ = "0.1.0"
