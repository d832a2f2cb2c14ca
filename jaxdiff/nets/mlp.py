r"""Residual MLPs for low-dimensional data: a denoising :class:`MLP` and a :class:`PotentialMLP`.

Both follow the network contract ``net(x, c_noise, cond=None, *, cep=None) -> out`` with ``x``
of shape ``(B, dim)``; see :mod:`jaxdiff.nets` for the conventions.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from ._base import (
    check_c_noise,
    check_choice,
    check_input,
    check_int,
    compute_dtype,
    resolve_dtypes,
    store_config,
    wide_dtype,
)
from .conditioning import Conditioning
from .embeddings import EMBEDDINGS, NoiseEmbedding
from .layers import LayerNorm, linear

__all__ = ["MLP", "PotentialMLP", "ACTIVATIONS"]

#: Smooth activations accepted by :class:`PotentialMLP` (twice differentiable everywhere).
ACTIVATIONS = {"silu": jax.nn.silu, "softplus": jax.nn.softplus, "tanh": jnp.tanh}


class _FiLMBlock(nnx.Module):
    r"""Residual block :math:`h + W_2\,a(W_1 n(h) \odot (1 + s) + b)`; ``(s, b)`` from ``emb``."""

    def __init__(self, hidden, emb_dim, *, activation, norm, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.norm = LayerNorm(hidden, param_dtype=param_dtype, rngs=rngs) if norm else None
        self.fc1 = linear(hidden, hidden, **kw)
        self.film = linear(emb_dim, 2 * hidden, **kw)
        self.fc2 = linear(hidden, hidden, **kw)

    def __call__(self, h, emb):
        act = ACTIVATIONS[self.activation]
        y = h if self.norm is None else self.norm(h)
        scale, shift = jnp.split(self.film(act(emb)), 2, axis=-1)
        y = self.fc1(y) * (1 + scale) + shift
        return h + self.fc2(act(y)).astype(h.dtype)


class _Trunk(nnx.Module):
    """Shared body: noise + label embedding, input projection, FiLM blocks."""

    def __init__(self, *, dim, hidden, depth, emb_dim, num_classes, embedding, activation, norm,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.activation = activation
        self.noise_embedding = NoiseEmbedding(emb_dim, emb_dim, kind=embedding, **kw)
        self.conditioning = Conditioning(num_classes=num_classes, emb_dim=emb_dim, **kw)
        self.proj_in = linear(dim, hidden, **kw)
        self.blocks = nnx.List([
            _FiLMBlock(hidden, emb_dim, activation=activation, norm=norm, **kw)
            for _ in range(depth)
        ])

    def __call__(self, x, c_noise, cond, cep, name):
        cdt = compute_dtype(self.dtype, x)
        c = check_c_noise(c_noise, x.shape[0], name)
        label_emb, _, _ = self.conditioning(cond, x.shape[0], cdt, cep)
        emb = self.noise_embedding(c, cdt)
        if label_emb is not None:
            emb = emb + label_emb
        h = self.proj_in(x.astype(cdt))
        for block in self.blocks:
            h = block(h, emb)
        return h, cdt


def _check_common(dim, hidden, depth, emb_dim, num_classes, embedding):
    check_int(dim, "dim", minimum=1)
    check_int(hidden, "hidden", minimum=1)
    check_int(depth, "depth", minimum=0)
    check_int(emb_dim, "emb_dim", minimum=2)
    check_int(num_classes, "num_classes")
    check_choice(embedding, "embedding", EMBEDDINGS)


class MLP(nnx.Module):
    r"""Residual MLP denoising network for vectors ``x`` of shape ``(B, dim)``.

    The noise embedding (plus the label embedding when ``num_classes > 0``) modulates every
    block by FiLM: :math:`h \leftarrow h + W_2\,\mathrm{SiLU}(W_1\,\mathrm{LN}(h)\odot(1+s)+b)`.
    The output has the shape of ``x``, in float32 (float64 when computing in float64). What it
    predicts (eps, x0, v, ...) is fixed by how it is trained and wrapped
    (:func:`jaxdiff.nets.make_denoiser`).

    Args:
        dim: data dimension.
        hidden: width of the residual stream.
        depth: number of residual blocks.
        emb_dim: width of the noise/label embedding (even).
        num_classes: 0 for an unconditional network; else labels in ``[0, num_classes]``
            (``num_classes`` is the null label).
        embedding: ``"fourier"`` or ``"positional"`` (see :mod:`jaxdiff.nets.embeddings`).
        dtype: compute dtype (None: follow inputs and parameters).
        param_dtype: parameter dtype.
        rngs: ``nnx.Rngs`` for the initialisation.

    Call: ``net(x (B, dim), c_noise (B,), cond=None, *, cep=None) -> (B, dim)``.

    Examples:
        >>> net = MLP(dim=2, hidden=64, depth=2, rngs=nnx.Rngs(0))
        >>> out = net(jnp.zeros((8, 2)), jnp.zeros(8))    # (8, 2) float32
    """

    def __init__(self, *, dim: int, hidden: int = 128, depth: int = 3, emb_dim: int = 64,
                 num_classes: int = 0, embedding: str = "fourier", dtype=None,
                 param_dtype="float32", rngs: nnx.Rngs):
        store_config(self, locals())
        _check_common(dim, hidden, depth, emb_dim, num_classes, embedding)
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim = dim
        self.trunk = _Trunk(dim=dim, hidden=hidden, depth=depth, emb_dim=emb_dim,
                            num_classes=num_classes, embedding=embedding, activation="silu",
                            norm=True, **kw)
        self.norm_out = LayerNorm(hidden, param_dtype=param_dtype, rngs=rngs)
        self.proj_out = linear(hidden, dim, **kw)

    def null_cond(self, batch_size: int):
        """Labels ``num_classes`` of shape ``(batch_size,)``, or None if unconditional."""
        return self.trunk.conditioning.null_cond(batch_size)

    def __call__(self, x, c_noise, cond=None, *, cep=None):
        check_input(x, "MLP", f"(B, {self.dim})", 2)
        if x.shape[1] != self.dim:
            raise ValueError(f"MLP: x has shape {tuple(x.shape)}; expected (B, {self.dim}).")
        h, cdt = self.trunk(x, c_noise, cond, cep, "MLP")
        out = self.proj_out(jax.nn.silu(self.norm_out(h)))
        return out.astype(wide_dtype(cdt))


class PotentialMLP(nnx.Module):
    r"""Scalar potential :math:`\phi(x, c_{\rm noise}, \mathrm{cond})` whose gradient is the output.

    :meth:`potential` returns :math:`\phi` of shape ``(B,)``; calling the network returns
    :math:`\nabla_x\phi` of the shape of ``x``, computed as ``jax.grad`` of
    :math:`\sum_b \phi(x_b)` (exact because examples do not interact). There is no sign flip:

    * wrapped as kind ``"score"``, :math:`\phi` is a learned log-density
      (:math:`\nabla_x\phi = \nabla\log p_t`, an energy-based model with energy
      :math:`-\phi`);
    * wrapped as kind ``"eps"``, :math:`\hat\varepsilon = \nabla_x\phi`, i.e.
      :math:`\phi = -\sigma\log p_t` up to a constant.

    A conservative field is what a true score is, so this parameterisation builds in the
    symmetry of the score's Jacobian. Activations are smooth (``"silu"``, ``"softplus"`` or
    ``"tanh"``) and there is no normalisation layer, so :math:`\phi` is :math:`C^\infty` in
    :math:`x` and Laplacians (Fokker--Planck residuals) are well defined.

    Args:
        dim, hidden, depth, emb_dim, num_classes, embedding, dtype, param_dtype, rngs: as
            :class:`MLP`.
        activation: one of :data:`ACTIVATIONS`.

    Examples:
        >>> net = PotentialMLP(dim=2, hidden=32, depth=2, rngs=nnx.Rngs(0))
        >>> phi = net.potential(jnp.ones((4, 2)), jnp.zeros(4))     # (4,)
        >>> grad = net(jnp.ones((4, 2)), jnp.zeros(4))              # (4, 2) = grad_x phi
    """

    def __init__(self, *, dim: int, hidden: int = 128, depth: int = 3, emb_dim: int = 64,
                 num_classes: int = 0, embedding: str = "fourier", activation: str = "silu",
                 dtype=None, param_dtype="float32", rngs: nnx.Rngs):
        store_config(self, locals())
        _check_common(dim, hidden, depth, emb_dim, num_classes, embedding)
        check_choice(activation, "activation", tuple(ACTIVATIONS))
        dtype, param_dtype = resolve_dtypes(dtype, param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim = dim
        self.activation = activation
        self.trunk = _Trunk(dim=dim, hidden=hidden, depth=depth, emb_dim=emb_dim,
                            num_classes=num_classes, embedding=embedding, activation=activation,
                            norm=False, **kw)
        self.proj_out = linear(hidden, 1, **kw)

    def null_cond(self, batch_size: int):
        """Labels ``num_classes`` of shape ``(batch_size,)``, or None if unconditional."""
        return self.trunk.conditioning.null_cond(batch_size)

    def _check(self, x):
        check_input(x, "PotentialMLP", f"(B, {self.dim})", 2)
        if x.shape[1] != self.dim:
            raise ValueError(
                f"PotentialMLP: x has shape {tuple(x.shape)}; expected (B, {self.dim})."
            )

    def _phi(self, x, c_noise, cond, cep):
        h, cdt = self.trunk(x, c_noise, cond, cep, "PotentialMLP")
        phi = self.proj_out(ACTIVATIONS[self.activation](h))[:, 0]
        return phi.astype(wide_dtype(cdt))

    def potential(self, x, c_noise, cond=None, *, cep=None):
        r"""The potential :math:`\phi` of shape ``(B,)`` (float32, or float64 in float64)."""
        self._check(x)
        return self._phi(x, c_noise, cond, cep)

    def __call__(self, x, c_noise, cond=None, *, cep=None):
        self._check(x)
        grad = jax.grad(lambda y: jnp.sum(self._phi(y, c_noise, cond, cep)))(x)
        return grad.astype(wide_dtype(compute_dtype(self.trunk.dtype, x)))
