"""SVDD against the DDIM(1)/DDPM sampler it extends, and its reward tilting on a 2-D mixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.analytic import Gaussian, GaussianMixture
from jaxdiff.guidance.svdd import svdd
from jaxdiff.samplers import ddim, ddpm

N_SAMPLES = 1000


def _first_coordinate(x0):
    return x0[:, 0]


def _mixture():
    return GaussianMixture.create(
        jnp.array([0.5, 0.5]), jnp.array([[-1.0, 0.0], [1.0, 0.5]]), stds=jnp.array([0.4, 0.4])
    )


@pytest.fixture(scope="module")
def mixture_setup():
    process = jaxdiff.VPProcess()
    denoiser = _mixture().denoiser(process)
    ts = jaxdiff.timesteps.uniform_t(process, 12)
    x_init = np.random.default_rng(1).normal(size=(N_SAMPLES, 2))
    return process, denoiser, ts, x_init


def _host_first_coordinate(x0):
    """The reward ``x0[:, 0]`` computed by numpy on the host: JAX cannot differentiate it."""
    shape = jax.ShapeDtypeStruct((x0.shape[0],), x0.dtype)
    return jax.pure_callback(lambda a: np.asarray(a)[:, 0].copy(), shape, x0,
                             vmap_method="sequential")


TEMPERATURES = (0.0, 1e-9, 0.3, 1e6)


@pytest.fixture(scope="module")
def runs(mixture_setup):
    """Every SVDD run of this file, in ONE compiled program (compilation dominates the cost).

    * greedy M = 1 and M = 4 on the mixture (key 0); M = 4 values its candidates with a host
      (numpy) reward, which JAX cannot differentiate: the run fails if the sampler tries;
    * M = 16 under ``jax.vmap`` over (temperature, x_init, example_index): the temperatures of
      ``TEMPERATURES`` (traced: one program for all), and the examples in another order with
      their indices at temperature 0.3;
    * M = 1 and DDIM(eta=1) on a Gaussian in float32 with a final exact 0 and global indices.
    """
    process, denoiser, ts, x_init = mixture_setup
    perm = np.random.default_rng(7).permutation(N_SAMPLES)
    full_index = np.arange(N_SAMPLES)
    temps = np.array([*TEMPERATURES, 0.3])
    xs = np.stack([x_init] * len(TEMPERATURES) + [x_init[perm]])
    indices = np.stack([full_index] * len(TEMPERATURES) + [full_index[perm]])
    edm = jaxdiff.EDMProcess()
    ts_gauss = jaxdiff.timesteps.uniform_log_snr(edm, 9, final_zero=True, dtype=jnp.float32)
    x_gauss = np.random.default_rng(2).normal(size=(32, 2)).astype(np.float32)
    index_gauss = np.arange(100, 132)

    def sample(key, x, m, reward_fn, temperature=0.0, index=None):
        return svdd(key, denoiser, process, x, ts, reward_fn=reward_fn, num_candidates=m,
                    temperature=temperature, example_index=index)

    # Everything enters as an argument: closed-over arrays would be constant-folded by XLA.
    @jax.jit
    def run_all(keys, x_init, temps, xs, indices, x_gauss, index_gauss):
        out = {"1": sample(keys[0], x_init, 1, _first_coordinate),
               "4": sample(keys[0], x_init, 4, _host_first_coordinate)}
        out["16"] = jax.vmap(
            lambda temp, x, index: sample(keys[0], x, 16, _first_coordinate, temp, index)
        )(temps, xs, indices)
        gauss = Gaussian.from_cov(jnp.array([1.0, -0.5]), jnp.array([[1.0, 0.6], [0.6, 0.8]]))
        out["gauss_svdd"] = jax.vmap(lambda key: svdd(  # keys 0 and 1
            key, gauss.denoiser(edm), edm, x_gauss, ts_gauss, reward_fn=_first_coordinate,
            num_candidates=1, example_index=index_gauss))(keys)
        out["gauss_ddim"] = ddim(keys[0], gauss.denoiser(edm), edm, x_gauss, ts_gauss,
                                 eta=1.0, example_index=index_gauss)
        out["gauss_ddpm"] = ddpm(keys[0], gauss.denoiser(edm), edm, x_gauss, ts_gauss,
                                 example_index=index_gauss)
        return out

    keys = jnp.stack([jax.random.key(0), jax.random.key(1)])
    out = run_all(keys, x_init, temps, xs, indices, x_gauss, index_gauss)
    out.update({(16, temp): out["16"][i] for i, temp in enumerate(TEMPERATURES)})
    out["permuted"] = (perm, out["16"][len(TEMPERATURES)])
    return out


def _mean_and_se(values):
    values = np.asarray(values, np.float64)
    return values.mean(), values.std(ddof=1) / np.sqrt(values.size)


def test_one_candidate_is_the_ancestral_sampler_bit_for_bit(runs):
    # A Gaussian's denoiser is affine, so XLA has no freedom to reassociate it: the two scans
    # agree bit for bit exactly when candidate 0 draws the sampler's noise (float32 state, a
    # grid ending in an exact 0, global example indices). ddpm("fixed_small") runs DDIM(1)'s
    # step, so it is the same base sampler.
    out, other_key = runs["gauss_svdd"]
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, runs["gauss_ddim"])
    np.testing.assert_array_equal(out, runs["gauss_ddpm"])
    assert float(jnp.max(jnp.abs(out - other_key))) > 0.1


def test_more_candidates_raise_the_reward(runs):
    stats = {m: _mean_and_se(runs[key][:, 0]) for m, key in ((1, "1"), (4, "4"), (16, (16, 0.0)))}
    print("SVDD mean reward x[0] (mean, SE):", stats)
    for lo, hi in ((1, 4), (4, 16)):
        gap = stats[hi][0] - stats[lo][0]
        se = np.hypot(stats[hi][1], stats[lo][1])
        assert gap > 3 * se, (lo, hi, gap, se)
    # M = 1 samples the pre-trained model: its mean reward is the mixture's E[x0[0]] = 0.
    mean_m1, se_m1 = stats[1]
    assert abs(mean_m1) < 3 * se_m1
    assert bool(jnp.all(jnp.isfinite(runs["1"]))) and bool(jnp.all(jnp.isfinite(runs["16"])))


def test_temperature_interpolates_between_argmax_and_plain_sampling(runs):
    # A tiny temperature keeps every argmax decision of temperature 0.
    greedy = runs[16, 0.0]
    np.testing.assert_array_equal(runs[16, 1e-9], greedy)
    best, warm, hot = (_mean_and_se(runs[16, temp][:, 0]) for temp in (0.0, 0.3, 1e6))
    plain = _mean_and_se(runs["1"][:, 0])
    print("SVDD M=16 mean reward by temperature: 0", best, "0.3", warm, "1e6", hot,
          "| M=1", plain)
    # A very hot softmax picks uniformly, so the chain is the pre-trained sampler again.
    assert abs(hot[0] - plain[0]) < 3 * np.hypot(hot[1], plain[1])
    assert best[0] - warm[0] > 3 * np.hypot(best[1], warm[1])
    assert warm[0] - hot[0] > 3 * np.hypot(warm[1], hot[1])


def test_samples_depend_on_the_example_index_only(runs):
    perm, permuted = runs["permuted"]
    np.testing.assert_allclose(permuted, runs[16, 0.3][perm], rtol=1e-12, atol=1e-12)


def test_final_zero_returns_the_kept_denoiser_output(mixture_setup):
    # A one-step grid to 0 returns D(x_init, t0) with no candidate drawn.
    process, denoiser, _, x_init = mixture_setup
    x = jnp.asarray(x_init[:5])
    ts = jnp.array([0.7, 0.0])

    @jax.jit
    def run(x):
        out = svdd(jax.random.key(0), denoiser, process, x, ts, reward_fn=_first_coordinate,
                   num_candidates=3)
        return out, denoiser(x, jnp.full((5,), 0.7))

    out, expected = run(x)
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)


def test_validation(mixture_setup):
    process, denoiser, ts, x_init = mixture_setup
    x = x_init[:4]

    def call(**kwargs):
        # Under jit: the checks need only shapes and the (concrete) options, and nothing is
        # compiled when they raise.
        options = dict(reward_fn=_first_coordinate, num_candidates=2)
        options.update(kwargs)
        return jax.jit(lambda x: svdd(jax.random.key(0), denoiser, process, x, ts, **options))(x)

    for bad in (0, 2.0, True, -3):
        with pytest.raises(ValueError, match="num_candidates"):
            call(num_candidates=bad)
    for bad in (-1.0, float("nan"), float("inf"), jnp.ones((2, 2))):
        with pytest.raises(ValueError, match="temperature"):
            call(temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=jnp.ones(3))
    with pytest.raises(ValueError, match=r"reward_fn must return shape \(B,\)"):
        call(reward_fn=lambda x0: x0)
    with pytest.raises(TypeError, match="reward_fn"):
        call(reward_fn=3.0)
    with pytest.raises(ValueError, match="decreasing"):
        svdd(jax.random.key(0), denoiser, process, x, ts[::-1], reward_fn=_first_coordinate,
             num_candidates=2)
