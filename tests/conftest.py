import os

import pytest
from hypothesis import settings

from fixtures import CPU_ALGORITHMS, GPU_ALGORITHMS

# Reproducible and bounded in CI; `HYPOTHESIS_PROFILE=dev` explores more.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# A test that takes this fixture runs through both CPU algorithms (ARWKV_CPU_ALGORITHM). Without
# it, a test runs the default (chunked; step for segments of <= 4 steps).
@pytest.fixture(params=CPU_ALGORITHMS)
def cpu_algorithm(request, monkeypatch) -> str:
    monkeypatch.setenv("ARWKV_CPU_ALGORITHM", request.param)
    return request.param


# The same for the GPU kernels (ARWKV_GPU_ALGORITHM); without it, a test runs the default (step).
@pytest.fixture(params=GPU_ALGORITHMS)
def gpu_algorithm(request, monkeypatch) -> str:
    monkeypatch.setenv("ARWKV_GPU_ALGORITHM", request.param)
    return request.param
