"""Loss guidance, DPS, self-recurrence and the Gaussian likelihood guide on linear inverse problems.

Ground truth: Gaussian data N(mu, Sigma) in D = 8 dimensions observed through a linear operator
with Gaussian noise, y = A x0 + s e, whose posterior is Gaussian in closed form
(``Gaussian.condition``). Two observations: (a) a mask observing 4 of the 8 coordinates
(s = 0.2), (b) average pooling of pairs (s = 0.3).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.analytic import Gaussian
from jaxdiff.guidance import operators
from jaxdiff.guidance.loss_guided import (
    dps,
    gaussian_likelihood_guidance,
    loss_guidance,
    measurement_loss,
    self_recurrence,
)
from jaxdiff.metrics import gaussian_w2, moments
from jaxdiff.predictions import convert
from jaxdiff.samplers import ddim, ddpm, dpm_solver_pp

D = 8
OBSERVED = np.array([0, 2, 5, 7])
MASK = np.isin(np.arange(D), OBSERVED).astype(np.float64)
POOL = np.kron(np.eye(D // 2), np.full((1, 2), 0.5))  # (4, 8): means of pairs


def _prior():
    rng = np.random.default_rng(0)
    root = rng.normal(size=(D, D))
    cov = root @ root.T / D + 0.3 * np.eye(D)
    return Gaussian.from_cov(rng.normal(size=D), cov)


def _observation(prior, matrix, noise_std, seed):
    """A measurement y = A x0 + s e of one draw x0 of the prior."""
    x0 = _gaussian_draws(prior, 1, seed)[0]
    return matrix @ x0 + noise_std * _normal((matrix.shape[0],), seed + 1)


@functools.cache
def _problems():
    """``{name: (matrix (4, D), y (4,), noise_std, posterior)}`` for the two observations."""
    prior = _prior()
    out = {}
    for name, matrix, noise_std, seed in (
        ("mask", np.eye(D)[OBSERVED], 0.2, 11),
        ("pool", POOL, 0.3, 12),
    ):
        matrix = jnp.asarray(matrix)
        y = _observation(prior, matrix, noise_std, seed)
        out[name] = (matrix, y, noise_std, prior.condition(matrix, y, noise_std))
    return prior, out


PROCESSES = {"vp": jaxdiff.VPProcess(), "edm": jaxdiff.EDMProcess()}


def _normal(shape, seed):
    """Test inputs from numpy (a jax.random draw compiles for every new shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _gaussian_draws(dist, num, seed):
    """``num`` exact draws of an analytic Gaussian, ``(num, D)``."""
    mean, cov = (np.asarray(a) for a in dist.moments())
    root = np.linalg.cholesky(cov)
    return jnp.asarray(mean + np.random.default_rng(seed).normal(size=(num, D)) @ root.T)


# ------------------------------------------------------------------------------------------------
# Operators
# ------------------------------------------------------------------------------------------------


def test_operators_match_numpy_and_are_linear_and_jittable():
    img = _normal((2, 6, 4, 3), 0)
    ref = np.asarray(img).reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(operators.super_resolution(2)(img), ref, rtol=1e-14)
    np.testing.assert_allclose(
        operators.colorization()(img), np.asarray(img).mean(-1, keepdims=True), rtol=1e-14
    )
    mask = (jnp.arange(24).reshape(6, 4, 1) % 3 == 0).astype(jnp.float64)
    np.testing.assert_array_equal(operators.inpainting(mask)(img), np.asarray(img) * mask[None])
    vec = _normal((5, D), 1)
    # Pooling pairs of a vector is the linear operator with the pooling matrix.
    np.testing.assert_allclose(
        operators.super_resolution(2)(vec), operators.linear(POOL)(vec), rtol=1e-14
    )
    np.testing.assert_allclose(operators.linear(POOL)(vec), np.asarray(vec) @ POOL.T, rtol=1e-14)
    a, b = img, jnp.flip(img, axis=0)
    for op in (operators.super_resolution(2), operators.colorization(), operators.inpainting(mask)):
        # Pytree operators go through jit as arguments; per-example vmap agrees with the batch.
        op_a, op_b, op_mix, op_vmap = _operator_checks(op, a, b)
        np.testing.assert_allclose(op_mix, 2.0 * op_a - 3.0 * op_b, atol=1e-13)
        np.testing.assert_allclose(op_vmap, op_a, rtol=1e-14)
        np.testing.assert_allclose(op_a, op(img), rtol=1e-14)
        assert op.check(img.shape) == op_a.shape


@jax.jit
def _operator_checks(op, a, b):
    return op(a), op(b), op(2.0 * a - 3.0 * b), jax.vmap(lambda z: op(z[None])[0])(a)


@pytest.mark.parametrize(
    "op, shape, message",
    [
        (operators.super_resolution(2), (2, 5, 4, 3), "super_resolution\\(2\\).*divisible"),
        (operators.super_resolution(3), (2, 8), "super_resolution\\(3\\)"),
        (operators.super_resolution(2), (2, 4, 4), "super_resolution\\(2\\)"),
        (operators.colorization(), (2, 8), "colorization.*\\(B, H, W, C\\)"),
        (operators.inpainting(jnp.ones((4, 4, 1))), (2, 5, 4, 3), "inpainting.*\\(4, 4, 1\\)"),
        (operators.linear(POOL), (2, 6), "linear.*\\(B, 8\\)"),
    ],
)
def test_operator_shape_errors_name_the_operator_and_the_shape(op, shape, message):
    with pytest.raises(ValueError, match=message):
        op.check(shape)
    with pytest.raises(ValueError, match=message):
        op(jnp.zeros(shape))


def test_operator_constructors_validate():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="factor"):
            operators.super_resolution(bad)
    with pytest.raises(ValueError, match="matrix"):
        operators.linear(jnp.ones(3))
    with pytest.raises(ValueError, match="finite"):
        operators.inpainting(jnp.array([1.0, jnp.nan]))


# ------------------------------------------------------------------------------------------------
# analytic.Gaussian.condition and x0_covariance
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mask", "pool"])
def test_condition_matches_the_textbook_posterior(name):
    prior, problems = _problems()
    matrix, y, noise_std, post = problems[name]
    mu, cov = (np.asarray(a) for a in prior.moments())
    a, y = np.asarray(matrix), np.asarray(y)
    s = a @ cov @ a.T + noise_std**2 * np.eye(a.shape[0])
    gain = np.linalg.solve(s, a @ cov).T
    mean_ref = mu + gain @ (y - a @ mu)
    cov_ref = cov - gain @ a @ cov
    mean, cov_post = post.moments()
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov_post, cov_ref, rtol=1e-12, atol=1e-12)
    # Conditioning shrinks the variance of the observed directions a lot: the check is not vacuous.
    assert np.trace(a @ cov_ref @ a.T) < 0.5 * np.trace(a @ cov @ a.T)


def test_condition_keeps_a_low_rank_prior_on_its_subspace_and_validates():
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(D, 3)))
    prior = Gaussian.low_rank(jnp.zeros(D), basis, jnp.array([2.0, 1.0, 0.5]))
    a = np.eye(D)[:2]
    y = np.array([0.3, -0.2])
    post = prior.condition(a, y, 0.1)
    assert post.rank == 3
    cov = np.asarray(prior.moments()[1])
    s = a @ cov @ a.T + 0.01 * np.eye(2)
    gain = np.linalg.solve(s, a @ cov).T
    np.testing.assert_allclose(post.moments()[0], gain @ y, atol=1e-12)
    np.testing.assert_allclose(post.moments()[1], cov - gain @ a @ cov, atol=1e-12)
    with pytest.raises(ValueError, match="matrix must have shape"):
        prior.condition(np.eye(3), np.zeros(3), 0.1)
    with pytest.raises(ValueError, match="y must have shape"):
        prior.condition(a, np.zeros(3), 0.1)
    with pytest.raises(ValueError, match="noise_std"):
        prior.condition(a, y, 0.0)


@pytest.mark.parametrize("process", PROCESSES.values(), ids=PROCESSES.keys())
def test_x0_covariance_is_the_posterior_covariance_and_the_scaled_jacobian(process):
    prior, _ = _problems()
    _, cov = prior.moments()
    ts = jnp.array([0.01, 0.3, 0.9]) * (process.t_max if process.t_max > 1 else 1.0)
    out = prior.x0_covariance(process, ts)
    assert out.shape == (3, D, D)
    x = _normal((D,), 1)
    jacobian = jax.jacfwd(_denoise_one, argnums=2)
    jacobians = jax.jit(jax.vmap(jacobian, in_axes=(None, None, None, 0)))(prior, process, x, ts)
    alphas, sigmas = np.asarray(process.alpha(ts)), np.asarray(process.sigma(ts))
    for c, jac, alpha, sigma in zip(out, jacobians, alphas, sigmas):
        ref = np.linalg.inv(np.linalg.inv(cov) + alpha**2 / sigma**2 * np.eye(D))
        np.testing.assert_allclose(c, ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sigma**2 / alpha * jac, c, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(prior.x0_covariance(process, ts[1]), out[1], rtol=1e-13, atol=1e-16)


def _denoise_one(dist, process, x, t):
    return dist.denoise(process, x[None], t)[0]


# ------------------------------------------------------------------------------------------------
# Deterministic identities of the guided denoisers
# ------------------------------------------------------------------------------------------------


def _x0_cov(prior, process):
    return jax.tree_util.Partial(Gaussian.x0_covariance, prior, process)


@jax.jit
def _evaluate_at_times(denoisers, x, ts):
    """Each denoiser (a pytree) at each time: ``(len(denoisers), len(ts), *x.shape)``."""
    def at(t):
        tb = jnp.full((x.shape[0],), t)
        return jnp.stack([d(x, tb) for d in denoisers])

    return jnp.moveaxis(jax.lax.map(at, ts), 0, 1)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("mask", "vp"),
        ("pool", "edm"),
        pytest.param("mask", "edm", marks=pytest.mark.slow),
        pytest.param("pool", "vp", marks=pytest.mark.slow),
    ],
)
def test_gaussian_likelihood_guidance_is_the_exact_posterior_denoiser(name, kind):
    process = PROCESSES[kind]
    prior, problems = _problems()
    matrix, y, noise_std, post = problems[name]
    b = 6
    x = 2.0 * _normal((b, D), 2)
    guided = gaussian_likelihood_guidance(
        prior.denoiser(process), process, matrix, y, noise_std, x0_cov=_x0_cov(prior, process)
    )
    # The same measurement through the batch-first operator (matrix built from the operator).
    op = operators.linear(matrix) if name == "pool" else operators.inpainting(MASK)
    y_op = y if name == "pool" else jnp.zeros(D).at[OBSERVED].set(y)
    via_op = gaussian_likelihood_guidance(
        prior.denoiser(process), process, op, y_op, noise_std, x0_cov=_x0_cov(prior, process)
    )
    t = float(process.t_max) * jnp.array([0.001, 0.02, 0.3, 1.0])
    denoisers = (guided, via_op, post.denoiser(process), prior.denoiser(process))
    out = _evaluate_at_times(denoisers, x, t)
    for got in out[:2]:
        np.testing.assert_allclose(got, out[2], rtol=1e-10, atol=1e-10)
    # Unguided differs from the posterior: the comparison can fail.
    assert float(jnp.max(jnp.abs(out[3] - out[2]))) > 0.1


def test_pigdm_is_exact_for_unit_isotropic_data():
    # C_t = sigma^2 / (alpha^2 + sigma^2) I is the true posterior covariance when Sigma = I.
    process = PROCESSES["vp"]
    prior = Gaussian.isotropic(jnp.linspace(-1.0, 1.0, D), 1.0)
    matrix, y = jnp.asarray(POOL), jnp.array([0.5, -1.0, 0.2, 1.5])
    post = prior.condition(matrix, y, 0.2)
    guided = gaussian_likelihood_guidance(
        prior.denoiser(process), process, matrix, y, 0.2, x0_cov="pigdm"
    )
    x = _normal((4, D), 3)
    ts = jnp.array([0.05, 0.5, 0.9])
    got, exact = _evaluate_at_times((guided, post.denoiser(process)), x, ts)
    np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-12)


def _denoiser_and_loss():
    prior, problems = _problems()
    matrix, y, noise_std, _ = problems["mask"]
    process = PROCESSES["vp"]
    loss = measurement_loss(operators.linear(matrix), y, kind="squared", noise_std=noise_std)
    return prior, process, loss


def test_loss_guidance_adds_scale_times_minus_grad_loss_in_score_space():
    prior, process, loss = _denoiser_and_loss()
    denoiser = prior.denoiser(process)
    b = 5
    x = _normal((b, D), 4)
    t = jnp.linspace(0.05, 0.9, b)
    scale = jnp.array([0.0, 0.5, 1.0, 2.0, -1.5])

    @jax.jit  # one program for every quantity below (arrays as arguments)
    def quantities(x, t, scale):
        def total_loss(z):
            return jnp.sum(loss(prior.denoise(process, z, t)))

        plain = denoiser(x, t)
        guided = loss_guidance(denoiser, process, loss, scale)(x, t)
        score_gap = convert(guided, process, x, t, from_kind="x0", to_kind="score") - convert(
            plain, process, x, t, from_kind="x0", to_kind="score"
        )
        # Without the denoiser: g = -grad_{x0} loss at x0_hat.
        g0 = -jax.grad(lambda z: jnp.sum(loss(z)))(plain)
        steered = loss_guidance(denoiser, process, loss, scale, through_denoiser=False)(x, t)
        coef = (process.sigma(t) ** 2 / process.alpha(t))[:, None]
        return dict(g=-jax.grad(total_loss)(x), plain=plain, guided=guided,
                    score_gap=score_gap, g0=g0, steered=steered, coef=coef)

    q = {k: np.asarray(v) for k, v in quantities(x, t, scale).items()}
    g, plain, guided, steered = q["g"], q["plain"], q["guided"], q["steered"]
    s = np.asarray(scale)[:, None]
    np.testing.assert_allclose(q["score_gap"], s * g, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(guided[0], plain[0])  # scale 0 is the unguided denoiser
    assert np.max(np.abs(g)) > 1e-2
    np.testing.assert_allclose(steered, plain + q["coef"] * s * q["g0"], rtol=1e-12)
    assert np.max(np.abs(steered - guided)) > 1e-3  # the two approximations differ

    # A traced scale does not recompile.
    traces = []

    @jax.jit
    def run(s):
        traces.append(None)
        return loss_guidance(denoiser, process, loss, s)(x, t)

    run(1.0), run(2.0)
    assert len(traces) == 1


def test_steered_guidance_never_differentiates_the_denoiser():
    prior, process, loss = _denoiser_and_loss()

    @jax.custom_vjp
    def net(x, t):
        return prior.denoise(process, x, t)

    def fwd(x, t):
        return net(x, t), None

    def bwd(res, ct):
        raise RuntimeError("the denoiser was differentiated")

    net.defvjp(fwd, bwd)

    def denoiser(x, t, cond=None):
        return net(x, t)

    x, t = jnp.ones((3, D)), jnp.full((3,), 0.5)
    # Under jit: the backward rule runs (and raises) while tracing; one compilation in all.
    out = jax.jit(loss_guidance(denoiser, process, loss, 1.0, through_denoiser=False))(x, t)
    assert out.shape == (3, D) and np.all(np.isfinite(np.asarray(out)))
    with pytest.raises(RuntimeError, match="differentiated"):
        jax.jit(loss_guidance(denoiser, process, loss, 1.0))(x, t)


def test_measurement_losses():
    prior, problems = _problems()
    matrix, y, noise_std, _ = problems["pool"]
    op = operators.linear(matrix)
    x0 = _normal((3, D), 5)
    r = np.asarray(y)[None] - np.asarray(x0) @ np.asarray(matrix).T
    np.testing.assert_allclose(measurement_loss(op, y)(x0), np.linalg.norm(r, axis=1), rtol=1e-13)
    np.testing.assert_allclose(
        measurement_loss(op, y, kind="squared")(x0), np.sum(r**2, axis=1), rtol=1e-13
    )
    np.testing.assert_allclose(
        measurement_loss(op, y, kind="squared", noise_std=0.3)(x0),
        np.sum(r**2, axis=1) / (2 * 0.09),
        rtol=1e-13,
    )
    per_example = jnp.broadcast_to(y, (3, 4))
    np.testing.assert_allclose(measurement_loss(op, per_example)(x0), measurement_loss(op, y)(x0))
    # The norm has a zero (not nan) gradient where the residual vanishes.
    exact = jnp.asarray(np.linalg.lstsq(np.asarray(matrix), np.asarray(y), rcond=None)[0])[None]
    grad = jax.grad(lambda z: jnp.sum(measurement_loss(op, y)(z)))(exact)
    assert np.all(np.isfinite(grad))


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused():
    prior, process, loss = _denoiser_and_loss()
    den = prior.denoiser(process)
    x, t = jnp.ones((3, D)), jnp.full((3,), 0.5)
    ts = jaxdiff.timesteps.uniform_t(process, 4)
    op = operators.linear(POOL)
    for bad in (jnp.nan, jnp.inf, jnp.array([1.0, jnp.inf, 0.0])):
        with pytest.raises(ValueError, match="scale must be finite"):
            loss_guidance(den, process, loss, bad)
        with pytest.raises(ValueError, match="zeta must be finite"):
            dps(jax.random.key(0), den, process, x, ts, loss_fn=loss, zeta=bad)
        with pytest.raises(ValueError, match="scale must be finite"):
            gaussian_likelihood_guidance(den, process, POOL, jnp.zeros(4), 0.1, x0_cov="pigdm",
                                         scale=bad)
    with pytest.raises(ValueError, match="per-example losses of shape \\(B,\\)"):
        loss_guidance(den, process, lambda z: jnp.sum(z), 1.0)(x, t)
    with pytest.raises(ValueError, match="per-example losses"):
        loss_guidance(den, process, lambda z: z, 1.0)(x, t)
    with pytest.raises(ValueError, match="y must have the operator's output shape"):
        measurement_loss(op, jnp.zeros(5))(x)
    with pytest.raises(ValueError, match="linear: data must have shape"):
        measurement_loss(op, jnp.zeros(4))(jnp.ones((3, 6)))
    with pytest.raises(ValueError, match="kind"):
        measurement_loss(op, jnp.zeros(4), kind="l1")
    with pytest.raises(ValueError, match="noise_std"):
        measurement_loss(op, jnp.zeros(4), noise_std=0.1)
    with pytest.raises(ValueError, match="noise_std"):
        measurement_loss(op, jnp.zeros(4), kind="squared", noise_std=-1.0)
    with pytest.raises(ValueError, match="y must be finite"):
        measurement_loss(op, jnp.array([0.0, jnp.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="x0_cov"):
        gaussian_likelihood_guidance(den, process, POOL, jnp.zeros(4), 0.1, x0_cov="exact")
    with pytest.raises(ValueError, match="M = 4"):
        gaussian_likelihood_guidance(den, process, POOL, jnp.zeros(3), 0.1, x0_cov="pigdm")
    with pytest.raises(ValueError, match="x0_cov\\(t\\) must return"):
        gaussian_likelihood_guidance(
            den, process, POOL, jnp.zeros(4), 0.1, x0_cov=lambda t: jnp.eye(3)
        )(x, t)
    with pytest.raises(TypeError, match="through_denoiser"):
        loss_guidance(den, process, loss, 1.0, through_denoiser="yes")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="repeats"):
            self_recurrence(None, den, process, x, ts, repeats=bad)


# ------------------------------------------------------------------------------------------------
# Samplers: identities and noise streams
# ------------------------------------------------------------------------------------------------


@jax.jit
def _dps_jit(key, den, loss, process, x_init, ts, zeta, index):
    return dps(key, den, process, x_init, ts, loss_fn=loss, zeta=zeta, example_index=index)


@jax.jit
def _ddim_jit(key, den, process, x_init, ts, eta):
    return ddim(key, den, process, x_init, ts, eta=eta)


@functools.partial(jax.jit, static_argnames="repeats")
def _self_recurrence_jit(key, den, process, x_init, ts, eta, index, repeats):
    return self_recurrence(key, den, process, x_init, ts, repeats=repeats, eta=eta,
                           example_index=index)


def test_dps_with_zero_zeta_is_ancestral_ddpm_and_self_recurrence_of_one_is_ddim():
    prior, process, loss = _denoiser_and_loss()
    den = prior.denoiser(process)
    ts = jaxdiff.timesteps.uniform_t(process, 12)
    key = jax.random.key(7)
    b = 5
    x_init = _normal((b, D), 8)
    index, perm = jnp.arange(b), jnp.array([3, 1, 4, 0, 2])

    # Every sampler in one compiled program (each is its own scan); arrays enter as arguments.
    @jax.jit
    def run_all(key, x_init, ts, index, perm):
        def dps_run(x, zeta, idx):
            return dps(key, den, process, x, ts, loss_fn=loss, zeta=zeta, example_index=idx)

        # zeta = 0 and 0.1 (and the permuted batch) under one vmap: one DPS scan.
        zetas = jnp.array([0.0, 0.1, 0.1])
        runs = jax.vmap(dps_run)(jnp.stack([x_init, x_init, x_init[perm]]), zetas,
                                 jnp.stack([index, index, perm]))
        return dict(
            dps=runs,
            ddim1=ddim(key, den, process, x_init, ts, eta=1.0),
            ddpm=ddpm(key, den, process, x_init, ts),
            ddim_half=ddim(key, den, process, x_init, ts, eta=0.5),
            self_rec=self_recurrence(key, den, process, x_init, ts, repeats=1, eta=0.5,
                                     example_index=index),
        )

    r = run_all(key, x_init, ts, index, perm)
    out, guided, permuted = r["dps"]
    np.testing.assert_array_equal(out, r["ddim1"])
    # ddpm ("fixed_small") runs DDIM(1)'s step: the same sampler.
    np.testing.assert_array_equal(out, r["ddpm"])
    assert float(jnp.max(jnp.abs(guided - out))) > 1e-2
    # Per-example noise streams: permuted examples with their global indices give the same rows.
    np.testing.assert_allclose(permuted, guided[perm], rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(r["self_rec"], r["ddim_half"])


@pytest.mark.slow
def test_deterministic_self_recurrence_of_one_is_ddim_and_streams_follow_the_example_index():
    prior, process, _ = _denoiser_and_loss()
    den = prior.denoiser(process)
    ts = jaxdiff.timesteps.uniform_t(process, 12)
    key = jax.random.key(7)
    x_init = _normal((5, D), 8)
    index, perm = jnp.arange(5), jnp.array([3, 1, 4, 0, 2])
    np.testing.assert_array_equal(
        self_recurrence(None, den, process, x_init, ts, repeats=1),
        ddim(None, den, process, x_init, ts),
    )
    full = _self_recurrence_jit(key, den, process, x_init, ts, 0.5, index, repeats=3)
    permuted = _self_recurrence_jit(key, den, process, x_init[perm], ts, 0.5, perm, repeats=3)
    np.testing.assert_allclose(permuted, full[perm], rtol=1e-13, atol=1e-13)
    other = _self_recurrence_jit(jax.random.key(9), den, process, x_init, ts, 0.5, index,
                                 repeats=3)
    assert float(jnp.max(jnp.abs(other - full))) > 1e-2


def test_self_recurrence_against_an_explicit_loop():
    prior, process, _ = _denoiser_and_loss()
    den = prior.denoiser(process)
    ts = jnp.array([0.8, 0.5, 0.2, 0.0])  # ends with an exact 0
    b, repeats, eta = 3, 2, 0.7
    x_init = _normal((b, D), 9)
    noise = _normal((3, 2 * repeats - 1, b, D), 10)
    out = self_recurrence(None, den, process, x_init, ts, repeats=repeats, eta=eta, noise=noise)

    # The reference in numpy: the Gaussian's Wiener-filter denoiser and the textbook DDIM step.
    mu, cov = (np.asarray(a) for a in prior.moments())
    alphas, sigmas = np.asarray(process.alpha(ts)), np.asarray(process.sigma(ts))
    z = np.asarray(noise)

    def ddim_step(x, n):
        a_t, s_t, a_s, s_s = alphas[n], sigmas[n], alphas[n + 1], sigmas[n + 1]
        gain = a_t * cov @ np.linalg.inv(a_t**2 * cov + s_t**2 * np.eye(D))
        x0 = mu + (x - a_t * mu) @ gain.T
        if ts[n + 1] == 0:
            return x0
        eps = (x - a_t * x0) / s_t
        std = eta * s_s * np.sqrt(1 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2)
        return a_s * x0 + np.sqrt(s_s**2 - std**2) * eps + std * z[n, 2 * r]

    x = np.asarray(x_init)
    for n in range(3):
        x_t = x
        for r in range(repeats):
            x_s = ddim_step(x_t, n)
            ratio = alphas[n] / alphas[n + 1]
            renoise = np.sqrt(sigmas[n] ** 2 - ratio**2 * sigmas[n + 1] ** 2)
            x_t = ratio * x_s + renoise * z[n, min(2 * r + 1, 2 * repeats - 2)]
        x = x_s
    np.testing.assert_allclose(out, x, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="noise must have shape"):
        self_recurrence(None, den, process, x_init, ts, repeats=repeats, eta=eta,
                        noise=noise[:, :2])


# ------------------------------------------------------------------------------------------------
# Statistics: sampling the posterior
# ------------------------------------------------------------------------------------------------

N_SAMPLES = 2000


@pytest.mark.parametrize("name, kind", [("mask", "vp"), ("pool", "edm")])
def test_sampling_with_the_exact_likelihood_guide_reproduces_the_posterior(name, kind):
    """Posterior mean and variances within 4 SE (SE = sqrt(var / n), var * sqrt(2 / (n - 1)))."""
    prior, problems = _problems()
    matrix, y, noise_std, post = problems[name]
    process = PROCESSES[kind]
    ts = jaxdiff.timesteps.uniform_log_snr(process, 40, final_zero=True)
    alpha, sigma = float(process.alpha(process.t_max)), float(process.sigma(process.t_max))
    x_init = alpha * _gaussian_draws(post, N_SAMPLES, 20) + sigma * _normal((N_SAMPLES, D), 21)
    guided = gaussian_likelihood_guidance(
        prior.denoiser(process), process, matrix, y, noise_std, x0_cov=_x0_cov(prior, process)
    )
    x = _run_dpm(guided, process, x_init, ts)
    mean, var = (np.asarray(a) for a in (post.moments()[0], np.diag(post.moments()[1])))
    n = N_SAMPLES
    np.testing.assert_array_less(np.abs(np.mean(x, 0) - mean), 4 * np.sqrt(var / n))
    np.testing.assert_array_less(np.abs(np.var(x, 0, ddof=1) - var), 4 * var * np.sqrt(2 / (n - 1)))
    # The posterior is far from the prior in these units: the check can fail.
    prior_mean = np.asarray(prior.moments()[0])
    assert np.max(np.abs(prior_mean - mean) / np.sqrt(var / n)) > 20


@jax.jit
def _run_dpm(guided, process, x_init, ts):
    return dpm_solver_pp(None, guided, process, x_init, ts)


# Guided-sampling settings on the VP process, chosen from a small sweep on these two problems
# (DPS zeta in {0.03, 0.05, 0.1, 0.2, 0.4}; steered scale in {0.1, 0.3, 1}): DPS, 100 ancestral
# steps, norm loss, zeta = 0.2; steered, 50 DDIM(0) steps each repeated twice, Gaussian NLL loss
# (scale 1 would be the Tweedie posterior score), scale = 0.3.
DPS_STEPS, DPS_ZETA = 100, 0.2
STEERED_STEPS, STEERED_REPEATS, STEERED_SCALE = 50, 2, 0.3
NUM_SEEDS = 8


@functools.partial(jax.jit, static_argnames="steps")
def _run_dps(key, denoiser, loss, process, x_init, zeta, steps):
    ts = jaxdiff.timesteps.uniform_t(process, steps)
    return dps(key, denoiser, process, x_init, ts, loss_fn=loss, zeta=zeta)


@functools.partial(jax.jit, static_argnames=("steps", "repeats"))
def _run_steered(key, denoiser, loss, process, x_init, scale, steps, repeats):
    ts = jaxdiff.timesteps.uniform_t(process, steps)
    guided = loss_guidance(denoiser, process, loss, scale, through_denoiser=False)
    return self_recurrence(key, guided, process, x_init, ts, repeats=repeats)


@jax.jit
def _group_w2(groups, mean, cov):
    """Gaussian W2 between each group's sample moments and N(mean, cov): ``(K,)``."""
    return jax.vmap(lambda g: gaussian_w2(*moments(g), mean, cov))(groups)


@functools.cache
def w2_table(name):
    """Gaussian W2 (sample moments vs the exact posterior) of unguided, DPS and steered sampling.

    ``NUM_SEEDS`` independent groups of ``N_SAMPLES`` samples (disjoint example indices of one
    key) give W2 per group; the table reports the mean over groups and its standard error
    std / sqrt(K). Improvements are paired differences (same initial states and noise streams),
    with SE = std(difference) / sqrt(K). Returns ``{method: (mean W2, SE)}`` and
    ``{method: (mean improvement, SE)}``.
    """
    prior, problems = _problems()
    matrix, y, noise_std, post = problems[name]
    process = PROCESSES["vp"]
    k, n = NUM_SEEDS, N_SAMPLES
    x_init = _normal((k * n, D), 30)  # the VP prior N(0, I)
    key = jax.random.key(31)
    op = operators.linear(matrix)
    norm_loss = measurement_loss(op, y)
    nll = measurement_loss(op, y, kind="squared", noise_std=noise_std)
    den = prior.denoiser(process)
    samples = {
        "unguided": _run_dps(key, den, norm_loss, process, x_init, 0.0, DPS_STEPS),
        "dps": _run_dps(key, den, norm_loss, process, x_init, DPS_ZETA, DPS_STEPS),
        "steered": _run_steered(key, den, nll, process, x_init, STEERED_SCALE, STEERED_STEPS,
                                STEERED_REPEATS),
        "exact posterior": _gaussian_draws(post, k * n, 32),
    }
    pm, pc = post.moments()
    w2 = {m: np.asarray(_group_w2(s.reshape(k, n, D), pm, pc)) for m, s in samples.items()}
    table = {m: (v.mean(), v.std(ddof=1) / np.sqrt(k)) for m, v in w2.items()}
    gains = {
        m: ((w2["unguided"] - w2[m]).mean(), (w2["unguided"] - w2[m]).std(ddof=1) / np.sqrt(k))
        for m in ("dps", "steered")
    }
    return table, gains


@pytest.mark.parametrize("name", ["mask", pytest.param("pool", marks=pytest.mark.slow)])
def test_dps_and_steered_sampling_approach_the_posterior(name):
    table, gains = w2_table(name)
    print(f"\n{name}: Gaussian W2 to the exact posterior ({NUM_SEEDS} groups of n = {N_SAMPLES}):")
    for m, (w, se) in table.items():
        print(f"  {m:16s} {w:.4f} +- {se:.4f}")
    for m, (g, se) in gains.items():
        print(f"  gain {m:11s} {g:.4f} +- {se:.4f}  ({g / se:.0f} SE)")
        assert g > 3 * se
