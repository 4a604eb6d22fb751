"""What a run's inputs *are*, not where they are: content digests of the files a config names.

A stage's fingerprint (`runners.stage_plan`) holds the config its result depends on. The config names its inputs by
path (a base model, a reward-model directory, preference and prompt files); a path says nothing about what is
there now. `identify_inputs` replaces each path in the config by a digest of its content, so a resumed run
refuses inputs that changed under the same path (a refit reward model, an edited prompt file) and accepts the same
inputs moved elsewhere. A directory's digest covers every file in it (relative paths and bytes; hidden files and
READMEs aside); a name that is no local path (a hub id) is identified by the name.

Files are hashed once per run (a cache keyed by path, size, modification time and inode) with SHA-256 over 16 MiB
blocks, the blocks of every file hashed in parallel threads (hashlib releases the GIL). Measured on an Intel Xeon
(2 shared cores): 1 GiB in 3.3 s on one thread, 2.8 s on two; a 13 GB 7B checkpoint is about 40 s on one core, less
with more cores, up to the disk's bandwidth (docs/pipeline.md).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from pathlib import Path
from typing import Any

BLOCK = 16 << 20
"""Bytes per hashed block: large enough that hashing, not the thread pool, dominates."""

INPUT_KEYS: dict[str, tuple[str, ...] | None] = {
    "model.policy": None, "model.reward_backbone": None, "model.tokenizer": None, "preferences.files": None,
    "prompts.source": None,
    "rewards.path": ("em_history.json", "reward_model"),  # what train-policy reads of a fit-rewards directory
}
"""Config keys that name input files or directories (or a mapping of them, for preferences.files), each with the
entries of a directory that count (None: all)."""

MODEL_KEYS = ("model.policy", "model.reward_backbone", "model.tokenizer")


def _skipped(name: str) -> bool:
    """Files that do not change what a directory holds for us: hidden files (locks, caches) and READMEs."""
    return name.startswith(".") or name.lower().startswith("readme")


class Digests:
    """Content digests of files and directories, each file read once (`workers` threads hash blocks)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or min(16, os.cpu_count() or 1)
        self._cache: dict[tuple, str] = {}

    def of(self, path: str | os.PathLike, only: tuple[str, ...] | None = None) -> str:
        """"sha256:HEX" of a file's bytes, or of a directory's files (relative paths and bytes); `only`: the
        directory's entries to cover (missing ones count as absent)."""
        path = Path(path)
        if path.is_dir():
            entries = [path / name for name in only] if only is not None else [path]
            files = sorted(p for entry in entries for p in ([entry] if entry.is_file() else entry.rglob("*"))
                           if p.is_file() and not any(_skipped(part) for part in p.relative_to(path).parts))
            digests = self._files(files)
            tree = hashlib.sha256()
            for file in files:
                tree.update(f"{file.relative_to(path).as_posix()}\0{digests[file]}\n".encode())
            return f"sha256:{tree.hexdigest()}"
        return f"sha256:{self._files([path])[path]}"

    def _files(self, files: list[Path]) -> dict[Path, str]:
        """Each file's digest: SHA-256 over the SHA-256 of its blocks, blocks hashed in parallel."""
        keys, todo = {}, []
        for file in files:
            stat = file.stat()
            keys[file] = (str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
            if keys[file] not in self._cache:
                todo.append((file, stat.st_size))
        if todo:
            blocks = [(file, offset) for file, size in todo for offset in range(0, max(size, 1), BLOCK)]
            with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
                hashed = dict(zip(blocks, pool.map(lambda b: _block(*b), blocks)))
            for file, size in todo:
                whole = hashlib.sha256(f"{size}\0".encode())
                for offset in range(0, max(size, 1), BLOCK):
                    whole.update(hashed[file, offset])
                self._cache[keys[file]] = whole.hexdigest()
        return {file: self._cache[keys[file]] for file in files}


def _block(file: Path, offset: int) -> bytes:
    with open(file, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(BLOCK)).digest()


def identity(name: str, digests: Digests, *, model: bool = False, only: tuple[str, ...] | None = None) -> str:
    """A local file or directory by its content digest; anything else (a hub id) by "hub:NAME". A model path that
    looks local but does not exist is refused now (`CheckpointError`, with near misses), before any output."""
    path = Path(os.path.expanduser(name))
    if path.exists():
        return digests.of(path, only)
    if model:
        from maxmin_jax.models.hf import _looks_local, resolve_checkpoint_dir

        if _looks_local(name):
            resolve_checkpoint_dir(name)  # raises, naming the path
    return f"hub:{name}"


def identify_inputs(config: dict[str, Any], digests: Digests | None = None) -> dict[str, Any]:
    """`config` (plain data of a RunConfig) with every input path replaced by its `identity`."""
    digests = digests or Digests()
    for key, only in INPUT_KEYS.items():
        section, field = key.split(".")
        node = config.get(section)
        if not isinstance(node, dict) or node.get(field) is None:
            continue
        value, kwargs = node[field], {"model": key in MODEL_KEYS, "only": only}
        node[field] = ({k: identity(v, digests, **kwargs) for k, v in value.items()} if isinstance(value, dict)
                       else identity(value, digests, **kwargs))
    return config


__all__ = ["Digests", "INPUT_KEYS", "identify_inputs", "identity"]
