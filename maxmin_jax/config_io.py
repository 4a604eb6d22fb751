"""Frozen config dataclasses <-> YAML, strictly.

`from_dict` builds a dataclass tree from plain data (YAML loaded with `load_yaml_text`), checking every value
against the field's annotation: an unknown key, a missing required key or a wrong type raises `ConfigError` naming
the full key path (`run.yaml:policy.ppo.learning_rat: unknown key`). Booleans are never taken for numbers, an int is
accepted for a float, and a float written as `1e-5` (which YAML 1.1 reads as a string) is read as the number.

Unions of dataclasses are *tagged*: every member has a field annotated with a one-value `Literal` (its tag, e.g.
`source: Literal["world"] = "world"`), and the mapping's value of that field picks the member; a mapping without
the tag takes the kind of the field's default. A section states only what differs from its default: the other keys
keep the default's values. A class may read and write itself with the classmethod `__config_load__(data, where,
base)` and the method `__config_dump__()`.

`to_dict` is the inverse (plain data, tuples as lists); `dump_yaml` prints it; `apply_overrides` applies
`key.path=value` strings (values parsed as YAML) to plain data before it is read.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from maxmin_jax.errors import ConfigError

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _join(where: str, key: Any) -> str:
    if not where:
        return str(key)
    return f"{where}{'' if where.endswith(':') else '.'}{key}"


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (tuple, list, collections.abc.Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _key_path(where: str) -> str:
    """The key path of a `where` ("run.yaml:policy.ppo" -> "policy.ppo")."""
    return where.rpartition(":")[2]


def _error(where: str, detail: str) -> ConfigError:
    """A ConfigError at `where` (file and key path): its message, key and detail."""
    return ConfigError(f"{where}: {detail}", key=_key_path(where) or None, detail=detail)


def _within(where: str, err: ConfigError) -> ConfigError:
    """A config class's own check (keyed by its field, or a path from it) as seen from the tree at `where`."""
    if err.key is None or err.detail is None:
        return err
    return _error(_join(where, err.key), err.detail)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: Any, *, where: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested fields. Keys not given keep the value they have
    in `base` (an instance of `cls`: for a nested section, the value of the enclosing default), else the class
    default; so a YAML file states only what differs from the defaults."""
    if isinstance(data, cls):
        return data
    base = base if isinstance(base, cls) else None
    if hasattr(cls, "__config_load__"):
        return cls.__config_load__(data, where, base)
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of {cls.__name__} fields, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = [f"{_join(where, k)}: unknown key; {cls.__name__} takes {', '.join(sorted(fields))}"
                for k in data if k not in fields]
    if base is None:
        problems += [f"{_join(where, name)}: required key missing" for name, f in fields.items()
                     if name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING]
    if problems:
        raise ConfigError("\n".join(problems))
    hints = _hints(cls)
    kwargs = {name: getattr(base, name) for name in fields if name not in data} if base is not None else {}
    for name, value in data.items():
        default = getattr(base, name) if base is not None else fields[name].default
        kwargs[name] = _convert(hints[name], value, _join(where, name), default)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # the class's own validation (__post_init__), keyed by field: name the key path
        raise _within(where, e) from None
    except (TypeError, ValueError) as e:  # ... or a plain error, named by the section
        raise (_error(where, str(e)) if where else ConfigError(f"{cls.__name__}: {e}")) from e


class _Yaml12Booleans(yaml.SafeLoader):
    """YAML with 1.2's booleans: only true / false. YAML 1.1 (PyYAML's default) also reads on / off / yes / no as
    booleans, so `length_shape: off` or `--prompt-features off` arrived as False where the setting's values are the
    strings "auto", "on", "off"."""


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Booleans.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Booleans.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml_text(text: str) -> Any:
    """`yaml.safe_load` with YAML 1.2's booleans (`_Yaml12Booleans`): every config file, flag and override."""
    return yaml.load(text, Loader=_Yaml12Booleans)


def _convert(hint: Any, value: Any, where: str, default: Any = dataclasses.MISSING) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(hint, value, where, default)
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise _error(where, f"expected {_describe(hint)}, got {_show(value)}")
    if isinstance(hint, type) and (dataclasses.is_dataclass(hint) or hasattr(hint, "__config_load__")):
        return from_dict(hint, value, where=where, base=default)
    if origin in (tuple, list, collections.abc.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _error(where, f"expected {_describe(hint)}, got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _error(where, f"expected a list of {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        element = args[0] if args else Any
        return tuple(_convert(element, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise _error(where, f"expected {_describe(hint)}, got {_show(value)}")
        key_hint, value_hint = args or (Any, Any)
        return {_convert(key_hint, k, where): _convert(value_hint, v, _join(where, k)) for k, v in value.items()}
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):  # YAML 1.1 reads 1e-5 as a string
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: config fields of type {hint!r} are not supported")
    raise _error(where, f"expected {_describe(hint)}, got {_show(value)}")


def _convert_union(hint: Any, value: Any, where: str, default: Any) -> Any:
    members = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise _error(where, f"expected {_describe(hint)}, got null")
    classes = [m for m in members if isinstance(m, type) and dataclasses.is_dataclass(m)]
    if classes and isinstance(value, Mapping):
        if len(classes) == 1:
            return from_dict(classes[0], value, where=where, base=default)
        return _convert_tagged(classes, value, where, default)
    for member in members:
        if member in classes:
            continue
        try:
            return _convert(member, value, where)
        except ConfigError:
            continue
    raise _error(where, f"expected {_describe(hint)}, got {_show(value)}")


def tag_of(classes: Sequence[type]) -> tuple[str, dict[str, type]]:
    """The tag field shared by tagged dataclasses and the class of each tag value."""
    tags: dict[str, dict[str, type]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            hint = _hints(cls)[f.name]
            if typing.get_origin(hint) is Literal and len(typing.get_args(hint)) == 1:
                tags.setdefault(f.name, {})[typing.get_args(hint)[0]] = cls
    names = [name for name, kinds in tags.items() if len(kinds) == len(classes)]
    if len(names) != 1:
        raise TypeError(f"{[c.__name__ for c in classes]} share no single Literal tag field")
    return names[0], tags[names[0]]


def _convert_tagged(classes: list[type], value: Mapping, where: str, default: Any) -> Any:
    tag, kinds = tag_of(classes)
    kind = value.get(tag)
    if kind is None:
        if type(default) not in classes:
            raise _error(_join(where, tag), f"required key missing; one of {', '.join(map(repr, kinds))}")
        cls = type(default)
    elif kind not in kinds:
        raise _error(_join(where, tag), f"expected one of {', '.join(map(repr, kinds))}, got {_show(kind)}")
    else:
        cls = kinds[kind]
    return from_dict(cls, value, where=where, base=default)


# Files and overrides ----------------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty file: {})."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from e
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {_show(data)}")
    return data


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each `dotted.key=value` applied (the value is parsed as YAML: 3, 1e-3, [a, b], null)."""
    import copy

    data = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        try:
            value = load_yaml_text(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {e}") from e
        node, parts = data, key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is {_show(child)}, not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def load_yaml(cls: type, path: str | Path | None = None, *, overrides: Sequence[str] = ()) -> Any:
    """Read `cls` from a YAML file (None: from its defaults) with `overrides` applied; errors name file and key."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, where=f"{path}:" if path is not None else "")


def to_dict(config: Any) -> Any:
    """Plain data (dicts, lists, scalars) for YAML and JSON; the inverse of `from_dict`."""
    if hasattr(config, "__config_dump__"):
        return config.__config_dump__()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, np.generic):
        return config.item()
    return config


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False, width=120)


__all__ = ["ConfigError", "apply_overrides", "dump_yaml", "from_dict", "load_yaml", "read_yaml", "tag_of", "to_dict"]
