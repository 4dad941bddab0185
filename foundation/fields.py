"""One rule for a setting's type and value, wherever it comes from.

A settings dataclass calls `check_fields(self)` and the value checks below in its
`__post_init__`, so a value given in code is refused when it is given, with the same words as
the same value read from YAML (the config loader builds the same dataclasses and adds the file
and the section to the key). Every refusal is a `FieldError` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin


class FieldError(ValueError):
    """A setting's value that cannot be used: `key` (a field name, or a dotted path once a
    caller adds its section) and `reason`."""

    def __init__(self, key: str, reason: str) -> None:
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}" if key else reason)


def describe(tp: Any) -> str:
    """What a value of type `tp` looks like (in YAML words), for error messages."""
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
        tp, str(tp))


def coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` checked against type `tp`: a list becomes a tuple, an integer a float where a
    float is wanted; anything else wrong raises FieldError naming `key`. A dataclass field
    takes an instance of its class (the config loader builds one from a mapping first)."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):  # `T | None`: null, or a T
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(get_args(tp)):
            return None
        if len(options) == 1:
            return coerce(options[0], value, key)
        raise FieldError(key, f"unsupported field type {tp}")
    bad = FieldError(key, f"expected {describe(tp)}, got {value!r:.80}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise bad
        return value
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in get_args(tp)):
            raise bad
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise bad
        item = get_args(tp)[0]
        return tuple(coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
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
    raise FieldError(key, f"unsupported field type {tp}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of `cls`'s init fields (resolved once per class)."""
    hints = _HINTS.get(cls)
    if hints is None:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        hints = {n: tp for n, tp in typing.get_type_hints(cls).items() if n in names}
        _HINTS[cls] = hints
    return hints


def check_fields(obj: Any) -> None:
    """Check every field of dataclass instance `obj` against its annotation (`coerce`),
    normalizing in place (lists to tuples, integers to floats); FieldError names the field."""
    for name, tp in _hints(type(obj)).items():
        value = getattr(obj, name)
        checked = coerce(tp, value, name)
        if checked is not value:
            object.__setattr__(obj, name, checked)  # frozen dataclasses too


def positive(key: str, value: float) -> None:
    """FieldError unless `value` > 0."""
    if not value > 0:
        raise FieldError(key, f"must be positive, got {value!r}")


def at_least(key: str, value: float, low: float, why: str = "") -> None:
    """FieldError unless `value` >= `low` (`why` says what `low` is)."""
    if not value >= low:
        raise FieldError(key, f"must be at least {low}{f' ({why})' if why else ''}, got {value!r}")


def in_range(key: str, value: float, low: float, high: float, why: str = "") -> None:
    """FieldError unless `low` <= `value` <= `high` (`why` says what the ends mean)."""
    if not low <= value <= high:
        raise FieldError(key, f"must be in [{low}, {high}]{f' ({why})' if why else ''}, "
                              f"got {value!r}")


def one_of(key: str, value: object, choices: tuple[object, ...]) -> None:
    """FieldError unless `value` is one of `choices`."""
    if value not in choices:
        raise FieldError(key, f"must be one of {', '.join(repr(c) for c in choices)}, "
                              f"got {value!r}")
