r"""Tests of the DPM-Solver++ family (jaxdiff.samplers._dpm_solver).

Exact references, all in float64:

* polynomial exactness: a denoiser that ignores ``x`` and returns ``P(lambda(t))`` turns the
  PF-ODE into :math:`x_s = \frac{\sigma_s}{\sigma_t}x_t
  + \sigma_s\int_{\lambda_t}^{\lambda_s} e^{\lambda}P(\lambda)\,d\lambda`, and
  :math:`\int e^\lambda P = e^\lambda(P - P' + P'')` for a quadratic, so the solution over
  the whole grid is
  :math:`x_e = \frac{\sigma_e}{\sigma_0}x_0 + \alpha_e Q(\lambda_e)
  - \sigma_e\frac{\alpha_0}{\sigma_0}Q(\lambda_0)` with :math:`Q = P - P' + P''`;
* convergence against the closed-form Gaussian PF-ODE flow (``Gaussian.flow``);
* a literal numpy transcription of the reference (diffusers / k-diffusion) multistep formulas;
* identities with DDIM / DDPM.

Compilation dominates the run time on CPU (~0.3-0.5 s per scan, ~2x less inside one larger
jit), so the checks share a few jitted fixtures; test data come from numpy (``jax.random``
would compile a PRNG kernel per shape).
"""

import functools

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxdiff import analytic, metrics, timesteps  # noqa: E402
from jaxdiff.processes import EDMProcess, VPProcess  # noqa: E402
from jaxdiff.samplers._core import half_log_snr  # noqa: E402
from jaxdiff.samplers._dpm_solver import (  # noqa: E402
    dpm_solver_pp,
    dpm_solver_pp_sde,
    dpm_solver_pp_singlestep,
)
from jaxdiff.samplers._first_order import ddim, ddpm  # noqa: E402

EDM = EDMProcess()
VP = VPProcess()
MEAN = np.array([0.3, -0.2])
COV = np.array([[0.25, 0.1], [0.1, 0.16]])
GAUSS = analytic.Gaussian.from_cov(jnp.asarray(MEAN), jnp.asarray(COV))


def _normal(seed, shape, dtype=jnp.float64):
    """Fixed standard normals from numpy (jax.random would compile a PRNG kernel per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)



# ------------------------------------------------------------------------------------------------
# Polynomial exactness
# ------------------------------------------------------------------------------------------------

POLY_SCALE = 5.0  # P(lambda) = sum_k c_k (lambda / 5)^k keeps the values O(1)
POLY_COEFS = np.array([0.7, -0.4, 0.3])

# method -> (highest degree integrated exactly, is multistep). One degree above the exact one
# must NOT be exact (documents the finding; error > 1e-6).
POLY_METHODS = {
    "1": (0, True, dict(order=1)),
    "2M-midpoint": (0, True, dict(order=2, solver_type="midpoint")),
    "2M-heun": (1, True, dict(order=2, solver_type="heun")),
    "3M-reference": (1, True, dict(order=3, third_order="reference")),
    "3M-corrected": (2, True, dict(order=3, third_order="corrected")),
    "2S": (0, False, dict(order=2)),
    "3S": (1, False, dict(order=3)),
    "2S-heun": (1, False, dict(order=2, solver_type="heun")),
    "3S-heun": (2, False, dict(order=3, solver_type="heun")),
}


def _poly_grid(name):
    """A non-uniform grid with two leading history points: Karras (EDM) or random (VP)."""
    if name == "edm_karras":
        return EDM, timesteps.karras(EDM, 13)
    rng = np.random.default_rng(3)
    inner = np.sort(rng.uniform(VP.t_min, VP.t_max, 11))[::-1]
    return VP, jnp.asarray(np.concatenate([[VP.t_max], inner, [VP.t_min]]))


def _poly_exact(process, coefs, x0, t0, t1):
    p = np.polynomial.Polynomial(np.asarray(coefs) / POLY_SCALE ** np.arange(len(coefs)))
    q = p - p.deriv() + p.deriv(2)
    lam0, lam1 = float(half_log_snr(process, t0)), float(half_log_snr(process, t1))
    a0, s0 = float(process.alpha(t0)), float(process.sigma(t0))
    a1, s1 = float(process.alpha(t1)), float(process.sigma(t1))
    return s1 / s0 * x0 + a1 * q(lam1) - s1 * a0 / s0 * q(lam0)


# The random VP grid (alpha != 1) re-checks the methods with distinct formulas.
POLY_GRIDS = {
    "edm_karras": list(POLY_METHODS),
    "vp_random": ["2M-heun", "3M-corrected", "2S", "3S", "2S-heun", "3S-heun"],
}


@functools.cache
def _poly_errors(grid_name):
    """Max |error| per method and degree 0, 1, 2 (one jit per grid, coefficients traced)."""
    methods = POLY_GRIDS[grid_name]
    process, full = _poly_grid(grid_name)
    ts, t_hist = full[2:], full[1::-1]
    x0 = _normal(0, (3, 2))

    @jax.jit
    def run(coefs):
        def poly(t):
            return jnp.polyval(coefs[::-1], half_log_snr(process, t) / POLY_SCALE)

        def den(x, t, cond=None):
            return jnp.broadcast_to(poly(t)[:, None], x.shape)

        m_hist = jnp.broadcast_to(poly(t_hist)[:, None, None], (2, *x0.shape))
        out = {}
        for name in methods:
            _, multi, kw = POLY_METHODS[name]
            if multi:
                out[name] = dpm_solver_pp(None, den, process, x0, ts, lower_order_final=False,
                                          history=(m_hist, t_hist), **kw)
            else:
                out[name] = dpm_solver_pp_singlestep(None, den, process, x0, ts, **kw)
        return out

    errors = {name: [] for name in methods}
    for degree in range(3):
        coefs = np.where(np.arange(3) <= degree, POLY_COEFS, 0.0)
        ref = _poly_exact(process, coefs, np.asarray(x0), float(ts[0]), float(ts[-1]))
        out = run(jnp.asarray(coefs))
        for name in methods:
            errors[name].append(float(np.max(np.abs(np.asarray(out[name]) - ref))))
    return errors


@pytest.mark.parametrize(
    "grid_name,method", [(g, m) for g, methods in POLY_GRIDS.items() for m in methods]
)
def test_polynomial_exactness(grid_name, method):
    errors = _poly_errors(grid_name)[method]
    exact_degree = POLY_METHODS[method][0]
    for degree, err in enumerate(errors):
        if degree <= exact_degree:
            assert err < 1e-12, (method, degree, errors)
        elif degree == exact_degree + 1:
            assert err > 1e-6, (method, degree, errors)


# ------------------------------------------------------------------------------------------------
# Convergence protocol: EDM, 2-D Gaussian, Karras 80 -> 0.002, closed-form flow
# ------------------------------------------------------------------------------------------------

CONV_NS = (16, 32, 64, 128)
# method -> (expected order or None, multistep?, kwargs)
CONV_METHODS = {
    "2M": (2, True, dict(order=2)),
    "3M-reference": (None, True, dict(order=3, third_order="reference")),
    "3M-corrected": (3, True, dict(order=3, third_order="corrected")),
    "2S": (2, False, dict(order=2)),
    "3S": (3, False, dict(order=3)),
}


def _pad_grids(grids):
    """Stack grids of different lengths, repeating each one's last time (zero-length steps).

    Every method here maps a zero-length step (``h = 0``, ``sigma_s/sigma_t = 1``, all
    weights 0 through ``safe_div``) to the identity exactly, so a padded grid gives the
    unpadded result (checked in the fixture) and one compiled, vmapped run serves all N. For
    multistep methods this needs ``lower_order_final=False`` (the padding would count as
    remaining steps).
    """
    size = max(len(g) for g in grids)
    return jnp.stack([jnp.concatenate([g, jnp.full((size - len(g),), g[-1])]) for g in grids])


def _conv_run(method, x_T, full):
    """One grid: multistep methods get exact history at ``full[0], full[1]`` and run from
    ``full[2]`` (the exact state there, by the closed-form flow)."""
    _, multi, kw = CONV_METHODS[method]
    den = GAUSS.denoiser(EDM)
    if not multi:
        return dpm_solver_pp_singlestep(None, den, EDM, x_T, full, **kw)
    b = x_T.shape[0]
    x1 = GAUSS.flow(EDM, x_T, full[0], full[1])
    x2 = GAUSS.flow(EDM, x_T, full[0], full[2])
    m_hist = jnp.stack([den(x1, jnp.full((b,), full[1])), den(x_T, jnp.full((b,), full[0]))])
    return dpm_solver_pp(None, den, EDM, x2, full[2:], history=(m_hist, full[1::-1]),
                         lower_order_final=False, **kw)


@pytest.fixture(scope="module")
def convergence_table():
    x_T = jnp.asarray(MEAN)[None, :] + 80.0 * _normal(1, (64, 2))
    ref = GAUSS.flow(EDM, x_T, 80.0, 0.002)

    @jax.jit
    def errors(x_T, single, multi):
        out = {}
        for method, (_, is_multi, _) in CONV_METHODS.items():
            grids = multi if is_multi else single
            x = jax.vmap(functools.partial(_conv_run, method, x_T))(grids)
            out[method] = jnp.max(jnp.abs(x - ref[None]), axis=(1, 2))
        return out

    # Multistep methods take N steps after two exact history points (a Karras grid of N + 2).
    single = _pad_grids([timesteps.karras(EDM, n) for n in CONV_NS])
    multi = _pad_grids([timesteps.karras(EDM, n + 2) for n in CONV_NS])
    table = {k: np.asarray(v) for k, v in errors(x_T, single, multi).items()}
    # The padding is exact: the unpadded N = 16 run agrees (3M: history and zero-length steps;
    # a singlestep zero-length step is exactly x * 1 + alpha * 0).
    unpadded = jax.jit(functools.partial(_conv_run, "3M-corrected"))(x_T, multi[0, :19])
    err = jnp.max(jnp.abs(unpadded - ref))
    assert abs(float(err) - table["3M-corrected"][0]) <= 1e-13, (err, table["3M-corrected"][0])
    return table


def _slope(errs, ns=CONV_NS):
    return -np.polyfit(np.log(np.asarray(ns, float)), np.log(errs), 1)[0]


def test_convergence_table(convergence_table, capsys):
    with capsys.disabled():
        print("\nDPM-Solver++ on EDM / 2-D Gaussian, Karras 80 -> 0.002, "
              f"max |error| vs N = {CONV_NS}")
        for method in CONV_METHODS:
            errs = convergence_table[method]
            print(f"  {method:13s}" + " ".join(f"{e:.3e}" for e in errs)
                  + f"   slope {_slope(errs):.2f} (N >= 32: {_slope(errs[1:], CONV_NS[1:]):.2f})")
    for errs in convergence_table.values():
        assert np.all(np.isfinite(errs)) and np.all(np.diff(errs) < 0)


def test_reference_3m_is_second_order(convergence_table):
    """The reference 3M (D2 not doubled) is observed second order; the corrected one is third."""
    ref, cor = convergence_table["3M-reference"], convergence_table["3M-corrected"]
    assert _slope(ref) < 2.5, ref
    assert cor[-1] < ref[-1] / 2, (ref, cor)


@pytest.mark.parametrize("method", ["2M", "3M-corrected", "2S", "3S"])
def test_convergence_order(convergence_table, method):
    order = CONV_METHODS[method][0]
    errs = convergence_table[method]
    if method == "3S":
        # 3S is pre-asymptotic at N = 16 on this grid (local slopes 2.47, 2.78, 2.90, 2.95, 2.98
        # for N = 16 ... 512; the exact-quadratic "taylor" variant behaves the same): fit N >= 32.
        assert _slope(errs[1:], CONV_NS[1:]) >= order - 0.2, errs
        assert _slope(errs) >= order - 0.4, errs
    else:
        assert _slope(errs) >= order - 0.2, errs


# ------------------------------------------------------------------------------------------------
# Literal reference formulas (diffusers / k-diffusion), warm-up and lower-order-final rule
# ------------------------------------------------------------------------------------------------


def _reference_multistep(den, process, x, ts, order, solver_type, eta, noise, lower_order_final):
    """numpy transcription of diffusers' DPM-Solver++ (3M: ``D2 = (D1_0 - D1_1)/(r0 + r1)``) and
    k-diffusion's ``sample_dpmpp_2m_sde`` (``h_eta = (1 + eta) h``), in VP-style coordinates."""
    den = jax.jit(den)
    x = np.asarray(x, np.float64)
    ts_np = np.asarray(ts, np.float64)
    n_steps = len(ts_np) - 1
    pos = jnp.where(ts > 0, ts, 1.0)  # the process at an exact 0 is never used
    alphas, sigmas = np.asarray(process.alpha(pos)), np.asarray(process.sigma(pos))
    lams = np.asarray(half_log_snr(process, pos))
    ms = []
    for n in range(n_steps):
        t, s = ts_np[n], ts_np[n + 1]
        m0 = np.asarray(den(jnp.asarray(x), jnp.full((x.shape[0],), t)))
        o = min(order, n + 1)
        if lower_order_final:
            o = min(o, n_steps - n)
        if s == 0:
            x = m0
            break
        a_s, s_s, s_t = alphas[n + 1], sigmas[n + 1], sigmas[n]
        h = lams[n + 1] - lams[n]
        h_eta = (1 + eta) * h
        x_new = s_s / s_t * np.exp(-eta * h) * x - a_s * np.expm1(-h_eta) * m0
        if o == 2:
            r0 = (lams[n] - lams[n - 1]) / h
            d1 = (m0 - ms[0]) / r0
            if solver_type == "midpoint":
                x_new += -0.5 * a_s * np.expm1(-h_eta) * d1
            else:
                x_new += a_s * (np.expm1(-h_eta) / h_eta + 1.0) * d1
        elif o == 3:
            r0, r1 = (lams[n] - lams[n - 1]) / h, (lams[n - 1] - lams[n - 2]) / h
            d1_0, d1_1 = (m0 - ms[0]) / r0, (ms[0] - ms[1]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_new += a_s * (np.expm1(-h) / h + 1.0) * d1
            x_new -= a_s * ((np.expm1(-h) + h) / h**2 - 0.5) * d2
        if noise is not None:
            x_new += s_s * np.sqrt(-np.expm1(-2 * eta * h)) * np.asarray(noise[n, 0])
        x = x_new
        ms.insert(0, m0)
    return x


REF_CASES = ["3M-reference-lof", "2M-heun", "sde-2M-heun-lof"]


def _ref_case_kwargs(case):
    return dict(
        order=3 if "3M" in case else 2,
        solver_type="heun" if "heun" in case else "midpoint",
        lower_order_final=case.endswith("-lof"),
    )


@pytest.fixture(scope="module")
def small_runs():
    """All small deterministic-shape runs of the identity / reference / final-0 / batch tests,
    compiled as one program (one jit of many scans compiles ~2x faster than separate jits)."""
    vp_den, edm_den = GAUSS.denoiser(VP), GAUSS.denoiser(EDM)
    inputs = dict(
        ref_ts=timesteps.uniform_t(VP, 8),  # orders 1, 2, 3, 3, 3, 3, 2, 1 with lower_order_final
        ref_x=_normal(2, (5, 2)),
        ref_noise=_normal(3, (8, 1, 5, 2)),
        id_ts=timesteps.uniform_log_snr(VP, 12, final_zero=True),
        id_x=_normal(4, (6, 2)),
        id_noise=_normal(5, (12, 1, 6, 2)),
        fz_ts=timesteps.karras(EDM, 8, final_zero=True),
        fz_x=80.0 * _normal(6, (4, 2)),
        bi_ts=timesteps.karras(EDM, 10, final_zero=True),
        bi_x=80.0 * _normal(10, (16, 2)),
    )
    key = jax.random.key(11)

    def log_t_denoiser(x, t, cond=None):  # ignores x
        return jnp.broadcast_to(jnp.log(t)[:, None], x.shape)

    @jax.jit
    def run(i):
        out = {}
        for case in REF_CASES:
            kw = _ref_case_kwargs(case)
            if case.startswith("sde"):
                out[case] = dpm_solver_pp_sde(None, vp_den, VP, i["ref_x"], i["ref_ts"], eta=0.7,
                                              noise=i["ref_noise"], **kw)
            else:
                out[case] = dpm_solver_pp(None, vp_den, VP, i["ref_x"], i["ref_ts"], **kw)
        x, ts, z = i["id_x"], i["id_ts"], i["id_noise"]
        out["pp1"] = dpm_solver_pp(None, vp_den, VP, x, ts, order=1)
        out["ddim"] = ddim(None, vp_den, VP, x, ts, eta=0.0)
        out["sde1"] = dpm_solver_pp_sde(None, vp_den, VP, x, ts, order=1, eta=1.0, noise=z)
        out["ddpm"] = ddpm(None, vp_den, VP, x, ts, variance="fixed_small", noise=z)
        out["sde2_eta0"] = dpm_solver_pp_sde(None, vp_den, VP, x, ts, order=2, eta=0.0, noise=z)
        out["pp2"] = dpm_solver_pp(None, vp_den, VP, x, ts, order=2)
        x, ts = i["fz_x"], i["fz_ts"]
        for order in (2, 3):
            # lower_order_final=False keeps the per-step orders of the two grids identical.
            out[f"fz{order}"] = dpm_solver_pp(None, edm_den, EDM, x, ts, order=order,
                                              lower_order_final=False)
            x_last = dpm_solver_pp(None, edm_den, EDM, x, ts[:-1], order=order,
                                   lower_order_final=False)  # the state at the last positive time
            out[f"fz{order}_expected"] = edm_den(x_last, jnp.full((4,), ts[-2]))
        out["fz_3S"] = dpm_solver_pp_singlestep(None, log_t_denoiser, EDM, x, ts, order=3)
        x, ts = i["bi_x"], i["bi_ts"]
        out["bi_full"] = dpm_solver_pp_sde(key, edm_den, EDM, x, ts)  # indices arange(16)
        out["bi_first"] = dpm_solver_pp_sde(key, edm_den, EDM, x[:4], ts)  # a batch of 4
        out["bi_chunk"] = dpm_solver_pp_sde(key, edm_den, EDM, x[4:8], ts,
                                            example_index=jnp.arange(4, 8))
        return out

    return inputs, {k: np.asarray(v) for k, v in run(inputs).items()}


@pytest.mark.parametrize("case", REF_CASES)
def test_matches_reference_formulas(small_runs, case):
    inputs, out = small_runs
    kw = _ref_case_kwargs(case)
    sde = case.startswith("sde")
    ref = _reference_multistep(
        GAUSS.denoiser(VP), VP, inputs["ref_x"], inputs["ref_ts"], kw["order"], kw["solver_type"],
        0.7 if sde else 0.0, inputs["ref_noise"] if sde else None, kw["lower_order_final"],
    )
    np.testing.assert_allclose(out[case], ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Identities
# ------------------------------------------------------------------------------------------------


def test_order1_equals_ddim(small_runs):
    out = small_runs[1]
    np.testing.assert_allclose(out["pp1"], out["ddim"], rtol=0, atol=1e-10)


def test_sde_order1_eta1_equals_ddpm(small_runs):
    out = small_runs[1]
    np.testing.assert_allclose(out["sde1"], out["ddpm"], rtol=0, atol=1e-10)


def test_sde_eta0_equals_ode(small_runs):
    """eta = 0 with explicit noise (multiplied by a zero std) is the 2M ODE solver."""
    out = small_runs[1]
    np.testing.assert_allclose(out["sde2_eta0"], out["pp2"], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Final exact 0
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [2, 3])
def test_final_exact_zero_returns_denoiser_output(small_runs, order):
    out = small_runs[1]
    np.testing.assert_allclose(out[f"fz{order}"], out[f"fz{order}_expected"], rtol=0, atol=1e-12)


def test_final_exact_zero_singlestep(small_runs):
    """With a denoiser that ignores x, the output is exactly its value at the last positive time."""
    inputs, out = small_runs
    expected = np.full((4, 2), np.log(float(inputs["fz_ts"][-2])))
    np.testing.assert_array_equal(out["fz_3S"], expected)


# ------------------------------------------------------------------------------------------------
# bfloat16 states, gradients
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bfloat16_runs():
    """2M and 3S from the same prior draws with bfloat16 and float32 states, float32 grid."""
    g32 = analytic.Gaussian.from_cov(jnp.asarray(MEAN, jnp.float32), jnp.asarray(COV, jnp.float32))
    den = g32.denoiser(EDM)
    mean, cov = g32.moments()

    @jax.jit
    def run(x_T, ts):
        out = {}
        for dtype in (jnp.bfloat16, jnp.float32):
            x = x_T.astype(dtype)
            for method, samples in [("2M", dpm_solver_pp(None, den, EDM, x, ts, order=2)),
                                    ("3S", dpm_solver_pp_singlestep(None, den, EDM, x, ts,
                                                                    order=3))]:
                m, c = metrics.moments(samples.astype(jnp.float32))
                out[method, jnp.dtype(dtype).name] = (
                    samples, metrics.gaussian_w2(m, c, mean, cov))
        # SDE with key-based noise drawn in bfloat16 (finiteness only: its W2 is statistical).
        out["sde", "bfloat16"] = dpm_solver_pp_sde(jax.random.key(12), den, EDM,
                                                   x_T.astype(jnp.bfloat16), ts)
        return out

    return run(80.0 * _normal(7, (4096, 2), jnp.float32),
               timesteps.karras(EDM, 50, dtype=jnp.float32))


def test_bfloat16_state_sde(bfloat16_runs):
    out = bfloat16_runs["sde", "bfloat16"]
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


@pytest.mark.parametrize("method", ["2M", "3S"])
def test_bfloat16_state(bfloat16_runs, method):
    out16, w16 = bfloat16_runs[method, "bfloat16"]
    out32, w32 = bfloat16_runs[method, "float32"]
    assert out16.dtype == jnp.bfloat16 and out32.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out16, np.float32)))
    assert float(w16) <= 2.0 * float(w32), (float(w16), float(w32))


def _isotropic_denoiser(x, t, cond=None):
    """Exact denoiser of N(0.3, 0.5^2 I) data for EDM (cheap to compile and differentiate)."""
    w = 0.25 / (0.25 + jnp.square(t))
    return 0.3 + w[:, None] * (x - 0.3)


GRAD_METHODS = ["3M", "sde", "3S"]


@pytest.fixture(scope="module")
def gradients():
    """float32, N = 50 ending in an exact 0, grid traced into jit: grads wrt x_init and ts.

    The SDE uses explicit noise (the key-based streams only add a PRNG kernel to compile; they
    are covered by the batch-independence test)."""
    ts = timesteps.karras(EDM, 50, final_zero=True, dtype=jnp.float32)
    x = 80.0 * _normal(8, (8, 2), jnp.float32)
    noise = _normal(9, (50, 1, 8, 2), jnp.float32)
    samplers = {
        "3M": lambda x, ts: dpm_solver_pp(None, _isotropic_denoiser, EDM, x, ts, order=3,
                                          third_order="corrected"),
        "sde": lambda x, ts: dpm_solver_pp_sde(None, _isotropic_denoiser, EDM, x, ts, order=2,
                                               noise=noise),
        "3S": lambda x, ts: dpm_solver_pp_singlestep(None, _isotropic_denoiser, EDM, x, ts,
                                                     order=3),
    }

    @jax.jit
    def grads(x, ts):
        return {
            name: jax.grad(lambda x, ts, f=f: jnp.sum(jnp.square(f(x, ts))), argnums=(0, 1))(x, ts)
            for name, f in samplers.items()
        }

    return x, ts, grads(x, ts)


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_gradients_wrt_x_init_and_grid(gradients, method):
    x, ts, grads = gradients
    gx, gts = grads[method]
    assert gx.shape == x.shape and gts.shape == ts.shape
    assert np.all(np.isfinite(np.asarray(gx))) and np.all(np.isfinite(np.asarray(gts)))
    assert np.any(np.asarray(gts) != 0)


# ------------------------------------------------------------------------------------------------
# SDE batch independence, jit, validation
# ------------------------------------------------------------------------------------------------


def test_sde_batch_independence(small_runs):
    out = small_runs[1]
    np.testing.assert_allclose(out["bi_first"], out["bi_full"][:4], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["bi_chunk"], out["bi_full"][4:8], rtol=0, atol=1e-12)
    assert not np.allclose(out["bi_full"][:4], out["bi_full"][4:8])


def test_jit_traces_once_for_two_grids():
    den = GAUSS.denoiser(EDM)
    traces = []

    @jax.jit
    def run(x, ts):
        traces.append(1)
        return dpm_solver_pp(None, den, EDM, x, ts, order=3, third_order="corrected")

    x = _normal(12, (4, 2))
    a = run(x, timesteps.karras(EDM, 12))
    b = run(x, timesteps.uniform_log_snr(EDM, 12))
    assert len(traces) == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_bad_inputs():
    den = GAUSS.denoiser(EDM)
    ts = timesteps.karras(EDM, 6)
    x = _normal(13, (4, 2))
    with pytest.raises(ValueError, match="order"):
        dpm_solver_pp(None, den, EDM, x, ts, order=4)
    with pytest.raises(ValueError, match="order"):
        dpm_solver_pp(None, den, EDM, x, ts, order="2")
    with pytest.raises(ValueError, match="solver_type"):
        dpm_solver_pp(None, den, EDM, x, ts, solver_type="euler")
    with pytest.raises(ValueError, match="third_order"):
        dpm_solver_pp(None, den, EDM, x, ts, order=3, third_order="doubled")
    with pytest.raises(ValueError, match="order"):
        dpm_solver_pp_sde(None, den, EDM, x, ts, order=3)
    with pytest.raises(ValueError, match="solver_type"):
        dpm_solver_pp_sde(None, den, EDM, x, ts, solver_type="bh2")
    with pytest.raises(ValueError, match="order"):
        dpm_solver_pp_singlestep(None, den, EDM, x, ts, order=0)
    with pytest.raises(ValueError, match="r2"):
        dpm_solver_pp_singlestep(None, den, EDM, x, ts, order=2, r2=0.5)
    with pytest.raises(ValueError, match="r1"):
        dpm_solver_pp_singlestep(None, den, EDM, x, ts, order=2, r1=1.5)
    with pytest.raises(ValueError, match="r1"):
        dpm_solver_pp_singlestep(None, den, EDM, x, ts, order=3, r1=0.7, r2=0.5)
    # history
    t_hist = jnp.array([ts[0] * 1.0 + 1.0, ts[0] + 2.0])
    good_m = jnp.zeros((2, 4, 2))
    with pytest.raises(ValueError, match="history"):
        dpm_solver_pp(None, den, EDM, x, ts, order=3, history=good_m)
    with pytest.raises(ValueError, match="m_hist"):
        dpm_solver_pp(None, den, EDM, x, ts, order=3, history=(jnp.zeros((2, 3, 2)), t_hist))
    with pytest.raises(ValueError, match="t_hist"):
        dpm_solver_pp(None, den, EDM, x, ts, order=3, history=(good_m, t_hist[:1]))
    with pytest.raises(ValueError, match="t_hist"):
        dpm_solver_pp(None, den, EDM, x, ts, order=3, history=(good_m, t_hist[::-1] - 5.0))
    # explicit noise
    with pytest.raises(ValueError, match="noise"):
        dpm_solver_pp_sde(None, den, EDM, x, ts, noise=jnp.zeros((6, 4, 2)))
    with pytest.raises(ValueError, match="eta"):
        dpm_solver_pp_sde(None, den, EDM, x, ts, eta=jnp.ones(3))
    # grid / state validation from check_inputs
    with pytest.raises(ValueError, match="ts"):
        dpm_solver_pp(None, den, EDM, x, ts[::-1])
