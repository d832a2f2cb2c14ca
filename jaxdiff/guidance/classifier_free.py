r"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser transform.

.. math::
    \tilde D(x, t, c) = D(x, t, \varnothing) + s\,\big(D(x, t, c) - D(x, t, \varnothing)\big),

evaluated as :math:`D_c + (s - 1)(D_c - D_u)`, which is exactly :math:`D_c` at :math:`s = 1`.
The combination is affine with weights summing to one, so it is the same whether it is applied
to :math:`\hat x_0`, :math:`\hat\varepsilon`, :math:`v` or the score: guiding the denoiser is
guiding every parameterisation. In score form it samples (heuristically) from
:math:`p(x \mid c)^s p(x)^{1-s}`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, broadcast_to_batch, is_concrete

__all__ = ["classifier_free"]


def _resolve_null_cond(null_cond, cond, batch_size, name="null_cond"):
    """The null condition as a pytree like ``cond``: each leaf broadcast to the cond leaf.

    ``null_cond`` may be a pytree (leaves broadcastable to the matching leaves of ``cond``, e.g.
    ``(B,)`` labels or a scalar label) or a callable ``batch_size -> pytree``.
    """
    if null_cond is None:
        raise ValueError(f"{name} is None; give the network's null condition.")
    if callable(null_cond) and not isinstance(null_cond, jax.Array):
        null_cond = null_cond(batch_size)
    cond_def = jax.tree.structure(cond)
    null_def = jax.tree.structure(null_cond)
    if cond_def != null_def:
        raise ValueError(
            f"{name} must have the tree structure of cond; got {null_def} for cond {cond_def}."
        )

    def fit(c, n):
        c, n = jnp.asarray(c), jnp.asarray(n)
        try:
            shape = np.broadcast_shapes(n.shape, c.shape)
        except ValueError:
            shape = None
        if shape != c.shape:
            raise ValueError(
                f"every leaf of {name} must broadcast to the matching leaf of cond; got shape "
                f"{n.shape} for a cond leaf of shape {c.shape}."
            )
        return jnp.broadcast_to(n.astype(c.dtype), c.shape)

    return jax.tree.map(fit, cond, null_cond)


def _check_scale(scale):
    if not is_concrete(scale):
        return
    s = np.asarray(scale, dtype=np.float64)
    if s.ndim > 1:
        raise ValueError(f"scale must be a scalar or have shape (B,); got shape {s.shape}.")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scale must be finite; got {scale}.")


def classifier_free(
    denoiser: Callable, process, scale, *, null_cond: Any
) -> jax.tree_util.Partial:
    r"""Classifier-free guidance: :math:`\tilde D = D_u + s\,(D_c - D_u)`.

    ``s = 1`` is the plain conditional denoiser, ``s = 0`` the unconditional one, ``s > 1``
    strengthens the condition; any finite ``s`` is allowed (negative values push away from the
    condition). Per-example scales ``(B,)`` broadcast over the non-batch axes.

    One evaluation: the wrapped denoiser is called once, under ``jax.vmap`` over a new leading
    axis of size 2 that holds ``cond`` and ``null_cond`` (``x`` and ``t`` are shared by the two
    halves, ``in_axes=None``, so work that depends only on them -- e.g. a network's layers
    before the condition enters -- is done once). A concatenation along the batch axis would
    instead reshuffle the examples of a sharded batch (the ``2B`` rows no longer line up with
    the devices' shards) and add collectives; the new axis is unsharded, so each device guides
    its own examples.

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` (a :class:`jaxdiff.Denoiser`), vmappable.
        process: the forward process (unused: the combination is the same for every
            parameterisation; taken for the common transform signature).
        scale: guidance scale :math:`s`, a finite scalar or ``(B,)``; may be traced.
        null_cond: the null condition, a pytree like ``cond`` with leaves broadcastable to the
            leaves of ``cond`` (e.g. the null label as a scalar or ``(B,)``), or a callable
            ``batch_size -> null cond`` such as ``net.null_cond``.

    Returns:
        The guided denoiser ``guided(x, t, cond) -> x0_hat``, where ``cond`` (required) is the
        conditional condition. It is a :class:`jax.tree_util.Partial`: when ``denoiser`` and
        ``null_cond`` are pytrees (arrays, analytic denoisers) it can be passed through
        ``jax.jit`` as an argument and a new ``scale`` reuses the compiled program.

    Examples:
        >>> guided = classifier_free(denoiser, process, 3.0, null_cond=jnp.full((8,), 10))
        >>> x0_hat = guided(x_t, t, labels)          # labels: (8,) ints
        >>> samples = jaxdiff.sample(key, guided, process, (8, 2), cond=labels)
    """
    del process
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable; got {type(denoiser).__name__}.")
    if null_cond is None:
        raise ValueError("classifier_free: null_cond is required (the null label/embedding).")
    _check_scale(scale)
    return jax.tree_util.Partial(_guided, denoiser, scale, null_cond)


def _guided(denoiser, scale, null_cond, x, t, cond=None):
    """The guided denoiser of :func:`classifier_free`."""
    if cond is None:
        raise ValueError(
            "classifier-free guidance needs the conditional cond; got cond=None (for the "
            "unconditional model call the wrapped denoiser with null_cond)."
        )
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch axis; got shape {x.shape}.")
    null = _resolve_null_cond(null_cond, cond, x.shape[0])
    both = jax.tree.map(lambda c, n: jnp.stack([jnp.asarray(c), n]), cond, null)
    out = jax.vmap(denoiser, in_axes=(None, None, 0))(x, t, both)
    out = out.astype(jnp.promote_types(out.dtype, jnp.float32))
    if out.shape != (2,) + x.shape:
        raise ValueError(f"denoiser returned shape {out.shape[1:]}; expected x.shape = {x.shape}.")
    d_cond, d_uncond = out[0], out[1]
    s = broadcast_to_batch(as_float_array(scale).astype(out.dtype), x, "scale")
    return d_cond + (s - 1.0) * (d_cond - d_uncond)
