"""One configuration type for ``arwkv distill``: the command-line flags and the keys of a
``--config`` file (YAML or TOML) are both made from :class:`DistillConfig`'s fields, so they
cannot drift apart. A flag given on the command line wins over the same key in the file.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runtime import DEVICES


class ConfigError(ValueError):
    """A bad flag, config file or key; the message is one line naming what is wrong."""


def checkpoint_dir_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being a checkpoint directory (a directory holding config.json),
    as the end of a sentence that starts with the path; None when it is one. Every command that
    takes a model directory words its refusal with this."""
    p = Path(path)
    if not p.exists():
        return "is not a directory: it does not exist"
    if not p.is_dir():
        return "is not a directory"
    if not (p / "config.json").is_file():
        return "has no config.json: it holds no checkpoint"
    return None


def check_checkpoint_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a Path when it is a checkpoint directory; else a one-line ConfigError naming
    ``flag`` (``--model``, ``--teacher``, ...)."""
    problem = checkpoint_dir_problem(path)
    if problem:
        raise ConfigError(f"{flag} {path} {problem}")
    return Path(path)


def _opt(default: Any, help: str, choices: tuple | Callable[[], tuple] | None = None) -> Any:
    """A config field: its default, help text and allowed values (a tuple, or a function giving
    one, for values defined elsewhere)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _choices(f: dataclasses.Field) -> tuple | None:
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def _stages() -> dict:
    """The stage registry (imported late: the stages themselves use this module)."""
    from .stages import STAGES

    return STAGES


@dataclass
class DistillConfig:
    # what to train, from what
    stage: int = _opt(1, "1: attention alignment, 2: logit distillation, 3: SFT, 4: DPO on preference pairs",
                      lambda: tuple(_stages()))
    teacher: str | None = _opt(None, "teacher checkpoint directory (stages 1 and 2)")
    student: str | None = _opt(None, "student checkpoint directory (from arwkv convert, or an earlier stage)")
    data: str | None = _opt(None, "a .txt/.jsonl/.parquet file, a directory of them, or a saved dataset")
    out: str | None = _opt(None, "run directory: metrics.jsonl, checkpoints/, student/, loss.png")
    # batches and steps
    seq_len: int = _opt(512, "tokens per packed row")
    batch_size: int = _opt(8, "GLOBAL batch in rows, split across processes")
    micro_batch_size: int = _opt(
        0, "rows per forward/backward (0: the whole per-process share); the rest is gradient accumulation"
    )
    max_steps: int = _opt(100, "optimiser steps")
    validation_fraction: float = _opt(0.0, "documents held out for validation")
    eval_every: int = _opt(0, "validation loss every N steps (0: only at the end, when there is a split)")
    # optimiser and schedule
    lr: float = _opt(1e-4, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "cosine schedule's final lr as a fraction of --lr")
    schedule: str = _opt("cosine", "after warm-up", ("cosine", "constant"))
    warmup_steps: int = _opt(50, "linear warm-up steps (capped at max_steps)")
    weight_decay: float = _opt(0.1, "AdamW weight decay, on 2-D weights only")
    grad_clip: float = _opt(1.0, "clip the global gradient norm (0: off)")
    # stage options
    loss: str = _opt("rms", "stage 1 loss: ARWKV's per-token RMS error or MSE", ("rms", "mse"))
    temperature: float = _opt(1.0, "stage 2 KL temperature")
    kl: str = _opt("forward", "stage 2 divergence: forward KL(teacher || student), or adaptive KL "
                   "(forward and reverse KL weighted per token by how far off the student is on the "
                   "teacher's head and tail)", ("forward", "adaptive"))
    akl_head: float = _opt(0.5, "stage 2, --kl adaptive: probability mass of the teacher's head tokens")
    ce_weight: float = _opt(0.0, "stage 2: weight of an added next-token cross-entropy term")
    dpo_beta: float = _opt(0.1, "stage 4 (DPO): beta, the strength of the preference term")
    kl_chunk: int = _opt(512, "stage 2: tokens per chunk of the vocabulary-wide KL")
    overlong: str = _opt("truncate", "stages 3-4: a conversation longer than --seq-len (stage 4: a "
                         "pair's sequence longer than half of it) is cut to fit or left out "
                         "(conversations are never split across rows)", ("truncate", "skip"))
    freeze_mlp: bool = _opt(False, "stages 2-3: do not train the MLPs")
    freeze_embeddings: bool = _opt(False, "stages 2-3: do not train the input embeddings")
    activation_checkpointing: bool = _opt(False, "stages 2-3: recompute each layer in the backward")
    # checkpoints, runs
    save_every: int = _opt(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _opt(2, "checkpoints kept")
    resume: bool = _opt(False, "continue the run in --out from its last checkpoint")
    seed: int = _opt(0, "data order and split")
    strategy: str = _opt("ddp", "under torchrun: DistributedDataParallel or FSDP2", ("ddp", "fsdp"))
    device: str = _opt("auto", "auto: the GPU when there is one", DEVICES)
    log_every: int = _opt(10, "plain progress line every N steps when not on a terminal")

    def validate(self) -> DistillConfig:
        """Raises ConfigError for missing paths and impossible values; returns self."""
        for f in dataclasses.fields(self):
            choices = _choices(f)
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name} = {getattr(self, f.name)!r}: expected one of {', '.join(map(str, choices))}"
                )
        needs_teacher = _stages()[self.stage].needs_teacher
        for name in ("student", "data", "out") + (("teacher",) if needs_teacher else ()):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required for stage {self.stage}")
        if not Path(self.data).exists():
            raise ConfigError(f"--data {self.data} does not exist")
        for name in ("student",) + (("teacher",) if needs_teacher else ()):
            check_checkpoint_dir(getattr(self, name), f"--{name}")
        for name in ("seq_len", "batch_size", "max_steps", "kl_chunk", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "eval_every", "save_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.dpo_beta <= 0:
            raise ConfigError(f"dpo_beta must be positive, got {self.dpo_beta}")
        if not 0 < self.akl_head <= 1:
            raise ConfigError(f"akl_head must be in (0, 1], got {self.akl_head}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError(f"lr and temperature must be positive, got {self.lr} and {self.temperature}")
        if min(self.grad_clip, self.ce_weight, self.weight_decay) < 0:
            raise ConfigError("grad_clip, ce_weight and weight_decay must not be negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def _field_type(name: str) -> type:
    """The Python type a field holds (str for ``str | None``)."""
    return {"int": int, "float": float, "bool": bool}.get(str(FIELDS[name].type), str)


def _checked(name: str, value: Any, source: str) -> Any:
    kind = _field_type(name)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, str) or (value is None and FIELDS[name].default is None)
    )
    if not ok:
        raise ConfigError(f"{source}: {name} = {value!r} is not a {kind.__name__}")
    return float(value) if kind is float else value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file of flag names (``seq_len`` or ``seq-len``) to values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            raw = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {p}: expected a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - parser errors vary; one line names the file
        raise ConfigError(f"--config {p}: cannot parse: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {p}: expected a mapping of flag names to values")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"--config {p}: unknown key {key!r}")
        values[name] = _checked(name, value, f"--config {p}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (default SUPPRESS, so only the flags given reach the namespace), plus
    --config. Each help text ends with the field's default, which applies when neither the flag
    nor the --config file sets it."""
    parser.add_argument("--config", help="YAML or TOML file whose keys mirror these flags (default: none)")
    for name, f in FIELDS.items():
        flag, kind = f"--{name.replace('_', '-')}", _field_type(name)
        default = "none" if f.default is None else f.default
        help_ = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        else:
            parser.add_argument(
                flag, type=kind, default=argparse.SUPPRESS, choices=_choices(f), help=help_
            )


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """Defaults, then the --config file, then the flags given."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    values.update({name: getattr(args, name) for name in FIELDS if hasattr(args, name)})
    return DistillConfig(**values).validate()
