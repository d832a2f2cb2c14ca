r"""Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023).

The image is cut into ``p x p`` patches, linearly embedded, given fixed 2-D sine-cosine
position embeddings, and passed through transformer blocks whose LayerNorms are modulated by
the conditioning vector :math:`c` (noise embedding + label embedding + pooled context):

.. math::
    x \leftarrow x + g_1 \odot \mathrm{Attn}\big(\mathrm{LN}(x)(1 + s_1) + b_1\big),\qquad
    x \leftarrow x + g_2 \odot \mathrm{MLP}\big(\mathrm{LN}(x)(1 + s_2) + b_2\big),

with :math:`(b_i, s_i, g_i)` a linear map of :math:`\mathrm{SiLU}(c)` initialised to zero, so
every block is the identity at initialisation ("adaLN-Zero"). With a context, each block also
has a gated cross-attention branch (its own shift/scale/gate, also zero-initialised). The final
layer (adaLN-modulated LayerNorm and a linear map back to patches, both zero-initialised) is
unpatchified to the input's shape.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._base import (
    check_c_noise,
    check_choice,
    check_float,
    check_input,
    check_int,
    compute_dtype,
    resolve_dtypes,
    store_config,
    wide_dtype,
)
from .conditioning import Conditioning
from .embeddings import EMBEDDINGS, NoiseEmbedding
from .layers import Attention, LayerNorm, linear

__all__ = ["DiT", "DiTBlock", "patchify", "unpatchify", "sincos_2d"]


def patchify(x, patch_size: int):
    """``(B, H, W, C) -> (B, (H/p)(W/p), p*p*C)``, patches in row-major order.

    Examples:
        >>> patchify(jnp.zeros((2, 8, 8, 3)), 2).shape
        (2, 16, 12)
    """
    b, h, w, c = x.shape
    p = patch_size
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, patch_size: int, height: int, width: int):
    """Inverse of :func:`patchify`: ``(B, N, p*p*C) -> (B, H, W, C)``.

    Examples:
        >>> x = jnp.arange(2 * 4 * 4 * 3.0).reshape(2, 4, 4, 3)
        >>> bool(jnp.all(unpatchify(patchify(x, 2), 2, 4, 4) == x))
        True
    """
    b, _, d = tokens.shape
    p = patch_size
    c = d // (p * p)
    x = tokens.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    r"""Fixed 2-D sine-cosine position embeddings ``(grid_h * grid_w, dim)`` (float64 NumPy).

    Half of the width encodes the row, half the column, each as
    :math:`[\sin(p\,\omega_k), \cos(p\,\omega_k)]` with :math:`\omega_k = 10000^{-k/(d/4)}`.

    Examples:
        >>> sincos_2d(2, 3, 8).shape
        (6, 8)
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4; got {dim}.")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")

    def encode(pos):
        args = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(args), np.cos(args)], axis=1)

    return np.concatenate([encode(rows), encode(cols)], axis=1)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nnx.Module):
    r"""Transformer block with adaLN-Zero modulation (identity at initialisation).

    Call: ``block(x (B, N, hidden), c (B, hidden), context (B, L, context_dim) | None,
    mask (B, L) | None) -> (B, N, hidden)``.

    Examples:
        >>> block = DiTBlock(32, 4, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 16, 32))
        >>> bool(jnp.all(block(x, jnp.ones((2, 32))) == x))     # zero gates at init
        True
    """

    def __init__(self, hidden: int, num_heads: int, *, mlp_ratio: float = 4.0,
                 context_dim: int = 0, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm_kw = dict(affine=False, param_dtype=param_dtype, rngs=rngs)
        mlp_hidden = max(1, int(round(hidden * mlp_ratio)))
        self.branches = 3 if context_dim else 2
        self.norm_attn = LayerNorm(hidden, **norm_kw)
        self.attn = Attention(hidden, num_heads, **kw)
        if context_dim:
            self.norm_cross = LayerNorm(hidden, **norm_kw)
            self.cross = Attention(hidden, num_heads, context_dim=context_dim, **kw)
        else:
            self.norm_cross = None
            self.cross = None
        self.norm_mlp = LayerNorm(hidden, **norm_kw)
        self.fc1 = linear(hidden, mlp_hidden, **kw)
        self.fc2 = linear(mlp_hidden, hidden, **kw)
        self.ada = linear(hidden, 3 * self.branches * hidden, zero=True, **kw)

    def __call__(self, x, c, context=None, mask=None):
        mods = jnp.split(self.ada(jax.nn.silu(c)).astype(x.dtype), 3 * self.branches, axis=-1)
        shift, scale, gate = mods[0:3]
        h = self.attn(_modulate(self.norm_attn(x), shift, scale))
        x = x + gate[:, None, :] * h.astype(x.dtype)
        if self.cross is not None:
            shift, scale, gate = mods[3:6]
            h = self.cross(_modulate(self.norm_cross(x), shift, scale), context, mask)
            x = x + gate[:, None, :] * h.astype(x.dtype)
        shift, scale, gate = mods[-3:]
        h = self.fc2(jax.nn.gelu(self.fc1(_modulate(self.norm_mlp(x), shift, scale))))
        return x + gate[:, None, :] * h.astype(x.dtype)


class DiT(nnx.Module):
    r"""Diffusion Transformer denoising network for NHWC images.

    Args:
        channels: image channels (input and output).
        patch_size: patch side ``p``; ``H`` and ``W`` must be divisible by it.
        hidden: token width (divisible by 4 and by ``num_heads``).
        depth: number of :class:`DiTBlock`.
        num_heads: attention heads.
        mlp_ratio: MLP width / ``hidden``.
        num_classes: 0, or the number of classes (null label ``num_classes``).
        context_dim, context_len: cross-attention context width and length (0: none).
        embedding: ``"positional"`` or ``"fourier"`` noise embedding.
        dtype, param_dtype: compute and parameter dtypes.
        rngs: ``nnx.Rngs``.

    Position embeddings are fixed sine-cosine functions of the patch grid, so any
    ``(B, H, W, channels)`` with ``H, W`` divisible by ``p`` is accepted. The output has the
    shape of ``x``, float32 (float64 in float64); it is exactly 0 at initialisation (zero final
    layer), as in the paper.

    Call: ``net(x, c_noise (B,), cond=None, *, cep=None)``; ``cond`` as in
    :mod:`jaxdiff.nets.conditioning`.

    Examples:
        >>> net = DiT(channels=1, patch_size=2, hidden=32, depth=2, num_heads=4,
        ...           num_classes=10, rngs=nnx.Rngs(0))
        >>> out = net(jnp.zeros((2, 8, 8, 1)), jnp.zeros(2), jnp.array([1, 2]))   # (2, 8, 8, 1)
    """

    def __init__(self, *, channels: int, patch_size: int = 2, hidden: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 0,
                 context_dim: int = 0, context_len: int = 0, embedding: str = "positional",
                 dtype=None, param_dtype="float32", rngs: nnx.Rngs):
        store_config(self, locals())
        self.channels = check_int(channels, "channels", minimum=1)
        self.patch_size = check_int(patch_size, "patch_size", minimum=1)
        self.hidden = check_int(hidden, "hidden", minimum=4)
        depth = check_int(depth, "depth", minimum=0)
        num_heads = check_int(num_heads, "num_heads", minimum=1)
        mlp_ratio = check_float(mlp_ratio, "mlp_ratio")
        check_choice(embedding, "embedding", EMBEDDINGS)
        if hidden % 4 or hidden % num_heads:
            raise ValueError(
                f"hidden={hidden} must be divisible by 4 (2-D position embedding) and by "
                f"num_heads={num_heads}."
            )
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        patch_dim = self.patch_size**2 * self.channels
        self.noise_embedding = NoiseEmbedding(hidden, hidden, kind=embedding, **kw)
        self.conditioning = Conditioning(num_classes=num_classes, context_dim=context_dim,
                                         context_len=context_len, emb_dim=hidden, **kw)
        self.patch_embed = linear(patch_dim, hidden, **kw)
        self.blocks = nnx.List([
            DiTBlock(hidden, num_heads, mlp_ratio=mlp_ratio, context_dim=context_dim, **kw)
            for _ in range(depth)
        ])
        self.norm_out = LayerNorm(hidden, affine=False, param_dtype=param_dtype, rngs=rngs)
        self.ada_out = linear(hidden, 2 * hidden, zero=True, **kw)
        self.proj_out = linear(hidden, patch_dim, zero=True, **kw)

    def null_cond(self, batch_size: int):
        """The null condition (see :mod:`jaxdiff.nets.conditioning`); None if unconditional."""
        return self.conditioning.null_cond(batch_size)

    def _check(self, x):
        p = self.patch_size
        expected = f"(B, H, W, {self.channels}) with H, W divisible by {p}"
        check_input(x, "DiT", expected, 4)
        _, h, w, c = x.shape
        if c != self.channels or h % p or w % p:
            raise ValueError(f"x has shape {tuple(x.shape)}; this DiT expects {expected}.")

    def embed(self, x, c_noise, cond=None, *, cep=None):
        """The inputs of the blocks: ``(tokens, c, context, mask)``.

        ``tokens`` ``(B, N, hidden)`` are the embedded patches plus positions, ``c``
        ``(B, hidden)`` the conditioning vector, ``context`` / ``mask`` the cross-attention
        inputs (None without a context).
        """
        self._check(x)
        cdt = compute_dtype(self.dtype, x)
        c_noise = check_c_noise(c_noise, x.shape[0], "DiT")
        cond_emb, context, mask = self.conditioning(cond, x.shape[0], cdt, cep)
        c = self.noise_embedding(c_noise, cdt)
        if cond_emb is not None:
            c = c + cond_emb
        p = self.patch_size
        pos = sincos_2d(x.shape[1] // p, x.shape[2] // p, self.hidden)
        tokens = self.patch_embed(patchify(x.astype(cdt), p))
        tokens = tokens + jnp.asarray(pos, tokens.dtype)[None]
        return tokens, c, context, mask

    def __call__(self, x, c_noise, cond=None, *, cep=None):
        tokens, c, context, mask = self.embed(x, c_noise, cond, cep=cep)
        for block in self.blocks:
            tokens = block(tokens, c, context, mask)
        shift, scale = jnp.split(self.ada_out(jax.nn.silu(c)), 2, axis=-1)
        tokens = self.proj_out(_modulate(self.norm_out(tokens), shift, scale))
        out = unpatchify(tokens, self.patch_size, x.shape[1], x.shape[2])
        return out.astype(wide_dtype(compute_dtype(self.dtype, x)))

