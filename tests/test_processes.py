"""Tests for jaxdiff.processes: forward-SDE consistency, closed forms vs autodiff, inverses,
transformations (jit/vmap/grad), sampling, reverse dynamics, discrete tables and validation.

Speed: eager JAX compiles every primitive separately for each new shape, and each jit compile
costs 0.2-1 s here, so all deterministic per-process quantities (tests 1-3, 6 and 7) come from
one jitted analysis per process *type* (`analysis`), computed once and shared by the tests that
check them. Eager evaluation is covered by the jit-vs-eager, sampling and validation tests.

One jitted analysis per *type* (not one shared jitted function): with JAX 0.10.2, treedefs of
`register_dataclass` nodes of different classes with the same arity compare equal, so a jit
cache shared by e.g. VPProcess and VEProcess can (hash-collision dependent, i.e. flakily)
dispatch to the other type's executable; see `test_compiled_function_rejects_other_process_type`.
"""

import functools
import itertools
import math

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.stats  # noqa: E402

from jaxdiff import processes  # noqa: E402
from jaxdiff.processes import (  # noqa: E402
    CosineVPProcess,
    DiscreteVPProcess,
    EDMProcess,
    OUProcess,
    RectifiedFlowProcess,
    SubVPProcess,
    VEProcess,
    VPProcess,
)

# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

ALL_PROCESSES = [
    pytest.param(VPProcess(), id="vp"),
    pytest.param(DiscreteVPProcess.create(1000, "linear"), id="discrete-linear"),
    pytest.param(
        DiscreteVPProcess.create(
            1000, "scaled_linear", beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True
        ),
        id="discrete-scaled-linear-ztsnr",
    ),
    pytest.param(DiscreteVPProcess.create(1000, "squaredcos_cap_v2"), id="discrete-cosine"),
    pytest.param(CosineVPProcess(), id="cosine"),
    pytest.param(SubVPProcess(), id="subvp"),
    pytest.param(VEProcess(), id="ve"),
    pytest.param(EDMProcess(), id="edm"),
    pytest.param(RectifiedFlowProcess(), id="rectified-flow"),
    pytest.param(OUProcess(), id="ou"),
]
PROCESS_BY_ID = {param.id: param.values[0] for param in ALL_PROCESSES}
over_processes = pytest.mark.parametrize("process", ALL_PROCESSES)

def _rel_err(a, b):
    """Elementwise |a - b| / max(1, |b|)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(1.0, np.abs(b))


def _is_discrete(process):
    return isinstance(process, DiscreteVPProcess)


def _spread_times(process):
    """Nine times spread over [t_min, t_max] (off the knots k/N for the discrete tables)."""
    if _is_discrete(process):
        n = process.num_train_timesteps
        k = np.linspace(1, n - 2, 9).round()
        return (k + 0.37) / n
    t_min, t_max = float(process.t_min), float(process.t_max)
    geo = np.geomspace(t_min, t_max, 5)
    lin = np.linspace(t_min, t_max, 6)[1:-1]
    return np.sort(np.concatenate([geo, lin]))


# --------------------------------------------------------------------------------------------
# The per-process analysis (one jit per process type)
# --------------------------------------------------------------------------------------------

N_PATHS = 10_000
N_STEPS = 2_000
X0 = np.array([1.0, -2.0])
N_INVERSE_GRID = 20_001  # 20 points per knot interval of the 1000-knot tables

_RNG = np.random.default_rng(3)
REV_X = _RNG.normal(size=(4, 3))
REV_X0_HAT = _RNG.normal(size=(4, 3))
REV_ETA_VEC = np.array([0.0, 0.3, 1.0, 2.0])
ETAS = (0.0, 0.5, 1.0)
# Rows of the stacked reverse-drift call: eta = 0, 0.5, 1 at the 4 moderate times, then a
# per-row eta, then eta = 1 at the 4 end-point times.
REV_ETA_ROWS = np.concatenate([np.repeat(ETAS, 4), REV_ETA_VEC, np.ones(4)])
DTYPES = {"f32": jnp.float32, "f64": jnp.float64}
_METHODS = ("alpha", "sigma", "log_snr", "f", "g2", "d_sigma", "d_log_snr", "noise_level")
# Evaluation-time segments of `_analysis` and their lengths.
SEGMENTS = {
    "spread": 9,  # test 2
    "grid": N_INVERSE_GRID,  # test 3
    "ends": 2,  # [t_min, t_max] (test 6)
    "ends32": 2,  # the same rounded to float32 (float64 reference of the float32 check)
    "rev": 4,  # moderate times (test 6)
    "em_mid": N_STEPS,  # mid-points of the Euler-Maruyama grid (test 1)
    "em_ends": 2,  # [0, t1] (test 1)
}


def _segments(process):
    if _is_discrete(process):  # plus t = 0 and the knots (n + 1)/N (test 7)
        return dict(SEGMENTS, knots=process.num_train_timesteps + 1)
    return SEGMENTS


def _analysis(process, t_spread, t_grid, t_ends):
    """Everything deterministic the tests check, for one process.

    XLA compile time here is dominated by the number of kernels, not by array sizes, so every
    method is called once on the concatenation of all the float64 evaluation times
    (segments), and the tests slice the results.
    """
    # Interior time of the SDE test: half-way in log-SNR between t_min and t_max, and at most
    # 0.9 t_max (keeps RF/cosine below 0.9). Moderate times of the reverse test: log-SNR in
    # [-2, 2].
    lam_ends = process.log_snr(t_ends)
    lam_aux = jnp.concatenate([0.5 * (lam_ends[:1] + lam_ends[1:]), jnp.linspace(2.0, -2.0, 4)])
    t_aux = process.t_from_log_snr(lam_aux)
    t1, t_rev = jnp.minimum(t_aux[0], 0.9 * t_ends[1]), t_aux[1:]
    # Euler-Maruyama on a uniform grid 0 = s_0 < ... < s_N = t1, deterministic coefficients
    # frozen at the interval mid-points (weak order 1 in dt).
    t_em = jnp.linspace(0.0, t1, N_STEPS + 1)
    t_ends32 = t_ends.astype(jnp.float32)
    segments = {
        "spread": t_spread,
        "grid": t_grid,
        "ends": t_ends,
        "ends32": t_ends32.astype(jnp.float64),  # float64 reference for the float32 check
        "rev": t_rev,
        "em_mid": 0.5 * (t_em[1:] + t_em[:-1]),
        "em_ends": jnp.stack([jnp.zeros(()), t1]),
    }
    if _is_discrete(process):
        n = process.num_train_timesteps
        segments["knots"] = jnp.asarray(np.r_[0.0, process.time_from_index(np.arange(n))])
    t_all = jnp.concatenate(list(segments.values()))
    values = {name: getattr(process, name)(t_all) for name in _METHODS}
    values["t_from_log_snr"] = process.t_from_log_snr(values["log_snr"])
    values["t_from_noise_level"] = process.t_from_noise_level(values["noise_level"])
    assert {k: v.shape[0] for k, v in segments.items()} == _segments(process)
    values["t"] = t_all
    # Only a few large outputs: every output of a jitted function costs a kernel to compile,
    # so the segments are sliced on the host (`analysis`).
    out = {"all": values, "dt": t_em[1:] - t_em[:-1]}
    # Autodiff of alpha, sigma and log_snr at the spread times.
    out["ad"] = {
        "ad_d_" + name: jax.vmap(jax.grad(getattr(process, name)))(t_spread)
        for name in ("alpha", "sigma", "log_snr")
    }

    # Reverse dynamics. Rows: the 4 moderate times, then the 4 end-point times with x = 1,
    # x0_hat = 0.5 (finiteness/accuracy at the ends of the range).
    t8 = jnp.concatenate([t_rev, t_ends, segments["ends32"]])
    x8 = jnp.concatenate([jnp.asarray(REV_X), jnp.ones((4, 3))])
    x0_hat8 = jnp.concatenate([jnp.asarray(REV_X0_HAT), jnp.full((4, 3), 0.5)])
    rows = np.r_[np.tile(np.arange(4), 4), 4 + np.arange(4)]  # see REV_ETA_ROWS
    out["reverse"] = {
        "pf": process.pf_velocity(x8, t8, x0_hat8),
        "pf_scalar_t": process.pf_velocity(x8[:4], t_rev[0], x0_hat8[:4]),
        "drift_rows": process.reverse_drift(x8[rows], t8[rows], x0_hat8[rows], eta=REV_ETA_ROWS),
        "diffusion_rows": process.reverse_diffusion(t8[rows], eta=REV_ETA_ROWS),
    }
    # float32 evaluation at [t_min, t_max] (t and x float32).
    f32 = {name: getattr(process, name)(t_ends32) for name in _METHODS}
    x32, x0_hat32 = jnp.ones((2, 3), jnp.float32), jnp.full((2, 3), 0.5, jnp.float32)
    f32["pf_velocity"] = process.pf_velocity(x32, t_ends32, x0_hat32)
    f32["reverse_diffusion"] = process.reverse_diffusion(t_ends32, eta=1.0)
    out["f32"] = f32
    return out


# The analysis is a test-internal tool: compile it at XLA CPU optimisation level 0 and without
# the fusion emitters, 3-5x faster to compile (same IEEE operations; results agree with the
# default pipeline to an ulp). The library's default jit path is covered by
# test_jit_matches_eager and the other tests that call jax.jit directly.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_ANALYSIS_EXE = {}


@functools.cache
def analysis(process):
    """All deterministic per-process quantities as numpy arrays (cached per process).

    A dict: segment name (see SEGMENTS) -> {quantity -> values at that segment's times},
    plus "reverse" and "f32".
    """
    t_min, t_max = float(process.t_min), float(process.t_max)
    args = (
        process,
        jnp.asarray(_spread_times(process)),
        jnp.linspace(t_min, t_max, N_INVERSE_GRID),
        jnp.asarray([t_min, t_max]),
    )
    if type(process) not in _ANALYSIS_EXE:
        # A fresh function object per process type, so no JAX cache is shared between types.
        fn = jax.jit(lambda *a: _analysis(*a))
        _ANALYSIS_EXE[type(process)] = fn.lower(*args).compile(FAST_COMPILE)
    raw = _ANALYSIS_EXE[type(process)](*args)
    raw = jax.tree.map(np.asarray, raw)
    sizes = _segments(process)
    bounds = np.cumsum([0] + list(sizes.values()))
    out = {
        name: {k: v[lo:hi] for k, v in raw["all"].items()}
        for name, lo, hi in zip(sizes, bounds[:-1], bounds[1:])
    }
    out["em_ends"]["dt"] = raw["dt"]
    out["spread"].update(raw["ad"])
    out["reverse"], out["f32"] = raw["reverse"], raw["f32"]
    return out


# --------------------------------------------------------------------------------------------
# 1. Forward SDE simulated with Euler-Maruyama reproduces the marginal (alpha x0, sigma^2 I)
# --------------------------------------------------------------------------------------------


@jax.jit
def _simulate(key, a, b, alpha0):
    """Simulate all processes at once: x <- a_k x + b_k xi_k, x of shape (P, N_PATHS, 2).

    One standard-normal increment array per step is shared by all processes: each process's
    path is still driven by i.i.d. N(0, 1) increments, so each per-process check is valid (the
    checks of different processes are merely correlated), at 1/P of the random numbers, which
    dominate the cost on CPU. The increments are drawn in float32 (160 MB) and used in float64.
    """
    # x(0) = alpha(0) x0 + sigma(0) eps with sigma(0) = 0 for every process (asserted).
    x = alpha0.reshape(-1, 1, 1) * jnp.broadcast_to(jnp.asarray(X0), (1, N_PATHS, 2))
    noise = jax.random.normal(key, (N_STEPS, N_PATHS, 2), jnp.float32)

    def step(x, inputs):
        xi, a_k, b_k = inputs
        xi = xi.astype(jnp.float64).reshape(1, N_PATHS, 2)
        return a_k.reshape(-1, 1, 1) * x + b_k.reshape(-1, 1, 1) * xi, None

    x, _ = jax.lax.scan(step, x, (noise, a.T, b.T))
    return jnp.mean(x, axis=1), jnp.std(x, axis=1)


@pytest.fixture(scope="module")
def sde_results():
    ids = list(PROCESS_BY_ID)
    results = [analysis(PROCESS_BY_ID[pid]) for pid in ids]
    dt = np.stack([r["em_ends"]["dt"] for r in results])
    a = 1.0 + np.stack([r["em_mid"]["f"] for r in results]) * dt
    b = np.sqrt(np.stack([r["em_mid"]["g2"] for r in results]) * dt)
    alpha0, sigma0 = (np.array([r["em_ends"][k][0] for r in results]) for k in ("alpha", "sigma"))
    mean, std = _simulate(jax.random.key(0), a, b, alpha0)
    # Exact moments of the Euler-Maruyama chain itself (no sampling error): m <- a m,
    # v <- a^2 v + b^2. Their distance to (alpha x0, sigma) is the discretisation bias.
    m, v = alpha0, sigma0**2
    for k in range(N_STEPS):
        m, v = a[:, k] * m, a[:, k] ** 2 * v + b[:, k] ** 2
    return {
        pid: dict(
            em=r["em_ends"],
            mean=np.asarray(mean[i]),
            std=np.asarray(std[i]),
            em_mean_factor=m[i],
            em_std=np.sqrt(v[i]),
        )
        for i, (pid, r) in enumerate(zip(ids, results))
    }


@pytest.mark.parametrize("pid", list(PROCESS_BY_ID))
def test_forward_sde_euler_maruyama_matches_marginal(sde_results, pid):
    r = sde_results[pid]
    process = PROCESS_BY_ID[pid]
    (_, t1), (alpha0, alpha), (sigma0, sigma) = (r["em"][k] for k in ("t", "alpha", "sigma"))
    assert float(process.t_min) < t1 <= 0.9 * float(process.t_max)
    np.testing.assert_allclose(r["em"]["dt"], np.full(N_STEPS, t1 / N_STEPS), rtol=1e-9, atol=0)
    # Exact start x(0) = x0: alpha(0) = 1, sigma(0) = 0 for every process here.
    np.testing.assert_allclose([alpha0, sigma0], [1.0, 0.0], rtol=0, atol=1e-15)
    # Sample mean of M i.i.d. N(alpha x0_i, sigma^2) draws: SE = sigma / sqrt(M). Sample std:
    # Var(s^2) = 2 sigma^4 / (M - 1), so by the delta method SE(s) ~= sigma / sqrt(2 M).
    # 4 SE per check: with 40 checks (10 processes x 2 coordinates x mean/std) the family-wise
    # false-alarm rate under a random seed is ~40 * 6.3e-5 = 2.5e-3.
    se_mean = sigma / math.sqrt(N_PATHS)
    se_std = sigma / math.sqrt(2 * N_PATHS)
    # Discretisation bias (weak error O(dt)) of the EM chain, computed exactly above: with
    # N_STEPS = 2000 it is <= 0.11 SE for every process (the worst are the discrete tables with
    # large f near t1 and OU with t1 ~ 3.4), i.e. negligible against the 4 SE band.
    np.testing.assert_allclose(r["em_mean_factor"] * X0, alpha * X0, rtol=0, atol=0.15 * se_mean)
    np.testing.assert_allclose(r["em_std"], sigma, rtol=0, atol=0.15 * se_std)
    np.testing.assert_allclose(r["mean"], alpha * X0, rtol=0, atol=4 * se_mean)
    np.testing.assert_allclose(r["std"], np.full(2, sigma), rtol=0, atol=4 * se_std)


# --------------------------------------------------------------------------------------------
# 2. Closed-form f, g2, d_sigma, d_log_snr agree with autodiff of (alpha, sigma, log_snr)
# --------------------------------------------------------------------------------------------


@over_processes
def test_coefficients_match_autodiff(process):
    s = analysis(process)["spread"]
    t = s["t"]
    assert t.shape == (9,) and t.min() >= float(process.t_min) and t.max() <= float(process.t_max)
    f_ad = s["ad_d_alpha"] / s["alpha"]
    pairs = {
        "f": (s["f"], f_ad),
        # g2 = d(sigma^2)/dt - 2 f sigma^2
        "g2": (s["g2"], 2.0 * s["sigma"] * s["ad_d_sigma"] - 2.0 * f_ad * s["sigma"] ** 2),
        "d_sigma": (s["d_sigma"], s["ad_d_sigma"]),
        "d_log_snr": (s["d_log_snr"], s["ad_d_log_snr"]),
        "log_snr": (s["log_snr"], 2.0 * np.log(s["alpha"]) - 2.0 * np.log(s["sigma"])),
    }
    for name, (closed, reference) in pairs.items():
        assert np.all(np.isfinite(closed)) and np.all(np.isfinite(reference)), name
        err = _rel_err(closed, reference)
        assert err.max() <= 1e-10, (name, t[err.argmax()], closed[err.argmax()], err.max())


# --------------------------------------------------------------------------------------------
# 3. Monotone log-SNR and the inverses
# --------------------------------------------------------------------------------------------


@over_processes
def test_log_snr_decreasing_and_inverses(process):
    out = analysis(process)["grid"]
    t = out["t"]
    np.testing.assert_allclose(t[[0, -1]], [process.t_min, process.t_max], rtol=1e-15, atol=0)
    assert np.all(np.isfinite(out["log_snr"]))
    assert np.all(np.diff(out["log_snr"]) < 0)
    scale = np.maximum(1.0, t)
    assert np.max(np.abs(out["t_from_log_snr"] - t) / scale) <= 1e-10
    assert np.max(np.abs(out["t_from_noise_level"] - t) / scale) <= 1e-10
    sigma_over_alpha = out["sigma"] / out["alpha"]
    np.testing.assert_allclose(out["noise_level"], sigma_over_alpha, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------------------------
# 4. jit / vmap / grad with respect to the process parameters; pytree identity
# --------------------------------------------------------------------------------------------


_JIT_ALPHA = {}


@over_processes
def test_jit_matches_eager(process):
    # One jitted function per process type (see the module docstring); the three discrete
    # tables share it (same type and shapes), which also checks that betas are traced data.
    jitted_alpha = _JIT_ALPHA.setdefault(type(process), jax.jit(lambda p, t: p.alpha(t)))
    t = jnp.asarray(_spread_times(process)[[0, 4, 8]])  # t_min, middle, t_max
    eager = np.asarray(process.alpha(t))
    jitted = np.asarray(jitted_alpha(process, t))
    np.testing.assert_allclose(jitted, eager, rtol=1e-14, atol=0)


def test_distinct_process_types_have_distinct_treedefs():
    same = [
        (type(p).__name__, type(q).__name__)
        for p, q in itertools.combinations(PROCESS_BY_ID.values(), 2)
        if type(p) is not type(q) and jax.tree.structure(p) == jax.tree.structure(q)
    ]
    assert same == []


def test_compiled_function_rejects_other_process_type():
    compiled = jax.jit(lambda p, t: p.alpha(t)).lower(VPProcess(), 0.5).compile()
    alpha_vp = math.exp(-0.0625 * 19.9 - 0.025)  # log alpha = -t^2 (b1 - b0)/4 - t b0/2
    np.testing.assert_allclose(float(compiled(VPProcess(), 0.5)), alpha_vp, rtol=1e-14, atol=0)
    # A different process type is a different pytree structure: refused, never run on the
    # other type's leaves.
    with pytest.raises(TypeError):
        compiled(VEProcess(), 0.5)


def test_vmap_over_parameter_that_builds_the_process():
    beta_max = jnp.array([10.0, 15.0, 20.0])
    got = jax.vmap(lambda bm: VPProcess(beta_min=0.1, beta_max=bm).alpha(0.5))(beta_max)
    # Closed form: log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2.
    closed = np.exp(-0.25 * 0.25 * (np.asarray(beta_max) - 0.1) - 0.5 * 0.5 * 0.1)
    np.testing.assert_allclose(np.asarray(got), closed, rtol=1e-14, atol=0)



def test_vmap_over_process_with_batched_field():
    batch = VPProcess(beta_min=0.1, beta_max=jnp.array([10.0, 20.0]))
    in_axes = VPProcess(beta_min=None, beta_max=0, t_min=None, t_max=None)
    got = jax.vmap(lambda p: p.alpha(0.5), in_axes=(in_axes,))(batch)
    closed = np.exp(-0.25 * 0.25 * (np.array([10.0, 20.0]) - 0.1) - 0.5 * 0.5 * 0.1)
    np.testing.assert_allclose(np.asarray(got), closed, rtol=1e-14, atol=0)



@pytest.mark.parametrize("pid", ["vp", "discrete-linear", "edm"])
def test_vmap_over_stacked_processes(pid):
    process = PROCESS_BY_ID[pid]
    stacked = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * 2), process)
    t = float(_spread_times(process)[4])
    got = jax.vmap(lambda p: p.sigma(t))(stacked)
    np.testing.assert_allclose(np.asarray(got), [float(process.sigma(t))] * 2, rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "build, value, t",
    [
        pytest.param(lambda v: VPProcess(beta_max=v), 20.0, 0.3, id="vp-beta_max"),
        pytest.param(lambda v: VPProcess(beta_min=v), 0.1, 0.3, id="vp-beta_min"),
        pytest.param(lambda v: SubVPProcess(beta_max=v), 20.0, 0.3, id="subvp-beta_max"),
        pytest.param(lambda v: CosineVPProcess(s=v), 0.008, 0.6, id="cosine-s"),
        pytest.param(lambda v: VEProcess(sigma_max=v), 50.0, 0.4, id="ve-sigma_max"),
    ],
)
def test_grad_wrt_parameter_matches_central_difference(build, value, t):
    # VP/SubVP/cosine: d alpha(t)/d parameter. VE has alpha = 1: d sigma(t)/d sigma_max.
    def fn(v):
        p = build(v)
        return p.sigma(t) if isinstance(p, VEProcess) else p.alpha(t)

    grad = float(jax.grad(fn)(jnp.float64(value)))
    # float64 central difference: truncation ~ h^2 |f'''| / 6, rounding ~ eps |f| / h; with
    # h = 1e-5 * value both are < 1e-9 relative.
    h = 1e-5 * value
    fd = (float(fn(value + h)) - float(fn(value - h))) / (2.0 * h)
    assert abs(grad) > 1e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=0)


def test_grad_wrt_discrete_betas_matches_central_difference():
    process = PROCESS_BY_ID["discrete-linear"]
    betas = np.asarray(process.betas)
    t = 0.4237  # between knots 0.423 and 0.424: depends on abar up to index 423

    @jax.jit
    @jax.value_and_grad
    def alpha_and_grad(b):
        return DiscreteVPProcess(betas=b, t_min=process.t_min, t_max=process.t_max).alpha(t)

    alpha, grad = alpha_and_grad(betas)
    np.testing.assert_allclose(float(alpha), float(process.alpha(t)), rtol=1e-14, atol=0)
    grad = np.asarray(grad)
    for i in (0, 100, 422, 423, 600):
        h = 1e-4 * betas[i]
        plus, minus = betas.copy(), betas.copy()
        plus[i] += h
        minus[i] -= h
        fd = (float(alpha_and_grad(plus)[0]) - float(alpha_and_grad(minus)[0])) / (2 * h)
        if i > 423:  # abar beyond the interval containing t does not affect alpha(t)
            assert grad[i] == 0.0 and abs(fd) <= 1e-12
        else:
            assert grad[i] < 0.0
            np.testing.assert_allclose(grad[i], fd, rtol=1e-7, atol=0)



@pytest.mark.parametrize("pid", ["vp", "ve"])
def test_grad_wrt_process_pytree(pid):
    process = PROCESS_BY_ID[pid]
    grads = jax.grad(lambda p: p.sigma(0.5))(process)
    assert type(grads) is type(process)


def test_changing_float_field_does_not_retrace():
    traces = []

    @jax.jit
    def alpha(process, t):
        traces.append(1)  # runs only while tracing
        return process.alpha(t)

    a20 = float(alpha(VPProcess(beta_max=20.0), 0.5))
    a15 = float(alpha(VPProcess(beta_max=15.0), 0.5))
    assert len(traces) == 1
    np.testing.assert_allclose(a20, math.exp(-0.0625 * 19.9 - 0.025), rtol=1e-14, atol=0)
    np.testing.assert_allclose(a15, math.exp(-0.0625 * 14.9 - 0.025), rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------
# 5. Marginal sampling and the prior
# --------------------------------------------------------------------------------------------


@over_processes
def test_sample_marginal_is_alpha_x0_plus_sigma_eps(process):
    key = jax.random.key(1)
    x0 = np.linspace(-1.0, 1.0, 3 * 4 * 4 * 3).reshape(3, 4, 4, 3)  # image-shaped batch
    t_batch = _spread_times(process)[[1, 4, 7]]
    spread = analysis(process)["spread"]
    np.testing.assert_array_equal(spread["t"][[1, 4, 7]], t_batch)
    alpha_b, sigma_b = spread["alpha"][[1, 4, 7]], spread["sigma"][[1, 4, 7]]
    col = (-1, 1, 1, 1)
    cases = [
        (t_batch[1], alpha_b[1], sigma_b[1]),  # scalar t
        (t_batch, alpha_b.reshape(col), sigma_b.reshape(col)),  # per-example t, shape (B,)
    ]
    for t, alpha, sigma in cases:
        x_t, eps = process.sample_marginal(key, jnp.asarray(x0), t)
        assert x_t.shape == x0.shape and eps.shape == x0.shape
        assert x_t.dtype == jnp.float64 and eps.dtype == jnp.float64
        expected = alpha * x0 + sigma * np.asarray(eps)
        np.testing.assert_allclose(np.asarray(x_t), expected, rtol=1e-12, atol=1e-12)
        assert 0.5 < np.std(np.asarray(eps)) < 1.5  # eps is standard noise, not zeros


@over_processes
def test_sample_prior_std(process):
    n = 100_000
    x = process.sample_prior(jax.random.key(2), (n,))
    assert x.shape == (n,) and x.dtype == jnp.float32  # the default dtype
    x = np.asarray(x, np.float64)
    std = analysis(process)["ends"]["sigma"][1]  # sigma(t_max)
    # SE of the mean = std / sqrt(n); SE of the sample std ~= std / sqrt(2 n) (delta method).
    np.testing.assert_allclose(x.mean(), 0.0, rtol=0, atol=4 * std / math.sqrt(n))
    np.testing.assert_allclose(x.std(), std, rtol=0, atol=4 * std / math.sqrt(2 * n))


@over_processes
def test_prior_log_prob_matches_scipy(process):
    rng = np.random.default_rng(0)
    std = analysis(process)["ends"]["sigma"][1]  # sigma(t_max)
    x = rng.normal(size=(5, 3, 2)) * std
    got = np.asarray(process.prior_log_prob(jnp.asarray(x)))
    expected = scipy.stats.norm.logpdf(x, scale=std).sum(axis=(1, 2))
    assert got.shape == (5,)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------------------------
# 6. Reverse dynamics and conditioning at the ends of the time range
# --------------------------------------------------------------------------------------------


def _reference_drift(x, x0_hat, alpha, sigma, f, g2, eta):
    col = (-1,) + (1,) * (x.ndim - 1)
    alpha, sigma, f, g2, eta = (np.reshape(v, col) for v in (alpha, sigma, f, g2, eta))
    score = (alpha * x0_hat - x) / sigma**2
    return f * x - 0.5 * (1.0 + eta**2) * g2 * score


@over_processes
def test_reverse_dynamics_match_score_form(process):
    a = analysis(process)
    out, rev = a["reverse"], a["rev"]
    alpha, sigma, f, g2 = (rev[k] for k in ("alpha", "sigma", "f", "g2"))
    x, x0_hat = REV_X, REV_X0_HAT

    def check(got, expected):
        assert got.shape == expected.shape
        # 1e-9 relative to the size of the drift (single entries can cancel to ~0).
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())

    np.testing.assert_allclose(rev["log_snr"], [2.0, 2.0 / 3, -2.0 / 3, -2.0], rtol=0, atol=1e-9)
    check(out["pf"][:4], _reference_drift(x, x0_hat, alpha, sigma, f, g2, np.zeros(4)))
    first = [np.full(4, c[0]) for c in (alpha, sigma, f, g2)]
    check(out["pf_scalar_t"], _reference_drift(x, x0_hat, *first, np.zeros(4)))
    # Rows 4i..4i+3: eta = ETAS[i] (i < 3), then eta = REV_ETA_VEC per row.
    for i in range(4):
        rows = slice(4 * i, 4 * i + 4)
        eta = REV_ETA_ROWS[rows]
        check(out["drift_rows"][rows], _reference_drift(x, x0_hat, alpha, sigma, f, g2, eta))
        np.testing.assert_allclose(
            out["diffusion_rows"][rows], eta * np.sqrt(g2), rtol=1e-12, atol=0
        )


@over_processes
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_well_conditioned_at_time_range_ends(process, dtype):
    """alpha, sigma, log_snr, f, g2, d_sigma, d_log_snr, noise_level and the PF velocity and
    reverse diffusion are finite at t_min and t_max, in float32 (t and x float32) and float64.
    """
    a = analysis(process)
    rev = a["reverse"]
    # float64 values at [t_min, t_max] (f64) or at the float32-rounded times (f32 reference).
    ends, rows = (a["ends"], slice(0, 2)) if dtype == "f64" else (a["ends32"], slice(2, 4))
    ref = {k: ends[k] for k in _METHODS}
    ref["pf_velocity"] = rev["pf"][4:][rows]
    ref["reverse_diffusion"] = rev["diffusion_rows"][16:][rows]
    if dtype == "f64":
        assert np.all(np.isfinite(rev["drift_rows"][16:18]))  # reverse drift, eta = 1
    out = a["f32"] if dtype == "f32" else ref
    assert set(out) == set(ref)
    for name, value in out.items():
        assert np.all(np.isfinite(value)), (name, value)
        if not _is_discrete(process):  # analytic processes keep the dtype of t and x
            assert value.dtype == DTYPES[dtype], name
    assert np.all(out["alpha"] > 0) and np.all(out["sigma"] > 0) and np.all(out["g2"] > 0)
    if dtype == "f32":
        # Accuracy, not only finiteness: float32 results match float64 at the same (rounded)
        # times to 1e-4 relative (a cancellation would lose digits ~ 1/sigma >> 1e4 here).
        for name, value in out.items():
            np.testing.assert_allclose(value, ref[name], rtol=1e-4, atol=0, err_msg=name)


# --------------------------------------------------------------------------------------------
# 7. Discrete tables
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pid",
    [
        "discrete-linear",
        "discrete-scaled-linear-ztsnr",
        "discrete-cosine",
    ],
)
def test_discrete_alpha_at_knots_matches_cumprod(pid):
    """alpha(time_from_index(n))^2 == cumprod(1 - betas)[n] for all n, and alpha(0) = 1.

    The zero-terminal-SNR table has abar[N-1] = 0, floored at 2^-24 by design (documented;
    checked in test_zero_terminal_snr_process_has_floored_finite_end).
    """
    process = PROCESS_BY_ID[pid]
    n = np.arange(process.num_train_timesteps)
    abar = np.cumprod(1.0 - np.asarray(process.betas))
    knots = analysis(process)["knots"]
    np.testing.assert_array_equal(knots["t"][1:], (n + 1) / process.num_train_timesteps)
    assert knots["alpha"][0] == 1.0
    checked = n if abar[-1] > 0 else n[:-1]
    np.testing.assert_allclose(
        knots["alpha"][1:][checked] ** 2, abar[checked], rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(
    "spacing, offset, expected",
    [
        ("linspace", 0, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        ("leading", 1, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
        ("trailing", 0, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
    ],
)
def test_timestep_indices_match_diffusers(spacing, offset, expected):
    process = PROCESS_BY_ID["discrete-linear"]
    idx = process.timestep_indices(10, spacing, steps_offset=offset)
    assert np.issubdtype(idx.dtype, np.integer)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(
        process.timesteps(10, spacing, steps_offset=offset),
        (np.asarray(expected) + 1) / 1000,
        rtol=1e-15,
        atol=0,
    )


def test_rescale_zero_terminal_snr():
    betas = processes.discrete_betas(1000, "scaled_linear", 0.00085, 0.012)
    rescaled = processes.rescale_zero_terminal_snr(betas)
    abar, abar_new = np.cumprod(1.0 - betas), np.cumprod(1.0 - rescaled)
    assert abs(abar_new[-1]) < 1e-20
    np.testing.assert_allclose(np.sqrt(abar_new[0]), np.sqrt(abar[0]), rtol=1e-12, atol=0)
    np.testing.assert_allclose(rescaled[-1], 1.0, rtol=0, atol=1e-15)
    assert np.all(np.diff(abar_new) < 0)  # still a valid, strictly decreasing table
    # Affine in sqrt(abar): (sqrt(abar) - last) * first / (first - last).
    s, first, last = np.sqrt(abar), np.sqrt(abar[0]), np.sqrt(abar[-1])
    np.testing.assert_allclose(
        np.sqrt(abar_new), (s - last) * first / (first - last), rtol=1e-10, atol=1e-15
    )


def test_zero_terminal_snr_process_has_floored_finite_end():
    process = PROCESS_BY_ID["discrete-scaled-linear-ztsnr"]
    assert float(process.t_max) == 1.0 and np.asarray(process.betas)[-1] == 1.0
    ends = analysis(process)["ends"]  # at [t_min, t_max = 1]
    log_snr, alpha, f, g2 = (ends[k][1] for k in ("log_snr", "alpha", "f", "g2"))
    assert np.isfinite([log_snr, f, g2]).all()
    np.testing.assert_allclose(alpha**2, 2.0**-24, rtol=1e-12, atol=0)
    np.testing.assert_allclose(log_snr, math.log(2.0**-24 / (1 - 2.0**-24)), rtol=1e-12, atol=0)


def test_discrete_betas_named_schedules():
    b = processes.discrete_betas(1000, "scaled_linear", 0.00085, 0.012)
    np.testing.assert_allclose(b[[0, -1]], [0.00085, 0.012], rtol=1e-14, atol=0)
    step = (0.012**0.5 - 0.00085**0.5) / 999
    np.testing.assert_allclose(np.diff(np.sqrt(b)), np.full(999, step), rtol=1e-9, atol=0)
    lin = processes.discrete_betas(1000, "linear")
    np.testing.assert_allclose(
        lin[[0, 500, -1]], [1e-4, 1e-4 + 500 * (0.02 - 1e-4) / 999, 0.02], rtol=1e-14, atol=0
    )
    cos = processes.discrete_betas(1000, "squaredcos_cap_v2")
    assert cos.max() == 0.999

    def abar(u):
        return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

    i = np.arange(3)
    np.testing.assert_allclose(
        cos[:3], 1 - abar((i + 1) / 1000) / abar(i / 1000), rtol=1e-12, atol=0
    )


# --------------------------------------------------------------------------------------------
# 8. Pytree behaviour
# --------------------------------------------------------------------------------------------


def test_vp_process_has_four_leaves():
    leaves = jax.tree.leaves(VPProcess(beta_min=0.2, beta_max=10.0, t_min=1e-4, t_max=0.9))
    assert len(leaves) == 4
    assert sorted(float(v) for v in leaves) == [1e-4, 0.2, 0.9, 10.0]


@over_processes
def test_tree_map_rebuilds_same_type(process):
    rebuilt = jax.tree.map(lambda x: x * 1.0, process)
    assert type(rebuilt) is type(process)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(process)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Unflattening with tracers (jit) and with None placeholders must not trip validation.
    traced = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.0, p))(process)
    assert type(traced) is type(process)
    assert type(jax.tree.map(lambda x: None, process)) is type(process)


# --------------------------------------------------------------------------------------------
# 9. Input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        pytest.param(lambda: VPProcess(beta_min=-1.0), "beta_min", id="vp-beta_min<0"),
        pytest.param(
            lambda: VPProcess(beta_max=0.05, beta_min=0.1), "beta_max", id="vp-beta_max<beta_min"
        ),
        pytest.param(lambda: SubVPProcess(beta_max=0.0), "beta_max", id="subvp-beta_max=0"),
        pytest.param(lambda: VEProcess(sigma_min=0.0), "sigma_min", id="ve-sigma_min=0"),
        pytest.param(
            lambda: VEProcess(sigma_min=10.0, sigma_max=5.0),
            "sigma_max",
            id="ve-sigma_max<sigma_min",
        ),
        pytest.param(lambda: EDMProcess(sigma_data=0.0), "sigma_data", id="edm-sigma_data=0"),
        pytest.param(lambda: CosineVPProcess(s=-0.1), "s must", id="cosine-s<0"),
        pytest.param(lambda: VPProcess(t_min=0.0), "t_min", id="vp-t_min=0"),
        pytest.param(lambda: EDMProcess(t_min=-1.0), "t_min", id="edm-t_min<0"),
        pytest.param(lambda: OUProcess(t_min=1.0, t_max=1.0), "t_max", id="ou-t_max=t_min"),
        pytest.param(lambda: VEProcess(t_min=0.5, t_max=0.1), "t_max", id="ve-t_max<t_min"),
        pytest.param(lambda: CosineVPProcess(t_max=1.0), "t_max", id="cosine-t_max=1"),
        pytest.param(lambda: RectifiedFlowProcess(t_max=1.0), "t_max", id="rf-t_max=1"),
        pytest.param(lambda: VPProcess(t_max=1.5), "t_max", id="vp-t_max>1"),
        pytest.param(
            lambda: DiscreteVPProcess.from_betas(np.array([0.1, 0.0, 0.2])), "betas", id="beta=0"
        ),
        pytest.param(
            lambda: DiscreteVPProcess.from_betas(np.array([0.1, 1.5])), "betas", id="beta>1"
        ),
        pytest.param(
            lambda: DiscreteVPProcess.create(1000, t_max=1.5), "t_max", id="discrete-t_max>1"
        ),
        pytest.param(
            lambda: processes.discrete_betas(1000, "cosine"), "schedule", id="unknown-schedule"
        ),
    ],
)
def test_bad_construction_raises(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_timestep_indices_validation():
    process = PROCESS_BY_ID["discrete-linear"]
    with pytest.raises(ValueError, match="spacing"):
        process.timestep_indices(10, "uniform")
    with pytest.raises(ValueError, match="num_steps"):
        process.timestep_indices(0)
    with pytest.raises(ValueError, match="num_steps"):
        process.timestep_indices(1001)


@pytest.mark.parametrize("pid", ["vp", "edm", "discrete-linear"])
def test_sample_marginal_validation(pid):
    process = PROCESS_BY_ID[pid]
    key = jax.random.key(0)
    x0 = jnp.zeros((3, 4, 4, 3))
    t_min, t_max = float(process.t_min), float(process.t_max)
    with pytest.raises(ValueError, match="t must"):
        process.sample_marginal(key, x0, 1.01 * t_max)
    with pytest.raises(ValueError, match="t must"):
        process.sample_marginal(key, x0, 0.5 * t_min)
    with pytest.raises(ValueError, match="t must"):
        process.sample_marginal(key, x0, jnp.array([t_min, 0.5 * t_min, t_max]))
    with pytest.raises(ValueError, match="t must"):  # shape (B + 1,)
        process.sample_marginal(key, x0, jnp.full((4,), 0.5 * (t_min + t_max)))
    # The end points themselves are accepted.
    x_t, _ = process.sample_marginal(key, x0, jnp.array([t_min, t_max, t_max]))
    assert x_t.shape == x0.shape
