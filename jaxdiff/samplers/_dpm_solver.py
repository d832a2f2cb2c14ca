r"""DPM-Solver++ (Lu et al. 2022b): exponential integrators in data-prediction form.

Notation for a step from ``t`` to the next grid time ``s < t``: :math:`\alpha, \sigma` at each
time, the half-log-SNR :math:`\lambda = \log(\alpha/\sigma)` (``half_log_snr``), the step
:math:`h = \lambda_s - \lambda_t > 0`, and data predictions :math:`m_0 = D(x_t, t)` (current)
and :math:`m_1, m_2` at the previous grid times, :math:`h_1 = \lambda_t - \lambda_{\rm prev}`,
:math:`h_2 = \lambda_{\rm prev} - \lambda_{\rm prev2}` (the reference code's
:math:`r_0 = h_1/h`, :math:`r_1 = h_2/h`).

The probability-flow ODE has the exact variation-of-constants solution

.. math::
    x_s = \frac{\sigma_s}{\sigma_t} x_t + \alpha_s \int_0^h e^{-(h-u)}\,
    x_0(\lambda_t + u)\,du ,

and every method here replaces :math:`x_0(\lambda)` by a polynomial in :math:`\lambda` and
integrates it exactly with

.. math::
    \psi_1(h) = 1 - e^{-h}, \qquad \psi_2(h) = h - 1 + e^{-h}, \qquad
    \psi_3(h) = \tfrac12 h^2 - h + 1 - e^{-h}

(:math:`\psi_{k+1}(h) = \int_0^h e^{-(h-u)} u^k/k!\,du`, evaluated by a Taylor series for
small :math:`h`, so nothing cancels). Updates are written as combined coefficients of
:math:`x_t`, :math:`m_0` and the differences :math:`m_0 - m_1`, :math:`m_1 - m_2`, so no
:math:`1/\sigma` multiplies a cancellation. A final exact 0 in ``ts`` returns :math:`m_0`.
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import is_concrete
from ._core import (
    bcast,
    call_denoiser,
    check_inputs,
    coeff_dtype,
    half_log_snr,
    integrate,
    is_python_zero,
    safe_div,
    safe_next_time,
    safe_sqrt,
)

__all__ = ["dpm_solver_pp", "dpm_solver_pp_sde", "dpm_solver_pp_singlestep"]

_SOLVER_TYPES = ("midpoint", "heun")
_THIRD_ORDER = {"reference": 1.0, "corrected": 2.0}
# psi_3 by its Taylor series below this step (the closed form cancels for small h); 14 terms
# reach float64 round-off there.
_SERIES_BELOW = 0.5
_SERIES_TERMS = 14


# -- small helpers -------------------------------------------------------------------------------





def _psi(h):
    r""":math:`(\psi_1, \psi_2, \psi_3)(h)` for :math:`h \ge 0`; finite values and gradients.

    :math:`\psi_1 = -\mathrm{expm1}(-h)`; for small ``h``, :math:`\psi_3 = \sum_{n \ge 3}
    (-1)^{n-3} h^n/n!` (Horner) and :math:`\psi_2 = h^2/2 - \psi_3` (no cancellation there),
    else the closed forms.
    """
    small = h < _SERIES_BELOW
    hs = jnp.where(small, h, 0.0)
    acc = jnp.full_like(hs, (-1.0) ** (_SERIES_TERMS - 1) / math.factorial(_SERIES_TERMS + 2))
    for j in range(_SERIES_TERMS - 2, -1, -1):
        acc = acc * hs + (-1.0) ** j / math.factorial(j + 3)
    psi3_series = acc * hs * hs * hs
    em1 = jnp.expm1(-h)
    half_h2 = 0.5 * jnp.square(h)
    psi1 = -em1
    psi2 = jnp.where(small, half_h2 - psi3_series, h + em1)
    psi3 = jnp.where(small, psi3_series, half_h2 - h - em1)
    return psi1, psi2, psi3


def _check_order(order, allowed):
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in allowed:
        names = ", ".join(str(o) for o in allowed[:-1]) + f" or {allowed[-1]}"
        raise ValueError(f"order must be {names}; got {order!r}.")
    return int(order)


def _check_solver_type(solver_type):
    if solver_type not in _SOLVER_TYPES:
        raise ValueError(f"solver_type must be 'midpoint' or 'heun'; got {solver_type!r}.")


def _denoiser_dtype(denoiser, x_init, t0, cond):
    """Dtype of ``call_denoiser``'s output (>= float32), found by abstract evaluation."""
    out = jax.eval_shape(lambda x, t, c: call_denoiser(denoiser, x, t, c), x_init, t0, cond)
    return out.dtype


def _step_order(index, order, num_hist, num_steps, lower_order_final):
    r"""``min(order, n + 1 + num_hist)``, and ``<= N - n`` with ``lower_order_final``."""
    order_n = jnp.minimum(order, index + 1 + num_hist)
    if lower_order_final:
        order_n = jnp.minimum(order_n, num_steps - index)
    return order_n


def _multistep_coeffs(h, h1, h2, order_n, order, solver_type, third_factor, eta):
    r"""Scalar weights ``(c_0, c_1, c_2)`` of the multistep update (per unit ``alpha_s``).

    With :math:`\kappa = 1 + \eta`, :math:`p_1 = \psi_1(\kappa h)`, :math:`p_2 =
    \psi_2(\kappa h)/\kappa`, :math:`p_3 = \psi_3(\kappa h)/\kappa^2` (the integrals of
    :math:`\kappa e^{-\kappa(h-u)} u^k/k!`), the update is :math:`x_s = c_x x_t + \alpha_s
    [c_0 m_0 + c_1 (m_0 - m_1) + c_2 (m_1 - m_2)]` with ``c_0 = p_1`` and ``c_1``, ``c_2`` chosen
    by the step's order. Every branch is finite (``safe_div``) for zero-length history steps.
    """
    kappa = 1.0 + eta
    big_h = kappa * h
    p1, p2, p3 = _psi(big_h)
    p2 = p2 / kappa
    p3 = p3 / jnp.square(kappa)
    zero = jnp.zeros_like(p1)
    c1, c2 = zero, zero
    if order >= 2:
        if solver_type == "midpoint":
            c1_2 = 0.5 * p1 * safe_div(h, h1)  # -expm1(-kh)/2 * D1, D1 = (m0 - m1)/r0
        else:
            c1_2 = safe_div(p2, h1)  # exact for x0 linear in lambda
        c1 = jnp.where(order_n == 2, c1_2, c1)
    if order >= 3:
        # Quadratic through (0, m0), (-h1, m1), (-h1-h2, m2): x0(u) = m0 + (d1 + h1 d2) u + d2 u^2
        # with d1 = (m0-m1)/h1, d2 = (d1 - (m1-m2)/h2)/(h1+h2); exact integral: p1 m0 +
        # p2 (d1 + h1 d2) + 2 p3 d2.  The reference 3M uses p3 d2 (third_factor = 1).
        g = p2 * h1 + third_factor * p3
        c1_3 = safe_div(p2, h1) + safe_div(g, h1 * (h1 + h2))
        c2_3 = -safe_div(g, h2 * (h1 + h2))
        c1 = jnp.where(order_n == 3, c1_3, c1)
        c2 = jnp.where(order_n == 3, c2_3, c2)
    return p1, c1, c2


def _check_history(history, x_init, ts, order):
    """Validate ``history = (m_hist, t_hist)``; return the arrays cut to ``order - 1`` entries."""
    if history is None:
        return None, None
    if not isinstance(history, (tuple, list)) or len(history) != 2:
        raise ValueError("history must be a pair (m_hist, t_hist) or None.")
    m_hist, t_hist = history
    m_shape, t_shape = tuple(np.shape(m_hist)), tuple(np.shape(t_hist))
    x_shape = tuple(np.shape(x_init))
    if len(m_shape) != len(x_shape) + 1 or m_shape[1:] != x_shape:
        raise ValueError(
            f"history: m_hist must have shape (k, *x_init.shape) with x_init.shape = {x_shape}; "
            f"got {m_shape}."
        )
    if t_shape != (m_shape[0],):
        raise ValueError(
            f"history: t_hist must have shape (k,) = ({m_shape[0]},) to match m_hist; "
            f"got {t_shape}."
        )
    if is_concrete(t_hist, ts) and m_shape[0] > 0:
        th = np.asarray(t_hist, dtype=np.float64)
        t0 = float(np.asarray(ts, dtype=np.float64)[0])
        if not np.all(np.isfinite(th)):
            raise ValueError("history: t_hist must be finite.")
        if not (th[0] > t0 and np.all(np.diff(th) > 0)):
            raise ValueError(
                "history: t_hist must hold the grid times before ts[0], most recent first "
                f"(t_hist[0] > ts[0] = {t0}, increasing); got {th}."
            )
    k = min(m_shape[0], order - 1)
    if k == 0:
        return None, None
    return jnp.asarray(m_hist)[:k], jnp.asarray(t_hist)[:k]


def _run_multistep(
    denoiser, process, x_init, ts, cond, order, solver_type, third_factor, lower_order_final,
    m_hist, t_hist, eta, key, noise, num_draws, example_index, remat,
):
    """Shared scan of :func:`dpm_solver_pp` and :func:`dpm_solver_pp_sde`."""
    dtype = coeff_dtype(x_init, ts)
    m_dtype = _denoiser_dtype(denoiser, x_init, ts[0], cond)
    num_steps = ts.shape[0] - 1
    num_buf = order - 1
    num_hist = 0 if m_hist is None else m_hist.shape[0]
    lam0 = half_log_snr(process, ts[0].astype(dtype))

    if num_buf > 0:
        m_buf = jnp.zeros((num_buf, *x_init.shape), m_dtype)
        lam_buf = jnp.full((num_buf,), lam0, dtype)
        if num_hist:
            m_buf = m_buf.at[:num_hist].set(m_hist.astype(m_dtype))
            lam_hist = half_log_snr(process, jnp.asarray(t_hist).astype(dtype))
            # Missing entries repeat the oldest known lambda: zero-length steps (safe_div -> 0).
            lam_buf = lam_buf.at[:].set(lam_hist[-1]).at[:num_hist].set(lam_hist)
        # The lambdas the buffer holds at step n are lam_ext[num_buf + n - 1 - j], j = 0, 1:
        # the initial buffer (oldest first), then every grid time (barrier: see integrate).
        lam_grid = half_log_snr(process, jax.lax.optimization_barrier(ts[:-1]).astype(dtype))
        lam_ext = jnp.concatenate([lam_buf[::-1], lam_grid])
    else:
        m_buf = None

    def coeffs(n, t, s):
        t, s = t.astype(dtype), s.astype(dtype)
        s_ = safe_next_time(t, s)
        alpha_s, sigma_s, sigma_t = process.alpha(s_), process.sigma(s_), process.sigma(t)
        lam_t = half_log_snr(process, t)
        h = half_log_snr(process, s_) - lam_t
        order_n = _step_order(n, order, num_hist, num_steps, lower_order_final)
        h1 = lam_t - lam_ext[num_buf + n - 1] if num_buf >= 1 else jnp.zeros_like(h)
        h2 = (lam_ext[num_buf + n - 1] - lam_ext[num_buf + n - 2] if num_buf >= 2
              else jnp.zeros_like(h))
        c0, c1, c2 = _multistep_coeffs(h, h1, h2, order_n, order, solver_type, third_factor, eta)
        std = sigma_s * safe_sqrt(-jnp.expm1(-2.0 * eta * h)) if num_draws else None
        return dict(c_x=sigma_s / sigma_t * jnp.exp(-eta * h), alpha_s=alpha_s, c0=c0, c1=c1,
                    c2=c2, std=std)

    def step(carry, inp):
        x, m_buf = carry
        c = inp.coeffs
        m0 = call_denoiser(denoiser, x, inp.t, cond)
        inner = bcast(c["c0"], x) * m0
        if num_buf >= 1:
            inner = inner + bcast(c["c1"], x) * (m0 - m_buf[0])
        if num_buf >= 2:
            inner = inner + bcast(c["c2"], x) * (m_buf[0] - m_buf[1])
        x_next = bcast(c["c_x"], x) * x + bcast(c["alpha_s"], x) * inner
        if num_draws:
            x_next = x_next + bcast(c["std"], x) * inp.noise[0]
        x_next = jnp.where(inp.s > 0, x_next, m0).astype(x.dtype)
        if num_buf >= 1:
            # Ring buffer, most recent first: shift by one and put the new entry in front.
            m_buf = jnp.concatenate([m0.astype(m_dtype)[None], m_buf[:-1]], axis=0)
        return x_next, m_buf

    (x, _), _ = integrate(
        step, (x_init, m_buf), ts, key=key, noise=noise, num_draws=num_draws,
        state_shape=x_init.shape, dtype=x_init.dtype, example_index=example_index, remat=remat,
        coeffs=coeffs,
    )
    return x


# -- public samplers -----------------------------------------------------------------------------


def dpm_solver_pp(
    key,
    denoiser,
    process,
    x_init,
    ts,
    *,
    cond=None,
    order=2,
    solver_type="midpoint",
    third_order="reference",
    lower_order_final=True,
    history=None,
    remat=None,
):
    r"""Multistep DPM-Solver++ (1, 2M, 3M) on the probability-flow ODE; one denoiser call per step.

    Per step from ``t`` to ``s`` (notation of :mod:`jaxdiff.samplers._dpm_solver`):

    * order 1 (= DDIM, :math:`\eta = 0`):
      :math:`x_s = \frac{\sigma_s}{\sigma_t}x_t - \alpha_s\,\mathrm{expm1}(-h)\,m_0`;
    * 2M, :math:`D_1 = (m_0 - m_1)/r_0`, :math:`r_0 = h_1/h`:

      - ``"midpoint"`` (k-diffusion ``sample_dpmpp_2m``, diffusers' default):
        :math:`x_s = \frac{\sigma_s}{\sigma_t}x_t
        - \alpha_s\,\mathrm{expm1}(-h)(m_0 + \tfrac12 D_1)`;
      - ``"heun"``: :math:`\ldots + \alpha_s\big(\tfrac{\mathrm{expm1}(-h)}{h} + 1\big) D_1`, the
        exact integral of the line through :math:`m_1, m_0` (exact when :math:`x_0` is linear in
        :math:`\lambda`; the midpoint form is second order but exact only for constants);
    * 3M: with the quadratic :math:`x_0(\lambda_t + u) \approx m_0 + a_1 u + a_2 u^2` through
      :math:`(0, m_0), (-h_1, m_1), (-h_1 - h_2, m_2)`,

      .. math:: x_s = \frac{\sigma_s}{\sigma_t} x_t + \alpha_s\big[\psi_1(h) m_0 + \psi_2(h) a_1
          + c\,\psi_3(h) a_2\big],

      ``third_order="corrected"``: :math:`c = 2`, the exact integral of the quadratic (global
      order 3 on any grid); ``third_order="reference"``: :math:`c = 1`, bit-for-bit the algebra of
      dpm-solver / diffusers / k-diffusion (their :math:`D_2 = (D_{1,0} - D_{1,1})/(r_0 + r_1)
      = h^2 a_2` is weighted by :math:`\psi_3/h^2` where the exact integral needs
      :math:`2\psi_3/h^2`); it is exact only for linear :math:`x_0(\lambda)`, and its *observed
      global order is about 2*, not 3.

    Warm-up: step ``n`` (0-based) uses order :math:`\min(p, n + 1 + k)` with ``k`` the number of
    ``history`` entries used, and with ``lower_order_final`` at most :math:`N - n` (remaining
    steps; always, unlike diffusers' DPMSolverMultistep which applies it only below 15 steps --
    the rule UniPC uses). The history of past :math:`(m, \lambda)` lives in a fixed-size ring
    buffer in the scan carry; the order is selected by ``where`` on the step index (unused
    branches are finite in value and gradient). A final exact 0 in ``ts`` returns :math:`m_0`.

    Args:
        key: unused (deterministic); kept for the common sampler signature.
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` with ``t`` of shape ``(B,)``.
        process: the forward process.
        x_init: state at ``ts[0]``, shape ``(B, ...)`` (any float dtype; bfloat16 allowed).
        ts: strictly decreasing grid ``(N + 1,)`` in ``[t_min, t_max]`` (optionally ending in 0).
        cond: conditioning passed to the denoiser.
        order: 1, 2 or 3 (static).
        solver_type: ``"midpoint"`` or ``"heun"`` -- the second-order steps.
        third_order: ``"reference"`` or ``"corrected"`` -- the third-order steps.
        lower_order_final: cap the order at the number of remaining steps.
        history: optional warm start ``(m_hist, t_hist)``: ``m_hist`` of shape ``(k, B, ...)`` the
            denoiser outputs at the ``k`` grid times ``t_hist`` (shape ``(k,)``) that precede
            ``ts[0]``, most recent first (``ts[0] < t_hist[0] < t_hist[1] < ...``). Entries beyond
            ``order - 1`` are ignored.
        remat: rematerialisation of the scan for reverse-mode gradients: None, ``"full"``,
            ``"nested"`` (about :math:`2\sqrt N` stored carries) or a segment length; values
            and gradients are identical for every choice.

    Returns:
        The state at ``ts[-1]``, shape and dtype of ``x_init``.

    Examples:
        >>> process = jaxdiff.EDMProcess()
        >>> ts = jaxdiff.timesteps.karras(process, 20, final_zero=True)
        >>> x = dpm_solver_pp(key, denoiser, process, process.sample_prior(key, (16, 2)), ts,
        ...                   order=3, third_order="corrected")
    """
    del key
    order = _check_order(order, (1, 2, 3))
    _check_solver_type(solver_type)
    if third_order not in _THIRD_ORDER:
        raise ValueError(f"third_order must be 'reference' or 'corrected'; got {third_order!r}.")
    check_inputs(process, x_init, ts)
    m_hist, t_hist = _check_history(history, x_init, ts, order)
    return _run_multistep(
        denoiser, process, x_init, ts, cond, order, solver_type, _THIRD_ORDER[third_order],
        bool(lower_order_final), m_hist, t_hist, 0.0, None, None, 0, None, remat,
    )


def dpm_solver_pp_sde(
    key,
    denoiser,
    process,
    x_init,
    ts,
    *,
    cond=None,
    order=2,
    solver_type="midpoint",
    eta=1.0,
    lower_order_final=True,
    noise=None,
    example_index=None,
    remat=None,
):
    r"""SDE-DPM-Solver++ (1 and 2M) with k-diffusion's :math:`\eta`-generalisation.

    Exponential integrator of the reverse-time SDE family of
    :meth:`jaxdiff.processes.AbstractProcess.reverse_drift` with multiplier :math:`\sqrt\eta`
    (its added variance per unit :math:`\lambda` is :math:`2\eta\sigma^2`; :math:`\eta = 0`: the
    PF ODE, :math:`\eta = 1`: the reverse SDE). With :math:`h_\eta = (1 + \eta)h`,

    .. math::
        x_s = \frac{\sigma_s}{\sigma_t} e^{-\eta h} x_t + \alpha_s(1 - e^{-h_\eta})\,m_0
        + \alpha_s c_1 (m_0 - m_1) + \sigma_s\sqrt{1 - e^{-2\eta h}}\;z,

    with :math:`c_1 = 0` (order 1), :math:`c_1 = \tfrac{1}{2}(1 - e^{-h_\eta})\,h/h_1` (2M
    ``"midpoint"``, k-diffusion ``sample_dpmpp_2m_sde``) or :math:`c_1 = \big(\tfrac{\mathrm{expm1}
    (-h_\eta)}{h_\eta} + 1\big) h/h_1` (2M ``"heun"``). ``eta = 0`` is :func:`dpm_solver_pp`;
    order 1 with ``eta = 1`` is DDPM's posterior step (:func:`jaxdiff.samplers.ddpm`,
    ``"fixed_small"``). Warm-up and ``lower_order_final`` as in :func:`dpm_solver_pp`. A final
    exact 0 returns :math:`m_0` (no noise).

    Args:
        key: typed key; example ``i`` at step ``n`` uses ``fold_in(fold_in(key, i), n)``.
        order: 1 or 2.
        solver_type: ``"midpoint"`` or ``"heun"``.
        eta: :math:`\eta \ge 0` (scalar or ``(B,)``). A Python ``0`` draws no noise.
        lower_order_final: cap the order at the number of remaining steps.
        noise: optional explicit noise, shape ``(N, 1, *x_init.shape)``.
        example_index: global indices ``(B,)`` of the examples (for chunked/sharded sampling).
        Other arguments as in :func:`dpm_solver_pp`.

    Examples:
        >>> ts = jaxdiff.timesteps.karras(process, 50, final_zero=True)
        >>> x = dpm_solver_pp_sde(key, denoiser, process, process.sample_prior(key, (16, 2)), ts)
    """
    order = _check_order(order, (1, 2))
    _check_solver_type(solver_type)
    num_draws = 0 if is_python_zero(eta) and noise is None else 1
    check_inputs(process, x_init, ts, noise=noise, num_draws=num_draws)
    dtype = coeff_dtype(x_init, ts)
    eta = jnp.asarray(eta, dtype)
    if eta.ndim > 1 or (eta.ndim == 1 and eta.shape != (x_init.shape[0],)):
        raise ValueError(f"eta must have shape () or (B,) = ({x_init.shape[0]},); got {eta.shape}.")
    return _run_multistep(
        denoiser, process, x_init, ts, cond, order, solver_type, 1.0, bool(lower_order_final),
        None, None, eta, key, noise, num_draws, example_index, remat,
    )


def _check_ratio(value, name):
    if value is not None and is_concrete(value):
        v = float(np.asarray(value))
        if not (np.isfinite(v) and 0.0 < v <= 1.0):
            raise ValueError(f"{name} must lie in (0, 1]; got {value!r}.")


def dpm_solver_pp_singlestep(
    key, denoiser, process, x_init, ts, *, cond=None, order=2, r1=None, r2=None,
    solver_type="midpoint", remat=None,
):
    r"""Singlestep DPM-Solver++ (1, 2S, 3S): ``order`` denoiser calls per step.

    Intermediate stages sit at :math:`\lambda_t + r h`, at times
    ``process.t_from_log_snr(2 * lambda)``. With :math:`m_0 = D(x_t, t)`:

    * 2S (Lu et al. 2022b, Algorithm 1; k-diffusion ``sample_dpmpp_2s_ancestral`` with
      :math:`\eta = 0`), default :math:`r_1 = \tfrac12`:

      .. math::
          u_1 = \frac{\sigma_{u_1}}{\sigma_t}x_t - \alpha_{u_1}\mathrm{expm1}(-r_1 h)\,m_0, \qquad
          x_s = \frac{\sigma_s}{\sigma_t}x_t - \alpha_s\mathrm{expm1}(-h)\Big[m_0
          + \frac{1}{2r_1}\big(D(u_1) - m_0\big)\Big];

    * 3S (dpm-solver's ``singlestep_dpm_solver_third_update``, data prediction, "dpmsolver"
      type), default :math:`r_1 = \tfrac13, r_2 = \tfrac23`:

      .. math::
          u_2 = \frac{\sigma_{u_2}}{\sigma_t}x_t + \alpha_{u_2}\Big[\psi_1(r_2h)\,m_0
          + \frac{\psi_2(r_2 h)}{r_1 h}\big(D(u_1) - m_0\big)\Big], \qquad
          x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s\Big[\psi_1(h)\,m_0
          + \frac{\psi_2(h)}{r_2 h}\big(D(u_2) - m_0\big)\Big].

    Orders: 2S is second order (exact per step only for constant :math:`x_0(\lambda)`; for a
    linear one its local error is :math:`O(h^3)`). 3S is exact for linear :math:`x_0(\lambda)`
    and third order *only for* :math:`r_2 = 2/3` (its last stage approximates the quadratic
    term through :math:`u_2`); other :math:`r_2` give second order. A final exact 0 in ``ts``
    returns :math:`m_0` with one denoiser call (``lax.cond`` skips the stages).

    ``solver_type="heun"`` keeps the stages but integrates the interpolating polynomial of the
    stage outputs exactly in the last update: 2S uses the line through :math:`(0, m_0),
    (r_1h, m_1)`, :math:`x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s[\psi_1 m_0 +
    \psi_2 (m_1 - m_0)/(r_1 h)]`; 3S the quadratic through :math:`(0, m_0), (r_1 h, m_1),
    (r_2 h, m_2)`, :math:`x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s[\psi_1 m_0 + \psi_2 b
    + 2\psi_3 c]` with :math:`x_0(\lambda_t + u) = m_0 + b u + c u^2`. Then a step is exact
    whenever :math:`x_0(\lambda)` is a polynomial of degree below the order (with
    :math:`\psi_1 = 1 - e^{-h}`, :math:`\psi_2 = h - 1 + e^{-h}`, :math:`\psi_3 = h^2/2 - h + 1
    - e^{-h}`); the convergence order is unchanged.

    Args:
        key: unused (deterministic).
        order: 1, 2 or 3 (static). Order 1 is DPM-Solver++(1) = DDIM.
        r1: first stage position in ``(0, 1]`` (default 1/2 for 2S, 1/3 for 3S).
        r2: second stage position for 3S (default 2/3), ``r1 < r2 <= 1``.
        solver_type: ``"midpoint"`` (the reference formulas above) or ``"heun"`` (exact
            integration of the stage polynomial).
        Other arguments as in :func:`dpm_solver_pp`.

    Returns:
        The state at ``ts[-1]``, shape and dtype of ``x_init``.

    Examples:
        >>> ts = jaxdiff.timesteps.uniform_log_snr(process, 10)
        >>> x = dpm_solver_pp_singlestep(key, denoiser, process, x_T, ts, order=3)  # 30 calls
    """
    del key
    order = _check_order(order, (1, 2, 3))
    _check_solver_type(solver_type)
    if order == 1 and (r1 is not None or r2 is not None):
        raise ValueError("r1 and r2 are only used with order 2 or 3.")
    if order == 2 and r2 is not None:
        raise ValueError("r2 is only used with order=3.")
    _check_ratio(r1, "r1")
    _check_ratio(r2, "r2")
    if order == 3 and r1 is not None and r2 is not None and is_concrete(r1, r2):
        if not float(np.asarray(r1)) < float(np.asarray(r2)):
            raise ValueError(f"r1 must be < r2 for order 3; got r1={r1!r}, r2={r2!r}.")
    check_inputs(process, x_init, ts)
    dtype = coeff_dtype(x_init, ts)
    if r1 is None:
        r1 = 0.5 if order == 2 else 1.0 / 3.0
    if r2 is None:
        r2 = 2.0 / 3.0
    r1 = jnp.asarray(r1, dtype)
    r2 = jnp.asarray(r2, dtype)

    def stage_time(lam):
        return process.t_from_log_snr(2.0 * lam)

    def step(x, inp):
        t, s = inp.t.astype(dtype), inp.s.astype(dtype)
        m0 = call_denoiser(denoiser, x, inp.t, cond)

        def full(_):
            s_ = safe_next_time(t, s)
            alpha_s, sigma_s, sigma_t = process.alpha(s_), process.sigma(s_), process.sigma(t)
            lam_t = half_log_snr(process, t)
            h = half_log_snr(process, s_) - lam_t
            p1, p2, p3 = _psi(h)
            inner = bcast(p1, x) * m0
            if order >= 2:
                t1 = stage_time(lam_t + r1 * h)
                a1, q1 = process.alpha(t1), process.sigma(t1) / sigma_t
                u1 = bcast(q1, x) * x - bcast(a1 * jnp.expm1(-r1 * h), x) * m0
                m1 = call_denoiser(denoiser, u1.astype(x.dtype), t1.astype(inp.t.dtype), cond)
            if order == 2 and solver_type == "midpoint":
                inner = inner + bcast(p1 * safe_div(0.5, r1), x) * (m1 - m0)
            elif order == 2:
                inner = inner + bcast(safe_div(p2, r1 * h), x) * (m1 - m0)
            elif order == 3:
                t2 = stage_time(lam_t + r2 * h)
                a2, q2 = process.alpha(t2), process.sigma(t2) / sigma_t
                w1, w2, _ = _psi(r2 * h)
                u2 = bcast(q2, x) * x + bcast(a2, x) * (
                    bcast(w1, x) * m0 + bcast(safe_div(w2, r1 * h), x) * (m1 - m0)
                )
                m2 = call_denoiser(denoiser, u2.astype(x.dtype), t2.astype(inp.t.dtype), cond)
                if solver_type == "midpoint":
                    inner = inner + bcast(safe_div(p2, r2 * h), x) * (m2 - m0)
                else:
                    # Quadratic m0 + b u + c u^2 through the three stage outputs (divided
                    # differences), integrated exactly against the exponential kernel.
                    d1 = bcast(safe_div(1.0, r1 * h), x) * (m1 - m0)
                    d12 = bcast(safe_div(1.0, (r2 - r1) * h), x) * (m2 - m1)
                    c = bcast(safe_div(1.0, r2 * h), x) * (d12 - d1)
                    b = d1 - bcast(r1 * h, x) * c
                    inner = inner + bcast(p2, x) * b + bcast(2.0 * p3, x) * c
            x_next = bcast(sigma_s / sigma_t, x) * x + bcast(alpha_s, x) * inner
            return x_next.astype(x.dtype)

        if order == 1:
            x_next = full(None)
        else:
            x_next = jax.lax.cond(s > 0, full, lambda _: m0.astype(x.dtype), None)
        return jnp.where(s > 0, x_next, m0).astype(x.dtype)

    x, _ = integrate(step, x_init, ts, remat=remat)
    return x
