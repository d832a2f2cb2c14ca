r"""Decreasing time grids for samplers, and their validation.

Every grid has ``num_steps + 1`` points running from ``t_start`` (default ``process.t_max``)
down to ``t_end`` (default ``process.t_min``). With ``final_zero=True`` the last point is an
exact 0 instead (EDM/Karras style: the last step returns the denoiser's :math:`\hat x_0`) and
the first ``num_steps`` points span ``[t_end, t_start]``.

Grids are built in float64 numpy on the host (they are static schedules, also when called
under ``jit``) and returned as ``jnp`` arrays in the default float dtype; pass ``dtype`` to
choose. When the process's parameters (or ``t_start``/``t_end``) are traced -- e.g. under
``jax.grad`` with respect to the process -- the same formulas are evaluated with ``jnp`` on the
traced values, so the grid, and a sampler run on it, are differentiable with respect to them
(validation is then skipped: it needs concrete values). Each schedule is defined
on a process-independent axis (time, noise level or log-SNR) and mapped to times with the
process's inverse, so the same grid means the same thing for every process.

Learnable grids. :class:`LearnableGrid` parameterises a monotone grid between fixed ends by
unconstrained logits (softplus increments of log-SNR or of ``t``), initialised from any grid;
:func:`fit_grid` minimises a loss of the grid (e.g. a sampler's error against a fine-grid
solution) with any optax-like optimizer -- the gradient-based counterpart of a schedule search.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._utils import is_concrete, pytree_dataclass

__all__ = [
    "uniform_t",
    "uniform_log_snr",
    "karras",
    "quadratic",
    "ddpm",
    "check_grid",
    "LearnableGrid",
    "fit_grid",
]


def _is_traced(process, t_start, t_end):
    leaves = jax.tree.leaves(process) + [v for v in (t_start, t_end) if v is not None]
    return not is_concrete(*leaves)


def _ends(process, t_start, t_end):
    t_start = float(process.t_max if t_start is None else t_start)
    t_end = float(process.t_min if t_end is None else t_end)
    if not t_start > t_end:
        raise ValueError(f"t_start must be > t_end; got t_start={t_start}, t_end={t_end}.")
    return t_start, t_end


def _traced_grid(process, num_steps, t_start, t_end, final_zero, dtype, axis):
    """The grid from traced values: ``axis(t0, t1, u) -> t`` on ``u`` in [0, 1]."""
    n = _num_points(num_steps, final_zero)
    t0 = jnp.asarray(process.t_max if t_start is None else t_start)
    t1 = jnp.asarray(process.t_min if t_end is None else t_end)
    dtype = dtype or jnp.result_type(t0, t1, float)
    u = jnp.linspace(0.0, 1.0, n, dtype=dtype)
    ts = axis(t0.astype(dtype), t1.astype(dtype), u)
    ts = ts.at[0].set(t0.astype(dtype)).at[-1].set(t1.astype(dtype))
    if final_zero:
        ts = jnp.concatenate([ts, jnp.zeros((1,), dtype)])
    return ts


def _num_points(num_steps, final_zero):
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}.")
    if final_zero and num_steps < 2:
        raise ValueError("num_steps must be >= 2 with final_zero=True.")
    return num_steps if final_zero else num_steps + 1


def _finish(ts, process, final_zero, dtype):
    ts = np.asarray(ts, dtype=np.float64)
    if final_zero:
        ts = np.concatenate([ts, [0.0]])
    out = jnp.asarray(ts, dtype=dtype)
    check_grid(process, out, name="grid")
    return out


def uniform_t(process, num_steps, *, t_start=None, t_end=None, final_zero=False, dtype=None):
    r"""Uniform in time: :math:`t_i = t_{\rm start} + \tfrac{i}{n-1}(t_{\rm end} - t_{\rm start})`.

    Examples:
        >>> ts = uniform_t(jaxdiff.VPProcess(), 10)       # 11 points from 1 to 1e-3
    """
    if _is_traced(process, t_start, t_end):
        return _traced_grid(process, num_steps, t_start, t_end, final_zero, dtype,
                            lambda t0, t1, u: t0 + u * (t1 - t0))
    t0, t1 = _ends(process, t_start, t_end)
    n = _num_points(num_steps, final_zero)
    return _finish(np.linspace(t0, t1, n), process, final_zero, dtype)


def quadratic(process, num_steps, *, t_start=None, t_end=None, final_zero=False, dtype=None):
    r"""Uniform in :math:`\sqrt t` (DDIM's quadratic schedule): dense near ``t_end``."""
    if _is_traced(process, t_start, t_end):
        return _traced_grid(
            process, num_steps, t_start, t_end, final_zero, dtype,
            lambda t0, t1, u: (jnp.sqrt(t0) + u * (jnp.sqrt(t1) - jnp.sqrt(t0))) ** 2)
    t0, t1 = _ends(process, t_start, t_end)
    n = _num_points(num_steps, final_zero)
    ts = np.linspace(np.sqrt(t0), np.sqrt(t1), n) ** 2
    ts[0], ts[-1] = t0, t1  # squaring misses the end points by an ulp
    return _finish(ts, process, final_zero, dtype)


def uniform_log_snr(process, num_steps, *, t_start=None, t_end=None, final_zero=False,
                    dtype=None):
    r"""Uniform in log-SNR :math:`\lambda` (DPM-Solver's ``logSNR``; EDM's "exponential" sigmas).

    .. math:: \lambda_i = \lambda(t_{\rm start}) + \tfrac{i}{n-1}\big(\lambda(t_{\rm end})
        - \lambda(t_{\rm start})\big), \qquad t_i = \lambda^{-1}(\lambda_i).
    """
    if _is_traced(process, t_start, t_end):
        def axis(t0, t1, u):
            lam0, lam1 = process.log_snr(t0), process.log_snr(t1)
            return process.t_from_log_snr(lam0 + u * (lam1 - lam0))

        return _traced_grid(process, num_steps, t_start, t_end, final_zero, dtype, axis)
    t0, t1 = _ends(process, t_start, t_end)
    n = _num_points(num_steps, final_zero)
    with jax.ensure_compile_time_eval():  # a host-side schedule, even when called under jit
        lam = np.linspace(float(process.log_snr(t0)), float(process.log_snr(t1)), n)
        ts = np.array(process.t_from_log_snr(jnp.asarray(lam)), dtype=np.float64)
    ts[0], ts[-1] = t0, t1  # the inverse is exact to round-off; pin the end points
    return _finish(ts, process, final_zero, dtype)


def karras(process, num_steps, *, rho=7.0, t_start=None, t_end=None, final_zero=False,
           dtype=None):
    r"""Karras et al. (2022) schedule, uniform in :math:`s^{1/\rho}` of the noise level :math:`s`.

    .. math:: s_i = \Big(s_{\max}^{1/\rho} + \tfrac{i}{n-1}\big(s_{\min}^{1/\rho}
        - s_{\max}^{1/\rho}\big)\Big)^{\rho}, \qquad s = \sigma/\alpha,

    mapped to times by ``process.t_from_noise_level`` (for :class:`EDMProcess` :math:`t = s`).

    Examples:
        >>> ts = karras(jaxdiff.EDMProcess(), 18, final_zero=True)  # EDM: 80 ... 0.002, 0
    """
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}.")
    if _is_traced(process, t_start, t_end):
        def axis(t0, t1, u):
            a = process.noise_level(t0) ** (1 / rho)
            b = process.noise_level(t1) ** (1 / rho)
            return process.t_from_noise_level((a + u * (b - a)) ** rho)

        return _traced_grid(process, num_steps, t_start, t_end, final_zero, dtype, axis)
    t0, t1 = _ends(process, t_start, t_end)
    n = _num_points(num_steps, final_zero)
    with jax.ensure_compile_time_eval():  # a host-side schedule, even when called under jit
        s_max, s_min = float(process.noise_level(t0)), float(process.noise_level(t1))
        ramp = np.linspace(0.0, 1.0, n)
        s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        ts = np.array(process.t_from_noise_level(jnp.asarray(s)), dtype=np.float64)
    ts[0], ts[-1] = t0, t1
    return _finish(ts, process, final_zero, dtype)


def ddpm(process, num_steps, *, spacing="leading", steps_offset=0, final_zero=True, dtype=None):
    r"""Respaced DDPM grid for a :class:`DiscreteVPProcess` (diffusers' spacings).

    The ``num_steps`` table times ``(n+1)/N`` of ``process.timestep_indices``, followed by an
    exact 0 (``final_zero=True``: the last step returns :math:`\hat x_0`, like
    ``set_alpha_to_one``) -- so ``num_steps`` network evaluations.
    """
    if not hasattr(process, "timestep_indices"):
        raise TypeError(
            f"process must be a DiscreteVPProcess for ddpm grids; got {type(process).__name__}."
        )
    ts = process.timesteps(num_steps, spacing, steps_offset)
    if not final_zero and len(ts) < 2:
        raise ValueError("num_steps must be >= 2 without final_zero.")
    return _finish(ts, process, final_zero, dtype)


def check_grid(process, ts, *, name="ts", allow_final_zero=True):
    """Validate a sampler grid: 1-D, >= 2 points, finite, strictly decreasing, in range.

    Inside ``[t_min, t_max]`` of ``process`` except that the last point may be exactly 0 when
    ``allow_final_zero``. Traced grids are not checked (the caller owns validation inside jit).

    Raises:
        ValueError naming ``name`` and the violated condition.
    """
    shape = np.shape(ts)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 points; got shape {shape}.")
    if not is_concrete(ts, process.t_min, process.t_max):
        return
    t = np.asarray(ts, dtype=np.float64)
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{name} must be finite; got {t}.")
    if not np.all(np.diff(t) < 0):
        raise ValueError(f"{name} must be strictly decreasing; got {t}.")
    inner = t[:-1] if (allow_final_zero and t[-1] == 0.0) else t
    lo, hi = float(np.asarray(process.t_min)), float(np.asarray(process.t_max))
    # Rounding of the end points to the grid's dtype (at least float32 precision) is allowed.
    dtype = jnp.asarray(ts).dtype
    eps = float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 0.0
    slack = 4 * float(max(eps, np.finfo(np.float32).eps))
    if inner.min() < lo * (1 - slack) or inner.max() > hi * (1 + slack):
        raise ValueError(
            f"{name} must lie in [t_min, t_max] = [{lo}, {hi}] of {type(process).__name__}"
            + (" (a final exact 0 is allowed)" if allow_final_zero else "")
            + f"; got values in [{t.min()}, {t.max()}]."
        )


# -- learnable grids ------------------------------------------------------------------------------

_AXES = ("log_snr", "t")


def _inverse_softplus(y):
    """``log(expm1(y))`` for ``y > 0``, written as ``y + log(-expm1(-y))`` (no overflow)."""
    return y + jnp.log(-jnp.expm1(-y))


@pytree_dataclass
class LearnableGrid:
    r"""A strictly monotone, learnable grid between fixed ends: softplus increments on an axis.

    With parameters :math:`\theta \in \mathbb R^M` (``M`` = number of intervals between the
    positive end points) and :math:`w_i = \mathrm{softplus}(\theta_i) / \sum_j
    \mathrm{softplus}(\theta_j)`,

    .. math:: a_k = a_{\rm start} + (a_{\rm end} - a_{\rm start})\sum_{i<k} w_i, \qquad
        t_k = a^{-1}(a_k), \qquad k = 0..M,

    on the axis :math:`a = \lambda` (log-SNR, ``axis="log_snr"``, the default: scale-free, every
    process) or :math:`a = t` (``axis="t"``). The ends :math:`t_0, t_M` are fixed exactly; with
    ``final_zero`` an exact 0 follows (the last step returns :math:`\hat x_0`). Any
    :math:`\theta` gives a valid strictly decreasing grid (for moderate :math:`\theta`; a
    softplus underflowing to 0 merges two points), so a plain gradient method can optimise it.
    ``process``, ``t_start`` and ``t_end`` are pytree data (the grid may be passed through
    ``jit``); ``num_steps``, ``final_zero`` and ``axis`` are static.

    Create it with :meth:`init` from any existing grid; :meth:`to_grid` maps parameters to times.

    Examples:
        >>> process = jaxdiff.VPProcess()
        >>> grid, params = LearnableGrid.init(process, uniform_log_snr(process, 8))
        >>> ts = grid.to_grid(params)        # equals the initial grid (to round-off)
        >>> x = jaxdiff.samplers.dpm_solver_pp(key, denoiser, process, x_T, ts)
    """

    process: Any
    t_start: Any
    t_end: Any
    num_steps: int = dataclasses.field(metadata=dict(static=True))
    final_zero: bool = dataclasses.field(metadata=dict(static=True))
    axis: str = dataclasses.field(default="log_snr", metadata=dict(static=True))

    @classmethod
    def init(cls, process, ts, *, axis="log_snr"):
        """The grid spanned by ``ts``'s ends and the parameters that reproduce ``ts``.

        Args:
            process: the forward process.
            ts: a concrete, strictly decreasing grid ``(N + 1,)`` (optionally ending in an exact
                0, which is then kept), e.g. from :func:`karras` or a previously learned grid.
            axis: ``"log_snr"`` or ``"t"``: the axis of the softplus increments.

        Returns:
            ``(grid, params)``: a :class:`LearnableGrid` and logits of shape ``(M,)``, ``M = N``
            (``N - 1`` with a final 0); ``grid.to_grid(params)`` reproduces ``ts``.
        """
        if axis not in _AXES:
            raise ValueError(f"axis must be one of {_AXES}; got {axis!r}.")
        ts = jnp.asarray(ts)
        check_grid(process, ts)
        final_zero = bool(is_concrete(ts) and float(ts[-1]) == 0.0)
        positive = ts[:-1] if final_zero else ts
        if positive.shape[0] < 2:
            raise ValueError(
                f"ts must have at least 2 positive points; got shape {tuple(ts.shape)}."
            )
        grid = cls(process=process, t_start=positive[0], t_end=positive[-1],
                   num_steps=int(ts.shape[0]) - 1, final_zero=final_zero, axis=axis)
        a = grid._to_axis(positive)
        inc = jnp.diff(a) / (a[-1] - a[0])
        return grid, _inverse_softplus(inc * inc.shape[0])

    @property
    def num_params(self) -> int:
        """Number of logits ``M`` (intervals between the positive end points)."""
        return self.num_steps - 1 if self.final_zero else self.num_steps

    def _to_axis(self, t):
        return self.process.log_snr(t) if self.axis == "log_snr" else t

    def _from_axis(self, a):
        return self.process.t_from_log_snr(a) if self.axis == "log_snr" else a

    def to_grid(self, params):
        r"""The decreasing grid ``(num_steps + 1,)`` for logits ``params`` of shape ``(M,)``.

        Differentiable in ``params`` (and in the process's parameters and the ends).
        """
        params = jnp.asarray(params)
        if params.shape != (self.num_params,):
            raise ValueError(
                f"params must have shape (M,) = ({self.num_params},); got {params.shape}."
            )
        dtype = jnp.result_type(params, self.t_start, self.t_end, float)
        t0, t1 = jnp.asarray(self.t_start, dtype), jnp.asarray(self.t_end, dtype)
        a0, a1 = self._to_axis(t0), self._to_axis(t1)
        w = jax.nn.softplus(params.astype(dtype))
        frac = jnp.cumsum(w)[:-1] / jnp.sum(w)
        inner = self._from_axis(a0 + (a1 - a0) * frac).astype(dtype)
        parts = [t0[None], inner, t1[None]]
        if self.final_zero:
            parts.append(jnp.zeros((1,), dtype))
        return jnp.concatenate(parts)


def fit_grid(grid, params, loss, optimizer, *, num_iters, key=None):
    r"""Minimise ``loss(grid.to_grid(params), key)`` over ``params`` with an optax-like optimizer.

    .. math:: \theta_{k+1} = \theta_k + \mathrm{update}\big(\nabla_\theta
        L(\mathrm{grid}(\theta_k), \kappa_k)\big), \qquad \kappa_k = \mathrm{fold\_in}(key, k).

    The whole loop is one ``lax.scan`` (jit-able). ``optimizer`` is any object with optax's
    ``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)`` (e.g.
    ``optax.adam(1e-2)``); updates are added to the parameters. Typical losses: the mean squared
    distance between a sampler's output on the grid and a fine-grid (or exact) solution from
    the same starting points, or a distance between samples and exact samples.

    Args:
        grid: a :class:`LearnableGrid`.
        params: initial logits ``(M,)`` (from :meth:`LearnableGrid.init`).
        loss: ``loss(ts, key) -> scalar`` (``key`` is None when ``key`` is None): e.g. a
            minibatch error of the sampler on the grid ``ts``.
        optimizer: optax-like gradient transformation (duck-typed).
        num_iters: number of iterations (static int >= 1).
        key: optional typed key; iteration ``k`` passes ``fold_in(key, k)`` to ``loss``.

    Returns:
        ``(params, losses)``: the final logits and the loss at each iteration ``(num_iters,)``
        (evaluated before that iteration's update).

    Examples:
        >>> grid, params = LearnableGrid.init(process, karras(process, 6, final_zero=True))
        >>> def loss(ts, key):
        ...     x = dpm_solver_pp(None, denoiser, process, x_T, ts)
        ...     return jnp.mean(jnp.sum((x - x_ref) ** 2, axis=-1))   # x_ref: fine-grid solution
        >>> params, losses = fit_grid(grid, params, loss, optax.adam(3e-2), num_iters=200)
        >>> ts = grid.to_grid(params)
    """
    if not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive int; got {num_iters!r}.")
    for name in ("init", "update"):
        if not callable(getattr(optimizer, name, None)):
            raise TypeError(
                f"optimizer must have optax's init(params) and update(grads, state, params); "
                f"got {type(optimizer).__name__} without {name!r}."
            )

    def objective(p, k):
        return loss(grid.to_grid(p), k)

    def body(carry, i):
        p, state = carry
        k = None if key is None else jax.random.fold_in(key, i)
        value, grads = jax.value_and_grad(objective)(p, k)
        updates, state = optimizer.update(grads, state, p)
        p = jax.tree.map(lambda a, u: a + u.astype(a.dtype), p, updates)
        return (p, state), value

    (params, _), losses = jax.lax.scan(
        body, (params, optimizer.init(params)), jnp.arange(num_iters))
    return params, losses
