r"""Image classifiers: a noise-conditional one (for classifier guidance) and a clean one.

These do not follow the denoiser contract:

* :class:`NoiseClassifier`: ``clf(x_t (B, H, W, C), c_noise (B,)) -> logits (B, num_classes)``,
  the classifier :math:`p(y \mid x_t)` of classifier guidance (Dhariwal & Nichol 2021), with the
  same ``c_noise = -log_snr(t) / 8`` as the denoisers (:func:`jaxdiff.nets.make_classifier`
  converts from ``t``);
* :class:`Classifier`: ``clf(x (B, H, W, C)) -> logits (B, num_classes)`` on clean images (e.g.
  for a classifier-based sample quality score on 8x8 digits).

Both are small conv encoders (residual blocks, strided down-sampling, global average pooling)
and return float32 logits (float64 in float64).
"""

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
from .embeddings import EMBEDDINGS, NoiseEmbedding
from .layers import GroupNorm, conv, linear
from .unet import ResBlock

__all__ = ["NoiseClassifier", "Classifier"]


class _Encoder(nnx.Module):
    """conv_in -> [ResBlock x n, strided conv] per level -> GN -> SiLU -> mean pool -> linear."""

    def __init__(self, *, channels, num_classes, base_channels, channel_mult, num_res_blocks,
                 norm_groups, emb_dim, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.channels = check_int(channels, "channels", minimum=1)
        check_int(num_classes, "num_classes", minimum=2)
        base = check_int(base_channels, "base_channels", minimum=1)
        mults = check_int_tuple(channel_mult, "channel_mult", minimum=1, allow_empty=False)
        num_res_blocks = check_int(num_res_blocks, "num_res_blocks", minimum=1)
        groups = check_int(norm_groups, "norm_groups", minimum=1)
        self.factor = 2 ** (len(mults) - 1)
        self.conv_in = conv(self.channels, base, **kw)
        layers, ch = [], base
        for i, m in enumerate(mults):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, base * m, emb_dim, groups=groups, **kw))
                ch = base * m
            if i < len(mults) - 1:
                layers.append(conv(ch, ch, stride=2, **kw))
        self.layers = nnx.List(layers)
        self.norm_out = GroupNorm(ch, group_count(ch, groups), param_dtype=param_dtype, rngs=rngs)
        self.head = linear(ch, num_classes, **kw)

    def check(self, x, name):
        expected = f"(B, H, W, {self.channels}) with H, W divisible by {self.factor}"
        check_input(x, name, expected, 4)
        _, h, w, c = x.shape
        if c != self.channels or h % self.factor or w % self.factor:
            raise ValueError(f"x has shape {tuple(x.shape)}; this {name} expects {expected}.")

    def __call__(self, x, emb, cdt):
        h = self.conv_in(x.astype(cdt))
        for layer in self.layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        h = jax.nn.silu(self.norm_out(h))
        pooled = jnp.mean(h.astype(wide_dtype(h.dtype)), axis=(1, 2)).astype(h.dtype)
        return self.head(pooled).astype(wide_dtype(cdt))


class NoiseClassifier(nnx.Module):
    r"""Noise-conditional image classifier :math:`\log p(y \mid x_t)` (unnormalised logits).

    Every residual block is FiLM-modulated by the embedding of ``c_noise``.

    Args:
        channels: image channels.
        num_classes: number of classes (>= 2).
        base_channels, channel_mult, num_res_blocks, norm_groups: as :class:`jaxdiff.nets.UNet`
            (the encoder half).
        embedding: ``"positional"`` or ``"fourier"``.
        dtype, param_dtype: compute and parameter dtypes.
        rngs: ``nnx.Rngs``.

    Call: ``clf(x_t (B, H, W, channels), c_noise (B,)) -> logits (B, num_classes)``.

    Examples:
        >>> clf = NoiseClassifier(channels=1, num_classes=10, base_channels=16,
        ...                       rngs=nnx.Rngs(0))
        >>> logits = clf(jnp.zeros((4, 8, 8, 1)), jnp.zeros(4))    # (4, 10)
    """

    def __init__(self, *, channels: int, num_classes: int, base_channels: int = 32,
                 channel_mult=(1, 2), num_res_blocks: int = 1, embedding: str = "positional",
                 norm_groups: int = 8, dtype=None, param_dtype="float32", rngs: nnx.Rngs):
        store_config(self, locals())
        check_choice(embedding, "embedding", EMBEDDINGS)
        base = check_int(base_channels, "base_channels", minimum=1)
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        self.dtype = dtype
        emb_dim = 4 * base
        self.noise_embedding = NoiseEmbedding(2 * ((base + 1) // 2), emb_dim, kind=embedding,
                                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = _Encoder(channels=channels, num_classes=num_classes, base_channels=base,
                                channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                                norm_groups=norm_groups, emb_dim=emb_dim, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, c_noise):
        self.encoder.check(x, "NoiseClassifier")
        cdt = compute_dtype(self.dtype, x)
        emb = self.noise_embedding(check_c_noise(c_noise, x.shape[0], "NoiseClassifier"), cdt)
        return self.encoder(x, emb, cdt)


class Classifier(nnx.Module):
    r"""Classifier of clean images: logits of :math:`p(y \mid x)`.

    Args:
        channels, num_classes, base_channels, channel_mult, num_res_blocks, norm_groups, dtype,
            param_dtype, rngs: as :class:`NoiseClassifier`.

    Call: ``clf(x (B, H, W, channels)) -> logits (B, num_classes)``.

    Examples:
        >>> clf = Classifier(channels=1, num_classes=10, base_channels=16, rngs=nnx.Rngs(0))
        >>> logits = clf(jnp.zeros((4, 8, 8, 1)))    # (4, 10)
    """

    def __init__(self, *, channels: int, num_classes: int, base_channels: int = 32,
                 channel_mult=(1, 2), num_res_blocks: int = 1, norm_groups: int = 8,
                 dtype=None, param_dtype="float32", rngs: nnx.Rngs):
        store_config(self, locals())
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        self.dtype = dtype
        self.encoder = _Encoder(channels=channels, num_classes=num_classes,
                                base_channels=base_channels, channel_mult=channel_mult,
                                num_res_blocks=num_res_blocks, norm_groups=norm_groups, emb_dim=0,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        self.encoder.check(x, "Classifier")
        return self.encoder(x, None, compute_dtype(self.dtype, x))
