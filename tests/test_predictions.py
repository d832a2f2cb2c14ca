"""Prediction conversions, denoiser adapters and EDM preconditioning against exact definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import predictions, processes

PROCESSES = {
    "vp": processes.VPProcess(),
    "cosine": processes.CosineVPProcess(),
    "discrete": processes.DiscreteVPProcess.create(1000, "linear"),
    "subvp": processes.SubVPProcess(),
    "ve": processes.VEProcess(),
    "edm": processes.EDMProcess(),
    "rf": processes.RectifiedFlowProcess(),
    "ou": processes.OUProcess(),
}
PROCESS_IDS = list(PROCESSES)


def _setup(process, dtype, batch=48, dim=5):
    """Times log-spaced over [t_min, t_max] (end points included) and an exact (x0, eps, x_t)."""
    t_min, t_max = float(process.t_min), float(process.t_max)
    t = np.exp(np.linspace(np.log(t_min), np.log(t_max), batch))
    t[0], t[-1] = t_min, t_max
    t = jnp.asarray(t, dtype)
    k0, k1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k0, (batch, dim), dtype)
    eps = jax.random.normal(k1, (batch, dim), dtype)
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    x = (alpha * x0 + sigma * eps).astype(dtype)
    return t, x0, eps, x


def _exact(kind, process, x0, eps, t):
    """Each kind from its definition (float64 reference)."""
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    d_alpha, d_sigma = process.d_alpha(t)[:, None], process.d_sigma(t)[:, None]
    return {
        "x0": x0,
        "eps": eps,
        "v": alpha * eps - sigma * x0,
        "score": -eps / sigma,
        "velocity": d_alpha * x0 + d_sigma * eps,
    }[kind]


@pytest.mark.parametrize("name", PROCESS_IDS)
def test_convert_matches_definitions_float64(name):
    process = PROCESSES[name]
    t, x0, eps, x = _setup(process, jnp.float64)
    for src in predictions.KINDS:
        pred = _exact(src, process, x0, eps, t)
        for dst in predictions.KINDS:
            out = predictions.convert(pred, process, x, t, from_kind=src, to_kind=dst)
            ref = _exact(dst, process, x0, eps, t)
            # Errors scale with the conditioning max(1, sigma/alpha, alpha/sigma) of the solve.
            alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
            cond = np.maximum(1.0, np.maximum(sigma / alpha, alpha / sigma))
            scale = np.maximum(1.0, np.max(np.abs(np.asarray(ref)), axis=1, keepdims=True))
            err = np.max(np.abs(np.asarray(out) - np.asarray(ref)) / (cond * scale))
            assert err < 1e-12, (src, dst, err)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("name", PROCESS_IDS)
def test_round_trip_all_pairs(name, dtype):
    """A -> B -> A to 1e-12 in float64; within 8 eps max(1, sigma/alpha, alpha/sigma) in float32."""
    process = PROCESSES[name]
    t, x0, eps, x = _setup(process, dtype)
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    cond = np.maximum(1.0, np.maximum(np.asarray(sigma / alpha), np.asarray(alpha / sigma)))
    # float64: 1e-12, except where the conditioning itself exceeds ~560 (sigma/alpha ~ 1e4 at the
    # ends of VE, sub-VP and OU) -- there 8 eps cond, the float32 rule at float64 precision.
    eps64 = np.finfo(np.float64).eps
    rtol = (np.maximum(1e-12, 8 * eps64 * cond) / cond if dtype == jnp.float64
            else 8 * np.finfo(np.float32).eps)
    for src in predictions.KINDS:
        pred = _exact(src, process, x0, eps, t).astype(dtype)
        for dst in predictions.KINDS:
            mid = predictions.convert(pred, process, x, t, from_kind=src, to_kind=dst)
            back = predictions.convert(mid, process, x, t, from_kind=dst, to_kind=src)
            # Relative to the row's magnitude: per-element relative error is meaningless near 0.
            scale = np.maximum(1.0, np.max(np.abs(np.asarray(pred, np.float64)), 1, keepdims=True))
            err = np.abs(np.asarray(back, np.float64) - np.asarray(pred, np.float64)) / scale
            assert np.all(err <= rtol * cond), (src, dst, float(np.max(err / (rtol * cond))))


def test_velocity_is_pf_ode_velocity_and_rectified_flow_target():
    process = processes.RectifiedFlowProcess()
    t, x0, eps, x = _setup(process, jnp.float64)
    u = predictions.convert(x0, process, x, t, from_kind="x0", to_kind="velocity")
    np.testing.assert_allclose(u, eps - x0, rtol=0, atol=1e-10)
    for p in PROCESSES.values():
        t, x0, eps, x = _setup(p, jnp.float64)
        u = predictions.convert(x0, p, x, t, from_kind="x0", to_kind="velocity")
        v_pf = p.pf_velocity(x, t, x0)
        scale = np.maximum(1.0, np.max(np.abs(np.asarray(v_pf)), axis=1, keepdims=True))
        assert np.max(np.abs(np.asarray(u - v_pf)) / scale) < 1e-9


def test_to_and_from_denoiser_are_inverse_and_jit():
    process = processes.VPProcess()
    t, x0, eps, x = _setup(process, jnp.float64)

    def eps_net(x_in, t_in, cond):
        del cond
        return _exact("eps", process, x0, eps, t_in)

    denoiser = predictions.to_denoiser(eps_net, process, "eps")
    np.testing.assert_allclose(jax.jit(denoiser)(x, t), x0, rtol=0, atol=1e-9)
    back = predictions.from_denoiser(denoiser, process, "eps")
    np.testing.assert_allclose(back(x, t), eps, rtol=0, atol=1e-9)
    # Traced times skip the host-side checks but give the same result.
    jitted = jax.jit(lambda p, xx, tt: predictions.convert(
        eps, p, xx, tt, from_kind="eps", to_kind="x0"))
    np.testing.assert_allclose(jitted(process, x, t), x0, rtol=0, atol=1e-9)


def test_denoiser_output_is_at_least_float32():
    process = processes.EDMProcess()
    denoiser = predictions.to_denoiser(lambda x, t, c: x, process, "eps")
    x = jnp.ones((2, 3), jnp.bfloat16)
    assert denoiser(x, jnp.ones((2,), jnp.float32)).dtype == jnp.float32


def _raw_net(x_in, c_noise, cond):
    del cond
    return jnp.tanh(x_in) + c_noise[:, None]


def test_edm_precondition_matches_karras_table1():
    process = processes.EDMProcess(sigma_data=0.5)
    t, x0, eps, x = _setup(process, jnp.float64)
    sd = 0.5
    s = t[:, None]
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / jnp.sqrt(s**2 + sd**2)
    c_in = 1 / jnp.sqrt(s**2 + sd**2)
    ref = c_skip * x + c_out * _raw_net(c_in * x, 0.25 * jnp.log(t), None)
    out = predictions.edm_precondition(_raw_net, process)(x, t)
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["vp", "cosine", "rf", "ou"])
def test_edm_precondition_is_process_invariant(name):
    """D_process(x, t) = D_EDM(x / alpha, sigma / alpha): one network serves every process."""
    process = PROCESSES[name]
    t, x0, eps, x = _setup(process, jnp.float64)
    alpha = process.alpha(t)[:, None]
    edm = processes.EDMProcess(sigma_data=0.5, t_min=1e-6, t_max=1e6)
    ref = predictions.edm_precondition(_raw_net, edm)(x / alpha, process.noise_level(t))
    out = predictions.edm_precondition(_raw_net, process, sigma_data=0.5)(x, t)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


def test_unknown_kind_is_refused():
    process = processes.VPProcess()
    x = jnp.ones((2, 3))
    t = jnp.full((2,), 0.5)
    with pytest.raises(ValueError, match="from_kind"):
        predictions.convert(x, process, x, t, from_kind="epsilon", to_kind="x0")
    with pytest.raises(ValueError, match="to_kind"):
        predictions.convert(x, process, x, t, from_kind="eps", to_kind="noise")
    with pytest.raises(ValueError, match="kind"):
        predictions.to_denoiser(lambda *a: x, process, "sample")


def test_alpha_zero_conversion_is_refused():
    process = processes.CosineVPProcess()
    x = jnp.ones((2, 3))
    t = jnp.array([0.5, 1.0])  # alpha(1) = 0 for the cosine schedule
    with pytest.raises(ValueError, match="alpha"):
        predictions.convert(x, process, x, t, from_kind="eps", to_kind="x0")
    with pytest.raises(ValueError, match="alpha"):
        predictions.convert(x, process, x, t, from_kind="score", to_kind="v")


def test_time_outside_range_is_refused():
    process = processes.VPProcess()
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="t must lie in"):
        predictions.convert(x, process, x, jnp.array([0.5, 0.0]), from_kind="x0", to_kind="eps")
    with pytest.raises(ValueError, match="t must have shape"):
        predictions.convert(x, process, x, jnp.full((3,), 0.5), from_kind="x0", to_kind="eps")


def test_public_names_exported():
    for name in ["Denoiser", "convert", "to_denoiser", "from_denoiser", "edm_precondition"]:
        assert getattr(jaxdiff, name) is getattr(predictions, name)


def test_convert_under_jit_with_concrete_times_closed_over():
    """The alpha > 0 check must not force a tracer to the host when t is a captured constant."""
    process = jaxdiff.VPProcess()
    x = jnp.ones((2, 3))
    t = jnp.array([0.3, 0.5])
    eps = jnp.full((2, 3), 0.25)
    expected = jaxdiff.convert(eps, process, x, t, from_kind="eps", to_kind="x0")
    jitted = jax.jit(lambda e: jaxdiff.convert(e, process, x, t, from_kind="eps", to_kind="x0"))
    np.testing.assert_allclose(jitted(eps), expected, rtol=1e-14)
