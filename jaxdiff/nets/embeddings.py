r"""Embeddings of the noise conditioning :math:`c_{\rm noise} = -\lambda(t)/8`.

The networks see the noise level only through ``c_noise`` (:math:`\lambda` is the log-SNR, so
:math:`c_{\rm noise} = \tfrac14\log(\sigma/\alpha)`, EDM's choice), which lies in about
:math:`[-2, 2]` for the usual processes. Two feature maps turn it into a vector:

* :func:`sinusoidal_embedding` -- geometric frequencies (Vaswani et al. 2017; DDPM), applied to
  ``POSITIONAL_SCALE * c_noise`` so the range spans a few hundred units, like DDPM's integer
  time steps;
* :func:`fourier_embedding` -- random Fourier features :math:`[\cos 2\pi f c, \sin 2\pi f c]`,
  :math:`f \sim N(0, s^2)` (Tancik et al. 2020; NCSN++ / EDM use :math:`s = 16`). The
  frequencies are one fixed draw from a seeded NumPy generator: they are part of the
  architecture, neither trained nor stored, and a rebuilt network has the same ones.

:class:`NoiseEmbedding` follows either with the usual two-layer SiLU MLP.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._base import check_choice, check_int, wide_dtype
from .layers import linear

__all__ = [
    "EMBEDDINGS",
    "POSITIONAL_SCALE",
    "FOURIER_SCALE",
    "sinusoidal_embedding",
    "fourier_embedding",
    "NoiseEmbedding",
]

#: The accepted values of a network's ``embedding`` option.
EMBEDDINGS = ("positional", "fourier")
#: ``c_noise`` is multiplied by this before the sinusoidal embedding.
POSITIONAL_SCALE = 250.0
#: Standard deviation of the random Fourier frequencies.
FOURIER_SCALE = 16.0


def _check_dim(dim):
    dim = check_int(dim, "dim", minimum=2)
    if dim % 2:
        raise ValueError(f"embedding dim must be even; got {dim}.")
    return dim


def _features_input(c_noise):
    c = jnp.asarray(c_noise)
    if c.ndim != 1:
        raise ValueError(f"c_noise must have shape (B,); got {tuple(c.shape)}.")
    if not jnp.issubdtype(c.dtype, jnp.floating):
        c = c.astype(jnp.float32)
    return c


def sinusoidal_embedding(c_noise, dim: int, *, max_period: float = 10000.0, scale: float = 1.0):
    r"""Sinusoidal embedding :math:`[\cos(s c\,\omega_k), \sin(s c\,\omega_k)]_{k<d/2}`.

    :math:`\omega_k = P^{-k/(d/2)}` with ``P = max_period``, ``s = scale``.

    Args:
        c_noise: ``(B,)`` floats.
        dim: even embedding size ``d``.

    Returns:
        ``(B, dim)`` in ``c_noise``'s floating dtype (cosines first).

    Examples:
        >>> sinusoidal_embedding(jnp.zeros(3, jnp.float32), 8)[0]    # cos 0 = 1, sin 0 = 0
        Array([1., 1., 1., 1., 0., 0., 0., 0.], dtype=float32)
    """
    dim = _check_dim(dim)
    c = _features_input(c_noise)
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / half) * scale
    args = c[:, None] * jnp.asarray(freqs, c.dtype)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@functools.lru_cache(maxsize=64)
def _fourier_freqs(half: int, scale: float, seed: int) -> np.ndarray:
    freqs = np.random.default_rng(seed).standard_normal(half) * scale
    freqs.setflags(write=False)
    return freqs


def fourier_embedding(c_noise, dim: int, *, scale: float = FOURIER_SCALE, seed: int = 0):
    r"""Random Fourier features :math:`[\cos 2\pi f_k c, \sin 2\pi f_k c]_{k<d/2}`.

    :math:`f_k \sim N(0, \text{scale}^2)`, drawn once from ``numpy.random.default_rng(seed)``
    (deterministic: the same ``(dim, scale, seed)`` always gives the same features).

    Args:
        c_noise: ``(B,)`` floats.
        dim: even embedding size.

    Returns:
        ``(B, dim)`` in ``c_noise``'s floating dtype.

    Examples:
        >>> fourier_embedding(jnp.zeros(2, jnp.float32), 4).shape
        (2, 4)
    """
    dim = _check_dim(dim)
    c = _features_input(c_noise)
    freqs = 2.0 * np.pi * _fourier_freqs(dim // 2, float(scale), int(seed))
    args = c[:, None] * jnp.asarray(freqs, c.dtype)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class NoiseEmbedding(nnx.Module):
    r"""Noise-level embedding: features of ``c_noise``, then Linear -> SiLU -> Linear.

    The features (``"positional"``: :func:`sinusoidal_embedding` of
    ``POSITIONAL_SCALE * c_noise``; ``"fourier"``: :func:`fourier_embedding`) are computed in at
    least float32, then cast to the compute dtype.

    Args:
        features: size of the feature map (even).
        out_features: output width.
        kind: one of :data:`EMBEDDINGS`.

    Call: ``emb(c_noise (B,), dtype) -> (B, out_features)`` in ``dtype`` (the compute dtype).

    Examples:
        >>> emb = NoiseEmbedding(16, 32, rngs=nnx.Rngs(0))
        >>> emb(jnp.zeros(4, jnp.float32), jnp.float32).shape
        (4, 32)
    """

    def __init__(self, features: int, out_features: int, *, kind: str = "positional",
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.features = _check_dim(features)
        self.kind = check_choice(kind, "embedding", EMBEDDINGS)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(features, out_features, **kw)
        self.fc2 = linear(out_features, out_features, **kw)

    def __call__(self, c_noise, dtype):
        c = jnp.asarray(c_noise).astype(wide_dtype(dtype))
        if self.kind == "positional":
            h = sinusoidal_embedding(c, self.features, scale=POSITIONAL_SCALE)
        else:
            h = fourier_embedding(c, self.features)
        h = self.fc1(h.astype(dtype))
        return self.fc2(jax.nn.silu(h))
