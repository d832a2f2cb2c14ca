r"""SVDD: derivative-free soft-value decoding (Li et al. 2024) as a sampler.

Soft Value-based Decoding in Diffusion models aims at the reward-tilted law

.. math:: p^\star(x_0) \propto p_{\rm pre}(x_0)\, \exp\big(r(x_0)/\alpha\big)

without reward gradients and without fine-tuning. At each step of ancestral sampling, every
particle proposes :math:`M` candidates from the pre-trained transition, values each of them,
and keeps one:

.. math::
    x_s^{(m)} \sim p_{\rm pre}(\cdot \mid x_t),\quad
    \hat v^{(m)} = r\big(\hat x_0(x_s^{(m)}, s)\big),\quad
    \zeta \sim \mathrm{Cat}\big(\mathrm{softmax}(\hat v / \alpha)\big),\quad
    x_s = x_s^{(\zeta)}.

The value is the reward of the Tweedie posterior mean (the paper's SVDD-PM: no value
network). The parent's weight :math:`\exp(\hat v(x_t)/\alpha)` is common to the :math:`M`
candidates, so it cancels. :math:`\alpha \to 0` is the greedy argmax that the released code
uses.

Reference:
    X. Li et al., "Derivative-Free Guidance in Continuous and Discrete Diffusion Models with
    Soft Value-Based Decoding", arXiv:2408.08252, 2024.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, is_concrete
from ..samplers._core import (
    StepInput,
    call_denoiser,
    check_inputs,
    coeff_dtype,
    draw_noise,
    example_keys,
    integrate,
    is_python_zero,
)
from ..samplers._first_order import _ddim_apply, _ddim_coeffs
from ._common import check_callable

__all__ = ["svdd"]


def _check_options(num_candidates, temperature):
    if (
        isinstance(num_candidates, bool)
        or not isinstance(num_candidates, (int, np.integer))
        or num_candidates < 1
    ):
        raise ValueError(f"num_candidates must be an int >= 1; got {num_candidates!r}.")
    if is_concrete(temperature):
        temp = np.asarray(temperature, dtype=np.float64)
        if temp.ndim > 1:
            raise ValueError(f"temperature must be a scalar or (B,); got shape {temp.shape}.")
        if not (np.all(np.isfinite(temp)) and np.all(temp >= 0)):
            raise ValueError(f"temperature must be finite and >= 0; got {temperature}.")


def _candidate_noise(keys, step, num_candidates, shape, dtype):
    r"""Standard normals ``(M, B, ...)``; candidate 0 is exactly the DDPM sampler's draw.

    Candidate 0 of example ``i`` at step ``n`` uses the stream of :func:`jaxdiff.samplers.ddpm`,
    ``normal(fold_in(k_i, n))``; candidates ``1..M-1`` are one draw of shape ``(M - 1, ...)``
    from ``fold_in(fold_in(k_i, n), 1)`` (one generator call, not ``M - 1``: it compiles faster).
    """
    z0 = draw_noise(keys, step, 1, shape, dtype)  # (1, B, ...)
    if num_candidates == 1:
        return z0

    def others(k):
        k_others = jax.random.fold_in(jax.random.fold_in(k, step), 1)
        return jax.random.normal(k_others, (num_candidates - 1, *shape), dtype)

    rest = jnp.moveaxis(jax.vmap(others)(keys), 0, 1)  # (M - 1, B, ...)
    return jnp.concatenate([z0, rest], axis=0)


def _selection_noise(keys, step, num_candidates, dtype):
    """Gumbel noise ``(B, M)`` for the softmax draw, from ``fold_in(fold_in(k_i, n), 0)``."""

    def one(k):
        k_sel = jax.random.fold_in(jax.random.fold_in(k, step), 0)
        return jax.random.gumbel(k_sel, (num_candidates,), dtype)

    return jax.vmap(one)(keys)


def _evaluate(denoiser, reward_fn, candidates, s, cond):
    """Denoise every candidate at time ``s`` and value it: ``(M, B, ...)``, ``(M, B)``."""
    batch = candidates.shape[1]
    x0_hat = jax.vmap(lambda xc: call_denoiser(denoiser, xc, s, cond))(candidates)

    def value(x0):
        v = jnp.asarray(reward_fn(x0))
        if v.shape != (batch,):
            raise ValueError(
                f"reward_fn must return shape (B,) = ({batch},); got {v.shape} for x0_hat of "
                f"shape {x0.shape}."
            )
        return as_float_array(v)

    return x0_hat, jax.vmap(value)(x0_hat)


def _select(values, gumbel, temperature):
    r"""Index ``(B,)`` of the kept candidate: :math:`\arg\max_m (v_m + \alpha g_m)`.

    With Gumbel noise :math:`g` this is a draw from :math:`\mathrm{softmax}(v/\alpha)`
    (Gumbel-max), and at :math:`\alpha = 0` the greedy argmax, in one formula, so a traced
    temperature needs no second program.
    """
    scores = values.T  # (B, M)
    if gumbel is not None:
        temp = jnp.asarray(temperature, scores.dtype)
        temp = temp[:, None] if temp.ndim == 1 else temp
        scores = scores + temp * gumbel.astype(scores.dtype)
    return jnp.argmax(scores, axis=-1)


def _take(stack, index):
    """``stack[index[b], b]`` for a stack ``(M, B, ...)`` and indices ``(B,)``."""
    return jax.vmap(lambda column, i: column[i], in_axes=(1, 0))(stack, index)


def svdd(
    key,
    denoiser: Callable,
    process,
    x_init,
    ts,
    *,
    reward_fn: Callable,
    num_candidates: int,
    temperature=0.0,
    cond=None,
    example_index=None,
):
    r"""SVDD-PM sampling: ancestral DDPM steps that keep the best of ``M`` candidates.

    Each step from ``t`` to ``s`` draws, per example, ``M`` candidates from the DDPM transition
    with the posterior variance (DDIM with :math:`\eta = 1`, ``ddpm(variance="fixed_small")``),

    .. math:: x_s^{(m)} = \frac{\sigma_s}{\sigma_t}e^{-h} x_t + \alpha_s(1 - e^{-2h})\hat x_0
        + \sigma_s\sqrt{1 - e^{-2h}}\, z^{(m)},

    denoises each, :math:`\hat x_0^{(m)} = D(x_s^{(m)}, s)`, values it with
    :math:`v^{(m)} = r(\hat x_0^{(m)})`, and keeps candidate
    :math:`\zeta = \arg\max_m (v^{(m)} + \alpha\, g^{(m)})` with Gumbel noise :math:`g`: a
    draw from :math:`\mathrm{softmax}(v/\alpha)` for :math:`\alpha > 0`, the greedy argmax at
    :math:`\alpha = 0`. The kept candidate's :math:`\hat x_0` is the next step's denoiser
    output, so a step costs ``M`` network calls; in all ``1 + M N`` for ``N`` steps
    (``1 + M (N - 1)`` when the grid ends in an exact 0, whose step returns the kept
    :math:`\hat x_0` without a call). Memory grows by a factor ``M``.

    Noise. Candidate 0 of example ``i`` at step ``n`` uses exactly the noise of
    :func:`jaxdiff.samplers.ddpm`, ``fold_in(fold_in(key, i), n)``, so ``num_candidates = 1``
    reproduces DDIM(:math:`\eta=1`) with the same key (bit for bit, up to the compiler's
    freedom to round a nonlinear denoiser differently in two programs) and
    ``ddpm(variance="fixed_small")`` up to round-off. Candidates ``1..M-1`` draw from
    ``fold_in(fold_in(fold_in(key, i), n), 1)`` and the softmax selection from
    ``fold_in(fold_in(fold_in(key, i), n), 0)``, so samples do not depend on the batch size,
    chunking or the order of the examples.

    ``reward_fn`` is only evaluated, never differentiated: it may be piecewise constant,
    built from ``argmax``/``floor``, or a host function through :func:`jax.pure_callback`
    (give it a ``vmap_method``: candidates are a :func:`jax.vmap` over ``M``).

    Args:
        key: typed key.
        denoiser: ``denoiser(x, t, cond) -> x0_hat``, ``t`` of shape ``(B,)``; vmappable.
        process: the forward process.
        x_init: state at ``ts[0]``, shape ``(B, ...)``.
        ts: strictly decreasing grid ``(N + 1,)`` in ``[t_min, t_max]`` (optionally ending in 0).
        reward_fn: ``reward_fn(x0_hat (B, ...)) -> (B,)``, larger is better.
        num_candidates: ``M >= 1`` (static int).
        temperature: :math:`\alpha \ge 0`, scalar or ``(B,)``; may be traced. A Python ``0``
            (default) draws no selection noise.
        cond: conditioning passed to the denoiser (shared by the candidates).
        example_index: global indices ``(B,)`` of the examples (chunked/sharded sampling).

    Returns:
        The state at ``ts[-1]``, shape and dtype of ``x_init``.

    Examples:
        >>> ts = jaxdiff.timesteps.uniform_t(process, 50)
        >>> x_T = process.sample_prior(key, (64, 2))
        >>> x = svdd(key, denoiser, process, x_T, ts, reward_fn=lambda x0: x0[:, 0],
        ...          num_candidates=8)
    """
    check_callable(denoiser, "denoiser")
    check_callable(reward_fn, "reward_fn")
    _check_options(num_candidates, temperature)
    check_inputs(process, x_init, ts)
    x_init = jnp.asarray(x_init)
    ts = jnp.asarray(ts)
    batch, shape = x_init.shape[0], x_init.shape[1:]
    temp = jnp.asarray(temperature)
    if temp.ndim == 1 and temp.shape != (batch,):
        raise ValueError(f"temperature must be a scalar or (B,) = ({batch},); got {temp.shape}.")
    dtype = coeff_dtype(x_init, ts)
    state_dtype = x_init.dtype
    greedy = is_python_zero(temperature)
    keys = example_keys(key, batch, example_index)

    def coeffs(_, t, s):  # DDIM(1)'s, computed as ddim/ddpm do, so M = 1 matches them bit for bit
        return _ddim_coeffs(process, t.astype(dtype), s.astype(dtype), jnp.ones((), dtype))

    def step(carry, inp: StepInput):
        x, x0 = carry
        z = _candidate_noise(keys, inp.index, num_candidates, shape, state_dtype)
        candidates = jax.vmap(
            lambda zm: _ddim_apply(inp.coeffs, x, x0, inp.s, zm).astype(state_dtype)
        )(z)
        # At a final exact 0 the candidates all equal x0; the evaluation time only has to be
        # valid (its result is discarded by the where below).
        s_eval = jnp.where(inp.s > 0, inp.s, inp.t)
        x0_cand, values = _evaluate(denoiser, reward_fn, candidates, s_eval, cond)
        gumbel = None if greedy else _selection_noise(keys, inp.index, num_candidates, dtype)
        index = _select(values, gumbel, temperature)
        x_next = _take(candidates, index)
        x0_next = jnp.where(inp.s > 0, _take(x0_cand, index), x0)
        return x_next, x0_next

    x0_init = call_denoiser(denoiser, x_init, ts[0], cond)
    final_zero = is_concrete(ts) and float(np.asarray(ts)[-1]) == 0.0
    # A concrete final 0 is peeled off: its step returns the kept x0_hat with no network call.
    grid = ts[:-1] if final_zero else ts
    if grid.shape[0] < 2:
        return x0_init.astype(state_dtype)
    (x, x0), _ = integrate(step, (x_init, x0_init), grid, coeffs=coeffs)
    return (x0 if final_zero else x).astype(state_dtype)
