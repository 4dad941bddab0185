"""Typed building: a parsed YAML mapping checked against a frozen dataclass, field by field,
with one `ConfigError` naming the key and what was expected."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

from persia_inc.config.errors import ConfigError


def describe(tp: Any) -> str:
    """What a value of type `tp` looks like in YAML, for error messages."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else describe(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {describe(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against type `tp`, converting lists to tuples; raise ConfigError."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):  # `T | None`: null, or a T
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(get_args(tp)):
            return None
        if len(options) == 1:
            return convert(options[0], value, key, source)
    bad = ConfigError(source, key, f"expected {describe(tp)}, got {value!r:.80}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build_dataclass(tp, value, key, source)
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise bad
        return tuple(convert(get_args(tp)[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(source, key, f"unsupported field type {tp}")


DISPLAY_NAMES = {"infer": "PersiaInferConfig"}  # field name -> the key users write


def build_dataclass(cls: type, mapping: dict, prefix: str, source: str) -> Any:
    """An instance of dataclass `cls` from `mapping` (keys under `prefix` in `source`);
    unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(source, where, f"unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in mapping.items():
        key = f"{prefix}.{name}" if prefix else DISPLAY_NAMES.get(name, name)
        values[name] = convert(hints[name], value, key, source)
    try:
        return cls(**values)
    except ValueError as exc:  # the dataclass's own cross-field checks
        raise ConfigError(source, prefix, str(exc)) from exc
