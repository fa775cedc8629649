# Set-up and entry points on a fresh machine (see README.md):
#   make demo    builds everything, then runs the main job on the embedded default
#   make test    builds everything, then runs the test suite
# Both create .venv, install requirements.txt and build hippo_ext against that torch.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CUDA targets, compiled when a CUDA torch and nvcc are present (no GPU needed to compile):
# setup.py's default unless TORCH_CUDA_ARCH_LIST is set.
export MAX_JOBS ?= $(shell nproc)

SOURCES := $(shell find csrc hippo_ext -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.py') setup.py

.PHONY: all install demo test bench microbench clean

all: install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.requirements: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed: $(VENV)/.requirements $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Main job on the embedded default: `hippo demo` (a synthetic tiny Qwen2.5-VL target/draft pair
# and the project's sample video; AR, sequential SD and HIPPO, outputs checked identical).
demo: install
	$(BIN)/hippo demo

# The op microbenchmarks (GPU when present, else CPU at small shapes).
microbench: install
	$(BIN)/pytest benchmarks --benchmark-only -q -p no:cacheprovider

test: install
	$(BIN)/pytest tests -q -p no:cacheprovider

bench: install
	$(BIN)/hippo bench

clean:
	rm -rf build build-cmake *.egg-info $(VENV) hippo_ext/_C*.so
