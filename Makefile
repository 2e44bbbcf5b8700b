# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test bench experiment clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian where apt works; the code falls back to scikit-learn digits otherwise.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "warning: could not install dataset-fashion-mnist; falling back to scikit-learn digits"; \
	else echo "warning: Fashion-MNIST not found at $(FMNIST); falling back to scikit-learn digits"; fi

demo: setup data
	$(PY) -m daemon demo

test: setup data
	$(PY) -m pytest -q

bench: setup data
	$(PY) -m gnp.bench --out docs/results

clean:
	rm -rf $(VENV) .pytest_cache
