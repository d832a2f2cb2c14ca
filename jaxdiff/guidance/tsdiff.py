r"""TSDiff (Kollovieh et al. 2023): observation self-guidance and refinement for sequences.

An *unconditional* diffusion model of sequences :math:`x \in \mathbb{R}^{L}` (or
:math:`\mathbb{R}^{L \times C}`) becomes a forecaster or an imputer at inference time.

* :func:`observation_guidance` -- self-guidance: the score is pushed towards the observed
  entries :math:`y_{\rm obs}` (mask :math:`m`) through the one-step estimate
  :math:`\hat x_0(x_t)`,

  .. math::
      \nabla\log p_t(x_t \mid y_{\rm obs}) \approx \nabla\log p_t(x_t)
      - s\,\nabla_{x_t}\,\ell\big(y_{\rm obs}, \hat x_0(x_t)\big),

  with the MSE :math:`\ell = \sum_{\rm obs}(\hat x_0 - y)^2` (a Gaussian likelihood) or the
  quantile (pinball, asymmetric-Laplace) loss :math:`\ell_q = \sum_{\rm obs}\max(q e, (q-1) e)`,
  :math:`e = y - \hat x_0`. Forecast sample :math:`k` of :math:`N` uses the level
  :math:`q_k = k/(N+1)` (:func:`quantile_levels`), which spreads the samples over the quantiles.
  It is :func:`jaxdiff.guidance.loss_guided.loss_guidance` with that loss, so it works with every
  sampler; it is TSDiff's DDIM form (:math:`\hat\varepsilon' = \hat\varepsilon + s\,\sigma_t
  \nabla_{x_t}\ell`). TSDiff's DDPM variant instead adds :math:`s\,\tilde\sigma_t^2(-\nabla E)`
  after each ancestral step, evaluated at the new sample.
* :func:`refine` -- improve given forecasts :math:`y` (of any base model) by descending, or
  sampling with Langevin dynamics from, the energy

  .. math::
      E(y) = L_\theta(y; t^\star) + \lambda\,R(y, \bar y), \qquad
      L_\theta(y; t) = \big\|\varepsilon - \hat\varepsilon_\theta(\alpha_t y + \sigma_t\varepsilon,
      t)\big\|^2 = \frac{\alpha_t^2}{\sigma_t^2}\big\|\hat x_0(\alpha_t y + \sigma_t\varepsilon, t)
      - y\big\|^2,

  the denoising loss at one fixed time :math:`t^\star` as a proxy for :math:`-\log p_\theta(y)`,
  plus an MSE or quantile regulariser towards a target :math:`\bar y` (the base forecast, or the
  observations under a mask).
* :func:`best_diffusion_time` -- TSDiff's choice of :math:`t^\star`: the time whose mean
  denoising loss on data is closest to the loss averaged over times.
* :func:`refine_energy` -- :math:`E(y)` for given noise (diagnostics and tests).

Sums run over all non-batch axes; examples are independent.

Reference:
    M. Kollovieh et al., "Predict, Refine, Synthesize: Self-Guiding Diffusion Models for
    Probabilistic Time Series Forecasting", NeurIPS 2023.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, check_positive, check_times, is_concrete
from ..samplers._core import bcast, draw_noise, example_keys
from ._common import check_callable, static_config
from .loss_guided import loss_guidance

__all__ = [
    "observation_guidance",
    "quantile_levels",
    "refine",
    "refine_energy",
    "best_diffusion_time",
]

_KINDS = ("mse", "quantile")
_MODES = ("most_likely", "mcmc")


# ------------------------------------------------------------------------------------------------
# Validation and the observation losses
# ------------------------------------------------------------------------------------------------


def _check_kind(kind):
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}.")


def _as_mask(mask, name="mask"):
    """A boolean mask (True = observed) from bools or numbers in {0, 1}."""
    mask = jnp.asarray(mask)
    if mask.dtype == jnp.bool_:
        return mask
    if is_concrete(mask):
        m = np.asarray(mask)
        if not np.all((m == 0) | (m == 1)):
            raise ValueError(f"{name} must be boolean or hold only 0 and 1; got values {m}.")
    return mask != 0


def _check_broadcastable(y, mask, y_name, mask_name):
    """``y`` and ``mask`` must broadcast together (e.g. a ``(L, 1)`` mask for ``(L, C)`` data)."""
    try:
        np.broadcast_shapes(y.shape, mask.shape)
    except ValueError:
        raise ValueError(
            f"{y_name} and {mask_name} must broadcast together; got {y_name}.shape = {y.shape} "
            f"and {mask_name}.shape = {mask.shape}."
        ) from None
    if y.ndim < 1:
        raise ValueError(f"{y_name} must have at least one axis; got shape {y.shape}.")


def _check_observed_finite(y, mask, name):
    """Observed entries must be finite (missing ones may be anything, e.g. NaN)."""
    if not is_concrete(y, mask):
        return
    yv = np.asarray(y, dtype=np.float64)
    mv = np.broadcast_to(np.asarray(mask), np.broadcast_shapes(yv.shape, np.shape(mask)))
    if not np.all(np.isfinite(np.broadcast_to(yv, mv.shape)[mv])):
        raise ValueError(f"{name} must be finite at the observed (mask = 1) entries.")


def _check_quantiles(quantiles):
    if not is_concrete(quantiles):
        return
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim > 1:
        raise ValueError(f"quantiles must be a scalar or have shape (B,); got shape {q.shape}.")
    if not (np.all(q > 0) and np.all(q < 1)):
        raise ValueError(f"quantiles must lie in (0, 1); got {quantiles}.")


def _fit(value, x, name):
    """``value`` broadcast to ``x.shape``: per example when it has the data's rank, otherwise
    shared by the batch (broadcast to one example, ``x.shape[1:]``)."""
    target = x.shape if value.ndim == x.ndim else x.shape[1:]
    try:
        ok = value.ndim <= x.ndim and np.broadcast_shapes(value.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must broadcast to the data: per example to {x.shape} or shared to "
            f"{x.shape[1:]}; got {name}.shape = {value.shape}."
        )
    return jnp.broadcast_to(value if value.ndim == x.ndim else value[None], x.shape)


def _per_example_levels(quantiles, x):
    q = as_float_array(quantiles).astype(x.dtype)
    if q.ndim == 1 and q.shape != (x.shape[0],):
        raise ValueError(f"quantiles must have shape () or (B,) = ({x.shape[0]},); got {q.shape}.")
    return bcast(q, x)


@static_config
class _ObservationLoss:
    """Per-example MSE or quantile loss on the observed entries (the static part: ``kind``)."""

    kind: str
    target_name: str = "y_obs"

    def __call__(self, y, mask, quantiles, x0):
        y, mask = _fit(y, x0, self.target_name), _fit(mask, x0, "mask")
        # where(), not a product: missing entries may hold NaN and must not reach the gradient.
        e = jnp.where(mask, y.astype(x0.dtype) - x0, 0.0)
        if self.kind == "mse":
            per_entry = jnp.square(e)
        else:
            q = _per_example_levels(quantiles, x0)
            per_entry = jnp.maximum(q * e, (q - 1.0) * e)
        return jnp.sum(per_entry.reshape(x0.shape[0], -1), axis=-1)


def _observation_loss(kind, y, mask, quantiles, y_name="y_obs"):
    """Validated loss ``x0 -> (B,)`` as a Partial holding the arrays."""
    _check_kind(kind)
    y = as_float_array(y)
    mask = _as_mask(mask)
    _check_broadcastable(y, mask, y_name, "mask")
    _check_observed_finite(y, mask, y_name)
    if kind == "mse":
        if quantiles is not None:
            raise ValueError("quantiles apply to kind='quantile' only.")
        quantiles = jnp.asarray(0.5, y.dtype)  # unused
    else:
        quantiles = 0.5 if quantiles is None else quantiles
        _check_quantiles(quantiles)
        quantiles = as_float_array(quantiles)
    return jax.tree_util.Partial(_ObservationLoss(kind, y_name), y, mask, quantiles)


def quantile_levels(num_samples: int) -> jax.Array:
    r"""TSDiff's per-sample quantile levels :math:`q_k = k/(N+1)`, :math:`k = 1, \dots, N`.

    Give sample :math:`k` of a forecast batch the level :math:`q_k` (``quantiles=`` of
    :func:`observation_guidance`) so that the batch covers the predictive distribution instead
    of collapsing on the median.

    Examples:
        >>> quantile_levels(4)
        Array([0.2, 0.4, 0.6, 0.8], dtype=float32)
    """
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, (int, np.integer))
        or num_samples < 1
    ):
        raise ValueError(f"num_samples must be an int >= 1; got {num_samples!r}.")
    return jnp.arange(1, num_samples + 1) / (num_samples + 1.0)


# ------------------------------------------------------------------------------------------------
# Self-guidance
# ------------------------------------------------------------------------------------------------


def observation_guidance(
    denoiser: Callable,
    process,
    y_obs,
    mask,
    scale,
    *,
    kind: str = "mse",
    quantiles=None,
    through_denoiser: bool = True,
) -> jax.tree_util.Partial:
    r"""TSDiff observation self-guidance: steer an unconditional model towards observed entries.

    .. math::
        \tilde D(x_t, t) = \hat x_0 - s\,\frac{\sigma_t^2}{\alpha_t}\,
        \nabla_{x_t}\ell\big(y_{\rm obs}, \hat x_0(x_t)\big),

    with :math:`\ell = \sum_{m = 1}(\hat x_0 - y)^2` (``kind="mse"``, the negative Gaussian
    log-likelihood with variance 1/2) or
    :math:`\ell = \sum_{m = 1}\max(q e, (q - 1) e)`, :math:`e = y - \hat x_0` (``"quantile"``,
    per-example levels :math:`q`; see :func:`quantile_levels`). ``scale = 0`` is the
    unconditional model. For MSE and observations with noise :math:`\tau`, ``scale`` =
    :math:`1/(2\tau^2)` is the DPS (Tweedie) approximation of the exact likelihood; TSDiff uses
    much smaller scales (1 to 8 with the quantile loss on standardised series), which stay stable
    when the posterior covariance of :math:`x_0` is large. Cost per call: one denoiser forward and
    backward (``through_denoiser=False``: forward only, the Jacobian replaced by the identity).

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` for sequences ``(B, L)`` or ``(B, L, C)``.
        process: the forward process.
        y_obs: observations, per example (the data's rank, e.g. ``(B, L)``) or shared by the
            batch (one example's rank, e.g. ``(L,)``), broadcastable to the data; entries
            outside the mask are ignored (NaN allowed there).
        mask: True (or 1) at observed entries; per example or shared as ``y_obs`` (e.g. ``(L, 1)``
            for all channels of ``(B, L, C)`` data). Shapes are checked against the data when the
            guided denoiser is called (at trace time).
        scale: :math:`s`, finite scalar or ``(B,)``; may be traced.
        kind: ``"mse"`` or ``"quantile"`` (static).
        quantiles: levels :math:`q \in (0, 1)`, scalar or ``(B,)`` (``kind="quantile"`` only;
            default 0.5, the median).
        through_denoiser: differentiate through the denoiser (TSDiff) or not.

    Returns:
        The guided denoiser (a :class:`jax.tree_util.Partial`: ``y_obs``, ``mask``, ``scale`` and
        ``quantiles`` are leaves, so new observations reuse a compiled sampler).

    Examples:
        >>> mask = jnp.arange(24) < 16                          # forecast the last 8 steps
        >>> guided = observation_guidance(denoiser, process, y_obs, mask, 4.0,
        ...                               kind="quantile", quantiles=quantile_levels(64))
        >>> x = jaxdiff.samplers.ddpm(key, guided, process, x_T, ts)   # x_T: (64, 24)
    """
    check_callable(denoiser, "denoiser")
    loss_fn = _observation_loss(kind, y_obs, mask, quantiles)
    return loss_guidance(denoiser, process, loss_fn, scale, through_denoiser=through_denoiser)


# ------------------------------------------------------------------------------------------------
# Refinement
# ------------------------------------------------------------------------------------------------


def _denoising_energy(denoiser, process, y, noise, t, cond):
    r""":math:`(\alpha/\sigma)^2\|\hat x_0(\alpha y + \sigma\varepsilon) - y\|^2` per example."""
    alpha, sigma = process.alpha(t), process.sigma(t)
    x_t = alpha * y + sigma * noise.astype(y.dtype)
    tb = jnp.full((y.shape[0],), t, dtype=jnp.result_type(t))
    x0 = denoiser(x_t, tb, cond)
    if x0.shape != y.shape:
        raise ValueError(f"denoiser returned shape {x0.shape}; expected y.shape = {y.shape}.")
    r = (x0.astype(jnp.promote_types(x0.dtype, y.dtype)) - y).reshape(y.shape[0], -1)
    return jnp.square(alpha / sigma) * jnp.sum(jnp.square(r), axis=-1)


def _energy(denoiser, process, reg_loss, reg_weight, t_star, y, noise, cond):
    weight = as_float_array(reg_weight).astype(y.dtype)  # () or (B,), like the energies
    return _denoising_energy(denoiser, process, y, noise, t_star, cond) + weight * reg_loss(y)


def _check_refine_inputs(process, y, t_star, reg_weight):
    y = jnp.asarray(y)
    if y.ndim < 1 or not jnp.issubdtype(y.dtype, jnp.floating):
        raise ValueError(f"y must be a floating array (B, ...); got {y.shape}, {y.dtype}.")
    if jnp.ndim(t_star) != 0:
        raise ValueError(f"t_star must be a scalar time; got shape {jnp.shape(t_star)}.")
    check_times(process, t_star, "t_star")
    if is_concrete(t_star) and float(np.asarray(t_star)) <= 0:
        raise ValueError(f"t_star must be > 0 (sigma(t_star) > 0); got {t_star}.")
    check_positive(reg_weight, "reg_weight", allow_zero=True)
    if jnp.ndim(reg_weight) > 1:
        raise ValueError(f"reg_weight must be a scalar or (B,); got shape {jnp.shape(reg_weight)}.")
    return y


def refine_energy(
    denoiser: Callable,
    process,
    y,
    noise,
    *,
    t_star,
    reg_weight,
    reg_target,
    kind: str = "mse",
    quantiles=None,
    mask=None,
    cond=None,
) -> jax.Array:
    r"""The refinement energy :math:`E = L_\theta(y; t^\star) + \lambda R(y, \bar y)`, per example.

    .. math::
        L_\theta = \frac{\alpha_{t^\star}^2}{\sigma_{t^\star}^2}
        \big\|\hat x_0(\alpha_{t^\star} y + \sigma_{t^\star}\varepsilon, t^\star) - y\big\|^2
        = \|\varepsilon - \hat\varepsilon_\theta\|^2,
        \qquad R = \sum_{m=1}(y - \bar y)^2 \ \text{or}\ \sum_{m=1}\max(q e, (q-1) e),

    with :math:`e = \bar y - y` and the given noise :math:`\varepsilon`. Averaging over
    :math:`\varepsilon \sim N(0, I)` gives the expected energy that :func:`refine` descends.

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        y: sequences ``(B, ...)``.
        noise: :math:`\varepsilon`, shape of ``y``.
        t_star: the diffusion time :math:`t^\star > 0` (scalar).
        reg_weight: :math:`\lambda \ge 0`, scalar or ``(B,)``.
        reg_target: :math:`\bar y`, per example or shared (one example's shape).
        kind: ``"mse"`` or ``"quantile"`` regulariser.
        quantiles: levels for ``kind="quantile"`` (scalar or ``(B,)``, default 0.5).
        mask: entries the regulariser sees (default all); per example or shared.
        cond: conditioning passed to the denoiser.

    Returns:
        Shape ``(B,)``.
    """
    check_callable(denoiser, "denoiser")
    y = _check_refine_inputs(process, y, t_star, reg_weight)
    if jnp.shape(noise) != y.shape:
        raise ValueError(f"noise must have y's shape {y.shape}; got {jnp.shape(noise)}.")
    mask = jnp.ones(y.shape[1:], bool) if mask is None else mask
    reg_loss = _observation_loss(kind, reg_target, mask, quantiles, "reg_target")
    return _energy(denoiser, process, reg_loss, reg_weight, as_float_array(t_star), y,
                   jnp.asarray(noise), cond)


def refine(
    key,
    denoiser: Callable,
    process,
    y_init,
    *,
    t_star,
    reg_weight,
    reg_target,
    mode: str = "most_likely",
    num_steps: int,
    step_size,
    noise_scale=0.1,
    kind: str = "mse",
    quantiles=None,
    mask=None,
    cond=None,
    example_index=None,
):
    r"""TSDiff refinement: gradient descent on, or Langevin sampling from, the energy :math:`E`.

    With :math:`E` of :func:`refine_energy` and a fresh :math:`\varepsilon` at every iteration
    (so the iterates follow the gradient of the *expected* denoising loss, stochastically),

    * ``mode="most_likely"``: :math:`y \leftarrow y - \eta\nabla_y E(y)` (plain gradient
      descent; TSDiff uses SGD with ``lr = 0.1`` and 10--20 iterations);
    * ``mode="mcmc"``: Langevin dynamics :math:`y \leftarrow y - \eta\nabla_y E(y)
      + \sqrt{2\eta}\,\gamma\,\xi`, :math:`\xi \sim N(0, I)` (TSDiff: :math:`\eta = 0.1`,
      :math:`\gamma = 0.1`), which samples approximately :math:`\propto \exp(-E/\gamma^2)`.

    Noise: at iteration ``n`` example ``i`` draws :math:`(\varepsilon, \xi)` from
    ``fold_in(fold_in(key, example_index[i]), n)``, so results do not depend on the batch.
    Cost: one denoiser forward and backward per iteration, in one ``lax.scan``.

    Args:
        key: typed key.
        denoiser: ``denoiser(x, t, cond) -> x0_hat``, differentiable in ``x``.
        process: the forward process.
        y_init: initial forecasts ``(B, ...)`` (e.g. from a base model).
        t_star: :math:`t^\star > 0` (scalar; see :func:`best_diffusion_time`).
        reg_weight: :math:`\lambda \ge 0`, scalar or ``(B,)``.
        reg_target: :math:`\bar y`: the base forecast (per example) or the observations under
            ``mask``; per example or shared.
        mode: ``"most_likely"`` or ``"mcmc"`` (static).
        num_steps: iterations (static int >= 1).
        step_size: :math:`\eta > 0`, scalar or ``(B,)``.
        noise_scale: :math:`\gamma \ge 0` (``mcmc`` only), scalar or ``(B,)``.
        kind, quantiles, mask: the regulariser, as in :func:`refine_energy`.
        cond: conditioning passed to the denoiser.
        example_index: global indices ``(B,)`` of the examples.

    Returns:
        The refined sequences, shape and dtype of ``y_init``.

    Examples:
        >>> y = refine(key, denoiser, process, y_base, t_star=0.1, reg_weight=1.0,
        ...            reg_target=y_base, num_steps=20, step_size=0.1)
    """
    check_callable(denoiser, "denoiser")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or (
        num_steps < 1
    ):
        raise ValueError(f"num_steps must be an int >= 1; got {num_steps!r}.")
    y_init = _check_refine_inputs(process, y_init, t_star, reg_weight)
    check_positive(step_size, "step_size")
    check_positive(noise_scale, "noise_scale", allow_zero=True)
    for name, v in (("step_size", step_size), ("noise_scale", noise_scale)):
        if jnp.ndim(v) > 1 or (jnp.ndim(v) == 1 and jnp.shape(v) != y_init.shape[:1]):
            raise ValueError(
                f"{name} must be a scalar or (B,) = ({y_init.shape[0]},); got {jnp.shape(v)}."
            )
    mask = jnp.ones(y_init.shape[1:], bool) if mask is None else mask
    reg_loss = _observation_loss(kind, reg_target, mask, quantiles, "reg_target")
    if is_concrete(y_init) and not np.all(np.isfinite(np.asarray(y_init, dtype=np.float64))):
        raise ValueError("y_init must be finite.")
    dtype = jnp.promote_types(y_init.dtype, jnp.float32)
    t_star = as_float_array(t_star)
    eta = bcast(as_float_array(step_size).astype(dtype), y_init)
    gamma = 0.0 if mode == "most_likely" else bcast(as_float_array(noise_scale).astype(dtype),
                                                     y_init)
    keys = example_keys(key, y_init.shape[0], example_index)
    num_draws = 1 if mode == "most_likely" else 2

    def total_energy(y, noise):
        return jnp.sum(_energy(denoiser, process, reg_loss, reg_weight, t_star, y, noise, cond))

    def step(y, n):
        z = draw_noise(keys, n, num_draws, y.shape[1:], dtype)
        grad = jax.grad(total_energy)(y, z[0])
        y = y - eta * grad
        if mode == "mcmc":
            y = y + jnp.sqrt(2.0 * eta) * gamma * z[1]
        return y, None

    y, _ = jax.lax.scan(step, y_init.astype(dtype), jnp.arange(num_steps, dtype=jnp.int32))
    return y.astype(y_init.dtype)


def best_diffusion_time(key, denoiser: Callable, process, data, ts, *, cond=None):
    r"""TSDiff's :math:`t^\star`: the time whose mean denoising loss is closest to the average.

    .. math::
        L(t) = \frac1B\sum_b \frac{\alpha_t^2}{\sigma_t^2}
        \big\|\hat x_0(\alpha_t x_b + \sigma_t\varepsilon_b, t) - x_b\big\|^2, \qquad
        t^\star = \arg\min_{t \in ts}\Big(L(t) - \frac{1}{|ts|}\sum_{t'} L(t')\Big)^2,

    with the same noise :math:`\varepsilon_b` at every :math:`t` (common random numbers, so the
    curve is smooth in :math:`t`). For an exact denoiser of Gaussian data
    :math:`N(\mu, U\Lambda U^\top)`, :math:`E[L(t)] = \sum_k \alpha_t^2\lambda_k /
    (\alpha_t^2\lambda_k + \sigma_t^2)` (the loss in :math:`\varepsilon`-units equals the
    posterior variance of :math:`x_0` scaled by the SNR).

    Args:
        key: typed key for :math:`\varepsilon`.
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        data: training sequences ``(B, ...)``.
        ts: candidate times, 1-D, in ``(0, t_max]``.
        cond: conditioning passed to the denoiser.

    Returns:
        ``(t_star, losses)``: the chosen time (scalar) and :math:`L(t)` for every ``ts`` entry.

    Examples:
        >>> t_star, losses = best_diffusion_time(key, denoiser, process, train_batch,
        ...                                      jnp.linspace(0.01, 0.5, 50))
    """
    check_callable(denoiser, "denoiser")
    data = jnp.asarray(data)
    ts = as_float_array(ts)
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"ts must be a non-empty 1-D array of times; got shape {ts.shape}.")
    check_times(process, ts, "ts")
    if is_concrete(ts) and np.any(np.asarray(ts) <= 0):
        raise ValueError("ts must be > 0 (sigma(t) > 0).")
    if data.ndim < 1 or not jnp.issubdtype(data.dtype, jnp.floating):
        raise ValueError(f"data must be a floating array (B, ...); got {data.shape}, {data.dtype}.")
    noise = jax.random.normal(key, data.shape, data.dtype)
    losses = jax.lax.map(
        lambda t: jnp.mean(_denoising_energy(denoiser, process, data, noise, t, cond)), ts
    )
    t_star = ts[jnp.argmin(jnp.square(losses - jnp.mean(losses)))]
    return t_star, losses
