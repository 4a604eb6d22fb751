"""The library's error classes: what went wrong is in the message, where it went wrong is also in attributes.

`InputError` and its subclasses are problems the user can fix (a file, row, field, key or flag is named); the
command line shows their message without a traceback (exit code 2). `NumericalFault` is a run that diverged (exit
code 3). Anything else is a bug and keeps its traceback. docs/errors.md lists the conventions.

A hint that names a setting the user can change (`skip_invalid=True`, a learning rate) writes it with `option(key,
value)`. The error's `options` attribute lists them and `str(error)` spells them as Python does (`skip_invalid=True`);
a caller that knows the setting under another name respells them: the pipeline scopes a function's keyword to the
config section that set it (`options_under("prompts")`: `prompts.skip_invalid`), the command line turns config keys
into its flags (`render(error, spell)`: `--skip-invalid`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

_OPTION = re.compile(r"\u27e6([A-Za-z_][\w.]*)(?:=(.*?))?\u27e7")  # ⟦key⟧ or ⟦key=value⟧, value as repr()


@dataclasses.dataclass(frozen=True)
class Option:
    """A setting named in an error: `key` (a keyword argument, or a dotted config key once known) and the value
    that fixes the problem (None: the setting alone is named, e.g. "lower the learning rate")."""

    key: str
    value: Any = None

    def __str__(self) -> str:
        return self.key if self.value is None else f"{self.key}={self.value!r}"


def option(key: str, value: Any = None) -> str:
    """`key` (with `value`) as it goes in a message: respelled for the interface the error reaches."""
    return f"\u27e6{key}\u27e7" if value is None else f"\u27e6{key}={value!r}\u27e7"


def _parse(match: re.Match) -> Option:
    key, value = match.group(1), match.group(2)
    return Option(key, None if value is None else _literal(value))


def _literal(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def spell_options(text: str, spell: Callable[[Option], str | None] | None = None) -> str:
    """`text` with every `option(...)` written by `spell` (Python's `key=value` where it returns None)."""
    def one(match):
        opt = _parse(match)
        return (spell(opt) if spell is not None else None) or str(opt)

    return _OPTION.sub(one, text)


class _NamesOptions:
    """Shared by the error classes: messages may hold `option(...)` markers, shown in Python's spelling."""

    @property
    def template(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def options(self) -> list[Option]:
        """The settings the message names, in order."""
        return [_parse(m) for m in _OPTION.finditer(self.template)]

    def __str__(self) -> str:
        return spell_options(self.template)

    def scope_options(self, prefix: str) -> None:
        """Name the keywords in the message (keys without a dot) as config keys under `prefix`."""
        def scoped(match):
            key, value = match.group(1), match.group(2)
            key = key if "." in key else f"{prefix}.{key}"
            return f"\u27e6{key}\u27e7" if value is None else f"\u27e6{key}={value}\u27e7"

        self.args = (_OPTION.sub(scoped, self.template), *self.args[1:])


class InputError(_NamesOptions, ValueError):
    """Bad input the user can fix; the message names the file, row, field, key or flag and what was expected."""


class DataError(InputError):
    """Invalid data: `source` (file or dataset), `row` (1-based; the line of a line-based file), `field`."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.source, self.row, self.field = source, row, field


class CheckpointError(InputError):
    """A checkpoint that cannot be read, is not what it claims, or does not fit the model; `path` is the file or
    directory at fault."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None


class ConfigError(InputError):
    """A configuration value out of its range or of the wrong type. `key` is its name: the field (e.g.
    "learning_rate") where a config class checks itself, the dotted key path (e.g. "policy.ppo.learning_rate") once
    the config tree is read; `detail` is the message without the leading "<where>: ", so a caller can name the key
    its own way (the command line names the flag)."""

    def __init__(self, message: str, *, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key, self.detail = key, detail


class RunDirError(InputError):
    """An output directory holds a run that this one cannot continue (another config, other inputs, another
    format), is not a run directory, or is in use; `differences` lists what differs."""

    def __init__(self, message: str, differences: list[str] | None = None):
        super().__init__(message)
        self.differences = list(differences or [])


class NumericalFault(_NamesOptions, FloatingPointError):
    """A training quantity became non-finite or exploded. `quantity`, `value`, `step` (where it happened) and
    `last_good_step` (the newest checkpoint written before it, if any) are also attributes."""

    def __init__(self, message: str, *, quantity: str, value: Any, step: int | None = None,
                 last_good_step: int | None = None):
        super().__init__(message)
        self.quantity, self.value, self.step, self.last_good_step = quantity, value, step, last_good_step


@contextlib.contextmanager
def options_under(prefix: str) -> Iterator[None]:
    """Errors raised inside name their keyword options as config keys under `prefix` (`skip_invalid` ->
    `prompts.skip_invalid`): for code that calls a library function with the settings of one config section."""
    try:
        yield
    except (InputError, NumericalFault) as err:
        err.scope_options(prefix)
        raise


def render(err: BaseException, spell: Callable[[Option], str | None]) -> str:
    """The error's message for an interface that names settings its own way: each option, and a `ConfigError`'s
    key, written by `spell` (e.g. `Option("prompts.skip_invalid", True)` -> `--skip-invalid`; None keeps it)."""
    if isinstance(err, ConfigError) and err.key and err.detail is not None:
        named = spell(Option(err.key))
        if named is not None:
            return f"{named}: {spell_options(err.detail, spell)}"
    if isinstance(err, _NamesOptions):
        return spell_options(err.template, spell)
    return str(err)


__all__ = ["CheckpointError", "ConfigError", "DataError", "InputError", "NumericalFault", "Option", "RunDirError",
           "option", "options_under", "render", "spell_options"]
