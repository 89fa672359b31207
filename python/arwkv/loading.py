"""Every way arwkv opens a checkpoint directory, and the checks that come first.

- :func:`check_checkpoint_dir`, :func:`check_student_dir`, :func:`check_teacher_dir`: a
  directory with a config.json, of the right kind (an arwkv student, or a Transformer teacher),
  refused in one line naming the flag before anything loads or is written.
- :class:`SafetensorsCheckpoint`: a checkpoint read tensor by tensor (convert, hybridize,
  export: nothing is held whole in memory).
- :func:`load_student`, :func:`load_teacher`, :func:`load_causal_lm`, :func:`load_tokenizer`:
  whole models. A student loads through arwkv's own classes and a teacher through transformers'
  registered ones, so no checkpoint's code is ever run (``trust_remote_code`` is never enabled, and
  nothing prompts).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .runtime import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .models.modeling_rwkv_hybrid import RwkvHybridForCausalLM

STUDENT_MODEL_TYPE = "rwkv_hybrid"  # config.json's model_type of an arwkv student (or hybrid)


class CheckpointError(ConfigError):
    """A checkpoint directory that cannot be used as asked; one line naming the flag and why."""


# ----------------------------------------------------------------------------- checks


def check_checkpoint_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a Path when it is a checkpoint directory (a directory holding config.json);
    else a one-line CheckpointError naming ``flag`` (``--model``, ``--teacher``, ...)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{flag} {path} is not a directory: it does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{flag} {path} is not a directory")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{flag} {path} has no config.json: it holds no checkpoint")
    return p


def model_type(path: str | os.PathLike, flag: str) -> str | None:
    """config.json's ``model_type`` of the checkpoint directory ``path`` (checked first)."""
    config = check_checkpoint_dir(path, flag) / "config.json"
    try:
        found = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{flag} {config} cannot be read: {str(err).splitlines()[0]}") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{flag} {config} is not a JSON object")
    return found.get("model_type")


def is_student(path: str | os.PathLike, flag: str = "--model") -> bool:
    """Whether ``path`` holds an arwkv student (or hybrid)."""
    return model_type(path, flag) == STUDENT_MODEL_TYPE


def check_student_dir(path: str | os.PathLike, flag: str = "--student") -> Path:
    """``path`` when it holds an arwkv student (or hybrid); else one line saying what it is."""
    found = model_type(path, flag)
    if found != STUDENT_MODEL_TYPE:
        raise CheckpointError(
            f"{flag} {path} is a {found!r} checkpoint, not an arwkv student (make one with arwkv convert)"
        )
    return Path(path)


def check_teacher_dir(path: str | os.PathLike, flag: str = "--teacher") -> Path:
    """``path`` when it holds a Transformer checkpoint; an arwkv student given as a teacher is
    refused in one line (it has no attention to align to, nor the teacher's logits)."""
    if model_type(path, flag) == STUDENT_MODEL_TYPE:
        raise CheckpointError(
            f"{flag} {path} is an arwkv student, not a Transformer teacher; give the "
            "checkpoint the student was converted from"
        )
    return Path(path)


# ----------------------------------------------------------------------------- tensor by tensor


class SafetensorsCheckpoint:
    """A Hugging Face checkpoint directory read tensor by tensor (single or sharded safetensors).
    ``flag`` names it in errors (``--teacher``, ``--student``, ``--model``); ``config_class``
    reads its config.json (transformers' AutoConfig by default)."""

    def __init__(self, path: str | os.PathLike, flag: str = "--teacher", config_class=None) -> None:
        from safetensors import safe_open

        self.path, self.flag = check_checkpoint_dir(path, flag), flag
        if config_class is None:
            from transformers import AutoConfig

            config_class = AutoConfig
        try:
            self.config = config_class.from_pretrained(self.path)
        except Exception as err:  # noqa: BLE001 - any parse failure is reported in one line
            raise CheckpointError(
                f"{flag} {self.path}/config.json cannot be read: {str(err).splitlines()[0]}"
            ) from err
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{flag} index {index} is not a safetensors index: {err}") from err
        elif (self.path / "model.safetensors").is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"{flag} {self.path} has no model.safetensors or "
                "model.safetensors.index.json (only safetensors checkpoints are read)"
            )
        self._files: dict[str, object] = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.names: dict[str, str] = {}
        for f in files:
            try:
                handle = safe_open(str(self.path / f), framework="pt")
                keys = list(handle.keys())
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"{flag} shard {self.path / f} cannot be read: {err}") from err
            self._files[f] = handle
            self.names.update(dict.fromkeys(keys, f))

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read from its shard."""
        return self._shard(name).get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``, without reading its data (an empty slice)."""
        return self._shard(name).get_slice(name)[:0].dtype

    def _shard(self, name: str):
        if name not in self.names:
            raise CheckpointError(
                f"{self.flag} {self.path} has no tensor {name!r} (is it a decoder with the "
                "standard layout: model.layers.N.self_attn.q_proj, ...?)"
            )
        return self._files[self.names[name]]


def open_student_tensors(path: str | os.PathLike, flag: str = "--student") -> SafetensorsCheckpoint:
    """An arwkv student read tensor by tensor, its config as a RwkvHybridConfig."""
    from .models.configuration_rwkv_hybrid import RwkvHybridConfig

    check_student_dir(path, flag)
    return SafetensorsCheckpoint(path, flag, config_class=RwkvHybridConfig)


# ----------------------------------------------------------------------------- whole models


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' loading and saving bars off inside (they would clutter arwkv's own output);
    as they were after."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


@functools.cache
def register_student_classes() -> None:
    """Makes transformers' Auto classes know the student's model type (once per process), so that
    its config and tokenizer load through them like any other model's without running a
    checkpoint's code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models.configuration_rwkv_hybrid import RwkvHybridConfig
    from .models.modeling_rwkv_hybrid import RwkvHybridForCausalLM

    AutoConfig.register(STUDENT_MODEL_TYPE, RwkvHybridConfig, exist_ok=True)
    AutoModelForCausalLM.register(RwkvHybridConfig, RwkvHybridForCausalLM, exist_ok=True)


def load_tokenizer(path: str | os.PathLike, flag: str = "--model"):
    """The checkpoint's tokenizer (a student carries its teacher's)."""
    from transformers import AutoTokenizer

    check_checkpoint_dir(path, flag)
    register_student_classes()
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def student_dtype(path: str | os.PathLike, flag: str = "--student") -> torch.dtype:
    """The dtype a student checkpoint was written in (its config's ``dtype``; float32 if unset)."""
    import torch

    from .models.configuration_rwkv_hybrid import RwkvHybridConfig

    check_student_dir(path, flag)
    dtype = getattr(RwkvHybridConfig.from_pretrained(path), "dtype", None) or "float32"
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))


def load_student(
    path: str | os.PathLike, flag: str = "--student", dtype: torch.dtype | None = None
) -> RwkvHybridForCausalLM:
    """A student (or hybrid) checkpoint, on the CPU, in ``dtype`` (float32 by default: the
    optimiser's master weights)."""
    import torch

    from .models.modeling_rwkv_hybrid import RwkvHybridForCausalLM

    check_student_dir(path, flag)
    with quiet_transformers():
        return RwkvHybridForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)


def load_teacher(path: str | os.PathLike, device: torch.device, flag: str = "--teacher") -> nn.Module:
    """A Transformer teacher in its own dtype, on ``device``, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    check_teacher_dir(path, flag)
    with quiet_transformers():
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=False)
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def load_causal_lm(
    path: str | os.PathLike, device: torch.device, dtype: torch.dtype, flag: str = "--model"
) -> tuple[nn.Module, object]:
    """Any checkpoint a command scores or decodes (a student, a hybrid, a Transformer), in eval
    mode on ``device`` in ``dtype``, and its tokenizer."""
    from transformers import AutoModelForCausalLM

    if is_student(path, flag):
        model = load_student(path, flag, dtype)
    else:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    return model.to(device).eval(), load_tokenizer(path, flag)
