"""The metrics stream of a run: one JSON record per step in metrics.jsonl, and TensorBoard event files.

A record is `{"stage": ..., "step": n, "time": unix seconds, <metric>: value, ...}`; per-group metrics are lists.
TensorBoard gets one run directory per stage (tensorboard/<stage>/, written with tensorboardX), so the policies of
one run overlay on the same charts; a per-group metric `m` appears as `m/<group name>` (`tag`).

Resuming a stage from step s (`resume`) drops that stage's records after s (and a line a crash cut short) from
metrics.jsonl, and tells TensorBoard to discard the stage's events from step s + 1 on, so a resumed run streams
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from maxmin_jax import strict_json


def _plain(value: Any) -> Any:
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def tag(label) -> str:
    """A group name as a TensorBoard tag component: characters other than letters, digits, `_-.` become `_`."""
    return re.sub(r"[^\w.-]", "_", str(label))


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every complete record of a metrics.jsonl (a last line cut short by a crash is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsWriter:
    """Append-only metrics stream of one run directory; use as a context manager (or call `close`)."""

    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True, enabled: bool = True):
        self.directory = Path(directory)
        self.path = self.directory / "metrics.jsonl"
        self.tensorboard, self.enabled = tensorboard, enabled
        self._writers: dict[str, Any] = {}
        self._purge: dict[str, int] = {}
        self._file = None

    def _stream(self):
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        return self._file

    def resume(self, stage: str, step: int) -> list[dict]:
        """Forget `stage`'s records after `step`; returns its records up to `step`, in order."""
        records = read_records(self.path)
        kept = [r for r in records if r.get("stage") != stage or r["step"] <= step]
        if self.enabled and self.path.exists():
            self.close_stream()
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._purge[stage] = step + 1
        return [r for r in kept if r.get("stage") == stage]

    def records(self, stage: str) -> list[dict]:
        """The records of `stage` written so far, in order."""
        return [r for r in read_records(self.path) if r.get("stage") == stage]

    def write(self, stage: str, step: int, metrics: Mapping[str, Any], *,
              group_names: Sequence[str] | None = None) -> dict:
        """Record `metrics` (scalars, or one value per group) of `stage` at `step`; returns the record."""
        record = {"stage": stage, "step": int(step), "time": round(time.time(), 3),
                  **{k: _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        stream = self._stream()
        stream.write(strict_json.dumps(record, nonfinite="null", indent=None) + "\n")  # diagnostics: NaN -> null
        stream.flush()
        if self.tensorboard:
            writer = self._writer(stage)
            for name, value in record.items():
                if name in ("stage", "step", "time"):
                    continue
                if isinstance(value, list):
                    labels = group_names if group_names and len(group_names) == len(value) else range(len(value))
                    for label, v in zip(labels, value):
                        writer.add_scalar(f"{name}/{tag(label)}", float(v), step)
                else:
                    writer.add_scalar(name, float(value), step)
            writer.flush()
        return record

    def _writer(self, stage: str):
        if stage not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[stage] = SummaryWriter(str(self.directory / "tensorboard" / stage),
                                                 purge_step=self._purge.get(stage), flush_secs=30)
        return self._writers[stage]

    def close_stream(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self.close_stream()
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MetricsWriter", "read_records"]
