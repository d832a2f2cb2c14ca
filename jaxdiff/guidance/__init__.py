r"""Guidance transforms: functions that take a denoiser and return a guided denoiser.

A guidance transform has the shape ``transform(denoiser, process, ...) -> denoiser``: it wraps a
:class:`jaxdiff.Denoiser` ``denoiser(x, t, cond=None) -> x0_hat`` and returns another one with
the same signature, so guided denoisers go wherever denoisers go (every sampler,
:func:`jaxdiff.sample`, likelihoods) and transforms compose by nesting, in the style of optax's
wrappers::

    guided = jaxdiff.samplers.clip_x0(classifier_free(denoiser, process, 3.0, null_cond=null))

The innermost transform sees the raw network first. Transforms receive the process because
most of them need :math:`(\alpha(t), \sigma(t))` (noise intervals, conversions to the score);
intervals are given in the noise level :math:`\sigma/\alpha`, so they mean the same for every
process.

Conventions shared by the transforms:

* ``scale = 1`` is the plain conditional model; any finite scale is allowed (negative too);
  per-example scales of shape ``(B,)`` broadcast over the non-batch axes; scales may be traced,
  so sweeping them does not recompile.
* ``null_cond`` has the tree structure of ``cond`` and is the null label/embedding that
  condition dropout used in training (:func:`jaxdiff.losses.drop_condition`); it may be a
  callable ``batch_size -> null cond`` (networks expose ``net.null_cond(B)``).
* Conditional and unconditional evaluations run as one call of the wrapped denoiser on a new
  leading axis of size 2 (``jax.vmap``), never as a concatenation along the (possibly sharded)
  batch axis.

Available transforms:

* :func:`classifier_free` -- classifier-free guidance (Ho & Salimans 2022).
"""

from .classifier_free import classifier_free as classifier_free

__all__ = ["classifier_free"]
