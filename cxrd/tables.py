"""TOML tables to frozen dataclasses and back, by the dataclasses' own type hints. Pure.

The config schema is a tree of dataclasses (``cxrd.config``); this reads a
table into one, naming the dotted key of any unknown key or wrong type, and
turns one back into plain tables so command-line overrides can be merged in.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from cxrd.errors import InvalidConfig

_T = typing.TypeVar("_T")

# Not settings: where the config came from and which instance it is for.
PROVENANCE = ("source", "instance")


def as_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: as_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.name not in PROVENANCE
        }
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "env":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cls: type[_T], data: Mapping[str, Any], source: str, where: str) -> _T:
    if not isinstance(data, Mapping):
        raise InvalidConfig(f"{source}: [{where}]: expected a table")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in PROVENANCE}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in known:
            choices = ", ".join(sorted(known))
            raise InvalidConfig(f"{source}: {dotted}: unknown key (known here: {choices})")
        kwargs[key] = _convert(hints[key], value, source, dotted)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, source, key)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, key)  # type: ignore[arg-type]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(source, key, "true or false", value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(source, key, "an integer", value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _type_error(source, key, "a number", value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(source, key, "a string", value)
    if origin is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise _type_error(source, key, "a list of strings", value)
    if origin is Mapping:
        if isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value)
        raise _type_error(source, key, "a table of strings", value)
    raise TypeError(f"config schema has an unsupported type for {key}: {hint!r}")


def _type_error(source: str, key: str, expected: str, value: Any) -> InvalidConfig:
    return InvalidConfig(f"{source}: {key}: expected {expected}, got {value!r}")
