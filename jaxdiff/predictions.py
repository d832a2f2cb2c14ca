r"""Prediction types and the :class:`Denoiser` contract.

A network can predict any of five quantities at :math:`x_t = \alpha x_0 + \sigma \varepsilon`;
all are affine in the pair :math:`(\hat x_0, \hat\varepsilon)` tied by
:math:`x_t = \alpha\hat x_0 + \sigma\hat\varepsilon`:

=============  ===============================================================================
kind           quantity
=============  ===============================================================================
``"x0"``       :math:`\hat x_0 = E[x_0 \mid x_t]` (the denoiser)
``"eps"``      :math:`\hat\varepsilon = E[\varepsilon \mid x_t]`
``"v"``        :math:`\hat v = \alpha\hat\varepsilon - \sigma\hat x_0` (Salimans & Ho 2022)
``"score"``    :math:`\nabla\log p_t(x_t) = -\hat\varepsilon/\sigma`
``"velocity"`` :math:`\dot\alpha\hat x_0 + \dot\sigma\hat\varepsilon`, the probability-flow
               ODE velocity :math:`dx/dt` (flow matching; :math:`\varepsilon - x_0` for
               rectified flow)
=============  ===============================================================================

:func:`convert` maps between them for any process: it recovers :math:`(\hat x_0,
\hat\varepsilon)` from the input kind with one closed-form solve and evaluates the output kind.
Only ``eps`` and ``score`` inputs need :math:`1/\alpha`; those are refused (``ValueError``) at
concrete times where :math:`\alpha = 0`. The round-off of a conversion is a few ulps times
:math:`\max(1, \sigma/\alpha, \alpha/\sigma)` -- the conditioning of the problem itself.

The library's currency is the **denoiser** (``x0`` prediction); :func:`to_denoiser` wraps a
network of any kind, :func:`from_denoiser` goes back, and :func:`edm_precondition` wraps a raw
network with EDM's preconditioning for any process.
"""

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ._utils import as_float_array, broadcast_to_batch, check_positive, check_times, is_concrete

__all__ = [
    "KINDS",
    "Denoiser",
    "convert",
    "to_denoiser",
    "from_denoiser",
    "edm_precondition",
]

KINDS = ("x0", "eps", "v", "score", "velocity")

_ALPHA_ZERO = 1e-10

Cond = Any


class Denoiser(Protocol):
    r"""Posterior-mean denoiser :math:`D(x_t, t, c) \approx E[x_0 \mid x_t, c]`.

    Contract: ``x`` has shape ``(B, ...)`` and ``t`` shape ``(B,)`` (samplers always pass one
    time per example); ``cond`` is a pytree whose leaves have a leading batch axis, or None. The
    output has the shape of ``x`` and dtype float32 or wider, whatever the compute dtype.
    """

    def __call__(self, x: jax.Array, t: jax.Array, cond: Cond = None) -> jax.Array: ...


def _check_kind(kind, name):
    if kind not in KINDS:
        raise ValueError(f"{name} must be one of {KINDS}; got {kind!r}.")


def _coefficients(process, t, x):
    """(alpha, sigma, d_alpha, d_sigma) at t, in at least float32, broadcast against x."""
    t = as_float_array(t)
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    coefs = (process.alpha(t), process.sigma(t), process.d_alpha(t), process.d_sigma(t))
    return tuple(broadcast_to_batch(c, x) for c in coefs)


def _to_pair(kind, pred, x, alpha, sigma, d_alpha, d_sigma):
    """Solve x = alpha x0 + sigma eps together with the prediction for (x0, eps)."""
    if kind == "x0":
        return pred, (x - alpha * pred) / sigma
    if kind == "eps":
        return (x - sigma * pred) / alpha, pred
    if kind == "score":
        eps = -sigma * pred
        return (x - sigma * eps) / alpha, eps
    if kind == "v":
        norm = jnp.square(alpha) + jnp.square(sigma)
        return (alpha * x - sigma * pred) / norm, (sigma * x + alpha * pred) / norm
    # velocity u = d_alpha x0 + d_sigma eps; the 2x2 determinant sigma d_alpha - alpha d_sigma
    # equals alpha sigma dlambda/dt / 2 < 0, which is finite even where alpha -> 0.
    det = sigma * d_alpha - alpha * d_sigma
    return (sigma * pred - d_sigma * x) / det, (d_alpha * x - alpha * pred) / det


def _from_pair(kind, x0, eps, alpha, sigma, d_alpha, d_sigma):
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if kind == "score":
        return -eps / sigma
    if kind == "v":
        return alpha * eps - sigma * x0
    return d_alpha * x0 + d_sigma * eps


def _check_alpha_positive(process, t, from_kind):
    if from_kind not in ("eps", "score") or not is_concrete(t):
        return
    # Under jit, jnp ops on concrete inputs are staged out unless evaluated eagerly; a process
    # with traced parameters still yields a tracer, and then the check is skipped.
    with jax.ensure_compile_time_eval():
        alpha = process.alpha(as_float_array(t))
    if not is_concrete(alpha):
        return
    alpha = np.asarray(alpha, dtype=np.float64)
    # cos(pi/2) and friends round to ~1e-17, not 0: anything this small is alpha = 0.
    if np.any(alpha <= _ALPHA_ZERO):
        raise ValueError(
            f"converting from {from_kind!r} divides by alpha(t), which is 0 at some t; use a "
            "time with alpha(t) > 0 (inside [t_min, t_max]) or a 'v'/'velocity' prediction."
        )


def convert(prediction, process, x, t, *, from_kind, to_kind):
    r"""Convert a prediction of one kind into another, exactly, for any process.

    .. math::
        (\hat x_0, \hat\varepsilon) = \text{solve}\big(x_t = \alpha\hat x_0 + \sigma\hat\varepsilon,
        \ \text{prediction}\big), \qquad \text{output} = a\,\hat x_0 + b\,\hat\varepsilon.

    Args:
        prediction: network output of kind ``from_kind``, shape ``(B, ...)``.
        process: a :class:`jaxdiff.processes.AbstractProcess`.
        x: the noisy input :math:`x_t`, shape ``(B, ...)``.
        t: time, shape ``()`` or ``(B,)``, inside ``[t_min, t_max]``.
        from_kind, to_kind: one of :data:`KINDS`.

    Returns:
        The ``to_kind`` prediction, shape ``(B, ...)``, dtype at least float32.

    Examples:
        >>> process = jaxdiff.VPProcess()
        >>> x, eps = jnp.ones((2, 3)), jnp.zeros((2, 3))
        >>> x0 = convert(eps, process, x, jnp.full((2,), 0.5), from_kind="eps", to_kind="x0")
    """
    _check_kind(from_kind, "from_kind")
    _check_kind(to_kind, "to_kind")
    # The alpha check comes first so an alpha = 0 time is reported as what it is.
    _check_alpha_positive(process, t, from_kind)
    check_times(process, t)
    return _convert_unchecked(prediction, process, x, t, from_kind, to_kind)


def to_denoiser(fn: Callable, process, kind: str) -> Denoiser:
    r"""Wrap a network predicting ``kind`` as a :class:`Denoiser` (``x0`` prediction).

    Args:
        fn: ``fn(x, t, cond) -> prediction`` with ``x`` ``(B, ...)`` and ``t`` ``(B,)``.
        process: the process the network was trained with.
        kind: what ``fn`` predicts, one of :data:`KINDS`.

    Returns:
        ``denoiser(x, t, cond=None) -> x0_hat`` (float32 or wider).

    Examples:
        >>> process = jaxdiff.VPProcess()
        >>> eps_net = lambda x, t, cond: jnp.zeros_like(x)
        >>> denoiser = to_denoiser(eps_net, process, "eps")
    """
    _check_kind(kind, "kind")

    def denoiser(x, t, cond=None):
        return _convert_unchecked(fn(x, t, cond), process, x, t, kind, "x0")

    return denoiser


def from_denoiser(denoiser: Denoiser, process, kind: str) -> Callable:
    r"""Turn a :class:`Denoiser` into a function returning predictions of ``kind``.

    Returns:
        ``fn(x, t, cond=None) -> prediction`` of kind ``kind``.

    Examples:
        >>> score_fn = from_denoiser(denoiser, jaxdiff.EDMProcess(), "score")
    """
    _check_kind(kind, "kind")

    def fn(x, t, cond=None):
        return _convert_unchecked(denoiser(x, t, cond), process, x, t, "x0", kind)

    return fn


def _convert_unchecked(prediction, process, x, t, from_kind, to_kind):
    """:func:`convert` without the host-side checks, for use inside traced code."""
    coefs = _coefficients(process, t, x)
    prediction = prediction.astype(jnp.promote_types(prediction.dtype, jnp.float32))
    if from_kind == to_kind:
        return prediction
    x0, eps = _to_pair(from_kind, prediction, x, *coefs)
    return _from_pair(to_kind, x0, eps, *coefs)


def edm_precondition(raw_fn: Callable, process, *, sigma_data=None) -> Denoiser:
    r"""EDM preconditioning (Karras et al. 2022, Table 1) of a raw network, for any process.

    With the noise level :math:`s = \sigma/\alpha` and the scaled input :math:`x/\alpha`,

    .. math::
        D(x, t) = c_{\rm skip}\frac{x}{\alpha} + c_{\rm out} F\Big(c_{\rm in}\frac{x}{\alpha},
        c_{\rm noise}\Big),\quad
        c_{\rm skip} = \frac{\sigma_d^2}{s^2+\sigma_d^2},\
        c_{\rm out} = \frac{s\sigma_d}{\sqrt{s^2+\sigma_d^2}},\
        c_{\rm in} = \frac{1}{\sqrt{s^2+\sigma_d^2}},\ c_{\rm noise} = \tfrac14\log s,

    evaluated as :math:`\alpha\sigma_d^2/(\sigma^2+\alpha^2\sigma_d^2)\,x`,
    :math:`x/\sqrt{\sigma^2+\alpha^2\sigma_d^2}` and
    :math:`\sigma\sigma_d/\sqrt{\sigma^2+\alpha^2\sigma_d^2}`, so nothing divides by
    :math:`\alpha`.

    Args:
        raw_fn: ``F(x_in, c_noise, cond)`` with ``x_in`` ``(B, ...)`` and ``c_noise`` ``(B,)``.
        process: the forward process.
        sigma_data: data standard deviation; defaults to ``process.sigma_data`` when the process
            has one (EDM), else 0.5.

    Returns:
        A :class:`Denoiser`.

    Examples:
        >>> denoiser = edm_precondition(lambda x, c, cond: jnp.zeros_like(x), jaxdiff.EDMProcess())
    """
    if sigma_data is None:
        sigma_data = getattr(process, "sigma_data", 0.5)
    check_positive(sigma_data, "sigma_data")

    def denoiser(x, t, cond=None):
        t = as_float_array(t)
        t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
        alpha, sigma = process.alpha(t), process.sigma(t)
        norm = jnp.sqrt(jnp.square(sigma) + jnp.square(alpha * sigma_data))
        c_skip = alpha * sigma_data**2 / jnp.square(norm)
        c_out = sigma * sigma_data / norm
        c_in = 1.0 / norm
        c_noise = -0.125 * process.log_snr(t)
        out = raw_fn((broadcast_to_batch(c_in, x) * x).astype(x.dtype), c_noise, cond)
        out = out.astype(jnp.promote_types(out.dtype, jnp.float32))
        return broadcast_to_batch(c_skip, x) * x + broadcast_to_batch(c_out, x) * out

    return denoiser
