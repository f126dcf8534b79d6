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

.PHONY: setup build test test-fast lint cpp-test simt-build simt-test clang-format-check cuda-check gpu-check-dry \
	bench demo overfit clean

# the main job on the embedded default: synthetic shards -> train the tiny DiT -> evaluate
DEMO_DIR ?= demo
DEMO_ARGS ?=
EVAL_ARGS ?=

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

# the linters: ruff on the whole tree (rules in pyproject.toml), clang-format on the C++ (.clang-format)
lint: setup clang-format-check
	$(PY) -m ruff check .

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

cpp-test: setup
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
		-DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure

# the CUDA kernels run on the CPU: the SIMT emulator (csrc/simt/, docs/simt.md) under AddressSanitizer,
# the op tests against it (the emulated kernels replace the CPU ones in that pytest process)
# libstdc++ is preloaded with libasan: the sanitizer must find __cxa_throw when it starts (Python has no C++)
# --capture=sys: an AddressSanitizer report, written to fd 2 as the process aborts, reaches the log (with fd
# capture it went down with pytest's capture file and a caught overrun printed nothing)
SIMT_CXX ?= g++
SIMT_TESTS ?= tests/test_ops_adaln.py tests/test_ops_flow_loss.py tests/test_ops_qk_norm_rope.py \
	tests/test_ops_rope3d.py tests/test_ops_swiglu.py tests/simt/check_emulator.py tests/simt/check_kernels.py
simt-build: setup
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
		-DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON
	cmake --build build/cmake --target blip3o_fast_simt -j 2

simt-test: simt-build
	LD_PRELOAD="$$($(SIMT_CXX) -print-file-name=libasan.so) $$($(SIMT_CXX) -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0 PYTHONPATH=tests/simt \
		$(PY) -m pytest -q -p simt_plugin -n 2 -p no:cacheprovider --capture=sys $(PYTEST_ARGS) $(SIMT_TESTS)

# the C++ half of the format check: csrc/ (the SIMT emulator included) and cpp_tests/ as .clang-format says
CLANG_FORMAT ?= $(VENV)/bin/clang-format
CXX_SOURCES = $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/simt/*.h csrc/simt/*.cpp cpp_tests/*.cpp)
clang-format-check: setup
	$(CLANG_FORMAT) --dry-run --Werror $(CXX_SOURCES)

# the CUDA kernels, compiled for sm_80/sm_90 (+PTX for newer GPUs) against the CUDA build of torch, without a GPU
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH_SPEC)" numpy ninja setuptools wheel pyyaml
	rm -rf build/cuda/lib
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" MAX_JOBS=$${MAX_JOBS:-2} \
		$(CUDA_VENV)/bin/python setup.py -q build --build-base build/cuda --build-lib build/cuda/lib
	cd build/cuda/lib && PYTHONPATH=. ../../../$(CUDA_VENV)/bin/python ../../../tests/cuda_check.py

# bench/gpu_check.sh rehearsed here (a few minutes): the offline install of .whl/ into a temp target, each
# stage's command with its CUDA parts skipped or on the CPU, every pytest selection of the GPU run collecting
# more than zero tests, and the table of stages and limits. A script bug found here does not cost the GPU slot.
.whl/.complete: bench/gpu_wheels.sh
	bash bench/gpu_wheels.sh

gpu-check-dry: setup .whl/.complete
	DRY=1 PY=$(PY) OUT=build/gpu-check-dry bash bench/gpu_check.sh

# the CPU benchmark suite; each run adds a JSON (device, versions, commit inside) to bench/results/
ifndef BENCH_JSON  # expanded once: a recursive `date` would name a different file on each use
BENCH_JSON := bench/results/$(shell date -u +%Y%m%d-%H%M%S)-$(shell $(PY) -c "import torch;print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null).json
endif
bench: setup
	$(PY) -m pytest -q -p no:cacheprovider -o python_files='bench_*.py' bench --benchmark-json=$(BENCH_JSON) \
		--benchmark-group-by=group --benchmark-columns=median,iqr --benchmark-sort=name $(PYTEST_ARGS)
	$(PY) -m blip3o_fast.cli bench report --file $(BENCH_JSON)

demo: setup
	test -f $(DEMO_DIR)/data/manifest.json || $(PY) -m blip3o_fast.cli data synth --out $(DEMO_DIR)/data
	$(PY) -m blip3o_fast.cli train --config demo --out $(DEMO_DIR)/run data.path=$(DEMO_DIR)/data $(DEMO_ARGS)
	$(PY) -m blip3o_fast.cli eval --run $(DEMO_DIR)/run $(EVAL_ARGS)
	@echo "loss curve: $(DEMO_DIR)/run/loss.png   metrics: $(DEMO_DIR)/run/metrics.jsonl"

# the overfit check (issue 19): can the model memorise OVERFIT_SAMPLES training samples? The first of the demo's
# train split, trained with batch = those samples and evaluated on them (patch cosine >= 0.99 expected). The run
# folder is always trained afresh: a stale one would report another model's memory.
OVERFIT_SAMPLES ?= 16
OVERFIT_ARGS ?=
overfit: setup
	test -f $(DEMO_DIR)/data/manifest.json || $(PY) -m blip3o_fast.cli data synth --out $(DEMO_DIR)/data
	$(PY) -m blip3o_fast.cli data subset $(DEMO_DIR)/data --out $(DEMO_DIR)/overfit --samples $(OVERFIT_SAMPLES) \
		--overwrite --quiet
	rm -rf $(DEMO_DIR)/overfit-run
	$(PY) -m blip3o_fast.cli train --config overfit --out $(DEMO_DIR)/overfit-run data.path=$(DEMO_DIR)/overfit \
		data.batch_size=$(OVERFIT_SAMPLES) train.eval_samples=$(OVERFIT_SAMPLES) $(OVERFIT_ARGS)
	$(PY) -m blip3o_fast.cli eval --run $(DEMO_DIR)/overfit-run --split train $(EVAL_ARGS)

clean:
	rm -rf build blip3o_fast/_C*.so blip3o_fast/_C.build.json
