"""Prompt files for policy training: read strictly, every problem named with the file and row, checked against
the model's length limit before any compute.

Formats: ``.txt`` or any file of no table extension (one prompt per non-blank line); ``.jsonl`` (one JSON object
per line, the prompt in ``column``); and, through ``datasets`` as preference tables are, ``.json``, ``.csv`` and
``.parquet`` files, dataset folders and hub ids (the prompt in ``column``). Rows are numbered as in ``schema``: the
line of a line-based file, else the data row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from maxmin_jax.data.batching import encode as encode_texts
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
    ids: list[list[int]] | None = None  # each prompt's token ids, when they were checked against a max_length

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
    max_rows: int | None = None,
    encode: Callable[[list[str]], list[list[int]]] | None = None,
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
      max_rows: read only the first N rows of the source (None: all).
      encode: texts -> token ids for the length check, instead of ``tokenizer`` (e.g. a cut to the first N tokens
        and a chat template around them, as the pipeline makes its prompts).

    Raises:
      DataError: naming the file, the row and what was expected: a missing file, bytes that are not UTF-8,
        malformed JSON, a row that is not an object, a missing, non-string or empty prompt, one too long; and, in
        either mode, a file with no usable prompt.
    """
    if tokenizer is not None and encode is not None:
        raise ValueError("give tokenizer or encode, not both")
    if (tokenizer is None and encode is None) != (max_length is None):
        raise ValueError("max_length needs a tokenizer (or encode), and they need max_length")
    if tokenizer is not None:
        encode = partial(encode_texts, tokenizer)
    name = str(path)
    numbered, label = _read_rows(Path(path), name, column, split, max_rows)
    texts, rows, problems = [], [], []
    for row, value in numbered:
        if not isinstance(value, str):
            problems.append((row, f"{label}: expected a string, got {describe(value)}"))
        elif not value.strip():
            problems.append((row, f"{label}: expected non-empty text, got {value!r}"))
        else:
            texts.append(value)
            rows.append(row)
    ids = None
    if encode is not None:
        ids = encode(texts) if texts else []
        keep = [0 < len(seq) <= max_length for seq in ids]
        problems += [(row, f"{label}: {len(seq)} tokens; expected 1 to max_length={max_length} (the model's "
                      "positions left for the prompt)") for row, seq, ok in zip(rows, ids, keep) if not ok]
        texts, rows, ids = ([x for x, ok in zip(values, keep) if ok] for values in (texts, rows, ids))
    problems.sort()
    settle_problems(problems, total=len(numbered), kept=len(texts), source=name, skip_invalid=skip_invalid,
                    noun="prompts")
    return ValidatedPrompts(prompts=texts, rows=rows, skipped=problems, source=name, ids=ids)


def _read_rows(path: Path, name: str, column: str, split: str, max_rows: int | None):
    """([(row number, raw prompt value)], how messages call the prompt); file-level problems (encoding, JSON
    syntax, emptiness) raise at once, naming the line."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl") and not path.is_file():
        raise DataError(f"{name}: prompts file not found", source=name)
    if path.is_file() and suffix not in _TABLE_SUFFIXES:  # .txt, or any other file: one prompt per line
        rows = list(islice(((n, line) for n, line in iter_lines(path, name=name) if line.strip()), max_rows))
        if not rows:
            raise DataError(f"{name}: the file is empty; expected {EXPECTED['txt']}", source=name)
        return rows, "prompt"
    if suffix == ".jsonl":
        rows = [(n, record.get(column)) for n, record in islice(iter_json_lines(path, name=name), max_rows)]
        if not rows:
            raise DataError(f"{name}: the file is empty; expected {EXPECTED['jsonl']}", source=name)
        return rows, f"field '{column}'"
    from maxmin_jax.data.loaders import read_table  # tables, folders and hub ids, as preference data

    table, name = read_table(path, split)
    if column not in table.column_names:
        raise DataError(f"{name}: no column {column!r} for the prompts; the table has columns {table.column_names}",
                        source=name, field=column)
    if max_rows is not None:
        table = table.select(range(min(max_rows, table.num_rows)))
    return list(enumerate(table[column], start=1)), f"field '{column}'"
