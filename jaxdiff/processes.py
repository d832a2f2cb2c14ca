r"""Gaussian forward processes :math:`x_t = \alpha(t) x_0 + \sigma(t) \varepsilon`.

Every process is a frozen dataclass registered as a pytree: its float fields are pytree *data*
(traceable, differentiable, vmappable; changing them does not recompile), and constructors
validate concrete values. Everything derives from the marginal coefficients
:math:`(\alpha(t), \sigma(t))`:

.. math::
    \lambda(t) = \log \mathrm{SNR}(t) = \log(\alpha^2 / \sigma^2), \qquad
    f(t) = \frac{d \log \alpha}{dt}, \qquad
    g^2(t) = \frac{d \sigma^2}{dt} - 2 f(t) \sigma^2 = -\sigma^2 \frac{d\lambda}{dt},

so the forward SDE :math:`dx = f(t) x\,dt + g(t)\,dW` has exactly these marginals. Each process
implements the coefficients in closed, well-conditioned forms (``expm1``/``log1p``/log-SNR; never
``inf - inf``), and the reverse-time dynamics are written as combined coefficients of ``x`` and the
denoiser output ``x0_hat`` so nothing divides a cancellation by a small ``sigma``.

Times: ``t`` is a scalar or a per-example vector of shape ``(B,)`` for states of shape
``(B, ...)``. Processes do not check the time range themselves (they are used inside ``jit``);
entry points (``sample_marginal``, conversions, analytic distributions) refuse concrete times
outside ``[t_min, t_max]``.
"""

import abc
import math

import jax
import jax.numpy as jnp
import numpy as np

from ._utils import (
    as_float_array,
    broadcast_to_batch,
    check_positive,
    check_times,
    is_concrete,
    pytree_dataclass,
)

__all__ = [
    "AbstractProcess",
    "VPProcess",
    "DiscreteVPProcess",
    "CosineVPProcess",
    "SubVPProcess",
    "VEProcess",
    "EDMProcess",
    "RectifiedFlowProcess",
    "OUProcess",
    "rescale_zero_terminal_snr",
    "discrete_betas",
]

_LOG_2 = math.log(2.0)


class AbstractProcess(abc.ABC):
    r"""Gaussian forward process :math:`x_t = \alpha(t) x_0 + \sigma(t) \varepsilon`.

    Subclasses implement :meth:`alpha`, :meth:`sigma`, :meth:`log_snr`, :meth:`f`, :meth:`g2`,
    :meth:`d_sigma` and :meth:`t_from_log_snr` in closed form and carry the fields ``t_min`` and
    ``t_max`` (the range in which samplers and losses evaluate the process; :math:`\alpha > 0`
    and :math:`\sigma > 0` on it). All other methods derive from these.
    """

    t_min: float
    t_max: float

    # -- the closed forms every process provides -------------------------------------------------

    @abc.abstractmethod
    def alpha(self, t):
        r"""Signal scale :math:`\alpha(t)`; elementwise in ``t``."""

    @abc.abstractmethod
    def sigma(self, t):
        r"""Noise scale :math:`\sigma(t)` (marginal standard deviation given :math:`x_0`)."""

    @abc.abstractmethod
    def log_snr(self, t):
        r"""Log signal-to-noise ratio :math:`\lambda(t) = \log(\alpha^2/\sigma^2)`, decreasing."""

    @abc.abstractmethod
    def t_from_log_snr(self, log_snr):
        r"""Inverse of :meth:`log_snr`: the time with :math:`\lambda(t) = ` ``log_snr``."""

    @abc.abstractmethod
    def f(self, t):
        r"""Forward-SDE drift coefficient :math:`f(t) = d\log\alpha/dt`."""

    @abc.abstractmethod
    def g2(self, t):
        r"""Squared forward-SDE diffusion :math:`g^2(t) = d\sigma^2/dt - 2 f \sigma^2`."""

    @abc.abstractmethod
    def d_sigma(self, t):
        r""":math:`d\sigma/dt` in closed form."""

    # -- derived quantities ------------------------------------------------------------------------

    def alpha_sigma(self, t):
        r"""Both :math:`(\alpha(t), \sigma(t))`."""
        return self.alpha(t), self.sigma(t)

    def noise_level(self, t):
        r"""Noise level :math:`\sigma/\alpha = e^{-\lambda/2}` (the EDM/VE ``sigma``)."""
        return jnp.exp(-0.5 * self.log_snr(t))

    def t_from_noise_level(self, noise_level):
        r"""Inverse of :meth:`noise_level`."""
        return self.t_from_log_snr(-2.0 * jnp.log(as_float_array(noise_level)))

    def d_alpha(self, t):
        r""":math:`d\alpha/dt = f(t)\,\alpha(t)`."""
        return self.f(t) * self.alpha(t)

    def d_log_snr(self, t):
        r""":math:`d\lambda/dt = -g^2/\sigma^2` (negative)."""
        return -self.g2(t) / jnp.square(self.sigma(t))

    # -- reverse-time dynamics in terms of a denoiser ---------------------------------------------

    def pf_velocity(self, x, t, x0_hat):
        r"""Probability-flow ODE velocity :math:`dx/dt` given the denoiser output.

        .. math::
            \frac{dx}{dt} = f x - \tfrac12 g^2 \nabla\log p_t(x)
            = \frac{\dot\sigma}{\sigma} x - \frac{\alpha g^2}{2\sigma^2} \hat x_0,

        using :math:`\nabla\log p_t = (\alpha \hat x_0 - x)/\sigma^2`. Both coefficients are
        computed in closed form, so nothing subtracts nearly equal terms.

        Args:
            x: state, shape ``(B, ...)``.
            t: time, shape ``()`` or ``(B,)``.
            x0_hat: denoiser output :math:`E[x_0 \mid x_t = x]`, shape of ``x``.

        Returns:
            :math:`dx/dt` with the shape of ``x``.
        """
        return self.reverse_drift(x, t, x0_hat, eta=0.0)

    def reverse_drift(self, x, t, x0_hat, eta=1.0):
        r"""Drift of the reverse-time SDE family, :math:`\eta = 0` is the PF ODE, 1 the reverse SDE.

        .. math::
            dx = \Big[f x - \frac{1+\eta^2}{2} g^2 \nabla\log p_t(x)\Big] dt + \eta\, g\, d\bar W
            = \Big[\big(\tfrac{\dot\sigma}{\sigma} + \eta^2 \tfrac{g^2}{2\sigma^2}\big) x
              - (1+\eta^2)\tfrac{\alpha g^2}{2\sigma^2} \hat x_0\Big] dt + \eta\, g\, d\bar W,

        integrated backwards in time (``dt < 0``). Every member has the marginals of the forward
        process (Zhang & Chen 2022; Karras et al. 2022, eq. 6).

        Args:
            x: state, shape ``(B, ...)``.
            t: time, shape ``()`` or ``(B,)``.
            x0_hat: denoiser output, shape of ``x``.
            eta: noise multiplier :math:`\eta \ge 0` (scalar or ``(B,)``).

        Returns:
            The drift, shape of ``x``.

        Examples:
            >>> process = jaxdiff.VPProcess()
            >>> x = jnp.ones((2, 3)); t = jnp.full((2,), 0.5)
            >>> drift = process.reverse_drift(x, t, jnp.zeros_like(x), eta=1.0)
        """
        c_x, c_d = self.reverse_drift_coefficients(t, eta)
        return broadcast_to_batch(c_x, x) * x + broadcast_to_batch(c_d, x) * x0_hat

    def reverse_drift_coefficients(self, t, eta=1.0):
        r"""The coefficients :math:`(c_x, c_{\hat x_0})` of :meth:`reverse_drift`.

        .. math:: c_x = \frac{\dot\sigma}{\sigma} + \eta^2\frac{g^2}{2\sigma^2}, \qquad
            c_{\hat x_0} = -(1+\eta^2)\frac{\alpha g^2}{2\sigma^2},

        so that the drift is :math:`c_x x + c_{\hat x_0}\hat x_0`; samplers precompute them for a
        whole grid.

        Args:
            t: time, shape ``()`` or ``(B,)``.
            eta: noise multiplier :math:`\eta \ge 0` (scalar or ``(B,)``).

        Returns:
            ``(c_x, c_x0)``, each of the broadcast shape of ``t`` and ``eta``.

        Examples:
            >>> c_x, c_x0 = jaxdiff.EDMProcess().reverse_drift_coefficients(2.0, eta=0.0)
        """
        t = as_float_array(t)
        alpha, sigma = self.alpha(t), self.sigma(t)
        g2_over_s2 = self.g2(t) / jnp.square(sigma)
        eta2 = jnp.square(jnp.asarray(eta))
        c_x = self.d_sigma(t) / sigma + 0.5 * eta2 * g2_over_s2
        c_d = -0.5 * (1.0 + eta2) * alpha * g2_over_s2
        return c_x, c_d

    def reverse_diffusion(self, t, eta=1.0):
        r"""Diffusion coefficient :math:`\eta\, g(t)` of the reverse-time SDE family."""
        return jnp.asarray(eta) * jnp.sqrt(self.g2(t))

    # -- sampling and the prior --------------------------------------------------------------------

    def sample_marginal(self, key, x0, t):
        r"""Draw :math:`x_t \sim q(x_t \mid x_0) = N(\alpha(t) x_0, \sigma(t)^2 I)`.

        Args:
            key: a typed PRNG key (``jax.random.key``).
            x0: clean data, shape ``(B, ...)``.
            t: time(s) in ``[t_min, t_max]``, shape ``()`` or ``(B,)``.

        Returns:
            ``(x_t, eps)``, both with the shape and dtype of ``x0``.

        Examples:
            >>> process = jaxdiff.EDMProcess()
            >>> x_t, eps = process.sample_marginal(jax.random.key(0), jnp.zeros((4, 2)), 1.0)
        """
        check_times(self, t)
        t = as_float_array(t)
        eps = jax.random.normal(key, x0.shape, x0.dtype)
        alpha, sigma = self.alpha(t), self.sigma(t)
        x_t = broadcast_to_batch(alpha, x0) * x0 + broadcast_to_batch(sigma, x0) * eps
        return x_t.astype(x0.dtype), eps

    def prior_std(self):
        r"""Standard deviation :math:`\sigma(t_{\max})` of the prior, :math:`N(0, \sigma^2 I)`.

        The prior is the marginal at ``t_max`` of data concentrated at 0; it neglects the
        :math:`\alpha(t_{\max}) x_0` term (small for VP-type processes, zero for none).
        """
        return self.sigma(as_float_array(self.t_max))

    def sample_prior(self, key, shape, dtype=jnp.float32):
        r"""Draw :math:`x_T \sim N(0, \sigma(t_{\max})^2 I)` of the given ``shape``."""
        return (self.prior_std() * jax.random.normal(key, shape, dtype)).astype(dtype)

    def prior_log_prob(self, x):
        r"""Log density of the prior, summed over all but the leading (batch) axis.

        Args:
            x: shape ``(B, ...)``.

        Returns:
            shape ``(B,)``.
        """
        x = jnp.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"x must have a leading batch axis; got shape {x.shape}.")
        std = self.prior_std()
        d = math.prod(x.shape[1:])
        sq = jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=-1)
        return -0.5 * sq / jnp.square(std) - d * (jnp.log(std) + 0.5 * math.log(2 * math.pi))

    # -- validation --------------------------------------------------------------------------------

    def _check_range(self, t_upper_limit=None, *, alpha_vanishes_at_1=False):
        """Validate concrete t_min/t_max (called from __post_init__; arrays checked elementwise)."""
        if not is_concrete(self.t_min, self.t_max):
            return
        t_min, t_max = _np(self.t_min), _np(self.t_max)
        name = type(self).__name__
        if not np.all(np.isfinite(t_min) & (t_min > 0)):
            raise ValueError(f"{name}: t_min must be finite and > 0; got {self.t_min}.")
        if not np.all(np.isfinite(t_max) & (t_max > t_min)):
            raise ValueError(f"{name}: t_max must be finite and > t_min; got {self.t_max}.")
        if t_upper_limit is not None and np.any(t_max > t_upper_limit):
            raise ValueError(f"{name}: t_max must be <= {t_upper_limit}; got {self.t_max}.")
        if alpha_vanishes_at_1 and np.any(t_max >= 1.0):
            raise ValueError(f"{name}: t_max must be < 1 (alpha(1) = 0); got {self.t_max}.")


def _np(value):
    return np.asarray(value, dtype=np.float64)


class _AbstractVP(AbstractProcess):
    r"""Variance-preserving family: :math:`\sigma^2 = 1 - \alpha^2`, so :math:`g^2 = -2f`."""

    @abc.abstractmethod
    def log_alpha(self, t):
        r""":math:`\log\alpha(t)`."""

    @abc.abstractmethod
    def t_from_log_alpha(self, log_alpha):
        r"""Inverse of :meth:`log_alpha`."""

    def alpha(self, t):
        return jnp.exp(self.log_alpha(as_float_array(t)))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(as_float_array(t))))

    def log_snr(self, t):
        la = self.log_alpha(as_float_array(t))
        return 2.0 * la - jnp.log(-jnp.expm1(2.0 * la))

    def t_from_log_snr(self, log_snr):
        # alpha^2 = sigmoid(lambda)  =>  log alpha = log_sigmoid(lambda) / 2.
        return self.t_from_log_alpha(0.5 * jax.nn.log_sigmoid(as_float_array(log_snr)))

    def g2(self, t):
        return -2.0 * self.f(t)

    def d_sigma(self, t):
        # sigma' = -alpha alpha' / sigma = -f alpha^2 / sigma (no 1 - sigma^2 cancellation).
        t = as_float_array(t)
        la = self.log_alpha(t)
        return -self.f(t) * jnp.exp(2.0 * la) / jnp.sqrt(-jnp.expm1(2.0 * la))

    def d_log_snr(self, t):
        # -g^2/sigma^2 = 2 f / sigma^2 with sigma^2 from expm1.
        t = as_float_array(t)
        return 2.0 * self.f(t) / -jnp.expm1(2.0 * self.log_alpha(t))


def _linear_beta_log_alpha(t, beta_min, beta_max):
    return -0.25 * jnp.square(t) * (beta_max - beta_min) - 0.5 * t * beta_min


def _linear_beta_t_from_log_alpha(log_alpha, beta_min, beta_max):
    # Solve (beta_max - beta_min) t^2 / 2 + beta_min t = c with c = -2 log alpha, in the
    # cancellation-free form t = 2c / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) c)).
    c = -2.0 * as_float_array(log_alpha)
    return 2.0 * c / (beta_min + jnp.sqrt(jnp.square(beta_min) + 2.0 * (beta_max - beta_min) * c))


def _check_linear_betas(process):
    if not is_concrete(process.beta_min, process.beta_max):
        return
    check_positive(process.beta_min, "beta_min", allow_zero=True)
    check_positive(process.beta_max, "beta_max")
    if np.any(_np(process.beta_max) < _np(process.beta_min)):
        raise ValueError(
            f"beta_max must be >= beta_min; got beta_min={process.beta_min}, "
            f"beta_max={process.beta_max}."
        )


@pytree_dataclass
class VPProcess(_AbstractVP):
    r"""Variance-preserving process with a linear :math:`\beta` schedule (Song et al., 2021).

    .. math::
        \log\alpha(t) = -\tfrac14 t^2 (\beta_{\max} - \beta_{\min}) - \tfrac12 t \beta_{\min},
        \qquad \sigma = \sqrt{1 - \alpha^2}, \qquad f = -\tfrac12\beta(t), \quad g^2 = \beta(t),

    with :math:`\beta(t) = \beta_{\min} + t(\beta_{\max} - \beta_{\min})`.

    Examples:
        >>> process = jaxdiff.VPProcess(beta_min=0.1, beta_max=20.0)
        >>> float(process.alpha(0.0))
        1.0
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def __post_init__(self):
        _check_linear_betas(self)
        self._check_range(t_upper_limit=1.0)

    def log_alpha(self, t):
        return _linear_beta_log_alpha(as_float_array(t), self.beta_min, self.beta_max)

    def t_from_log_alpha(self, log_alpha):
        return _linear_beta_t_from_log_alpha(log_alpha, self.beta_min, self.beta_max)

    def f(self, t):
        return -0.5 * (self.beta_min + as_float_array(t) * (self.beta_max - self.beta_min))


@pytree_dataclass
class CosineVPProcess(_AbstractVP):
    r"""Cosine variance-preserving process (Nichol & Dhariwal, 2021) in continuous time.

    .. math::
        \alpha(t) = \frac{\cos\theta(t)}{\cos\theta(0)}, \qquad
        \theta(t) = \frac{t + s}{1 + s}\frac{\pi}{2}, \qquad
        f = -\frac{\pi}{2(1+s)}\tan\theta(t).

    :math:`\alpha(1) = 0`, so ``t_max`` must be below 1; the default 0.9946 is DPM-Solver's
    (:math:`\lambda(t_{\max}) \approx -10.2`).
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 0.9946

    def __post_init__(self):
        check_positive(self.s, "s", allow_zero=True)
        self._check_range(alpha_vanishes_at_1=True)

    def _theta(self, t):
        return (as_float_array(t) + self.s) / (1.0 + self.s) * (0.5 * jnp.pi)

    def _cos_theta(self, t):
        # cos(theta) = sin((1 - t) / (1 + s) * pi / 2): accurate where theta -> pi / 2.
        return jnp.sin((1.0 - as_float_array(t)) / (1.0 + self.s) * (0.5 * jnp.pi))

    def log_alpha(self, t):
        return jnp.log(self._cos_theta(t)) - jnp.log(self._cos_theta(0.0))

    def t_from_log_alpha(self, log_alpha):
        theta = jnp.arccos(jnp.exp(as_float_array(log_alpha)) * self._cos_theta(0.0))
        return theta * (1.0 + self.s) / (0.5 * jnp.pi) - self.s

    def f(self, t):
        return -0.5 * jnp.pi / (1.0 + self.s) * jnp.tan(self._theta(t))


def discrete_betas(num_train_timesteps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02):
    r"""DDPM-style beta tables (float64 numpy), as in the usual discrete-time code bases.

    * ``"linear"``: :math:`\beta_i` evenly spaced in ``[beta_start, beta_end]`` (Ho et al. 2020).
    * ``"scaled_linear"``: :math:`\sqrt{\beta_i}` evenly spaced (Stable Diffusion; e.g.
      ``beta_start=0.00085, beta_end=0.012``).
    * ``"squaredcos_cap_v2"``: :math:`\beta_i = \min(1 - \bar\alpha(\tfrac{i+1}{N})/
      \bar\alpha(\tfrac iN), 0.999)` with the cosine :math:`\bar\alpha` (Nichol & Dhariwal 2021).

    Returns:
        ``betas`` of shape ``(num_train_timesteps,)``.
    """
    n = int(num_train_timesteps)
    if n < 2:
        raise ValueError(f"num_train_timesteps must be >= 2; got {num_train_timesteps}.")
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        def abar(u):
            return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
        i = np.arange(n, dtype=np.float64)
        betas = np.minimum(1.0 - abar((i + 1) / n) / abar(i / n), 0.999)
    else:
        raise ValueError(
            "schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'; "
            f"got {schedule!r}."
        )
    return betas


def rescale_zero_terminal_snr(betas):
    r"""Rescale a beta table so the last step has zero SNR (Lin et al. 2024, Algorithm 1).

    Shifts and scales :math:`\sqrt{\bar\alpha_i}` so the first value is unchanged and the last is 0.

    Args:
        betas: shape ``(N,)``.

    Returns:
        New betas of shape ``(N,)``; the last equals 1.
    """
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


# The continuous-time interpolation replaces an exact abar = 0 (zero terminal SNR) by 2^-24 so
# the log-SNR stays finite at t = 1 (the value diffusers' multistep solvers use); other tables
# are interpolated as they are.
_MIN_ALPHA_BAR_LOG = -24.0 * math.log(2.0)


@pytree_dataclass
class DiscreteVPProcess(_AbstractVP):
    r"""Variance-preserving process from a discrete DDPM beta table, in continuous time.

    Table index :math:`n \in \{0, \dots, N-1\}` sits at time :math:`t_n = (n+1)/N` with
    :math:`\alpha(t_n) = \sqrt{\bar\alpha_n}`, :math:`\bar\alpha_n = \prod_{i \le n}(1-\beta_i)`,
    and :math:`\alpha(0) = 1`. Between knots :math:`\log\alpha` is linear in :math:`t` (the
    convention of DPM-Solver's discrete schedules), so :math:`f` is piecewise constant. A
    zero-terminal-SNR table has its exact :math:`\bar\alpha_{N-1} = 0` replaced by
    :math:`2^{-24}` for the interpolation.

    ``betas`` is pytree data: it can be differentiated or learned.

    Build with :meth:`create` (named schedules) or :meth:`from_betas`.

    Examples:
        >>> process = jaxdiff.DiscreteVPProcess.create(1000, "linear")
        >>> ts = process.timesteps(50, spacing="trailing")   # decreasing times in (0, 1]
    """

    betas: jax.Array
    t_min: float = 1e-3
    t_max: float = 1.0

    def __post_init__(self):
        if is_concrete(self.betas):
            b = _np(self.betas)
            if b.ndim < 1 or b.shape[-1] < 2:
                raise ValueError(f"betas must have shape (N,) with N >= 2; got {b.shape}.")
            if not np.all((b > 0) & (b <= 1)):
                raise ValueError("betas must lie in (0, 1].")
        self._check_range(t_upper_limit=1.0)

    @classmethod
    def from_betas(cls, betas, *, t_min=None, t_max=1.0):
        """Build from a beta table; ``t_min`` defaults to the first knot ``1/N``."""
        betas = jnp.asarray(betas)
        n = betas.shape[0] if betas.ndim == 1 else 0
        if t_min is None:
            t_min = 1.0 / max(n, 1)
        return cls(betas=betas, t_min=t_min, t_max=t_max)

    @classmethod
    def create(
        cls,
        num_train_timesteps=1000,
        schedule="linear",
        *,
        beta_start=1e-4,
        beta_end=0.02,
        zero_terminal_snr=False,
        t_min=None,
        t_max=1.0,
    ):
        """Build from a named DDPM schedule (see :func:`discrete_betas`).

        Args:
            num_train_timesteps: table length ``N``.
            schedule: ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"``.
            beta_start, beta_end: end points of the linear schedules.
            zero_terminal_snr: apply :func:`rescale_zero_terminal_snr`.
            t_min, t_max: time range (default ``1/N`` and 1).
        """
        betas = discrete_betas(num_train_timesteps, schedule, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas, t_min=t_min, t_max=t_max)

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    def _knots(self, dtype):
        betas = jnp.asarray(self.betas, dtype)
        log_abar = jnp.cumsum(jnp.log1p(-betas))
        log_abar = jnp.where(jnp.isfinite(log_abar), log_abar, _MIN_ALPHA_BAR_LOG)
        n = betas.shape[0]
        t_knots = jnp.arange(n + 1, dtype=dtype) / n
        la_knots = jnp.concatenate([jnp.zeros((1,), dtype), 0.5 * log_abar])
        return t_knots, la_knots

    def _dtype(self, x):
        # Coefficients follow the dtype of t (float32 t -> float32 table), like other processes.
        return as_float_array(x).dtype

    def log_alpha(self, t):
        t = as_float_array(t)
        t_knots, la_knots = self._knots(self._dtype(t))
        return jnp.interp(t, t_knots, la_knots)

    def t_from_log_alpha(self, log_alpha):
        la = as_float_array(log_alpha)
        t_knots, la_knots = self._knots(self._dtype(la))
        return jnp.interp(la, la_knots[::-1], t_knots[::-1])

    def f(self, t):
        t = as_float_array(t)
        t_knots, la_knots = self._knots(self._dtype(t))
        n = self.betas.shape[0]
        idx = jnp.clip(jnp.searchsorted(t_knots, t, side="right") - 1, 0, n - 1)
        return (la_knots[idx + 1] - la_knots[idx]) * n

    def time_from_index(self, index):
        """Time :math:`(n+1)/N` of table index ``n`` (array of ints)."""
        return (np.asarray(index, dtype=np.float64) + 1.0) / self.num_train_timesteps

    def index_from_time(self, t):
        """Continuous table index :math:`tN - 1` (what a network trained on indices expects)."""
        return as_float_array(t) * self.num_train_timesteps - 1.0

    def timestep_indices(self, num_steps, spacing="leading", steps_offset=0):
        r"""Decreasing table indices for ``num_steps`` sampling steps (diffusers' spacings).

        * ``"linspace"``: ``round(linspace(0, N-1, num_steps))``;
        * ``"leading"``: ``arange(num_steps) * (N // num_steps) + steps_offset``;
        * ``"trailing"``: ``round(arange(N, 0, -N/num_steps)) - 1`` (always includes ``N-1``;
          recommended with zero terminal SNR, Lin et al. 2024, Table 2).

        Returns:
            int numpy array of shape ``(num_steps,)``, decreasing.
        """
        n = self.num_train_timesteps
        if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= n:
            raise ValueError(f"num_steps must be an int in [1, {n}]; got {num_steps!r}.")
        if spacing == "linspace":
            idx = np.linspace(0, n - 1, num_steps).round()[::-1]
        elif spacing == "leading":
            idx = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + steps_offset
        elif spacing == "trailing":
            idx = np.round(np.arange(n, 0, -n / num_steps)) - 1
        else:
            raise ValueError(
                f"spacing must be one of 'linspace', 'leading', 'trailing'; got {spacing!r}."
            )
        idx = idx.astype(np.int64)
        if idx.min() < 0 or idx.max() > n - 1:
            raise ValueError(f"steps_offset={steps_offset} puts indices outside [0, {n - 1}].")
        return idx

    def timesteps(self, num_steps, spacing="leading", steps_offset=0):
        """Decreasing times ``(index + 1)/N`` of :meth:`timestep_indices`."""
        return self.time_from_index(self.timestep_indices(num_steps, spacing, steps_offset))


@pytree_dataclass
class SubVPProcess(AbstractProcess):
    r"""Sub-VP process (Song et al., 2021): VP drift, smaller diffusion.

    .. math::
        \alpha = e^{-\frac12\int_0^t\beta}, \qquad \sigma = 1 - \alpha^2, \qquad
        f = -\tfrac12\beta(t), \qquad g^2 = \beta(t)\big(1 - e^{-2\int_0^t\beta}\big).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def __post_init__(self):
        _check_linear_betas(self)
        self._check_range(t_upper_limit=1.0)

    def _log_alpha(self, t):
        return _linear_beta_log_alpha(as_float_array(t), self.beta_min, self.beta_max)

    def alpha(self, t):
        return jnp.exp(self._log_alpha(t))

    def sigma(self, t):
        return -jnp.expm1(2.0 * self._log_alpha(t))

    def log_snr(self, t):
        la = self._log_alpha(t)
        return 2.0 * la - 2.0 * jnp.log(-jnp.expm1(2.0 * la))

    def t_from_log_snr(self, log_snr):
        # alpha / (1 - alpha^2) = r = e^{lambda/2}  =>  alpha = 2r / (1 + sqrt(1 + 4 r^2)),
        # evaluated in the log domain on both sides of u = lambda/2 = 0 to avoid overflow.
        u = 0.5 * as_float_array(log_snr)
        up, un = jnp.maximum(u, 0.0), jnp.minimum(u, 0.0)
        la_pos = _LOG_2 - jnp.log(jnp.exp(-up) + jnp.sqrt(jnp.exp(-2.0 * up) + 4.0))
        la_neg = _LOG_2 + un - jnp.log1p(jnp.sqrt(1.0 + 4.0 * jnp.exp(2.0 * un)))
        la = jnp.where(u > 0, la_pos, la_neg)
        return _linear_beta_t_from_log_alpha(la, self.beta_min, self.beta_max)

    def f(self, t):
        return -0.5 * (self.beta_min + as_float_array(t) * (self.beta_max - self.beta_min))

    def g2(self, t):
        return 2.0 * self.f(t) * jnp.expm1(4.0 * self._log_alpha(t))

    def d_sigma(self, t):
        return -2.0 * self.f(t) * jnp.exp(2.0 * self._log_alpha(t))


@pytree_dataclass
class VEProcess(AbstractProcess):
    r"""Variance-exploding process (Song et al., 2021), marginal defined from :math:`x_0`.

    The SDE :math:`dx = g\,dW` with :math:`g^2 = \frac{d}{dt}\sigma_{\min}^2 r^{2t}`,
    :math:`r = \sigma_{\max}/\sigma_{\min}`, started at :math:`x_0` has

    .. math::
        \alpha = 1, \qquad \sigma(t)^2 = \sigma_{\min}^2 (r^{2t} - 1), \qquad f = 0, \qquad
        g^2 = 2\log r\,\sigma_{\min}^2 r^{2t},

    so the marginal and the SDE agree exactly (:math:`\sigma(0) = 0`).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0

    def __post_init__(self):
        check_positive(self.sigma_min, "sigma_min")
        check_positive(self.sigma_max, "sigma_max")
        if is_concrete(self.sigma_min, self.sigma_max) and np.any(
            _np(self.sigma_max) <= _np(self.sigma_min)
        ):
            raise ValueError(
                f"sigma_max must be > sigma_min; got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}."
            )
        self._check_range()

    def _log_r(self):
        return jnp.log(self.sigma_max) - jnp.log(self.sigma_min)

    def alpha(self, t):
        return jnp.ones_like(as_float_array(t))

    def sigma(self, t):
        return self.sigma_min * jnp.sqrt(jnp.expm1(2.0 * as_float_array(t) * self._log_r()))

    def log_snr(self, t):
        return -2.0 * jnp.log(self.sigma_min) - jnp.log(
            jnp.expm1(2.0 * as_float_array(t) * self._log_r())
        )

    def t_from_log_snr(self, log_snr):
        return jax.nn.softplus(-as_float_array(log_snr) - 2.0 * jnp.log(self.sigma_min)) / (
            2.0 * self._log_r()
        )

    def f(self, t):
        return jnp.zeros_like(as_float_array(t))

    def g2(self, t):
        log_r = self._log_r()
        return 2.0 * log_r * jnp.square(self.sigma_min) * jnp.exp(2.0 * as_float_array(t) * log_r)

    def d_sigma(self, t):
        return 0.5 * self.g2(t) / self.sigma(t)


@pytree_dataclass
class EDMProcess(AbstractProcess):
    r"""EDM process (Karras et al., 2022): :math:`t = \sigma`, :math:`\alpha = 1`.

    .. math::
        \sigma(t) = t, \qquad f = 0, \qquad g^2 = 2t.

    ``sigma_data`` is the data standard deviation used by EDM preconditioning
    (:func:`jaxdiff.predictions.edm_precondition`).
    """

    sigma_data: float = 0.5
    t_min: float = 0.002
    t_max: float = 80.0

    def __post_init__(self):
        check_positive(self.sigma_data, "sigma_data")
        self._check_range()

    def alpha(self, t):
        return jnp.ones_like(as_float_array(t))

    def sigma(self, t):
        return as_float_array(t)

    def log_snr(self, t):
        return -2.0 * jnp.log(as_float_array(t))

    def t_from_log_snr(self, log_snr):
        return jnp.exp(-0.5 * as_float_array(log_snr))

    def f(self, t):
        return jnp.zeros_like(as_float_array(t))

    def g2(self, t):
        return 2.0 * as_float_array(t)

    def d_sigma(self, t):
        return jnp.ones_like(as_float_array(t))


@pytree_dataclass
class RectifiedFlowProcess(AbstractProcess):
    r"""Linear interpolant / rectified flow: :math:`x_t = (1-t) x_0 + t\varepsilon`.

    .. math::
        \alpha = 1 - t, \quad \sigma = t, \quad f = -\frac{1}{1-t}, \quad
        g^2 = \frac{2t}{1-t}, \quad \lambda = 2\log\frac{1-t}{t}.

    The flow-matching velocity target :math:`\varepsilon - x_0` is the ``"velocity"`` prediction
    of :mod:`jaxdiff.predictions`. :math:`\alpha(1) = 0`, so ``t_max < 1``.
    """

    t_min: float = 1e-3
    t_max: float = 0.999

    def __post_init__(self):
        self._check_range(alpha_vanishes_at_1=True)

    def alpha(self, t):
        return 1.0 - as_float_array(t)

    def sigma(self, t):
        return as_float_array(t)

    def log_snr(self, t):
        t = as_float_array(t)
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def t_from_log_snr(self, log_snr):
        return jax.nn.sigmoid(-0.5 * as_float_array(log_snr))

    def f(self, t):
        return -1.0 / (1.0 - as_float_array(t))

    def g2(self, t):
        t = as_float_array(t)
        return 2.0 * t / (1.0 - t)

    def d_sigma(self, t):
        return jnp.ones_like(as_float_array(t))


@pytree_dataclass
class OUProcess(AbstractProcess):
    r"""Constant-coefficient Ornstein–Uhlenbeck process :math:`dx = -x\,dt + dW`.

    .. math::
        \alpha = e^{-t}, \qquad \sigma^2 = \tfrac12(1 - e^{-2t}), \qquad f = -1, \qquad g^2 = 1,

    stationary law :math:`N(0, \tfrac12 I)` (the Fokker–Planck paper's process, ``T = 10``).
    """

    t_min: float = 1e-3
    t_max: float = 10.0

    def __post_init__(self):
        self._check_range()

    def alpha(self, t):
        return jnp.exp(-as_float_array(t))

    def sigma(self, t):
        return jnp.sqrt(-0.5 * jnp.expm1(-2.0 * as_float_array(t)))

    def log_snr(self, t):
        t = as_float_array(t)
        return -2.0 * t - jnp.log(-jnp.expm1(-2.0 * t)) + _LOG_2

    def t_from_log_snr(self, log_snr):
        # e^{2t} = 1 + 2 e^{-lambda}.
        return 0.5 * jax.nn.softplus(_LOG_2 - as_float_array(log_snr))

    def f(self, t):
        return -jnp.ones_like(as_float_array(t))

    def g2(self, t):
        return jnp.ones_like(as_float_array(t))

    def d_sigma(self, t):
        t = as_float_array(t)
        return 0.5 * jnp.exp(-2.0 * t) / self.sigma(t)
