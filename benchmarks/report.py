"""The results document (JSON) and the table printed at the end of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.registry import Benchmark, Ceiling, Result

SCHEMA_VERSION = 1


def document(*, suite: str, quick: bool, command: str, environment: dict[str, Any], ceilings: dict[str, Ceiling],
             results: list[tuple[Benchmark, Result]], errors: list[dict[str, str]],
             load_average_at_end: list[float] | None) -> dict[str, Any]:
    benchmarks = [{"name": b.name, "description": b.description, "config": r.config,
                   "figures": [f.to_json() for f in r.figures], "ratios": [x.to_json() for x in r.ratios],
                   "notes": r.notes, "extra": r.extra} for b, r in results]
    hardware = dict(environment["hardware"], load_average_at_end=load_average_at_end)
    return {"schema_version": SCHEMA_VERSION, "suite": suite, "quick": quick, "command": command,
            "date": environment["date"], "git_commit": environment["git_commit"], "hardware": hardware,
            "versions": environment["versions"], "threads": environment["threads"],
            "ceilings": {name: c.to_json() for name, c in ceilings.items()}, "benchmarks": benchmarks,
            "errors": errors}


def write(doc: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, allow_nan=False, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if hasattr(value, "item"):  # numpy / jax scalars
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def table(doc: dict[str, Any]) -> str:
    """Each figure beside its ceiling, then each ratio beside its target."""
    rows = [("benchmark", "figure", "value", "unit", "ceiling", "% of ceiling")]
    for name, c in doc["ceilings"].items():
        methods = ", ".join(f"{k} {_num(v)}" for k, v in c["methods"].items())
        rows.append(("ceiling", name, _num(c["value"]), c["unit"], methods, ""))
    for b in doc["benchmarks"]:
        for f in b["figures"]:
            frac = f["fraction_of_ceiling"]
            rows.append((b["name"], f["name"], _num(f["value"]), f["unit"], _num(f["ceiling"]),
                         "-" if frac is None else f"{100 * frac:.1f}%"))
        for r in b["ratios"]:
            target = "" if r["target"] is None else (f"target >= {r['target']}: "
                                                     f"{'met' if r['meets_target'] else 'NOT met'}")
            spread = f"rounds {r['round_q1']:.2f}-{r['round_q3']:.2f}, cpu-time {r['cpu_time_value']:.2f}x"
            rows.append((b["name"], r["name"], f"{r['value']:.2f}x", spread, target, ""))
    for e in doc["errors"]:
        rows.append((e["name"], "ERROR", e["error"].splitlines()[0][:60] if e["error"] else "", "", "", ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    hw = doc["hardware"]
    device = ", ".join(hw["gpus"]) or f"{hw['cpu_model']} ({hw['cpu_count']} cores, {hw['cpus_usable']} usable)"
    header = (f"suite {doc['suite']}{' (quick)' if doc['quick'] else ''} on {device}; {doc['date']}; "
              f"load average at start {hw['load_average_at_start']}, at end {hw['load_average_at_end']}")
    return "\n".join([header, *lines])
