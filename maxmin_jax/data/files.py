"""Reading local text files strictly, with line numbers: UTF-8, JSON lines, CSV shape, emptiness.

`iter_lines` and `iter_json_lines` read files we parse ourselves (prompt files). `diagnose` runs after a `datasets`
builder fails on a local file: the library names neither the line at fault nor, for an empty file, any cause at
all. It rescans the file and returns the first problem (what is wrong, and the line), so the fast path stays the
library's and only a failure pays for the rescan.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from maxmin_jax.errors import DataError

# What each format is expected to hold, for messages.
EXPECTED = {
    "jsonl": "one JSON object per line",
    "json": "a JSON array of objects",
    "csv": "a header row, then one row per record",
    "txt": "one prompt per line",
}


class Problem(NamedTuple):
    """What is wrong with a file (`detail`, starting with the line when there is one) and the 1-based `row`."""

    detail: str
    row: int | None = None

    def error(self, name: str) -> DataError:
        return DataError(f"{name}: {self.detail}", source=name, row=self.row)


class _Found(Exception):
    def __init__(self, problem: Problem):
        self.problem = problem


def _decode(raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise _Found(Problem(f"line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of "
                             "the line); expected UTF-8 text (re-save the file as UTF-8)", line)) from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            yield number, _decode(raw, number).rstrip("\r\n")


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, text in _lines(path):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise _Found(Problem(f"line {number}: malformed JSON ({err.msg} at column {err.colno}); expected "
                                 f"{EXPECTED['jsonl']}", number)) from None
        if not isinstance(value, dict):
            raise _Found(Problem(f"line {number}: expected a JSON object ({{...}}), got a JSON {_json_kind(value)}: "
                                 f"{_clip(text)}", number))
        yield number, value


def _reraise(iterator: Iterator, name: str) -> Iterator:
    try:
        yield from iterator
    except _Found as found:
        raise found.problem.error(name) from None


def iter_lines(path: str | Path, *, name: str | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without its line ending) for every line, decoded strictly as UTF-8; a
    `DataError` names the file (`name`, default the path) and the line otherwise."""
    return _reraise(_lines(Path(path)), name or str(path))


def iter_json_lines(path: str | Path, *, name: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON-lines file; each must hold a JSON object."""
    return _reraise(_json_lines(Path(path)), name or str(path))


def non_blank_line_numbers(path: str | Path) -> list[int]:
    """Line numbers of the non-blank lines: the rows of a JSON-lines file, for messages that name lines."""
    with open(path, "rb") as f:
        return [n for n, raw in enumerate(f, start=1) if raw.strip()]


def diagnose(path: str | Path, fmt: str) -> Problem | None:
    """The first problem in a local file of format `fmt` ("jsonl", "json", "csv"), or None if none is found."""
    path = Path(path)
    try:
        if fmt == "jsonl":
            if sum(1 for _ in _json_lines(path)) == 0:  # reads every line: the first bad one raises
                return _empty(fmt)
        elif fmt == "json":
            return _diagnose_json(path)
        elif fmt == "csv":
            return _diagnose_csv(path)
    except _Found as found:
        return found.problem
    return None


def _diagnose_json(path: Path) -> Problem | None:
    text = "".join(line + "\n" for _, line in _lines(path))
    if not text.strip():
        return _empty("json")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return Problem(f"line {err.lineno}: malformed JSON ({err.msg} at column {err.colno}); expected "
                       f"{EXPECTED['json']}", err.lineno)
    if isinstance(value, list):
        if not value:
            return Problem(f"an empty JSON array; expected {EXPECTED['json']}")
        for i, item in enumerate(value, start=1):
            if not isinstance(item, dict):
                return Problem(f"row {i} (element {i} of the array): expected a JSON object, got a JSON "
                               f"{_json_kind(item)}", i)
    return None


def _diagnose_csv(path: Path) -> Problem | None:
    lines = [line for _, line in _lines(path)]  # strict UTF-8 first, with line numbers
    reader = csv.reader(io.StringIO("\n".join(lines)))
    header = next(reader, None)
    if header is None or not any(cell.strip() for cell in header):
        return _empty("csv")
    data_rows = 0
    for row in reader:
        if not row:
            continue
        data_rows += 1
        if len(row) != len(header):
            return Problem(f"line {reader.line_num}: {len(row)} cells; expected {len(header)}, as in the header "
                           f"{header}", reader.line_num)
    if not data_rows:
        return Problem(f"only a header row, no data rows; expected {EXPECTED['csv']}")
    return None


def _empty(fmt: str) -> Problem:
    return Problem(f"the file is empty; expected {EXPECTED[fmt]}")


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def root_cause(err: BaseException) -> str:
    """'Type: message' of the innermost cause: library wrappers ("An error occurred while generating the
    dataset") hide it, and some causes have an empty message."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    message = str(err).strip()
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
