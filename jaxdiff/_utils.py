"""Small private helpers shared by the core modules (broadcasting, concreteness, validation)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(*values) -> bool:
    """True when no value is a tracer or a placeholder (so it can be inspected on the host)."""
    for v in values:
        if isinstance(v, jax.core.Tracer):
            return False
        if not isinstance(v, (int, float, np.ndarray, np.generic, jax.Array)):
            return False
    return True


def as_float_array(t) -> jax.Array:
    """`jnp.asarray(t)` promoted to a floating dtype (integers become the default float)."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    return t


def broadcast_to_batch(c: jax.Array, x: jax.Array, name: str = "t") -> jax.Array:
    """Reshape a per-example coefficient of shape () or (B,) so it broadcasts against x (B, ...)."""
    c = jnp.asarray(c)
    if c.ndim == 0:
        return c
    if c.ndim == 1 and x.ndim >= 1 and c.shape[0] == x.shape[0]:
        return c.reshape(c.shape + (1,) * (x.ndim - 1))
    raise ValueError(
        f"{name} must have shape () or (B,) with B = x.shape[0]; got {name}.shape = {c.shape} "
        f"for x.shape = {x.shape}."
    )


def check_times(process, t, name: str = "t", *, lower=None, upper=None) -> None:
    """Raise ValueError if a concrete `t` lies outside [lower, upper] (default the process range).

    Does nothing for traced values: range errors inside `jit` are the caller's responsibility.
    """
    lo = process.t_min if lower is None else lower
    hi = process.t_max if upper is None else upper
    if not is_concrete(t, lo, hi):
        return
    t_np = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(t_np)):
        raise ValueError(f"{name} must be finite; got {t_np}.")
    lo, hi = float(np.asarray(lo)), float(np.asarray(hi))
    # A relative slack of a few float32 ulps lets grids built in float32 hit the end points.
    slack = 4 * float(np.finfo(np.float32).eps)
    if np.any(t_np < lo - slack * abs(lo)) or np.any(t_np > hi + slack * abs(hi)):
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}] for {type(process).__name__}; got values in "
            f"[{t_np.min()}, {t_np.max()}]."
        )


def check_positive(value, name: str, *, allow_zero: bool = False) -> None:
    """Raise ValueError unless a concrete scalar/array is (strictly) positive and finite."""
    if not is_concrete(value):
        return
    v = np.asarray(value, dtype=np.float64)
    ok = np.all(v >= 0) if allow_zero else np.all(v > 0)
    if not (ok and np.all(np.isfinite(v))):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be finite and {kind}; got {value}.")


def pytree_dataclass(cls):
    """Frozen, keyword-only, identity-compared dataclass registered as a pytree node.

    Fields with ``metadata=dict(static=True)`` are auxiliary data; all others are leaves.
    Registered with ``register_pytree_with_keys`` rather than ``register_dataclass`` so that the
    class itself is part of the tree structure (two classes with the same number of fields must
    never share a compiled function), and unflattened without calling ``__init__`` so that
    transformations may fill the leaves with tracers, zeros, batched arrays or placeholders
    without tripping the constructor's validation.
    """
    cls = dataclasses.dataclass(frozen=True, kw_only=True, eq=False)(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    data_names = tuple(f.name for f in fields if not f.metadata.get("static", False))
    meta_names = tuple(f.name for f in fields if f.metadata.get("static", False))

    def flatten_with_keys(obj):
        children = tuple((jax.tree_util.GetAttrKey(n), getattr(obj, n)) for n in data_names)
        return children, tuple(getattr(obj, n) for n in meta_names)

    def flatten(obj):
        return tuple(getattr(obj, n) for n in data_names), tuple(
            getattr(obj, n) for n in meta_names
        )

    def unflatten(meta, children):
        obj = object.__new__(cls)
        for name, value in zip(data_names, children):
            object.__setattr__(obj, name, value)
        for name, value in zip(meta_names, meta):
            object.__setattr__(obj, name, value)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
