"""Synthetic worlds by name in configs: `preferences: {source: world, world: {name: review, ...options}}`.

`worlds()` maps a name to a world class (a frozen dataclass, read strictly like any config section) or a factory
function (its keyword arguments typed by its annotations). A world gives the pipeline: `tokenizer()`,
`group_names`, `group_sizes`, `preference_rows()` (labelled by its users, seeded by the world itself),
`prompts(n, rng)`, `sample_reviews(n, rng)` (texts for SFT) and `true_rewards_ids(ids, mask)` (jittable).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Mapping
from typing import Any, Callable

from maxmin_jax.config_io import _convert, from_dict, to_dict
from maxmin_jax.errors import ConfigError


def worlds() -> dict[str, Callable[..., Any]]:
    """The worlds a config can name (imported when first needed)."""
    from maxmin_jax.data.synthetic import ReviewWorld, planted_world

    return {"review": ReviewWorld, "planted": planted_world}


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """A synthetic world by name, with the keyword arguments of its class or factory (defaults filled in).

    YAML: `world: {name: review, num_users: 110, ...}`. Worlds: "review" (`ReviewWorld`: a majority that likes
    enthusiastic reviews, a minority that likes concise ones) and "planted" (`planted_world`: G groups with planted
    linear preferences)."""

    name: str = "review"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def build(self):
        """The world (one instance per distinct spec: its bound reward function is a static jit argument, and
        equal instances let every run in a process share compiled evaluation programs)."""
        return _build_world(self.name, tuple(sorted((k, _frozen(v)) for k, v in self.options.items())))

    @classmethod
    def __config_load__(cls, data: Any, where: str, base: WorldSpec | None = None) -> WorldSpec:
        data = dict(data or {}) if isinstance(data, Mapping) or data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping (name: and the world's options), got {data!r}")
        name = data.pop("name", base.name if base is not None else "review")
        if base is not None and base.name == name:  # options not given keep the base world's
            data = {**base.options, **data}
        known = worlds()
        if name not in known:
            raise ConfigError(f"{where}.name: unknown world {name!r}; known: {', '.join(known)}")
        factory = known[name]
        if dataclasses.is_dataclass(factory):
            options = to_dict(from_dict(factory, data, where=where))
        else:
            options = _call_options(factory, data, where)
        spec = cls(name, options)
        try:
            spec.build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from e
        return spec

    def __config_dump__(self) -> dict[str, Any]:
        return {"name": self.name, **to_dict(dict(self.options))}


@functools.lru_cache(maxsize=64)
def _build_world(name: str, options: tuple):
    return worlds()[name](**dict(options))


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _call_options(factory: Callable, data: dict, where: str) -> dict[str, Any]:
    """A factory function's keyword arguments: typed by its annotations, unknown ones refused, defaults filled."""
    params = inspect.signature(factory).parameters
    hints = typing.get_type_hints(factory)
    unknown = sorted(set(data) - set(params))
    if unknown:
        raise ConfigError("\n".join(f"{where}.{k}: unknown key; {factory.__name__} takes {', '.join(params)}"
                                    for k in unknown))
    options = {}
    for name, param in params.items():
        if name in data:
            options[name] = _convert(hints.get(name, Any), data[name], f"{where}.{name}")
        elif param.default is inspect.Parameter.empty:
            raise ConfigError(f"{where}.{name}: required key missing")
        else:
            options[name] = param.default
    return options


__all__ = ["WorldSpec", "worlds"]
