"""Tests of jaxdiff.timesteps: grid shapes, end points, spacings, EDM reference values, validation.

Grids are host-side numpy schedules, so these tests are cheap; every grid constructor is
checked on every process type, and each spacing against its defining axis (log-SNR, noise level
to the power 1/rho, sqrt(t)).
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxdiff import processes, timesteps  # noqa: E402

PROCESSES = {
    "vp": processes.VPProcess(),
    "discrete_vp": processes.DiscreteVPProcess.create(1000, "linear"),
    "cosine": processes.CosineVPProcess(),
    "sub_vp": processes.SubVPProcess(),
    "ve": processes.VEProcess(),
    "edm": processes.EDMProcess(),
    "rf": processes.RectifiedFlowProcess(),
    "ou": processes.OUProcess(),
}
GRIDS = {
    "uniform_t": timesteps.uniform_t,
    "uniform_log_snr": timesteps.uniform_log_snr,
    "karras": timesteps.karras,
    "quadratic": timesteps.quadratic,
}
NUM_STEPS = 12


def _make(grid, process, final_zero, **kwargs):
    """A grid with NUM_STEPS + 1 positive points either way (shared shapes share eager compiles)."""
    num_steps = NUM_STEPS + 1 if final_zero else NUM_STEPS
    return num_steps, GRIDS[grid](process, num_steps, final_zero=final_zero, **kwargs)

over_processes = pytest.mark.parametrize("pid", list(PROCESSES))
over_grids = pytest.mark.parametrize("grid", list(GRIDS))

def _pid_grid_params():
    for pid in PROCESSES:
        for grid in GRIDS:
            yield pytest.param(pid, grid, id=f"{grid}-{pid}")


@over_processes
@over_grids
@pytest.mark.parametrize("final_zero", [False, True], ids=["t_min", "zero"])
def test_grid_shape_and_monotone(pid, grid, final_zero):
    process = PROCESSES[pid]
    num_steps, ts = _make(grid, process, final_zero)
    t = np.asarray(ts)
    assert t.shape == (num_steps + 1,)
    assert ts.dtype == jnp.float64  # the default float dtype (x64 is on)
    assert np.all(np.isfinite(t))
    assert np.all(np.diff(t) < 0), t
    inner = t[:-1] if final_zero else t
    lo, hi = float(process.t_min), float(process.t_max)
    # Every positive point lies inside the process range (up to round-off at the ends).
    assert inner.min() >= lo * (1 - 1e-14) and inner.max() <= hi * (1 + 1e-14), t
    if final_zero:
        assert t[-1] == 0.0


@pytest.mark.parametrize("pid, grid", list(_pid_grid_params()))
@pytest.mark.parametrize("final_zero", [False, True], ids=["t_min", "zero"])
def test_grid_end_points_exact(pid, grid, final_zero):
    process = PROCESSES[pid]
    t = np.asarray(_make(grid, process, final_zero)[1])
    assert t[0] == float(process.t_max)
    if final_zero:
        assert t[-1] == 0.0
        assert t[-2] == float(process.t_min)
    else:
        assert t[-1] == float(process.t_min)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_custom_end_points(grid):
    process = PROCESSES["vp"]
    t = np.asarray(GRIDS[grid](process, NUM_STEPS, t_start=0.8, t_end=0.01))
    assert t.shape == (NUM_STEPS + 1,)
    np.testing.assert_allclose([t[0], t[-1]], [0.8, 0.01], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="t_start"):
        GRIDS[grid](process, 8, t_start=0.01, t_end=0.8)


def test_karras_edm_reference_values():
    ts = np.asarray(timesteps.karras(PROCESSES["edm"], 18, final_zero=True))
    assert ts.shape == (19,)
    assert ts[-1] == 0.0
    # Karras et al. (2022) CIFAR-10 schedule as printed (3 decimals): compare within half a unit
    # of the last printed digit on top of rtol 1e-4.
    printed = [80, 57.586, 40.786, 28.375, 19.352, 12.91, 8.401, 5.315, 3.257, 1.923, 1.088,
               0.585, 0.296, 0.14]
    np.testing.assert_allclose(ts[: len(printed)], printed, rtol=1e-4, atol=5e-4)
    # And to round-off EDM's formula sigma_i = (80^(1/7) + i/17 (0.002^(1/7) - 80^(1/7)))^7.
    i = np.arange(18)
    edm = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(ts[:-1], edm, rtol=1e-13, atol=0)


@over_processes
def test_uniform_log_snr_spacing(pid):
    process = PROCESSES[pid]
    ts = timesteps.uniform_log_snr(process, NUM_STEPS)
    lam = np.asarray(process.log_snr(ts))
    d = np.diff(lam)
    assert np.all(d > 0)
    np.testing.assert_allclose(d, np.full_like(d, d.mean()), rtol=0, atol=1e-10)
    lam_ends = [float(process.log_snr(process.t_max)), float(process.log_snr(process.t_min))]
    np.testing.assert_allclose(d.mean(), (lam_ends[1] - lam_ends[0]) / NUM_STEPS, rtol=1e-12)


@over_processes
@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_karras_uniform_in_noise_level_power(pid, rho):
    process = PROCESSES[pid]
    ts = timesteps.karras(process, NUM_STEPS, rho=rho)
    u = np.asarray(process.noise_level(ts)) ** (1 / rho)
    d = np.diff(u)
    assert np.all(d < 0)
    np.testing.assert_allclose(d, np.full_like(d, d.mean()), rtol=0, atol=1e-10)


@over_processes
def test_quadratic_uniform_in_sqrt_t(pid):
    process = PROCESSES[pid]
    ts = np.asarray(timesteps.quadratic(process, NUM_STEPS))
    d = np.diff(np.sqrt(ts))
    np.testing.assert_allclose(d, np.full_like(d, d.mean()), rtol=0, atol=1e-12)


@over_processes
def test_uniform_t_spacing(pid):
    process = PROCESSES[pid]
    ts = np.asarray(timesteps.uniform_t(process, NUM_STEPS))
    d = np.diff(ts)
    np.testing.assert_allclose(d, np.full_like(d, d.mean()), rtol=1e-12, atol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [10, 50, 1000])
def test_ddpm_grid_is_table_times_then_zero(spacing, num_steps):
    process = PROCESSES["discrete_vp"]
    ts = np.asarray(timesteps.ddpm(process, num_steps, spacing=spacing))
    expected = np.concatenate([process.timesteps(num_steps, spacing), [0.0]])
    assert ts.shape == (num_steps + 1,)
    np.testing.assert_array_equal(ts, expected)
    assert np.all(np.diff(ts) < 0)
    no_zero = np.asarray(timesteps.ddpm(process, num_steps, spacing=spacing, final_zero=False))
    np.testing.assert_array_equal(no_zero, expected[:-1])


def test_ddpm_grid_steps_offset():
    process = PROCESSES["discrete_vp"]
    ts = np.asarray(timesteps.ddpm(process, 10, spacing="leading", steps_offset=1))
    np.testing.assert_array_equal(ts[:-1], (np.arange(10)[::-1] * 100 + 1 + 1) / 1000)


@pytest.mark.parametrize("pid", ["vp", "edm", "cosine"])
def test_ddpm_grid_needs_discrete_process(pid):
    with pytest.raises(TypeError, match="process"):
        timesteps.ddpm(PROCESSES[pid], 10)


@over_grids
@pytest.mark.parametrize("num_steps", [0, -3, 2.5, 3.0, "4", None])
def test_bad_num_steps(grid, num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        GRIDS[grid](PROCESSES["vp"], num_steps)


@over_grids
def test_num_steps_numpy_int_and_final_zero_minimum(grid):
    ts = GRIDS[grid](PROCESSES["vp"], np.int64(NUM_STEPS))
    assert ts.shape == (NUM_STEPS + 1,)
    with pytest.raises(ValueError, match="num_steps"):
        GRIDS[grid](PROCESSES["vp"], 1, final_zero=True)
    assert GRIDS[grid](PROCESSES["vp"], 1).shape == (2,)


def test_karras_bad_rho():
    with pytest.raises(ValueError, match="rho"):
        timesteps.karras(PROCESSES["edm"], 10, rho=0.0)


@over_grids
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtype_respected(grid, dtype):
    num_steps, ts = _make(grid, PROCESSES["edm"], True, dtype=dtype)
    assert ts.dtype == dtype
    assert ts.shape == (num_steps + 1,)
    # Still a valid (strictly decreasing) grid after rounding.
    assert np.all(np.diff(np.asarray(ts, dtype=np.float64)) < 0)


def test_ddpm_dtype_respected():
    ts = timesteps.ddpm(PROCESSES["discrete_vp"], 20, dtype=jnp.float32)
    assert ts.dtype == jnp.float32


# -- check_grid ---------------------------------------------------------------------------------


VP = PROCESSES["vp"]


@pytest.mark.parametrize(
    "ts, match",
    [
        ([0.1, 0.5, 0.9], "strictly decreasing"),
        ([0.9, 0.5, 0.5, 0.1], "strictly decreasing"),
        ([0.9, np.nan, 0.1], "finite"),
        ([0.9, 0.5, np.inf], "finite"),
        ([1.5, 0.5, 0.1], r"t_min, t_max"),
        ([0.9, 0.5, 1e-4], r"t_min, t_max"),
        ([0.9, 0.0, 0.0], "strictly decreasing"),
        ([0.9, -0.1], r"t_min, t_max"),
        ([0.5], "at least 2 points"),
        ([], "at least 2 points"),
        ([[0.9, 0.5], [0.4, 0.1]], "1-D"),
    ],
    ids=["increasing", "repeated", "nan", "inf", "above_t_max", "below_t_min", "two_zeros",
         "negative", "one_point", "empty", "2d"],
)
def test_check_grid_errors_name_the_argument(ts, match):
    ts = jnp.asarray(ts, dtype=jnp.float64)
    with pytest.raises(ValueError, match=match) as info:
        timesteps.check_grid(VP, ts)
    assert str(info.value).startswith("ts ")
    with pytest.raises(ValueError) as info:
        timesteps.check_grid(VP, ts, name="my_grid")
    assert str(info.value).startswith("my_grid ")


def test_check_grid_accepts_valid_grids():
    timesteps.check_grid(VP, jnp.array([1.0, 0.5, 1e-3]))
    timesteps.check_grid(VP, jnp.array([1.0, 0.5, 1e-3, 0.0]))  # final exact 0
    timesteps.check_grid(VP, np.array([0.7, 0.2]))  # numpy is fine
    # float32 round-off at the end points is tolerated.
    timesteps.check_grid(VP, jnp.array([1.0, 1e-3], dtype=jnp.float32))


def test_check_grid_final_zero_option():
    with pytest.raises(ValueError, match="t_min, t_max"):
        timesteps.check_grid(VP, jnp.array([1.0, 0.5, 0.0]), allow_final_zero=False)
    with pytest.raises(ValueError, match="t_min, t_max"):
        timesteps.check_grid(VP, jnp.array([1.0, 0.0]), allow_final_zero=False)
    timesteps.check_grid(VP, jnp.array([1.0, 0.0]))  # allowed by default: one step to 0


def test_check_grid_skips_value_checks_under_jit():
    @jax.jit
    def f(ts):
        timesteps.check_grid(VP, ts)  # traced: only the shape is checkable
        return ts

    np.testing.assert_array_equal(np.asarray(f(jnp.array([0.1, 0.5]))), [0.1, 0.5])
    with pytest.raises(ValueError, match="at least 2 points"):
        f(jnp.array([0.5]))


@pytest.mark.parametrize("grid", ["uniform_t", "quadratic", "uniform_log_snr", "karras"])
def test_named_grids_trace_through_process_parameters(grid):
    """Under grad wrt a process parameter the grid equals the host grid and has a derivative."""
    fn = getattr(timesteps, grid)

    def ts_of(beta_max):
        return fn(processes.VPProcess(beta_max=beta_max), 8, final_zero=True)

    host = ts_of(20.0)
    traced = jax.jit(ts_of)(jnp.float64(20.0))
    np.testing.assert_allclose(traced, host, rtol=1e-12, atol=1e-15)
    d = jax.jacfwd(ts_of)(jnp.float64(20.0))
    h = 1e-5
    fd = (np.asarray(ts_of(20.0 + h)) - np.asarray(ts_of(20.0 - h))) / (2 * h)
    np.testing.assert_allclose(d, fd, rtol=1e-5, atol=1e-9)
    assert np.all(np.isfinite(d))
