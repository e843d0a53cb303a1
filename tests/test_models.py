import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, tiny_model

from energyflow_jax.nn import kernels, layers
from energyflow_jax.models import EnergyFlowModel


def _inputs(model, batch=3, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    a = jax.random.normal(k1, (batch, *model.action_shape))
    s = jax.random.normal(k2, (batch, *model.obs_shape))
    return a, s, jnp.full((batch,), 0.3)


def _score_jacobian(model, params, a, s, t):
    """d score / d a for the first sample of the batch, as a (L*A, L*A) matrix."""
    def f(flat):
        actions = a.at[0].set(flat.reshape(model.action_shape))
        return model.score(params, actions, s, t)[0].ravel()
    return jax.jit(jax.jacfwd(f))(a[0].ravel())


# Batch 1 runs the U-Net's convolutions in the window form, a large batch in Winograd form.
@pytest.mark.parametrize("arch,batch", [("mlp", 1), ("unet", 1),
                                        ("unet", kernels.WINOGRAD_MIN_BATCH)])
@pytest.mark.slow
def test_conservative_score_has_symmetric_jacobian_and_free_does_not(arch, batch):
    for kind in ("conservative", "free"):
        model = tiny_model(kind, arch)
        params = model.init(jax.random.PRNGKey(1))
        a, s, t = _inputs(model, batch=batch)
        jac = _score_jacobian(model, params, a, s, t)
        asym = float(jnp.max(jnp.abs(jac - jac.T)))
        scale = float(jnp.max(jnp.abs(jac)))
        assert scale > 1e-6, "degenerate Jacobian makes the test meaningless"
        if kind == "conservative":
            assert asym <= 1e-4 * scale, (arch, asym, scale)
        else:
            assert asym > 1e-2 * scale, (arch, asym, scale)


@pytest.mark.parametrize("arch", ["mlp", "unet"])
def test_shapes_and_score_is_negative_energy_gradient(arch):
    model = tiny_model("conservative", arch)
    params = model.init(jax.random.PRNGKey(0))
    a, s, t = _inputs(model, batch=5)
    energy_fn, score_fn = jax.jit(model.energy), jax.jit(model.score)
    energy = energy_fn(params, a, s, t)
    score = score_fn(params, a, s, t)
    chex.assert_shape(energy, (5,))
    chex.assert_shape(score, (5, *model.action_shape))
    # Finite differences on one coordinate of one sample.
    eps = 1e-3
    bump = jnp.zeros_like(a).at[2, 1, 0].set(eps)
    fd = (energy_fn(params, a + bump, s, t)[2] - energy_fn(params, a - bump, s, t)[2]) / (2 * eps)
    np.testing.assert_allclose(-score[2, 1, 0], fd, rtol=2e-2, atol=1e-4)
    # Samples are independent: changing sample 0 leaves sample 1's energy alone.
    e2 = energy_fn(params, a.at[0].add(1.0), s, t)
    np.testing.assert_allclose(e2[1:], energy[1:], rtol=1e-6)


@pytest.mark.slow
def test_unet_handles_odd_horizons_and_bfloat16():
    c = tiny_config("conservative", "unet")
    c.model.dtype = "bfloat16"
    model = EnergyFlowModel.create(c.model, (2, 3), (5, 2))
    params = model.init(jax.random.PRNGKey(0))
    a, s, t = _inputs(model)
    score = jax.jit(model.score)(params, a, s, t)
    chex.assert_shape(score, (3, 5, 2))
    chex.assert_tree_all_finite(score)
    chex.assert_type(jax.tree.leaves(params), jnp.float32)  # params stay float32


def test_spectral_dense_has_unit_spectral_norm():
    layer = layers.SpectralDense(24)
    x = jnp.ones((2, 40))
    params = layer.init(jax.random.PRNGKey(0), x)
    kernel = params["params"]["kernel"] * 5.0  # any scale: normalization removes it
    params = {"params": {**params["params"], "kernel": kernel}}
    # Recover the effective matrix from the layer's action on basis vectors.
    eye = jnp.eye(40)
    w_eff = layer.apply(params, eye) - layer.apply(params, jnp.zeros((1, 40)))
    top = float(jnp.linalg.svd(w_eff, compute_uv=False)[0])
    assert abs(top - 1.0) < 1e-3, top


def test_published_network_size():
    from energyflow_jax.config import base_config
    model = EnergyFlowModel.create(base_config().model, (2, 39), (16, 4))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n == 4_812_032  # the reference implementation's count, NOTES.md: about 4.81 M


def test_bad_inputs_and_configs_give_clear_errors():
    model = tiny_model()
    params = model.init(jax.random.PRNGKey(0))
    a, s, t = _inputs(model)
    with pytest.raises(ValueError, match=r"action chunk shape \(5, 2\).*\(4, 2\)"):
        model.energy(params, jnp.zeros((3, 5, 2)), s, t)
    with pytest.raises(ValueError, match="observation shape"):
        model.score(params, a, jnp.zeros((3, 2, 4)), t)
    free = tiny_model("free")
    with pytest.raises(ValueError, match="no energy"):
        free.energy(free.init(jax.random.PRNGKey(0)), a, s, t)
    c = tiny_config()
    c.model.kind = "curly"
    with pytest.raises(ValueError, match="model.kind"):
        EnergyFlowModel.create(c.model, (2, 3), (4, 2))
    c = tiny_config(arch="unet")
    c.model.down_dims = (6, 16)
    with pytest.raises(ValueError, match="divisible by model.n_groups"):
        EnergyFlowModel.create(c.model, (2, 3), (4, 2))
    c = tiny_config()
    c.lock()
    with pytest.raises(AttributeError, match="lerning_rate"):
        c.optim.lerning_rate = 1.0


@pytest.mark.parametrize("m,r", [(4, 5), (4, 3), (2, 3)])
def test_winograd_matrices_compute_correlation_exactly(m, r):
    a_t, g, b_t = kernels.winograd_matrices(m, r)
    rng = np.random.default_rng(0)
    d, w = rng.normal(size=m + r - 1), rng.normal(size=r)
    expected = np.array([d[i:i + r] @ w for i in range(m)])
    np.testing.assert_allclose(a_t @ ((g @ w) * (b_t @ d)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length,r", [(1, 5), (2, 5), (3, 3), (4, 5), (4, 3)])
def test_short_sequence_matrices_compute_padded_correlation_in_2l_minus_1_products(length, r):
    a_t, g, b_t = kernels.short_sequence_matrices(length, r)
    assert b_t.shape == (2 * length - 1, length)
    rng = np.random.default_rng(length)
    x, w = rng.normal(size=length), rng.normal(size=r)
    xp = np.pad(x, (r // 2, r // 2))
    expected = np.array([xp[i:i + r] @ w for i in range(length)])
    np.testing.assert_allclose(a_t @ ((g @ w) * (b_t @ x)), expected, rtol=1e-12, atol=1e-12)


def test_small_matmul_derivatives_match_a_plain_matmul():
    """Its tangent rule is hand-written: first derivatives in both modes and the
    DSM-style second-order gradient in the weights must equal x @ w's."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 20))
    w = jax.random.normal(jax.random.PRNGKey(1), (20, 6)) / 4.0
    v = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    def loss(matmul):
        return lambda x, w: jnp.sum(layers.softplus(matmul(x, w)) ** 2)

    small, plain = loss(kernels._small_matmul), loss(jnp.matmul)
    for argnum in (0, 1):
        np.testing.assert_allclose(jax.grad(small, argnum)(x, w), jax.grad(plain, argnum)(x, w),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jvp(lambda x: small(x, w), (x,), (v,))[1],
                               jax.jvp(lambda x: plain(x, w), (x,), (v,))[1], rtol=1e-5)

    def dsm_like(f):
        return lambda w: jnp.sum((jax.grad(f)(x, w) - v) ** 2)
    expected = jax.grad(dsm_like(plain))(w)
    assert float(jnp.max(jnp.abs(expected))) > 1e-3
    np.testing.assert_allclose(jax.grad(dsm_like(small))(w), expected, rtol=1e-4, atol=1e-6)


def test_softplus_and_its_derivatives_match_jax():
    x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 601), jnp.array([-1e4, 1e4, 0.0])])
    np.testing.assert_allclose(layers.softplus(x), jax.nn.softplus(x), rtol=1e-6, atol=1e-6)
    d1 = jax.vmap(jax.grad(layers.softplus))(x)
    d2 = jax.vmap(jax.grad(jax.grad(layers.softplus)))(x)
    np.testing.assert_allclose(d1, jax.nn.sigmoid(x), rtol=1e-6, atol=1e-7)
    sig = jax.nn.sigmoid(x)
    np.testing.assert_allclose(d2, sig * (1 - sig), rtol=1e-5, atol=1e-7)
    assert bool(jnp.all(jnp.isfinite(d2)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_matches_flax_with_its_gradients(dtype):
    import flax.linen as nn

    x = (3.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 8, 64)) + 1.0).astype(dtype)
    ours, flax_gn = layers.GroupNorm(num_groups=8), nn.GroupNorm(num_groups=8, epsilon=1e-5)
    params = flax_gn.init(jax.random.PRNGKey(1), x)
    chex.assert_trees_all_equal_shapes(params, ours.init(jax.random.PRNGKey(1), x))
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    y, y_ref = ours.apply(params, x), flax_gn.apply(params, x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    # Second order too: the conservative model's DSM loss differentiates the score.
    w = jax.random.normal(jax.random.PRNGKey(3), y.shape)

    def grad_norm(norm, p):
        g = jax.grad(lambda a: jnp.sum(w * jnp.tanh(norm.apply(p, a))))(x.astype(jnp.float32))
        return jnp.sum(g ** 2)

    g2, g2_ref = jax.grad(grad_norm, 1)(ours, params), jax.grad(grad_norm, 1)(flax_gn, params)
    chex.assert_trees_all_close(g2, g2_ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="do not divide"):
        layers.GroupNorm(num_groups=5).init(jax.random.PRNGKey(0), x)
