"""SDEdit and RePaint against closed forms for a Gaussian prior (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import metrics
from jaxdiff.analytic import Gaussian
from jaxdiff.guidance.editing import repaint, repaint_schedule, sdedit

MEAN = np.array([0.5, -0.3, 0.2, 0.0])
COV = np.array([
    [1.0, 0.9, 0.8, 0.3],
    [0.9, 1.0, 0.7, 0.6],
    [0.8, 0.7, 1.0, 0.5],
    [0.3, 0.6, 0.5, 1.0],
])
KNOWN, UNKNOWN = [0, 1], [2, 3]


def _gaussian():
    return Gaussian.from_cov(jnp.asarray(MEAN), jnp.asarray(COV))


def _counting(denoiser, counter):
    """The same denoiser, counting its evaluations on the host (skipped branches do not run)."""

    def bump(x):
        counter[0] += 1

    def counted(x, t, cond=None):
        jax.debug.callback(bump, t[0])
        return denoiser(x, t, cond)

    return counted


# -- SDEdit -------------------------------------------------------------------------------------


def test_sdedit_equals_the_closed_form_flow_of_the_noised_reference():
    g, process = _gaussian(), jaxdiff.VPProcess()
    level = 2.0

    @jax.jit  # the closed form and both solves in one program
    def errors(key_ref, key_eps):
        x_ref = g.sample(key_ref, 16)
        eps = jax.random.normal(key_eps, x_ref.shape, jnp.float64)
        t0 = process.t_from_noise_level(level)
        x_t = process.alpha(t0) * x_ref + process.sigma(t0) * eps
        exact = g.flow(process, x_t, t0, process.t_min)

        def err(method, steps):
            x = sdedit(jax.random.key(2), g.denoiser(process), process, x_ref,
                       noise_level=level, steps=steps, method=method, final_zero=False,
                       edit_noise=eps)
            return jnp.max(jnp.abs(x - exact))

        return err("dpm_solver_pp", 20), err("dpm_solver_pp", 40), jnp.max(jnp.abs(exact - x_t))

    e20, e40, moved = map(float, errors(jax.random.key(0), jax.random.key(1)))
    # Converges to the closed form at the solver's order (DPM-Solver++ 2M: 2, with its
    # first-order warm-up and final steps). Measured: 0.023 and 0.0057 at 20 and 40 steps.
    assert 3.3 < e20 / e40 < 4.8 and e40 < 0.01, (e20, e40)
    # The map really moves the state (the comparison is not trivially satisfied).
    assert moved > 0.5


def test_sdedit_default_noise_is_per_example_from_sample_marginal():
    g, process = _gaussian(), jaxdiff.VPProcess()
    x_ref = g.sample(jax.random.key(0), 6)
    level = 1.5
    t0 = process.t_from_noise_level(level)

    @jax.jit
    def run(key, x, index):
        kw = dict(noise_level=level, steps=8, method="ddim")
        default = sdedit(key, g.denoiser(process), process, x, example_index=index, **kw)
        # The documented stream: fold_in(split(key)[0], i), one sample_marginal per example.
        noise_key = jax.random.split(key)[0]
        eps = jax.vmap(lambda i: process.sample_marginal(
            jax.random.fold_in(noise_key, i), jnp.zeros((1, 4)), t0)[1][0])(index)
        explicit = sdedit(key, g.denoiser(process), process, x, edit_noise=eps, **kw)
        return default, explicit

    key = jax.random.key(3)
    full, explicit = run(key, x_ref, jnp.arange(6))
    np.testing.assert_allclose(explicit, full, rtol=1e-12, atol=1e-12)
    # A sample depends on its own index only: permuting the batch permutes the samples.
    perm = jnp.array([4, 0, 5, 2, 1, 3])
    permuted, _ = run(key, x_ref[perm], perm)
    np.testing.assert_array_equal(permuted, full[perm])
    assert float(jnp.max(jnp.abs(full - x_ref))) > 0.1


def test_sdedit_from_t_max_samples_the_prior():
    # EDM: x_T = x_ref + 80 eps, so a far reference (3, 3, 3, 3) still leaves a trace of
    # order 3 / 80 * sqrt(cov) in the output. The exact SDEdit output is Gaussian (the flow is
    # affine): mean flow(x_ref), covariance 80^2 J J^T with J the flow's Jacobian.
    g, process = _gaussian(), jaxdiff.EDMProcess()
    n, t_max = 4000, float(process.t_max)
    x_ref = jnp.full((n, 4), 3.0)

    @jax.jit
    def run(x_ref):
        x = sdedit(jax.random.key(4), g.denoiser(process), process, x_ref,
                   noise_level=t_max, steps=30, method="dpm_solver_pp", grid="karras")
        flow = lambda y: g.flow(process, y[None], t_max, 0.0)[0]  # noqa: E731
        return metrics.moments(x), flow(x_ref[0]), jax.jacfwd(flow)(x_ref[0])

    (mean, cov), exact_mean, jac = run(x_ref)
    exact_mean, jac = np.asarray(exact_mean), np.asarray(jac)
    exact_cov = t_max**2 * jac @ jac.T
    # Within a few percent of the prior's moments; the sample moments within 4 SE of them.
    assert np.max(np.abs(exact_mean - MEAN)) < 0.15 and np.max(np.abs(exact_cov - COV)) < 0.01
    se_mean = np.sqrt(np.diag(exact_cov) / n)
    assert np.all(np.abs(np.asarray(mean) - exact_mean) < 4 * se_mean), (mean, exact_mean)
    # SE of a sample covariance: sqrt((c_ii c_jj + c_ij^2) / n).
    se_cov = np.sqrt((np.outer(np.diag(exact_cov), np.diag(exact_cov)) + exact_cov**2) / n)
    assert np.all(np.abs(np.asarray(cov) - exact_cov) < 4 * se_cov), (cov, exact_cov)


def test_sdedit_moves_further_from_the_reference_as_the_noise_level_grows():
    g, process = _gaussian(), jaxdiff.VPProcess()
    n = 1000
    x_ref = g.sample(jax.random.key(5), n)
    levels = jnp.array([0.05, 0.2, 0.8, 3.2, 12.8])

    @jax.jit  # x_ref as an argument: a closed-over array would be constant-folded
    def distances(levels, x_ref):
        def one(level):  # a traced level: the grid is built with jnp, one compilation
            x = sdedit(jax.random.key(6), g.denoiser(process), process, x_ref,
                       noise_level=level, steps=10)
            return jnp.linalg.norm(x - x_ref, axis=1)

        return jax.vmap(one)(levels)

    dist = np.asarray(distances(levels, x_ref))
    # Same key: the same forward noise at every level, so paired differences.
    diffs = np.diff(dist, axis=0)
    se = diffs.std(axis=1, ddof=1) / np.sqrt(n)
    assert np.all(diffs.mean(axis=1) > 3 * se), (dist.mean(axis=1), se)


def test_sdedit_rejects_bad_input():
    g, process = _gaussian(), jaxdiff.VPProcess()
    x = jnp.zeros((3, 4))
    den = g.denoiser(process)
    key = jax.random.key(0)
    lo = float(process.noise_level(process.t_min))
    hi = float(process.noise_level(process.t_max))
    with pytest.raises(ValueError, match="exactly one"):
        sdedit(key, den, process, x, steps=5)
    with pytest.raises(ValueError, match="exactly one"):
        sdedit(key, den, process, x, noise_level=1.0, t_edit=0.5, steps=5)
    for bad in (lo / 2, 0.0, -1.0, 2 * hi, float("nan")):
        with pytest.raises(ValueError, match="noise_level"):
            sdedit(key, den, process, x, noise_level=bad, steps=5)
    for bad in (process.t_min, 1.5, 0.0):
        with pytest.raises(ValueError, match="t_edit"):
            sdedit(key, den, process, x, t_edit=bad, steps=5)
    with pytest.raises(ValueError, match="grid"):
        sdedit(key, den, process, x, noise_level=1.0, steps=5, grid="ddpm")
    with pytest.raises(ValueError, match="method"):
        sdedit(key, den, process, x, noise_level=1.0, steps=5, method="nope")
    with pytest.raises(ValueError, match="steps"):
        sdedit(key, den, process, x, noise_level=1.0, steps=1)
    with pytest.raises(TypeError, match="x_ref"):
        sdedit(key, den, process, jnp.zeros((3, 4), jnp.int32), noise_level=1.0, steps=5)
    with pytest.raises(ValueError, match="edit_noise"):
        sdedit(key, den, process, x, noise_level=1.0, steps=5, edit_noise=jnp.zeros((3, 2)))
    with pytest.raises(TypeError, match="denoiser"):
        sdedit(key, None, process, x, noise_level=1.0, steps=5)


# -- RePaint ------------------------------------------------------------------------------------


def test_repaint_schedule():
    np.testing.assert_array_equal(repaint_schedule(7, 3, 1), np.arange(8))
    assert repaint_schedule(4, 1, 2).tolist() == [0, 1, 0, 1, 2, 1, 2, 3, 2, 3, 4]
    n, j, r = 250, 10, 10
    walk = repaint_schedule(n, j, r)
    steps = np.diff(walk)
    assert walk[0] == 0 and walk[-1] == n and walk.min() == 0 and walk.max() == n
    assert set(np.unique(steps).tolist()) == {-1, 1}
    num_jumps = len(range(0, n - j, j))  # the reference's jump points t = 0, j, ... < T - j
    assert np.sum(steps == 1) == n + num_jumps * (r - 1) * j
    assert np.sum(steps == -1) == num_jumps * (r - 1) * j
    # Each jump starts at level 1 + m j (index n - 1 - m j), r - 1 times, and is j steps long.
    starts = [i for i in range(1, len(steps)) if steps[i] == -1 and steps[i - 1] == 1]
    levels = n - walk[starts]
    expected = sorted(1 + m * j for m in range(num_jumps) for _ in range(r - 1))
    assert sorted(levels.tolist()) == expected
    with pytest.raises(ValueError, match="jump_length"):
        repaint_schedule(10, 0, 2)
    with pytest.raises(TypeError, match="jump_n_sample"):
        repaint_schedule(10, 2, 2.0)


def _exact_conditional(x_known):
    s_uk = COV[np.ix_(UNKNOWN, KNOWN)]
    s_kk = COV[np.ix_(KNOWN, KNOWN)]
    mean = MEAN[UNKNOWN] + s_uk @ np.linalg.solve(s_kk, x_known[KNOWN] - MEAN[KNOWN])
    cov = COV[np.ix_(UNKNOWN, UNKNOWN)] - s_uk @ np.linalg.solve(s_kk, s_uk.T)
    return mean, cov


def _w2_and_se(samples, mean, cov, key):
    """Gaussian W2 from the sample moments to N(mean, cov), and its bootstrap SE (200 draws)."""

    def w2(x):
        m, c = metrics.moments(x)
        return metrics.gaussian_w2(m, c, mean, cov)

    n = samples.shape[0]
    idx = jax.random.randint(key, (200, n), 0, n)
    return w2(samples), jnp.std(jax.vmap(lambda i: w2(samples[i]))(idx), ddof=1)


def test_repaint_moves_towards_the_exact_conditional_with_resampling():
    g, process = _gaussian(), jaxdiff.VPProcess()
    n = 2000
    x_val = np.array([2.0, 1.0, 0.0, 0.0])
    x_known = jnp.tile(jnp.asarray(x_val), (n, 1))
    mask = jnp.asarray([1.0, 1.0, 0.0, 0.0])
    ts = jaxdiff.timesteps.uniform_t(process, 20, final_zero=True)
    cmean, ccov = map(jnp.asarray, _exact_conditional(x_val))

    @jax.jit
    def run(key, x_known, cmean, ccov):
        def paint(xk, r):
            return repaint(key, g.denoiser(process), process, xk, mask, ts, jump_length=1,
                           jump_n_sample=r)

        # The unknown coordinates of x_known are never read: change them in a second copy.
        other = x_known.at[:, UNKNOWN].set(-7.0)
        x1, (x10, x10_other) = paint(x_known, 1), jax.vmap(paint, in_axes=(0, None))(
            jnp.stack([x_known, other]), 10)
        stats = jax.vmap(_w2_and_se, in_axes=(0, None, None, None))(
            jnp.stack([x1[:, UNKNOWN], x10[:, UNKNOWN]]), cmean, ccov, jax.random.key(8))
        return x1, x10, x10_other, stats

    x1, x10, x10_other, stats = run(jax.random.key(7), x_known, cmean, ccov)
    np.testing.assert_array_equal(x10_other, x10)
    for x in (x1, x10):  # the known coordinates are the reference's exactly (final 0)
        np.testing.assert_array_equal(x[:, KNOWN], x_known[:, KNOWN])
    (w1, w10), (se1, se10) = np.asarray(stats[0]), np.asarray(stats[1])
    results = dict(w2=(w1, w10), se=(se1, se10))
    # Measured: W2 0.52 (r = 1) -> 0.21 (r = 10), bootstrap SEs about 0.02.
    assert w1 - w10 > 3 * np.hypot(se1, se10), results


def test_repaint_is_batch_independent_and_skips_the_network_on_forward_steps():
    g, process = _gaussian(), jaxdiff.EDMProcess()
    x_known = g.sample(jax.random.key(9), 5)
    mask = jnp.asarray([[1.0, 0.0, 1.0, 0.0]])  # (1, D): broadcasts over the batch
    ts = jaxdiff.timesteps.karras(process, 12, final_zero=True)
    counter = [0]
    den = _counting(g.denoiser(process), counter)
    run = jax.jit(lambda x, index: repaint(jax.random.key(10), den, process, x, mask, ts,
                                           jump_length=3, jump_n_sample=4, example_index=index))
    full = run(x_known, jnp.arange(5))
    jax.effects_barrier()
    walk = repaint_schedule(12, 3, 4)
    assert counter[0] == int(np.sum(np.diff(walk) == 1)) == 12 + 3 * 3 * 3
    # A sample depends on its own index only: permuting the batch permutes the samples.
    perm = jnp.array([3, 0, 4, 1, 2])
    np.testing.assert_array_equal(run(x_known[perm], perm), full[perm])
    np.testing.assert_array_equal(full[:, 0], x_known[:, 0])
    assert np.all(np.isfinite(np.asarray(full)))
    assert float(jnp.max(jnp.abs(full[:, 1] - x_known[:, 1]))) > 0.1


def test_repaint_rejects_bad_input():
    g, process = _gaussian(), jaxdiff.VPProcess()
    x = jnp.zeros((3, 4))
    den = g.denoiser(process)
    key = jax.random.key(0)
    ts = jaxdiff.timesteps.uniform_t(process, 5, final_zero=True)
    for bad in (jnp.ones((3, 3)), jnp.ones((2, 4)), jnp.ones((3, 4, 1))):
        with pytest.raises(ValueError, match="mask"):
            repaint(key, den, process, x, bad, ts)
    with pytest.raises(ValueError, match="mask"):
        repaint(key, den, process, x, jnp.full((4,), 2.0), ts)
    with pytest.raises(ValueError, match="mask"):
        repaint(key, den, process, x, None, ts)
    with pytest.raises(ValueError, match="jump_length"):
        repaint(key, den, process, x, jnp.ones(4), ts, jump_length=0)
    with pytest.raises(TypeError, match="jump_n_sample"):
        repaint(key, den, process, x, jnp.ones(4), ts, jump_n_sample=1.5)
    with pytest.raises(ValueError, match="ts"):
        repaint(key, den, process, x, jnp.ones(4), ts[::-1])
    with pytest.raises(TypeError, match="x_known"):
        repaint(key, den, process, jnp.zeros((3, 4), jnp.int32), jnp.ones(4), ts)
    with pytest.raises(ValueError, match="x_known"):
        repaint(key, den, process, jnp.zeros(()), jnp.ones(()), ts)
