"""The training loop behind ``arwkv distill``: one loop for the three stages, one process or many
(torchrun; DistributedDataParallel or FSDP2), with checkpoints that resume exactly.

How a step is made (so that losses do not depend on how many processes run):
- The packed training rows are visited in a seeded order, epoch after epoch; step s takes global
  rows s*B ... s*B + B - 1 (B = --batch-size). Nothing else decides the data position, so a
  resumed run needs only the step number.
- The global batch is cut into micro-batches of --micro-batch-size rows; micro-batch j runs on
  rank j % world. Each micro-batch's loss is a mean over its tokens, and the step's gradient is
  that of the mean over all micro-batches (DDP/FSDP average over ranks, accumulation over the
  rest). With the same micro-batch size, one process and N processes make the same sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .data import (
    DataError,
    collate,
    iter_records,
    pack_documents,
    sft_example,
    split_documents,
    tokenize_documents,
)
from .distill import AttentionAligner, LogitDistillation
from .distill_config import ConfigError, DistillConfig
from .modeling_rwkv_hybrid import Rwkv7TimeMixer, RwkvHybridForCausalLM
from .monitor import MetricsLog, Progress, plot_run

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


@dataclasses.dataclass
class Place:
    """Where this process runs: its global rank, the world size, its device, and whether train()
    made the process group (then it also ends it)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_place(cfg: DistillConfig) -> Place:
    """Joins the torchrun process group when there is one: NCCL/RCCL for GPU tensors, gloo for
    CPU ones (the small loss reductions), with an hour's timeout so a slow checkpoint write on
    rank 0 does not kill the others waiting at the barrier."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no GPU")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = False
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=timedelta(hours=1))
        owns = True
    if dist.is_initialized():
        return Place(dist.get_rank(), dist.get_world_size(), device, owns)
    return Place(0, 1, device)


# ----------------------------------------------------------------------------- data


def load_rows(cfg: DistillConfig, tokenizer) -> tuple[list, list]:
    """Training and validation rows (PackedRow) of cfg.seq_len tokens. Stage 3 packs SFT
    examples with their assistant-only labels; stages 1-2 pack plain documents."""
    records = list(iter_records(cfg.data))
    if cfg.stage == 3:
        examples = [sft_example(r, tokenizer) for r in records]

        def pack(part: list[tuple[list[int], list[int]]]) -> list:
            return pack_documents(
                [ids for ids, _ in part], cfg.seq_len, cfg.seed, labels=[lab for _, lab in part]
            )

        train, val = (pack(part) for part in split_documents(examples, cfg.validation_fraction, cfg.seed))
    else:
        docs = tokenize_documents(iter(records), tokenizer)
        train_docs, val_docs = split_documents(docs, cfg.validation_fraction, cfg.seed)
        train, val = (
            pack_documents(train_docs, cfg.seq_len, cfg.seed),
            pack_documents(val_docs, cfg.seq_len, cfg.seed),
        )
    if cfg.validation_fraction and not val:
        raise DataError(
            f"--validation-fraction {cfg.validation_fraction} holds out too little text for one row of "
            f"{cfg.seq_len} tokens; raise it or shorten --seq-len"
        )
    if len(train) < cfg.batch_size:
        raise DataError(
            f"{cfg.data} gives {len(train)} training rows of {cfg.seq_len} tokens, fewer than "
            f"--batch-size {cfg.batch_size}; use more data, a shorter --seq-len or a smaller batch"
        )
    return train, val


class BatchOrder:
    """Global row indices of each step: a seeded permutation of the rows per epoch."""

    def __init__(self, rows: int, batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.seed, self.perms = rows, batch_size, seed, {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self.perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.perms = {epoch: torch.randperm(self.rows, generator=g).tolist()}
        return self.perms[epoch]

    def batch(self, step: int) -> list[int]:
        """Rows of optimiser step ``step`` (0-based)."""
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self._perm(p // self.rows)[p % self.rows] for p in positions]


def micro_batches(rows: list[int], micro: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: micro-batch j goes to rank j % world."""
    chunks = [rows[i : i + micro] for i in range(0, len(rows), micro)]
    return chunks[rank::world]


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------- models


def load_student(path: str | Path) -> RwkvHybridForCausalLM:
    """A student checkpoint in float32 (the optimiser's master weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    if config.model_type != "rwkv_hybrid":
        raise ConfigError(
            f"--student {path} is a {config.model_type!r} checkpoint, not an ARWKV student "
            "(make one with arwkv convert)"
        )
    return RwkvHybridForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_teacher(cfg: DistillConfig, student: RwkvHybridForCausalLM, device: torch.device) -> nn.Module:
    """The teacher in its own dtype, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype="auto").to(device).eval()
    teacher.requires_grad_(False)
    t_vocab, s_vocab = teacher.config.vocab_size, student.config.vocab_size
    if cfg.stage == 1 and (
        teacher.config.num_hidden_layers != student.config.num_hidden_layers
        or teacher.config.hidden_size != student.config.hidden_size
    ):
        raise ConfigError(
            f"stage 1 needs the student's own teacher: --teacher has {teacher.config.num_hidden_layers} "
            f"layers of width {teacher.config.hidden_size}, the student "
            f"{student.config.num_hidden_layers} of {student.config.hidden_size}"
        )
    if t_vocab < s_vocab:
        raise ConfigError(f"--teacher's vocabulary ({t_vocab}) is smaller than the student's ({s_vocab})")
    if t_vocab > s_vocab:
        warnings.warn(
            f"teacher vocabulary {t_vocab} > student's {s_vocab}: the teacher's logits are "
            "truncated to the student's vocabulary (as ARWKV did)",
            stacklevel=2,
        )
    return teacher


def set_trainable(cfg: DistillConfig, student: RwkvHybridForCausalLM) -> None:
    """requires_grad on what the stage trains: stage 1 the time mixers; stages 2-3 everything
    but the frozen parts. The first time-mixing layer's value-residual mix (v0, v1, v2) is never
    used (that layer makes v_first), so it is left out."""
    student.requires_grad_(cfg.stage != 1)
    first = True
    for layer in student.model.layers:
        if cfg.stage == 1 and layer.is_wkv:
            layer.self_attn.requires_grad_(True)
        if cfg.freeze_mlp and cfg.stage != 1:
            layer.mlp.requires_grad_(False)
        if layer.is_wkv:
            mixer = layer.self_attn.time_mixer
            if first and isinstance(mixer, Rwkv7TimeMixer):
                for p in (mixer.v0, mixer.v1, mixer.v2):
                    p.requires_grad_(False)
            first = False
    if cfg.freeze_embeddings and cfg.stage != 1:
        student.model.embed_tokens.requires_grad_(False)


def make_optimizer(cfg: DistillConfig, params: list[nn.Parameter]) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95), eps 1e-8, weight decay on 2-D weights only."""
    groups = [
        {"params": [p for p in params if p.ndim == 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim != 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(cfg: DistillConfig, step: int) -> float:
    """Linear warm-up to 1, then constant or cosine down to min_lr_ratio at max_steps."""
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(cfg.max_steps - warmup, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------- stages


class Stage:
    """One stage's forward/backward on a micro-batch. ``roots`` are the wrapped modules that sync
    gradients (for no_sync / set_requires_gradient_sync during accumulation)."""

    roots: list[nn.Module]

    @staticmethod
    def weight(batch: dict[str, Tensor]) -> int:
        """How many tokens the micro-batch's loss is a mean over (its weight in the step's mean)."""
        return batch["input_ids"].numel()

    def micro_step(self, batch: dict[str, Tensor], scale: float, backward: bool = True) -> list[float]:
        """[loss, ...parts] of the micro-batch; accumulates scale * grad(loss) when backward."""
        raise NotImplementedError

    parts: tuple[str, ...] = ()


def _wrap(module: nn.Module, cfg: DistillConfig, place: Place) -> nn.Module:
    """DistributedDataParallel or FSDP2 (fully_shard, in place) around module, when distributed."""
    if place.world == 1:
        return module
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module, device_ids=[place.device.index] if place.device.type == "cuda" else None
    )


def _shard_layers(student: RwkvHybridForCausalLM, cfg: DistillConfig, place: Place) -> None:
    """FSDP2 shards each decoder layer on its own (then the root), so one layer is gathered at a time."""
    if cfg.strategy == "fsdp" and place.world > 1:
        for layer in student.model.layers:
            _wrap(layer, cfg, place)


class AlignmentStage(Stage):
    """Stage 1: AttentionAligner, with each time mixer wrapped on its own (it is called on its own)."""

    def __init__(
        self, cfg: DistillConfig, teacher: nn.Module, student: RwkvHybridForCausalLM, place: Place
    ) -> None:
        mixers = {
            i: _wrap(layer.self_attn.time_mixer, cfg, place)
            for i, layer in enumerate(student.model.layers)
            if layer.is_wkv
        }
        self.aligner = AttentionAligner(teacher, student, cfg.loss, mixers)
        self.roots = list(mixers.values()) if place.world > 1 else []
        self.parts = tuple(f"layer_{i}" for i in self.aligner.layers)

    def micro_step(self, batch, scale, backward=True):
        losses = self.aligner.step(
            batch["input_ids"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            scale=scale,
            backward=backward,
        )
        return [sum(losses) / len(losses), *losses]


class LogitStage(Stage):
    """Stage 2: the teacher online (no grad, its own dtype), KL (+ CE) in chunks."""

    parts = ("kl", "ce")

    def __init__(
        self, cfg: DistillConfig, teacher: nn.Module, student: RwkvHybridForCausalLM, place: Place
    ) -> None:
        _shard_layers(student, cfg, place)
        self.teacher = teacher
        self.objective = _wrap(
            LogitDistillation(student, cfg.temperature, cfg.ce_weight, cfg.kl_chunk), cfg, place
        )
        self.roots = [self.objective] if place.world > 1 else []

    def micro_step(self, batch, scale, backward=True):
        with torch.no_grad():
            hidden = self.teacher.model(
                batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).last_hidden_state
        with torch.set_grad_enabled(backward):
            parts = self.objective(
                batch["input_ids"],
                batch["cu_seqlens"],
                batch["labels"],
                hidden,
                self.teacher.get_output_embeddings().weight,
            )
            if backward:
                (parts[0] * scale).backward()
        return parts.tolist()


class SftStage(Stage):
    """Stage 3: the student's own next-token loss on the assistant tokens (labels shifted once, by
    the model)."""

    @staticmethod
    def weight(batch: dict[str, Tensor]) -> int:
        return int((batch["labels"].reshape(-1)[1:] != -100).sum())

    def __init__(self, cfg: DistillConfig, student: RwkvHybridForCausalLM, place: Place) -> None:
        _shard_layers(student, cfg, place)
        self.model = _wrap(student, cfg, place)
        self.roots = [self.model] if place.world > 1 else []

    def micro_step(self, batch, scale, backward=True):
        B, T = batch["input_ids"].shape
        with torch.set_grad_enabled(backward):
            out = self.model(
                batch["input_ids"].reshape(1, B * T),
                cu_seqlens=batch["cu_seqlens"],
                labels=batch["labels"].reshape(1, B * T),
                use_cache=False,
            )
            # no assistant token in this micro-batch: weight 0, but the backward still runs
            # (DDP/FSDP expect every rank's) and contributes zeros, not NaN
            loss = out.loss if self.weight(batch) else out.logits.sum() * 0.0
            if backward:
                (loss * scale).backward()
        return [loss.item()]


@contextlib.contextmanager
def gradient_sync(roots: list[nn.Module], sync: bool):
    """Inside: backward passes sync gradients across ranks only when ``sync`` (the last
    micro-batch of a step)."""
    with contextlib.ExitStack() as stack:
        for root in roots:
            if hasattr(root, "no_sync"):  # DistributedDataParallel
                if not sync:
                    stack.enter_context(root.no_sync())
            else:  # FSDP2
                root.set_requires_gradient_sync(sync)
        yield


# ----------------------------------------------------------------------------- checkpoints


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a directory is complete once renamed into place)."""
    root = out / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
    config.dtype = str(dtype or torch.float32).removeprefix("torch.")
    try:
        student.save_pretrained(directory, state_dict=state)
    finally:
        config.dtype = saved_dtype
    tokenizer.save_pretrained(directory)


def save_checkpoint(
    out: Path, step: int, student, optimizer, scheduler, tokenizer, cfg: DistillConfig, place: Place
) -> None:
    """OUT/checkpoints/step-NNNNNNNN/: the student in float32 (loadable like any student) and
    trainer_state.pt (optimiser, schedule, RNG, step, config). Written beside, then renamed; the
    oldest beyond --keep-last are removed. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(student, optimizer, options=options)
    if place.main:
        root = out / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:08d}"
        tmp = root / f".step-{step:08d}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_student(tmp, student, model_state, tokenizer)
        torch.save(
            {
                "step": step,
                "optimizer": optim_state,
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "config": dataclasses.asdict(cfg),
                "world": place.world,
            },
            tmp / TRAINER_STATE,
        )
        _sync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _sync_tree(root, files=False)
        for old in checkpoints(out)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if place.world > 1:
        dist.barrier()


def _sync_tree(directory: Path, files: bool = True) -> None:
    """fsync a directory's files (and itself), so a renamed checkpoint is complete on disk even
    after a power loss, not only after a killed process."""
    for f in directory.iterdir() if files else ():
        if f.is_file():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_resumable(cfg: DistillConfig, saved: dict, where: Path) -> None:
    for key in RESUME_KEYS:
        if saved.get(key) != getattr(cfg, key):
            raise ConfigError(
                f"--resume: {where} was made with {key}={saved.get(key)!r}, this run asks for "
                f"{key}={getattr(cfg, key)!r}"
            )


# ----------------------------------------------------------------------------- the loop


def train(cfg: DistillConfig) -> Path:
    """Runs a stage as configured; returns OUT/student (the final student checkpoint)."""
    import transformers
    from transformers import AutoTokenizer

    cfg.validate()
    out = Path(cfg.out)
    place = setup_place(cfg)
    try:
        found = checkpoints(out)
        if not cfg.resume and (found or (out / "metrics.jsonl").exists()):
            raise ConfigError(
                f"--out {out} already holds a run; pass --resume to continue it or choose another --out"
            )
        resume_from = found[-1] if cfg.resume and found else None
        state = None
        if resume_from is not None:
            try:
                state = torch.load(resume_from / TRAINER_STATE, map_location="cpu", weights_only=True)
                saved_config = state["config"]
            except Exception as err:  # noqa: BLE001 - truncated, foreign or old: one line
                raise ConfigError(
                    f"--resume: {resume_from / TRAINER_STATE} is not a readable arwkv "
                    f"trainer state ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
                ) from err
            check_resumable(cfg, saved_config, resume_from)
        if place.main:
            out.mkdir(parents=True, exist_ok=True)
            for stale in (
                (out / CHECKPOINTS).glob(".step-*.partial-*") if (out / CHECKPOINTS).is_dir() else ()
            ):
                shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving

        transformers.utils.logging.disable_progress_bar()  # its per-save bars would drown ours
        tokenizer = AutoTokenizer.from_pretrained(cfg.student, trust_remote_code=True)
        student = load_student(resume_from or cfg.student)
        export_dtype = load_student_dtype(cfg.student)
        train_rows, val_rows = load_rows(cfg, tokenizer)
        world_micro = cfg.micro_batch_size or max(cfg.batch_size // place.world, 1)
        if cfg.batch_size % (world_micro * place.world):
            raise ConfigError(
                f"--batch-size {cfg.batch_size} does not split into micro-batches of {world_micro} "
                f"rows over {place.world} processes"
            )
        if cfg.stage != 1 and student.model.rotary_emb is not None:
            raise ConfigError(
                f"--student {cfg.student} is a hybrid (it keeps attention layers): stages 2-3 "
                "train on packed rows, which only an all-time-mixing student takes for now"
            )
        if cfg.stage == 1:  # only the time mixers run (on the teacher's inputs): the rest stays in host RAM
            for layer in student.model.layers:
                if layer.is_wkv:
                    layer.self_attn.to(place.device)
        else:
            student.to(place.device)
        set_trainable(cfg, student)
        if cfg.activation_checkpointing and cfg.stage != 1:
            student.model.gradient_checkpointing = True
        student.train()
        if cfg.stage in (1, 2):
            teacher = load_teacher(cfg, student, place.device)
            stage: Stage = (AlignmentStage if cfg.stage == 1 else LogitStage)(cfg, teacher, student, place)
        else:
            stage = SftStage(cfg, student, place)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
        start = 0
        if state is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                student, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start = state["step"]
        log = MetricsLog(out, resume_step=start if cfg.resume else None) if place.main else None
        progress = Progress(cfg.max_steps, start, cfg.log_every, enabled=place.main)
        order = BatchOrder(len(train_rows), cfg.batch_size, cfg.seed)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if place.device.type == "cuda"
            else contextlib.nullcontext()
        )
        tokens_per_step = cfg.batch_size * cfg.seq_len
        if place.main:
            print(
                f"arwkv distill: stage {cfg.stage}, {len(train_rows)} training rows of {cfg.seq_len} tokens"
                f"{f', {len(val_rows)} validation rows' if val_rows else ''}, {place.world} process(es) on "
                f"{place.device.type}, {sum(p.numel() for p in params):,} trainable parameters, "
                f"steps {start}..{cfg.max_steps}",
                file=sys.stderr,
            )
        for step in range(start, cfg.max_steps):
            began = time.perf_counter()
            # the step's loss is the mean over the global batch's tokens (stage 3: its labelled
            # ones): micro-batch i weighs w_i / W; DDP/FSDP then average over the ranks
            batches = [
                collate([train_rows[i] for i in rows])
                for rows in micro_batches(order.batch(step), world_micro, 1, 0)
            ]
            weights = [stage.weight(b) for b in batches]
            total_weight = max(sum(weights), 1)
            mine = list(zip(batches, weights, strict=True))[place.rank :: place.world]
            sums = None
            for k, (batch, w) in enumerate(mine):
                with gradient_sync(stage.roots, sync=k == len(mine) - 1), autocast:
                    values = stage.micro_step(
                        to_device(batch, place.device), scale=w * place.world / total_weight
                    )
                values = [v * w for v in values]
                sums = values if sums is None else [a + b for a, b in zip(sums, values, strict=True)]
            total = torch.tensor(sums, dtype=torch.float64)
            if place.world > 1:
                dist.all_reduce(total)
            means = (total / total_weight).tolist()
            if not math.isfinite(means[0]):  # before the update: the last checkpoint stays good
                raise RuntimeError(f"loss is {means[0]} at step {step + 1}; lower --lr or check the data")
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            )
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - began
            record = {
                "step": step + 1,
                "stage": cfg.stage,
                "loss": means[0],
                **dict(zip(stage.parts, means[1:], strict=True)),
                "lr": lr,
                "grad_norm": float(_full(grad_norm)),
                "tokens": (step + 1) * tokens_per_step,
                "tokens_per_s": tokens_per_step / seconds,
            }
            done = step + 1
            if val_rows and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
                record["val_loss"] = validate(stage, val_rows, world_micro, place, autocast)
            if log is not None:
                log.write(record)
            progress.update(done, record["loss"], lr, record["tokens_per_s"])
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
                save_checkpoint(out, done, student, optimizer, scheduler, tokenizer, cfg, place)
        progress.close()
        final = export_final(out, student, tokenizer, export_dtype, place)
        if log is not None:
            log.close()
            plot_run(out)
            print(
                f"arwkv distill: wrote {final}, {out / 'metrics.jsonl'} and {out / 'loss.png'}",
                file=sys.stderr,
            )
        return final
    finally:
        if place.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _full(value: Tensor) -> Tensor:
    """A DTensor's (FSDP) full value; a tensor itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def load_student_dtype(path: str | Path) -> torch.dtype:
    """The dtype the student checkpoint was written in (the final export keeps it)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(path, trust_remote_code=True), "dtype", None) or "float32"
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))


@torch.no_grad()
def validate(stage: Stage, rows: list, micro: int, place: Place, autocast) -> float:
    """Mean loss over the validation tokens (stage 3: labelled ones), micro-batches shared out over
    the ranks. Every rank makes the same number of forward calls (FSDP's are collective): a rank
    short of work repeats the first micro-batch with weight 0."""
    chunks = [list(range(i, min(i + micro, len(rows)))) for i in range(0, len(rows), micro)]
    total = torch.zeros(2, dtype=torch.float64)
    for j in range(math.ceil(len(chunks) / place.world)):
        index = place.rank + j * place.world
        batch = collate([rows[i] for i in chunks[index if index < len(chunks) else 0]])
        weight = float(stage.weight(batch)) if index < len(chunks) else 0.0
        with autocast:
            loss = stage.micro_step(to_device(batch, place.device), scale=1.0, backward=False)[0]
        total += torch.tensor([loss * weight, weight], dtype=torch.float64)
    if place.world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def export_final(out: Path, student, tokenizer, dtype: torch.dtype, place: Place) -> Path:
    """OUT/student: the trained student in the dtype its input checkpoint had (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = out / "student"
    if place.main:
        tmp = out / f".student.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_student(tmp, student, state, tokenizer, dtype)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    if place.world > 1:
        dist.barrier()
    return final
