r"""Loss-guided sampling and linear inverse problems: DPS, universal guidance, steered diffusion.

All of these add a *likelihood-like* gradient to the score. With a per-example loss
:math:`\ell(\hat x_0)` of the one-step estimate :math:`\hat x_0 = D(x_t, t)`,

.. math::
    g(x_t) = -\nabla_{x_t}\,\ell\big(\hat x_0(x_t)\big), \qquad
    \nabla\log p_t(x_t) \;\to\; \nabla\log p_t(x_t) + w\,g(x_t),

which, since :math:`\hat x_0 = (x_t + \sigma_t^2\nabla\log p_t)/\alpha_t`, is the denoiser change
:math:`\hat x_0 \to \hat x_0 + w\,(\sigma_t^2/\alpha_t)\,g` (equivalently
:math:`\hat\varepsilon \to \hat\varepsilon - w\,\sigma_t\,g`). When :math:`\ell` is the negative
log-likelihood :math:`-\log p(y \mid x_0)` of a measurement, :math:`w = 1` is the "Tweedie"
(DPS) approximation of the posterior score :math:`\nabla\log p_t(x_t \mid y)`; :math:`w = 0` is
the unguided model.

* :func:`loss_guidance` -- the transform above (DPS as a score transform, universal *forward*
  guidance; with ``through_denoiser=False``, the cheaper steered-diffusion approximation).
* :func:`measurement_loss` -- :math:`\|y - A(\hat x_0)\|` (DPS) or the Gaussian negative
  log-likelihood, for an operator of :mod:`jaxdiff.guidance.operators`.
* :func:`gaussian_likelihood_guidance` -- the Gaussian likelihood
  :math:`p(y \mid x_t) = N(y; A\hat x_0, A C_t A^\top + s^2 I)` with the posterior covariance
  :math:`C_t = \mathrm{Cov}[x_0 \mid x_t]` (exact for Gaussian data) or the Pi-GDM heuristic.
* :func:`dps` -- the original DPS sampler: an ancestral DDPM step, then
  :math:`x_s \leftarrow x_s - \zeta\nabla_{x_t}\|y - A(\hat x_0(x_t))\|`.
* :func:`self_recurrence` -- universal guidance's self-recurrence: each step is repeated
  ``repeats`` times, re-noising :math:`x_s` back to :math:`t` in between.

Steered diffusion (Nair et al. 2023) is the composition
``self_recurrence(key, loss_guidance(denoiser, process, loss_fn, scale, through_denoiser=False),
process, x_init, ts, repeats=k)``: the gradient of the loss is taken with respect to
:math:`\hat x_0` only (no backpropagation through the network) and each step is iterated.

References:
    H. Chung et al., "Diffusion Posterior Sampling for General Noisy Inverse Problems", ICLR 2023.
    A. Bansal et al., "Universal Guidance for Diffusion Models", CVPR Workshops 2023.
    N. Nair et al., "Steered Diffusion: A Generalized Framework for Plug-and-Play Conditional
    Image Synthesis", ICCV 2023.
    J. Song et al., "Pseudoinverse-Guided Diffusion Models for Inverse Problems" (Pi-GDM),
    ICLR 2023.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, check_positive, is_concrete
from ..samplers._core import (
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
from ..samplers._first_order import _ddim_step
from ._common import (
    batched_x,
    check_callable,
    check_scale,
    per_example,
    score_to_x0,
    single_call,
    static_config,
)

__all__ = [
    "loss_guidance",
    "measurement_loss",
    "gaussian_likelihood_guidance",
    "dps",
    "self_recurrence",
]

_LOSS_KINDS = ("norm", "squared")


# ------------------------------------------------------------------------------------------------
# The shared core: a log-likelihood gradient at x0_hat, pulled back to x_t (or not), in score space
# ------------------------------------------------------------------------------------------------


def _check_finite(value, name):
    if is_concrete(value) and not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
        raise ValueError(f"{name} must be finite.")


def _loss_cotangent(loss_fn, x0):
    r""":math:`-\nabla_{\hat x_0}\sum_b \ell(\hat x_0)_b` (one VJP of the loss), shape of ``x0``."""
    loss, pullback = jax.vjp(loss_fn, x0)
    if jnp.shape(loss) != (x0.shape[0],):
        raise ValueError(
            f"loss_fn must return per-example losses of shape (B,) = ({x0.shape[0]},); got "
            f"shape {jnp.shape(loss)}."
        )
    (grad,) = pullback(jnp.ones_like(loss))
    return -grad.astype(x0.dtype)


def _guided_x0(denoiser, process, x, t, cond, scale, cotangent_fn, through_denoiser):
    r""":math:`\hat x_0 + w\,(\sigma^2/\alpha)\,g` with :math:`g` the pull-back of the cotangent.

    ``cotangent_fn(x0, t)`` returns :math:`\nabla_{\hat x_0}\log p(y \mid \hat x_0)` (or minus a
    loss gradient). With ``through_denoiser`` it is pulled back to :math:`x_t` by one VJP of
    the denoiser (the forward pass is shared with :math:`\hat x_0`); otherwise it is used as is.
    """
    x = batched_x(x)
    if through_denoiser:
        x0, pullback = jax.vjp(lambda z: single_call(denoiser, z, t, cond), x)
    else:
        x0 = single_call(denoiser, x, t, cond)
    g = cotangent_fn(x0, t).astype(x0.dtype)
    if through_denoiser:
        (g,) = pullback(g)
    coef = score_to_x0(process, x, t, x0.dtype) * per_example(scale, x, x0.dtype, "scale")
    return x0 + coef * g.astype(x0.dtype)


# ------------------------------------------------------------------------------------------------
# loss_guidance
# ------------------------------------------------------------------------------------------------


@static_config
class _LossGuided:
    through_denoiser: bool

    def __call__(self, denoiser, process, loss_fn, scale, x, t, cond=None):
        def cotangent(x0, t):
            del t
            return _loss_cotangent(loss_fn, x0)

        return _guided_x0(denoiser, process, x, t, cond, scale, cotangent, self.through_denoiser)


def loss_guidance(
    denoiser: Callable, process, loss_fn: Callable, scale, *, through_denoiser: bool = True
) -> jax.tree_util.Partial:
    r"""Guide a denoiser down the gradient of a loss of its own estimate :math:`\hat x_0`.

    .. math::
        g = -\nabla_{x_t}\sum_b \ell\big(\hat x_0(x_t)\big)_b, \qquad
        \nabla\log\tilde p_t = \nabla\log p_t + w\,g
        \;\Longleftrightarrow\;
        \tilde D(x_t, t) = \hat x_0 + w\,\frac{\sigma_t^2}{\alpha_t}\,g .

    ``through_denoiser=True`` (DPS as a score transform, universal *forward* guidance): the loss
    gradient at :math:`\hat x_0` is pulled back through the denoiser with ONE ``jax.vjp`` that
    shares its forward pass with :math:`\hat x_0` (one network forward + one backward per call).
    ``through_denoiser=False`` (steered-diffusion style): :math:`g = -\nabla_{\hat x_0}\ell`, i.e.
    the denoiser Jacobian :math:`\partial\hat x_0/\partial x_t` is replaced by the identity. That is
    a *different, cheaper approximation* (no network backward pass; the network is never
    differentiated), not the same gradient; it agrees with the first only up to that Jacobian.

    Step size. Since a sampler's update moves :math:`x` by a coefficient times
    :math:`\hat x_0`, the guided move is :math:`\approx w\,\sigma_t^2 g` per unit of
    half-log-SNR: ``scale`` is a step size relative to :math:`\sigma_t^2`. Relation to the papers
    (:math:`\hat\varepsilon' = \hat\varepsilon - w\,\sigma_t\,g`):

    * universal guidance's forward guidance
      :math:`\hat\varepsilon' = \hat\varepsilon + \sqrt{1-\bar\alpha_t}\,s_0\nabla_{x_t}\ell`
      is exactly ``scale = s0``;
    * DPS subtracts :math:`\zeta\nabla_{x_t}\|y - A\hat x_0\|` from the DDPM sample; a DDPM step
      ``t -> s`` moves :math:`x_s` by :math:`\alpha_s(1 - e^{-2h})\,\delta\hat x_0`, so DPS's
      constant :math:`\zeta` (with the norm loss) is the time-dependent
      ``scale`` :math:`= \zeta\alpha_t / (\sigma_t^2\alpha_s(1 - e^{-2h}))`, which for discrete
      DDPM is :math:`\zeta\sqrt{1 - \beta_t}/\beta_t`; :func:`dps` runs the original form.

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat``; differentiable in ``x`` when
            ``through_denoiser``.
        process: the forward process (for :math:`\sigma_t^2/\alpha_t`).
        loss_fn: ``loss_fn(x0_hat) -> (B,)`` per-example losses (any sign), differentiable; may be
            a :class:`jax.tree_util.Partial` holding arrays (e.g. :func:`measurement_loss`).
            Examples are assumed independent (the gradient of the batch sum is per example).
        scale: :math:`w`, a finite scalar or ``(B,)``; may be traced (no recompilation).
            ``0`` is the unguided denoiser.
        through_denoiser: static; see above.

    Returns:
        The guided denoiser ``guided(x, t, cond=None) -> x0_hat`` (a
        :class:`jax.tree_util.Partial`).

    Examples:
        >>> loss = measurement_loss(operators.inpainting(mask), y)       # ||y - m * x0||
        >>> guided = loss_guidance(denoiser, process, loss, 1.0)
        >>> x = jaxdiff.samplers.ddim(key, guided, process, x_T, ts)
    """
    check_callable(denoiser, "denoiser")
    check_callable(loss_fn, "loss_fn")
    if not isinstance(through_denoiser, bool):
        raise TypeError(f"through_denoiser must be a bool; got {through_denoiser!r}.")
    check_scale(scale)
    return jax.tree_util.Partial(
        _LossGuided(through_denoiser), denoiser, process, loss_fn, scale
    )


# ------------------------------------------------------------------------------------------------
# measurement_loss
# ------------------------------------------------------------------------------------------------


def _residual(operator, y, x0):
    """``y - A(x0)`` with ``y`` either one measurement (shared) or one per example."""
    ax = operator(x0)
    if y.shape == ax.shape:
        yb = y
    elif y.shape == ax.shape[1:]:
        yb = jnp.broadcast_to(y[None], ax.shape)
    else:
        raise ValueError(
            f"y must have the operator's output shape, per example {ax.shape} or shared "
            f"{ax.shape[1:]}; got y.shape = {y.shape}."
        )
    r = yb.astype(ax.dtype) - ax
    return r.reshape(r.shape[0], -1)


def _norm_loss(operator, y, x0):
    # safe_sqrt: a zero (not nan) gradient where the residual vanishes exactly.
    return safe_sqrt(jnp.sum(jnp.square(_residual(operator, y, x0)), axis=-1))


def _squared_loss(operator, y, weight, x0):
    r = _residual(operator, y, x0)
    return weight.astype(r.dtype) * jnp.sum(jnp.square(r), axis=-1)


def measurement_loss(operator: Callable, y, *, kind: str = "norm", noise_std=None):
    r"""Per-example data-fit loss of a measurement :math:`y = A(x_0) + \text{noise}`.

    * ``kind="norm"`` (DPS): :math:`\ell = \|y - A(\hat x_0)\|_2` -- the norm, not its square
      (DPS's step size :math:`\zeta' / \|y - A\hat x_0\|` on the squared norm, up to a factor 2);
    * ``kind="squared"``: :math:`\ell = \|y - A(\hat x_0)\|^2`, or with ``noise_std`` the
      Gaussian negative log-likelihood :math:`\|y - A(\hat x_0)\|^2 / (2 s^2)` (up to a constant),
      so that ``loss_guidance(..., scale=1)`` is the DPS/Tweedie posterior-score approximation.

    Norms are over all non-batch axes of the measurement.

    Args:
        operator: ``operator(x0) -> y`` batch-first (:mod:`jaxdiff.guidance.operators`, or any
            differentiable function).
        y: the measurement: one per example, shape ``operator(x0).shape``, or one shared by the
            batch, shape ``operator(x0).shape[1:]``. Checked against the operator's output when the
            loss is called (shapes are static, so under ``jit`` the error comes at trace time).
        kind: ``"norm"`` or ``"squared"``.
        noise_std: :math:`s > 0` (only with ``kind="squared"``); ``None`` means no weighting.

    Returns:
        ``loss_fn(x0) -> (B,)``, a :class:`jax.tree_util.Partial` holding ``operator`` and ``y``.

    Examples:
        >>> op = operators.super_resolution(4)
        >>> loss = measurement_loss(op, y_lowres, kind="squared", noise_std=0.05)
        >>> loss(x0_hat).shape
        (B,)
    """
    check_callable(operator, "operator")
    if kind not in _LOSS_KINDS:
        raise ValueError(f"kind must be one of {_LOSS_KINDS}; got {kind!r}.")
    y = as_float_array(y)
    _check_finite(y, "y")
    if kind == "norm":
        if noise_std is not None:
            raise ValueError(
                "noise_std applies to kind='squared' (the Gaussian negative log-likelihood); "
                "the DPS norm loss takes no noise_std."
            )
        return jax.tree_util.Partial(_norm_loss, operator, y)
    if noise_std is None:
        weight = jnp.asarray(1.0, y.dtype)
    else:
        if jnp.ndim(noise_std) != 0:
            raise ValueError(f"noise_std must be a scalar; got shape {jnp.shape(noise_std)}.")
        check_positive(noise_std, "noise_std")
        weight = 0.5 / jnp.square(as_float_array(noise_std))
    return jax.tree_util.Partial(_squared_loss, operator, y, weight)


# ------------------------------------------------------------------------------------------------
# gaussian_likelihood_guidance
# ------------------------------------------------------------------------------------------------


def _operator_matrix(matrix, dim, dtype):
    """The ``(M, D)`` matrix of a linear map given as an array or as a batch-first operator."""
    if callable(matrix) and not isinstance(matrix, jax.Array):
        # The rows of A^T are the images of the basis vectors.
        return jnp.asarray(matrix(jnp.eye(dim, dtype=dtype))).reshape(dim, -1).T
    return matrix.astype(dtype)


def _solve_spd(s, r):
    """``S^{-1} r`` for SPD ``S`` ``(B, M, M)`` and ``r`` ``(B, M)`` by Cholesky."""
    chol = jnp.linalg.cholesky(s)
    return jax.scipy.linalg.cho_solve((chol, True), r[..., None])[..., 0]


@static_config
class _GaussianLikelihood:
    pigdm: bool

    def __call__(self, denoiser, process, matrix, y, noise_var, x0_cov, scale, x, t, cond=None):
        def cotangent(x0, t):
            b = x0.shape[0]
            flat = x0.reshape(b, -1)
            d = flat.shape[1]
            a = _operator_matrix(matrix, d, flat.dtype)
            if a.ndim != 2 or a.shape[1] != d:
                raise ValueError(
                    f"matrix must have shape (M, D) with D = {d} (the flattened data size); got "
                    f"{a.shape}."
                )
            m = a.shape[0]
            if y.shape not in ((m,), (b, m)):
                raise ValueError(
                    f"y must have shape (M,) = {(m,)} or (B, M) = {(b, m)}; got {y.shape}."
                )
            r = jnp.broadcast_to(y.astype(flat.dtype), (b, m)) - flat @ a.T
            tb = jnp.broadcast_to(as_float_array(t), (b,))
            if self.pigdm:
                alpha, sigma = process.alpha(tb), process.sigma(tb)
                r2 = jnp.square(sigma) / (jnp.square(alpha) + jnp.square(sigma))
                aat = a @ a.T
                s = r2.astype(flat.dtype)[:, None, None] * aat[None]
            else:
                c = jax.vmap(x0_cov)(tb)
                if c.shape != (b, d, d):
                    raise ValueError(
                        f"x0_cov(t) must return the (D, D) = {(d, d)} covariance of x0 given "
                        f"x_t; got shape {c.shape[1:]}."
                    )
                s = jnp.einsum("md,bde,ne->bmn", a, c.astype(flat.dtype), a)
            s = s + noise_var.astype(flat.dtype) * jnp.eye(m, dtype=flat.dtype)[None]
            w = _solve_spd(s, r)
            return (w @ a).reshape(x0.shape)

        return _guided_x0(denoiser, process, x, t, cond, scale, cotangent, True)


def gaussian_likelihood_guidance(
    denoiser: Callable, process, matrix, y, noise_std, *, x0_cov, scale=1.0
) -> jax.tree_util.Partial:
    r"""Guide with the Gaussian likelihood of a linear measurement :math:`y = A x_0 + s\,e`.

    Approximating :math:`p(x_0 \mid x_t)` by :math:`N(\hat x_0(x_t), C_t)` gives

    .. math::
        p(y \mid x_t) = N\big(y;\; A\hat x_0(x_t),\; S_t\big), \quad S_t = A C_t A^\top + s^2 I,
        \qquad
        \nabla_{x_t}\log p(y \mid x_t) = \Big(\frac{\partial\hat x_0}{\partial x_t}\Big)^{\!\top}
        A^\top S_t^{-1}\big(y - A\hat x_0\big),

    with :math:`C_t` treated as constant in :math:`x_t`, and the guided score is
    :math:`\nabla\log p_t + w\,\nabla_{x_t}\log p(y \mid x_t)` (one VJP through the denoiser).
    For Gaussian data :math:`C_t = (\Sigma^{-1} + \alpha_t^2/\sigma_t^2 I)^{-1}` does not depend on
    :math:`x_t` and the approximation is exact: with the exact denoiser and ``scale = 1`` the
    guided denoiser IS the posterior's denoiser :math:`E[x_0 \mid x_t, y]` (tested to 1e-10
    against :meth:`jaxdiff.analytic.Gaussian.condition`).

    ``x0_cov``:

    * a callable ``t -> (D, D)``, :math:`C_t` at a scalar time (called under ``jax.vmap`` over
      the batch's times), e.g. ``Partial(Gaussian.x0_covariance, prior, process)``;
    * ``"pigdm"``: the isotropic Pi-GDM heuristic :math:`C_t = r_t^2 I`,
      :math:`r_t^2 = \sigma_t^2/(\alpha_t^2 + \sigma_t^2)` (the posterior variance of data with
      unit variance per coordinate; a heuristic, exact only for :math:`\Sigma = I`).

    Cost: one denoiser forward + backward and a Cholesky factorisation of the ``(M, M)`` matrix
    :math:`S_t` per example, so it is meant for vectors or modest ``M``; data of any shape
    ``(B, ...)`` is flattened to ``(B, D)``.

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat``, differentiable in ``x``.
        process: the forward process.
        matrix: :math:`A`, shape ``(M, D)``, or a linear batch-first operator (e.g. from
            :mod:`jaxdiff.guidance.operators`), whose matrix is built by applying it to the
            identity.
        y: the measurement, ``(M,)`` (shared) or ``(B, M)``.
        noise_std: :math:`s \ge 0`, a scalar (0 needs :math:`A C_t A^\top` positive definite).
        x0_cov: a callable ``t -> (D, D)`` or ``"pigdm"`` (keyword-only).
        scale: :math:`w` (default 1, the posterior), finite scalar or ``(B,)``.

    Returns:
        The guided denoiser (a :class:`jax.tree_util.Partial`).

    Examples:
        >>> prior = jaxdiff.analytic.Gaussian.from_cov(mu, cov)
        >>> c_t = jax.tree_util.Partial(type(prior).x0_covariance, prior, process)
        >>> guided = gaussian_likelihood_guidance(prior.denoiser(process), process, A, y, 0.1,
        ...                                       x0_cov=c_t)
        >>> # == prior.condition(A, y, 0.1).denoiser(process)
    """
    check_callable(denoiser, "denoiser")
    check_scale(scale)
    if not callable(matrix) or isinstance(matrix, jax.Array):
        matrix = as_float_array(matrix)
        if matrix.ndim != 2:
            raise ValueError(f"matrix must have shape (M, D); got {matrix.shape}.")
    y = as_float_array(y)
    if y.ndim not in (1, 2):
        raise ValueError(f"y must have shape (M,) or (B, M); got {y.shape}.")
    if isinstance(matrix, jax.Array) and y.shape[-1] != matrix.shape[0]:
        raise ValueError(
            f"y must have M = {matrix.shape[0]} entries per example (matrix shape "
            f"{matrix.shape}); got y.shape = {y.shape}."
        )
    _check_finite(y, "y")
    if jnp.ndim(noise_std) != 0:
        raise ValueError(f"noise_std must be a scalar; got shape {jnp.shape(noise_std)}.")
    check_positive(noise_std, "noise_std", allow_zero=True)
    noise_var = jnp.square(as_float_array(noise_std))
    if isinstance(x0_cov, str):
        if x0_cov != "pigdm":
            raise ValueError(f"x0_cov must be a callable t -> (D, D) or 'pigdm'; got {x0_cov!r}.")
        config, x0_cov = _GaussianLikelihood(pigdm=True), None
    else:
        check_callable(x0_cov, "x0_cov")
        config = _GaussianLikelihood(pigdm=False)
    return jax.tree_util.Partial(config, denoiser, process, matrix, y, noise_var, x0_cov, scale)


# ------------------------------------------------------------------------------------------------
# Samplers: DPS and self-recurrence
# ------------------------------------------------------------------------------------------------


def dps(
    key,
    denoiser,
    process,
    x_init,
    ts,
    *,
    loss_fn,
    zeta,
    cond=None,
    noise=None,
    example_index=None,
):
    r"""Diffusion posterior sampling (Chung et al. 2023) in its original form.

    Each step ``t -> s`` is an ancestral DDPM step (DDIM with :math:`\eta = 1`, the posterior
    variance) followed by a gradient step on the loss of the *same* :math:`\hat x_0`:

    .. math::
        x_s = \mathrm{DDPM}(x_t, \hat x_0(x_t); z) - \zeta\,\nabla_{x_t}\ell\big(\hat x_0(x_t)\big),

    with one ``jax.vjp`` per step giving both :math:`\hat x_0` and the gradient. DPS uses
    :math:`\ell = \|y - A(\hat x_0)\|` (:func:`measurement_loss` with ``kind="norm"``) and
    :math:`\zeta \approx 0.3`–:math:`1` for 1000-step DDPM on images; the move is
    :math:`\zeta` per step whatever the grid, so :math:`\zeta` must shrink as the number of steps
    grows (see :func:`loss_guidance` for the score-space form). A final exact 0 in ``ts``
    returns :math:`\hat x_0 - \zeta\nabla_{x_t}\ell`. Noise streams are those of
    :func:`jaxdiff.samplers.ddim` (``eta=1``): with ``zeta = 0`` the samples are bit-for-bit
    DDIM(1)'s, which equals :func:`jaxdiff.samplers.ddpm` (``"fixed_small"``) up to round-off.

    Args:
        key: typed key; example ``i`` at step ``n`` uses ``fold_in(fold_in(key, i), n)``.
        denoiser: ``denoiser(x, t, cond) -> x0_hat``, differentiable in ``x``.
        process: the forward process.
        x_init: state at ``ts[0]``, ``(B, ...)``.
        ts: strictly decreasing grid ``(N + 1,)``.
        loss_fn: ``loss_fn(x0_hat) -> (B,)``.
        zeta: step size :math:`\zeta`, finite scalar or ``(B,)`` (may be traced).
        cond: conditioning passed to the denoiser.
        noise: optional explicit noise ``(N, 1, *x_init.shape)``.
        example_index: global indices ``(B,)`` of the examples.

    Returns:
        The state at ``ts[-1]``, shape and dtype of ``x_init``.

    Examples:
        >>> loss = measurement_loss(operators.inpainting(mask), y)
        >>> x = dps(key, denoiser, process, x_T, jaxdiff.timesteps.uniform_t(process, 1000),
        ...         loss_fn=loss, zeta=0.5)
    """
    check_callable(denoiser, "denoiser")
    check_callable(loss_fn, "loss_fn")
    check_scale(zeta, "zeta")
    check_inputs(process, x_init, ts, noise=noise, num_draws=1)
    dtype = coeff_dtype(x_init, ts)
    eta = jnp.asarray(1.0, dtype)
    zeta = jnp.asarray(zeta, dtype)

    def step(x, inp):
        t, s = inp.t.astype(dtype), inp.s.astype(dtype)
        x0, pullback = jax.vjp(lambda z: call_denoiser(denoiser, z, inp.t, cond), x)
        (g,) = pullback(_loss_cotangent(loss_fn, x0))  # -grad_{x_t} loss
        x_next = _ddim_step(process, x, x0, t, s, eta, inp.noise[0])
        return (x_next + bcast(zeta, x) * g).astype(x.dtype)

    x, _ = integrate(
        step, x_init, ts, key=key, noise=noise, num_draws=1, state_shape=x_init.shape,
        dtype=x_init.dtype, example_index=example_index,
    )
    return x


def self_recurrence(
    key,
    denoiser,
    process,
    x_init,
    ts,
    *,
    repeats,
    eta=0.0,
    cond=None,
    noise=None,
    example_index=None,
):
    r"""Universal guidance's self-recurrence: each DDIM step repeated, re-noising in between.

    At each grid step ``t -> s``, ``repeats`` times: take the DDIM(:math:`\eta`) step
    :math:`x_s = \mathrm{DDIM}_\eta(x_t)`, then (except after the last repeat) re-noise it with the
    forward transition

    .. math::
        x_t = \frac{\alpha_t}{\alpha_s}x_s + \sqrt{\sigma_t^2 - \frac{\alpha_t^2}{\alpha_s^2}
        \sigma_s^2}\;\xi = \frac{\alpha_t}{\alpha_s}x_s + \sigma_t\sqrt{1 - e^{-2h}}\;\xi;

    the last :math:`x_s` is kept. The denoiser is typically a guided one
    (:func:`loss_guidance`), so each repeat applies the guidance again while the re-noising
    keeps the sample near the noisy marginal. ``repeats = 1`` is :func:`jaxdiff.samplers.ddim`
    bit for bit. Cost: ``repeats`` denoiser calls per step. Steered diffusion is this sampler on
    ``loss_guidance(..., through_denoiser=False)``.

    Noise: per step, the draws are ordered ``[ddim_0, renoise_0, ddim_1, ..., ddim_{k-1}]``
    (``2k - 1`` draws) when the DDIM step is stochastic, and ``[renoise_0, ...,
    renoise_{k-2}]`` (``k - 1`` draws) when ``eta`` is the Python number 0; each example draws
    from its own stream ``fold_in(fold_in(key, i), n)``.

    Args:
        key: typed key (may be None when no noise is drawn).
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        x_init: state at ``ts[0]``, ``(B, ...)``.
        ts: strictly decreasing grid ``(N + 1,)`` (a final exact 0 is allowed; re-noising from
            it draws :math:`x_t = \alpha_t\hat x_0 + \sigma_t\xi`).
        repeats: ``k >= 1``, a Python int.
        eta: DDIM :math:`\eta \ge 0` (scalar or ``(B,)``); a Python 0 draws no DDIM noise.
        cond: conditioning passed to the denoiser.
        noise: optional explicit noise ``(N, num_draws, *x_init.shape)`` with ``num_draws`` as
            above.
        example_index: global indices ``(B,)`` of the examples.

    Returns:
        The state at ``ts[-1]``.

    Examples:
        >>> guided = loss_guidance(denoiser, process, loss, 2.0, through_denoiser=False)
        >>> x = self_recurrence(key, guided, process, x_T, ts, repeats=4)   # steered diffusion
    """
    check_callable(denoiser, "denoiser")
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1; got {repeats!r}.")
    repeats = int(repeats)
    check_scale(eta, "eta")
    if is_concrete(eta) and np.any(np.asarray(eta, dtype=np.float64) < 0):
        raise ValueError(f"eta must be >= 0; got {eta}.")
    stochastic = not (is_python_zero(eta) and noise is None)
    num_draws = (2 * repeats - 1) if stochastic else (repeats - 1)
    check_inputs(process, x_init, ts, noise=noise, num_draws=num_draws)
    dtype = coeff_dtype(x_init, ts)
    eta = jnp.asarray(eta, dtype)

    def step(x, inp):
        t, s = inp.t.astype(dtype), inp.s.astype(dtype)
        s_ = safe_next_time(t, s)
        h = half_log_snr(process, s_) - half_log_snr(process, t)
        # From an exact s = 0 the transition is the marginal itself: alpha_t x0 + sigma_t xi.
        renoise_std = process.sigma(t) * jnp.where(s > 0, safe_sqrt(-jnp.expm1(-2.0 * h)), 1.0)
        ratio = process.alpha(t) / process.alpha(s)
        x_t = x
        for r in range(repeats):
            x0 = call_denoiser(denoiser, x_t, inp.t, cond)
            z = inp.noise[2 * r] if stochastic else None
            x_s = _ddim_step(process, x_t, x0, t, s, eta, z).astype(x.dtype)
            if r < repeats - 1:
                xi = inp.noise[2 * r + 1] if stochastic else inp.noise[r]
                x_t = (bcast(ratio, x) * x_s + bcast(renoise_std, x) * xi).astype(x.dtype)
        return x_s

    x, _ = integrate(
        step, x_init, ts, key=key, noise=noise, num_draws=num_draws, state_shape=x_init.shape,
        dtype=x_init.dtype, example_index=example_index,
    )
    return x
