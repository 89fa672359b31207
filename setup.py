"""Builds arwkv: the Python packages and the arwkv_ext._C kernel library.

Install with the torch you already have (the extension must be compiled against it):

    pip install --no-build-isolation .

Build switches (environment variables):
    ARWKV_BUILD_TARGET  auto | cpu | cuda | rocm   (default auto: what the installed torch supports)
    TORCH_CUDA_ARCH_LIST  CUDA architectures        (default "8.0;9.0")
    PYTORCH_ROCM_ARCH     ROCm architectures        (default "gfx942")
    MAX_JOBS              parallel compile jobs      (default: from CPU count and free memory)
    ARWKV_BUILD_DIR       build folder               (default: build; `make check-cuda` uses a fresh one)

Sources, C++ standard and optimisation flags come from csrc/build.json, which CMakeLists.txt and
tools/check_hip.sh read too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "arwkv: PyTorch is not installed in the Python that builds arwkv. Install torch first "
        "(for example `pip install torch`), then build against it with "
        "`pip install --no-build-isolation .` (an isolated build would compile against a "
        "different torch)."
    )

ROOT = Path(__file__).parent
TARGETS = ("auto", "cpu", "cuda", "rocm")
BUILD = json.loads((ROOT / "csrc" / "build.json").read_text())
STD = f"-std=c++{BUILD['cxx_standard']}"
# The torch ops (adapter, checks, schemas) and the CPU kernels, in every build.
CPU_SOURCES = BUILD["sources"]["torch_ops"] + BUILD["sources"]["cpu_kernels"]
# The GPU backend and one kernel file per input type, so they compile in parallel; on ROCm torch
# hipifies them at build time.
GPU_SOURCES = BUILD["sources"]["gpu_backend"] + BUILD["sources"]["gpu_kernels"]
INCLUDE_DIRS = [str(ROOT / d) for d in BUILD["include_dirs"]]
CPU_ISAS = ["baseline", "avx2", "avx512"] if os.uname().machine in ("x86_64", "AMD64") else ["baseline"]


def resolve_target() -> str:
    """The build target: ARWKV_BUILD_TARGET, or for 'auto' what the installed torch is for."""
    target = os.environ.get("ARWKV_BUILD_TARGET", "auto").strip().lower()
    if target not in TARGETS:
        sys.exit(f"arwkv: ARWKV_BUILD_TARGET={target!r} is not one of {', '.join(TARGETS)}")
    if target == "auto":
        if torch.version.hip:
            return "rocm"
        if torch.version.cuda:
            return "cuda"
        return "cpu"
    if target == "cuda" and not torch.version.cuda:
        sys.exit(f"arwkv: ARWKV_BUILD_TARGET=cuda needs a CUDA build of torch, not {torch.__version__}")
    if target == "rocm" and not torch.version.hip:
        sys.exit(f"arwkv: ARWKV_BUILD_TARGET=rocm needs a ROCm build of torch, not {torch.__version__}")
    return target


def gpu_archs(target: str) -> list[str]:
    """Explicit GPU architecture lists (never 'native': the build machine may have no GPU)."""
    if target == "cuda":
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        return [a for a in archs.replace(",", ";").replace(" ", ";").split(";") if a]
    if target == "rocm":
        archs = os.environ.get("PYTORCH_ROCM_ARCH", "gfx942")
        os.environ["PYTORCH_ROCM_ARCH"] = archs
        return [a for a in archs.split(";") if a]
    return []


def default_max_jobs() -> None:
    """Each compile job of these files peaks near 1 GB; keep the machine responsive."""
    if "MAX_JOBS" in os.environ:
        return
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 4.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gb // 1.5))))


target = resolve_target()
archs = gpu_archs(target)
default_max_jobs()
if target != "cpu":
    print(f"arwkv: building the CPU kernels and the {target} kernels for {';'.join(archs)}", file=sys.stderr)

BUILD_INFO = {
    "torch": torch.__version__,
    "target": target,
    "kernels": ["cpu"] if target == "cpu" else ["cpu", target],
    "cpu_isas": CPU_ISAS,
    "gpu_archs": archs,
}


class BuildWithInfo(BuildExtension):
    """Compiles the extension and records what it was built for (checked at import)."""

    def run(self) -> None:
        super().run()
        out_dir = Path(self.build_lib) / "arwkv_ext"
        if self.inplace:
            out_dir = ROOT / "arwkv_ext"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "_build_info.json").write_text(json.dumps(BUILD_INFO, indent=2) + "\n")


def openmp_flags() -> list[str]:
    """at::parallel_for is inline OpenMP code: without -fopenmp it silently runs on one thread.

    torch ships its own libgomp.so.1, so linking with -fopenmp shares torch's thread pool and
    honours torch.set_num_threads.
    """
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def cuda_include_dirs() -> list[str]:
    """torch's CUDA headers include cuSPARSE & co., which pip installs of torch ship in
    nvidia/cu*/include rather than in CUDA_HOME (a bare nvcc install lacks them)."""
    import site

    dirs = []
    for base in [*site.getsitepackages(), site.getusersitepackages()]:
        nvidia = Path(base) / "nvidia"
        dirs += [str(p) for p in sorted(nvidia.glob("cu*/include")) if p.is_dir()]
    return dirs


def gpu_compile_args(target: str, archs: list[str]) -> list[str]:
    """Device compiler flags. Arch flags come from TORCH_CUDA_ARCH_LIST / PYTORCH_ROCM_ARCH,
    which torch turns into -gencode / --offload-arch (PTX for the newest CUDA arch)."""
    flags = [*BUILD["gpu_flags"], STD]
    if target == "cuda":
        flags += BUILD["nvcc_flags"]
        if os.environ.get("ARWKV_PTXAS_VERBOSE") == "1":  # registers and spills per kernel
            flags.append("-Xptxas=-v")
    return flags


cxx_flags = [*BUILD["cxx_flags"], STD, *openmp_flags()]
if target == "cpu":
    extension = CppExtension(
        name="arwkv_ext._C",
        sources=CPU_SOURCES,
        include_dirs=INCLUDE_DIRS,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp_flags(),
    )
else:
    if target == "cuda" and archs:
        # the newest arch also gets PTX, so newer GPUs can JIT it
        newest = archs[-1]
        if not newest.endswith("+PTX"):
            archs[-1] = newest + "+PTX"
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    gpu_define = ["-DARWKV_WITH_GPU"]
    extension = CUDAExtension(
        name="arwkv_ext._C",
        sources=CPU_SOURCES + GPU_SOURCES,
        include_dirs=[*INCLUDE_DIRS, *(cuda_include_dirs() if target == "cuda" else [])],
        extra_compile_args={
            "cxx": cxx_flags + gpu_define,
            "nvcc": gpu_compile_args(target, archs) + gpu_define,
        },
        extra_link_args=openmp_flags(),
    )

# A build folder of its own (ARWKV_BUILD_DIR), e.g. an empty one so that everything compiles again.
build_dir = os.environ.get("ARWKV_BUILD_DIR")
setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildWithInfo},
    options={"build": {"build_base": build_dir}} if build_dir else {},
)
