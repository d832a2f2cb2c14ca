r"""EDM samplers (Karras et al. 2022, Algorithms 1 and 2) for any process.

They integrate the probability-flow ODE in noise-level coordinates, :math:`\tilde x = x/\alpha`
and :math:`n = \sigma/\alpha`, where it reads :math:`d\tilde x/dn = (\tilde x - \hat x_0)/n`
(exactly EDM's ODE; for :class:`EDMProcess` :math:`\tilde x = x`, :math:`n = t`). An Euler step
from :math:`n_t` to :math:`n_s` is :math:`\tilde x + (n_s - n_t)\,d =
\frac{n_s}{n_t}\tilde x + (1 - \frac{n_s}{n_t})\hat x_0`, written without dividing a
cancellation by a small :math:`n`.
"""

import math

import jax
import jax.numpy as jnp

from ._core import call_denoiser, check_inputs, coeff_dtype, integrate, safe_div

__all__ = ["edm_heun"]


def edm_heun(
    key,
    denoiser,
    process,
    x_init,
    ts,
    *,
    cond=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=math.inf,
    s_noise=1.0,
    noise=None,
    example_index=None,
    remat=None,
):
    r"""EDM Heun sampler: deterministic (Algorithm 1) or stochastic with churn (Algorithm 2).

    Per step from :math:`n_i` to :math:`n_{i+1}` (noise levels :math:`n = \sigma/\alpha`):

    1. churn: :math:`\gamma = \min(S_{\rm churn}/N, \sqrt2 - 1)` if
       :math:`S_{\rm tmin} \le n_i \le S_{\rm tmax}` else 0; :math:`\hat n = n_i(1+\gamma)`,
       :math:`\hat{\tilde x} = \tilde x + \sqrt{\hat n^2 - n_i^2}\,S_{\rm noise}\,z`;
    2. Euler: :math:`d = (\hat{\tilde x} - D(\hat{\tilde x}; \hat n))/\hat n`,
       :math:`\tilde x' = \hat{\tilde x} + (n_{i+1} - \hat n) d`;
    3. Heun correction (skipped when :math:`n_{i+1} = 0`):
       :math:`\tilde x_{i+1} = \hat{\tilde x} + (n_{i+1} - \hat n)(d + d')/2`.

    Deterministic Heun is second order with :math:`2N - 1` denoiser calls on a grid ending in
    an exact 0 (the last step is Euler to 0, i.e. returns :math:`\hat x_0`). ``S_tmin`` and
    ``S_tmax`` are noise levels :math:`\sigma/\alpha`, the same for every process.

    Args:
        s_churn, s_tmin, s_tmax, s_noise: Algorithm 2's parameters (``s_churn = 0``:
            deterministic, no noise drawn).
        noise: optional explicit noise, shape ``(N, 1, *x_init.shape)``.
        Other arguments (``remat`` included) as in :func:`jaxdiff.samplers.euler_maruyama`.

    Examples:
        >>> ts = jaxdiff.timesteps.karras(process, 18, final_zero=True)
        >>> x = edm_heun(key, denoiser, process, process.sample_prior(key, (16, 2)), ts)
    """
    stochastic = not (isinstance(s_churn, (int, float)) and s_churn == 0) or noise is not None
    num_draws = 1 if stochastic else 0
    check_inputs(process, x_init, ts, noise=noise, num_draws=num_draws)
    dtype = coeff_dtype(x_init, ts)
    num_steps = ts.shape[0] - 1
    gamma_max = math.sqrt(2.0) - 1.0

    def coeffs(_, t, s):
        t, s = t.astype(dtype), s.astype(dtype)
        alpha_t = process.alpha(t)
        n_t = process.noise_level(t)
        final = s == 0
        # s = 0 has noise level 0 and alpha = 1 by convention (the clean data).
        s_ = jnp.where(final, t, s)
        n_s = jnp.where(final, 0.0, process.noise_level(s_))
        alpha_s = jnp.where(final, 1.0, process.alpha(s_))
        if stochastic:
            in_range = (n_t >= s_tmin) & (n_t <= s_tmax)
            gamma = jnp.where(in_range, jnp.minimum(s_churn / num_steps, gamma_max), 0.0)
            n_hat = n_t * (1.0 + gamma)
            t_hat = process.t_from_noise_level(n_hat)
            extra = n_t * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise  # sqrt(n_hat^2 - n_t^2)
        else:
            n_hat, t_hat, extra = n_t, t, None
        ratio = n_s / n_hat
        return dict(alpha_t=alpha_t, alpha_s=alpha_s, s_=s_, t_hat=t_hat,
                    a_hat=process.alpha(t_hat), extra=extra, ratio=ratio,
                    inv_ratio=safe_div(n_hat, n_s))

    def step(x, inp):
        c = inp.coeffs
        xt = x / c["alpha_t"]
        if stochastic:
            xt = xt + c["extra"] * inp.noise[0]
        x0 = call_denoiser(denoiser, (c["a_hat"] * xt).astype(x.dtype), c["t_hat"], cond)
        ratio = c["ratio"]
        x_euler = ratio * xt + (1.0 - ratio) * x0

        def heun(x_euler):
            # xt + (n_s - n_hat)(d + d')/2 with d = (xt - x0)/n_hat, d' = (x_euler - x0_s)/n_s,
            # expanded so that no difference is divided by a small noise level.
            x0_s = call_denoiser(denoiser, (c["alpha_s"] * x_euler).astype(x.dtype), c["s_"], cond)
            return (xt + 0.5 * (ratio - 1.0) * (xt - x0)
                    + 0.5 * (1.0 - c["inv_ratio"]) * (x_euler - x0_s))

        # The last step to an exact 0 is Euler (2N - 1 calls); cond skips the unused evaluation.
        x_heun = jax.lax.cond(inp.s == 0, lambda v: v, heun, x_euler)
        return (c["alpha_s"] * x_heun).astype(x.dtype)

    x, _ = integrate(
        step, x_init, ts, key=key, noise=noise, num_draws=num_draws,
        state_shape=x_init.shape, dtype=x_init.dtype, example_index=example_index, remat=remat,
        coeffs=coeffs,
    )
    return x
