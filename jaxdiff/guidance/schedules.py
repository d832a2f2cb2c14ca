r"""Noise-level schedules of denoisers and conditions: experts, condition stages, blends.

All three transforms index the reverse process by the noise level
:math:`\varsigma(t) = \sigma(t)/\alpha(t)` (so a schedule means the same for every process) and
split it at increasing boundaries :math:`b_0 < \dots < b_{k-2}` into ``k`` stages

.. math::
    I_0 = (0, b_0],\quad I_j = (b_{j-1}, b_j],\quad I_{k-1} = (b_{k-2}, \infty),

numbered from the least noisy. A noise level exactly on a boundary belongs to the stage BELOW
it (the less noisy one), the convention of the guidance interval :math:`(\varsigma_{lo},
\varsigma_{hi}]`; the comparison uses ``process.noise_level(t)`` as computed, so a boundary
given as ``process.noise_level(t_b)`` puts ``t_b`` in the lower stage.

* :func:`noise_range_experts` -- a different denoiser per stage (PPAP-style experts, e.g. one
  network per noise range, or a guided denoiser in one range and the plain one elsewhere).
  Only the selected expert runs: when every example of the batch falls into the same stage
  (always the case with samplers, which pass one time for the whole batch) a ``lax.switch`` on
  a batch-global index evaluates one branch; when examples fall into different stages a
  ``lax.cond`` falls back to evaluating every expert and selecting per example (exact, but
  ``k`` calls). Under an outer ``jax.vmap`` the switch turns into a select and every branch
  runs; values stay exact. The guidance interval of
  :func:`jaxdiff.guidance.classifier_free.classifier_free` uses the same machinery.
* :func:`condition_schedule` -- one denoiser, a different condition per stage (ProSpect-style
  prompt stages): a single call with the condition gathered per example.
* :func:`condition_blend` -- a condition that moves from ``cond_a`` to ``cond_b`` with the noise
  level, :math:`w = w(\varsigma) \in [0, 1]` (``w = 0`` is ``cond_a``): float conditions
  (embeddings) are interpolated, :math:`c = (1 - w)c_a + w c_b`, one call; integer conditions
  (labels) cannot be, so the two predictions are blended, :math:`D = (1 - w)D(c_a) + w D(c_b)`,
  in one stacked call.

The condition-level transforms fix the condition themselves: call them with ``cond=None`` and
wrap a classifier-free-guided denoiser *inside* them
(``condition_schedule(classifier_free(net, ...), ...)``), not the other way round.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import as_float_array, broadcast_to_batch, is_concrete
from ._common import (
    batched_x,
    check_callable,
    check_noise_levels,
    output_dtype,
    single_call,
    stacked_call,
    static_config,
)

__all__ = ["noise_range_experts", "condition_schedule", "condition_blend"]


# ------------------------------------------------------------------------------------------------
# The shared machinery: noise level -> stage -> branch
# ------------------------------------------------------------------------------------------------


def stage_index(process, t, boundaries):
    r"""Stage of each time: the number of boundaries strictly below :math:`\varsigma(t)`.

    ``t`` has shape ``()`` or ``(B,)``; the result is int32 of the same shape.
    """
    nl = process.noise_level(as_float_array(t))
    b = jnp.asarray(boundaries)
    if b.shape[0] == 0:
        return jnp.zeros(nl.shape, jnp.int32)
    b = b.reshape((1,) * nl.ndim + b.shape)
    return jnp.sum(nl[..., None] > b, axis=-1).astype(jnp.int32)


def run_by_stage(branches, assignment, process, boundaries, x, t, cond):
    """Evaluate ``branches[assignment[stage(t)]](x, t, cond)`` running only what is needed.

    ``branches``: distinct callables ``(x, t, cond) -> (B, ...)``; ``assignment``: a static
    tuple giving the branch of each of the ``len(boundaries) + 1`` stages (a branch may serve
    several stages, e.g. the unguided denoiser on both sides of a guidance interval).
    """
    t = as_float_array(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(f"t must have shape () or (B,) = ({x.shape[0]},); got {t.shape}.")
    table = jnp.asarray(assignment, jnp.int32)
    branch = table[stage_index(process, t, boundaries)]
    if is_concrete(branch):
        # Concrete times (an eager call): dispatch on the host, so only the selected branch runs.
        ids = np.unique(np.asarray(branch))
        if ids.size == 1:
            return branches[int(ids[0])](x, t, cond)
    if len(branches) == 1:
        return branches[0](x, t, cond)
    shapes = [jax.eval_shape(b, x, t, cond) for b in branches]
    dtype = jnp.result_type(*[s.dtype for s in shapes])
    cast = [lambda x, t, cond, b=b: b(x, t, cond).astype(dtype) for b in branches]
    if branch.ndim == 0:
        return jax.lax.switch(branch, cast, x, t, cond)

    def shared(x, t, cond):
        return jax.lax.switch(branch[0], cast, x, t, cond)

    def mixed(x, t, cond):
        outs = [b(x, t, cond) for b in cast]
        sel = broadcast_to_batch(branch, outs[0])
        out = outs[0]
        for j in range(1, len(outs)):
            out = jnp.where(sel == j, outs[j], out)
        return out

    return jax.lax.cond(jnp.all(branch == branch[0]), shared, mixed, x, t, cond)


def _check_none_cond(cond, what):
    if cond is not None:
        raise ValueError(
            f"{what} sets the condition itself; call it with cond=None (wrap a guided "
            "denoiser inside it instead)."
        )


def _batch_leaf(c, batch):
    """A scalar condition leaf broadcast over the batch; other leaves unchanged."""
    c = jnp.asarray(c)
    return jnp.broadcast_to(c, (batch,)) if c.ndim == 0 else c


# ------------------------------------------------------------------------------------------------
# Experts per noise range
# ------------------------------------------------------------------------------------------------


def noise_range_experts(
    denoisers: Sequence[Callable], process, boundaries
) -> jax.tree_util.Partial:
    r"""A different denoiser per noise-level range: :math:`D = D_j` on stage :math:`I_j`.

    .. math::
        D(x, t, c) = D_j(x, t, c) \quad\text{for}\quad
        \varsigma(t) = \sigma(t)/\alpha(t) \in I_j = (b_{j-1}, b_j],

    with :math:`b_{-1} = 0`, :math:`b_{k-1} = \infty`; ``denoisers[0]`` serves the least noisy
    range. Only the selected expert runs when the batch shares its stage (see the module
    docstring); otherwise every expert runs and each example takes its own (exact).

    Args:
        denoisers: ``k >= 1`` denoisers ``(x, t, cond) -> x0_hat`` (raw or guided), ordered
            from the least to the most noisy range.
        process: the forward process (defines :math:`\varsigma(t)`).
        boundaries: ``k - 1`` strictly increasing noise levels inside
            ``[noise_level(t_min), noise_level(t_max)]``.

    Returns:
        The combined denoiser, a :class:`jax.tree_util.Partial` (pass it through ``jit`` when
        the experts are pytrees).

    Examples:
        >>> # a detail expert below noise level 0.5, the base model above it
        >>> combined = noise_range_experts([detail_net, base_net], process, [0.5])
        >>> x0_hat = combined(x_t, t, cond)
    """
    denoisers = tuple(denoisers)
    if not denoisers:
        raise ValueError("denoisers must hold at least one denoiser.")
    for i, d in enumerate(denoisers):
        check_callable(d, f"denoisers[{i}]")
    boundaries = check_noise_levels(boundaries, process, "boundaries")
    if boundaries.shape[0] != len(denoisers) - 1:
        raise ValueError(
            f"boundaries must hold len(denoisers) - 1 = {len(denoisers) - 1} noise levels; got "
            f"{boundaries.shape[0]}."
        )
    return jax.tree_util.Partial(_Experts(), denoisers, process, boundaries)


@static_config
class _Experts:
    def __call__(self, denoisers, process, boundaries, x, t, cond=None):
        x = batched_x(x)
        branches = [
            lambda x, t, cond, d=d: single_call(d, x, t, cond) for d in denoisers
        ]
        return run_by_stage(
            branches, tuple(range(len(denoisers))), process, boundaries, x, t, cond
        )


# ------------------------------------------------------------------------------------------------
# Condition stages
# ------------------------------------------------------------------------------------------------


def condition_schedule(denoiser: Callable, process, conds, boundaries) -> jax.tree_util.Partial:
    r"""A different condition per noise-level stage (ProSpect-style): :math:`D(x, t, c_j)`.

    .. math::
        \tilde D(x, t) = D(x, t, c_j) \quad\text{for}\quad \varsigma(t) \in I_j,

    stages as in :func:`noise_range_experts` (``conds`` stage 0 is the least noisy). One call of
    ``denoiser`` whatever the stages: the condition of each example is gathered from ``conds``.

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` (raw, or e.g. classifier-free guided).
        process: the forward process.
        conds: a condition pytree stacked on a leading stage axis of size ``k``: every leaf has
            shape ``(k, B, ...)``, or ``(k,)`` for one scalar per stage shared by the batch (a
            label).
        boundaries: ``k - 1`` strictly increasing noise levels in the process's range.

    Returns:
        ``scheduled(x, t, cond=None) -> x0_hat``; ``cond`` must be None (the schedule sets it).

    Examples:
        >>> # label 3 while the noise level is above 1.0 (layout), label 5 below (details)
        >>> scheduled = condition_schedule(denoiser, process, jnp.array([5, 3]), [1.0])
        >>> x = jaxdiff.sample(key, scheduled, process, (8, 2))
    """
    check_callable(denoiser, "denoiser")
    boundaries = check_noise_levels(boundaries, process, "boundaries")
    k = boundaries.shape[0] + 1
    leaves = jax.tree.leaves(conds)
    if not leaves:
        raise ValueError("conds must hold at least one array leaf.")
    for leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape or shape[0] != k:
            raise ValueError(
                f"every leaf of conds must have a leading stage axis of size len(boundaries) + 1 "
                f"= {k}; got a leaf of shape {shape}."
            )
    return jax.tree_util.Partial(_Scheduled(), denoiser, process, conds, boundaries)


@static_config
class _Scheduled:
    def __call__(self, denoiser, process, conds, boundaries, x, t, cond=None):
        _check_none_cond(cond, "condition_schedule")
        x = batched_x(x)
        batch = x.shape[0]
        stage = jnp.broadcast_to(stage_index(process, t, boundaries), (batch,))

        def gather(c):
            c = jnp.asarray(c)
            if c.ndim == 1:
                return c[stage]
            if c.shape[1] != batch:
                raise ValueError(
                    f"conds leaves must have shape (k, B, ...) with B = {batch}, or (k,); got "
                    f"{c.shape}."
                )
            return c[stage, jnp.arange(batch)]

        return single_call(denoiser, x, t, jax.tree.map(gather, conds))


# ------------------------------------------------------------------------------------------------
# Condition blending
# ------------------------------------------------------------------------------------------------

_BLEND_MODES = ("auto", "condition", "prediction")


def condition_blend(
    denoiser: Callable, process, cond_a, cond_b, weight_fn: Callable, *, mode: str = "auto"
) -> jax.tree_util.Partial:
    r"""Blend two conditions over the noise levels (prompt blending).

    With :math:`w = w(\varsigma(t))`, ``w = 0`` meaning ``cond_a`` and ``w = 1`` ``cond_b``:

    * ``mode="condition"`` (float leaves: embeddings):
      :math:`\tilde D = D\big(x, t, (1 - w)c_a + w c_b\big)`, one call;
    * ``mode="prediction"`` (any leaves, needed for integer labels):
      :math:`\tilde D = (1 - w)D(x, t, c_a) + w D(x, t, c_b)`, one call on a stacked
      ``(2, B, ...)`` axis;
    * ``mode="auto"`` (default): ``"condition"`` when every leaf is floating, else
      ``"prediction"``.

    Both forms are exactly the single-condition denoisers at ``w = 0`` and ``w = 1``; in
    between they differ (the network is not linear in its condition).

    Args:
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        cond_a, cond_b: conditions with the same tree structure and broadcast-compatible
            leaves (``(B, ...)``; scalar leaves are broadcast over the batch).
        weight_fn: ``w(noise_level) -> weight`` mapping the ``(B,)`` noise levels to weights of
            shape ``()`` or ``(B,)`` in ``[0, 1]`` (may be a ``Partial`` holding arrays).
        mode: ``"auto"``, ``"condition"`` or ``"prediction"``.

    Returns:
        ``blended(x, t, cond=None) -> x0_hat``; ``cond`` must be None.

    Examples:
        >>> w = lambda nl: jnp.clip(jnp.log(nl), 0.0, 1.0)   # cond_b at high noise
        >>> blended = condition_blend(denoiser, process, emb_detail, emb_layout, w)
    """
    check_callable(denoiser, "denoiser")
    check_callable(weight_fn, "weight_fn")
    if mode not in _BLEND_MODES:
        raise ValueError(f"mode must be one of {_BLEND_MODES}; got {mode!r}.")
    def_a, def_b = jax.tree.structure(cond_a), jax.tree.structure(cond_b)
    if def_a != def_b:
        raise ValueError(
            f"cond_b must have the tree structure of cond_a; got {def_b} for cond_a {def_a}."
        )
    leaves = jax.tree.leaves(cond_a) + jax.tree.leaves(cond_b)
    if not leaves:
        raise ValueError("cond_a must hold at least one array leaf.")
    for a, b in zip(jax.tree.leaves(cond_a), jax.tree.leaves(cond_b)):
        try:
            np.broadcast_shapes(jnp.shape(a), jnp.shape(b))
        except ValueError:
            raise ValueError(
                f"leaves of cond_a and cond_b must broadcast together; got shapes "
                f"{jnp.shape(a)} and {jnp.shape(b)}."
            ) from None
    floating = all(jnp.issubdtype(jnp.result_type(v), jnp.floating) for v in leaves)
    if mode == "auto":
        mode = "condition" if floating else "prediction"
    elif mode == "condition" and not floating:
        raise ValueError(
            "mode='condition' interpolates the conditions and needs floating leaves; use "
            "mode='prediction' for integer conditions (labels)."
        )
    return jax.tree_util.Partial(_Blended(mode), denoiser, process, cond_a, cond_b, weight_fn)


@static_config
class _Blended:
    mode: str

    def __call__(self, denoiser, process, cond_a, cond_b, weight_fn, x, t, cond=None):
        _check_none_cond(cond, "condition_blend")
        x = batched_x(x)
        batch = x.shape[0]
        nl = jnp.broadcast_to(process.noise_level(as_float_array(t)), (batch,))
        w = as_float_array(weight_fn(nl))
        if w.ndim > 1 or (w.ndim == 1 and w.shape[0] != batch):
            raise ValueError(f"weight_fn must return shape () or (B,) = ({batch},); got {w.shape}.")
        treedef = jax.tree.structure(cond_a)
        pairs = [
            jnp.broadcast_arrays(_batch_leaf(ca, batch), _batch_leaf(cb, batch))
            for ca, cb in zip(jax.tree.leaves(cond_a), jax.tree.leaves(cond_b))
        ]
        a = jax.tree.unflatten(treedef, [p[0] for p in pairs])
        b = jax.tree.unflatten(treedef, [p[1] for p in pairs])
        if self.mode == "condition":
            def mix(ca, cb):
                wc = broadcast_to_batch(w.astype(ca.dtype), ca, "weight")
                return (1.0 - wc) * ca + wc * cb

            return single_call(denoiser, x, t, jax.tree.map(mix, a, b))
        both = jax.tree.map(lambda ca, cb: jnp.stack([ca, cb]), a, b)
        out = stacked_call(denoiser, x, t, both)
        wo = broadcast_to_batch(w.astype(output_dtype(out)), x, "weight")
        return (1.0 - wo) * out[0] + wo * out[1]
