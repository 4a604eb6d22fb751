"""An output directory as the record of a run: one `stage.json` per stage, its state saved with Orbax.

Each stage has a *fingerprint*: the plain-data subset of the config (and upstream choices) its result depends on.
A stage's record says whether it is `running` or `done`, under which fingerprint, with its small results (JSON);
its arrays (trained variables) are an Orbax checkpoint beside it. A rerun compares every recorded fingerprint with
the current one before doing anything, and refuses a different one, listing each differing key; finished stages
are then read back instead of recomputed, and a half-finished one resumes from its checkpoints.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from maxmin_jax import strict_json
from maxmin_jax.checkpoint import CheckpointManager, to_json
from maxmin_jax.errors import RunDirError
from maxmin_jax.pipeline import outdir

FORMAT = "maxmin-jax-stage/1"
RECORD = "stage.json"


def is_primary() -> bool:
    """Only the first process writes records and metrics (every process writes its checkpoint shards)."""
    return jax.process_index() == 0


def write_json_atomic(path: Path, data: Any) -> None:
    """Write strict JSON (no NaN) so a crash leaves the old file or the new one, never half of one."""
    if is_primary():
        strict_json.write_json(path, data)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; empty mappings kept as leaves."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def differences(recorded: dict, current: dict) -> list[str]:
    """One line per dotted key whose value differs, e.g. `rewards.em.rounds: 3 -> 4`."""
    a, b = flatten(recorded), flatten(current)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        was, now = a.get(key, missing), b.get(key, missing)
        if was == now:
            continue
        if all(isinstance(v, str) and v.startswith("sha256:") for v in (was, now)):  # an input's content
            lines.append(f"{key}: content changed (sha256 {was[7:19]}... -> {now[7:19]}...)")
        else:
            lines.append(f"{key}: {'(unset)' if was is missing else json.dumps(was)} -> "
                         f"{'(unset)' if now is missing else json.dumps(now)}")
    return lines


class Stage:
    """One stage's directory and record."""

    def __init__(self, root: Path, name: str, fingerprint: dict):
        self.name, self.path = name, root / name
        self.fingerprint = json.loads(json.dumps(to_json(fingerprint)))  # the JSON normal form, as recorded
        self._started = time.perf_counter()

    @property
    def record(self) -> dict | None:
        path = self.path / RECORD
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def done(self) -> bool:
        record = self.record
        return record is not None and record["status"] == "done"

    @property
    def result(self) -> dict:
        record = self.record
        if record is None or record["status"] != "done":
            raise RuntimeError(f"stage {self.name} has no result yet")
        return record["result"]

    def mismatch(self) -> list[str]:
        """Differences between the recorded fingerprint and this run's (empty when they agree or none is recorded)."""
        record = self.record
        if record is None:
            return []
        if record.get("format") != FORMAT:
            return [f"(record format {record.get('format')!r}, expected {FORMAT!r})"]
        return differences(record["fingerprint"], self.fingerprint)

    def start(self) -> None:
        """Mark the stage running (a finished stage asked to do more, e.g. more iterations, runs again)."""
        self._started = time.perf_counter()
        self._write("running", None, (self.record or {}).get("seconds", 0.0))

    def finish(self, result: dict) -> dict:
        """Mark the stage done with its JSON-able `result` (returned in its JSON normal form)."""
        result = json.loads(json.dumps(to_json(result)))
        previous = self.record or {}
        self._write("done", result, previous.get("seconds", 0.0) + time.perf_counter() - self._started)
        return result

    def _write(self, status: str, result: dict | None, seconds: float) -> None:
        write_json_atomic(self.path / RECORD, {"format": FORMAT, "stage": self.name, "status": status,
                                               "fingerprint": self.fingerprint, "result": result,
                                               "seconds": round(seconds, 3)})

    # Arrays -----------------------------------------------------------------------------------------------------
    def checkpoints(self, *, max_to_keep: int | None = 2) -> CheckpointManager:
        """Orbax checkpoints of this stage (full training states), refused under another fingerprint."""
        return CheckpointManager(self.path / "checkpoints", fingerprint=self.fingerprint, max_to_keep=max_to_keep)

    def save_state(self, state: Any) -> None:
        """The stage's final arrays (e.g. trained variables), as one checkpoint."""
        with self.checkpoints(max_to_keep=1) as manager:
            manager.save(0, state, force=True)
            manager.wait_until_finished()

    def restore_state(self, template: Any) -> Any:
        with self.checkpoints(max_to_keep=1) as manager:
            restored = manager.restore_latest(template)
        if restored is None:
            raise RunDirError(f"{self.path}: stage {self.name} is recorded as done but its checkpoint is missing; "
                              f"delete {self.path} to redo it")
        return restored


class RunDir:
    """The output directory of a run, held by it: created or claimed (a non-empty directory must be a maxmin-jax
    output), locked against a second writer (the first process writes; see `outdir`), emptied under `overwrite`,
    its publications cut short completed. `close` releases it, and removes it again if this run created it and
    failed before writing anything but its config."""

    def __init__(self, root: str | os.PathLike, *, overwrite: bool = False):
        self.root = Path(root)
        self.created = outdir.claim(self.root) if is_primary() else False
        self._lock = outdir.OutputLock(self.root).acquire() if is_primary() else None
        try:
            if overwrite and is_primary():
                outdir.clear(self.root)
            if is_primary():
                outdir.recover(self.root)
                outdir.recover(self.root / "policies")
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("maxmin_jax.pipeline.rundir.claim")
        except BaseException:
            self.close(failed=True)
            raise

    def close(self, *, failed: bool = False) -> None:
        if self._lock is None:
            return
        if failed and self.created and {p.name for p in self.root.iterdir()} <= {outdir.MARKER, "config.yaml"}:
            import shutil

            shutil.rmtree(self.root, ignore_errors=True)  # nothing was done: leave nothing behind
        self._lock.release()
        self._lock = None

    def stage(self, name: str, fingerprint: dict) -> Stage:
        return Stage(self.root, name, fingerprint)

    def check(self, plan: dict[str, dict]) -> None:
        """Refuse (RunDirError) when any stage of `plan` ({name: fingerprint}) was recorded under another
        fingerprint, listing every differing key of every such stage."""
        lines = []
        for name, fingerprint in plan.items():
            lines += [f"{name}: {line}" for line in self.stage(name, fingerprint).mismatch()]
        if lines:
            shown = "\n  ".join(lines)
            raise RunDirError(
                f"{self.root} holds a run with another config or other inputs; refusing to mix their results. "
                f"Differences (stage: key: recorded -> now):\n  {shown}\nUse another output directory, delete the "
                f"stages listed to redo them, {outdir.overwrite_hint()}.", lines)


def encode_arrays(tree: Any) -> Any:
    """JSON-able form of a result holding numpy arrays (restored exactly by `decode_arrays`)."""
    if isinstance(tree, np.ndarray):
        return {"__array__": tree.tolist(), "dtype": str(tree.dtype)}
    if isinstance(tree, dict):
        return {k: encode_arrays(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [encode_arrays(v) for v in tree]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def decode_arrays(tree: Any) -> Any:
    if isinstance(tree, dict):
        if "__array__" in tree:
            return np.asarray(tree["__array__"], dtype=tree["dtype"])
        return {k: decode_arrays(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode_arrays(v) for v in tree]
    return tree


__all__ = ["RunDir", "Stage", "decode_arrays", "differences", "encode_arrays", "write_json_atomic"]
