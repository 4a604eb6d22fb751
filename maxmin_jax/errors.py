"""Errors in what the user gave us, as distinct from bugs.

`InputError` is the base of every error whose message alone tells the user what to fix: a config key, a data row,
a flag, a checkpoint or an output directory, named with what was expected. The command line prints these as one
line; anything else is a bug in maxmin-jax and keeps its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Something the user gave is wrong; the message names it (file, row, key or flag) and what was expected."""


class ConfigError(InputError, ValueError):
    """A config file or config value is not accepted; the message names the key path."""


class RunDirError(InputError):
    """An output directory holds a run that this one cannot continue (another config, another format)."""

    def __init__(self, message: str, differences: list[str] | None = None):
        super().__init__(message)
        self.differences = list(differences or [])


__all__ = ["ConfigError", "InputError", "RunDirError"]
