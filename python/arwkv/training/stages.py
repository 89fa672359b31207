"""The distillation stages, one class each, and their registry :data:`STAGES` (``--stage N``).

A stage owns everything in which one stage differs from another, so that the training loop
(trainer.py) never asks which stage it runs:

- its data rows: how the tokenized data is cut into rows of --seq-len tokens (:meth:`Stage.rows`);
- what it checks of the student and the teacher before training (:meth:`Stage.check_student`,
  :meth:`Stage.check_teacher`), and whether it needs a teacher at all (``needs_teacher``);
- where the student's parts live (:meth:`Stage.place`) and which of them train
  (:meth:`Stage.set_trainable`);
- its loss: :meth:`Stage.attach` wraps what it runs for DistributedDataParallel / FSDP2,
  :meth:`Stage.micro_step` is the forward/backward of one micro-batch, :meth:`Stage.weight` the
  number of tokens that micro-batch's loss is a mean over, and ``parts`` names the loss's parts
  (the metrics log's columns).

Adding a stage is one new class registered in :data:`STAGES`. The stages are those of the
ARWKV paper: 1 aligns each time mixer with its teacher attention layer, 2 distils the teacher's
logits into the whole student, 3 fine-tunes the student on chat data (SFT) without a teacher,
4 tunes it on preference pairs (DPO) against a frozen copy of the --student it starts from.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import nn

from ..data.records import DataError
from ..data.rows import ConversationRows, DocumentRows, PreferenceRows
from ..data.shards import TokenSet
from ..loading import load_student
from ..models.modeling_rwkv_hybrid import Rwkv7TimeMixer, RwkvHybridForCausalLM
from ..options import STAGE_TITLES, DistillConfig
from ..runtime import ConfigError, Place
from .losses import AttentionAligner, LogitDistillation, SequenceLogProbs, dpo_loss

Tensor = torch.Tensor


def wrap(module: nn.Module, cfg: DistillConfig, place: Place) -> nn.Module:
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


def shard_layers(student: RwkvHybridForCausalLM, cfg: DistillConfig, place: Place) -> None:
    """FSDP2 shards each decoder layer on its own (then the root), so one layer is gathered at a time."""
    if cfg.strategy == "fsdp" and place.world > 1:
        for layer in student.model.layers:
            wrap(layer, cfg, place)


def freeze_unused_value_mix(student: RwkvHybridForCausalLM) -> None:
    """The first time-mixing layer's value-residual mix (v0, v1, v2) is never used (that layer
    makes v_first), so it never trains."""
    for layer in student.model.layers:
        if layer.is_wkv:
            mixer = layer.self_attn.time_mixer
            if isinstance(mixer, Rwkv7TimeMixer):
                for p in (mixer.v0, mixer.v1, mixer.v2):
                    p.requires_grad_(False)
            return


class Stage:
    """One stage of training. Made from the config alone (so the data and the checks can use it
    before any model is loaded); :meth:`attach` then gives it the models to run.

    ``roots`` are the wrapped modules that sync gradients across processes (for no_sync /
    set_requires_gradient_sync during gradient accumulation); empty in one process."""

    number: ClassVar[int]
    packing_note: str = ""  # what rows() cut or left out, for the run's log (stages 3-4)
    data_kinds: tuple[str, ...] = ("text", "chat")  # the records it trains on

    @property
    def title(self) -> str:
        return STAGE_TITLES[self.number]

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.needs_teacher

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        self.roots: list[nn.Module] = []
        self.parts: tuple[str, ...] = ()  # names of the loss's parts, after the loss itself

    # ---- data

    def rows(self, tokens: TokenSet, pad_id: int) -> tuple:
        """Training and validation rows (row sources: len() and [i] -> PackedRow) of cfg.seq_len
        tokens, from the two splits of the tokenized data: documents one after another."""
        self.check_kinds(tokens)
        return DocumentRows(tokens.train, self.cfg.seq_len), DocumentRows(tokens.validation, self.cfg.seq_len)

    def check_kinds(self, tokens: TokenSet) -> None:
        """DataError when the data holds records of a kind this stage does not train on."""
        wrong = {k: n for k, n in tokens.counts.items() if n and k not in self.data_kinds}
        if wrong:
            held = ", ".join(f"{n} {k} records" for k, n in wrong.items())
            wanted = " or ".join(self.data_kinds)
            raise DataError(f"stage {self.number} ({self.title}) trains on {wanted} records; --data "
                            f"{self.cfg.data} holds {held}")

    # ---- models: checks, placement, what trains

    def check_student(self, student: RwkvHybridForCausalLM) -> None:
        """ConfigError when the stage cannot train this student."""

    def check_teacher(self, teacher: nn.Module, student: RwkvHybridForCausalLM) -> None:
        """ConfigError when the stage cannot learn from this teacher: its vocabulary must cover
        the student's (a larger one is truncated to the student's, with a warning)."""
        t_vocab, s_vocab = teacher.config.vocab_size, student.config.vocab_size
        if t_vocab < s_vocab:
            raise ConfigError(f"--teacher's vocabulary ({t_vocab}) is smaller than the student's ({s_vocab})")
        if t_vocab > s_vocab:
            warnings.warn(
                f"teacher vocabulary {t_vocab} > student's {s_vocab}: the teacher's logits are "
                "truncated to the student's vocabulary (as ARWKV did)",
                stacklevel=2,
            )

    def place(self, student: RwkvHybridForCausalLM, device: torch.device) -> None:
        """Moves what the stage runs to ``device`` (and sets how it is run)."""
        raise NotImplementedError

    def set_trainable(self, student: RwkvHybridForCausalLM) -> None:
        """requires_grad on what the stage trains, off on the rest."""
        raise NotImplementedError

    # ---- the loss

    def attach(self, student: RwkvHybridForCausalLM, teacher: nn.Module | None, place: Place) -> None:
        """Builds what :meth:`micro_step` runs (wrapped for DDP/FSDP2 when distributed)."""
        raise NotImplementedError

    @staticmethod
    def weight(batch: dict[str, Tensor]) -> int:
        """How many tokens the micro-batch's loss is a mean over (its weight in the step's mean)."""
        return batch["input_ids"].numel()

    def micro_step(self, batch: dict[str, Tensor], scale: float, backward: bool = True) -> list[float]:
        """[loss, ...parts] of the micro-batch; accumulates scale * grad(loss) when backward."""
        raise NotImplementedError


class AlignmentStage(Stage):
    """Stage 1: each time mixer learns to reproduce its layer's teacher attention output from the
    teacher's own input there (AttentionAligner). Only the time mixers run and train; each is
    wrapped on its own (it is called on its own)."""

    number = 1

    def check_teacher(self, teacher, student):
        if (
            teacher.config.num_hidden_layers != student.config.num_hidden_layers
            or teacher.config.hidden_size != student.config.hidden_size
        ):
            raise ConfigError(
                f"stage 1 needs the student's own teacher: --teacher has {teacher.config.num_hidden_layers} "
                f"layers of width {teacher.config.hidden_size}, the student "
                f"{student.config.num_hidden_layers} of {student.config.hidden_size}"
            )
        super().check_teacher(teacher, student)

    def place(self, student, device):
        # only the time mixers run (on the teacher's inputs): the rest stays in host RAM
        for layer in student.model.layers:
            if layer.is_wkv:
                layer.self_attn.to(device)

    def set_trainable(self, student):
        student.requires_grad_(False)
        for layer in student.model.layers:
            if layer.is_wkv:
                layer.self_attn.requires_grad_(True)
        freeze_unused_value_mix(student)

    def attach(self, student, teacher, place):
        mixers = {
            i: wrap(layer.self_attn.time_mixer, self.cfg, place)
            for i, layer in enumerate(student.model.layers)
            if layer.is_wkv
        }
        self.aligner = AttentionAligner(teacher, student, self.cfg.loss, mixers)
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


class WholeStudentStage(Stage):
    """What stages 2-4 share: the whole student runs and trains (but --freeze-mlp /
    --freeze-embeddings parts), on the device, on packed rows. A hybrid's kept attention layers
    train too, and attend only within each packed document (see RwkvHybridModel)."""

    def place(self, student, device):
        student.to(device)
        if self.cfg.activation_checkpointing:
            student.model.gradient_checkpointing = True

    def set_trainable(self, student):
        student.requires_grad_(True)
        if self.cfg.freeze_mlp:
            for layer in student.model.layers:
                layer.mlp.requires_grad_(False)
        freeze_unused_value_mix(student)
        if self.cfg.freeze_embeddings:
            student.model.embed_tokens.requires_grad_(False)

    def whole_rows(self, tokens: TokenSet, make) -> tuple:
        """Training and validation rows of whole examples (stages 3-4), ``make(split)`` from each
        split; packing_note is what they cut or left out."""
        self.check_kinds(tokens)
        train, val = make(tokens.train), make(tokens.validation)
        self.packing_note = "; ".join(f"{name}: {rows.describe()}" for name, rows in
                                      (("training", train), ("validation", val)) if rows.split.documents)
        return train, val


class LogitStage(WholeStudentStage):
    """Stage 2: the teacher online (no grad, its own dtype), KL (+ CE) in chunks."""

    number = 2

    def attach(self, student, teacher, place):
        shard_layers(student, self.cfg, place)
        self.teacher = teacher
        cfg = self.cfg
        self.objective = wrap(
            LogitDistillation(student, cfg.temperature, cfg.ce_weight, cfg.kl_chunk, cfg.kl, cfg.akl_head),
            cfg, place
        )
        self.roots = [self.objective] if place.world > 1 else []
        self.parts = ("akl" if cfg.kl == "adaptive" else "kl", "ce")  # runs of the two cannot be mixed up

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


class SftStage(WholeStudentStage):
    """Stage 3: the student's own next-token loss on the assistant tokens of chat examples
    (labels shifted once, by the model); no teacher."""

    number = 3

    data_kinds = ("chat",)

    def rows(self, tokens, pad_id):
        """Whole conversations per row (ConversationRows), labelled on their assistant tokens."""
        cfg = self.cfg
        train, val = self.whole_rows(
            tokens, lambda split: ConversationRows(split, cfg.seq_len, cfg.overlong, pad_id)
        )
        if not any(bool((train[r].labels != -100).any()) for r in range(len(train))):
            # every assistant answer was cut off (or there was none): nothing to learn
            raise DataError(f"{cfg.data}: the training rows hold no assistant tokens to learn from "
                            f"({self.packing_note}); raise --seq-len, or use --overlong skip")
        self.packing_note += f"; {tokens.train.labelled:,} assistant tokens in the training conversations"
        return train, val

    @staticmethod
    def weight(batch: dict[str, Tensor]) -> int:
        return int((batch["labels"].reshape(-1)[1:] != -100).sum())

    def attach(self, student, teacher, place):
        shard_layers(student, self.cfg, place)
        self.model = wrap(student, self.cfg, place)
        self.roots = [self.model] if place.world > 1 else []

    def micro_step(self, batch, scale, backward=True):
        with torch.set_grad_enabled(backward):
            out = self.model(
                batch["input_ids"], cu_seqlens=batch["cu_seqlens"], labels=batch["labels"], use_cache=False
            )
            # no assistant token in this micro-batch: weight 0, but the backward still runs
            # (DDP/FSDP expect every rank's) and contributes zeros, not NaN
            loss = out.loss if self.weight(batch) else out.logits.sum() * 0.0
            if backward:
                (loss * scale).backward()
        return [loss.item()]


class PreferenceStage(WholeStudentStage):
    """Stage 4: DPO on preference pairs (prompt, chosen, rejected), one pair per row; the frozen
    reference is the --student the run starts from (loaded again from its directory, so a resumed
    run keeps the same reference). Loss per pair: -log sigmoid(beta ((log pi(chosen) - log
    ref(chosen)) - (log pi(rejected) - log ref(rejected)))), log-probabilities summed over the
    answers' tokens; the metrics add the share of pairs ranked right and the mean margin."""

    number = 4

    data_kinds = ("preference",)

    def rows(self, tokens, pad_id):
        cfg = self.cfg
        return self.whole_rows(tokens, lambda split: PreferenceRows(split, cfg.seq_len, cfg.overlong, pad_id))

    @staticmethod
    def weight(batch: dict[str, Tensor]) -> int:
        return batch["input_ids"].shape[0]  # pairs

    def attach(self, student, teacher, place):
        shard_layers(student, self.cfg, place)
        self.policy = wrap(SequenceLogProbs(student), self.cfg, place)
        reference = load_student(self.cfg.student)
        self.reference = SequenceLogProbs(reference.to(place.device).eval().requires_grad_(False))
        self.roots = [self.policy] if place.world > 1 else []
        self.parts = ("reward_accuracy", "margin")

    def micro_step(self, batch, scale, backward=True):
        args = (batch["input_ids"], batch["cu_seqlens"], batch["labels"], batch["position_ids"])
        with torch.no_grad():
            ref = self.reference(*args)
        with torch.set_grad_enabled(backward):
            policy = self.policy(*args)
            loss, margin = dpo_loss(policy, ref, self.cfg.dpo_beta)
            if backward:
                (loss * scale).backward()
        return [loss.item(), (margin > 0).float().mean().item(), margin.mean().item()]


# --stage N -> its class (the numbers, titles and which stages need a teacher are options.py's)
STAGES: dict[int, type[Stage]] = {
    cls.number: cls for cls in (AlignmentStage, LogitStage, SftStage, PreferenceStage)
}


def make_stage(cfg: DistillConfig) -> Stage:
    """The stage that cfg.stage names."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"--stage {cfg.stage}: expected one of {', '.join(map(str, STAGES))}")
    return STAGES[cfg.stage](cfg)

