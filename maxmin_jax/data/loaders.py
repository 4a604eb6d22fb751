"""Loading preference data with `datasets`: local jsonl/json/parquet/csv files, hub datasets, P-Soups.

Local files go through ``datasets.load_dataset(<builder>, data_files=...)`` and a hub id through
``datasets.load_dataset(name, split=...)`` unchanged, so the offline tests exercise the same code a real run uses.
Every loader returns ``ValidatedRows`` (see ``schema.validate_rows``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import datasets

from maxmin_jax.data.files import diagnose, non_blank_line_numbers, root_cause
from maxmin_jax.data.schema import ALL_FIELDS, REQUIRED_FIELDS, DataError, ValidatedRows, validate_rows

# Extension -> `datasets` packaged builder.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Names that are clearly files we cannot read, so they are not mistaken for hub ids.
_FILE_SUFFIXES = {".txt", ".tsv", ".xlsx", ".xls", ".pkl", ".pickle", ".arrow", ".yaml", ".yml", ".xml", ".gz", ".zip"}
_PANDAS_INDEX = "__index_level_0__"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# P-Soups files: one file per preference; `completion_a` is the preferred completion.
PSOUPS_COLUMNS = {"prompt": "user_input", "chosen": "completion_a", "rejected": "completion_b"}

Source = Union[str, os.PathLike, datasets.Dataset, Sequence[Mapping[str, Any]]]


def read_table(path_or_id: str | os.PathLike, split: str) -> tuple[datasets.Dataset, str]:
    """Returns (table, source name). Local files are chosen by extension; anything hub-shaped goes to the hub."""
    name = os.fspath(path_or_id)
    path = Path(name)
    suffix = path.suffix.lower()
    supported = ", ".join(sorted(_BUILDERS))
    if path.is_file() or suffix in _BUILDERS or suffix in _FILE_SUFFIXES:
        if suffix not in _BUILDERS:
            raise DataError(f"{name}: unsupported file extension {suffix or '(none)'!r}; expected one of {supported}",
                            source=name)
        if not path.is_file():
            raise DataError(f"{name}: no such file", source=name)
        try:
            # A local file is a single table: `datasets` names its only split "train" whatever `split` says.
            table = datasets.load_dataset(_BUILDERS[suffix], data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - re-raised with the file (and line) named; the cause stays attached
            raise _unreadable(path, name, suffix, err) from err
        if _PANDAS_INDEX in table.column_names:  # rows with one cell more than the header: pandas took the first
            raise _unreadable(path, name, suffix, None)  # as an index and shifted the rest; never read that
        return table, name
    if path.is_dir() or _HUB_ID.match(name):
        try:
            table = datasets.load_dataset(name, split=split)
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{name}: could not load split {split!r} (local folder or hub dataset): {root_cause(err)}",
                            source=name) from err
        return table, f"{name}[{split}]"
    raise DataError(f"{name}: no such file, and not a hub dataset id; expected a file ending in {supported}",
                    source=name)


def _unreadable(path: Path, name: str, suffix: str, err: BaseException | None) -> DataError:
    """The first problem a rescan of the file finds (naming its line), else the failure's root cause."""
    fmt = suffix[1:]
    found = diagnose(path, fmt) if fmt in ("jsonl", "json", "csv") else None
    detail = found.detail if found is not None else (root_cause(err) if err is not None else "malformed rows")
    return DataError(f"{name}: could not be read as {fmt}: {detail}", source=name, row=found and found.row)


def _as_table(source: Source, split: str, label: str) -> tuple[datasets.Dataset, str, list[int] | None]:
    """(table, source name, row numbers or None for 1, 2, ...). A JSON-lines file's rows are numbered by their
    lines: blank lines are not rows for `datasets`, but they are lines in the user's editor."""
    if isinstance(source, datasets.Dataset):
        return source, label, None
    if isinstance(source, (str, os.PathLike)):
        table, name = read_table(source, split)
        path = Path(source)
        lines = non_blank_line_numbers(path) if path.suffix.lower() == ".jsonl" and path.is_file() else None
        return table, name, lines
    if isinstance(source, Sequence):
        try:
            return datasets.Dataset.from_list(list(source)), label, None
        except Exception as err:  # noqa: BLE001 - e.g. one column holding both ints and strings
            raise DataError(f"{label}: records could not be made into a table: {root_cause(err)}",
                            source=label) from err
    raise DataError(f"{label}: expected a path, hub id, datasets.Dataset or list of records, got "
                    f"{type(source).__name__}", source=label)


def _select_columns(
    table: datasets.Dataset, columns: Mapping[str, str] | None, name: str, required: Sequence[str]
) -> dict[str, list[Any]]:
    """Maps our fields to the table's columns (``columns``: our field -> their column) and reads them."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(ALL_FIELDS))
    if unknown:
        raise DataError(f"{name}: columns= maps unknown fields {unknown}; our fields are {list(ALL_FIELDS)}")
    mapping = {field: columns.get(field, field) for field in ALL_FIELDS}
    available = table.column_names
    missing = [f"'{mapping[f]}'" + (f" (for {f})" if mapping[f] != f else "") for f in required if mapping[f] not in available]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {', '.join(missing)}; the file has columns {available}. "
            "Map your column names with columns={our_field: your_column}."
        )
    present = {field: col for field, col in mapping.items() if col in available}
    try:
        data = table.select_columns(sorted(set(present.values()))).to_dict()
    except UnicodeDecodeError as err:  # Arrow stores text unchecked; bad bytes surface only when read back
        found = diagnose(Path(name), Path(name).suffix.lower()[1:]) if Path(name).is_file() else None
        detail = found.detail if found is not None else f"text that is not valid UTF-8 ({err}); expected UTF-8"
        raise DataError(f"{name}: could not be read: {detail}", source=name, row=found and found.row) from err
    return {field: data[col] for field, col in present.items()}


def _records(data: dict[str, list[Any]], n: int) -> list[dict[str, Any]]:
    fields = list(data)
    return [{f: data[f][i] for f in fields} for i in range(n)]


def load_preferences(
    path_or_id: Source,
    *,
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    coerce_user_id: bool = False,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> ValidatedRows:
    """Loads rows with fields user_id, prompt, chosen, rejected (and optional group).

    Args:
      path_or_id: a .jsonl/.json/.parquet/.csv file, a hub dataset id or local dataset folder (read with
        ``datasets.load_dataset(name, split=split)``), a ``datasets.Dataset`` or a list of dicts.
      columns: our field -> the source's column name, for sources with other names.
      split, skip_invalid, coerce_user_id, max_prompt_tokens, count_tokens: see ``validate_rows``.
    """
    table, name, row_numbers = _as_table(path_or_id, split, "<records>")
    data = _select_columns(table, columns, name, REQUIRED_FIELDS)
    return validate_rows(
        _records(data, table.num_rows),
        source=name,
        row_numbers=row_numbers,
        skip_invalid=skip_invalid,
        coerce_user_id=coerce_user_id,
        max_prompt_tokens=max_prompt_tokens,
        count_tokens=count_tokens,
    )


def load_grouped(
    sources: Mapping[str, Source],
    *,
    columns: Mapping[str, str] | None = None,
    users_per_group: int | None = None,
    split: str = "train",
    skip_invalid: bool = False,
    coerce_user_id: bool = False,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> ValidatedRows:
    """Loads one source per group ("one file = one group"); each row's ``group`` is its source's group name.

    With ``users_per_group`` the sources need no user column: each group gets synthetic users
    ``f"{group}-{i}"``, i < users_per_group, and data row j (0-based, counted before validation so skipping a
    bad row does not reshuffle the others) goes to user ``j % users_per_group`` (round-robin, as the paper's
    code builds users for P-Soups). Without it user ids come from the data and a user may not appear in two
    groups. Skipped rows are recorded as ``(row_number, "<source>: <reason>")``.
    """
    if not sources:
        raise DataError("load_grouped: no sources given")
    if users_per_group is not None and users_per_group < 1:
        raise ValueError(f"users_per_group must be >= 1, got {users_per_group}")
    required = [f for f in REQUIRED_FIELDS if not (users_per_group and f == "user_id")]
    rows, skipped, names = [], [], []
    user_group: dict[str, tuple[str, str]] = {}  # user id -> (group, source) for the cross-group check
    for group, source in sources.items():
        table, name, row_numbers = _as_table(source, split, f"<group {group!r}>")
        data = _select_columns(table, columns, name, required)
        if users_per_group:
            data["user_id"] = [f"{group}-{j % users_per_group}" for j in range(table.num_rows)]
        data["group"] = [group] * table.num_rows
        result = validate_rows(
            _records(data, table.num_rows),
            source=name,
            row_numbers=row_numbers,
            skip_invalid=skip_invalid,
            coerce_user_id=coerce_user_id,
            max_prompt_tokens=max_prompt_tokens,
            count_tokens=count_tokens,
        )
        for row in result.rows:
            seen = user_group.setdefault(row.user_id, (group, name))
            if seen[0] != group:
                raise DataError(
                    f"{name}: user {row.user_id!r} also appears in group {seen[0]!r} ({seen[1]}); "
                    "expected each user in one group (or pass users_per_group to make per-group users)"
                )
        rows.extend(result.rows)
        skipped.extend((n, f"{name}: {reason}") for n, reason in result.skipped)
        names.append(name)
    return ValidatedRows(rows=rows, skipped=skipped, source=" + ".join(names))


def load_psoups(
    files: Mapping[str, Source],
    *,
    users_per_group: int = 10,
    split: str = "train",
    skip_invalid: bool = False,
    max_prompt_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> ValidatedRows:
    """Loads P-Soups preference files: ``{preference_name: path}``, columns user_input, completion_a
    (preferred), completion_b. P-Soups has no annotator ids, so each file gets ``users_per_group`` synthetic
    users (see ``load_grouped``) and the file's name is the users' true group.
    """
    return load_grouped(
        files,
        columns=PSOUPS_COLUMNS,
        users_per_group=users_per_group,
        split=split,
        skip_invalid=skip_invalid,
        max_prompt_tokens=max_prompt_tokens,
        count_tokens=count_tokens,
    )
