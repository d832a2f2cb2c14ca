"""Denoising losses: targets, the cross-space weight table, time sampling, dropout, bins.

References are computed independently of the library's closed forms: derivatives of alpha and
sigma by autodiff, weights from their textbook definitions, Gaussian posteriors in closed form.
Statistical checks use fixed keys and tolerances from the sample size.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import losses
from jaxdiff.analytic import Gaussian

SMALL = (16, 2)  # one data shape for most tests: eager dispatch compiles each op per shape
BIG = (4096, 1)  # statistical tests

PROCESSES = {
    "vp": jaxdiff.VPProcess(),
    "cosine": jaxdiff.CosineVPProcess(),
    "edm": jaxdiff.EDMProcess(),
    "rf": jaxdiff.RectifiedFlowProcess(),
}
X0_WEIGHTINGS = ("likelihood", "min_snr", "sigmoid", "edm")


def _zeros_model(x_t, t, cond):
    return jnp.zeros_like(x_t)


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------


def _coefs_ref(process, t):
    """alpha, sigma and their time derivatives (autodiff), float64 numpy, shape (B,)."""
    t = jnp.asarray(t, jnp.float64)
    alpha = jax.vmap(process.alpha)(t)
    sigma = jax.vmap(process.sigma)(t)
    d_alpha = jax.vmap(jax.grad(process.alpha))(t)
    d_sigma = jax.vmap(jax.grad(process.sigma))(t)
    return tuple(np.asarray(c, np.float64) for c in (alpha, sigma, d_alpha, d_sigma))


def _target_ref(kind, x0, eps, coefs):
    alpha, sigma, d_alpha, d_sigma = (c[:, None] for c in coefs)
    return {
        "x0": x0,
        "edm": x0,
        "eps": eps,
        "v": alpha * eps - sigma * x0,
        "velocity": d_alpha * x0 + d_sigma * eps,
    }[kind]


def _c_ref(kind, coefs):
    """d x0_hat / d K_hat at fixed x_t, from x_t = alpha x0 + sigma eps by hand."""
    alpha, sigma, d_alpha, d_sigma = coefs
    return {
        "x0": np.ones_like(alpha),
        "edm": np.ones_like(alpha),
        "eps": -sigma / alpha,
        "v": -sigma / (alpha**2 + sigma**2),
        "velocity": 1.0 / (d_alpha - d_sigma * alpha / sigma),
    }[kind]


def _w_x0_ref(weighting, coefs, *, gamma=5.0, bias=-3.0, sigma_data=0.5):
    """x0-space weights from their definitions in the papers."""
    alpha, sigma, d_alpha, d_sigma = coefs
    snr = alpha**2 / sigma**2
    if weighting == "likelihood":
        # g^2 on the score error; score = (alpha x0_hat - x)/sigma^2 so c_score = sigma^2/alpha.
        g2 = 2 * sigma * d_sigma - 2 * (d_alpha / alpha) * sigma**2
        return g2 * alpha**2 / sigma**4
    if weighting == "min_snr":
        return np.minimum(snr, gamma)
    if weighting == "sigmoid":  # sigmoid(b - lambda) on the eps error
        return snr / (1.0 + np.exp(np.log(snr) - bias))
    level = sigma / alpha  # edm
    return (level**2 + sigma_data**2) / (level * sigma_data) ** 2


def _native_weight_ref(kind, weighting, coefs, **kw):
    if weighting == "uniform":
        return np.ones_like(coefs[0])
    return _w_x0_ref(weighting, coefs, **kw) * _c_ref(kind, coefs) ** 2


# ------------------------------------------------------------------------------------------------
# (a), (g) targets and weights against hand computations
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process_name", sorted(PROCESSES))
@pytest.mark.parametrize("kind", losses.PREDICTIONS)
def test_exact_target_gives_zero_and_an_offset_gives_the_weight(process_name, kind):
    process = PROCESSES[process_name]
    x0 = jax.random.normal(jax.random.key(1), SMALL, jnp.float64)
    key = jax.random.key(7)
    # The times depend only on the key, so the references are computed once.
    t = losses.denoising_loss(key, _zeros_model, process, x0)[1]["t"]
    coefs = _coefs_ref(process, t)
    alpha, sigma = coefs[0][:, None], coefs[1][:, None]
    seen = {}

    def oracle(offset):
        def model(x_t, t_model, cond):
            np.testing.assert_array_equal(t_model, t)
            eps = (np.asarray(x_t) - alpha * np.asarray(x0)) / sigma
            seen["eps"] = eps
            return jnp.asarray(_target_ref(kind, np.asarray(x0), eps, coefs) + offset)

        return model

    loss0, _ = losses.denoising_loss(key, oracle(0.0), process, x0, prediction=kind)
    assert float(loss0) < 1e-18
    # The drawn noise is standard normal (4 standard errors on mean and variance).
    eps = seen["eps"]
    assert abs(eps.mean()) < 4 / math.sqrt(eps.size)
    assert abs(eps.var() - 1.0) < 4 * math.sqrt(2 / eps.size)

    delta = 0.3
    sd = getattr(process, "sigma_data", 0.5)
    for weighting in ("uniform",) + X0_WEIGHTINGS:
        _, aux = losses.denoising_loss(
            key, oracle(delta), process, x0, prediction=kind, weighting=weighting
        )
        expected = _native_weight_ref(kind, weighting, coefs, sigma_data=sd) * delta**2
        np.testing.assert_allclose(aux["mse"], delta**2, rtol=1e-9)
        np.testing.assert_allclose(aux["per_example"], expected, rtol=1e-8, err_msg=weighting)
        np.testing.assert_allclose(aux["log_snr"], np.log(alpha[:, 0] ** 2 / sigma[:, 0] ** 2),
                                   rtol=1e-9, atol=1e-9)


def test_likelihood_weight_for_vp_is_beta_over_sigma_squared():
    process = jaxdiff.VPProcess(beta_min=0.1, beta_max=20.0)
    t = np.linspace(process.t_min, process.t_max, 11)
    beta = 0.1 + t * (20.0 - 0.1)
    sigma2 = 1.0 - np.exp(-(0.1 * t + 0.5 * (20.0 - 0.1) * t**2))
    w = losses.loss_weight(process, jnp.asarray(t), prediction="eps", weighting="likelihood")
    np.testing.assert_allclose(w, beta / sigma2, rtol=1e-10)


def test_min_snr_weights_per_space_for_vp():
    process = jaxdiff.VPProcess()
    t = jnp.linspace(process.t_min, process.t_max, 9)
    snr = np.exp(np.asarray(process.log_snr(t)))
    clipped = np.minimum(snr, 5.0)
    for kind, expected in [("eps", clipped / snr), ("v", clipped / (snr + 1)), ("x0", clipped)]:
        w = losses.loss_weight(process, t, prediction=kind, weighting="min_snr")
        np.testing.assert_allclose(w, expected, rtol=1e-10, err_msg=kind)


# ------------------------------------------------------------------------------------------------
# (b) the same imperfect model in every space gives the same weighted loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process_name", ["vp", "edm", "rf"])
def test_one_imperfect_model_in_every_space_has_one_weighted_loss(process_name):
    process = PROCESSES[process_name]
    gauss = Gaussian.isotropic(jnp.array([0.5, -1.0]), 0.7)
    exact = gauss.denoiser(process)

    def imperfect(x, t, cond=None):
        return 0.8 * exact(x, t) + 0.1

    x0 = gauss.sample(jax.random.key(3), SMALL[0])
    models = {kind: jaxdiff.from_denoiser(imperfect, process, kind)
              for kind in ("eps", "v", "velocity")}
    models["x0"] = models["edm"] = imperfect
    key = jax.random.key(11)

    def per_example(kind, weighting):
        _, aux = losses.denoising_loss(key, models[kind], process, x0, prediction=kind,
                                       weighting=weighting, time_sampling="uniform_log_snr")
        return aux

    custom = lambda p, t: 1.0 + jnp.tanh(p.log_snr(t))  # an x0-space weight
    for weighting in X0_WEIGHTINGS + (custom,):
        reference = per_example("x0", weighting)["per_example"]
        for kind in losses.PREDICTIONS:
            np.testing.assert_allclose(
                per_example(kind, weighting)["per_example"], reference, rtol=1e-9,
                err_msg=f"{kind}, {weighting}",
            )
    # Unit native weights differ across spaces exactly by c_K^2: the eps MSE is SNR * x0 MSE.
    eps_aux, x0_aux = per_example("eps", "uniform"), per_example("x0", "uniform")
    np.testing.assert_allclose(
        eps_aux["mse"] * np.exp(-np.asarray(eps_aux["log_snr"])), x0_aux["mse"], rtol=1e-9
    )


# ------------------------------------------------------------------------------------------------
# (c) the exact posterior mean minimises the uniform eps loss
# ------------------------------------------------------------------------------------------------


def _multiplier_fit(std_model, std_data=0.8):
    """Least-squares multiplier m* of an eps model on data N(0, std_data^2) and its std error."""
    process = jaxdiff.VPProcess()
    n = BIG[0]
    x0 = std_data * jax.random.normal(jax.random.key(5), BIG, jnp.float64)

    def eps_model(m):
        def model(x_t, t, cond):
            alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
            # E[eps | x_t] for x0 ~ N(0, s^2): sigma x_t / (alpha^2 s^2 + sigma^2).
            return m * sigma * x_t / (alpha**2 * std_model**2 + sigma**2)

        return model

    key = jax.random.key(9)
    loss_at = [
        np.asarray(losses.denoising_loss(key, eps_model(m), process, x0)[1]["per_example"])
        for m in (0.0, 1.0, 2.0)
    ]
    # per-example loss (m e_hat - e)^2 = a m^2 - 2 b m + c
    a = (loss_at[2] - 2 * loss_at[1] + loss_at[0]) / 2
    b = (a + loss_at[0] - loss_at[1]) / 2
    m_star = b.mean() / a.mean()
    stderr = np.std(b - a) / math.sqrt(n) / a.mean()
    return m_star, stderr


def test_exact_posterior_mean_minimises_the_expected_eps_loss():
    m_star, stderr = _multiplier_fit(std_model=0.8)
    assert abs(m_star - 1.0) < 4 * stderr
    # The check has power: a posterior mean for the wrong data variance is not the minimiser.
    m_wrong, stderr_wrong = _multiplier_fit(std_model=0.4)
    assert abs(m_wrong - 1.0) > 10 * stderr_wrong


# ------------------------------------------------------------------------------------------------
# (d) time sampling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p_mean,p_std", [(-1.2, 1.2), (0.5, 0.3)])
def test_lognormal_noise_level_statistics(p_mean, p_std):
    process = jaxdiff.EDMProcess(t_min=1e-9, t_max=1e9)  # no clipping within 10 std
    n = BIG[0]
    _, aux = losses.denoising_loss(
        jax.random.key(2), _zeros_model, process, jnp.zeros(BIG),
        time_sampling="lognormal", p_mean=p_mean, p_std=p_std,
    )
    log_level = -0.5 * np.asarray(aux["log_snr"], np.float64)
    np.testing.assert_allclose(log_level, np.log(np.asarray(aux["t"], np.float64)), atol=1e-5)
    assert abs(log_level.mean() - p_mean) < 4 * p_std / math.sqrt(n)
    assert abs(log_level.std() - p_std) < 4 * p_std / math.sqrt(2 * n)


def test_lognormal_maps_through_the_log_snr_and_clips_to_the_range():
    process = jaxdiff.VPProcess()
    _, aux = losses.denoising_loss(jax.random.key(4), _zeros_model, process, jnp.zeros(BIG),
                                   time_sampling="lognormal")
    t = np.asarray(aux["t"])
    assert t.min() >= process.t_min and t.max() <= process.t_max
    # ln(noise level) at t_min is about -4.6, 2.9 std below P_mean: a few draws clip there.
    assert 0 < np.sum(t == process.t_min) < 40


def test_uniform_log_snr_is_uniform_in_log_snr():
    process = jaxdiff.CosineVPProcess()
    n = BIG[0]
    _, aux = losses.denoising_loss(jax.random.key(6), _zeros_model, process, jnp.zeros(BIG),
                                   time_sampling="uniform_log_snr")
    lam = np.asarray(aux["log_snr"], np.float64)
    lo, hi = float(process.log_snr(process.t_max)), float(process.log_snr(process.t_min))
    u = (lam - lo) / (hi - lo)
    assert u.min() > -1e-4 and u.max() < 1 + 1e-4
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(np.mean(u**2) - 1 / 3) < 4 * math.sqrt(4 / 45 / n)


def _star_discrepancy(u):
    u = np.sort(u)
    i = np.arange(u.size)
    return max(np.max((i + 1) / u.size - u), np.max(u - i / u.size))


def test_low_discrepancy_times_are_stratified_and_split_invariant():
    process = jaxdiff.VPProcess()
    n = BIG[0]
    key = jax.random.key(8)

    def times(sampling, first_index=0):
        index = jnp.arange(first_index, first_index + n)
        _, aux = losses.denoising_loss(key, _zeros_model, process, jnp.zeros(BIG),
                                       time_sampling=sampling, example_index=index)
        return (np.asarray(aux["t"], np.float64) - process.t_min) / (process.t_max - process.t_min)

    ld, iid = times("low_discrepancy"), times("uniform")
    bound = 2 * math.log(n) / n  # O(log N / N); i.i.d. draws sit near 0.87 / sqrt(N)
    assert _star_discrepancy(ld) < bound
    assert _star_discrepancy(iid) > bound
    # A time depends only on the key and the global index: a batch holding examples
    # n/2 .. 3n/2 - 1 (another micro-batch split) repeats the second half of the first one.
    shifted = times("low_discrepancy", first_index=n // 2)
    np.testing.assert_array_equal(shifted[: n // 2], ld[n // 2 :])
    assert _star_discrepancy(shifted[n // 2 :]) < 2 * math.log(n // 2) / (n // 2)


def test_callable_time_sampling_is_called_per_example():
    process = jaxdiff.EDMProcess()
    sampler = lambda key, shape: jax.random.uniform(key, shape, jnp.float64, 1.0, 2.0)
    _, aux = losses.denoising_loss(jax.random.key(0), _zeros_model, process, jnp.zeros(SMALL),
                                   time_sampling=sampler)
    t = np.asarray(aux["t"])
    assert t.shape == SMALL[:1] and t.min() >= 1.0 and t.max() <= 2.0
    assert len(np.unique(t)) == SMALL[0]
    bad = lambda key, shape: jnp.full(shape, 500.0)
    with pytest.raises(ValueError, match="time_sampling"):
        losses.denoising_loss(jax.random.key(0), _zeros_model, process, jnp.zeros(SMALL),
                              time_sampling=bad)


def test_per_example_randomness_does_not_depend_on_the_batch_split():
    process = jaxdiff.VPProcess()
    b = SMALL[0]
    x0 = jax.random.normal(jax.random.key(0), (2 * b,) + SMALL[1:], jnp.float64)
    cond = jnp.arange(2 * b)
    model = lambda x_t, t, c: 0.1 * x_t + 0.01 * c[:, None]
    kw = dict(cond_dropout=0.5, null_cond=jnp.asarray(99), weighting="min_snr")
    key = jax.random.key(3)

    def rows(start):
        s = slice(start, start + b)
        _, aux = losses.denoising_loss(key, model, process, x0[s], cond[s],
                                       example_index=jnp.arange(2 * b)[s], **kw)
        return aux

    first, middle = rows(0), rows(b // 2)
    for name in ("per_example", "t"):
        np.testing.assert_array_equal(middle[name][: b // 2], first[name][b // 2 :])
    # Without example_index the batch positions are the indices.
    _, plain = losses.denoising_loss(key, model, process, x0[:b], cond[:b], **kw)
    np.testing.assert_array_equal(plain["per_example"], first["per_example"])


# ------------------------------------------------------------------------------------------------
# (e) condition dropout
# ------------------------------------------------------------------------------------------------


def test_drop_condition_fraction_and_rows():
    n, p = BIG[0], 0.25
    labels = jnp.arange(n) % 7
    emb = jnp.tile(jnp.arange(1.0, 4.0), (n, 1)) * (labels[:, None] + 1.0)
    cond = {"label": labels, "emb": emb}
    null = {"label": jnp.asarray(10), "emb": jnp.zeros((3,))}
    out = losses.drop_condition(jax.random.key(1), cond, null, p)
    dropped = np.asarray(out["label"]) == 10
    assert abs(dropped.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(np.asarray(out["emb"])[dropped], 0.0)
    np.testing.assert_array_equal(np.asarray(out["emb"])[~dropped], np.asarray(emb)[~dropped])
    np.testing.assert_array_equal(np.asarray(out["label"])[~dropped], np.asarray(labels)[~dropped])
    kept = losses.drop_condition(jax.random.key(1), cond, null, 0.0)
    np.testing.assert_array_equal(kept["label"], labels)
    null_fn = lambda b: {"label": jnp.full((b,), 10), "emb": jnp.zeros((b, 3))}
    gone = losses.drop_condition(jax.random.key(1), cond, null_fn, 1.0)
    np.testing.assert_array_equal(gone["label"], 10)


def test_loss_applies_condition_dropout_with_the_null_condition():
    n, p = BIG[0], 0.1
    seen = {}

    def model(x_t, t, cond):
        seen["cond"] = np.asarray(cond)
        return jnp.zeros_like(x_t)

    labels = jnp.arange(n) % 5
    losses.denoising_loss(jax.random.key(2), model, jaxdiff.VPProcess(), jnp.zeros(BIG),
                          labels, cond_dropout=p, null_cond=lambda b: jnp.full((b,), 5))
    dropped = seen["cond"] == 5
    assert abs(dropped.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(seen["cond"][~dropped], np.asarray(labels)[~dropped])


# ------------------------------------------------------------------------------------------------
# CEP plumbing
# ------------------------------------------------------------------------------------------------


def test_cep_is_passed_to_the_model_only_when_on():
    calls = []

    def model(x_t, t, cond, **kwargs):
        calls.append(kwargs)
        return jnp.zeros_like(x_t)

    x0, cond = jnp.zeros(SMALL), jnp.arange(SMALL[0])
    process = jaxdiff.VPProcess()
    losses.denoising_loss(jax.random.key(0), model, process, x0, cond)
    losses.denoising_loss(jax.random.key(0), model, process, x0, cond, cep_gamma=0.5,
                          cep_kind="gaussian")
    assert calls[0] == {}
    key, gamma, kind = calls[1]["cep"]
    assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and gamma == 0.5 and kind == "gaussian"
    # A plain three-argument function is a valid model when CEP is off.
    losses.denoising_loss(jax.random.key(0), lambda x, t, c: x, process, x0, cond)


# ------------------------------------------------------------------------------------------------
# (f) bins
# ------------------------------------------------------------------------------------------------


def test_binned_loss_matches_numpy():
    rng = np.random.default_rng(0)
    per_example = rng.random(200).astype(np.float32)
    edges = np.array([-4.0, -1.0, 0.0, 2.5, 6.0])
    log_snr = rng.uniform(-8, 9, 200)
    log_snr[:5] = edges  # values on an edge belong to the bin that starts there
    sums, counts = losses.binned_loss(jnp.asarray(per_example), jnp.asarray(log_snr), edges)
    idx = np.digitize(log_snr, edges)
    np.testing.assert_array_equal(counts, np.bincount(idx, minlength=len(edges) + 1))
    np.testing.assert_allclose(
        sums, np.bincount(idx, weights=per_example, minlength=len(edges) + 1), rtol=1e-6
    )
    assert sums.dtype == jnp.float32 and counts.dtype == jnp.int32


def test_default_bins_span_the_log_snr_range_evenly():
    process = jaxdiff.EDMProcess()
    edges = losses.default_bins(process, 6)
    lo, hi = -2 * math.log(80.0), -2 * math.log(0.002)
    np.testing.assert_allclose(edges, lo + (hi - lo) * np.arange(1, 6) / 6, rtol=1e-12)
    assert losses.default_bins(process, 1).shape == (0,)
    sums, counts = losses.binned_loss(jnp.ones(3), jnp.array([lo, 0.0, hi]), edges)
    assert counts.tolist() == [1, 0, 1, 0, 0, 1]


# ------------------------------------------------------------------------------------------------
# jit, gradients, dtypes
# ------------------------------------------------------------------------------------------------


def _mlp(params, x, t):
    h = jnp.tanh(x @ params["w1"] + jnp.log(t)[:, None] * params["wt"][None, :]
                 + params["b1"][None, :])
    return h @ params["w2"]


def test_jit_and_gradients_are_finite_with_bfloat16_data():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": 0.5 * jax.random.normal(k1, (2, 8), jnp.float32),
        "wt": 0.5 * jax.random.normal(k2, (8,), jnp.float32),
        "b1": jnp.zeros((8,), jnp.float32),
        "w2": 0.5 * jax.random.normal(k3, (8, 2), jnp.float32),
    }
    process = jaxdiff.VPProcess()
    x0 = jax.random.normal(jax.random.key(1), SMALL, jnp.float32).astype(jnp.bfloat16)
    labels = jnp.arange(SMALL[0]) % 3
    seen = {}

    def objective(params, key):
        def model(x_t, t, cond):
            seen["dtype"] = x_t.dtype
            return _mlp(params, x_t, t)

        return losses.denoising_loss(key, model, process, x0, labels, prediction="v",
                                     weighting="likelihood", time_sampling="lognormal",
                                     cond_dropout=0.2, null_cond=jnp.asarray(3))

    (loss, aux), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
        params, jax.random.key(2)
    )
    assert seen["dtype"] == jnp.bfloat16  # the model sees data in the data's dtype
    assert loss.dtype == jnp.float32 and aux["per_example"].dtype == jnp.float32
    assert aux["t"].dtype == jnp.float32
    np.testing.assert_allclose(loss, jnp.mean(aux["per_example"]), rtol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.sum(jnp.abs(grads["w2"]))) > 0


# ------------------------------------------------------------------------------------------------
# (h) bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prediction="score"), "prediction"),
        (dict(prediction="noise"), "prediction"),
        (dict(weighting="snr"), "weighting"),
        (dict(time_sampling="cosine"), "time_sampling"),
        (dict(cep_kind="laplace"), "cep_kind"),
        (dict(cond_dropout=1.5), "cond_dropout"),
        (dict(cond_dropout=-0.1), "cond_dropout"),
        (dict(cep_gamma=-1.0), "cep_gamma"),
        (dict(min_snr_gamma=0.0), "min_snr_gamma"),
        (dict(p_std=0.0), "p_std"),
        (dict(sigma_data=-0.5), "sigma_data"),
        (dict(cond_dropout=0.1), "null_cond"),
        (dict(cond_dropout=0.1, null_cond={"a": jnp.zeros(16)}), "tree structure"),
        (dict(cond_dropout=0.1, null_cond=jnp.zeros((3,))), "broadcast"),
        (dict(example_index=jnp.arange(5)), "example_index"),
        (dict(example_index=jnp.linspace(0.0, 1.0, 16)), "example_index"),
        (dict(weighting=lambda p, t: jnp.ones(())), "shape of t"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.denoising_loss(jax.random.key(0), _zeros_model, jaxdiff.VPProcess(),
                              jnp.zeros(SMALL), jnp.arange(SMALL[0]), **kwargs)


def test_bad_data_model_and_cond_are_refused():
    process, key = jaxdiff.VPProcess(), jax.random.key(0)
    with pytest.raises(ValueError, match="x0"):
        losses.denoising_loss(key, _zeros_model, process, jnp.zeros((4,)))
    with pytest.raises(TypeError, match="x0"):
        losses.denoising_loss(key, _zeros_model, process, jnp.zeros(SMALL, jnp.int32))
    with pytest.raises(TypeError, match="model"):
        losses.denoising_loss(key, "net", process, jnp.zeros(SMALL))
    with pytest.raises(ValueError, match="model returned"):
        losses.denoising_loss(key, lambda x, t, c: x[:, :1], process, jnp.zeros(SMALL))
    with pytest.raises(ValueError, match="cond is None"):
        losses.denoising_loss(key, _zeros_model, process, jnp.zeros(SMALL), cond_dropout=0.1,
                              null_cond=jnp.zeros(4))
    with pytest.raises(ValueError, match="cond is None"):
        losses.denoising_loss(key, _zeros_model, process, jnp.zeros(SMALL), cep_gamma=1.0)
    with pytest.raises(ValueError, match="leading axis"):
        losses.denoising_loss(key, _zeros_model, process, jnp.zeros(SMALL), jnp.arange(3))
    with pytest.raises(ValueError, match="p must"):
        losses.drop_condition(key, jnp.arange(4), jnp.zeros(4, int), 2.0)
    with pytest.raises(ValueError, match="increasing"):
        losses.binned_loss(jnp.ones(2), jnp.zeros(2), jnp.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        losses.binned_loss(jnp.ones(2), jnp.zeros(3), jnp.array([0.0]))
    with pytest.raises(ValueError, match="n must"):
        losses.default_bins(process, 0)
