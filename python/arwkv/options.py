"""Every command's options, one dataclass per command: its fields make the command-line flags
(``seq_len`` is ``--seq-len``), the keys of a ``--config`` file (YAML or TOML; ``seq_len`` or
``seq-len``) and the help texts, so the three cannot drift apart. A flag given on the command
line wins over the same key in the file; a relative path in a file is taken from the working
directory, as on the command line.

This module imports neither torch nor transformers: the command line is built (and ``--help``
answered) from it alone. Checks that need the domain (a checkpoint's contents, the data) run in
the modules that do the work.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runtime import DEVICES, DTYPES, ConfigError

# ----------------------------------------------------------------------------- declaring options


def opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    *,
    metavar: str | None = None,
    required: bool = False,
    positional: bool = False,
    minimum: float | None = None,
) -> Any:
    """One option: its default, help text, allowed values, metavar, whether it must be given
    (on the command line or in the config file), whether it is positional, and its least value."""
    meta = {
        "help": help,
        "choices": choices,
        "metavar": metavar,
        "required": required,
        "positional": positional,
        "minimum": minimum,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# What an annotation (a string under `from __future__ import annotations`) holds.
_KINDS = {
    "int": "int",
    "int | None": "int",
    "float": "float",
    "float | None": "float",
    "bool": "bool",
    "str": "str",
    "str | None": "str",
    "list[str]": "paths",
    "list[int] | None": "ints",
    "list[float]": "floats",
}
_NAMES = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "str": "text",
    "paths": "a list of paths",
    "ints": "a comma-separated list of whole numbers",
    "floats": "a comma-separated list of numbers",
}


def kind_of(f: dataclasses.Field) -> str:
    """``int``, ``float``, ``bool``, ``str``, ``paths`` (one or more), ``ints`` or ``floats``
    (comma-separated on the command line, a list or such a string in a config file)."""
    return _KINDS[str(f.type)]


def flag_of(name: str) -> str:
    """``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


def parse_number_list(text: str, name: str, kind: type) -> list:
    """``"256,512"`` -> [256, 512] (``kind`` int or float); a one-line ConfigError naming the flag."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                values.append(kind(part))
            except ValueError:
                raise ConfigError(f"{flag_of(name)}: {part!r} is not {_NAMES[kind.__name__]}") from None
    if not values:
        raise ConfigError(f"{flag_of(name)}: give at least one value")
    return values


def _argparse_type(name: str, kind: str):
    """The function argparse converts a flag's text with; its errors are one line naming the flag."""
    if kind in ("ints", "floats"):
        number = int if kind == "ints" else float

        def parse(text: str) -> list:
            try:
                return parse_number_list(text, name, number)
            except ConfigError as err:
                raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None

        parse.__name__ = _NAMES[kind]
        return parse
    number = {"int": int, "float": float}.get(kind, str)

    def convert(text: str):
        try:
            return number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_NAMES[kind]}") from None

    convert.__name__ = _NAMES[kind]
    return convert


def add_arguments(parser: argparse.ArgumentParser, options: type) -> None:
    """One flag per field of the ``options`` dataclass (default SUPPRESS, so that only the flags
    given reach the namespace), plus --config. Each help text ends with the field's default."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or TOML file whose keys are these flags' "
        "names (a flag given here wins; relative paths are from the working directory)",
    )
    for f in dataclasses.fields(options):
        meta, kind = f.metadata, kind_of(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = (
            "none"
            if default is None
            else ",".join(map(str, default))
            if isinstance(default, list)
            else default
        )
        help_ = meta["help"] + (" (required)" if meta["required"] else f" (default: {shown})")
        if meta["positional"]:
            parser.add_argument(
                f.name, metavar=meta["metavar"], help=meta["help"], type=_argparse_type(f.name, kind)
            )
        elif kind == "bool":
            parser.add_argument(
                flag_of(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        elif kind == "paths":
            parser.add_argument(
                flag_of(f.name),
                nargs="+",
                action="extend",
                metavar=meta["metavar"],
                default=argparse.SUPPRESS,
                help=help_,
            )
        else:
            parser.add_argument(
                flag_of(f.name),
                type=_argparse_type(f.name, kind),
                choices=meta["choices"],
                metavar=meta["metavar"],
                default=argparse.SUPPRESS,
                help=help_,
            )


def _checked(f: dataclasses.Field, value: Any, source: str) -> Any:
    """A config-file value as the field's kind; a one-line ConfigError naming the key otherwise."""
    kind = kind_of(f)
    if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind in ("ints", "floats") and isinstance(value, str):
        return parse_number_list(value, f.name, int if kind == "ints" else float)
    if kind == "paths" and isinstance(value, str):
        value = [value]
    number = (int, float) if kind in ("float", "floats") else int
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "paths": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "ints": lambda v: (
            isinstance(v, list) and all(isinstance(x, number) and not isinstance(x, bool) for x in v)
        ),
        "floats": lambda v: (
            isinstance(v, list) and all(isinstance(x, number) and not isinstance(x, bool) for x in v)
        ),
    }[kind]
    if not (ok(value) or (value is None and f.default is None)):
        raise ConfigError(f"{source}: {f.name} = {value!r} is not {_NAMES[kind]}")
    if kind == "float":
        return float(value)
    if kind == "floats":
        return [float(x) for x in value]
    return value


def load_config_file(path: str | Path, options: type) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file of ``options``' field names to values."""
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
    fields = {f.name: f for f in dataclasses.fields(options)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"--config {p}: unknown key {key!r}")
        values[name] = _checked(fields[name], value, f"--config {p}")
    return values


def check_fields(options: Any) -> None:
    """The checks every options class gets from its declarations: choices, required, minimum."""
    for f in dataclasses.fields(options):
        value, meta = getattr(options, f.name), f.metadata
        if meta["required"] and value in (None, [], ""):
            raise ConfigError(f"{flag_of(f.name)} is required")
        if meta["choices"] and value is not None and value not in meta["choices"]:
            raise ConfigError(
                f"{flag_of(f.name)} {value!r}: expected one of {', '.join(map(str, meta['choices']))}"
            )
        if meta["minimum"] is not None and value is not None and value < meta["minimum"]:
            raise ConfigError(f"{flag_of(f.name)} must be at least {meta['minimum']:g}, got {value}")


def options_from_args(options: type, args: argparse.Namespace) -> Any:
    """Defaults, then the --config file, then the flags given; checked (``validate()``)."""
    values = load_config_file(args.config, options) if getattr(args, "config", None) else {}
    values.update(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(options) if hasattr(args, f.name)}
    )
    return options(**values).validate()


class Options:
    """Base of every command's options: ``validate()`` runs the declared checks (choices, required,
    minimum) and then :meth:`check`, a class's own cross-field checks."""

    def validate(self):
        check_fields(self)
        self.check()
        return self

    def check(self) -> None:
        """Cross-field checks of one command (one-line ConfigErrors); none by default."""


def device_opt(help: str = "auto: the GPU when there is one and arwkv has GPU kernels") -> Any:
    """--device, as every command that runs a model spells it."""
    return opt("auto", help, DEVICES)


def validation_split_opt(help: str = "score only") -> Any:
    """--validation-fraction of a command that reads the split arwkv distill holds out."""
    return opt(0.0, f"{help} the validation split that arwkv distill makes with this fraction and --seed "
               "(0: all of --data)")


def _fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{flag_of(name)} must be in [0, 1), got {value}")


# ----------------------------------------------------------------------------- the commands


@dataclass
class InfoOptions(Options):
    """Show the build, the CPU code path and the GPU."""


@dataclass
class ConvertOptions(Options):
    """Turn a Transformer checkpoint (a Hugging Face decoder in safetensors: Qwen2, Llama, Mistral,
    ...) into an arwkv student: each self-attention becomes RWKV-7 (or RWKV-6) time mixing; the
    MLPs, embeddings and norms are the teacher's, bit for bit."""

    teacher: str | None = opt(
        None, "Hugging Face checkpoint directory (safetensors) of the teacher", metavar="DIR", required=True
    )
    out: str | None = opt(None, "student checkpoint directory to write", metavar="DIR", required=True)
    init: str = opt(
        "transfer", "transfer: r,k,v,o <- q,k,v,o of the teacher; fresh: ARWKV's init", ("transfer", "fresh")
    )
    wkv: int = opt(7, "time mixing: RWKV-7 or RWKV-6", (7, 6))
    wkv6_form: str = opt(
        "qrwkv",
        "with --wkv 6, the recurrence: qrwkv (QRWKV6: reads the state after its update, key scaled by "
        "1 - decay, sigmoid gate, no bonus; llama.cpp's rwkv6qwen2 runs it exactly: export it with "
        "arwkv export --gguf) or finch (stock RWKV-6 with the per-head bonus and silu gate; runs only in "
        "arwkv and vLLM)",
        ("qrwkv", "finch"),
    )
    dtype: str = opt(
        "auto",
        "dtype of the written weights; auto: the teacher's own, so its weights are copied bit for bit",
        ("auto", *DTYPES),
    )
    wkv_layers: list[int] | None = opt(
        None,
        "comma-separated layers that get time mixing (default: all); "
        "the others keep the teacher's attention (a hybrid)",
        metavar="I,J,...",
    )
    head_size: int = opt(
        64, "WKV head size N, one of arwkv_ext.HEAD_SIZES (the heads are attention width / N)", metavar="N"
    )
    gate: bool = opt(True, "output gate")
    group_norm: bool = opt(False, "per-head GroupNorm of the WKV output")
    keep_bias: bool = opt(
        False,
        "keep the teacher's q/k/v biases on receptance/key/value (RWKV-7: runs only in arwkv and vLLM; "
        "the published ARWKV layout and llama.cpp's arwkv7 have none. RWKV-6 qrwkv: llama.cpp runs them)",
    )
    max_shard_size: str = opt("2GB", "largest safetensors shard (e.g. 500MB)")
    seed: int = opt(0, "seed of the time mixers' random initial values")
    overwrite: bool = opt(False, "replace a non-empty --out")


DATA_HELP = ("a .txt/.jsonl/.parquet file, a directory of them, a saved dataset, or a token directory "
             "from arwkv tokenize (tokenize large data first)")


@dataclass
class TokenizeOptions(Options):
    """Tokenize a corpus once into a token directory that every --data flag takes: token ids in
    flat files read lazily (memory flat in the corpus's size), the documents held out for
    validation, stage 3's loss masks for chat records, stage 4's preference pairs, and a manifest
    (the tokenizer's fingerprint, the sources, the counts). Written beside --out and renamed into
    place when complete."""

    data: str | None = opt(None, "a .txt/.jsonl/.parquet file, a directory of them, or a saved dataset",
                           required=True)
    tokenizer: str | None = opt(None, "checkpoint directory whose tokenizer to use (the teacher's or a "
                                "student's)", metavar="DIR", required=True)
    out: str | None = opt(None, "token directory to write", metavar="DIR", required=True)
    workers: int = opt(0, "tokenizing processes (0: one per core)", minimum=0)
    validation_fraction: float = opt(0.0, "share of the records held out for validation (by whole record)")
    seed: int = opt(0, "seed of the validation split")
    overwrite: bool = opt(False, "replace an --out made from other inputs")

    def check(self) -> None:
        _fraction("validation_fraction", self.validation_fraction)


# The stages of `arwkv distill`: number -> title; training/stages.py implements each.
STAGE_TITLES = {1: "attention alignment", 2: "logit distillation", 3: "SFT", 4: "DPO on preference pairs"}
TEACHER_STAGES = (1, 2)  # the stages that learn from a teacher


@dataclass
class DistillConfig(Options):
    """Train a student: stage 1 (attention alignment), 2 (logit distillation), 3 (SFT) or 4 (DPO).
    Under torchrun the same command trains on every process."""

    # what to train, from what
    stage: int = opt(
        1,
        "1: attention alignment, 2: logit distillation, 3: SFT, 4: DPO on preference pairs",
        tuple(STAGE_TITLES),
    )
    teacher: str | None = opt(None, "teacher checkpoint directory (stages 1 and 2)", metavar="DIR")
    student: str | None = opt(
        None, "student checkpoint directory (from arwkv convert, or an earlier stage)", metavar="DIR"
    )
    data: str | None = opt(None, DATA_HELP)
    out: str | None = opt(
        None, "run directory: metrics.jsonl, checkpoints/, student/, loss.png", metavar="DIR"
    )
    # batches and steps
    seq_len: int = opt(512, "tokens per packed row", minimum=1)
    batch_size: int = opt(8, "GLOBAL batch in rows, split across processes", minimum=1)
    micro_batch_size: int = opt(
        0,
        "rows per forward/backward (0: the whole per-process share); the rest is gradient accumulation",
        minimum=0,
    )
    max_steps: int = opt(100, "optimiser steps", minimum=1)
    validation_fraction: float = opt(
        0.0, "documents held out for validation (a token directory holds its own split: leave this out)"
    )
    eval_every: int = opt(
        0, "validation loss every N steps (0: only at the end, when there is a split)", minimum=0
    )
    # optimiser and schedule
    lr: float = opt(1e-4, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "cosine schedule's final lr as a fraction of --lr")
    schedule: str = opt("cosine", "after warm-up", ("cosine", "constant"))
    warmup_steps: int = opt(50, "linear warm-up steps (capped at max_steps)", minimum=0)
    weight_decay: float = opt(0.1, "AdamW weight decay, on 2-D weights only", minimum=0)
    grad_clip: float = opt(1.0, "clip the global gradient norm (0: off)", minimum=0)
    # stage options
    loss: str = opt("rms", "stage 1 loss: ARWKV's per-token RMS error or MSE", ("rms", "mse"))
    temperature: float = opt(1.0, "stage 2 KL temperature")
    kl: str = opt(
        "forward",
        "stage 2 divergence: forward KL(teacher || student), or adaptive KL (forward "
        "and reverse KL weighted per token by how far off the student is on the teacher's head "
        "and tail)",
        ("forward", "adaptive"),
    )
    akl_head: float = opt(0.5, "stage 2, --kl adaptive: probability mass of the teacher's head tokens")
    ce_weight: float = opt(0.0, "stage 2: weight of an added next-token cross-entropy term", minimum=0)
    dpo_beta: float = opt(0.1, "stage 4 (DPO): beta, the strength of the preference term")
    kl_chunk: int = opt(512, "stage 2: tokens per chunk of the vocabulary-wide KL", minimum=1)
    overlong: str = opt(
        "truncate",
        "stages 3-4: a conversation longer than --seq-len (stage 4: a pair's "
        "sequence longer than half of it) is cut to fit or left out (conversations are never "
        "split across rows)",
        ("truncate", "skip"),
    )
    freeze_mlp: bool = opt(False, "stages 2-4: do not train the MLPs")
    freeze_embeddings: bool = opt(False, "stages 2-4: do not train the input embeddings")
    activation_checkpointing: bool = opt(False, "stages 2-4: recompute each layer in the backward")
    # checkpoints, runs
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end)", minimum=0)
    keep_last: int = opt(2, "checkpoints kept", minimum=1)
    resume: bool = opt(False, "continue the run in --out from its last checkpoint")
    seed: int = opt(0, "data order and split")
    strategy: str = opt("ddp", "under torchrun: DistributedDataParallel or FSDP2", ("ddp", "fsdp"))
    device: str = device_opt()
    log_every: int = opt(10, "plain progress line every N steps when not on a terminal", minimum=1)

    @property
    def needs_teacher(self) -> bool:
        return self.stage in TEACHER_STAGES

    def check(self) -> None:
        """Missing inputs and impossible values, each refused in one line naming its flag."""
        for name in ("student", "data", "out") + (("teacher",) if self.needs_teacher else ()):
            if not getattr(self, name):
                raise ConfigError(f"{flag_of(name)} is required for stage {self.stage}")
        if not Path(self.data).exists():
            raise ConfigError(f"--data {self.data} does not exist")
        _fraction("validation_fraction", self.validation_fraction)
        if self.dpo_beta <= 0:
            raise ConfigError(f"--dpo-beta must be positive, got {self.dpo_beta}")
        if not 0 < self.akl_head <= 1:
            raise ConfigError(f"--akl-head must be in (0, 1], got {self.akl_head}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError(
                f"--lr and --temperature must be positive, got {self.lr} and {self.temperature}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class HybridizeOptions(Options):
    """Give the teacher's attention back to the K time-mixing layers that score worst (--pick best:
    the K best), and write the result as a new student checkpoint (a hybrid) with
    OUT/hybridize.json. --score alignment: stage 1's per-layer alignment loss, from a stage-1 run's
    held-out losses (--run) or measured on --data; --score restore: the drop of the student's KL to
    the teacher when only that layer gets attention back, measured on --data. --layers names the
    layers by hand. Stage 2 afterwards re-tunes the hybrid."""

    teacher: str | None = opt(None, "the student's teacher checkpoint", metavar="DIR", required=True)
    student: str | None = opt(
        None, "student checkpoint directory (default: RUN/student with --run)", metavar="DIR"
    )
    out: str | None = opt(None, "hybrid checkpoint directory to write", metavar="DIR", required=True)
    keep: int | None = opt(None, "time-mixing layers that get attention back", metavar="K", minimum=0)
    layers: list[int] | None = opt(
        None, "instead of --keep: these layers get attention back", metavar="I,J,..."
    )
    pick: str = opt(
        "worst", "worst: the K layers that score worst; best: the K best (an ablation)", ("worst", "best")
    )
    score: str | None = opt(
        None,
        "what judges a layer. alignment: its stage-1 alignment loss (from --run, or "
        "measured on --data); restore: measured on --data, how much the student's KL to "
        "the teacher drops when only that layer gets attention back (end to end; one "
        "forward per layer) (default: alignment with --run, restore with --data)",
        ("alignment", "restore"),
    )
    run: str | None = opt(
        None,
        "scores: the latest held-out val_layer_* of a stage-1 run (made with --validation-fraction)",
        metavar="RUN_DIR",
    )
    data: str | None = opt(None, "scores: measured on this text (same formats as arwkv distill --data)")
    rows: int = opt(64, "--data: packed rows to measure on", minimum=1)
    seq_len: int = opt(512, "--data: tokens per row", minimum=2)
    batch_size: int = opt(8, "--data: rows per forward", minimum=1)
    validation_fraction: float = validation_split_opt("--data: measure on")
    seed: int = opt(0, "--data: packing order and split")
    loss: str = opt("rms", "--data with --score alignment: stage 1's loss", ("rms", "mse"))
    device: str = device_opt("--data: where the measurement runs")
    overwrite: bool = opt(False, "replace a non-empty --out")

    def check(self) -> None:
        _fraction("validation_fraction", self.validation_fraction)
        if self.student is None:  # a stage-1 run's own student by default
            if self.run is None:
                raise ConfigError(
                    "give --student DIR (or --run RUN_DIR, whose RUN_DIR/student is the default)"
                )
            self.student = str(Path(self.run) / "student")


@dataclass
class EvalOptions(Options):
    """Perplexity, tokens/s and cache memory (bytes constant and per token of context) of a
    checkpoint on a dataset (--data), and/or its lm-evaluation-harness scores on a local task file,
    as one JSON object."""

    model: str | None = opt(
        None, "checkpoint directory (a student, a hybrid or any causal LM)", metavar="DIR", required=True
    )
    data: str | None = opt(None, "same formats as arwkv distill --data")
    lm_eval_task: str | None = opt(
        None, "also score with lm-evaluation-harness (hf backend) on this local task file", metavar="YAML"
    )
    limit: int | None = opt(None, "lm_eval: at most this many documents (default: all)", minimum=1)
    seq_len: int = opt(512, "tokens per scored window", minimum=2)
    batch_size: int = opt(8, "windows per forward", minimum=1)
    validation_fraction: float = validation_split_opt()
    seed: int = opt(0, "seed of the validation split")
    max_tokens: int | None = opt(None, "stop after about this many tokens (default: all)", minimum=1)
    device: str = device_opt()
    dtype: str = opt("fp32", "dtype the model runs in", DTYPES)

    def check(self) -> None:
        _fraction("validation_fraction", self.validation_fraction)
        if not self.data and not self.lm_eval_task:
            raise ConfigError("give --data (perplexity) and/or --lm-eval-task (an lm_eval task file)")


@dataclass
class LongContextOptions(Options):
    """How one or more checkpoints (teacher, student, hybrid side by side) use a long context:
    loss by position on --data, and passkey retrieval; one JSON object, also written to
    OUT/long_context.json with the figure OUT/long_context.png."""

    model: list[str] = opt([], "checkpoint directories, compared side by side", metavar="DIR", required=True)
    out: str | None = opt(
        None, "where long_context.json and long_context.png go", metavar="DIR", required=True
    )
    data: str | None = opt(
        None, "text scored by position (same formats as arwkv distill --data); none: passkey retrieval only"
    )
    max_len: int = opt(
        2048,
        "sequence length scored by position, and the longest passkey prompt",
        metavar="TOKENS",
        minimum=2,
    )
    buckets: str = opt(
        "16",
        "N position buckets from 1 to --max-len, or their edges E0,E1,... (bucket i is positions [Ei, Ei+1))",
        metavar="N|E0,E1,...",
    )
    bucket_spacing: str = opt("log", "spacing of N buckets", ("log", "linear"))
    max_sequences: int | None = opt(
        None, "score at most the first N sequences of --data (default: all)", metavar="N", minimum=1
    )
    passkey_lengths: list[int] | None = opt(
        None,
        "total passkey prompt lengths in tokens (default: powers of "
        "two from 256 up to --max-len, and --max-len)",
        metavar="L1,L2,...",
    )
    passkey_depths: list[float] = opt(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        "key depths, the fraction of the filler before the key, in [0, 1]",
        metavar="D1,D2,...",
    )
    passkey_trials: int = opt(
        5, "random keys per (length, depth), from --seed; 0: no passkey retrieval", metavar="N", minimum=0
    )
    passkey_new_tokens: int = opt(10, "greedy tokens generated after the passkey question", minimum=1)
    batch_size: int = opt(1, "sequences (or passkey prompts of equal length) per forward", minimum=1)
    validation_fraction: float = validation_split_opt()
    seed: int = opt(0, "seed of the validation split and the passkeys")
    device: str = device_opt()
    dtype: str = opt("fp32", "dtype the models run in", DTYPES)
    overwrite: bool = opt(False, "replace an existing OUT/long_context.json and .png")

    def check(self) -> None:
        _fraction("validation_fraction", self.validation_fraction)
        if not self.data and not self.passkey_trials:
            raise ConfigError("give --data (loss by position) and/or --passkey-trials > 0")


@dataclass
class GenerateOptions(Options):
    """Stream a continuation of a prompt and print tokens/s."""

    model: str | None = opt(
        None, "checkpoint directory (a student, or any causal LM)", metavar="DIR", required=True
    )
    prompt: str | None = opt(None, "text to continue", required=True)
    max_new_tokens: int = opt(64, "tokens to generate at most", minimum=1)
    temperature: float = opt(0.0, "sampling temperature; 0: greedy", minimum=0)
    device: str = device_opt()
    dtype: str = opt("fp32", "dtype the model runs in", DTYPES)


@dataclass
class ExportOptions(Options):
    """Write a student as a GGUF file of llama.cpp's arwkv7 architecture (RWKV-7 time mixing,
    Qwen2-style MLP), tokenizer included. Refuses, in one line, what llama.cpp cannot run: RWKV-6
    students, hybrids, biases, an attention width other than the hidden size, tokenizers other
    than Qwen2-style byte-level BPE."""

    model: str | None = opt(None, "student checkpoint directory", metavar="DIR", required=True)
    gguf: str | None = opt(None, "GGUF file to write", metavar="OUT.gguf", required=True)
    outtype: str = opt(
        "f16",
        "type of the large matrices (norms, vectors and the time mixers' low-rank matrices stay f32)",
        ("f32", "f16", "bf16", "q8_0"),
    )
    overwrite: bool = opt(False, "replace an existing OUT.gguf")


@dataclass
class PlotOptions(Options):
    """Draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl."""

    run_dir: str = opt("", "a run directory of arwkv distill (its --out)", metavar="RUN_DIR", positional=True)


@dataclass
class DemoOptions(Options):
    """Convert the shipped small Qwen2 teacher into an RWKV-7 (or RWKV-6) student, distil it (stages 1
    and 2) on this CPU (or the --device given), compare perplexity, decoding speed, cache memory and loss by
    position on long held-out sequences, and write OUT/report.md with OUT/long_context.png (a few
    minutes, no download)."""

    out: str = opt("arwkv-demo", "for the students, runs, report", metavar="DIR")
    init: str = opt("transfer", "student initialisation", ("transfer", "fresh"))
    stage1_steps: int | None = opt(
        None, "stage 1 steps (default: the demo's plan; fewer with --quick)", metavar="N", minimum=1
    )
    stage2_steps: int | None = opt(
        None, "stage 2 steps (default: the demo's plan; fewer with --quick)", metavar="N", minimum=1
    )
    keep_bias: bool = opt(
        False, "the student keeps the teacher's q/k/v biases (as arwkv convert --keep-bias)"
    )
    wkv: int = opt(
        7, "the student's time mixing: RWKV-7, or RWKV-6 (arwkv convert's default qrwkv form)", (7, 6)
    )
    head_size: int = opt(64, "the student's WKV head size (llama.cpp runs 64 and 128 correctly)", metavar="N")
    gguf: bool = opt(False, "also write the distilled student as OUT/student.gguf (f16) for llama.cpp")
    quick: bool = opt(False, "a few steps of everything (CI)")
    device: str = opt(
        "cpu",
        "where training, scoring and decoding run. cpu by default: the published numbers "
        "and the step counts are the CPU story; cuda (or auto on a GPU machine) runs the same "
        "pipeline on the GPU as a smoke test, training under bf16 autocast",
        DEVICES,
    )
