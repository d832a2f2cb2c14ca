r"""Analytical teleportation (Wang & Vastola): replace the first sampling steps by a closed form.

At high noise a trained score is almost exactly the score of the Gaussian
:math:`N(\mu, \Sigma)` with the data's mean and covariance, and for Gaussian data the
probability-flow ODE is solved in closed form (:meth:`jaxdiff.analytic.Gaussian.flow`): with
:math:`v_k(t) = \alpha_t^2\lambda_k + \sigma_t^2`,

.. math::
    x_s = \alpha_s\mu + U\,\mathrm{diag}\Big(\sqrt{v(s)/v(t)}\Big)\,U^\top(x_t - \alpha_t\mu)
    + \frac{\sigma_s}{\sigma_t} P_\perp (x_t - \alpha_t\mu).

Teleportation jumps with this map from the start of a sampler's grid ``ts[0]`` to a later
grid time ``ts[k]`` (no network call), then runs any sampler on the rest ``ts[k:]``. The
skipped steps cost nothing; for Gaussian data the jump is exact, so the only error left is the
sampler's on the remaining interval.

The target can be given as an index ``skip = k`` of the grid, a ``fraction`` of its steps
(``k = round(fraction * N)``), or a ``time`` (need not be a grid point: the remaining grid is
that time followed by the grid points below it).
"""

import inspect
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import is_concrete
from ..timesteps import check_grid
from ._sample import get_method

__all__ = ["teleport", "teleport_start", "TeleportStart", "sampler_nfe", "teleport_nfe", "NFE"]

# Samplers with one denoiser call per step (including a final step to an exact 0).
_ONE_CALL = frozenset({
    "pf_euler", "euler_maruyama", "ddpm", "ddim", "euler_ancestral", "dpm_solver_pp",
    "dpm_solver_pp_sde", "unipc",
})


class TeleportStart(NamedTuple):
    """Where a sampler resumes after teleportation.

    Fields:
        x: the state at ``ts[0]``, shape and dtype of the initial state.
        ts: the remaining grid (the target time, then the original grid points below it).
        skip: number of grid steps replaced by the jump (grid points strictly above the
            target); 0 means no jump.
        history: ``(m_hist (h, B, ...), t_hist (h,))`` -- the Gaussian's denoiser outputs at the
            ``h`` skipped grid times nearest the target, on the closed-form trajectory, most
            recent first (a zero-cost warm start for multistep samplers' ``history``), or None.
    """

    x: jax.Array
    ts: jax.Array
    skip: int
    history: Any


def _check_int(value, name, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}.")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}] for this grid; got {value}.")
    return int(value)


def _resolve_target(ts, skip, time, fraction):
    """``(k, t_target or None)``: skipped grid points and, for an off-grid time, the time."""
    given = [name for name, v in (("skip", skip), ("time", time), ("fraction", fraction))
             if v is not None]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of skip (grid index), time, fraction; got {given or 'none'}."
        )
    num_steps = np.shape(ts)[0] - 1
    if skip is not None:
        return _check_int(skip, "skip", 0, num_steps), None
    if not is_concrete(ts):
        raise ValueError("time= and fraction= need a concrete grid ts; use skip= under jit.")
    grid = np.asarray(ts, dtype=np.float64)
    if fraction is not None:
        if not isinstance(fraction, numbers.Real) or not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must be a number in [0, 1]; got {fraction!r}.")
        return int(np.rint(float(fraction) * num_steps)), None
    if not isinstance(time, numbers.Real) and not (is_concrete(time) and np.ndim(time) == 0):
        raise TypeError(f"time must be a concrete scalar; got {time!r}.")
    time = float(time)
    if not (np.isfinite(time) and grid[-1] <= time <= grid[0]):
        raise ValueError(
            f"time must lie in the grid's range [ts[-1], ts[0]] = [{grid[-1]}, {grid[0]}]; "
            f"got {time}."
        )
    on_grid = np.flatnonzero(np.isclose(grid, time, rtol=1e-12, atol=0.0))
    if on_grid.size:
        return int(on_grid[0]), None
    return int(np.sum(grid > time)), time


def _flatten_state(x, dim):
    if jnp.ndim(x) < 2 or int(np.prod(jnp.shape(x)[1:])) != dim:
        raise ValueError(
            f"x_init must have shape (B, ...) with prod(shape[1:]) = gaussian.dim = {dim}; got "
            f"{jnp.shape(x)}."
        )
    return jnp.reshape(x, (jnp.shape(x)[0], dim))


def teleport_start(process, gaussian, x_init, ts, *, skip=None, time=None, fraction=None,
                   history=0):
    r"""Teleportation's closed-form jump: the state at the target time and the remaining grid.

    .. math:: x_{t_k} = \Phi_{\mathcal N(\mu,\Sigma)}(x_{t_0};\, t_0 \to t_k)

    with :math:`\Phi` the Gaussian's probability-flow map (:meth:`~jaxdiff.analytic.Gaussian.flow`,
    computed in at least float32 and cast back to ``x_init``'s dtype). ``skip = 0`` returns
    ``x_init`` unchanged; ``skip = N`` jumps to the end of the grid (an exact 0 gives the
    Gaussian's ODE endpoint).

    Args:
        process: the forward process.
        gaussian: the :class:`~jaxdiff.analytic.Gaussian` (anything with ``flow``, ``denoise``,
            ``dim``), e.g. ``Gaussian.fit(training_images)``.
        x_init: the state at ``ts[0]``, shape ``(B, ...)`` with ``prod(shape[1:]) = D``.
        ts: the full decreasing grid ``(N + 1,)`` (optionally ending in an exact 0).
        skip: target index ``k`` in ``[0, N]`` (static int); or
        time: a target time in ``[ts[-1], ts[0]]`` (concrete; off-grid allowed); or
        fraction: ``k = round(fraction * N)`` for a fraction in ``[0, 1]`` of the steps.
        history: number ``h >= 0`` of warm-start entries to compute (at most the number of
            skipped grid points).

    Returns:
        :class:`TeleportStart` ``(x, ts, skip, history)``.

    Examples:
        >>> g = jaxdiff.analytic.Gaussian.fit(train_images)
        >>> ts = jaxdiff.timesteps.karras(process, 18, final_zero=True)
        >>> start = teleport_start(process, g, x_T, ts, skip=4)
        >>> x = jaxdiff.samplers.edm_heun(key, denoiser, process, start.x, start.ts)
    """
    check_grid(process, ts)
    ts = jnp.asarray(ts)
    if not all(hasattr(gaussian, a) for a in ("flow", "denoise", "dim")):
        raise TypeError(
            f"gaussian must be a jaxdiff.analytic.Gaussian (with flow/denoise); got "
            f"{type(gaussian).__name__}."
        )
    if not jnp.issubdtype(jnp.asarray(x_init).dtype, jnp.floating):
        raise TypeError(f"x_init must be a floating array; got dtype {jnp.asarray(x_init).dtype}.")
    if is_concrete(x_init) and not np.all(np.isfinite(np.asarray(x_init, dtype=np.float64))):
        raise ValueError("x_init must be finite.")
    x_flat = _flatten_state(x_init, gaussian.dim)
    k, t_target = _resolve_target(ts, skip, time, fraction)
    num_hist = _check_int(history, "history", 0, np.shape(ts)[0])
    num_hist = min(num_hist, k)
    if t_target is None:
        rest = ts[k:]
        target = ts[k]
    else:
        target = jnp.asarray(t_target, ts.dtype)
        rest = jnp.concatenate([target[None], ts[k:]])
    work = jnp.promote_types(x_flat.dtype, jnp.float32)
    x_work = x_flat.astype(work)
    shape, dtype = jnp.shape(x_init), jnp.asarray(x_init).dtype

    def jump(s):
        return gaussian.flow(process, x_work, ts[0], s)

    x = x_init if k == 0 else jump(target).reshape(shape).astype(dtype)
    hist = None
    if num_hist:
        t_hist = ts[k - num_hist:k][::-1]  # most recent (smallest time) first
        m_hist = jnp.stack([
            gaussian.denoise(process, jump(t_h), t_h).reshape(shape) for t_h in t_hist
        ])
        hist = (m_hist, t_hist)
    return TeleportStart(x=x, ts=rest, skip=k, history=hist)


def teleport(
    key,
    denoiser,
    process,
    x_init,
    ts,
    *,
    gaussian,
    skip=None,
    time=None,
    fraction=None,
    method="edm_heun",
    warm_start=False,
    cond=None,
    **method_kwargs,
):
    r"""Sample with analytical teleportation: closed-form Gaussian jump, then any sampler.

    Runs :func:`teleport_start` (the jump from ``ts[0]`` to the target, no network call) and
    then ``method`` (a name in :data:`jaxdiff.samplers.METHODS`) on the remaining grid. The
    network is called only on the remaining grid: :func:`teleport_nfe` counts the savings
    (e.g. EDM Heun on 18 steps with ``skip = 4``: 27 calls instead of 35).

    Args:
        key: typed PRNG key for the sampler.
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        x_init: the state at ``ts[0]`` (e.g. the prior draw), shape ``(B, ...)``.
        ts: the full decreasing grid ``(N + 1,)``.
        gaussian: the :class:`~jaxdiff.analytic.Gaussian` of the data (e.g.
            ``Gaussian.fit(train_images)``), dimension ``prod(x_init.shape[1:])``.
        skip, time, fraction: the target, exactly one (see :func:`teleport_start`).
        method: the sampler's name.
        warm_start: give multistep samplers with a ``history`` argument (``dpm_solver_pp``,
            ``unipc``) the Gaussian's denoiser outputs at the two skipped grid times before
            the target (no network call) instead of a lower-order warm-up.
        cond: conditioning passed to the denoiser.
        **method_kwargs: options of the sampler (``order``, ``s_churn``, ``remat``, ...).

    Returns:
        Samples at ``ts[-1]``, shape and dtype of ``x_init``. With ``skip = N`` no sampler step
        remains and the Gaussian's flow to ``ts[-1]`` is returned.

    Examples:
        >>> g = jaxdiff.analytic.Gaussian.fit(train_images)
        >>> ts = jaxdiff.timesteps.karras(process, 18, final_zero=True)
        >>> x_T = process.sample_prior(key, (64, 8, 8, 1))
        >>> x = teleport(key, denoiser, process, x_T, ts, gaussian=g, skip=4)  # 27 NFE, not 35
    """
    fn = get_method(method)
    accepts_history = "history" in inspect.signature(fn).parameters
    if warm_start and not accepts_history:
        raise ValueError(
            f"warm_start needs a sampler with a history argument; {method!r} has none."
        )
    start = teleport_start(process, gaussian, x_init, ts, skip=skip, time=time,
                           fraction=fraction, history=2 if warm_start else 0)
    if start.ts.shape[0] < 2:
        return start.x
    if start.history is not None:
        method_kwargs = dict(method_kwargs, history=start.history)
    return fn(key, denoiser, process, start.x, start.ts, cond=cond, **method_kwargs)


class NFE(NamedTuple):
    """Network calls of a sampler on a full grid and with teleportation."""

    full: int
    teleport: int
    saved: int
    fraction_saved: float


def sampler_nfe(method, ts, **method_kwargs):
    r"""Number of denoiser calls of a named sampler on the grid ``ts``.

    With ``N = len(ts) - 1`` steps and ``z = 1`` when the grid ends in an exact 0 (else 0):
    EDM Heun :math:`2N - z` (two calls per step, one on the final Euler step to 0);
    singlestep DPM-Solver++ of order ``p``: :math:`pN - (p - 1)z`; predictor-corrector with
    ``c`` corrector steps: :math:`(1 + c)N`; every other sampler (DDIM, DDPM, Euler,
    DPM-Solver++ multistep, UniPC, ...): :math:`N`.

    Args:
        method: a name in :data:`jaxdiff.samplers.METHODS`.
        ts: the grid, shape ``(N + 1,)`` (its length and last value are used).
        **method_kwargs: the sampler's options (``order``, ``num_corrector_steps``).

    Returns:
        An int.

    Examples:
        >>> ts = jaxdiff.timesteps.karras(jaxdiff.EDMProcess(), 18, final_zero=True)
        >>> sampler_nfe("edm_heun", ts)
        35
    """
    get_method(method)  # validates the name
    if not is_concrete(ts) or np.ndim(ts) != 1 or np.shape(ts)[0] < 1:
        raise ValueError(f"ts must be a concrete 1-D grid; got shape {np.shape(ts)}.")
    n = np.shape(ts)[0] - 1
    if n == 0:
        return 0
    final_zero = int(float(np.asarray(ts)[-1]) == 0.0)
    if method == "edm_heun":
        return 2 * n - final_zero
    if method == "dpm_solver_pp_singlestep":
        p = int(method_kwargs.get("order", 2))
        return p * n - (p - 1) * final_zero
    if method == "predictor_corrector":
        return (1 + int(method_kwargs.get("num_corrector_steps", 1))) * n
    if method in _ONE_CALL:
        return n
    raise ValueError(f"no call count known for method {method!r}.")


def teleport_nfe(method, ts, *, skip=None, time=None, fraction=None, **method_kwargs):
    """Denoiser calls with and without teleportation to a target (as in :func:`teleport`).

    Returns:
        :class:`NFE` ``(full, teleport, saved, fraction_saved)``.

    Examples:
        >>> ts = jaxdiff.timesteps.karras(jaxdiff.EDMProcess(), 18, final_zero=True)
        >>> teleport_nfe("edm_heun", ts, skip=4)
        NFE(full=35, teleport=27, saved=8, fraction_saved=0.22857142857142856)
    """
    if not is_concrete(ts):
        raise ValueError("ts must be a concrete 1-D grid (teleport_nfe counts on the host).")
    k, t_target = _resolve_target(ts, skip, time, fraction)
    grid = np.asarray(ts, dtype=np.float64)
    rest = grid[k:] if t_target is None else np.concatenate([[t_target], grid[k:]])
    full = sampler_nfe(method, grid, **method_kwargs)
    tele = sampler_nfe(method, rest, **method_kwargs)
    return NFE(full=full, teleport=tele, saved=full - tele, fraction_saved=(full - tele) / full)
