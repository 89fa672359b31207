"""The training loop behind ``arwkv distill``: one loop for every stage (stages.py says what a
stage does), one process or many (torchrun; DistributedDataParallel or FSDP2), with checkpoints
that resume exactly (checkpoint.py).

How a step is made (so that losses do not depend on how many processes run):
- The training rows (cut lazily from the tokenized data: data/rows.py) are visited in a seeded
  order, epoch after epoch; step s takes global rows s*B ... s*B + B - 1 (B = --batch-size).
  Nothing else decides the data position, so a resumed run needs only the step number, and
  rereads nothing.
- The global batch is cut into micro-batches of --micro-batch-size rows; micro-batch j runs on
  rank j % world, which reads only those rows. Each micro-batch's loss is a mean over its tokens,
  and the step's gradient is that of the mean over all micro-batches (DDP/FSDP average over
  ranks, accumulation over the rest; the ranks sum their token counts first). With the same
  micro-batch size, one process and N processes make the same sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..data.order import RowOrder
from ..data.records import DataError
from ..data.rows import collate
from ..data.shards import TokenSet
from ..data.tokenize import open_data
from ..loading import (
    check_student_dir,
    check_teacher_dir,
    load_student,
    load_teacher,
    load_tokenizer,
    student_dtype,
)
from ..options import DistillConfig
from ..runtime import ConfigError, Place, resolve_device
from .checkpoint import export_final, open_run, restore, save_checkpoint
from .monitor import MetricsLog, Progress, plot_run
from .stages import Stage, make_stage

__all__ = [
    "Stage",
    "load_rows",
    "Schedule",
    "make_optimizer",
    "micro_batches",
    "setup_place",
    "train",
]

Tensor = torch.Tensor


def setup_place(cfg: DistillConfig) -> Place:
    """Joins the torchrun process group when there is one: NCCL/RCCL for GPU tensors, gloo for
    CPU ones (the small loss reductions), with an hour's timeout so a slow checkpoint write on
    rank 0 does not kill the others waiting at the barrier."""
    device = resolve_device(cfg.device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    owns = False
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=timedelta(hours=1))
        owns = True
    if dist.is_initialized():
        return Place(dist.get_rank(), dist.get_world_size(), device, owns)
    return Place(0, 1, device)


# ----------------------------------------------------------------------------- data


def load_rows(cfg: DistillConfig, tokenizer, stage: Stage, place: Place) -> tuple[TokenSet, object, object]:
    """The tokenized data (a token directory as it is; raw data tokenized now, into a temporary
    one) and its training and validation rows of cfg.seq_len tokens, cut as the stage cuts them.
    A token directory must have been made with the student's tokenizer, and the teacher's."""
    log = (lambda line: print(f"arwkv distill: {line}", file=sys.stderr, flush=True)) if place.main else None
    tokens = open_data(cfg.data, tokenizer, validation_fraction=cfg.validation_fraction, seed=cfg.seed,
                       whose="--student", log=log)
    try:
        # a directory made elsewhere: the student's tokenizer made it (checked); the teacher's too?
        made_elsewhere = tokens.keep_alive is None
        if made_elsewhere and stage.needs_teacher and not same_tokenizer_files(cfg.student, cfg.teacher):
            teacher_tokenizer = try_tokenizer(cfg.teacher)
            if teacher_tokenizer is not None:
                tokens.check_tokenizer(teacher_tokenizer, "--teacher")
        pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        train, val = stage.rows(tokens, pad_id)  # padding carries no labels: any id serves
        if (cfg.validation_fraction or tokens.validation.documents) and not len(val):
            raise DataError(
                f"the validation split ({tokens.validation.documents} documents, {tokens.validation.size} "
                f"tokens) gives no row of {cfg.seq_len} tokens; hold out more (--validation-fraction, here "
                "or at tokenize time) or shorten --seq-len"
            )
        if len(train) < cfg.batch_size:
            raise DataError(
                f"{cfg.data} gives {len(train)} training rows of {cfg.seq_len} tokens, fewer than "
                f"--batch-size {cfg.batch_size}; use more data, a shorter --seq-len or a smaller batch"
            )
    except BaseException:
        tokens.close()
        raise
    return tokens, train, val


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def same_tokenizer_files(a, b) -> bool:
    """Whether two checkpoint directories carry byte-identical tokenizer files (a student and the
    teacher it was converted from do)."""
    pairs = [(Path(a) / name, Path(b) / name) for name in TOKENIZER_FILES]
    return all(x.exists() == y.exists() and (not x.exists() or x.read_bytes() == y.read_bytes())
               for x, y in pairs) and (Path(a) / TOKENIZER_FILES[0]).exists()


def try_tokenizer(path):
    """The tokenizer of a checkpoint directory, or None when it has no tokenizer files."""
    if not any((Path(path) / name).exists() for name in TOKENIZER_FILES[:2]):
        return None
    return load_tokenizer(path, "--teacher")


def micro_batch_size(cfg: DistillConfig, place: Place) -> int:
    """Rows per forward/backward: --micro-batch-size, or by default each process's whole share."""
    micro = cfg.micro_batch_size or max(cfg.batch_size // place.world, 1)
    if cfg.batch_size % (micro * place.world):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} does not split into micro-batches of {micro} "
            f"rows over {place.world} processes"
        )
    return micro


def micro_batches(rows: list[int], micro: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: micro-batch j goes to rank j % world."""
    chunks = [rows[i : i + micro] for i in range(0, len(rows), micro)]
    return chunks[rank::world]


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------- models, optimiser


def make_optimizer(cfg: DistillConfig, params: list[nn.Parameter]) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95), eps 1e-8, weight decay on 2-D weights only."""
    groups = [
        {"params": [p for p in params if p.ndim == 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim != 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The learning rate of each step (0-based) as a factor of --lr: linear warm-up to 1 over
    --warmup-steps, then constant, or cosine down to --min-lr-ratio at --max-steps.

    A run resumed with another --max-steps goes on from where it was: past the warm-up, the
    cosine starts again at the resumed step from the factor the run had there (``anchor`` =
    (step, factor)) and reaches --min-lr-ratio at the new --max-steps, so the rate never jumps.
    Resumed with the same --max-steps, a run follows its schedule exactly (as if never stopped)."""

    warmup_steps: int
    max_steps: int
    min_lr_ratio: float
    kind: str = "cosine"
    anchor: tuple[int, float] | None = None

    @classmethod
    def of(cls, cfg: DistillConfig) -> Schedule:
        return cls(min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps, cfg.min_lr_ratio, cfg.schedule)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        start, top = self.anchor or (self.warmup_steps, 1.0)
        progress = min((step - start) / max(self.max_steps - start, 1), 1.0)
        return self.min_lr_ratio + (top - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def resumed(self, max_steps: int, step: int) -> Schedule:
        """This (a checkpoint's) schedule, continued at ``step`` up to a new ``max_steps``."""
        if max_steps == self.max_steps:
            return self
        anchor = (step, self.factor(step)) if step >= self.warmup_steps else None
        return dataclasses.replace(self, max_steps=max_steps, warmup_steps=min(self.warmup_steps, max_steps),
                                   anchor=anchor)


# ----------------------------------------------------------------------------- the loop


def train(cfg: DistillConfig) -> Path:
    """Runs a stage as configured; returns OUT/student (the final student checkpoint)."""
    cfg.validate()
    stage = make_stage(cfg)
    # the checkpoints are what the flags say they are, before anything is written
    check_student_dir(cfg.student, "--student")
    if stage.needs_teacher:
        check_teacher_dir(cfg.teacher, "--teacher")
    elif cfg.teacher:
        print(f"arwkv distill: note: stage {cfg.stage} ({stage.title}) learns from no teacher; --teacher is "
              "not used", file=sys.stderr)
    out = Path(cfg.out)
    place = setup_place(cfg)
    try:
        # the run directory: a new run, or the newest checkpoint of the run to continue
        resume = open_run(cfg, out, place)
        if cfg.resume and resume is None and place.main:
            print(f"arwkv distill: note: --resume: {out} holds no checkpoint yet; starting at step 0",
                  file=sys.stderr)

        # the student (from the checkpoint on resume) and the stage's packed rows
        tokenizer = load_tokenizer(cfg.student, "--student")
        student = load_student(resume.path if resume else cfg.student)
        export_dtype = student_dtype(cfg.student)  # the final export keeps the input's dtype
        tokens, train_rows, val_rows = load_rows(cfg, tokenizer, stage, place)
        micro = micro_batch_size(cfg, place)

        # the stage checks the student, places it, chooses what trains, and builds its loss
        # (wrapped for DDP/FSDP2) around the student and, when it learns from one, the teacher
        stage.check_student(student)
        stage.place(student, place.device)
        stage.set_trainable(student)
        student.train()
        teacher = None
        if stage.needs_teacher:
            teacher = load_teacher(cfg.teacher, place.device)
            stage.check_teacher(teacher, student)
        stage.attach(student, teacher, place)

        # the optimiser and schedule; on resume they, and the RNG, continue where they stopped
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params)
        schedule = Schedule.of(cfg)
        if resume:  # the checkpoint's schedule, continued (stretched when --max-steps changed)
            saved = resume.state.get("schedule") or {}
            schedule = dataclasses.replace(
                schedule, max_steps=resume.state["config"]["max_steps"], anchor=saved.get("anchor")
            ).resumed(cfg.max_steps, resume.state["step"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
        start = restore(resume, student, optimizer, scheduler) if resume else 0

        # the data order, mixed precision on a GPU, and what the run shows (rank 0 logs)
        log = MetricsLog(out, resume_step=start if cfg.resume else None) if place.main else None
        order = RowOrder(len(train_rows), cfg.batch_size, cfg.seed)
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
            if stage.packing_note:
                print(f"arwkv distill: stage {cfg.stage} packing, {stage.packing_note}", file=sys.stderr)
        progress = Progress(cfg.max_steps, start, cfg.log_every, enabled=place.main)  # (after the header)
        last_validation = None

        for step in range(start, cfg.max_steps):
            began = time.perf_counter()
            # forward/backward over the step's global batch: its mean loss (and the loss's parts)
            means, data_seconds = accumulate_gradients(stage, train_rows, order.batch(step), micro, place,
                                                       autocast)
            if not math.isfinite(means[0]):  # before the update: the last checkpoint stays good
                raise RuntimeError(f"loss is {means[0]} at step {step + 1}; lower --lr or check the data")
            # clip, update, move the schedule on
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            )
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # log, validate, checkpoint
            done = step + 1
            record = {
                "step": done,
                "stage": cfg.stage,
                "loss": means[0],
                **dict(zip(stage.parts, means[1:], strict=True)),
                "lr": lr,
                "grad_norm": float(_full(grad_norm)),
                "tokens": done * tokens_per_step,
                "tokens_per_s": tokens_per_step / (time.perf_counter() - began),
                "data_s": data_seconds,  # of the step's time: reading and collating this rank's rows
            }
            if val_rows and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
                # held-out means of the loss and of its parts (stage 1: val_layer_I per layer,
                # which arwkv hybridize reads to choose the layers that keep attention)
                held_out = validate(stage, val_rows, micro, place, autocast)
                record["val_loss"] = held_out[0]
                record.update({f"val_{name}": v for name, v in zip(stage.parts, held_out[1:], strict=True)})
                last_validation = (done, held_out[0])
            if log is not None:
                log.write(record)
            progress.update(done, record["loss"], lr, record["tokens_per_s"])
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.max_steps:
                save_checkpoint(out, done, student, optimizer, scheduler, schedule, tokenizer, cfg, place)

        # the trained student, in its input's dtype, and the loss curves
        progress.close()
        if place.main and last_validation:
            print(f"arwkv distill: validation loss {last_validation[1]:.6g} at step {last_validation[0]} "
                  f"({len(val_rows)} held-out rows)", file=sys.stderr)
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


def accumulate_gradients(stage: Stage, source, rows: list[int], micro: int, place: Place,
                         autocast) -> tuple[list[float], float]:
    """Runs this rank's micro-batches of a global batch (``rows``: indices into ``source``, which
    gives PackedRow) forward and backward, accumulating the gradient of the batch's mean loss;
    returns [loss, ...parts], each the mean over the global batch's tokens (stage 3: its labelled
    ones), and the seconds spent reading this rank's rows. A rank reads only its own
    micro-batches; micro-batch i weighs w_i / W (its tokens over the batch's, W summed over the
    ranks); DDP/FSDP then average over the ranks, so the scale has the world size in it."""
    began = time.perf_counter()
    chunks = micro_batches(rows, micro, place.world, place.rank)
    mine = [collate([source[i] for i in chunk]) for chunk in chunks]
    data_seconds = time.perf_counter() - began
    weights = [stage.weight(b) for b in mine]
    total_weight = torch.tensor(float(sum(weights)), dtype=torch.float64)
    if place.world > 1:
        dist.all_reduce(total_weight)
    total_weight = max(float(total_weight), 1.0)
    sums = None
    for k, (batch, w) in enumerate(zip(mine, weights, strict=True)):
        with gradient_sync(stage.roots, sync=k == len(mine) - 1), autocast:
            values = stage.micro_step(to_device(batch, place.device), scale=w * place.world / total_weight)
        values = [v * w for v in values]
        sums = values if sums is None else [a + b for a, b in zip(sums, values, strict=True)]
    total = torch.tensor(sums, dtype=torch.float64)
    if place.world > 1:
        dist.all_reduce(total)
    return (total / total_weight).tolist(), data_seconds


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


def _full(value: Tensor) -> Tensor:
    """A DTensor's (FSDP) full value; a tensor itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


@torch.no_grad()
def validate(stage: Stage, rows, micro: int, place: Place, autocast) -> list[float]:
    """[loss, ...parts], each its mean over the validation tokens (stage 3: labelled ones),
    micro-batches shared out over the ranks. Every rank makes the same number of forward calls
    (FSDP's are collective): a rank short of work repeats the first micro-batch with weight 0."""
    chunks = math.ceil(len(rows) / micro)  # micro-batch c: rows c*micro ... (c+1)*micro - 1
    total = torch.zeros(len(stage.parts) + 2, dtype=torch.float64)  # weighted sums, then the weight
    for j in range(math.ceil(chunks / place.world)):
        index = place.rank + j * place.world
        c = index if index < chunks else 0
        batch = collate([rows[i] for i in range(c * micro, min((c + 1) * micro, len(rows)))])
        weight = float(stage.weight(batch)) if index < chunks else 0.0
        with autocast:
            values = stage.micro_step(to_device(batch, place.device), scale=1.0, backward=False)
        total += torch.tensor([v * weight for v in values] + [weight], dtype=torch.float64)
    if place.world > 1:
        dist.all_reduce(total)
    return (total[:-1] / total[-1].clamp(min=1)).tolist()
