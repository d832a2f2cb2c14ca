"""Likelihoods against exact references: analytic Gaussians and mixtures (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import analytic
from jaxdiff import likelihood as L

# Correlated, off-centre 3-D Gaussian and a 2-D three-class mixture.
GAUSS = analytic.Gaussian.from_cov(
    jnp.array([0.5, -1.0, 0.2]),
    jnp.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]]),
)
_S3 = math.sqrt(3.0) / 2.0
MIX = analytic.GaussianMixture.create(
    jnp.array([0.3, 0.3, 0.4]),
    1.3 * jnp.array([[0.0, 1.0], [-_S3, -0.5], [_S3, -0.5]]),
    stds=jnp.array([1.0, 0.8, 1.1]),
    labels=jnp.arange(3),
    num_classes=3,
)
PROCESSES = {"vp": jaxdiff.VPProcess(), "edm": jaxdiff.EDMProcess()}


# The analytic references, compiled once per shape (eager dispatch compiles op by op).
_sample = jax.jit(lambda dist, key, n: dist.sample(key, n), static_argnums=2)
_sample_labels = jax.jit(lambda dist, key, n: dist.sample_with_labels(key, n), static_argnums=2)
_log_prob = jax.jit(lambda dist, process, x, t: dist.log_prob(process, x, t))
_data_log_prob = jax.jit(lambda dist, x: dist.data_log_prob(x))
_class_post = jax.jit(lambda dist, process, x: dist.class_log_posterior(process, x, process.t_min))


def _jit(fn, *args, **kwargs):
    """``fn(*args, x, **kwargs)`` as one compiled program (eager dispatch op by op is slow)."""
    return jax.jit(lambda x: fn(*args, x, **kwargs))


def _exact_prior(dist, process):
    """The exact marginal at t_max (the default N(0, sigma_T^2) prior neglects alpha_T x0)."""
    return lambda z: _log_prob(dist, process, z, process.t_max)


# ------------------------------------------------------------------------------------------------
# probability-flow log-likelihood
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,dist", [("edm", GAUSS), ("vp", MIX)], ids=["gaussian", "mixture"])
def test_pf_ode_log_likelihood_matches_the_analytic_density(name, dist):
    process = PROCESSES[name]
    x = _sample(dist, jax.random.key(1), 6)
    ref = _log_prob(dist, process, x, process.t_min)
    out = _jit(L.log_likelihood, dist.denoiser(process), process,
               prior_log_prob=_exact_prior(dist, process))(x)
    per_dim = np.abs(np.asarray(out.log_prob - ref)) / x.shape[1]
    assert per_dim.max() < 1e-3, per_dim
    np.testing.assert_array_equal(out.std_error, 0.0)
    assert out.latent.shape == x.shape and out.num_steps.shape == (6,)


def test_hutchinson_estimate_is_within_three_standard_errors():
    process = PROCESSES["vp"]
    x = _sample(MIX, jax.random.key(2), 8)
    ref = _log_prob(MIX, process, x, process.t_min)
    den = MIX.denoiser(process)
    prior = _exact_prior(MIX, process)
    # Gaussian probes in low dimension give a skewed (chi-square-like) estimate whose spread
    # needs more probes to be estimated reliably than the two-point Rademacher one.
    for probe, num_probes in (("rademacher", 16), ("gaussian", 64)):
        out = _jit(L.log_likelihood, den, process, divergence_method="hutchinson",
                   num_probes=num_probes, probe=probe, key=jax.random.key(3),
                   prior_log_prob=prior, solver="rk4", steps=64)(x)
        z = np.asarray((out.log_prob - ref) / out.std_error)
        assert np.all(np.abs(z) < 3.0), (probe, z)
        # The estimate is not the exact answer: the probes really do add noise.
        assert np.all(out.std_error > 1e-4)
        assert out.delta.shape == (num_probes, 8)


def test_fixed_grid_paths_converge_to_the_adaptive_solution():
    process = PROCESSES["edm"]
    x = _sample(GAUSS, jax.random.key(4), 4)
    den = GAUSS.denoiser(process)
    ref = _jit(L.log_likelihood, den, process, solver="dopri5", rtol=1e-9, atol=1e-9)(x).log_prob
    for solver, order in (("heun", 2), ("rk4", 4)):
        errs = []
        for steps in (16, 64):
            lp = _jit(L.log_likelihood, den, process, solver=solver, steps=steps)(x).log_prob
            errs.append(float(jnp.max(jnp.abs(lp - ref))))
        slope = np.log(errs[0] / errs[1]) / np.log(4.0)  # measured order of convergence
        assert slope > order - 0.3, (solver, errs, slope)
    # An explicit increasing grid is accepted and gives the same answer as steps=.
    grid = jnp.linspace(process.t_min, process.t_max, 3)
    a = L.log_likelihood(den, process, x, solver="euler", ts=grid).log_prob
    assert np.all(np.isfinite(a))


def test_results_do_not_depend_on_the_batch():
    process = PROCESSES["vp"]
    x = _sample(MIX, jax.random.key(5), 6)
    den = MIX.denoiser(process)
    fn = jax.jit(lambda x, idx: L.log_likelihood(
        den, process, x, divergence_method="hutchinson", num_probes=2, key=jax.random.key(6),
        example_index=idx).log_prob)
    # Each example's probes and adaptive steps are its own: replacing its batch-mates (by far
    # points that need other step sizes) and reordering the batch leave its result unchanged.
    idx = jnp.arange(6)
    full = fn(x, idx)
    others = x.at[:3].set(8.0 * x[:3])
    perm = jnp.array([4, 0, 5, 2, 1, 3])
    mixed = fn(others[perm], idx[perm])
    np.testing.assert_allclose(mixed[jnp.argsort(perm)][3:], full[3:], rtol=0, atol=1e-12)
    assert not np.allclose(mixed[jnp.argsort(perm)][:3], full[:3])


def test_divergence_exact_and_probe_forms():
    a = jnp.array([[1.0, 2.0, 0.0], [0.5, -3.0, 1.0], [0.0, 0.0, 4.0]])
    fn = lambda y: jnp.tanh(y) @ a.T
    x = jax.random.normal(jax.random.key(7), (5, 3))
    _, div = L._divergence(fn, x)
    ref = jax.vmap(lambda xi: jnp.trace(jax.jacfwd(lambda v: jnp.tanh(v) @ a.T)(xi)))(x)
    np.testing.assert_allclose(div, ref, rtol=1e-12)
    # With all 2^3 sign patterns as Rademacher probes the average is exact.
    signs = jnp.array(np.array(np.meshgrid(*[[-1.0, 1.0]] * 3)).reshape(3, -1).T)
    probes = jnp.broadcast_to(signs[:, None, :], (8, 5, 3))
    _, est = L._divergence(fn, x, probes=probes)
    np.testing.assert_allclose(est.mean(0), ref, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# variational bounds
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,dist", [("vp", GAUSS), ("edm", MIX)], ids=["gaussian", "mixture"])
def test_elbo_with_the_exact_denoiser_equals_log_p(name, dist):
    process = PROCESSES[name]
    x = _sample(dist, jax.random.key(8), 8)
    out = _jit(L.elbo, jax.random.key(9), dist.denoiser(process), process, num_samples=2048)(x)
    diff = out.elbo - _data_log_prob(dist, x)
    # Pooled over examples (independent noise): mean difference / its standard error.
    z = float(jnp.mean(diff) / (jnp.sqrt(jnp.sum(out.std_error**2)) / x.shape[0]))
    assert abs(z) < 3.0, (z, diff, out.std_error)
    np.testing.assert_allclose(out.elbo, -out.prior_kl + out.reconstruction - out.diffusion)


def test_elbo_time_samplings_agree():
    process = PROCESSES["vp"]
    x = _sample(GAUSS, jax.random.key(10), 4)
    den = GAUSS.denoiser(process)
    ref = _data_log_prob(GAUSS, x)
    lam_hi, lam_lo = process.log_snr(process.t_min), process.log_snr(process.t_max)

    def importance(key, shape):
        # lambda / 2 logistic, truncated to [lam_lo, lam_hi] by inverse CDF, mapped to t.
        f_lo, f_hi = jax.nn.sigmoid(lam_lo / 2), jax.nn.sigmoid(lam_hi / 2)
        u = f_lo + jax.random.uniform(key, shape) * (f_hi - f_lo)
        lam = 2.0 * jnp.log(u / (1 - u))
        log_q_lam = jnp.log(0.5 * u * (1 - u)) - jnp.log(f_hi - f_lo)
        t = process.t_from_log_snr(lam)
        return t, log_q_lam + jnp.log(-process.d_log_snr(t))

    for sampling, n in (("uniform", 8192), (importance, 4096)):
        out = _jit(L.elbo, jax.random.key(11), den, process, num_samples=n,
                   time_sampling=sampling)(x)
        z = float(jnp.mean(out.elbo - ref) / (jnp.sqrt(jnp.sum(out.std_error**2)) / 4))
        assert abs(z) < 3.0, (sampling, z)


def test_perturbed_denoiser_loses_the_predicted_amount():
    process = PROCESSES["vp"]
    x = _sample(GAUSS, jax.random.key(12), 256)
    exact = GAUSS.denoiser(process)
    offset = jnp.array([0.3, -0.15, 0.24])

    def perturbed(z, t, cond=None):  # an error c * sigma keeps the weighted integrand bounded
        return exact(z, t) + offset[None, :] * process.sigma(t)[:, None]

    key = jax.random.key(13)
    a = _jit(L.elbo, key, exact, process, num_samples=256)(x)
    b = _jit(L.elbo, key, perturbed, process, num_samples=256)(x)
    drop = a.elbo - b.elbo  # common random numbers: the noise of the two estimates cancels
    # 1/2 int e^lambda ||c sigma||^2 dlambda = 1/2 ||c||^2 int alpha^2 dlambda
    lam = jnp.linspace(process.log_snr(process.t_max), process.log_snr(process.t_min), 20001)
    integrand = jnp.square(process.alpha(process.t_from_log_snr(lam)))
    predicted = 0.5 * jnp.sum(offset**2) * jnp.trapezoid(integrand, lam)
    se = jnp.std(drop, ddof=1) / math.sqrt(drop.shape[0])
    assert abs(float(jnp.mean(drop) - predicted)) < 3 * float(se), (jnp.mean(drop), predicted, se)
    assert float(predicted) > 10 * float(se)  # the drop is resolved, not lost in the noise


@jax.jit
def _exact_discrete_elbo(process, x, grid):
    """Closed-form T-step bound for isotropic Gaussian data N(0, s^2 I) and its exact denoiser."""
    s2 = 0.7**2
    alpha, sigma = process.alpha(grid), process.sigma(grid)
    c = alpha * s2 / (alpha**2 * s2 + sigma**2)  # D* = c x_t
    sq = jnp.sum(x**2, axis=-1)
    d = x.shape[1]
    mse = (1 - c * alpha)[None, :] ** 2 * sq[:, None] + (c * sigma)[None, :] ** 2 * d
    snr = jnp.exp(process.log_snr(grid))
    diffusion = 0.5 * jnp.sum((snr[:-1] - snr[1:])[None, :] * mse[:, 1:], axis=1)
    kl = L._prior_kl(process, x, grid[-1], None)
    recon = L._reconstruction(process, x, grid[0])
    return -kl + recon - diffusion


def test_discrete_bound_matches_its_closed_form_and_converges_to_the_continuous_one():
    process = jaxdiff.DiscreteVPProcess.create(1000)
    g = analytic.Gaussian.isotropic(jnp.zeros(2), 0.7)
    x = _sample(g, jax.random.key(14), 6)
    den = g.denoiser(process)
    gaps = {}
    for steps in (8, 64, 1024):
        grid = L._discrete_grid(process, steps, None)
        exact = _exact_discrete_elbo(process, x, grid)
        gaps[steps] = float(jnp.mean(_data_log_prob(g, x) - exact))
        if steps == 8:
            continue
        out = _jit(L.discrete_elbo, jax.random.key(15), den, process, num_steps=steps,
                   num_samples=512)(x)
        z = (out.elbo - exact) / out.std_error
        assert np.all(np.abs(z) < 3.5), (steps, z)  # 12 z-scores, fixed key
    # The bound tightens towards the continuous one (which equals log p here) like 1/T.
    assert gaps[8] > gaps[64] > gaps[1024] > 0, gaps
    ratio = gaps[1024] * 1024 / (gaps[64] * 64)
    assert 0.8 < ratio < 1.25, (gaps, ratio)
    # Default grid of a DiscreteVPProcess: its training knots t = (n + 1)/N.
    knots = L._discrete_grid(process, None, None)
    np.testing.assert_allclose(knots, (np.arange(1000) + 1) / 1000)


# ------------------------------------------------------------------------------------------------
# discrete data
# ------------------------------------------------------------------------------------------------


def test_dequantisation_and_bits_per_dim():
    x = jnp.array([[-1.0, -0.875, 1.0], [0.0, 0.125, 0.5]])  # 17 levels, bin width 1/8
    y = L.dequantize(jax.random.key(17), x, num_levels=17)
    assert np.all(np.abs(np.asarray(y - x)) <= 1 / 16)
    assert not np.allclose(y, x)
    # Uniform density over the bins of [-1 - 1/16, 1 + 1/16]^D is exactly log2(17) bits per dim.
    log_p = -3 * math.log(2.0 + 1 / 8)
    np.testing.assert_allclose(L.bits_per_dim(log_p, 3, num_levels=17), math.log2(17), rtol=1e-12)
    # 8-bit images on [-1, 1]: the offset is log2(255 / 2) for a unit-scale density.
    np.testing.assert_allclose(L.bits_per_dim(0.0, 1, num_levels=256), math.log2(127.5))


def test_bad_input_raises_clear_errors():
    process = PROCESSES["vp"]
    den = GAUSS.denoiser(process)
    x = _sample(GAUSS, jax.random.key(0), 2)
    with pytest.raises(ValueError, match="levels"):
        L.check_discrete(jnp.array([[0.01]]), num_levels=17)
    with pytest.raises(ValueError, match=r"\[low, high\]"):
        L.dequantize(jax.random.key(0), jnp.array([[1.5]]), num_levels=17)
    with pytest.raises(ValueError, match="num_levels"):
        L.bits_per_dim(0.0, 1, num_levels=1)
    with pytest.raises(ValueError, match="rtol"):
        L.log_likelihood(den, process, x, rtol=0.0)
    with pytest.raises(ValueError, match="atol"):
        L.log_likelihood(den, process, x, atol=-1e-3)
    with pytest.raises(ValueError, match="probes must have shape"):
        L.log_likelihood(den, process, x, divergence_method="hutchinson",
                         probes=jnp.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="solver"):
        L.log_likelihood(den, process, x, solver="rk45")
    with pytest.raises(ValueError, match="steps"):
        L.log_likelihood(den, process, x, solver="heun")
    with pytest.raises(ValueError, match="increasing|decreasing"):
        L.log_likelihood(den, process, x, solver="heun", ts=jnp.array([1.0, 0.5, 0.01]))
    with pytest.raises(ValueError, match="key"):
        L.log_likelihood(den, process, x, divergence_method="hutchinson")
    with pytest.raises(ValueError, match="t_min"):
        L.elbo(jax.random.key(0), den, process, x, t_min=0.0)
    with pytest.raises(ValueError, match="time_sampling"):
        L.elbo(jax.random.key(0), den, process, x, time_sampling="lognormal")
    with pytest.raises(TypeError, match="floating"):
        L.elbo(jax.random.key(0), den, process, jnp.ones((2, 3), int))
    with pytest.raises(ValueError, match="class_conds"):
        L.diffusion_classifier(jax.random.key(0), den, process, x, jnp.arange(1))
    with pytest.raises(ValueError, match="keep"):
        L.diffusion_classifier(jax.random.key(0), den, process, x, jnp.arange(3),
                               num_samples=(4, 8), keep=(4, 1))
    with pytest.raises(ValueError, match="weighting"):
        L.diffusion_classifier(jax.random.key(0), den, process, x, jnp.arange(3),
                               weighting="l1")


# ------------------------------------------------------------------------------------------------
# diffusion classifier
# ------------------------------------------------------------------------------------------------


def test_diffusion_classifier_reaches_the_bayes_accuracy():
    process = PROCESSES["vp"]
    x, y = _sample_labels(MIX, jax.random.key(18), 600)
    bayes_label = jnp.argmax(_class_post(MIX, process, x), -1)
    # The Bayes accuracy itself, from the expected maximum posterior on a large sample.
    xb, _ = _sample_labels(MIX, jax.random.key(19), 20_000)
    post_b = _class_post(MIX, process, xb)
    p_bayes = float(jnp.mean(jnp.exp(jnp.max(post_b, -1))))
    se = math.sqrt(p_bayes * (1 - p_bayes) / x.shape[0])
    den = MIX.denoiser(process)
    log_prior = jnp.log(jnp.array([0.3, 0.3, 0.4]))
    out = _jit(L.diffusion_classifier, jax.random.key(20), den, process,
               class_conds=jnp.arange(3), num_samples=256, log_prior=log_prior)(x)
    acc = float(jnp.mean(out.label == y))
    assert abs(acc - p_bayes) < 3 * se, (acc, p_bayes, se)
    assert float(jnp.mean(out.label == bayes_label)) > 0.9


def test_successive_elimination_and_shared_noise():
    process = PROCESSES["vp"]
    x, _ = _sample_labels(MIX, jax.random.key(21), 40)
    den = MIX.denoiser(process)
    kw = dict(class_conds=jnp.arange(3), weighting="uniform")
    out = _jit(L.diffusion_classifier, jax.random.key(22), den, process,
               num_samples=(8, 32), keep=(2, 1), **kw)(x)
    counts = np.asarray(out.counts)
    assert np.all(np.sort(counts, axis=1) == np.array([8, 32, 32]))  # one class dropped at 8
    assert np.all(np.isneginf(np.asarray(out.scores)).sum(1) == 2)
    np.testing.assert_array_equal(out.label, np.argmax(np.asarray(out.scores), 1))
    # Rounds are nested prefixes of one stratified set of (t, eps): the survivors' errors equal
    # those of a single round over all 32 samples. The chunked path gives the same result.
    single = _jit(L.diffusion_classifier, jax.random.key(22), den, process, num_samples=32,
                  **kw)(x)
    alive = counts == 32
    np.testing.assert_allclose(np.asarray(out.errors)[alive], np.asarray(single.errors)[alive],
                               rtol=1e-12)
    chunked = _jit(L.diffusion_classifier, jax.random.key(22), den, process,
                   num_samples=(8, 32), keep=(2, 1), chunk=16, **kw)(x)
    np.testing.assert_array_equal(chunked.label, out.label)


@pytest.mark.slow
def test_likelihood_experiment_quick(toy2d_run, digits_run, tmp_path):
    from experiments.likelihood.main import main

    results = main(["all", "--quick", "--toy2d-model", str(toy2d_run[0]),
                    "--digits-model", str(digits_run[0]), "--workdir", str(tmp_path)])
    for stage in ("toy2d", "bpd", "classifier"):
        assert (tmp_path / f"{stage}.json").exists()
    toy = results["toy2d"]
    # The PF-ODE of the exact denoiser reproduces the exact NLL; the model's ELBO is a bound.
    assert abs(toy["pf_ode_exact_denoiser_nll"][0] - toy["exact_data_nll"][0]) < 1e-2
    bpd = results["bpd"]
    values = [v[0] if isinstance(v, (tuple, list)) else v
              for k, v in bpd.items() if k.endswith("_bpd")]
    assert len(values) >= 8 and np.all(np.isfinite(values)), bpd
