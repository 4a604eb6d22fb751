"""Preference rows and their validation.

Every row that reaches EM must be usable: a bad row found late (say, an empty response tokenised to nothing, or an
integer user id that silently collides with a string one) corrupts a user's likelihood without any visible error.
So rows are checked once, at load time, and every problem is reported with the file, the 1-based row (the line of a
JSON-lines file; the data row, header not counted, of a table), the field and what was expected. Nothing is dropped
silently: with ``skip_invalid=True`` bad rows are skipped, logged (stderr) and listed in ``ValidatedRows.skipped``.
Each row keeps its ``source`` and ``row``, so a problem found later (a sequence too long for the model) still names
the file and row.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from maxmin_jax.errors import DataError, option, spell_options

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("prompt", "chosen", "rejected")
REQUIRED_FIELDS = ("user_id", *TEXT_FIELDS)
OPTIONAL_FIELDS = ("group",)
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

# How many problems a strict-mode error lists before summarising the rest.
_MAX_LISTED_ERRORS = 5


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    """One labelled comparison: ``user_id`` preferred ``chosen`` over ``rejected`` as answers to ``prompt``.

    ``group`` is the user's true group when it is known (synthetic worlds, P-Soups files). It is only for
    evaluation (e.g. the adjusted Rand index of the EM clustering); the algorithms never read it.
    """

    user_id: str
    prompt: str
    chosen: str
    rejected: str
    group: str | None = None
    source: str | None = dataclasses.field(default=None, compare=False, repr=False)
    """Where the row came from (file or dataset name), for messages; not part of the row's identity."""
    row: int | None = dataclasses.field(default=None, compare=False, repr=False)
    """Its 1-based row number in ``source``."""


@dataclasses.dataclass(frozen=True)
class ValidatedRows:
    """Rows that passed validation plus a record of every skipped row: ``skipped = [(row_number, reason)]``."""

    rows: list[PreferenceRow]
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    source: str = "<records>"

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PreferenceRow]:
        return iter(self.rows)


def describe(value: Any) -> str:
    if value is None:
        return "nothing (missing, null, or an empty CSV cell)"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _check_user_id(value: Any, coerce_user_id: bool) -> tuple[str | None, str | None]:
    """Returns (user_id, problem). Integers are only accepted when asked: ids 7 and "7" must not merge by accident."""
    if isinstance(value, str):
        if value.strip():
            return value, None
        return None, "field 'user_id': expected a non-empty string, got an empty string"
    if coerce_user_id and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value)), None
    hint = (f" ({option('coerce_user_id', True)} accepts integer ids as strings)"
            if isinstance(value, numbers.Integral) else "")
    return None, f"field 'user_id': expected a string, got {describe(value)}{hint}"


def _check_row(
    record: Mapping[str, Any],
    *,
    coerce_user_id: bool,
    max_prompt_tokens: int | None,
    count_tokens: Callable[[str], int] | None,
) -> tuple[tuple | None, str | None]:
    """Validates one record; returns ((user_id, prompt, chosen, rejected, group), None) or (None, reason)."""
    user_id, problem = _check_user_id(record.get("user_id"), coerce_user_id)
    if problem:
        return None, problem
    for field in TEXT_FIELDS:
        value = record.get(field)
        if not isinstance(value, str):
            return None, f"field '{field}': expected a string, got {describe(value)}"
        if not value.strip():
            return None, f"field '{field}': expected non-empty text, got {value!r}"
    if record["chosen"] == record["rejected"]:
        return None, "fields 'chosen' and 'rejected': expected two different responses, got identical text"
    group = record.get("group")
    if group is not None and not (isinstance(group, str) and group.strip()):
        return None, f"field 'group': expected a non-empty string or null, got {describe(group)}"
    if max_prompt_tokens is not None and count_tokens is not None:
        n = count_tokens(record["prompt"])
        if n > max_prompt_tokens:
            return None, (
                f"field 'prompt': expected at most {max_prompt_tokens} tokens (the model's limit), got {n} tokens"
            )
    return (user_id, record["prompt"], record["chosen"], record["rejected"], group), None


def validate_rows(
    records: Iterable[Mapping[str, Any]],
    *,
    source: str,
    skip_invalid: bool = False,
    coerce_user_id: bool = False,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    row_numbers: Iterable[int] | None = None,
) -> ValidatedRows:
    """Checks raw records (mappings with fields user_id, prompt, chosen, rejected and optional group).

    Args:
      records: the data rows, in file order.
      source: the file or dataset name used in every message.
      skip_invalid: skip bad rows (logged and recorded in ``skipped``) instead of raising.
      coerce_user_id: accept integer user ids, converted with ``str``. Off by default so a CSV with numeric ids
        is a visible choice, not a silent conversion.
      max_prompt_tokens, count_tokens: when both are given, prompts longer than the model allows are invalid.
      row_numbers: the 1-based row number of each record (default 1, 2, ...); lets callers keep file numbering
        after filtering.

    Raises:
      DataError: in strict mode, listing the first few problems (file, row, field, expected) and their count; in
        either mode when no valid row is left (no data is never a result).
    """
    if (max_prompt_tokens is None) != (count_tokens is None):
        raise ValueError("max_prompt_tokens and count_tokens must be given together")
    numbers_iter = iter(row_numbers) if row_numbers is not None else None
    rows: list[PreferenceRow] = []
    problems: list[tuple[int, str]] = []
    total = 0
    for index, record in enumerate(records):
        total += 1
        row_number = next(numbers_iter) if numbers_iter is not None else index + 1
        fields, problem = _check_row(
            record, coerce_user_id=coerce_user_id, max_prompt_tokens=max_prompt_tokens, count_tokens=count_tokens
        )
        if problem is None:
            rows.append(PreferenceRow(*fields, source, row_number))
        else:
            problems.append((row_number, problem))
    settle_problems(problems, total=total, kept=len(rows), source=source, skip_invalid=skip_invalid)
    return ValidatedRows(rows=rows, skipped=problems, source=source)


def settle_problems(
    problems: list[tuple[int, str]], *, total: int, kept: int, source: str, skip_invalid: bool, noun: str = "rows"
) -> None:
    """Raises the `DataError` that lists `problems` (row number, reason) in strict mode, or when nothing is kept;
    else logs how many rows were skipped. The error carries the first problem's source, row and field."""
    if total == 0:
        raise DataError(f"{source}: no {noun}; expected at least one", source=source)
    if problems and (not skip_invalid or kept == 0):
        listed = "\n".join(f"  {source}: row {n}: {reason}" for n, reason in problems[:_MAX_LISTED_ERRORS])
        more = len(problems) - _MAX_LISTED_ERRORS
        tail = f"\n  ... and {more} more invalid {noun}" if more > 0 else ""
        hint = (f"(fix the data, or skip invalid {noun}: {option('skip_invalid', True)})"
                if not skip_invalid else f"(skipping invalid {noun} would leave none)")
        first_row, first_reason = problems[0]
        field = re.search(r"fields? '(\w+)'", first_reason)
        raise DataError(f"{source}: {len(problems)} of {total} {noun} are invalid:\n{listed}{tail}\n{hint}",
                        source=source, row=first_row, field=field.group(1) if field else None)
    if problems:
        first_n, first_reason = problems[0]
        logger.warning("%s: skipped %d invalid %s of %d (first: row %d: %s)", source, len(problems), noun, total,
                       first_n, spell_options(first_reason))
