"""A toy task whose true energy is known in closed form.

State s = (cos theta, sin theta), theta ~ U[0, 2 pi). The action a in R^2 is
drawn from a mixture of `n_modes` isotropic Gaussians of std `mode_std` whose
centres sit on the unit circle, rotated by theta. The true energy is
-log p(a | s) up to a constant in s, so training can be checked by how well
the learned E(a, s, gamma) ranks actions within each state.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

N_MODES = 4
MODE_STD = 0.15


def mode_centres(s: jax.Array, n_modes: int = N_MODES) -> jax.Array:
    """(B, 2) states -> (B, n_modes, 2) mixture centres."""
    theta = jnp.arctan2(s[:, 1], s[:, 0])
    angles = theta[:, None] + 2 * jnp.pi * jnp.arange(n_modes)[None, :] / n_modes
    return jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def true_energy(a: jax.Array, s: jax.Array, std: float = MODE_STD) -> jax.Array:
    """-log p(a | s) + const: a (B, 2), s (B, 2) -> (B,)."""
    d2 = jnp.sum((a[:, None, :] - mode_centres(s)) ** 2, axis=-1)
    return -jax.nn.logsumexp(-d2 / (2 * std ** 2), axis=-1)


def make_dataset(rng: jax.Array, n: int) -> dict:
    """Windows in the trainer's layout: obs (n, 1, 2), actions (n, 1, 2)."""
    theta_rng, mode_rng, noise_rng = jax.random.split(rng, 3)
    theta = jax.random.uniform(theta_rng, (n,), maxval=2 * jnp.pi)
    s = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)
    mode = jax.random.randint(mode_rng, (n,), 0, N_MODES)
    centre = jnp.take_along_axis(mode_centres(s), mode[:, None, None], axis=1)[:, 0]
    a = centre + MODE_STD * jax.random.normal(noise_rng, (n, 2))
    return {"obs": s[:, None, :], "actions": a[:, None, :]}


def ranking_report(energy_fn, rng: jax.Array, n_states: int = 64, n_actions: int = 256):
    """Spearman correlation between learned and true energy within each state.

    Candidate actions are uniform on [-1.5, 1.5]^2, which covers every mode and
    the low-density space between them.
    """
    s_rng, a_rng = jax.random.split(rng)
    theta = jax.random.uniform(s_rng, (n_states,), maxval=2 * jnp.pi)
    s = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)
    a = jax.random.uniform(a_rng, (n_states, n_actions, 2), minval=-1.5, maxval=1.5)
    s_rep = jnp.repeat(s, n_actions, axis=0)
    flat_a = a.reshape(-1, 2)
    learned = np.asarray(energy_fn(flat_a[:, None, :], s_rep[:, None, :])).reshape(n_states, n_actions)
    truth = np.asarray(true_energy(flat_a, s_rep)).reshape(n_states, n_actions)
    rho = np.array([stats.spearmanr(learned[i], truth[i]).statistic for i in range(n_states)])
    return {"spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho)),
            "n_states": n_states, "n_actions_per_state": n_actions}


def plot_landscape(energy_fn, path: str, thetas=(0.0, 0.6, 1.7), grid: int = 80) -> None:
    """Learned vs true energy over the action plane for a few states."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.linspace(-1.6, 1.6, grid)
    gx, gy = np.meshgrid(xs, xs)
    flat_a = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], -1), jnp.float32)
    fig, axes = plt.subplots(2, len(thetas), figsize=(4 * len(thetas), 7.5))
    for j, theta in enumerate(thetas):
        s = jnp.tile(jnp.array([[np.cos(theta), np.sin(theta)]], jnp.float32), (flat_a.shape[0], 1))
        learned = np.asarray(energy_fn(flat_a[:, None, :], s[:, None, :])).reshape(grid, grid)
        truth = np.asarray(true_energy(flat_a, s)).reshape(grid, grid)
        for row, (values, title) in enumerate([(learned, "learned E"), (truth, "true -log p")]):
            ax = axes[row, j]
            # Ranks, not raw values: the two energies share order, not scale.
            ranks = stats.rankdata(values).reshape(values.shape)
            ax.contourf(gx, gy, ranks, levels=20, cmap="viridis")
            centres = np.asarray(mode_centres(s[:1]))[0]
            ax.scatter(centres[:, 0], centres[:, 1], c="red", marker="x")
            ax.set_title(f"{title}, theta={theta:.1f}")
            ax.set_aspect("equal")
    fig.suptitle("Toy task: energy rank landscapes (dark = low energy = likely)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
