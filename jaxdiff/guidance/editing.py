r"""Editing and inpainting baselines built from an unconditional (or conditional) denoiser.

* :func:`sdedit` -- SDEdit (Meng et al. 2022): noise a reference to an intermediate level and
  denoise it with any sampler; the level trades faithfulness to the reference for realism.
* :func:`repaint` -- RePaint (Lugmayr et al. 2022): inpainting by replacing the known region
  with the forward-noised reference at every reverse step, with "resampling" (jumping back
  along the forward process and denoising again) to harmonise the two regions.
  :func:`repaint_schedule` is its static jump schedule.
"""

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, check_times, is_concrete
from ..samplers import GRIDS, get_method
from ..samplers._core import (
    bcast,
    call_denoiser,
    coeff_dtype,
    draw_noise,
    example_keys,
    half_log_snr,
    safe_next_time,
    safe_sqrt,
)
from ..samplers._first_order import _ddim_step
from ..timesteps import check_grid

__all__ = ["sdedit", "repaint", "repaint_schedule"]

# Grids that can start below t_max (they take t_start).
_EDIT_GRIDS = ("uniform_t", "uniform_log_snr", "karras", "quadratic")


def _check_state(x, name):
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading batch axis; got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array; got dtype {x.dtype}.")
    if is_concrete(x) and not np.all(np.isfinite(np.asarray(x, dtype=np.float64))):
        raise ValueError(f"{name} must be finite.")
    return x


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    return int(value)


def _edit_time(process, noise_level, t_edit):
    """The start time of SDEdit from exactly one of ``noise_level`` and ``t_edit``."""
    if (noise_level is None) == (t_edit is None):
        raise ValueError("give exactly one of noise_level (sigma/alpha) and t_edit (a time).")
    if t_edit is None:
        level = as_float_array(noise_level)
        if level.ndim != 0:
            raise ValueError(f"noise_level must be a scalar; got shape {level.shape}.")
        if not is_concrete(noise_level, process.t_min, process.t_max):
            return process.t_from_noise_level(level)
        # A host-side value, also under jit, so that the grid is a static schedule.
        with jax.ensure_compile_time_eval():
            lo = float(process.noise_level(as_float_array(process.t_min)))
            hi = float(process.noise_level(as_float_array(process.t_max)))
            v = float(np.asarray(noise_level, dtype=np.float64))
            slack = 4 * float(np.finfo(np.float32).eps)
            if not (np.isfinite(v) and lo * (1 + slack) < v <= hi * (1 + slack)):
                raise ValueError(
                    f"noise_level must lie in ({lo:.6g}, {hi:.6g}] (the noise levels of "
                    f"{type(process).__name__} above t_min up to t_max); got {v!r}."
                )
            t = process.t_from_noise_level(as_float_array(v))
            # Round-off of the inverse may step a hair outside the range at t_max.
            return jnp.minimum(t, jnp.asarray(process.t_max, t.dtype))
    t = as_float_array(t_edit)
    if t.ndim != 0:
        raise ValueError(f"t_edit must be a scalar; got shape {t.shape}.")
    check_times(process, t_edit, "t_edit")
    if is_concrete(t_edit, process.t_min) and not float(t_edit) > float(process.t_min):
        raise ValueError(f"t_edit must be > t_min = {process.t_min}; got {float(t_edit)!r}.")
    return t


def sdedit(
    key,
    denoiser: Callable,
    process,
    x_ref,
    *,
    noise_level=None,
    t_edit=None,
    steps: int,
    method: str = "ddim",
    grid: str = "uniform_log_snr",
    final_zero: bool = True,
    cond: Any = None,
    example_index=None,
    edit_noise=None,
    **method_kwargs,
):
    r"""SDEdit: forward-noise a reference to :math:`t_0` and run a sampler from there.

    .. math::
        x_{t_0} = \alpha_{t_0} x_{\rm ref} + \sigma_{t_0}\varepsilon, \qquad
        x = \mathrm{Sampler}(x_{t_0};\ t_0 \to t_{\min}\ [\to 0]),

    with :math:`t_0` given as a noise level :math:`\sigma/\alpha` (the same meaning for every
    process) or as a time. Small levels keep the reference's layout and details; levels near
    :math:`t_{\max}` forget it (unconditional sampling). The grid has ``steps`` steps from
    :math:`t_0` to ``t_min`` (and a final exact 0 with ``final_zero``).

    The forward noise of example ``i`` comes from ``fold_in(k, example_index[i])`` with
    ``k = split(key)[0]`` (:meth:`AbstractProcess.sample_marginal` per example), so edits do not
    depend on the batch size; the sampler gets ``split(key)[1]``.

    Args:
        key: typed key.
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` (e.g. a guided one).
        process: the forward process.
        x_ref: references, shape ``(B, ...)``.
        noise_level: :math:`\sigma/\alpha` at :math:`t_0`, a scalar in the process's range
            (above the level at ``t_min``). Exactly one of ``noise_level`` and ``t_edit``.
        t_edit: :math:`t_0` as a time in ``(t_min, t_max]``.
        steps: number of sampler steps (static).
        method: a name in :data:`jaxdiff.samplers.METHODS`.
        grid: ``"uniform_log_snr"``, ``"uniform_t"``, ``"karras"`` or ``"quadratic"``.
        final_zero: end the grid with an exact 0 (the last step returns :math:`\hat x_0`).
        cond: conditioning passed to the denoiser.
        example_index: global example indices ``(B,)`` (noise streams; also passed to
            stochastic samplers).
        edit_noise: optional explicit :math:`\varepsilon` of the shape of ``x_ref``.
        **method_kwargs: options of the sampler.

    Returns:
        The edited samples, shape and dtype of ``x_ref``.

    Examples:
        >>> x = sdedit(key, denoiser, process, strokes, noise_level=2.0, steps=20)
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable; got {type(denoiser).__name__}.")
    x_ref = _check_state(x_ref, "x_ref")
    if grid not in _EDIT_GRIDS:
        raise ValueError(f"grid must be one of {list(_EDIT_GRIDS)}; got {grid!r}.")
    steps = _check_int(steps, "steps", 2 if final_zero else 1)
    fn = get_method(method)
    t0 = _edit_time(process, noise_level, t_edit)
    ts = GRIDS[grid](process, steps, t_start=t0, final_zero=final_zero)
    noise_key, sampler_key = jax.random.split(key)
    t0 = t0.astype(coeff_dtype(x_ref, ts))
    if edit_noise is None:
        keys = example_keys(noise_key, x_ref.shape[0], example_index)
        x_t = jax.vmap(lambda k, x0: process.sample_marginal(k, x0[None], t0)[0][0])(keys, x_ref)
    else:
        edit_noise = jnp.asarray(edit_noise)
        if edit_noise.shape != x_ref.shape:
            raise ValueError(
                f"edit_noise must have the shape of x_ref {x_ref.shape}; got {edit_noise.shape}."
            )
        x_t = (process.alpha(t0) * x_ref + process.sigma(t0) * edit_noise).astype(x_ref.dtype)
    if example_index is not None and "example_index" in inspect.signature(fn).parameters:
        method_kwargs = dict(method_kwargs, example_index=example_index)
    return fn(sampler_key, denoiser, process, x_t, ts, cond=cond, **method_kwargs)


# -- RePaint ------------------------------------------------------------------------------------


def repaint_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = 10):
    r"""RePaint's resampling schedule as a walk over grid indices ``0 .. num_steps``.

    Levels :math:`\ell = N - i` count the steps left. Going down, after arriving at each level
    :math:`\ell \in \{1, 1 + j, 1 + 2j, \ldots\}` with :math:`\ell \le N - j` (``j`` =
    ``jump_length``) the walk jumps back up ``j`` levels with the forward process and comes
    down again, ``jump_n_sample - 1`` times (the reference ``get_schedule_jump``, whose
    timestep ``t`` is level ``t + 1`` here). ``jump_n_sample = 1`` is the plain descent.

    Returns:
        ``(M + 1,)`` int numpy array of grid indices, from 0 to ``num_steps``; consecutive
        entries differ by one (an increase is a reverse step, a decrease a forward one): with
        :math:`J` jump levels, :math:`N + J(r - 1)j` reverse and :math:`J(r - 1)j` forward
        steps.

    Examples:
        >>> repaint_schedule(4, jump_length=1, jump_n_sample=2).tolist()
        [0, 1, 0, 1, 2, 1, 2, 3, 2, 3, 4]
    """
    n = _check_int(num_steps, "num_steps", 1)
    j = _check_int(jump_length, "jump_length", 1)
    r = _check_int(jump_n_sample, "jump_n_sample", 1)
    # The reference's timestep t is level t + 1 here (its final "-1" is level 0).
    jumps = {level: r - 1 for level in range(1, n - j + 1, j)}
    levels = []
    level = n + 1
    while level >= 2:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(j):
                level += 1
                levels.append(level)
    levels.append(0)
    return n - np.asarray(levels, dtype=np.int64)


def _check_mask(mask, x):
    if mask is None:
        raise ValueError("mask is required (1 = known, 0 = to inpaint).")
    m = jnp.asarray(mask)
    try:
        shape = np.broadcast_shapes(m.shape, x.shape)
    except ValueError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"mask must have shape x_known.shape = {x.shape} or one that broadcasts to it (e.g. "
            f"{x.shape[1:]}); got {m.shape}."
        )
    if not (jnp.issubdtype(m.dtype, jnp.floating) or jnp.issubdtype(m.dtype, jnp.integer)
            or m.dtype == jnp.bool_):
        raise TypeError(f"mask must be boolean or numeric; got dtype {m.dtype}.")
    if is_concrete(mask):
        v = np.asarray(m, dtype=np.float64)
        if not np.all((v >= 0) & (v <= 1)):
            raise ValueError("mask values must lie in [0, 1] (1 = known, 0 = to inpaint).")
    return m


def repaint(
    key,
    denoiser: Callable,
    process,
    x_known,
    mask,
    ts,
    *,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    cond: Any = None,
    example_index=None,
):
    r"""RePaint inpainting: the known region from the forward process, the rest from the model.

    Each reverse step from :math:`t` to :math:`s < t` combines

    .. math::
        x_s = m \odot \big(\alpha_s x_{\rm known} + \sigma_s z_1\big)
            + (1 - m) \odot \big(\mu_{s|t}(x_t, \hat x_0) + \tilde\sigma_{s|t} z_2\big),

    the forward-noised known region and the DDPM posterior (ancestral) step of the whole
    state, :math:`\mu_{s|t} = \frac{\sigma_s}{\sigma_t}e^{-h} x_t + \alpha_s(1 - e^{-2h})\hat
    x_0`, :math:`\tilde\sigma_{s|t} = \sigma_s\sqrt{1 - e^{-2h}}` (:func:`jaxdiff.samplers.ddpm`,
    ``"fixed_small"``). Resampling: following :func:`repaint_schedule`, the state jumps back up
    ``jump_length`` grid steps with the forward transitions :math:`x_{t'} \sim
    N\big(\tfrac{\alpha_{t'}}{\alpha_t}x_t, \sigma_{t'}^2(1 - e^{-2(\lambda_t - \lambda_{t'})})
    I\big)` (:math:`\lambda = \log\alpha/\sigma`) and is denoised again, ``jump_n_sample`` times
    in all, so the model sees the known region's information repeatedly. The schedule is a
    static array of ``(t, s, direction)`` entries and runs in one ``lax.scan``; a forward entry
    skips the network (``lax.cond``). Network evaluations: :math:`N + J(r - 1)j`.

    The start at :math:`t_0 =` ``ts[0]`` is :math:`x_{t_0} = \sigma_{t_0} z + \alpha_{t_0}\,
    m \odot x_{\rm known}` (the prior, with the known region forward-noised). Final step: on a
    grid ending with an exact 0 the known region is ``x_known`` itself and the unknown one
    :math:`\hat x_0`; otherwise both are at ``ts[-1]`` (the known one noised).

    Noise: example ``i`` at schedule entry ``n`` draws from ``fold_in(fold_in(k, i'), n)``
    with ``i' = example_index[i]`` and ``k = split(key)[1]`` (the start uses
    ``split(key)[0]``), so results do not depend on the batch size.

    Args:
        key: typed key.
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        x_known: the reference, shape ``(B, ...)``; only its known region is used.
        mask: 1 where ``x_known`` is known, 0 where to inpaint (values in [0, 1]; a soft mask
            blends), of the shape of ``x_known`` or broadcastable to it (e.g. ``(H, W, 1)``).
        ts: strictly decreasing grid ``(N + 1,)``, usually ending in an exact 0 (e.g.
            :func:`jaxdiff.timesteps.uniform_t` with ``final_zero=True``).
        jump_length: :math:`j`, grid steps per jump (the paper: 10 of 250).
        jump_n_sample: :math:`r`, the number of passes over each jump segment (1: no
            resampling; the paper: 10).
        cond: conditioning passed to the denoiser.
        example_index: global example indices ``(B,)`` for the noise streams.

    Returns:
        The inpainted samples at ``ts[-1]``, shape and dtype of ``x_known``.

    Examples:
        >>> ts = jaxdiff.timesteps.uniform_t(process, 250, final_zero=True)
        >>> x = repaint(key, denoiser, process, images, mask, ts, jump_length=10,
        ...             jump_n_sample=10)
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable; got {type(denoiser).__name__}.")
    x_known = _check_state(x_known, "x_known")
    m = _check_mask(mask, x_known)
    ts = jnp.asarray(ts)
    check_grid(process, ts)
    num_steps = ts.shape[0] - 1
    walk = repaint_schedule(num_steps, jump_length, jump_n_sample)
    reverse = walk[1:] > walk[:-1]
    dtype = coeff_dtype(x_known, ts)
    batch, shape = x_known.shape[0], x_known.shape[1:]
    m = jnp.broadcast_to(m.astype(dtype), x_known.shape)
    known_x = x_known.astype(dtype)

    init_key, step_key = jax.random.split(key)
    z0 = jax.vmap(lambda k: jax.random.normal(k, shape, x_known.dtype))(
        example_keys(init_key, batch, example_index))
    t0 = ts[0].astype(dtype)
    x = (process.sigma(t0) * z0 + process.alpha(t0) * m * known_x).astype(x_known.dtype)
    keys = example_keys(step_key, batch, example_index)

    def body(x, inp):
        index, t_in, s_in, is_reverse = inp
        t, s = t_in.astype(dtype), s_in.astype(dtype)
        z = draw_noise(keys, index, 2, shape, x.dtype)

        def reverse_step(x):
            x0 = call_denoiser(denoiser, x, t_in, cond)
            unknown = _ddim_step(process, x, x0, t, s, 1.0, z[0])
            s_ = safe_next_time(t, s)
            known = process.alpha(s_) * known_x + process.sigma(s_) * z[1]
            known = jnp.where(s > 0, known, known_x)
            return (m * known + (1.0 - m) * unknown).astype(x.dtype)

        def forward_step(x):  # from the less noisy t up to s > t
            h = half_log_snr(process, t) - half_log_snr(process, s)
            std = process.sigma(s) * safe_sqrt(-jnp.expm1(-2.0 * h))
            x_up = bcast(process.alpha(s) / process.alpha(t), x) * x + std * z[0]
            return x_up.astype(x.dtype)

        return jax.lax.cond(is_reverse, reverse_step, forward_step, x), None

    xs = (jnp.arange(walk.shape[0] - 1, dtype=jnp.int32), ts[walk[:-1]], ts[walk[1:]],
          jnp.asarray(reverse))
    x, _ = jax.lax.scan(body, x, xs)
    return x
