"""The losses of the four stages (the ARWKV paper, Lin et al. 2025; docs/distillation.md):
stage 1, attention alignment (``AttentionAligner``); stage 2, logit distillation
(``LogitDistillation``: chunked forward or adaptive KL over the full vocabulary, plus an optional
CE term); stage 3 (SFT), the student's own next-token loss on the assistant tokens (the model
computes it); stage 4, DPO (``dpo_loss`` over ``SequenceLogProbs``). stages.py builds each
stage's loss from these; trainer.py runs them.

Stage 1 trains each student time mixer to reproduce its layer's teacher attention output from
the teacher's own input at that layer (teacher-forced, every layer at once). The student layer
runs inside a forward hook on the teacher's attention, and its loss is back-propagated right
there, so only one layer's student graph exists at a time: peak memory is the teacher's
inference plus about one student layer's activations, whatever the depth.

The value residual: time-mixing layers after the first take ``v_first`` from the first one, as
in the model, but detached here (each layer trains on its own teacher-forced input; carrying
layer 0's graph to every later layer would hold it for the whole pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.modeling_rwkv_hybrid import RwkvHybridForCausalLM

Tensor = torch.Tensor


def alignment_loss(student: Tensor, teacher: Tensor, kind: str = "rms", mask: Tensor | None = None) -> Tensor:
    """Per-layer loss between attention outputs [B, T, C], over the tokens where mask [B, T] is 1.

    rms: ARWKV's mean over tokens of ||y_teacher - y_student||_2 / sqrt(C) (a per-token RMS error);
    mse: the mean squared error.
    """
    if kind not in ("rms", "mse"):
        raise ValueError(f"alignment loss must be 'rms' or 'mse', got {kind!r}")
    diff = student.float() - teacher.float()
    per_token = diff.norm(dim=-1) / math.sqrt(diff.shape[-1]) if kind == "rms" else diff.square().mean(dim=-1)
    if mask is None:
        return per_token.mean()
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1)


class AttentionAligner:
    """Stage 1 for one (teacher, student) pair: ``step(...)`` accumulates gradients into the
    student's time mixers and returns the per-layer losses (floats).

    The teacher runs under no_grad in its own dtype; hooks on its attention modules feed each
    layer's normed input to the matching student time mixer and back-propagate that layer's
    loss (divided by the number of layers, so the gradient is that of their mean) before the
    teacher moves on to the next layer. ``mixers`` maps a layer index to what to call instead of
    the student's own time mixer there (a DistributedDataParallel or FSDP wrapper of it).
    """

    def __init__(self, teacher: nn.Module, student: RwkvHybridForCausalLM, loss: str = "rms",
                 mixers: dict[int, Callable] | None = None) -> None:
        alignment_loss(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), loss)  # validates the name
        self.teacher, self.student, self.loss = teacher, student, loss
        self.layers = [i for i, layer in enumerate(student.model.layers) if layer.is_wkv]
        if len(teacher.model.layers) != len(student.model.layers):
            raise ValueError(f"teacher has {len(teacher.model.layers)} layers, "
                             f"student {len(student.model.layers)}")
        self.mixers = {i: student.model.layers[i].self_attn.time_mixer for i in self.layers}
        self.mixers.update(mixers or {})

    def step(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             position_ids: Tensor | None = None, cu_seqlens: Tensor | None = None,
             scale: float = 1.0, backward: bool = True) -> list[float]:
        """input_ids [B, T]; attention_mask [B, T] (0 at left padding, which does not count); or,
        for packed rows, position_ids [B, T] restarting at each document (the teacher's view) and
        cu_seqlens over the B * T tokens (the student's). The gradient is that of
        ``scale * mean over layers``; backward=False only measures the losses."""
        losses: dict[int, float] = {}
        scale = scale / len(self.layers)
        v_first: list[Tensor | None] = [None]
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None

        def hook_for(i: int) -> Callable:
            mixer = self.mixers[i]
            dtype = self.student.model.layers[i].self_attn.time_mixer.output.weight.dtype

            def hook(module, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                target = output[0] if isinstance(output, tuple) else output
                with torch.set_grad_enabled(backward):
                    x_in = x.detach().to(dtype)
                    if cu_seqlens is not None:  # the student sees the rows as one packed sequence
                        x_in = x_in.reshape(1, -1, x_in.shape[-1])
                    y, _, v = mixer(x_in, None, v_first[0], cu_seqlens, mask)
                    if v_first[0] is None and v is not None:  # (RWKV-6 has no value residual)
                        v_first[0] = v.detach()
                    loss = alignment_loss(y.view_as(target), target.detach(), self.loss, mask)
                    if backward:
                        (loss * scale).backward()
                losses[i] = loss.item()

            return hook

        attentions = [self.teacher.model.layers[i].self_attn for i in self.layers]
        handles = [a.register_forward_hook(hook_for(i), with_kwargs=True)
                   for a, i in zip(attentions, self.layers, strict=True)]
        try:
            with torch.no_grad():
                self.teacher.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return [losses[i] for i in self.layers]


def alignment_losses_keeping_graphs(teacher: nn.Module, student: RwkvHybridForCausalLM, input_ids: Tensor,
                                    attention_mask: Tensor | None = None, loss: str = "rms") -> list[Tensor]:
    """The plain stage-1 computation the aligner must match: capture every layer's attention
    input and output in one teacher pass, then run every student time mixer on them, keeping
    all their graphs. Per-layer losses (tensors, not yet back-propagated). For tests and
    benchmarks: its memory grows with the depth."""
    seen = {}

    def capture(i: int) -> Callable:
        def hook(module, args, kwargs, output):
            seen[i] = (args[0] if args else kwargs["hidden_states"], output[0])
        return hook

    hooks = [layer.self_attn.register_forward_hook(capture(i), with_kwargs=True)
             for i, layer in enumerate(teacher.model.layers)]
    try:
        with torch.no_grad():
            teacher.model(input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
    losses, v_first = [], None
    for i, layer in enumerate(student.model.layers):
        if not layer.is_wkv:
            continue
        x, target = seen[i]
        y, _, v = layer.self_attn.time_mixer(x, None, v_first, None, mask)
        v_first = v.detach() if v_first is None and v is not None else v_first
        losses.append(alignment_loss(y, target, loss, mask))
    return losses


def adaptive_kl(t: Tensor, s: Tensor, head: float = 0.5) -> Tensor:
    """Adaptive KL (Wu et al., 2024, "Rethinking KL divergence in knowledge distillation for
    LLMs") per token, from log-probabilities t (teacher) and s (student) [N, V] -> [N].

    The vocabulary splits at the teacher's "head": its most likely tokens, in order, until their
    probability adds up to ``head`` (the first always, and the one that crosses it). Forward KL
    fits the head first, reverse KL the tail, so each token weighs them by where the student is
    off: (g_head * KL(t || s) + g_tail * KL(s || t)) / (g_head + g_tail), with g the summed
    |p_teacher - p_student| over each part (weights without gradient).
    """
    p, q = t.exp(), s.exp()
    with torch.no_grad():
        sorted_p, order = p.sort(dim=-1, descending=True)
        in_head = (sorted_p.cumsum(-1) - sorted_p) < head  # the mass before a token is still short of head
        head_mask = torch.zeros_like(in_head).scatter_(-1, order, in_head)
        gap = (p - q).abs()
        g_head = (gap * head_mask).sum(-1)
        g_tail = (gap * ~head_mask).sum(-1)
        total = (g_head + g_tail).clamp(min=1e-12)
    forward = (p * (t - s)).sum(-1)
    reverse = (q * (s - t)).sum(-1)
    return (g_head * forward + g_tail * reverse) / total


def _kl_chunk(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
              temperature: float, targets: Tensor | None = None, kind: str = "forward",
              head: float = 0.5) -> Tensor:
    """[2]: the sums over the chunk's tokens of the divergence (KL(teacher || student), or
    :func:`adaptive_kl` for kind "adaptive") at the temperature and of the student's
    cross-entropy on targets (next tokens, -100 ignored; 0 without targets), in float32. The
    teacher's logits are truncated to the student's vocabulary when the teacher's is larger."""
    s_logits = (student_hidden @ student_head.t()).float()
    with torch.no_grad():
        t_logits = (teacher_hidden @ teacher_head.t()).float()[:, : s_logits.shape[-1]]
    s = torch.log_softmax(s_logits / temperature, dim=-1)
    t = torch.log_softmax(t_logits / temperature, dim=-1)
    kl = adaptive_kl(t, s, head).sum() if kind == "adaptive" else (t.exp() * (t - s)).sum()
    ce = (F.cross_entropy(s_logits, targets, ignore_index=-100, reduction="sum") if targets is not None
          else kl.new_zeros(()))
    return torch.stack([kl, ce])


def chunked_logit_losses(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor,
                         teacher_head: Tensor, mask: Tensor | None = None, targets: Tensor | None = None,
                         temperature: float = 1.0, chunk: int = 512, kind: str = "forward",
                         head: float = 0.5) -> tuple[Tensor, Tensor | None]:
    """Stage 2's losses: the mean over (unmasked) tokens of KL(teacher || student) over the full
    vocabulary (kind "adaptive": :func:`adaptive_kl` with its ``head``), and (given targets) the
    student's mean next-token cross-entropy.

    student_hidden [N, C] and teacher_hidden [N, C_t] are the final hidden states (flattened over
    batch and time), student_head [V, C] and teacher_head [V_t, C_t] the lm_head weights, mask
    [N] (0: no loss at this token), targets [N] the token each position predicts (-100: none).
    Logits are made chunk by chunk and again in the backward (activation checkpointing), so
    neither model's N x V logits ever exist: only the hidden states are kept. The KL is
    multiplied by temperature**2, as usual, so gradients keep their scale.
    """
    from torch.utils.checkpoint import checkpoint

    N = student_hidden.shape[0]
    weight = None if mask is None else mask.reshape(-1).to(torch.float32)
    teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()
    total = student_hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, N, chunk):
        part = slice(start, min(N, start + chunk))
        h, th = student_hidden[part], teacher_hidden[part]
        tgt = targets[part] if targets is not None else None
        if weight is not None:
            keep = weight[part] > 0
            if not bool(keep.any()):
                continue
            h, th = h[keep], th[keep]
            tgt = tgt[keep] if tgt is not None else None
        total = total + checkpoint(_kl_chunk, h, student_head, th, teacher_head, temperature, tgt, kind, head,
                                   use_reentrant=False)
    count = float(N) if weight is None else float(weight.sum().clamp(min=1))
    kl = total[0] / count * temperature**2
    if targets is None:
        return kl, None
    kept = targets if weight is None else targets[weight > 0]
    return kl, total[1] / (kept != -100).sum().clamp(min=1)


def chunked_kl(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
               mask: Tensor | None = None, temperature: float = 1.0, chunk: int = 512) -> Tensor:
    """The KL part of :func:`chunked_logit_losses` alone."""
    return chunked_logit_losses(student_hidden, student_head, teacher_hidden, teacher_head, mask,
                                temperature=temperature, chunk=chunk)[0]


def next_token_targets(labels: Tensor) -> Tensor:
    """labels [B, T] (aligned with the inputs) -> what each position predicts [B, T]: labels
    shifted left by one, -100 at each row's last position."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)


class LogitDistillation(nn.Module):
    """Stage 2's objective as a module around the student, so DistributedDataParallel or FSDP
    wrap it and the student's lm_head is used inside the wrapped forward.

    forward(input_ids [B, T], cu_seqlens [S + 1], labels [B, T], teacher_hidden [B, T, C_t],
    teacher_head [V_t, C_t]) -> [3]: the loss (KL + ce_weight * CE), the KL (or adaptive KL,
    kind "adaptive"), the CE (0 when ce_weight is 0: then it is not computed).
    """

    def __init__(self, student: RwkvHybridForCausalLM, temperature: float = 1.0, ce_weight: float = 0.0,
                 chunk: int = 512, kind: str = "forward", head: float = 0.5) -> None:
        super().__init__()
        self.student, self.temperature, self.ce_weight, self.chunk = student, temperature, ce_weight, chunk
        self.kind, self.head = kind, head

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor, labels: Tensor, teacher_hidden: Tensor,
                teacher_head: Tensor) -> Tensor:
        B, T = input_ids.shape
        hidden, _ = self.student.model(input_ids, cu_seqlens=cu_seqlens)
        targets = next_token_targets(labels).reshape(-1) if self.ce_weight else None
        kl, ce = chunked_logit_losses(hidden.reshape(B * T, -1), self.student.lm_head.weight,
                                      teacher_hidden.reshape(B * T, -1), teacher_head, targets=targets,
                                      temperature=self.temperature, chunk=self.chunk, kind=self.kind,
                                      head=self.head)
        ce = ce if ce is not None else torch.zeros_like(kl)
        return torch.stack([kl + self.ce_weight * ce, kl, ce])


class SequenceLogProbs(nn.Module):
    """Stage 4's forward as a module around a model (so DDP / FSDP wrap it): the log-probability
    of each row's two sequences' labelled tokens.

    forward(input_ids [B, T], cu_seqlens, labels [B, T] (aligned with the inputs, -100: no
    label), position_ids [B, T] (0 at each sequence start)) -> [B, 2]: per row, the sums of
    log p(label) over its first and its second sequence (float32). Later sequences (padding)
    carry no labels.
    """

    def __init__(self, model: RwkvHybridForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor, labels: Tensor, position_ids: Tensor) -> Tensor:
        B, T = input_ids.shape
        logits = self.model(input_ids, cu_seqlens=cu_seqlens, use_cache=False).logits
        targets = next_token_targets(labels)  # what each position predicts [B, T]
        logp = torch.log_softmax(logits.float().reshape(B, T, -1), dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
        sequence = ((position_ids == 0).cumsum(-1) - 1).clamp(min=0, max=2)  # 0, 1; 2: padding
        sums = picked.new_zeros(B, 3).scatter_add_(1, sequence, picked)
        return sums[:, :2]


def dpo_loss(policy: Tensor, reference: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Stage 4's DPO loss of a batch of pairs, and each pair's margin.

    policy, reference: [B, 2] summed log-probabilities of each pair's (chosen, rejected) answer
    under the trained model and under the frozen reference (SequenceLogProbs).
    margin = beta ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)));
    loss = mean over pairs of -log sigmoid(margin). Returns (loss [], margin [B]).
    """
    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    return -torch.nn.functional.logsigmoid(margin).mean(), margin
