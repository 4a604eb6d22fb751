"""Full training-state checkpoints with Orbax: keep the last N, save asynchronously, resume exactly, refuse mismatches.

A checkpoint step holds two Orbax items:

- `state`: every array leaf of the training state (parameters, optimiser state, step, RNG key, data position,
  extra pytrees such as EM state), stored as a nested dict keyed by the leaf's path in the state pytree;
- `meta` (JSON): the run's *fingerprint* (model config, number of groups, anything that must match to resume)
  and a manifest `{path: {"shape", "dtype", "key_impl"}}` of the saved leaves.

Restoring is done *into a template*: a state of the same structure, either concrete (e.g. the freshly initialised
state, possibly sharded) or abstract (`jax.ShapeDtypeStruct` leaves with shardings). Each array is read straight
into the template leaf's sharding, so sharded states restore sharded and nothing is materialised on one device.
Before reading any array, the fingerprint and the manifest are compared with the current run and the template;
any difference raises `CheckpointMismatchError` naming every mismatched field and path.

Typed PRNG keys are stored as `jax.random.key_data` and re-wrapped with the implementation recorded in the
manifest; Python scalars in the template (a data position, a round counter) come back as Python scalars.

A step whose files cannot be read (truncated, corrupt, missing) does not block a resume: `restore_latest` reports
it, sets it aside under `<directory>/unrestorable/` (nothing is deleted) and restores the newest step that reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxmin_jax.errors import CheckpointError

FORMAT_VERSION = 1
UNRESTORABLE_DIR = "unrestorable"  # where steps that cannot be read are set aside, inside the checkpoint directory

logger = logging.getLogger(__name__)


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was written by a different run configuration or for a differently shaped state.

    `mismatches` holds one line per differing fingerprint field or state leaf (the message shows the first 30)."""

    def __init__(self, message: str, mismatches: list[str] | None = None, *, path: str | None = None):
        super().__init__(message, path=path)
        self.mismatches = list(mismatches or [])


class UnrestorableCheckpointError(CheckpointError):
    """Checkpoint files that cannot be read (truncated, corrupt, missing). `failures` maps each step tried to
    its error."""

    def __init__(self, message: str, failures: Mapping[int, str], *, path: str | None = None):
        super().__init__(message, path=path)
        self.failures = dict(failures)


class TrainState(NamedTuple):
    """A convenient full training state; any pytree with the same kinds of leaves checkpoints just as well."""

    step: Any
    """Number of optimiser steps taken (int or int array)."""
    params: Any
    """Model parameters, e.g. `nnx.state(model, nnx.Param)`."""
    opt_state: Any
    """Optimiser state (optax state, or `nnx.state(optimizer)`)."""
    rng: Any
    """Root PRNG key (typed or raw); per-step keys are `jax.random.fold_in(rng, step)`."""
    data_position: Any = 0
    """Where the data stream resumes (ints: epoch, index into a permutation, ...)."""
    extra: Any = None
    """Anything else to resume exactly, e.g. EM state (mixing weights, assignments, round)."""


# -- fingerprints -------------------------------------------------------------------------------------------------
def to_json(obj: Any) -> Any:
    """A JSON-able normal form: dataclasses (model configs) become dicts (with `model_type` when the class has
    one), tuples become lists, numpy/jax scalars become Python scalars. Raises TypeError on anything else."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if hasattr(type(obj), "model_type"):
            out["model_type"] = type(obj).model_type
        return out
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)) and np.ndim(obj) == 0:
        return np.asarray(obj).item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"fingerprint value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def _flatten_json(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten_json(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


def fingerprint_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints, one line per dotted field."""
    a, b = _flatten_json(to_json(saved)), _flatten_json(to_json(current))
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            lines.append(f"{key}: checkpoint has {a[key]!r}, current run does not set it")
        elif key not in a:
            lines.append(f"{key}: checkpoint does not set it, current run has {b[key]!r}")
        elif a[key] != b[key]:
            lines.append(f"{key}: checkpoint {a[key]!r} != current {b[key]!r}")
    return lines


# -- state <-> flat leaves ------------------------------------------------------------------------------------------
def _key_str(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _is_prng_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat_leaves(state: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    out, seen = [], set()
    for path, leaf in flat:
        parts = tuple(_key_str(e) for e in path) or ("_",)
        name = "/".join(parts)
        if name in seen or any("/" in p for p in parts):
            raise ValueError(f"state path {jax.tree_util.keystr(path)} does not map to a unique checkpoint name "
                             f"({name!r})")
        seen.add(name)
        out.append((name, leaf))
    return out


def _leaf_info(leaf) -> dict[str, Any]:
    """Manifest entry of one template/state leaf (shape and dtype as stored)."""
    if _is_prng_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        impl = str(jax.random.key_impl(leaf)) if isinstance(leaf, jax.Array) else _abstract_key_impl(leaf)
        return {"shape": list(data.shape), "dtype": str(data.dtype), "key_impl": impl}
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
        return {"shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype))}
    if isinstance(leaf, (bool, int, float)):
        return {"shape": [], "dtype": str(np.asarray(leaf).dtype), "python": type(leaf).__name__}
    raise TypeError(f"cannot checkpoint a leaf of type {type(leaf).__name__}: {leaf!r}")


def _abstract_key_impl(leaf) -> str:
    impl = getattr(leaf.dtype, "_impl", None)  # jax exposes no public accessor for an abstract key's impl
    return getattr(impl, "name", None) or str(impl)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, last = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _get(nested: Mapping[str, Any], name: str):
    node = nested
    for p in name.split("/"):
        node = node[p]
    return node


def _replicated() -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("_all",)), P())


def _to_saveable(leaf):
    if _is_prng_key(leaf):
        return jax.random.key_data(leaf)
    if isinstance(leaf, (bool, int, float, np.generic)):
        return np.asarray(leaf)
    return leaf


def _uncommitted(leaf) -> bool:
    """A concrete jax array not committed to a device (made without device_put/sharding): restored likewise."""
    return isinstance(leaf, jax.Array) and not leaf.committed


def _abstract(leaf):
    """What Orbax should restore a template leaf as: its shape/dtype in its sharding; numpy for host leaves and
    for uncommitted arrays (turned back into uncommitted jax arrays afterwards)."""
    if _is_prng_key(leaf):
        leaf = jax.random.key_data(leaf) if isinstance(leaf, jax.Array) else jax.eval_shape(jax.random.key_data, leaf)
    if _uncommitted(leaf):
        return np.zeros(leaf.shape, leaf.dtype)
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None) or _replicated()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return np.zeros(np.shape(leaf), np.asarray(leaf).dtype)


def _from_restored(template_leaf, value, info):
    if _is_prng_key(template_leaf):
        if isinstance(value, np.ndarray):
            value = jax.numpy.asarray(value)
        return jax.random.wrap_key_data(value, impl=info["key_impl"])
    if _uncommitted(template_leaf):
        return jax.numpy.asarray(value)
    if isinstance(template_leaf, (bool, int, float)):
        return type(template_leaf)(np.asarray(value).item())
    if isinstance(template_leaf, (np.ndarray, np.generic)):
        return np.asarray(value, dtype=template_leaf.dtype).reshape(np.shape(template_leaf))
    return value


def with_param_shardings(tree: Any, params: Any) -> Any:
    """`tree` as `jax.ShapeDtypeStruct` leaves, where each leaf whose path ends with a parameter's path (and has
    its shape) takes that parameter's sharding: optimiser moments, EMA copies and the like. For building abstract
    restore templates, e.g. `with_param_shardings(jax.eval_shape(tx.init, abstract_params), abstract_params)`,
    since `eval_shape` does not carry shardings through an optimiser's `init`. Other leaves keep their own
    sharding if they have one (else they restore replicated)."""
    by_path = {}
    for path, leaf in _flat_leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            by_path[path] = (tuple(leaf.shape), sharding)

    def convert(path, leaf):
        name = "/".join(_key_str(e) for e in path)
        sharding = getattr(leaf, "sharding", None)
        for param_path, (shape, param_sharding) in by_path.items():
            if (name == param_path or name.endswith("/" + param_path)) and tuple(leaf.shape) == shape:
                sharding = param_sharding
                break
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(convert, tree)


def manifest(state: Any) -> dict[str, dict[str, Any]]:
    """`{path: {"shape", "dtype", ...}}` for every leaf of a state or template."""
    return {name: _leaf_info(leaf) for name, leaf in _flat_leaves(state)}


def manifest_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    lines = [f"{k}: in the checkpoint but not in the template" for k in sorted(set(saved) - set(current))]
    lines += [f"{k}: in the template but not in the checkpoint" for k in sorted(set(current) - set(saved))]
    for k in sorted(set(saved) & set(current)):
        s, c = saved[k], current[k]
        if (s["shape"], s["dtype"]) != (c["shape"], c["dtype"]):
            lines.append(f"{k}: checkpoint {s['dtype']}{s['shape']} != template {c['dtype']}{c['shape']}")
        elif s.get("key_impl") != c.get("key_impl"):
            lines.append(f"{k}: checkpoint key impl {s.get('key_impl')} != template {c.get('key_impl')}")
    return lines


def _mismatch(kind: str, directory, step: int, lines: list[str], limit: int = 30) -> CheckpointMismatchError:
    shown = "\n  ".join(lines[:limit]) + (f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else "")
    return CheckpointMismatchError(f"refusing to restore checkpoint {os.fspath(directory)} step {step}: "
                                   f"{kind} differ{'s' if kind == 'fingerprint' else ''}:\n  {shown}", lines,
                                   path=os.fspath(directory))


def _read_error(err: BaseException, limit: int = 300) -> str:
    """One line for an Orbax/TensorStore read failure: their messages nest the cause at the end ("DATA_LOSS:
    Error opening ...: Error reading ...: <what is wrong>") and append whole JSON specs."""
    text = " ".join(str(err).split()).split(" [tensorstore_spec")[0]
    text = text if len(text) <= limit else f"{text[:80]} ... {text[-(limit - 85):]}"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _is_closed_loop_noise(unraisable) -> bool:
    """A TensorStore read finishing after Orbax closed the event loop of a failed restore: it tries to wake the
    closed loop and prints "RuntimeError: Event loop is closed". Harmless; the restore's own error is raised."""
    if not (type(unraisable.exc_value) is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
        return False
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def _silence_closed_loop_noise() -> None:
    """Drops (only) those late wake-ups from `sys.unraisablehook`; installed once a restore has failed, as reads
    of that restore can still finish at any later time. Every other unraisable exception is passed on."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_noise", False):
        return

    def hook(unraisable):
        if not _is_closed_loop_noise(unraisable):
            previous(unraisable)

    hook._drops_closed_loop_noise = True
    sys.unraisablehook = hook


def _agree_failed(failed: bool) -> bool:
    """Whether any process failed: a step is usable only if every process could read its part of it."""
    if jax.process_count() == 1:
        return failed
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([failed]))))


# -- the manager ----------------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves full training states every `save_interval_steps`, keeps the last `max_to_keep`, resumes exactly.

    ```
    ckpt = CheckpointManager(out / "ckpt", fingerprint={"model": cfg, "num_groups": K}, max_to_keep=3)
    state = ckpt.restore_latest(state) or state      # resume if a checkpoint exists
    for step in range(int(state.step), num_steps):
        state, metrics = train_step(state, batch, jax.random.fold_in(root, step))
        ckpt.save(step + 1, state)                    # async: returns once arrays are copied off the device
    ckpt.wait_until_finished()
    ```
    """

    def __init__(self, directory: str | os.PathLike, *, fingerprint: Mapping[str, Any] | None = None,
                 max_to_keep: int | None = 3, save_interval_steps: int = 1, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.fingerprint = to_json(dict(fingerprint or {}))
        json.dumps(self.fingerprint)  # fail now, not at the first save
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
        self.unrestorable: dict[int, str] = {}
        """Steps `restore_latest` set aside in this session: step -> why it could not be read."""

    # Saving
    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Save `state` as `step` if the interval says so (or `force`); returns whether a save was started."""
        flat = _flat_leaves(state)
        meta = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint,
                "manifest": {name: _leaf_info(leaf) for name, leaf in flat}}
        arrays = _nest({name: _to_saveable(leaf) for name, leaf in flat})
        return self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                                     meta=ocp.args.JsonSave(meta)), force=force)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Inspecting
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata (format, fingerprint, manifest) of a step (default: the latest)."""
        step = self._resolve(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    # Restoring
    def restore_latest(self, template: Any) -> Any | None:
        """The newest restorable checkpoint, restored into `template`'s structure, shapes and shardings; None if
        there is no checkpoint.

        A step whose files cannot be read is reported (a warning naming the step and the error) and the next older
        step is tried. When an older step restores, the newer unreadable ones are moved into
        `<directory>/unrestorable/` (kept for inspection, never deleted), so the resumed run saves those step
        numbers afresh and `max_to_keep` counts only good steps; `self.unrestorable` records them. A
        `CheckpointMismatchError` (another run's checkpoint) is raised at once: it is not damage. If no step
        restores, `UnrestorableCheckpointError` lists every step's error and nothing is moved.
        """
        failures: dict[int, str] = {}
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, template)
            except UnrestorableCheckpointError as err:
                failures[step] = err.failures[step]
                logger.warning("checkpoint %s step %d cannot be restored (%s); trying the previous step",
                               self.directory, step, failures[step])
                continue
            if failures:
                self._set_aside(failures)
                logger.warning("resumed from checkpoint %s step %d; unrestorable steps %s moved to %s",
                               self.directory, step, sorted(failures), os.path.join(self.directory, UNRESTORABLE_DIR))
            return restored
        if failures:
            listed = "\n  ".join(f"step {s}: {e}" for s, e in failures.items())
            raise UnrestorableCheckpointError(
                f"no checkpoint in {self.directory} can be restored:\n  {listed}\n(move the directory aside to "
                "start afresh, or restore it from a backup)", failures, path=self.directory)
        return None

    def restore(self, step: int, template: Any) -> Any:
        """Restore `step` into `template` (concrete or abstract). Refuses, with `CheckpointMismatchError`, a
        checkpoint whose fingerprint differs from this manager's or whose leaves differ from the template's;
        raises `UnrestorableCheckpointError` if the step's files cannot be read."""
        step = self._resolve(step)
        flat = _flat_leaves(template)  # template problems are the caller's: raised before any file is read
        current = {name: _leaf_info(leaf) for name, leaf in flat}
        abstract = _nest({name: _abstract(leaf) for name, leaf in flat})
        meta = self._read(step, lambda: self.read_meta(step))
        if meta.get("format") != FORMAT_VERSION:
            raise _mismatch("format", self.directory, step,
                            [f"checkpoint format {meta.get('format')!r} != supported {FORMAT_VERSION}"])
        lines = fingerprint_diff(meta["fingerprint"], self.fingerprint)
        if lines:
            raise _mismatch("fingerprint", self.directory, step, lines)
        lines = manifest_diff(meta["manifest"], current)
        if lines:
            raise _mismatch("state structure/shapes", self.directory, step, lines)
        restored = self._read(step, lambda: self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"])
        leaves = [_from_restored(leaf, _get(restored, name), current[name]) for name, leaf in flat]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)

    def _read(self, step: int, read):
        """`read()`, with any failure to read the step's files (Orbax and TensorStore raise ValueError, OSError,
        JSON errors, ...) turned into `UnrestorableCheckpointError`; agreed across processes."""
        error = None
        try:
            result = read()
        except Exception as err:  # noqa: BLE001 - everything below this call is file reading
            _silence_closed_loop_noise()
            error = err
        if _agree_failed(error is not None):
            reason = _read_error(error) if error is not None else "another process could not read its part"
            message = f"checkpoint {self.directory} step {step} cannot be read: {reason}"
            path = os.path.join(self.directory, str(step))
            raise UnrestorableCheckpointError(message, {step: reason}, path=path) from error
        return result

    def _set_aside(self, steps) -> None:
        """Moves unreadable steps into `<directory>/unrestorable/<step>` (a fresh name if that exists)."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            aside = os.path.join(self.directory, UNRESTORABLE_DIR)
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target, n = os.path.join(aside, str(step)), 1
                while os.path.exists(target):
                    target, n = os.path.join(aside, f"{step}.{n}"), n + 1
                shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("maxmin_jax.checkpoint.set_aside")
        self._manager.reload()
        self.unrestorable.update({int(s): e for s, e in steps.items()})

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} "
                                    f"(have {self.all_steps()})")
        return int(step)


__all__ = ["CheckpointManager", "CheckpointMismatchError", "TrainState", "UnrestorableCheckpointError",
           "fingerprint_diff", "manifest", "manifest_diff", "to_json", "with_param_shardings"]
