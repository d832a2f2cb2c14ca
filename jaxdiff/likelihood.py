r"""Likelihoods of diffusion models: probability-flow log-density, ELBOs, bits/dim, classification.

**Probability-flow log-likelihood** (Song et al. 2021; Chen et al. 2018). Along the PF-ODE
:math:`dx/dt = v(x, t) = f(t)x - \tfrac12 g^2(t)\nabla\log p_t(x)` the log-density obeys the
instantaneous change of variables :math:`d\log p_t(x_t)/dt = -\nabla\cdot v(x_t, t)`, so

.. math::
    \log p_{t_0}(x) = \log p_{T}(x_T) + \int_{t_0}^{T} \nabla\cdot v(x_t, t)\,dt,
    \qquad x_{t_0} = x,

integrated forward in time jointly with :math:`x_t`. :func:`log_likelihood` evaluates the
divergence exactly (``D`` forward-mode products, low dimension) or with the Skilling--Hutchinson
estimator :math:`\nabla\cdot v \approx z^\top (\partial v/\partial x) z` (Rademacher or Gaussian
probes :math:`z`, fixed over one solve, one Jacobian-vector product each; several probes give a
standard error). It solves the ODE adaptively with diffrax (``"tsit5"``, ``"dopri5"``) or on a
fixed grid with :func:`jaxdiff.samplers.odeint`.

**Variational bounds** (Kingma et al. 2021, VDM). For any Gaussian process with log-SNR
:math:`\lambda(t)` and a Gaussian decoder :math:`p(x \mid z_{t_0}) = N(z_{t_0}/\alpha_0,
\varsigma_0^2 I)` (:math:`\varsigma = \sigma/\alpha`),

.. math::
    \log p(x) \ge -\mathrm{KL}\big(q(x_T \mid x)\,\|\,p_T\big)
    + E_q \log p(x \mid z_{t_0})
    - \tfrac12 \int_{\lambda(T)}^{\lambda(t_0)} e^{\lambda} E_\varepsilon
      \|x - D(x_\lambda, \lambda)\|^2 \, d\lambda ,

the continuous ELBO (:func:`elbo`); the diffusion term equals
:math:`\tfrac12\int -\lambda'(t)\,E\|\varepsilon - \hat\varepsilon\|^2 dt`, the ``"likelihood"``
weighting of :mod:`jaxdiff.losses`. With the exact denoiser the bound is tight up to
:math:`O(D\varsigma_0^2)` (the truncation at :math:`t_0`). The T-step bound
(:func:`discrete_elbo`) replaces the integral by
:math:`\tfrac12\sum_i (\mathrm{SNR}(t_{i-1}) - \mathrm{SNR}(t_i)) E\|x - D(x_{t_i}, t_i)\|^2`, the
KL terms of an ancestral sampler with posterior variance (DDPM ``fixed_small``); it increases
towards the continuous bound as the grid is refined.

**Discrete data.** :func:`dequantize` adds uniform noise over the bin of each value
(``num_levels`` values evenly spaced on ``[low, high]``, bin width
:math:`\Delta = (\text{high} - \text{low})/(\text{levels} - 1)`), and :func:`bits_per_dim` turns a
continuous log-density (or bound) of the dequantised data into a bound on the discrete negative
log-likelihood, :math:`-(\log p(y) + D\log\Delta)/(D\ln 2)`.

**Diffusion classifier** (Li et al. 2023): :func:`diffusion_classifier` picks the class whose
conditional denoiser explains ``x`` best, with shared noise and times across classes and
successive elimination.

Randomness is per example (``fold_in(key, example_index[i])``), so results do not depend on the
batch size; adaptive solves run one step-size sequence per example for the same reason. The
functions are pure and not jitted internally: wrap a call in :func:`jax.jit` (with the
denoiser's parameters as arguments, e.g. a :class:`jax.tree_util.Partial`) to compile it once.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._trace import basis, quadratic_forms
from ._utils import as_float_array, broadcast_to_batch, check_times, is_concrete
from .samplers._core import call_denoiser, example_keys
from .samplers._ode import odeint
from .timesteps import check_grid

__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_SOLVERS",
    "DiffusionClassification",
    "ELBO",
    "LogLikelihood",
    "bits_per_dim",
    "check_discrete",
    "dequantize",
    "diffusion_classifier",
    "discrete_elbo",
    "elbo",
    "log_likelihood",
]

#: Adaptive Runge--Kutta solvers (diffrax) accepted by :func:`log_likelihood`.
ADAPTIVE_SOLVERS = ("tsit5", "dopri5", "dopri8")
#: Fixed-grid solvers (:func:`jaxdiff.samplers.odeint`) accepted by :func:`log_likelihood`.
FIXED_SOLVERS = ("euler", "heun", "midpoint", "rk4")
_PROBES = ("rademacher", "gaussian")
_LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------------


def _check_data(x, name="x"):
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (B, ...) with a batch axis; got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array; got dtype {x.dtype}.")
    if is_concrete(x) and not np.all(np.isfinite(np.asarray(x, np.float64))):
        raise ValueError(f"{name} must be finite.")
    return x


def _check_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


def _time_range(process, t_min, t_max):
    lo = process.t_min if t_min is None else t_min
    hi = process.t_max if t_max is None else t_max
    check_times(process, lo, "t_min")
    check_times(process, hi, "t_max")
    if is_concrete(lo, hi) and not float(np.asarray(lo)) < float(np.asarray(hi)):
        raise ValueError(f"t_min must be < t_max; got t_min={lo}, t_max={hi}.")
    return as_float_array(lo), as_float_array(hi)


def _flat_dim(x):
    return math.prod(x.shape[1:])


def _sum_rest(a):
    return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def _map(fn, xs, chunk):
    """``vmap`` over the leading axis, or ``lax.map`` in slices of ``chunk`` (bounded memory)."""
    return jax.vmap(fn)(xs) if chunk is None else jax.lax.map(fn, xs, batch_size=chunk)


def _batch_keys(key, batch, example_index):
    if key is None:
        raise ValueError("key is required (a typed PRNG key, jax.random.key(seed)).")
    return example_keys(key, batch, example_index)


# ------------------------------------------------------------------------------------------------
# divergence
# ------------------------------------------------------------------------------------------------


def _probe_draws(keys, num_probes, shape, dtype, kind):
    """Probes ``(P, B, *shape)``; example ``i`` uses its own key so batches do not matter."""

    def one(k):
        if kind == "rademacher":
            return jax.random.rademacher(k, (num_probes, *shape), dtype)
        return jax.random.normal(k, (num_probes, *shape), dtype)

    return jnp.moveaxis(jax.vmap(one)(keys), 0, 1)


def _divergence(fn, x, *, probes=None):
    r"""Value and divergence of a per-example vector field, exactly or by Hutchinson probes.

    .. math::
        \nabla\cdot F(x) = \mathrm{tr}\,\frac{\partial F}{\partial x}
        = E_z\big[z^\top \tfrac{\partial F}{\partial x} z\big],
        \qquad E[z z^\top] = I .

    ``fn`` must act on each example independently (its Jacobian is block-diagonal over the
    batch). One linearisation of ``fn`` is shared by all products: the exact trace costs ``D``
    Jacobian-vector products (``D`` the per-example dimension), the estimator one per probe.

    Args:
        fn: ``fn(x) -> F(x)`` with ``F(x).shape == x.shape``.
        x: shape ``(B, ...)``.
        probes: None for the exact trace, or probes of shape ``(P, B, ...)`` (Rademacher or
            standard normal) for the estimator.

    Returns:
        ``(F(x), div)`` with ``div`` of shape ``(B,)`` (exact) or ``(P, B)`` (one estimate per
        probe; average over the first axis).

    Examples:
        >>> value, div = _divergence(lambda y: -2.0 * y, jnp.ones((4, 3)))   # div = -6
    """
    if probes is None:
        value, diag = quadratic_forms(fn, x, basis(x))
        return value, jnp.sum(diag, axis=0)
    if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
        raise ValueError(
            f"probes must have shape (P, *x.shape) = (P, {x.shape}); got {probes.shape}."
        )
    return quadratic_forms(fn, x, probes.astype(x.dtype))


# ------------------------------------------------------------------------------------------------
# probability-flow log-likelihood
# ------------------------------------------------------------------------------------------------


class LogLikelihood(NamedTuple):
    r"""Result of :func:`log_likelihood` (all per example, shape ``(B,)`` unless stated).

    ``log_prob`` is :math:`\log p_{t_0}(x)`; ``std_error`` its Monte-Carlo standard error over
    Hutchinson probes (zeros for the exact divergence, None with a single probe);
    ``prior_log_prob`` is :math:`\log p_T(x_T)` and ``delta`` :math:`\int\nabla\cdot v\,dt`
    (``(P, B)`` per probe for Hutchinson); ``latent`` is :math:`x_T`; ``num_steps`` the solver
    steps per example (accepted + rejected for adaptive solvers; ``()`` for fixed grids).
    """

    log_prob: jax.Array
    std_error: Any
    prior_log_prob: jax.Array
    delta: jax.Array
    latent: jax.Array
    num_steps: jax.Array


def _fixed_grid(process, lo, hi, steps, ts):
    if ts is not None:
        ts = jnp.asarray(ts)
        check_grid(process, ts[::-1], name="ts (reversed)", allow_final_zero=False)
        return ts
    if steps is None:
        raise ValueError("a fixed-grid solver needs ts (increasing times) or steps.")
    steps = _check_int(steps, "steps")
    # Uniform in log-SNR: the PF-ODE of every process is smooth in lambda.
    lam = jnp.linspace(process.log_snr(lo), process.log_snr(hi), steps + 1)
    grid = process.t_from_log_snr(lam)
    return grid.at[0].set(lo).at[-1].set(hi)


def log_likelihood(
    denoiser,
    process,
    x,
    *,
    key=None,
    cond=None,
    divergence_method="exact",
    num_probes=1,
    probe="rademacher",
    probes=None,
    solver="tsit5",
    rtol=1e-5,
    atol=1e-5,
    max_steps=4096,
    steps=None,
    ts=None,
    t_min=None,
    t_max=None,
    prior_log_prob=None,
    example_index=None,
):
    r"""Log-density :math:`\log p_{t_0}(x)` of the model through the probability-flow ODE.

    .. math::
        \log p_{t_0}(x) = \log p_T(x_T) + \int_{t_0}^{T}\nabla\cdot v(x_t, t)\,dt, \qquad
        v = \frac{\dot\sigma}{\sigma}x - \frac{\alpha g^2}{2\sigma^2} D(x, t),

    integrated from :math:`x_{t_0} = x` to :math:`T`. The divergence is exact
    (``divergence_method="exact"``, ``D`` Jacobian-vector products per evaluation) or the
    Skilling--Hutchinson estimate with ``num_probes`` probes fixed over the solve
    (``"hutchinson"``; unbiased for :math:`\log p` given the exact ODE solution, averaged over
    probes, with a standard error across them).

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` (the Denoiser contract).
        process: the forward process.
        x: data, shape ``(B, ...)``.
        key: typed PRNG key for the probes (Hutchinson without explicit ``probes``).
        cond: conditioning with a leading batch axis (or None).
        divergence_method: ``"exact"`` or ``"hutchinson"``.
        num_probes: probes per example (Hutchinson).
        probe: ``"rademacher"`` or ``"gaussian"``.
        probes: explicit probes ``(P, B, ...)`` instead of drawn ones.
        solver: adaptive (:data:`ADAPTIVE_SOLVERS`, needs diffrax) or fixed-grid
            (:data:`FIXED_SOLVERS`, needs ``steps`` or ``ts``).
        rtol, atol: tolerances of the adaptive step-size controller (> 0).
        max_steps: step budget of an adaptive solve.
        steps: number of steps of a fixed-grid solve (grid uniform in log-SNR).
        ts: explicit increasing grid from ``t_0`` to ``T`` (fixed-grid solvers).
        t_min, t_max: integration range ``[t_0, T]`` (default the process range).
        prior_log_prob: ``fn(x_T) -> (B,)``; default ``process.prior_log_prob`` (the
            :math:`N(0, \sigma(T)^2 I)` prior).
        example_index: global example indices ``(B,)`` for the probe streams.

    Returns:
        A :class:`LogLikelihood`.

    Examples:
        >>> g = jaxdiff.analytic.Gaussian.isotropic(jnp.zeros(2), 1.0)
        >>> process = jaxdiff.VPProcess()
        >>> out = log_likelihood(g.denoiser(process), process, jnp.ones((4, 2)))
        >>> out.log_prob   # ~ g.log_prob(process, x, process.t_min)
    """
    x = _check_data(x)
    if divergence_method not in ("exact", "hutchinson"):
        raise ValueError(
            f"divergence_method must be 'exact' or 'hutchinson'; got {divergence_method!r}."
        )
    if solver not in ADAPTIVE_SOLVERS + FIXED_SOLVERS:
        raise ValueError(
            f"solver must be one of {ADAPTIVE_SOLVERS + FIXED_SOLVERS}; got {solver!r}."
        )
    if solver in ADAPTIVE_SOLVERS:
        for value, name in ((rtol, "rtol"), (atol, "atol")):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
        max_steps = _check_int(max_steps, "max_steps")
    lo, hi = _time_range(process, t_min, t_max)
    batch = x.shape[0]

    hutchinson = divergence_method == "hutchinson"
    if hutchinson:
        if probes is None:
            num_probes = _check_int(num_probes, "num_probes")
            if probe not in _PROBES:
                raise ValueError(f"probe must be one of {_PROBES}; got {probe!r}.")
            keys = _batch_keys(key, batch, example_index)
            probes = _probe_draws(keys, num_probes, x.shape[1:], x.dtype, probe)
        else:
            probes = jnp.asarray(probes)
            if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
                raise ValueError(
                    f"probes must have shape (P, *x.shape) = (P, {x.shape}); got {probes.shape}."
                )
        probes = probes.astype(x.dtype)
    elif probes is not None:
        raise ValueError("probes were given but divergence_method is 'exact'.")

    prior = process.prior_log_prob if prior_log_prob is None else prior_log_prob
    div_dtype = jnp.promote_types(x.dtype, jnp.float32)

    def field(t, state, args):
        y, _ = state
        c, z = args

        def velocity(u):
            x0_hat = call_denoiser(denoiser, u, t, c)
            return process.pf_velocity(u, t, x0_hat).astype(u.dtype)

        v, div = _divergence(velocity, y, probes=z)
        return v, div.astype(div_dtype)

    def init(y, z):
        shape = (y.shape[0],) if z is None else (z.shape[0], y.shape[0])
        return y, jnp.zeros(shape, div_dtype)

    if solver in FIXED_SOLVERS:
        grid = _fixed_grid(process, lo, hi, steps, ts)
        latent, delta = odeint(field, init(x, probes), grid, args=(cond, probes), method=solver)
        num_steps = jnp.asarray(grid.shape[0] - 1)
    else:
        latent, delta, num_steps = _adaptive(
            field, init, x, cond, probes, lo, hi, solver, rtol, atol, max_steps
        )

    prior_lp = jnp.asarray(prior(latent))
    if prior_lp.shape != (batch,):
        raise ValueError(
            f"prior_log_prob must return shape (B,) = ({batch},); got {prior_lp.shape}."
        )
    if hutchinson:
        per_probe = prior_lp[None, :] + delta
        log_prob = jnp.mean(per_probe, axis=0)
        p = per_probe.shape[0]
        std_error = jnp.std(per_probe, axis=0, ddof=1) / math.sqrt(p) if p > 1 else None
    else:
        log_prob = prior_lp + delta
        std_error = jnp.zeros_like(log_prob)
    return LogLikelihood(log_prob, std_error, prior_lp, delta, latent, num_steps)


def _adaptive(field, init, x, cond, probes, lo, hi, solver, rtol, atol, max_steps):
    """One diffrax solve per example (own step sizes), vmapped over the batch."""
    try:
        import diffrax
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"solver={solver!r} needs diffrax (pip install diffrax); fixed-grid solvers "
            f"{FIXED_SOLVERS} do not."
        ) from err
    solvers = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8}

    def one(x1, c1, z1):
        # Restore a batch axis of one so the denoiser and the field see the Denoiser contract.
        xb = x1[None]
        cb = jax.tree.map(lambda a: a[None], c1)
        zb = None if z1 is None else z1[:, None]
        term = diffrax.ODETerm(lambda t, y, args: field(t, y, args))
        sol = diffrax.diffeqsolve(
            term,
            solvers[solver](),
            t0=lo,
            t1=hi,
            dt0=None,
            y0=init(xb, zb),
            args=(cb, zb),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=max_steps,
            saveat=diffrax.SaveAt(t1=True),
        )
        latent, delta = jax.tree.map(lambda a: a[0], sol.ys)
        steps = sol.stats["num_steps"] + sol.stats["num_rejected_steps"]
        return latent[0], (delta[0] if zb is None else delta[:, 0]), steps

    z_axis = None if probes is None else 1
    out_axes = (0, 0 if probes is None else 1, 0)
    return jax.vmap(one, in_axes=(0, 0, z_axis), out_axes=out_axes)(x, cond, probes)


# ------------------------------------------------------------------------------------------------
# variational bounds
# ------------------------------------------------------------------------------------------------


class ELBO(NamedTuple):
    r"""Result of :func:`elbo` / :func:`discrete_elbo`, each of shape ``(B,)``.

    ``elbo = -prior_kl + reconstruction - diffusion`` (nats); ``std_error`` is the Monte-Carlo
    standard error of ``elbo`` (from the spread of the per-sample diffusion terms; with
    stratified times it is conservative).
    """

    elbo: jax.Array
    std_error: jax.Array
    prior_kl: jax.Array
    reconstruction: jax.Array
    diffusion: jax.Array


def _prior_kl(process, x, t_hi, prior_std):
    r""":math:`\mathrm{KL}(N(\alpha_T x, \sigma_T^2 I) \| N(0, s^2 I))` per example."""
    alpha, sigma = process.alpha(t_hi), process.sigma(t_hi)
    s = process.prior_std() if prior_std is None else as_float_array(prior_std)
    ratio = jnp.square(sigma / s)
    d = _flat_dim(x)
    sq = _sum_rest(jnp.square(x))
    return 0.5 * (d * (ratio - 1.0 - jnp.log(ratio)) + jnp.square(alpha / s) * sq)


def _reconstruction(process, x, t_lo):
    r""":math:`E\log N(x; z/\alpha_0, \varsigma_0^2 I) = -\tfrac D2(1 + \log 2\pi\varsigma_0^2)`."""
    d = _flat_dim(x)
    log_noise = -0.5 * process.log_snr(t_lo)
    value = -0.5 * d * (1.0 + _LOG_2PI + 2.0 * log_noise)
    return jnp.full((x.shape[0],), value, jnp.promote_types(x.dtype, jnp.float32))


def _diffusion_terms(denoiser, process, x, cond, keys, num_samples, draw, chunk, with_keys=False):
    r"""Per-example, per-sample :math:`\tfrac12 w_j \|x - D(x_{t_j}, t_j)\|^2`, shape ``(B, n)``.

    ``draw(u, j, keys) -> (t, weight)`` maps the per-example uniforms ``u`` (B,) of sample ``j``
    (or, ``with_keys``, per-example keys) to times and weights (the weights include the
    importance correction).
    """
    batch, d = x.shape[0], _flat_dim(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    # One normal draw per example holds every sample's noise and (through the normal CDF) its
    # uniform: a single generator call keeps the compiled program small.
    z = jax.vmap(lambda k: jax.random.normal(k, (num_samples, d + 1), dtype))(keys)
    z = jnp.moveaxis(z, 1, 0)  # (n, B, D + 1)
    if with_keys:
        split = lambda k: jax.random.split(jax.random.fold_in(k, 1), num_samples)
        time_keys = jnp.moveaxis(jax.vmap(split)(keys), 1, 0)
    else:
        time_keys = jnp.zeros((num_samples,), jnp.int32)  # unused placeholder

    def one_sample(args):
        j, z_j, k_j = args
        u = jax.scipy.special.ndtr(z_j[:, 0])
        eps = z_j[:, 1:].reshape(x.shape).astype(x.dtype)
        t, weight = draw(u, j, k_j)
        alpha, sigma = process.alpha(t), process.sigma(t)
        x_t = broadcast_to_batch(alpha, x) * x + broadcast_to_batch(sigma, x) * eps
        tb = jnp.broadcast_to(t, (batch,))
        x0_hat = denoiser(x_t.astype(x.dtype), tb, cond)
        if x0_hat.shape != x.shape:
            raise ValueError(f"denoiser returned shape {x0_hat.shape}; expected {x.shape}.")
        err = _sum_rest(jnp.square((x - x0_hat).astype(dtype)))
        return 0.5 * weight * err

    js = jnp.arange(num_samples, dtype=jnp.int32)
    terms = _map(one_sample, (js, z, time_keys), chunk)  # (n, B)
    return terms.T


def _finish_elbo(prior_kl, recon, terms):
    n = terms.shape[1]
    diffusion = jnp.mean(terms, axis=1)
    if n > 1:
        se = jnp.std(terms, axis=1, ddof=1) / math.sqrt(n)
    else:
        se = jnp.full_like(diffusion, jnp.inf)
    return ELBO(-prior_kl + recon - diffusion, se, prior_kl, recon, diffusion)


def _stratify(u, j, num_samples, stratified):
    return (j.astype(u.dtype) + u) / num_samples if stratified else u


_TIME_SAMPLING = ("uniform_log_snr", "uniform")


def elbo(
    key,
    denoiser,
    process,
    x,
    *,
    cond=None,
    num_samples=64,
    time_sampling="uniform_log_snr",
    stratified=True,
    t_min=None,
    t_max=None,
    prior_std=None,
    example_index=None,
    chunk=None,
):
    r"""Continuous-time evidence lower bound on :math:`\log p(x)` for any Gaussian process.

    .. math::
        \mathrm{ELBO}(x) = -\mathrm{KL}\big(N(\alpha_T x, \sigma_T^2 I)\,\|\,N(0, s^2 I)\big)
        - \tfrac D2\big(1 + \log 2\pi\varsigma_0^2\big)
        - \tfrac12\int_{\lambda_T}^{\lambda_0} e^{\lambda}\,
          E_\varepsilon\|x - D(\alpha x + \sigma\varepsilon, t(\lambda))\|^2 d\lambda ,

    with a Gaussian decoder at :math:`t_0` (noise level :math:`\varsigma_0`) and the prior
    :math:`N(0, s^2 I)`, :math:`s` = ``prior_std`` (default ``process.prior_std()``). The
    integral is estimated with ``num_samples`` draws of :math:`(t, \varepsilon)` per example:

    * ``"uniform_log_snr"``: :math:`\lambda \sim U[\lambda_T, \lambda_0]`, weight
      :math:`(\lambda_0 - \lambda_T) e^{\lambda}` (the usual importance choice: the integrand is
      the unweighted :math:`\varepsilon`-error);
    * ``"uniform"``: :math:`t \sim U[t_0, T]`, weight :math:`(T - t_0)(-\lambda'(t)) e^{\lambda}`;
    * a callable ``(key, shape) -> (t, log_q)``: importance sampling from any density
      :math:`q(t)` on :math:`[t_0, T]` (called per example with ``shape = ()``; ``log_q`` is
      :math:`\log q(t)`), weight :math:`-\lambda'(t) e^{\lambda}/q(t)`.

    ``stratified`` places sample ``j`` of an example in ``[j/n, (j+1)/n)`` of the uniform
    variable (lower variance; the reported SE is then conservative).

    Args:
        key: typed PRNG key.
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        x: continuous data, shape ``(B, ...)`` (dequantise discrete data first).
        cond: conditioning with a leading batch axis (or None).
        num_samples: draws of :math:`(t, \varepsilon)` per example.
        time_sampling: ``"uniform_log_snr"``, ``"uniform"`` or a callable (see above).
        stratified: stratify the uniform variable over the samples (built-in samplings).
        t_min, t_max: the range :math:`[t_0, T]` (default the process range).
        prior_std: standard deviation of the prior (default ``process.prior_std()``).
        example_index: global example indices ``(B,)`` for the noise streams.
        chunk: number of samples evaluated at once (``lax.map`` slices; default all, vmapped).

    Returns:
        An :class:`ELBO` (nats per example).

    Examples:
        >>> g = jaxdiff.analytic.Gaussian.isotropic(jnp.zeros(2), 1.0)
        >>> process = jaxdiff.VPProcess()
        >>> out = elbo(jax.random.key(0), g.denoiser(process), process, jnp.ones((4, 2)))
    """
    x = _check_data(x)
    num_samples = _check_int(num_samples, "num_samples")
    if chunk is not None:
        chunk = _check_int(chunk, "chunk")
    lo, hi = _time_range(process, t_min, t_max)
    keys = _batch_keys(key, x.shape[0], example_index)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    lam_lo, lam_hi = process.log_snr(hi), process.log_snr(lo)  # lambda at T (low), at t_0 (high)

    if callable(time_sampling):

        def draw(u, j, k):
            del u, j
            t, log_q = jax.vmap(time_sampling, in_axes=(0, None))(k, ())
            t = jnp.asarray(t, dtype)
            if t.shape != (x.shape[0],) or jnp.shape(log_q) != (x.shape[0],):
                raise ValueError(
                    "time_sampling(key, ()) must return scalars t and log_q; got shapes "
                    f"{t.shape[1:]} and {jnp.shape(log_q)[1:]}."
                )
            w = -process.d_log_snr(t) * jnp.exp(process.log_snr(t) - log_q)
            return t, w

    elif time_sampling == "uniform_log_snr":

        def draw(u, j, k):
            u = _stratify(u, j, num_samples, stratified)
            lam = lam_lo + u * (lam_hi - lam_lo)
            t = jnp.clip(process.t_from_log_snr(lam), lo, hi)
            return t, (lam_hi - lam_lo) * jnp.exp(lam)

    elif time_sampling == "uniform":

        def draw(u, j, k):
            u = _stratify(u, j, num_samples, stratified)
            t = lo + u * (hi - lo)
            return t, (hi - lo) * (-process.d_log_snr(t)) * jnp.exp(process.log_snr(t))

    else:
        raise ValueError(
            f"time_sampling must be one of {_TIME_SAMPLING} or a callable; got {time_sampling!r}."
        )

    terms = _diffusion_terms(
        denoiser, process, x, cond, keys, num_samples, draw, chunk, callable(time_sampling)
    )
    return _finish_elbo(
        _prior_kl(process, x, hi, prior_std).astype(dtype),
        _reconstruction(process, x, lo),
        terms,
    )


def _discrete_grid(process, num_steps, ts):
    from .processes import DiscreteVPProcess

    if ts is not None:
        ts = jnp.asarray(ts)
        check_grid(process, ts[::-1], name="ts (reversed)", allow_final_zero=False)
        return ts
    if isinstance(process, DiscreteVPProcess) and num_steps is None:
        knots = process.time_from_index(np.arange(process.num_train_timesteps))
        lo, hi = float(np.asarray(process.t_min)), float(np.asarray(process.t_max))
        knots = knots[(knots >= lo * (1 - 1e-12)) & (knots <= hi * (1 + 1e-12))]
        return jnp.asarray(knots)
    if num_steps is None:
        raise ValueError("discrete_elbo needs ts or num_steps (or a DiscreteVPProcess).")
    num_steps = _check_int(num_steps, "num_steps")
    lo, hi = as_float_array(process.t_min), as_float_array(process.t_max)
    return _fixed_grid(process, lo, hi, num_steps, None)


def discrete_elbo(
    key,
    denoiser,
    process,
    x,
    *,
    cond=None,
    ts=None,
    num_steps=None,
    num_samples=64,
    stratified=True,
    prior_std=None,
    example_index=None,
    chunk=None,
):
    r"""T-step evidence lower bound of the ancestral sampler with posterior variance.

    On an increasing grid :math:`t_0 < t_1 < \dots < t_T`, the reverse step
    :math:`p(x_{t_{i-1}} \mid x_{t_i}) = q(x_{t_{i-1}} \mid x_{t_i}, x_0 = D(x_{t_i}, t_i))`
    (DDPM with ``fixed_small`` variance, DDIM with :math:`\eta = 1`) has KL term
    :math:`\tfrac12(\mathrm{SNR}_{i-1} - \mathrm{SNR}_i)\|x - D(x_{t_i}, t_i)\|^2`, so

    .. math::
        \mathrm{ELBO}_T(x) = -\mathrm{KL}_T + E\log p(x \mid z_{t_0})
        - \tfrac12\sum_{i=1}^{T}(\mathrm{SNR}_{i-1} - \mathrm{SNR}_i)\,
          E_\varepsilon\|x - D(x_{t_i}, t_i)\|^2 .

    The sum is estimated with ``num_samples`` uniformly drawn (stratified) indices ``i`` per
    example, weight :math:`T`. As the grid is refined it increases to :func:`elbo`.

    Args:
        key: typed PRNG key.
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process; a :class:`~jaxdiff.DiscreteVPProcess` defaults to its
            training knots ``(n + 1)/N`` in ``[t_min, t_max]`` (``T = N - 1`` steps after
            :math:`t_0 = 1/N`).
        x: continuous data, shape ``(B, ...)``.
        cond: conditioning (or None).
        ts: explicit increasing grid ``(T + 1,)``.
        num_steps: ``T`` for a grid uniform in log-SNR over the process range.
        num_samples: index draws per example.
        stratified: stratify the index draws.
        prior_std: standard deviation of the prior (default ``process.prior_std()``).
        example_index: global example indices ``(B,)``.
        chunk: samples evaluated at once (default all).

    Returns:
        An :class:`ELBO`.

    Examples:
        >>> process = jaxdiff.DiscreteVPProcess.create(1000)
        >>> g = jaxdiff.analytic.Gaussian.isotropic(jnp.zeros(2), 1.0)
        >>> out = discrete_elbo(jax.random.key(0), g.denoiser(process), process, jnp.ones((4, 2)))
    """
    x = _check_data(x)
    num_samples = _check_int(num_samples, "num_samples")
    if chunk is not None:
        chunk = _check_int(chunk, "chunk")
    grid = _discrete_grid(process, num_steps, ts)
    num_terms = grid.shape[0] - 1
    keys = _batch_keys(key, x.shape[0], example_index)
    lam = process.log_snr(grid)
    # SNR_{i-1} - SNR_i = SNR_i * expm1(lambda_{i-1} - lambda_i), free of cancellation.
    gaps = jnp.exp(lam[1:]) * jnp.expm1(lam[:-1] - lam[1:])

    def draw(u, j, k):
        u = _stratify(u, j, num_samples, stratified)
        i = jnp.clip(jnp.floor(u * num_terms).astype(jnp.int32), 0, num_terms - 1)
        return grid[i + 1], num_terms * gaps[i]

    terms = _diffusion_terms(denoiser, process, x, cond, keys, num_samples, draw, chunk)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return _finish_elbo(
        _prior_kl(process, x, grid[-1], prior_std).astype(dtype),
        _reconstruction(process, x, grid[0]),
        terms,
    )


# ------------------------------------------------------------------------------------------------
# discrete data
# ------------------------------------------------------------------------------------------------


def _bin_width(num_levels, low, high):
    num_levels = _check_int(num_levels, "num_levels", minimum=2)
    for value, name in ((low, "low"), (high, "high")):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}.")
    if not low < high:
        raise ValueError(f"low must be < high; got low={low}, high={high}.")
    return (high - low) / (num_levels - 1)


def check_discrete(x, *, num_levels, low=-1.0, high=1.0, name="x"):
    r"""Raise ValueError unless concrete ``x`` takes only the ``num_levels`` values of the lattice.

    The values are :math:`\text{low} + k\Delta`, :math:`k = 0,\dots,\text{levels}-1`,
    :math:`\Delta = (\text{high}-\text{low})/(\text{levels}-1)` (8-bit images on ``[-1, 1]``:
    256 levels; scikit-learn digits: 17 levels, :math:`\Delta = 2/16`). A tolerance of
    :math:`10^{-3}\Delta` absorbs float rounding. Traced values are not checked.

    Examples:
        >>> check_discrete(jnp.array([[-1.0, 0.0, 1.0]]), num_levels=3)
    """
    width = _bin_width(num_levels, low, high)
    if not is_concrete(x):
        return
    v = np.asarray(x, np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite.")
    tol = 1e-3 * width
    if v.min() < low - tol or v.max() > high + tol:
        raise ValueError(
            f"{name} must lie in [low, high] = [{low}, {high}]; got values in "
            f"[{v.min()}, {v.max()}]."
        )
    k = (v - low) / width
    off = np.abs(k - np.round(k)).max() * width
    if off > tol:
        raise ValueError(
            f"{name} must take the {num_levels} levels low + k * {width:g} on [{low}, {high}]; "
            f"a value is {off:.3g} away from the nearest level."
        )


def dequantize(key, x, *, num_levels, low=-1.0, high=1.0, example_index=None):
    r"""Uniform dequantisation :math:`y = x + \Delta(u - \tfrac12)`, :math:`u \sim U[0, 1)^D`.

    Every level owns the bin of width :math:`\Delta = (\text{high}-\text{low})/(\text{levels}-1)`
    centred on it, so :math:`P(x) = \int_{\text{bin}} p(y)\,dy \ge \Delta^D \exp E_u\log p(y)`.

    Args:
        key: typed PRNG key (noise of example ``i`` from ``fold_in(key, example_index[i])``).
        x: discrete data on the lattice (see :func:`check_discrete`), shape ``(B, ...)``.
        num_levels, low, high: the lattice.
        example_index: global example indices ``(B,)``.

    Returns:
        ``y`` with the shape and dtype of ``x``.

    Examples:
        >>> y = dequantize(jax.random.key(0), jnp.zeros((2, 4)), num_levels=17)
    """
    x = _check_data(x)
    width = _bin_width(num_levels, low, high)
    check_discrete(x, num_levels=num_levels, low=low, high=high)
    keys = _batch_keys(key, x.shape[0], example_index)
    u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype))(keys)
    return x + width * (u - 0.5)


def bits_per_dim(log_prob, dim, *, num_levels, low=-1.0, high=1.0):
    r"""Bits per dimension of discrete data from a continuous log-density of dequantised data.

    .. math::
        \mathrm{bpd} = -\frac{\log p(y) + D\log\Delta}{D\ln 2},

    an upper bound on :math:`-\log_2 P(x)/D` in expectation over the dequantisation noise (and
    for any lower bound on :math:`\log p(y)`, such as :func:`elbo`).

    Args:
        log_prob: :math:`\log p(y)` (or a lower bound), any shape.
        dim: the dimension :math:`D` of one example.
        num_levels, low, high: the lattice of the discrete data.

    Returns:
        Bits per dimension, the shape of ``log_prob``.

    Examples:
        >>> bits_per_dim(jnp.array([-100.0]), 64, num_levels=17)
    """
    width = _bin_width(num_levels, low, high)
    dim = _check_int(dim, "dim")
    return -(jnp.asarray(log_prob) + dim * math.log(width)) / (dim * math.log(2.0))


# ------------------------------------------------------------------------------------------------
# diffusion classifier
# ------------------------------------------------------------------------------------------------


class DiffusionClassification(NamedTuple):
    r"""Result of :func:`diffusion_classifier`.

    ``label`` ``(B,)``: the predicted class index. ``errors`` ``(B, C)``: mean weighted
    :math:`\varepsilon`-error of each class over the samples it was evaluated on (``counts``
    ``(B, C)``). ``scores`` ``(B, C)``: class scores, :math:`-\infty` for eliminated classes; for
    the ELBO weighting :math:`\log p(x \mid c) + \log\pi_c` up to a shared constant (a softmax
    gives the class posterior), for the uniform weighting :math:`-\text{errors}`.
    """

    label: jax.Array
    errors: jax.Array
    counts: jax.Array
    scores: jax.Array


_WEIGHTINGS = ("elbo", "uniform")


def _nested_order(n):
    """Van der Corput order of ``n`` stratified points: every prefix is spread evenly."""
    bits = max(1, math.ceil(math.log2(n)))
    rev = np.array([int(format(i, f"0{bits}b")[::-1], 2) for i in range(2**bits)])
    return rev[rev < n]


def _check_rounds(num_samples, keep, num_classes):
    if isinstance(num_samples, (int, np.integer)):
        num_samples = (num_samples,)
    num_samples = tuple(_check_int(n, "num_samples") for n in num_samples)
    if any(b <= a for a, b in zip(num_samples, num_samples[1:])):
        raise ValueError(
            f"num_samples must be strictly increasing (cumulative); got {num_samples}."
        )
    if keep is None:
        keep = (num_classes,) * (len(num_samples) - 1) + (1,)
    if isinstance(keep, (int, np.integer)):
        keep = (keep,)
    keep = tuple(_check_int(k, "keep") for k in keep)
    if len(keep) != len(num_samples):
        raise ValueError(
            f"keep must have one entry per round ({len(num_samples)}); got {len(keep)}."
        )
    survivors = (num_classes,) + keep[:-1]
    if any(k > s for k, s in zip(keep, survivors)):
        raise ValueError(
            f"keep must not exceed the classes alive before each round {survivors}; got {keep}."
        )
    return num_samples, keep


def diffusion_classifier(
    key,
    denoiser,
    process,
    x,
    class_conds,
    *,
    num_samples=64,
    keep=None,
    weighting="elbo",
    log_prior=None,
    t_min=None,
    t_max=None,
    example_index=None,
    chunk=None,
):
    r"""Zero-shot classification by class-conditional denoising errors (Li et al. 2023).

    .. math::
        \hat c = \arg\min_c \sum_j w_j\,\|\varepsilon_j - \hat\varepsilon(x_{t_j}, t_j, c)\|^2
        - 2\log\pi_c/\Delta\lambda \;[\text{ELBO}], \qquad
        x_{t_j} = \alpha_j x + \sigma_j\varepsilon_j .

    Variance reduction: the same :math:`(t_j, \varepsilon_j)` for every class; deterministic,
    stratified times; successive elimination -- round ``r`` evaluates the new samples up to
    ``num_samples[r]`` (cumulative) on the classes still alive and keeps the ``keep[r]`` with
    the lowest mean error (errors accumulate over rounds). Two weightings:

    * ``"elbo"``: times evenly spaced in log-SNR, unweighted :math:`\varepsilon`-error, i.e. the
      diffusion term of :func:`elbo`; ``scores`` are
      :math:`-\tfrac12(\lambda_0-\lambda_T)\,\text{error} + \log\pi_c`, the class-conditional
      ELBO up to a shared constant (Bayes-consistent as the sample count grows).
    * ``"uniform"``: the paper's protocol -- times evenly spaced in ``t``, unweighted
      :math:`\varepsilon`-error (not a bound; often better with imperfect networks).

    Args:
        key: typed PRNG key (noise of example ``i`` from ``fold_in(key, example_index[i])``).
        denoiser: class-conditional ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        x: shape ``(B, ...)``.
        class_conds: the conditioning of each class, a pytree whose leaves have a leading axis of
            size ``C`` (e.g. ``jnp.arange(10)`` for label-conditioned networks).
        num_samples: an int, or increasing cumulative sample counts, one per round.
        keep: classes kept after each round (default all, then 1); the last entry is usually 1.
        weighting: ``"elbo"`` or ``"uniform"``.
        log_prior: log class prior :math:`\log\pi_c` ``(C,)`` (``"elbo"`` only; default uniform).
        t_min, t_max: the range of times (default the process range).
        example_index: global example indices ``(B,)``.
        chunk: examples classified at once (``lax.map`` batch size; default all). Each denoiser
            call then holds ``chunk * C * samples-per-round`` inputs.

    Returns:
        A :class:`DiffusionClassification`.

    Examples:
        >>> result = diffusion_classifier(jax.random.key(0), denoiser, process, x,
        ...                               jnp.arange(10), num_samples=(20, 100), keep=(3, 1))
    """
    x = _check_data(x)
    leaves = jax.tree.leaves(class_conds)
    if not leaves:
        raise ValueError("class_conds must have at least one leaf with a leading class axis.")
    num_classes = int(jnp.shape(leaves[0])[0]) if jnp.ndim(leaves[0]) else 0
    if num_classes < 2 or any(jnp.ndim(a) < 1 or jnp.shape(a)[0] != num_classes for a in leaves):
        raise ValueError(
            "class_conds leaves must share a leading class axis of size C >= 2; got shapes "
            f"{[jnp.shape(a) for a in leaves]}."
        )
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}; got {weighting!r}.")
    if log_prior is not None:
        if weighting != "elbo":
            raise ValueError("log_prior is only meaningful with weighting='elbo'.")
        log_prior = jnp.asarray(log_prior)
        if log_prior.shape != (num_classes,):
            raise ValueError(
                f"log_prior must have shape (C,) = ({num_classes},); got {log_prior.shape}."
            )
    if chunk is not None:
        chunk = _check_int(chunk, "chunk")
    rounds, keep = _check_rounds(num_samples, keep, num_classes)
    lo, hi = _time_range(process, t_min, t_max)
    n_max = rounds[-1]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    mid = (jnp.arange(n_max, dtype=dtype) + 0.5) / n_max
    if weighting == "elbo":
        lam_T, lam_0 = process.log_snr(hi), process.log_snr(lo)
        times = process.t_from_log_snr(lam_T + mid * (lam_0 - lam_T))
        scale = 0.5 * (lam_0 - lam_T)
    else:
        times = lo + mid * (hi - lo)
        scale = jnp.asarray(1.0, dtype)
    times = jnp.clip(times, lo, hi)[_nested_order(n_max)]
    keys = _batch_keys(key, x.shape[0], example_index)

    def errors_of(x1, eps, ts, classes):
        """Unweighted eps-errors ``(k, m)`` of classes ``classes`` (k,) at ``m`` samples."""
        k, m = classes.shape[0], ts.shape[0]
        alpha, sigma = process.alpha(ts), process.sigma(ts)
        x_t = broadcast_to_batch(alpha, eps) * x1[None] + broadcast_to_batch(sigma, eps) * eps
        x_in = jnp.broadcast_to(x_t[None], (k, *x_t.shape)).reshape(k * m, *x1.shape)
        t_in = jnp.broadcast_to(ts[None], (k, m)).reshape(k * m)
        c_in = jax.tree.map(lambda a: jnp.repeat(a[classes], m, axis=0), class_conds)
        x0_hat = denoiser(x_in.astype(x.dtype), t_in, c_in)
        if x0_hat.shape != x_in.shape:
            raise ValueError(f"denoiser returned shape {x0_hat.shape}; expected {x_in.shape}.")
        diff = (x1[None, None] - x0_hat.reshape(k, m, *x1.shape)).astype(dtype)
        snr = jnp.exp(process.log_snr(ts)).astype(dtype)
        return snr[None, :] * jnp.sum(diff.reshape(k, m, -1) ** 2, axis=-1)

    def classify(args):
        x1, k1 = args
        eps = jax.random.normal(k1, (n_max, *x1.shape), x1.dtype)
        totals = jnp.zeros((num_classes,), dtype)
        counts = jnp.zeros((num_classes,), jnp.int32)
        alive = jnp.arange(num_classes)
        start = 0
        for n_r, k_r in zip(rounds, keep):
            err = errors_of(x1, eps[start:n_r], times[start:n_r], alive)
            totals = totals.at[alive].add(jnp.sum(err, axis=1))
            counts = counts.at[alive].add(n_r - start)
            objective = scale * totals[alive] / n_r
            if log_prior is not None:
                objective = objective - log_prior[alive]
            alive = alive[jnp.argsort(objective)[:k_r]]
            start = n_r
        mean_err = totals / jnp.maximum(counts, 1)
        score = -scale * mean_err
        if log_prior is not None:
            score = score + log_prior
        alive_mask = jnp.zeros((num_classes,), bool).at[alive].set(True)
        score = jnp.where(alive_mask, score, -jnp.inf)
        return jnp.argmax(score), mean_err, counts, score

    label, errors, counts, scores = _map(classify, (x, keys), chunk)
    return DiffusionClassification(label, errors, counts, scores)
