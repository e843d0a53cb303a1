"""Empirical Rademacher complexity of vector-field hypothesis classes.

For a class F of fields f: R^D -> R^d and points x_1..x_n,

    R_hat(F) = E_sigma sup_{f in F} (1/n) sum_i <sigma_i, f(x_i)>,   sigma_i in {-1, +1}^d.

The sup is estimated by gradient ascent over the parameters of a norm-constrained
network (a lower bound on the true sup; restarts tighten it), averaged over sign
draws. Everything is a pure function of pytrees; one `jax.jit` call runs every sign
draw and restart (vmapped) and every ascent step (`lax.scan`).

Classes compared under the SAME constraints (every affine layer's augmented matrix
[W; b] has spectral norm <= `bound`, activations 1-Lipschitz):
  * conservative: f(x) = grad_a E(x), E a scalar MLP over x = [s; a],
  * free: f(x) = MLP(x) in R^d with the same hidden widths.
Known-value classes (linear maps with a Frobenius or spectral norm ball, constant
fields) have closed-form sups and are used to check the optimiser.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

Params = Any  # a pytree of arrays

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
}


# ----------------------------------------------------------------------------- norms


def spectral_norm_exact(m: jax.Array) -> jax.Array:
    """Largest singular value, exact and cheap to differentiate.

    sigma_max = ||m v|| with v the top eigenvector of the smaller Gram matrix. v is held
    constant for differentiation: by the envelope theorem d sigma = u^T dm v, the exact
    gradient, and it avoids eigh's eigenvector derivative (1 / (l_i - l_j), infinite
    when singular values tie, which is exactly where these optimisations go). On this
    CPU a batched eigh of a 64x64 Gram is ~50x faster than a batched full SVD.
    """
    if m.shape[0] < m.shape[1]:
        m = m.T
    _, eigvecs = jnp.linalg.eigh(lax.stop_gradient(m.T @ m))
    return jnp.linalg.norm(m @ eigvecs[:, -1])


def shrink_to_ball(w: jax.Array, norm: jax.Array, bound: float) -> jax.Array:
    """w / max(1, ||w|| / bound): identity inside the ball, radial projection outside."""
    return w / jnp.maximum(1.0, norm / bound)


# ----------------------------------------------------------------------------- MLPs
# Parameters: a list of layers {"w": (in, out), "b": (out,)}; the last layer has no
# bias (a free output bias would be an unconstrained constant field, making the free
# class's complexity infinite; for the energy it does not change the gradient).


def augmented_matrix(layer: dict) -> jax.Array:
    """[W; b] acting on [h; 1]: bounding its spectral norm bounds weights and bias together."""
    if "b" not in layer:
        return layer["w"]
    return jnp.concatenate([layer["w"], layer["b"][None, :]], axis=0)


def _split_augmented(m: jax.Array, has_bias: bool) -> dict:
    return {"w": m[:-1], "b": m[-1]} if has_bias else {"w": m}


def project_mlp(params: Sequence[dict], bound: float) -> list:
    """The reparametrisation W / max(1, ||[W; b]||_2 / bound) for every layer (exact norm).

    Applied to raw parameters on every forward pass, so optimisers act on unconstrained
    raw weights and every evaluated network is feasible. (Projected Adam would be the
    alternative, but its fixed points on a norm ball are not the constrained optimum:
    Adam's coordinate-wise step is not the gradient direction.)
    """
    out = []
    for layer in params:
        scale = jnp.maximum(1.0, spectral_norm_exact(augmented_matrix(layer)) / bound)
        out.append(jax.tree.map(lambda p: p / scale, layer))
    return out


def layer_spectral_norms(params: Sequence[dict]) -> jax.Array:
    return jnp.stack([spectral_norm_exact(augmented_matrix(layer)) for layer in params])


def mlp_param_mask(sizes: Sequence[int], state_dim: int, action_mask: jax.Array, output_is_action: bool) -> list:
    """1/0 masks: rows of the first layer for padded inputs and columns of the last layer
    for padded outputs are 0. Masked entries start at 0 and get zero gradient, so a
    padded network is exactly the unpadded one (one compiled program then serves
    several action dimensions)."""
    in_mask = jnp.concatenate([jnp.ones((state_dim,)), action_mask])
    mask = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        first, last = i == 0, i == len(sizes) - 2
        w = jnp.ones((fan_in, fan_out))
        if first:
            w = w * in_mask[:, None]
        if last and output_is_action:
            w = w * action_mask[None, :]
        mask.append({"w": w} if last else {"w": w, "b": jnp.ones((fan_out,))})
    return mask


def init_mlp(key: jax.Array, sizes: Sequence[int], bound: float, mask: Sequence[dict] | None = None) -> list:
    """Gaussian layers, each rescaled so its augmented matrix starts exactly on the bound
    (the sup of an objective linear in the output sits on the boundary)."""
    keys = jax.random.split(key, len(sizes) - 1)
    params = []
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layer = _split_augmented(jax.random.normal(k, (fan_in + (0 if last else 1), fan_out)), not last)
        if mask is not None:
            layer = jax.tree.map(jnp.multiply, layer, mask[i])
        m = augmented_matrix(layer)
        params.append(_split_augmented(m * bound / spectral_norm_exact(m), not last))
    return params


def mlp_apply(params: Sequence[dict], x: jax.Array, activation: str = "softplus") -> jax.Array:
    act = ACTIVATIONS[activation]
    h = x
    for layer in params[:-1]:
        h = act(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"]


# ----------------------------------------------------------------------------- classes


def correlation(field_values: jax.Array, sigma: jax.Array) -> jax.Array:
    """(1/n) sum_i <sigma_i, f(x_i)>."""
    return jnp.sum(field_values * sigma) / field_values.shape[0]


@dataclasses.dataclass(frozen=True)
class FieldClass:
    """A norm-constrained class of fields R^{state_dim + action_dim} -> R^{action_dim}.

    init(key, action_mask) -> raw params (action_mask: 1 for real action coordinates, 0 for
        padding; padded coordinates get structural zeros that gradients never move);
    constrain(raw) -> feasible params (norm-ball reparametrisation; differentiable);
    apply(params, x (n, D)) -> (n, action_dim);
    correlate(params, x, sigma) -> (1/n) sum_i <sigma_i, f(x_i)>.
    Frozen and hashable, so it can be a static argument of jitted code.
    """

    name: str
    state_dim: int
    action_dim: int
    init: Callable[[jax.Array, jax.Array], Params]
    constrain: Callable[[Params], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    correlate: Callable[[Params, jax.Array, jax.Array], jax.Array]


def _mlp_class(name, state_dim, action_dim, sizes, bound, apply, correlate):
    param_mask = lambda action_mask: mlp_param_mask(sizes, state_dim, action_mask, sizes[-1] == action_dim)
    return FieldClass(
        name=name, state_dim=state_dim, action_dim=action_dim,
        init=lambda key, action_mask: init_mlp(key, sizes, bound, param_mask(action_mask)),
        constrain=lambda raw: project_mlp(raw, bound),
        apply=apply, correlate=correlate,
    )


def conservative_class(state_dim: int, action_dim: int, hidden: Sequence[int], bound: float,
                       activation: str = "softplus") -> FieldClass:
    """f(x) = grad_a E([s; a]) with E a scalar MLP: a gradient field by construction."""

    def energy(params, x):
        return mlp_apply(params, x, activation)[..., 0]

    def apply(params, x):
        # Samples are independent, so the gradient of the summed energy is per-sample.
        return jax.grad(lambda x: energy(params, x).sum())(x)[:, state_dim:]

    def correlate(params, x, sigma):
        # <sigma_i, grad_a E(x_i)> is the directional derivative of E along [0; sigma_i]:
        # one forward-mode pass instead of a reverse pass (cheaper under a further grad).
        tangent = jnp.concatenate([jnp.zeros_like(x[:, :state_dim]), sigma], axis=1)
        _, directional = jax.jvp(lambda x: energy(params, x), (x,), (tangent,))
        return directional.sum() / x.shape[0]

    sizes = (state_dim + action_dim, *hidden, 1)
    return _mlp_class("conservative", state_dim, action_dim, sizes, bound, apply, correlate)


def free_class(state_dim: int, action_dim: int, hidden: Sequence[int], bound: float,
               activation: str = "softplus") -> FieldClass:
    """f(x) = MLP([s; a]) in R^d: same widths and per-layer bounds as the conservative class."""
    apply = lambda params, x: mlp_apply(params, x, activation)
    correlate = lambda params, x, sigma: correlation(apply(params, x), sigma)
    sizes = (state_dim + action_dim, *hidden, action_dim)
    return _mlp_class("free", state_dim, action_dim, sizes, bound, apply, correlate)


def linear_class(state_dim: int, action_dim: int, bound: float, norm: str = "frobenius") -> FieldClass:
    """x -> x W with ||W||_F <= bound or ||W||_2 <= bound: sups known in closed form."""
    if norm == "frobenius":
        project = lambda w: shrink_to_ball(w, jnp.linalg.norm(w), bound)
    elif norm == "spectral":
        project = lambda w: shrink_to_ball(w, spectral_norm_exact(w), bound)
    else:
        raise ValueError(f"unknown norm {norm!r}")

    def param_mask(action_mask):
        return jnp.concatenate([jnp.ones((state_dim,)), action_mask])[:, None] * action_mask[None, :]

    def init(key, action_mask):
        w = jax.random.normal(key, (state_dim + action_dim, action_dim)) * param_mask(action_mask)
        return w * bound / jnp.linalg.norm(w, "fro" if norm == "frobenius" else 2)

    apply = lambda w, x: x @ w
    return FieldClass(
        name=f"linear_{norm}", state_dim=state_dim, action_dim=action_dim,
        init=init, constrain=project, apply=apply,
        correlate=lambda w, x, sigma: correlation(apply(w, x), sigma),
    )


CLASS_NAMES = ("conservative", "free", "linear_frobenius", "linear_spectral")


def build_class(name: str, state_dim: int, action_dim: int, hidden: Sequence[int] = (64, 64),
                bound: float = 1.0, activation: str = "softplus") -> FieldClass:
    if name == "conservative":
        return conservative_class(state_dim, action_dim, tuple(hidden), bound, activation)
    if name == "free":
        return free_class(state_dim, action_dim, tuple(hidden), bound, activation)
    if name in ("linear_frobenius", "linear_spectral"):
        return linear_class(state_dim, action_dim, bound, name.split("_", 1)[1])
    raise ValueError(f"unknown class {name!r}; expected one of {CLASS_NAMES}")


# ----------------------------------------------------------------------------- closed forms


def rademacher_signs(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    return jax.random.rademacher(key, tuple(shape), dtype=jnp.float32)


def linear_frobenius_sup(x: jax.Array, sigma: jax.Array, bound: float) -> jax.Array:
    """sup_{||W||_F <= B} (1/n) <W, X^T S> = B ||X^T S||_F / n (Cauchy-Schwarz)."""
    return bound * jnp.linalg.norm(x.T @ sigma) / x.shape[0]


def linear_spectral_sup(x: jax.Array, sigma: jax.Array, bound: float) -> jax.Array:
    """sup_{||W||_2 <= B} (1/n) <W, X^T S> = B ||X^T S||_* / n (the nuclear norm is its dual)."""
    return bound * jnp.sum(jnp.linalg.svd(x.T @ sigma, compute_uv=False)) / x.shape[0]


def constant_field_sup(sigma: jax.Array, bound: float) -> jax.Array:
    """sup_{||c|| <= L} (1/n) sum_i <sigma_i, c> = L ||sum_i sigma_i|| / n.

    Constant fields are gradients of linear energies, hence conservative: a floor for
    any conservative class that contains them, and it grows like sqrt(d / n).
    """
    return bound * jnp.linalg.norm(sigma.sum(0)) / sigma.shape[0]


# ----------------------------------------------------------------------------- estimator


def constant_part(field_values: jax.Array, sigma: jax.Array) -> jax.Array:
    """The share of (1/n) sum_i <sigma_i, f(x_i)> earned by the field's mean over the
    sample, (1/n) sum_i <sigma_i, mean_j f(x_j)>: how much of the sup a constant field
    (always conservative) would get, the rest coming from variation across inputs."""
    return jnp.sum(sigma.mean(0) * field_values.mean(0))


def ascend_sup(field_class: FieldClass, x: jax.Array, sigma: jax.Array, init_key: jax.Array,
               action_mask: jax.Array, steps: int, lr: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Maximise (1/n) sum_i <sigma_i, f(x_i)> over the class by Adam on raw parameters.

    Returns (final value, its constant part, per-step trace). Every evaluated network is
    feasible (exact norm in the reparametrisation), so each value is attained by a
    member of the class: a lower bound on the sup.
    """
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.02))
    objective = lambda raw: field_class.correlate(field_class.constrain(raw), x, sigma)

    def step(carry, _):
        raw, opt_state = carry
        value, grad = jax.value_and_grad(objective)(raw)
        updates, opt_state = optimizer.update(jax.tree.map(jnp.negative, grad), opt_state, raw)  # ascent
        return (optax.apply_updates(raw, updates), opt_state), value

    raw = field_class.init(init_key, action_mask)
    (raw, _), trace = lax.scan(step, (raw, optimizer.init(raw)), None, length=steps)
    field_values = field_class.apply(field_class.constrain(raw), x)
    final = correlation(field_values, sigma)
    return final, constant_part(field_values, sigma), jnp.append(trace, final)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def estimate_rademacher(field_class: FieldClass, x: jax.Array, key: jax.Array, n_draws: int,
                        n_restarts: int, steps: int, lr: float = 0.02,
                        action_mask: jax.Array | None = None) -> dict:
    """R_hat(F; x_1..x_n): for each of `n_draws` sign draws the best of `n_restarts`
    ascents. All draws and restarts are one vmapped, compiled program.

    x: (n, state_dim + action_dim). action_mask (action_dim,) marks real coordinates
    (default all); padded coordinates get zero signs and inert parameters, so the
    result equals that of the class on the real coordinates alone.
    Returns per-draw sups (and their constant parts, see `constant_part`), their mean
    and std, the mean ascent trace, and the signs.
    """
    if action_mask is None:
        action_mask = jnp.ones((field_class.action_dim,))
    sign_key, init_key = jax.random.split(key)
    sigma = rademacher_signs(sign_key, (n_draws, x.shape[0], field_class.action_dim)) * action_mask
    init_keys = jax.random.split(init_key, (n_draws, n_restarts))
    ascend = lambda s, k: ascend_sup(field_class, x, s, k, action_mask, steps, lr)
    finals, constants, traces = jax.vmap(jax.vmap(ascend, in_axes=(None, 0)))(sigma, init_keys)
    best = jnp.argmax(finals, axis=1)  # best restart per draw: each is a lower bound on the sup
    per_draw = jnp.take_along_axis(finals, best[:, None], axis=1)[:, 0]
    return {
        "per_draw": per_draw,
        "constant_part": jnp.take_along_axis(constants, best[:, None], axis=1)[:, 0],
        "per_restart": finals,
        "trace": traces.mean(axis=(0, 1)),
        "mean": per_draw.mean(),
        "std": per_draw.std(),
        "sigma": sigma,
    }
