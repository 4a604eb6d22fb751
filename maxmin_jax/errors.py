"""The library's error classes: what went wrong is in the message, where it went wrong is also in attributes.

`InputError` and its subclasses are problems the user can fix (a file, row, field, key or flag is named); the
command line shows their message without a traceback. `NumericalFault` is a run that diverged. Anything else
is a bug and keeps its traceback. docs/errors.md lists the conventions.
"""

from __future__ import annotations

import os
from typing import Any


class InputError(ValueError):
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
    """A configuration value out of its range or of the wrong type; `key` is its name (e.g. "learning_rate")."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


class RunDirError(InputError):
    """An output directory holds a run that this one cannot continue (another config, another format);
    `differences` lists what differs."""

    def __init__(self, message: str, differences: list[str] | None = None):
        super().__init__(message)
        self.differences = list(differences or [])


class NumericalFault(FloatingPointError):
    """A training quantity became non-finite or exploded. `quantity`, `value`, `step` (where it happened) and
    `last_good_step` (the newest checkpoint written before it, if any) are also attributes."""

    def __init__(self, message: str, *, quantity: str, value: Any, step: int | None = None,
                 last_good_step: int | None = None):
        super().__init__(message)
        self.quantity, self.value, self.step, self.last_good_step = quantity, value, step, last_good_step


__all__ = ["CheckpointError", "ConfigError", "DataError", "InputError", "NumericalFault", "RunDirError"]
