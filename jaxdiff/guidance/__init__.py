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

Denoiser transforms (pure; one guided denoiser in, one out):

* :func:`classifier_free` -- classifier-free guidance (Ho & Salimans 2022) with an explicit
  ``space``, guidance rescale (Lin et al. 2023), guidance intervals (Kynkäänniemi et al. 2024)
  and negative conditions;
* :func:`composable` and :func:`stack_conds` -- composable diffusion AND / NOT (Liu et al. 2022);
* :func:`classifier_guidance` with :func:`log_prob_from_logits` -- a noise-conditional
  classifier (Dhariwal & Nichol 2021); :func:`calibrated_classifier_guidance` and
  :func:`sine_bump` -- EluCD-style guidance by a clean classifier on :math:`\hat x_0`;
* :func:`noise_range_experts`, :func:`condition_schedule`, :func:`condition_blend` -- a
  different network or condition per noise interval (PPAP, ProSpect, prompt blending);
* :func:`loss_guidance`, :func:`measurement_loss`, :func:`gaussian_likelihood_guidance` --
  guidance by a loss of :math:`\hat x_0` (DPS as a score transform, universal forward
  guidance, steered diffusion) with the operators of :mod:`jaxdiff.guidance.operators`.

Sampler-level wrappers (they carry state across steps or hold several particles, and have the
sampler signature ``(key, denoiser, process, x_init, ts, *, ...) -> x``):

* :func:`dps` -- diffusion posterior sampling in its original form (Chung et al. 2023);
* :func:`self_recurrence` -- universal guidance's re-noising loop (Bansal et al. 2023);
* :func:`adaptive_guidance` (static switch) and :func:`adaptive_guidance_dynamic` /
  :func:`adaptive_guidance_dynamic_with_info` (cosine-similarity switch) -- CFG for the first
  steps only (Castillo et al.), with :func:`adaptive_guidance_nfe` counting network calls;
* :func:`sdedit` and :func:`repaint` / :func:`repaint_schedule` -- editing baselines
  (Meng et al. 2022; Lugmayr et al. 2022);
* :func:`svdd` -- derivative-free soft-value decoding with a (non-differentiable) reward
  (Li et al. 2024).

Sequences (TSDiff, Kollovieh et al. 2023): :func:`observation_guidance` (a denoiser transform:
MSE or quantile self-guidance on the observed entries, with :func:`quantile_levels`) and
:func:`refine` / :func:`refine_energy` / :func:`best_diffusion_time` (improving a base forecast
by descent or Langevin sampling on the diffusion-loss energy).
"""

from . import operators as operators
from .adaptive import AdaptiveGuidanceInfo as AdaptiveGuidanceInfo
from .adaptive import adaptive_guidance as adaptive_guidance
from .adaptive import adaptive_guidance_dynamic as adaptive_guidance_dynamic
from .adaptive import adaptive_guidance_dynamic_with_info as adaptive_guidance_dynamic_with_info
from .adaptive import adaptive_guidance_nfe as adaptive_guidance_nfe
from .classifier import calibrated_classifier_guidance as calibrated_classifier_guidance
from .classifier import classifier_guidance as classifier_guidance
from .classifier import log_prob_from_logits as log_prob_from_logits
from .classifier import sine_bump as sine_bump
from .classifier_free import classifier_free as classifier_free
from .composable import composable as composable
from .composable import stack_conds as stack_conds
from .editing import repaint as repaint
from .editing import repaint_schedule as repaint_schedule
from .editing import sdedit as sdedit
from .loss_guided import dps as dps
from .loss_guided import gaussian_likelihood_guidance as gaussian_likelihood_guidance
from .loss_guided import loss_guidance as loss_guidance
from .loss_guided import measurement_loss as measurement_loss
from .loss_guided import self_recurrence as self_recurrence
from .operators import colorization as colorization
from .operators import inpainting as inpainting
from .operators import linear as linear
from .operators import super_resolution as super_resolution
from .schedules import condition_blend as condition_blend
from .schedules import condition_schedule as condition_schedule
from .schedules import noise_range_experts as noise_range_experts
from .svdd import svdd as svdd
from .tsdiff import best_diffusion_time as best_diffusion_time
from .tsdiff import observation_guidance as observation_guidance
from .tsdiff import quantile_levels as quantile_levels
from .tsdiff import refine as refine
from .tsdiff import refine_energy as refine_energy

__all__ = [
    "AdaptiveGuidanceInfo",
    "adaptive_guidance",
    "adaptive_guidance_dynamic",
    "adaptive_guidance_dynamic_with_info",
    "adaptive_guidance_nfe",
    "best_diffusion_time",
    "calibrated_classifier_guidance",
    "classifier_free",
    "classifier_guidance",
    "colorization",
    "composable",
    "condition_blend",
    "condition_schedule",
    "dps",
    "gaussian_likelihood_guidance",
    "inpainting",
    "linear",
    "log_prob_from_logits",
    "loss_guidance",
    "measurement_loss",
    "noise_range_experts",
    "observation_guidance",
    "operators",
    "quantile_levels",
    "refine",
    "refine_energy",
    "repaint",
    "repaint_schedule",
    "sdedit",
    "self_recurrence",
    "sine_bump",
    "stack_conds",
    "super_resolution",
    "svdd",
]
