"""Tests of jaxdiff.analytic: exact scores, denoisers, samples and flow maps of analytic data.

On CPU, XLA compilation dominates the run time (every eager operation on new shapes is a
compilation). So each check runs as one ``jax.jit`` program, evaluated once and shared by the
parametrized tests that read its results (``functools.cache``); one program covers all
processes where a test is parametrized over them; test inputs and reference computations use
numpy. Eager calls are kept where the eager path itself is under test (validation, jit vs eager).
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import dataclasses  # noqa: E402
import functools  # noqa: E402

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxdiff import analytic, processes  # noqa: E402

PROCESSES = (
    processes.VPProcess(),
    processes.EDMProcess(),
    processes.VEProcess(),
    processes.CosineVPProcess(),
    processes.RectifiedFlowProcess(),
    processes.OUProcess(),
)
PROCESS_IDS = [type(p).__name__ for p in PROCESSES]
B = 10  # batch of test points


@pytest.fixture(autouse=True, scope="module")
def _fast_compilation():
    """Compile this module's many programs without XLA's expensive passes (~30% less time).

    Only the optimisation of the generated code changes: results agree to round-off, far inside
    the tolerances. The previous setting is restored when the module ends.
    """
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# ------------------------------------------------------------------------------------------------
# Fixed test distributions (parameters from a seeded numpy generator)
# ------------------------------------------------------------------------------------------------


def _random_cov(rng, d, jitter=0.3):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + jitter * np.eye(d)


def _random_basis(rng, d, r):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q[:, :r]


_RNG = np.random.default_rng(0)
MIX_WEIGHTS = np.array([0.2, 0.5, 0.3])
MIX_MEANS = 2.0 * _RNG.normal(size=(3, 3))
MIX_COVS = np.stack([_random_cov(_RNG, 3) for _ in range(3)])
MIX_LABELS = np.array([0, 1, 0])

DISTS = {
    "gaussian": analytic.Gaussian.from_cov(_RNG.normal(size=3), _random_cov(_RNG, 3)),
    "low_rank_gaussian": analytic.Gaussian.low_rank(
        _RNG.normal(size=4), _random_basis(_RNG, 4, 2), np.array([2.0, 0.5])
    ),
    "mixture": analytic.GaussianMixture.create(MIX_WEIGHTS, MIX_MEANS, MIX_COVS, labels=MIX_LABELS),
    "low_rank_mixture": analytic.GaussianMixture.low_rank(
        np.array([1.0, 2.0, 3.0]),
        _RNG.normal(size=(3, 4)),
        np.stack([_random_basis(_RNG, 4, 2) for _ in range(3)]),
        np.array([[1.0, 0.3], [2.0, 0.5], [0.7, 0.7]]),
    ),
    "molrg": analytic.molrg(jax.random.key(0), 6, 2, 2, weights=jnp.array([0.3, 0.7])),
    "empirical": analytic.Empirical.create(_RNG.normal(size=(20, 3)) * np.array([[1.5, 1.0, 0.5]])),
}
FLOW_GAUSSIANS = {
    "full": DISTS["gaussian"],
    "low_rank": analytic.Gaussian.low_rank(
        np.array([1.0, 0.0, -0.5]), _random_basis(_RNG, 3, 2), np.array([3.0, 0.2])
    ),
}


def _softmax(logits):
    w = np.exp(logits - np.max(logits))
    return w / w.sum()


def _numpy_sample(dist, rng, num):
    """Independent numpy draws of x0 from ``dist`` (test inputs)."""
    if isinstance(dist, analytic.Empirical):
        return np.asarray(dist.points)[rng.integers(dist.points.shape[0], size=num)]
    if isinstance(dist, analytic.Gaussian):
        k, g = np.zeros(num, int), jax.tree.map(lambda a: np.asarray(a)[None], dist)
    else:
        w = _softmax(np.asarray(dist.logits))
        k, g = rng.choice(len(w), size=num, p=w), jax.tree.map(np.asarray, dist.components)
    z = rng.normal(size=(num, g.eigvals.shape[-1])) * np.sqrt(g.eigvals[k])
    return g.mean[k] + np.einsum("ndr,nr->nd", g.eigvecs[k], z)


def _wide_times(process):
    """B per-example times from t_min to t_max (both included), geometrically spaced, in pairs."""
    return jnp.repeat(jnp.geomspace(process.t_min, process.t_max, B // 2), 2)


def _assert_rows_close(actual, expected, rtol):
    """Row-wise ``|actual - expected| <= rtol * max(1, |expected|)`` (Euclidean norms)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    err = np.linalg.norm(actual - expected, axis=-1)
    scale = np.maximum(1.0, np.linalg.norm(expected, axis=-1))
    assert np.all(err <= rtol * scale), f"max relative error {np.max(err / scale):.3g}"


def _assert_within_se(estimate, exact, se, floor=0.0):
    """Every entry of a Monte-Carlo estimate within 4 standard errors of the exact value."""
    dev = np.abs(np.asarray(estimate) - np.asarray(exact))
    se = np.asarray(se)
    assert np.all(dev <= 4 * se + floor), (
        f"max |dev| / SE = {np.max(dev / np.maximum(se, 1e-300)):.2f}"
    )


def _logsumexp(a, axis=-1):
    return np.logaddexp.reduce(np.asarray(a), axis=axis)


# ------------------------------------------------------------------------------------------------
# Scores and denoisers, every distribution under every process
# ------------------------------------------------------------------------------------------------


def _identities_one(dist, process, x0, eps):
    """Score, gradient of the log-density, Tweedie estimate and denoiser at x_t of ``x0``."""
    ts = _wide_times(process)
    alpha, sigma = process.alpha(ts)[:, None], process.sigma(ts)[:, None]
    x = alpha * x0 + sigma * eps  # an exact marginal sample
    score = dist.score(process, x, ts)
    return dict(
        score=score,
        grad=jax.grad(lambda x: jnp.sum(dist.log_prob(process, x, ts)))(x),
        tweedie=(x + jnp.square(sigma) * score) / alpha,
        denoise=dist.denoise(process, x, ts),
    )


@jax.jit
def _identities(dist, all_processes, x0, eps):
    """:func:`_identities_one` for every process, as one program (compilation dominates)."""
    return [_identities_one(dist, process, x0, eps) for process in all_processes]


@functools.cache
def _identities_for(name):
    dist, rng = DISTS[name], np.random.default_rng(1)
    x0 = _numpy_sample(dist, rng, B)
    return _identities(dist, PROCESSES, x0, rng.normal(size=x0.shape))


@pytest.mark.parametrize("process_index", range(len(PROCESSES)), ids=PROCESS_IDS)
@pytest.mark.parametrize("name", list(DISTS))
def test_score_is_grad_of_log_prob(name, process_index):
    out = _identities_for(name)[process_index]
    assert out["score"].shape == (B, DISTS[name].dim)
    _assert_rows_close(out["score"], out["grad"], 1e-8)


@pytest.mark.parametrize("process_index", range(len(PROCESSES)), ids=PROCESS_IDS)
@pytest.mark.parametrize("name", list(DISTS))
def test_tweedie_identity(name, process_index):
    # E[x0 | x_t] = (x_t + sigma^2 score) / alpha. It holds to round-off over the whole range,
    # moderate noise included, so the check uses the same times as the score test.
    out = _identities_for(name)[process_index]
    _assert_rows_close(out["denoise"], out["tweedie"], 1e-8)


@jax.jit
def _importance_posterior_mean(mix, process, key, x_t, t):
    # Self-normalised importance sampling of E[x0 | x_t] with prior samples x0 ~ p0 and
    # weights q(x_t | x0) = N(x_t; alpha x0, sigma^2 I). Delta-method standard error of the
    # ratio estimate sum(w f) / sum(w):  SE^2 = sum(w^2 (f - estimate)^2) / (sum w)^2.
    x0 = mix.sample(key, 200_000)
    alpha, sigma = process.alpha(t), process.sigma(t)
    log_w = -0.5 * jnp.sum(jnp.square(x_t[None, :] - alpha * x0), axis=-1) / sigma**2
    w = jnp.exp(log_w - jnp.max(log_w))
    estimate = (w @ x0) / jnp.sum(w)
    se = jnp.sqrt(jnp.square(w) @ jnp.square(x0 - estimate[None, :])) / jnp.sum(w)
    return estimate, se, mix.denoise(process, x_t[None, :], t)[0]


def test_mixture_denoiser_matches_monte_carlo_posterior_mean():
    mix = analytic.GaussianMixture.create(
        np.array([0.3, 0.7]),
        np.array([[-1.5, 0.5], [1.0, -0.5]]),
        np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.2], [-0.2, 0.4]]]),
    )
    estimate, se, exact = _importance_posterior_mean(
        mix, processes.VPProcess(), jax.random.key(3), jnp.array([0.1, 0.2]), 0.5
    )
    _assert_within_se(estimate, exact, se)


# ------------------------------------------------------------------------------------------------
# Samples
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="num")
def _sample_marginal(dist, process, key, t, num):
    return dist.sample_marginal(key, process, t, num)


@pytest.mark.parametrize(
    "name, process, t",
    [("gaussian", processes.VPProcess(), 0.3), ("low_rank_gaussian", processes.EDMProcess(), 1.0)],
)
def test_gaussian_marginal_sample_moments(name, process, t):
    # Sample mean of Gaussian data: SE = sqrt(S_ii / n). Sample covariance:
    # Var(S_hat_ij) = (S_ii S_jj + S_ij^2) / n, so a variance has SE sqrt(2 S_ii^2 / n).
    g, n = DISTS[name], 50_000
    x_t, x0 = (np.asarray(a) for a in _sample_marginal(g, process, jax.random.key(4), t, num=n))
    assert x_t.shape == x0.shape == (n, g.dim)
    mean, cov = (np.asarray(a) for a in g.moments())
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    mean_t, cov_t = alpha * mean, alpha**2 * cov + sigma**2 * np.eye(g.dim)
    diag = np.diag(cov_t)
    _assert_within_se(x_t.mean(0), mean_t, np.sqrt(diag / n))
    se_cov = np.sqrt((diag[:, None] * diag[None, :] + np.square(cov_t)) / n)
    _assert_within_se(np.cov(x_t.T), cov_t, se_cov)


def test_mixture_marginal_sample_moments():
    # Non-Gaussian data: the SE of each covariance entry is estimated from the samples,
    # SE_ij = std((x_i - m_i)(x_j - m_j)) / sqrt(n).
    mix, process, t, n = DISTS["mixture"], processes.OUProcess(), 0.2, 50_000
    x_t, _ = _sample_marginal(mix, process, jax.random.key(5), t, num=n)
    x_t = np.asarray(x_t)
    mean, cov = (np.asarray(a) for a in mix.moments())
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    mean_t, cov_t = alpha * mean, alpha**2 * cov + sigma**2 * np.eye(mix.dim)
    _assert_within_se(x_t.mean(0), mean_t, np.sqrt(np.diag(cov_t) / n))
    dev = x_t - x_t.mean(0)
    prods = dev[:, :, None] * dev[:, None, :]
    _assert_within_se(prods.mean(0), cov_t, prods.std(0) / np.sqrt(n))


def test_empirical_samples_are_training_points():
    emp = DISTS["empirical"]
    x0, points = np.asarray(emp.sample(jax.random.key(6), 50)), np.asarray(emp.points)
    sq_dists = np.sum(np.square(x0[:, None, :] - points[None, :, :]), axis=-1)
    np.testing.assert_array_equal(sq_dists.min(axis=-1), 0.0)


# ------------------------------------------------------------------------------------------------
# Class-conditional mixtures
# ------------------------------------------------------------------------------------------------


def _sub_mixture(c):
    """The class-c mixture, built explicitly from its components."""
    idx = np.flatnonzero(MIX_LABELS == c)
    return analytic.GaussianMixture.create(MIX_WEIGHTS[idx], MIX_MEANS[idx], MIX_COVS[idx])


@jax.jit
def _class_outputs(mix, process, x0, eps):
    """Class-conditional quantities of ``mix`` and the same of its explicit sub-mixtures."""
    ts = _wide_times(process)
    x = process.alpha(ts)[:, None] * x0 + process.sigma(ts)[:, None] * eps
    subs = [_sub_mixture(c) for c in range(mix.num_classes)]
    denoiser = mix.denoiser(process)
    labels = [jnp.full((B,), c) for c in range(mix.num_classes)]
    stack = lambda values: jnp.stack(values, axis=0)  # noqa: E731
    return dict(
        class_log_post=mix.class_log_posterior(process, x, ts),
        comp_log_post=mix.component_log_posterior(process, x, ts),
        denoise=mix.denoise(process, x, ts),
        denoiser=denoiser(x, ts),
        cond_denoiser=stack([denoiser(x, ts, y) for y in labels]),
        cond_score=stack([mix.score(process, x, ts, y=y) for y in labels]),
        cond_log_prob=stack([mix.log_prob(process, x, ts, y=y) for y in labels]),
        mixed_denoiser=denoiser(x, ts, jnp.arange(B) % 2),  # labels 0, 1, 0, 1, ...
        sub_denoise=stack([sub.denoise(process, x, ts) for sub in subs]),
        sub_score=stack([sub.score(process, x, ts) for sub in subs]),
        sub_log_prob=stack([sub.log_prob(process, x, ts) for sub in subs]),
    )


@functools.cache
def _class_results():
    mix, rng = DISTS["mixture"], np.random.default_rng(8)
    x0 = _numpy_sample(mix, rng, B)
    out = _class_outputs(mix, processes.VPProcess(), x0, rng.normal(size=x0.shape))
    return {k: np.asarray(v) for k, v in out.items()}


def test_class_posterior_is_bayes_rule():
    assert DISTS["mixture"].num_classes == 2
    out = _class_results()
    log_post = out["class_log_post"]
    assert log_post.shape == (B, 2)
    np.testing.assert_allclose(_logsumexp(log_post), 0.0, atol=1e-12)
    # Bayes: p(y | x) = pi_y p_t(x | y) / sum_c pi_c p_t(x | c), with explicit sub-mixtures.
    log_prior = np.log([MIX_WEIGHTS[MIX_LABELS == c].sum() / MIX_WEIGHTS.sum() for c in range(2)])
    log_joint = log_prior[None, :] + out["sub_log_prob"].T
    expected = log_joint - _logsumexp(log_joint)[:, None]
    np.testing.assert_allclose(log_post, expected, rtol=0, atol=1e-10)
    # Component posteriors are normalised and add up to the class posteriors.
    comp = out["comp_log_post"]
    np.testing.assert_allclose(_logsumexp(comp), 0.0, atol=1e-12)
    np.testing.assert_allclose(_logsumexp(comp[:, [0, 2]]), log_post[:, 0], atol=1e-12)
    np.testing.assert_allclose(comp[:, 1], log_post[:, 1], atol=1e-12)


def test_conditional_denoiser_is_sub_mixture_denoiser():
    out = _class_results()
    np.testing.assert_allclose(out["denoiser"], out["denoise"], rtol=1e-14)
    np.testing.assert_allclose(out["cond_denoiser"], out["sub_denoise"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["cond_log_prob"], out["sub_log_prob"], rtol=1e-12)
    for c in range(2):
        _assert_rows_close(out["cond_score"][c], out["sub_score"][c], 1e-10)
    # Per-example labels pick per-example sub-mixtures.
    expected = np.where(
        (np.arange(B) % 2 == 0)[:, None], out["sub_denoise"][0], out["sub_denoise"][1]
    )
    np.testing.assert_allclose(out["mixed_denoiser"], expected, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Mixture of low-rank Gaussians: the paper's closed form
# ------------------------------------------------------------------------------------------------


def _molrg_denoise_paper(x, s, g, bases, log_pi):
    """E[x0 | x_t] of Wang et al. (2024) for zero-mean, unit-variance subspaces; s, g: (B, 1)."""
    n, d = x.shape[1], bases.shape[2]
    proj = jnp.einsum("bn,knd->bkd", x, bases)  # U_k^T x
    logits = (
        log_pi[None, :]
        + s**2 * jnp.sum(jnp.square(proj), -1) / (2 * g**2 * (s**2 + g**2))
        - 0.5 * d * jnp.log(s**2 + g**2)
        - 0.5 * (n - d) * jnp.log(g**2)
    )
    w = jax.nn.softmax(logits, axis=-1)
    return s / (s**2 + g**2) * jnp.einsum("bk,knd,bkd->bn", w, bases, proj)


@jax.jit
def _molrg_outputs(mix, all_processes, key, log_pi):
    key_data, key_noise = jax.random.split(key)
    x0 = mix.sample(key_data, B)
    eps = jax.random.normal(key_noise, x0.shape)
    ours, paper = [], []
    for process in all_processes:
        ts = _wide_times(process)
        s, g = process.alpha(ts)[:, None], process.sigma(ts)[:, None]
        x = s * x0 + g * eps
        ours.append(mix.denoise(process, x, ts))
        paper.append(_molrg_denoise_paper(x, s, g, mix.components.eigvecs, log_pi))
    return x0, ours, paper


def test_molrg_matches_paper_closed_form():
    mix = DISTS["molrg"]
    bases = np.asarray(mix.components.eigvecs)
    assert bases.shape == (2, 6, 2)
    # Disjoint column blocks of one orthogonal matrix: all 4 columns are orthonormal.
    all_cols = np.concatenate([bases[0], bases[1]], axis=1)
    np.testing.assert_allclose(all_cols.T @ all_cols, np.eye(4), atol=1e-12)
    x0, ours, paper = _molrg_outputs(
        mix, PROCESSES[:3], jax.random.key(12), jnp.log(jnp.array([0.3, 0.7]))
    )
    for denoise, expected in zip(ours, paper):  # VP, EDM, VE over [t_min, t_max]
        _assert_rows_close(denoise, expected, 1e-10)
    # Clean samples lie on the union of the subspaces.
    x0 = np.asarray(x0)
    on_subspace = np.einsum("knd,bkd->bkn", bases, np.einsum("bn,knd->bkd", x0, bases))
    residual = np.linalg.norm(x0[:, None, :] - on_subspace, axis=-1)
    np.testing.assert_allclose(residual.min(axis=-1), 0.0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The closed-form probability-flow map
# ------------------------------------------------------------------------------------------------


@jax.jit
def _flow_vs_ode(gaussians, process, xs_T, ss):
    """Closed-form flows and Tsit5 PF-ODE solutions from t_max to each of ``ss``."""

    def velocity(t, xs, args):
        return tuple(
            process.pf_velocity(x, t, g.denoise(process, x, t)) for g, x in zip(gaussians, xs)
        )

    T = jnp.asarray(process.t_max)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(velocity),
        diffrax.Tsit5(),
        t0=T,
        t1=ss[-1],
        dt0=None,
        y0=xs_T,
        saveat=diffrax.SaveAt(ts=ss),
        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
        max_steps=100_000,
    )
    closed = tuple(
        jnp.stack([g.flow(process, x, T, s) for s in ss]) for g, x in zip(gaussians, xs_T)
    )
    return closed, solution.ys


@pytest.mark.parametrize(
    "process, t_mid", [(PROCESSES[0], 0.3), (PROCESSES[1], 1.0)], ids=PROCESS_IDS[:2]
)
def test_flow_matches_ode_solution(process, t_mid):
    gaussians, rng = tuple(FLOW_GAUSSIANS.values()), np.random.default_rng(15)
    T = process.t_max
    alpha, sigma = float(process.alpha(T)), float(process.sigma(T))
    xs_T = tuple(
        alpha * _numpy_sample(g, rng, B) + sigma * rng.normal(size=(B, g.dim)) for g in gaussians
    )
    closed, ode = _flow_vs_ode(gaussians, process, xs_T, jnp.array([t_mid, process.t_min]))
    for flows, solutions in zip(closed, ode):  # per Gaussian (full, low rank)
        for flow, solution in zip(flows, solutions):  # per end time
            _assert_rows_close(flow, solution, 1e-7)


@jax.jit
def _flow_compositions(g, all_processes, x0, eps):
    results = []
    for process in all_processes:
        t, u, s = jnp.geomspace(process.t_min, process.t_max, 6)[jnp.array([5, 3, 0])]
        x = process.alpha(t) * x0 + process.sigma(t) * eps
        ts, ss = jnp.full((B,), t), jnp.linspace(0.0, u, B)  # per-example end times, s = 0 first
        back = g.flow(process, x, ts, ss)
        results.append(
            dict(
                x=x,
                direct=g.flow(process, x, t, s),
                composed=g.flow(process, g.flow(process, x, t, u), u, s),
                identity=g.flow(process, x, t, t),
                # Running forward in time from s > 0 inverts the backward map.
                there_and_back=g.flow(process, back[1:], ss[1:], ts[1:]),
            )
        )
    return results


@functools.cache
def _flow_compositions_for(kind):
    g, rng = FLOW_GAUSSIANS[kind], np.random.default_rng(16)
    x0, eps = _numpy_sample(g, rng, B), rng.normal(size=(B, g.dim))
    return _flow_compositions(g, PROCESSES[:3], x0, eps)


@pytest.mark.parametrize("process_index", range(3), ids=PROCESS_IDS[:3])  # VP, EDM, VE
@pytest.mark.parametrize("kind", list(FLOW_GAUSSIANS))
def test_flow_composition_and_identity(kind, process_index):
    out = _flow_compositions_for(kind)[process_index]
    _assert_rows_close(out["composed"], out["direct"], 1e-12)
    _assert_rows_close(out["identity"], out["x"], 1e-14)
    _assert_rows_close(out["there_and_back"], out["x"][1:], 1e-10)


_ENDPOINT_GAUSSIANS = {
    "full": analytic.Gaussian.from_cov(np.array([1.0, -2.0]), np.array([[1.0, 0.6], [0.6, 0.5]])),
    "low_rank": analytic.Gaussian.low_rank(
        np.array([1.0, -2.0]), np.array([[0.6], [0.8]]), np.array([2.0])
    ),
}


@jax.jit
def _flow_endpoints(g, all_processes, key):
    endpoints = []
    for i, process in enumerate(all_processes):
        x_T, _ = g.sample_marginal(jax.random.fold_in(key, i), process, process.t_max, 20_000)
        endpoints.append(g.flow(process, x_T, process.t_max, 0.0))
    return endpoints


@functools.cache
def _flow_endpoints_for(kind):
    return _flow_endpoints(_ENDPOINT_GAUSSIANS[kind], PROCESSES[:2], jax.random.key(17))


@pytest.mark.parametrize("process_index", [0, 1], ids=PROCESS_IDS[:2])
@pytest.mark.parametrize("kind", list(_ENDPOINT_GAUSSIANS))
def test_flow_endpoint_has_the_data_law(kind, process_index):
    # x_T drawn exactly from p_T and mapped to t = 0 gives samples of N(mu, Sigma) (SEs as above).
    x0 = np.asarray(_flow_endpoints_for(kind)[process_index])
    n = x0.shape[0]
    mean, cov = (np.asarray(a) for a in _ENDPOINT_GAUSSIANS[kind].moments())
    diag = np.diag(cov)
    _assert_within_se(x0.mean(0), mean, np.sqrt(diag / n), floor=1e-12)
    se_cov = np.sqrt((diag[:, None] * diag[None, :] + np.square(cov)) / n)
    _assert_within_se(np.cov(x0.T), cov, se_cov, floor=1e-12)


# ------------------------------------------------------------------------------------------------
# Far field: the training-set score tends to the moment-matched Gaussian score (theory notes A9)
# ------------------------------------------------------------------------------------------------


@jax.jit
def _far_field(points, eps, sigmas):
    process = processes.EDMProcess()  # t = sigma
    emp = analytic.Empirical.create(points)
    gauss = analytic.Gaussian.from_cov(*emp.moments())
    rel = []
    for i in range(sigmas.shape[0]):
        x = points + sigmas[i] * eps  # noised training points
        s_emp, s_gauss = emp.score(process, x, sigmas[i]), gauss.score(process, x, sigmas[i])
        rel.append(jnp.sum(jnp.square(s_emp - s_gauss)) / jnp.sum(jnp.square(s_gauss)))
    return jnp.stack(rel)


def test_empirical_score_tends_to_gaussian_score_at_high_noise():
    rng = np.random.default_rng(18)
    points = rng.normal(size=(200, 4)) * np.array([[2.0, 1.0, 0.5, 0.3]])
    rel = np.asarray(
        _far_field(points, rng.normal(size=points.shape), jnp.array([1.0, 3.0, 10.0, 30.0]))
    )
    assert np.all(rel[:-1] / rel[1:] > 20), rel  # ~ sigma^-6: a factor 3 in sigma gives ~ 700


# ------------------------------------------------------------------------------------------------
# Transformations, dtypes
# ------------------------------------------------------------------------------------------------


def test_jit_with_distribution_and_process_as_arguments():
    mix = DISTS["mixture"]  # labels (data) and num_classes (static) in the pytree
    traces = []

    @jax.jit
    def score(dist, process, x, t):
        traces.append(None)  # runs once per trace
        return dist.score(process, x, t)

    x = jnp.asarray(np.random.default_rng(20).normal(size=(B, mix.dim)))
    t = jnp.linspace(0.1, 0.9, B)
    for process in [processes.VPProcess(), processes.VPProcess(beta_max=10.0)]:
        jitted, eager = score(mix, process, x, t), mix.score(process, x, t)
        _assert_rows_close(jitted, eager, 1e-12)
    assert len(traces) == 1  # new process parameters are data: no retrace


@jax.jit
def _apply_denoisers(gaussian, empirical, mix, x, t, y):
    # Denoisers are pytrees (jax.tree_util.Partial): they cross the jit boundary as arguments.
    return dict(
        gaussian=gaussian(x, t),
        empirical=empirical(x, t),
        mixture=mix(x, t),
        conditional=mix(x, t, y),
    )


def test_denoisers_follow_the_denoiser_contract():
    process, y = processes.VPProcess(), jnp.arange(B) % 2
    x, t = np.random.default_rng(25).normal(size=(B, 3)), jnp.full((B,), 0.3)
    names = ["gaussian", "empirical", "mixture"]
    out = _apply_denoisers(*(DISTS[name].denoiser(process) for name in names), x, t, y)
    # Against the methods, eagerly, with a scalar time (the same for every example).
    for name in names:
        _assert_rows_close(out[name], DISTS[name].denoise(process, x, 0.3), 1e-12)
    _assert_rows_close(out["conditional"], DISTS["mixture"].denoise(process, x, 0.3, y=y), 1e-12)


@jax.jit
def _vmapped_log_probs(mix, gaussians, process, x, ts):
    over_times = jax.vmap(lambda t: mix.log_prob(process, x, t))(ts)
    loop_times = jnp.stack(
        [mix.log_prob(process, x, jnp.full((B,), ts[i])) for i in range(ts.shape[0])]
    )
    over_components = jax.vmap(lambda g: g.log_prob(process, x, ts[0]))(mix.components)
    loop_components = jnp.stack([g.log_prob(process, x, ts[0]) for g in gaussians])
    return over_times, loop_times, over_components, loop_components


def test_vmap_over_times_and_over_gaussians():
    # The mixture's components form a batched Gaussian; compare with each one built on its own.
    gaussians = tuple(analytic.Gaussian.from_cov(MIX_MEANS[k], MIX_COVS[k]) for k in range(3))
    x = np.random.default_rng(21).normal(size=(B, 3))
    over_times, loop_times, over_components, loop_components = _vmapped_log_probs(
        DISTS["mixture"], gaussians, processes.VPProcess(), x, jnp.array([0.1, 0.4, 0.8])
    )
    np.testing.assert_allclose(over_times, loop_times, rtol=1e-12)
    np.testing.assert_allclose(over_components, loop_components, rtol=1e-12)


def test_grad_of_log_prob_wrt_means_matches_finite_differences():
    mix, process = DISTS["mixture"], processes.VPProcess()
    x = np.random.default_rng(22).normal(size=(B, 3))
    ts = jnp.linspace(0.05, 0.8, B)

    def total(dist):
        return jnp.sum(dist.log_prob(process, x, ts))

    # Gradient with respect to the whole distribution pytree (labels are ints: allow_int).
    grad = jax.jit(jax.grad(total, allow_int=True))(mix).components.mean
    assert np.all(np.isfinite(grad))

    @jax.jit
    def total_of_means(means):
        return total(
            dataclasses.replace(mix, components=dataclasses.replace(mix.components, mean=means))
        )

    means, h = np.asarray(mix.components.mean), 1e-5
    fd = np.zeros(means.shape)
    for idx in np.ndindex(*means.shape):
        e = np.zeros(means.shape)
        e[idx] = h
        fd[idx] = (total_of_means(means + e) - total_of_means(means - e)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.max(np.abs(fd)))


@jax.jit
def _score(dist, process, x, t):
    return dist.score(process, x, t)


@pytest.mark.parametrize("name", ["gaussian", "low_rank_mixture"])
def test_float32_matches_float64(name):
    dist64 = DISTS[name]
    dist32 = jax.tree.map(
        lambda a: np.asarray(a, np.float32) if a.dtype == np.float64 else a, dist64
    )
    process = processes.VPProcess()
    x = np.random.default_rng(23).normal(size=(B, dist64.dim))
    t = np.linspace(0.2, 0.6, B)
    s32 = _score(dist32, process, x.astype(np.float32), t.astype(np.float32))
    assert s32.dtype == jnp.float32
    s64 = np.asarray(_score(dist64, process, x, t))
    np.testing.assert_allclose(s32, s64, rtol=1e-4, atol=1e-4 * np.max(np.abs(s64)))


def _numpy_gaussian_log_pdf(x, mean, cov):
    dev = x - mean
    _, logdet = np.linalg.slogdet(cov)
    quad = np.sum(dev * np.linalg.solve(cov, dev.T).T, axis=-1)
    return -0.5 * (quad + logdet + len(mean) * np.log(2 * np.pi))


def test_data_log_prob_and_moments_match_direct_formulas():
    g, mix = DISTS["gaussian"], DISTS["mixture"]
    x = np.random.default_rng(24).normal(size=(B, 3))
    mean, cov = (np.asarray(a) for a in g.moments())
    np.testing.assert_allclose(
        g.data_log_prob(x), _numpy_gaussian_log_pdf(x, mean, cov), rtol=1e-12
    )
    w = MIX_WEIGHTS / MIX_WEIGHTS.sum()
    log_terms = [
        np.log(w[k]) + _numpy_gaussian_log_pdf(x, MIX_MEANS[k], MIX_COVS[k]) for k in range(3)
    ]
    np.testing.assert_allclose(
        mix.data_log_prob(x), _logsumexp(np.stack(log_terms), axis=0), rtol=1e-12
    )
    mix_mean, mix_cov = mix.moments()
    np.testing.assert_allclose(mix_mean, w @ MIX_MEANS, rtol=1e-12)
    second = sum(w[k] * (MIX_COVS[k] + np.outer(MIX_MEANS[k], MIX_MEANS[k])) for k in range(3))
    np.testing.assert_allclose(mix_cov, second - np.outer(w @ MIX_MEANS, w @ MIX_MEANS), rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_isotropic_rejects_non_positive_std():
    for std in [0.0, -1.0]:
        with pytest.raises(ValueError, match="std"):
            analytic.Gaussian.isotropic(np.zeros(2), std)


def test_from_cov_rejects_non_positive_definite():
    with pytest.raises(ValueError, match="cov must be positive definite"):
        analytic.Gaussian.from_cov(np.zeros(2), np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="cov must be symmetric"):
        analytic.Gaussian.from_cov(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="cov must have shape"):
        analytic.Gaussian.from_cov(np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="covs must be positive definite"):
        analytic.GaussianMixture.create(
            np.ones(2), np.zeros((2, 2)), np.stack([np.eye(2), -np.eye(2)])
        )


def test_mixture_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="means"):  # K of weights vs K of means
        analytic.GaussianMixture.create(np.ones(3), np.zeros((2, 2)), np.stack([np.eye(2)] * 2))
    with pytest.raises(ValueError, match="covs"):  # D of means vs D of covs
        analytic.GaussianMixture.create(np.ones(2), np.zeros((2, 2)), np.stack([np.eye(3)] * 2))
    with pytest.raises(ValueError, match="stds"):
        analytic.GaussianMixture.create(np.ones(2), np.zeros((2, 2)), stds=np.ones(3))
    with pytest.raises(ValueError, match="weights"):
        analytic.GaussianMixture.create(np.array([1.0, -1.0]), np.zeros((2, 2)), stds=np.ones(2))


@pytest.mark.parametrize("method", ["log_prob", "score", "denoise"])
@pytest.mark.parametrize("name", ["gaussian", "mixture", "empirical"])
def test_times_outside_the_process_range_are_refused(name, method):
    dist, process = DISTS[name], processes.VPProcess()
    x = np.zeros((2, dist.dim))
    for t in [0.0, 1.5, np.array([0.5, 2.0])]:
        with pytest.raises(ValueError, match="t must lie in"):
            getattr(dist, method)(process, x, t)


def test_flow_refuses_bad_times():
    g, process, x = DISTS["gaussian"], processes.EDMProcess(), np.zeros((2, 3))
    with pytest.raises(ValueError, match="t must be > 0"):
        g.flow(process, x, 0.0, 0.0)
    with pytest.raises(ValueError, match="s must lie in"):
        g.flow(process, x, 1.0, 100.0)


def test_molrg_rejects_too_many_dimensions():
    with pytest.raises(ValueError, match="subspace_dim"):
        analytic.molrg(jax.random.key(0), 5, 3, 2)


def test_low_rank_rejects_non_orthonormal_basis():
    with pytest.raises(ValueError, match="basis"):
        analytic.Gaussian.low_rank(
            np.zeros(3), np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]), np.ones(2)
        )
    with pytest.raises(ValueError, match="bases"):
        analytic.GaussianMixture.low_rank(
            np.ones(1), np.zeros((1, 2)), 2.0 * np.ones((1, 2, 1)), np.ones((1, 1))
        )


def test_other_bad_inputs():
    process = processes.VPProcess()
    with pytest.raises(ValueError, match="x must have shape"):
        DISTS["gaussian"].score(process, np.zeros((2, 4)), 0.5)
    with pytest.raises(ValueError, match="full-rank"):
        DISTS["low_rank_gaussian"].data_log_prob(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="labels"):
        DISTS["low_rank_mixture"].denoise(process, np.zeros((2, 4)), 0.5, y=np.zeros(2, int))
    with pytest.raises(ValueError, match="y contains labels"):
        DISTS["mixture"].denoise(process, np.zeros((2, 3)), 0.5, y=np.array([0, 5]))
