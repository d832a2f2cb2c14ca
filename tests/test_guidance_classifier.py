"""Classifier guidance and EluCD-style calibrated guidance against exact references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.analytic import GaussianMixture
from jaxdiff.guidance.classifier import (
    calibrated_classifier_guidance,
    classifier_guidance,
    log_prob_from_logits,
    sine_bump,
)

B, D = 6, 2


def _mixture():
    return GaussianMixture.create(
        jnp.array([0.2, 0.3, 0.1, 0.4]),
        jnp.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0], [1.0, -2.0]]),
        stds=jnp.array([0.3, 0.5, 0.4, 0.6]),
        labels=jnp.array([0, 1, 2, 1]),
    )


def _unconditional(mix, process, x, t, cond=None):
    del cond  # an unconditional model ignores the labels
    return mix.denoise(process, x, t)


def _class_logits(mix, process, x, t):
    return mix.class_log_posterior(process, x, t)  # exact log p(y | x_t), a valid set of logits


@jax.custom_vjp
def _half(x):
    return 0.5 * x


def _half_fwd(x):
    return _half(x), None


def _half_bwd(res, g):
    raise AssertionError("the denoiser was differentiated")


_half.defvjp(_half_fwd, _half_bwd)


def _undifferentiable_denoiser(x, t, cond=None):
    return _half(x)


def _guided_and_references(mix, process, t, x0, noise, labels):
    x = process.alpha(t)[:, None] * x0 + process.sigma(t)[:, None] * noise
    uncond = jax.tree_util.Partial(_unconditional, mix, process)
    log_prob_fn = log_prob_from_logits(jax.tree_util.Partial(_class_logits, mix, process))

    def guided(s):
        return classifier_guidance(uncond, process, log_prob_fn, s)(x, t, labels)

    def log_posterior(z):
        return jnp.take_along_axis(mix.class_log_posterior(process, z, t), labels[:, None], 1)

    grad = jax.grad(lambda z: jnp.sum(log_posterior(z)))(x)
    d_u = mix.denoise(process, x, t)
    # The score-space reference: s' = s_u + 2 grad, converted back to a denoiser.
    score = jaxdiff.convert(d_u, process, x, t, from_kind="x0", to_kind="score")
    two_ref = jaxdiff.convert(score + 2.0 * grad, process, x, t, from_kind="score", to_kind="x0")
    zero, one, two = jax.vmap(guided)(jnp.array([0.0, 1.0, 2.0]))
    return dict(one=one, zero=zero, two=two, cond=mix.denoise(process, x, t, y=labels),
                uncond=d_u, two_ref=two_ref)


def test_exact_classifier_turns_the_unconditional_denoiser_into_the_conditional_one():
    mix = _mixture()
    labels = jnp.array([0, 1, 2, 1, 0, 2])
    processes = (jaxdiff.VPProcess(), jaxdiff.EDMProcess())
    times = (jnp.array([0.02, 0.1, 0.3, 0.5, 0.7, 0.95]),
             jnp.array([0.01, 0.1, 0.5, 1.0, 3.0, 20.0]))

    rng = np.random.default_rng(0)
    comp = rng.integers(0, 4, B)
    x0 = np.asarray(mix.components.mean)[comp] + 0.5 * rng.standard_normal((B, D))
    noise = rng.standard_normal((B, D))

    @jax.jit
    def run(times):
        return [_guided_and_references(mix, process, t, x0, noise, labels)
                for process, t in zip(processes, times)]

    for r in run(times):
        np.testing.assert_allclose(r["one"], r["cond"], rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(r["zero"], r["uncond"])
        np.testing.assert_allclose(r["two"], r["two_ref"], rtol=1e-10, atol=1e-10)
        assert float(jnp.max(jnp.abs(r["cond"] - r["uncond"]))) > 0.1
        assert float(jnp.max(jnp.abs(r["two"] - r["one"]))) > 0.1


def test_classifier_guidance_does_not_differentiate_the_denoiser():
    process = jaxdiff.VPProcess()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((B, D)))
    t = jnp.linspace(0.1, 0.9, B)
    labels = jnp.array([0, 1, 0, 1, 0, 1])
    w = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    logits_fn = jax.tree_util.Partial(lambda w, x, t: (x @ w) * (1.0 + t)[:, None], w)
    scales = jnp.linspace(-1.0, 3.0, B)
    out = jax.jit(lambda: classifier_guidance(
        _undifferentiable_denoiser, process, log_prob_from_logits(logits_fn), scales)(
            x, t, labels))()
    # d/dx log_softmax(c x W)_y = c (W_y - W p), with c = 1 + t and p = softmax(c x W).
    c = 1.0 + np.asarray(t)[:, None]
    wn = np.asarray(w)
    f = c * (np.asarray(x) @ wn)
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = c * (wn[:, np.asarray(labels)].T - p @ wn.T)
    coef = (np.asarray(process.sigma(t)) ** 2 / np.asarray(process.alpha(t)))[:, None]
    expected = 0.5 * np.asarray(x) + np.asarray(scales)[:, None] * coef * grad
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_calibrated_guidance_matches_the_hand_formula_on_linear_logits():
    process = jaxdiff.VPProcess()
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((B, D)))
    t = jnp.array([process.t_min, 0.1, 0.3, 0.5, 0.8, process.t_max])
    labels = jnp.array([0, 1, 2, 2, 1, 0])
    w = jnp.asarray(rng.standard_normal((D, 3)))
    bias = jnp.array([0.3, -0.2, 0.1])
    logits_fn = jax.tree_util.Partial(lambda w, b, z: z @ w + b[None], w, bias)
    scales = jnp.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    tau1, discount, gamma = 1.5, 0.5, 0.3

    @jax.jit
    def run():
        def guided(schedule):
            return calibrated_classifier_guidance(
                _undifferentiable_denoiser, process, logits_fn, scales,
                joint_temperature=tau1, margin_temperature_discount=discount,
                schedule=schedule)(x, t, labels)

        return guided(sine_bump(gamma)), guided(None)

    bump, flat = run()
    # log p~ = tau1 f_y - logsumexp(tau2 f); its gradient in x0 for f = x0 W + b.
    tau2 = tau1 * discount
    x0 = 0.5 * np.asarray(x)
    wn = np.asarray(w)
    f = x0 @ wn + np.asarray(bias)
    p = np.exp(tau2 * f - (tau2 * f).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = tau1 * wn[:, np.asarray(labels)].T - tau2 * p @ wn.T
    tn = np.asarray(t)
    coef = (np.asarray(process.sigma(t)) ** 2 / np.asarray(process.alpha(t)))[:, None]
    u = (tn - process.t_min) / (process.t_max - process.t_min)
    rho = 1.0 + gamma * np.sin(np.pi * u)[:, None]
    s = np.asarray(scales)[:, None]
    np.testing.assert_allclose(bump, x0 + s * rho * coef * grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(flat, x0 + s * coef * grad, rtol=1e-12, atol=1e-12)
    assert float(jnp.max(jnp.abs(bump - flat))) > 1e-2  # the schedule matters
    np.testing.assert_allclose(sine_bump(gamma)(jnp.array([0.0, 0.5, 1.0])),
                               [1.0, 1.0 + gamma, 1.0], rtol=1e-15, atol=1e-15)


def test_bad_input_is_refused():
    process = jaxdiff.VPProcess()
    x, t = jnp.ones((B, D)), jnp.full((B,), 0.5)
    labels = jnp.zeros(B, int)

    def denoiser(x, t, cond=None):
        return 0.5 * x

    def logits(x, t):
        return x @ jnp.ones((D, 3))

    log_prob_fn = log_prob_from_logits(logits)
    with pytest.raises(ValueError, match="labels"):
        classifier_guidance(denoiser, process, log_prob_fn, 1.0)(x, t)
    with pytest.raises(ValueError, match="int class labels"):
        classifier_guidance(denoiser, process, log_prob_fn, 1.0)(x, t, jnp.zeros(B))
    with pytest.raises(ValueError, match="log_prob_fn"):
        classifier_guidance(denoiser, process, lambda x, t, c: x, 1.0)(x, t, labels)
    with pytest.raises(ValueError, match="logits_fn"):
        classifier_guidance(denoiser, process, log_prob_from_logits(lambda x, t: x[:, :, None]),
                            1.0)(x, t, labels)
    with pytest.raises(ValueError, match="finite"):
        classifier_guidance(denoiser, process, log_prob_fn, jnp.nan)
    with pytest.raises(TypeError, match="log_prob_fn"):
        classifier_guidance(denoiser, process, None, 1.0)
    clean = calibrated_classifier_guidance
    with pytest.raises(ValueError, match="joint_temperature"):
        clean(denoiser, process, lambda z: z, 1.0, joint_temperature=0.0)
    with pytest.raises(ValueError, match="margin_temperature_discount"):
        clean(denoiser, process, lambda z: z, 1.0, margin_temperature_discount=-0.5)
    with pytest.raises(ValueError, match="scale"):
        clean(denoiser, process, lambda z: z, jnp.ones((2, 2)))
    with pytest.raises(TypeError, match="schedule"):
        clean(denoiser, process, lambda z: z, 1.0, schedule=0.3)
    with pytest.raises(ValueError, match="logits_fn"):
        clean(denoiser, process, lambda z: z[:, :, None], 1.0)(x, t, labels)
    with pytest.raises(ValueError, match="finite"):
        sine_bump(jnp.inf)
