"""Strict JSON outputs: never a NaN or Infinity token (not JSON; most parsers reject it), written atomically.

The rule for non-finite numbers, one per call:

- `nonfinite="raise"` (the default): a NaN or infinity anywhere is a `NonFiniteJSONError` naming its path in the
  document (e.g. `history[3].m_step_loss`). A result that holds one did not train properly; it must not be written
  as if it had. A value that is legitimately absent (a mean over zero steps) is written as None by its producer.
- `nonfinite="null"`: each non-finite number is written as null, meaning "not a number"; for dumping metrics that
  are diagnostics, not results.

numpy and JAX scalars and arrays become Python numbers and lists; anything else that `json` cannot write is a
TypeError naming its path.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

NonFinite = Literal["raise", "null"]
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: new files get the usual 0o666 & ~umask, not mkstemp's 0o600


class NonFiniteJSONError(ValueError):
    """A NaN or infinity where a JSON output needs a number; `path` is where in the document."""

    def __init__(self, message: str, *, path: str):
        super().__init__(message)
        self.path = path


def to_json_value(obj: Any, *, nonfinite: NonFinite = "raise", path: str = "$") -> Any:
    """`obj` as plain JSON data (dict, list, str, int, float, bool, None), applying the non-finite rule."""
    if nonfinite not in ("raise", "null"):
        raise ValueError(f"nonfinite must be 'raise' or 'null', got {nonfinite!r}")
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{path}: key {key!r} of type {type(key).__name__} is not a JSON object key")
            out[key] = to_json_value(value, nonfinite=nonfinite, path=f"{path}.{key}")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_json_value(v, nonfinite=nonfinite, path=f"{path}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):  # numpy / JAX scalars and arrays
        return to_json_value(np.asarray(obj).tolist(), nonfinite=nonfinite, path=path)
    if isinstance(obj, float) and not math.isfinite(obj):
        if nonfinite == "null":
            return None
        raise NonFiniteJSONError(f"{path} = {obj}: JSON outputs hold finite numbers only (a non-finite value here "
                                 "means the computation that produced it failed)", path=path)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be written as JSON: {obj!r}")


def dumps(obj: Any, *, nonfinite: NonFinite = "raise", indent: int | None = 2) -> str:
    """`json.dumps` of `to_json_value(obj)`, with `allow_nan=False` as the last line of defence."""
    return json.dumps(to_json_value(obj, nonfinite=nonfinite), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, *, nonfinite: NonFinite = "raise", indent: int | None = 2) -> Path:
    """Writes `obj` to `path` atomically: the text goes to a temporary file beside it, which then replaces `path`,
    so a reader (or a run killed mid-write) sees the old file or the new one, never half of one. Nothing is
    written if `obj` breaks the rules."""
    path = Path(path)
    text = dumps(obj, nonfinite=nonfinite, indent=indent)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in `path`, read strictly: a NaN or Infinity token (which `json.loads` takes) is a
    `NonFiniteJSONError`, malformed JSON a `ValueError`, both naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(), parse_constant=_refuse_constant)
    except ValueError as err:
        if "is not JSON" in str(err):
            raise NonFiniteJSONError(f"{path}: holds {str(err).split()[0]}, which is not a number in JSON (the "
                                     "computation that wrote it failed)", path=str(path)) from None
        raise ValueError(f"{path}: not valid JSON ({err})") from None


__all__ = ["NonFiniteJSONError", "dumps", "read_json", "to_json_value", "write_json"]
