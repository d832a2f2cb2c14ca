r"""Building blocks shared by the networks: float32 norms and attention.

Mixed precision: the blocks accept bfloat16 inputs and parameters; normalisation statistics
and attention softmaxes are computed in (at least) float32 and the result is cast back to the
input's dtype, so a bfloat16 network only rounds where rounding is harmless.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ._base import group_count, wide_dtype

__all__ = ["GroupNorm", "LayerNorm", "Attention", "SpatialAttention", "dot_product_attention"]


def linear(in_features, out_features, *, dtype, param_dtype, rngs, zero=False) -> nnx.Linear:
    """``nnx.Linear`` with the network's dtypes (zero-initialised kernel and bias if ``zero``)."""
    kwargs = {"kernel_init": nnx.initializers.zeros_init()} if zero else {}
    return nnx.Linear(
        in_features, out_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kwargs
    )


def conv(in_features, out_features, kernel=3, *, stride=1, dtype, param_dtype, rngs) -> nnx.Conv:
    """A square ``'SAME'``-padded NHWC ``nnx.Conv`` with the network's dtypes."""
    return nnx.Conv(
        in_features,
        out_features,
        (kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class GroupNorm(nnx.Module):
    r"""Group normalisation of NHWC feature maps with statistics in float32.

    .. math::
        y = \frac{x - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}}\,\gamma + \beta,

    with :math:`\mu_g, \sigma_g^2` over ``(H, W)`` and the channels of each of ``groups`` groups.

    Args:
        channels: ``C``.
        groups: number of groups; must divide ``C``.

    Examples:
        >>> norm = GroupNorm(32, 8, rngs=nnx.Rngs(0))
        >>> y = norm(jnp.ones((2, 4, 4, 32)))   # (2, 4, 4, 32)
    """

    def __init__(self, channels: int, groups: int, *, eps: float = 1e-6,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs  # deterministic initialisation
        if channels % groups:
            raise ValueError(f"GroupNorm: groups={groups} must divide channels={channels}.")
        self.groups = groups
        self.eps = float(eps)
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

    def __call__(self, x):
        b, h, w, c = x.shape
        acc = wide_dtype(x.dtype)
        y = x.astype(acc).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(y, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(y - mean), axis=(1, 2, 4), keepdims=True)
        y = ((y - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(acc).reshape(1, 1, 1, c)
        y = y + self.bias[...].astype(acc).reshape(1, 1, 1, c)
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    r"""Layer normalisation over the last axis with statistics in float32.

    :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon}`, times a learned scale plus a learned bias
    when ``affine`` (adaLN blocks use ``affine=False`` and modulate instead).

    Examples:
        >>> y = LayerNorm(16, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 16)))
    """

    def __init__(self, features: int, *, affine: bool = True, eps: float = 1e-6,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs
        self.eps = float(eps)
        self.affine = bool(affine)
        if affine:
            self.scale = nnx.Param(jnp.ones((features,), param_dtype))
            self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x):
        acc = wide_dtype(x.dtype)
        y = x.astype(acc)
        mean = jnp.mean(y, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
            y = y * self.scale[...].astype(acc).reshape(shape)
            y = y + self.bias[...].astype(acc).reshape(shape)
        return y.astype(x.dtype)


def dot_product_attention(q, k, v, mask=None):
    r"""Scaled dot-product attention with the softmax in (at least) float32.

    .. math::
        \mathrm{out}_{q} = \sum_k \mathrm{softmax}_k\Big(\frac{q\cdot k}{\sqrt{D}}\Big) v_k

    Args:
        q: ``(B, Lq, heads, D)``.
        k, v: ``(B, Lk, heads, D)``.
        mask: optional ``(B, Lk)`` bool, True where a key may be attended to. Every row must
            keep at least one key.

    Returns:
        ``(B, Lq, heads, D)`` in ``v``'s dtype.

    Examples:
        >>> q = k = v = jnp.ones((2, 5, 4, 8))
        >>> out = dot_product_attention(q, k, v)    # (2, 5, 4, 8)
    """
    acc = wide_dtype(q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=acc)
    logits = logits * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(acc).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class Attention(nnx.Module):
    r"""Multi-head attention of ``x`` to itself or to a ``context`` sequence.

    Args:
        dim: width of ``x`` (queries and output).
        num_heads: must divide ``dim``.
        context_dim: width of the context for cross-attention (None: self-attention).
        zero_out: zero-initialise the output projection.

    Call: ``attn(x (B, L, dim), context (B, Lc, context_dim) | None, mask (B, Lc) | None)``.

    Examples:
        >>> attn = Attention(16, 4, rngs=nnx.Rngs(0))
        >>> y = attn(jnp.ones((2, 5, 16)))   # (2, 5, 16)
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None,
                 zero_out: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"Attention: num_heads={num_heads} must divide the width {dim}.")
        self.num_heads = num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = linear(dim, dim, **kw)
        self.key_value = linear(dim if context_dim is None else context_dim, 2 * dim, **kw)
        self.out = linear(dim, dim, zero=zero_out, **kw)

    def __call__(self, x, context=None, mask=None):
        b, length, dim = x.shape
        context = x if context is None else context
        heads = self.num_heads
        q = self.query(x).reshape(b, length, heads, dim // heads)
        k, v = jnp.split(self.key_value(context), 2, axis=-1)
        k = k.reshape(b, context.shape[1], heads, dim // heads)
        v = v.reshape(b, context.shape[1], heads, dim // heads)
        out = dot_product_attention(q, k, v, mask).reshape(b, length, dim)
        return self.out(out)


class SpatialAttention(nnx.Module):
    """Residual attention over the ``H * W`` positions of an NHWC map: ``x + Attn(GN(x))``.

    Self-attention when ``context_dim`` is None, else cross-attention to a context sequence.

    Examples:
        >>> block = SpatialAttention(16, 1, groups=4, rngs=nnx.Rngs(0))
        >>> y = block(jnp.ones((2, 4, 4, 16)))   # (2, 4, 4, 16)
    """

    def __init__(self, channels: int, num_heads: int, *, groups: int = 32,
                 context_dim: int | None = None, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.norm = GroupNorm(
            channels, group_count(channels, groups), param_dtype=param_dtype, rngs=rngs
        )
        self.attn = Attention(channels, num_heads, context_dim=context_dim, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, context=None, mask=None):
        b, h, w, c = x.shape
        y = self.attn(self.norm(x).reshape(b, h * w, c), context, mask)
        return x + y.reshape(b, h, w, c).astype(x.dtype)
