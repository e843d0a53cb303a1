"""EnergyFlow in JAX: energy-based diffusion policies whose energy is also a reward.

Importing the package changes no process-wide state. The CLI (`energyflow_jax.main`)
and the benchmark set the XLA CPU flag of `energyflow_jax.xla_cpu` before JAX starts.
"""

__version__ = "0.1.0"
