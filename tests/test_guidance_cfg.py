"""Classifier-free guidance against exact class-conditional and unconditional denoisers.

Reference values come from the exact denoisers of a labelled isotropic Gaussian mixture: the
library's :class:`jaxdiff.analytic.GaussianMixture`, and a closed form written out here (cheap to
compile, so the sampler runs stay fast) that is checked against it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.analytic import GaussianMixture
from jaxdiff.guidance.classifier_free import classifier_free
from jaxdiff.guidance.schedules import noise_range_experts

NULL = 3  # the null label: one past the mixture's classes {0, 1, 2}
B, D = 6, 2
WEIGHTS = np.array([0.2, 0.3, 0.1, 0.4])
MEANS = np.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0], [1.0, -2.0]])
STDS = np.array([0.3, 0.5, 0.4, 0.6])
LABELS = np.array([0, 1, 2, 1])


def _mixture():
    return GaussianMixture.create(
        jnp.array(WEIGHTS), jnp.array(MEANS), stds=jnp.array(STDS), labels=jnp.array(LABELS)
    )


def _closed_form(process, x, t, cond=None):
    r"""E[x0 | x_t, y] of the isotropic mixture in closed form; y = NULL means unconditional."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]  # (B, 1)
    var = jnp.square(alpha) * STDS[None] ** 2 + jnp.square(sigma)  # (B, K)
    diff = x[:, None, :] - alpha[:, :, None] * MEANS[None]  # (B, K, D)
    log_joint = (np.log(WEIGHTS)[None] - 0.5 * jnp.sum(jnp.square(diff), -1) / var
                 - 0.5 * D * jnp.log(var))
    allowed = (LABELS[None] == cond[:, None]) | (cond[:, None] == NULL)
    resp = jax.nn.softmax(jnp.where(allowed, log_joint, -jnp.inf), axis=-1)
    post = MEANS[None] + (alpha * STDS[None] ** 2 / var)[:, :, None] * diff
    return jnp.sum(resp[:, :, None] * post, axis=1)


def exact_denoiser(process):
    """A pytree denoiser (``Partial``): the null label means 'unconditional', as a network's."""
    return jax.tree_util.Partial(_closed_form, process)


def cheap_denoiser(x, t, cond=None):
    """A denoiser depending on x, t and the label, cheap to compile: for the machinery tests."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
    shift = cond.astype(x.dtype)[:, None] * jnp.arange(1.0, x.shape[1] + 1)[None] + t[:, None]
    return (0.5 + t)[:, None] * x + jnp.cos(shift)


@pytest.fixture(scope="module")
def setup():
    process = jaxdiff.VPProcess()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, D)))
    t = jnp.linspace(0.2, 0.9, B)
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    mix = _mixture()

    @jax.jit
    def exact(x, t):
        ours = (_closed_form(process, x, t, labels),
                _closed_form(process, x, t, jnp.full((B,), NULL)))
        library = (mix.denoise(process, x, t, y=labels), mix.denoise(process, x, t))
        return ours, library

    (d_c, d_u), library = exact(x, t)
    return process, x, t, labels, d_c, d_u, library


def test_closed_form_is_the_library_mixture_denoiser(setup):
    *_, d_c, d_u, (ref_c, ref_u) = setup
    np.testing.assert_allclose(d_c, ref_c, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_u, ref_u, rtol=1e-12, atol=1e-12)


def test_scales_zero_one_two_match_the_exact_denoisers(setup):
    process, x, t, labels, d_c, d_u, _ = setup
    denoiser = exact_denoiser(process)
    null = jnp.full((B,), NULL)

    @jax.jit
    def guided(s):
        return classifier_free(denoiser, process, s, null_cond=null)(x, t, labels)

    # s = 1 is D_c + 0 * (D_c - D_u); the reference D_c comes from another compiled program.
    np.testing.assert_allclose(guided(1.0), d_c, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(guided(0.0), d_u, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(guided(2.0), 2 * d_c - d_u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(guided(-0.5), 1.5 * d_u - 0.5 * d_c, rtol=1e-12, atol=1e-12)
    # The conditional and unconditional answers differ, so the checks above can fail.
    assert float(jnp.max(jnp.abs(d_c - d_u))) > 0.1


def _marked(inner, calls):
    """A denoiser that records each (trace-time) call and marks its cond with a ``sin``."""

    def counting(x, t, cond=None):
        calls.append(isinstance(cond, jax.core.Tracer))
        return inner(x, t, cond) + 0.0 * jnp.sin(cond.astype(x.dtype))[:, None]

    return counting


def _sin_shapes(jaxpr):
    return [e.invars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "sin"]


def test_one_call_on_a_stacked_axis_of_two(setup):
    process, x, t, labels, d_c, d_u, _ = setup
    calls = []
    counting = _marked(exact_denoiser(process), calls)

    def guided():
        return classifier_free(counting, process, 3.0, null_cond=lambda b: jnp.full((b,), NULL))

    jaxpr = jax.make_jaxpr(guided())(x, t, labels)
    assert len(calls) == 1  # one trace, one batched call
    assert _sin_shapes(jaxpr) == [(2, B)]  # the condition carries the new leading axis of size 2
    calls.clear()
    np.testing.assert_allclose(jax.jit(guided())(x, t, labels), 3 * d_c - 2 * d_u,
                               rtol=1e-12, atol=1e-12)
    assert len(calls) == 1


def test_pytree_cond_and_null_cond(setup):
    process, x, t, labels, d_c, d_u, _ = setup
    inner = exact_denoiser(process)

    def denoiser(x, t, cond):
        return inner(x, t, cond["label"]) * cond["gain"][:, None]

    cond = {"label": labels, "gain": jnp.full((B,), 2.0)}
    null = {"label": jnp.asarray(NULL), "gain": jnp.asarray(1.0)}
    out = jax.jit(lambda c: classifier_free(denoiser, process, 1.5, null_cond=null)(x, t, c))(cond)
    np.testing.assert_allclose(out, d_u + 1.5 * (2 * d_c - d_u), rtol=1e-12, atol=1e-12)


def test_guided_sampling_runs_under_jit_and_scale_one_is_the_conditional_sampler(setup):
    process, _, _, labels, *_ = setup
    denoiser = jax.tree_util.Partial(cheap_denoiser)  # a pytree: passes through jit
    null = jnp.full((B,), NULL)
    compiles = []
    ts = jaxdiff.timesteps.uniform_log_snr(process, 8)
    x_init = jnp.asarray(np.random.default_rng(1).standard_normal((B, D)))  # the VP prior

    @jax.jit
    def run(guided):
        compiles.append(1)
        plain = jaxdiff.samplers.ddim(None, denoiser, process, x_init, ts, cond=labels)
        return jaxdiff.samplers.ddim(None, guided, process, x_init, ts, cond=labels), plain

    guided_one, plain = run(classifier_free(denoiser, process, 1.0, null_cond=null))
    np.testing.assert_allclose(guided_one, plain, rtol=1e-10, atol=1e-10)
    guided_three, _ = run(classifier_free(denoiser, process, 3.0, null_cond=null))
    assert bool(jnp.all(jnp.isfinite(guided_three)))
    assert float(jnp.max(jnp.abs(guided_three - guided_one))) > 1e-3
    assert len(compiles) == 1  # a new scale is pytree data: no recompilation


def test_gradient_with_respect_to_the_scale(setup):
    process, x, t, labels, d_c, d_u, _ = setup
    denoiser = exact_denoiser(process)

    def total(s):
        return jnp.sum(classifier_free(denoiser, process, s, null_cond=jnp.asarray(NULL))(
            x, t, labels))

    grad, per_example = jax.jit(lambda: (jax.grad(total)(2.0), jax.grad(total)(jnp.ones(B))))()
    assert np.isfinite(grad)
    np.testing.assert_allclose(grad, jnp.sum(d_c - d_u), rtol=1e-12)
    np.testing.assert_allclose(per_example, jnp.sum(d_c - d_u, axis=1), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# Parameterisation and guidance rescale
# ------------------------------------------------------------------------------------------------


def _np_to_space(x0, x, alpha, sigma, space):
    eps = (x - alpha * x0) / sigma
    return {"x0": x0, "eps": eps, "score": -eps / sigma, "v": alpha * eps - sigma * x0}[space]


def _np_from_space(p, x, alpha, sigma, space):
    if space == "x0":
        return p
    if space == "v":
        return (alpha * x - sigma * p) / (alpha**2 + sigma**2)
    eps = p if space == "eps" else -sigma * p
    return (x - sigma * eps) / alpha


def _np_rescaled_cfg(d_c, d_u, x, alpha, sigma, s, phi, space):
    """Lin et al. (2023) guidance rescale written out in numpy, in ``space``."""
    p_c = _np_to_space(d_c, x, alpha, sigma, space)
    p_u = _np_to_space(d_u, x, alpha, sigma, space)
    p_cfg = p_u + s * (p_c - p_u)
    ratio = np.std(p_c, axis=1, keepdims=True) / np.std(p_cfg, axis=1, keepdims=True)
    return _np_from_space(phi * p_cfg * ratio + (1 - phi) * p_cfg, x, alpha, sigma, space)


def test_per_example_scales_and_the_same_combination_in_every_space(setup):
    process, x, t, labels, d_c, d_u, _ = setup
    denoiser = exact_denoiser(process)
    scales = jnp.array([0.0, 1.0, 2.0, 3.5, -1.0, 7.0])

    @jax.jit
    def all_spaces():
        return [classifier_free(denoiser, process, scales, null_cond=jnp.asarray(NULL),
                                space=space)(x, t, labels) for space in ("x0", "eps", "score", "v")]

    expected = d_u + scales[:, None] * (d_c - d_u)
    for out in all_spaces():
        np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-11)


def test_rescale_matches_the_numpy_formula_in_each_space(setup):
    process, x, t, labels, *_ = setup
    denoiser = cheap_denoiser
    spaces = ("eps", "x0", "v", "score")
    phi = jnp.array([0.7, 0.7, 1.0, 0.3, 0.7, 0.5])

    @jax.jit
    def run(phi):
        # The combination space does not matter (affine); vary it along with the rescale space.
        outs = [classifier_free(denoiser, process, 3.0, null_cond=jnp.asarray(NULL), rescale=phi,
                                rescale_space=space, space=combine)(x, t, labels)
                for space, combine in zip(spaces, ("x0", "eps", "v", "eps"))]
        return outs, denoiser(x, t, labels), denoiser(x, t, jnp.full((B,), NULL))

    outs, d_c, d_u = run(phi)
    alpha = np.asarray(process.alpha(t))[:, None]
    sigma = np.asarray(process.sigma(t))[:, None]
    args = (np.asarray(d_c), np.asarray(d_u), np.asarray(x), alpha, sigma, 3.0,
            np.asarray(phi)[:, None])
    for space, out in zip(spaces, outs):
        np.testing.assert_allclose(out, _np_rescaled_cfg(*args, space), rtol=1e-11, atol=1e-11)
    # eps and score differ by a per-example factor -1/sigma, which cancels in the std ratio;
    # eps and x0 do not: a real difference, not round-off.
    np.testing.assert_allclose(outs[0], outs[3], rtol=1e-11, atol=1e-11)
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 0.1
    assert float(jnp.max(jnp.abs(outs[1] - (3 * d_c - 2 * d_u)))) > 0.1  # the rescale acts
    # phi = 0 is plain CFG (up to the conversions' round-off).
    for out in run(jnp.zeros(B))[0]:
        np.testing.assert_allclose(out, 3 * d_c - 2 * d_u, rtol=1e-11, atol=1e-11)


# ------------------------------------------------------------------------------------------------
# Guidance interval
# ------------------------------------------------------------------------------------------------


def _interval_setup():
    process = jaxdiff.EDMProcess()
    t_lo, t_hi = jnp.asarray(0.5), jnp.asarray(2.0)
    interval = (float(process.noise_level(t_lo)), float(process.noise_level(t_hi)))
    return process, t_lo, t_hi, interval


def test_interval_guides_only_inside_lo_hi(setup):
    _, x, _, labels, *_ = setup
    process, t_lo, t_hi, interval = _interval_setup()
    denoiser = cheap_denoiser
    null = jnp.full((B,), NULL)

    @jax.jit
    def run(t):
        guided = classifier_free(denoiser, process, 3.0, null_cond=jnp.asarray(NULL),
                                 interval=interval)
        # The interval is the noise-range experts (plain, CFG, plain) split at (lo, hi).
        cfg = classifier_free(denoiser, process, 3.0, null_cond=jnp.asarray(NULL))
        experts = noise_range_experts([denoiser, cfg, denoiser], process, interval)
        return (guided(x, t, labels), denoiser(x, t, labels), denoiser(x, t, null),
                experts(x, t, labels))

    # (lo, hi]: the lower end and everything outside give D_c, the upper end guides. Shared
    # times take the batch-global switch; times differing per example the exact fallback.
    cases = [(jnp.full((B,), t0, jnp.float64), np.full(B, inside)) for t0, inside in
             [(0.3, False), (t_lo, False), (1.0, True), (t_hi, True), (5.0, False)]]
    cases.append((jnp.array([0.3, t_lo, 1.0, t_hi, 5.0, 1.5], jnp.float64),
                  np.array([False, False, True, True, False, True])))
    for t, inside in cases:
        out, d_c, d_u, by_experts = run(t)
        np.testing.assert_array_equal(out, by_experts)
        assert float(jnp.max(jnp.abs(d_c - d_u))) > 1e-3
        np.testing.assert_allclose(out, np.where(inside[:, None], 3 * d_c - 2 * d_u, d_c),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.asarray(out)[~inside], np.asarray(d_c)[~inside])


def test_interval_costs_one_call_outside(setup):
    _, x, _, labels, *_ = setup
    process, _, _, interval = _interval_setup()
    calls = []
    guided = classifier_free(_marked(cheap_denoiser, calls), process, 3.0,
                             null_cond=jnp.asarray(NULL), interval=interval)
    # Eager call at shared times: the host picks the branch, only it runs.
    out = guided(x, jnp.full((B,), 5.0), labels)
    assert calls == [False]  # one unbatched network call
    np.testing.assert_array_equal(out, cheap_denoiser(x, jnp.full((B,), 5.0), labels))

    # Traced times: a batch-global switch; one branch calls the network once on (B,), the
    # other once on the stacked (2, B) axis; the per-example fallback holds both.
    jaxpr = jax.make_jaxpr(lambda t: guided(x, t, labels))(jnp.full((B,), 1.0)).jaxpr

    def branch_marks(jaxpr):
        """For every cond/switch: the sin shapes found directly in each of its branches."""
        found = []
        for e in jaxpr.eqns:
            if e.primitive.name == "cond":
                found.append(sorted(tuple(_sin_shapes(b.jaxpr)) for b in e.params["branches"]))
                for b in e.params["branches"]:
                    found += branch_marks(b.jaxpr)
        return found

    marks = branch_marks(jaxpr)
    assert sorted([((B,),), ((2, B),)]) in marks
    assert sorted([(), ((B,), (2, B))]) in marks
    assert _sin_shapes(jaxpr) == []  # nothing runs the network outside the switch


# ------------------------------------------------------------------------------------------------
# Negative conditions
# ------------------------------------------------------------------------------------------------


def test_negative_condition_replaces_the_unconditional_branch(setup):
    process, x, t, labels, d_c, *_ = setup
    denoiser = exact_denoiser(process)
    negative = jnp.array([1, 2, 0, 2, 0, 1])
    calls = []
    guided = classifier_free(_marked(denoiser, calls), process, 2.5, negative_cond=negative)
    out, d_n = jax.jit(lambda: (guided(x, t, labels), denoiser(x, t, negative)))()
    assert calls == [True]  # one stacked call
    np.testing.assert_allclose(out, d_n + 2.5 * (d_c - d_n), rtol=1e-12, atol=1e-12)
    assert float(jnp.max(jnp.abs(d_n - d_c))) > 0.1


def test_bad_input_is_refused(setup):
    process, x, t, labels, *_ = setup
    denoiser = cheap_denoiser
    null = jnp.asarray(NULL)
    with pytest.raises(ValueError, match="cond"):
        classifier_free(denoiser, process, 2.0, null_cond=null)(x, t)
    with pytest.raises(ValueError, match="null_cond"):
        classifier_free(denoiser, process, 2.0, null_cond=None)
    with pytest.raises(ValueError, match="exactly one"):
        classifier_free(denoiser, process, 2.0, null_cond=null, negative_cond=labels)
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
    with pytest.raises(ValueError, match="space"):
        classifier_free(denoiser, process, 2.0, null_cond=null, space="velocity")
    with pytest.raises(ValueError, match="rescale_space"):
        classifier_free(denoiser, process, 2.0, null_cond=null, rescale=0.7)
    with pytest.raises(ValueError, match="rescale_space"):
        classifier_free(denoiser, process, 2.0, null_cond=null, rescale=0.7, rescale_space="z")
    with pytest.raises(ValueError, match="rescale"):
        classifier_free(denoiser, process, 2.0, null_cond=null, rescale=jnp.nan,
                        rescale_space="eps")
    span = (float(process.noise_level(process.t_min)), float(process.noise_level(process.t_max)))
    for interval in [(0.5 * span[0], 1.0), (1.0, 2.0 * span[1]), (2.0, 1.0), (1.0, 1.0),
                     (1.0, np.inf), (np.nan, 1.0)]:
        with pytest.raises(ValueError, match="interval"):
            classifier_free(denoiser, process, 2.0, null_cond=null, interval=interval)
    with pytest.raises(ValueError, match="interval"):
        classifier_free(denoiser, process, 2.0, null_cond=null, interval=(0.5, 1.0, 2.0))
