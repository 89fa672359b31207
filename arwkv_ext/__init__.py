"""arwkv_ext: the WKV-7 and WKV-6 recurrences as PyTorch custom ops.

Importing this package loads the compiled kernels and registers

- ``torch.ops.arwkv.wkv7(r, w, k, v, a, b, initial_state=None, cu_seqlens=None)``
- ``torch.ops.arwkv.wkv6(r, w, k, v, u, initial_state=None, cu_seqlens=None)``

with autograd and fake (meta) implementations, so they work under ``torch.compile``.
:func:`wkv7` and :func:`wkv6` are the documented Python entry points; ``arwkv_ext.reference``
holds the plain-PyTorch recurrences they are tested against.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from packaging.version import Version


def _check_build() -> dict:
    """Fails with a clear message when the kernels were built for another torch."""
    info_path = Path(__file__).with_name("_build_info.json")
    if not info_path.exists():
        raise ImportError(
            f"arwkv_ext: no compiled kernels in {Path(__file__).parent}: this is the source tree "
            "(run from another directory if arwkv is installed), or arwkv is not built yet: "
            "`pip install --no-build-isolation .` (or `-e .` to use the source tree in place)"
        )
    info = json.loads(info_path.read_text())
    built, have = Version(info["torch"]), Version(torch.__version__)
    if built.release != have.release or built.local != have.local:
        raise ImportError(
            f"arwkv_ext was built for torch {info['torch']} ({info['target']} kernels) but torch "
            f"{torch.__version__} is installed; rebuild it against this torch with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .`"
        )
    return info


build_info = _check_build()

# After the check, so a torch mismatch reads as the message above, not as an undefined symbol.
from . import _C, reference  # noqa: F401  (an empty module: loading it registers torch.ops.arwkv.*)
from .ops import wkv6, wkv7

HEAD_SIZES: tuple[int, ...] = tuple(torch.ops.arwkv.head_sizes())
"""The head sizes N (last dimension of r, w, k, ...) the kernels support, from the one list the
kernels are compiled with (``kHeadSizes`` in csrc/wkv_problem.h)."""


def cpu_isa() -> str:
    """The instruction set the CPU kernels use now: ``avx512``, ``avx2`` or ``baseline``.

    The best one this CPU supports, unless the environment variable ``ARWKV_CPU_ISA`` names
    another (useful to test or compare the code paths).
    """
    return torch.ops.arwkv.cpu_isa()


def cpu_algorithm(op: str = "wkv7", direction: str = "forward") -> str:
    """The algorithm the CPU kernels use now for ``op`` (``wkv7`` / ``wkv6``) in ``direction``
    (``forward`` / ``backward``): ``step`` or ``chunked`` (matrix form, 16 steps at a time).

    Without the environment variable ``ARWKV_CPU_ALGORITHM`` (``auto``, ``step``, ``chunked``),
    the one measured faster: chunked, except WKV-7's forward. Segments of at most 4 steps
    (decoding) always take the step path.
    """
    if op not in ("wkv7", "wkv6"):
        raise ValueError(f"op must be 'wkv7' or 'wkv6', got {op!r}")
    return torch.ops.arwkv.cpu_algorithm(7 if op == "wkv7" else 6, direction)


def gpu_algorithm() -> str:
    """The algorithm the GPU kernels use now: ``step``, or ``chunked`` (matrix form on tensor
    cores, 16 steps at a time).

    Set by the environment variable ``ARWKV_GPU_ALGORITHM`` (``auto``, ``step``, ``chunked``),
    read at every call; ``auto`` (the default) is ``step`` until a GPU measurement of the chunked
    kernels is saved. Answers on any build, with or without GPU kernels.
    """
    return torch.ops.arwkv.gpu_algorithm()


def cpu_isas_supported() -> list[str]:
    """The instruction sets compiled into this build that this CPU can run."""
    return list(torch.ops.arwkv.cpu_isas_supported())


__all__ = ["wkv7", "wkv6", "reference", "cpu_isa", "cpu_algorithm", "gpu_algorithm", "cpu_isas_supported",
           "build_info", "HEAD_SIZES"]
