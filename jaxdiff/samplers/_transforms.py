r"""End-game denoiser transforms used with samplers: x0 clipping and dynamic thresholding.

Both take a denoiser and return a denoiser with the same signature, so they compose with any
sampler and with guidance transforms (apply them outermost, after guidance, as the reference
pipelines do).
"""

import jax.numpy as jnp

from .._utils import check_positive

__all__ = ["clip_x0", "dynamic_threshold"]


def clip_x0(denoiser, bound=1.0):
    r"""Clip the denoiser output to :math:`[-b, b]` (DDPM's ``clip_sample``).

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        bound: :math:`b > 0` (data range, 1 for images in ``[-1, 1]``).

    Returns:
        A denoiser returning :math:`\mathrm{clip}(\hat x_0, -b, b)`.

    Examples:
        >>> clipped = clip_x0(denoiser, 1.0)
    """
    check_positive(bound, "bound")

    def clipped(x, t, cond=None):
        return jnp.clip(denoiser(x, t, cond), -bound, bound)

    return clipped


def dynamic_threshold(denoiser, quantile=0.995, max_value=1.0):
    r"""Dynamic thresholding (Saharia et al. 2022, Imagen).

    Per example, :math:`s = \mathrm{clip}(Q_q(|\hat x_0|), 1, s_{\max})` with :math:`Q_q` the
    ``quantile`` over all non-batch entries, and :math:`\hat x_0 \leftarrow
    \mathrm{clip}(\hat x_0, -s, s)/s`.

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        quantile: :math:`q \in (0, 1]`.
        max_value: :math:`s_{\max} \ge 1`.

    Returns:
        The thresholded denoiser.
    """
    if not 0.0 < float(quantile) <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1]; got {quantile}.")
    if not float(max_value) >= 1.0:
        raise ValueError(f"max_value must be >= 1; got {max_value}.")

    def thresholded(x, t, cond=None):
        x0 = denoiser(x, t, cond)
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        s = jnp.clip(jnp.quantile(flat, quantile, axis=1), 1.0, max_value)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s

    return thresholded
