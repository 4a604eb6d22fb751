"""Prompt files for policy training: read strictly, every problem named with the file and row, checked against
the model's length limit before any compute.

Formats: ``.txt`` or any file of no table extension (one prompt per non-blank line); ``.jsonl`` (one JSON object
per line, the prompt in ``column``); and, through ``datasets`` as preference tables are, ``.json``, ``.csv`` and
``.parquet`` files, dataset folders and hub ids (the prompt in ``column``). Rows are numbered as in ``schema``: the
line of a line-based file, else the data row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from maxmin_jax.data.batching import encode
from maxmin_jax.data.files import EXPECTED, iter_json_lines, iter_lines
from maxmin_jax.data.schema import DataError, describe, settle_problems

if TYPE_CHECKING:  # transformers is imported by whoever builds the tokenizer
    from transformers import PreTrainedTokenizerBase

_TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclasses.dataclass(frozen=True)
class ValidatedPrompts(Sequence):
    """Prompts that passed validation (a sequence of str), their row numbers, and every skipped row as
    ``(row_number, reason)``."""

    prompts: list[str]
    rows: list[int]
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    source: str = "<prompts>"

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index):
        return self.prompts[index]


def read_prompts(
    path: str | Path,
    *,
    column: str = "prompt",
    split: str = "train",
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    skip_invalid: bool = False,
) -> ValidatedPrompts:
    """Reads and validates prompts.

    Args:
      path: a prompt file (see the module docstring), dataset folder or hub dataset id.
      column: the field holding the prompt, for every format but ``.txt``.
      split: the split of a dataset folder or hub dataset.
      tokenizer, max_length: with both, a prompt of more than ``max_length`` tokens (tokenised as
        ``tokenize_prompts`` does; for generation, the model's positions minus the response budget) or of no
        tokens at all is invalid.
      skip_invalid: skip invalid rows (logged, listed in ``skipped``) instead of raising.

    Raises:
      DataError: naming the file, the row and what was expected: a missing file, bytes that are not UTF-8,
        malformed JSON, a row that is not an object, a missing, non-string or empty prompt, one too long; and, in
        either mode, a file with no usable prompt.
    """
    if (tokenizer is None) != (max_length is None):
        raise ValueError("tokenizer and max_length must be given together")
    name = str(path)
    numbered, label = _read_rows(Path(path), name, column, split)
    texts, rows, problems = [], [], []
    for row, value in numbered:
        if not isinstance(value, str):
            problems.append((row, f"{label}: expected a string, got {describe(value)}"))
        elif not value.strip():
            problems.append((row, f"{label}: expected non-empty text, got {value!r}"))
        else:
            texts.append(value)
            rows.append(row)
    if tokenizer is not None and texts:
        lengths = [len(ids) for ids in encode(tokenizer, texts)]
        keep = [0 < n <= max_length for n in lengths]
        problems += [(row, f"{label}: {n} tokens; expected 1 to max_length={max_length} (the model's "
                      "positions left for the prompt)") for row, n, ok in zip(rows, lengths, keep) if not ok]
        texts = [t for t, ok in zip(texts, keep) if ok]
        rows = [r for r, ok in zip(rows, keep) if ok]
    problems.sort()
    settle_problems(problems, total=len(numbered), kept=len(texts), source=name, skip_invalid=skip_invalid,
                    noun="prompts")
    return ValidatedPrompts(prompts=texts, rows=rows, skipped=problems, source=name)


def _read_rows(path: Path, name: str, column: str, split: str):
    """([(row number, raw prompt value)], how messages call the prompt); file-level problems (encoding, JSON
    syntax, emptiness) raise at once, naming the line."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl") and not path.is_file():
        raise DataError(f"{name}: prompts file not found", source=name)
    if path.is_file() and suffix not in _TABLE_SUFFIXES:  # .txt, or any other file: one prompt per line
        rows = [(n, line) for n, line in iter_lines(path, name=name) if line.strip()]
        if not rows:
            raise DataError(f"{name}: the file is empty; expected {EXPECTED['txt']}", source=name)
        return rows, "prompt"
    if suffix == ".jsonl":
        rows = [(n, record.get(column)) for n, record in iter_json_lines(path, name=name)]
        if not rows:
            raise DataError(f"{name}: the file is empty; expected {EXPECTED['jsonl']}", source=name)
        return rows, f"field '{column}'"
    from maxmin_jax.data.loaders import read_table  # tables, folders and hub ids, as preference data

    table, name = read_table(path, split)
    if column not in table.column_names:
        raise DataError(f"{name}: no column {column!r} for the prompts; the table has columns {table.column_names}",
                        source=name, field=column)
    return list(enumerate(table[column], start=1)), f"field '{column}'"
