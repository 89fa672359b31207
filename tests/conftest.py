import os

# Before torch loads OpenMP (its libgomp reads this once): threads that wait for work sleep
# instead of spinning. On a machine with few cores and other work, spinning threads of torch's
# intra-op pool keep taking the cores from one another: a float64 reference at T = 1000 took 50 to
# 240 s beside one other busy process, 5 to 8 s with passive waiting. Subprocesses inherit it.
# (Too late, and harmless, where a plugin imported torch first; set it in the environment then.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from fixtures import CPU_ALGORITHMS, GPU_ALGORITHMS  # noqa: E402

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
