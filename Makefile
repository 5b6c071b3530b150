# sqltune: the README's commands.
#   make demo   create .venv, install, run the embedded default end to end (tiny model on CPU)
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= qlora,buckets,serve,dev

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: anything that depends on torch would otherwise pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sqltune finetune --config configs/tiny-cpu.yaml

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check sqltune tests benchmarks

bench: install
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) models runs reports .pytest_cache
