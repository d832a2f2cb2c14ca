r"""Typed experiment configs: frozen dataclasses overridden from ``key=value`` strings.

Experiments define their config as (nested) frozen dataclasses with annotated fields; the command
line overrides fields with dotted keys, values parsed by the field's type::

    python experiments/toy2d/main.py --config smoke train.steps=500 net.hidden=128 data.name=moons

Unknown keys and unparsable values raise ``ValueError`` naming the key and listing the valid
ones, so a typo never silently trains the default.
"""

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

__all__ = ["override", "to_dict", "from_dict", "flat_keys"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def flat_keys(config) -> list[str]:
    """All dotted field names of a (nested) dataclass config."""
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{k}" for k in flat_keys(value)]
        else:
            keys.append(f.name)
    return keys


def _parse(text: str, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(text, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(f"config key {key!r}: cannot parse {text!r} as {tp}.")
    if tp is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"config key {key!r}: expected a boolean, got {text!r}.")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"config key {key!r}: expected an integer, got {text!r}.") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"config key {key!r}: expected a number, got {text!r}.") from None
    if tp is str:
        return text
    if origin is tuple:
        items = [s for s in text.strip("()[] ").split(",") if s.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(s.strip(), args[0], key) for s in items)
        if len(items) != len(args):
            raise ValueError(f"config key {key!r}: expected {len(args)} comma-separated values, "
                             f"got {text!r}.")
        return tuple(_parse(s.strip(), a, key) for s, a in zip(items, args))
    if typing.get_origin(tp) is typing.Literal:
        for option in args:
            if str(option) == text:
                return option
        raise ValueError(f"config key {key!r}: expected one of {list(args)}, got {text!r}.")
    raise ValueError(f"config key {key!r}: unsupported field type {tp}.")


def _set(config, path: list[str], text: str, full_key: str):
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    head = path[0]
    if head not in names:
        raise KeyError(head)
    value = getattr(config, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(value):
            raise KeyError(head)
        return dataclasses.replace(config, **{head: _set(value, path[1:], text, full_key)})
    if dataclasses.is_dataclass(value):
        raise ValueError(f"config key {full_key!r} is a group; set one of its fields "
                         f"({', '.join(full_key + '.' + k for k in flat_keys(value))}).")
    return dataclasses.replace(config, **{head: _parse(text, hints[head], full_key)})


def override(config, overrides: Sequence[str]):
    """Apply ``key=value`` overrides (dotted keys for nested groups) to a dataclass config.

    Args:
        config: a frozen dataclass instance (fields may be nested dataclasses).
        overrides: strings ``"a.b=value"``.

    Returns:
        A new config.

    Raises:
        ValueError: malformed override, unknown key (with suggestions), or a value that does not
            parse as the field's type.

    Examples:
        >>> cfg = override(Config(), ["train.steps=100", "net.hidden=64"])
    """
    valid = flat_keys(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} must look like key=value.")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            config = _set(config, key.split("."), text.strip(), key)
        except KeyError:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown config key {key!r}.{hint} Valid keys: {', '.join(valid)}."
            ) from None
    return config


def to_dict(config) -> dict[str, Any]:
    """Nested plain-dict (JSON-serialisable) form of a dataclass config."""
    out = dataclasses.asdict(config)
    json.dumps(out)
    return out


def from_dict(cls, data: dict):
    """Rebuild a dataclass config of type ``cls`` from :func:`to_dict`'s output (strict keys)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}; valid: "
                         f"{sorted(names)}.")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value)
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
