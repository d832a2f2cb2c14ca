r"""Denoising losses for a network of any prediction kind, trained on any forward process.

A training example draws a time :math:`t`, noise :math:`\varepsilon \sim N(0, I)` and forms
:math:`x_t = \alpha(t) x_0 + \sigma(t)\varepsilon`; the network predicts a quantity :math:`K` in
its own ("native") space and the loss is a weighted mean squared error there:

.. math::
    \ell = w_K(t)\,\frac{1}{d}\big\|\hat K(x_t, t) - K\big\|^2, \qquad
    \mathcal L = \frac{1}{B}\sum_b \ell_b .

**Prediction kinds and the one conversion table.** At fixed :math:`x_t` every prediction is
affine in :math:`\hat x_0`, so an error in any space is a scaled error in :math:`x_0` space:
:math:`\hat x_0 - x_0 = c_K(t)\,(\hat K - K)`. With :math:`\lambda = \log\mathrm{SNR}
= \log(\alpha^2/\sigma^2)` and :math:`\lambda' = d\lambda/dt = -g^2/\sigma^2`:

============  ==============================================  ===================================
``kind``      target :math:`K`                                :math:`c_K(t)`
============  ==============================================  ===================================
``x0``        :math:`x_0`                                     :math:`1`
``edm``       :math:`x_0` (preconditioned output D)           :math:`1`
``eps``       :math:`\varepsilon`                             :math:`-e^{-\lambda/2}`
``v``         :math:`\alpha\varepsilon - \sigma x_0`          :math:`-\sigma/(\alpha^2+\sigma^2)`
``velocity``  :math:`\dot\alpha x_0 + \dot\sigma\varepsilon`  :math:`2/(\alpha\lambda')`
============  ==============================================  ===================================

(``"velocity"`` is the flow-matching target, :math:`\varepsilon - x_0` for rectified flow, where
:math:`c = -t`.) Every weighting except ``"uniform"`` is *defined* as a weight
:math:`w_{x_0}(t)` on the :math:`x_0`-space error and applied in the native space as
:math:`w_K = w_{x_0}\,c_K^2`, so the same imperfect model gives the same weighted loss whatever
its parameterisation. The product is formed in the log domain (``log w_x0 + log c_K^2``), so
nothing divides by :math:`\sigma` at small :math:`\sigma` and nothing overflows at large
:math:`|\lambda|`.

**Weightings** (:math:`\mathrm{SNR} = e^\lambda`; :math:`w_{x_0}` multiplies
:math:`\|\hat x_0 - x_0\|^2`, :math:`w_\varepsilon = w_{x_0} e^{-\lambda}` the
:math:`\varepsilon`-space error, :math:`s` is the logistic sigmoid):

==============  ======================================  ==========================================
``weighting``   :math:`w_{x_0}`                         :math:`w_\varepsilon`
==============  ======================================  ==========================================
``uniform``     :math:`1/c_K^2` (unit weight natively)  :math:`1` for ``eps`` (DDPM "simple" loss)
``likelihood``  :math:`-\lambda' e^{\lambda}`           :math:`-\lambda' = g^2/\sigma^2`
``min_snr``     :math:`\min(\mathrm{SNR}, \gamma)`      :math:`\min(1, \gamma e^{-\lambda})`
``sigmoid``     :math:`e^{\lambda} s(b - \lambda)`      :math:`s(b - \lambda)`
``edm``         :math:`\mathrm{SNR} + 1/\sigma_d^2`     :math:`1 + e^{-\lambda}/\sigma_d^2`
==============  ======================================  ==========================================

* ``likelihood`` (Song et al. 2021): :math:`g^2` on the score-space error
  :math:`\|\hat s - \nabla\log p\|^2`; with uniform ``t`` the loss is
  :math:`\int \|\hat\varepsilon - \varepsilon\|^2 d\lambda`, the diffusion term of the negative
  ELBO (up to the factor 1/2 and constants) for every process.
* ``min_snr`` (Hang et al. 2023, :math:`\gamma = 5`): for VP ``v`` the native weight is
  :math:`\min(\mathrm{SNR},\gamma)/(\mathrm{SNR}+1)`.
* ``sigmoid`` (Kingma & Gao 2023, :math:`b = -3`): their :math:`w(\lambda) = s(b-\lambda)` on the
  :math:`\varepsilon`-space error. Their objective integrates over :math:`\lambda`, so with
  ``time_sampling="uniform_log_snr"`` the loss is theirs exactly (up to a constant); with another
  time density :math:`p(\lambda)` the effective weight is :math:`p(\lambda) s(b - \lambda)`.
* ``edm`` (Karras et al. 2022): :math:`(\varsigma^2 + \sigma_d^2)/(\varsigma\sigma_d)^2` on
  :math:`\|D - x_0\|^2` with the noise level :math:`\varsigma = \sigma/\alpha`. For processes
  with :math:`\alpha \ne 1` the same function of the noise level is used: the :math:`x_0` error
  does not change when the state is rescaled to :math:`x_t/\alpha` (the EDM/VE state).
  :math:`\sigma_d` is ``sigma_data``, default ``process.sigma_data`` or 0.5.
* a callable ``weighting(process, t) -> (B,)`` gives :math:`w_{x_0}` (the :math:`x_0`-space
  weight; multiply by ``exp(process.log_snr(t))`` to give an :math:`\varepsilon`-space weight).

**Time sampling.** ``"uniform"`` in ``[t_min, t_max]``; ``"low_discrepancy"``: uniform with
stratified, low-discrepancy times (Kingma et al. 2021, VDM) -- see :func:`denoising_loss`;
``"lognormal"`` (EDM): :math:`\ln\varsigma \sim N(P_{\rm mean}, P_{\rm std}^2)` mapped to ``t``
through the log-SNR and clipped to ``[t_min, t_max]``; ``"uniform_log_snr"``: :math:`\lambda`
uniform between :math:`\lambda(t_{\max})` and :math:`\lambda(t_{\min})`; or a callable
``(key, shape) -> t``.

**Randomness** is per example: example ``i`` draws its time, noise and dropout from
``fold_in(key, example_index[i])``, so the loss of an example does not depend on the batch size
or on how a batch is split into micro-batches or over devices.

References:
    Ho et al., Denoising Diffusion Probabilistic Models, 2020.
    Song et al., Maximum Likelihood Training of Score-Based Diffusion Models, 2021.
    Kingma et al., Variational Diffusion Models, 2021.
    Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, 2022.
    Hang et al., Efficient Diffusion Training via Min-SNR Weighting Strategy, 2023.
    Kingma & Gao, Understanding Diffusion Objectives as the ELBO with Simple Data Augmentation,
    2023.
    Chen et al., Slight Corruption in Pre-training Data Makes Better Diffusion Models, 2024 (CEP).
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._utils import as_float_array, check_positive, check_times, is_concrete
from .guidance.classifier_free import _resolve_null_cond
from .predictions import _coefficients, _from_pair
from .samplers._core import example_keys

__all__ = [
    "PREDICTIONS",
    "WEIGHTINGS",
    "TIME_SAMPLINGS",
    "CEP_KINDS",
    "denoising_loss",
    "loss_weight",
    "drop_condition",
    "binned_loss",
    "default_bins",
]

PREDICTIONS = ("eps", "x0", "v", "velocity", "edm")
WEIGHTINGS = ("uniform", "likelihood", "min_snr", "sigmoid", "edm")
TIME_SAMPLINGS = ("uniform", "low_discrepancy", "lognormal", "uniform_log_snr")
CEP_KINDS = ("uniform", "gaussian")

_LOG_4 = math.log(4.0)
# floor(2^32 / golden ratio): the additive recurrence i * phi^{-1} mod 1 in 32-bit fixed point.
_GOLDEN_U32 = 0x9E3779B9


# ------------------------------------------------------------------------------------------------
# Validation (host side, outside jit)
# ------------------------------------------------------------------------------------------------


def _check_choice(value, choices, name, *, allow_callable=False):
    if allow_callable and callable(value):
        return
    if not isinstance(value, str) or value not in choices:
        extra = " or a callable" if allow_callable else ""
        hint = ""
        if name == "prediction" and value == "score":
            hint = " (a score target is -eps/sigma; train an 'eps' network instead)"
        raise ValueError(f"{name} must be one of {choices}{extra}; got {value!r}{hint}.")


def _check_finite(value, name):
    if is_concrete(value) and not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
        raise ValueError(f"{name} must be finite; got {value}.")


def _check_probability(p, name):
    if not is_concrete(p):
        return
    v = np.asarray(p, dtype=np.float64)
    if v.ndim != 0 or not (0.0 <= float(v) <= 1.0):
        raise ValueError(f"{name} must be a scalar probability in [0, 1]; got {p}.")


def _is_off(value):
    """A concrete zero: the feature is statically switched off."""
    return is_concrete(value) and np.all(np.asarray(value) == 0)


def _check_weighting_options(weighting, min_snr_gamma, sigmoid_bias, sigma_data):
    _check_choice(weighting, WEIGHTINGS, "weighting", allow_callable=True)
    check_positive(min_snr_gamma, "min_snr_gamma")
    _check_finite(sigmoid_bias, "sigmoid_bias")
    if sigma_data is not None:
        check_positive(sigma_data, "sigma_data")


# ------------------------------------------------------------------------------------------------
# The conversion table and the weights
# ------------------------------------------------------------------------------------------------


def _log_c2(kind, process, t, log_snr):
    r""":math:`\log c_K^2` with :math:`\hat x_0 - x_0 = c_K (\hat K - K)` at fixed :math:`x_t`."""
    if kind in ("x0", "edm"):
        return jnp.zeros_like(log_snr)
    if kind == "eps":
        return -log_snr  # c = -sigma/alpha = -exp(-lambda/2)
    if kind == "v":
        # c = -sigma/(alpha^2 + sigma^2) = -1/(sigma (1 + e^lambda)) as alpha^2 = sigma^2 e^lambda.
        return -2.0 * jnp.log(process.sigma(t)) - 2.0 * jax.nn.softplus(log_snr)
    # velocity: u = alpha' x0 + sigma' eps with eps = (x - alpha x0)/sigma, so
    # du/dx0 = (sigma alpha' - alpha sigma')/sigma = alpha lambda'/2 and c = 2/(alpha lambda').
    return _LOG_4 - 2.0 * jnp.log(process.alpha(t)) - 2.0 * jnp.log(-process.d_log_snr(t))


def _log_x0_weight(weighting, process, t, log_snr, min_snr_gamma, sigmoid_bias, sigma_data):
    r""":math:`\log w_{x_0}(t)` of a named weighting (all but ``"uniform"``)."""
    if weighting == "likelihood":
        return jnp.log(-process.d_log_snr(t)) + log_snr
    if weighting == "min_snr":
        return jnp.minimum(log_snr, jnp.log(jnp.asarray(min_snr_gamma, log_snr.dtype)))
    if weighting == "sigmoid":
        return log_snr + jax.nn.log_sigmoid(sigmoid_bias - log_snr)
    # edm: (s^2 + sd^2)/(s sd)^2 = 1/s^2 + 1/sd^2 = SNR + 1/sd^2 with s the noise level.
    return jnp.logaddexp(log_snr, -2.0 * jnp.log(jnp.asarray(sigma_data, log_snr.dtype)))


def loss_weight(
    process,
    t,
    *,
    prediction: str = "eps",
    weighting: str | Callable = "uniform",
    min_snr_gamma=5.0,
    sigmoid_bias=-3.0,
    sigma_data=None,
):
    r"""The weight :math:`w_K(t) = w_{x_0}(t)\,c_K(t)^2` on the native-space squared error.

    See the module docstring for the table of :math:`c_K` and of the weightings.

    Args:
        process: the forward process.
        t: times, shape ``(B,)`` (or ``()``), in ``[t_min, t_max]``.
        prediction: one of :data:`PREDICTIONS`.
        weighting: one of :data:`WEIGHTINGS`, or ``weighting(process, t) -> w_x0`` (the weight
            on the :math:`x_0`-space error, shape of ``t``).
        min_snr_gamma: :math:`\gamma > 0` of ``"min_snr"``.
        sigmoid_bias: :math:`b` of ``"sigmoid"``.
        sigma_data: :math:`\sigma_d > 0` of ``"edm"`` (default ``process.sigma_data`` or 0.5).

    Returns:
        The weights, shape of ``t``, dtype of ``t`` promoted to at least float32.

    Examples:
        >>> process = jaxdiff.VPProcess()
        >>> w = loss_weight(process, jnp.array([0.1, 0.5]), prediction="v", weighting="min_snr")
    """
    _check_choice(prediction, PREDICTIONS, "prediction")
    _check_weighting_options(weighting, min_snr_gamma, sigmoid_bias, sigma_data)
    return _loss_weight(process, t, prediction, weighting, min_snr_gamma, sigmoid_bias, sigma_data)


def _loss_weight(process, t, prediction, weighting, min_snr_gamma, sigmoid_bias, sigma_data):
    """:func:`loss_weight` without the host-side checks."""
    t = as_float_array(t)
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    if isinstance(weighting, str) and weighting == "uniform":
        return jnp.ones_like(t)
    log_snr = process.log_snr(t)
    log_c2 = _log_c2(prediction, process, t, log_snr)
    if callable(weighting):
        w_x0 = jnp.asarray(weighting(process, t))
        if w_x0.shape != t.shape:
            raise ValueError(
                f"weighting(process, t) must return the shape of t, {t.shape}; got {w_x0.shape}."
            )
        return (w_x0 * jnp.exp(log_c2)).astype(t.dtype)
    if sigma_data is None:
        sigma_data = getattr(process, "sigma_data", 0.5)
    log_w = _log_x0_weight(weighting, process, t, log_snr, min_snr_gamma, sigmoid_bias, sigma_data)
    return jnp.exp(log_w + log_c2)


# ------------------------------------------------------------------------------------------------
# Time sampling
# ------------------------------------------------------------------------------------------------


def _sample_times(time_sampling, keys, batch_key, index, process, dtype, p_mean, p_std):
    """Per-example times ``(B,)`` in ``[t_min, t_max]``."""
    t_min = jnp.asarray(process.t_min, dtype)
    t_max = jnp.asarray(process.t_max, dtype)
    if callable(time_sampling):
        t = jax.vmap(lambda k: jnp.asarray(time_sampling(k, ())))(keys)
        if t.shape != index.shape:
            raise ValueError(
                "time_sampling(key, ()) must return a scalar time per example; got a batch of "
                f"shape {t.shape}."
            )
        t = as_float_array(t).astype(dtype)
        check_times(process, t, "time_sampling(key, shape)")
        return t
    if time_sampling == "uniform":
        return jax.vmap(lambda k: jax.random.uniform(k, (), dtype, t_min, t_max))(keys)
    if time_sampling == "low_discrepancy":
        # u_i = frac(u_0 + i / phi) in 32-bit fixed point (wrapping uint32 arithmetic is exact),
        # keyed on the global example index: any contiguous run of examples is stratified, so
        # the scheme survives micro-batching and sharding, unlike VDM's frac(u_0 + i / B).
        offset = jax.random.bits(batch_key, (), jnp.uint32)
        bits = index.astype(jnp.uint32) * jnp.uint32(_GOLDEN_U32) + offset
        u = (bits >> 8).astype(dtype) * jnp.asarray(2.0**-24, dtype)
        return t_min + (t_max - t_min) * u
    if time_sampling == "lognormal":
        z = jax.vmap(lambda k: jax.random.normal(k, (), dtype))(keys)
        log_noise_level = p_mean + p_std * z
        t = process.t_from_log_snr(-2.0 * log_noise_level)
    else:  # uniform_log_snr
        lo = process.log_snr(t_max)
        hi = process.log_snr(t_min)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), dtype))(keys)
        t = process.t_from_log_snr(lo + (hi - lo) * u)
    return jnp.clip(t.astype(dtype), t_min, t_max)


# ------------------------------------------------------------------------------------------------
# Condition dropout
# ------------------------------------------------------------------------------------------------


def _batch_size_of(cond, name="cond"):
    leaves = jax.tree.leaves(cond)
    if not leaves:
        raise ValueError(f"{name} must have at least one array leaf with a leading batch axis.")
    shapes = {jnp.shape(leaf)[:1] for leaf in leaves}
    if any(len(s) == 0 for s in shapes) or len(shapes) != 1:
        raise ValueError(
            f"every leaf of {name} must have the same leading batch axis; got leading shapes "
            f"{sorted(shapes)}."
        )
    return shapes.pop()[0]


def _select_rows(mask, cond, null):
    """Leaf-wise ``where(mask[b], null[b], cond[b])`` for a boolean mask ``(B,)``."""

    def pick(c, n):
        c = jnp.asarray(c)
        m = mask.reshape(mask.shape + (1,) * (c.ndim - 1))
        return jnp.where(m, n, c)

    return jax.tree.map(pick, cond, null)


def drop_condition(key, cond, null_cond, p):
    r"""Replace each example's condition by the null condition with probability ``p``.

    Per example :math:`b`, :math:`m_b \sim \mathrm{Bernoulli}(p)` and every leaf of ``cond`` takes
    the corresponding leaf of ``null_cond`` in row :math:`b` where :math:`m_b = 1` (condition
    dropout, which trains the unconditional model used by classifier-free guidance).

    Args:
        key: a typed PRNG key.
        cond: a pytree whose leaves have a leading batch axis ``B``.
        null_cond: the network's null condition, same tree structure as ``cond``, each leaf
            broadcastable to the matching leaf of ``cond`` (e.g. ``(B,)`` null labels or a
            scalar), or a callable ``batch_size -> null cond``.
        p: dropout probability in ``[0, 1]`` (may be traced).

    Returns:
        A pytree like ``cond``.

    Examples:
        >>> labels = jnp.array([3, 1, 4, 1])
        >>> dropped = drop_condition(jax.random.key(0), labels, jnp.full((4,), 10), 0.1)
    """
    if cond is None:
        raise ValueError("drop_condition: cond is None; there is no condition to drop.")
    _check_probability(p, "p")
    batch = _batch_size_of(cond)
    null = _resolve_null_cond(null_cond, cond, batch, "null_cond")
    mask = jax.random.bernoulli(key, p, (batch,))
    return _select_rows(mask, cond, null)


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------


def denoising_loss(
    key,
    model: Callable,
    process,
    x0,
    cond: Any = None,
    *,
    prediction: str = "eps",
    weighting: str | Callable = "uniform",
    time_sampling: str | Callable = "uniform",
    cond_dropout=0.0,
    null_cond: Any = None,
    cep_gamma=0.0,
    cep_kind: str = "uniform",
    min_snr_gamma=5.0,
    sigmoid_bias=-3.0,
    sigma_data=None,
    p_mean=-1.2,
    p_std=1.2,
    example_index=None,
):
    r"""Weighted denoising loss of ``model`` on a batch of clean data ``x0``.

    For each example: :math:`t` from ``time_sampling``, :math:`\varepsilon \sim N(0, I)`,
    :math:`x_t = \alpha x_0 + \sigma\varepsilon`, then

    .. math::
        \ell = w_K(t)\,\mathrm{mean}\big((\hat K(x_t, t, c) - K)^2\big), \qquad
        \mathcal L = \mathrm{mean}_b\,\ell_b,

    with the target :math:`K` and weight :math:`w_K = w_{x_0} c_K^2` of the module docstring.
    Everything is computed in float32 or wider (the model sees ``x_t`` in ``x0``'s dtype).

    The model contract is ``model(x_t, t, cond) -> prediction`` with ``x_t`` ``(B, ...)`` and
    ``t`` ``(B,)``. With Condition Embedding Perturbation on (``cep_gamma`` not a concrete 0)
    it is called as ``model(x_t, t, cond, cep=(key, cep_gamma, cep_kind))`` and the network
    perturbs its condition embedding itself; otherwise the ``cep`` keyword is not passed, so any
    three-argument function is a model. The CEP key is ``fold_in`` of a batch key with the first
    example index, so micro-batches draw different perturbations.

    Args:
        key: a typed PRNG key (``jax.random.key``).
        model: the network, see above.
        process: the forward process.
        x0: clean data, shape ``(B, ...)`` with at least one data axis, floating.
        cond: a pytree with batch-leading leaves, or None (unconditional).
        prediction: what ``model`` returns, one of :data:`PREDICTIONS`. ``"edm"`` is the
            EDM-preconditioned denoiser output :math:`D` (an :math:`x_0` estimate).
        weighting: one of :data:`WEIGHTINGS` or ``weighting(process, t) -> w_x0`` (the weight on
            the :math:`x_0`-space error).
        time_sampling: one of :data:`TIME_SAMPLINGS` or ``time_sampling(key, shape) -> t``
            (called once per example with ``shape = ()``). ``"low_discrepancy"`` uses
            :math:`u_i = \{u_0 + i\,\varphi^{-1}\}` with the golden ratio :math:`\varphi`, a
            shared :math:`u_0` and the global example index :math:`i`: VDM's variance reduction,
            stratified for every batch size and for every micro-batch slice.
        cond_dropout: probability of replacing an example's ``cond`` by ``null_cond``
            (see :func:`drop_condition`); needs ``cond`` and ``null_cond``.
        null_cond: the null condition (pytree like ``cond``, or ``batch_size -> pytree``).
        cep_gamma: CEP strength :math:`\gamma \ge 0` (Chen et al. 2024); needs ``cond``.
        cep_kind: one of :data:`CEP_KINDS`, passed to the model.
        min_snr_gamma: :math:`\gamma` of ``"min_snr"`` (default 5).
        sigmoid_bias: :math:`b` of ``"sigmoid"`` (default -3).
        sigma_data: :math:`\sigma_d` of ``"edm"`` (default ``process.sigma_data`` or 0.5).
        p_mean, p_std: :math:`\ln\varsigma \sim N(P_{\rm mean}, P_{\rm std}^2)` of
            ``"lognormal"`` (EDM defaults -1.2, 1.2).
        example_index: global positions ``(B,)`` of the examples (micro-batching, sharding);
            default ``arange(B)``.

    Returns:
        ``(loss, aux)``: the scalar batch mean and a dict with ``"per_example"`` (weighted,
        ``(B,)``), ``"mse"`` (unweighted native-space error, ``(B,)``), ``"weight"``, ``"t"`` and
        ``"log_snr"`` (each ``(B,)``).

    Examples:
        >>> process = jaxdiff.VPProcess()
        >>> model = lambda x_t, t, cond: jnp.zeros_like(x_t)
        >>> loss, aux = denoising_loss(jax.random.key(0), model, process, jnp.ones((8, 2)),
        ...                            weighting="min_snr", time_sampling="low_discrepancy")
    """
    _check_choice(prediction, PREDICTIONS, "prediction")
    _check_weighting_options(weighting, min_snr_gamma, sigmoid_bias, sigma_data)
    _check_choice(time_sampling, TIME_SAMPLINGS, "time_sampling", allow_callable=True)
    _check_choice(cep_kind, CEP_KINDS, "cep_kind")
    _check_probability(cond_dropout, "cond_dropout")
    check_positive(cep_gamma, "cep_gamma", allow_zero=True)
    _check_finite(p_mean, "p_mean")
    check_positive(p_std, "p_std")
    if not callable(model):
        raise TypeError(f"model must be callable; got {type(model).__name__}.")
    x0 = jnp.asarray(x0)
    if x0.ndim < 2:
        raise ValueError(
            f"x0 must have shape (B, ...) with at least one data axis; got x0.shape = {x0.shape}."
        )
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise TypeError(f"x0 must be a floating array; got dtype {x0.dtype}.")
    batch = x0.shape[0]
    use_dropout = not _is_off(cond_dropout)
    use_cep = not _is_off(cep_gamma)
    if cond is None and use_dropout:
        raise ValueError("cond_dropout > 0 needs a condition: cond is None.")
    if cond is None and use_cep:
        raise ValueError("cep_gamma > 0 perturbs the condition embedding: cond is None.")
    if use_dropout and null_cond is None:
        raise ValueError("cond_dropout > 0 needs null_cond (the network's null condition).")
    if cond is not None and _batch_size_of(cond) != batch:
        raise ValueError(
            f"the leaves of cond must have leading axis B = x0.shape[0] = {batch}; got "
            f"{_batch_size_of(cond)}."
        )
    if example_index is None:
        index = jnp.arange(batch, dtype=jnp.uint32)
    else:
        index = jnp.asarray(example_index)
        if index.shape != (batch,) or not jnp.issubdtype(index.dtype, jnp.integer):
            raise ValueError(
                f"example_index must be an int array of shape (B,) = ({batch},); got "
                f"{index.shape}, {index.dtype}."
            )

    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    key_examples, key_batch = jax.random.split(key)
    key_offset, key_cep = jax.random.split(key_batch)
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(key_examples, batch, index))
    keys_t, keys_eps, keys_drop = keys[:, 0], keys[:, 1], keys[:, 2]

    t = _sample_times(time_sampling, keys_t, key_offset, index, process, dtype, p_mean, p_std)
    eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], dtype))(keys_eps)
    x0_f = x0.astype(dtype)
    coefs = _coefficients(process, t, x0_f)
    alpha, sigma = coefs[0], coefs[1]
    x_t = (alpha * x0_f + sigma * eps).astype(x0.dtype)
    target = _from_pair("x0" if prediction == "edm" else prediction, x0_f, eps, *coefs)

    if use_dropout:
        null = _resolve_null_cond(null_cond, cond, batch, "null_cond")
        drop = jax.vmap(lambda k: jax.random.bernoulli(k, cond_dropout))(keys_drop)
        cond = _select_rows(drop, cond, null)
    if use_cep:
        cep_key = jax.random.fold_in(key_cep, index[0])
        pred = model(x_t, t, cond, cep=(cep_key, cep_gamma, cep_kind))
    else:
        pred = model(x_t, t, cond)
    pred = jnp.asarray(pred)
    if pred.shape != x0.shape:
        raise ValueError(
            f"model returned shape {pred.shape}; expected the shape of x0, {x0.shape}."
        )
    pred = pred.astype(jnp.promote_types(pred.dtype, dtype))
    axes = tuple(range(1, x0.ndim))
    mse = jnp.mean(jnp.square(pred - target), axis=axes)
    weight = _loss_weight(
        process, t, prediction, weighting, min_snr_gamma, sigmoid_bias, sigma_data
    ).astype(mse.dtype)
    per_example = weight * mse
    aux = {
        "per_example": per_example,
        "mse": mse,
        "weight": weight,
        "t": t,
        "log_snr": process.log_snr(t),
    }
    return jnp.mean(per_example), aux


# ------------------------------------------------------------------------------------------------
# Loss per noise-level bin
# ------------------------------------------------------------------------------------------------


def binned_loss(per_example, log_snr, edges):
    r"""Sum and count of per-example losses in log-SNR bins (for a loss-vs-noise-level report).

    With increasing edges :math:`e_0 < \dots < e_{E-1}` there are :math:`E + 1` bins:
    :math:`(-\infty, e_0), [e_0, e_1), \dots, [e_{E-1}, \infty)`. Sums and counts add up over
    steps, so a training loop can report ``sums / counts`` over any window. Noise-level edges
    :math:`\varsigma` convert as :math:`\lambda = -2\ln\varsigma` (the order reverses).

    Args:
        per_example: losses, shape ``(B,)``.
        log_snr: log-SNR of each example, shape ``(B,)``.
        edges: increasing edges, shape ``(E,)`` (e.g. :func:`default_bins`).

    Returns:
        ``(sums, counts)``, shapes ``(E + 1,)``; ``sums`` in the dtype of ``per_example``
        (at least float32), ``counts`` int32.

    Examples:
        >>> sums, counts = binned_loss(jnp.ones(4), jnp.array([-5.0, 0.0, 1.0, 9.0]),
        ...                            jnp.array([-1.0, 2.0]))   # counts = [1, 2, 1]
    """
    per_example, log_snr = jnp.asarray(per_example), jnp.asarray(log_snr)
    edges = jnp.asarray(edges)
    if per_example.ndim != 1 or log_snr.shape != per_example.shape:
        raise ValueError(
            "per_example and log_snr must both have shape (B,); got "
            f"{per_example.shape} and {log_snr.shape}."
        )
    if edges.ndim != 1:
        raise ValueError(f"edges must have shape (E,); got {edges.shape}.")
    if is_concrete(edges) and np.any(np.diff(np.asarray(edges, np.float64)) <= 0):
        raise ValueError("edges must be strictly increasing.")
    num_bins = edges.shape[0] + 1
    dtype = jnp.promote_types(per_example.dtype, jnp.float32)
    idx = jnp.searchsorted(edges.astype(log_snr.dtype), log_snr, side="right")
    sums = jnp.zeros((num_bins,), dtype).at[idx].add(per_example.astype(dtype))
    counts = jnp.zeros((num_bins,), jnp.int32).at[idx].add(1)
    return sums, counts


def default_bins(process, n: int = 8):
    r"""Edges of ``n`` equal-width log-SNR bins over :math:`[\lambda(t_{\max}), \lambda(t_{\min})]`.

    Returns the ``n - 1`` interior edges, so that :func:`binned_loss` has exactly ``n`` bins (the
    two outer bins are open-ended and catch everything outside the range).

    Args:
        process: a process with concrete ``t_min``/``t_max``.
        n: number of bins, ``n >= 1``.

    Returns:
        numpy float64 array of shape ``(n - 1,)``, increasing log-SNR edges.

    Examples:
        >>> edges = default_bins(jaxdiff.EDMProcess(), 6)   # 5 edges, 6 bins
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1; got {n!r}.")
    if not is_concrete(process.t_min, process.t_max):
        raise ValueError("default_bins needs a process with concrete t_min and t_max.")
    t_min = np.asarray(process.t_min, np.float64)
    t_max = np.asarray(process.t_max, np.float64)
    lo = float(np.asarray(process.log_snr(jnp.asarray(t_max))))
    hi = float(np.asarray(process.log_snr(jnp.asarray(t_min))))
    return np.linspace(lo, hi, int(n) + 1)[1:-1]
