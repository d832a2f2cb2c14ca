"""The convenience entry `jaxdiff.sample`, the generic ODE integrator and end-game transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import analytic, metrics, samplers

EDM = jaxdiff.EDMProcess()
VP = jaxdiff.VPProcess()
GAUSS = analytic.Gaussian.from_cov(jnp.array([0.5, -1.0]), jnp.array([[0.8, 0.3], [0.3, 0.4]]))

# method -> options; every registered sampler must appear here.
METHOD_KWARGS = {
    "pf_euler": {},
    "euler_maruyama": {},
    "predictor_corrector": {},
    "ddpm": {},
    "ddim": {"eta": 0.5},
    "euler_ancestral": {},
    "edm_heun": {},
    "dpm_solver_pp": {"order": 3, "third_order": "corrected"},
    "dpm_solver_pp_sde": {},
    "dpm_solver_pp_singlestep": {"order": 2},
    "unipc": {"order": 2},
}


def test_every_registered_method_is_covered():
    assert set(METHOD_KWARGS) == set(samplers.METHODS)


@pytest.mark.parametrize("method", sorted(METHOD_KWARGS))
def test_sample_every_method_reaches_the_data_distribution(method):
    """4000 samples, 100 steps on a Karras grid to an exact 0: moments of N(mu, Sigma).

    Tolerance: the Gaussian W2 between sample moments and the truth has a sampling error of
    order sqrt(tr(Sigma)/n) ~ 0.02 for n = 4000; 0.08 leaves room for 100-step discretisation
    error of the first-order methods (measured <= 0.05).
    """
    steps = 100 if method != "euler_maruyama" else 400
    run = jax.jit(lambda key: jaxdiff.sample(
        key, GAUSS.denoiser(EDM), EDM, (4000, 2), method=method, steps=steps,
        dtype=jnp.float64, **METHOD_KWARGS[method]))
    x = run(jax.random.key(3))
    assert x.shape == (4000, 2) and x.dtype == jnp.float64
    mean, cov = metrics.moments(x)
    true_mean, true_cov = GAUSS.moments()
    assert float(metrics.gaussian_w2(mean, cov, true_mean, true_cov)) < 0.08


@pytest.mark.parametrize("method", ["ddpm", "dpm_solver_pp"])
def test_sample_is_independent_of_batch_size_and_chunking(method):
    den = GAUSS.denoiser(VP)

    def run(batch, example_index=None):
        return jaxdiff.sample(jax.random.key(0), den, VP, (batch, 2), method=method, steps=20,
                              dtype=jnp.float64, example_index=example_index)

    full = run(16)
    np.testing.assert_array_equal(run(4), full[:4])
    np.testing.assert_array_equal(run(4, jnp.arange(8, 12)), full[8:12])


def test_sample_accepts_an_explicit_grid_and_validates_names():
    den = GAUSS.denoiser(EDM)
    ts = jaxdiff.timesteps.uniform_log_snr(EDM, 10, final_zero=True)
    x = jaxdiff.sample(jax.random.key(0), den, EDM, (8, 2), method="ddim", grid=ts,
                       dtype=jnp.float64)
    key_prior, key_sampler = jax.random.split(jax.random.key(0))
    del key_sampler
    # The prior draw is per example: row i is sigma(t_max) * normal(fold_in(prior_key, i)).
    z = jax.vmap(lambda k: jax.random.normal(k, (2,), jnp.float64))(
        jax.vmap(jax.random.fold_in, (None, 0))(key_prior, jnp.arange(8)))
    ref = samplers.ddim(None, den, EDM, EDM.prior_std() * z, ts)
    np.testing.assert_allclose(x, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="method"):
        jaxdiff.sample(jax.random.key(0), den, EDM, (8, 2), method="heun3")
    with pytest.raises(ValueError, match="grid"):
        jaxdiff.sample(jax.random.key(0), den, EDM, (8, 2), grid="cosine")
    with pytest.raises(ValueError, match="shape"):
        jaxdiff.sample(jax.random.key(0), den, EDM, (), method="ddim")


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2),
                                          ("rk4", 4)])
def test_odeint_order_on_a_pytree_state(method, order):
    """dy/dt = -y and dz/dt = t: y(1) = e^{-1}, z(1) = 1/2; log-log slope of the error."""

    def vf(t, state, args):
        y, z = state
        return (-args * y, jnp.full_like(z, t))

    errors = []
    for n in (10, 20, 40, 80):
        ts = jnp.linspace(0.0, 1.0, n + 1)
        y, z = samplers.odeint(vf, (jnp.ones(3), jnp.zeros(())), ts, args=1.0, method=method)
        np.testing.assert_allclose(z, 0.5, rtol=0, atol=1e-12 if order > 1 else 0.06)
        errors.append(float(jnp.max(jnp.abs(y - np.exp(-1.0)))))
    slope = -np.polyfit(np.log([10, 20, 40, 80]), np.log(errors), 1)[0]
    assert slope >= order - 0.15, (errors, slope)


def test_odeint_runs_backwards_and_validates():
    ts = jnp.linspace(1.0, 0.0, 201)
    y = samplers.odeint(lambda t, y, a: y, jnp.ones(2), ts, method="rk4")
    np.testing.assert_allclose(y, np.exp(-1.0), rtol=1e-9)
    with pytest.raises(ValueError, match="method"):
        samplers.odeint(lambda t, y, a: y, jnp.ones(2), ts, method="dopri5")
    with pytest.raises(ValueError, match="ts"):
        samplers.odeint(lambda t, y, a: y, jnp.ones(2), jnp.ones(1))


def test_clip_x0():
    den = samplers.clip_x0(lambda x, t, c: 3.0 * x, bound=1.0)
    x = jnp.array([[0.1, -0.5, 0.9]])
    np.testing.assert_allclose(den(x, jnp.ones(1)), [[0.3, -1.0, 1.0]], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="bound"):
        samplers.clip_x0(den, bound=0.0)


def test_dynamic_threshold_matches_imagen_rule():
    """s = clip(quantile(|x0|, q), 1, s_max) per example; x0 -> clip(x0, -s, s) / s."""
    x0 = jnp.array([[0.5, -0.2, 0.1, 0.3], [4.0, -2.0, 1.0, 0.5], [1.5, -1.5, 0.0, 0.0]])
    den = samplers.dynamic_threshold(lambda x, t, c: x, quantile=0.75, max_value=3.0)
    out = den(x0, jnp.ones(3))
    for row, got in zip(np.asarray(x0), np.asarray(out)):
        s = np.clip(np.quantile(np.abs(row), 0.75), 1.0, 3.0)
        np.testing.assert_allclose(got, np.clip(row, -s, s) / s, rtol=1e-12, atol=1e-15)
    assert float(jnp.max(jnp.abs(out))) <= 1.0
    with pytest.raises(ValueError, match="quantile"):
        samplers.dynamic_threshold(den, quantile=1.5)
    with pytest.raises(ValueError, match="max_value"):
        samplers.dynamic_threshold(den, max_value=0.5)


def test_gradient_through_a_named_grid_wrt_a_process_parameter():
    gaussian = analytic.Gaussian.isotropic(jnp.zeros(2), 0.5)

    def mean_sq(beta_max):
        process = jaxdiff.VPProcess(beta_max=beta_max)
        x = jaxdiff.sample(jax.random.key(0), gaussian.denoiser(process), process, (64, 2),
                           method="dpm_solver_pp", steps=6, grid="karras", dtype=jnp.float64)
        return jnp.mean(jnp.square(x))

    g = jax.grad(mean_sq)(jnp.float64(20.0))
    h = 1e-4
    fd = (mean_sq(20.0 + h) - mean_sq(20.0 - h)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5)
