r"""The train state and parameter averages (standard and EDM2 power-function EMA).

A :class:`TrainState` is a pytree of everything a run needs to continue bit for bit: float32
master parameters, their running averages, the optimizer state, the step counter, the run's
base key (each step draws from ``fold_in(key, step)``, so no key is carried forward) and the
number of updates skipped because they were not finite.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._utils import pytree_dataclass

__all__ = [
    "EMA",
    "PowerEMA",
    "TrainState",
    "create_train_state",
    "update_averages",
    "power_ema_gamma",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class EMA:
    r"""Exponential moving average :math:`\bar\theta_n = \beta\bar\theta_{n-1} + (1-\beta)\theta_n`.

    With ``warmup=True`` the decay is :math:`\beta_n = \min(\beta, (1+n)/(10+n))` so that the
    average forgets its initial value early in training (as in the DDPM/score-SDE code bases).

    Args:
        decay: :math:`\beta \in [0, 1)`.
        warmup: use the warm-up schedule above.

    Examples:
        >>> EMA(0.999).name
        'ema_0.999'
    """

    decay: float
    warmup: bool = False

    def __post_init__(self):
        if not 0.0 <= float(self.decay) < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1); got {self.decay}.")

    @property
    def name(self) -> str:
        """Key of this average in :attr:`TrainState.averages`."""
        return f"ema_{self.decay:g}" + ("_warmup" if self.warmup else "")

    def beta(self, n):
        """Decay applied at update number ``n >= 1`` (traced scalar)."""
        n = jnp.asarray(n, jnp.float32)
        if not self.warmup:
            return jnp.asarray(self.decay, jnp.float32)
        return jnp.minimum(jnp.float32(self.decay), (1.0 + n) / (10.0 + n))


def power_ema_gamma(sigma_rel: float) -> float:
    r"""Exponent :math:`\gamma` of the power-function EMA with relative width ``sigma_rel``.

    The averaging profile :math:`w(\tau) \propto \tau^\gamma` on :math:`[0, 1]` has relative
    standard deviation :math:`\sigma_{\rm rel}^2 = (\gamma+1)/((\gamma+2)^2(\gamma+3))`
    (Karras et al. 2024, EDM2); :math:`\gamma` is the largest real root of
    :math:`\gamma^3 + 7\gamma^2 + (16 - \sigma_{\rm rel}^{-2})\gamma + 12 - \sigma_{\rm rel}^{-2}`.

    Examples:
        >>> round(power_ema_gamma(0.1), 2)  # EDM2's sigma_rel = 0.10
        6.94
    """
    sigma_rel = float(sigma_rel)
    if not 0.0 < sigma_rel < 12.0**-0.5:
        # gamma > -1 (an integrable profile) exactly when sigma_rel < 1/sqrt(12).
        raise ValueError(f"PowerEMA: sigma_rel must be in (0, 1/sqrt(12)); got {sigma_rel}.")
    c = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


@dataclasses.dataclass(frozen=True)
class PowerEMA:
    r"""EDM2's power-function EMA: after :math:`n` updates, weights :math:`\propto i^\gamma`.

    The update uses :math:`\beta_n = (1 - 1/n)^{\gamma+1}`, whose average of
    :math:`\theta_1..\theta_n` has weights approaching :math:`i^\gamma / \sum_j j^\gamma`; the
    width is set by ``sigma_rel`` (:func:`power_ema_gamma`). Unlike a fixed decay, the profile
    scales with the length of training.

    Examples:
        >>> PowerEMA(0.05).name
        'power_0.05'
    """

    sigma_rel: float

    def __post_init__(self):
        power_ema_gamma(self.sigma_rel)

    @property
    def name(self) -> str:
        """Key of this average in :attr:`TrainState.averages`."""
        return f"power_{self.sigma_rel:g}"

    def beta(self, n):
        """Decay applied at update number ``n >= 1`` (traced scalar)."""
        gamma = power_ema_gamma(self.sigma_rel)
        n = jnp.asarray(n, jnp.float32)
        return jnp.power(jnp.maximum(1.0 - 1.0 / n, 0.0), gamma + 1.0)


@pytree_dataclass
class TrainState:
    r"""Everything needed to continue a run exactly.

    Fields:
        step: int32 scalar, number of steps taken (skipped ones included).
        params: float32 master parameters (a pytree, e.g. a Flax NNX pure-dict state).
        averages: ``{name: params-like pytree}`` for each :class:`EMA` / :class:`PowerEMA`.
        opt_state: the optax state.
        key: typed base key of the run; step ``n`` uses ``fold_in(key, n)``.
        num_skipped: int32 scalar, updates dropped because loss or gradients were not finite.
        num_updates: int32 scalar, updates applied (the averages' clock).
    """

    step: jax.Array
    params: PyTree
    averages: Mapping[str, PyTree]
    opt_state: PyTree
    key: jax.Array
    num_skipped: jax.Array
    num_updates: jax.Array

    def replace(self, **changes) -> "TrainState":
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)


def create_train_state(
    key: jax.Array,
    params: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    averages: Sequence[EMA | PowerEMA] = (),
) -> TrainState:
    """Initial :class:`TrainState` for ``params`` (copied into every average).

    Args:
        key: typed key (``jax.random.key``), the run's base key.
        params: float parameters.
        optimizer: an optax transformation.
        averages: the parameter averages to keep.

    Examples:
        >>> state = create_train_state(jax.random.key(0), {"w": jnp.zeros(3)}, optax.adam(1e-3),
        ...                            averages=[EMA(0.999)])
    """
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError("create_train_state: key must be a typed key from jax.random.key(seed).")
    names = [a.name for a in averages]
    if len(set(names)) != len(names):
        raise ValueError(f"create_train_state: averages must have distinct names; got {names}.")
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        averages={a.name: jax.tree.map(jnp.array, params) for a in averages},
        opt_state=optimizer.init(params),
        key=key,
        num_skipped=jnp.zeros((), jnp.int32),
        num_updates=jnp.zeros((), jnp.int32),
    )


def update_averages(averages, params, specs, num_updates):
    """Fold ``params`` (update number ``num_updates >= 1``) into every average in ``specs``."""
    out = dict(averages)
    for spec in specs:
        beta = spec.beta(num_updates)
        out[spec.name] = jax.tree.map(
            lambda a, p, beta=beta: (beta * a + (1.0 - beta) * p).astype(a.dtype),
            averages[spec.name],
            params,
        )
    return out
