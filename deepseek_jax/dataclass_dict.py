"""Plain mappings (ConfigDicts, JSON) <-> frozen dataclasses, with errors that name the field.

Handles enums (by value, case-insensitive), nested dataclasses, Optional[...] and tuples. Unknown
keys are errors: a misspelt override must not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from deepseek_jax import errors

T = TypeVar("T")


def unknown_field(prefix: str, key: str, names: set[str] | list[str]) -> str:
    """The message for a key `prefix` does not have: the section, the closest name, all names."""
    return (
        f"{prefix}.{key}: unknown field: section {prefix} has no field {key!r}"
        f"{errors.did_you_mean(key, names)}; its fields: {', '.join(sorted(names))}"
    )


def _convert(tp: Any, value: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, field) if len(args) == 1 else value
    if origin is tuple:
        args = typing.get_args(tp)
        if value is None:
            raise ValueError(f"{field}: expected a sequence, got None")
        elem = args[0] if args else Any
        return tuple(_convert(elem, v, f"{field}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(str(value).lower())
        except ValueError:
            allowed = [e.value for e in tp]
            raise ValueError(f"{field}: unknown value {value!r} (allowed: {allowed})") from None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, field)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{field}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], d: Mapping[str, Any], prefix: str) -> T:
    """cls(**d) with values converted to the annotated types; `prefix` names the section."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{prefix}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise ValueError(unknown_field(prefix, key, names))
        kwargs[key] = _convert(hints[key], value, f"{prefix}.{key}")
    return cls(**kwargs)


def field_types(cls: type) -> dict[str, Any]:
    """{field name: annotated type} of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def optional_of(tp: Any) -> Any | None:
    """X for `X | None` (one X only), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def to_dict(obj: Any) -> Any:
    """JSON-friendly nested dict of a dataclass (enums by value, tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
