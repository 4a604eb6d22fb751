#!/usr/bin/env bash
# `make bench-gpu`: the GPU evidence in one command, on one H100/H200 in a few minutes.
#
# Runs each GPU-suite benchmark (every one `benchmarks.run --suite gpu --list` names: the training-step MFUs, 7B
# decode bandwidth, the PPO iteration, and any iteration benchmark registered later) in its own process under its
# own time limit (an out-of-memory crash or a hang loses that benchmark only, and frees the card for the next),
# then `maxmin-jax demo` end to end on the GPU. About 5 minutes on one H200, compiles included.
# Installs nothing: the repository goes on PYTHONPATH and the machine's python3 must already hold jax[cuda],
# flax, optax, orbax and the rest of pyproject's dependencies.
#
#   benchmarks/bench_gpu.sh OUT_DIR      (default out/bench-gpu)
# Writes OUT_DIR/gpu_<benchmark>.json, OUT_DIR/demo/ (the demo's report) and OUT_DIR/machine.txt; exit status 1
# if anything failed or ran out of time.
set -u
out=${1:-out/bench-gpu}
py=${PYTHON:-python3}
bench_limit=${BENCH_TIMEOUT_S:-120}
demo_limit=${DEMO_TIMEOUT_S:-120}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  "$py" -c 'import sys, jax, flax, optax; print(sys.version.split()[0], "jax", jax.__version__, "flax",
flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$out/machine.txt"

status=0
run() {  # run LIMIT_S NAME COMMAND...: time-limited, reporting the wall time and exit status of each part
  local limit=$1 name=$2 start rc
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "[bench-gpu] $name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$out/machine.txt"
  [ "$rc" -eq 0 ] || status=1
}

benches=$("$py" -m benchmarks.run --suite gpu --list --out /dev/null | cut -d: -f1)
[ -n "$benches" ] || { echo "[bench-gpu] could not list the GPU suite" | tee -a "$out/machine.txt"; exit 1; }
for bench in $benches; do
  run "$bench_limit" "$bench" "$py" -m benchmarks.run --suite gpu --only "$bench" --out "$out/gpu_$bench.json"
done
run "$demo_limit" demo "$py" -m maxmin_jax.cli demo --out "$out/demo"
exit $status
