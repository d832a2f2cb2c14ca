"""Parity of jaxdiff's samplers with Hugging Face diffusers' schedulers (optional, ``-m parity``).

Run (needs ``torch`` and ``diffusers``; see ``tests/PARITY.md``)::

    python3 -m pytest tests/test_parity_diffusers.py -m parity -q

Without torch/diffusers the module is skipped; without ``-m parity`` it is deselected.

Method. The data are a 3-D Gaussian, so the exact denoiser :math:`E[x_0 \\mid x_t]` is known in
closed form. diffusers gets it through its own model interface (``prediction_type="sample"``
where the scheduler supports it, an exact epsilon otherwise) in float64 torch, evaluated at the
scheduler's integer timestep (``alphas_cumprod[t]``); jaxdiff gets
:meth:`jaxdiff.analytic.Gaussian.denoiser` on :class:`jaxdiff.DiscreteVPProcess` at the times
``(t + 1)/N`` of the same table indices. A step to ``alpha = 1`` (``set_alpha_to_one=True``,
``final_sigmas_type="zero"``, DDPM's ``prev_t = -1``) is jaxdiff's final exact 0; a step to
``alphas_cumprod[0]`` (``set_alpha_to_one=False``, ``final_sigmas_type="sigma_min"``) is the time
``1/N``. Stochastic schedulers get the same standard normals as jaxdiff's explicit ``noise``
(``variance_noise=`` where ``step`` accepts it, otherwise the module's ``randn_tensor`` is
replaced for the test).

Float64. diffusers builds its tables with an explicit ``dtype=torch.float32`` /
``.astype(np.float32)`` and several ``step`` methods "upcast" the state with
``sample.to(torch.float32)``, which truncates a float64 state. The fixture ``f64`` therefore
runs each scheduler module with ``torch.float32`` and ``np.float32`` aliased to float64 (the
module's global names only, undone after the test); nothing else in diffusers changes, and
``test_float64_patch_changes_precision_only`` checks that the stock float32 run agrees to float32
round-off. With that, every case where the two algorithms are algebraically identical agrees to
``ATOL = 1e-8`` (observed: 2e-16 to 2e-14, listed in ``tests/PARITY.md``).

diffusers options chosen to avoid its quirks where jaxdiff intentionally differs:
``clip_sample=False`` (DDIM/DDPM clamp x0_hat to [-1, 1] by default; jaxdiff clips only via
:func:`jaxdiff.samplers.clip_x0`), ``thresholding=False`` (the default), ``steps_offset=0``.
"""

import functools
import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jaxdiff  # noqa: E402
from jaxdiff import samplers  # noqa: E402
from jaxdiff import timesteps as grids  # noqa: E402
from jaxdiff.analytic import Gaussian  # noqa: E402

pytestmark = [
    pytest.mark.parity,
    # torch 2.13's Tensor.__array__ has no ``copy`` keyword; numpy 2.x warns when diffusers calls
    # np.array(tensor) (stock diffusers code, not the float64 aliasing below).
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
]

ATOL = 1e-8  # float64 runs of algebraically identical methods; observed differences are ~1e-14
N_TRAIN = 1000
KEY = jax.random.key(0)
B, D = 4, 3

SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
}

_MEAN = np.array([0.3, -0.5, 0.8])
_A = np.array([[0.9, 0.2, -0.1], [0.0, 0.5, 0.3], [0.4, -0.2, 0.7]])
GAUSS = Gaussian.from_cov(jnp.asarray(_MEAN), jnp.asarray(_A @ _A.T + 0.05 * np.eye(D)))
_T_MEAN = torch.tensor(_MEAN, dtype=torch.float64)
_T_VECS = torch.tensor(np.asarray(GAUSS.eigvecs), dtype=torch.float64)
_T_VALS = torch.tensor(np.asarray(GAUSS.eigvals), dtype=torch.float64)

_RNG = np.random.default_rng(20240611)
X_INIT = _RNG.standard_normal((B, D))  # the VP state at the first grid time
Z = _RNG.standard_normal((64, B, D))  # the noise of step n is Z[n]


def _process(schedule="linear"):
    kw = SCHEDULES[schedule]
    return jaxdiff.DiscreteVPProcess.create(
        N_TRAIN, schedule, beta_start=kw["beta_start"], beta_end=kw["beta_end"]
    )


# -- the exact denoiser, torch side ---------------------------------------------------------------


def torch_x0(x, alpha, sigma):
    """Posterior mean E[x0 | alpha x0 + sigma eps = x] of GAUSS in float64 torch; x is (B, D)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    coef = alpha * _T_VALS / (alpha**2 * _T_VALS + sigma**2)
    return _T_MEAN + (((x - alpha * _T_MEAN) @ _T_VECS) * coef) @ _T_VECS.T


def x0_at_index(sched, x, t):
    """The exact denoiser at integer table index t, from the scheduler's own alphas_cumprod."""
    abar = sched.alphas_cumprod[int(t)]
    return torch_x0(x, abar.sqrt(), (1.0 - abar).sqrt())


def eps_at_index(sched, x, t):
    """The exact epsilon (x - sqrt(abar) x0)/sqrt(1 - abar) at integer table index t."""
    abar = sched.alphas_cumprod[int(t)]
    return (x - abar.sqrt() * x0_at_index(sched, x, t)) / (1.0 - abar).sqrt()


def x0_at_sigma(x, sigma_ve):
    """The exact denoiser at the VE noise level sigma = sigma_t/alpha_t, x the VP state."""
    alpha = 1.0 / (1.0 + sigma_ve**2).sqrt()
    return torch_x0(x, alpha, sigma_ve * alpha)


# -- float64 diffusers ---------------------------------------------------------------------------


class _Float64Alias:
    """Stand-in for a module (torch, numpy) whose ``float32`` is ``float64``."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, "float64" if name == "float32" else name)


class _NoiseFeed:
    """Replacement for a scheduler module's ``randn_tensor``: returns ``current`` (set per step)."""

    def __init__(self):
        self.current = None
        self.calls = 0

    def __call__(self, shape, *args, dtype=None, **kwargs):
        assert tuple(shape) == tuple(self.current.shape), (shape, self.current.shape)
        self.calls += 1
        return self.current.to(dtype or torch.float64)


@pytest.fixture
def f64(monkeypatch):
    """``f64(cls, **config)`` builds a diffusers scheduler whose module computes in float64."""

    def make(cls, *, schedule="linear", noise_feed=None, **config):
        module = sys.modules[cls.__module__]
        monkeypatch.setattr(module, "torch", _Float64Alias(torch))
        if hasattr(module, "np"):
            monkeypatch.setattr(module, "np", _Float64Alias(np))
        if noise_feed is not None:
            monkeypatch.setattr(module, "randn_tensor", noise_feed)
        if schedule is not None:  # always explicit: e.g. HeunDiscrete defaults to 0.00085..0.012
            config = {**SCHEDULES[schedule], **config}
        sched = cls(num_train_timesteps=N_TRAIN, **config)
        if schedule is not None:
            assert sched.alphas_cumprod.dtype == torch.float64
        return sched

    return make


# -- helpers --------------------------------------------------------------------------------------


def vp_grid(timesteps, last):
    """jaxdiff times (t + 1)/N of integer timesteps, then 0 (``"zero"``) or 1/N (``"sigma_min"``).
    """
    idx = np.asarray(timesteps, dtype=np.float64)
    assert np.all(idx == np.round(idx)), "only integer timesteps map onto the table's knots"
    tail = {"zero": 0.0, "sigma_min": 1.0 / N_TRAIN}[last]
    return np.concatenate([(idx + 1.0) / N_TRAIN, [tail]])


_JITTED = {}


def run_jaxdiff(sampler, process, ts, x_init=X_INIT, noise=None, transform=None, **options):
    """Run a jaxdiff sampler in float64 under ``jax.jit``, one compilation per
    (sampler, transform, options) and shapes, shared between tests (compilation dominates the
    run time). ``transform`` wraps the exact denoiser (e.g. ``clip_x0``)."""
    key = (sampler, transform, tuple(sorted(options.items())))
    if key not in _JITTED:

        def run(denoiser, process, x_init, ts, noise):
            extra = {} if noise is None else dict(noise=noise)
            if transform is not None:
                denoiser = transform(denoiser)
            return sampler(KEY, denoiser, process, x_init, ts, **options, **extra)

        _JITTED[key] = jax.jit(run)
    jaxdiff.timesteps.check_grid(process, jnp.asarray(ts))  # jit skips the concrete checks
    out = _JITTED[key](GAUSS.denoiser(process), process, jnp.asarray(x_init), jnp.asarray(ts),
                       noise)
    return np.asarray(out, dtype=np.float64)


def jax_noise(n):
    return jnp.asarray(Z[:n, None])  # (N, num_draws=1, B, D)


def check(name, got, want, atol=ATOL):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    print(f"{name}: max |jaxdiff - diffusers| = {err:.2e}")
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(want))
    assert err <= atol, f"{name}: max abs difference {err:.3e} > {atol:.0e}"
    return err


def as_np(x):
    return x.detach().numpy().astype(np.float64)


# ================================================================================================
# Grids: jaxdiff's timestep_indices vs diffusers' set_timesteps
# ================================================================================================


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [10, 50, 7])
def test_timestep_indices_match_ddim_ddpm_euler(f64, spacing, num_steps):
    """jaxdiff's ``timestep_indices`` are DDIM/DDPM's spacings, and Euler(-ancestral)/Heun's for
    "leading"/"trailing" ("linspace" gives them fractional timesteps, not table indices)."""
    process = _process()
    want = process.timestep_indices(num_steps, spacing)
    for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
        sched = f64(cls, timestep_spacing=spacing)
        sched.set_timesteps(num_steps)
        np.testing.assert_array_equal(want, sched.timesteps.numpy())
    if spacing != "linspace":
        for cls in (diffusers.EulerAncestralDiscreteScheduler, diffusers.HeunDiscreteScheduler):
            sched = f64(cls, timestep_spacing=spacing)
            sched.set_timesteps(num_steps)
            got = sched.timesteps.numpy()
            np.testing.assert_array_equal(want, got[::2] if len(got) > num_steps else got)


@pytest.mark.parametrize("num_steps", [10, 25])
def test_timestep_indices_multistep(f64, num_steps):
    """DPMSolverMultistep/UniPC: "trailing" is jaxdiff's; their "linspace" and "leading" place
    N + 1 points and drop the last (index 0), i.e. ``timestep_indices(N + 1, spacing)[:-1]`` --
    not jaxdiff's (DDIM's) N-point spacings. The multistep tests therefore build jaxdiff's grid
    from the scheduler's own ``timesteps``."""
    process = _process()
    for cls in (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler):
        for spacing in ("trailing", "linspace", "leading"):
            sched = f64(cls, timestep_spacing=spacing)
            sched.set_timesteps(num_steps)
            if spacing == "trailing":
                want = process.timestep_indices(num_steps, spacing)
            else:
                want = process.timestep_indices(num_steps + 1, spacing)[:-1]
            np.testing.assert_array_equal(want, sched.timesteps.numpy())


def test_betas_match():
    for name, kw in SCHEDULES.items():
        sched = diffusers.DDIMScheduler(num_train_timesteps=N_TRAIN, **kw)
        np.testing.assert_allclose(
            np.asarray(_process(name).betas), sched.betas.numpy(), rtol=1e-6, atol=0
        )  # diffusers' table is float32; the float64 runs below rebuild it in float64


# ================================================================================================
# 1. DDIM(eta)
# ================================================================================================


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim(f64, num_steps, spacing, eta, prediction_type):
    """DDIM(eta) = jaxdiff's ddim on timesteps.ddpm(process, N, spacing) (final exact 0 =
    set_alpha_to_one=True); eta = 1 with the same normals via ``variance_noise``. The 50-step
    trailing runs use Stable Diffusion's scaled_linear table."""
    schedule = "scaled_linear" if num_steps == 50 and spacing == "trailing" else "linear"
    process = _process(schedule)
    sched = f64(
        diffusers.DDIMScheduler, timestep_spacing=spacing, clip_sample=False,
        set_alpha_to_one=True, prediction_type=prediction_type, schedule=schedule,
    )
    sched.set_timesteps(num_steps)
    x = torch.tensor(X_INIT)
    for i, t in enumerate(sched.timesteps):
        out = (x0_at_index if prediction_type == "sample" else eps_at_index)(sched, x, t)
        noise = torch.tensor(Z[i]) if eta > 0 else None
        x = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample

    ts = grids.ddpm(process, num_steps, spacing=spacing)  # final exact 0 = set_alpha_to_one
    np.testing.assert_array_equal(np.asarray(ts), vp_grid(sched.timesteps, "zero"))
    kw = dict(eta=eta, noise=jax_noise(num_steps)) if eta > 0 else dict(eta=0.0)
    got = run_jaxdiff(samplers.ddim, process, ts, **kw)
    check(f"ddim eta={eta} {spacing} N={num_steps} {prediction_type}", got, as_np(x))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_without_alpha_to_one(f64, eta):
    """``set_alpha_to_one=False`` ends at alphas_cumprod[0]: jaxdiff's grid ends at t = 1/N.

    Only with ``trailing`` spacing: with ``leading`` the last timestep is index 0 itself, so
    diffusers' last step is the zero-length step 0 -> 0 (x unchanged), which a strictly
    decreasing jaxdiff grid cannot express (and need not: it is the identity).
    """
    process = _process()
    sched = f64(
        diffusers.DDIMScheduler, timestep_spacing="trailing", clip_sample=False,
        set_alpha_to_one=False, prediction_type="sample",
    )
    sched.set_timesteps(10)
    x = torch.tensor(X_INIT)
    for i, t in enumerate(sched.timesteps):
        noise = torch.tensor(Z[i]) if eta > 0 else None
        x = sched.step(x0_at_index(sched, x, t), t, x, eta=eta, variance_noise=noise).prev_sample
    ts = vp_grid(sched.timesteps, "sigma_min")
    kw = dict(eta=eta, noise=jax_noise(10)) if eta > 0 else dict(eta=0.0)
    check(f"ddim eta={eta} alpha_to_one=False", run_jaxdiff(samplers.ddim, process, ts, **kw),
          as_np(x))


# ================================================================================================
# 2. DDPM ancestral sampling on a respaced grid
# ================================================================================================


def _run_ddpm(f64, variance_type, spacing, num_steps):
    feed = _NoiseFeed()
    sched = f64(
        diffusers.DDPMScheduler, noise_feed=feed, variance_type=variance_type,
        timestep_spacing=spacing, clip_sample=False, prediction_type="sample",
    )
    sched.set_timesteps(num_steps)
    x = torch.tensor(X_INIT)
    for i, t in enumerate(sched.timesteps):
        feed.current = torch.tensor(Z[i])
        x = sched.step(x0_at_index(sched, x, t), t, x).prev_sample
    return sched, as_np(x), feed.calls


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_ddpm(f64, variance_type, spacing):
    """Grids whose last timestep is 0: diffusers adds no noise there (``t > 0``) and steps to
    ``prev_t = -1`` (alpha = 1), i.e. returns x0_hat -- jaxdiff's final exact 0."""
    num_steps = 10
    process = _process()
    sched, want, calls = _run_ddpm(f64, variance_type, spacing, num_steps)
    assert int(sched.timesteps[-1]) == 0 and calls == num_steps - 1
    ts = grids.ddpm(process, num_steps, spacing=spacing)
    np.testing.assert_array_equal(np.asarray(ts), vp_grid(sched.timesteps, "zero"))
    got = run_jaxdiff(samplers.ddpm, process, ts, variance=variance_type,
                      noise=jax_noise(num_steps))
    check(f"ddpm {variance_type} {spacing} N={num_steps}", got, want)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_trailing_last_step(f64, variance_type):
    """Documented difference: with ``trailing`` spacing the last timestep is > 0 (99 for 10
    steps), so diffusers' ``if t > 0`` adds noise on the step to alpha = 1: standard deviation
    ``sqrt(clamp(0, min=1e-20)) = 1e-10`` for fixed_small (harmless) but
    ``sqrt(current_beta_t) = sigma_t`` for fixed_large, i.e. diffusers returns
    ``x0_hat + sigma_last * z`` instead of ``x0_hat``. jaxdiff returns ``x0_hat`` at a final
    exact 0 for both variances. Everything else matches; this test pins the difference exactly.
    """
    num_steps = 10
    process = _process()
    sched, want, calls = _run_ddpm(f64, variance_type, "trailing", num_steps)
    assert calls == num_steps
    ts = grids.ddpm(process, num_steps, spacing="trailing")
    got = run_jaxdiff(samplers.ddpm, process, ts, variance=variance_type,
                      noise=jax_noise(num_steps))
    abar_last = float(sched.alphas_cumprod[int(sched.timesteps[-1])])
    extra_std = 1e-10 if variance_type == "fixed_small" else np.sqrt(1.0 - abar_last)
    check(f"ddpm {variance_type} trailing (+ diffusers' last-step noise)",
          got + extra_std * Z[num_steps - 1], want)


# ================================================================================================
# 3. DPM-Solver++ multistep (ODE and SDE)
# ================================================================================================


def _run_dpm(sched, num_steps, noise=False):
    sched.set_timesteps(num_steps)
    x = torch.tensor(X_INIT)
    for i, t in enumerate(sched.timesteps):
        kw = dict(variance_noise=torch.tensor(Z[i])) if noise else {}
        x = sched.step(x0_at_index(sched, x, t), t, x, **kw).prev_sample
    return as_np(x)


# (order, solver_type, num_steps, diffusers options, jaxdiff lower_order_final, final, schedule)
# diffusers' rule: the last step is first order if euler_at_final, or lower_order_final and
# N < 15, or final_sigmas_type == "zero"; the second-to-last is lowered to <= 2 only if
# lower_order_final and N < 15. jaxdiff's lower_order_final caps step n at N - n always (the
# UniPC rule), and a final exact 0 returns x0_hat whatever the order. Hence jaxdiff
# lower_order_final=True for N < 15, and for N >= 15 with order 3 it must be False.
DPM_CASES = {
    "2M-midpoint-N10": (2, "midpoint", 10, {}, True, "zero", "linear"),
    "2M-heun-N10": (2, "heun", 10, {}, True, "zero", "linear"),
    "2M-midpoint-N20-scaled": (2, "midpoint", 20, {}, True, "zero", "scaled_linear"),
    "2M-heun-N10-trailing": (2, "heun", 10, dict(timestep_spacing="trailing"), True, "zero",
                             "linear"),
    "3M-N10": (3, "midpoint", 10, {}, True, "zero", "linear"),
    "3M-N20": (3, "midpoint", 20, {}, False, "zero", "linear"),
    "3M-N20-scaled": (3, "midpoint", 20, {}, False, "zero", "scaled_linear"),
    "3M-N10-sigma_min": (3, "midpoint", 10, {}, True, "sigma_min", "linear"),
    "3M-N20-sigma_min": (3, "midpoint", 20, {}, False, "sigma_min", "linear"),
    "3M-N10-sigma_min-no-lof": (3, "midpoint", 10, dict(lower_order_final=False), False,
                                "sigma_min", "linear"),
    # euler_at_final lowers only the last step: jaxdiff's rule for order 2 (not for order 3)
    "2M-N20-sigma_min-euler_at_final": (2, "midpoint", 20, dict(euler_at_final=True), True,
                                        "sigma_min", "linear"),
}


@pytest.mark.parametrize("case", list(DPM_CASES))
def test_dpm_solver_pp(f64, case):
    order, solver_type, num_steps, extra, lof, final, schedule = DPM_CASES[case]
    process = _process(schedule)
    sched = f64(
        diffusers.DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=order,
        solver_type=solver_type, prediction_type="sample", final_sigmas_type=final,
        thresholding=False, schedule=schedule, **extra,
    )
    want = _run_dpm(sched, num_steps)
    ts = vp_grid(sched.timesteps, final)
    got = run_jaxdiff(samplers.dpm_solver_pp, process, ts, order=order, solver_type=solver_type,
                      third_order="reference", lower_order_final=lof)
    check(f"dpm_solver_pp {case}", got, want)


def test_dpm_solver_pp_lower_order_final_rule_differs(f64):
    """Pins the documented rule difference: N = 20 >= 15, order 3, final_sigmas_type="zero":
    diffusers keeps order 3 on the second-to-last step, jaxdiff's lower_order_final=True uses 2."""
    process = _process()
    sched = f64(
        diffusers.DPMSolverMultistepScheduler, solver_order=3, prediction_type="sample",
        final_sigmas_type="zero",
    )
    want = _run_dpm(sched, 20)
    got = run_jaxdiff(samplers.dpm_solver_pp, process, vp_grid(sched.timesteps, "zero"),
                      order=3, solver_type="midpoint", third_order="reference",
                      lower_order_final=True)
    err = float(np.max(np.abs(got - want)))
    print(f"dpm_solver_pp 3M N=20 with jaxdiff lower_order_final=True: {err:.2e}")
    assert err > 1e3 * ATOL


@pytest.mark.parametrize("order,solver_type,num_steps", [
    (1, "midpoint", 10), (2, "midpoint", 10), (2, "heun", 10),
])
def test_dpm_solver_pp_sde(f64, order, solver_type, num_steps):
    """``sde-dpmsolver++`` = jaxdiff's dpm_solver_pp_sde with eta = 1, same normals."""
    process = _process()
    sched = f64(
        diffusers.DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++",
        solver_order=order, solver_type=solver_type, prediction_type="sample",
        final_sigmas_type="zero",
    )
    want = _run_dpm(sched, num_steps, noise=True)
    got = run_jaxdiff(samplers.dpm_solver_pp_sde, process, vp_grid(sched.timesteps, "zero"),
                      order=order, solver_type=solver_type, eta=1.0, lower_order_final=True,
                      noise=jax_noise(num_steps))
    check(f"dpm_solver_pp_sde order={order} {solver_type} N={num_steps}", got, want)


def test_float64_patch_changes_precision_only():
    """The stock (float32-internal) scheduler agrees with jaxdiff to float32 round-off, so the
    float64 aliasing of the ``f64`` fixture changes precision, not the algorithm."""
    process = _process()
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=N_TRAIN, solver_order=3, prediction_type="sample"
    )
    sched.set_timesteps(10)
    x = torch.tensor(X_INIT, dtype=torch.float32)
    for t in sched.timesteps:
        x0 = x0_at_index(sched, x.double(), t).float()
        x = sched.step(x0, t, x).prev_sample
    got = run_jaxdiff(samplers.dpm_solver_pp, process, vp_grid(sched.timesteps, "zero"), order=3,
                      solver_type="midpoint", third_order="reference", lower_order_final=True)
    check("dpm_solver_pp 3M N=10, stock float32 diffusers", got, as_np(x), atol=1e-4)


# ================================================================================================
# x0 clipping and dynamic thresholding (denoiser transforms in jaxdiff)
# ================================================================================================


CLIP = samplers.clip_x0
THRESHOLD = functools.partial(samplers.dynamic_threshold, quantile=0.9, max_value=1.5)
_THRESHOLD_CONFIG = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)

# name: (scheduler, config, step kwargs, stochastic, jaxdiff sampler, options, transform)
X0_TRANSFORM_CASES = {
    "ddpm-clip_sample": (
        "DDPMScheduler", dict(clip_sample=True, variance_type="fixed_small"), {}, True,
        samplers.ddpm, dict(variance="fixed_small"), CLIP),
    "ddpm-thresholding": (
        "DDPMScheduler", dict(clip_sample=False, **_THRESHOLD_CONFIG), {}, True,
        samplers.ddpm, dict(variance="fixed_small"), THRESHOLD),
    # use_clipped_model_output=True re-derives eps from the clipped x0, as jaxdiff's ddim does
    # with a clipped denoiser; diffusers' default (False) keeps the unclipped eps in the
    # direction term, which is not a denoiser transform and is not compared.
    "ddim-clip_sample-clipped_eps": (
        "DDIMScheduler", dict(clip_sample=True), dict(eta=0.0, use_clipped_model_output=True),
        False, samplers.ddim, dict(eta=0.0), CLIP),
    "dpm_solver_pp-2M-thresholding": (
        "DPMSolverMultistepScheduler", dict(solver_order=2, **_THRESHOLD_CONFIG), {}, False,
        samplers.dpm_solver_pp, dict(order=2, solver_type="midpoint", third_order="reference",
                                     lower_order_final=True), THRESHOLD),
}


@pytest.mark.parametrize("case", list(X0_TRANSFORM_CASES))
def test_x0_transforms(f64, case):
    """diffusers' ``clip_sample`` / ``thresholding`` = jaxdiff's ``clip_x0`` /
    ``dynamic_threshold`` wrapped around the denoiser. diffusers' ``_threshold_sample`` needs a
    sample with >= 3 dims (it reshapes by ``channels * np.prod(remaining_dims)``, a float for a
    2-D sample), so diffusers runs on (B, 1, D) and jaxdiff on (B, D); both threshold per
    example over all entries."""
    cls_name, config, step_kw, stochastic, sampler, options, transform = X0_TRANSFORM_CASES[case]
    num_steps = 10
    feed = _NoiseFeed() if stochastic else None
    sched = f64(getattr(diffusers, cls_name), noise_feed=feed, prediction_type="sample",
                **config)
    sched.set_timesteps(num_steps)
    x = torch.tensor(X_INIT)[:, None, :]
    for i, t in enumerate(sched.timesteps):
        if feed is not None:
            feed.current = torch.tensor(Z[i])[:, None, :]
        x = sched.step(x0_at_index(sched, x, t), t, x, **step_kw).prev_sample
    noise = jax_noise(num_steps) if stochastic else None
    ts = vp_grid(sched.timesteps, "zero")
    got = run_jaxdiff(sampler, _process(), ts, noise=noise, transform=transform, **options)
    check(f"x0 transform {case}", got, as_np(x)[:, 0, :])
    plain = run_jaxdiff(sampler, _process(), ts, noise=noise, **options)
    assert np.max(np.abs(plain - got)) > 1e-3  # the transform was active


# ================================================================================================
# 4. UniPC
# ================================================================================================


UNIPC_CASES = [
    # (variant, order, num_steps, corrector, final, spacing)
    ("bh2", 2, 10, True, "zero", "linspace"),
    ("bh2", 3, 10, True, "zero", "linspace"),
    ("bh2", 3, 10, True, "zero", "trailing"),
    ("bh2", 2, 10, True, "sigma_min", "leading"),
    ("bh2", 2, 10, False, "zero", "linspace"),
    ("bh2", 3, 10, False, "sigma_min", "linspace"),
    # bh1 with final_sigmas_type="zero" is NaN in diffusers (test_unipc_bh1_final_zero)
    ("bh1", 2, 10, True, "sigma_min", "linspace"),
    ("bh1", 3, 10, True, "sigma_min", "linspace"),
    ("bh1", 3, 10, True, "sigma_min", "leading"),
    ("bh1", 2, 10, False, "sigma_min", "linspace"),
    ("bh1", 3, 10, False, "sigma_min", "trailing"),
]


def _run_unipc(f64, variant, order, num_steps, corrector, final, spacing):
    sched = f64(
        diffusers.UniPCMultistepScheduler, solver_type=variant, solver_order=order,
        prediction_type="sample", predict_x0=True, lower_order_final=True,
        final_sigmas_type=final, timestep_spacing=spacing,
        disable_corrector=[] if corrector else list(range(num_steps)),
    )
    sched.set_timesteps(num_steps)
    x = torch.tensor(X_INIT)
    for t in sched.timesteps:
        x = sched.step(x0_at_index(sched, x, t), t, x).prev_sample
    got = run_jaxdiff(samplers.unipc, _process(), vp_grid(sched.timesteps, final), order=order,
                      variant=variant, corrector=corrector, lower_order_final=True)
    return got, as_np(x)


@pytest.mark.parametrize("variant,order,num_steps,corrector,final,spacing", UNIPC_CASES)
def test_unipc(f64, variant, order, num_steps, corrector, final, spacing):
    """Same warm-up and lower_order_final rule in both (no "< 15 steps" condition); the
    corrector of step n uses the order of step n - 1 in both; ``disable_corrector=range(N)`` is
    jaxdiff's ``corrector=False`` (predictor only)."""
    got, want = _run_unipc(f64, variant, order, num_steps, corrector, final, spacing)
    check(f"unipc {variant} p={order} N={num_steps} corrector={corrector} {final} {spacing}",
          got, want)


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_bh1_final_zero(f64, order):
    """Known diffusers bug (0.42): with ``solver_type="bh1"`` and the default
    ``final_sigmas_type="zero"`` the last (order-1) predictor computes ``alpha_t * B_h *
    pred_res`` with ``B_h = -h = -inf`` and ``pred_res = 0``, i.e. NaN, so the whole sample is
    NaN. jaxdiff returns x0_hat there. Compared exactly once diffusers returns finite values."""
    got, want = _run_unipc(f64, "bh1", order, 10, True, "zero", "linspace")
    assert np.all(np.isfinite(got))
    if not np.all(np.isfinite(want)):
        pytest.xfail("diffusers UniPC bh1 + final_sigmas_type='zero' returns NaN (0 * inf)")
    check(f"unipc bh1 p={order} N=10 zero", got, want)


# ================================================================================================
# 5. Euler-ancestral, Heun and EDM-Euler (noise-level coordinates)
# ================================================================================================


@pytest.mark.parametrize("spacing,num_steps", [("leading", 10), ("trailing", 10)])
def test_euler_ancestral(f64, spacing, num_steps):
    """diffusers' state is x_ve = x_vp / alpha and the model sees scale_model_input(x_ve) = x_vp;
    only ``epsilon`` (or v) prediction is implemented there, so the model returns the exact eps.
    (``linspace`` spacing gives fractional timesteps that diffusers interpolates linearly in the
    VE sigma, jaxdiff's table linearly in log alpha: not compared.)"""
    process = _process()
    feed = _NoiseFeed()
    sched = f64(diffusers.EulerAncestralDiscreteScheduler, noise_feed=feed,
                timestep_spacing=spacing, prediction_type="epsilon")
    sched.set_timesteps(num_steps)
    abar0 = sched.alphas_cumprod[int(sched.timesteps[0])]
    x = torch.tensor(X_INIT) / abar0.sqrt()
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        feed.current = torch.tensor(Z[i])
        x = sched.step(eps_at_index(sched, x_in, t), t, x).prev_sample
    assert feed.calls == num_steps
    got = run_jaxdiff(samplers.euler_ancestral, process, vp_grid(sched.timesteps, "zero"),
                      eta=1.0, noise=jax_noise(num_steps))
    check(f"euler_ancestral {spacing} N={num_steps}", got, as_np(x))


@pytest.mark.parametrize("spacing,num_steps,schedule", [
    ("leading", 10, "linear"), ("trailing", 10, "scaled_linear"),
])
def test_heun_discrete(f64, spacing, num_steps, schedule):
    """HeunDiscreteScheduler (interleaved timesteps, 2N - 1 calls, last step Euler to 0) is
    jaxdiff's edm_heun (Karras Algorithm 1) on the same grid, in x_ve = x_vp/alpha."""
    process = _process(schedule)
    sched = f64(diffusers.HeunDiscreteScheduler, timestep_spacing=spacing,
                prediction_type="sample", schedule=schedule)
    sched.set_timesteps(num_steps)
    assert len(sched.timesteps) == 2 * num_steps - 1
    abar0 = sched.alphas_cumprod[int(sched.timesteps[0])]
    x = torch.tensor(X_INIT) / abar0.sqrt()
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        x = sched.step(x0_at_index(sched, x_in, t), t, x).prev_sample
    grid_t = np.asarray(sched.timesteps[::2])
    got = run_jaxdiff(samplers.edm_heun, process, vp_grid(grid_t, "zero"))
    check(f"heun_discrete {spacing} N={num_steps}", got, as_np(x))


@pytest.mark.parametrize("num_steps", [8, 25])
def test_edm_euler(f64, num_steps):
    """EDMEulerScheduler (s_churn = 0) on EDMProcess: Euler on the PF ODE in sigma = jaxdiff's
    pf_euler on timesteps.karras(EDMProcess(), N, final_zero=True). The model is an
    EDM-preconditioned network: it sees (c_in x, c_noise = log(sigma)/4) and its output goes
    through diffusers' precondition_outputs (epsilon type), so it is the F that makes
    c_skip x + c_out F the exact denoiser."""
    process = jaxdiff.EDMProcess()
    sched = f64(diffusers.EDMEulerScheduler, schedule=None, sigma_min=0.002, sigma_max=80.0,
                sigma_data=0.5, rho=7.0, prediction_type="epsilon", final_sigmas_type="zero")
    sched.set_timesteps(num_steps)
    ts = np.asarray(grids.karras(process, num_steps, final_zero=True))
    np.testing.assert_allclose(ts, sched.sigmas.numpy(), rtol=1e-13, atol=0)
    sd = sched.config.sigma_data

    def network(x_in, c_noise):
        sigma = torch.exp(4.0 * c_noise)
        x = x_in * (sigma**2 + sd**2).sqrt()  # undo c_in
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        return (torch_x0(x, 1.0, sigma) - c_skip * x) / c_out

    x = torch.tensor(X_INIT) * ts[0]  # the EDM state at sigma_max
    for t in sched.timesteps:
        x = sched.step(network(sched.scale_model_input(x, t), t), t, x).prev_sample
    got = run_jaxdiff(samplers.pf_euler, process, ts, x_init=X_INIT * ts[0])
    check(f"edm_euler N={num_steps}", got, as_np(x))


# ================================================================================================
# 6. DPM-Solver++ singlestep
# ================================================================================================


SINGLESTEP_CASES = [
    # (order, solver_type, num_steps): order lists [1,2]*4+[1] and [1,2,3]*3+[1]
    (2, "midpoint", 9),
    (2, "heun", 9),
    (3, "heun", 10),
]


@pytest.mark.parametrize("order,solver_type,num_steps", SINGLESTEP_CASES)
def test_dpm_solver_pp_singlestep(f64, order, solver_type, num_steps):
    """diffusers' singlestep scheduler places its stages on the *grid* (order list [1, 2, ...]:
    a "1" step lands on the next grid point, which the following "2"/"3" step uses as a stage);
    jaxdiff places them at fixed fractions r of the step in lambda (1/2; 1/3, 2/3). They
    coincide on a grid uniform in lambda: ``use_exponential_sigmas=True`` (uniform log sigma_ve
    = uniform lambda), with jaxdiff on every order-th grid point.

    diffusers then truncates the interpolated timesteps to int64, which only a network would see;
    the exact denoiser here is evaluated at the scheduler's own noise level ``sigmas[i]``.

    3S with ``solver_type="midpoint"`` does not map: diffusers computes its second stage with
    the 2M-midpoint form (0.5 * (1 - e^-h) D1), jaxdiff (like the dpm-solver reference) with
    psi_2; with ``"heun"`` both use psi_2 for the stage and the exact quadratic integral."""
    process = _process()
    sched = f64(
        diffusers.DPMSolverSinglestepScheduler, solver_order=order, solver_type=solver_type,
        algorithm_type="dpmsolver++", prediction_type="sample", use_exponential_sigmas=True,
        lower_order_final=True, final_sigmas_type="zero",
    )
    sched.set_timesteps(num_steps)
    assert sched.order_list == ([1, 2] * 4 + [1] if order == 2 else [1, 2, 3] * 3 + [1])
    sigmas = sched.sigmas.clone()
    x = torch.tensor(X_INIT)
    for i, t in enumerate(sched.timesteps):
        x = sched.step(x0_at_sigma(x, sigmas[i]), t, x).prev_sample

    coarse = np.concatenate([np.asarray(sigmas[:-1])[::order], [0.0]])
    assert len(coarse) == num_steps // order + 2
    ts = np.asarray(process.t_from_noise_level(jnp.asarray(coarse[:-1])))
    ts = np.clip(np.concatenate([ts, [0.0]]), 0.0, process.t_max)
    got = run_jaxdiff(samplers.dpm_solver_pp_singlestep, process, ts, order=order,
                      solver_type=solver_type)
    check(f"dpm_solver_pp_singlestep order={order} {solver_type} N={num_steps}", got, as_np(x))
