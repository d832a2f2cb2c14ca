"""Tests for jaxdiff.metrics: known closed-form values, references and input validation."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance

from jaxdiff import metrics

# tests/conftest.py sets these too; repeated so the module is self-contained. Exact references
# are compared in float64, float32 inputs are tested explicitly below.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Eager JAX compiles every primitive separately for each new shape (~1 s per call here), so
# the value tests go through jitted wrappers; the *_jit_matches_eager tests cover eager mode.
SW = jax.jit(metrics.sliced_wasserstein, static_argnames=("num_projections", "p"))
GW2 = jax.jit(metrics.gaussian_w2)
MOMENTS = jax.jit(metrics.moments)
FD = jax.jit(metrics.frechet_distance)
MMD = jax.jit(metrics.mmd, static_argnames=("kernel", "unbiased"))
ED = jax.jit(metrics.energy_distance, static_argnames=("unbiased",))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


# --------------------------------------------------------------------------------------------
# gaussian_w2 / moments / frechet_distance
# --------------------------------------------------------------------------------------------


def test_gaussian_w2_1d_closed_form():
    m1, s1, m2, s2 = 0.3, 1.7, -1.2, 0.4
    got = GW2(np.array([m1]), np.array([[s1**2]]), np.array([m2]),
                              np.array([[s2**2]]))
    expected = math.sqrt((m1 - m2) ** 2 + (s1 - s2) ** 2)
    np.testing.assert_allclose(float(got), expected, rtol=1e-12)


def test_gaussian_w2_commuting_diagonal_covariances():
    m1 = np.array([1.0, -2.0, 0.5])
    m2 = np.array([0.0, 1.0, 0.5])
    a = np.array([4.0, 0.25, 9.0])
    b = np.array([1.0, 1.0, 0.0])  # a singular PSD covariance must be accepted
    got = GW2(m1, np.diag(a), m2, np.diag(b))
    expected_sq = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(float(got), math.sqrt(expected_sq), rtol=1e-12)


def test_gaussian_w2_identical_is_zero_and_symmetric():
    rng = _rng(1)
    m1, m2 = rng.normal(size=3), rng.normal(size=3)
    c1, c2 = _random_spd(rng, 3), _random_spd(rng, 3)
    assert abs(float(GW2(m1, c1, m1, c1))) < 1e-7
    np.testing.assert_allclose(
        float(GW2(m1, c1, m2, c2)),
        float(GW2(m2, c2, m1, c1)),
        rtol=1e-10,
    )


def test_gaussian_w2_non_commuting_matches_scipy_sqrtm():
    rng = _rng(2)
    d = 3
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
    assert not np.allclose(c1 @ c2, c2 @ c1)
    r1 = scipy.linalg.sqrtm(c1)
    cross = np.real(scipy.linalg.sqrtm(r1 @ c2 @ r1))
    expected_sq = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2.0 * cross)
    got = GW2(jnp.asarray(m1), jnp.asarray(c1), jnp.asarray(m2), jnp.asarray(c2))
    np.testing.assert_allclose(float(got), math.sqrt(expected_sq), rtol=1e-8)


def test_gaussian_w2_jit_matches_eager():
    rng = _rng(20)
    m1, m2 = rng.normal(size=2), rng.normal(size=2)
    c1, c2 = _random_spd(rng, 2), _random_spd(rng, 2)
    np.testing.assert_allclose(
        float(jax.jit(metrics.gaussian_w2)(m1, c1, m2, c2)),
        float(metrics.gaussian_w2(m1, c1, m2, c2)),
        rtol=1e-12,
    )


def test_moments_matches_numpy():
    x = _rng(3).normal(size=(50, 3))
    mean, cov = MOMENTS(x)
    np.testing.assert_allclose(np.asarray(mean), x.mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(cov), np.cov(x, rowvar=False), rtol=1e-12)


def test_frechet_distance_matches_fid_reference():
    # FID formula on numpy moments with scipy's sqrtm; the result is the *squared* W2.
    rng = _rng(4)
    x, y = rng.normal(size=(40, 3)), 2.0 * rng.normal(size=(30, 3)) + 1.0
    mx, my = x.mean(axis=0), y.mean(axis=0)
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    cross = np.real(scipy.linalg.sqrtm(cx @ cy))
    expected = np.sum((mx - my) ** 2) + np.trace(cx + cy - 2.0 * cross)
    np.testing.assert_allclose(float(FD(x, y)), expected, rtol=1e-10)


def test_frechet_distance_large_samples():
    n, d = 20000, 2
    cov = np.array([[2.0, 0.6], [0.6, 1.0]])
    chol = np.linalg.cholesky(cov)
    rng = _rng(5)
    x = rng.normal(size=(n, d)) @ chol.T
    y_same = rng.normal(size=(n, d)) @ chol.T
    shift = np.array([1.0, -0.5])
    y_shift = rng.normal(size=(n, d)) @ chol.T + shift[None, :]

    # Same distribution: the mean term |m_x - m_y|^2 ~ (chi^2-like) with expectation
    # tr(C) * 2/N = 3e-4 and the covariance term is O(D^2/N); 5e-3 is > 10x their sum.
    assert 0.0 <= float(FD(x, y_same)) < 5e-3

    # Shifted: m_x - m_y = -shift + e with e ~ N(0, 2C/N), so |m_x - m_y|^2 has mean
    # |shift|^2 + 2 tr(C)/N and std ~ 2 sqrt(shift^T C shift * 2/N) (first order in e). The
    # covariance term only adds O(D^2/N) >= 0. Allow 5 standard errors plus the biases.
    se = 2.0 * math.sqrt(shift @ cov @ shift * 2.0 / n)
    bias = (2.0 * np.trace(cov) + 10.0 * d**2) / n
    got = float(FD(x, y_shift))
    assert abs(got - shift @ shift) < 5.0 * se + bias


# --------------------------------------------------------------------------------------------
# sliced_wasserstein
# --------------------------------------------------------------------------------------------


def test_sliced_wasserstein_identical_sets_is_zero_with_finite_grad():
    x = _rng(6).normal(size=(30, 3))
    key = jax.random.key(0)
    value_and_grad = jax.jit(jax.value_and_grad(lambda a: metrics.sliced_wasserstein(key, a, x)))
    value, grad = value_and_grad(jnp.asarray(x))
    assert float(value) == 0.0
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("p", [1, 3])  # p = 2 is covered by the tests below
def test_sliced_wasserstein_1d_equals_exact_sorted_w_p(p):
    # In D = 1 every direction is +-1 and W_p is invariant under reflection.
    rng = _rng(7)
    x, y = rng.normal(size=(40, 1)), rng.exponential(size=(40, 1))
    expected = np.mean(np.abs(np.sort(x[:, 0]) - np.sort(y[:, 0])) ** p) ** (1.0 / p)
    got = SW(jax.random.key(0), x, y, num_projections=8, p=p)
    np.testing.assert_allclose(float(got), expected, rtol=1e-12)


def test_sliced_wasserstein_translation():
    # y = x + c: every projection's sorted values shift by theta.c, so the per-direction
    # W_2^2 is (theta.c)^2 = |c|^2 cos^2(phi) with phi uniform in D = 2. Then
    # E = |c|^2/2 and Var = |c|^4 Var(cos^2 phi) = |c|^4/8, so the Monte-Carlo estimate of
    # SW_2^2 with P directions has standard error |c|^2 sqrt(1/(8 P)).
    num_projections = 4096
    x = _rng(8).normal(size=(64, 2))
    c = np.array([1.0, 2.0])
    sw = SW(jax.random.key(0), x, x + c[None, :], num_projections=num_projections)
    c2 = c @ c
    se = c2 * math.sqrt(1.0 / (8.0 * num_projections))
    assert abs(float(sw) ** 2 - c2 / 2.0) < 5.0 * se


def test_sliced_wasserstein_duplicated_set_is_zero():
    # y holds every point of x twice: the empirical measures, hence the quantile functions of
    # every projection, are equal.
    x = _rng(9).normal(size=(25, 3))
    y = np.repeat(x, 2, axis=0)[::-1]
    got = SW(jax.random.key(0), x, y, num_projections=64)
    assert abs(float(got)) < 1e-12


def test_sliced_wasserstein_unequal_sizes_1d_matches_exact_ot():
    # In D = 1 the merged quantile grid makes SW the exact W_2 for any N != M (5 and 7 share
    # no breakpoints but 0 and 1), whatever the sign of the direction.
    rng = _rng(10)
    x, y = rng.normal(size=(5, 1)), rng.normal(size=(7, 1)) + 0.3
    got = SW(jax.random.key(0), x, y, num_projections=4)
    np.testing.assert_allclose(float(got), metrics.wasserstein_ot(x, y), rtol=1e-10)
    # Hand-computed case: x = {0, 10}, y = {0, 1, 2}; cells [0,1/3), [1/3,1/2), [1/2,2/3),
    # [2/3,1) pair (0,0), (0,1), (10,1), (10,2): W_2^2 = 1/6 + 81/6 + 64/3 = 35.
    got = SW(jax.random.key(0), np.array([[10.0], [0.0]]), np.array([[2.0], [0.0], [1.0]]),
             num_projections=4)
    np.testing.assert_allclose(float(got), math.sqrt(35.0), rtol=1e-12)


def test_sliced_wasserstein_unequal_sizes_same_distribution_is_small():
    rng = _rng(11)
    x, y = rng.uniform(size=(500, 2)), rng.uniform(size=(700, 2))
    key = jax.random.key(0)
    same = float(SW(key, x, y))
    shifted = float(SW(key, x, y + np.array([[0.5, 0.5]])))
    # Empirical 1-D W_2 between two samples of ~500 uniform points is ~0.01-0.02.
    assert same < 0.05
    # Shift by c = (0.5, 0.5): SW_2 ~ sqrt(|c|^2/2) = 0.5.
    assert 0.4 < shifted < 0.6


def test_sliced_wasserstein_jit_matches_eager():
    rng = _rng(12)
    # The eager tests share shapes so eager per-primitive compilations are reused.
    x, y = rng.normal(size=(10, 2)), rng.normal(size=(10, 2))
    key = jax.random.key(3)
    eager = metrics.sliced_wasserstein(key, x, y, num_projections=16, p=1)
    jitted = SW(key, x, y, num_projections=16, p=1)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# mmd
# --------------------------------------------------------------------------------------------


def _mmd_reference(x, y, bandwidths, unbiased):
    def k(a, b):
        d2 = scipy.spatial.distance.cdist(a, b, "sqeuclidean")
        return sum(np.exp(-d2 / (2.0 * h**2)) for h in np.atleast_1d(bandwidths))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    if unbiased:
        n, m = len(x), len(y)
        exx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        eyy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    else:
        exx, eyy = kxx.mean(), kyy.mean()
    return exx + eyy - 2.0 * kxy.mean()


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("bandwidth", [0.7, np.array([0.3, 1.0, 2.5])])
def test_mmd_matches_reference(unbiased, bandwidth):
    rng = _rng(13)
    x, y = rng.normal(size=(15, 3)), rng.normal(size=(11, 3)) + 0.5
    got = MMD(x, y, bandwidth=bandwidth, unbiased=unbiased)
    expected = _mmd_reference(x, y, bandwidth, unbiased)
    np.testing.assert_allclose(float(got), expected, rtol=1e-10)


def test_mmd_identical_sets_biased_is_zero():
    x = _rng(14).normal(size=(20, 2))
    # Zero up to round-off: fused reductions may sum the three equal kernel means in different
    # orders.
    assert abs(float(MMD(x, x, unbiased=False))) < 1e-13


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_point_masses(unbiased):
    # x all at a, y all at b: every within-set kernel value is 1 (diagonal or not), so both
    # estimators give sum_h (2 - 2 exp(-|a-b|^2 / (2 h^2))).
    # Same shapes as test_mmd_matches_reference, so its compiled executables are reused.
    a, b = np.array([0.5, -1.0, 0.0]), np.array([1.5, 1.0, 0.0])
    x, y = np.tile(a, (15, 1)), np.tile(b, (11, 1))
    d2 = np.sum((a - b) ** 2)
    for h in (0.8, 1.0, 2.0):
        got = MMD(x, y, bandwidth=h, unbiased=unbiased)
        np.testing.assert_allclose(float(got), 2.0 - 2.0 * np.exp(-d2 / (2 * h**2)), rtol=1e-12)
    hs = np.array([0.8, 1.0, 2.0])
    got = MMD(x, y, bandwidth=hs, unbiased=unbiased)
    expected = np.sum(2.0 - 2.0 * np.exp(-d2 / (2 * hs**2)))
    np.testing.assert_allclose(float(got), expected, rtol=1e-12)


def test_mmd_unbiased_has_zero_mean_under_null():
    # Average R independent replicates with both sets from N(0, I): the U-statistic has mean
    # exactly 0, so its replicate mean must be within 5 standard errors of 0. The V-statistic
    # is biased upwards by ~(1 - E k(X, X'))(1/N + 1/M), which this test detects.
    reps, n, d = 200, 40, 2
    rng = _rng(24)
    xs, ys = rng.normal(size=(reps, n, d)), rng.normal(size=(reps, n, d))

    @jax.jit
    @jax.vmap
    def both(x, y):
        return metrics.mmd(x, y, unbiased=True), metrics.mmd(x, y, unbiased=False)

    u, v = (np.asarray(a) for a in both(xs, ys))
    se = u.std(ddof=1) / math.sqrt(reps)
    assert abs(u.mean()) < 5.0 * se
    assert v.mean() > 5.0 * se


def test_mmd_jit_matches_eager():
    rng = _rng(15)
    x, y = rng.normal(size=(10, 2)), rng.normal(size=(10, 2))
    bw = jnp.array([0.5, 1.5])
    eager = metrics.mmd(x, y, bandwidth=bw)
    jitted = jax.jit(metrics.mmd)(x, y, bandwidth=bw)  # traced bandwidth skips the value check
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-12)
    # Eagerly the three kernel means of identical sets are bitwise equal, so the V-statistic
    # cancels exactly (under jit, fusion may reorder the sums: see the test above).
    assert float(metrics.mmd(x, x, bandwidth=bw, unbiased=False)) == 0.0


# --------------------------------------------------------------------------------------------
# energy_distance
# --------------------------------------------------------------------------------------------


def test_energy_distance_two_points():
    got = ED(np.array([[0.0]]), np.array([[1.0]]))
    np.testing.assert_allclose(float(got), 2.0, rtol=1e-15)


def test_energy_distance_identical_sets_is_zero():
    x = _rng(16).normal(size=(20, 3))
    assert abs(float(ED(x, x))) < 1e-13
    # The U-statistic is not zero for x == y: the cross term keeps the zero diagonal, giving
    # 2 S/N^2 - 2 S/(N(N-1)) = -2 S/(N^2 (N-1)) with S the sum of all pairwise distances.
    n, total = len(x), scipy.spatial.distance.cdist(x, x).sum()
    np.testing.assert_allclose(
        float(ED(x, x, unbiased=True)), -2.0 * total / (n**2 * (n - 1)), rtol=1e-12
    )


@pytest.mark.parametrize("unbiased", [True, False])
def test_energy_distance_matches_reference(unbiased):
    rng = _rng(17)
    x, y = rng.normal(size=(13, 3)), rng.normal(size=(8, 3)) * 2.0
    dxy = scipy.spatial.distance.cdist(x, y).mean()
    dxx = scipy.spatial.distance.cdist(x, x)
    dyy = scipy.spatial.distance.cdist(y, y)
    if unbiased:
        exx = dxx.sum() / (13 * 12)
        eyy = dyy.sum() / (8 * 7)
    else:
        exx, eyy = dxx.mean(), dyy.mean()
    got = ED(x, y, unbiased=unbiased)
    np.testing.assert_allclose(float(got), 2.0 * dxy - exx - eyy, rtol=1e-12)


def test_energy_distance_grad_finite_with_duplicates():
    rng = _rng(18)
    y = rng.normal(size=(4, 2))
    x = np.concatenate([y[:2], y[1:2], rng.normal(size=(2, 2))])  # duplicates within and across
    grad = jax.jit(jax.grad(metrics.energy_distance))(jnp.asarray(x), jnp.asarray(y))
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))

    # Analytic gradient with the zero-distance subgradient 0:
    # d/dx_i = 2/(N M) sum_j u(x_i - y_j) - 2/N^2 sum_k u(x_i - x_k), u(v) = v/|v| (0 at 0).
    def unit(v):
        norm = np.linalg.norm(v, axis=-1, keepdims=True)
        return np.where(norm > 0, v / np.where(norm > 0, norm, 1.0), 0.0)

    n, m = len(x), len(y)
    expected = (2.0 / (n * m)) * unit(x[:, None, :] - y[None, :, :]).sum(axis=1) - (
        2.0 / n**2
    ) * unit(x[:, None, :] - x[None, :, :]).sum(axis=1)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-14)


def test_energy_distance_jit_matches_eager():
    rng = _rng(19)
    x, y = rng.normal(size=(10, 2)), rng.normal(size=(10, 2))
    np.testing.assert_allclose(
        float(jax.jit(metrics.energy_distance)(x, y)),
        float(metrics.energy_distance(x, y)),
        rtol=1e-12,
    )
    assert float(metrics.energy_distance(x, x)) == 0.0  # bitwise cancellation when eager


# --------------------------------------------------------------------------------------------
# wasserstein_ot
# --------------------------------------------------------------------------------------------


def test_wasserstein_ot_permutation_is_zero():
    rng = _rng(21)
    x = rng.normal(size=(10, 3))
    assert metrics.wasserstein_ot(x, x[rng.permutation(10)]) < 1e-12


@pytest.mark.parametrize("p", [1, 2, 3])
def test_wasserstein_ot_translation(p):
    # Centred copies coincide, and |E X - E Y| <= W_1 <= W_p is attained by the translation.
    rng = _rng(22)
    y = rng.normal(size=(12, 2))
    c = np.array([0.3, -0.4])
    got = metrics.wasserstein_ot(y + c[None, :], y, p=p)
    np.testing.assert_allclose(got, 0.5, rtol=1e-10)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_wasserstein_ot_1d_matches_sorted(p):
    rng = _rng(23)
    x, y = rng.normal(size=(15, 1)), rng.uniform(size=(15, 1))
    expected = np.mean(np.abs(np.sort(x[:, 0]) - np.sort(y[:, 0])) ** p) ** (1.0 / p)
    np.testing.assert_allclose(metrics.wasserstein_ot(x, y, p=p), expected, rtol=1e-10)


def test_wasserstein_ot_unequal_sizes_with_weights():
    # delta_0 vs (delta_-1 + delta_1)/2: all mass moves distance 1.
    got = metrics.wasserstein_ot(np.array([[0.0]]), np.array([[-1.0], [1.0]]), p=2)
    np.testing.assert_allclose(got, 1.0, rtol=1e-12)
    # (1/4, 3/4) on {0, 1} vs (1/2, 1/2): mass 1/4 moves distance 1, so W_p = (1/4)^(1/p).
    # Unnormalised weights (1, 3) are normalised.
    pts = np.array([[0.0], [1.0]])
    for p in (1, 2):
        got = metrics.wasserstein_ot(pts, pts, p=p, weights_x=[1.0, 3.0], weights_y=[0.5, 0.5])
        np.testing.assert_allclose(got, 0.25 ** (1.0 / p), rtol=1e-12)
    # Three points vs two with weights, D = 2: x = {(0,0), (2,0), (4,0)} uniform,
    # y = {(1,0) w 2/3, (4,0) w 1/3}: the first two x points go to (1,0) at distance 1.
    x = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    y = np.array([[1.0, 0.0], [4.0, 0.0]])
    got = metrics.wasserstein_ot(x, y, p=2, weights_y=[2.0, 1.0])
    np.testing.assert_allclose(got, math.sqrt(2.0 / 3.0), rtol=1e-12)


def test_wasserstein_ot_missing_pot(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # makes `import ot` raise ImportError
    with pytest.raises(ImportError, match=r"jaxdiff\[metrics\]"):
        metrics.wasserstein_ot(np.zeros((2, 1)), np.ones((2, 1)))


def test_float32_inputs_keep_dtype_and_accuracy():
    rng = _rng(25)
    x = rng.normal(size=(16, 1)).astype(np.float32)
    y = rng.normal(size=(16, 1)).astype(np.float32) + 1.0
    x64, y64 = x.astype(np.float64), y.astype(np.float64)

    sw = SW(jax.random.key(0), x, y, num_projections=4)
    expected = np.sqrt(np.mean((np.sort(x64[:, 0]) - np.sort(y64[:, 0])) ** 2))
    assert sw.dtype == jnp.float32
    np.testing.assert_allclose(float(sw), expected, rtol=1e-5)

    got = MMD(x, y, bandwidth=0.8)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), _mmd_reference(x64, y64, 0.8, True), atol=1e-6)

    got = ED(x, y)
    expected = (2.0 * scipy.spatial.distance.cdist(x64, y64).mean()
                - scipy.spatial.distance.cdist(x64, x64).mean()
                - scipy.spatial.distance.cdist(y64, y64).mean())
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)

    got = GW2(np.zeros(2, np.float32), np.diag([4.0, 1.0]).astype(np.float32),
              np.ones(2, np.float32), np.eye(2, dtype=np.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), math.sqrt(2.0 + 1.0), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------

_KEY = jax.random.key(0)
_GOOD = np.zeros((3, 2))


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, y: metrics.sliced_wasserstein(_KEY, x, y),
        lambda x, y: metrics.frechet_distance(x, y),
        lambda x, y: metrics.mmd(x, y),
        lambda x, y: metrics.energy_distance(x, y),
        lambda x, y: metrics.wasserstein_ot(x, y),
    ],
    ids=["sliced_wasserstein", "frechet_distance", "mmd", "energy_distance", "wasserstein_ot"],
)
def test_sample_shape_validation(fn):
    with pytest.raises(ValueError, match=r"x must have shape \(N, D\), got \(3,\)"):
        fn(np.zeros(3), _GOOD)
    with pytest.raises(ValueError, match=r"y must have shape \(N, D\), got \(2, 3, 1\)"):
        fn(_GOOD, np.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match="feature dimension"):
        fn(_GOOD, np.zeros((3, 4)))


def test_sliced_wasserstein_argument_validation():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_projections"):
            metrics.sliced_wasserstein(_KEY, _GOOD, _GOOD, num_projections=bad)
    for bad in (0.5, 0, float("inf")):
        with pytest.raises(ValueError, match="p must be"):
            metrics.sliced_wasserstein(_KEY, _GOOD, _GOOD, p=bad)


def test_mmd_argument_validation():
    with pytest.raises(ValueError, match="kernel"):
        metrics.mmd(_GOOD, _GOOD, kernel="laplace")
    for bad in (0.0, -1.0, np.array([1.0, 0.0])):
        with pytest.raises(ValueError, match="bandwidth"):
            metrics.mmd(_GOOD, _GOOD, bandwidth=bad)
    with pytest.raises(ValueError, match="bandwidth"):
        metrics.mmd(_GOOD, _GOOD, bandwidth=np.ones((2, 2)))
    with pytest.raises(ValueError, match="x must contain at least 2"):
        metrics.mmd(np.zeros((1, 2)), _GOOD)
    with pytest.raises(ValueError, match="y must contain at least 2"):
        metrics.mmd(_GOOD, np.zeros((1, 2)))
    # The biased V-statistic is defined for single points.
    assert np.isfinite(float(MMD(np.zeros((1, 2)), _GOOD, unbiased=False)))


def test_frechet_and_energy_minimum_points():
    with pytest.raises(ValueError, match="x must contain at least 2"):
        metrics.frechet_distance(np.zeros((1, 2)), _GOOD)
    with pytest.raises(ValueError, match="y must contain at least 2"):
        metrics.frechet_distance(_GOOD, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="x must contain at least 2"):
        metrics.moments(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="x must contain at least 2"):
        metrics.energy_distance(np.zeros((1, 2)), _GOOD, unbiased=True)


def test_gaussian_w2_validation():
    m, c = np.zeros(2), np.eye(2)
    with pytest.raises(ValueError, match="mean1 must have shape"):
        metrics.gaussian_w2(np.zeros((2, 1)), c, m, c)
    with pytest.raises(ValueError, match="cov1 must be a square"):
        metrics.gaussian_w2(m, np.zeros((2, 3)), m, c)
    with pytest.raises(ValueError, match="cov2 must have shape"):
        metrics.gaussian_w2(m, c, m, np.eye(3))
    with pytest.raises(ValueError, match="mean1 and mean2"):
        metrics.gaussian_w2(m, c, np.zeros(3), np.eye(3))


def test_wasserstein_ot_validation():
    with pytest.raises(ValueError, match="p must be"):
        metrics.wasserstein_ot(_GOOD, _GOOD, p=0.5)
    with pytest.raises(ValueError, match="weights_x"):
        metrics.wasserstein_ot(_GOOD, _GOOD, weights_x=[1.0, 1.0])
    with pytest.raises(ValueError, match="weights_y"):
        metrics.wasserstein_ot(_GOOD, _GOOD, weights_y=[1.0, -1.0, 1.0])
