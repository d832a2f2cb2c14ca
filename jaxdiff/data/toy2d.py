r"""Two-dimensional toy distributions with class labels, for diffusion experiments on CPU.

``sample(key, name, n)`` returns points ``x`` of shape ``(n, 2)`` (float32) and labels ``(n,)``
(int32), drawn with ``jax.random`` from a typed key: the same key gives bitwise the same draw.

Every set is first drawn in its *raw* coordinates (below) and then standardised by a fixed,
exactly known affine map

.. math::
    x = (x_{\rm raw} - c) / s, \qquad x_{\rm raw} = s\,x + c \quad (:func:`to_raw`),

with :math:`c` the exact mean of the raw distribution and :math:`s` its root-mean-square
per-coordinate standard deviation, :math:`s^2 = \mathrm{tr}\,\mathrm{Cov}(x_{\rm raw}) / 2`.
So every set has mean 0 and :math:`E\|x\|^2 = 2` (an average variance of 1 per coordinate)
exactly; the scale is isotropic, so circles stay circles. :func:`standardization` returns
:math:`(c, s)`; both are derived in closed form below, not estimated.

Sets (raw coordinates, :math:`z \sim N(0, I)`; labels; center :math:`c` and scale :math:`s`):

``"checkerboard"``
    Uniform on the 8 dark cells of a 4x4 board on :math:`[-2, 2]^2`; cell ``(col, row)``,
    counted from the bottom left, is dark when ``col + row`` is even. 8 labels:
    ``2 * row + col // 2``. :math:`c = (0, 0)`, :math:`s = \sqrt{4/3}` (each coordinate is
    uniform on :math:`[-2, 2]`, so both have unit variance exactly).
``"moons"``
    :math:`\theta \sim U[0, \pi]`; label 0: :math:`(\cos\theta, \sin\theta)`, label 1:
    :math:`(1 - \cos\theta, 1/2 - \sin\theta)`; plus :math:`0.1 z`.
    :math:`c = (1/2, 1/4)`, :math:`s^2 = \tfrac12\big(\tfrac34 + \tfrac12 - \tfrac4{\pi^2}
    + (\tfrac2\pi - \tfrac14)^2\big) + 0.1^2`, :math:`s = 0.712106`.
``"swiss_roll"``
    :math:`\tau \sim U[3\pi/2, 9\pi/2]`, :math:`(\tau\cos\tau, \tau\sin\tau) + 0.5 z`.
    3 labels: the half-turn ``floor((tau - 3 pi / 2) / pi)``, from the inside.
    :math:`c = (2, 2/(3\pi))`, :math:`s^2 = \tfrac12(E[\tau^2] + 2 \cdot 0.5^2 - \|c\|^2)`
    with :math:`E[\tau^2] = 9.75\pi^2`, :math:`s = 6.807482`.
``"8gaussians"``
    :math:`N(2 (\cos\phi_k, \sin\phi_k), 0.2^2 I)`, :math:`\phi_k = 2\pi k / 8`.
    8 labels: :math:`k`. :math:`c = (0, 0)`, :math:`s = \sqrt{2^2/2 + 0.2^2} = \sqrt{2.04}`.
``"25gaussians"``
    :math:`N((i, j), 0.1^2 I)`, :math:`i, j \in \{-2, \dots, 2\}`. 25 labels:
    ``5 * (j + 2) + (i + 2)``. :math:`c = (0, 0)`, :math:`s = \sqrt{2 + 0.1^2}`.
``"rings"``
    Concentric circles of radius :math:`r_k = k + 1`:
    :math:`r_k (\cos\phi, \sin\phi) + 0.1 z`, :math:`\phi \sim U[0, 2\pi)`. 3 labels:
    :math:`k`. :math:`c = (0, 0)`,
    :math:`s = \sqrt{\overline{r_k^2}/2 + 0.1^2} = \sqrt{7/3 + 0.01}`.

Every label is equally likely. The two Gaussian sets are exact mixtures:
:func:`gaussian_mixture` returns them (in model coordinates) as a
:class:`jaxdiff.analytic.GaussianMixture`, whose exact scores and denoisers are the ground
truth for trained models.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import analytic

__all__ = [
    "NAMES",
    "sample",
    "num_classes",
    "standardization",
    "to_raw",
    "from_raw",
    "gaussian_mixture",
]

_MOONS_NOISE = 0.1
_SWISS_NOISE = 0.5
_SWISS_T0, _SWISS_T1 = 1.5 * math.pi, 4.5 * math.pi
_RINGS_RADII = (1.0, 2.0, 3.0)
_RINGS_NOISE = 0.1
_EIGHT_RADIUS, _EIGHT_STD = 2.0, 0.2
_GRID_STD = 0.1


@dataclasses.dataclass(frozen=True)
class _Toy:
    num_classes: int
    center: tuple[float, float]  # exact mean of the raw distribution
    scale: float  # sqrt(tr Cov(raw) / 2)
    draw: Callable  # (key, n) -> (raw (n, 2) float32, labels (n,) int32)


def _check_key(key):
    if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(
            "key must be a typed PRNG key from jax.random.key(seed); got "
            f"{type(key).__name__} with dtype {getattr(key, 'dtype', None)}."
        )
    if key.shape != ():
        raise ValueError(f"key must be a single key (shape ()); got key.shape = {key.shape}.")


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int; got {type(n).__name__}.")
    if n < 0:
        raise ValueError(f"n must be >= 0; got n = {n}.")
    return int(n)


def _checkerboard(key, n):
    k_cell, k_pos = jax.random.split(key)
    label = jax.random.randint(k_cell, (n,), 0, 8, dtype=jnp.int32)
    row = label // 2
    # The dark cells of row r are the columns of r's parity: r % 2 and r % 2 + 2.
    col = 2 * (label % 2) + row % 2
    corner = jnp.stack([col, row], axis=1).astype(jnp.float32) - 2.0
    return corner + jax.random.uniform(k_pos, (n, 2), jnp.float32), label


def _moons(key, n):
    k_label, k_theta, k_noise = jax.random.split(key, 3)
    label = jax.random.randint(k_label, (n,), 0, 2, dtype=jnp.int32)
    theta = jax.random.uniform(k_theta, (n,), jnp.float32, 0.0, math.pi)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    upper = jnp.stack([cos, sin], axis=1)
    lower = jnp.stack([1.0 - cos, 0.5 - sin], axis=1)
    raw = jnp.where((label == 0)[:, None], upper, lower)
    return raw + _MOONS_NOISE * jax.random.normal(k_noise, (n, 2), jnp.float32), label


def _swiss_roll(key, n):
    k_t, k_noise = jax.random.split(key)
    tau = jax.random.uniform(k_t, (n,), jnp.float32, _SWISS_T0, _SWISS_T1)
    label = jnp.clip(jnp.floor((tau - _SWISS_T0) / math.pi), 0, 2).astype(jnp.int32)
    raw = jnp.stack([tau * jnp.cos(tau), tau * jnp.sin(tau)], axis=1)
    return raw + _SWISS_NOISE * jax.random.normal(k_noise, (n, 2), jnp.float32), label


def _rings(key, n):
    k_label, k_phi, k_noise = jax.random.split(key, 3)
    label = jax.random.randint(k_label, (n,), 0, len(_RINGS_RADII), dtype=jnp.int32)
    phi = jax.random.uniform(k_phi, (n,), jnp.float32, 0.0, 2.0 * math.pi)
    radius = jnp.asarray(_RINGS_RADII, jnp.float32)[label]
    raw = radius[:, None] * jnp.stack([jnp.cos(phi), jnp.sin(phi)], axis=1)
    return raw + _RINGS_NOISE * jax.random.normal(k_noise, (n, 2), jnp.float32), label


def _mixture_params(name):
    """Raw-coordinate means ``(K, 2)`` and the common component std of a Gaussian set."""
    if name == "8gaussians":
        phi = 2.0 * np.pi * np.arange(8) / 8
        return _EIGHT_RADIUS * np.stack([np.cos(phi), np.sin(phi)], axis=1), _EIGHT_STD
    # 25gaussians: label 5 * (j + 2) + (i + 2) sits at (i, j).
    i, j = np.meshgrid(np.arange(-2.0, 3.0), np.arange(-2.0, 3.0), indexing="xy")
    return np.stack([i.ravel(), j.ravel()], axis=1), _GRID_STD


def _mixture(name, *, model_space):
    means, std = _mixture_params(name)
    if model_space:
        center, scale = standardization(name)
        means, std = (means - center[None, :]) / scale, std / scale
    k = means.shape[0]
    return analytic.GaussianMixture.create(
        jnp.ones((k,), jnp.float32),
        jnp.asarray(means, jnp.float32),
        stds=jnp.full((k,), std, jnp.float32),
        labels=jnp.arange(k, dtype=jnp.int32),
        num_classes=k,
    )


def _gaussians(name):
    def draw(key, n):
        raw, label = _mixture(name, model_space=False).sample_with_labels(key, n)
        return raw.astype(jnp.float32), label.astype(jnp.int32)

    return draw


def _moons_scale():
    var_x = 0.5 + 0.25 + _MOONS_NOISE**2  # cos(theta) has variance 1/2; moon offsets +-1/2
    var_y = (0.5 - 4.0 / math.pi**2) + (2.0 / math.pi - 0.25) ** 2 + _MOONS_NOISE**2
    return math.sqrt((var_x + var_y) / 2.0)


def _swiss_roll_moments():
    a, b = _SWISS_T0, _SWISS_T1
    # Antiderivatives of tau cos(tau) and tau sin(tau): tau sin + cos and -tau cos + sin.
    mean_x = ((b * math.sin(b) + math.cos(b)) - (a * math.sin(a) + math.cos(a))) / (b - a)
    mean_y = ((-b * math.cos(b) + math.sin(b)) - (-a * math.cos(a) + math.sin(a))) / (b - a)
    second_moment = (a * a + a * b + b * b) / 3.0 + 2.0 * _SWISS_NOISE**2  # E |x_raw|^2
    scale = math.sqrt((second_moment - mean_x**2 - mean_y**2) / 2.0)
    return (mean_x, mean_y), scale


_SWISS_CENTER, _SWISS_SCALE = _swiss_roll_moments()

_TOYS = {
    "checkerboard": _Toy(8, (0.0, 0.0), math.sqrt(4.0 / 3.0), _checkerboard),
    "moons": _Toy(2, (0.5, 0.25), _moons_scale(), _moons),
    "swiss_roll": _Toy(3, _SWISS_CENTER, _SWISS_SCALE, _swiss_roll),
    "8gaussians": _Toy(
        8, (0.0, 0.0), math.sqrt(_EIGHT_RADIUS**2 / 2.0 + _EIGHT_STD**2), _gaussians("8gaussians")
    ),
    "25gaussians": _Toy(25, (0.0, 0.0), math.sqrt(2.0 + _GRID_STD**2), _gaussians("25gaussians")),
    "rings": _Toy(
        len(_RINGS_RADII),
        (0.0, 0.0),
        math.sqrt(float(np.mean(np.square(_RINGS_RADII))) / 2.0 + _RINGS_NOISE**2),
        _rings,
    ),
}

#: The names accepted by :func:`sample`.
NAMES: tuple[str, ...] = tuple(_TOYS)


def _toy(name) -> _Toy:
    try:
        return _TOYS[name]
    except (KeyError, TypeError):
        raise ValueError(f"name must be one of {list(NAMES)}; got {name!r}.") from None


def num_classes(name: str) -> int:
    """Number of label classes of a toy set (labels lie in ``0 .. num_classes - 1``).

    Examples:
        >>> toy2d.num_classes("8gaussians")
        8
    """
    return _toy(name).num_classes


def standardization(name: str) -> tuple[np.ndarray, float]:
    r"""The exact affine map of a set: ``(center (2,), scale)`` with :math:`x = (x_{raw} - c)/s`.

    ``center`` is the exact mean of the raw distribution and ``scale`` the square root of half
    the trace of its covariance (closed forms; see the module docstring).

    Examples:
        >>> center, scale = toy2d.standardization("checkerboard")   # (0, 0), sqrt(4/3)
    """
    toy = _toy(name)
    return np.asarray(toy.center, np.float64), float(toy.scale)


def _affine(x, name):
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != 2:
        raise ValueError(f"x must have shape (..., 2); got x.shape = {x.shape}.")
    center, scale = standardization(name)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return x.astype(dtype), jnp.asarray(center, dtype).reshape((1,) * (x.ndim - 1) + (2,)), scale


def to_raw(x, name: str) -> jax.Array:
    r"""Map points from model coordinates back to the raw coordinates: :math:`s x + c`.

    Args:
        x: points of shape ``(..., 2)``, as returned by :func:`sample` (or generated by a model).
        name: the toy set.

    Examples:
        >>> x, _ = toy2d.sample(jax.random.key(0), "8gaussians", 4)
        >>> raw = toy2d.to_raw(x, "8gaussians")   # centres on the circle of radius 2
    """
    x, center, scale = _affine(x, name)
    return x * scale + center


def from_raw(x_raw, name: str) -> jax.Array:
    r"""Map raw points ``(..., 2)`` to model coordinates: :math:`(x_{raw} - c) / s`.

    Examples:
        >>> x = toy2d.from_raw(jnp.array([[2.0, 0.0]]), "8gaussians")   # centre of label 0
    """
    x_raw, center, scale = _affine(x_raw, name)
    return (x_raw - center) / scale


def sample(key: jax.Array, name: str, n: int) -> tuple[jax.Array, jax.Array]:
    r"""Draw ``n`` labelled points of a toy set, standardised to mean 0 and :math:`E\|x\|^2 = 2`.

    Args:
        key: a typed PRNG key (``jax.random.key``); the same key gives the same points.
        name: one of :data:`NAMES`.
        n: number of points (static).

    Returns:
        ``(x, labels)``: ``x`` float32 of shape ``(n, 2)`` and ``labels`` int32 of shape
        ``(n,)`` in ``0 .. num_classes(name) - 1`` (see the module docstring for their meaning).

    Examples:
        >>> x, y = toy2d.sample(jax.random.key(0), "moons", 512)
        >>> x.shape, y.shape
        ((512, 2), (512,))
    """
    _toy(name)
    _check_key(key)
    return _sample(key, name, _check_n(n))


@functools.partial(jax.jit, static_argnames=("name", "n"))
def _sample(key, name, n):
    toy = _TOYS[name]
    raw, labels = toy.draw(key, n)
    center = jnp.asarray(toy.center, jnp.float32)[None, :]
    x = (raw - center) / jnp.float32(toy.scale)
    return x.astype(jnp.float32), labels.astype(jnp.int32)


def gaussian_mixture(name: str) -> analytic.GaussianMixture:
    r"""The exact law of ``"8gaussians"`` or ``"25gaussians"`` in model coordinates.

    A :class:`jaxdiff.analytic.GaussianMixture` with equal weights, one isotropic component per
    label (``labels[k] = k``), means :math:`(\mu_k - c)/s` and std :math:`\sigma/s`: exact
    scores, denoisers and class-conditional denoisers of the data :func:`sample` draws.

    Examples:
        >>> mix = toy2d.gaussian_mixture("8gaussians")
        >>> denoiser = mix.denoiser(jaxdiff.VPProcess())   # the optimal denoiser of the set
    """
    _toy(name)
    if name not in ("8gaussians", "25gaussians"):
        raise ValueError(
            f"name must be '8gaussians' or '25gaussians' (the Gaussian-mixture sets); got {name!r}."
        )
    return _mixture(name, model_space=True)
