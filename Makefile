# One obvious way to run things. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda
PYTEST_ARGS ?=
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: setup build test test-fast cpp-test cuda-check bench demo clean

# the venv, torch, the dependencies and the extension (rebuilt when csrc/ or setup.py change)
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

# incremental in-place rebuild of the extension while developing
build: setup
	$(PY) setup.py -q build_ext --inplace

test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS) tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

cpp-test: setup
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
		-DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

# the CUDA kernels, compiled for sm_80/sm_90 against the CUDA build of torch, without a GPU
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)" numpy ninja setuptools wheel pyyaml
	rm -rf build/cuda/lib
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=$${MAX_JOBS:-2} \
		$(CUDA_VENV)/bin/python setup.py -q build --build-base build/cuda --build-lib build/cuda/lib
	cd build/cuda/lib && PYTHONPATH=. ../../../$(CUDA_VENV)/bin/python ../../../tests/cuda_check.py

bench: setup
	$(PY) -m pytest -q bench --benchmark-json=bench/results/latest-cpu.json $(PYTEST_ARGS)
	$(PY) -m blip3o_fast.cli bench report

clean:
	rm -rf build blip3o_fast/_C*.so blip3o_fast/_C.build.json
