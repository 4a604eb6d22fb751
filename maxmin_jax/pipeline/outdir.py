"""Writing into an output directory safely: one writer at a time, never into someone else's directory, and
outputs that appear whole or not at all.

- `claim(root, overwrite=)`: refuses a non-empty directory that is not a maxmin-jax output (nothing of the user's
  is written over); with `overwrite`, empties one that is. `OutputLock` then holds `root/.maxmin-jax` locked
  (`fcntl.flock`) while the run writes: a second run into the same directory is refused, naming the holder
  (pid, host, command). The kernel releases the lock of a process that dies, SIGKILL included, so a stale lock
  never blocks a rerun.
- `publishing(into, names)`: entries of a directory (an exported policy, the fit-rewards layout) are written into a
  hidden staging directory and renamed into place only when complete. A journal makes the set of renames atomic
  too: a run killed half-way through them is rolled forward by the next writer (`recover`), so readers find the old
  entries or the new ones, never a mix; `incomplete` tells a reader that a publication was cut short.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from maxmin_jax.errors import RunDirError, option

logger = logging.getLogger(__name__)

MARKER = ".maxmin-jax"
"""In every output directory: says a maxmin-jax run writes there; the lock file of its writer."""
RECORD = "stage.json"
JOURNAL = ".publishing.json"
_STAGING, _TRASH = ".staging-", ".trash-"


def is_output(root: Path) -> bool:
    """Whether `root` holds a maxmin-jax output (its marker, or the stage records of one from before markers)."""
    return (root / MARKER).exists() or any(next(root.glob(f"{'*/' * depth}{RECORD}"), None) for depth in (1, 2, 3))


def claim(root: str | os.PathLike) -> bool:
    """Checks that a run may write into `root`, creating it if needed; returns whether it was created. A
    non-empty directory that is not a maxmin-jax output is refused (even to `overwrite`: nothing of the user's is
    deleted)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"{root}: exists and is not a directory")
    if not root.exists():
        root.mkdir(parents=True)
        return True
    entries = [p for p in root.iterdir() if p.name != MARKER]
    if entries and not is_output(root):
        shown = ", ".join(sorted(p.name for p in entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunDirError(f"{root}: not empty ({shown}) and not an output directory of maxmin-jax; refusing to "
                          "write into it. Choose a new or empty output directory.")
    return False


def clear(root: str | os.PathLike) -> None:
    """Deletes everything an output directory holds but its lock file (for `overwrite`; hold the lock)."""
    for entry in Path(root).iterdir():
        if entry.name != MARKER:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class OutputLock:
    """An exclusive lock on an output directory, held from `acquire` to `release` (or the holder's death)."""

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / MARKER
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)  # a filesystem without locks: say so, and write unguarded rather than not at all
                logger.warning("%s: cannot lock (%s); nothing will stop a second run writing here", self.path, err)
                return self
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}: "
                   f"{holder.get('command')}" if holder else "another process")
            raise RunDirError(f"{self.path.parent}: another run is writing here ({who}); refusing a second writer. "
                              "Wait for it to finish, or use another output directory.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


# Atomic publication -----------------------------------------------------------------------------------------------
def _move_in(source: Path, target: Path, trash: Path) -> None:
    """`source` to `target`, the old `target` (if any) into `trash` first."""
    if target.exists() or target.is_symlink():
        trash.mkdir(exist_ok=True)
        os.replace(target, trash / target.name)
    os.replace(source, target)


def _finish(into: Path, journal: dict) -> None:
    staging, trash = into / journal["staging"], into / journal["trash"]
    for name in journal["names"]:
        if (staging / name).exists():  # not moved yet
            _move_in(staging / name, into / name, trash)
    (into / JOURNAL).unlink()
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def recover(into: str | os.PathLike) -> None:
    """Completes a publication into `into` that a killed run left half-done (its staging directory was complete),
    and deletes staging directories of publications that never started."""
    into = Path(into)
    if not into.is_dir():
        return
    journal = into / JOURNAL
    if journal.exists():
        record = json.loads(journal.read_text())
        logger.warning("%s: completing the publication of %s that a previous run left half-done", into,
                       ", ".join(record["names"]))
        _finish(into, record)
    for leftover in into.iterdir():
        if leftover.name.startswith((_STAGING, _TRASH)):
            shutil.rmtree(leftover, ignore_errors=True)


def incomplete(into: str | os.PathLike) -> bool:
    """Whether a publication into `into` was cut short (readers should not use the entries until it is redone)."""
    return (Path(into) / JOURNAL).exists()


@contextlib.contextmanager
def publishing(into: str | os.PathLike, names: Sequence[str] | None = None) -> Iterator[Path]:
    """Yields a staging directory in which to write entries of `into` (`names`, or whatever is written); when the
    block ends without error they replace the old ones (renames, journaled), else the staging directory is deleted
    and nothing changes. The caller holds the output directory's lock."""
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    recover(into)
    token = secrets.token_hex(4)
    staging = into / f"{_STAGING}{token}"
    staging.mkdir()
    try:
        yield staging
        names = sorted(p.name for p in staging.iterdir()) if names is None else names
        missing = [n for n in names if not (staging / n).exists()]
        if missing:
            raise RuntimeError(f"publishing into {into}: {missing} were not written")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record = {"staging": staging.name, "trash": f"{_TRASH}{token}", "names": list(names)}
    tmp = into / f"{JOURNAL}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, into / JOURNAL)  # from here on the publication completes, if need be in the next run
    _finish(into, record)


def overwrite_hint() -> str:
    return f"or start afresh with {option('overwrite', True)} (deletes this directory's outputs)"


__all__ = ["JOURNAL", "MARKER", "OutputLock", "claim", "clear", "incomplete", "is_output", "overwrite_hint",
           "publishing", "recover"]
