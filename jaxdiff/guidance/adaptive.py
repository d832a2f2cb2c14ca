r"""Adaptive guidance (Castillo et al. 2023): classifier-free guidance only where it matters.

As sampling proceeds the guided update becomes aligned with the plain conditional one, so the
unconditional evaluation can be dropped for the rest of the trajectory. With the CFG denoiser
:math:`\tilde D = D_u + s(D_c - D_u)` (two network evaluations per call) on the first ``k``
steps and the conditional denoiser :math:`D_c` (one) on the remaining :math:`N - k`, a sampler
with one call per step costs :math:`2k + (N - k) = N + k` evaluations instead of :math:`2N`.

Two sampler-level wrappers (they carry state across steps, so they are not denoiser
transforms):

* :func:`adaptive_guidance` -- *static*: ``k`` is fixed in advance (an int, or a fraction of the
  steps), for any named sampler. The switch is a ``lax.cond`` on the grid time inside one run
  (multistep histories and noise streams carry over), or, for samplers that evaluate inside a
  step, two runs on ``ts[:k+1]`` and ``ts[k:]``; either way a step after the switch costs one
  evaluation, also under ``vmap`` over examples.
* :func:`adaptive_guidance_dynamic` -- the paper's *dynamic* rule: guide while the cosine
  similarity :math:`\gamma_n = \cos(P_c, P_u)` of the conditional and unconditional predictions
  (:math:`\hat\varepsilon` or :math:`\hat x_0`) stays at or below a threshold, then switch to the
  conditional denoiser for good (a latched flag; first-order DDIM steps).
  :func:`adaptive_guidance_dynamic_with_info` also returns the step of the switch.

:func:`adaptive_guidance_nfe` counts the network evaluations of the static wrapper.
"""

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, broadcast_to_batch, is_concrete
from ..samplers import get_method
from ..samplers._core import call_denoiser, check_inputs, coeff_dtype, integrate, is_python_zero
from ..samplers._first_order import _ddim_step
from .classifier_free import _check_scale, _resolve_null_cond, classifier_free

__all__ = [
    "AdaptiveGuidanceInfo",
    "adaptive_guidance",
    "adaptive_guidance_dynamic",
    "adaptive_guidance_dynamic_with_info",
    "adaptive_guidance_nfe",
]

_SPACES = ("eps", "x0")


def _num_steps(ts):
    shape = np.shape(ts)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"ts must be a 1-D grid of at least 2 times; got shape {shape}.")
    return shape[0] - 1


def _guided_steps(guided_steps, num_steps):
    """``guided_steps`` as a step count ``k`` in ``[0, num_steps]`` (a float is a fraction)."""
    if isinstance(guided_steps, (bool, np.bool_)):
        raise TypeError(f"guided_steps must be an int or a float fraction; got {guided_steps!r}.")
    if isinstance(guided_steps, numbers.Integral):
        k = int(guided_steps)
        if not 0 <= k <= num_steps:
            raise ValueError(
                f"guided_steps must lie in [0, {num_steps}] (the number of steps); got {k}."
            )
        return k
    if isinstance(guided_steps, numbers.Real):
        frac = float(guided_steps)
        if not (math.isfinite(frac) and 0.0 <= frac <= 1.0):
            raise ValueError(f"guided_steps as a fraction must lie in [0, 1]; got {frac!r}.")
        return int(math.floor(frac * num_steps + 0.5))
    raise TypeError(
        f"guided_steps must be an int (steps) or a float (fraction of the steps); got "
        f"{type(guided_steps).__name__}."
    )


# Samplers that evaluate the denoiser inside a step (stage times, Heun's corrector at the next
# grid time): adaptive guidance splits their grid into two scans (they carry no history).
_SPLIT_METHODS = ("edm_heun", "dpm_solver_pp_singlestep")


def _check_common(denoiser, cond, null_cond, scale):
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable; got {type(denoiser).__name__}.")
    if cond is None:
        raise ValueError("cond is required: adaptive guidance guides towards a condition.")
    if null_cond is None:
        raise ValueError("null_cond is required (the null label/embedding of training).")
    _check_scale(scale)


def _switch(denoiser, guided, t_switch, x, t, cond=None):
    """``guided`` while the time is above ``t_switch``, else ``denoiser``: one ``lax.cond``.

    The predicate depends on the time only, which the samplers take from the (unbatched) grid,
    so under ``vmap`` over examples, scales or conditions it stays a real branch and the
    unconditional evaluation is skipped after the switch.
    """

    def with_guidance():
        return guided(x, t, cond)

    def conditional():
        out = denoiser(x, t, cond)
        return out.astype(jnp.promote_types(out.dtype, jnp.float32))

    return jax.lax.cond(jnp.max(jnp.asarray(t)) > t_switch, with_guidance, conditional)


def adaptive_guidance(
    key,
    denoiser: Callable,
    process,
    x_init,
    ts,
    *,
    cond: Any,
    null_cond: Any,
    scale,
    guided_steps,
    method: str = "dpm_solver_pp",
    **method_kwargs,
):
    r"""Static adaptive guidance: CFG on the first ``k`` steps, the conditional model after.

    .. math::
        D_n = \begin{cases} D_u + s\,(D_c - D_u) & n < k \quad (2 \text{ evaluations}) \\
        D_c & n \ge k \quad (1 \text{ evaluation}) \end{cases}

    ``k = N`` is exactly the plain guided sampler and ``k = 0`` exactly the conditional one
    (same key, bit for bit). For ``0 < k < N`` the handover depends on where the sampler
    evaluates the denoiser:

    * Samplers that evaluate only at the grid times (all but ``edm_heun`` and
      ``dpm_solver_pp_singlestep``) run once, on a denoiser that is :func:`classifier_free`
      while the time is above ``ts[k]`` and ``denoiser`` after, switched by ``lax.cond`` on the
      time. So the run is the plain sampler's with the switch inside: multistep histories
      (DPM-Solver++, UniPC's corrector) carry the guided predictions across the switch and the
      noise streams are the plain run's (common random numbers with CFG for the same key).
      The time comes from the grid, which is not batched when ``vmap`` maps over examples,
      scales or conditions, so the branch stays a branch and steps after the switch cost one
      evaluation; mapping over the *grid* turns it into ``select`` (both evaluated, same
      result).
    * ``edm_heun`` and ``dpm_solver_pp_singlestep`` also evaluate inside a step (stages, the
      Heun corrector at the next grid time), so their grid is split: one scan on ``ts[:k+1]``
      with CFG (the corrector of step ``k - 1`` guided too), one on ``ts[k:]`` conditional.
      They carry no history, so the split is exact; ``s_churn`` is scaled by each part's share
      of the steps (it is per run); the stochastic second part uses ``fold_in(key, k)``, or
      ``noise[k:]`` if explicit ``noise`` is given.

    Restarting the multistep history at the switch instead (two independent runs) costs
    accuracy on coarse grids: on the digits smoke model with 6 Karras steps of DPM-Solver++(2M),
    3 of them guided, the sliced W between AG and CFG samples from the same noise rose from
    0.36 to 2.7 times the sliced W between two CFG runs with different seeds.

    Args:
        key: typed key (unused by deterministic samplers).
        denoiser: ``denoiser(x, t, cond) -> x0_hat``, conditional when given ``cond`` and
            unconditional when given ``null_cond``.
        process: the forward process.
        x_init: state at ``ts[0]``, shape ``(B, ...)``.
        ts: strictly decreasing grid ``(N + 1,)`` (optionally ending in an exact 0).
        cond: the condition (pytree, batch-leading leaves).
        null_cond: the null condition, as for :func:`classifier_free`.
        scale: guidance scale :math:`s` (scalar or ``(B,)``; may be traced).
        guided_steps: ``k``, an int in ``[0, N]`` or a float fraction of ``N`` in ``[0, 1]``
            (rounded to the nearest step); static.
        method: a name in :data:`jaxdiff.samplers.METHODS`.
        **method_kwargs: options of the sampler (``order``, ``eta``, ``noise``,
            ``example_index``, ...).

    Returns:
        The samples at ``ts[-1]``, shape and dtype of ``x_init``. Network evaluations:
        :func:`adaptive_guidance_nfe`.

    Examples:
        >>> ts = jaxdiff.timesteps.karras(process, 20, final_zero=True)
        >>> x = adaptive_guidance(key, denoiser, process, x_T, ts, cond=labels,
        ...                       null_cond=jnp.full((16,), 10), scale=2.0, guided_steps=0.5)
        >>> adaptive_guidance_nfe(20, 0.5)   # 30 instead of 40 for plain CFG
        30
    """
    _check_common(denoiser, cond, null_cond, scale)
    fn = get_method(method)
    num_steps = _num_steps(ts)
    k = _guided_steps(guided_steps, num_steps)
    ts = jnp.asarray(ts)
    guided = classifier_free(denoiser, process, scale, null_cond=null_cond)
    if k == num_steps:
        return fn(key, guided, process, x_init, ts, cond=cond, **method_kwargs)
    if k == 0:
        return fn(key, denoiser, process, x_init, ts, cond=cond, **method_kwargs)
    if method not in _SPLIT_METHODS:
        switched = jax.tree_util.Partial(_switch, denoiser, guided, ts[k])
        return fn(key, switched, process, x_init, ts, cond=cond, **method_kwargs)

    first, second = dict(method_kwargs), dict(method_kwargs)
    noise = method_kwargs.get("noise")
    if noise is not None:
        n_noise = np.shape(noise)[0] if np.ndim(noise) else None
        if n_noise != num_steps:
            raise ValueError(
                f"noise must have a leading axis of num_steps = {num_steps}; got shape "
                f"{np.shape(noise)}."
            )
        first["noise"], second["noise"] = noise[:k], noise[k:]
    if method_kwargs.get("s_churn") is not None:
        # Churn is spread over the run's steps (gamma = s_churn / N): keep it per step.
        churn = method_kwargs["s_churn"]
        first["s_churn"] = churn * (k / num_steps)
        second["s_churn"] = churn * ((num_steps - k) / num_steps)
    key2 = None if key is None else jax.random.fold_in(key, k)
    x = fn(key, guided, process, x_init, ts[: k + 1], cond=cond, **first)
    return fn(key2, denoiser, process, x, ts[k:], cond=cond, **second)


def _calls_per_step(method, num_steps, final_zero, method_kwargs):
    """Network evaluations of each step of the named sampler (a list of ``num_steps`` ints)."""
    get_method(method)  # validates the name
    last_to_zero = [False] * (num_steps - 1) + [bool(final_zero)]
    if method == "edm_heun":
        return [1 if z else 2 for z in last_to_zero]
    if method == "dpm_solver_pp_singlestep":
        order = int(method_kwargs.get("order", 2))
        return [1 if z else order for z in last_to_zero]
    if method == "predictor_corrector":
        return [1 + int(method_kwargs.get("num_corrector_steps", 1))] * num_steps
    return [1] * num_steps


def adaptive_guidance_nfe(
    num_steps: int, guided_steps, method: str = "dpm_solver_pp", *, final_zero: bool = False,
    **method_kwargs,
) -> int:
    r"""Network evaluations of :func:`adaptive_guidance`: :math:`2\sum_{n<k} c_n + \sum_{n\ge k}
    c_n`.

    :math:`c_n` is the number of denoiser calls of step ``n`` of the sampler (1 for most; 2 for
    ``edm_heun`` and ``order`` for ``dpm_solver_pp_singlestep``, except 1 on a step to an exact
    0; ``1 + num_corrector_steps`` for ``predictor_corrector``); a CFG call costs two network
    evaluations. ``guided_steps = num_steps`` gives plain CFG's count.

    Args:
        num_steps: ``N``, the number of steps (``len(ts) - 1``).
        guided_steps: as for :func:`adaptive_guidance`.
        method: the sampler's name.
        final_zero: the grid ends with an exact 0.
        **method_kwargs: the sampler options that change the count (``order``,
            ``num_corrector_steps``).

    Examples:
        >>> adaptive_guidance_nfe(32, 16, "edm_heun", final_zero=True)   # CFG: 126
        95
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"num_steps must be an int; got {num_steps!r}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}.")
    k = _guided_steps(guided_steps, int(num_steps))
    calls = _calls_per_step(method, int(num_steps), final_zero, method_kwargs)
    return 2 * sum(calls[:k]) + sum(calls[k:])


# -- dynamic switch ----------------------------------------------------------------------------


class AdaptiveGuidanceInfo(NamedTuple):
    r"""What :func:`adaptive_guidance_dynamic_with_info` reports besides the samples.

    Attributes:
        guided_steps: ``()`` int32, the number of steps that used CFG (steps ``0 .. k-1``);
            ``N`` if the similarity never exceeded the threshold.
        nfe: ``()`` int32, network evaluations: ``2 k + (N - k)``.
        similarity: ``(N,)`` the batch-global cosine similarity :math:`\gamma_n` at each guided
            step; NaN after the switch (not computed there).
    """

    guided_steps: jax.Array
    nfe: jax.Array
    similarity: jax.Array


def _cosine(a, b):
    """Cosine similarity of two arrays flattened over every axis (batch included)."""
    a = a.reshape(-1)
    b = b.reshape(-1)
    den = jnp.sqrt(jnp.sum(jnp.square(a)) * jnp.sum(jnp.square(b)))
    ok = den > 0
    # Two zero vectors (nothing to guide) count as aligned; the clip keeps round-off from
    # exceeding 1, so that threshold = 1 never switches.
    cos = jnp.where(ok, jnp.sum(a * b) / jnp.where(ok, den, 1.0), 1.0)
    return jnp.clip(cos, -1.0, 1.0)


def _check_threshold(threshold):
    if not is_concrete(threshold):
        return
    v = np.asarray(threshold, dtype=np.float64)
    if v.ndim != 0 or not np.isfinite(v):
        raise ValueError(f"threshold must be a finite scalar; got {threshold!r}.")


def adaptive_guidance_dynamic_with_info(
    key,
    denoiser: Callable,
    process,
    x_init,
    ts,
    *,
    cond: Any,
    null_cond: Any,
    scale,
    threshold=0.99,
    space: str = "x0",
    eta=0.0,
    noise=None,
    example_index=None,
):
    r"""Dynamic adaptive guidance with DDIM steps; returns ``(samples, AdaptiveGuidanceInfo)``.

    At each step ``n`` while guiding, one call on the stacked ``(cond, null_cond)`` batch gives
    :math:`D_c, D_u`; the step uses :math:`D_u + s(D_c - D_u)` and

    .. math::
        \gamma_n = \frac{\langle P_c, P_u\rangle}{\|P_c\|\,\|P_u\|}, \qquad
        P = \hat\varepsilon = (x - \alpha_t D)/\sigma_t \ (\texttt{space="eps"}) \quad\text{or}
        \quad P = D \ (\texttt{space="x0"}),

    with the inner product over the *whole batch* (all examples and axes). Once
    :math:`\gamma_n > \tau` (``threshold``) a latched flag in the scan carry makes every later
    step call the conditional denoiser only (``lax.cond``: the unconditional evaluation is
    really skipped); step ``n`` itself still uses its guided prediction (already paid for). The
    steps are DDIM(:math:`\eta`) (:func:`jaxdiff.samplers.ddim`), so with the returned
    ``guided_steps`` the result equals :func:`adaptive_guidance` with ``method="ddim"``.

    Caveats:

    * The decision is batch-global: every example switches at the same step, so an example's
      sample depends on the rest of its batch (unlike every sampler), and batch size or
      chunking changes results. A per-example switch would be ``lax.cond`` under ``vmap``,
      i.e. ``select``: both branches run and nothing is saved. For the same reason, ``vmap``
      of this whole function over extra batch axes computes both branches at every step
      (the results stay correct).
    * Threshold semantics depend on ``space`` (and on the process and grid): at high noise
      :math:`\hat\varepsilon \approx x/\sigma` for both branches, so its cosine starts near 1
      and a threshold like 0.99 can switch at once; :math:`\hat x_0` cosines start lower and
      rise as the sample forms. Tune ``threshold`` per space and model (inspect
      ``info.similarity`` of a run with ``threshold=1``, which never switches).
    * The switch step is data dependent, so the cost varies between calls; the compiled
      program is the same.

    Args:
        key: typed key (used when ``eta != 0``); noise streams as in
            :func:`jaxdiff.samplers.ddim`.
        denoiser, process, x_init, ts, cond, null_cond, scale: as for
            :func:`adaptive_guidance`.
        threshold: :math:`\tau`, a scalar (may be traced); ``>= 1`` never switches.
        space: ``"eps"`` or ``"x0"``, the predictions compared.
        eta: DDIM's :math:`\eta` (Python ``0``: deterministic).
        noise: optional explicit noise ``(N, 1, *x_init.shape)``.
        example_index: global example indices ``(B,)`` for the noise streams.

    Returns:
        ``(x, info)``: samples of the shape and dtype of ``x_init`` and an
        :class:`AdaptiveGuidanceInfo`.

    Examples:
        >>> x, info = adaptive_guidance_dynamic_with_info(
        ...     key, denoiser, process, x_T, ts, cond=labels, null_cond=10, scale=2.0,
        ...     threshold=0.99, space="x0")
        >>> int(info.guided_steps), int(info.nfe)
    """
    _check_common(denoiser, cond, null_cond, scale)
    _check_threshold(threshold)
    if space not in _SPACES:
        raise ValueError(f"space must be 'eps' or 'x0'; got {space!r}.")
    num_draws = 0 if is_python_zero(eta) and noise is None else 1
    ts = jnp.asarray(ts)
    check_inputs(process, x_init, ts, noise=noise, num_draws=num_draws)
    x_init = jnp.asarray(x_init)
    num_steps = ts.shape[0] - 1
    batch = x_init.shape[0]
    dtype = coeff_dtype(x_init, ts)
    eta = jnp.asarray(eta, dtype)
    null = _resolve_null_cond(null_cond, cond, batch)
    both = jax.tree.map(lambda c, n: jnp.stack([jnp.asarray(c), n]), cond, null)
    threshold = jnp.asarray(threshold, dtype)

    def guided(x, t):
        tb = jnp.full((batch,), t, dtype=jnp.result_type(t))
        out = jax.vmap(denoiser, in_axes=(None, None, 0))(x, tb, both)
        if out.shape != (2,) + x.shape:
            raise ValueError(
                f"denoiser returned shape {out.shape[1:]}; expected x.shape = {x.shape}."
            )
        out = out.astype(jnp.promote_types(out.dtype, jnp.float32))
        d_c, d_u = out[0], out[1]
        s = broadcast_to_batch(as_float_array(scale).astype(out.dtype), x, "scale")
        if space == "x0":
            sim = _cosine(d_c, d_u)
        else:  # eps = (x - alpha D)/sigma; the positive 1/sigma cancels in the cosine
            alpha = process.alpha(t.astype(dtype)).astype(out.dtype)
            sim = _cosine(x - alpha * d_c, x - alpha * d_u)
        return d_c + (s - 1.0) * (d_c - d_u), sim.astype(dtype)

    def conditional(x, t):
        return call_denoiser(denoiser, x, t, cond), jnp.full((), jnp.nan, dtype)

    def step(carry, inp):
        x, switched, num_guided, _ = carry
        x0, sim = jax.lax.cond(switched, conditional, guided, x, inp.t)
        t, s = inp.t.astype(dtype), inp.s.astype(dtype)
        z = None if num_draws == 0 else inp.noise[0]
        x_next = _ddim_step(process, x, x0, t, s, eta, z).astype(x.dtype)
        num_guided = num_guided + jnp.where(switched, 0, 1).astype(jnp.int32)
        switched = switched | (sim > threshold)
        return x_next, switched, num_guided, sim

    carry = (x_init, jnp.asarray(False), jnp.zeros((), jnp.int32), jnp.zeros((), dtype))
    (x, _, num_guided, _), sims = integrate(
        step, carry, ts, key=key, noise=noise, num_draws=num_draws, state_shape=x_init.shape,
        dtype=x_init.dtype, example_index=example_index, record=lambda c: c[3],
    )
    info = AdaptiveGuidanceInfo(num_guided, num_steps + num_guided, sims)
    return x, info


def adaptive_guidance_dynamic(key, denoiser, process, x_init, ts, **kwargs):
    r"""Dynamic adaptive guidance: the samples of :func:`adaptive_guidance_dynamic_with_info`.

    Examples:
        >>> x = adaptive_guidance_dynamic(key, denoiser, process, x_T, ts, cond=labels,
        ...                               null_cond=10, scale=2.0, threshold=0.99)
    """
    return adaptive_guidance_dynamic_with_info(key, denoiser, process, x_init, ts, **kwargs)[0]
