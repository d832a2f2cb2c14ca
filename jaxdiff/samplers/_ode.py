r"""Fixed-grid integration of a generic vector field on a pytree state, on the sampler scan.

Used for augmented states such as :math:`(x, \Delta\log p)` in likelihood computations, and for
any ODE a user wants integrated on the same grids as the samplers.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ._core import integrate

__all__ = ["odeint"]

_METHODS = ("euler", "heun", "midpoint", "rk4")


def _axpy(a, x, y):
    """y + a * x over matching pytrees (a is a scalar)."""
    return jax.tree.map(lambda xi, yi: yi + (a * xi).astype(yi.dtype), x, y)


def odeint(vector_field, y0, ts, *, args=None, method="heun", remat=None):
    r"""Integrate :math:`dy/dt = F(t, y, \text{args})` over ``ts`` with a fixed-step method.

    .. math::
        \text{heun: } k_1 = F(t_i, y_i),\ k_2 = F(t_{i+1}, y_i + \Delta k_1),\
        y_{i+1} = y_i + \tfrac{\Delta}{2}(k_1 + k_2), \qquad \Delta = t_{i+1} - t_i,

    and likewise ``"euler"`` (order 1), ``"midpoint"`` (2) and ``"rk4"`` (4). ``ts`` may be
    increasing or decreasing; one ``lax.scan``, so compile time does not grow with its length.

    Args:
        vector_field: ``F(t, y, args) -> dy/dt`` with ``t`` a scalar and ``y`` a pytree.
        y0: initial state (pytree of arrays) at ``ts[0]``.
        ts: strictly monotone grid, shape ``(N + 1,)``.
        args: passed to ``vector_field`` unchanged.
        method: ``"euler"``, ``"heun"``, ``"midpoint"`` or ``"rk4"``.
        remat: rematerialisation for gradients: None, ``"full"``, ``"nested"`` or a segment
            length (as the samplers; values are identical).

    Returns:
        The state at ``ts[-1]`` (same structure as ``y0``).

    Examples:
        >>> y = odeint(lambda t, y, a: -y, jnp.ones(3), jnp.linspace(0.0, 1.0, 101))
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}.")
    if np.ndim(ts) != 1 or np.shape(ts)[0] < 2:
        raise ValueError(f"ts must be 1-D with at least 2 points; got shape {np.shape(ts)}.")
    ts = jnp.asarray(ts)

    def step(y, inp):
        t, s = inp.t, inp.s
        dt = s - t
        k1 = vector_field(t, y, args)
        if method == "euler":
            return _axpy(dt, k1, y)
        if method == "midpoint":
            k2 = vector_field(t + 0.5 * dt, _axpy(0.5 * dt, k1, y), args)
            return _axpy(dt, k2, y)
        if method == "heun":
            k2 = vector_field(s, _axpy(dt, k1, y), args)
            return _axpy(0.5 * dt, jax.tree.map(jnp.add, k1, k2), y)
        k2 = vector_field(t + 0.5 * dt, _axpy(0.5 * dt, k1, y), args)
        k3 = vector_field(t + 0.5 * dt, _axpy(0.5 * dt, k2, y), args)
        k4 = vector_field(s, _axpy(dt, k3, y), args)
        total = jax.tree.map(lambda a, b, c, d: a + 2.0 * b + 2.0 * c + d, k1, k2, k3, k4)
        return _axpy(dt / 6.0, total, y)

    y, _ = integrate(step, y0, ts, remat=remat)
    return y
