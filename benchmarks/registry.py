"""Where benchmarks and ceilings register, and what they return.

A benchmark is a function `(ctx: Context) -> Result`, registered for one or more suites:

    from benchmarks.registry import Figure, Result, register

    @register("reward_estep", suites=("cpu",), description="E-step, K heads vs 1 head")
    def reward_estep(ctx):
        ...
        flops = ...
        return Result(config={...}, figures=[
            Figure("GFLOP/s", flops / t.median_s / 1e9, "GFLOP/s", ceiling=lambda c: c["matmul_f32"],
                   ceiling_source="matmul_f32", timing=t)])

and its module is named in `benchmarks.run.BENCHMARK_MODULES` (importing it registers it).

Ceilings (matmul peak, memory bandwidth) are measured at the start of a run and again at its end, and the higher
of the two is kept: on a machine shared with other jobs the load can change during a run. So anything that
depends on a ceiling is given as a function of the final ceiling values (`{name: value}`), evaluated when the run
is over: a Figure's `ceiling`, and any callable in `Result.extra`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from benchmarks.timing import Timing, quartiles

CeilingFn = Callable[[Mapping[str, float]], float]


@dataclasses.dataclass(frozen=True)
class Figure:
    """One measured quantity, optionally beside the ceiling it can at best reach (same unit)."""

    name: str
    value: float
    unit: str
    ceiling: float | CeilingFn | None = None  # a number, or a function of the run's final ceiling values
    ceiling_source: str | None = None  # which ceiling, and how it was turned into this unit
    timing: Timing | None = None

    def resolve(self, ceilings: Mapping[str, float]) -> Figure:
        if callable(self.ceiling):
            return dataclasses.replace(self, ceiling=float(self.ceiling(ceilings)))
        return self

    def to_json(self) -> dict[str, Any]:
        if callable(self.ceiling):
            raise ValueError(f"figure {self.name!r}: ceiling not resolved")
        return {"name": self.name, "value": self.value, "unit": self.unit, "ceiling": self.ceiling,
                "ceiling_source": self.ceiling_source,
                "fraction_of_ceiling": self.value / self.ceiling if self.ceiling else None,
                "timing": self.timing.to_json() if self.timing else None}


@dataclasses.dataclass(frozen=True)
class Ratio:
    """`ours / reference` of a rate (above 1: ours is faster), with the spread of the per-round ratios."""

    name: str
    value: float
    round_ratios: tuple[float, ...]
    target: float | None = None
    cpu_time_value: float | None = None  # the same ratio from CPU time per call (see timing.py)

    @classmethod
    def of_rates(cls, name: str, ours: Timing, reference: Timing, *, target: float | None = None) -> Ratio:
        """Speed ratio from two interleaved timings of the same work: reference time / our time."""
        rounds = tuple(b / a for a, b in zip(ours.samples_s, reference.samples_s, strict=True))
        return cls(name, reference.median_s / ours.median_s, rounds, target,
                   reference.cpu_median_s / ours.cpu_median_s)

    def to_json(self) -> dict[str, Any]:
        q1, q3 = quartiles(list(self.round_ratios))
        return {"name": self.name, "value": self.value, "round_q1": q1, "round_q3": q3,
                "round_ratios": list(self.round_ratios), "cpu_time_value": self.cpu_time_value,
                "target": self.target, "meets_target": None if self.target is None else bool(self.value >= self.target)}


@dataclasses.dataclass
class Result:
    """What a benchmark returns: the shapes it ran, its figures, ratios against references, and notes."""

    config: dict[str, Any]
    figures: list[Figure]
    ratios: list[Ratio] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # secondary numbers; callables take ceilings

    def resolve(self, ceilings: Mapping[str, float]) -> Result:
        """Evaluate everything that depends on the run's final ceiling values."""
        extra = {k: float(v(ceilings)) if callable(v) else v for k, v in self.extra.items()}
        return dataclasses.replace(self, figures=[f.resolve(ceilings) for f in self.figures], extra=extra)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    suites: tuple[str, ...]
    description: str
    fn: Callable[[Context], Result]


@dataclasses.dataclass(frozen=True)
class Ceiling:
    """A measured hardware limit: `value` is the best of `methods` (ways of measuring the same limit), each the
    best over the run's passes (`pass_values`: the value each pass measured)."""

    name: str
    value: float
    unit: str
    methods: dict[str, float]
    timings: dict[str, Timing]
    description: str
    pass_values: tuple[float, ...] = ()

    @classmethod
    def of_methods(cls, name: str, unit: str, methods: dict[str, float], timings: dict[str, Timing],
                   description: str) -> Ceiling:
        best = max(methods.values())
        return cls(name, best, unit, methods, timings, description, (best,))

    def merge(self, other: Ceiling) -> Ceiling:
        """Per method, the better of two passes (the timing kept is the better pass's)."""
        methods, timings = dict(self.methods), dict(self.timings)
        for k, v in other.methods.items():
            if v > methods.get(k, float("-inf")):
                methods[k], timings[k] = v, other.timings[k]
        return Ceiling(self.name, max(methods.values()), self.unit, methods, timings, self.description,
                       self.pass_values + other.pass_values)

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "methods": self.methods, "description": self.description,
                "pass_values": list(self.pass_values),
                "timings": {k: t.to_json() for k, t in self.timings.items()}}


BENCHMARKS: dict[str, Benchmark] = {}
CEILINGS: dict[str, Callable[[Context], Ceiling]] = {}


def register(name: str, *, suites: tuple[str, ...], description: str):
    """Decorator adding a benchmark to the registry under a unique name."""
    def wrap(fn: Callable[[Context], Result]) -> Callable[[Context], Result]:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} registered twice")
        BENCHMARKS[name] = Benchmark(name, tuple(suites), description, fn)
        return fn

    return wrap


def register_ceiling(name: str):
    def wrap(fn: Callable[[Context], Ceiling]) -> Callable[[Context], Ceiling]:
        if name in CEILINGS:
            raise ValueError(f"ceiling {name!r} registered twice")
        CEILINGS[name] = fn
        return fn

    return wrap


@dataclasses.dataclass
class Context:
    """What every benchmark receives: the suite, quick mode (tiny shapes), repeat counts; and the ceilings."""

    suite: str
    quick: bool
    repeats: int
    warmup: int = 1
    ceilings: dict[str, Ceiling] = dataclasses.field(default_factory=dict)

    def repeats_at_least(self, minimum: int) -> int:
        """`repeats`, raised to `minimum` for short calls in full runs (quick runs keep what they were given)."""
        return self.repeats if self.quick else max(self.repeats, minimum)

    def measure_ceiling(self, name: str) -> Ceiling:
        """Measure a ceiling (again), merging with earlier passes."""
        if name not in CEILINGS:
            raise KeyError(f"unknown ceiling {name!r}; registered: {sorted(CEILINGS)}")
        new = CEILINGS[name](self)
        self.ceilings[name] = self.ceilings[name].merge(new) if name in self.ceilings else new
        return self.ceilings[name]

    def ceiling_values(self) -> dict[str, float]:
        return {name: c.value for name, c in self.ceilings.items()}
