"""Classifier-free guidance against the exact class-conditional and unconditional denoisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.analytic import GaussianMixture
from jaxdiff.guidance import classifier_free

NULL = 3  # the null label: one past the mixture's classes {0, 1, 2}
B, D = 6, 2


def _mixture():
    return GaussianMixture.create(
        jnp.array([0.2, 0.3, 0.1, 0.4]),
        jnp.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0], [1.0, -2.0]]),
        stds=jnp.array([0.3, 0.5, 0.4, 0.6]),
        labels=jnp.array([0, 1, 2, 1]),
    )


def _null_means_unconditional(mix, process, x, t, cond=None):
    """Exact denoiser where the null label means 'unconditional', as a trained network's."""
    is_null = (cond == NULL)[:, None]
    d_c = mix.denoise(process, x, t, y=jnp.where(cond == NULL, 0, cond))
    d_u = mix.denoise(process, x, t)
    return jnp.where(is_null, d_u, d_c)


def _net_like_denoiser(mix, process):
    """A pytree denoiser (``Partial``), so it can be passed through ``jax.jit``."""
    return jax.tree_util.Partial(_null_means_unconditional, mix, process)


@pytest.fixture(scope="module")
def setup():
    process = jaxdiff.VPProcess()
    mix = _mixture()
    x = jax.random.normal(jax.random.key(0), (B, D), jnp.float64)
    t = jnp.linspace(0.2, 0.9, B)
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    d_c = mix.denoise(process, x, t, y=labels)
    d_u = mix.denoise(process, x, t)
    return process, mix, x, t, labels, d_c, d_u


def test_scales_zero_one_two_match_the_exact_denoisers(setup):
    process, mix, x, t, labels, d_c, d_u = setup
    denoiser = _net_like_denoiser(mix, process)
    null = jnp.full((B,), NULL)

    def guided(s):
        return classifier_free(denoiser, process, s, null_cond=null)(x, t, labels)

    np.testing.assert_array_equal(guided(1.0), d_c)
    np.testing.assert_allclose(guided(0.0), d_u, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(guided(2.0), 2 * d_c - d_u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(guided(-0.5), 1.5 * d_u - 0.5 * d_c, rtol=1e-12, atol=1e-12)
    # The conditional and unconditional answers differ, so the checks above can fail.
    assert float(jnp.max(jnp.abs(d_c - d_u))) > 0.1


def test_per_example_scales_broadcast_over_data_axes(setup):
    process, mix, x, t, labels, d_c, d_u = setup
    scales = jnp.array([0.0, 1.0, 2.0, 3.5, -1.0, 7.0])
    out = classifier_free(_net_like_denoiser(mix, process), process, scales,
                          null_cond=jnp.asarray(NULL))(x, t, labels)
    expected = d_u + scales[:, None] * (d_c - d_u)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_one_call_on_a_stacked_axis_of_two(setup):
    process, mix, x, t, labels, d_c, d_u = setup
    inner = _net_like_denoiser(mix, process)
    calls = []

    def counting(x, t, cond=None):
        calls.append(cond.shape)
        return inner(x, t, cond) + 0.0 * jnp.sin(cond.astype(x.dtype))[:, None]

    def guided():
        return classifier_free(counting, process, 3.0, null_cond=lambda b: jnp.full((b,), NULL))

    jaxpr = jax.make_jaxpr(guided())(x, t, labels)
    assert len(calls) == 1 and calls[0] == (B,)  # one trace, one batched call
    sin_shapes = [e.invars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "sin"]
    assert sin_shapes == [(2, B)]  # the condition carries the new leading axis of size 2
    calls.clear()
    np.testing.assert_allclose(jax.jit(guided())(x, t, labels), 3 * d_c - 2 * d_u,
                               rtol=1e-12, atol=1e-12)
    assert len(calls) == 1


def test_pytree_cond_and_null_cond(setup):
    process, mix, x, t, labels, d_c, d_u = setup
    inner = _net_like_denoiser(mix, process)

    def denoiser(x, t, cond):
        return inner(x, t, cond["label"]) * cond["gain"][:, None]

    cond = {"label": labels, "gain": jnp.full((B,), 2.0)}
    null = {"label": jnp.asarray(NULL), "gain": jnp.asarray(1.0)}
    out = classifier_free(denoiser, process, 1.5, null_cond=null)(x, t, cond)
    np.testing.assert_allclose(out, d_u + 1.5 * (2 * d_c - d_u), rtol=1e-12, atol=1e-12)


def test_guided_sampling_runs_under_jit_and_scale_one_is_the_conditional_sampler(setup):
    process, mix, _, _, labels, _, _ = setup
    denoiser = _net_like_denoiser(mix, process)
    null = jnp.full((B,), NULL)
    compiles = []

    @jax.jit
    def run(key, guided):
        compiles.append(1)
        return jaxdiff.sample(key, guided, process, (B, D), steps=8, cond=labels)

    key = jax.random.key(1)
    guided_one = run(key, classifier_free(denoiser, process, 1.0, null_cond=null))
    plain = jaxdiff.sample(key, denoiser, process, (B, D), steps=8, cond=labels)
    np.testing.assert_allclose(guided_one, plain, rtol=1e-10, atol=1e-10)
    guided_three = run(key, classifier_free(denoiser, process, 3.0, null_cond=null))
    assert bool(jnp.all(jnp.isfinite(guided_three)))
    assert float(jnp.max(jnp.abs(guided_three - guided_one))) > 1e-3
    assert len(compiles) == 1  # a new scale is pytree data: no recompilation


def test_gradient_with_respect_to_the_scale(setup):
    process, mix, x, t, labels, d_c, d_u = setup
    denoiser = _net_like_denoiser(mix, process)

    def total(s):
        return jnp.sum(classifier_free(denoiser, process, s, null_cond=jnp.asarray(NULL))(
            x, t, labels))

    grad = jax.jit(jax.grad(total))(2.0)
    assert np.isfinite(grad)
    np.testing.assert_allclose(grad, jnp.sum(d_c - d_u), rtol=1e-12)
    per_example = jax.grad(total)(jnp.ones(B))
    np.testing.assert_allclose(per_example, jnp.sum(d_c - d_u, axis=1), rtol=1e-12, atol=1e-14)


def test_bad_input_is_refused(setup):
    process, mix, x, t, labels, _, _ = setup
    denoiser = _net_like_denoiser(mix, process)
    null = jnp.asarray(NULL)
    with pytest.raises(ValueError, match="cond"):
        classifier_free(denoiser, process, 2.0, null_cond=null)(x, t)
    with pytest.raises(ValueError, match="null_cond"):
        classifier_free(denoiser, process, 2.0, null_cond=None)
    with pytest.raises(TypeError, match="denoiser"):
        classifier_free("net", process, 2.0, null_cond=null)
    with pytest.raises(ValueError, match="finite"):
        classifier_free(denoiser, process, jnp.inf, null_cond=null)
    with pytest.raises(ValueError, match="scale"):
        classifier_free(denoiser, process, jnp.ones((2, 2)), null_cond=null)
    with pytest.raises(ValueError, match="scale"):
        classifier_free(denoiser, process, jnp.ones(B + 1), null_cond=null)(x, t, labels)
    with pytest.raises(ValueError, match="tree structure"):
        classifier_free(denoiser, process, 2.0, null_cond={"label": null})(x, t, labels)
    with pytest.raises(ValueError, match="broadcast"):
        classifier_free(denoiser, process, 2.0, null_cond=jnp.zeros(B + 1, int))(x, t, labels)
