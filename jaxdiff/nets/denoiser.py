r"""From a network's ``(graphdef, params)`` to the library's pure functions.

Networks are used functionally, as Flax recommends for NNX at a ``jit`` boundary: split once
outside (``graphdef, params = nnx.split(net)``) and merge inside the traced function
(``nnx.merge(graphdef, params)``), so ``params`` is an ordinary pytree argument. ``params`` may
be the ``nnx.State`` from ``nnx.split`` or its pure-dict form (as restored from a checkpoint).

Every adapter feeds the network :math:`c_{\rm noise} = -\lambda(t)/8` (:func:`noise_conditioning`),
the same value :func:`jaxdiff.predictions.edm_precondition` passes, so a network means the same
thing whatever its prediction kind.

* ``kind`` in ``("x0", "eps", "v", "score", "velocity")``: the network outputs that prediction
  (:mod:`jaxdiff.predictions`) and is wrapped by :func:`jaxdiff.predictions.to_denoiser`;
* ``kind == "edm"``: the network is EDM's raw :math:`F`, wrapped by
  :func:`jaxdiff.predictions.edm_precondition`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .. import predictions
from .._utils import as_float_array, check_positive

__all__ = [
    "DENOISER_KINDS",
    "noise_conditioning",
    "make_denoiser",
    "make_denoiser_fn",
    "make_apply",
    "make_classifier",
    "make_classifier_fn",
]

#: Prediction kinds accepted by :func:`make_denoiser` and :func:`make_apply`.
DENOISER_KINDS = (*predictions.KINDS, "edm")


def noise_conditioning(process, t, x=None) -> jax.Array:
    r"""The network input :math:`c_{\rm noise} = -\lambda(t)/8 = \tfrac14\log(\sigma/\alpha)`.

    Args:
        process: the forward process.
        t: times, shape ``()`` or ``(B,)``.
        x: optional input ``(B, ...)``: the result is then cast to at least float32 in ``x``'s
            precision (float32 for float32 and bfloat16 inputs) and broadcast to ``(B,)``.

    Examples:
        >>> c = noise_conditioning(jaxdiff.EDMProcess(), jnp.full((3,), 1.0))   # log(1)/4 = 0
    """
    t = as_float_array(t)
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    c = -0.125 * process.log_snr(t)
    if x is None:
        return c
    c = c.astype(jnp.promote_types(x.dtype, jnp.float32))
    if c.ndim == 0:
        c = jnp.broadcast_to(c, (x.shape[0],))
    return c


def _check(graphdef, process, kind, sigma_data, name):
    if not isinstance(graphdef, nnx.GraphDef):
        raise TypeError(
            f"{name}: graphdef must be an nnx.GraphDef (graphdef, params = nnx.split(net)); got "
            f"{type(graphdef).__name__}."
        )
    if kind not in DENOISER_KINDS:
        raise ValueError(f"{name}: kind must be one of {DENOISER_KINDS}; got {kind!r}.")
    if sigma_data is not None:
        if kind != "edm":
            raise ValueError(f"{name}: sigma_data is only used with kind='edm'; got kind={kind!r}.")
        check_positive(sigma_data, "sigma_data")
    if not hasattr(process, "log_snr"):
        raise TypeError(f"{name}: process must be a jaxdiff process; got {type(process).__name__}.")


def _denoiser_of(net, process, kind, sigma_data, cep):
    """The denoiser ``(x, t, cond) -> x0_hat`` of a merged network."""
    if kind == "edm":
        def raw(x_in, c_noise, cond):
            return net(x_in, c_noise, cond, cep=cep)

        return predictions.edm_precondition(raw, process, sigma_data=sigma_data)

    def fn(x, t, cond):
        return net(x, noise_conditioning(process, t, x), cond, cep=cep)

    return predictions.to_denoiser(fn, process, kind)


def make_denoiser_fn(graphdef, process, kind: str, *, sigma_data=None) -> Callable:
    r"""The denoiser as a pure function of the parameters: ``fn(params, x, t, cond=None)``.

    For use inside a jitted train or sample step where ``params`` is an argument: the network
    is merged from ``(graphdef, params)`` at trace time, so new parameter values of the same
    structure reuse the compiled program.

    Args:
        graphdef: from ``graphdef, params = nnx.split(net)``.
        process: the process the network was trained with.
        kind: one of :data:`DENOISER_KINDS` (what the network outputs).
        sigma_data: EDM's :math:`\sigma_{\rm data}` (``kind="edm"`` only; default as
            :func:`jaxdiff.predictions.edm_precondition`).

    Returns:
        ``fn(params, x (B, ...), t (B,), cond=None) -> x0_hat`` (float32 or wider).

    Examples:
        >>> graphdef, params = nnx.split(nets.MLP(dim=2, rngs=nnx.Rngs(0)))
        >>> fn = jax.jit(make_denoiser_fn(graphdef, jaxdiff.VPProcess(), "eps"))
        >>> x0_hat = fn(params, jnp.zeros((4, 2)), jnp.full((4,), 0.5))
    """
    _check(graphdef, process, kind, sigma_data, "make_denoiser_fn")

    def fn(params, x, t, cond=None):
        net = nnx.merge(graphdef, params)
        return _denoiser_of(net, process, kind, sigma_data, None)(x, t, cond)

    return fn


def make_denoiser(graphdef, params, process, kind: str, *, sigma_data=None):
    r"""A :class:`jaxdiff.Denoiser` ``denoiser(x, t, cond=None) -> x0_hat`` for a network.

    A closure over ``params``: jit-able, and differentiable with respect to ``params`` when it
    is built inside the differentiated function from traced parameters. Inside a jitted step
    that takes ``params`` as an argument prefer :func:`make_denoiser_fn`.

    Args:
        graphdef, params: from ``nnx.split(net)``.
        process, kind, sigma_data: as :func:`make_denoiser_fn`.

    Examples:
        >>> graphdef, params = nnx.split(nets.MLP(dim=2, rngs=nnx.Rngs(0)))
        >>> denoiser = make_denoiser(graphdef, params, jaxdiff.VPProcess(), "eps")
        >>> x0_hat = denoiser(jnp.zeros((4, 2)), jnp.full((4,), 0.5))
    """
    _check(graphdef, process, kind, sigma_data, "make_denoiser")
    fn = make_denoiser_fn(graphdef, process, kind, sigma_data=sigma_data)

    def denoiser(x, t, cond=None):
        return fn(params, x, t, cond)

    return denoiser


def make_apply(graphdef, process, kind: str, *, sigma_data=None) -> Callable:
    r"""The training-time forward pass ``apply(params, x_t, t, cond=None, cep=None)``.

    Returns the prediction in ``kind``'s own space: the network output (float32) for ``"x0"``,
    ``"eps"``, ``"v"``, ``"score"``, ``"velocity"``; for ``"edm"`` the preconditioned
    denoiser output :math:`D` (``x0`` space), on which EDM's loss
    :math:`\lambda(\sigma)\|D - x_0\|^2` is computed. ``cep`` is ``None`` or
    ``(key, gamma, kind)`` (:mod:`jaxdiff.nets.conditioning`).

    Args:
        graphdef: from ``nnx.split(net)``.
        process, kind, sigma_data: as :func:`make_denoiser_fn`.

    Examples:
        >>> graphdef, params = nnx.split(nets.MLP(dim=2, rngs=nnx.Rngs(0)))
        >>> apply = make_apply(graphdef, jaxdiff.VPProcess(), "eps")
        >>> eps_hat = apply(params, jnp.zeros((4, 2)), jnp.full((4,), 0.5))
    """
    _check(graphdef, process, kind, sigma_data, "make_apply")

    def apply(params, x_t, t, cond=None, cep=None):
        net = nnx.merge(graphdef, params)
        if kind == "edm":
            return _denoiser_of(net, process, kind, sigma_data, cep)(x_t, t, cond)
        return net(x_t, noise_conditioning(process, t, x_t), cond, cep=cep)

    return apply


def make_classifier_fn(graphdef, process) -> Callable:
    r"""A noise-conditional classifier as ``fn(params, x_t, t) -> logits (B, num_classes)``.

    The classifier (:class:`jaxdiff.nets.NoiseClassifier`) receives
    :math:`c_{\rm noise} = -\lambda(t)/8`, like the denoisers.

    Examples:
        >>> clf = nets.NoiseClassifier(channels=1, num_classes=10, rngs=nnx.Rngs(0))
        >>> graphdef, params = nnx.split(clf)
        >>> logits = make_classifier_fn(graphdef, jaxdiff.VPProcess())(params, x_t, t)
    """
    if not isinstance(graphdef, nnx.GraphDef):
        raise TypeError(
            "make_classifier_fn: graphdef must be an nnx.GraphDef (graphdef, params = "
            f"nnx.split(classifier)); got {type(graphdef).__name__}."
        )

    def fn(params, x, t):
        return nnx.merge(graphdef, params)(x, noise_conditioning(process, t, x))

    return fn


def make_classifier(graphdef, params, process) -> Callable:
    r"""``classifier(x_t, t) -> logits`` for a noise-conditional classifier (closure form).

    Examples:
        >>> classifier = make_classifier(graphdef, params, jaxdiff.VPProcess())
        >>> log_p = jax.nn.log_softmax(classifier(x_t, t))
    """
    fn = make_classifier_fn(graphdef, process)

    def classifier(x, t):
        return fn(params, x, t)

    return classifier
