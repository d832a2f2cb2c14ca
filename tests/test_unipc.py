"""Tests of the UniPC sampler (jaxdiff.samplers._unipc), in float64.

Accuracy is checked two ways (review findings 2 and 4 of the research report):

* polynomial exactness: a denoiser that ignores ``x`` and returns ``P(lambda(t))`` (half-log-SNR)
  turns the PF-ODE into :math:`x_s = \\frac{\\sigma_s}{\\sigma_t}x_t + \\sigma_s
  \\int_{\\lambda_t}^{\\lambda_s} e^{\\lambda}P(\\lambda)\\,d\\lambda`, integrated here by 60-point
  Gauss-Legendre (exact to round-off for these smooth integrands);
* a fixed convergence protocol on 2-D Gaussian data with an exact warm start taken from the
  closed-form flow (``Gaussian.flow``).

Compilation dominates the run time on CPU (~0.3-0.5 s per scan), so each check runs under one
``jax.jit`` and several runs share it (one polynomial per batch row; both corrector settings in
one compiled function).
"""

import functools

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxdiff import metrics, timesteps  # noqa: E402
from jaxdiff.analytic import Gaussian  # noqa: E402
from jaxdiff.processes import EDMProcess, VPProcess  # noqa: E402
from jaxdiff.samplers._first_order import ddim  # noqa: E402
from jaxdiff.samplers._unipc import unipc  # noqa: E402

try:  # written concurrently; the cross-check is skipped while it is missing
    from jaxdiff.samplers._dpm_solver import dpm_solver_pp
except ImportError:  # pragma: no cover
    dpm_solver_pp = None

EDM = EDMProcess()
VP = VPProcess()
GAUSS = Gaussian.from_cov(jnp.array([0.4, -0.3]), jnp.array([[0.6, 0.25], [0.25, 0.35]]))


def _lam(process, t):
    return 0.5 * np.asarray(process.log_snr(jnp.asarray(t)), dtype=np.float64)


def _batch_t(t, x):
    return jnp.full((x.shape[0],), t)


# ------------------------------------------------------------------------------------------------
# Polynomial exactness: x0_hat(lambda) = P_d(lambda) in batch row d, P_d of degree exactly d
# ------------------------------------------------------------------------------------------------

POLY_N = 10  # steps of the Karras grid (non-uniform in lambda), plus one tiny last step
TINY_H = 1e-8  # lambda-length of the last (uncorrected) step
MAX_DEG = 4

# Degrees integrated exactly, as found by these tests (both variants): the predictor UniP-p is
# exact for degree < PRED_EXACT[p], the corrected states of UniC-p for degree < CORR_EXACT[p].
# The reference's simplified rho = 1/2 (order-2 predictor, order-1 corrector) is exact for
# constants only; all other cases are exact to the full design degree (p resp. p + 1).
PRED_EXACT = {1: 1, 2: 1, 3: 3}
CORR_EXACT = {1: 1, 2: 3, 3: 4}
# simplified_rho=False solves those two systems too: exact to the design degree everywhere.
PRED_EXACT_SOLVED = {1: 1, 2: 2, 3: 3}
CORR_EXACT_SOLVED = {1: 2, 2: 3, 3: 4}


def _poly_coeffs():
    """Row d: coefficients (lowest first) of a degree-d polynomial in u = (lam - 1)/5."""
    rng = np.random.default_rng(0)
    c = rng.uniform(-1.0, 1.0, (MAX_DEG + 1, MAX_DEG + 1))
    for d in range(MAX_DEG + 1):
        c[d, d + 1:] = 0.0
        c[d, d] = np.sign(c[d, d]) * max(abs(c[d, d]), 0.5)
    return c


def _poly_eval(coeffs, lam):
    """P_b(lam) for coeffs (B, D+1, ...) and lam broadcastable to (B, ...)."""
    u = (lam - 1.0) / 5.0
    return sum(coeffs[:, j] * u**j for j in range(coeffs.shape[1]))


def _poly_denoiser(coeffs):
    def denoiser(x, t, cond=None):
        return _poly_eval(coeffs, 0.5 * EDM.log_snr(t))[:, None] * jnp.ones_like(x)

    return denoiser


def _exact_poly(coeffs, x0, t0, t1):
    r"""x(t1) = (t1/t0) x0 + sigma_1 \int_{lam_0}^{lam_1} e^lam P(lam) dlam for EDM."""
    lam0, lam1 = _lam(EDM, t0), _lam(EDM, t1)
    nodes, weights = np.polynomial.legendre.leggauss(60)
    lam = 0.5 * (lam1 - lam0) * nodes + 0.5 * (lam1 + lam0)
    vals = np.exp(lam - lam1)[None, :] * _poly_eval(coeffs[:, :, None], lam[None, :])
    return (t1 / t0) * x0 + 0.5 * (lam1 - lam0) * (vals @ weights)[:, None]


def _poly_setup(order):
    """Grid (Karras, plus a tiny last step) and full history (order entries) for ``order``."""
    k = order  # order - 1 entries are needed; the extra one must be ignored
    grid = np.asarray(timesteps.karras(EDM, POLY_N + k, t_end=0.004), dtype=np.float64)
    # Every state but the last is corrected; the last (uncorrected UniP) step is made tiny, so
    # its local error (<= O(TINY_H^2)) is negligible and the output shows the corrected states.
    ts = np.concatenate([grid[k:], [grid[-1] * np.exp(-TINY_H)]])
    return ts, grid[k - 1::-1]


@functools.cache
def _poly_errors():
    """|error| (B = degrees,) for every (order, variant, corrector), from one compiled function."""
    coeffs = _poly_coeffs()
    x = np.random.default_rng(1).normal(size=(MAX_DEG + 1, 1))
    setups = {order: _poly_setup(order) for order in (1, 2, 3)}

    @jax.jit
    def run(coeffs, x, setups):
        den = _poly_denoiser(coeffs)
        out = {}
        for order, (ts, t_hist) in setups.items():
            m_hist = jax.vmap(lambda t: den(x, _batch_t(t, x)))(t_hist)
            for variant in ("bh1", "bh2"):
                for corrector in (False, True):
                    for simplified in (True, False):
                        out[order, variant, corrector, simplified] = unipc(
                            None, den, EDM, x, ts, order=order, variant=variant,
                            corrector=corrector, lower_order_final=False,
                            history=(m_hist, t_hist), simplified_rho=simplified,
                        )
        return out

    outs = run(jnp.asarray(coeffs), jnp.asarray(x), jax.tree.map(jnp.asarray, setups))
    return {
        key: np.abs(np.asarray(out) - _exact_poly(coeffs, x, setups[key[0]][0][0],
                                                   setups[key[0]][0][-1]))[:, 0]
        for key, out in outs.items()
    }


@pytest.mark.parametrize("order", [1, 2, 3])
def test_polynomial_exactness(order):
    print(f"\nUniPC-{order}: |error| for polynomial degree 0..{MAX_DEG}")
    for variant in ("bh1", "bh2"):
        for corrector in (False, True):
            for simplified in (True, False):
                err = _poly_errors()[order, variant, corrector, simplified]
                print(f"  {variant} corrector={corrector!s:5} simplified_rho={simplified!s:5}: "
                      + " ".join(f"{e:.1e}" for e in err))
                if simplified:
                    exact_below = (CORR_EXACT if corrector else PRED_EXACT)[order]
                else:
                    exact_below = (CORR_EXACT_SOLVED if corrector else PRED_EXACT_SOLVED)[order]
                case = (variant, corrector, simplified)
                for d in range(MAX_DEG + 1):
                    assert (err[d] < 1e-12) == (d < exact_below), (case, d, err)
                    assert err[d] < 1e-12 or err[d] > 1e-8, (case, d, err)


# ------------------------------------------------------------------------------------------------
# Convergence protocol: EDM, 2-D Gaussian, Karras 80 -> 0.002, exact warm start
# ------------------------------------------------------------------------------------------------

# Order 4 (UniC-3) is pre-asymptotic at N = 16 on this grid (local slopes 3.26, 3.74, 3.88,
# 3.94, 3.97 from N = 16 to 512); round-off is far below (error 4e-8 at N = 512).
CONV_NS = {1: (16, 32, 64, 128), 2: (16, 32, 64, 128), 3: (32, 64, 128, 256)}
CONV_B = 16
# Axis-aligned covariance: the denoiser is then elementwise, which halves the compile time of
# the 24 scans; UniPC commutes with rotations (scalar coefficients), so nothing is lost.
CONV_MEAN, CONV_VARS = (0.4, -0.3), (0.6, 0.2)
CONV_GAUSS = Gaussian.from_cov(jnp.array(CONV_MEAN), jnp.diag(jnp.array(CONV_VARS)))


def _conv_denoiser(x, t, cond=None):
    """E[x0 | x_t] of CONV_GAUSS under EDM, written elementwise."""
    mean, var = jnp.array(CONV_MEAN)[None, :], jnp.array(CONV_VARS)[None, :]
    return mean + (x - mean) * (var / (var + jnp.square(t)[:, None]))


def _conv_errors(x_T, full, order):
    """Max |error| at full[-1] without/with corrector; exact history at full[:order]."""
    t_hist = full[order - 1::-1]
    den, flow = _conv_denoiser, functools.partial(CONV_GAUSS.flow, EDM, x_T, full[0])
    xs = jax.vmap(flow)(t_hist)  # exact states
    m_hist = jax.vmap(lambda x, t: den(x, _batch_t(t, x)))(xs, t_hist)
    out = [unipc(None, den, EDM, flow(full[order]), full[order:], order=order, corrector=c,
                 lower_order_final=False, history=(m_hist, t_hist)) for c in (False, True)]
    return jnp.stack([jnp.max(jnp.abs(o - flow(full[-1]))) for o in out])


@functools.cache
def _conv_tables():
    """order -> errors (len(CONV_NS[order]), 2) without/with corrector, one compiled function."""
    x_T, _ = CONV_GAUSS.sample_marginal(jax.random.key(3), EDM, 80.0, CONV_B)
    grids = {order: [timesteps.karras(EDM, n + order) for n in ns] for order, ns in CONV_NS.items()}

    @jax.jit
    def run(x_T, grids):
        t = _batch_t(1.5, x_T)
        den_err = jnp.max(jnp.abs(_conv_denoiser(x_T, t) - CONV_GAUSS.denoise(EDM, x_T, t)))
        return den_err, {order: jnp.stack([_conv_errors(x_T, full, order) for full in fulls])
                         for order, fulls in grids.items()}

    den_err, tables = run(x_T, grids)
    assert float(den_err) < 1e-13
    return {order: np.asarray(errs) for order, errs in tables.items()}


def _slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_convergence_order(order):
    ns, errs = CONV_NS[order], _conv_tables()[order]
    slopes = [_slope(ns, errs[:, c]) for c in (0, 1)]
    print(f"\nUniPC-{order} bh2, max error vs N = {ns}")
    for c, name in enumerate(("predictor", "corrector")):
        print(f"  {name}: " + " ".join(f"{e:.3e}" for e in errs[:, c])
              + f"   slope {slopes[c]:.2f}")
    assert slopes[0] >= order - 0.2
    assert slopes[1] >= order + 1 - 0.2
    assert np.all(errs[:, 1] < errs[:, 0])


# ------------------------------------------------------------------------------------------------
# Identities: UniP-2 bh2 = DPM-Solver++(2M) midpoint; UniP-1 = DDIM(0)
# ------------------------------------------------------------------------------------------------


def _dpmpp_2m_reference(denoiser, process, x, ts, lower_order_final=True):
    """A literal numpy loop of DPM-Solver++(2M), midpoint (diffusers / k-diffusion)."""
    ts = np.asarray(ts, dtype=np.float64)
    num = len(ts) - 1
    pos = ts > 0
    lam, alpha, sigma = (np.where(pos, np.asarray(f(jnp.asarray(np.where(pos, ts, 1.0)))), 0.0)
                         for f in (lambda t: 0.5 * process.log_snr(t), process.alpha,
                                   process.sigma))
    m_prev = None
    for n in range(num):
        m0 = np.asarray(denoiser(jnp.asarray(x), _batch_t(ts[n], x)))
        if ts[n + 1] == 0:
            return m0
        h = lam[n + 1] - lam[n]
        order = min(2, n + 1, num - n) if lower_order_final else min(2, n + 1)
        d = m0 if order == 1 else m0 + 0.5 * (m0 - m_prev) / ((lam[n] - lam[n - 1]) / h)
        x = sigma[n + 1] / sigma[n] * x - alpha[n + 1] * np.expm1(-h) * d
        m_prev = m0
    return x


def test_bh2_order2_predictor_is_dpm_solver_pp_2m():
    den = GAUSS.denoiser(VP)
    x = GAUSS.sample_marginal(jax.random.key(4), VP, 1.0, 8)[0]
    ts = timesteps.uniform_t(VP, 12)  # non-uniform in lambda

    @jax.jit
    def run(x, ts):
        out = {}
        for lof in (True, False):
            out[lof, "unipc"] = unipc(None, den, VP, x, ts, order=2, variant="bh2",
                                      corrector=False, lower_order_final=lof)
            if dpm_solver_pp is not None and lof:
                out[lof, "dpm"] = dpm_solver_pp(None, den, VP, x, ts, order=2,
                                                solver_type="midpoint", lower_order_final=lof)
        return out

    out = run(x, ts)
    for lof in (True, False):
        ref = _dpmpp_2m_reference(den, VP, np.asarray(x), ts, lof)
        np.testing.assert_allclose(np.asarray(out[lof, "unipc"]), ref, rtol=0, atol=1e-10)
        if (lof, "dpm") in out:
            np.testing.assert_allclose(np.asarray(out[lof, "unipc"]), np.asarray(out[lof, "dpm"]),
                                       rtol=0, atol=1e-10)
    if dpm_solver_pp is None:
        pytest.skip("jaxdiff.samplers._dpm_solver.dpm_solver_pp not available (numpy ref. passed)")


def test_order1_predictor_is_ddim():
    den = GAUSS.denoiser(EDM)
    x = GAUSS.sample_marginal(jax.random.key(5), EDM, 80.0, 8)[0]
    ts = timesteps.karras(EDM, 10, final_zero=True)
    run = jax.jit(lambda x, ts: (unipc(None, den, EDM, x, ts, order=1, corrector=False),
                                 ddim(None, den, EDM, x, ts)))
    got, ref = run(x, ts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Final exact 0, low precision, gradients, compilation, validation
# ------------------------------------------------------------------------------------------------


def test_final_exact_zero_returns_denoiser_output():
    den = GAUSS.denoiser(EDM)
    x = GAUSS.sample_marginal(jax.random.key(6), EDM, 80.0, 8)[0]
    ts = timesteps.karras(EDM, 12, final_zero=True)

    @jax.jit
    def run(x, ts):
        kw = dict(order=3, corrector=True, lower_order_final=False)
        # The truncated run ends with the (uncorrected) predicted state at ts[-2] whose
        # evaluation the last step returns (same step orders without lower_order_final).
        x_pen = unipc(None, den, EDM, x, ts[:-1], **kw)
        return unipc(None, den, EDM, x, ts, **kw), den(x_pen, _batch_t(ts[-2], x))

    out, ref = run(x, ts)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-12)
    assert float(jnp.max(jnp.abs(out))) < 10.0  # the data's scale, from 80


def test_bfloat16_state():
    f32 = jnp.float32
    g = jax.tree.map(lambda a: a.astype(f32), GAUSS)
    den = g.denoiser(EDM)
    ts = timesteps.karras(EDM, 16, final_zero=True, dtype=f32)
    x = (80.0 * jax.random.normal(jax.random.key(7), (2048, 2))).astype(f32)

    @jax.jit
    def run(x, ts):
        out = {}
        for dtype in (jnp.bfloat16, f32):
            y = unipc(None, den, EDM, x.astype(dtype), ts)
            w2 = metrics.gaussian_w2(*metrics.moments(y.astype(f32)), *g.moments())
            out[jnp.dtype(dtype).name] = (y, w2)
        return out

    out = run(x, ts)
    for name, (y, _) in out.items():
        assert y.dtype == jnp.dtype(name)
        assert np.all(np.isfinite(np.asarray(y.astype(f32))))
    w2_bf16, w2_f32 = float(out["bfloat16"][1]), float(out["float32"][1])
    print(f"\nW2 to the data: bfloat16 {w2_bf16:.4f}, float32 {w2_f32:.4f}")
    assert w2_bf16 <= 2.0 * w2_f32


def test_gradients_finite():
    den = GAUSS.denoiser(EDM)
    x = GAUSS.sample_marginal(jax.random.key(8), EDM, 80.0, 4)[0]
    ts = timesteps.karras(EDM, 20, final_zero=True)
    # order 3 with an empty history: the warm-up steps select among unused branches.

    def loss(x, ts):
        return jnp.sum(jnp.square(unipc(None, den, EDM, x, ts, order=3, corrector=True)))

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    _, (gx, gts) = value_and_grad(x, ts)
    assert np.all(np.isfinite(np.asarray(gx))) and np.all(np.isfinite(np.asarray(gts)))
    assert float(jnp.max(jnp.abs(gts[1:-1]))) > 0.0
    # Directional derivative along a smooth perturbation of the interior grid points.
    v = jnp.zeros_like(ts).at[1:-1].set(jnp.sin(jnp.arange(ts.shape[0] - 2.0)) * ts[1:-1] * 1e-2)
    eps = 1e-5
    fd = (value_and_grad(x, ts + eps * v)[0] - value_and_grad(x, ts - eps * v)[0]) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(gts, v)), float(fd), rtol=1e-5)


def test_jit_compiles_once_for_equal_length_grids():
    den = GAUSS.denoiser(EDM)
    traces = []

    @jax.jit
    def run(x, ts):
        traces.append(1)
        return unipc(None, den, EDM, x, ts, order=2, variant="bh1", corrector=False)

    x = GAUSS.sample_marginal(jax.random.key(9), EDM, 80.0, 4)[0]
    a = run(x, timesteps.karras(EDM, 8))
    b = run(x, timesteps.uniform_log_snr(EDM, 8))
    assert len(traces) == 1
    assert np.all(np.isfinite(np.asarray(a))) and not np.allclose(np.asarray(a), np.asarray(b))


def test_bad_input():
    den = GAUSS.denoiser(EDM)
    x = jnp.zeros((4, 2))
    ts = timesteps.karras(EDM, 8)
    with pytest.raises(ValueError, match="variant"):
        unipc(None, den, EDM, x, ts, variant="bh3")
    for order in (0, 4, 2.0, True):
        with pytest.raises(ValueError, match="order"):
            unipc(None, den, EDM, x, ts, order=order)
    bad_histories = [
        (jnp.zeros((2, 4, 3)), jnp.array([1.0, 2.0])),  # m_hist shape
        (jnp.zeros((2, 4, 2)), jnp.array([1.0])),  # t_hist shape
        (jnp.zeros((1, 4, 2)), jnp.array([40.0])),  # not before ts[0]
        (jnp.zeros((2, 4, 2)), jnp.array([79.9, 79.95])[::-1]),  # not most recent first
        jnp.zeros((2, 4, 2)),  # not a pair
    ]
    short = timesteps.karras(EDM, 8, t_start=40.0)
    for history in bad_histories:
        with pytest.raises(ValueError, match="history"):
            unipc(None, den, EDM, x, short, history=history)
