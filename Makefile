SHELL := /bin/bash
# The two commands of the README, each doing its own set-up in .venv:
#   make bench   benchmark the WKV kernels against the reference recurrence (the main job for now)
#   make test    the whole test suite: C++ kernel test, Python tests, lint
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch (on this project's machines it lies on local disk). Override to build
# against another, e.g. `make test TORCH=torch==2.14.1`.
TORCH  ?= torch==2.13.0
BENCH_ARGS ?=   # e.g. BENCH_ARGS="--json results.json --ops wkv7"
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h \
                                              csrc/gpu/* arwkv_ext/*.py python/arwkv/*.py \
                                              python/arwkv/demo_assets/* python/arwkv/demo_assets/teacher/*)
# GPU compile checks (no GPU needed): a CUDA torch in its own venv, clang-19 for gfx942.
CUDA_VENV  ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_HOME  ?= /usr/local/cuda
RESULTS    := benchmarks/results

DEMO_OUT ?= arwkv-demo

.PHONY: demo bench test install lint cpp-test clean check-cuda check-hip

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel ninja packaging pytest hypothesis numpy ruff cmake \
	  "transformers==5.24.0" safetensors datasets tqdm pyyaml matplotlib tensorboard lm_eval accelerate
	touch $@

# --no-build-isolation: the kernels compile against the torch installed above, not a fresh one.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

# main job: distils the shipped Qwen2 teacher into an RWKV-7 student on this CPU and reports
demo: install
	$(VENV)/bin/arwkv demo --out $(DEMO_OUT) $(DEMO_ARGS)

bench: install
	$(PY) benchmarks/bench_wkv.py $(BENCH_ARGS)

cpp-test: $(VENV)/.deps
	$(VENV)/bin/cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
	$(VENV)/bin/cmake --build build/cmake -j2
	$(VENV)/bin/ctest --test-dir build/cmake --output-on-failure

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

test: install cpp-test lint
	$(VENV)/bin/pytest -q tests

# Builds the whole extension with its CUDA kernels for sm_80 and sm_90 (PTX for sm_90) the way
# `pip install` does on a CUDA torch, checks that it imports, and tabulates ptxas registers and
# spills per kernel into benchmarks/results/check-cuda.txt (spills are reported, not fatal: with
# nvcc 13.0 a few backward rows kernels spill 4-28 bytes).
$(CUDA_VENV)/.deps:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q --upgrade pip
	$(CUDA_VENV)/bin/pip install -q "$(CUDA_TORCH)" setuptools wheel ninja packaging
	touch $@

check-cuda: $(CUDA_VENV)/.deps
	mkdir -p build
	set -o pipefail; CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH ARWKV_BUILD_TARGET=cuda \
	  TORCH_CUDA_ARCH_LIST="8.0;9.0" ARWKV_PTXAS_VERBOSE=1 \
	  $(CUDA_VENV)/bin/pip install -v --no-build-isolation --no-deps . > build/check-cuda.log 2>&1 \
	  || (tail -40 build/check-cuda.log; exit 1)
	cd build && ../$(CUDA_VENV)/bin/python -c "import arwkv_ext; print('imports:', arwkv_ext.build_info)"
	$(CUDA_VENV)/bin/python tools/ptxas_table.py build/check-cuda.log --out $(RESULTS)/check-cuda.txt

# Compiles every GPU kernel device-side for gfx942 with clang-19 and the ROCm device libraries,
# and tabulates VGPRs, SGPRs, AGPRs, LDS, scratch, spills and occupancy per kernel into
# benchmarks/results/check-hip.txt (fails on spills or scratch, or a missed occupancy goal).
check-hip:
	tools/check_hip.sh $(RESULTS)/check-hip.txt

clean:
	rm -rf $(VENV) $(CUDA_VENV) build dist *.egg-info arwkv_ext/_C*.so arwkv_ext/_build_info.json
