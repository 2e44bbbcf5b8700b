# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo demo-speech test bench bench-daemon experiment clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# System packages from Debian where apt works (root): Fashion-MNIST for the demo and the
# paper protocol, Prometheus (promtool and the server) for the deploy tests. Best effort:
# without them the code falls back to scikit-learn digits and those tests skip with a reason.
APT_PKGS := $(if $(wildcard $(FMNIST)/train-images-idx3-ubyte.gz),,dataset-fashion-mnist) \
            $(if $(wildcard /usr/bin/promtool),,prometheus)
data:
	@if [ -z "$(strip $(APT_PKGS))" ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null) \
	    || echo "warning: could not install $(APT_PKGS); falling back (digits, skipped deploy checks)"; \
	else echo "warning: $(APT_PKGS) missing and apt-get unavailable; falling back"; fi

demo: setup data
	$(PY) -m daemon demo

# Speech: FSDD's WAV recordings (not packaged: point FSDD at a copy) learnt by a speech model.
FSDD ?= ../shared/data/fsdd
demo-speech: setup
	$(PY) -m daemon demo --dataset fsdd --data-dir $(FSDD)

# Two pytest workers (pytest-xdist), each test file on one worker (module fixtures such as
# the live stack start once): most integration tests wait on brokers, servers and training
# children, so two share the 2-core machine well. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: setup data
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

bench: setup data
	$(PY) -m gnp.bench --out docs/results

# Daemon benchmarks: ingest (JSON vs Arrow batches) and predict latency. The latter drives
# the server with wrk (Debian package `wrk`), installed here when apt-get works (root).
bench-daemon: setup
	@command -v wrk >/dev/null || (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null) \
	  || echo "warning: wrk missing: apt-get install -y wrk"
	OMP_NUM_THREADS=1 $(PY) benchmarks/ingest_throughput.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/predict_latency.py

clean:
	rm -rf $(VENV) .pytest_cache
