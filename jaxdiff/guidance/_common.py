r"""Private helpers shared by the guidance transforms.

* null-condition resolution and scale checks (host-side, when values are concrete);
* the stacked call: several conditions evaluated by ONE call of the wrapped denoiser under
  ``jax.vmap`` over a new leading axis (never a concatenation along the batch axis);
* conversions between the denoiser output and the parameterisation a combination is formed in
  (``"x0"``, ``"eps"``, ``"score"``, ``"v"``), via :mod:`jaxdiff.predictions`;
* the score-space coefficient: adding :math:`w\,g` to the score adds
  :math:`w\,(\sigma^2/\alpha)\,g` to :math:`\hat x_0`, since
  :math:`\hat x_0 = (x + \sigma^2\nabla\log p_t)/\alpha`;
* the noise-level range of a process and the validation of noise-level boundaries.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, broadcast_to_batch, is_concrete
from ..predictions import _convert_unchecked

SPACES = ("x0", "eps", "score", "v")

# Relative slack for noise levels computed in float32 at the ends of a process's range.
_RANGE_SLACK = 4 * float(np.finfo(np.float32).eps)


def static_config(cls):
    """A frozen, value-compared dataclass: the static part of a transform, used as the function
    of a :class:`jax.tree_util.Partial` so equal configurations share a compiled program."""
    return dataclasses.dataclass(frozen=True)(cls)


def check_callable(fn, name):
    if not callable(fn):
        raise TypeError(f"{name} must be callable; got {type(fn).__name__}.")


def check_space(space, name="space"):
    if space not in SPACES:
        raise ValueError(f"{name} must be one of {SPACES}; got {space!r}.")


def check_scale(scale, name="scale"):
    """Refuse a concrete scale that is not a finite scalar or ``(B,)`` vector."""
    if not is_concrete(scale):
        return
    s = np.asarray(scale, dtype=np.float64)
    if s.ndim > 1:
        raise ValueError(f"{name} must be a scalar or have shape (B,); got shape {s.shape}.")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} must be finite; got {scale}.")


def resolve_null_cond(null_cond, cond, batch_size, name="null_cond"):
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


def batched_x(x):
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch axis; got shape {x.shape}.")
    return x


def output_dtype(out):
    return jnp.promote_types(out.dtype, jnp.float32)


def single_call(denoiser, x, t, cond):
    """``denoiser(x, t, cond)`` promoted to at least float32, with its shape checked."""
    out = denoiser(x, t, cond)
    if out.shape != x.shape:
        raise ValueError(f"denoiser returned shape {out.shape}; expected x.shape = {x.shape}.")
    return out.astype(output_dtype(out))


def stacked_call(denoiser, x, t, conds):
    """All conditions of ``conds`` (leaves ``(n, B, ...)``) in one vmapped call: ``(n, *x.shape)``.

    ``x`` and ``t`` are shared (``in_axes=None``), so work that depends only on them is done once,
    and the new axis is unsharded: each device guides its own examples.
    """
    out = jax.vmap(denoiser, in_axes=(None, None, 0))(x, t, conds)
    n = jax.tree.leaves(conds)[0].shape[0]
    if out.shape != (n,) + x.shape:
        raise ValueError(f"denoiser returned shape {out.shape[1:]}; expected x.shape = {x.shape}.")
    return out.astype(output_dtype(out))


def to_space(x0, process, x, t, space):
    """The denoiser output ``x0`` (``(B, ...)``) as a prediction of kind ``space``."""
    return _convert_unchecked(x0, process, x, t, "x0", space)


def from_space(pred, process, x, t, space):
    """A prediction of kind ``space`` back to the denoiser output."""
    return _convert_unchecked(pred, process, x, t, space, "x0")


def score_to_x0(process, x, t, dtype):
    r""":math:`\sigma^2/\alpha` shaped to broadcast against ``x``: the :math:`\hat x_0` change per
    unit score change (exact for every process: :math:`\hat x_0 = (x + \sigma^2 s)/\alpha`)."""
    t = as_float_array(t)
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    alpha, sigma = process.alpha(t), process.sigma(t)
    return broadcast_to_batch((jnp.square(sigma) / alpha).astype(dtype), x)


def per_example(c, x, dtype, name):
    """A scalar or ``(B,)`` coefficient in ``dtype``, shaped to broadcast against ``x``."""
    return broadcast_to_batch(as_float_array(c).astype(dtype), x, name)


def noise_level_range(process):
    """``(noise_level(t_min), noise_level(t_max))`` as floats, or None when traced."""
    if not is_concrete(*jax.tree.leaves(process)):
        return None
    lo = float(np.asarray(process.noise_level(as_float_array(process.t_min))))
    hi = float(np.asarray(process.noise_level(as_float_array(process.t_max))))
    return lo, hi


def check_noise_levels(values, process, name):
    """Refuse concrete noise levels that are non-finite, not strictly increasing, or outside
    ``[noise_level(t_min), noise_level(t_max)]`` of ``process``. Returns an array."""
    arr = jnp.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of noise levels; got shape {arr.shape}.")
    arr = as_float_array(arr)
    if not is_concrete(arr):
        return arr
    v = np.asarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite noise levels sigma/alpha; got {v}.")
    if not np.all(np.diff(v) > 0):
        raise ValueError(f"{name} must be strictly increasing; got {v}.")
    span = noise_level_range(process)
    if span is not None and v.size:
        lo, hi = span
        if v.min() < lo * (1 - _RANGE_SLACK) or v.max() > hi * (1 + _RANGE_SLACK):
            raise ValueError(
                f"{name} must lie in the noise-level range [noise_level(t_min), "
                f"noise_level(t_max)] = [{lo:.6g}, {hi:.6g}] of {type(process).__name__}; "
                f"got {v}."
            )
    return arr
