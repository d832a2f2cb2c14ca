r"""Linear measurement operators :math:`y = A(x_0)` for inverse problems (inpainting, ...).

Each operator is a small frozen pytree (its arrays are leaves, its integer options static), so it
can be held by a guided denoiser and passed through ``jax.jit``. An operator maps a batch of
clean data to a batch of measurements, ``operator(x0) -> y`` with a leading batch axis on both
sides (images are NHWC), is linear, and is jit-, vmap- and grad-safe. ``operator.check(shape)``
validates a data shape ``(B, ...)`` and returns the measurement shape; it raises ``ValueError``
naming the operator and the expected data shape, and every call runs it (shapes are static, so
the error appears when a sampler is traced, before anything is computed).

=============================  ================================  ================================
operator                       data ``x0``                       measurement ``y``
=============================  ================================  ================================
:func:`inpainting` (mask)      ``(B, ...)``                      ``mask * x0``, same shape
:func:`super_resolution` (f)   ``(B, H, W, C)`` / ``(B, D)``     ``(B, H/f, W/f, C)`` / ``(B, D/f)``
:func:`colorization`           ``(B, H, W, C)``                  ``(B, H, W, 1)``, channel mean
:func:`linear` (A)             ``(B, D)``                        ``x0 @ A.T``, ``(B, M)``
=============================  ================================  ================================

Examples:
    >>> op = super_resolution(2)
    >>> op(jnp.ones((4, 32, 32, 3))).shape
    (4, 16, 16, 3)
    >>> op.check((4, 31, 32, 3))
    Traceback (most recent call last):
    ValueError: super_resolution(2): ...
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, is_concrete, pytree_dataclass

__all__ = ["inpainting", "super_resolution", "colorization", "linear"]


def _check_finite(a, name):
    if is_concrete(a) and not np.all(np.isfinite(np.asarray(a, dtype=np.float64))):
        raise ValueError(f"{name} must be finite.")


def _batch_shape(shape, name):
    shape = tuple(int(n) for n in shape)
    if len(shape) < 1:
        raise ValueError(f"{name}: data must have a leading batch axis; got shape {shape}.")
    return shape


def _in_dtype(op_array, x):
    """Operator coefficients in the (floating) dtype of the data, so a float32 batch stays
    float32 and a float64 reference stays float64."""
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
    return op_array.astype(dtype)


@pytree_dataclass
class Inpainting:
    r"""Masking :math:`y = m \odot x_0`; ``mask`` broadcasts to one example (1 = observed)."""

    mask: jax.Array

    def check(self, shape):
        """Validate a data shape ``(B, ...)``; returns the measurement shape (the same)."""
        shape = _batch_shape(shape, "inpainting")
        try:
            ok = np.broadcast_shapes(self.mask.shape, shape[1:]) == shape[1:]
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"inpainting: data must have shape (B, *example) with the mask of shape "
                f"{self.mask.shape} broadcastable to one example; got data shape {shape}."
            )
        return shape

    def __call__(self, x0):
        x0 = jnp.asarray(x0)
        self.check(x0.shape)
        mask = jnp.broadcast_to(_in_dtype(self.mask, x0), x0.shape[1:])
        return mask[None] * x0


@pytree_dataclass
class SuperResolution:
    r"""Average pooling by ``factor``: over ``H, W`` for NHWC images, over ``D`` for vectors."""

    factor: int = dataclasses.field(metadata=dict(static=True))

    def _expected(self):
        f = self.factor
        return (
            f"(B, H, W, C) with H and W divisible by {f}, or (B, D) with D divisible by {f}"
        )

    def check(self, shape):
        """Validate a data shape; returns the pooled shape."""
        shape = _batch_shape(shape, f"super_resolution({self.factor})")
        f = self.factor
        if len(shape) == 4 and shape[1] % f == 0 and shape[2] % f == 0:
            return (shape[0], shape[1] // f, shape[2] // f, shape[3])
        if len(shape) == 2 and shape[1] % f == 0:
            return (shape[0], shape[1] // f)
        raise ValueError(
            f"super_resolution({f}): data must have shape {self._expected()}; got {shape}."
        )

    def __call__(self, x0):
        x0 = jnp.asarray(x0)
        out = self.check(x0.shape)
        f = self.factor
        if x0.ndim == 2:
            return jnp.mean(x0.reshape(out[0], out[1], f), axis=2)
        b, h, w, c = out
        return jnp.mean(x0.reshape(b, h, f, w, f, c), axis=(2, 4))


@pytree_dataclass
class Colorization:
    r"""Grey-scale :math:`y = \frac1C\sum_c x_{0,c}`: NHWC ``(B, H, W, C)`` to ``(B, H, W, 1)``."""

    def check(self, shape):
        """Validate an NHWC data shape; returns ``(B, H, W, 1)``."""
        shape = _batch_shape(shape, "colorization")
        if len(shape) != 4:
            raise ValueError(
                f"colorization: data must be NHWC images of shape (B, H, W, C); got {shape}."
            )
        return shape[:3] + (1,)

    def __call__(self, x0):
        x0 = jnp.asarray(x0)
        self.check(x0.shape)
        return jnp.mean(x0, axis=-1, keepdims=True)


@pytree_dataclass
class Linear:
    r"""A matrix :math:`A` of shape ``(M, D)`` acting on vectors: :math:`y = x_0 A^\top`."""

    matrix: jax.Array

    def check(self, shape):
        """Validate a data shape ``(B, D)``; returns ``(B, M)``."""
        shape = _batch_shape(shape, "linear")
        m, d = self.matrix.shape
        if len(shape) != 2 or shape[1] != d:
            raise ValueError(
                f"linear: data must have shape (B, D) = (B, {d}) for a matrix of shape "
                f"{(m, d)}; got {shape}."
            )
        return (shape[0], m)

    def __call__(self, x0):
        x0 = jnp.asarray(x0)
        self.check(x0.shape)
        return x0 @ _in_dtype(self.matrix, x0).T


def inpainting(mask) -> Inpainting:
    r"""Inpainting operator :math:`y = m \odot x_0`.

    Args:
        mask: the observed entries of one example (1 observed, 0 missing; soft values are
            allowed), of any shape that broadcasts to one example, e.g. ``(H, W, 1)`` for NHWC
            images or ``(D,)`` for vectors. It must not carry a batch axis.

    Examples:
        >>> op = inpainting(jnp.array([1.0, 0.0, 1.0]))
        >>> op(jnp.ones((2, 3)))          # (2, 3), the middle entry zeroed
    """
    mask = as_float_array(mask)
    _check_finite(mask, "inpainting: mask")
    return Inpainting(mask=mask)


def super_resolution(factor: int) -> SuperResolution:
    r"""Super-resolution operator: average pooling by ``factor``.

    For NHWC images ``(B, H, W, C)`` each output pixel is the mean of a ``factor x factor``
    block; for vectors ``(B, D)`` each output entry is the mean of ``factor`` consecutive
    entries. H and W (or D) must be divisible by ``factor``.

    Args:
        factor: the pooling factor, a Python int >= 1.

    Examples:
        >>> super_resolution(4)(jnp.ones((2, 64, 64, 3))).shape
        (2, 16, 16, 3)
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"super_resolution: factor must be an int >= 1; got {factor!r}.")
    return SuperResolution(factor=int(factor))


def colorization() -> Colorization:
    r"""Colorization operator: the channel mean of NHWC images, ``(B, H, W, C) -> (B, H, W, 1)``.

    Examples:
        >>> colorization()(jnp.ones((2, 8, 8, 3))).shape
        (2, 8, 8, 1)
    """
    return Colorization()


def linear(matrix) -> Linear:
    r"""A generic linear operator on vectors, :math:`y = A x_0` per example (``x0 @ A.T``).

    Args:
        matrix: :math:`A`, shape ``(M, D)``.

    Examples:
        >>> pool_pairs = linear(jnp.kron(jnp.eye(4), jnp.full((1, 2), 0.5)))   # (4, 8)
        >>> pool_pairs(jnp.ones((3, 8))).shape
        (3, 4)
    """
    matrix = as_float_array(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"linear: matrix must have shape (M, D); got {matrix.shape}.")
    _check_finite(matrix, "linear: matrix")
    return Linear(matrix=matrix)
