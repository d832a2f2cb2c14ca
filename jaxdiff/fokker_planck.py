r"""Fokker--Planck residuals of a learned log-density or score, and the FP-regularised loss.

The marginals :math:`p_t` of the forward SDE :math:`dx = f(t)\,x\,dt + g(t)\,dW` in
:math:`\mathbb R^D` solve the Fokker--Planck equation
:math:`\partial_t p = -\nabla\cdot(f x\,p) + \tfrac{g^2}{2}\Delta p`. For the log-density
:math:`\psi = \log p_t` (divide by :math:`p` and use :math:`\Delta p / p = \Delta\psi +
|\nabla\psi|^2`) it reads

.. math::
    \partial_t\psi = -D f - f\,x\cdot\nabla\psi
    + \tfrac{g^2}{2}\big(\Delta\psi + |\nabla\psi|^2\big),

so a learned potential :math:`\phi(x, t) \approx \log p_t(x)` (score :math:`\nabla_x\phi`) has the
**log-density residual** (Deveney et al.)

.. math::
    R_\phi = \underbrace{\partial_t\phi}_{\text{time}}
    + \underbrace{D f + f\,x\cdot\nabla\phi}_{\text{drift}}
    - \underbrace{\tfrac{g^2}{2}\big(\Delta\phi + |\nabla\phi|^2\big)}_{\text{diffusion}} .

Taking :math:`\nabla_x` of the log-density equation gives the equation of the score
:math:`s = \nabla\psi` (FP-Diffusion, Lai et al. 2023); :math:`D f` does not depend on
:math:`x` and drops out:

.. math::
    \partial_t s = \nabla_x\Big[\tfrac{g^2}{2}\big(\nabla\cdot s + |s|^2\big) - f\,x\cdot s\Big],
    \qquad
    R_s = \partial_t s + \nabla_x\big(f\,x\cdot s\big)
    - \nabla_x\Big[\tfrac{g^2}{2}\big(\nabla\cdot s + |s|^2\big)\Big] \in \mathbb R^D .

For a conservative field (:math:`s = \nabla\phi`) :math:`R_s = \nabla_x R_\phi`; for a general
vector field it is the residual of the gradient form above, as in FP-Diffusion (where
:math:`\nabla_x(x\cdot s) = s + J_s^\top x`). :math:`R_s = 0` only fixes :math:`\log p_t` up to a
time-dependent constant, so it cannot see mixture proportions; :math:`R_\phi = 0` can.

**Derivatives.** Time derivatives are exact forward-mode derivatives (``jax.jvp`` in ``t``, not
finite differences). Gradients use ``jax.grad`` of the batch sum, so ``phi``/``score`` must treat
examples independently (no batch statistics), which every network in :mod:`jaxdiff.nets` does.
The trace terms (Laplacian :math:`\Delta\phi = \mathrm{tr}\,\nabla^2\phi`, divergence
:math:`\nabla\cdot s = \mathrm{tr}\,J_s`) are either

* ``"exact"``: :math:`D` Jacobian-vector products with the basis vectors (cost :math:`\propto D`;
  for low dimension), or
* ``"hutchinson"``: :math:`\mathrm{tr}\,A \approx \frac1K\sum_k v_k^\top A v_k` with :math:`K`
  independent probes :math:`v_k` (``"rademacher"``: entries :math:`\pm1`; ``"gaussian"``:
  :math:`N(0, I)`), both unbiased because :math:`E[v v^\top] = I`. The residual is affine in the
  trace, so the residual estimate is the mean of :math:`K` per-probe residuals and its standard
  error is their standard deviation over :math:`\sqrt K` (needs :math:`K \ge 2`; with
  :math:`K = 1` the SE is reported as ``inf``). For :math:`R_s` the probes also estimate
  :math:`\nabla_x(\nabla\cdot s)`, through the gradient of each probe's estimate.

**Loss.** :func:`fp_regularized_loss` adds :math:`w_R\,\mathrm{mean}\,R_\phi^2` over collocation
points to the denoising loss of the score :math:`\nabla\phi`; Deveney et al. show that this
closes the gap between the probability-flow ODE and the reverse SDE.

**ODE--SDE gap.** :func:`lambda_family` samples one model with the probability-flow ODE, the
reverse SDE and the family between them from shared prior draws and Brownian increments;
:func:`histogram_w2` is the paper's distance (exact optimal transport between 2-D histograms);
:func:`jaxdiff.metrics.bootstrap` gives confidence intervals.

References:
    T. Deveney, J. Stanczuk, L. M. Kreusser, C. Budd, C.-B. Schönlieb, "Closing the ODE-SDE gap
    in score-based diffusion models through the Fokker-Planck equation", Phil. Trans. R. Soc. A
    383 (2025).
    C.-H. Lai, Y. Takida, N. Murata, T. Uesaka, Y. Mitsufuji, S. Ermon, "FP-Diffusion: Improving
    Score-based Diffusion Models by Enforcing the Underlying Score Fokker-Planck Equation",
    ICML 2023.
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", 1990.
"""

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._trace import basis, quadratic_forms
from ._utils import as_float_array, check_positive, check_times, is_concrete

__all__ = [
    "ESTIMATORS",
    "PROBES",
    "COLLOCATIONS",
    "FPResidual",
    "divergence",
    "laplacian",
    "log_density_residual",
    "score_residual",
    "score_weighting",
    "fp_regularized_loss",
    "lambda_family",
    "histogram",
    "histogram_w2",
]

#: Trace estimators of :func:`divergence` and the residuals.
ESTIMATORS = ("exact", "hutchinson")
#: Probe distributions of the Hutchinson estimator.
PROBES = ("rademacher", "gaussian")
#: Collocation distributions of :func:`fp_regularized_loss`.
COLLOCATIONS = ("box", "marginal")


class FPResidual(NamedTuple):
    r"""A Fokker--Planck residual and its terms: ``residual = time + drift - diffusion``.

    For :func:`log_density_residual` every field has shape ``(B,)``; for :func:`score_residual`
    shape ``(B, D)``. ``se`` is the Monte-Carlo standard error of the Hutchinson estimate of
    ``residual`` (and of ``diffusion``), zero for the exact estimator. ``time`` and ``drift`` are
    exact in both cases; with Hutchinson ``diffusion`` is the probe mean.
    """

    residual: jax.Array
    se: jax.Array
    time: jax.Array
    drift: jax.Array
    diffusion: jax.Array


# ------------------------------------------------------------------------------------------------
# Validation (host side, outside jit)
# ------------------------------------------------------------------------------------------------


def _check_choice(value, choices, name):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


def _check_num_probes(num_probes):
    if isinstance(num_probes, bool) or not isinstance(num_probes, numbers.Integral):
        raise TypeError(f"num_probes must be an int; got {type(num_probes).__name__}.")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1; got {num_probes}.")
    return int(num_probes)


def _check_key(key, name="key"):
    if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(
            f"{name} must be a typed PRNG key from jax.random.key(seed); got "
            f"{type(key).__name__} with dtype {getattr(key, 'dtype', None)}."
        )
    if key.shape != ():
        raise ValueError(f"{name} must be a single key (shape ()); got shape {key.shape}.")


def _check_estimator(estimator, key, num_probes, probe):
    _check_choice(estimator, ESTIMATORS, "estimator")
    _check_choice(probe, PROBES, "probe")
    num_probes = _check_num_probes(num_probes)
    if estimator == "hutchinson":
        if key is None:
            raise ValueError("estimator='hutchinson' needs a key for its probes; got key=None.")
        _check_key(key)
    return num_probes


def _check_points(x, name="x"):
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (B, D); got {name}.shape = {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array; got dtype {x.dtype}.")
    return x


def _batch_times(t, x, name="t"):
    """``t`` as a ``(B,)`` array in ``x``'s float dtype (a scalar is broadcast)."""
    t = as_float_array(t)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (x.shape[0],))
    elif t.shape != (x.shape[0],):
        raise ValueError(
            f"{name} must have shape () or (B,) with B = x.shape[0] = {x.shape[0]}; got "
            f"{name}.shape = {t.shape}."
        )
    return t.astype(jnp.promote_types(t.dtype, x.dtype))


def _check_output(out, shape, what):
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{what} must return shape {tuple(shape)}; got {tuple(out.shape)}.")


# ------------------------------------------------------------------------------------------------
# Traces: exact and Hutchinson
# ------------------------------------------------------------------------------------------------


def _probes(key, num_probes, probe, x):
    shape = (num_probes, *x.shape)
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, dtype=x.dtype)
    return jax.random.normal(key, shape, dtype=x.dtype)


def _mean_se(samples):
    """Mean over the leading (probe) axis and its standard error (``inf`` for one probe)."""
    k = samples.shape[0]
    mean = jnp.mean(samples, axis=0)
    if k == 1:
        return mean, jnp.full_like(mean, jnp.inf)
    se = jnp.std(samples, axis=0, ddof=1) / math.sqrt(k)
    return mean, se


def _trace_samples(fn, x, estimator, key, num_probes, probe):
    r"""``fn(x)`` and per-direction trace samples ``(K, B)``; exact: the diagonal entries summed."""
    if estimator == "exact":
        value, diag = quadratic_forms(fn, x, basis(x))
        return value, jnp.sum(diag, axis=0, keepdims=True)
    return quadratic_forms(fn, x, _probes(key, num_probes, probe, x))


def divergence(fn, x, *, estimator="exact", key=None, num_probes=8, probe="rademacher"):
    r"""Divergence :math:`\nabla\cdot F(x) = \mathrm{tr}\,J_F(x)` of a batched vector field.

    ``"exact"``: :math:`\sum_i e_i^\top J_F e_i` from :math:`D` Jacobian-vector products;
    ``"hutchinson"``: :math:`\frac1K\sum_k v_k^\top J_F v_k` with :math:`K` = ``num_probes``
    probes (independent per example), unbiased, with standard error
    :math:`\mathrm{sd}_k / \sqrt K`.

    Args:
        fn: ``fn(x (B, D)) -> (B, D)``, examples independent (row ``b`` depends on ``x[b]`` only).
        x: points, shape ``(B, D)``.
        estimator: one of :data:`ESTIMATORS`.
        key: typed key for the probes (``"hutchinson"`` only).
        num_probes: :math:`K \ge 1` (``"hutchinson"``; the SE is ``inf`` for :math:`K = 1`).
        probe: one of :data:`PROBES`.

    Returns:
        ``(div, se)``, both ``(B,)`` (``se`` is 0 for ``"exact"``).

    Examples:
        >>> div, se = divergence(lambda y: -y, jnp.ones((4, 3)))            # div = -3, se = 0
        >>> div, se = divergence(lambda y: -y, jnp.ones((4, 3)), estimator="hutchinson",
        ...                      key=jax.random.key(0), num_probes=16)
    """
    num_probes = _check_estimator(estimator, key, num_probes, probe)
    x = _check_points(x)
    value, samples = _trace_samples(fn, x, estimator, key, num_probes, probe)
    _check_output(value, x.shape, "fn(x)")
    if estimator == "exact":
        return samples[0], jnp.zeros_like(samples[0])
    return _mean_se(samples)


def _batch_grad(phi):
    """``x -> grad_x sum_b phi(x)_b``, the per-example gradients of a batched scalar."""
    return jax.grad(lambda y: jnp.sum(phi(y)))


def laplacian(phi, x, *, estimator="exact", key=None, num_probes=8, probe="rademacher"):
    r"""Laplacian :math:`\Delta\phi = \mathrm{tr}\,\nabla^2\phi` of a batched scalar function.

    The divergence (:func:`divergence`) of :math:`\nabla\phi`, with Hessian-vector products by
    forward-over-reverse differentiation.

    Args:
        phi: ``phi(x (B, D)) -> (B,)``, examples independent.
        x, estimator, key, num_probes, probe: as :func:`divergence`.

    Returns:
        ``(lap, se)``, both ``(B,)``.

    Examples:
        >>> lap, _ = laplacian(lambda y: -0.5 * jnp.sum(y**2, -1), jnp.ones((4, 3)))   # -3
    """
    x = _check_points(x)
    out = jax.eval_shape(phi, x)
    _check_output(out, (x.shape[0],), "phi(x)")
    return divergence(_batch_grad(phi), x, estimator=estimator, key=key, num_probes=num_probes,
                      probe=probe)


# ------------------------------------------------------------------------------------------------
# Residuals
# ------------------------------------------------------------------------------------------------


def _coefficients(process, t):
    return process.f(t), process.g2(t)


def _log_density_residual(log_density, process, x, t, estimator, key, num_probes, probe):
    """:func:`log_density_residual` without the host-side checks."""
    d = x.shape[1]
    f, g2 = _coefficients(process, t)
    _, dt_phi = jax.jvp(lambda s: log_density(x, s), (t,), (jnp.ones_like(t),))
    grad_fn = _batch_grad(lambda y: log_density(y, t))
    grad, traces = _trace_samples(grad_fn, x, estimator, key, num_probes, probe)
    drift = d * f + f * jnp.sum(x * grad, axis=-1)
    sq = jnp.sum(jnp.square(grad), axis=-1)
    diffusion = 0.5 * g2[None, :] * (traces + sq[None, :])  # (K, B)
    residual = dt_phi[None, :] + drift[None, :] - diffusion
    if estimator == "exact":
        return FPResidual(residual[0], jnp.zeros_like(residual[0]), dt_phi, drift, diffusion[0])
    residual, se = _mean_se(residual)
    return FPResidual(residual, se, dt_phi, drift, jnp.mean(diffusion, axis=0))


def log_density_residual(
    log_density: Callable,
    process,
    x,
    t,
    *,
    estimator: str = "exact",
    key=None,
    num_probes: int = 8,
    probe: str = "rademacher",
) -> FPResidual:
    r"""Fokker--Planck residual of a learned log-density :math:`\phi(x, t) \approx \log p_t(x)`.

    .. math::
        R_\phi = \partial_t\phi + D f(t) + f(t)\,x\cdot\nabla\phi
        - \tfrac{g(t)^2}{2}\big(\Delta\phi + |\nabla\phi|^2\big),

    zero for the exact log-marginal of the process (any data distribution; the normalising
    constant matters: adding :math:`c(t)` adds :math:`c'(t)`). The Laplacian is exact or a
    Hutchinson estimate (see the module docstring); everything else is exact autodiff.

    Args:
        log_density: ``log_density(x (B, D), t (B,)) -> (B,)``, examples independent; e.g.
            ``lambda x, t: dist.log_prob(process, x, t)`` or a potential network.
        process: the forward process (uses ``process.f(t)`` and ``process.g2(t)``).
        x: points, shape ``(B, D)``.
        t: times, shape ``()`` or ``(B,)``, in ``[t_min, t_max]``.
        estimator: ``"exact"`` (``D`` Hessian-vector products) or ``"hutchinson"``.
        key: typed key for the probes (``"hutchinson"`` only).
        num_probes: probes per example, :math:`K \ge 1`.
        probe: ``"rademacher"`` or ``"gaussian"``.

    Returns:
        :class:`FPResidual` with fields of shape ``(B,)``.

    Examples:
        >>> process = jaxdiff.OUProcess()
        >>> dist = GaussianMixture.create(jnp.ones(2) / 2, jnp.array([[-1.0, 0], [1, 0]]),
        ...                               stds=jnp.full(2, 0.3))
        >>> r = log_density_residual(lambda x, t: dist.log_prob(process, x, t), process,
        ...                          jnp.ones((5, 2)), 0.5)
        >>> r.residual        # ~0 (round-off)
    """
    num_probes = _check_estimator(estimator, key, num_probes, probe)
    x = _check_points(x)
    t = _batch_times(t, x)
    check_times(process, t)
    _check_output(jax.eval_shape(log_density, x, t), (x.shape[0],), "log_density(x, t)")
    return _log_density_residual(log_density, process, x, t, estimator, key, num_probes, probe)


def score_residual(
    score: Callable,
    process,
    x,
    t,
    *,
    estimator: str = "exact",
    key=None,
    num_probes: int = 8,
    probe: str = "rademacher",
) -> FPResidual:
    r"""Score Fokker--Planck residual of a vector field :math:`s(x, t) \approx \nabla\log p_t(x)`.

    .. math::
        R_s = \partial_t s + \nabla_x\big(f(t)\,x\cdot s\big)
        - \nabla_x\Big[\tfrac{g(t)^2}{2}\big(\nabla\cdot s + |s|^2\big)\Big],

    the :math:`x`-gradient of the log-density equation (FP-Diffusion's score FPE, derived in the
    module docstring); zero for the exact score. :math:`\partial_t s` is a forward-mode derivative
    in ``t``; the outer gradient is reverse mode through the divergence, which is exact
    (:math:`D` Jacobian-vector products) or a Hutchinson estimate whose per-probe gradients give
    the SE.

    Args:
        score: ``score(x (B, D), t (B,)) -> (B, D)``, examples independent.
        process, x, t, estimator, key, num_probes, probe: as :func:`log_density_residual`.

    Returns:
        :class:`FPResidual` with fields of shape ``(B, D)``.

    Examples:
        >>> r = score_residual(lambda x, t: dist.score(process, x, t), process,
        ...                    jnp.ones((5, 2)), 0.5)
    """
    num_probes = _check_estimator(estimator, key, num_probes, probe)
    x = _check_points(x)
    t = _batch_times(t, x)
    check_times(process, t)
    _check_output(jax.eval_shape(score, x, t), x.shape, "score(x, t)")
    f, g2 = _coefficients(process, t)
    _, dt_s = jax.jvp(lambda s: score(x, s), (t,), (jnp.ones_like(t),))
    score_t = lambda y: score(y, t)

    def drift_scalar(y):
        return jnp.sum(f * jnp.sum(y * score_t(y), axis=-1))

    drift = jax.grad(drift_scalar)(x)
    directions = basis(x) if estimator == "exact" else _probes(key, num_probes, probe, x)

    def diffusion_scalars(y):
        # One scalar per direction: the sum over the batch of (g^2/2)(v.J v + |s|^2); its
        # gradient is the per-example gradient of that direction's estimate.
        value, forms = quadratic_forms(score_t, y, directions)
        if estimator == "exact":
            forms = jnp.sum(forms, axis=0, keepdims=True)
        sq = jnp.sum(jnp.square(value), axis=-1)
        return jnp.sum(0.5 * g2[None, :] * (forms + sq[None, :]), axis=-1)

    diffusion = jax.jacrev(diffusion_scalars)(x)  # (K, B, D)
    residual = dt_s[None] + drift[None] - diffusion
    if estimator == "exact":
        return FPResidual(residual[0], jnp.zeros_like(residual[0]), dt_s, drift, diffusion[0])
    residual, se = _mean_se(residual)
    return FPResidual(residual, se, dt_s, drift, jnp.mean(diffusion, axis=0))


# ------------------------------------------------------------------------------------------------
# The FP-regularised loss
# ------------------------------------------------------------------------------------------------


def score_weighting(process, t):
    r"""Unit weight on the score-space error, as an :math:`x_0`-space weight.

    :math:`\hat x_0 - x_0 = (\sigma^2/\alpha)(\hat s - s)` at fixed :math:`x_t`, so
    :math:`\|\hat s - s\|^2 = w\,\|\hat x_0 - x_0\|^2` with
    :math:`w = \alpha^2/\sigma^4 = e^{\lambda}/\sigma^2` (computed in the log domain). Pass it
    as ``weighting=`` to :func:`jaxdiff.losses.denoising_loss`: the loss is then plain
    (unweighted) denoising score matching, the loss of Deveney et al.

    Examples:
        >>> w = score_weighting(jaxdiff.OUProcess(), jnp.array([0.1, 1.0]))
    """
    t = as_float_array(t)
    return jnp.exp(process.log_snr(t) - 2.0 * jnp.log(process.sigma(t)))


def _check_box(box):
    try:
        lo, hi = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise ValueError(f"box must be a pair (low, high) of floats; got {box!r}.") from err
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"box must satisfy low < high (both finite); got {box!r}.")
    return lo, hi


def _collocation_points(key, process, x0, num, collocation, box, t_range, dtype):
    """``num`` collocation points ``(x (num, D), t (num,))``."""
    k_t, k_x, k_row = jax.random.split(key, 3)
    t_lo, t_hi = t_range
    t = jax.random.uniform(k_t, (num,), dtype, t_lo, t_hi)
    if collocation == "box":
        x = jax.random.uniform(k_x, (num, x0.shape[1]), dtype, box[0], box[1])
    else:
        rows = jax.random.randint(k_row, (num,), 0, x0.shape[0])
        eps = jax.random.normal(k_x, (num, x0.shape[1]), dtype)
        alpha, sigma = process.alpha(t), process.sigma(t)
        x = alpha[:, None] * x0[rows].astype(dtype) + sigma[:, None] * eps
    return x, t


def fp_regularized_loss(
    key,
    log_density: Callable,
    process,
    x0,
    cond: Any = None,
    *,
    residual_weight=1.0,
    num_collocation: int = 512,
    collocation: str = "box",
    box=(-3.5, 3.5),
    collocation_t_range=None,
    estimator: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    weighting=score_weighting,
    example_index=None,
    **denoising_kwargs,
):
    r"""Denoising score matching of :math:`\nabla\phi` plus the Fokker--Planck residual penalty.

    .. math::
        \mathcal L = D\cdot\mathcal L_{\rm den}(\nabla_x\phi)
        + w_R\,\frac1M\sum_{m=1}^M R_\phi(x_m, t_m)^2,

    where :math:`\mathcal L_{\rm den}` is :func:`jaxdiff.losses.denoising_loss` of the
    :math:`\varepsilon`-prediction :math:`\hat\varepsilon = -\sigma\nabla_x\phi`; with the default
    ``weighting=score_weighting`` its per-example term is
    :math:`\frac1D\|\nabla\phi(x_t, t) - \nabla\log q(x_t \mid x_0)\|^2`, so the first term is
    the squared-norm DSM loss of Deveney et al. (the factor :math:`D` gives :math:`w_R` their
    meaning). The residual (:func:`log_density_residual`) is evaluated on :math:`M` collocation
    points with :math:`t \sim U(t_{\rm lo}, t_{\rm hi})` (default ``[t_min, t_max]``) and
    :math:`x` uniform in ``box`` per coordinate (``"box"``, theirs) or drawn from
    :math:`q(x_t \mid x_0)` for rows of the batch (``"marginal"``, FP-Diffusion's choice).
    With Hutchinson traces the penalty uses the mean of ``num_probes`` per-probe residuals,
    whose square is biased upwards by their variance over :math:`K`.

    Args:
        key: typed key.
        log_density: ``log_density(x (B, D), t (B,), cond) -> (B,)`` (the potential
            :math:`\phi`), examples independent.
        process: the forward process.
        x0: clean data ``(B, D)``.
        cond: conditioning passed to ``log_density`` in the denoising term (the residual is
            evaluated with ``cond=None``, the unconditional model).
        residual_weight: :math:`w_R \ge 0` (may be traced; a concrete 0 skips the residual).
        num_collocation: :math:`M \ge 1`.
        collocation: one of :data:`COLLOCATIONS`.
        box: ``(low, high)`` of the uniform collocation box.
        collocation_t_range: ``(t_lo, t_hi)`` inside ``[t_min, t_max]``; default the full range.
        estimator, num_probes, probe: the Laplacian's estimator (see
            :func:`log_density_residual`).
        weighting: the denoising weighting (default :func:`score_weighting`).
        example_index: global positions ``(B,)`` of the examples (micro-batching); the
            collocation draw is keyed by the first one, so micro-batches differ.
        **denoising_kwargs: forwarded to :func:`jaxdiff.losses.denoising_loss`
            (``time_sampling``, ...).

    Returns:
        ``(loss, aux)``: ``aux`` holds the denoising aux (``"per_example"``, ``"t"``, ...),
        ``"denoising"`` (the :math:`D\cdot\mathcal L_{\rm den}` term) and ``"residual_sq"``
        (:math:`\mathrm{mean}\,R^2`, 0 when skipped).

    Examples:
        >>> phi = lambda x, t, cond: dist.log_prob(process, x, t)
        >>> loss, aux = fp_regularized_loss(jax.random.key(0), phi, process, x0,
        ...                                 residual_weight=1.0, num_collocation=256)
    """
    from . import losses  # losses imports the samplers; keep this module light to import

    _check_choice(collocation, COLLOCATIONS, "collocation")
    box = _check_box(box)
    num_probes = _check_estimator(estimator, key, num_probes, probe)
    if isinstance(num_collocation, bool) or not isinstance(num_collocation, numbers.Integral):
        raise TypeError(f"num_collocation must be an int; got {type(num_collocation).__name__}.")
    if num_collocation < 1:
        raise ValueError(f"num_collocation must be >= 1; got {num_collocation}.")
    check_positive(residual_weight, "residual_weight", allow_zero=True)
    if not callable(log_density):
        raise TypeError(f"log_density must be callable; got {type(log_density).__name__}.")
    x0 = _check_points(x0, "x0")
    if collocation_t_range is None:
        collocation_t_range = (process.t_min, process.t_max)
    t_lo, t_hi = collocation_t_range
    check_times(process, jnp.asarray([t_lo, t_hi]), "collocation_t_range")
    if is_concrete(t_lo, t_hi) and not float(t_lo) < float(t_hi):
        raise ValueError(f"collocation_t_range must be increasing; got {collocation_t_range}.")

    key_den, key_col = jax.random.split(key)

    def eps_model(x_t, t, c):
        grad = _batch_grad(lambda y: log_density(y, t, c))(x_t)
        return -process.sigma(t)[:, None] * grad

    loss_den, aux = losses.denoising_loss(
        key_den, eps_model, process, x0, cond, prediction="eps", weighting=weighting,
        example_index=example_index, **denoising_kwargs,
    )
    dim = x0.shape[1]
    denoising = dim * loss_den
    aux = dict(aux)
    aux["denoising"] = denoising
    skip = is_concrete(residual_weight) and float(np.asarray(residual_weight)) == 0.0
    if skip:
        aux["residual_sq"] = jnp.zeros_like(denoising)
        return denoising, aux
    first = 0 if example_index is None else jnp.asarray(example_index)[0]
    key_col = jax.random.fold_in(key_col, first)
    k_points, k_probes = jax.random.split(key_col)
    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    xc, tc = _collocation_points(k_points, process, x0, int(num_collocation), collocation, box,
                                 (t_lo, t_hi), dtype)
    res = _log_density_residual(lambda y, s: log_density(y, s, None), process, xc, tc,
                                estimator, k_probes, num_probes, probe)
    residual_sq = jnp.mean(jnp.square(res.residual))
    aux["residual_sq"] = residual_sq
    return denoising + residual_weight * residual_sq, aux


# ------------------------------------------------------------------------------------------------
# The ODE-SDE gap: the lambda-family of samplers and histogram optimal transport
# ------------------------------------------------------------------------------------------------


def lambda_family(key, denoiser, process, x_init, ts, etas, *, cond=None):
    r"""Samples of one model by the reverse-time family :math:`\eta \in [0, 1]` from shared draws.

    Euler--Maruyama (:func:`jaxdiff.samplers.euler_maruyama`) on

    .. math:: dx = \Big[f x - \tfrac{1 + \eta^2}{2} g^2 \nabla\log p_t\Big]dt + \eta\,g\,d\bar W,

    which has the model's marginals for every :math:`\eta` when the score is exact:
    :math:`\eta = 0` is the probability-flow ODE (Euler), :math:`\eta = 1` the reverse SDE.
    Every member starts from the same ``x_init`` and uses the same Brownian increments
    (``key``), so differences between the sets come from the sampler, not from the draws.

    Args:
        key: typed key of the Brownian increments (shared by every :math:`\eta`).
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        x_init: prior draws ``(B, ...)`` at ``ts[0]``.
        ts: decreasing grid (see :mod:`jaxdiff.timesteps`).
        etas: sequence of noise multipliers :math:`\eta \ge 0`.
        cond: conditioning passed to the denoiser.

    Returns:
        A list of sample arrays, one per entry of ``etas``, each of the shape of ``x_init``.

    Examples:
        >>> ts = jaxdiff.timesteps.uniform_log_snr(process, 200)
        >>> ode, mid, sde = lambda_family(key, denoiser, process, x_init, ts, [0.0, 0.5, 1.0])
    """
    from .samplers import euler_maruyama, pf_euler

    etas = [float(e) for e in np.atleast_1d(np.asarray(etas, dtype=np.float64))]
    if not etas or not all(np.isfinite(e) and e >= 0 for e in etas):
        raise ValueError(f"etas must be a non-empty sequence of finite values >= 0; got {etas}.")
    out = []
    for eta in etas:
        if eta == 0.0:  # no Brownian draws needed
            out.append(pf_euler(key, denoiser, process, x_init, ts, cond=cond))
        else:
            out.append(euler_maruyama(key, denoiser, process, x_init, ts, cond=cond, eta=eta))
    return out


def histogram(x, *, bins=64, limits=(-4.0, 4.0)):
    r"""Normalised histogram of points on a regular grid and the bin centres (host, NumPy).

    Every point goes to its nearest grid point (the bin centre); points outside ``limits`` in any
    coordinate are discarded, as in Deveney et al.'s protocol.

    Args:
        x: points ``(N, D)``.
        bins: bins per axis (``>= 1``).
        limits: ``(low, high)`` of the grid in every coordinate.

    Returns:
        ``(weights, centres)``: the non-empty bins' masses ``(M,)`` (summing to one) and their
        centres ``(M, D)``.

    Examples:
        >>> w, c = histogram(np.random.default_rng(0).normal(size=(1000, 2)), bins=16)
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, D); got {x.shape}.")
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ValueError(f"bins must be an int >= 1; got {bins!r}.")
    lo, hi = _check_box(limits)
    edges = np.linspace(lo, hi, int(bins) + 1)
    counts, _ = np.histogramdd(x, bins=[edges] * x.shape[1])
    counts = counts.ravel()
    total = counts.sum()
    if total == 0:
        raise ValueError(f"no point of x lies inside limits {limits}.")
    centres_1d = 0.5 * (edges[1:] + edges[:-1])
    grids = np.meshgrid(*([centres_1d] * x.shape[1]), indexing="ij")
    centres = np.stack([g.ravel() for g in grids], axis=1)
    keep = counts > 0
    return counts[keep] / total, centres[keep]


def histogram_w2(x, y, *, bins=64, limits=(-4.0, 4.0), squared=True):
    r"""Exact 2-Wasserstein distance between the histograms of two sample sets (host, POT).

    Both sets are binned on the same grid (:func:`histogram`) and the exact optimal transport
    between the weighted bin centres (squared Euclidean cost) is solved with
    :func:`jaxdiff.metrics.wasserstein_ot` -- Deveney et al.'s metric (64 x 64 bins on
    :math:`[-4, 4]^2`, their tables report :math:`W_2^2`). Two independent samples of the same
    law give a positive floor that shrinks with the sample size; compare with it.

    Args:
        x, y: points ``(N, D)`` and ``(M, D)``.
        bins, limits: the grid (see :func:`histogram`).
        squared: return :math:`W_2^2` (default, as the paper) instead of :math:`W_2`.

    Returns:
        Python float.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> w2sq = histogram_w2(rng.normal(size=(5000, 2)), rng.normal(size=(5000, 2)) + 1.0)
    """
    from .metrics import wasserstein_ot

    wx, cx = histogram(x, bins=bins, limits=limits)
    wy, cy = histogram(y, bins=bins, limits=limits)
    if cx.shape[1] != cy.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {cx.shape[1]} and "
                         f"{cy.shape[1]}.")
    w2 = wasserstein_ot(cx, cy, p=2, weights_x=wx, weights_y=wy)
    return w2 * w2 if squared else w2
