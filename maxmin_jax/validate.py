"""Range and type checks for config dataclasses, called from `__post_init__`, so a bad value fails when the
config is built (before any compute) with a `ConfigError` naming the field and what it should be.

```
@dataclasses.dataclass(frozen=True)
class MyConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    steps: int = 10

    def __post_init__(self):
        check_optimizer(self)            # learning_rate > 0, weight_decay >= 0, max_grad_norm > 0 or None
        positive_int(self, "steps")
```

Numbers must be finite, and a bool is never accepted as a number (`steps: true` in YAML is a mistake, not 1).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

from maxmin_jax.errors import ConfigError

# kind -> (test on a finite number, what it should be)
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "finite": (lambda x: True, "a finite number"),
    "positive": (lambda x: x > 0, "a finite number > 0"),
    "non_negative": (lambda x: x >= 0, "a finite number >= 0"),
    "fraction": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
    "proper_fraction": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "probability": (lambda x: 0 < x <= 1, "a number in (0, 1]"),
    "positive_int": (lambda x: x >= 1, "an integer >= 1"),
    "non_negative_int": (lambda x: x >= 0, "an integer >= 0"),
}


def check_value(value: Any, kind: str, name: str, *, optional: bool = False, key: str | None = None) -> None:
    """Raises `ConfigError` unless `value` is of `kind` (see `_KINDS`); `name` is how the message calls it (e.g.
    "PPOConfig.learning_rate"), `key` the error's key (default: the part of `name` after its last dot);
    `optional` also accepts None."""
    test, expected = _KINDS[kind]
    if value is None and optional:
        return
    integer = kind.endswith("_int")
    wrong_type = (isinstance(value, bool) or not isinstance(value, numbers.Real)
                  or (integer and not isinstance(value, numbers.Integral)))
    if wrong_type or not (isinstance(value, numbers.Integral) or math.isfinite(value)) or not test(value):
        got = f"{value!r} (a bool)" if isinstance(value, bool) else repr(value)
        detail = f"expected {expected}{' or None' if optional else ''}, got {got}"
        raise ConfigError(f"{name}: {detail}", key=key or name.rsplit(".", 1)[-1], detail=detail)


def _check_fields(kind: str, obj: Any, names: tuple[str, ...], optional: bool, within: Any = None,
                  at: str = "") -> None:
    owner = type(obj if within is None else within).__name__
    for name in names:
        key = f"{at}.{name}" if at else name
        check_value(getattr(obj, name), kind, f"{owner}.{key}", optional=optional, key=key)


def finite(obj: Any, *names: str, optional: bool = False, within: Any = None, at: str = "") -> None:
    _check_fields("finite", obj, names, optional, within, at)


def positive(obj: Any, *names: str, optional: bool = False, within: Any = None, at: str = "") -> None:
    _check_fields("positive", obj, names, optional, within, at)


def non_negative(obj: Any, *names: str, optional: bool = False, within: Any = None, at: str = "") -> None:
    _check_fields("non_negative", obj, names, optional, within, at)


def fraction(obj: Any, *names: str, optional: bool = False, within: Any = None, at: str = "") -> None:
    _check_fields("fraction", obj, names, optional, within, at)


def proper_fraction(obj: Any, *names: str, optional: bool = False, within: Any = None, at: str = "") -> None:
    _check_fields("proper_fraction", obj, names, optional, within, at)


def probability(obj: Any, *names: str, optional: bool = False, within: Any = None, at: str = "") -> None:
    _check_fields("probability", obj, names, optional, within, at)


def positive_int(obj: Any, *names: str, optional: bool = False, within: Any = None, at: str = "") -> None:
    _check_fields("positive_int", obj, names, optional, within, at)


def non_negative_int(obj: Any, *names: str, optional: bool = False, within: Any = None, at: str = "") -> None:
    _check_fields("non_negative_int", obj, names, optional, within, at)


def check_optimizer(obj: Any, *, within: Any = None, at: str = "") -> None:
    """The optimiser fields `obj` has: learning_rate > 0; weight_decay >= 0; max_grad_norm > 0 or None;
    warmup_steps an integer >= 0; b1, b2 in [0, 1]; eps > 0 (all finite). `within` and `at`: a config checking a
    nested one names it by its own class and the path to it (`FitRewards.em.m_step.learning_rate`)."""
    present = lambda *names: tuple(n for n in names if hasattr(obj, n))  # noqa: E731
    where = {"within": within, "at": at}
    positive(obj, *present("learning_rate", "eps"), **where)
    non_negative(obj, *present("weight_decay"), **where)
    positive(obj, *present("max_grad_norm"), optional=True, **where)
    non_negative_int(obj, *present("warmup_steps"), **where)
    fraction(obj, *present("b1", "b2"), **where)


def one_of(obj: Any, name: str, choices, *, within: Any = None, at: str = "") -> None:
    """`obj.name` must be one of `choices` (names, e.g. objectives); the message lists them."""
    value = getattr(obj, name)
    if value not in choices:
        key = f"{at}.{name}" if at else name
        detail = f"expected one of {', '.join(map(repr, choices))}, got {value!r}"
        raise ConfigError(f"{type(obj if within is None else within).__name__}.{key}: {detail}", key=key,
                          detail=detail)


def require(condition: bool, obj: Any, key: str, detail: str) -> None:
    """A rule between fields (divisibility, an order): raises `ConfigError` naming `key` with `detail` unless
    `condition` holds."""
    if not condition:
        raise ConfigError(f"{type(obj).__name__}.{key}: {detail}", key=key, detail=detail)


__all__ = ["check_optimizer", "check_value", "finite", "fraction", "non_negative", "non_negative_int", "one_of",
           "positive", "positive_int", "probability", "proper_fraction", "require"]
