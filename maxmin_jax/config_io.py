"""YAML <-> frozen config dataclasses, strictly: an unknown key or a wrong type names its full path."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigFileError(ValueError):
    """A config file has a key or value that the config dataclasses do not accept."""


def from_dict(cls: type, data: dict[str, Any] | None, *, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields; defaults fill the rest."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigFileError(f"{where}: unknown keys {unknown} for {cls.__name__}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigFileError(f"{where}: {e}") from e


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, where)
        return tuple(value) if isinstance(value, list) else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigFileError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigFileError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def load_yaml(cls: type, path: str | Path, *, section: str | None = None) -> Any:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path}: not valid YAML: {e}") from e
    if section is not None:
        data = data.get(section, {})
    return from_dict(cls, data, where=str(path) + (f":{section}" if section else ""))


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (tuples as lists) for YAML/JSON."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(dataclasses.asdict(config))
