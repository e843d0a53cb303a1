"""Capacity experiment (Theorem 3.6): Rademacher complexity and generalisation of
conservative (grad_a of a scalar MLP) vs free (vector MLP) fields as the action
dimension d grows. Run through
`energyflow_jax.experiments.capacity.train_and_evaluate(config, workdir)`.

  python -m energyflow_jax.main --config=sweeps/capacity.py --workdir=runs/capacity
  python -m energyflow_jax.main --config=sweeps/capacity.py:smoke --workdir=/tmp/cap   # tests

Presets: "default" (CPU-sized, minutes), "paper"/"full" (d up to 128, n up to 4096,
more draws, restarts, ascent steps and seeds; an accelerator's or a long CPU job),
"smoke" (seconds; for tests). Results and timings: docs/results.md.
"""

from __future__ import annotations

import ml_collections

ACTION_DIMS = (1, 2, 4, 8, 16, 32, 64)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "default"
    config = ml_collections.ConfigDict()
    config.experiment = "capacity"
    config.preset = preset
    config.seed = 0
    config.state_dim = 4
    config.action_dims = ACTION_DIMS
    # Shared by both classes and both parts: same widths, same per-layer bound on the
    # spectral norm of every affine layer's [W; b].
    config.hidden_widths = (64, 64)
    config.activation = "softplus"  # as in the published energy head
    config.spectral_bound = 2.0
    # XLA optimisation level 0: ~3x faster compiles, ~3-5x slower runs (tiny sweeps only).
    config.fast_compile = False

    config.rademacher = ml_collections.ConfigDict()
    config.rademacher.sample_sizes = (64, 256, 1024)
    config.rademacher.n_sign_draws = 4
    config.rademacher.n_restarts = 1  # best-of restarts per sign draw
    config.rademacher.ascent_steps = 300
    config.rademacher.ascent_lr = 0.05
    # "unit": E||s||^2 = E||a||^2 = 1 for every d, so input norm (the theorem's B) is
    # held fixed and only the output dimension changes. "standard": N(0, I).
    config.rademacher.input_scale = "unit"
    # Closed-form reference classes (constant fields ||c|| <= 1, linear ||W||_F <= 1): free
    # to evaluate, so many sign draws.
    config.rademacher.reference_sign_draws = 256

    config.generalization = ml_collections.ConfigDict()
    config.generalization.enabled = True
    config.generalization.action_dims = ACTION_DIMS
    config.generalization.n_seeds = 3
    config.generalization.n_train = 256
    config.generalization.n_test = 2048
    config.generalization.train_steps = 1000
    config.generalization.train_lr = 1e-2
    config.generalization.target_features = 16
    config.generalization.target_frequency = 1.5
    config.generalization.label_noise = 0.5  # total noise std; E||f*||^2 = 1
    config.generalization.ood_shift = 2.0  # action-mean shift, in stds, along a random direction
    config.generalization.input_scale = "standard"

    if preset == "default":
        pass
    elif preset in ("paper", "full"):
        # Estimated from the default's timings (not run here): ~2 h on the 2-core CPU.
        config.action_dims = (1, 2, 4, 8, 16, 32, 64, 128)
        config.rademacher.sample_sizes = (64, 256, 1024, 4096)
        config.rademacher.n_sign_draws = 8
        config.rademacher.n_restarts = 2
        config.rademacher.ascent_steps = 1000
        config.rademacher.reference_sign_draws = 1024
        config.generalization.action_dims = (1, 2, 4, 8, 16, 32, 64, 128)
        config.generalization.n_seeds = 8
        config.generalization.train_steps = 3000
    elif preset == "smoke":
        config.fast_compile = True
        config.action_dims = (1, 4, 16)
        config.hidden_widths = (16, 16)
        config.rademacher.sample_sizes = (32, 128)
        config.rademacher.n_sign_draws = 2
        config.rademacher.ascent_steps = 40
        config.generalization.action_dims = (1, 4, 16)
        config.generalization.n_seeds = 2
        config.generalization.n_train = 64
        config.generalization.n_test = 256
        config.generalization.train_steps = 60
    else:
        raise ValueError(f"unknown capacity preset {preset!r}; expected default, paper, full or smoke")

    config.lock()
    return config
