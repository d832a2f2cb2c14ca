r"""Flax NNX score networks, used functionally (optional layer: needs ``flax``).

**The network contract.** Every denoising network is an ``nnx.Module`` called as
``net(x, c_noise, cond=None, *, cep=None) -> out``:

* ``x``: ``(B, D)`` for vector networks (:class:`MLP`, :class:`PotentialMLP`), ``(B, H, W, C)``
  NHWC for image networks (:class:`UNet`, :class:`DiT`);
* ``c_noise``: ``(B,)`` floats, the noise conditioning :math:`-\lambda(t)/8 =
  \tfrac14\log(\sigma/\alpha)` (:func:`noise_conditioning`);
* ``cond``: None, int labels ``(B,)``, or a cross-attention dict -- see
  :mod:`jaxdiff.nets.conditioning`; ``net.null_cond(B)`` gives the "unconditional" ``cond``
  with the same structure (None for unconditional networks) and :func:`null_label` the null
  label's index;
* ``cep``: None or ``(key, gamma, kind)``, Condition Embedding Perturbation
  (:func:`cep_noise`); ignored by unconditional networks;
* ``out``: the shape of ``x``, float32 whatever the compute dtype (float64 only when computing
  in float64).

**Configs.** Constructors take JSON-serialisable keyword arguments plus ``rngs``;
:func:`create` builds by name and :func:`config_of` describes a built network, so checkpoints
store ``{"name", "config"}``. ``dtype`` (compute; None follows inputs/parameters) and
``param_dtype`` accept dtypes or their names and are stored as names. The state of every
network (``nnx.split(net)[1]``) holds only ``nnx.Param`` arrays.

**Precision.** bfloat16 parameters and inputs work: norms, softmaxes and the noise features are
computed in float32 and outputs are float32; float32 inputs stay float32 with x64 enabled.

**Functional use.** ``graphdef, params = nnx.split(net)`` outside ``jit``, then
:func:`make_denoiser`, :func:`make_denoiser_fn` or :func:`make_apply` (which merge inside).

Examples:
    >>> from flax import nnx
    >>> from jaxdiff import nets
    >>> net = nets.create("mlp", {"dim": 2, "num_classes": 3}, rngs=nnx.Rngs(0))
    >>> graphdef, params = nnx.split(net)
    >>> denoiser = nets.make_denoiser(graphdef, params, jaxdiff.VPProcess(), "eps")
    >>> x0_hat = denoiser(jnp.zeros((4, 2)), jnp.full((4,), 0.5), net.null_cond(4))
"""

from .classifiers import Classifier as Classifier
from .classifiers import NoiseClassifier as NoiseClassifier
from .conditioning import CEP_KINDS as CEP_KINDS
from .conditioning import cep_noise as cep_noise
from .conditioning import null_label as null_label
from .denoiser import DENOISER_KINDS as DENOISER_KINDS
from .denoiser import make_apply as make_apply
from .denoiser import make_classifier as make_classifier
from .denoiser import make_classifier_fn as make_classifier_fn
from .denoiser import make_denoiser as make_denoiser
from .denoiser import make_denoiser_fn as make_denoiser_fn
from .denoiser import noise_conditioning as noise_conditioning
from .dit import DiT as DiT
from .embeddings import NoiseEmbedding as NoiseEmbedding
from .embeddings import fourier_embedding as fourier_embedding
from .embeddings import sinusoidal_embedding as sinusoidal_embedding
from .mlp import MLP as MLP
from .mlp import PotentialMLP as PotentialMLP
from .registry import NETWORKS as NETWORKS
from .registry import config_keys_of as config_keys_of
from .registry import config_of as config_of
from .registry import create as create
from .unet import UNet as UNet

__all__ = [
    "CEP_KINDS",
    "Classifier",
    "DENOISER_KINDS",
    "DiT",
    "MLP",
    "NETWORKS",
    "NoiseClassifier",
    "NoiseEmbedding",
    "PotentialMLP",
    "UNet",
    "cep_noise",
    "config_keys_of",
    "config_of",
    "create",
    "fourier_embedding",
    "make_apply",
    "make_classifier",
    "make_classifier_fn",
    "make_denoiser",
    "make_denoiser_fn",
    "noise_conditioning",
    "null_label",
    "sinusoidal_embedding",
]
