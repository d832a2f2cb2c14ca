r"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser transform, with its extensions.

.. math::
    \tilde D(x, t, c) = D(x, t, a) + s\,\big(D(x, t, c) - D(x, t, a)\big),

evaluated as :math:`D_c + (s - 1)(D_c - D_a)`, which is exactly :math:`D_c` at :math:`s = 1`.
The anchor :math:`a` is the null condition :math:`\varnothing` (plain CFG) or a *negative
condition* (negative prompt). In score form plain CFG samples (heuristically) from
:math:`p(x \mid c)^s p(x)^{1-s}`.

Extensions, all arguments of :func:`classifier_free`:

* ``space`` -- the parameterisation the combination is formed in (``"x0"``, ``"eps"``,
  ``"score"``, ``"v"``). The combination is affine with weights summing to one, so every
  space gives the same guided denoiser (up to round-off): guiding the denoiser is guiding every
  parameterisation. Nonlinear steps (the rescale below) are not invariant.
* ``rescale`` :math:`\phi` with ``rescale_space`` (Lin et al. 2023): in the space :math:`P`
  named by ``rescale_space``, with :math:`P_{cfg}` the guided and :math:`P_c` the conditional
  prediction and std over the non-batch axes of each example,

  .. math::
      P_{res} = P_{cfg}\,\frac{\mathrm{std}(P_c)}{\mathrm{std}(P_{cfg})}, \qquad
      P_{out} = \phi P_{res} + (1 - \phi) P_{cfg}.

  The space has no default: diffusers applies the rescale to the network output, usually
  :math:`\varepsilon`; the paper motivates it on :math:`\hat x_0` / :math:`v` (its model
  predicts :math:`v`). The two differ (``"eps"`` and ``"score"`` agree: they differ by the
  per-example factor :math:`-1/\sigma`, which cancels in the ratio).
* ``interval`` :math:`(\varsigma_{lo}, \varsigma_{hi}]` (Kynkaanniemi et al. 2024): guidance
  only where the noise level :math:`\varsigma = \sigma/\alpha` lies in the interval, the
  conditional prediction :math:`D_c` elsewhere -- with ONE network call there, through the
  batch-global ``lax.switch`` of :mod:`jaxdiff.guidance.schedules` (exactly
  ``noise_range_experts([D, cfg, D], process, interval)``).
* ``negative_cond`` instead of ``null_cond`` -- a negative prompt:
  :math:`D_n + s(D_c - D_n)`, still one stacked call. This is *not* composable NOT
  (:func:`jaxdiff.guidance.composable.composable` with a negative weight), which keeps the
  unconditional anchor: :math:`D_u + w_c(D_c - D_u) - w_n(D_n - D_u)` (three evaluations). The
  two coincide for weights :math:`(s, 1 - s)`, where the :math:`D_u` terms cancel.

Why arguments rather than companion transforms: every extension acts on the *two branch outputs*
of the one stacked call (the anchor replaces the null branch, the rescale needs :math:`D_c`
separately from the combination, the interval decides whether the stacked call happens at all),
and a denoiser-to-denoiser wrapper around a guided denoiser only sees the combination. The
noise-level selection itself lives in one place (:mod:`jaxdiff.guidance.schedules`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._common import (
    batched_x,
    check_callable,
    check_noise_levels,
    check_scale,
    check_space,
    from_space,
    output_dtype,
    per_example,
    resolve_null_cond,
    single_call,
    stacked_call,
    static_config,
    to_space,
)
from .schedules import run_by_stage

__all__ = ["classifier_free"]

# Kept importable here: other guidance modules build on them.
_resolve_null_cond = resolve_null_cond
_check_scale = check_scale


def classifier_free(
    denoiser: Callable,
    process,
    scale,
    *,
    null_cond: Any = None,
    negative_cond: Any = None,
    space: str = "x0",
    rescale=None,
    rescale_space: str | None = None,
    interval=None,
) -> jax.tree_util.Partial:
    r"""Classifier-free guidance: :math:`\tilde D = D_a + s\,(D_c - D_a)`, anchor null or negative.

    ``s = 1`` is the plain conditional denoiser, ``s = 0`` the anchor (unconditional) one,
    ``s > 1`` strengthens the condition; any finite ``s`` is allowed (negative values push away
    from the condition). Per-example scales ``(B,)`` broadcast over the non-batch axes.

    One evaluation: the wrapped denoiser is called once, under ``jax.vmap`` over a new leading
    axis of size 2 that holds ``cond`` and the anchor (``x`` and ``t`` are shared by the two
    halves, ``in_axes=None``, so work that depends only on them -- e.g. a network's layers
    before the condition enters -- is done once). A concatenation along the batch axis would
    instead reshuffle the examples of a sharded batch (the ``2B`` rows no longer line up with
    the devices' shards) and add collectives; the new axis is unsharded, so each device guides
    its own examples.

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` (a :class:`jaxdiff.Denoiser`), vmappable.
        process: the forward process (for the conversions of ``space`` / ``rescale_space`` and
            the noise levels of ``interval``).
        scale: guidance scale :math:`s`, a finite scalar or ``(B,)``; may be traced.
        null_cond: the null condition, a pytree like ``cond`` with leaves broadcastable to the
            leaves of ``cond`` (e.g. the null label as a scalar or ``(B,)``), or a callable
            ``batch_size -> null cond`` such as ``net.null_cond``.
        negative_cond: a negative condition used as the anchor instead of ``null_cond`` (same
            forms); give exactly one of the two.
        space: ``"x0"`` (default), ``"eps"``, ``"score"`` or ``"v"`` -- where the combination is
            formed (the same result in every space, up to round-off).
        rescale: the guidance-rescale factor :math:`\phi` (scalar or ``(B,)``, 0.7 in the
            paper), or None (default) for no rescale. May be traced.
        rescale_space: the parameterisation the rescale acts in -- required with ``rescale``:
            ``"eps"`` (what diffusers does for an epsilon network), ``"x0"`` or ``"v"`` (the
            paper's motivation), ``"score"`` (same as ``"eps"``).
        interval: ``(lo, hi)`` noise levels :math:`\sigma/\alpha`: guide only for
            :math:`\varsigma \in (lo, hi]`, else return :math:`D_c` with one network call. The
            interval must lie in ``[noise_level(t_min), noise_level(t_max)]`` of ``process``
            with ``lo < hi``. A batch whose examples straddle an end of the interval (times
            differing per example) is still exact, at the cost of evaluating both branches.

    Returns:
        The guided denoiser ``guided(x, t, cond) -> x0_hat``, where ``cond`` (required) is the
        conditional condition. It is a :class:`jax.tree_util.Partial`: when ``denoiser`` and
        the anchor are pytrees (arrays, analytic denoisers) it can be passed through
        ``jax.jit`` as an argument and a new ``scale`` / ``rescale`` / ``interval`` reuses the
        compiled program.

    Examples:
        >>> guided = classifier_free(denoiser, process, 3.0, null_cond=jnp.full((8,), 10))
        >>> x0_hat = guided(x_t, t, labels)          # labels: (8,) ints
        >>> samples = jaxdiff.sample(key, guided, process, (8, 2), cond=labels)
        >>> # EDM2-style interval and a diffusers-style rescale of epsilon
        >>> guided = classifier_free(denoiser, process, 2.0, null_cond=null,
        ...                          interval=(0.28, 1.61), rescale=0.7, rescale_space="eps")
    """
    check_callable(denoiser, "denoiser")
    if (null_cond is None) == (negative_cond is None):
        raise ValueError(
            "classifier_free: give exactly one of null_cond (the null label/embedding) and "
            "negative_cond (a negative condition used as the anchor)."
        )
    check_scale(scale)
    check_space(space)
    if rescale is None:
        if rescale_space is not None:
            raise ValueError("rescale_space was given without rescale.")
    else:
        check_scale(rescale, "rescale")
        if rescale_space is None:
            raise ValueError(
                "rescale needs rescale_space, the parameterisation it acts in: 'eps' (diffusers) "
                "or 'x0'/'v' (the paper's motivation); they give different results."
            )
        check_space(rescale_space, "rescale_space")
    if interval is not None:
        interval = check_noise_levels(interval, process, "interval")
        if interval.shape != (2,):
            raise ValueError(f"interval must be (lo, hi); got {interval.shape[0]} values.")
    anchor = null_cond if negative_cond is None else negative_cond
    config = _CFG(
        space=space,
        rescale_space=rescale_space,
        anchor_name="null_cond" if negative_cond is None else "negative_cond",
    )
    return jax.tree_util.Partial(config, denoiser, process, scale, anchor, rescale, interval)


@static_config
class _CFG:
    """The guided denoiser of :func:`classifier_free` (static options; arrays are arguments)."""

    space: str
    rescale_space: str | None
    anchor_name: str

    def __call__(self, denoiser, process, scale, anchor, rescale, interval, x, t, cond=None):
        if cond is None:
            raise ValueError(
                "classifier-free guidance needs the conditional cond; got cond=None (for the "
                "unconditional model call the wrapped denoiser with null_cond)."
            )
        x = batched_x(x)

        def guided(x, t, cond):
            return self._combine(denoiser, process, scale, anchor, rescale, x, t, cond)

        if interval is None:
            return guided(x, t, cond)

        def conditional(x, t, cond):
            return single_call(denoiser, x, t, cond)

        # Stages (0, lo], (lo, hi], (hi, inf): guidance only in the middle one.
        return run_by_stage((conditional, guided), (0, 1, 0), process, interval, x, t, cond)

    def _combine(self, denoiser, process, scale, anchor, rescale, x, t, cond):
        other = resolve_null_cond(anchor, cond, x.shape[0], self.anchor_name)
        per_example(scale, x, jnp.float32, "scale")  # shape check before the network call
        both = jax.tree.map(lambda c, n: jnp.stack([jnp.asarray(c), n]), cond, other)
        out = stacked_call(denoiser, x, t, both)
        dtype = output_dtype(out)
        s = per_example(scale, x, dtype, "scale")
        d_c, d_a = out[0], out[1]
        if self.space == "x0":
            p_c, p_g = d_c, d_c + (s - 1.0) * (d_c - d_a)
        else:
            p_c = to_space(d_c, process, x, t, self.space)
            p_a = to_space(d_a, process, x, t, self.space)
            p_g = p_c + (s - 1.0) * (p_c - p_a)
        if rescale is not None:
            if self.rescale_space != self.space:
                p_c = to_space(d_c, process, x, t, self.rescale_space)
                p_g = to_space(from_space(p_g, process, x, t, self.space), process, x, t,
                               self.rescale_space)
            phi = per_example(rescale, x, dtype, "rescale")
            p_g = _rescaled(p_g, p_c, phi)
            space = self.rescale_space
        else:
            space = self.space
        return p_g if space == "x0" else from_space(p_g, process, x, t, space)


def _rescaled(p_g, p_c, phi):
    r""":math:`\phi P_g\,\mathrm{std}(P_c)/\mathrm{std}(P_g) + (1 - \phi) P_g`, std per example."""
    axes = tuple(range(1, p_g.ndim))
    std_c = jnp.std(p_c, axis=axes, keepdims=True)
    std_g = jnp.std(p_g, axis=axes, keepdims=True)
    ok = std_g > 0
    # A constant guided prediction has no spread to match; leave it unscaled (not 0/0).
    factor = jnp.where(ok, std_c / jnp.where(ok, std_g, 1.0), 1.0)
    return phi * (p_g * factor) + (1.0 - phi) * p_g
