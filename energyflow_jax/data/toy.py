"""A toy task whose true energy is known in closed form.

State s ~ U[-1, 1]^2. The action a in R^2 is drawn from an equal mixture of
four isotropic Gaussians of std MODE_STD centred at (+-0.7, +-0.7) + 0.5 s, so
the modes move with the state. The true energy is
-log p(a | s) up to a constant in s, so training can be checked by how well
the learned E(a, s, gamma) ranks actions within each state.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

# numpy, not jnp: a jnp constant here would start the JAX backend at import.
BASE_CENTRES = np.array([[0.7, 0.7], [-0.7, 0.7], [-0.7, -0.7], [0.7, -0.7]], np.float32)
N_MODES = BASE_CENTRES.shape[0]
MODE_STD = 0.2
STATE_SHIFT = 0.5


def mode_centres(s: jax.Array) -> jax.Array:
    """(B, 2) states -> (B, N_MODES, 2) mixture centres."""
    return BASE_CENTRES[None] + STATE_SHIFT * s[:, None, :]


def sample_states(rng: jax.Array, n: int) -> jax.Array:
    return jax.random.uniform(rng, (n, 2), minval=-1.0, maxval=1.0)


def true_energy(a: jax.Array, s: jax.Array, std: float = MODE_STD) -> jax.Array:
    """-log p(a | s) + const: a (B, 2), s (B, 2) -> (B,)."""
    d2 = jnp.sum((a[:, None, :] - mode_centres(s)) ** 2, axis=-1)
    return -jax.nn.logsumexp(-d2 / (2 * std ** 2), axis=-1)


def sample_actions(rng: jax.Array, s: jax.Array, std: float) -> jax.Array:
    """Draws from the mixture at states s (B, 2) with per-mode std `std`."""
    mode_rng, noise_rng = jax.random.split(rng)
    mode = jax.random.randint(mode_rng, (s.shape[0],), 0, N_MODES)
    centre = mode_centres(s)[jnp.arange(s.shape[0]), mode]
    return centre + std * jax.random.normal(noise_rng, s.shape)


def make_dataset(rng: jax.Array, n: int) -> dict:
    """Windows in the trainer's layout: obs (n, 1, 2), actions (n, 1, 2)."""
    state_rng, action_rng = jax.random.split(rng)
    s = sample_states(state_rng, n)
    a = sample_actions(action_rng, s, MODE_STD)
    return {"obs": s[:, None, :], "actions": a[:, None, :]}


def ranking_report(energy_fn, schedule, rng: jax.Array, times=(1e-3, 0.3, 0.6),
                   n_states: int = 64, n_actions: int = 256) -> dict:
    """Spearman correlation of learned and true energy within each state.

    DSM fits E(., s, t) to -log p_t(. | s), the data density convolved with
    N(0, sigma(t)^2): a mixture with std sqrt(MODE_STD^2 + sigma(t)^2). At each
    t the candidate actions are drawn from p_t itself, where the model was
    trained; far outside it, small-t energies are extrapolations.
    """
    report = {}
    for t in times:
        std_t = float(np.sqrt(MODE_STD ** 2 + schedule.sigma(t) ** 2))
        rng, s_rng, a_rng = jax.random.split(rng, 3)
        s = jnp.repeat(sample_states(s_rng, n_states), n_actions, axis=0)
        a = sample_actions(a_rng, s, std_t)
        learned = np.asarray(energy_fn(a[:, None, :], s[:, None, :], t)).reshape(n_states, -1)
        truth = np.asarray(true_energy(a, s, std_t)).reshape(n_states, -1)
        rho = [stats.spearmanr(learned[i], truth[i]).statistic for i in range(n_states)]
        report[f"t={t:g}"] = {"spearman_mean": float(np.mean(rho)),
                              "spearman_min": float(np.min(rho))}
    report["spearman_mean"] = float(np.mean([v["spearman_mean"] for v in report.values()]))
    report.update(n_states=n_states, n_actions_per_state=n_actions)
    return report


def plot_landscape(energy_fn, schedule, path: str, t: float = 0.3, states=((0.0, 0.0), (0.8, -0.5), (-0.9, 0.9)),
                   grid: int = 80) -> None:
    """Learned vs true energy at time t over the action plane for a few states."""
    std_t = float(np.sqrt(MODE_STD ** 2 + schedule.sigma(t) ** 2))
    from matplotlib.figure import Figure  # not pyplot: the process's backend is left alone

    xs = np.linspace(-2.0, 2.0, grid)
    gx, gy = np.meshgrid(xs, xs)
    flat_a = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], -1), jnp.float32)
    fig = Figure(figsize=(4 * len(states), 7.5))
    axes = fig.subplots(2, len(states))
    for j, state in enumerate(states):
        s = jnp.tile(jnp.array([state], jnp.float32), (flat_a.shape[0], 1))
        learned = np.asarray(energy_fn(flat_a[:, None, :], s[:, None, :], t)).reshape(grid, grid)
        truth = np.asarray(true_energy(flat_a, s, std_t)).reshape(grid, grid)
        for row, (values, title) in enumerate([(learned, "learned E"), (truth, "true -log p")]):
            ax = axes[row, j]
            # Ranks, not raw values: the two energies share order, not scale.
            ranks = stats.rankdata(values).reshape(values.shape)
            ax.contourf(gx, gy, ranks, levels=20, cmap="viridis")
            centres = np.asarray(mode_centres(s[:1]))[0]
            ax.scatter(centres[:, 0], centres[:, 1], c="red", marker="x")
            ax.set_title(f"{title}, s={state}, t={t:g}")
            ax.set_aspect("equal")
    fig.suptitle("Toy task: energy rank landscapes (dark = low energy = likely)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
