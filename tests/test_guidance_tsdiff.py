"""TSDiff self-guidance and refinement on Gaussian-process time series, and the sample CRPS.

The prior is a Gaussian process (squared-exponential kernel) on L time points, so the exact
conditional given noisy observations is known (``Gaussian.condition``) and is the reference for
every sampler.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import jaxdiff
from jaxdiff import metrics
from jaxdiff.analytic import Gaussian
from jaxdiff.guidance.loss_guided import gaussian_likelihood_guidance
from jaxdiff.guidance.tsdiff import (
    best_diffusion_time,
    observation_guidance,
    quantile_levels,
    refine,
    refine_energy,
)

L = 20  # time points
TAU = 0.1  # observation noise std
N = 1000  # samples per method
K_TRUTH = 256  # draws from the exact conditional for the CRPS
SCALES = {"mse": 4.0, "quantile": 8.0}


def _gp_prior():
    u = np.linspace(0.0, 1.0, L)
    cov = np.exp(-np.square(u[:, None] - u[None, :]) / (2 * 0.2**2)) + 1e-3 * np.eye(L)
    return Gaussian.from_cov(jnp.zeros(L), jnp.asarray(cov))


MASKS = {
    "imputation": np.random.default_rng(5).permutation(L) < L // 2,  # random half observed
    "forecast": np.arange(L) < (2 * L) // 3,  # first 2/3 observed
}
REFINE = dict(t_star=0.2, reg_weight=1.0, num_steps=200, step_size=0.2)
MCMC = dict(lam=2.0, eta=0.1, gamma=0.5, batch=2000, target=np.array([1.0, -2.0, 0.5]))


@pytest.fixture(scope="module")
def gp():
    """The process, the GP prior, one noisy observation ``y`` of a prior draw, and the masks."""
    process = jaxdiff.VPProcess()

    @jax.jit
    def build():
        prior = _gp_prior()
        x_true = prior.sample(jax.random.key(3), 1)[0]
        return prior, x_true + TAU * jax.random.normal(jax.random.key(4), (L,), jnp.float64)

    prior, y = build()
    return process, prior, y, MASKS, _posterior


def _posterior(prior, y, mask):
    """The exact conditional given the masked observations (the mask as a diagonal matrix)."""
    return prior.condition(jnp.diag(jnp.asarray(mask, jnp.float64)), jnp.where(mask, y, 0.0), TAU)


@pytest.fixture(scope="module")
def results(gp):
    """Every sampler run and closed-form evaluation of this file in ONE compiled program
    (compilation dominates the cost of these tests):

    * per mask: the exact conditional's moments, ``K_TRUTH`` draws and ``N`` samples from it;
    * the exact-likelihood guide vs the conditional's denoiser; self-guidance vs its closed form
      (vectors, channels, NaN at missing entries); ``refine_energy``; ``best_diffusion_time``;
    * DDPM sampling with unguided / MSE / quantile self-guidance for both masks: ``jax.vmap`` over
      the (mask, scale) pairs, so masks and scales are data of two programs (MSE, quantile);
    * CRPS against the conditional draws and Gaussian W2 (with 200 bootstrap replicates) for
      every sample set;
    * refine ("most_likely") from a poor forecast, and "mcmc" with a flat-prior denoiser.
    """
    process, prior, y, masks, posterior = gp
    names = list(masks)
    stacked_masks = np.stack([masks[n] for n in names])
    ts = jaxdiff.timesteps.uniform_t(process, 100)
    m = masks["forecast"]
    b = 6  # closed-form evaluation points
    arrays = dict(
        prior=prior, y=y,
        x_init=np.random.default_rng(1).normal(size=(N, L)),
        boot=np.random.default_rng(8).integers(0, N, size=(200, N)),
        x=np.random.default_rng(0).normal(size=(b, L)),
        t=np.array([0.02, 0.1, 0.3, 0.5, 0.8, 1.0]),
        y_per_example=np.asarray(y)[None] + 0.3 * np.random.default_rng(2).normal(size=(b, L)),
        q=quantile_levels(b),
        scale=np.array([0.0, 0.5, 1.0, 2.0, 4.0, 8.0]),
    )

    def flat(x, t, cond=None):  # the denoiser of a flat prior: x0_hat = x_t / alpha_t
        return x / process.alpha(t)[:, None]

    # Every array enters as an argument: XLA would constant-fold computations on closed-over
    # arrays at compile time (slow, and rounded differently from the run-time program).
    @jax.jit
    def run_all(a):
        prior, y, x, t, q, scale = a["prior"], a["y"], a["x"], a["t"], a["q"], a["scale"]
        x_init, boot, y_per_example = a["x_init"], a["boot"], a["y_per_example"]
        denoiser = prior.denoiser(process)
        x0_cov = jax.tree_util.Partial(type(prior).x0_covariance, prior, process)

        def channel_denoiser(x, t, cond=None):
            series = jnp.swapaxes(x, 1, 2).reshape(-1, L)  # (B * C, L)
            out = prior.denoise(process, series, jnp.repeat(t, x.shape[2]))
            return jnp.swapaxes(out.reshape(x.shape[0], x.shape[2], L), 1, 2)

        out = {"x": x, "t": t, "y_per_example": y_per_example, "q": q, "scale": scale,
               "plain": denoiser(x, t), "c_t": prior.x0_covariance(process, t)}
        posts = [posterior(prior, y, masks[n]) for n in names]
        moments = [p.moments() for p in posts]
        out["cond_mean"] = {n: mo[0] for n, mo in zip(names, moments)}
        truths = jnp.stack([p.sample(jax.random.key(9), K_TRUTH) for p in posts])
        exact = jnp.stack([p.sample(jax.random.key(10), N) for p in posts])
        for n, p in zip(names, posts):
            guide = gaussian_likelihood_guidance(
                denoiser, process, jnp.diag(jnp.asarray(masks[n], jnp.float64)),
                jnp.where(masks[n], y, 0.0), TAU, x0_cov=x0_cov)
            out["exact_guide/" + n] = guide(x, t)
            out["posterior/" + n] = p.denoiser(process)(x, t)
        for kind in ("mse", "quantile"):
            out["self/" + kind] = observation_guidance(
                denoiser, process, y_per_example, m, scale, kind=kind,
                quantiles=q if kind == "quantile" else None)(x, t)
        xc = jnp.stack([x, -x], axis=-1)  # (B, L, 2)
        yc = jnp.stack([y, -y], axis=-1)  # shared (L, 2); an (L, 1) mask observes both channels
        out["channels"] = observation_guidance(channel_denoiser, process, yc, m[:, None], 2.0)(
            xc, t)
        out["channels_plain"] = channel_denoiser(xc, t)
        out["nan_missing"] = observation_guidance(
            denoiser, process, jnp.where(m, y, jnp.nan), m, 1.0)(x, t)
        out["energy"] = refine_energy(denoiser, process, y_per_example, jnp.zeros_like(x),
                                      t_star=0.2, reg_weight=1.5, reg_target=y, mask=m)
        out["best_t"] = best_diffusion_time(jax.random.key(2), denoiser, process,
                                            prior.sample(jax.random.key(9), 2000),
                                            jnp.linspace(0.05, 0.95, 19))

        def sample(kind, mask, s):
            guided = observation_guidance(denoiser, process, y, mask, s, kind=kind,
                                          quantiles=quantile_levels(N) if kind == "quantile"
                                          else None)
            return jaxdiff.samplers.ddpm(jax.random.key(0), guided, process, x_init, ts)

        two = jnp.ones(2)
        unguided, mse = jnp.split(jax.vmap(lambda mk, s: sample("mse", mk, s))(
            np.concatenate([stacked_masks] * 2), jnp.concatenate([0.0 * two,
                                                                  SCALES["mse"] * two])), 2)
        quant = jax.vmap(lambda mk: sample("quantile", mk, SCALES["quantile"]))(stacked_masks)
        sets = jnp.stack([unguided, mse, quant, exact], axis=1)  # (mask, method, N, L)
        out["samples"] = sets

        def scores(samples, truths, mean, cov):
            # mean_k crps(X, y_k) = mean_{i,k} |x_i - y_k| - spread(X) / 2, and one library call
            # gives spread(X) / 2 = mean_i |x_i - y_0| - crps(X, y_0): one sort, not K.
            cross = jnp.mean(jnp.abs(samples[:, None] - truths[None]), axis=(0, 1))
            half_spread = (jnp.mean(jnp.abs(samples - truths[:1]), axis=0)
                           - metrics.crps(samples, truths[0], per_dimension=True))
            crps = cross - half_spread

            def w2(idx):
                return metrics.gaussian_w2(*metrics.moments(samples[idx]), mean, cov)

            return crps, w2(jnp.arange(N)), jax.vmap(w2)(boot)

        per_mask = jax.vmap(scores, in_axes=(0, None, None, None))  # over the methods
        out["scores"] = jax.vmap(per_mask)(sets, truths, *map(jnp.stack, zip(*moments)))
        out["truths"] = truths

        y_init = jnp.broadcast_to(jnp.where(m, y, 1.5), (64, L))
        out["refine_init"] = y_init
        out["refined"] = refine(jax.random.key(0), denoiser, process, y_init, reg_target=y,
                                mask=m, **REFINE)
        out["mcmc"] = refine(jax.random.key(1), flat, process, jnp.zeros((MCMC["batch"], 3)),
                             t_star=0.3, reg_weight=MCMC["lam"], reg_target=MCMC["target"],
                             mode="mcmc", num_steps=60, step_size=MCMC["eta"],
                             noise_scale=MCMC["gamma"])
        return out

    return run_all(arrays)


# ------------------------------------------------------------------------------------------------
# CRPS
# ------------------------------------------------------------------------------------------------


def _mean_abs_diff(a, b):
    """``mean_j |a_i - b_j|`` per column for ``a`` (n, d) and ``b`` (m, d), in O((n + m) log m)
    from sorted ``b`` and its prefix sums."""
    a, b = np.asarray(a, np.float64), np.sort(np.asarray(b, np.float64), axis=0)
    m = b.shape[0]
    prefix = np.concatenate([np.zeros((1, b.shape[1])), np.cumsum(b, axis=0)])
    out = np.empty_like(a)
    for j in range(a.shape[1]):
        r = np.searchsorted(b[:, j], a[:, j])  # number of b below a
        below, total = prefix[r, j], prefix[-1, j]
        out[:, j] = a[:, j] * (2 * r - m) - 2 * below + total
    return out / m


def _gaussian_crps(mu, s, y):
    """Closed-form CRPS of N(mu, s^2) at y (a loss, >= 0)."""
    z = (y - mu) / s
    return s * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / math.sqrt(math.pi))


def test_crps_sorted_form_is_the_pair_sum_and_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    small = rng.normal(size=(7, 3))
    y = rng.normal(size=3)
    pairs = np.abs(small[:, None] - small[None]).sum(axis=(0, 1))
    for fair, denom in ((False, 49), (True, 42)):
        brute = np.abs(small - y).mean(0) - 0.5 * pairs / denom
        got = metrics.crps(small, y, fair=fair, per_dimension=True)
        np.testing.assert_allclose(got, brute, rtol=1e-13, atol=1e-13)
    assert float(metrics.crps(jnp.array([[0.0], [2.0]]), jnp.array([1.0]))) == 0.5

    # Against the closed form: N(mu, s^2) per dimension, several standardised errors z.
    mu, s = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 0.5, 2.0, 0.1])
    y = mu + s * np.array([0.0, 1.5, -0.7, 3.0])
    n = 4000
    x = mu + s * rng.normal(size=(n, 4))
    got = np.asarray(metrics.crps(x, y, fair=True, per_dimension=True))
    exact = np.asarray(_gaussian_crps(mu, s, y))
    # Influence function of the estimator: |x - y| - E|x - X'|; SE = its std / sqrt(n).
    infl = np.abs(x - y) - _mean_abs_diff(x, x)
    se = infl.std(0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(got - exact) < 4 * se), (got, exact, se)
    # The positively oriented Gneiting-Raftery form is the negative; the sign check is real.
    assert np.all(exact > 0)
    np.testing.assert_allclose(float(metrics.crps(x, y, fair=True)), got.mean(), rtol=1e-13)


def test_crps_validation():
    with pytest.raises(ValueError, match="y must have shape"):
        metrics.crps(np.zeros((4, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.crps(np.zeros((1, 3)), np.zeros(3), fair=True)
    with pytest.raises(ValueError, match=r"samples must have shape \(N, ...\)"):
        metrics.crps(np.float64(1.0), np.zeros(()))


# ------------------------------------------------------------------------------------------------
# The guided denoisers against closed forms
# ------------------------------------------------------------------------------------------------


def test_exact_likelihood_guide_is_the_exact_conditional_denoiser(gp, results):
    for name in gp[3]:
        exact = results["posterior/" + name]
        np.testing.assert_allclose(results["exact_guide/" + name], exact, rtol=1e-8, atol=1e-8)
        assert float(jnp.max(jnp.abs(exact - results["plain"]))) > 0.1


def test_self_guidance_is_the_closed_form_gaussian_update(gp, results):
    # For Gaussian data d x0_hat / d x_t = (alpha / sigma^2) C_t, so the guided denoiser is
    # x0_hat + s C_t (m * g) with g = -d loss / d x0_hat: 2 (y - x0_hat) (MSE) or the pinball
    # slope q 1[e > 0] + (q - 1) 1[e < 0], e = y - x0_hat (quantile).
    y, masks = np.asarray(gp[2]), gp[3]
    r = {k: np.asarray(v) for k, v in results.items() if not isinstance(v, (dict, tuple))}
    m = masks["forecast"].astype(float)
    d, c_t, q, scale = r["plain"], r["c_t"], r["q"], r["scale"]
    e = r["y_per_example"] - d
    slopes = {"mse": 2.0 * e, "quantile": np.where(e > 0, q[:, None], q[:, None] - 1.0)}
    for kind, slope in slopes.items():
        expected = d + scale[:, None] * np.einsum("bij,bj->bi", c_t, m[None, :] * slope)
        np.testing.assert_allclose(r["self/" + kind], expected, rtol=1e-10, atol=1e-10)
    # Channels (B, L, 2) of two independent series; the loss sums over every non-batch axis.
    dc = r["channels_plain"]
    slope = 2.0 * (np.stack([y, -y], axis=-1)[None] - dc) * m[None, :, None]
    expected = dc + 2.0 * np.einsum("bij,bjc->bic", c_t, slope)
    np.testing.assert_allclose(r["channels"], expected, rtol=1e-10, atol=1e-10)
    # Missing entries may hold NaN: they never reach the guided denoiser.
    assert np.all(np.isfinite(r["nan_missing"]))


def test_observation_guidance_validation(gp):
    process, prior, y, masks, _ = gp
    den = prior.denoiser(process)
    m = masks["forecast"]
    x, t = jnp.zeros((3, L)), jnp.full((3,), 0.5)
    with pytest.raises(ValueError, match="kind"):
        observation_guidance(den, process, y, m, 1.0, kind="l1")
    with pytest.raises(ValueError, match="quantiles apply"):
        observation_guidance(den, process, y, m, 1.0, quantiles=0.3)
    with pytest.raises(ValueError, match=r"quantiles must lie in \(0, 1\)"):
        observation_guidance(den, process, y, m, 1.0, kind="quantile", quantiles=1.0)
    with pytest.raises(ValueError, match="y_obs and mask must broadcast"):
        observation_guidance(den, process, y, m[:5], 1.0)
    with pytest.raises(ValueError, match="finite at the observed"):
        observation_guidance(den, process, jnp.where(m, jnp.nan, y), m, 1.0)
    with pytest.raises(ValueError, match="hold only 0 and 1"):
        observation_guidance(den, process, y, m * 0.5, 1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        observation_guidance(den, process, y, m, jnp.inf)
    # Shapes against the data: checked when the guided denoiser is traced (nothing compiles).
    with pytest.raises(ValueError, match="y_obs must broadcast to the data"):
        jax.jit(observation_guidance(den, process, jnp.zeros((4, L)), m, 1.0))(x, t)
    with pytest.raises(ValueError, match=r"quantiles must have shape \(\) or \(B,\)"):
        jax.jit(observation_guidance(den, process, y, m, 1.0, kind="quantile",
                                     quantiles=quantile_levels(4)))(x, t)
    with pytest.raises(ValueError, match="num_samples"):
        quantile_levels(0)
    np.testing.assert_allclose(quantile_levels(4), [0.2, 0.4, 0.6, 0.8], rtol=1e-15)


# ------------------------------------------------------------------------------------------------
# Guided sampling against the exact conditional
# ------------------------------------------------------------------------------------------------


def _crps_influence(samples, truths, target):
    """The two influence terms of the CRPS-vs-draws estimator on the target entries: per sample
    ``mean_k |x_i - y_k| - mean_j |x_i - x_j|`` and per draw ``mean_i |x_i - y_k|`` (averaged
    over the target entries), so that its variance is var(per sample) / N + var(per draw) / K."""
    xs, ys = np.asarray(samples)[:, target], np.asarray(truths)[:, target]
    per_sample = (_mean_abs_diff(xs, ys) - _mean_abs_diff(xs, xs)).mean(-1)
    per_truth = _mean_abs_diff(ys, xs).mean(-1)
    return per_sample, per_truth


METHODS = ("unguided", "mse", "quantile", "exact")


def test_self_guidance_beats_unguided_on_crps_and_w2(gp, results):
    masks = gp[3]
    samples = np.asarray(results["samples"])  # (mask, method, N, L)
    crps_all, w2_all, w2_boot_all = (np.asarray(a) for a in results["scores"])
    table = {}
    for i, (name, m) in enumerate(masks.items()):
        truths = np.asarray(results["truths"][i])
        stats = {}
        for j, method in enumerate(METHODS):
            assert np.all(np.isfinite(samples[i, j]))
            stats[method] = (float(crps_all[i, j][~m].mean()),
                             *_crps_influence(samples[i, j], truths, ~m), float(w2_all[i, j]),
                             float(np.std(w2_boot_all[i, j], ddof=1)))
        base = stats["unguided"]
        for method in METHODS[1:]:
            crps, per_sample, per_truth, w2, w2_se = stats[method]
            # Delta-method SE of the CRPS difference: the two sample sets as independent (the
            # shared keys make them positively correlated, so this over-estimates), the shared
            # conditional draws paired.
            crps_se = math.sqrt(per_sample.var(ddof=1) / N + base[1].var(ddof=1) / N
                                + (per_truth - base[2]).var(ddof=1) / K_TRUTH)
            assert base[0] - crps > 3 * crps_se, (name, method, base[0], crps, crps_se)
            assert base[3] - w2 > 3 * math.hypot(base[4], w2_se), (name, method, base[3], w2)
            table[name, method] = (crps, crps_se, w2, w2_se)
        table[name, "unguided"] = (base[0], math.sqrt(base[1].var(ddof=1) / N), base[3], base[4])
    print("\nTSDiff self-guidance on a GP (scales", SCALES, "; CRPS vs exact-conditional draws on"
          " the unobserved entries, SE of the difference to unguided; Gaussian W2, bootstrap SE;"
          " 'exact' = N exact conditional samples)")
    for key, (crps, crps_se, w2, w2_se) in table.items():
        print(f"  {key[0]:10s} {key[1]:9s} CRPS {crps:.4f} (SE {crps_se:.4f})  "
              f"W2 {w2:.3f} (SE {w2_se:.3f})")


# ------------------------------------------------------------------------------------------------
# Refinement
# ------------------------------------------------------------------------------------------------


def _expected_energy(prior, process, y, t, weight, target, mask):
    """Closed-form E_eps[E(y)] for the exact Gaussian (zero-mean) denoiser x0_hat = G x_t:
    (a/s)^2 (||(a G - I) y||^2 + s^2 tr(G G^T)) + weight * sum_obs (y - target)^2."""
    a, s = float(process.alpha(t)), float(process.sigma(t))
    u, lam = np.asarray(prior.eigvecs), np.asarray(prior.eigvals)
    gain = (u * (a * lam / (a**2 * lam + s**2))) @ u.T
    resid = np.asarray(y) @ (a * gain - np.eye(L)).T
    denoising = (a / s) ** 2 * (np.sum(resid**2, -1) + s**2 * np.sum(gain**2))
    return denoising + weight * np.sum(mask * (np.asarray(y) - np.asarray(target)) ** 2, -1)


def test_refine_most_likely_lowers_the_energy_and_moves_to_the_conditional_mean(gp, results):
    process, prior, y, masks, _ = gp
    m = masks["forecast"]
    cond_mean = np.asarray(results["cond_mean"]["forecast"])
    y_init, out = np.asarray(results["refine_init"]), np.asarray(results["refined"])
    assert out.shape == y_init.shape and np.all(np.isfinite(out))
    t_star, weight = REFINE["t_star"], REFINE["reg_weight"]
    before = _expected_energy(prior, process, y_init, t_star, weight, y, m)
    after = _expected_energy(prior, process, out, t_star, weight, y, m)
    dist_before = np.linalg.norm((y_init - cond_mean[None])[:, ~m], axis=-1)
    dist_after = np.linalg.norm((out - cond_mean[None])[:, ~m], axis=-1)
    print(f"refine most_likely: expected energy {before.mean():.3f} -> {after.mean():.3f}, "
          f"distance to the conditional mean on the horizon {dist_before.mean():.3f} -> "
          f"{dist_after.mean():.3f}")
    assert np.all(after < 0.8 * before)
    # Each run descends with fresh noise (stochastic gradients), so single runs scatter.
    assert dist_after.mean() < 0.3 * dist_before.mean()


def test_refine_energy_is_the_denoising_loss_plus_the_regulariser(gp, results):
    # With eps = 0 the expected energy loses only its trace term (a/s)^2 s^2 tr(G G^T).
    process, prior, y, masks, _ = gp
    t_star, weight, m = 0.2, 1.5, masks["forecast"]
    a, s = float(process.alpha(t_star)), float(process.sigma(t_star))
    u, lam = np.asarray(prior.eigvecs), np.asarray(prior.eigvals)
    trace = a**2 * np.sum(((u * (a * lam / (a**2 * lam + s**2))) @ u.T) ** 2)
    z = results["y_per_example"]
    expected = _expected_energy(prior, process, z, t_star, weight, y, m) - trace
    np.testing.assert_allclose(results["energy"], expected, rtol=1e-10)


def test_refine_mcmc_samples_the_regulariser_law_exactly(results):
    # With the denoiser x / alpha_t (a flat prior) the denoising loss is ||eps||^2, constant in
    # y, so E = lam ||y - target||^2 and unadjusted Langevin y <- y - eta grad E + sqrt(2 eta)
    # gamma xi is an AR(1) with stationary law N(target, gamma^2 / (2 lam (1 - eta lam))).
    out = np.asarray(results["mcmc"])
    assert np.all(np.isfinite(out))
    lam, eta, gamma, b = MCMC["lam"], MCMC["eta"], MCMC["gamma"], MCMC["batch"]
    var = gamma**2 / (2 * lam * (1 - eta * lam))
    # After 60 steps the AR(1) coefficient 1 - 2 eta lam = 0.6 has forgotten the start (0.6^60).
    mean_se = math.sqrt(var / b)
    var_se = var * math.sqrt(2 / (b - 1))
    np.testing.assert_array_less(np.abs(out.mean(0) - MCMC["target"]), 4 * mean_se)
    np.testing.assert_array_less(np.abs(out.var(0, ddof=1) - var), 4 * var_se)


def test_best_diffusion_time_matches_the_exact_gaussian_losses(gp, results):
    # For an exact Gaussian denoiser E[L(t)] = sum_k a^2 lam_k / (a^2 lam_k + s^2).
    process, prior, *_ = gp
    t_star, losses = results["best_t"]
    ts = np.linspace(0.05, 0.95, 19)
    alpha, sigma = process.alpha(ts), process.sigma(ts)
    a2 = np.square(np.asarray(alpha))[:, None]
    s2 = np.square(np.asarray(sigma))[:, None]
    lam = np.asarray(prior.eigvals)[None, :]
    exact = np.sum(a2 * lam / (a2 * lam + s2), axis=-1)
    # L(t) averages 2000 per-example sums of L weighted squared Gaussians (relative SE ~1-3%).
    np.testing.assert_allclose(losses, exact, rtol=0.06)
    exact_star = ts[np.argmin(np.square(exact - exact.mean()))]
    assert abs(float(t_star) - exact_star) <= ts[1] - ts[0] + 1e-12


def test_refine_validation(gp):
    process, prior, y, masks, _ = gp
    den = prior.denoiser(process)
    y0 = jnp.zeros((2, L))

    def call(**kwargs):
        options = dict(t_star=0.2, reg_weight=1.0, reg_target=y, num_steps=2, step_size=0.1)
        options.update(kwargs)
        return refine(jax.random.key(0), den, process, y0, **options)

    with pytest.raises(ValueError, match="mode"):
        call(mode="hmc")
    with pytest.raises(ValueError, match="num_steps"):
        call(num_steps=0)
    with pytest.raises(ValueError, match="t_star"):
        call(t_star=0.0)
    with pytest.raises(ValueError, match="t_star"):
        call(t_star=jnp.ones(2))
    with pytest.raises(ValueError, match="step_size"):
        call(step_size=-0.1)
    with pytest.raises(ValueError, match="noise_scale"):
        call(noise_scale=-1.0)
    with pytest.raises(ValueError, match="reg_weight"):
        call(reg_weight=-1.0)
    with pytest.raises(ValueError, match="kind"):
        call(kind="huber")
    with pytest.raises(ValueError, match="reg_target must broadcast to the data"):
        call(reg_target=jnp.zeros(L + 1), mask=jnp.ones(L + 1, bool))
    with pytest.raises(ValueError, match="noise must have"):
        refine_energy(den, process, y0, jnp.zeros(L), t_star=0.2, reg_weight=1.0, reg_target=y)
    with pytest.raises(ValueError, match="ts must be"):
        best_diffusion_time(jax.random.key(0), den, process, y0, jnp.zeros((2, 2)))
