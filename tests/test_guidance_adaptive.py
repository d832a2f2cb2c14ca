"""Adaptive guidance (static and dynamic switch) against exact mixtures and the digits model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import metrics, samplers
from jaxdiff.guidance.adaptive import (
    adaptive_guidance,
    adaptive_guidance_dynamic,
    adaptive_guidance_dynamic_with_info,
    adaptive_guidance_nfe,
)
from jaxdiff.guidance.classifier_free import classifier_free

NULL = 3  # the null label
B, D = 8, 2
SCALE = 2.0
# Label c in {0, 1, 2} is the Gaussian N(MEANS[c], VARS[c] I); the null label's broad Gaussian
# plays the unconditional model.
MEANS = np.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0], [0.0, 0.3]])
VARS = np.array([0.1, 0.2, 0.15, 3.0])


def _gaussian_denoise(process, x, t, cond=None):
    r"""Exact denoiser of N(m, v I): :math:`m + \alpha v/(\alpha^2 v + \sigma^2)(x - \alpha m)`."""
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    m, v = jnp.asarray(MEANS)[cond], jnp.asarray(VARS)[cond][:, None]
    return m + alpha * v / (alpha * alpha * v + sigma * sigma) * (x - alpha * m)


def _counting(denoiser, counter):
    """Counts network evaluations on the host: rows of cond seen / B (a CFG call counts 2)."""

    def bump(c):
        counter[0] += np.asarray(c).size / B

    def counted(x, t, cond=None):
        jax.debug.callback(bump, cond)
        return denoiser(x, t, cond)

    return counted


@pytest.fixture(scope="module")
def setup():
    process = jaxdiff.VPProcess()
    denoiser = jax.tree_util.Partial(_gaussian_denoise, process)
    x_init = process.sample_prior(jax.random.key(0), (B, D), jnp.float64)
    labels = jnp.arange(B) % 3
    return process, denoiser, x_init, labels


def _ddim_reference(process, x, ts, labels, threshold, guided_steps, space):
    """Numpy loop: DDIM(eta = 0) with CFG for ``guided_steps`` steps (or, if None, until the
    batch-global cosine of the predictions in ``space`` exceeds ``threshold``), then the
    conditional denoiser. Returns ``(x, guided steps, cosines with NaN after the switch)``."""
    ts = np.asarray(ts, dtype=np.float64)
    alphas = np.asarray(process.alpha(jnp.asarray(ts)), dtype=np.float64)
    sigmas = np.asarray(process.sigma(jnp.asarray(ts)), dtype=np.float64)
    x, labels = np.asarray(x, dtype=np.float64), np.asarray(labels)

    def denoise(c, a, s):
        m, v = MEANS[c], VARS[c][:, None]
        return m + a * v / (a * a * v + s * s) * (x - a * m)

    k = guided_steps
    sims = []
    for n in range(len(ts) - 1):
        a_t, s_t, a_s, s_s = alphas[n], sigmas[n], alphas[n + 1], sigmas[n + 1]
        d_c = denoise(labels, a_t, s_t)
        if k is None or n < k:
            d_u = denoise(np.full(B, NULL), a_t, s_t)
            d = d_u + SCALE * (d_c - d_u)
            u, w = (d_c, d_u) if space == "x0" else (x - a_t * d_c, x - a_t * d_u)
            sims.append(np.sum(u * w) / np.sqrt(np.sum(u * u) * np.sum(w * w)))
            if k is None and sims[-1] > threshold:
                k = n + 1
        else:
            d = d_c
            sims.append(np.nan)
        # At an exact s = 0 (alpha = 1, sigma = 0) this is x = d.
        x = a_s * d + s_s * (x - a_t * d) / s_t
    return x, len(ts) - 1 if k is None else k, np.asarray(sims)


# -- static -------------------------------------------------------------------------------------


def test_nfe_counts():
    assert adaptive_guidance_nfe(20, 20) == 40  # plain CFG
    assert adaptive_guidance_nfe(20, 10) == adaptive_guidance_nfe(20, 0.5) == 30
    assert adaptive_guidance_nfe(20, 0) == 20
    assert adaptive_guidance_nfe(32, 16, "edm_heun", final_zero=True) == 64 + 31
    assert adaptive_guidance_nfe(32, 32, "edm_heun", final_zero=True) == 2 * 63
    assert adaptive_guidance_nfe(10, 4, "dpm_solver_pp_singlestep", order=3) == 24 + 18
    assert adaptive_guidance_nfe(10, 4, "predictor_corrector") == 16 + 12
    assert adaptive_guidance_nfe(7, 1 / 3) == 7 + 2  # round(7/3) = 2 guided steps
    with pytest.raises(TypeError, match="guided_steps"):
        adaptive_guidance_nfe(10, True)
    with pytest.raises(TypeError, match="guided_steps"):
        adaptive_guidance_nfe(10, "half")
    for bad in (-1, 11, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="guided_steps"):
            adaptive_guidance_nfe(10, bad)
    with pytest.raises(ValueError, match="method"):
        adaptive_guidance_nfe(10, 3, "nope")
    with pytest.raises(ValueError, match="num_steps"):
        adaptive_guidance_nfe(0, 0)


def test_static_all_or_no_guided_steps_are_the_plain_samplers_bitwise(setup):
    process, denoiser, x_init, labels = setup
    ts = jaxdiff.timesteps.uniform_t(process, 6, final_zero=True)
    guided = classifier_free(denoiser, process, SCALE, null_cond=NULL)
    kw = dict(cond=labels, null_cond=NULL, scale=SCALE, method="ddpm")

    def run(key, x):
        return (adaptive_guidance(key, denoiser, process, x, ts, guided_steps=1.0, **kw),
                samplers.ddpm(key, guided, process, x, ts, cond=labels),
                adaptive_guidance(key, denoiser, process, x, ts, guided_steps=0, **kw),
                samplers.ddpm(key, denoiser, process, x, ts, cond=labels))

    all_guided, cfg, none_guided, cond = jax.jit(run)(jax.random.key(1), x_init)
    np.testing.assert_array_equal(all_guided, cfg)
    np.testing.assert_array_equal(none_guided, cond)
    assert float(jnp.max(jnp.abs(cfg - cond))) > 0.1


def test_static_equals_the_reference_switch(setup):
    process, denoiser, x_init, labels = setup
    ts = jaxdiff.timesteps.uniform_log_snr(process, 10, final_zero=True)
    counter = [0]
    x = jax.jit(lambda x: adaptive_guidance(
        None, _counting(denoiser, counter), process, x, ts, cond=labels, null_cond=NULL,
        scale=SCALE, guided_steps=4, method="ddim"))(x_init)
    jax.effects_barrier()
    assert counter[0] == adaptive_guidance_nfe(10, 4) == 14  # the second part: 1 call/step
    ref, _, _ = _ddim_reference(process, x_init, ts, labels, 0.0, 4, "x0")
    np.testing.assert_allclose(x, ref, rtol=1e-11, atol=1e-11)
    cfg, _, _ = _ddim_reference(process, x_init, ts, labels, 0.0, 10, "x0")
    cond, _, _ = _ddim_reference(process, x_init, ts, labels, 0.0, 0, "x0")
    # The switch matters: AG lies strictly between conditional sampling and full CFG here.
    assert float(jnp.max(jnp.abs(x - cfg))) > 1e-3
    assert float(jnp.max(jnp.abs(x - cond))) > 1e-3


def test_static_switch_inside_one_run_keeps_history_and_noise(setup):
    # At scale 1 the guided denoiser equals the conditional one, so adaptive guidance must
    # reproduce the plain run: multistep histories and noise streams carry over the switch.
    process, denoiser, x_init, labels = setup
    ts = jaxdiff.timesteps.karras(process, 8, final_zero=True)
    kw = dict(cond=labels, null_cond=NULL, scale=1.0, guided_steps=3)

    @jax.jit
    def run(key, x):
        pairs = []
        for method, opts in (("dpm_solver_pp", {"order": 3}), ("ddpm", {})):
            fn = samplers.get_method(method)
            pairs.append((adaptive_guidance(key, denoiser, process, x, ts, method=method, **kw,
                                            **opts),
                          fn(key, denoiser, process, x, ts, cond=labels, **opts)))
        return pairs

    for ag, plain in run(jax.random.key(2), x_init):
        np.testing.assert_allclose(ag, plain, rtol=1e-12, atol=1e-12)


def test_static_split_for_heun_joins_exactly_and_counts_calls(setup):
    # EDM Heun evaluates at the next grid time too, so its grid is split in two runs; at
    # scale 1 they must join into the plain run, with the same noise and the same churn.
    process, denoiser, x_init, labels = setup
    ts = jaxdiff.timesteps.karras(process, 8, final_zero=True)
    noise = jax.random.normal(jax.random.key(3), (8, 1, B, D), jnp.float64)
    opts = dict(s_churn=4.0, s_tmin=0.0, s_tmax=100.0)
    counter = [0]

    @jax.jit
    def run(x, noise):
        # CFG at scale 1 still evaluates both branches: the count is the guided one.
        ag = adaptive_guidance(None, _counting(denoiser, counter), process, x, ts, cond=labels,
                               null_cond=NULL, scale=1.0, guided_steps=3, method="edm_heun",
                               noise=noise, **opts)
        plain = samplers.edm_heun(None, denoiser, process, x, ts, cond=labels, noise=noise,
                                  **opts)
        return ag, plain

    ag, plain = run(x_init, noise)
    jax.effects_barrier()
    np.testing.assert_allclose(ag, plain, rtol=1e-12, atol=1e-12)
    # Two calls per step and one on the final step to 0: 2 * 2 * 3 + (2 * 4 + 1).
    assert counter[0] == adaptive_guidance_nfe(8, 3, "edm_heun", final_zero=True) == 21
    assert counter[0] < adaptive_guidance_nfe(8, 8, "edm_heun", final_zero=True)
    with pytest.raises(ValueError, match="noise"):
        adaptive_guidance(None, denoiser, process, x_init, ts, cond=labels, null_cond=NULL,
                          scale=1.0, guided_steps=3, method="edm_heun", noise=noise[:5])


def test_static_is_jittable_with_a_traced_scale_and_vmappable(setup):
    process, denoiser, x_init, labels = setup
    ts = jaxdiff.timesteps.uniform_t(process, 5, final_zero=True)
    counter = [0]

    @jax.jit
    def run(x, scale):
        return adaptive_guidance(None, _counting(denoiser, counter), process, x, ts,
                                 cond=labels, null_cond=NULL, scale=scale, guided_steps=2,
                                 method="dpm_solver_pp")

    a, b = run(x_init, 2.0), run(x_init, 3.0)
    assert run._cache_size() == 1
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    stack = jnp.stack([x_init, -x_init, 0.5 * x_init])
    jax.effects_barrier()
    counter[0] = 0
    batched = jax.jit(jax.vmap(run, in_axes=(0, None)))(stack, 2.0)
    jax.effects_barrier()
    # Under vmap over examples the switch is still a branch: 2 * 2 + 3 (batched) evaluations;
    # a select would run both branches after the switch, 2 * 2 + 3 * (2 + 1) = 13.
    assert counter[0] == adaptive_guidance_nfe(5, 2) == 7
    for i in range(3):
        np.testing.assert_allclose(batched[i], run(stack[i], 2.0), rtol=1e-12, atol=1e-12)


def test_static_rejects_bad_input(setup):
    process, denoiser, x_init, labels = setup
    ts = jaxdiff.timesteps.uniform_t(process, 5)
    kw = dict(cond=labels, null_cond=NULL, scale=SCALE, guided_steps=2)
    with pytest.raises(ValueError, match="cond"):
        adaptive_guidance(None, denoiser, process, x_init, ts, **{**kw, "cond": None})
    with pytest.raises(ValueError, match="null_cond"):
        adaptive_guidance(None, denoiser, process, x_init, ts, **{**kw, "null_cond": None})
    with pytest.raises(ValueError, match="scale"):
        adaptive_guidance(None, denoiser, process, x_init, ts, **{**kw, "scale": jnp.nan})
    with pytest.raises(ValueError, match="guided_steps"):
        adaptive_guidance(None, denoiser, process, x_init, ts, **{**kw, "guided_steps": 6})
    with pytest.raises(ValueError, match="method"):
        adaptive_guidance(None, denoiser, process, x_init, ts, method="nope", **kw)
    with pytest.raises(ValueError, match="ts"):
        adaptive_guidance(None, denoiser, process, x_init, ts[:1], **kw)
    with pytest.raises(TypeError, match="denoiser"):
        adaptive_guidance(None, "net", process, x_init, ts, **kw)


# -- dynamic ------------------------------------------------------------------------------------


@pytest.mark.parametrize("space, threshold, switch", [("x0", 0.9, True), ("eps", 1.0, False)])
def test_dynamic_switch_equals_the_reference_loop(setup, space, threshold, switch):
    # x0 cosines rise as samples form (here 0.33, 0.32, 0.29, 0.30, 0.51, 0.86, 0.99, ...);
    # eps cosines start at 1 (eps ~ x / sigma for both predictions at t_max) and fall, so the
    # eps case checks every cosine of a run that never switches (threshold 1).
    process, denoiser, x_init, labels = setup
    ts = jaxdiff.timesteps.uniform_log_snr(process, 12, final_zero=True)
    ref, k_ref, sims = _ddim_reference(process, x_init, ts, labels, threshold, None, space)
    assert (2 <= k_ref <= 10) if switch else k_ref == 12, k_ref
    counter = [0]

    @jax.jit
    def run(x):
        dyn = adaptive_guidance_dynamic_with_info(
            None, _counting(denoiser, counter), process, x, ts, cond=labels, null_cond=NULL,
            scale=SCALE, threshold=threshold, space=space)
        # The static wrapper with the same number of guided DDIM steps gives the same samples.
        static = adaptive_guidance(None, denoiser, process, x, ts, cond=labels, null_cond=NULL,
                                   scale=SCALE, guided_steps=k_ref, method="ddim")
        return dyn, static

    (x, info), static = run(x_init)
    jax.effects_barrier()
    assert int(info.guided_steps) == k_ref
    assert int(info.nfe) == 12 + k_ref == counter[0]  # the unconditional calls were skipped
    np.testing.assert_allclose(info.similarity, sims, rtol=1e-10, atol=1e-12)  # NaN after
    np.testing.assert_allclose(x, ref, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(x, static, rtol=1e-12, atol=1e-12)


def test_dynamic_threshold_extremes_and_jit(setup):
    process, denoiser, x_init, labels = setup
    ts = jaxdiff.timesteps.uniform_log_snr(process, 12, final_zero=True)
    guided = classifier_free(denoiser, process, SCALE, null_cond=NULL)
    kw = dict(cond=labels, null_cond=NULL, scale=SCALE, space="x0")

    @jax.jit
    def run(threshold):
        return (adaptive_guidance_dynamic_with_info(None, denoiser, process, x_init, ts,
                                                    threshold=threshold, **kw),
                adaptive_guidance_dynamic(None, denoiser, process, x_init, ts,
                                          threshold=threshold, **kw),
                samplers.ddim(None, guided, process, x_init, ts, cond=labels))

    (x, info), x_plain, cfg = run(1.0)  # cos <= 1: never switches, plain CFG with DDIM
    np.testing.assert_allclose(x, cfg, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(x, x_plain)
    assert int(info.guided_steps) == 12 and int(info.nfe) == 24
    (y, info), _, _ = run(-1.0)  # switches after the first step
    assert int(info.guided_steps) == 1 and int(info.nfe) == 13
    assert float(jnp.max(jnp.abs(x - y))) > 1e-3
    assert run._cache_size() == 1  # a traced threshold does not recompile


def test_dynamic_rejects_bad_input(setup):
    process, denoiser, x_init, labels = setup
    ts = jaxdiff.timesteps.uniform_t(process, 5)
    kw = dict(cond=labels, null_cond=NULL, scale=SCALE)
    with pytest.raises(ValueError, match="space"):
        adaptive_guidance_dynamic(None, denoiser, process, x_init, ts, space="v", **kw)
    with pytest.raises(ValueError, match="threshold"):
        adaptive_guidance_dynamic(None, denoiser, process, x_init, ts, threshold=jnp.nan, **kw)
    with pytest.raises(ValueError, match="threshold"):
        adaptive_guidance_dynamic(None, denoiser, process, x_init, ts,
                                  threshold=jnp.ones(2), **kw)
    with pytest.raises(ValueError, match="cond"):
        adaptive_guidance_dynamic(None, denoiser, process, x_init, ts, cond=None,
                                  null_cond=NULL, scale=SCALE)
    with pytest.raises(ValueError, match="null_cond"):
        adaptive_guidance_dynamic(None, denoiser, process, x_init, ts, cond=labels,
                                  null_cond=jnp.zeros(3), scale=SCALE)
    with pytest.raises(ValueError, match="ts"):
        adaptive_guidance_dynamic(None, denoiser, process, x_init, ts[::-1], **kw)


# -- the trained digits model -----------------------------------------------------------------


@pytest.mark.slow
def test_digits_adaptive_guidance_saves_calls_at_cfg_quality(digits_run):
    """AG with half the steps guided against full CFG on the digits smoke model (scale 2)."""
    from jaxdiff import training

    workdir, _ = digits_run
    model = training.load_model(workdir)
    process = model.process
    n, steps = 500, 6
    labels = jnp.repeat(jnp.arange(10), n // 10).astype(jnp.int32)
    null = model.null_cond(n)
    ts = jaxdiff.timesteps.karras(process, steps, final_zero=True)

    kw = dict(cond=labels, null_cond=null, scale=SCALE, method="dpm_solver_pp")

    def sampler(guided_steps):
        return jax.jit(lambda x: adaptive_guidance(
            None, model.denoiser, process, x, ts, guided_steps=guided_steps, **kw).reshape(n, -1))

    x_a, x_b = (process.sample_prior(k, (n, 8, 8, 1)) for k in jax.random.split(
        jax.random.key(1)))
    cfg = sampler(steps)
    cfg_a, cfg_b = cfg(x_a), cfg(x_b)  # one compilation
    ag_a = sampler(steps // 2)(x_a)
    nfe_cfg = adaptive_guidance_nfe(steps, steps, final_zero=True)
    nfe_ag = adaptive_guidance_nfe(steps, steps // 2, final_zero=True)
    key = jax.random.key(3)  # fixed projections
    sw_seeds = float(metrics.sliced_wasserstein(key, cfg_a, cfg_b, num_projections=256))
    sw_ag = float(metrics.sliced_wasserstein(key, ag_a, cfg_a, num_projections=256))
    print(f"digits smoke: NFE {nfe_ag} vs CFG {nfe_cfg}; SW(AG, CFG same noise) {sw_ag:.4f}, "
          f"SW(CFG seed 1, CFG seed 2) {sw_seeds:.4f}, ratio {sw_ag / sw_seeds:.3f}")
    assert nfe_ag <= 0.8 * nfe_cfg
    assert sw_ag <= 1.5 * sw_seeds
    assert np.all(np.isfinite(np.asarray(ag_a)))
