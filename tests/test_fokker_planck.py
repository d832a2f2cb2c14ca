"""Fokker--Planck residuals, the FP-regularised loss, histogram OT and the bootstrap helper.

References are exact: the analytic log-densities and scores of Gaussians and Gaussian mixtures
solve the Fokker--Planck equation for every process, linear fields have known traces, and the
Hutchinson estimator's variance is known in closed form from the exact Hessian.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import fokker_planck as fp
from jaxdiff import metrics
from jaxdiff.analytic import Gaussian, GaussianMixture

PROCESSES = {
    "ou": jaxdiff.OUProcess(),
    "vp": jaxdiff.VPProcess(),
    "ve": jaxdiff.VEProcess(),
}


def _gaussian(dim, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    cov = a @ a.T / dim + 0.2 * np.eye(dim)
    return Gaussian.from_cov(jnp.asarray(rng.normal(size=dim)), jnp.asarray(cov))


def _mixture(dim, seed=1):
    # Full, anisotropic covariances: no Hessian is diagonal (Rademacher probes see variance).
    rng = np.random.default_rng(seed)
    means = jnp.asarray(2.0 * rng.normal(size=(3, dim)))
    a = rng.normal(size=(3, dim, dim))
    covs = a @ np.swapaxes(a, 1, 2) / dim + np.array([0.1, 0.3, 0.6])[:, None, None] * np.eye(dim)
    return GaussianMixture.create(jnp.array([0.2, 0.5, 0.3]), means, jnp.asarray(covs))


def _points(process, dim, n=6, seed=2):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(1.5 * rng.normal(size=(n, dim)))
    lo, hi = math.log(process.t_min), math.log(process.t_max)
    # Spread over the range, log-spaced, avoiding the very ends.
    t = jnp.asarray(np.exp(np.linspace(lo + 0.3 * (hi - lo), hi - 0.05 * (hi - lo), n)))
    return x, t


DISTS = {"gaussian": _gaussian, "mixture": _mixture}


def _ld_residual(logp, process, **kw):
    """Jitted log-density residual (eager autodiff of the mixtures is slow op by op)."""
    return jax.jit(lambda x, t: fp.log_density_residual(logp, process, x, t, **kw))


def _s_residual(score, process, **kw):
    return jax.jit(lambda x, t: fp.score_residual(score, process, x, t, **kw))


@pytest.mark.parametrize("process_name, dist_name",
                         [("ou", "mixture"), ("vp", "gaussian"), ("ve", "mixture")])
def test_exact_log_density_and_score_solve_the_fpe(process_name, dist_name):
    process = PROCESSES[process_name]
    dist = DISTS[dist_name](2)
    x, t = _points(process, 2)

    @jax.jit
    def both(x, t):
        return (fp.log_density_residual(lambda y, s: dist.log_prob(process, y, s), process, x, t),
                fp.score_residual(lambda y, s: dist.score(process, y, s), process, x, t))

    r, rs = both(x, t)
    scale = np.abs(r.time) + np.abs(r.diffusion)
    assert r.residual.shape == (6,) and r.residual.dtype == jnp.float64
    assert np.all(np.abs(r.residual) <= 1e-6 * scale), (r.residual, scale)
    np.testing.assert_array_equal(r.se, 0.0)
    # The terms are not trivially zero, so the bound above is a real check.
    assert np.all(scale > 1e-3)
    scale_s = np.abs(rs.time) + np.abs(rs.diffusion)
    assert rs.residual.shape == (6, 2)
    assert np.all(np.abs(rs.residual) <= 1e-6 * scale_s), (rs.residual, scale_s)
    assert np.all(np.max(scale_s, axis=-1) > 1e-3)


def test_perturbed_density_and_score_have_clearly_nonzero_residual():
    process = PROCESSES["ou"]
    dist = _mixture(2)
    x, t = _points(process, 2)

    def wrong(y, s):  # a time-dependent x-perturbation that the FPE does not transport
        return dist.log_prob(process, y, s) + 0.3 * jnp.sin(y[:, 0] + s)

    score = lambda y, s: jax.grad(lambda z: jnp.sum(wrong(z, s)))(y)

    @jax.jit
    def all_residuals(x, t):
        # A missing normaliser c(t) shows up as c'(t): the marginal at the wrong time.
        late = lambda y, s: dist.log_prob(process, y, 1.1 * s)
        return (fp.log_density_residual(wrong, process, x, t),
                fp.log_density_residual(late, process, x, t / 1.1),
                fp.score_residual(score, process, x, t))

    r, r_time, rs = all_residuals(x, t)
    scale = np.abs(r.time) + np.abs(r.diffusion)
    assert np.median(np.abs(r.residual) / scale) > 1e-2
    assert np.min(np.abs(r_time.residual)) > 1e-4
    assert np.median(np.abs(rs.residual)) > 1e-2


def test_score_residual_is_the_gradient_of_the_log_density_residual():
    # For s = grad phi, R_s = grad_x R_phi exactly, for any (not FPE-solving) phi.
    process = PROCESSES["vp"]
    dist = _gaussian(3)
    x, t = _points(process, 3, n=4)

    def phi(y, s):
        return dist.log_prob(process, y, s) + 0.2 * jnp.cos(y[:, 0] * y[:, 1] + 2.0 * s)

    grad_r = jax.jit(jax.grad(
        lambda y: jnp.sum(fp.log_density_residual(phi, process, y, t).residual)))(x)
    score = lambda y, s: jax.grad(lambda z: jnp.sum(phi(z, s)))(y)
    rs = _s_residual(score, process)(x, t)
    np.testing.assert_allclose(rs.residual, grad_r, rtol=1e-10, atol=1e-10)
    assert np.max(np.abs(grad_r)) > 1e-2


def _hutchinson_variance(matrix, probe):
    """Exact variance of v^T A v for one probe (A symmetrised)."""
    a = 0.5 * (matrix + matrix.T)
    fro = np.sum(a**2)
    return 2.0 * fro if probe == "gaussian" else 2.0 * (fro - np.sum(np.diag(a) ** 2))


def test_hutchinson_residual_within_3_se_and_se_matches_theory():
    process = PROCESSES["ou"]
    dist = _mixture(4)
    x, t = _points(process, 4, n=8)
    logp = lambda y, s: dist.log_prob(process, y, s)
    k = 64

    @jax.jit
    def estimates(x, t):
        exact = fp.log_density_residual(logp, process, x, t)
        est = [fp.log_density_residual(logp, process, x, t, estimator="hutchinson",
                                       key=jax.random.key(3), num_probes=k, probe=probe)
               for probe in ("rademacher", "gaussian")]
        hess = jax.vmap(jax.hessian(lambda y, s: logp(y[None], s[None])[0]))(x, t)
        return exact, est, hess

    exact, est, hess = estimates(x, t)
    g2 = np.asarray(process.g2(t))
    for probe, e in zip(("rademacher", "gaussian"), est):
        z = (e.residual - exact.residual) / e.se
        assert np.all(np.abs(z) <= 3.0), (probe, z)
        np.testing.assert_allclose(e.time, exact.time, rtol=1e-12)
        np.testing.assert_allclose(e.drift, exact.drift, rtol=1e-12)
        # SE^2 estimates Var(v^T H v) (g^2/2)^2 / K. The sample variance of K draws of
        # v^T H v (excess kurtosis up to 12 for a rank-one H and Gaussian probes) has relative
        # SE up to sqrt(2/(K-1) + 12/K) = 0.47; their mean over 8 examples up to 0.17.
        var = np.array([_hutchinson_variance(np.asarray(h), probe) for h in hess])
        ratio = np.asarray(e.se) ** 2 / (var * (0.5 * g2) ** 2 / k)
        assert abs(np.mean(ratio) - 1.0) < 0.5, (probe, ratio)


def test_hutchinson_score_residual_within_3_se():
    process = PROCESSES["ve"]
    x, t = _points(process, 3, n=5)
    mix = _mixture(3)
    score = lambda y, s: mix.score(process, y, s)

    @jax.jit
    def estimates(x, t):
        return (fp.score_residual(score, process, x, t),
                fp.score_residual(score, process, x, t, estimator="hutchinson",
                                  key=jax.random.key(5), num_probes=48))

    exact, est = estimates(x, t)
    assert est.residual.shape == est.se.shape == (5, 3)
    z = (est.residual - exact.residual) / est.se
    assert np.all(np.isfinite(z)) and np.all(np.abs(z) <= 3.0), z
    assert np.max(np.asarray(est.se)) > 0
    np.testing.assert_allclose(est.time, exact.time, rtol=1e-12)


def test_divergence_and_laplacian():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(4, 4)))
    x = jnp.asarray(rng.normal(size=(7, 4)))
    fn = lambda y: y @ a.T
    k = 400

    @jax.jit
    def divs(x):
        return (fp.divergence(fn, x),
                fp.divergence(fn, x, estimator="hutchinson", key=jax.random.key(1),
                              num_probes=k, probe="gaussian"))

    (div, se), (div_h, se_h) = divs(x)
    np.testing.assert_allclose(div, np.trace(a), rtol=1e-12)
    np.testing.assert_array_equal(se, 0.0)
    sd = math.sqrt(_hutchinson_variance(np.asarray(a), "gaussian") / k)
    np.testing.assert_allclose(se_h, sd, rtol=0.25)
    assert np.all(np.abs(div_h - np.trace(a)) <= 3 * se_h)
    # One probe: an unbiased estimate with an unknown SE (reported as inf, never NaN).
    _, se1 = fp.divergence(fn, x, estimator="hutchinson", key=jax.random.key(1), num_probes=1)
    assert np.all(np.isinf(se1))

    phi = lambda z: -0.5 * jnp.sum(z**2 * jnp.arange(1.0, 5.0)[None, :], -1) + jnp.sum(
        jnp.sin(z), -1)
    lap = jax.jit(lambda y: fp.laplacian(phi, y)[0])(x)
    np.testing.assert_allclose(lap, -10.0 - jnp.sum(jnp.sin(x), -1), rtol=1e-12)


def test_residual_jit_over_process_parameters_and_scalar_time():
    # The process is a pytree argument: a new parameter value reuses the compiled function.
    dist = _gaussian(2)
    x, _ = _points(PROCESSES["vp"], 2)
    traces = []

    @jax.jit
    def res(process, x, t):
        traces.append(1)
        return fp.log_density_residual(lambda y, s: dist.log_prob(process, y, s), process, x,
                                       t).residual

    for beta_max in (20.0, 10.0):
        r = res(jaxdiff.VPProcess(beta_max=beta_max), x, 0.4)  # scalar t broadcasts
        assert r.shape == (6,)
        np.testing.assert_allclose(r, 0.0, atol=1e-9)
    assert len(traces) == 1


def test_bad_inputs_are_refused():
    process = PROCESSES["ou"]
    dist = _gaussian(2)
    logp = lambda y, s: dist.log_prob(process, y, s)
    score = lambda y, s: dist.score(process, y, s)
    x, t = _points(process, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        fp.log_density_residual(logp, process, x[0], t)
    with pytest.raises(ValueError, match="t must have shape"):
        fp.log_density_residual(logp, process, x, t[:3])
    with pytest.raises(ValueError, match="estimator"):
        fp.log_density_residual(logp, process, x, t, estimator="hutch")
    with pytest.raises(ValueError, match="probe"):
        fp.score_residual(score, process, x, t, estimator="hutchinson", key=jax.random.key(0),
                          probe="sphere")
    with pytest.raises(ValueError, match="num_probes"):
        fp.log_density_residual(logp, process, x, t, estimator="hutchinson",
                                key=jax.random.key(0), num_probes=0)
    with pytest.raises(TypeError, match="num_probes"):
        fp.divergence(lambda y: y, x, estimator="hutchinson", key=jax.random.key(0),
                      num_probes=2.0)
    with pytest.raises(ValueError, match="needs a key"):
        fp.laplacian(lambda y: jnp.sum(y, -1), x, estimator="hutchinson")
    with pytest.raises(TypeError, match="typed PRNG key"):
        fp.divergence(lambda y: y, x, estimator="hutchinson", key=np.uint32(0))
    with pytest.raises(ValueError, match="must lie in"):
        fp.log_density_residual(logp, process, x, 20.0)
    with pytest.raises(ValueError, match=r"log_density\(x, t\) must return shape"):
        fp.log_density_residual(score, process, x, t)
    with pytest.raises(ValueError, match=r"score\(x, t\) must return shape"):
        fp.score_residual(logp, process, x, t)
    with pytest.raises(TypeError, match="floating"):
        fp.divergence(lambda y: y, jnp.ones((3, 2), jnp.int32))
    x0 = jnp.ones((4, 2))
    phi = lambda y, s, c: logp(y, s)
    with pytest.raises(ValueError, match="collocation"):
        fp.fp_regularized_loss(jax.random.key(0), phi, process, x0, collocation="grid")
    with pytest.raises(ValueError, match="box"):
        fp.fp_regularized_loss(jax.random.key(0), phi, process, x0, box=(1.0, -1.0))
    with pytest.raises(ValueError, match="residual_weight"):
        fp.fp_regularized_loss(jax.random.key(0), phi, process, x0, residual_weight=-1.0)
    with pytest.raises(ValueError, match="num_collocation"):
        fp.fp_regularized_loss(jax.random.key(0), phi, process, x0, num_collocation=0)
    with pytest.raises(ValueError, match="bins"):
        fp.histogram(np.zeros((3, 2)), bins=0)
    with pytest.raises(ValueError, match="no point"):
        fp.histogram(np.full((3, 2), 9.0))
    with pytest.raises(ValueError, match="etas"):
        fp.lambda_family(jax.random.key(0), dist.denoiser(process), process, x,
                         jnp.array([1.0, 0.5]), [-1.0])


def _isotropic_log_density(process, var):
    """Exact log p_t of N(0, var I) data: N(0, (alpha^2 var + sigma^2) I)."""

    def logp(y, s, cond=None):
        v = process.alpha(s) ** 2 * var + process.sigma(s) ** 2
        return -0.5 * jnp.sum(y**2, -1) / v - 0.5 * y.shape[1] * jnp.log(2 * jnp.pi * v)

    return logp


def test_fp_regularized_loss_terms():
    process = PROCESSES["ou"]
    x0 = 1.5 * jax.random.normal(jax.random.key(0), (64, 2))
    exact = _isotropic_log_density(process, 2.25)
    wrong = lambda y, s, c=None: exact(y, s) + 0.3 * jnp.sin(y[:, 0] + s)
    key = jax.random.key(2)
    loss = lambda f, w, **kw: fp.fp_regularized_loss(key, f, process, x0, residual_weight=w,
                                                     num_collocation=128, **kw)

    @jax.jit
    def everything(w):
        return (loss(exact, 10.0), loss(wrong, 0.0), loss(wrong, w, collocation="marginal"),
                jax.grad(lambda v: loss(wrong, v, collocation="marginal")[0])(w),
                loss(wrong, 1.0, estimator="hutchinson", num_probes=2))

    (le, ae), (l0, a0), (l1, a1), g1, (lh, ah) = everything(1.0)
    # The exact log-density has no residual: the loss is the (D x) denoising term.
    assert float(ae["residual_sq"]) < 1e-16
    np.testing.assert_allclose(le, ae["denoising"], rtol=1e-12)
    np.testing.assert_allclose(ae["denoising"], 2 * jnp.mean(ae["per_example"]), rtol=1e-12)
    # Unit score-space weight: the eps-space weight of the OU process is 1/sigma^2.
    np.testing.assert_allclose(ae["weight"], 1.0 / process.sigma(ae["t"]) ** 2, rtol=1e-10)
    np.testing.assert_allclose(fp.score_weighting(process, ae["t"]),
                               process.alpha(ae["t"]) ** 2 / process.sigma(ae["t"]) ** 4,
                               rtol=1e-10)
    # A concrete zero weight skips the residual; a traced weight multiplies mean R^2.
    np.testing.assert_allclose(a0["denoising"], a1["denoising"], rtol=1e-12)
    assert float(a0["residual_sq"]) == 0.0 and float(a1["residual_sq"]) > 1e-3
    np.testing.assert_allclose(l1, a1["denoising"] + a1["residual_sq"], rtol=1e-12)
    np.testing.assert_allclose(g1, a1["residual_sq"], rtol=1e-10)
    # Box collocation (default) draws other points; Hutchinson squares an unbiased estimate.
    assert float(ah["residual_sq"]) > 0 and float(ah["residual_sq"]) != float(a1["residual_sq"])


def test_potential_fn_is_the_networks_potential():
    from flax import nnx

    from jaxdiff import nets, training

    process = PROCESSES["ou"]
    net = nets.PotentialMLP(dim=2, hidden=16, depth=1, emb_dim=8, param_dtype="float64",
                            rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    potential = training.make_potential_fn(graphdef, process)
    x = jnp.ones((3, 2))
    t = jnp.full((3,), 0.5)
    c = nets.noise_conditioning(process, t, x)
    phi = jax.jit(potential)(params, x, t)
    np.testing.assert_allclose(phi, nnx.jit(lambda m, y, c: m.potential(y, c))(net, x, c),
                               rtol=1e-12)
    with pytest.raises(TypeError, match="GraphDef"):
        training.make_potential_fn(params, process)


@pytest.mark.slow
def test_potential_network_train_step():
    from flax import nnx

    from jaxdiff import nets, training

    process = PROCESSES["ou"]
    net = nets.PotentialMLP(dim=2, hidden=16, depth=1, emb_dim=8, param_dtype="float64",
                            rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    params = nnx.to_pure_dict(params)
    potential = training.make_potential_fn(graphdef, process)
    loss_fn = training.fokker_planck_loss_fn(potential, process, residual_weight=1.0,
                                             num_collocation=32)
    opt = training.make_optimizer(1e-3)[0]
    state = training.create_train_state(jax.random.key(0), params, opt)
    step = training.make_train_step(loss_fn, opt, microbatches=2)
    batch = {"x": jax.random.normal(jax.random.key(1), (16, 2))}
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 0


def test_histogram_w2_exact_on_grid_points():
    width = 8.0 / 64
    centre = -4.0 + width * (np.arange(64) + 0.5)
    x = np.stack([np.full(100, centre[10]), np.full(100, centre[20])], axis=1)
    y = x + np.array([3 * width, 0.0])
    np.testing.assert_allclose(fp.histogram_w2(x, y), (3 * width) ** 2, rtol=1e-12)
    np.testing.assert_allclose(fp.histogram_w2(x, y, squared=False), 3 * width, rtol=1e-12)
    # Half the mass at distance 2 bins, half at 0: W2^2 = (2 w)^2 / 2. Points outside are dropped.
    z = np.concatenate([x[:50], x[50:] + np.array([0.0, 2 * width]), np.full((7, 2), 5.0)])
    np.testing.assert_allclose(fp.histogram_w2(x, z), 0.5 * (2 * width) ** 2, rtol=1e-12)
    w, c = fp.histogram(z)
    np.testing.assert_allclose(w.sum(), 1.0)
    assert c.shape == (2, 2)


def test_lambda_family_shares_draws():
    process = PROCESSES["ou"]
    from jaxdiff import samplers

    dist = _gaussian(2)
    denoiser = dist.denoiser(process)
    ts = jaxdiff.timesteps.uniform_log_snr(process, 10)
    key = jax.random.key(0)
    x_init = process.sample_prior(jax.random.key(1), (32, 2), jnp.float64)

    @jax.jit
    def both(x_init):
        family = fp.lambda_family(key, denoiser, process, x_init, ts, [0.0, 0.5, 1.0])
        direct = [samplers.pf_euler(key, denoiser, process, x_init, ts)] + [
            samplers.euler_maruyama(key, denoiser, process, x_init, ts, eta=eta)
            for eta in (0.5, 1.0)]
        return family, direct

    family, direct = both(x_init)
    for a, b in zip(family, direct):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not np.allclose(family[0], family[2])


def test_bootstrap_paired_and_independent():
    rng = np.random.default_rng(0)
    n = 400
    a = rng.normal(size=n)
    b = a + 0.1 * rng.normal(size=n)  # strongly correlated with a
    diff = lambda u, v: np.mean(u) - np.mean(v)
    paired = metrics.bootstrap(np.random.default_rng(1), diff, [(a, b)], num_boot=400)
    indep = metrics.bootstrap(np.random.default_rng(1), diff, [(a,), (b,)], num_boot=400)
    # Bootstrap SDs have relative SE ~ 1/sqrt(2 * 400) = 3.5%; compare within 15%.
    np.testing.assert_allclose(paired["se"], np.std(a - b, ddof=1) / math.sqrt(n), rtol=0.15)
    np.testing.assert_allclose(indep["se"], math.sqrt(np.var(a) + np.var(b)) / math.sqrt(n),
                               rtol=0.15)
    assert paired["ci_basic"].shape == (2,)
    lo, hi = paired["ci_basic"]
    assert lo < paired["value"] < hi
    multi = metrics.bootstrap(rng, lambda u: np.array([u.mean(), u.std()]), [(a,)], num_boot=5)
    assert multi["replicates"].shape == (5, 2) and multi["ci_percentile"].shape == (2, 2)
    with pytest.raises(ValueError, match="num_boot"):
        metrics.bootstrap(rng, diff, [(a, b)], num_boot=1)
    with pytest.raises(ValueError, match="leading length"):
        metrics.bootstrap(rng, diff, [(a, b[:10])])
    with pytest.raises(ValueError, match="level"):
        metrics.bootstrap(rng, diff, [(a, b)], level=1.5)
