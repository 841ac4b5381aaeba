"""Typed configs from YAML: nested dataclasses built from dicts, `key=value` overrides, errors naming the field."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from grounded_llava.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message names the field (dotted path) and the source."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, field_path: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, field_path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{field_path}: {value!r} matches none of {tp}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field_path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, _prefix=field_path + ".")
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{field_path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{field_path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{field_path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field_path}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, field_path): _coerce(v, value_tp, f"{field_path}.{k}")
            for k, v in value.items()
        }
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{field_path}: expected a path, got {value!r}")
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{field_path}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, _prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrongly typed values raise `ConfigError`."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key {_prefix}{unknown[0]!s} (valid keys: {', '.join(sorted(known))})"
        )
    kwargs = {name: _coerce(value, hints[name], _prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(
            f"{_prefix}{err}" if _prefix and not str(err).startswith(_prefix) else str(err)
        ) from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON-serialisable dicts and lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], *, text_keys: Collection[str] = ()
) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict; returns a new dict. Values are parsed as YAML, except
    for the dotted keys in `text_keys` (free text such as a prompt or a glob: kept as written)."""
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = raw if key.strip() in text_keys else yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            reason = str(err).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({reason})") from None
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data
