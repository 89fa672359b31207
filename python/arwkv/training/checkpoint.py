"""What a training run keeps on disk, and how it continues from it:

- OUT/checkpoints/step-NNNNNNNN/: the student in float32 (loadable like any student) and
  trainer_state.pt (optimiser, schedule, RNG, step, config, world size); the last --keep-last
  are kept. A directory is written under a temporary name and renamed into place
  (files.atomic_directory), so one named step-* is complete; what a killed run left under a
  temporary name is removed when the next run opens the directory.
- ``--resume`` continues from the newest complete checkpoint, after checking that the run asks
  for what the checkpoint was made with (RESUME_KEYS); the weights, optimiser, schedule and RNG
  state come back exactly, so the resumed losses are those of an uninterrupted run.
- OUT/student/: the final export, in the dtype the input student was written in.

The writers are collective under torchrun: every rank calls them (the full state dicts are
gathered), rank 0 alone writes, and all wait at a barrier.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..files import atomic_directory, remove_stale_partials
from ..loading import quiet_transformers
from ..options import DistillConfig
from ..runtime import ConfigError, Place, torch_dtype_name

if TYPE_CHECKING:
    from ..models.modeling_rwkv_hybrid import RwkvHybridForCausalLM

Tensor = torch.Tensor
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
# a resumed run must agree with its checkpoint on these (the rest, e.g. max_steps, may change)
RESUME_KEYS = (
    "stage",
    "teacher",
    "student",
    "data",
    "seq_len",
    "batch_size",
    "seed",
    "validation_fraction",
    "lr",
    "min_lr_ratio",
    "schedule",
    "warmup_steps",
    "weight_decay",
    "loss",
    "temperature",
    "ce_weight",
    "freeze_mlp",
    "freeze_embeddings",
)


# ----------------------------------------------------------------------------- finding, resuming


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a directory is complete once renamed into place)."""
    root = out / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


@dataclasses.dataclass
class Resume:
    """The checkpoint a run continues from, and its trainer state (read on the CPU)."""

    path: Path
    state: dict


def open_run(cfg: DistillConfig, out: Path, place: Place) -> Resume | None:
    """Checks that --out is a new run, or with --resume one to continue; returns its newest
    checkpoint (None: start from step 0). Rank 0 makes OUT and removes what a run killed while
    writing left there."""
    found = checkpoints(out)
    if not cfg.resume and (found or (out / "metrics.jsonl").exists()):
        raise ConfigError(
            f"--out {out} already holds a run; pass --resume to continue it or choose another --out"
        )
    resume = None
    if cfg.resume and found:
        where = found[-1] / TRAINER_STATE
        try:
            state = torch.load(where, map_location="cpu", weights_only=True)
            saved_config = state["config"]
        except Exception as err:  # noqa: BLE001 - truncated, foreign or old: one line
            raise ConfigError(
                f"--resume: {where} is not a readable arwkv "
                f"trainer state ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
            ) from err
        check_resumable(cfg, saved_config, found[-1])
        resume = Resume(found[-1], state)
    if place.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out / CHECKPOINTS)  # a checkpoint being written
        remove_stale_partials(out)  # the final export being written
    return resume


def check_resumable(cfg: DistillConfig, saved: dict, where: Path) -> None:
    """ConfigError naming the first RESUME_KEYS value that differs from the checkpoint's."""
    for key in RESUME_KEYS:
        if saved.get(key) != getattr(cfg, key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"--resume: {where} was made with {flag} {saved.get(key)}, this run asks for "
                f"{flag} {getattr(cfg, key)}"
            )


def restore(resume: Resume, student: nn.Module, optimizer, scheduler) -> int:
    """Puts the checkpoint's optimiser, schedule and RNG state back (the weights were loaded with
    the student); returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = resume.state
    set_optimizer_state_dict(
        student, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
    )
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"]


def rng_state() -> dict:
    """The generators a step may draw from: torch's CPU one, Python's, the current GPU's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- writing


def write_student(
    directory: Path,
    student: RwkvHybridForCausalLM,
    state: dict[str, Tensor],
    tokenizer,
    dtype: torch.dtype | None = None,
) -> None:
    """A loadable student checkpoint (config, weights, code, tokenizer) from a full state dict."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = student.config
    saved_dtype = getattr(config, "dtype", None)
    config.dtype = torch_dtype_name(dtype or torch.float32)
    try:
        with quiet_transformers():
            student.save_pretrained(directory, state_dict=state)
    finally:
        config.dtype = saved_dtype
    tokenizer.save_pretrained(directory)


def save_checkpoint(
    out: Path, step: int, student, optimizer, scheduler, schedule, tokenizer, cfg: DistillConfig, place: Place
) -> None:
    """OUT/checkpoints/step-NNNNNNNN/ (see the module's docstring); the oldest beyond --keep-last
    are removed. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(student, optimizer, options=options)
    if place.main:
        with atomic_directory(out / CHECKPOINTS / f"step-{step:08d}") as tmp:
            write_student(tmp, student, model_state, tokenizer)
            torch.save(
                {
                    "step": step,
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "schedule": {"anchor": schedule.anchor},  # where a stretched schedule restarted
                    "rng": rng_state(),
                    "config": dataclasses.asdict(cfg),
                    "world": place.world,
                },
                tmp / TRAINER_STATE,
            )
        for old in checkpoints(out)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if place.world > 1:
        dist.barrier()


def export_final(out: Path, student, tokenizer, dtype: torch.dtype, place: Place) -> Path:
    """OUT/student: the trained student in ``dtype`` (that of its input checkpoint). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = out / "student"
    if place.main:
        with atomic_directory(final) as tmp:
            write_student(tmp, student, state, tokenizer, dtype)
    if place.world > 1:
        dist.barrier()
    return final
