"""The convolution forms (nn.kernels.KernelPolicy) compute one function.

Every form is compared with `lax` (the backend's convolution) at HIGHEST
matmul precision, so on any backend the forms differ only by float32
rounding. Each comparison jits all forms and sizes together: one compile per
batch and dtype.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energyflow_jax import config as config_lib
from energyflow_jax.config import base_config
from energyflow_jax.models import Conditioning, EnergyFlowModel
from energyflow_jax.nn import kernels, layers
from energyflow_jax.objectives import dsm
from energyflow_jax.training import HParams



def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / (np.max(np.abs(ref)) + 1e-30))


def _conv_terms(policy, x, kernel, kernel_size, stride, dtype, second_order=True):
    """A conv layer's output, its input score and a DSM-like second-order gradient."""
    def energy(x_, k_):
        y = kernels.conv1d(x_, k_, kernel_size, stride, dtype, policy).astype(jnp.float32)
        return jnp.sum(jax.nn.softplus(y) * jnp.cos(jnp.arange(y.shape[1]))[:, None])

    score = jax.grad(energy)
    y = kernels.conv1d(x, kernel, kernel_size, stride, dtype, policy).astype(jnp.float32)
    if not second_order:
        return y, score(x, kernel)
    return y, score(x, kernel), jax.grad(lambda k_: jnp.sum(jnp.square(score(x, k_) + x)))(kernel)


ALL_LENGTHS = tuple(range(1, 17))
# Winograd's second-order graph compiles slowly (about 3 s per length on 2
# cores); these lengths cover each of its cases: one short-sequence tile
# (3, 4), one full tile plus a partial one (6), whole tiles (8) and a
# one-output last tile (9).
# Its output and score are compared at every length.
WINOGRAD_SECOND_ORDER = (3, 4, 6, 8, 9)


@pytest.mark.slow
@pytest.mark.parametrize("batch,dtype,forms,lengths", [
    (32, jnp.float32, ("winograd",), ALL_LENGTHS),
    # the windows form and its batch-1 dots (Winograd's arithmetic does not depend
    # on the batch)
    (1, jnp.float32, ("windows",), ALL_LENGTHS),
    (32, jnp.bfloat16, ("windows",), (1, 2, 5, 8, 16)),  # Winograd is refused under bfloat16
])
def test_conv_forms_equal_lax_for_every_length_and_stride(batch, dtype, forms, lengths):
    channels, features = 3, 4
    cases = [(length, k, stride) for length in lengths for k, stride in ((5, 1), (3, 2))]
    rng = np.random.default_rng(batch)
    inputs = [(rng.normal(size=(batch, length, channels)).astype(np.float32),
               rng.normal(size=(k * channels, features)).astype(np.float32) / k)
              for length, k, stride in cases]

    def second_order(form, length):
        return form != "winograd" or length in WINOGRAD_SECOND_ORDER

    @jax.jit
    def all_terms(inputs):  # one compile for every form and size
        return {form: [_conv_terms(kernels.KernelPolicy(form, "highest"), x, w, k, s, dtype,
                                   second_order(form, length))
                       for (x, w), (length, k, s) in zip(inputs, cases)]
                for form in ("lax",) + forms}

    out = jax.device_get(all_terms(inputs))
    tol = 3e-2 if dtype == jnp.bfloat16 else 2e-5
    for i, (length, k, stride) in enumerate(cases):
        ref = out["lax"][i]
        chex.assert_shape(ref[0], (batch, -(-length // stride), features))
        for form in forms:
            got = out[form][i]
            assert len(got) == (3 if second_order(form, length) else 2)
            for name, g, r in zip(("output", "score", "dsm gradient"), got, ref):
                assert np.all(np.isfinite(g)), (form, length, stride, name)
                assert _rel(g, r) < tol, (form, length, stride, name, _rel(g, r))


def _model_config(conv_impl, dtype="float32", precision="highest"):
    c = base_config().model
    c.update(down_dims=(8, 16), n_groups=4, head_dims=(8,), state_emb_dim=8, time_emb_dim=8,
             conv_impl=conv_impl, matmul_precision=precision, dtype=dtype)
    return c


@pytest.mark.slow
@pytest.mark.parametrize("form,batch", [("windows", 1), ("winograd", 8)])
def test_model_forms_equal_lax_for_dsm_gradient_and_sampler(form, batch):
    """Through the whole one-level U-Net: energy, score, the DSM loss, its gradient in
    the parameters (second order: the score is grad_a E) and a K=2 sampler's chunks, each
    form against lax with the same parameters, inputs and keys. GroupNorm and the batch-1
    dots take other paths in the lax form than in the CPU forms; strided and upsampling
    convolutions are compared per convolution above. The batch is the one each form
    serves (windows below 32, Winograd forced at 8: the same arithmetic as from 32)."""
    models = {}
    for name in ("lax", form):
        c = _model_config(name)
        c.down_dims = (8,)
        models[name] = EnergyFlowModel.create(c, (2, 3), (4, 2))
    params = models["lax"].init(jax.random.PRNGKey(0))
    schedule = dsm.VESchedule.from_config(base_config().diffusion)
    batch_data = {"actions": jax.random.normal(jax.random.PRNGKey(1), (batch, 4, 2)),
                  "obs": jax.random.normal(jax.random.PRNGKey(2), (batch, 2, 3))}
    key = jax.random.PRNGKey(3)
    t = jax.random.uniform(jax.random.PRNGKey(4), (batch,))

    def terms(model):
        a, s = batch_data["actions"], batch_data["obs"]
        loss, grads = jax.value_and_grad(dsm.dsm_loss, argnums=1)(model, params, batch_data,
                                                                  key, schedule)
        chunks = dsm.sample(model, params, s, key, schedule, n_steps=2)
        return model.energy(params, a, s, t), model.score(params, a, s, t), loss, grads, chunks

    out = jax.device_get(jax.jit(lambda: {name: terms(m) for name, m in models.items()})())
    chex.assert_shape(out[form][1], (batch, 4, 2))
    chex.assert_shape(out[form][4], (batch, 4, 2))
    chex.assert_trees_all_equal_shapes(out[form][3], params)
    for name, got, ref in zip(("energy", "score", "loss", "gradient", "sampler"), out[form],
                              out["lax"]):
        flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
                for tree in (got, ref)]
        assert _rel(*flat) < 5e-5, (form, name, _rel(*flat))
    # Not vacuous: the gradient reaches every leaf.
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(out["lax"][3]))


def test_step_selection_and_group_norm_forms_agree():
    """The sampler's step selection (one-hot dot on CPU, a gather in the lax form)
    and GroupNorm's statistics (spread dot vs broadcast) are exact in both forms."""
    rng = np.random.default_rng(0)
    cond = Conditioning(state=(jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),),
                        time=(jnp.asarray(rng.normal(size=(20, 6)), jnp.float32),))
    for k in (0, 7, 19):
        one_hot = cond.at(jnp.int32(k), kernels.KernelPolicy(kernels.CPU_MEASURED, "default"))
        gather = cond.at(jnp.int32(k), kernels.KernelPolicy("lax", "default"))
        np.testing.assert_array_equal(one_hot[0], gather[0])
        np.testing.assert_array_equal(gather[0], cond.state[0] + cond.time[0][k])
    x = jnp.asarray(rng.normal(size=(3, 5, 8)) * 3 + 1, jnp.float32)
    spread, broadcast = (layers.GroupNorm(4, policy=kernels.KernelPolicy(conv))
                         for conv in (kernels.CPU_MEASURED, "lax"))
    params = spread.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(spread.apply(params, x), broadcast.apply(params, x),
                               rtol=1e-6, atol=1e-6)


def _primitives(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _primitives(sub)


def test_gpu_form_dsm_gradient_has_no_lhs_dilated_convolution():
    gpu_model = EnergyFlowModel.create(_model_config("auto"), (2, 3), (16, 2), backend="gpu")
    assert gpu_model.policy.conv == "lax"
    params = gpu_model.init(jax.random.PRNGKey(0))
    hp = HParams.from_config(base_config())
    batch = {"obs": jnp.ones((4, 2, 3)), "actions": jnp.ones((4, 16, 2))}
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda p: dsm.dsm_loss(gpu_model, p, batch, jax.random.PRNGKey(0), hp.schedule)))(params)
    convs = [e for e in _primitives(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]
    # forward, score and second-order passes of every convolution, strided ones included
    assert len(convs) >= 3 * 17
    assert all(tuple(e.params["lhs_dilation"]) == (1,) for e in convs)
    assert all(tuple(e.params["window_strides"]) == (1,) for e in convs)


@pytest.mark.parametrize("backend,conv", [("cpu", kernels.CPU_MEASURED), ("gpu", "lax"),
                                          ("tpu", "lax")])
def test_auto_resolves_once_by_backend(monkeypatch, backend, conv):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    model = EnergyFlowModel.create(_model_config("auto"), (2, 3), (4, 2))
    assert model.policy == kernels.KernelPolicy(conv, "highest")
    assert model.policy.plain == (backend != "cpu")


def test_bad_kernel_settings_name_the_valid_ones():
    with pytest.raises(ValueError, match="'auto', 'lax', 'winograd', 'windows'"):
        EnergyFlowModel.create(_model_config("cudnn"), (2, 3), (4, 2))
    with pytest.raises(ValueError, match="'default', 'high', 'highest'"):
        EnergyFlowModel.create(_model_config("lax", precision="tf32"), (2, 3), (4, 2))
    with pytest.raises(ValueError, match="amplify bfloat16 rounding"):
        EnergyFlowModel.create(_model_config("winograd", dtype="bfloat16"), (2, 3), (4, 2))
    c = base_config()
    c.model.conv_impl, c.model.dtype = "winograd", "bfloat16"
    with pytest.raises(config_lib.ConfigError, match="model.conv_impl='winograd'"):
        config_lib.validate(c)
    c.model.conv_impl = "fft"
    with pytest.raises(config_lib.ConfigError, match="model.conv_impl='fft'"):
        config_lib.validate(c)
