r"""A DDPM++-style U-Net for NHWC images (Song et al. 2021; Karras et al. 2022).

Residual blocks (GroupNorm -> SiLU -> conv, FiLM scale/shift from the noise/label embedding,
GroupNorm -> SiLU -> conv, skip rescaled by :math:`1/\sqrt2`), strided-conv down-sampling,
nearest-neighbour + conv up-sampling, skip connections between the two halves, self-attention
(and optional cross-attention to a context sequence) at the chosen resolutions and in the
middle. No dropout: the forward pass is deterministic.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ._base import (
    check_c_noise,
    check_choice,
    check_input,
    check_int,
    check_int_tuple,
    compute_dtype,
    group_count,
    resolve_dtypes,
    store_config,
    wide_dtype,
)
from .conditioning import Conditioning
from .embeddings import EMBEDDINGS, NoiseEmbedding
from .layers import GroupNorm, SpatialAttention, conv, linear

__all__ = ["UNet", "ResBlock"]

_SKIP_SCALE = 1.0 / math.sqrt(2.0)


class ResBlock(nnx.Module):
    r"""Residual conv block with FiLM conditioning (DDPM++ / BigGAN style).

    .. math::
        h = \mathrm{conv}_1(\mathrm{SiLU}(\mathrm{GN}(x))),\quad
        h = \mathrm{GN}(h)(1 + s) + b,\quad
        y = \big(\mathrm{skip}(x) + \mathrm{conv}_2(\mathrm{SiLU}(h))\big)/\sqrt2,

    with :math:`(s, b)` a linear map of :math:`\mathrm{SiLU}(e)`. With ``emb_dim=0`` there is no
    modulation (used by the clean-image classifier).

    Call: ``block(x (B, H, W, C_in), emb (B, emb_dim) | None) -> (B, H, W, C_out)``.

    Examples:
        >>> block = ResBlock(8, 16, 32, groups=4, rngs=nnx.Rngs(0))
        >>> y = block(jnp.ones((2, 4, 4, 8)), jnp.ones((2, 32)))    # (2, 4, 4, 16)
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *, groups: int = 32,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(in_channels, group_count(in_channels, groups),
                               param_dtype=param_dtype, rngs=rngs)
        self.conv1 = conv(in_channels, out_channels, **kw)
        self.film = linear(emb_dim, 2 * out_channels, **kw) if emb_dim else None
        self.norm2 = GroupNorm(out_channels, group_count(out_channels, groups),
                               param_dtype=param_dtype, rngs=rngs)
        self.conv2 = conv(out_channels, out_channels, **kw)
        self.skip = (
            None if in_channels == out_channels else conv(in_channels, out_channels, 1, **kw)
        )

    def __call__(self, x, emb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = jnp.split(self.film(jax.nn.silu(emb)), 2, axis=-1)
            c = h.shape[-1]
            h = h * (1 + scale.reshape(-1, 1, 1, c)) + shift.reshape(-1, 1, 1, c)
        h = self.conv2(jax.nn.silu(h))
        skip = x if self.skip is None else self.skip(x)
        return ((skip + h.astype(skip.dtype)) * _SKIP_SCALE).astype(x.dtype)


class _Stage(nnx.Module):
    """A residual block, optionally followed by self-attention and cross-attention."""

    def __init__(self, in_ch, out_ch, emb_dim, *, attn, num_heads, context_dim, groups, dtype,
                 param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.res = ResBlock(in_ch, out_ch, emb_dim, groups=groups, **kw)
        self.attn = SpatialAttention(out_ch, num_heads, groups=groups, **kw) if attn else None
        self.cross = (
            SpatialAttention(out_ch, num_heads, groups=groups, context_dim=context_dim, **kw)
            if attn and context_dim
            else None
        )

    def __call__(self, h, emb, context, mask):
        h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.cross is not None:
            h = self.cross(h, context, mask)
        return h


class _Down(nnx.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, channels, *, dtype, param_dtype, rngs):
        self.conv = conv(channels, channels, stride=2, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

    def __call__(self, h):
        return self.conv(h)


class _Up(nnx.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, channels, *, dtype, param_dtype, rngs):
        self.conv = conv(channels, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h):
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        return self.conv(h)


class UNet(nnx.Module):
    r"""DDPM++-style U-Net denoising network for NHWC images.

    Levels ``i = 0 .. len(channel_mult) - 1`` have ``base_channels * channel_mult[i]`` channels
    and spatial size ``image_size / 2**i``; each has ``num_res_blocks`` residual blocks on the
    way down (``+1`` on the way up, consuming the skips). A level whose size is in
    ``attn_resolutions`` adds self-attention after each block (and cross-attention when
    ``context_dim > 0``); the middle always has both.

    Inputs of any size ``(B, H, W, channels)`` with ``H`` and ``W`` divisible by
    ``2**(len(channel_mult) - 1)`` are accepted; ``image_size`` only decides, at construction,
    at which levels attention sits.

    Args:
        channels: image channels (input and output).
        image_size: the nominal image size, for ``attn_resolutions``.
        base_channels: channels of level 0.
        channel_mult: per-level channel multipliers (its length is the number of levels).
        num_res_blocks: residual blocks per level (down path).
        attn_resolutions: level sizes (``image_size / 2**i``) with attention.
        num_heads: attention heads (must divide the channels of every attention level).
        num_classes: 0, or the number of classes (null label ``num_classes``).
        context_dim, context_len: cross-attention context width and length (0: none).
        embedding: ``"positional"`` or ``"fourier"`` noise embedding.
        norm_groups: maximum GroupNorm group count (the largest divisor of each width).
        dtype, param_dtype: compute and parameter dtypes.
        rngs: ``nnx.Rngs``.

    Call: ``net(x (B, H, W, channels), c_noise (B,), cond=None, *, cep=None)``; ``cond`` as in
    :mod:`jaxdiff.nets.conditioning`. Output: the shape of ``x`` in float32 (float64 in float64).

    Examples:
        >>> net = UNet(channels=1, image_size=8, base_channels=16, channel_mult=[1, 2],
        ...            attn_resolutions=[4], num_classes=10, rngs=nnx.Rngs(0))
        >>> out = net(jnp.zeros((2, 8, 8, 1)), jnp.zeros(2), jnp.array([3, 10]))
    """

    def __init__(self, *, channels: int, image_size: int = 32, base_channels: int = 64,
                 channel_mult=(1, 2, 2), num_res_blocks: int = 2, attn_resolutions=(16,),
                 num_heads: int = 1, num_classes: int = 0, context_dim: int = 0,
                 context_len: int = 0, embedding: str = "positional", norm_groups: int = 32,
                 dtype=None, param_dtype="float32", rngs: nnx.Rngs):
        store_config(self, locals())
        self.channels = check_int(channels, "channels", minimum=1)
        image_size = check_int(image_size, "image_size", minimum=1)
        base = check_int(base_channels, "base_channels", minimum=1)
        mults = check_int_tuple(channel_mult, "channel_mult", minimum=1, allow_empty=False)
        num_res_blocks = check_int(num_res_blocks, "num_res_blocks", minimum=1)
        attn_res = check_int_tuple(attn_resolutions, "attn_resolutions", minimum=1)
        num_heads = check_int(num_heads, "num_heads", minimum=1)
        groups = check_int(norm_groups, "norm_groups", minimum=1)
        check_choice(embedding, "embedding", EMBEDDINGS)
        self.factor = 2 ** (len(mults) - 1)
        if image_size % self.factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2**(len(channel_mult) - 1) = "
                f"{self.factor}."
            )
        sizes = [image_size // 2**i for i in range(len(mults))]
        unknown = sorted(set(attn_res) - set(sizes))
        if unknown:
            raise ValueError(
                f"attn_resolutions {unknown} are not level sizes; with image_size={image_size} "
                f"and {len(mults)} levels the sizes are {sizes}."
            )
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        emb_dim = 4 * base
        stage_kw = dict(num_heads=num_heads, context_dim=context_dim, groups=groups, **kw)
        for i, m in enumerate(mults):
            if (sizes[i] in attn_res or i == len(mults) - 1) and (base * m) % num_heads:
                raise ValueError(
                    f"num_heads={num_heads} must divide the {base * m} channels of level {i}."
                )

        self.noise_embedding = NoiseEmbedding(2 * ((base + 1) // 2), emb_dim, kind=embedding, **kw)
        self.conditioning = Conditioning(num_classes=num_classes, context_dim=context_dim,
                                         context_len=context_len, emb_dim=emb_dim, **kw)
        self.conv_in = conv(self.channels, base, **kw)

        ch, skips, down = base, [base], []
        for i, m in enumerate(mults):
            for _ in range(num_res_blocks):
                down.append(_Stage(ch, base * m, emb_dim, attn=sizes[i] in attn_res, **stage_kw))
                ch = base * m
                skips.append(ch)
            if i < len(mults) - 1:
                down.append(_Down(ch, **kw))
                skips.append(ch)
        self.down = nnx.List(down)
        self.mid = _Stage(ch, ch, emb_dim, attn=True, **stage_kw)
        self.mid_res = ResBlock(ch, ch, emb_dim, groups=groups, **kw)
        up = []
        for i in reversed(range(len(mults))):
            for _ in range(num_res_blocks + 1):
                up.append(_Stage(ch + skips.pop(), base * mults[i], emb_dim,
                                 attn=sizes[i] in attn_res, **stage_kw))
                ch = base * mults[i]
            if i > 0:
                up.append(_Up(ch, **kw))
        self.up = nnx.List(up)
        self.norm_out = GroupNorm(ch, group_count(ch, groups), param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv(ch, self.channels, **kw)

    def null_cond(self, batch_size: int):
        """The null condition (see :mod:`jaxdiff.nets.conditioning`); None if unconditional."""
        return self.conditioning.null_cond(batch_size)

    def _check(self, x):
        expected = (
            f"(B, H, W, {self.channels}) with H, W divisible by {self.factor}"
            if self.factor > 1
            else f"(B, H, W, {self.channels})"
        )
        check_input(x, "UNet", expected, 4)
        _, h, w, c = x.shape
        if c != self.channels or h % self.factor or w % self.factor:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; this UNet expects {expected}."
            )

    def __call__(self, x, c_noise, cond=None, *, cep=None):
        self._check(x)
        cdt = compute_dtype(self.dtype, x)
        c = check_c_noise(c_noise, x.shape[0], "UNet")
        cond_emb, context, mask = self.conditioning(cond, x.shape[0], cdt, cep)
        emb = self.noise_embedding(c, cdt)
        if cond_emb is not None:
            emb = emb + cond_emb

        h = self.conv_in(x.astype(cdt))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, context, mask) if isinstance(layer, _Stage) else layer(h)
            hs.append(h)
        h = self.mid_res(self.mid(h, emb, context, mask), emb)
        for layer in self.up:
            if isinstance(layer, _Stage):
                h = layer(jnp.concatenate([h, hs.pop()], axis=-1), emb, context, mask)
            else:
                h = layer(h)
        out = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return out.astype(wide_dtype(cdt))
