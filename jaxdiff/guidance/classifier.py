r"""Classifier guidance: a noise-conditional classifier (Dhariwal & Nichol 2021), and a calibrated
clean classifier applied to the denoised estimate (EluCD, Ma et al. 2024).

Both add a guidance gradient :math:`g` in score space, :math:`\nabla\log\tilde p_t =
\nabla\log p_t + s\,g`. Since this library's currency is the denoiser and
:math:`\hat x_0 = (x + \sigma^2\nabla\log p_t)/\alpha` for every process, the same change is

.. math::
    \tilde D(x, t, y) = D(x, t, y) + s\,\frac{\sigma_t^2}{\alpha_t}\,g(x, t, y)

(equivalently :math:`\hat\varepsilon' = \hat\varepsilon - s\,\sigma_t g`, or EDM's
:math:`D' = D + s\,\varsigma^2 g_{VE}` with :math:`g_{VE} = \alpha g`).

* :func:`classifier_guidance`: :math:`g = \nabla_{x_t}\log p_\phi(y \mid x_t, t)` of a classifier
  trained on noisy inputs. With the exact classifier and ``s = 1`` the guided unconditional
  denoiser is exactly the class-conditional one (Bayes: :math:`\nabla\log p_t(x \mid y) =
  \nabla\log p_t(x) + \nabla\log p_t(y \mid x)`); ``s > 1`` sharpens :math:`p(y \mid x)^s`.
  Cost: one denoiser call plus one classifier forward and backward; no denoiser VJP.
* :func:`calibrated_classifier_guidance` (EluCD): an off-the-shelf CLEAN classifier with logits
  :math:`f` is applied to the denoised estimate, with the calibrated log-probability

  .. math::
      \log\tilde p(y \mid x_0) = \tau_1 f_y(x_0) - \log\sum_j e^{\tau_2 f_j(x_0)},
      \qquad \tau_2 = \tau_1\cdot\text{discount},

  and :math:`g = \nabla_{\hat x_0}\log\tilde p(y \mid \hat x_0)` taken with respect to
  :math:`\hat x_0` only (``stop_gradient``: no backpropagation through the denoiser) and used in
  place of :math:`\nabla_{x_t}\log p(y \mid x_t)`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .._utils import as_float_array, check_positive
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
    "classifier_guidance",
    "log_prob_from_logits",
    "calibrated_classifier_guidance",
    "sine_bump",
]


def _labels(cond, batch):
    if cond is None:
        raise ValueError("classifier guidance needs the class labels as cond; got cond=None.")
    y = jnp.asarray(cond)
    if not jnp.issubdtype(y.dtype, jnp.integer) or y.ndim > 1:
        raise ValueError(
            f"cond must be int class labels of shape () or (B,); got {y.shape}, {y.dtype}."
        )
    return jnp.broadcast_to(y, (batch,))


def _pick(log_probs, y, name):
    if log_probs.ndim != 2 or log_probs.shape[0] != y.shape[0]:
        raise ValueError(f"{name} must return logits of shape (B, K); got {log_probs.shape}.")
    return jnp.take_along_axis(log_probs, y[:, None], axis=1)[:, 0]


def _grad_of_sum(fn, z, name):
    """Per-example gradients of ``fn(z) -> (B,)``: the gradient of the sum (examples are
    independent: a classifier that mixes examples, e.g. batch norm in training mode, breaks it)."""

    def total(z):
        v = fn(z)
        if v.shape != (z.shape[0],):
            raise ValueError(f"{name} must return shape (B,) = ({z.shape[0]},); got {v.shape}.")
        return jnp.sum(v)

    return jax.grad(total)(z)


# ------------------------------------------------------------------------------------------------
# Noise-conditional classifier guidance
# ------------------------------------------------------------------------------------------------


def log_prob_from_logits(logits_fn: Callable) -> jax.tree_util.Partial:
    r"""A ``log_prob_fn`` for :func:`classifier_guidance`: ``log_softmax(logits_fn(x_t, t))[y]``.

    Args:
        logits_fn: ``logits_fn(x_t, t) -> (B, K)`` logits of a noise-conditional classifier.

    Returns:
        ``log_prob_fn(x_t, t, cond) -> (B,)`` with ``cond`` the int labels ``(B,)``.

    Examples:
        >>> log_prob_fn = log_prob_from_logits(lambda x, t: classifier(x, t))
    """
    check_callable(logits_fn, "logits_fn")
    return jax.tree_util.Partial(_LogProbFromLogits(), logits_fn)


@static_config
class _LogProbFromLogits:
    def __call__(self, logits_fn, x, t, cond=None):
        y = _labels(cond, jnp.shape(x)[0])
        logits = logits_fn(x, t)
        return _pick(jax.nn.log_softmax(logits, axis=-1), y, "logits_fn")


def classifier_guidance(
    denoiser: Callable, process, log_prob_fn: Callable, scale
) -> jax.tree_util.Partial:
    r"""Classifier guidance: :math:`\tilde D = D + s\,(\sigma^2/\alpha)\nabla_x\log p(y \mid x_t)`.

    The score-space guidance :math:`\nabla\log p_t + s\nabla\log p(y \mid x_t)` written for the
    denoiser (module docstring). ``s = 0`` is the wrapped denoiser; ``s = 1`` with the exact
    classifier turns the exact unconditional denoiser into the exact class-conditional one.

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat``; it receives ``cond`` (the labels) too,
            so a class-conditional model can be guided further; an unconditional model should
            ignore it.
        process: the forward process (:math:`\alpha_t`, :math:`\sigma_t`).
        log_prob_fn: ``log_prob_fn(x_t, t, cond) -> (B,)``, :math:`\log p(y \mid x_t, t)` of a
            noise-conditional classifier, differentiable in ``x_t``, per-example independent
            (see :func:`log_prob_from_logits`).
        scale: :math:`s`, a finite scalar or ``(B,)``; may be traced.

    Returns:
        ``guided(x, t, cond) -> x0_hat`` with ``cond`` the int class labels ``(B,)``, a
        :class:`jax.tree_util.Partial`.

    Examples:
        >>> guided = classifier_guidance(denoiser, process, log_prob_from_logits(clf), 1.0)
        >>> samples = jaxdiff.sample(key, guided, process, (8, 2), cond=labels)
    """
    check_callable(denoiser, "denoiser")
    check_callable(log_prob_fn, "log_prob_fn")
    check_scale(scale)
    return jax.tree_util.Partial(_ClassifierGuided(), denoiser, process, log_prob_fn, scale)


@static_config
class _ClassifierGuided:
    def __call__(self, denoiser, process, log_prob_fn, scale, x, t, cond=None):
        x = batched_x(x)
        x0 = single_call(denoiser, x, t, cond)
        grad = _grad_of_sum(lambda z: log_prob_fn(z, t, cond), x, "log_prob_fn")
        dtype = x0.dtype
        s = per_example(scale, x, dtype, "scale")
        return x0 + s * score_to_x0(process, x, t, dtype) * grad.astype(dtype)


# ------------------------------------------------------------------------------------------------
# EluCD: calibrated clean classifier on x0_hat
# ------------------------------------------------------------------------------------------------


def sine_bump(gamma=0.3) -> jax.tree_util.Partial:
    r"""EluCD's guidance schedule factor :math:`1 + \gamma\sin(\pi u)`, :math:`u \in [0, 1]`.

    ``u`` is the normalised time :math:`(t - t_{\min})/(t_{\max} - t_{\min})`: the factor is 1 at
    both ends of the process and :math:`1 + \gamma` half-way (EluCD's default
    :math:`\gamma = 0.3`).

    Examples:
        >>> schedule = sine_bump(0.3)
        >>> factor = schedule(jnp.array([0.0, 0.5, 1.0]))   # [1.0, 1.3, 1.0]
    """
    check_scale(gamma, "gamma")
    return jax.tree_util.Partial(_SineBump(), gamma)


@static_config
class _SineBump:
    def __call__(self, gamma, u):
        u = as_float_array(u)
        return 1.0 + gamma * jnp.sin(jnp.pi * u)


def calibrated_classifier_guidance(
    denoiser: Callable,
    process,
    logits_fn: Callable,
    scale,
    *,
    joint_temperature=1.0,
    margin_temperature_discount=0.5,
    schedule: Callable | None = sine_bump(0.3),
) -> jax.tree_util.Partial:
    r"""EluCD-style guidance with a clean classifier on :math:`\hat x_0` (no denoiser VJP).

    .. math::
        \tilde D = \hat x_0 + s\,\rho(u)\,\frac{\sigma_t^2}{\alpha_t}\,
        \nabla_{\hat x_0}\Big[\tau_1 f_y(\hat x_0) - \log\sum_j e^{\tau_2 f_j(\hat x_0)}\Big],
        \qquad \hat x_0 = \mathrm{stop\_gradient}(D(x, t, y)),

    with :math:`\tau_2 = \tau_1\cdot` ``margin_temperature_discount`` and :math:`\rho(u)` the
    ``schedule`` at the normalised time :math:`u = (t - t_{\min})/(t_{\max} - t_{\min})`.

    An adaptation, stated honestly: EluCD's DDPM sampler adds
    :math:`(\Sigma_t + \gamma\sin(\pi t/T)\max_{t' \ge t}\Sigma_{t'})\,g` to the posterior
    mean, where the bump multiplies the running maximum of the posterior variance -- sampler
    state a denoiser transform does not have. Here the gradient enters through the same
    score-space insertion as :func:`classifier_guidance` (the posterior variance of a DDPM step
    is its score-to-mean factor), and the bump becomes the multiplicative factor
    :math:`1 + \gamma\sin(\pi u)` on it; the two agree in the shape of the schedule (no boost at
    the ends, maximal half-way), not in its exact size. EluCD's Softplus replacement of ReLU
    belongs to the classifier (``logits_fn``) and is not done here.

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` (receives the labels as ``cond`` too).
        process: the forward process.
        logits_fn: ``logits_fn(x0) -> (B, K)``, a classifier of CLEAN data, differentiable and
            per-example independent.
        scale: :math:`s` (EluCD's ``classifier_scale``, 1.0), scalar or ``(B,)``; may be traced.
        joint_temperature: :math:`\tau_1 > 0` (1.0).
        margin_temperature_discount: :math:`\tau_2/\tau_1 \ge 0` (0.5; 0 makes the
            normaliser a constant, i.e. the raw logit :math:`f_y`).
        schedule: ``rho(u) -> factor`` on ``(B,)`` normalised times, e.g. :func:`sine_bump`
            (default ``sine_bump(0.3)``), or None for the constant 1.

    Returns:
        ``guided(x, t, cond) -> x0_hat`` with ``cond`` the int labels, a
        :class:`jax.tree_util.Partial`.

    Examples:
        >>> guided = calibrated_classifier_guidance(denoiser, process, resnet_logits, 1.0)
        >>> samples = jaxdiff.sample(key, guided, process, (8, 32, 32, 3), cond=labels)
    """
    check_callable(denoiser, "denoiser")
    check_callable(logits_fn, "logits_fn")
    check_scale(scale)
    check_positive(joint_temperature, "joint_temperature")
    check_positive(margin_temperature_discount, "margin_temperature_discount", allow_zero=True)
    if schedule is not None:
        check_callable(schedule, "schedule")
    return jax.tree_util.Partial(
        _Calibrated(), denoiser, process, logits_fn, scale, joint_temperature,
        margin_temperature_discount, schedule,
    )


@static_config
class _Calibrated:
    def __call__(self, denoiser, process, logits_fn, scale, tau1, discount, schedule, x, t,
                 cond=None):
        x = batched_x(x)
        batch = x.shape[0]
        y = _labels(cond, batch)
        x0 = single_call(denoiser, x, t, cond)
        dtype = x0.dtype
        tau2 = tau1 * discount

        def log_prob(z):
            logits = logits_fn(z)
            if logits.ndim != 2 or logits.shape[0] != batch:
                raise ValueError(f"logits_fn must return shape (B, K); got {logits.shape}.")
            picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
            return tau1 * picked - jax.nn.logsumexp(tau2 * logits, axis=-1)

        # The classifier sees x0_hat as a constant: no VJP through the denoiser.
        grad = _grad_of_sum(log_prob, jax.lax.stop_gradient(x0), "the calibrated log-probability")
        factor = per_example(scale, x, dtype, "scale")
        if schedule is not None:
            t_ = as_float_array(t)
            u = (t_ - process.t_min) / (process.t_max - process.t_min)
            rho = as_float_array(schedule(jnp.broadcast_to(u, (batch,))))
            factor = factor * per_example(rho, x, dtype, "schedule(u)")
        return x0 + factor * score_to_x0(process, x, t, dtype) * grad.astype(dtype)
