"""Private plumbing shared by the networks: configs, dtypes and argument checks.

A network stores its constructor arguments as one static, hashable attribute (a tuple of
``(name, value)`` pairs with sequences frozen to tuples and dtypes written as names), so
``nnx.split`` puts it in the graphdef and the state holds nothing but ``nnx.Param`` leaves.
"""

import inspect
import json
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

CONFIG_ATTR = "_jaxdiff_config"


# --------------------------------------------------------------------------------- configs


def _freeze(value):
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def config_keys(cls) -> tuple[str, ...]:
    """The keyword-only constructor arguments of a network class (``rngs`` excluded)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(
        p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "rngs"
    )


def required_keys(cls) -> tuple[str, ...]:
    """The constructor arguments without a default."""
    params = inspect.signature(cls.__init__).parameters
    return tuple(k for k in config_keys(cls) if params[k].default is inspect.Parameter.empty)


def store_config(module, arguments: dict) -> None:
    """Record the constructor arguments of ``module`` as a static, JSON-describable attribute."""
    items = []
    for key in config_keys(type(module)):
        value = arguments[key]
        if key in ("dtype", "param_dtype"):
            value = dtype_name(value, key)
        value = _freeze(value)
        try:
            json.dumps(_thaw(value))
        except TypeError as err:
            raise TypeError(
                f"{type(module).__name__}: config argument {key}={value!r} is not "
                "JSON-serialisable (use Python ints, floats, strings, bools, lists)."
            ) from err
        items.append((key, value))
    setattr(module, CONFIG_ATTR, tuple(items))


def thaw_config(frozen) -> dict:
    """The stored config as a plain dict (tuples back to lists, as JSON would give them)."""
    return {key: _thaw(value) for key, value in frozen}


# ---------------------------------------------------------------------------------- dtypes


def dtype_name(value, name: str) -> str | None:
    """Normalise a dtype argument (``None``, a string or a dtype-like) to its name."""
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise TypeError(f"{name} must be None or a floating dtype; got {value!r}.") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype; got {dtype}.")
    return dtype.name


def resolve_dtypes(dtype, param_dtype):
    """``(dtype or None, param_dtype)`` as numpy dtypes, validated."""
    if param_dtype is None:
        raise TypeError("param_dtype must be a floating dtype, not None.")
    name = dtype_name(dtype, "dtype")
    return (None if name is None else jnp.dtype(name)), jnp.dtype(
        dtype_name(param_dtype, "param_dtype")
    )


def compute_dtype(dtype, x):
    """The dtype a network computes in: its ``dtype`` if set, else the input's."""
    return jnp.dtype(dtype) if dtype is not None else x.dtype


def wide_dtype(dtype):
    """At least float32: the dtype of norms, softmaxes, embeddings' arguments and outputs."""
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------------- checks


def check_int(value, name: str, *, minimum: int = 0) -> int:
    """A Python int ``>= minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    return int(value)


def check_float(value, name: str, *, positive: bool = True) -> float:
    """A finite Python float (``> 0`` unless ``positive=False``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {value!r}.")
    value = float(value)
    if not (abs(value) < float("inf")) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}; got {value}.")
    return value


def check_int_tuple(value, name: str, *, minimum: int = 0, allow_empty: bool = True):
    """A sequence of ints ``>= minimum``, returned as a tuple."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of ints; got {value!r}.")
    out = tuple(check_int(v, f"{name}[{i}]", minimum=minimum) for i, v in enumerate(value))
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty.")
    return out


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}.")
    return value


def check_input(x, name: str, expected: str, ndim: int) -> None:
    """A floating array of rank ``ndim``; ``expected`` describes the shape for the message."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: x must be an array of shape {expected}; got {type(x).__name__}.")
    if x.ndim != ndim:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}; expected {expected}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: x must be floating; got dtype {x.dtype}.")


def check_c_noise(c_noise, batch: int, name: str) -> jax.Array:
    """``c_noise`` of shape ``(B,)`` (a scalar is broadcast), as a floating array."""
    c = jnp.asarray(c_noise)
    if not jnp.issubdtype(c.dtype, jnp.floating):
        c = c.astype(jnp.float32)
    if c.ndim == 0:
        return jnp.broadcast_to(c, (batch,))
    if c.shape != (batch,):
        raise ValueError(
            f"{name}: c_noise must have shape () or (B,) = ({batch},); got {tuple(c.shape)}."
        )
    return c


def group_count(channels: int, max_groups: int) -> int:
    """The largest group count ``<= max_groups`` that divides ``channels``."""
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return groups
