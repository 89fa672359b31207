"""The ARWKV student model: recurrence consistency (full sequence = step by step = prefill +
decode = packed), conversion from tiny random teachers of several families, and the transfer
initialisation (bit-exact copies, grouped key/value heads in the teacher's order)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from arwkv.modeling_rwkv_hybrid import RwkvHybridForCausalLM, expand_kv_heads, student_from_teacher
from arwkv_ext.testing import rel_error

VOCAB = 101


def tiny_teacher(family: str = "qwen2", tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    if family == "qwen3":  # head_dim 64 x 4 heads = 256 != hidden 128
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=64)).eval()
    raise ValueError(family)


def logits_step_by_step(model: RwkvHybridForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    state, out = None, []
    for t in range(ids.shape[1]):
        logits, state = model(ids[:, t:t + 1], state)
        out.append(logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("gate,group_norm,head_size",
                         [(True, False, 32), (False, False, 64), (True, True, 32)])
@torch.no_grad()
def test_full_sequence_equals_step_by_step(gate, group_norm, head_size):
    student = student_from_teacher(tiny_teacher(), gate=gate, group_norm=group_norm, head_size=head_size)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    full, _ = student(ids)
    assert rel_error(logits_step_by_step(student, ids), full) <= 1e-4


@torch.no_grad()
def test_prefill_then_decode_equals_one_forward():
    student = student_from_teacher(tiny_teacher(), head_size=32)
    ids = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(2))
    full, final = student(ids)
    prefix, state = student(ids[:, :17])
    rest, state = student(ids[:, 17:], state)
    assert rel_error(torch.cat([prefix, rest], 1), full) <= 1e-5
    for a, b in zip(state, final, strict=True):
        assert rel_error(a.wkv, b.wkv) <= 1e-5 and torch.equal(a.shift, b.shift)


@torch.no_grad()
def test_packed_sequences_equal_separate_calls():
    student = student_from_teacher(tiny_teacher(), head_size=32)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (5, 1, 12)]
    packed, _ = student(torch.cat(seqs, 1), cu_seqlens=torch.tensor([0, 5, 6, 18]))
    separate = torch.cat([student(s)[0] for s in seqs], 1)
    assert rel_error(packed, separate) <= 1e-5


def test_transfer_copies_teacher_weights_exactly_and_unties_embeddings():
    teacher = tiny_teacher(tie=True)
    student = student_from_teacher(teacher, head_size=32)
    t, s = teacher.state_dict(), student.state_dict()
    for name, value in t.items():
        if ".self_attn." in name or name == "model.rotary_emb.inv_freq":
            continue
        assert torch.equal(s[name], value), name
    assert torch.equal(s["lm_head.weight"], t["model.embed_tokens.weight"])
    assert student.lm_head.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()
    tm, att = student.model.layers[1].self_attn.time_mixer, teacher.model.layers[1].self_attn
    assert torch.equal(tm.receptance.weight, att.q_proj.weight)
    assert torch.equal(tm.receptance.bias, att.q_proj.bias)
    assert torch.equal(tm.output.weight, att.o_proj.weight)


@torch.no_grad()
def test_grouped_kv_heads_expand_in_the_teachers_order():
    """student.key(x) equals the teacher's keys as its attention uses them (after repeat_kv)."""
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv

    teacher = tiny_teacher()
    student = student_from_teacher(teacher, head_size=32)
    att, tm = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn.time_mixer
    x = torch.randn(2, 7, 128)
    cfg = teacher.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for proj, mine in ((att.k_proj, tm.key), (att.v_proj, tm.value)):
        kv = proj(x).view(2, 7, cfg.num_key_value_heads, hd).transpose(1, 2)
        used = repeat_kv(kv, cfg.num_attention_heads // cfg.num_key_value_heads)
        used = used.transpose(1, 2).reshape(2, 7, -1)
        torch.testing.assert_close(mine(x), used, rtol=0, atol=1e-6)
    # and the helper keeps the order on its own: head i of 2 serves query heads 2i, 2i+1
    w = torch.arange(2 * 3 * 5.0).view(6, 5)
    assert torch.equal(expand_kv_heads(w, 2, 4), torch.cat([w[:3], w[:3], w[3:], w[3:]]))


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral", "qwen3"])
@torch.no_grad()
def test_teacher_families_convert_and_run(family):
    teacher = tiny_teacher(family)
    student = student_from_teacher(teacher, head_size=32)
    assert student.config.teacher_model_type == family
    assert student.config.attention_hidden_size == teacher.config.num_attention_heads * (
        getattr(teacher.config, "head_dim", None) or 32)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    full, _ = student(ids)
    assert torch.isfinite(full).all() and full.shape == (2, 9, VOCAB)
    assert rel_error(logits_step_by_step(student, ids), full) <= 1e-4


def test_fresh_init_follows_arwkv_and_keeps_linear_default():
    teacher = tiny_teacher()
    student = student_from_teacher(teacher, init="fresh", head_size=32)
    tm = student.model.layers[2].self_attn.time_mixer
    assert not torch.equal(tm.receptance.weight, teacher.model.layers[2].self_attn.q_proj.weight)
    assert tm.receptance.bias is None
    bound = 1 / 128**0.5  # nn.Linear's default: uniform(-1/sqrt(C), 1/sqrt(C))
    assert tm.key.weight.abs().max() <= bound and tm.key.weight.std() > 0.5 * bound / 3**0.5
    assert torch.all(tm.k_k == 0.85) and torch.all(tm.v0 == 1) and torch.all(tm.w1 == 0)
    decay = torch.exp(-torch.exp(-torch.nn.functional.softplus(-tm.w0) - 0.5))
    assert decay.min() > 0.545 and decay.max() < 1


def test_gradients_reach_every_time_mixer_parameter():
    student = student_from_teacher(tiny_teacher(), head_size=32)
    for p in student.parameters():  # nonzero low-rank paths so every parameter matters
        p.data.add_(torch.randn_like(p) * 1e-2)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    logits, _ = student(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, p in student.named_parameters():
        # layer 0 makes v_first: its value-residual parameters exist (as in the published layout) unused
        if "time_mixer" in name and not any(f"layers.0.self_attn.time_mixer.{v}" == name[6:] for v in
                                            ("v0", "v1", "v2")):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # the value residual carries gradient back into layer 0's value projection from later layers
    assert student.model.layers[0].self_attn.time_mixer.value.weight.grad.abs().sum() > 0


def test_bad_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="init must be"):
        student_from_teacher(tiny_teacher(), init="copy")
    with pytest.raises(ValueError, match="head_size 48"):
        student_from_teacher(tiny_teacher(), head_size=48)
