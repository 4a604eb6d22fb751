"""Worlds in configs: built-in ones by name, `preferences: {source: world, world: {name: review, ...options}}`, or
a world a user brings, `world: {factory: "package.module:function", ...keyword arguments}` (docs/worlds.md;
`maxmin_jax.pipeline.user_world` adapts it).

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
    from maxmin_jax.data.review_distance import ReviewDistanceWorld
    from maxmin_jax.data.synthetic import ReviewWorld, planted_world

    return {"review": ReviewWorld, "review_distance": ReviewDistanceWorld, "planted": planted_world}


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """A synthetic world by name, with the keyword arguments of its class or factory (defaults filled in).

    YAML: `world: {name: review, num_users: 110, ...}`. Worlds: "review" (`ReviewWorld`: a majority that likes
    enthusiastic reviews, a minority that likes concise ones), "review_distance" (`ReviewDistanceWorld`: the same
    with the minority's preference `distance` of the way from the majority's to conciseness) and "planted"
    (`planted_world`: G groups with planted linear preferences)."""

    name: str = "review"
    """A built-in world's name, or a user's world's "package.module:function" (then `factory` is True)."""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    factory: bool = False

    def build(self):
        """The world (one instance per distinct spec: its bound reward function is a static jit argument, and
        equal instances let every run in a process share compiled evaluation programs)."""
        return _build_world(self.name, tuple(sorted((k, _frozen(v)) for k, v in self.options.items())),
                            self.factory)

    @classmethod
    def __config_load__(cls, data: Any, where: str, base: WorldSpec | None = None) -> WorldSpec:
        data = dict(data or {}) if isinstance(data, Mapping) or data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping (name: and the world's options), got {data!r}")
        if "factory" in data:
            return cls._load_factory(data, where, base)
        name = data.pop("name", base.name if base is not None and not base.factory else "review")
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
        return cls(name, options)._checked(where)

    @classmethod
    def _load_factory(cls, data: dict, where: str, base: WorldSpec | None) -> WorldSpec:
        from maxmin_jax.data.world import resolve_factory

        path = data.pop("factory")
        if "name" in data:
            raise ConfigError(f"{where}: give either name (a built-in world) or factory (yours), not both")
        if not isinstance(path, str):
            raise ConfigError(f"{where}.factory: expected 'package.module:function', got {path!r}")
        if base is not None and base.factory and base.name == path:  # options not given keep the base world's
            data = {**base.options, **data}
        try:
            factory = resolve_factory(path, f"{where}.factory")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return cls(path, _call_options(factory, data, where), factory=True)._checked(where)

    def _checked(self, where: str) -> WorldSpec:
        try:
            self.build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from e
        return self

    def __config_dump__(self) -> dict[str, Any]:
        return {("factory" if self.factory else "name"): self.name, **to_dict(dict(self.options))}


@functools.lru_cache(maxsize=64)
def _build_world(name: str, options: tuple, factory: bool = False):
    if factory:
        from maxmin_jax.data.world import resolve_factory
        from maxmin_jax.pipeline.user_world import ProtocolWorld

        return ProtocolWorld(resolve_factory(name, "world.factory")(**dict(options)), name)
    return worlds()[name](**dict(options))


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _call_options(factory: Callable, data: dict, where: str) -> dict[str, Any]:
    """A factory function's keyword arguments: typed by its annotations, unknown ones refused, defaults filled."""
    params = inspect.signature(factory).parameters
    hints = typing.get_type_hints(factory)
    variadic = {n for n, p in params.items() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    params = {n: p for n, p in params.items() if n not in variadic}
    unknown = sorted(set(data) - set(params))
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()):
        raise ConfigError("\n".join(f"{where}.{k}: unknown key; {factory.__name__} takes {', '.join(params)}"
                                    for k in unknown))
    options = {k: data[k] for k in unknown}  # taken by **kwargs
    for name, param in params.items():
        if name in data:
            options[name] = _convert(hints.get(name, Any), data[name], f"{where}.{name}")
        elif param.default is inspect.Parameter.empty:
            raise ConfigError(f"{where}.{name}: required key missing")
        else:
            options[name] = param.default
    return options


__all__ = ["WorldSpec", "worlds"]
