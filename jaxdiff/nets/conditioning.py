r"""Conditioning: class labels with a learned null label, cross-attention sequences, and CEP.

**The ``cond`` pytree** of a network depends on its config:

===========================================  ====================================================
config                                       ``cond``
===========================================  ====================================================
``num_classes == 0``, ``context_dim == 0``   None (unconditional; anything else is refused)
``num_classes > 0`` only                     int labels ``(B,)`` in ``[0, num_classes]``
``context_dim > 0`` only                     ``{"tokens": (B, L, context_dim) float,
                                             "mask": (B, L) bool}``, ``L == context_len``
both                                         ``{"label": (B,), "tokens": ..., "mask": ...}``
===========================================  ====================================================

**Null condition.** The label table has ``num_classes + 1`` rows; index ``num_classes``
(:func:`null_label`) is the learned "no label". A context row whose ``mask`` is all False means
"no context": the network substitutes a learned null sequence ``(context_len, context_dim)``
(attended to in full). ``net.null_cond(B)`` returns the null labels and, for contexts, zero
tokens with an all-False mask -- the same structure and shapes as a real ``cond``, so
condition dropout (``where(drop, null, cond)`` leaf by leaf) and classifier-free guidance work
leaf-wise. ``cond=None`` on a conditional network means the null condition.

**Condition Embedding Perturbation** (CEP; Chen et al. 2024, "Slight corruption in pre-training
data makes better diffusion models"): during training the condition embedding :math:`e \in
\mathbb{R}^d` is replaced by :math:`e + \delta` with

* CEP-U: :math:`\delta \sim U(-\gamma/\sqrt d, \gamma/\sqrt d)^d`,
* CEP-G: :math:`\delta \sim N(0, (\gamma/\sqrt d)^2 I_d)` -- per-coordinate standard deviation
  :math:`\gamma/\sqrt d`, so :math:`E\|\delta\|^2 = \gamma^2` (CEP-U gives
  :math:`\gamma^2/3`).

The embedding is the label-table row (``d`` = the network's embedding width) and each context
token (``d = context_dim``). Null rows are never perturbed: the null condition stays the fixed
point that guidance extrapolates from. Networks take ``cep=(key, gamma, kind)`` with
``kind in ("uniform", "gaussian")``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .._utils import is_concrete
from ._base import check_int
from .layers import linear

__all__ = ["CEP_KINDS", "null_label", "cep_noise", "Conditioning"]

#: The accepted ``kind`` of a ``cep=(key, gamma, kind)`` triple.
CEP_KINDS = ("uniform", "gaussian")


def null_label(num_classes: int) -> int:
    """The index of the learned null label: ``num_classes`` (the last row of the table).

    Examples:
        >>> null_label(10)
        10
    """
    return check_int(num_classes, "num_classes", minimum=1)


def cep_noise(key, shape, gamma, kind: str, dtype=jnp.float32):
    r"""Condition Embedding Perturbation noise :math:`\delta` for embeddings of width ``shape[-1]``.

    ``"uniform"``: :math:`\delta_i \sim U(-\gamma/\sqrt d, \gamma/\sqrt d)`; ``"gaussian"``:
    :math:`\delta_i \sim N(0, (\gamma/\sqrt d)^2)` (standard deviation :math:`\gamma/\sqrt d`),
    independent, with :math:`d` = ``shape[-1]``.

    Args:
        key: a typed key (``jax.random.key``).
        shape: shape of the embedding to perturb, e.g. ``(B, d)`` or ``(B, L, d)``.
        gamma: :math:`\gamma \ge 0` (may be traced).
        kind: ``"uniform"`` or ``"gaussian"``.
        dtype: dtype of the result (drawn in at least float32, then cast).

    Examples:
        >>> delta = cep_noise(jax.random.key(0), (4, 64), 0.1, "gaussian")   # std 0.1 / 8
    """
    if kind not in CEP_KINDS:
        raise ValueError(f"cep kind must be one of {CEP_KINDS}; got {kind!r}.")
    shape = tuple(shape)
    if not shape or shape[-1] < 1:
        raise ValueError(f"cep_noise: shape must end with the embedding width d >= 1; got {shape}.")
    if is_concrete(gamma):
        g = np.asarray(gamma, dtype=np.float64)
        if g.ndim != 0 or not np.isfinite(g) or g < 0:
            raise ValueError(f"cep gamma must be a finite scalar >= 0; got {gamma}.")
    draw_dtype = jnp.promote_types(dtype, jnp.float32)
    bound = jnp.asarray(gamma).astype(draw_dtype) * (1.0 / math.sqrt(shape[-1]))
    if kind == "uniform":
        unit = jax.random.uniform(key, shape, draw_dtype, minval=-1.0, maxval=1.0)
    else:
        unit = jax.random.normal(key, shape, draw_dtype)
    return (unit * bound).astype(dtype)


def _parse_cep(cep):
    if cep is None:
        return None
    if not isinstance(cep, tuple | list) or len(cep) != 3:
        raise TypeError(f"cep must be None or a tuple (key, gamma, kind); got {cep!r}.")
    key, gamma, kind = cep
    if kind not in CEP_KINDS:
        raise ValueError(f"cep kind must be one of {CEP_KINDS}; got {kind!r}.")
    return key, gamma, kind


class Conditioning(nnx.Module):
    """The conditioning inputs of a network: label table, null sequence, pooled context.

    Args:
        num_classes: number of real classes (0: no labels). The table has one more row.
        context_dim: width of the cross-attention tokens (0: no context).
        context_len: number of context tokens ``L`` (required with ``context_dim``).
        emb_dim: width of the vector embedding the label (and the pooled context) is added to.

    Call: ``conditioning(cond, batch, dtype, cep) -> (emb, tokens, mask)`` with ``emb``
    ``(B, emb_dim)`` or None, ``tokens`` ``(B, L, context_dim)`` (null rows substituted) or
    None and ``mask`` ``(B, L)`` bool or None; see the module docstring for ``cond``.

    Examples:
        >>> cond_net = Conditioning(num_classes=10, emb_dim=32, rngs=nnx.Rngs(0))
        >>> emb, _, _ = cond_net(jnp.arange(4), 4, jnp.float32)     # (4, 32)
    """

    def __init__(self, *, num_classes: int = 0, context_dim: int = 0, context_len: int = 0,
                 emb_dim: int, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_classes = check_int(num_classes, "num_classes")
        self.context_dim = check_int(context_dim, "context_dim")
        self.context_len = check_int(context_len, "context_len")
        if self.context_dim and not self.context_len:
            raise ValueError("context_len must be >= 1 when context_dim > 0.")
        if self.context_len and not self.context_dim:
            raise ValueError("context_len must be 0 when context_dim is 0 (no cross-attention).")
        self.label_embed = (
            nnx.Embed(self.num_classes + 1, emb_dim, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
            if self.num_classes
            else None
        )
        if self.context_dim:
            shape = (self.context_len, self.context_dim)
            self.null_tokens = nnx.Param(jax.random.normal(rngs.params(), shape, param_dtype))
            self.context_pool = linear(
                self.context_dim, emb_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.null_tokens = None
            self.context_pool = None

    @property
    def conditional(self) -> bool:
        """Whether the network takes a condition at all."""
        return bool(self.num_classes or self.context_dim)

    def expected(self) -> str:
        """A description of the ``cond`` this network expects (for error messages)."""
        ctx = (f'"tokens": (B, {self.context_len}, {self.context_dim}) float, '
               f'"mask": (B, {self.context_len}) bool')
        if self.num_classes and self.context_dim:
            return f'{{"label": (B,) int, {ctx}}}'
        if self.context_dim:
            return f"{{{ctx}}}"
        if self.num_classes:
            return f"int labels of shape (B,) in [0, {self.num_classes}]"
        return "None (this network is unconditional)"

    def null_cond(self, batch_size: int):
        """The null condition for ``batch_size`` examples (None for an unconditional network)."""
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        labels = jnp.full((batch_size,), self.num_classes, jnp.int32)
        if not self.context_dim:
            return labels if self.num_classes else None
        context = {
            "tokens": jnp.zeros((batch_size, self.context_len, self.context_dim), jnp.float32),
            "mask": jnp.zeros((batch_size, self.context_len), bool),
        }
        return {"label": labels, **context} if self.num_classes else context

    def _split(self, cond, batch):
        """``(labels, tokens, mask)`` from ``cond``, validated."""
        if not self.conditional:
            if cond is not None:
                raise TypeError(f"cond must be None: this network is unconditional; got {cond!r}.")
            return None, None, None
        if cond is None:
            cond = self.null_cond(batch)
        labels = tokens = mask = None
        if self.context_dim:
            keys = ("label", "tokens", "mask") if self.num_classes else ("tokens", "mask")
            if not isinstance(cond, dict) or set(cond) != set(keys):
                raise TypeError(f"cond must be {self.expected()}; got {_describe(cond)}.")
            tokens, mask = jnp.asarray(cond["tokens"]), jnp.asarray(cond["mask"])
            want = (batch, self.context_len, self.context_dim)
            if tokens.shape != want or not jnp.issubdtype(tokens.dtype, jnp.floating):
                raise ValueError(
                    f'cond["tokens"] must be a float array of shape {want}; got '
                    f"{tokens.dtype}{tuple(tokens.shape)}."
                )
            if mask.shape != want[:2] or mask.dtype != jnp.bool_:
                raise ValueError(
                    f'cond["mask"] must be a bool array of shape {want[:2]}; got '
                    f"{mask.dtype}{tuple(mask.shape)}."
                )
            if self.num_classes:
                labels = cond["label"]
        elif self.num_classes:
            labels = cond
        if labels is not None:
            labels = jnp.asarray(labels)
            if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(
                    f"class labels must be ints of shape (B,) = ({batch},); got "
                    f"{labels.dtype}{tuple(labels.shape)}."
                )
            if is_concrete(labels):
                values = np.asarray(labels)
                if values.size and (values.min() < 0 or values.max() > self.num_classes):
                    raise ValueError(
                        f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} "
                        f"is the null label); got values in [{values.min()}, {values.max()}]."
                    )
        return labels, tokens, mask

    def __call__(self, cond, batch: int, dtype, cep=None):
        labels, tokens, mask = self._split(cond, batch)
        cep = _parse_cep(cep) if self.conditional else None
        if cep is not None and labels is not None and tokens is not None:
            key_label, key_tokens = jax.random.split(cep[0])
        else:
            key_label = key_tokens = None if cep is None else cep[0]
        emb = None
        if labels is not None:
            emb = self.label_embed(labels).astype(dtype)
            if cep is not None:
                delta = cep_noise(key_label, emb.shape, cep[1], cep[2], dtype)
                emb = emb + jnp.where((labels == self.num_classes)[:, None], 0, delta).astype(dtype)
        if tokens is not None:
            is_null = ~jnp.any(mask, axis=1)
            tokens = tokens.astype(dtype)
            if cep is not None:
                delta = cep_noise(key_tokens, tokens.shape, cep[1], cep[2], dtype)
                tokens = tokens + jnp.where(is_null[:, None, None], 0, delta).astype(dtype)
            null = self.null_tokens[...].astype(dtype)[None]
            tokens = jnp.where(is_null[:, None, None], null, tokens)
            mask = mask | is_null[:, None]
            weights = mask.astype(dtype)[:, :, None]
            pooled = jnp.sum(tokens * weights, axis=1) / jnp.sum(weights, axis=1)
            pooled = self.context_pool(pooled).astype(dtype)
            emb = pooled if emb is None else emb + pooled
        return emb, tokens, mask


def _describe(cond):
    if isinstance(cond, dict):
        return "a dict with keys " + str(sorted(cond))
    shape = getattr(cond, "shape", None)
    return f"{type(cond).__name__}" + ("" if shape is None else f" of shape {tuple(shape)}")
