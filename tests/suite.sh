#!/usr/bin/env bash
# The test suite as `make test` runs it: two workers, each test file on one (a file's module fixtures compile once).
# pytest-xdist 3.8's file scheduling can deadlock after a worker dies (the dead worker's finished files come back as
# empty work units: pytest-xdist issues 1323 and 1378), and a worker dies when jaxlib 0.10's XLA:CPU compiler
# crashes, which happens rarely and not reproducibly (docs/decisions.md). So a time limit turns a deadlock into an
# exit, and a run that lost a worker, by a crash or the limit, runs once more: a test that fails fails both times.
set -uo pipefail
PY=${PY:-.venv/bin/python}
LIMIT=${SUITE_TIMEOUT_S:-1800}
TESTS=${SUITE_TESTS:-tests}
run() { timeout --kill-after=30 "$LIMIT" "$PY" -m pytest -q -n 2 --dist loadfile "$TESTS" "$@"; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && { [ "$rc" -ge 124 ] || grep -qE "replacing crashed worker|node down" "$log"; }; then
  echo "tests/suite.sh: the run lost a test worker (exit $rc, limit ${LIMIT} s); running the suite once more" >&2
  run "$@"
  rc=$?
fi
exit "$rc"
