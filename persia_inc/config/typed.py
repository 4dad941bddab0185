"""Typed building: a parsed YAML mapping checked against a frozen dataclass, field by field,
with one `ConfigError` naming the key and what was expected."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, get_args, get_origin

from persia_inc.config.errors import ConfigError
from persia_inc.foundation.fields import FieldError, coerce, describe


def convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against type `tp` (`foundation.fields.coerce`, the rule values given in
    code meet too), building nested dataclasses from mappings; raise ConfigError."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):  # `T | None`: null, or a T
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(options) < len(get_args(tp)):
            return None
        if len(options) == 1:
            return convert(options[0], value, key, source)
        # `str | tuple[str, ...]` (an address, or a list of them): chosen by the YAML shape
        for option in options:
            if (get_origin(option) is tuple) == isinstance(value, list | tuple):
                return convert(option, value, key, source)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected {describe(tp)}, got {value!r:.80}")
        return build_dataclass(tp, value, key, source)
    if origin is tuple and isinstance(value, list | tuple):  # items may be mappings
        return tuple(convert(get_args(tp)[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    try:
        return coerce(tp, value, key)
    except FieldError as exc:
        raise ConfigError(source, exc.key, exc.reason) from exc


DISPLAY_NAMES = {"infer": "PersiaInferConfig"}  # field name -> the key users write
HIDDEN_FIELDS = frozenset({"source"})  # fields a file never sets (the loader fills them in)


def unknown_key(cls: type, unknown: str, prefix: str, source: str) -> ConfigError:
    """The error for key `unknown` under `prefix` (dataclass `cls`): the keys a user may
    write there, and the nearest one."""
    names = {f.name for f in dataclasses.fields(cls) if f.init} - HIDDEN_FIELDS
    known = sorted(DISPLAY_NAMES.get(n, n) if not prefix else n for n in names)
    if not prefix and unknown in DISPLAY_NAMES:  # a field's own name, which users never write
        near = [DISPLAY_NAMES[unknown]]
    else:
        near = difflib.get_close_matches(unknown, known, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}? " if near else ""
    where = f"{prefix}.{unknown}" if prefix else unknown
    return ConfigError(source, where, f"unknown key ({hint}known: {', '.join(known)})")


def build_dataclass(cls: type, mapping: dict, prefix: str, source: str) -> Any:
    """An instance of dataclass `cls` from `mapping` (keys under `prefix` in `source`);
    unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise unknown_key(cls, unknown[0], prefix, source)
    values = {}
    for name, value in mapping.items():
        key = f"{prefix}.{name}" if prefix else DISPLAY_NAMES.get(name, name)
        values[name] = convert(hints[name], value, key, source)
    try:
        return cls(**values)
    except FieldError as exc:  # the dataclass's own checks, naming the field
        key = f"{prefix}.{exc.key}" if prefix and exc.key else prefix or exc.key
        raise ConfigError(source, DISPLAY_NAMES.get(key, key), exc.reason) from exc
    except ValueError as exc:  # checks that name no field
        raise ConfigError(source, prefix, str(exc)) from exc
