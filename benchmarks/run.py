"""Entry point: `python -m benchmarks.run --suite cpu|gpu [--only NAME,...] [--quick] --out results.json`.

Measures the suite's ceilings (at the start, and again at the end, keeping the better pass), runs its registered
benchmarks (a failing one is recorded under `errors` and the rest still run; the exit status is then 1), writes
the JSON document and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import shlex
import sys
import time
import traceback

# Modules whose import registers benchmarks or ceilings; a new benchmark module is added here.
BENCHMARK_MODULES = ("benchmarks.ceilings", "benchmarks.lm", "benchmarks.rl", "benchmarks.algorithms", "benchmarks.em",
                     "benchmarks.gpu")
SUITE_CEILINGS = {"cpu": ("matmul_f32", "read_bandwidth"), "gpu": ("matmul_bf16", "copy_bandwidth")}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITE_CEILINGS), required=True)
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: the whole suite)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: exercises every code path in seconds")
    p.add_argument("--out", required=True, help="where to write the JSON results")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 7; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (compilation happens here)")
    p.add_argument("--list", action="store_true", help="list the suite's benchmarks and exit")
    return p.parse_args(argv)


def _measure_ceilings(ctx, errors: list, when: str) -> None:
    for name in SUITE_CEILINGS[ctx.suite]:
        print(f"[benchmarks] ceiling {name} ({when}) ...", file=sys.stderr, flush=True)
        try:
            ctx.measure_ceiling(name)
        except Exception:  # noqa: BLE001 - recorded in the document, and the run fails at the end
            errors.append({"name": f"ceiling:{name}:{when}", "error": traceback.format_exc()})


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.suite == "gpu":
        # The 7B shapes need most of the card; must be set before JAX starts its backend.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    for module in BENCHMARK_MODULES:
        importlib.import_module(module)
    from benchmarks import env, report
    from benchmarks.registry import BENCHMARKS, Context

    suite = {name: b for name, b in BENCHMARKS.items() if args.suite in b.suites}
    if args.list:
        for name, b in suite.items():
            print(f"{name}: {b.description}")
        return 0
    wanted = [n for n in args.only.split(",") if n] or list(suite)
    unknown = [n for n in wanted if n not in suite]
    if unknown:
        raise SystemExit(f"unknown benchmarks for suite {args.suite}: {unknown}; available: {sorted(suite)}")
    if args.suite == "gpu" and not args.quick:
        import jax

        if jax.default_backend() != "gpu":
            raise SystemExit("the gpu suite's full shapes need a GPU (use --quick to exercise it on CPU)")

    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "benchmarks.run", *(
        sys.argv[1:] if argv is None else argv)])
    environment = env.describe()
    ctx = Context(suite=args.suite, quick=args.quick, repeats=args.repeats or (2 if args.quick else 7),
                  warmup=args.warmup)
    results, errors = [], []
    _measure_ceilings(ctx, errors, "start")
    for name in wanted:
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = suite[name].fn(ctx)
            result.extra["benchmark_wall_s"] = time.perf_counter() - start
            results.append((suite[name], result))
        except Exception:  # noqa: BLE001 - one failing benchmark (say, out of memory) must not lose the others
            errors.append({"name": name, "error": traceback.format_exc()})
            print(errors[-1]["error"], file=sys.stderr)
        gc.collect()
    _measure_ceilings(ctx, errors, "end")  # the load may have changed: keep the better pass
    values = ctx.ceiling_values()
    resolved = []
    for bench, result in results:
        try:
            resolved.append((bench, result.resolve(values)))
        except KeyError as missing:
            errors.append({"name": bench.name, "error": f"needs ceiling {missing}, not measured in this run"})
    doc = report.document(suite=args.suite, quick=args.quick, command=command, environment=environment,
                          ceilings=ctx.ceilings, results=resolved, errors=errors,
                          load_average_at_end=env.load_average())
    path = report.write(doc, args.out)
    print(report.table(doc))
    print(f"wrote {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
