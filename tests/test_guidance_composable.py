"""Composable diffusion (AND / NOT) against exact class-conditional denoisers, and the
parameterisation invariance of CFG / AND / NOT along whole sampler trajectories."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.guidance.classifier_free import classifier_free
from jaxdiff.guidance.composable import composable, stack_conds

NULL = 3  # the null label: one past the mixture's classes {0, 1, 2}
B, D = 6, 2
WEIGHTS = np.array([0.2, 0.3, 0.1, 0.4])
MEANS = np.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0], [1.0, -2.0]])
STDS = np.array([0.3, 0.5, 0.4, 0.6])
LABELS = np.array([0, 1, 2, 1])


def _closed_form(process, x, t, cond=None):
    r"""E[x0 | x_t, y] of a labelled isotropic Gaussian mixture (the one of test_guidance_cfg,
    where it is checked against jaxdiff.analytic.GaussianMixture); y = NULL: unconditional."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    var = jnp.square(alpha) * STDS[None] ** 2 + jnp.square(sigma)
    diff = x[:, None, :] - alpha[:, :, None] * MEANS[None]
    log_joint = (np.log(WEIGHTS)[None] - 0.5 * jnp.sum(jnp.square(diff), -1) / var
                 - 0.5 * D * jnp.log(var))
    allowed = (LABELS[None] == cond[:, None]) | (cond[:, None] == NULL)
    resp = jax.nn.softmax(jnp.where(allowed, log_joint, -jnp.inf), axis=-1)
    post = MEANS[None] + (alpha * STDS[None] ** 2 / var)[:, :, None] * diff
    return jnp.sum(resp[:, :, None] * post, axis=1)


def exact_denoiser(process):
    return jax.tree_util.Partial(_closed_form, process)


@pytest.fixture(scope="module")
def setup():
    process = jaxdiff.VPProcess()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, D)))
    t = jnp.linspace(0.2, 0.9, B)
    a = jnp.array([0, 1, 2, 0, 1, 2])
    b = jnp.array([2, 2, 0, 1, 0, 1])
    den = exact_denoiser(process)
    d_a, d_b, d_u = jax.jit(lambda: (den(x, t, a), den(x, t, b), den(x, t, jnp.full(B, NULL))))()
    return process, x, t, a, b, d_a, d_b, d_u


def test_and_not_match_the_exact_combination(setup):
    process, x, t, a, b, d_a, d_b, d_u = setup
    denoiser = exact_denoiser(process)
    conds = stack_conds(a, b)
    w_shared = jnp.array([2.0, -1.5])  # a AND NOT b
    w_per_example = jnp.array([[2.0, 1.0, 0.0, 3.0, 1.0, -1.0], [1.5, -2.0, 1.0, 0.0, 0.5, 2.0]])

    @jax.jit
    def run(w_shared, w_per_example):
        # Every space gives the same combination (checked along whole trajectories below).
        shared = composable(denoiser, process, w_shared, null_cond=jnp.asarray(NULL))
        per_example = composable(denoiser, process, w_per_example, null_cond=jnp.asarray(NULL),
                                 space="v")
        return [(w_shared, shared(x, t, conds)), (w_per_example, per_example(x, t, conds))]

    for w, out in run(w_shared, w_per_example):
        wa = jnp.broadcast_to(w[0], (B,))[:, None]
        wb = jnp.broadcast_to(w[1], (B,))[:, None]
        expected = d_u + wa * (d_a - d_u) + wb * (d_b - d_u)
        np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-11)
    assert float(jnp.min(jnp.max(jnp.abs(d_a - d_b), axis=1))) > 1e-2  # the concepts differ


def test_all_concepts_and_the_null_in_one_vmapped_call(setup):
    process, x, t, a, b, d_a, d_b, d_u = setup
    inner = exact_denoiser(process)
    calls = []

    def counting(x, t, cond=None):
        calls.append(1)
        return inner(x, t, cond) + 0.0 * jnp.sin(cond.astype(x.dtype))[:, None]

    guided = composable(counting, process, jnp.array([1.0, 2.0, -0.5]),
                        null_cond=lambda batch: jnp.full((batch,), NULL))
    conds = stack_conds(a, b, a)
    jaxpr = jax.make_jaxpr(lambda: guided(x, t, conds))()
    assert len(calls) == 1
    assert [e.invars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "sin"] == [(4, B)]


def test_one_concept_is_cfg_and_a_negative_prompt_is_weights_s_and_1_minus_s(setup):
    process, x, t, a, b, d_a, d_b, d_u = setup
    denoiser = exact_denoiser(process)
    s = jnp.array([3.0, 1.0, 0.0, -1.0, 2.5, 7.0])
    null = jnp.asarray(NULL)

    @jax.jit
    def run():
        one = composable(denoiser, process, s[None], null_cond=null)(x, t, a[None])
        cfg = classifier_free(denoiser, process, s, null_cond=null)(x, t, a)
        negative = classifier_free(denoiser, process, s, negative_cond=b)(x, t, a)
        pair = composable(denoiser, process, jnp.stack([s, 1.0 - s]), null_cond=null)(
            x, t, stack_conds(a, b))
        return one, cfg, negative, pair

    one, cfg, negative, pair = run()
    np.testing.assert_allclose(one, cfg, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(negative, d_b + s[:, None] * (d_a - d_b), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pair, negative, rtol=1e-12, atol=1e-12)
    # A negative prompt is not composable NOT: with weights (s, -s) the result differs.
    not_b = d_u + s[:, None] * (d_a - d_u) - s[:, None] * (d_b - d_u)
    assert float(jnp.max(jnp.abs(not_b - negative))) > 0.1


def _side_by_side(blocks):
    """One denoiser running ``(denoiser, cond)`` blocks on consecutive slices of the batch.

    Deterministic samplers act on each example separately, so every block follows exactly the
    trajectory it would follow alone -- and all variants cost one compiled scan.
    """

    def combined(x, t, cond=None):
        del cond
        outs = [den(x[i * B:(i + 1) * B], t[i * B:(i + 1) * B], c)
                for i, (den, c) in enumerate(blocks)]
        return jnp.concatenate(outs)

    return combined


def test_sampler_trajectories_are_the_same_in_every_space(setup):
    """Acceptance: CFG, AND and NOT formed in eps, x0 and score space give the same DDIM and
    DPM-Solver++(2M) samples on a 20-step grid (float64, 1e-10); CFG at s = 1 is the
    conditional sampler."""
    process, _, _, a, b, _, _, _ = setup
    denoiser = exact_denoiser(process)
    null = jnp.asarray(NULL)
    ts = jaxdiff.timesteps.uniform_log_snr(process, 20)
    x_init = jnp.asarray(np.random.default_rng(3).standard_normal((B, D)))  # the prior
    cfg_scales = jnp.array([3.0, 3.0, 1.0, 1.0, 5.0, -1.0])
    # rows 0-2: a AND b; rows 3-5: a AND NOT b
    weights = jnp.array([[2.0, 2.0, 1.5, 3.0, 3.0, 2.0], [1.5, 1.0, 0.5, -1.5, -2.0, -1.0]])
    spaces = ("x0", "eps", "score")
    blocks = [(denoiser, a)]
    for space in spaces:
        blocks.append((classifier_free(denoiser, process, cfg_scales, null_cond=null,
                                       space=space), a))
        blocks.append((composable(denoiser, process, weights, null_cond=null, space=space),
                       stack_conds(a, b)))
    combined = _side_by_side(blocks)
    x_all = jnp.concatenate([x_init] * len(blocks))

    @jax.jit
    def run():
        return (jaxdiff.samplers.ddim(None, combined, process, x_all, ts, eta=0.0),
                jaxdiff.samplers.dpm_solver_pp(None, combined, process, x_all, ts, order=2))

    for out in run():
        out = np.asarray(out).reshape(len(blocks), B, D)
        conditional, by_space = out[0], out[1:].reshape(len(spaces), 2, B, D)
        for other in by_space[1:]:
            np.testing.assert_allclose(other, by_space[0], rtol=1e-10, atol=1e-10)
        cfg, comp = by_space[0]
        np.testing.assert_allclose(cfg[2:4], conditional[2:4], rtol=1e-10, atol=1e-10)
        # The guided samples really differ from the conditional ones (the checks can fail).
        assert np.min(np.abs(cfg[[0, 1, 4, 5]] - conditional[[0, 1, 4, 5]]).max(axis=1)) > 1e-3
        assert np.min(np.abs(comp - conditional).max(axis=1)) > 1e-3


def test_bad_input_is_refused(setup):
    process, x, t, a, b, _, _, _ = setup

    def denoiser(x, t, cond=None):
        return 0.5 * x + cond.astype(x.dtype)[:, None]

    null = jnp.asarray(NULL)
    conds = stack_conds(a, b)
    with pytest.raises(ValueError, match="finite"):
        composable(denoiser, process, jnp.array([1.0, jnp.nan]), null_cond=null)
    with pytest.raises(ValueError, match="weights"):
        composable(denoiser, process, jnp.ones((2, B, 1)), null_cond=null)
    with pytest.raises(ValueError, match="weights"):
        composable(denoiser, process, 2.0, null_cond=null)
    with pytest.raises(ValueError, match="weights"):
        composable(denoiser, process, jnp.ones(3), null_cond=null)(x, t, conds)
    with pytest.raises(ValueError, match="weights"):
        composable(denoiser, process, jnp.ones((2, B + 1)), null_cond=null)(x, t, conds)
    with pytest.raises(ValueError, match="null_cond"):
        composable(denoiser, process, jnp.ones(2), null_cond=None)
    with pytest.raises(ValueError, match="tree structure"):
        composable(denoiser, process, jnp.ones(2), null_cond={"label": null})(x, t, conds)
    with pytest.raises(ValueError, match=r"\(n, B, ...\)"):
        composable(denoiser, process, jnp.ones(2), null_cond=null)(x, t, a)
    with pytest.raises(ValueError, match="cond=None"):
        composable(denoiser, process, jnp.ones(2), null_cond=null)(x, t)
    with pytest.raises(ValueError, match="space"):
        composable(denoiser, process, jnp.ones(2), null_cond=null, space="logits")
    with pytest.raises(TypeError, match="denoiser"):
        composable(None, process, jnp.ones(2), null_cond=null)
    with pytest.raises(ValueError, match="tree structure"):
        stack_conds(a, {"label": b})
