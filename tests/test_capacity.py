"""Capacity experiment: Rademacher estimator, field classes, constraints, sweep output."""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.capacity import generalization, rademacher
from energyflow_jax.experiments import capacity as experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_sweep_config(preset):
    return config_lib.load(f"sweeps/capacity.py:{preset or 'default'}")


def test_estimator_matches_closed_form_on_linear_classes():
    state_dim, d, n, bound = 2, 4, 24, 1.5
    x = jax.random.normal(jax.random.PRNGKey(0), (n, state_dim + d))

    fro = rademacher.estimate_rademacher(rademacher.linear_class(state_dim, d, bound, "frobenius"),
                                         x, jax.random.PRNGKey(1), 3, 1, 150, 0.1)
    exact = jax.vmap(lambda s: rademacher.linear_frobenius_sup(x, s, bound))(fro["sigma"])
    np.testing.assert_allclose(fro["per_draw"], exact, rtol=1e-3)

    # Spectral ball (nuclear-norm dual: non-smooth), on a class padded from d to d + 2
    # outputs: padded coordinates must be inert, so the closed form is the unpadded one.
    pad = 2
    x_pad = jnp.concatenate([x, jnp.zeros((n, pad))], axis=1)
    mask = jnp.concatenate([jnp.ones((d,)), jnp.zeros((pad,))])
    spec = rademacher.estimate_rademacher(rademacher.linear_class(state_dim, d + pad, bound, "spectral"),
                                          x_pad, jax.random.PRNGKey(2), 3, 1, 300, 0.1, mask)
    exact = jax.vmap(lambda s: rademacher.linear_spectral_sup(x, s[:, :d], bound))(spec["sigma"])
    assert np.all(np.asarray(spec["sigma"])[..., d:] == 0)
    np.testing.assert_allclose(spec["per_draw"], exact, rtol=5e-3)
    assert np.all(np.asarray(spec["per_draw"]) <= np.asarray(exact) * (1 + 1e-4))  # a lower bound


def _action_jacobian(field_class, params, x):
    def field_of_action(a, s):
        return field_class.apply(params, jnp.concatenate([s, a])[None])[0]

    state_dim = field_class.state_dim
    return jax.vmap(jax.jacfwd(field_of_action))(x[:, state_dim:], x[:, :state_dim])


def test_conservative_field_is_a_gradient_and_free_field_is_not():
    state_dim, d = 3, 5
    x = jax.random.normal(jax.random.PRNGKey(0), (4, state_dim + d))
    sigma = rademacher.rademacher_signs(jax.random.PRNGKey(2), (4, d))

    @functools.partial(jax.jit, static_argnums=0)  # one compile instead of many eager ops
    def probe(name):
        fc = rademacher.build_class(name, state_dim, d, (16, 16), 2.0)
        params = fc.constrain(fc.init(jax.random.PRNGKey(1), jnp.ones((d,))))
        energy = lambda xi: rademacher.mlp_apply(params, xi[None])[0, 0]
        return {"jac": _action_jacobian(fc, params, x),
                "fast_corr": fc.correlate(params, x, sigma),  # a jvp for the conservative class
                "corr": rademacher.correlation(fc.apply(params, x), sigma),
                "field": fc.apply(params, x),
                "grad_energy": jax.vmap(jax.grad(energy))(x)[:, state_dim:]}

    asym = {}
    for name in ("conservative", "free"):
        out = jax.device_get(probe(name))
        jac = out["jac"]
        asym[name] = np.abs(jac - np.swapaxes(jac, 1, 2)).max() / np.abs(jac).max()
        np.testing.assert_allclose(out["fast_corr"], out["corr"], rtol=1e-5)
        if name == "conservative":  # exactly grad_a of the scalar energy
            np.testing.assert_allclose(out["field"], out["grad_energy"], rtol=1e-5, atol=1e-7)
    assert asym["conservative"] < 1e-5
    assert asym["free"] > 0.1


def test_padded_action_coordinates_are_inert():
    state_dim, d, d_max = 2, 3, 6
    mask = (jnp.arange(d_max) < d).astype(jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def probe(name):
        x = generalization.sample_inputs(jax.random.PRNGKey(0), 8, state_dim, mask, "unit")
        fc = rademacher.build_class(name, state_dim, d_max, (8,), 2.0)
        raw = fc.init(jax.random.PRNGKey(1), mask)
        grads = jax.grad(lambda p: fc.correlate(fc.constrain(p), x, jnp.ones((8, d_max)) * mask))(raw)
        return x, fc.apply(fc.constrain(raw), x), grads

    for name in ("conservative", "free"):
        x, field, grads = jax.device_get(probe(name))
        assert np.all(x[:, state_dim + d:] == 0)
        assert np.all(field[:, d:] == 0)
        # ... and stay so under the ascent's gradients.
        assert np.all(grads[0]["w"][state_dim + d:] == 0)
        if name == "free":
            assert np.all(grads[-1]["w"][:, d:] == 0)


def test_spectral_constraint_holds_after_projection():
    bound = 1.5
    sizes = (7, 12, 9, 4)

    @jax.jit
    def probe(key):
        raw = rademacher.init_mlp(key, sizes, bound)
        big = jax.tree.map(lambda p: 10.0 * p + 0.3, raw)
        small = jax.tree.map(lambda p: 0.1 * p, raw)
        projected = rademacher.project_mlp(big, bound)
        return (rademacher.layer_spectral_norms(raw), projected, small, rademacher.project_mlp(small, bound))

    init_norms, projected, small, small_projected = jax.device_get(probe(jax.random.PRNGKey(0)))
    np.testing.assert_allclose(init_norms, bound, rtol=1e-4)  # init starts on the bound
    # Checked with numpy's SVD: the augmented [W; b] of every layer is inside the ball.
    for layer in projected:
        m = np.concatenate([layer["w"], layer["b"][None]]) if "b" in layer else layer["w"]
        np.testing.assert_allclose(np.linalg.norm(m, 2), bound, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(small_projected), jax.tree.leaves(small)):  # inside: unchanged
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for shape in ((5, 11), (11, 5)):
        w = np.asarray(jax.random.normal(jax.random.PRNGKey(3), shape))
        np.testing.assert_allclose(jax.jit(rademacher.spectral_norm_exact)(w), np.linalg.norm(w, 2), rtol=1e-5)


def test_fit_loglog_recovers_known_exponent():
    d = np.array([1, 2, 4, 8, 16])
    fit = experiment.fit_loglog(d, 3.0 * d ** 0.5)
    assert abs(fit["slope"] - 0.5) < 1e-9
    pooled = experiment.fit_pooled_slope([(d, 3.0 * d ** 0.7), (d, 0.1 * d ** 0.7)])
    assert abs(pooled["slope"] - 0.7) < 1e-9


def test_config_is_locked_with_experiment_name():
    config = load_sweep_config(None)
    assert config.experiment == "capacity"
    assert set(config.action_dims) >= {1, 2, 4, 8, 16, 32, 64}
    with pytest.raises(AttributeError):
        config.not_a_field = 1
    assert load_sweep_config("paper").rademacher.n_sign_draws > config.rademacher.n_sign_draws


def _all_finite(tree):
    leaves = [v for v in jax.tree.leaves(tree) if isinstance(v, (int, float))]
    return leaves and all(math.isfinite(v) for v in leaves)


def test_small_sweep_writes_capacity_json(tmp_path):
    config = load_sweep_config("smoke")
    config.action_dims = (1, 4)
    config.hidden_widths = (8,)
    config.rademacher.sample_sizes = (16,)
    config.rademacher.ascent_steps = 10
    config.generalization.action_dims = (1, 4)
    config.generalization.n_train = 16
    config.generalization.n_test = 32
    config.generalization.train_steps = 10

    summary = experiment.train_and_evaluate(config, tmp_path)

    report = json.loads((tmp_path / "capacity.json").read_text())
    assert (tmp_path / "complexity_vs_d.png").stat().st_size > 0
    assert (tmp_path / "gap_vs_d.png").stat().st_size > 0
    assert {"config", "rademacher", "rademacher_references", "generalization", "slopes", "theory",
            "summary"} <= set(report)
    rows = report["rademacher"]
    assert {(r["class"], r["d"], r["n"]) for r in rows} == {(c, d, 16) for c in ("conservative", "free") for d in (1, 4)}
    for r in rows:
        assert r["mean"] > 0 and math.isfinite(r["std"]) and len(r["per_draw"]) == config.rademacher.n_sign_draws
        assert math.isfinite(r["constant_share"])
    gen = report["generalization"]
    assert {(r["class"], r["d"]) for r in gen} == {(c, d) for c in ("conservative", "free") for d in (1, 4)}
    assert all(_all_finite({k: v for k, v in r.items() if k.endswith(("_mean", "_std"))}) for r in gen)
    for name in ("conservative", "free"):
        assert math.isfinite(report["slopes"]["rademacher"][name]["d_slope_pooled"]["slope"])
        assert math.isfinite(summary[f"rademacher_d_slope_{name}"])
        assert report["slopes"]["rademacher"][name]["theory_d_slope"] == experiment.THEORY_D_SLOPE[name]
    # The reference class is exactly sqrt(d)-like: its slope is near 0.5 even at n = 16.
    assert 0.0 < summary["rademacher_d_slope_linear_frobenius"] < 1.2
