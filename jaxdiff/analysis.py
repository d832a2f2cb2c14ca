r"""How much of a learned denoiser an analytic model explains (Wang & Vastola's protocol).

Wang & Vastola compare a trained diffusion model with closed-form scores of simple models of
its training set -- the isotropic mean, the moment-matched Gaussian, Gaussian mixtures and the
training set itself (:mod:`jaxdiff.analytic`) -- by the *explained variance* of the learned
score :math:`s_\theta` by an analytic score :math:`s_a`, per example and *uncentered*:

.. math::
    \mathrm{EV}_i = 1 - \frac{\|s_\theta(x_i) - s_a(x_i)\|^2}{\|s_\theta(x_i)\|^2},
    \qquad \mathrm{EV} = \frac1n \sum_i \mathrm{EV}_i ,

(the authors' ``St_EV`` column), and the same with denoisers
:math:`D = (x + \sigma_t^2 s)/\alpha_t` in place of scores (``Dt_EV``). The points are
:math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` with :math:`x_0` drawn uniformly (with
replacement) from the training set, at a list of noise levels. In score space even the
isotropic-mean score :math:`(\alpha_t\mu - x)/\sigma_t^2` explains almost everything at high
noise (both scores are dominated by :math:`-x/\sigma_t^2`), so denoiser-space EV is the more
telling number there.

Everything is computed from denoisers: with :math:`s = (\alpha_t D - x)/\sigma_t^2`,

.. math::
    \mathrm{St\_EV}_i = 1 - \frac{\alpha_t^2\|D_\theta - D_a\|^2}{\|\alpha_t D_\theta - x\|^2},
    \qquad
    \mathrm{Dt\_EV}_i = 1 - \frac{\|D_\theta - D_a\|^2}{\|D_\theta\|^2},

so no :math:`1/\sigma_t^2` is ever formed.

Reference:
    B. Wang, J. J. Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for
    Diffusion Models and its Applications".
"""

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import analytic
from ._utils import check_times, is_concrete

__all__ = ["explained_variance", "explained_variance_curve", "ExplainedVariance"]


def _flat(a, name):
    a = jnp.asarray(a)
    if a.ndim < 1:
        raise ValueError(f"{name} must have a leading batch axis; got shape {a.shape}.")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array; got dtype {a.dtype}.")
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    return a.reshape(a.shape[0], -1)


def _ratio_ev(residual, total, pooled):
    """``1 - residual/total`` per example (mean) or pooled (ratio of sums)."""
    if pooled:
        return 1.0 - jnp.sum(residual) / jnp.sum(total)
    return jnp.mean(1.0 - residual / total)


def explained_variance(pred, ref, *, pooled=False):
    r"""Uncentered explained variance of ``ref`` by ``pred`` (Wang & Vastola's ``explained_var``).

    .. math::
        \text{per example (default):}\quad \frac1B\sum_i\Big(1 - \frac{\|r_i - p_i\|^2}
        {\|r_i\|^2}\Big), \qquad
        \text{pooled:}\quad 1 - \frac{\sum_i \|r_i - p_i\|^2}{\sum_i \|r_i\|^2},

    with norms over all non-batch axes. ``ref`` is the quantity being explained (the learned
    score or denoiser), ``pred`` the approximation. 1 means a perfect match; it can be
    negative. The per-example mean is the paper's statistic; the pooled ratio has closed forms
    for Gaussian data.

    Args:
        pred: approximation, shape ``(B, ...)``.
        ref: reference, the same shape.
        pooled: ratio of sums instead of the mean of per-example ratios.

    Returns:
        A scalar (at least float32).

    Examples:
        >>> ref = jnp.array([[1.0, 0.0], [0.0, 2.0]])
        >>> float(explained_variance(jnp.zeros((2, 2)), ref))
        0.0
    """
    p, r = _flat(pred, "pred"), _flat(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape; got {jnp.shape(pred)} and "
                         f"{jnp.shape(ref)}.")
    return _ratio_ev(jnp.sum(jnp.square(r - p), axis=1), jnp.sum(jnp.square(r), axis=1), pooled)


class ExplainedVariance(NamedTuple):
    r"""Explained variance of a learned model by analytic ones, per noise level.

    Fields (dicts keyed by approximation name, arrays of shape ``(L,)`` over noise levels):
        noise_levels: the noise levels :math:`\sigma_t/\alpha_t`, ``(L,)``.
        score: score-space EV (the paper's ``St_EV``).
        denoiser: denoiser-space EV (``Dt_EV``).
        score_se, denoiser_se: their standard errors over the sampled points (the sample
            standard deviation of the per-example EV over :math:`\sqrt n`; delta method
            for pooled ratios).
    """

    noise_levels: np.ndarray
    score: dict
    denoiser: dict
    score_se: dict
    denoiser_se: dict


def _dist_denoise(dist, process, x, t):
    return dist.denoise(process, x, t)


def _as_partial(fn):
    """A pytree version of a callable (so it is a jit argument, not a baked constant)."""
    return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)


def _analytic_fns(process, approximations):
    if not isinstance(approximations, Mapping):
        raise TypeError(
            "approximations must be a mapping name -> analytic distribution (with .denoise) or "
            f"callable (x (B, D), t (B,)) -> x0_hat (B, D); got {type(approximations).__name__}."
        )
    fns = {}
    for name, approx in approximations.items():
        if hasattr(approx, "denoise"):
            fns[str(name)] = jax.tree_util.Partial(_dist_denoise, approx, process)
        elif callable(approx):
            fns[str(name)] = _as_partial(approx)
        else:
            raise TypeError(
                f"approximations[{name!r}] must have a .denoise method or be callable; got "
                f"{type(approx).__name__}."
            )
    return fns


@functools.partial(jax.jit, static_argnames=("batch",))
def _batch_terms(denoiser, fns, process, data, key, t, cond, batch):
    """Per-example residuals and totals, score and denoiser space, for one batch at time t."""
    key_idx, key_noise = jax.random.split(key)
    idx = jax.random.randint(key_idx, (batch,), 0, data.shape[0])
    x0 = data[idx]
    x_t, _ = process.sample_marginal(key_noise, x0, t)
    tb = jnp.full((batch,), t, dtype=jnp.result_type(t))
    d_ref = denoiser(x_t, tb, cond)
    if d_ref.shape != x_t.shape:
        raise ValueError(f"denoiser returned shape {d_ref.shape}; expected {x_t.shape}.")
    d_ref = _flat(d_ref, "denoiser output")
    x = _flat(x_t, "x_t")
    alpha = process.alpha(t).astype(x.dtype)
    totals = {
        "score": jnp.sum(jnp.square(alpha * d_ref - x), axis=1),
        "denoiser": jnp.sum(jnp.square(d_ref), axis=1),
    }
    residuals = {}
    for name, fn in fns.items():
        d_a = fn(x_t.reshape(batch, -1), tb).astype(d_ref.dtype)
        sq = jnp.sum(jnp.square(d_ref - d_a), axis=1)
        residuals[name] = {"score": jnp.square(alpha) * sq, "denoiser": sq}
    return residuals, totals


def _summary(residual, total, pooled):
    """EV and its standard error from per-example residuals and totals (numpy float64)."""
    a, b = np.asarray(residual, np.float64), np.asarray(total, np.float64)
    n = a.shape[0]
    if pooled:
        ratio = a.sum() / b.sum()
        se = np.std(a - ratio * b, ddof=1) / (np.sqrt(n) * b.mean()) if n > 1 else np.nan
        return 1.0 - ratio, se
    ev = 1.0 - a / b
    return ev.mean(), (ev.std(ddof=1) / np.sqrt(n) if n > 1 else np.nan)


def explained_variance_curve(
    key,
    denoiser,
    process,
    data,
    approximations,
    noise_levels,
    *,
    num_samples=1024,
    batch_size=256,
    cond=None,
    pooled=False,
    include_isotropic=True,
):
    r"""Explained variance of a learned denoiser by analytic ones, in score and denoiser space.

    For each noise level :math:`n` (at :math:`t = ` ``process.t_from_noise_level(n)``), draws
    ``num_samples`` points :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` with :math:`x_0`
    uniform over ``data`` (with replacement), evaluates the learned ``denoiser`` and every
    approximation :math:`D_a`, and reports

    .. math::
        \mathrm{St\_EV} = \Big\langle 1 - \frac{\alpha_t^2\|D_\theta - D_a\|^2}
        {\|\alpha_t D_\theta - x_t\|^2}\Big\rangle, \qquad
        \mathrm{Dt\_EV} = \Big\langle 1 - \frac{\|D_\theta - D_a\|^2}{\|D_\theta\|^2}\Big\rangle,

    the per-example uncentered explained variances of the learned score and denoiser, averaged
    over the points (``pooled=True``: ratios of sums). This is the protocol of Wang & Vastola's
    released analysis (4 x 256 points per noise level, training-set :math:`x_0`).

    With ``include_isotropic`` the isotropic-mean baseline :math:`s = (\alpha_t\mu - x)/
    \sigma_t^2`, i.e. :math:`D = \mu` (the delta mixture at the data mean), is added under the
    name ``"isotropic"``.

    Args:
        key: typed PRNG key; level ``l``, batch ``b`` use ``fold_in(fold_in(key, l), b)``.
        denoiser: the learned ``denoiser(x (B, ...), t (B,), cond) -> x0_hat``. A
            :class:`jax.tree_util.Partial` holding the parameters avoids baking them into the
            compiled program.
        process: the forward process.
        data: training points ``(N, ...)`` in the denoiser's input layout (e.g. NHWC images).
        approximations: mapping name -> analytic distribution (anything with
            ``denoise(process, x (B, D), t)``: :class:`~jaxdiff.analytic.Gaussian`,
            :class:`~jaxdiff.analytic.GaussianMixture`, :class:`~jaxdiff.analytic.Empirical`)
            or callable ``(x (B, D), t (B,)) -> x0_hat (B, D)``, on flattened points.
        noise_levels: noise levels :math:`\sigma/\alpha`, shape ``(L,)``, inside the process's
            range.
        num_samples: points per noise level (drawn in whole batches of ``batch_size``; the
            first ``num_samples`` are used).
        batch_size: points per denoiser call.
        cond: conditioning for the learned denoiser, batch-leading with ``batch_size`` rows
            (e.g. the null label for a class-conditional network), or None.
        pooled: ratio of sums instead of the mean of per-example ratios.
        include_isotropic: add the isotropic-mean baseline.

    Returns:
        :class:`ExplainedVariance` (numpy float64 arrays ``(L,)`` per approximation).

    Examples:
        >>> data = jax.random.normal(jax.random.key(0), (500, 4))
        >>> process = jaxdiff.EDMProcess()
        >>> exact = jaxdiff.analytic.Empirical.create(data)
        >>> ev = explained_variance_curve(
        ...     jax.random.key(1), exact.denoiser(process), process, data,
        ...     {"gaussian": jaxdiff.analytic.Gaussian.fit(data)}, [0.1, 1.0, 10.0])
        >>> ev.score["gaussian"].shape
        (3,)
    """
    data = jnp.asarray(data)
    if data.ndim < 2 or data.shape[0] < 1:
        raise ValueError(f"data must have shape (N, ...) with N >= 1; got {data.shape}.")
    if not jnp.issubdtype(data.dtype, jnp.floating):
        raise TypeError(f"data must be a floating array; got dtype {data.dtype}.")
    if is_concrete(data) and not np.all(np.isfinite(np.asarray(data))):
        raise ValueError("data must be finite.")
    levels = np.asarray(noise_levels, dtype=np.float64)
    if levels.ndim != 1 or levels.size < 1 or not np.all(np.isfinite(levels)) or np.any(
        levels <= 0
    ):
        raise ValueError(
            f"noise_levels must be a non-empty 1-D array of finite values > 0; got {levels}."
        )
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
            raise ValueError(f"{name} must be an int >= 2; got {value!r}.")
    batch_size = int(min(batch_size, num_samples))
    if cond is not None:
        rows = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(cond)}
        if rows != {batch_size}:
            raise ValueError(
                f"cond must be batch-leading with batch_size = {batch_size} rows; got leading "
                f"sizes {sorted(map(str, rows))}."
            )
    times = process.t_from_noise_level(jnp.asarray(levels))
    check_times(process, times, "noise_levels (as times)")
    fns = _analytic_fns(process, approximations)
    if include_isotropic:
        if "isotropic" in fns:
            raise ValueError("approximations already has an 'isotropic' entry; pass "
                             "include_isotropic=False to use it.")
        mean = jnp.mean(data.reshape(data.shape[0], -1), axis=0)
        fns["isotropic"] = jax.tree_util.Partial(
            _dist_denoise, analytic.Empirical.create(mean[None, :]), process
        )
    denoiser = _as_partial(denoiser)
    num_batches = -(-int(num_samples) // batch_size)
    spaces = ("score", "denoiser")
    out = {s: {name: np.zeros(levels.size) for name in fns} for s in spaces}
    out_se = {s: {name: np.zeros(levels.size) for name in fns} for s in spaces}
    for l_idx in range(levels.size):
        key_l = jax.random.fold_in(key, l_idx)
        res_parts, tot_parts = [], []
        for b in range(num_batches):
            residuals, totals = _batch_terms(
                denoiser, fns, process, data, jax.random.fold_in(key_l, b), times[l_idx], cond,
                batch=batch_size,
            )
            res_parts.append(jax.device_get(residuals))
            tot_parts.append(jax.device_get(totals))
        for s in spaces:
            total = np.concatenate([p[s] for p in tot_parts])[:num_samples]
            for name in fns:
                residual = np.concatenate([p[name][s] for p in res_parts])[:num_samples]
                out[s][name][l_idx], out_se[s][name][l_idx] = _summary(residual, total, pooled)
    return ExplainedVariance(
        noise_levels=levels,
        score=out["score"],
        denoiser=out["denoiser"],
        score_se=out_se["score"],
        denoiser_se=out_se["denoiser"],
    )
