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
                                              arwkv_ext/*.py python/arwkv/*.py)

.PHONY: bench test install lint cpp-test clean

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" setuptools wheel ninja packaging pytest hypothesis numpy ruff cmake
	touch $@

# --no-build-isolation: the kernels compile against the torch installed above, not a fresh one.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.installed

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

clean:
	rm -rf $(VENV) build dist *.egg-info arwkv_ext/_C*.so arwkv_ext/_build_info.json
