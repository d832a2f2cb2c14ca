r"""First-order samplers: probability-flow Euler, Euler–Maruyama, predictor–corrector, DDIM/DDPM.

Notation for a step from ``t`` to the next grid time ``s < t``: :math:`\alpha, \sigma` at each
time, :math:`h = \lambda_s/2 - \lambda_t/2 > 0` the step in half-log-SNR, :math:`\hat x_0 =
D(x_t, t)` and :math:`\hat\varepsilon = (x_t - \alpha_t\hat x_0)/\sigma_t`. Updates are written as
combined coefficients of :math:`x_t` and :math:`\hat x_0`, so no :math:`1/\sigma` multiplies a
cancellation.
"""

import jax.numpy as jnp

from ._core import (
    bcast,
    call_denoiser,
    check_inputs,
    coeff_dtype,
    half_log_snr,
    integrate,
    is_python_zero,
    safe_next_time,
    safe_sqrt,
)

__all__ = ["pf_euler", "euler_maruyama", "predictor_corrector", "ddim", "ddpm", "euler_ancestral"]


def _run(step, x_init, ts, key, noise, num_draws, example_index, remat, coeffs=None):
    x, _ = integrate(
        step, x_init, ts, key=key, noise=noise, num_draws=num_draws,
        state_shape=x_init.shape, dtype=x_init.dtype, example_index=example_index, remat=remat,
        coeffs=coeffs,
    )
    return x


def pf_euler(key, denoiser, process, x_init, ts, *, cond=None, remat=None):
    r"""Euler's method on the probability-flow ODE in time :math:`t`.

    .. math:: x_s = x_t + (s - t)\Big[\frac{\dot\sigma_t}{\sigma_t} x_t
        - \frac{\alpha_t g_t^2}{2\sigma_t^2}\hat x_0\Big].

    First order, one denoiser call per step. A final exact 0 in ``ts`` returns
    :math:`\hat x_0`.

    Args:
        key: unused (deterministic); kept for the common sampler signature.
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` with ``t`` of shape ``(B,)``.
        process: the forward process.
        x_init: state at ``ts[0]``, shape ``(B, ...)``.
        ts: strictly decreasing grid ``(N + 1,)`` in ``[t_min, t_max]`` (optionally ending in 0).
        cond: conditioning passed to the denoiser.
        remat: rematerialisation of the scan for gradients (None, ``"full"``, ``"nested"`` or
            a segment length; values are identical), see :func:`jaxdiff.samplers.integrate`.

    Returns:
        The state at ``ts[-1]``, shape and dtype of ``x_init``.

    Examples:
        >>> ts = jaxdiff.timesteps.uniform_t(process, 100)
        >>> x = pf_euler(key, denoiser, process, process.sample_prior(key, (16, 2)), ts)
    """
    del key
    check_inputs(process, x_init, ts)
    dtype = coeff_dtype(x_init, ts)

    def coeffs(_, t, s):
        t, s = t.astype(dtype), s.astype(dtype)
        c_x, c_x0 = process.reverse_drift_coefficients(t, eta=0.0)
        return safe_next_time(t, s) - t, c_x, c_x0

    def step(x, inp):
        dt, c_x, c_x0 = inp.coeffs
        x0 = call_denoiser(denoiser, x, inp.t, cond)
        x_next = x + dt * (c_x * x + c_x0 * x0)
        return jnp.where(inp.s > 0, x_next, x0).astype(x.dtype)

    return _run(step, x_init, ts, None, None, 0, None, remat, coeffs)


def euler_maruyama(
    key, denoiser, process, x_init, ts, *, cond=None, eta=1.0, noise=None, example_index=None,
    remat=None,
):
    r"""Euler–Maruyama on the reverse-time SDE family (``eta = 1``: the reverse SDE).

    .. math:: x_s = x_t + (s - t)\,b_\eta(x_t, t) + \eta\, g(t)\sqrt{t - s}\; z,

    with :math:`b_\eta` from :meth:`AbstractProcess.reverse_drift` (``eta = 0`` is
    :func:`pf_euler`). Strong order 1/2, weak order 1.

    Args:
        key: typed key; example ``i`` at step ``n`` uses ``fold_in(fold_in(key, i), n)``.
        eta: noise multiplier :math:`\eta \ge 0` (scalar or ``(B,)``; traced).
        noise: optional explicit noise, shape ``(N, 1, *x_init.shape)``.
        example_index: global indices ``(B,)`` of the examples (for chunked/sharded sampling).
        Other arguments as in :func:`pf_euler`.
    """
    check_inputs(process, x_init, ts, noise=noise, num_draws=1)
    dtype = coeff_dtype(x_init, ts)
    eta = jnp.asarray(eta, dtype)

    def coeffs(_, t, s):
        t, s = t.astype(dtype), s.astype(dtype)
        s_ = safe_next_time(t, s)
        c_x, c_x0 = process.reverse_drift_coefficients(t, eta=eta)
        return s_ - t, c_x, c_x0, process.reverse_diffusion(t, eta) * safe_sqrt(t - s_)

    def step(x, inp):
        dt, c_x, c_x0, diffusion = inp.coeffs
        x0 = call_denoiser(denoiser, x, inp.t, cond)
        drift = bcast(c_x, x) * x + bcast(c_x0, x) * x0
        x_next = x + dt * drift + bcast(diffusion, x) * inp.noise[0]
        return jnp.where(inp.s > 0, x_next, x0).astype(x.dtype)

    return _run(step, x_init, ts, key, noise, 1, example_index, remat, coeffs)


def _per_example_norm(v):
    return jnp.sqrt(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=-1))


def predictor_corrector(
    key,
    denoiser,
    process,
    x_init,
    ts,
    *,
    cond=None,
    snr=0.16,
    num_corrector_steps=1,
    norm="batch",
    noise=None,
    example_index=None,
    remat=None,
):
    r"""Predictor–corrector sampling (Song et al. 2021): Langevin corrector, then Euler–Maruyama.

    At each grid time ``t``, ``num_corrector_steps`` Langevin steps with a signal-to-noise
    controlled size,

    .. math:: \epsilon = 2\Big(r\frac{\|z\|}{\|\nabla\log p_t\|}\Big)^2, \qquad
        x \leftarrow x + \epsilon\nabla\log p_t(x) + \sqrt{2\epsilon}\, z',

    then one reverse-SDE Euler–Maruyama step to ``s``. ``norm="batch"`` (default) averages the
    norms over the batch as the reference implementation does -- so, unlike every other sampler,
    a sample depends on its batch. ``norm="per_example"`` uses each example's own norms; it is
    batch-independent but only stable in high dimension, where norms concentrate (in 2-D the
    ratio of norms is heavy-tailed and the corrector inflates the variance). The corrector uses
    :math:`\alpha_i = 1` in its step size (the reference multiplies by :math:`1 - \beta_i` for
    VP, a relative difference of order :math:`\beta/N`).

    Args:
        snr: the signal-to-noise ratio :math:`r` (0.16 for VE CIFAR-10 in the reference).
        num_corrector_steps: Langevin steps per grid time (static int >= 0).
        norm: ``"per_example"`` or ``"batch"``.
        noise: optional explicit noise, shape ``(N, 1 + num_corrector_steps, *x_init.shape)``.
        Other arguments as in :func:`euler_maruyama`.
    """
    if norm not in ("per_example", "batch"):
        raise ValueError(f"norm must be 'per_example' or 'batch'; got {norm!r}.")
    if not isinstance(num_corrector_steps, int) or num_corrector_steps < 0:
        raise ValueError(f"num_corrector_steps must be an int >= 0; got {num_corrector_steps!r}.")
    num_draws = 1 + num_corrector_steps
    check_inputs(process, x_init, ts, noise=noise, num_draws=num_draws)
    dtype = coeff_dtype(x_init, ts)
    snr = jnp.asarray(snr, dtype)

    def step(x, inp):
        state_dtype = x.dtype
        t, s = inp.t.astype(dtype), inp.s.astype(dtype)
        alpha, sigma = process.alpha(t), process.sigma(t)
        for j in range(num_corrector_steps):
            x0 = call_denoiser(denoiser, x, inp.t, cond)
            score = (alpha * x0 - x) / jnp.square(sigma)
            z = inp.noise[1 + j]
            ratio = _per_example_norm(z) / _per_example_norm(score)
            if norm == "batch":
                ratio = jnp.mean(_per_example_norm(z)) / jnp.mean(_per_example_norm(score))
                ratio = jnp.full((x.shape[0],), ratio)
            step_size = 2.0 * jnp.square(snr * ratio)
            x = x + bcast(step_size, x) * score + bcast(jnp.sqrt(2.0 * step_size), x) * z
            x = x.astype(state_dtype)
        x0 = call_denoiser(denoiser, x, inp.t, cond)
        s_ = safe_next_time(t, s)
        drift = process.reverse_drift(x, t, x0, eta=1.0)
        diffusion = process.reverse_diffusion(t) * safe_sqrt(t - s_)
        x_next = x + (s_ - t) * drift + diffusion * inp.noise[0]
        return jnp.where(s > 0, x_next, x0).astype(x.dtype)

    return _run(step, x_init, ts, key, noise, num_draws, example_index, remat)


def _ddim_coeffs(process, t, s, eta):
    r"""The coefficients ``(c_x, c_x0, std)`` of one DDIM(eta) step from ``t`` to ``s``."""
    s_ = safe_next_time(t, s)
    alpha_s, sigma_s, sigma_t = process.alpha(s_), process.sigma(s_), process.sigma(t)
    h = half_log_snr(process, s_) - half_log_snr(process, t)
    e2 = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}: posterior-variance fraction
    var_frac = jnp.minimum(jnp.square(eta) * e2, 1.0)  # eta > 1 caps at sigma_eta = sigma_s
    k = jnp.sqrt(1.0 - var_frac)
    # 1 - k e^{-h} = (1 - e^{-h}) + e^{-h} (1 - k), each term >= 0 (no cancellation).
    c_x0 = alpha_s * (-jnp.expm1(-h) + jnp.exp(-h) * var_frac / (1.0 + k))
    c_x = sigma_s / sigma_t * k
    return c_x, c_x0, sigma_s * safe_sqrt(var_frac)


def _ddim_apply(coeffs, x, x0, s, z):
    """Apply DDIM coefficients: ``c_x x + c_x0 x0 + std z``, or ``x0`` at a final exact 0."""
    c_x, c_x0, std = coeffs
    x_next = bcast(c_x, x) * x + bcast(c_x0, x) * x0
    if z is not None:
        x_next = x_next + bcast(std, x) * z
    return jnp.where(s > 0, x_next, x0)


def _ddim_step(process, x, x0, t, s, eta, z):
    r"""One DDIM(eta) step in closed form (guided samplers; DDIM and DDPM use its two halves)."""
    return _ddim_apply(_ddim_coeffs(process, t, s, eta), x, x0, s, z)


def ddim(
    key, denoiser, process, x_init, ts, *, cond=None, eta=0.0, noise=None, example_index=None,
    remat=None,
):
    r"""DDIM(:math:`\eta`) (Song, Meng & Ermon 2021) for any process.

    .. math::
        x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - \sigma_\eta^2}\,\hat\varepsilon
        + \sigma_\eta z, \qquad \sigma_\eta = \eta\,\sigma_s\sqrt{1 - e^{-2h}},

    evaluated as :math:`\frac{\sigma_s}{\sigma_t}k\,x_t + \alpha_s(1 - k e^{-h})\hat x_0 +
    \sigma_\eta z` with :math:`k = \sqrt{1 - \eta^2(1 - e^{-2h})}`. ``eta = 0`` is
    DPM-Solver++(1) (deterministic); ``eta = 1`` is DDPM ancestral sampling with the posterior
    variance. :math:`\eta > 1` caps :math:`\sigma_\eta` at :math:`\sigma_s`.

    Args:
        eta: :math:`\eta \ge 0` (scalar or ``(B,)``). A Python ``0`` draws no noise.
        noise: optional explicit noise, shape ``(N, 1, *x_init.shape)``.
        Other arguments as in :func:`euler_maruyama`.

    Examples:
        >>> ts = jaxdiff.timesteps.uniform_log_snr(process, 50)
        >>> x = ddim(key, denoiser, process, process.sample_prior(key, (16, 2)), ts, eta=0.0)
    """
    num_draws = 0 if is_python_zero(eta) and noise is None else 1
    check_inputs(process, x_init, ts, noise=noise, num_draws=num_draws)
    dtype = coeff_dtype(x_init, ts)
    eta = jnp.asarray(eta, dtype)

    def coeffs(_, t, s):
        return _ddim_coeffs(process, t.astype(dtype), s.astype(dtype), eta)

    def step(x, inp):
        x0 = call_denoiser(denoiser, x, inp.t, cond)
        z = None if num_draws == 0 else inp.noise[0]
        return _ddim_apply(inp.coeffs, x, x0, inp.s, z).astype(x.dtype)

    return _run(step, x_init, ts, key, noise, num_draws, example_index, remat, coeffs)


def euler_ancestral(
    key, denoiser, process, x_init, ts, *, cond=None, eta=1.0, noise=None, example_index=None,
    remat=None,
):
    r"""Euler-ancestral sampling (k-diffusion's ``sample_euler_ancestral``) for any process.

    In noise-level coordinates :math:`\tilde x = x/\alpha`, :math:`n = \sigma/\alpha`:

    .. math::
        n_\uparrow = \min\Big(n_s, \eta\, n_s\sqrt{1 - n_s^2/n_t^2}\Big), \quad
        n_\downarrow = \sqrt{n_s^2 - n_\uparrow^2}, \quad
        \tilde x_s = \tilde x_t + (n_\downarrow - n_t)\frac{\tilde x_t - \hat x_0}{n_t}
        + n_\uparrow z,

    and :math:`x_s = \alpha_s\tilde x_s`. Algebraically the same map as DDIM(:math:`\eta`),
    which the tests check; the default here is ``eta = 1``.

    Args:
        eta: :math:`\eta \ge 0` (scalar or ``(B,)``).
        noise: optional explicit noise, shape ``(N, 1, *x_init.shape)``.
        Other arguments as in :func:`euler_maruyama`.
    """
    check_inputs(process, x_init, ts, noise=noise, num_draws=1)
    dtype = coeff_dtype(x_init, ts)
    eta = jnp.asarray(eta, dtype)

    def coeffs(_, t, s):
        t, s = t.astype(dtype), s.astype(dtype)
        s_ = safe_next_time(t, s)
        n_t, n_s = process.noise_level(t), process.noise_level(s_)
        n_up = jnp.minimum(n_s, eta * n_s * safe_sqrt(1.0 - jnp.square(n_s / n_t)))
        n_down = jnp.sqrt(jnp.square(n_s) - jnp.square(n_up))
        ratio = n_down / n_t  # Euler step written as a convex combination of x~ and x0
        return process.alpha(t), process.alpha(s_), ratio, n_up

    def step(x, inp):
        alpha_t, alpha_s, ratio, n_up = inp.coeffs
        x0 = call_denoiser(denoiser, x, inp.t, cond)
        xt = x / bcast(alpha_t, x)
        xt_next = bcast(ratio, x) * xt + bcast(1.0 - ratio, x) * x0
        xt_next = xt_next + bcast(n_up, x) * inp.noise[0]
        x_next = bcast(alpha_s, x) * xt_next
        return jnp.where(inp.s > 0, x_next, x0).astype(x.dtype)

    return _run(step, x_init, ts, key, noise, 1, example_index, remat, coeffs)


def ddpm(
    key,
    denoiser,
    process,
    x_init,
    ts,
    *,
    cond=None,
    variance="fixed_small",
    noise=None,
    example_index=None,
    remat=None,
):
    r"""DDPM ancestral sampling (Ho et al. 2020) on any grid (skipped steps allowed).

    Draws :math:`x_s` from the Gaussian posterior :math:`q(x_s \mid x_t, x_0 = \hat x_0)` with
    mean :math:`\frac{\sigma_s}{\sigma_t}e^{-h} x_t + \alpha_s(1 - e^{-2h})\hat x_0` and
    standard deviation

    * ``"fixed_small"``: :math:`\sigma_s\sqrt{1 - e^{-2h}}` (the posterior; equals DDIM(1)),
    * ``"fixed_large"``: :math:`\sigma_{t|s} = \sigma_t\sqrt{1 - e^{-2h}}` (:math:`\hat\beta`).

    A final exact 0 in ``ts`` returns :math:`\hat x_0` (no noise at the last step).

    Args:
        variance: ``"fixed_small"`` or ``"fixed_large"``.
        noise: optional explicit noise, shape ``(N, 1, *x_init.shape)``.
        Other arguments as in :func:`euler_maruyama`.
    """
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be 'fixed_small' or 'fixed_large'; got {variance!r}.")
    check_inputs(process, x_init, ts, noise=noise, num_draws=1)
    dtype = coeff_dtype(x_init, ts)
    one = jnp.asarray(1.0, dtype)

    def coeffs(_, t, s):
        t, s = t.astype(dtype), s.astype(dtype)
        if variance == "fixed_small":
            # The very same arithmetic as DDIM(1), so the two (and samplers built on this step,
            # e.g. SVDD with one candidate) agree bit for bit.
            return _ddim_coeffs(process, t, s, one)
        s_ = safe_next_time(t, s)
        alpha_s, sigma_s, sigma_t = process.alpha(s_), process.sigma(s_), process.sigma(t)
        h = half_log_snr(process, s_) - half_log_snr(process, t)
        e2 = -jnp.expm1(-2.0 * h)
        return sigma_s / sigma_t * jnp.exp(-h), alpha_s * e2, sigma_t * safe_sqrt(e2)

    def step(x, inp):
        x0 = call_denoiser(denoiser, x, inp.t, cond)
        return _ddim_apply(inp.coeffs, x, x0, inp.s, inp.noise[0]).astype(x.dtype)

    return _run(step, x_init, ts, key, noise, 1, example_index, remat, coeffs)
