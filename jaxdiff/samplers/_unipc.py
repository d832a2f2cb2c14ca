r"""UniPC (Zhao et al. 2023): unified predictor UniP-p and corrector UniC-p, data-prediction form.

Notation for a step from the grid time ``t`` (the base, :math:`s_0`) to the next grid time
``s < t`` (the target): :math:`\lambda = \log(\alpha/\sigma)` the half-log-SNR,
:math:`h = \lambda_s - \lambda_t > 0`, :math:`m_0 = D(x_t, t)` the newest data prediction and
:math:`m_k` (:math:`k \ge 1`) the older ones at :math:`\lambda_k < \lambda_t`,
:math:`r_k = (\lambda_k - \lambda_t)/h < 0` and :math:`D_k = (m_k - m_0)/r_k`.

Everything is written with :math:`\delta_k = r_k h = \lambda_k - \lambda_t` so that no
coefficient divides by :math:`h` (the stand-in step of a final exact 0 has :math:`h = 0`), and
the :math:`\varphi`-functions are evaluated by their Taylor series for small :math:`h` (the
recursion :math:`\varphi_{k+1} = (\varphi_k - 1/k!)/z` loses :math:`\epsilon/h^k` there).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._utils import check_times, is_concrete
from ._core import (
    call_denoiser,
    check_inputs,
    coeff_dtype,
    half_log_snr,
    integrate,
    safe_next_time,
)

__all__ = ["unipc"]

_VARIANTS = ("bh1", "bh2")
_SMALL = 0.5  # |z| below: Taylor series of phi; above: the recursion (loses <= 2^(k-1) ulps)
_SERIES_TERMS = 14  # truncation 0.5^14 / 14! < 1e-15 of the last term kept: below 1 ulp


def _phis(z, kmax):
    r""":math:`\varphi_1(z), ..., \varphi_{k_{\max}}(z)` where :math:`\varphi_k = \sum z^j/(j+k)!`.

    For :math:`|z| < 1/2`: the series of :math:`\varphi_{k_{\max}}`, then the stable downward
    recursion :math:`\varphi_k = 1/k! + z\varphi_{k+1}`; otherwise the upward recursion
    :math:`\varphi_{k+1} = (\varphi_k - 1/k!)/z` from ``expm1`` (error growth :math:`\le 2` per
    step there). Both branches see safe inputs, so values and gradients stay finite at ``z = 0``.
    """
    small = jnp.abs(z) < _SMALL
    zs = jnp.where(small, z, 0.0)
    zl = jnp.where(small, -1.0, z)
    ser = [None] * kmax
    acc = 1.0 / math.factorial(_SERIES_TERMS + kmax)
    for j in range(_SERIES_TERMS - 1, -1, -1):
        acc = acc * zs + 1.0 / math.factorial(j + kmax)
    ser[-1] = acc
    for k in range(kmax - 1, 0, -1):
        ser[k - 1] = 1.0 / math.factorial(k) + zs * ser[k]
    rec = [jnp.expm1(zl) / zl]
    for k in range(1, kmax):
        rec.append((rec[-1] - 1.0 / math.factorial(k)) / zl)
    return [jnp.where(small, a, b) for a, b in zip(ser, rec)]


def _rho(node, others, betas):
    r"""One entry of the solution of :math:`\sum_j \rho_j v_j^i = \beta_i` (``<= 3`` nodes).

    Lagrange's closed form: :math:`\rho_j` is the basis polynomial of node ``j`` with each
    :math:`v^i` replaced by :math:`\beta_i`. The nodes are distinct by construction (strictly
    increasing log-SNR along the grid, distinct padding below the history), so no denominator
    vanishes, also in warm-up branches that are computed but not selected.
    """
    if not others:
        return betas[0]
    if len(others) == 1:
        (a,) = others
        return (betas[1] - a * betas[0]) / (node - a)
    a, c = others
    return (betas[2] - (a + c) * betas[1] + a * c * betas[0]) / ((node - a) * (node - c))


def _step_coeffs(h, deltas, q, order, variant, corrector, simplified_rho=True):
    r"""Scalar coefficients of the UniP step of order ``q`` and of the UniC step that corrects it.

    Predictor and corrector share the base point, the step ``h``, the history nodes and the order
    (the corrector of the next grid point adds the node :math:`r = 1`, i.e.
    :math:`\delta = h`), so they share all the scalar work. Everything is in
    :math:`\delta_k = r_k h`: the systems :math:`\sum_k \rho_k r_k^{i-1} = b_i` become
    :math:`\sum_k \rho_k \delta_k^{i-1} = h^{i-1} b_i`, and no coefficient divides by ``h``.

    Args:
        h: the step :math:`h > 0` (``0`` for a final stand-in step).
        deltas: ``order - 1`` scalars :math:`\delta_k = \lambda_k - \lambda_{s_0} < 0`.
        q: traced order in ``1..order``.
        corrector: also return the corrector's coefficients (else ``None``).

    Returns:
        ``(h_phi_1, B, w_p, w_c, rho_t)``. The predictor is
        :math:`x^p = \frac{\sigma_t}{\sigma_{s_0}}x - \alpha_t h\varphi_1 m_0
        - \alpha_t B(h)\sum_k w^p_k (m_k - m_0)` and the corrector adds
        :math:`\rho_t (m_t - m_0)` to the sum with :math:`w^c` in place of :math:`w^p`
        (:math:`w_k = \rho_k h/\delta_k = \rho_k/r_k`; ``w`` of shape ``(order - 1,)``).
    """
    kmax = order + 1 if corrector else order
    phis = _phis(-h, kmax)
    hphi1 = jnp.expm1(-h)
    if variant == "bh1":
        big_b, scale = -h, 1.0
    else:
        big_b, scale = hphi1, phis[0]  # B(h)/(-h) = phi_1(-h)
    # b_i = i! h phi_{i+1} / B(h) (i = 1..kmax-1); delta-scaled right-hand side h^(i-1) b_i.
    betas = [math.factorial(i) * phis[i] / scale for i in range(1, kmax)]
    betas = [b * h**i if i else b for i, b in enumerate(betas)]
    inv_r = [h / d for d in deltas]  # 1 / r_k
    zero = jnp.zeros((), h.dtype)

    def select(cands):  # cands[qq - 1] for the traced order q
        out = cands[0]
        for qq in range(2, len(cands) + 1):
            out = jnp.where(q == qq, cands[qq - 1], out)
        return out

    # Predictor: q = 2 uses the reference's simplified rho = [1/2] (= DPM-Solver++ 2M) unless
    # simplified_rho is off, then the 1x1 system rho = b_1 (exact for linear x0(lambda)).
    rho_2 = 0.5 if simplified_rho or not betas else betas[0]
    w_p = []
    for k in range(order - 1):
        cands = [zero, rho_2 * inv_r[0] if k == 0 else zero]
        if order == 3:
            d = deltas[:2]
            cands.append(_rho(d[k], [d[1 - k]], betas) * inv_r[k])
        w_p.append(select(cands[:order]))
    w_p = jnp.stack(w_p) if w_p else jnp.zeros((0,), h.dtype)
    if not corrector:
        return hphi1, big_b, w_p, None, None

    # Corrector: nodes delta_1..delta_{q-1} and h; q = 1 uses the reference's rho_c = [1/2].
    w_c, rho_t = [], [(0.5 if simplified_rho else betas[0]) + zero]
    for qq in range(2, order + 1):
        nodes = list(deltas[: qq - 1]) + [h]
        rho_t.append(_rho(h, nodes[:-1], betas))
    for k in range(order - 1):
        cands = [zero] * (k + 1)
        for qq in range(k + 2, order + 1):
            nodes = list(deltas[: qq - 1]) + [h]
            others = nodes[:k] + nodes[k + 1:]
            cands.append(_rho(nodes[k], others, betas) * inv_r[k])
        w_c.append(select(cands))
    w_c = jnp.stack(w_c) if w_c else jnp.zeros((0,), h.dtype)
    return hphi1, big_b, w_p, w_c, select(rho_t)


def _mix(c, diffs):
    """``sum_k c[k] diffs[k]`` over the leading (history) axis; 0 when it is empty."""
    return sum((c[k] * diffs[k] for k in range(diffs.shape[0])), 0.0)


def _check_history(history, process, x_init, ts):
    if not (isinstance(history, (tuple, list)) and len(history) == 2):
        raise ValueError("history must be a pair (m_hist, t_hist) of denoiser outputs and times.")
    m_hist, t_hist = jnp.asarray(history[0]), jnp.asarray(history[1])
    shape = tuple(np.shape(x_init))
    if m_hist.ndim != len(shape) + 1 or tuple(m_hist.shape[1:]) != shape:
        raise ValueError(
            f"history[0] (m_hist) must have shape (k, *x_init.shape) = "
            f"(k, {', '.join(map(str, shape))}); got {tuple(m_hist.shape)}."
        )
    k = m_hist.shape[0]
    if tuple(t_hist.shape) != (k,):
        raise ValueError(
            f"history[1] (t_hist) must have shape (k,) = ({k},) to match m_hist; "
            f"got {tuple(t_hist.shape)}."
        )
    if not all(jnp.issubdtype(a.dtype, jnp.floating) for a in (m_hist, t_hist)):
        raise ValueError("history arrays (m_hist, t_hist) must be floating.")
    if k and is_concrete(t_hist, ts):
        check_times(process, t_hist, "history times t_hist")
        th = np.asarray(t_hist, dtype=np.float64)
        t0 = float(np.asarray(ts[0], dtype=np.float64))
        if not (th[0] > t0 and np.all(np.diff(th) > 0)):
            raise ValueError(
                "history times t_hist must precede ts[0], most recent first: "
                f"ts[0] < t_hist[0] < t_hist[1] < ...; got t_hist = {th}, ts[0] = {t0}."
            )
    return m_hist, t_hist


def unipc(
    key,
    denoiser,
    process,
    x_init,
    ts,
    *,
    cond=None,
    order=2,
    variant="bh2",
    corrector=True,
    lower_order_final=True,
    history=None,
    simplified_rho=True,
    remat=None,
):
    r"""UniPC (Zhao et al. 2023): multistep predictor UniP-p with corrector UniC-p, 1 call/step.

    Data-prediction form, for a step from :math:`s_0` (current grid time, state :math:`x`) to
    the next grid time :math:`t`, with :math:`h = \lambda_t - \lambda_{s_0}`,
    :math:`\lambda = \log(\alpha/\sigma)`, :math:`h\varphi_1 = e^{-h} - 1`, data predictions
    :math:`m_0` (at :math:`s_0`) and :math:`m_k` at earlier grid times :math:`s_k`,
    :math:`r_k = (\lambda_{s_k} - \lambda_{s_0})/h` and :math:`D_k = (m_k - m_0)/r_k`:

    * **Predictor UniP-q**

      .. math:: x_t^{p} = \frac{\sigma_t}{\sigma_{s_0}} x - \alpha_t h\varphi_1 m_0
          - \alpha_t B(h) \sum_{k=1}^{q-1} \rho^p_k D_k,

      :math:`\rho^p` solving :math:`\sum_k \rho_k r_k^{i-1} = b_i`, :math:`i = 1..q-1`, except
      :math:`\rho^p = [\tfrac12]` for :math:`q = 2` (the reference's choice; with ``bh2`` it is
      DPM-Solver++(2M) midpoint).
    * **Corrector UniC-q** (at the next step, with :math:`m_t = D(x_t^p, t)`, the evaluation the
      next predictor needs anyway, so no extra call)

      .. math:: x_t^{c} = \frac{\sigma_t}{\sigma_{s_0}} x - \alpha_t h\varphi_1 m_0
          - \alpha_t B(h) \Big(\sum_{k=1}^{q-1} \rho^c_k D_k + \rho^c_q (m_t - m_0)\Big),

      :math:`\rho^c` solving the same system with the extra node :math:`r_q = 1`, :math:`i = 1..q`
      (:math:`\rho^c = [\tfrac12]` for :math:`q = 1`). The history keeps :math:`m_t` evaluated at
      :math:`x^p_t`; the final state is not corrected (no further evaluation).

    Here :math:`b_i = i!\,h\varphi_{i+1}/B(h)` with :math:`h\varphi_{k+1} = h\varphi_k/(-h)
    - 1/k!` (i.e. :math:`h\varphi_k = -h\,\varphi_k(-h)`, evaluated by series for small
    ``h``), and :math:`B(h) = -h` (``"bh1"``) or :math:`e^{-h} - 1` (``"bh2"``). The systems
    (size <= 3) are solved in closed form (Lagrange), in :math:`\delta_k = r_k h`, so no
    coefficient divides by ``h``. Where a system is solved, :math:`B(h)` cancels in
    :math:`B(h)\rho`: ``bh1`` and ``bh2`` differ only through the :math:`\rho = 1/2` shortcuts
    (UniP-2, UniC-1) -- e.g. order 3 with a full warm start gives identical results.

    Order used at step ``n`` (0-based), with ``k`` warm-start entries and ``N = len(ts) - 1``:
    :math:`q_n = \min(\text{order}, n + 1 + k)`, and :math:`q_n \le N - n` with
    ``lower_order_final``; the corrector at step ``n`` uses :math:`q_{n-1}`.

    Accuracy (checked by the tests, float64): UniP-q integrates :math:`\hat x_0(\lambda)`
    polynomial of degree ``< q`` exactly for ``q = 1, 3`` (``q = 2``: only constants, because of
    :math:`\rho = 1/2`; still second order); corrected states are exact for degree ``< q + 1``
    when ``q >= 2`` (``q = 1``: constants). With ``simplified_rho=False`` the two shortcuts are
    replaced by the solved systems (:math:`\rho = b_1`), and every order is exact for degree
    ``< q`` (predictor) and ``< q + 1`` (corrector). Global order ``p`` without the corrector,
    ``p + 1`` with it (both variants), given an exact warm start and
    ``lower_order_final=False`` (a first-order warm-up or final step caps the observed order).

    A final exact 0 in ``ts`` returns that step's denoiser output :math:`m_0` (the update is
    evaluated at a zero-length stand-in step so values and gradients stay finite).

    Args:
        key: unused (deterministic); kept for the common sampler signature.
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` with ``t`` of shape ``(B,)``.
        process: the forward process.
        x_init: state at ``ts[0]``, shape ``(B, ...)`` (any float dtype; bfloat16 is fine).
        ts: strictly decreasing grid ``(N + 1,)`` (optionally ending in an exact 0).
        cond: conditioning passed to the denoiser.
        order: ``p`` in ``{1, 2, 3}`` (static).
        variant: ``"bh1"`` or ``"bh2"``.
        corrector: apply UniC (static bool).
        lower_order_final: cap the order at the number of remaining steps.
        history: optional warm start ``(m_hist, t_hist)``: denoiser outputs ``(k, B, ...)`` at
            the ``k`` grid times ``(k,)`` preceding ``ts[0]``, most recent first
            (``ts[0] < t_hist[0] < t_hist[1] < ...``). Entries beyond ``order - 1`` are unused.
        simplified_rho: use the reference's :math:`\rho = 1/2` for UniP-2 and UniC-1 (default,
            reference-compatible); ``False`` solves those systems too (polynomial-exact).
        remat: rematerialisation of the scan for gradients (None, ``"full"``, ``"nested"`` or a
            segment length; values are identical), as in :func:`jaxdiff.samplers.dpm_solver_pp`.

    Returns:
        The state at ``ts[-1]``, shape and dtype of ``x_init``.

    Raises:
        ValueError: unknown ``order`` or ``variant``, a malformed ``history``, a bad grid.
        TypeError: a non-floating ``x_init``.

    Examples:
        >>> ts = jaxdiff.timesteps.karras(process, 10, final_zero=True)
        >>> x = unipc(key, denoiser, process, process.sample_prior(key, (16, 2)), ts,
        ...           order=3, variant="bh1")
    """
    del key
    valid_order = isinstance(order, (int, np.integer)) and not isinstance(order, bool)
    if not valid_order or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order!r}.")
    if not isinstance(variant, str) or variant not in _VARIANTS:
        raise ValueError(f"variant must be 'bh1' or 'bh2'; got {variant!r}.")
    for name, flag in (("corrector", corrector), ("lower_order_final", lower_order_final)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"{name} must be a bool; got {flag!r}.")
    corrector, lower_order_final = bool(corrector), bool(lower_order_final)
    ts = jnp.asarray(ts)
    check_inputs(process, x_init, ts)
    x_init = jnp.asarray(x_init)
    dtype = coeff_dtype(x_init, ts)
    p = order
    num_steps = ts.shape[0] - 1

    # -- the ring buffers (most recent first) and their padding ------------------------------
    lam0 = half_log_snr(process, ts[0].astype(dtype))
    if history is not None:
        m_hist, t_hist = _check_history(history, process, x_init, ts)
        k = m_hist.shape[0]
    else:
        k = 0
    used = min(k, p)
    m_buf = jnp.zeros((p, *x_init.shape), dtype)
    lam_buf = []
    last = lam0
    if used:
        m_buf = m_buf.at[:used].set(m_hist[:used].astype(dtype))
        lam_h = half_log_snr(process, t_hist[:used].astype(dtype))
        lam_buf = [lam_h[j] for j in range(used)]
        last = lam_buf[-1]
    # Padding slots: distinct, older fake lambdas, so that unused nodes never coincide.
    lam_buf += [last - (j + 1.0) for j in range(p - used)]
    lam_buf = jnp.stack(lam_buf).astype(dtype)

    def order_at(n):
        q = jnp.minimum(p, n + 1 + k)
        if lower_order_final:
            q = jnp.minimum(q, num_steps - n)
        return jnp.clip(q, 1, p)

    # After step n's push the buffer holds the lambdas lam_ext[p + n - j], j = 0..p-1: the
    # initial buffer (oldest first), then every grid time (barrier: see integrate).
    lam_grid = half_log_snr(process, jax.lax.optimization_barrier(ts[:-1]).astype(dtype))
    lam_ext = jnp.concatenate([lam_buf[::-1], lam_grid])

    def coeffs(n, t, s):
        t, s = t.astype(dtype), s.astype(dtype)
        s_ = safe_next_time(t, s)
        alpha_s, sigma_s = process.alpha(s_), process.sigma(s_)
        lam_t = half_log_snr(process, t)
        h = half_log_snr(process, s_) - lam_t
        deltas = [lam_ext[p + n - j] - lam_t for j in range(1, p)]
        hphi1, big_b, w_p, w_c, rho_t = _step_coeffs(
            h, deltas, order_at(n), p, variant, corrector, simplified_rho)
        c_b = -alpha_s * big_b
        return dict(c_x=sigma_s / process.sigma(t), c_m=-alpha_s * hphi1, w_p=c_b * w_p,
                    w_c=None if w_c is None else c_b * w_c,
                    c_t=None if rho_t is None else c_b * rho_t)

    def step(carry, inp):
        # x: predicted state at t; y, c_t: the corrector of x, pending the evaluation at x.
        x, y, c_t, m_buf = carry
        c = inp.coeffs
        m_t = call_denoiser(denoiser, x, inp.t, cond).astype(dtype)
        if corrector:  # UniC: complete the pending corrector with the new evaluation m_t
            x_c = y + c_t * (m_t - m_buf[0])
            x = jnp.where(inp.index > 0, x_c.astype(x.dtype), x)
        m_buf = jnp.concatenate([m_t[None], m_buf[:-1]])

        # UniP from t to s (a final exact 0: zero-length stand-in step, output m_t), and the
        # t-independent part of the corrector of its result.
        base = c["c_x"] * x + c["c_m"] * m_t
        diffs = m_buf[1:] - m_t[None]
        x_next = base + _mix(c["w_p"], diffs)
        x_next = jnp.where(inp.s > 0, x_next, m_t).astype(x.dtype)
        if corrector:
            y, c_t = base + _mix(c["w_c"], diffs), c["c_t"]
        return (x_next, y, c_t, m_buf)

    carry = (x_init, jnp.zeros(x_init.shape, dtype), jnp.zeros((), dtype), m_buf)
    (x, *_), _ = integrate(step, carry, ts, remat=remat, coeffs=coeffs)
    return x
