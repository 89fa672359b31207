"""Small contracts that every layer of arwkv shares, and so may import from anywhere: the refusal
type, where a process runs (:class:`Place`), device and dtype names and their resolution, seed
mixing, and the head sizes the WKV kernels support (defined once, by the kernels themselves).

torch is imported inside the functions that need it, so that the command line can be built (and
``--help`` answered) without loading it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    """A bad flag, config file, key, path or combination; the message is one line naming what is
    wrong. Every command prints it as ``arwkv COMMAND: message``."""


# The dtype names that commands and config files accept; dtype_from_name says what they mean.
DTYPES = ("bf16", "fp16", "fp32")

DEVICES = ("auto", "cpu", "cuda")


def dtype_from_name(name: str, what: str = "--dtype") -> torch.dtype:
    """``"bf16"`` -> torch.bfloat16, etc.; a ConfigError naming ``what`` for anything else."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"{what} {name!r} is not one of {', '.join(DTYPES)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def torch_dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> ``"bfloat16"`` (the spelling of config.json's ``dtype``)."""
    return str(dtype).removeprefix("torch.")


def gpu_kernels_built() -> bool:
    """Whether the installed arwkv_ext has GPU (CUDA or HIP) WKV kernels; False when it cannot be
    imported at all (then nothing runs the student on any device)."""
    try:
        import arwkv_ext
    except ImportError:
        return False
    return any(kind != "cpu" for kind in arwkv_ext.build_info["kernels"])


def resolve_device(device: str, what: str = "--device") -> torch.device:
    """The device a command runs on. ``auto`` is the GPU only when torch sees one AND arwkv was
    built with GPU kernels (else the CPU); ``cuda`` without either is a one-line ConfigError
    naming ``what``, raised before the command writes anything."""
    import torch

    if device not in DEVICES:
        raise ConfigError(f"{what} {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu":
        return torch.device("cpu")
    gpu_seen = torch.cuda.is_available()
    if device == "auto":
        return torch.device("cuda" if gpu_seen and gpu_kernels_built() else "cpu")
    if not gpu_seen:
        raise ConfigError(f"{what} cuda: torch sees no GPU")
    if not gpu_kernels_built():
        import arwkv_ext

        raise ConfigError(
            f"{what} cuda: arwkv was built without GPU kernels (for torch {arwkv_ext.build_info['torch']}, "
            f"{arwkv_ext.build_info['target']}); reinstall it against a CUDA or ROCm torch, or use "
            "--device cpu"
        )
    return torch.device("cuda")


@dataclasses.dataclass
class Place:
    """Where a training process runs: its global rank, the world size, its device, and whether
    the trainer made the process group (then it also ends it)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def mix_seed(seed: int, *keys: int) -> int:
    """One 63-bit seed from a base seed and integer keys (layer, epoch, ...): different keys give
    unrelated streams, the same keys the same stream."""
    value = seed & 0x7FFF_FFFF_FFFF_FFFF
    for key in keys:
        value = (value * 1_000_003 + key) & 0x7FFF_FFFF_FFFF_FFFF
    return value


def head_sizes() -> tuple[int, ...]:
    """The head sizes N that the WKV kernels run, as the compiled kernels report them."""
    import arwkv_ext

    return arwkv_ext.HEAD_SIZES
