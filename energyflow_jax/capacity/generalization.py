"""Generalisation of conservative vs free fields on a task with a known conservative target.

Both classes (conservative: grad_a of a scalar MLP; free: a vector MLP; same widths and
per-layer spectral bounds, see `rademacher.py`) are fit by least squares to noisy
samples of a known gradient field f*(s, a) = grad_a E*(s, a), and evaluated
in distribution and under a shift of the action distribution.

Target: a random-feature energy in whitened coordinates z = x / std(x),

    E*(x) = c * sum_k alpha_k cos(omega * g_k . z / sqrt(D) + b_k) / sqrt(K),

g_k ~ N(0, I_D). The phase has variance omega^2 whatever D is, so the task does not get
easier or harder with d; c makes E ||f*||^2 = 1 on the training distribution, so
errors are relative errors and comparable across d. Label noise has total variance
`label_noise^2` (spread over the d coordinates), so the noise-to-signal ratio is fixed.

One compiled program per class trains every (action dimension, seed) pair at once:
action dimensions are zero-padded to the largest (padded coordinates are inert, see
`rademacher.mlp_param_mask`) and vmapped together with the seeds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax import lax

from energyflow_jax.capacity.rademacher import FieldClass


def input_std(state_dim: int, action_dim: jax.Array, action_mask: jax.Array, scale: str) -> jax.Array:
    """Per-coordinate std of x = [s; a] (padded coordinates: 1, their values are 0 anyway).

    "standard": every coordinate N(0, 1). "unit": s ~ N(0, I / state_dim) and
    a ~ N(0, I / d), so E||s||^2 = E||a||^2 = 1 whatever d is (input norm held fixed).
    """
    if scale == "standard":
        return jnp.ones((state_dim + action_mask.shape[0],))
    if scale == "unit":
        s_std = jnp.full((state_dim,), 1.0 / jnp.sqrt(state_dim))
        a_std = jnp.where(action_mask > 0, 1.0 / jnp.sqrt(action_dim), 1.0)
        return jnp.concatenate([s_std, a_std])
    raise ValueError(f"unknown input scale {scale!r}")


def sample_inputs(key: jax.Array, n: int, state_dim: int, action_mask: jax.Array, scale: str,
                  action_shift: jax.Array | None = None) -> jax.Array:
    """(n, state_dim + d_max) Gaussian inputs, padded action coordinates zero.

    action_shift (d_max,), in units of the per-coordinate std, moves the action mean.
    """
    d = action_mask.sum()
    std = input_std(state_dim, d, action_mask, scale)
    mask = jnp.concatenate([jnp.ones((state_dim,)), action_mask])
    z = jax.random.normal(key, (n, state_dim + action_mask.shape[0]))
    if action_shift is not None:
        z = z + jnp.concatenate([jnp.zeros((state_dim,)), action_shift])
    return z * std * mask


def random_shift_direction(key: jax.Array, action_mask: jax.Array, magnitude: float) -> jax.Array:
    """A random unit direction over the real action coordinates times `magnitude`.

    A mean shift of `magnitude` stds along one direction: KL = magnitude^2 / 2 for every d,
    so the out-of-distribution test is equally hard across d.
    """
    v = jax.random.normal(key, action_mask.shape) * action_mask
    return magnitude * v / jnp.linalg.norm(v)


# ----------------------------------------------------------------------------- target


def make_target(key: jax.Array, state_dim: int, action_mask: jax.Array, n_features: int,
                frequency: float, scale: str, n_calibration: int = 4096) -> dict:
    """Random-feature energy E* (see module doc), normalised so E||grad_a E*||^2 = 1."""
    k_g, k_alpha, k_phase, k_cal = jax.random.split(key, 4)
    dim = state_dim + action_mask.shape[0]
    mask = jnp.concatenate([jnp.ones((state_dim,)), action_mask])
    d_in = mask.sum()
    std = input_std(state_dim, action_mask.sum(), action_mask, scale)
    target = {
        # Whitening folded into the projection: phase = omega * g . (x / std) / sqrt(D).
        "proj": jax.random.normal(k_g, (dim, n_features)) * (mask / std)[:, None] * frequency / jnp.sqrt(d_in),
        "alpha": jax.random.normal(k_alpha, (n_features,)) / jnp.sqrt(n_features),
        "phase": jax.random.uniform(k_phase, (n_features,), maxval=2 * jnp.pi),
        "scale": jnp.ones(()),
    }
    x_cal = sample_inputs(k_cal, n_calibration, state_dim, action_mask, scale)
    power = jnp.mean(jnp.sum(target_field(target, x_cal, state_dim) ** 2, axis=-1))
    return {**target, "scale": 1.0 / jnp.sqrt(power)}


def target_energy(target: dict, x: jax.Array) -> jax.Array:
    return target["scale"] * jnp.cos(x @ target["proj"] + target["phase"]) @ target["alpha"]


def target_field(target: dict, x: jax.Array, state_dim: int) -> jax.Array:
    """f*(x) = grad_a E*(x), per sample."""
    return jax.grad(lambda x: target_energy(target, x).sum())(x)[:, state_dim:]


# ----------------------------------------------------------------------------- training


def mean_sq_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    """mean_i ||pred_i - target_i||^2 (summed over coordinates: padded ones are 0 - 0)."""
    return jnp.mean(jnp.sum((pred - target) ** 2, axis=-1))


def fit_and_evaluate(field_class: FieldClass, key: jax.Array, action_mask: jax.Array, *, n_train: int,
                     n_test: int, steps: int, lr: float, n_features: int, frequency: float,
                     label_noise: float, ood_shift: float, scale: str) -> dict:
    """One (d, seed) run: draw target and data, fit by full-batch Adam, evaluate.

    Returns train / test errors against noisy labels (their difference is the
    generalisation gap), clean in-distribution and shifted (OOD) errors against f*.
    """
    state_dim = field_class.state_dim
    k_target, k_train, k_test, k_ood, k_shift, k_noise, k_init = jax.random.split(key, 7)
    d = action_mask.sum()
    target = make_target(k_target, state_dim, action_mask, n_features, frequency, scale)

    def noisy_labels(k, x):
        noise = jax.random.normal(k, (x.shape[0], action_mask.shape[0])) * action_mask
        return target_field(target, x, state_dim) + noise * label_noise / jnp.sqrt(d)

    k_noise_train, k_noise_test = jax.random.split(k_noise)
    x_train = sample_inputs(k_train, n_train, state_dim, action_mask, scale)
    y_train = noisy_labels(k_noise_train, x_train)

    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
    loss = lambda raw: mean_sq_error(field_class.apply(field_class.constrain(raw), x_train), y_train)

    def step(carry, _):
        raw, opt_state = carry
        value, grad = jax.value_and_grad(loss)(raw)
        updates, opt_state = optimizer.update(grad, opt_state, raw)
        return (optax.apply_updates(raw, updates), opt_state), value

    raw = field_class.init(k_init, action_mask)
    (raw, _), loss_trace = lax.scan(step, (raw, optimizer.init(raw)), None, length=steps)
    field = lambda x: field_class.apply(field_class.constrain(raw), x)

    x_test = sample_inputs(k_test, n_test, state_dim, action_mask, scale)
    shift = random_shift_direction(k_shift, action_mask, ood_shift)
    x_ood = sample_inputs(k_ood, n_test, state_dim, action_mask, scale, action_shift=shift)
    train_err = mean_sq_error(field(x_train), y_train)
    test_err = mean_sq_error(field(x_test), noisy_labels(k_noise_test, x_test))
    return {
        "train_err": train_err,
        "test_err": test_err,
        "gap": test_err - train_err,
        "test_clean_err": mean_sq_error(field(x_test), target_field(target, x_test, state_dim)),
        "ood_clean_err": mean_sq_error(field(x_ood), target_field(target, x_ood, state_dim)),
        # E||f*||^2 under the shift (1 in distribution by construction), to read OOD errors.
        "ood_target_power": jnp.mean(jnp.sum(target_field(target, x_ood, state_dim) ** 2, axis=-1)),
        "final_loss": loss_trace[-1],
    }


GENERALIZATION_STATIC_ARGNAMES = ("n_train", "n_test", "steps", "n_features", "scale")


def generalization_sweep(field_class: FieldClass, keys: jax.Array, action_masks: jax.Array, *, n_train: int,
                         n_test: int, steps: int, lr: float, n_features: int, frequency: float,
                         label_noise: float, ood_shift: float, scale: str) -> dict:
    """keys (n_settings, n_seeds, 2), action_masks (n_settings, d_max): every setting and
    seed trained at once (jit it with field_class and GENERALIZATION_STATIC_ARGNAMES
    static: `generalization_sweep_jit`). Returns metrics of shape (n_settings, n_seeds)."""
    run = functools.partial(fit_and_evaluate, field_class, n_train=n_train, n_test=n_test, steps=steps,
                            lr=lr, n_features=n_features, frequency=frequency, label_noise=label_noise,
                            ood_shift=ood_shift, scale=scale)
    per_seed = jax.vmap(run, in_axes=(0, None))
    return jax.vmap(per_seed, in_axes=(0, 0))(keys, action_masks)


generalization_sweep_jit = jax.jit(generalization_sweep, static_argnums=(0,),
                                   static_argnames=GENERALIZATION_STATIC_ARGNAMES)
