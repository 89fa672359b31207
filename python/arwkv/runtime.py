"""Small contracts shared by every command: dtype names, device resolution, seed mixing, and the
head sizes the WKV kernels support (defined once, by the kernels themselves)."""

from __future__ import annotations

import torch

# The dtype names that commands and config files accept, and what they mean.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_from_name(name: str, what: str = "--dtype") -> torch.dtype:
    """``"bf16"`` -> torch.bfloat16, etc.; a ValueError naming ``what`` for anything else."""
    if name not in DTYPES:
        raise ValueError(f"{what} {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def torch_dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> ``"bfloat16"`` (the spelling of config.json's ``dtype``)."""
    return str(dtype).removeprefix("torch.")


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str, what: str = "--device") -> torch.device:
    """``auto`` is the GPU when torch sees one, else the CPU; ``cuda`` without a GPU is a
    ValueError naming ``what``."""
    if device not in DEVICES:
        raise ValueError(f"{what} {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} cuda: torch sees no GPU")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return torch.device("cuda") if use_cuda else torch.device("cpu")


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
