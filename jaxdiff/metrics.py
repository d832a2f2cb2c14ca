"""Distances between distributions given as sample sets.

These metrics compare generated samples with reference samples, e.g. to track how well a
diffusion model fits a toy distribution. Every function takes sample sets as arrays of shape
``(N, D)`` (N points in D dimensions) and returns a scalar.

* :func:`sliced_wasserstein` -- Monte-Carlo sliced p-Wasserstein distance (pure JAX).
* :func:`gaussian_w2` -- closed-form 2-Wasserstein distance between two Gaussians (pure JAX).
* :func:`moments` / :func:`frechet_distance` -- Fréchet (FID-style) distance between Gaussians
  fitted to two sample sets; like FID it is the *squared* 2-Wasserstein distance (pure JAX).
* :func:`mmd` -- squared maximum mean discrepancy with (sums of) RBF kernels (pure JAX).
* :func:`energy_distance` -- energy distance (pure JAX).
* :func:`wasserstein_ot` -- exact optimal-transport p-Wasserstein distance between small
  empirical measures, solved on the host with POT (``ot.emd2``); not jit-able.
* :func:`crps` -- continuous ranked probability score of an ensemble against observations
  (per dimension; for probabilistic forecasts and imputations, pure JAX).
* :func:`bootstrap` -- paired/independent bootstrap standard errors and confidence intervals of
  any statistic of sample sets (host, NumPy).

The pure-JAX functions are not jitted internally; callers wrap them in :func:`jax.jit` (with
``static_argnames`` for the Python-valued options of :func:`sliced_wasserstein`). Argument
validation only looks at shapes and Python values, which are concrete even under ``jit``.
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "sliced_wasserstein",
    "gaussian_w2",
    "moments",
    "frechet_distance",
    "mmd",
    "energy_distance",
    "wasserstein_ot",
    "crps",
    "bootstrap",
]

_KERNELS = ("rbf",)


# --------------------------------------------------------------------------------------------
# Validation and small numerical helpers
# --------------------------------------------------------------------------------------------


def _check_samples(a, name, min_points=1):
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(a.shape)}")
    if a.shape[0] < min_points:
        raise ValueError(
            f"{name} must contain at least {min_points} point(s), got shape {tuple(a.shape)}"
        )


def _check_pair(x, y, min_points=1):
    _check_samples(x, "x", min_points)
    _check_samples(y, "y", min_points)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            "x and y must have the same feature dimension D, got "
            f"x.shape={tuple(x.shape)} and y.shape={tuple(y.shape)}"
        )


def _check_p(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p < 1:
        raise ValueError(f"p must be a finite real number >= 1, got {p!r}")


def _float_dtype(*arrays):
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating):
        # Integer sample sets are promoted to the default float (float32, or float64 under x64).
        dtype = jnp.result_type(float)
    return dtype


def _as_float_pair(x, y):
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    dtype = _float_dtype(x, y)
    return x.astype(dtype), y.astype(dtype)


def _safe_sqrt(a):
    # Double-where: the derivative of sqrt is infinite at 0 and 0 * inf = NaN would leak into
    # the gradient even from the unselected branch, so feed sqrt a harmless value there.
    positive = a > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, a, 1.0)), 0.0)


def _safe_root(a, p):
    """``a ** (1/p)`` for ``a >= 0`` with gradient 0 (not NaN) at ``a == 0``."""
    positive = a > 0
    return jnp.where(positive, jnp.where(positive, a, 1.0) ** (1.0 / p), 0.0)


def _symmetrise(m):
    return 0.5 * (m + m.T)


def _psd_sqrt(m):
    """Symmetric square root of a symmetric PSD matrix via ``eigh``."""
    w, v = jnp.linalg.eigh(m)
    # Round-off can push eigenvalues of a PSD matrix slightly below zero.
    w = jnp.sqrt(jnp.clip(w, 0.0, None))
    return (v * w[None, :]) @ v.T


def _psd_trace_sqrt(m):
    """``tr(m^{1/2})`` of a symmetric PSD matrix."""
    w = jnp.linalg.eigvalsh(m)
    return jnp.sum(jnp.sqrt(jnp.clip(w, 0.0, None)))


# --------------------------------------------------------------------------------------------
# Sliced Wasserstein
# --------------------------------------------------------------------------------------------


def _quantile_grid(n, m):
    """Common quantile grid of two uniform empirical measures with ``n`` and ``m`` atoms.

    Returns the order-statistic index of each measure on every cell between consecutive
    breakpoints of the union ``{k/n} U {k/m}`` together with the cell widths. Both quantile
    functions are constant on each cell, so the weighted sum over cells is the exact integral.
    """
    # Breakpoints in integer units of 1/(n m), so the union and the indices are exact.
    edges = np.union1d(np.arange(n + 1) * m, np.arange(m + 1) * n)
    left = edges[:-1]
    widths = np.diff(edges) / (n * m)
    return left // m, left // n, widths


def sliced_wasserstein(key, x, y, *, num_projections=128, p=2):
    r"""Monte-Carlo sliced p-Wasserstein distance between two sample sets.

    .. math::

        SW_p(x, y) = \Big( \mathbb{E}_{\theta \sim \mathcal{U}(S^{D-1})}
            W_p^p(\theta_\# x, \theta_\# y) \Big)^{1/p},

    estimated with ``num_projections`` directions :math:`\theta_k` (normalised standard
    Gaussian vectors drawn from ``key``). Each one-dimensional distance is

    .. math::

        W_p^p(\theta_\# x, \theta_\# y) = \int_0^1 |F_x^{-1}(u) - F_y^{-1}(u)|^p \, du,

    where :math:`F^{-1}` is the empirical (step-function, no interpolation) quantile function
    of the projected points, :math:`F_x^{-1}(u) = x_{(\lfloor u N \rfloor)}` (0-based order
    statistic). For ``N == M`` this is the sorted matching of the projections. For ``N != M``
    the integral is evaluated **exactly** on the common grid of quantile levels formed by the
    union of the breakpoints :math:`\{k/N\} \cup \{k/M\}` (at most ``N + M - 1`` cells,
    each weighted by its width, on which both step functions are constant). So every
    one-dimensional term is the exact :math:`W_p` between the projected empirical measures,
    and the only approximation is the Monte-Carlo average over directions.

    The gradient is finite everywhere; at exactly zero distance the outer root is given
    gradient 0.

    Args:
        key: typed PRNG key from :func:`jax.random.key` used to draw the projection directions.
        x: samples of shape ``(N, D)``.
        y: samples of shape ``(M, D)``.
        num_projections: number of random directions (static under ``jit``).
        p: order of the Wasserstein distance, ``p >= 1`` (static under ``jit``).

    Returns:
        Scalar array, the estimate of :math:`SW_p` (not raised to the power ``p``).

    Raises:
        ValueError: if ``x``/``y`` are not 2-D with the same ``D``, ``num_projections`` is not a
            positive int or ``p < 1``.

    Examples:
        >>> key = jax.random.key(0)
        >>> x = jnp.zeros((4, 2))
        >>> float(sliced_wasserstein(key, x, x))
        0.0
        >>> swd = jax.jit(sliced_wasserstein, static_argnames=("num_projections", "p"))
    """
    x, y = _as_float_pair(x, y)
    _check_pair(x, y)
    if isinstance(num_projections, bool) or not isinstance(num_projections, numbers.Integral):
        raise ValueError(f"num_projections must be a positive int, got {num_projections!r}")
    if num_projections < 1:
        raise ValueError(f"num_projections must be a positive int, got {num_projections!r}")
    _check_p(p)

    n, d = x.shape
    m = y.shape[0]
    theta = jax.random.normal(key, (int(num_projections), d), dtype=x.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=1, keepdims=True)

    # Sorting along the sample axis gives the order statistics of every projection at once.
    px = jnp.sort(x @ theta.T, axis=0)
    py = jnp.sort(y @ theta.T, axis=0)
    if n == m:
        diff = jnp.abs(px - py)
        cost = jnp.mean(diff**2 if p == 2 else diff**p)
    else:
        index_x, index_y, widths = _quantile_grid(n, m)
        diff = jnp.abs(px[index_x] - py[index_y])
        per_cell = diff**2 if p == 2 else diff**p
        widths = jnp.asarray(widths, dtype=x.dtype)
        cost = jnp.mean(jnp.sum(widths[:, None] * per_cell, axis=0))
    return _safe_root(cost, p)


# --------------------------------------------------------------------------------------------
# Gaussian / Fréchet
# --------------------------------------------------------------------------------------------


def _check_gaussian(mean, cov, index):
    if mean.ndim != 1:
        raise ValueError(f"mean{index} must have shape (D,), got {tuple(mean.shape)}")
    d = mean.shape[0]
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov{index} must be a square matrix (D, D), got {tuple(cov.shape)}")
    if cov.shape[0] != d:
        raise ValueError(
            f"cov{index} must have shape (D, D) matching mean{index} of shape ({d},), "
            f"got {tuple(cov.shape)}"
        )


def _gaussian_w2_squared(mean1, cov1, mean2, cov2):
    mean1, cov1, mean2, cov2 = (jnp.asarray(a) for a in (mean1, cov1, mean2, cov2))
    dtype = _float_dtype(mean1, cov1, mean2, cov2)
    mean1, cov1, mean2, cov2 = (a.astype(dtype) for a in (mean1, cov1, mean2, cov2))
    _check_gaussian(mean1, cov1, 1)
    _check_gaussian(mean2, cov2, 2)
    if mean1.shape != mean2.shape:
        raise ValueError(
            "mean1 and mean2 must have the same dimension, got "
            f"{tuple(mean1.shape)} and {tuple(mean2.shape)}"
        )

    cov1 = _symmetrise(cov1)
    cov2 = _symmetrise(cov2)
    root1 = _psd_sqrt(cov1)
    # C1^{1/2} C2 C1^{1/2} is symmetric PSD (unlike C1 C2), so eigh applies; re-symmetrise to
    # remove the asymmetry introduced by rounding in the matrix products.
    cross = _psd_trace_sqrt(_symmetrise(root1 @ cov2 @ root1))
    delta = mean1 - mean2
    w2_sq = jnp.sum(delta**2) + jnp.trace(cov1) + jnp.trace(cov2) - 2.0 * cross
    # Cancellation can make the result slightly negative for (nearly) equal Gaussians.
    return jnp.clip(w2_sq, 0.0, None)


def gaussian_w2(mean1, cov1, mean2, cov2):
    r"""2-Wasserstein distance between two Gaussian distributions (closed form).

    .. math::

        W_2^2\big(\mathcal{N}(m_1, C_1), \mathcal{N}(m_2, C_2)\big)
            = \|m_1 - m_2\|^2
            + \operatorname{tr}\Big(C_1 + C_2 - 2 \big(C_1^{1/2} C_2 C_1^{1/2}\big)^{1/2}\Big).

    Covariances are symmetrised, and matrix square roots are taken with
    :func:`jax.numpy.linalg.eigh`, clipping negative (round-off) eigenvalues to zero, so
    singular PSD covariances are fine. Gradients through ``eigh`` are ill-defined when a matrix
    has repeated eigenvalues (e.g. an isotropic covariance), so do not differentiate this in
    that case.

    Args:
        mean1: mean of the first Gaussian, shape ``(D,)``.
        cov1: covariance of the first Gaussian, symmetric PSD, shape ``(D, D)``.
        mean2: mean of the second Gaussian, shape ``(D,)``.
        cov2: covariance of the second Gaussian, symmetric PSD, shape ``(D, D)``.

    Returns:
        Scalar array, :math:`W_2` (the distance itself, *not* squared; compare
        :func:`frechet_distance`).

    Raises:
        ValueError: if a mean is not 1-D, a covariance is not square or does not match its
            mean, or the two dimensions differ.

    Examples:
        >>> m, c = jnp.zeros(2), jnp.eye(2)
        >>> float(gaussian_w2(m, c, m + jnp.array([3.0, 4.0]), c))
        5.0
    """
    return _safe_sqrt(_gaussian_w2_squared(mean1, cov1, mean2, cov2))


def moments(x):
    r"""Sample mean and unbiased sample covariance of a sample set.

    .. math::

        \hat m = \frac1N \sum_i x_i, \qquad
        \hat C = \frac{1}{N - 1} \sum_i (x_i - \hat m)(x_i - \hat m)^\top.

    Useful to precompute reference statistics once for :func:`gaussian_w2`.

    Args:
        x: samples of shape ``(N, D)`` with ``N >= 2``.

    Returns:
        Tuple ``(mean, cov)`` of shapes ``(D,)`` and ``(D, D)``.

    Raises:
        ValueError: if ``x`` is not 2-D or has fewer than two points.

    Examples:
        >>> mean, cov = moments(jnp.array([[0.0, 0.0], [2.0, 2.0]]))
        >>> mean.tolist(), cov.tolist()
        ([1.0, 1.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    x = jnp.asarray(x)
    x = x.astype(_float_dtype(x))
    _check_samples(x, "x", min_points=2)
    mean = jnp.mean(x, axis=0)
    centred = x - mean[None, :]
    cov = centred.T @ centred / (x.shape[0] - 1)
    return mean, cov


def frechet_distance(x, y):
    r"""Fréchet distance between Gaussians fitted to two sample sets (FID convention).

    .. math::

        \mathrm{FD}(x, y) = W_2^2\big(\mathcal{N}(\hat m_x, \hat C_x),
            \mathcal{N}(\hat m_y, \hat C_y)\big),

    with sample means and unbiased (``N - 1``) sample covariances, as in the Fréchet
    Inception Distance. Following the FID convention this returns the **squared**
    2-Wasserstein distance; ``jnp.sqrt`` of it equals
    ``gaussian_w2(*moments(x), *moments(y))``. The estimator is biased upwards by
    :math:`O(D/N)` even when both sets come from the same distribution.

    Args:
        x: samples of shape ``(N, D)``, ``N >= 2``.
        y: samples of shape ``(M, D)``, ``M >= 2``.

    Returns:
        Scalar array, the squared distance :math:`W_2^2`.

    Raises:
        ValueError: if ``x``/``y`` are not 2-D with the same ``D`` or have fewer than two
            points.

    Examples:
        >>> x = jnp.array([[0.0], [2.0]])
        >>> float(frechet_distance(x, x + 3.0))
        9.0
    """
    x, y = _as_float_pair(x, y)
    _check_pair(x, y, min_points=2)
    return _gaussian_w2_squared(*moments(x), *moments(y))


# --------------------------------------------------------------------------------------------
# Kernel and energy distances
# --------------------------------------------------------------------------------------------


def _sq_dists_gram(a, b):
    # |a|^2 + |b|^2 - 2 a.b costs one matmul and O(N M) memory, which matters for
    # high-dimensional features; cancellation can produce tiny negative values, hence the clip.
    a2 = jnp.sum(a**2, axis=1)
    b2 = jnp.sum(b**2, axis=1)
    d2 = a2[:, None] + b2[None, :] - 2.0 * (a @ b.T)
    return jnp.clip(d2, 0.0, None)


def _dists_direct(a, b):
    # Differencing before squaring keeps small distances accurate (the Gram form loses
    # sqrt(eps) relative accuracy after the square root) and gives exact zeros for duplicates.
    diff = a[:, None, :] - b[None, :, :]
    return _safe_sqrt(jnp.sum(diff**2, axis=-1))


def _rbf_kernel(a, b, gammas):
    d2 = _sq_dists_gram(a, b)
    return jnp.sum(jnp.exp(-d2[:, :, None] * gammas[None, None, :]), axis=-1)


def _within_mean(k, unbiased):
    if not unbiased:
        return jnp.mean(k)
    n = k.shape[0]
    return (jnp.sum(k) - jnp.sum(jnp.diagonal(k))) / (n * (n - 1))


def mmd(x, y, *, bandwidth=1.0, kernel="rbf", unbiased=True):
    r"""Squared maximum mean discrepancy between two sample sets.

    .. math::

        \mathrm{MMD}^2 = \mathbb{E}\,k(X, X') + \mathbb{E}\,k(Y, Y') - 2\,\mathbb{E}\,k(X, Y),
        \qquad k(a, b) = \sum_h \exp\!\Big(-\frac{\|a - b\|^2}{2 h^2}\Big),

    where ``h`` runs over the given bandwidth(s) (a sum of RBF kernels is again a
    characteristic kernel). With ``unbiased=True`` the within-set expectations are
    U-statistics that exclude the diagonal ``i == j`` (unbiased, can be negative); with
    ``unbiased=False`` they are V-statistics over all pairs (biased upwards, always
    ``>= 0`` up to round-off). The cross term always averages over all ``N * M`` pairs.

    Args:
        x: samples of shape ``(N, D)``.
        y: samples of shape ``(M, D)``.
        bandwidth: positive scalar or 1-D array of positive bandwidths ``h``.
        kernel: kernel name; only ``"rbf"`` is supported.
        unbiased: U-statistic (requires ``N, M >= 2``) if true, V-statistic otherwise.

    Returns:
        Scalar array, the squared MMD.

    Raises:
        ValueError: for an unknown ``kernel``, a non-positive or non-1-D ``bandwidth`` (checked
            when it is concrete, i.e. not traced), ``x``/``y`` that are not 2-D with the same
            ``D``, or fewer than two points per set with ``unbiased=True``.

    Examples:
        >>> x = jnp.zeros((3, 1))
        >>> y = jnp.ones((3, 1))
        >>> round(float(mmd(x, y, bandwidth=1.0)), 6)  # 2 - 2 exp(-1/2)
        0.786939
    """
    if kernel not in _KERNELS:
        raise ValueError(f"Unknown kernel {kernel!r}; supported kernels: {_KERNELS}")
    x, y = _as_float_pair(x, y)
    _check_pair(x, y, min_points=2 if unbiased else 1)

    try:
        bw_host = np.asarray(bandwidth, dtype=np.float64)
    except jax.errors.TracerArrayConversionError:
        bw_host = None  # traced under jit: the value cannot be checked, only the shape
    bw = jnp.asarray(bandwidth, dtype=x.dtype)
    if bw.ndim > 1:
        raise ValueError(f"bandwidth must be a scalar or 1-D array, got shape {bw.shape}")
    if bw_host is not None and not (bw_host.size > 0 and np.all(bw_host > 0)):
        raise ValueError(f"bandwidth must be positive, got {bandwidth!r}")
    gammas = 1.0 / (2.0 * jnp.atleast_1d(bw) ** 2)

    kxx = _within_mean(_rbf_kernel(x, x, gammas), unbiased)
    kyy = _within_mean(_rbf_kernel(y, y, gammas), unbiased)
    kxy = jnp.mean(_rbf_kernel(x, y, gammas))
    return kxx + kyy - 2.0 * kxy


def energy_distance(x, y, *, unbiased=False):
    r"""Energy distance between two sample sets.

    .. math::

        \mathcal{E}(x, y) = 2\,\mathbb{E}\|X - Y\| - \mathbb{E}\|X - X'\| - \mathbb{E}\|Y - Y'\|.

    By default (``unbiased=False``) the expectations are V-statistics over all pairs, the
    within-set averages including the zero-distance diagonal; this estimate is always
    ``>= 0`` and equals twice the squared L2 distance between the empirical CDFs in 1-D. With
    ``unbiased=True`` the within-set averages are U-statistics excluding the diagonal
    (requires ``N, M >= 2``; can be negative). This is the squared-type energy distance
    (no square root). Distances use a safe Euclidean norm whose gradient is 0, not NaN, at
    exactly coincident points. Pairwise differences are formed explicitly, so memory is
    ``O(N M D)`` unless XLA fuses the reduction.

    Args:
        x: samples of shape ``(N, D)``.
        y: samples of shape ``(M, D)``.
        unbiased: use U-statistics for the within-set terms.

    Returns:
        Scalar array, the energy distance.

    Raises:
        ValueError: if ``x``/``y`` are not 2-D with the same ``D``, or have fewer than two
            points with ``unbiased=True``.

    Examples:
        >>> float(energy_distance(jnp.array([[0.0]]), jnp.array([[1.0]])))
        2.0
    """
    x, y = _as_float_pair(x, y)
    _check_pair(x, y, min_points=2 if unbiased else 1)
    dxy = jnp.mean(_dists_direct(x, y))
    dxx = _within_mean(_dists_direct(x, x), unbiased)
    dyy = _within_mean(_dists_direct(y, y), unbiased)
    return 2.0 * dxy - dxx - dyy


# --------------------------------------------------------------------------------------------
# Exact optimal transport (host)
# --------------------------------------------------------------------------------------------


def _check_weights(w, n, name):
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"{name} must be finite, non-negative and have a positive sum")
    return w / w.sum()


def wasserstein_ot(x, y, *, p=2, weights_x=None, weights_y=None):
    r"""Exact p-Wasserstein distance between two small empirical measures (host, POT).

    .. math::

        W_p(\mu, \nu) = \Big(\min_{\pi \in \Pi(a, b)} \sum_{ij} \pi_{ij}
            \|x_i - y_j\|^p\Big)^{1/p},
        \qquad \mu = \sum_i a_i \delta_{x_i}, \quad \nu = \sum_j b_j \delta_{y_j},

    solved exactly as a linear program with POT's ``ot.emd2`` in float64 on the host. This
    is a plain Python function: it is **not** jit-able or differentiable, and its cost grows
    roughly cubically with the number of points, so use it for small sets (up to a few
    thousand points) and :func:`sliced_wasserstein` otherwise.

    Args:
        x: samples of shape ``(N, D)`` (NumPy or JAX array).
        y: samples of shape ``(M, D)``.
        p: order, ``p >= 1``; the ground cost is the Euclidean distance to the power ``p``.
        weights_x: optional non-negative weights of shape ``(N,)``; uniform if omitted.
            Normalised to sum to one.
        weights_y: optional non-negative weights of shape ``(M,)``; uniform if omitted.
            Normalised to sum to one.

    Returns:
        Python float, :math:`W_p`.

    Raises:
        ImportError: if POT is not installed (``pip install "jaxdiff[metrics]"``).
        ValueError: for malformed samples, weights or ``p``.

    Examples:
        >>> x = np.array([[0.0, 0.0], [1.0, 0.0]])
        >>> round(wasserstein_ot(x, x + np.array([3.0, 4.0])), 12)
        5.0
    """
    try:
        import ot  # Optional dependency, only needed for this host-side function.
    except ImportError as err:
        raise ImportError(
            "wasserstein_ot requires the POT (Python Optimal Transport) package; install it "
            'with `pip install "jaxdiff[metrics]"` or `pip install POT`.'
        ) from err

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    _check_pair(x, y)
    _check_p(p)
    a = _check_weights(weights_x, x.shape[0], "weights_x")
    b = _check_weights(weights_y, y.shape[0], "weights_y")

    sq = np.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
    # Use squared distances directly for p == 2 to avoid a sqrt/square round trip.
    cost = sq if p == 2 else np.sqrt(sq) ** p
    # The network simplex stops at convergence; the generous cap only matters for big problems.
    total = float(ot.emd2(a, b, cost, numItermax=10_000_000))
    return max(total, 0.0) ** (1.0 / p)


# --------------------------------------------------------------------------------------------
# Continuous ranked probability score
# --------------------------------------------------------------------------------------------


def crps(samples, y, *, fair=False, per_dimension=False):
    r"""Sample CRPS of a predictive ensemble against observations, per dimension.

    For each scalar dimension, with ensemble members :math:`x_1, \dots, x_N` and observation
    :math:`y`,

    .. math::

        \mathrm{CRPS} = \frac1N \sum_i |x_i - y| - \frac{1}{2 N^2} \sum_{i,j} |x_i - x_j|,

    the CRPS of the ensemble's empirical distribution (a loss: lower is better, 0 for a point
    mass on :math:`y`). ``fair=True`` divides the second sum by :math:`N(N-1)` instead, which
    makes the score an unbiased estimate of the CRPS of the distribution the members are drawn
    from (Ferro 2014). The pair sum is evaluated in :math:`O(N \log N)` from the sorted members,
    :math:`\sum_{i,j}|x_i - x_j| = 2\sum_k (2k - N - 1)\, x_{(k)}`. For a Gaussian
    :math:`N(\mu, s^2)` and :math:`z = (y - \mu)/s` the exact value is
    :math:`s\,[z(2\Phi(z) - 1) + 2\varphi(z) - 1/\sqrt\pi]` (Gneiting & Raftery 2007 write the
    negative, a positively oriented score).

    Args:
        samples: ensemble, shape ``(N, ...)``; the leading axis holds the members.
        y: observations, shape ``samples.shape[1:]``.
        fair: the unbiased (fair) ensemble CRPS; needs ``N >= 2``.
        per_dimension: return the CRPS of every dimension, shape ``samples.shape[1:]``,
            instead of their mean.

    Returns:
        The CRPS averaged over all dimensions of ``y`` (a scalar), or per dimension.

    Raises:
        ValueError: if ``samples`` has no leading member axis, too few members, or ``y`` does
            not have shape ``samples.shape[1:]``.

    Examples:
        >>> float(crps(jnp.array([[0.0], [2.0]]), jnp.array([1.0])))
        0.5
    """
    samples = jnp.asarray(samples)
    y = jnp.asarray(y)
    if samples.ndim < 1:
        raise ValueError(f"samples must have shape (N, ...); got shape {tuple(samples.shape)}")
    n = samples.shape[0]
    if n < (2 if fair else 1):
        raise ValueError(
            f"samples must have at least {2 if fair else 1} member(s) along axis 0"
            f"{' for fair=True' if fair else ''}; got shape {tuple(samples.shape)}"
        )
    if y.shape != samples.shape[1:]:
        raise ValueError(
            f"y must have shape samples.shape[1:] = {tuple(samples.shape[1:])}; "
            f"got {tuple(y.shape)}"
        )
    dtype = _float_dtype(samples, y)
    samples, y = samples.astype(dtype), y.astype(dtype)
    absolute = jnp.mean(jnp.abs(samples - y[None]), axis=0)
    ordered = jnp.sort(samples, axis=0)
    rank_weights = (2.0 * jnp.arange(1, n + 1, dtype=dtype) - n - 1).reshape(
        (n,) + (1,) * y.ndim
    )
    pair_sum = 2.0 * jnp.sum(rank_weights * ordered, axis=0)
    spread = pair_sum / (n * (n - 1) if fair else n * n)
    score = absolute - 0.5 * spread
    return score if per_dimension else jnp.mean(score)



# --------------------------------------------------------------------------------------------
# Bootstrap confidence intervals (host)
# --------------------------------------------------------------------------------------------


def bootstrap(rng, statistic, groups, *, num_boot=200, level=0.95):
    r"""Point estimate of a statistic of sample sets with bootstrap standard error and intervals.

    ``groups`` is a sequence of tuples of arrays. The arrays of one group share their rows
    (e.g. sample sets generated from the same seeds) and are resampled with the **same** row
    indices (a paired bootstrap); different groups are resampled independently. Each replicate
    evaluates ``statistic`` on the resampled arrays, passed in the order of ``groups``
    flattened. Reported: the estimate :math:`\hat\theta`, the bootstrap standard deviation, the
    percentile interval :math:`[q_{a}, q_{1-a}]` and the basic (reverse-percentile) interval
    :math:`[2\hat\theta - q_{1-a}, 2\hat\theta - q_{a}]`, :math:`a = (1 - \text{level})/2`.
    Resampling duplicates points, which biases distances between sample sets upwards; the basic
    interval corrects a bias that is the same in the replicates as in the estimate, and in
    differences of such distances the bias largely cancels.

    Host-side (NumPy) and not jit-able; ``statistic`` may return a scalar or a 1-D array (several
    statistics from the same replicates).

    Args:
        rng: a ``numpy.random.Generator``.
        statistic: ``statistic(*arrays) -> float or (S,)``.
        groups: sequence of tuples of arrays; within a group all arrays have the same length.
        num_boot: number of replicates, ``>= 2``.
        level: confidence level in ``(0, 1)``.

    Returns:
        dict with ``"value"``, ``"se"``, ``"ci_percentile"`` (shape ``(2,)`` or ``(2, S)``),
        ``"ci_basic"`` and ``"replicates"`` (``(num_boot,)`` or ``(num_boot, S)``), NumPy arrays.

    Raises:
        ValueError: for an empty group, arrays of different lengths in a group, ``num_boot < 2``
            or ``level`` outside ``(0, 1)``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(500, 1))
        >>> out = bootstrap(rng, lambda a: a.mean(), [(x,)], num_boot=100)
    """
    if isinstance(num_boot, bool) or not isinstance(num_boot, numbers.Integral) or num_boot < 2:
        raise ValueError(f"num_boot must be an int >= 2; got {num_boot!r}")
    if not (isinstance(level, numbers.Real) and 0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    groups = [tuple(np.asarray(a) for a in g) for g in groups]
    for i, g in enumerate(groups):
        if len(g) == 0:
            raise ValueError(f"groups[{i}] is empty; each group needs at least one array")
        lengths = {a.shape[0] if a.ndim else -1 for a in g}
        if len(lengths) != 1 or -1 in lengths or 0 in lengths:
            raise ValueError(
                f"the arrays of groups[{i}] must share a positive leading length; got shapes "
                f"{[a.shape for a in g]}"
            )
    flat = [a for g in groups for a in g]
    value = np.asarray(statistic(*flat), dtype=np.float64)
    reps = []
    for _ in range(int(num_boot)):
        resampled = []
        for g in groups:
            n = g[0].shape[0]
            idx = rng.integers(0, n, n)
            resampled.extend(a[idx] for a in g)
        reps.append(np.asarray(statistic(*resampled), dtype=np.float64))
    reps = np.stack(reps)
    a = 0.5 * (1.0 - level)
    lo, hi = np.quantile(reps, [a, 1.0 - a], axis=0)
    return {
        "value": value,
        "se": np.std(reps, axis=0, ddof=1),
        "ci_percentile": np.stack([lo, hi]),
        "ci_basic": np.stack([2.0 * value - hi, 2.0 * value - lo]),
        "replicates": reps,
    }
