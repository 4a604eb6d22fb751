"""Wall-clock timing done honestly: warm-up first, wait for the device, many repeats, median and interquartile range.

Every timed callable must return only when its work is finished: wrap JAX calls with `jax_sync` (block until the
outputs are ready) and PyTorch calls with `torch_sync` (synchronise CUDA when it is in use; CPU PyTorch returns
finished tensors). Comparisons between two implementations run interleaved (A, B, A, B, ...) so that both see
the same background load, and their ratio is also reported per round. Each call's CPU time (this process, all
threads) is kept too: on a machine shared with other jobs it moves less than wall time, though a runtime that
spin-waits (OpenMP) is charged for its spinning.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call over `repeats` timed calls after `warmup` untimed ones."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    repeats: int
    warmup: int
    samples_s: tuple[float, ...]
    cpu_median_s: float  # CPU time of this process (all threads) per call: less sensitive to other processes

    @classmethod
    def from_samples(cls, samples: list[float], warmup: int, cpu_samples: list[float]) -> Timing:
        q1, q3 = quartiles(samples)
        return cls(statistics.median(samples), q1, q3, min(samples), len(samples), warmup, tuple(samples),
                   statistics.median(cpu_samples))

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "q1_s": self.q1_s, "q3_s": self.q3_s, "iqr_s": self.iqr_s,
                "min_s": self.min_s, "repeats": self.repeats, "warmup": self.warmup,
                "samples_s": list(self.samples_s), "cpu_median_s": self.cpu_median_s}


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method; both equal the value for a single sample)."""
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def jax_sync(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn`, returning only once every array it produced is computed."""
    import jax

    return lambda: jax.block_until_ready(fn())


def torch_sync(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn`, followed by a CUDA synchronisation when CUDA is in use (CPU PyTorch is synchronous)."""
    import torch

    def call():
        out = fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return out

    return call


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def measure(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> Timing:
    """Time `fn` (already synchronising) `repeats` times after `warmup` calls; GC is paused while timing."""
    return measure_interleaved({"fn": fn}, repeats=repeats, warmup=warmup)["fn"]


def measure_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several callables in rounds (each once per round, in order), so slow drifts in machine load hit all
    of them alike. Returns a Timing per name."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                samples[name].append(_timed(fn))
    finally:
        if was_enabled:
            gc.enable()
    return {name: Timing.from_samples([w for w, _ in s], warmup, [c for _, c in s]) for name, s in samples.items()}
