r"""Exact distributions under Gaussian noising :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon`.

These are the ground truth of the numerical tests: for data drawn from

* :class:`Gaussian` -- :math:`N(\mu, \Sigma)` with a full or low-rank covariance
  :math:`\Sigma = U \mathrm{diag}(\lambda) U^\top`,
* :class:`GaussianMixture` -- :math:`\sum_k \pi_k N(\mu_k, \Sigma_k)`, optionally with class labels,
* :class:`Empirical` -- a training set as a mixture of point masses,
* :func:`molrg` -- a mixture of low-rank Gaussians on orthogonal subspaces (Wang et al. 2024),

the marginal :math:`p_t` of :math:`x_t` is known in closed form, and so are its log-density, its
score :math:`\nabla \log p_t`, the posterior-mean denoiser :math:`E[x_0 \mid x_t]` (what a
diffusion model is trained to predict) and, for a Gaussian, the probability-flow map
:math:`x_s = \Phi(x_t; t \to s)`.

With :math:`v_k(t) = \alpha_t^2 \lambda_k + \sigma_t^2` and eigen-coordinates
:math:`c = U^\top (x - \alpha_t \mu)`, a Gaussian has (Wang & Vastola)

.. math::
    \nabla \log p_t(x) = -U \frac{c}{v} - \frac{P_\perp(x - \alpha_t\mu)}{\sigma_t^2}, \qquad
    E[x_0 \mid x_t = x] = \mu + U \frac{\alpha_t \lambda}{v} c,

where :math:`P_\perp = I - U U^\top` (zero for a full-rank covariance). Mixtures combine the
per-component quantities with the posterior responsibilities :math:`w_k(x) = p(k \mid x_t = x)`.
Everything is evaluated in the eigenbasis, so nothing subtracts nearly equal numbers and no
matrix is inverted.

Conventions: data points are vectors, ``x`` has shape ``(B, D)``; times ``t`` have shape ``()`` or
``(B,)``; every method takes the forward process explicitly. Distributions are frozen pytree
dataclasses: pass them (and the process) as arguments of ``jax.jit``/``jax.vmap``/``jax.grad``.
Constructors (``create``, ``from_cov``, ...) validate concrete inputs; methods refuse concrete times
outside ``[process.t_min, process.t_max]``.

References:
    B. Wang, J. J. Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for
    Diffusion Models and its Applications".
    P. Wang et al., "Diffusion Models Learn Low-Dimensional Distributions via Subspace
    Clustering", arXiv:2409.02426, 2024.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._utils import (
    as_float_array,
    broadcast_to_batch,
    check_positive,
    check_times,
    is_concrete,
    pytree_dataclass,
)

__all__ = ["Gaussian", "GaussianMixture", "Empirical", "molrg"]

_LOG_2PI = math.log(2.0 * math.pi)
# Orthonormality tolerance of user-supplied bases (max |U^T U - I|).
_ORTHO_TOL = 1e-6


# ------------------------------------------------------------------------------------------------
# Small private helpers: dtypes, per-example coefficients, validation
# ------------------------------------------------------------------------------------------------


def _float_dtype(*arrays):
    """Common floating dtype of the arrays (integers promote to the default float)."""
    dtype = jnp.result_type(*arrays)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def _check_points(x, dim, name="x"):
    """Validate that ``x`` is a batch of ``dim``-vectors, shape ``(B, dim)``."""
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape (B, D) with D = {dim}; got {name}.shape = {x.shape}."
        )
    return x


def _per_example(c, x, dtype, name):
    """A coefficient of shape () or (B,) as a (B, 1) column in ``dtype`` (explicit broadcasting)."""
    c = broadcast_to_batch(c, x, name)
    return jnp.broadcast_to(c, (x.shape[0], 1)).astype(dtype)


def _marginal_coeffs(process, x, t, dtype, name="t"):
    r""":math:`(\alpha_t, \sigma_t)` as ``(B, 1)`` columns for ``x`` of shape ``(B, D)``."""
    t = as_float_array(t)
    alpha = _per_example(process.alpha(t), x, dtype, name)
    sigma = _per_example(process.sigma(t), x, dtype, name)
    return alpha, sigma


def _check_symmetric_pd(cov, name):
    """Raise unless the concrete (batch of) matrices is symmetric positive definite."""
    if not is_concrete(cov):
        return
    c = np.asarray(cov, dtype=np.float64)
    scale = max(float(np.max(np.abs(c))), np.finfo(np.float64).tiny)
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{name} must be finite.")
    if np.max(np.abs(c - np.swapaxes(c, -1, -2))) > 1e-6 * scale:
        raise ValueError(f"{name} must be symmetric.")
    eigvals = np.linalg.eigvalsh(c)
    # Eigenvalues at round-off level are numerically singular: the densities would be garbage.
    floor = c.shape[-1] * np.finfo(np.asarray(cov).dtype).eps * np.max(np.abs(eigvals))
    if np.any(eigvals <= floor):
        raise ValueError(
            f"{name} must be positive definite; smallest eigenvalue {eigvals.min():.3g}. "
            "Use a low-rank constructor for degenerate covariances."
        )


def _check_orthonormal(basis, name):
    """Raise unless the concrete (batch of) ``(D, r)`` matrices has orthonormal columns."""
    if not is_concrete(basis):
        return
    u = np.asarray(basis, dtype=np.float64)
    gram = np.swapaxes(u, -1, -2) @ u
    err = np.max(np.abs(gram - np.eye(u.shape[-1])), initial=0.0)
    if not err <= _ORTHO_TOL:
        raise ValueError(
            f"{name} must have orthonormal columns (max |U^T U - I| <= {_ORTHO_TOL}); "
            f"got {err:.3g}."
        )


def _log_weights(weights, name):
    """Validated log of positive (unnormalised) weights."""
    weights = as_float_array(weights)
    if weights.ndim != 1 or weights.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape (K,) with K >= 1; got {name}.shape = {weights.shape}."
        )
    check_positive(weights, name)
    return jnp.log(weights)


def _check_times_positive(t, name):
    """Raise if a concrete start time is not strictly positive (sigma_t = 0 there)."""
    if is_concrete(t) and np.any(np.asarray(t, dtype=np.float64) <= 0):
        raise ValueError(f"{name} must be > 0 (sigma({name}) must be positive); got {t}.")


# ------------------------------------------------------------------------------------------------
# Fitting to data: regularised moments, k-means and EM (used by Gaussian.fit, GaussianMixture.fit)
# ------------------------------------------------------------------------------------------------

_REMAINDERS = ("isotropic", "zero")
# Default eigenvalue floor, relative to the mean per-coordinate variance of the data: keeps
# constant coordinates (e.g. always-black border pixels) from making a covariance singular.
_REL_VARIANCE_FLOOR = 1e-6


def _flatten_data(data, name="data", min_points=2):
    """Data of shape ``(N, ...)`` as a float ``(N, D)`` array (trailing axes flattened, C order)."""
    data = as_float_array(data)
    if data.ndim < 2 or data.shape[0] < min_points:
        raise ValueError(
            f"{name} must have shape (N, D) or (N, ...) (e.g. images (N, H, W, C)) with "
            f"N >= {min_points}; got {name}.shape = {data.shape}."
        )
    if is_concrete(data) and not np.all(np.isfinite(np.asarray(data))):
        raise ValueError(f"{name} must be finite.")
    return data.reshape(data.shape[0], -1)


def _check_fit_options(dim, rank, shrinkage, min_variance, remainder):
    """Validate the (static) options shared by the ``fit`` constructors."""
    if rank is not None and (
        isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= dim
    ):
        raise ValueError(f"rank must be None or an int in [1, D = {dim}]; got {rank!r}.")
    if not isinstance(shrinkage, (int, float, np.integer, np.floating)) or not (
        0.0 <= float(shrinkage) <= 1.0
    ):
        raise ValueError(f"shrinkage must be a number in [0, 1]; got {shrinkage!r}.")
    if min_variance is not None and (
        not isinstance(min_variance, (int, float, np.integer, np.floating))
        or not 0.0 < float(min_variance) < math.inf
    ):
        raise ValueError(f"min_variance must be None or a finite number > 0; got {min_variance!r}.")
    if remainder not in _REMAINDERS:
        raise ValueError(f"remainder must be one of {_REMAINDERS}; got {remainder!r}.")


def _regularized_eigh(cov, floor, rank, shrinkage, remainder):
    r"""Eigenpairs (descending) of a regularised covariance: ``(U (D, r'), lambda (r',))``.

    :math:`\Sigma_s = (1 - s)\Sigma + s\,(\mathrm{tr}\Sigma / D) I`; with ``rank`` r the
    ``D - r`` trailing eigenvalues are replaced by their mean (``"isotropic"``, r' = D) or
    dropped (``"zero"``, r' = r); finally eigenvalues are floored at ``floor``.
    """
    d = cov.shape[-1]
    eye = jnp.eye(d, dtype=cov.dtype)
    cov = 0.5 * (cov + cov.T)
    if shrinkage:
        cov = (1.0 - shrinkage) * cov + shrinkage * (jnp.trace(cov) / d) * eye
    eigvals, eigvecs = jnp.linalg.eigh(cov)
    eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
    if rank is not None and rank < d:
        if remainder == "zero":
            eigvals, eigvecs = eigvals[:rank], eigvecs[:, :rank]
        else:
            tail = jnp.full((d - rank,), jnp.mean(eigvals[rank:]), eigvals.dtype)
            eigvals = jnp.concatenate([eigvals[:rank], tail])
    return eigvecs, jnp.maximum(eigvals, floor)


@jax.jit(static_argnames=("rank", "shrinkage", "remainder"))
def _moment_fit(x, floor, *, rank, shrinkage, remainder):
    """Mean ``(D,)`` and regularised eigenpairs of the 1/N covariance of ``x`` ``(N, D)``."""
    mean = jnp.mean(x, axis=0)
    dev = x - mean[None, :]
    eigvecs, eigvals = _regularized_eigh(dev.T @ dev / x.shape[0], floor, rank, shrinkage,
                                         remainder)
    return mean, eigvecs, eigvals


def _variance_floor(x, min_variance):
    """``min_variance``, or the default relative floor times the mean variance of ``x``."""
    if min_variance is not None:
        return jnp.asarray(min_variance, x.dtype)
    mean_var = jnp.mean(jnp.var(x, axis=0))
    if is_concrete(mean_var) and not float(mean_var) > 0:
        raise ValueError("data has zero variance in every coordinate; give min_variance > 0.")
    return _REL_VARIANCE_FLOOR * mean_var


def _sq_dists(x, centers):
    """Squared distances ``(N, K)`` between points ``(N, D)`` and centres ``(K, D)``."""
    cross = x @ centers.T
    sq = jnp.sum(jnp.square(x), axis=1)[:, None] + jnp.sum(jnp.square(centers), axis=1)[None, :]
    return jnp.maximum(sq - 2.0 * cross, 0.0)


def _kmeans_plus_plus(key, x, k):
    """k-means++ seeding (Arthur & Vassilvitskii 2007): centres ``(k, D)``."""
    n = x.shape[0]
    first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, n)
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = jnp.sum(jnp.square(x - x[first][None, :]), axis=1)

    def body(i, carry):
        centers, d2 = carry
        # Draw with probability proportional to D^2; uniformly if every point is a centre.
        positive = jnp.sum(d2) > 0
        logits = jnp.where(positive, jnp.log(jnp.where(d2 > 0, d2, 1.0)), 0.0)
        logits = jnp.where(positive & (d2 <= 0), -jnp.inf, logits)
        idx = jax.random.categorical(jax.random.fold_in(key, i), logits)
        centers = centers.at[i].set(x[idx])
        d2 = jnp.minimum(d2, jnp.sum(jnp.square(x - x[idx][None, :]), axis=1))
        return centers, d2

    centers, _ = jax.lax.fori_loop(1, k, body, (centers, d2))
    return centers


def _kmeans(key, x, k, max_iters):
    """Lloyd's k-means from k-means++ seeds; returns the final assignment ``(N,)`` int.

    Stops when no assignment changes (or after ``max_iters`` updates). An empty cluster is
    re-seeded at a point far from its current centre (the j-th empty cluster at the j-th
    farthest point), the usual repair; the caller checks that none is empty at the end.
    """
    centers = _kmeans_plus_plus(key, x, k)

    def assign(centers):
        d2 = _sq_dists(x, centers)
        return jnp.argmin(d2, axis=1), jnp.min(d2, axis=1)

    def update(labels, dist):
        onehot = jax.nn.one_hot(labels, k, dtype=x.dtype)
        counts = jnp.sum(onehot, axis=0)
        means = (onehot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
        empty = counts == 0
        farthest = jnp.argsort(-dist)[:k]
        slot = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        return jnp.where(empty[:, None], x[farthest[slot]], means)

    def cond(carry):
        i, _, _, _, changed = carry
        return (i < max_iters) & changed

    def body(carry):
        i, _, labels, dist, _ = carry
        centers = update(labels, dist)
        new_labels, new_dist = assign(centers)
        return i + 1, centers, new_labels, new_dist, jnp.any(new_labels != labels)

    labels, dist = assign(centers)
    carry = (jnp.asarray(0), centers, labels, dist, jnp.asarray(True))
    _, _, labels, _, _ = jax.lax.while_loop(cond, body, carry)
    return labels


def _weighted_moments(x, weights):
    """Per-component weights ``(N, K)`` -> counts ``(K,)``, means ``(K, D)``, covs ``(K, D, D)``."""
    counts = jnp.sum(weights, axis=0)
    safe = jnp.maximum(counts, jnp.finfo(x.dtype).tiny)
    means = (weights.T @ x) / safe[:, None]

    def cov(w, m, n):
        dev = x - m[None, :]
        return (dev * w[:, None]).T @ dev / n

    return counts, means, jax.vmap(cov, in_axes=(1, 0, 0))(weights, means, safe)


# ------------------------------------------------------------------------------------------------
# Gaussian
# ------------------------------------------------------------------------------------------------


def _sample_marginal(dist, key, process, t, num):
    """Exact draws of (x_t, x0): x0 from ``dist.sample``, then the forward marginal."""
    check_times(process, t)
    key_data, key_noise = jax.random.split(key)
    x0 = dist.sample(key_data, num)
    x_t, _ = process.sample_marginal(key_noise, x0, t)
    return x_t, x0


@pytree_dataclass
class Gaussian:
    r"""Gaussian data :math:`N(\mu, \Sigma)` with :math:`\Sigma = U \mathrm{diag}(\lambda) U^\top`.

    ``U`` has ``r <= D`` orthonormal columns; when ``r < D`` the covariance is low-rank (zero
    variance off :math:`\mathrm{span}(U)`) and :math:`p_0` has no density, but every
    :math:`p_t` with :math:`\sigma_t > 0` does:

    .. math::
        p_t = N\big(\alpha_t \mu,\; \alpha_t^2 \Sigma + \sigma_t^2 I\big).

    Fields (pytree data; a batch of Gaussians, as inside :class:`GaussianMixture`, has leading
    axes):
        mean: :math:`\mu`, shape ``(D,)``.
        eigvecs: :math:`U`, shape ``(D, r)``, orthonormal columns.
        eigvals: :math:`\lambda > 0`, shape ``(r,)``.

    Build with :meth:`from_cov`, :meth:`low_rank` or :meth:`isotropic` (they validate); the plain
    constructor trusts its arguments.

    Examples:
        >>> from jaxdiff.analytic import Gaussian
        >>> g = Gaussian.from_cov(jnp.zeros(2), jnp.array([[2.0, 0.5], [0.5, 1.0]]))
        >>> process = jaxdiff.VPProcess()
        >>> x = jnp.ones((4, 2))
        >>> g.score(process, x, 0.5).shape
        (4, 2)
    """

    mean: jax.Array
    eigvecs: jax.Array
    eigvals: jax.Array

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_cov(cls, mean, cov):
        r"""Gaussian with a full, positive-definite covariance (eigendecomposed with ``eigh``).

        Args:
            mean: shape ``(D,)``.
            cov: symmetric positive-definite, shape ``(D, D)``.

        Examples:
            >>> g = jaxdiff.analytic.Gaussian.from_cov(jnp.zeros(2), jnp.eye(2))
        """
        dtype = _float_dtype(mean, cov)
        mean, cov = jnp.asarray(mean, dtype), jnp.asarray(cov, dtype)
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,); got mean.shape = {mean.shape}.")
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(f"cov must have shape (D, D) = {(d, d)}; got cov.shape = {cov.shape}.")
        _check_symmetric_pd(cov, "cov")
        eigvals, eigvecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
        return cls(mean=mean, eigvecs=eigvecs, eigvals=eigvals)

    @classmethod
    def low_rank(cls, mean, basis, variances):
        r"""Gaussian on :math:`\mu + \mathrm{span}(U)` with covariance :math:`U\Lambda U^\top`.

        Args:
            mean: shape ``(D,)``.
            basis: :math:`U`, shape ``(D, r)`` with ``r <= D`` orthonormal columns (not
                orthonormalised here: a non-orthonormal basis is an error).
            variances: :math:`\lambda > 0`, the diagonal of :math:`\Lambda`, shape ``(r,)``.

        Examples:
            >>> basis, variances = jnp.eye(3)[:, :2], jnp.array([1.0, 0.5])
            >>> g = jaxdiff.analytic.Gaussian.low_rank(jnp.zeros(3), basis, variances)
        """
        dtype = _float_dtype(mean, basis, variances)
        mean = jnp.asarray(mean, dtype)
        basis, variances = jnp.asarray(basis, dtype), jnp.asarray(variances, dtype)
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,); got mean.shape = {mean.shape}.")
        d = mean.shape[0]
        if basis.ndim != 2 or basis.shape[0] != d or not 1 <= basis.shape[1] <= d:
            raise ValueError(
                f"basis must have shape (D, r) with D = {d} and 1 <= r <= D; "
                f"got basis.shape = {basis.shape}."
            )
        if variances.shape != basis.shape[1:]:
            raise ValueError(
                f"variances must have shape (r,) = {basis.shape[1:]}; "
                f"got variances.shape = {variances.shape}."
            )
        _check_orthonormal(basis, "basis")
        check_positive(variances, "variances")
        return cls(mean=mean, eigvecs=basis, eigvals=variances)

    @classmethod
    def isotropic(cls, mean, std):
        r"""Gaussian :math:`N(\mu, s^2 I)` (full rank, :math:`U = I`).

        Args:
            mean: shape ``(D,)``.
            std: :math:`s > 0`, a scalar.

        Examples:
            >>> g = jaxdiff.analytic.Gaussian.isotropic(jnp.zeros(3), 0.5)
        """
        dtype = _float_dtype(mean, std)
        mean, std = jnp.asarray(mean, dtype), jnp.asarray(std, dtype)
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,); got mean.shape = {mean.shape}.")
        if std.ndim != 0:
            raise ValueError(f"std must be a scalar; got std.shape = {std.shape}.")
        check_positive(std, "std")
        d = mean.shape[0]
        return cls(
            mean=mean, eigvecs=jnp.eye(d, dtype=dtype), eigvals=jnp.full((d,), jnp.square(std))
        )

    @classmethod
    def fit(cls, data, *, rank=None, shrinkage=0.0, min_variance=None, remainder="isotropic"):
        r"""The moment-matched Gaussian of a data set (Wang & Vastola's Gaussian approximation).

        .. math::
            \hat\mu = \frac1N \sum_i x_i, \qquad
            \hat\Sigma = \frac1N \sum_i (x_i - \hat\mu)(x_i - \hat\mu)^\top, \qquad
            \Sigma_s = (1 - s)\hat\Sigma + s\,\frac{\mathrm{tr}\hat\Sigma}{D} I,

        the maximum-likelihood (biased, :math:`1/N`) covariance, as in the paper, optionally
        shrunk towards its mean variance. With ``rank = r`` only the top ``r`` eigenpairs are
        kept: the other ``D - r`` eigenvalues are replaced by their mean (``"isotropic"``,
        probabilistic PCA's maximum-likelihood estimate; stored with the full basis) or set to
        zero (``"zero"``: a rank-``r`` Gaussian, no variance off the top-``r`` subspace). Last,
        eigenvalues are floored at ``min_variance`` (default :math:`10^{-6}` times the mean
        per-coordinate variance), so constant coordinates (border pixels) stay well defined.

        Args:
            data: samples, shape ``(N, D)`` or ``(N, ...)`` (e.g. images ``(N, H, W, C)``,
                flattened in C order like ``x.reshape(N, -1)``), ``N >= 2``.
            rank: None (full covariance) or ``r`` in ``[1, D]`` (static).
            shrinkage: :math:`s \in [0, 1]`.
            min_variance: eigenvalue floor ``> 0``, or None for the relative default.
            remainder: ``"isotropic"`` or ``"zero"`` -- what replaces the discarded eigenvalues.

        Returns:
            A :class:`Gaussian` with eigenvalues in decreasing order.

        Examples:
            >>> x = jax.random.normal(jax.random.key(0), (500, 3)) * jnp.array([2.0, 1.0, 0.5])
            >>> g = jaxdiff.analytic.Gaussian.fit(x)          # eigvals ~ [4, 1, 0.25]
            >>> g2 = jaxdiff.analytic.Gaussian.fit(x, rank=1, remainder="zero")  # rank 1
        """
        x = _flatten_data(data)
        _check_fit_options(x.shape[1], rank, shrinkage, min_variance, remainder)
        floor = _variance_floor(x, min_variance)
        mean, eigvecs, eigvals = _moment_fit(x, floor, rank=rank, shrinkage=float(shrinkage),
                                             remainder=remainder)
        return cls(mean=mean, eigvecs=eigvecs, eigvals=eigvals)

    # -- shapes ----------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Ambient dimension ``D``."""
        return self.eigvecs.shape[-2]

    @property
    def rank(self) -> int:
        """Rank ``r`` of the covariance."""
        return self.eigvecs.shape[-1]

    # -- the per-Gaussian maths, on precomputed (B, 1) coefficients (reused by the mixture) ----

    def _project(self, x, alpha, sigma):
        r"""Eigen-coordinates :math:`c = U^\top y`, variances :math:`v`, and :math:`y_\perp`.

        With :math:`y = x - \alpha\mu`: ``c`` and ``v`` have shape ``(B, r)``; ``y_perp`` is
        ``(B, D)``, or ``None`` for a full-rank covariance (decided statically from the shapes).
        """
        y = x - alpha * self.mean[None, :]
        c = y @ self.eigvecs
        v = jnp.square(alpha) * self.eigvals[None, :] + jnp.square(sigma)
        y_perp = y - c @ self.eigvecs.T if self.rank < self.dim else None
        return c, v, y_perp

    def _log_prob_at(self, x, alpha, sigma):
        c, v, y_perp = self._project(x, alpha, sigma)
        quad = jnp.sum(jnp.square(c) / v, axis=-1)
        logdet = jnp.sum(jnp.log(v), axis=-1)
        if y_perp is not None:
            sigma2 = jnp.square(sigma[:, 0])
            quad = quad + jnp.sum(jnp.square(y_perp), axis=-1) / sigma2
            logdet = logdet + (self.dim - self.rank) * jnp.log(sigma2)
        return -0.5 * (quad + logdet + self.dim * _LOG_2PI)

    def _score_at(self, x, alpha, sigma):
        c, v, y_perp = self._project(x, alpha, sigma)
        score = -(c / v) @ self.eigvecs.T
        if y_perp is not None:
            score = score - y_perp / jnp.square(sigma)
        return score

    def _denoise_at(self, x, alpha, sigma):
        c, v, _ = self._project(x, alpha, sigma)
        gain = alpha * self.eigvals[None, :] / v  # Wiener filter per eigen-direction
        return self.mean[None, :] + (gain * c) @ self.eigvecs.T

    def _prepare(self, process, x, t):
        x = _check_points(x, self.dim)
        check_times(process, t)
        dtype = _float_dtype(x, self.mean)
        x = x.astype(dtype)
        return (x, *_marginal_coeffs(process, x, t, dtype))

    # -- public methods --------------------------------------------------------------------------

    def log_prob(self, process, x, t):
        r"""Marginal log-density :math:`\log N(x; \alpha_t\mu, \alpha_t^2\Sigma + \sigma_t^2 I)`.

        .. math::
            -\tfrac12\Big[\sum_k \frac{c_k^2}{v_k} + \frac{\|y_\perp\|^2}{\sigma_t^2}
            + \sum_k \log v_k + (D - r)\log\sigma_t^2 + D\log 2\pi\Big].

        Args:
            process: the forward process.
            x: shape ``(B, D)``.
            t: shape ``()`` or ``(B,)``, in ``[t_min, t_max]``.

        Returns:
            shape ``(B,)``.
        """
        return self._log_prob_at(*self._prepare(process, x, t))

    def score(self, process, x, t):
        r"""Score :math:`\nabla_x \log p_t(x) = -U (c / v) - y_\perp / \sigma_t^2`.

        Arguments as in :meth:`log_prob`; returns shape ``(B, D)``.
        """
        return self._score_at(*self._prepare(process, x, t))

    def denoise(self, process, x, t):
        r"""Posterior mean :math:`E[x_0 \mid x_t = x] = \mu + U (\alpha_t \lambda / v \cdot c)`.

        Arguments as in :meth:`log_prob`; returns shape ``(B, D)``.
        """
        return self._denoise_at(*self._prepare(process, x, t))

    def denoiser(self, process):
        r"""The exact denoiser as a :class:`jax.tree_util.Partial` ``(x, t, cond=None) -> x0_hat``.

        ``x`` has shape ``(B, D)``, ``t`` shape ``(B,)`` (or ``()``); ``cond`` is ignored. The
        result is a pytree, so it can be passed through ``jax.jit``.

        Examples:
            >>> g = jaxdiff.analytic.Gaussian.isotropic(jnp.zeros(2), 0.5)
            >>> denoiser = g.denoiser(jaxdiff.EDMProcess())
            >>> x0_hat = denoiser(jnp.ones((4, 2)), jnp.full((4,), 1.0))
        """
        return jax.tree_util.Partial(_unconditional_denoise, self, process)

    def sample(self, key, num):
        r"""Exact samples :math:`x_0 = \mu + U \mathrm{diag}(\sqrt\lambda)\, z`, ``(num, D)``."""
        z = jax.random.normal(key, (num, self.rank), self.mean.dtype)
        return self.mean[None, :] + (z * jnp.sqrt(self.eigvals)[None, :]) @ self.eigvecs.T

    def sample_marginal(self, key, process, t, num):
        r"""Exact draws of :math:`(x_t, x_0)`: :math:`x_0 \sim p_0`, then the forward noising.

        Args:
            key: typed PRNG key.
            process: the forward process.
            t: shape ``()`` or ``(num,)``, in ``[t_min, t_max]``.
            num: number of samples.

        Returns:
            ``(x_t, x0)``, each of shape ``(num, D)``.
        """
        return _sample_marginal(self, key, process, t, num)

    def data_log_prob(self, x):
        r"""Log-density :math:`\log N(x; \mu, \Sigma)` of the data (full rank only), ``(B,)``."""
        if self.rank < self.dim:
            raise ValueError(
                f"data_log_prob needs a full-rank covariance; this Gaussian has rank "
                f"{self.rank} < D = {self.dim} (no density at t = 0)."
            )
        x = _check_points(x, self.dim)
        dtype = _float_dtype(x, self.mean)
        x = x.astype(dtype)
        ones = jnp.ones((x.shape[0], 1), dtype)
        return self._log_prob_at(x, ones, jnp.zeros_like(ones))

    def flow(self, process, x, t, s):
        r"""Closed-form probability-flow map :math:`x_s = \Phi(x_t; t \to s)` (Wang & Vastola).

        The whitened coordinates :math:`c_k / \sqrt{v_k}` are conserved along the PF-ODE, so

        .. math::
            x_s = \alpha_s \mu + U \mathrm{diag}\Big(\sqrt{\tfrac{v(s)}{v(t)}}\Big) U^\top y_t
            + \frac{\sigma_s}{\sigma_t} P_\perp y_t, \qquad y_t = x_t - \alpha_t\mu.

        Valid for any ``s`` in ``[0, t_max]``: ``s = 0`` gives the ODE endpoint :math:`x_0`, and
        ``s > t`` runs the flow forward in time.

        Args:
            process: the forward process.
            x: :math:`x_t`, shape ``(B, D)``.
            t: start time(s) in ``(0, t_max]``, shape ``()`` or ``(B,)``.
            s: end time(s) in ``[0, t_max]``, shape ``()`` or ``(B,)``.

        Returns:
            :math:`x_s`, shape ``(B, D)``.

        Examples:
            >>> cov = jnp.array([[1.0, 0.5], [0.5, 1.0]])
            >>> g = jaxdiff.analytic.Gaussian.from_cov(jnp.zeros(2), cov)
            >>> process = jaxdiff.EDMProcess()
            >>> x_T, _ = g.sample_marginal(jax.random.key(0), process, 80.0, 16)
            >>> x0 = g.flow(process, x_T, 80.0, 0.0)   # exact samples of N(mu, Sigma)
        """
        x = _check_points(x, self.dim)
        check_times(process, t, "t", lower=0.0)
        check_times(process, s, "s", lower=0.0)
        _check_times_positive(t, "t")
        dtype = _float_dtype(x, self.mean)
        x = x.astype(dtype)
        alpha_t, sigma_t = _marginal_coeffs(process, x, t, dtype, "t")
        alpha_s, sigma_s = _marginal_coeffs(process, x, s, dtype, "s")
        c, v_t, y_perp = self._project(x, alpha_t, sigma_t)
        v_s = jnp.square(alpha_s) * self.eigvals[None, :] + jnp.square(sigma_s)
        x_s = alpha_s * self.mean[None, :] + (jnp.sqrt(v_s / v_t) * c) @ self.eigvecs.T
        if y_perp is not None:
            x_s = x_s + (sigma_s / sigma_t) * y_perp
        return x_s

    def moments(self):
        r"""``(mean (D,), cov (D, D))`` with :math:`\Sigma = U \mathrm{diag}(\lambda) U^\top`."""
        return self.mean, (self.eigvecs * self.eigvals[None, :]) @ self.eigvecs.T

    def x0_covariance(self, process, t):
        r"""Posterior covariance :math:`C_t = \mathrm{Cov}[x_0 \mid x_t]` (the same for every
        :math:`x_t`).

        .. math::
            C_t = U \mathrm{diag}\Big(\frac{\lambda\sigma_t^2}{\alpha_t^2\lambda + \sigma_t^2}\Big)
            U^\top = \big(\Sigma^{-1} + \tfrac{\alpha_t^2}{\sigma_t^2} I\big)^{-1}
            \ \text{(full rank)} = \frac{\sigma_t^2}{\alpha_t}\,
            \frac{\partial E[x_0 \mid x_t]}{\partial x_t},

        zero off :math:`\mathrm{span}(U)` for a low-rank covariance.

        Args:
            process: the forward process.
            t: shape ``()`` or ``(B,)``, in ``[t_min, t_max]``.

        Returns:
            shape ``(D, D)``, or ``(B, D, D)`` for ``t`` of shape ``(B,)``.

        Examples:
            >>> g = jaxdiff.analytic.Gaussian.isotropic(jnp.zeros(2), 1.0)
            >>> g.x0_covariance(jaxdiff.EDMProcess(), 1.0)    # 0.5 * I
        """
        check_times(process, t)
        t = as_float_array(t)
        if t.ndim > 1:
            raise ValueError(f"t must have shape () or (B,); got t.shape = {t.shape}.")
        dtype = _float_dtype(t, self.mean)
        a2 = jnp.square(process.alpha(t).astype(dtype))[..., None]
        s2 = jnp.square(process.sigma(t).astype(dtype))[..., None]
        lam = self.eigvals.astype(dtype).reshape((1,) * t.ndim + (-1,))
        post = lam * s2 / (a2 * lam + s2)
        return jnp.einsum("dr,...r,er->...de", self.eigvecs, post, self.eigvecs)

    def condition(self, matrix, y, noise_std):
        r"""The posterior of :math:`x_0` given one linear measurement :math:`y = A x_0 + s\,e`.

        With :math:`S = A\Sigma A^\top + s^2 I`,

        .. math::
            x_0 \mid y \sim N\big(\mu + \Sigma A^\top S^{-1}(y - A\mu),\;
            \Sigma - \Sigma A^\top S^{-1} A \Sigma\big),

        computed in whitened coordinates :math:`x_0 = \mu + U\Lambda^{1/2} w`, :math:`w \sim
        N(0, I)`: with :math:`G = A U \Lambda^{1/2}` and :math:`P = s^2 I + G^\top G` (SPD,
        eigenvalues :math:`\ge s^2`, factored by Cholesky), :math:`w \mid y \sim N(P^{-1}G^\top
        (y - A\mu),\, s^2 P^{-1})`. No covariance is subtracted, so the result stays positive
        definite in floating point; a low-rank prior gives a posterior of the same rank on the
        same subspace.

        Args:
            matrix: :math:`A`, shape ``(M, D)``.
            y: the measurement, shape ``(M,)``.
            noise_std: :math:`s > 0`, a scalar.

        Returns:
            The posterior, a :class:`Gaussian` (its ``denoiser(process)`` is the exact
            posterior denoiser :math:`E[x_0 \mid x_t, y]`).

        Examples:
            >>> prior = jaxdiff.analytic.Gaussian.isotropic(jnp.zeros(3), 1.0)
            >>> post = prior.condition(jnp.eye(3)[:2], jnp.array([1.0, -1.0]), 0.1)
        """
        dtype = _float_dtype(self.mean, matrix, y, noise_std)
        a = jnp.asarray(matrix, dtype)
        y = jnp.asarray(y, dtype)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise ValueError(
                f"matrix must have shape (M, D) with D = {self.dim}; got matrix.shape = {a.shape}."
            )
        if y.shape != a.shape[:1]:
            raise ValueError(f"y must have shape (M,) = {a.shape[:1]}; got y.shape = {y.shape}.")
        if jnp.ndim(noise_std) != 0:
            raise ValueError(f"noise_std must be a scalar; got shape {jnp.shape(noise_std)}.")
        check_positive(noise_std, "noise_std")
        if is_concrete(a, y) and not (np.all(np.isfinite(a)) and np.all(np.isfinite(y))):
            raise ValueError("matrix and y must be finite.")
        u, lam = self.eigvecs.astype(dtype), self.eigvals.astype(dtype)
        root = jnp.sqrt(lam)
        g = (a @ u) * root[None, :]
        s2 = jnp.square(jnp.asarray(noise_std, dtype))
        eye = jnp.eye(self.rank, dtype=dtype)
        chol = jnp.linalg.cholesky(s2 * eye + g.T @ g)
        w_mean = jax.scipy.linalg.cho_solve((chol, True), g.T @ (y - a @ self.mean)[:, None])
        w_cov = s2 * jax.scipy.linalg.cho_solve((chol, True), eye)
        z_cov = root[:, None] * w_cov * root[None, :]
        eigvals, v = jnp.linalg.eigh(0.5 * (z_cov + z_cov.T))
        mean = self.mean.astype(dtype) + u @ (root * w_mean[:, 0])
        return Gaussian(mean=mean, eigvecs=u @ v, eigvals=eigvals)


def _unconditional_denoise(dist, process, x, t, cond=None):
    """Denoiser-contract adapter for distributions without conditioning."""
    del cond
    return dist.denoise(process, x, t)


# ------------------------------------------------------------------------------------------------
# Gaussian mixture
# ------------------------------------------------------------------------------------------------


@pytree_dataclass
class GaussianMixture:
    r"""Mixture :math:`p_0 = \sum_k \pi_k N(\mu_k, \Sigma_k)`, optionally with class labels.

    .. math::
        p_t(x) = \sum_k \pi_k N_k(x), \qquad
        w_k(x) = p(k \mid x_t = x) = \mathrm{softmax}_k\big(\log\pi_k + \log N_k(x)\big),

    .. math::
        \nabla\log p_t = \sum_k w_k \nabla \log N_k, \qquad
        E[x_0 \mid x_t] = \sum_k w_k E_k[x_0 \mid x_t],

    with :math:`N_k = N(\alpha_t\mu_k, \alpha_t^2\Sigma_k + \sigma_t^2 I)`; the per-component
    quantities are those of :class:`Gaussian`, vmapped over the components.

    With labels :math:`y_k \in \{0, \dots, C-1\}`, the class-conditional law
    :math:`p(x_0 \mid y)` is the mixture restricted to the components of label :math:`y`
    (weights renormalised). Pass ``y`` (shape ``(B,)``, int) to :meth:`log_prob`, :meth:`score`,
    :meth:`denoise`, or ``cond`` to the :meth:`denoiser`, for the exact conditional quantities.

    Fields:
        logits: log weights :math:`\log\pi_k` up to a constant, shape ``(K,)``.
        components: a :class:`Gaussian` with batched fields: mean ``(K, D)``, eigvecs
            ``(K, D, r)``, eigvals ``(K, r)``.
        labels: class of each component, int ``(K,)``, or ``None``.
        num_classes: number of classes ``C`` (static), or ``None`` without labels.

    Examples:
        >>> from jaxdiff.analytic import GaussianMixture
        >>> mix = GaussianMixture.create(
        ...     jnp.array([0.3, 0.7]),
        ...     jnp.array([[-1.0, 0.0], [1.0, 0.0]]),
        ...     stds=jnp.array([0.2, 0.5]),
        ...     labels=jnp.array([0, 1]),
        ... )
        >>> process = jaxdiff.VPProcess()
        >>> x_t, x0 = mix.sample_marginal(jax.random.key(0), process, 0.5, 8)
        >>> x0_hat = mix.denoise(process, x_t, 0.5, y=jnp.zeros(8, int))   # E[x0 | x_t, y = 0]
    """

    logits: jax.Array
    components: Gaussian
    labels: jax.Array | None = None
    num_classes: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def create(cls, weights, means, covs=None, *, stds=None, labels=None, num_classes=None):
        r"""Mixture from weights, means and full covariances or isotropic standard deviations.

        Args:
            weights: positive weights :math:`\pi_k` (normalised here), shape ``(K,)``.
            means: shape ``(K, D)``.
            covs: symmetric positive-definite covariances, shape ``(K, D, D)``; or
            stds: isotropic standard deviations, shape ``(K,)`` (give exactly one of the two).
            labels: optional class of each component, int ``(K,)``.
            num_classes: number of classes (default ``max(labels) + 1``).

        Examples:
            >>> mix = jaxdiff.analytic.GaussianMixture.create(
            ...     jnp.ones(2), jnp.eye(2), jnp.stack([jnp.eye(2)] * 2))
        """
        logits = _log_weights(weights, "weights")
        k = logits.shape[0]
        means = as_float_array(means)
        if means.ndim != 2 or means.shape[0] != k:
            raise ValueError(
                f"means must have shape (K, D) with K = len(weights) = {k}; "
                f"got means.shape = {means.shape}."
            )
        d = means.shape[1]
        if (covs is None) == (stds is None):
            raise ValueError("Give exactly one of covs (full covariances) and stds (isotropic).")
        if covs is not None:
            dtype = _float_dtype(means, covs)
            covs = jnp.asarray(covs, dtype)
            if covs.shape != (k, d, d):
                raise ValueError(
                    f"covs must have shape (K, D, D) = {(k, d, d)} to match weights and means; "
                    f"got covs.shape = {covs.shape}."
                )
            _check_symmetric_pd(covs, "covs")
            eigvals, eigvecs = jnp.linalg.eigh(0.5 * (covs + jnp.swapaxes(covs, -1, -2)))
        else:
            dtype = _float_dtype(means, stds)
            stds = jnp.asarray(stds, dtype)
            if stds.shape != (k,):
                raise ValueError(
                    f"stds must have shape (K,) = {(k,)} to match weights; "
                    f"got stds.shape = {stds.shape}."
                )
            check_positive(stds, "stds")
            eigvecs = jnp.broadcast_to(jnp.eye(d, dtype=dtype), (k, d, d))
            eigvals = jnp.broadcast_to(jnp.square(stds)[:, None], (k, d))
        components = Gaussian(mean=means.astype(dtype), eigvecs=eigvecs, eigvals=eigvals)
        return cls._with_labels(logits.astype(dtype), components, labels, num_classes)

    @classmethod
    def low_rank(cls, weights, means, bases, variances, labels=None, num_classes=None):
        r"""Mixture of low-rank components :math:`N(\mu_k, U_k \mathrm{diag}(\lambda_k) U_k^\top)`.

        Args:
            weights: positive weights, shape ``(K,)``.
            means: shape ``(K, D)``.
            bases: orthonormal columns per component, shape ``(K, D, r)``.
            variances: positive, shape ``(K, r)``.
            labels, num_classes: as in :meth:`create`.

        Examples:
            >>> bases = jnp.stack([jnp.eye(3)[:, :1], jnp.eye(3)[:, 1:2]])
            >>> mix = jaxdiff.analytic.GaussianMixture.low_rank(
            ...     jnp.ones(2), jnp.zeros((2, 3)), bases, jnp.ones((2, 1)))
        """
        logits = _log_weights(weights, "weights")
        k = logits.shape[0]
        dtype = _float_dtype(means, bases, variances)
        means = jnp.asarray(means, dtype)
        bases, variances = jnp.asarray(bases, dtype), jnp.asarray(variances, dtype)
        if means.ndim != 2 or means.shape[0] != k:
            raise ValueError(
                f"means must have shape (K, D) with K = len(weights) = {k}; "
                f"got means.shape = {means.shape}."
            )
        d = means.shape[1]
        if bases.ndim != 3 or bases.shape[:2] != (k, d) or not 1 <= bases.shape[2] <= d:
            raise ValueError(
                f"bases must have shape (K, D, r) with (K, D) = {(k, d)} and 1 <= r <= D; "
                f"got bases.shape = {bases.shape}."
            )
        if variances.shape != (k, bases.shape[2]):
            raise ValueError(
                f"variances must have shape (K, r) = {(k, bases.shape[2])}; "
                f"got variances.shape = {variances.shape}."
            )
        _check_orthonormal(bases, "bases")
        check_positive(variances, "variances")
        components = Gaussian(mean=means, eigvecs=bases, eigvals=variances)
        return cls._with_labels(logits.astype(dtype), components, labels, num_classes)

    @classmethod
    def fit(
        cls,
        key,
        data,
        num_components,
        *,
        max_iters=100,
        em_steps=0,
        rank=None,
        shrinkage=0.0,
        min_variance=None,
        remainder="isotropic",
    ):
        r"""Fit a ``K``-component mixture to data: k-means clusters, per-cluster Gaussians, EM.

        As in Wang & Vastola: k-means (k-means++ seeding from ``key``, then Lloyd iterations
        until no assignment changes, at most ``max_iters``) partitions the data; component
        ``k`` gets its cluster's frequency as weight, its mean and its maximum-likelihood
        covariance, regularised exactly as in :meth:`Gaussian.fit` (``shrinkage``, ``rank``,
        ``remainder``, ``min_variance``; the default floor is relative to the variance of the
        whole data set). ``em_steps > 0`` then refines all parameters by that many EM
        iterations (soft responsibilities :math:`r_{ik} \propto \pi_k N(x_i; \mu_k,
        \Sigma_k)`; each M-step regularises again). Deterministic for a given ``key``.

        Args:
            key: typed PRNG key (k-means++ seeding).
            data: samples ``(N, D)`` or ``(N, ...)`` (flattened like :meth:`Gaussian.fit`).
            num_components: ``K`` in ``[1, N]`` (static).
            max_iters: maximum number of Lloyd updates (static int >= 1).
            em_steps: EM iterations after k-means (static int >= 0; needs full-rank
                components, i.e. not ``remainder="zero"`` with ``rank < D``).
            rank, shrinkage, min_variance, remainder: as in :meth:`Gaussian.fit`.

        Returns:
            A :class:`GaussianMixture` without labels.

        Examples:
            >>> x = jnp.concatenate([jax.random.normal(jax.random.key(0), (200, 2)) - 3,
            ...                      jax.random.normal(jax.random.key(1), (200, 2)) + 3])
            >>> mix = jaxdiff.analytic.GaussianMixture.fit(jax.random.key(2), x, 2)
        """
        x = _flatten_data(data)
        n, d = x.shape
        if (isinstance(num_components, bool) or not isinstance(num_components, (int, np.integer))
                or not 1 <= num_components <= n):
            raise ValueError(
                f"num_components must be an int in [1, N = {n}]; got {num_components!r}."
            )
        for name, value, low in (("max_iters", max_iters, 1), ("em_steps", em_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
        _check_fit_options(d, rank, shrinkage, min_variance, remainder)
        if em_steps and rank is not None and rank < d and remainder == "zero":
            raise ValueError(
                "em_steps > 0 needs full-rank components (data densities); use "
                "remainder='isotropic' or rank=None."
            )
        floor = _variance_floor(x, min_variance)
        logits, components, labels = cls._fit_arrays(
            key, x, floor, k=int(num_components), max_iters=int(max_iters),
            em_steps=int(em_steps), rank=rank, shrinkage=float(shrinkage), remainder=remainder,
        )
        if is_concrete(labels):
            empty = int(np.sum(np.bincount(np.asarray(labels), minlength=num_components) == 0))
            if empty:
                raise ValueError(
                    f"k-means left {empty} of {num_components} clusters empty; does the data "
                    f"have at least num_components = {num_components} distinct points?"
                )
        return cls(logits=logits, components=components)

    @staticmethod
    @jax.jit(static_argnames=("k", "max_iters", "em_steps", "rank", "shrinkage", "remainder"))
    def _fit_arrays(key, x, floor, *, k, max_iters, em_steps, rank, shrinkage, remainder):
        """k-means, per-cluster Gaussians and EM as one program: ``(logits, components, labels)``.

        A component that loses every point keeps a tiny, finite weight.
        """
        n = x.shape[0]

        def fit(weights):
            counts, means, covs = _weighted_moments(x, weights)
            eigvecs, eigvals = jax.vmap(
                lambda c: _regularized_eigh(c, floor, rank, shrinkage, remainder)
            )(covs)
            counts = jnp.maximum(counts, jnp.finfo(x.dtype).tiny)
            return Gaussian(mean=means, eigvecs=eigvecs, eigvals=eigvals), counts

        labels = _kmeans(key, x, k, max_iters)
        components, counts = fit(jax.nn.one_hot(labels, k, dtype=x.dtype))

        def em_step(_, carry):
            components, counts = carry
            ones = jnp.ones((n, 1), x.dtype)
            log_dens = jax.vmap(lambda g: g._log_prob_at(x, ones, jnp.zeros_like(ones)))(
                components
            )  # (K, N)
            log_joint = jnp.log(counts / n)[:, None] + log_dens
            return fit(jax.nn.softmax(log_joint, axis=0).T)

        if em_steps:
            components, counts = jax.lax.fori_loop(0, em_steps, em_step, (components, counts))
        return jnp.log(counts / n), components, labels

    @classmethod
    def _with_labels(cls, logits, components, labels, num_classes):
        if labels is None:
            if num_classes is not None:
                raise ValueError("num_classes needs labels.")
            return cls(logits=logits, components=components)
        labels = jnp.asarray(labels)
        k = logits.shape[0]
        if labels.shape != (k,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"labels must be an int array of shape (K,) = {(k,)}; "
                f"got shape {labels.shape} and dtype {labels.dtype}."
            )
        if num_classes is None:
            if not is_concrete(labels):
                raise ValueError("num_classes must be given when labels are traced.")
            num_classes = int(np.max(np.asarray(labels))) + 1
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
        if is_concrete(labels):
            lab = np.asarray(labels)
            if lab.min() < 0 or lab.max() >= num_classes:
                raise ValueError(f"labels must lie in [0, num_classes = {num_classes}); got {lab}.")
        return cls(
            logits=logits, components=components, labels=labels, num_classes=int(num_classes)
        )

    # -- shapes ----------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Ambient dimension ``D``."""
        return self.components.dim

    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return self.logits.shape[0]

    # -- internals -------------------------------------------------------------------------------

    def _prepare(self, process, x, t):
        x = _check_points(x, self.dim)
        check_times(process, t)
        dtype = _float_dtype(x, self.logits, self.components.mean)
        x = x.astype(dtype)
        return (x, *_marginal_coeffs(process, x, t, dtype))

    def _log_weights(self, y, batch):
        r"""Per-example log weights ``(B, K)``: :math:`\log\pi_k`, or restricted to label ``y``.

        Restricting to a class sets the other components' logits to :math:`-\infty` before the
        normalisation, so :math:`p(x_0 \mid y)` is the renormalised sub-mixture.
        """
        log_w = jax.nn.log_softmax(self.logits)
        if y is None:
            return jnp.broadcast_to(log_w[None, :], (batch, self.num_components))
        if self.labels is None:
            raise ValueError("y (class labels) needs a mixture built with labels.")
        y = jnp.asarray(y)
        if not jnp.issubdtype(y.dtype, jnp.integer) or y.ndim > 1:
            raise ValueError(
                f"y must be an int array of shape () or (B,); got {y.shape}, {y.dtype}."
            )
        if is_concrete(y, self.labels) and not np.all(
            np.isin(np.asarray(y), np.asarray(self.labels))
        ):
            raise ValueError(f"y contains labels without components; labels are {self.labels}.")
        y = jnp.broadcast_to(y.astype(self.labels.dtype), (batch,))
        same = self.labels[None, :] == y[:, None]
        return jax.nn.log_softmax(jnp.where(same, self.logits[None, :], -jnp.inf), axis=-1)

    def _component_log_probs(self, x, alpha, sigma):
        """log N_k(x) for every component, shape (B, K)."""
        per_component = jax.vmap(lambda g: g._log_prob_at(x, alpha, sigma))(self.components)
        return per_component.T

    def _log_joint(self, process, x, t, y):
        """log pi_k + log N_k(x), shape (B, K), plus the prepared (x, alpha, sigma)."""
        x, alpha, sigma = self._prepare(process, x, t)
        log_joint = self._log_weights(y, x.shape[0]) + self._component_log_probs(x, alpha, sigma)
        return log_joint, (x, alpha, sigma)

    def _responsibilities(self, process, x, t, y):
        log_joint, prepared = self._log_joint(process, x, t, y)
        return jax.nn.softmax(log_joint, axis=-1), prepared

    # -- public methods --------------------------------------------------------------------------

    def log_prob(self, process, x, t, y=None):
        r"""Log-density :math:`\log \sum_k \pi_k N_k(x)` of the diffused marginal, shape ``(B,)``.

        Args:
            process: the forward process.
            x: shape ``(B, D)``.
            t: shape ``()`` or ``(B,)``, in ``[t_min, t_max]``.
            y: optional class labels, int ``()`` or ``(B,)``: then :math:`\log p_t(x \mid y)`.
        """
        log_joint, _ = self._log_joint(process, x, t, y)
        return jax.nn.logsumexp(log_joint, axis=-1)

    def component_log_posterior(self, process, x, t, y=None):
        r"""Log responsibilities :math:`\log p(k \mid x_t = x)`, shape ``(B, K)``."""
        log_joint, _ = self._log_joint(process, x, t, y)
        return jax.nn.log_softmax(log_joint, axis=-1)

    def class_log_posterior(self, process, x, t):
        r"""Class posterior :math:`\log p(y \mid x_t = x) = \log\sum_{k: y_k = y} p(k \mid x)`.

        Needs labels; returns shape ``(B, C)``. A class without components has log-probability
        :math:`-\infty`.
        """
        if self.labels is None:
            raise ValueError("class_log_posterior needs a mixture built with labels.")
        log_post = self.component_log_posterior(process, x, t)
        in_class = self.labels[None, :] == jnp.arange(self.num_classes)[:, None]  # (C, K)
        masked = jnp.where(in_class[None, :, :], log_post[:, None, :], -jnp.inf)
        return jax.nn.logsumexp(masked, axis=-1)

    def score(self, process, x, t, y=None):
        r"""Score :math:`\sum_k w_k(x) \nabla\log N_k(x)`, ``(B, D)`` (given ``y``: conditional)."""
        w, (x, alpha, sigma) = self._responsibilities(process, x, t, y)
        scores = jax.vmap(lambda g: g._score_at(x, alpha, sigma))(self.components)  # (K, B, D)
        return jnp.einsum("bk,kbd->bd", w, scores)

    def denoise(self, process, x, t, y=None):
        r"""Posterior mean :math:`\sum_k w_k(x) E_k[x_0 \mid x_t = x]`, shape ``(B, D)``.

        With labels ``y`` (int ``()`` or ``(B,)``) it is :math:`E[x_0 \mid x_t = x, y]`.
        """
        w, (x, alpha, sigma) = self._responsibilities(process, x, t, y)
        means = jax.vmap(lambda g: g._denoise_at(x, alpha, sigma))(self.components)  # (K, B, D)
        return jnp.einsum("bk,kbd->bd", w, means)

    def denoiser(self, process):
        r"""The exact denoiser ``(x, t, cond=None) -> x0_hat``, a :class:`jax.tree_util.Partial`.

        ``cond=None`` gives :math:`E[x_0 \mid x_t]`; an int array of labels ``(B,)`` gives the
        class-conditional :math:`E[x_0 \mid x_t, y = \text{cond}]`.

        Examples:
            >>> mix = jaxdiff.analytic.molrg(jax.random.key(0), 6, 2, 2)
            >>> denoiser = mix.denoiser(jaxdiff.VPProcess())
            >>> x, t, y = jnp.ones((8, 6)), jnp.full((8,), 0.5), jnp.ones(8, int)
            >>> x0_hat = denoiser(x, t, y)  # E[x0 | x_t = x, class 1]
        """
        return jax.tree_util.Partial(_conditional_denoise, self, process)

    def sample_with_labels(self, key, num):
        r"""Exact samples and their classes: ``(x0 (num, D), y (num,))``.

        ``y`` is the label of the drawn component, or the component index without labels.
        """
        key_comp, key_noise = jax.random.split(key)
        k = jax.random.categorical(key_comp, self.logits, shape=(num,))
        g = self.components
        z = jax.random.normal(key_noise, (num, g.rank), g.mean.dtype)
        scaled = z * jnp.sqrt(g.eigvals[k])
        x0 = g.mean[k] + jnp.einsum("ndr,nr->nd", g.eigvecs[k], scaled)
        return x0, (k if self.labels is None else self.labels[k])

    def sample(self, key, num):
        """Exact samples, shape ``(num, D)``."""
        return self.sample_with_labels(key, num)[0]

    def sample_marginal(self, key, process, t, num):
        r"""Exact draws of :math:`(x_t, x_0)`, each ``(num, D)``; ``t`` is ``()`` or ``(num,)``."""
        return _sample_marginal(self, key, process, t, num)

    def data_log_prob(self, x):
        r"""Data log-density :math:`\log\sum_k \pi_k N(x; \mu_k, \Sigma_k)` (full-rank only)."""
        g = self.components
        if g.rank < g.dim:
            raise ValueError(
                f"data_log_prob needs full-rank components; they have rank {g.rank} < D = {g.dim}."
            )
        x = _check_points(x, self.dim)
        per_component = jax.vmap(lambda comp: comp.data_log_prob(x))(g).T  # (B, K)
        return jax.nn.logsumexp(jax.nn.log_softmax(self.logits)[None, :] + per_component, axis=-1)

    def moments(self):
        r"""Mean and covariance of the mixture, ``(D,)`` and ``(D, D)``.

        .. math::
            m = \sum_k \pi_k\mu_k, \qquad
            \mathrm{cov} = \sum_k \pi_k\big(\Sigma_k + (\mu_k - m)(\mu_k - m)^\top\big).
        """
        w = jax.nn.softmax(self.logits)
        means, covs = jax.vmap(Gaussian.moments)(self.components)
        mean = w @ means
        dev = means - mean[None, :]
        cov = jnp.einsum("k,kij->ij", w, covs) + (dev * w[:, None]).T @ dev
        return mean, cov


def _conditional_denoise(dist, process, x, t, cond=None):
    """Denoiser-contract adapter: ``cond`` is the (optional) class label."""
    return dist.denoise(process, x, t, y=cond)


# ------------------------------------------------------------------------------------------------
# Empirical (training-set) distribution
# ------------------------------------------------------------------------------------------------


@pytree_dataclass
class Empirical:
    r"""A training set as a mixture of point masses :math:`p_0 = \sum_i \pi_i \delta_{x_i}`.

    .. math::
        p_t = \sum_i \pi_i N(\alpha_t x_i, \sigma_t^2 I), \qquad
        E[x_0 \mid x_t = x] = \sum_i w_i(x) x_i, \qquad
        \nabla\log p_t(x) = \frac{\alpha_t E[x_0 \mid x_t = x] - x}{\sigma_t^2},

    with :math:`w = \mathrm{softmax}_i(\log\pi_i - \|x - \alpha_t x_i\|^2 / 2\sigma_t^2)`.
    The exact score of the training set: a model that learns it perfectly memorises (the
    denoiser tends to the nearest training point as :math:`\sigma_t \to 0`).

    Fields:
        points: the training points :math:`x_i`, shape ``(N, D)``.
        logits: log weights up to a constant, shape ``(N,)`` (uniform by default).

    Examples:
        >>> data = jaxdiff.analytic.Empirical.create(jax.random.normal(jax.random.key(0), (100, 2)))
        >>> score = data.score(jaxdiff.EDMProcess(), jnp.zeros((3, 2)), 1.0)
    """

    points: jax.Array
    logits: jax.Array

    @classmethod
    def create(cls, points, weights=None):
        """Empirical distribution of ``points`` ``(N, D)`` with positive ``weights`` ``(N,)``."""
        points = as_float_array(points)
        if points.ndim != 2 or points.shape[0] < 1:
            raise ValueError(f"points must have shape (N, D) with N >= 1; got {points.shape}.")
        if weights is None:
            logits = jnp.zeros(points.shape[:1], points.dtype)
        else:
            logits = _log_weights(weights, "weights")
            if logits.shape != points.shape[:1]:
                raise ValueError(
                    f"weights must have shape (N,) = {points.shape[:1]} to match points; "
                    f"got weights.shape = {logits.shape}."
                )
        return cls(points=points, logits=logits.astype(points.dtype))

    @property
    def dim(self) -> int:
        """Ambient dimension ``D``."""
        return self.points.shape[1]

    def _logits(self, process, x, t):
        r"""Responsibility logits without the :math:`-\|x\|^2/2\sigma^2` term, shape ``(B, N)``.

        :math:`\log\pi_i - \|x - \alpha x_i\|^2/2\sigma^2 = \log\pi_i + (\alpha x\cdot x_i
        - \tfrac12\alpha^2\|x_i\|^2)/\sigma^2 - \|x\|^2/2\sigma^2`; the last term is the same for
        every ``i`` and cancels in the softmax, so dropping it is exact (and avoids forming
        ``B x N x D`` differences).
        """
        x = _check_points(x, self.dim)
        check_times(process, t)
        dtype = _float_dtype(x, self.points)
        x = x.astype(dtype)
        alpha, sigma = _marginal_coeffs(process, x, t, dtype)
        cross = x @ self.points.T  # x . x_i, (B, N)
        sq_norms = jnp.sum(jnp.square(self.points), axis=-1)[None, :]  # |x_i|^2, (1, N)
        logits = (alpha * cross - 0.5 * jnp.square(alpha) * sq_norms) / jnp.square(sigma)
        return jax.nn.log_softmax(self.logits)[None, :] + logits, (x, alpha, sigma)

    def log_prob(self, process, x, t):
        r"""Log-density :math:`\log\sum_i \pi_i N(x; \alpha_t x_i, \sigma_t^2 I)`, ``(B,)``."""
        logits, (x, _, sigma) = self._logits(process, x, t)
        sigma2 = jnp.square(sigma[:, 0])
        return (
            jax.nn.logsumexp(logits, axis=-1)
            - 0.5 * jnp.sum(jnp.square(x), axis=-1) / sigma2
            - 0.5 * self.dim * (_LOG_2PI + jnp.log(sigma2))
        )

    def denoise(self, process, x, t):
        r"""Posterior mean :math:`\sum_i w_i(x) x_i`, shape ``(B, D)``."""
        logits, _ = self._logits(process, x, t)
        return jax.nn.softmax(logits, axis=-1) @ self.points

    def score(self, process, x, t):
        r"""Score :math:`(\alpha_t E[x_0 \mid x_t = x] - x)/\sigma_t^2`, shape ``(B, D)``."""
        logits, (x, alpha, sigma) = self._logits(process, x, t)
        x0_hat = jax.nn.softmax(logits, axis=-1) @ self.points
        return (alpha * x0_hat - x) / jnp.square(sigma)

    def denoiser(self, process):
        """The exact denoiser ``(x, t, cond=None) -> x0_hat`` (``cond`` ignored) as a pytree."""
        return jax.tree_util.Partial(_unconditional_denoise, self, process)

    def sample(self, key, num):
        """``num`` training points drawn with their weights, shape ``(num, D)``."""
        return self.points[jax.random.categorical(key, self.logits, shape=(num,))]

    def sample_marginal(self, key, process, t, num):
        r"""Exact draws of :math:`(x_t, x_0)`, each ``(num, D)``; ``t`` is ``()`` or ``(num,)``."""
        return _sample_marginal(self, key, process, t, num)

    def moments(self):
        """``(mean, cov)`` of the weighted point set (for the moment-matched Gaussian)."""
        w = jax.nn.softmax(self.logits)
        mean = w @ self.points
        dev = self.points - mean[None, :]
        return mean, (dev * w[:, None]).T @ dev


# ------------------------------------------------------------------------------------------------
# Mixture of low-rank Gaussians (Paper C)
# ------------------------------------------------------------------------------------------------


def molrg(key, dim, num_components, subspace_dim, *, weights=None):
    r"""Mixture of low-rank Gaussians on mutually orthogonal subspaces (Wang et al. 2024).

    .. math::
        x_0 = U_k a, \quad a \sim N(0, I_d), \quad k \sim \pi,

    where the bases :math:`U_k \in \mathbb{R}^{D \times d}` are disjoint column blocks of one random
    orthogonal matrix (QR of a Gaussian matrix). Component ``k`` has class label ``k``, so the
    class-conditional methods of :class:`GaussianMixture` select a subspace.

    Args:
        key: typed PRNG key for the random orthogonal matrix.
        dim: ambient dimension ``D``.
        num_components: ``K``.
        subspace_dim: ``d``; needs ``K * d <= D``.
        weights: optional positive weights ``(K,)`` (uniform by default).

    Returns:
        A :class:`GaussianMixture` with zero means, bases ``(K, D, d)`` and unit variances.

    Examples:
        >>> key = jax.random.key(0)
        >>> mix = jaxdiff.analytic.molrg(key, dim=48, num_components=2, subspace_dim=7)
        >>> x0 = mix.sample(jax.random.key(1), 100)
    """
    for name, value in [
        ("dim", dim),
        ("num_components", num_components),
        ("subspace_dim", subspace_dim),
    ]:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    if num_components * subspace_dim > dim:
        raise ValueError(
            f"num_components * subspace_dim must be <= dim for orthogonal subspaces; got "
            f"{num_components} * {subspace_dim} > {dim}."
        )
    q, _ = jnp.linalg.qr(jax.random.normal(key, (dim, dim)))
    bases = q[:, : num_components * subspace_dim].reshape(dim, num_components, subspace_dim)
    bases = jnp.transpose(bases, (1, 0, 2))  # (K, D, d): block k = columns k*d ... (k+1)*d - 1
    if weights is None:
        weights = jnp.ones((num_components,), q.dtype)
    return GaussianMixture.low_rank(
        weights,
        jnp.zeros((num_components, dim), q.dtype),
        bases,
        jnp.ones((num_components, subspace_dim), q.dtype),
        labels=jnp.arange(num_components),
        num_classes=num_components,
    )
