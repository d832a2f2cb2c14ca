"""Jacobian traces by forward-mode products: exact (basis directions) or Hutchinson probes.

Shared by :mod:`jaxdiff.likelihood` (divergence of the probability-flow velocity) and
:mod:`jaxdiff.fokker_planck` (Laplacians and divergences in the residual).
"""

import jax
import jax.numpy as jnp

__all__ = ["basis", "quadratic_forms"]


def basis(x):
    """The ``D`` unit directions of one example, broadcast over the batch: ``(D, *x.shape)``."""
    d = 1
    for n in x.shape[1:]:
        d *= n
    eye = jnp.eye(d, dtype=x.dtype).reshape(d, 1, *x.shape[1:])
    return jnp.broadcast_to(eye, (d, *x.shape))


def quadratic_forms(fn, x, directions):
    r"""``fn(x)`` and :math:`v^\top J_{fn}(x)\, v` per example for each direction ``v``.

    ``fn`` maps ``(B, ...)`` to the same shape with examples independent (a block-diagonal
    Jacobian). One linearisation is shared by all directions, so ``K`` directions cost one
    evaluation of ``fn`` and ``K`` Jacobian-vector products. With :func:`basis` directions the
    forms are the Jacobian's diagonal entries (their sum is the trace); with Rademacher or
    standard-normal probes each form is an unbiased estimate of the trace.

    Args:
        fn: ``fn(x) -> F(x)`` with ``F(x).shape == x.shape``.
        x: shape ``(B, ...)``.
        directions: shape ``(K, *x.shape)``.

    Returns:
        ``(F(x), forms)`` with ``forms`` of shape ``(K, B)``.
    """
    value, jvp_fn = jax.linearize(fn, x)
    if value.shape != x.shape:
        raise ValueError(f"fn must return the shape of x {x.shape}; got {value.shape}.")
    jv = jax.vmap(jvp_fn)(directions)
    forms = jnp.sum((directions * jv).reshape(directions.shape[0], x.shape[0], -1), axis=-1)
    return value, forms
