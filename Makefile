# Each target is self-sufficient on a fresh clone: it creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests shard over 8 simulated CPU devices, so sharded code really shards.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu TOKENIZERS_PARALLELISM=false
DEMO_OUT ?= out/demo

.PHONY: install test demo bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of PyTorch (the reference for parity tests); a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# tests/suite.sh: pytest on two workers, one file each; a run that loses a worker (an XLA crash) runs once more.
test: $(STAMP)
	$(TEST_ENV) PY=$(PY) tests/suite.sh

demo: $(STAMP)
	$(VENV)/bin/maxmin-jax demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(PY) -m benchmarks.run --suite cpu --out benchmarks/results_cpu.json

# On a GPU machine whose python3 already holds jax[cuda] and the dependencies (no venv, nothing installed).
bench-gpu:
	PYTHON=$(PYTHON) benchmarks/bench_gpu.sh out/bench-gpu

clean:
	rm -rf $(VENV) out .pytest_cache
