r"""Composable diffusion (Liu et al. 2022): conjunction (AND) and negation (NOT) of conditions.

.. math::
    \tilde D(x, t, \{c_i\}) = D_u + \sum_{i=1}^n w_i\,\big(D_{c_i} - D_u\big),
    \qquad D_u = D(x, t, \varnothing),\ D_{c_i} = D(x, t, c_i),

which in score form samples (heuristically) from :math:`p(x)\prod_i p(c_i \mid x)^{w_i}`: AND
is a sum of positive weights, NOT a negative weight (:math:`p(c_j \mid x)^{-w}`; the reference
code's ``--weights "7.5 | -7.5"``). With :math:`n = 1` it is classifier-free guidance.

The combination is affine with weights summing to one, so it is the same in every
parameterisation (``space``), up to round-off. All :math:`n + 1` evaluations run as ONE call of
the wrapped denoiser under ``jax.vmap`` over a new leading axis (null condition first), never a
concatenation along the (possibly sharded) batch axis.

Not to be confused with a negative prompt
(``classifier_free(..., negative_cond=...)``), which replaces the unconditional anchor by the
negative condition: :math:`D_n + s(D_c - D_n)` equals this module's combination with weights
:math:`(s, 1 - s)` on :math:`(c, n)` only, where the :math:`D_u` terms cancel.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, is_concrete
from ._common import (
    batched_x,
    check_callable,
    check_space,
    from_space,
    output_dtype,
    resolve_null_cond,
    stacked_call,
    static_config,
    to_space,
)

__all__ = ["composable", "stack_conds"]


def stack_conds(*conds) -> Any:
    r"""Stack per-concept conditions (same tree structure) on a new leading concept axis.

    Examples:
        >>> conds = stack_conds(labels_a, labels_b)        # two (B,) arrays -> (2, B)
        >>> guided = composable(denoiser, process, jnp.array([3.0, -2.0]), null_cond=null)
        >>> x0_hat = guided(x_t, t, conds)                  # a AND NOT b
    """
    if not conds:
        raise ValueError("stack_conds needs at least one condition.")
    first = jax.tree.structure(conds[0])
    for i, c in enumerate(conds[1:], start=1):
        if jax.tree.structure(c) != first:
            raise ValueError(
                f"every condition must have the tree structure of the first; conds[{i}] has "
                f"{jax.tree.structure(c)}, conds[0] has {first}."
            )
    return jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(v) for v in leaves]), *conds)


def _check_weights(weights):
    w = jnp.asarray(weights)
    if w.ndim not in (1, 2):
        raise ValueError(
            f"weights must have shape (n,) or (n, B) (one weight per concept, optionally per "
            f"example); got shape {w.shape}."
        )
    if is_concrete(weights) and not np.all(np.isfinite(np.asarray(weights, dtype=np.float64))):
        raise ValueError(f"weights must be finite; got {weights}.")


def composable(
    denoiser: Callable, process, weights, *, null_cond: Any, space: str = "x0"
) -> jax.tree_util.Partial:
    r"""Composable diffusion: :math:`\tilde D = D_u + \sum_i w_i (D_{c_i} - D_u)` (AND / NOT).

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat``, vmappable.
        process: the forward process (for the conversions of ``space``).
        weights: one finite weight per concept, shape ``(n,)``, or per concept and example,
            ``(n, B)``; negative weights negate a concept. May be traced.
        null_cond: the null condition (structure of ONE condition, leaves broadcastable to a
            condition's leaves), or a callable ``batch_size -> null cond``.
        space: ``"x0"``, ``"eps"``, ``"score"`` or ``"v"`` (the same result up to round-off).

    Returns:
        ``guided(x, t, conds) -> x0_hat``, a :class:`jax.tree_util.Partial`, where ``conds`` is a
        condition pytree whose leaves have a leading concept axis ``n`` and then the batch axis,
        ``(n, B, ...)`` (see :func:`stack_conds`).

    Examples:
        >>> # class 0 AND class 2, NOT class 1
        >>> conds = stack_conds(jnp.zeros(8, int), jnp.full(8, 2), jnp.ones(8, int))
        >>> guided = composable(denoiser, process, jnp.array([2.0, 2.0, -1.0]), null_cond=null)
        >>> samples = jaxdiff.sample(key, guided, process, (8, 2), cond=conds)
    """
    check_callable(denoiser, "denoiser")
    if null_cond is None:
        raise ValueError("composable: null_cond is required (the null label/embedding).")
    _check_weights(weights)
    check_space(space)
    return jax.tree_util.Partial(_Composed(space), denoiser, process, weights, null_cond)


@static_config
class _Composed:
    space: str

    def __call__(self, denoiser, process, weights, null_cond, x, t, cond=None):
        if cond is None:
            raise ValueError(
                "composable guidance needs the stacked conditions; got cond=None."
            )
        x = batched_x(x)
        batch = x.shape[0]
        leaves = jax.tree.leaves(cond)
        if not leaves:
            raise ValueError("conds must hold at least one array leaf.")
        n = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
        for leaf in leaves:
            if jnp.shape(leaf)[:2] != (n, batch):
                raise ValueError(
                    f"every leaf of conds must have shape (n, B, ...) = ({n}, {batch}, ...) "
                    f"(concepts, then batch); got a leaf of shape {jnp.shape(leaf)}."
                )
        w = as_float_array(weights)
        if w.shape[0] != n or (w.ndim == 2 and w.shape[1] != batch):
            raise ValueError(
                f"weights must have shape (n,) = ({n},) or (n, B) = ({n}, {batch}) for {n} "
                f"concepts; got {w.shape}."
            )
        first = jax.tree.map(lambda c: jnp.asarray(c)[0], cond)
        null = resolve_null_cond(null_cond, first, batch)
        stacked = jax.tree.map(
            lambda n_, c: jnp.concatenate([n_[None], jnp.asarray(c)]), null, cond
        )
        out = stacked_call(denoiser, x, t, stacked)  # (n + 1, B, ...): null first
        w = w.astype(output_dtype(out))
        w = w.reshape(w.shape + (1,) * (out.ndim - w.ndim))  # (n, 1 or B, 1, ...)
        if self.space != "x0":
            out = jax.vmap(lambda d: to_space(d, process, x, t, self.space))(out)
        p_u, p_c = out[0], out[1:]
        p = p_u + jnp.sum(w * (p_c - p_u[None]), axis=0)
        return p if self.space == "x0" else from_space(p, process, x, t, self.space)
