"""The ARWKV student model: recurrence consistency (full sequence = step by step = prefill +
decode = packed), conversion from tiny random teachers of several families, and the transfer
initialisation (bit-exact copies, grouped key/value heads in the teacher's order)."""

from __future__ import annotations

import json

import pytest
import torch

from arwkv.conversion.convert import expand_kv_heads, student_from_teacher
from arwkv.models.modeling_rwkv_hybrid import LayerState, RwkvHybridForCausalLM
from arwkv_ext.testing import rel_error
from fixtures import VOCAB, tiny_teacher

# the time mixings a student can have: RWKV-7, RWKV-6 in its qrwkv form (convert's default) and finch
MIXINGS = pytest.mark.parametrize("mixing", [dict(wkv=7), dict(wkv=6), dict(wkv=6, wkv6_form="finch")],
                                  ids=["rwkv7", "rwkv6-qrwkv", "rwkv6-finch"])


def logits_step_by_step(model: RwkvHybridForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    cache, out = None, []
    for t in range(ids.shape[1]):
        step = model(ids[:, t:t + 1], cache=cache)
        cache = step.cache
        out.append(step.logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("gate,group_norm,head_size",
                         [(True, False, 32), (False, False, 64), (True, True, 32), (True, False, 128)])
@MIXINGS
@torch.no_grad()
def test_full_sequence_equals_step_by_step(mixing, gate, group_norm, head_size):
    student = student_from_teacher(tiny_teacher(), gate=gate, group_norm=group_norm, head_size=head_size,
                                   **mixing)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    full = student(ids).logits
    assert rel_error(logits_step_by_step(student, ids), full) <= 1e-4


@MIXINGS
@torch.no_grad()
def test_prefill_then_decode_equals_one_forward(mixing):
    student = student_from_teacher(tiny_teacher(), head_size=32, **mixing)
    ids = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(2))
    full = student(ids)
    prefix = student(ids[:, :17])
    rest = student(ids[:, 17:], cache=prefix.cache)
    assert rel_error(torch.cat([prefix.logits, rest.logits], 1), full.logits) <= 1e-5
    assert rest.cache.seen_tokens == 30
    # Within float32 rounding, not to the bit: the chunked CPU kernels start their 16-step chunk
    # grid at each call's first token, so a split at token 17 rounds differently from one pass.
    for a, b in zip(rest.cache.layers, full.cache.layers, strict=True):
        assert rel_error(a.wkv, b.wkv) <= 1e-5 and rel_error(a.shift, b.shift) <= 1e-5


@MIXINGS
@torch.no_grad()
def test_packed_sequences_equal_separate_calls(mixing):
    student = student_from_teacher(tiny_teacher(), head_size=32, **mixing)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=g) for n in (5, 1, 12)]
    packed = student(torch.cat(seqs, 1), cu_seqlens=torch.tensor([0, 5, 6, 18])).logits
    separate = torch.cat([student(s).logits for s in seqs], 1)
    assert rel_error(packed, separate) <= 1e-5


@MIXINGS
@torch.no_grad()
def test_packed_sequences_continue_from_their_own_states(mixing):
    """A time mixer given cu_seqlens and one carried state per sequence (what a server batching
    requests at different points does) equals each sequence continued alone, states included."""
    mixer = student_from_teacher(tiny_teacher(), head_size=32, **mixing).model.layers[1].self_attn.time_mixer
    g = torch.Generator().manual_seed(4)
    lengths = (3, 1, 9)
    before = [torch.randn(1, n, 128, generator=g) for n in (6, 2, 4)]  # earlier tokens of each
    after = [torch.randn(1, n, 128, generator=g) for n in lengths]
    states = [mixer(x)[1] for x in before]
    alone = [mixer(x, state)[:2] for x, state in zip(after, states, strict=True)]
    carried = LayerState(shift=torch.cat([s.shift for s in states]), wkv=torch.cat([s.wkv for s in states]))
    y, state, _ = mixer(torch.cat(after, 1), carried, cu_seqlens=torch.tensor([0, 3, 4, 13]))
    assert rel_error(y, torch.cat([out for out, _ in alone], 1)) <= 1e-5
    assert rel_error(state.shift, torch.cat([s.shift for _, s in alone])) == 0
    assert rel_error(state.wkv, torch.cat([s.wkv for _, s in alone])) <= 1e-5


def qrwkv_reference(m, x: torch.Tensor, shift: torch.Tensor, S: torch.Tensor):
    """The QRWKV6 time mixing from its formula, a token at a time (float64): x [B, T, C], the
    carried last token [B, C] and state [B, H, N(value), N(key)] -> output [B, T, C], state."""
    p = {name: t.double() for name, t in m.named_parameters()}
    B, T, C = x.shape
    H, N = m.num_heads, m.head_size
    xx = torch.cat([shift[:, None], x[:, :-1]], 1) - x
    low = torch.tanh((x + xx * p["time_maa_x"]) @ p["time_maa_w1"]).view(B, T, 5, -1)
    mix = torch.einsum("btjr,jrc->jbtc", low, p["time_maa_w2"])
    xw, xk, xv, xr, xg = (x + xx * (p[f"time_maa_{z}"] + mix[j]) for j, z in enumerate("wkvrg"))

    def linear(name, z):
        return z @ p[f"{name}.weight"].T + (p[f"{name}.bias"] if f"{name}.bias" in p else 0)

    r, k, v, g = linear("receptance", xr), linear("key", xk), linear("value", xv), linear("gate", xg)
    d = torch.exp(-torch.exp(p["time_decay"] + torch.tanh(xw @ p["time_decay_w1"]) @ p["time_decay_w2"]))
    k = k * (1 - d)
    ys = []
    for t in range(T):
        rt, kt, vt, dt = (z[:, t].view(B, H, N) for z in (r, k, v, d))
        S = S * dt[:, :, None, :] + vt[..., :, None] * kt[..., None, :]  # update, then read
        ys.append(torch.einsum("bhij,bhj->bhi", S, rt) / N**0.5)
    y = torch.stack(ys, 1).reshape(B, T, H * N) * torch.sigmoid(g)
    return linear("output", y), S


@torch.no_grad()
def test_qrwkv_form_is_the_recurrence_llama_cpp_computes():
    """The qrwkv form equals its formula run token by token (llama.cpp's rwkv6qwen2 runs that
    formula), from a carried state, with decays from near 0 to near 1 and q/k/v biases."""
    student = student_from_teacher(tiny_teacher(), head_size=32, wkv=6, keep_bias=True)
    m = student.model.layers[1].self_attn.time_mixer
    g = torch.Generator().manual_seed(11)
    for p in m.parameters():  # every path nonzero
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    m.time_decay.copy_(torch.linspace(-4, 2.5, m.time_decay.numel()).view_as(m.time_decay))  # d 0.98 .. 5e-6
    B, T, C = 2, 21, 128
    x, shift = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
    S = torch.randn(B, m.num_heads, 32, 32, generator=g)
    y, state, _ = m(x, LayerState(shift=shift, wkv=S))
    y_ref, S_ref = qrwkv_reference(m, x.double(), shift.double(), S.double())
    assert rel_error(y, y_ref) <= 1e-5 and rel_error(state.wkv, S_ref) <= 1e-5
    assert torch.equal(state.shift, x[:, -1])


def test_transfer_copies_teacher_weights_exactly_and_unties_embeddings():
    teacher = tiny_teacher(tie=True)
    student = student_from_teacher(teacher, head_size=32, keep_bias=True)
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
    full = student(ids).logits
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


@MIXINGS
def test_gradients_reach_every_time_mixer_parameter(mixing):
    student = student_from_teacher(tiny_teacher(), head_size=32, **mixing)
    for p in student.parameters():  # nonzero low-rank paths so every parameter matters
        p.data.add_(torch.randn_like(p) * 1e-2)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    student(ids, labels=ids).loss.backward()
    for name, p in student.named_parameters():
        # layer 0 makes v_first: its value-residual parameters exist (as in the published layout) unused
        if "time_mixer" in name and not any(f"layers.0.self_attn.time_mixer.{v}" == name[6:] for v in
                                            ("v0", "v1", "v2")):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # the value residual carries gradient back into layer 0's value projection from later layers
    assert student.model.layers[0].self_attn.time_mixer.value.weight.grad.abs().sum() > 0
    if mixing.get("wkv") == 6:  # the bonus is the finch form's only
        assert hasattr(student.model.layers[0].self_attn.time_mixer, "time_faaaa") == (
            mixing.get("wkv6_form") == "finch")


def test_biases_dropped_by_default_and_kept_when_asked():
    """The default is the published layout (no receptance/key/value biases); keep_bias=True copies
    the teacher's."""
    teacher = tiny_teacher()
    kept = student_from_teacher(teacher, head_size=32, keep_bias=True)
    dropped = student_from_teacher(teacher, head_size=32)
    assert kept.config.wkv_qkv_bias and not dropped.config.wkv_qkv_bias
    tm = dropped.model.layers[0].self_attn.time_mixer
    assert tm.receptance.bias is None and tm.key.bias is None and tm.value.bias is None
    assert torch.equal(tm.receptance.weight, teacher.model.layers[0].self_attn.q_proj.weight)


def test_bad_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="init must be"):
        student_from_teacher(tiny_teacher(), init="copy")
    with pytest.raises(ValueError, match="head_size 48"):
        student_from_teacher(tiny_teacher(), head_size=48)


@MIXINGS
@torch.no_grad()
def test_left_padding_leaves_the_state_untouched(mixing):
    """A left-padded row gives the same logits at its real tokens, and the same cache, as the
    prompt alone."""
    student = student_from_teacher(tiny_teacher(), head_size=32, **mixing)
    g = torch.Generator().manual_seed(6)
    short, long = torch.randint(0, VOCAB, (1, 5), generator=g), torch.randint(0, VOCAB, (1, 9), generator=g)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    out = student(batch, attention_mask=mask)
    alone = student(short)
    assert rel_error(out.logits[0, 4:], alone.logits[0]) <= 1e-5
    for a, b in zip(out.cache.layers, alone.cache.layers, strict=True):
        assert rel_error(a.wkv[0], b.wkv[0]) <= 1e-5 and rel_error(a.shift[0], b.shift[0]) <= 1e-6


@MIXINGS
@torch.no_grad()
def test_generate_greedy_matches_manual_decoding_and_padding(mixing):
    student = student_from_teacher(tiny_teacher(), head_size=32, **mixing)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(1, VOCAB, (1, 4), generator=g), torch.randint(1, VOCAB, (1, 7), generator=g)
    out_a = student.generate(a, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # manual greedy decoding through the cache
    step, tokens = student(a), []
    for _ in range(6):
        tokens.append(step.logits[:, -1].argmax(-1, keepdim=True))
        step = student(tokens[-1], cache=step.cache)
    assert torch.equal(out_a[:, 4:], torch.cat(tokens, 1))
    # a left-padded batch generates what each prompt generates alone
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    out = student.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out_b = student.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 7:], out_a[0, 4:]) and torch.equal(out[1, 7:], out_b[0, 7:])
    sampled = student.generate(a, max_new_tokens=5, do_sample=True, top_k=5, pad_token_id=0)
    assert sampled.shape == (1, 9)


@MIXINGS
def test_save_load_round_trip_in_a_fresh_offline_process(tmp_path, mixing):
    """save_pretrained -> AutoModelForCausalLM.from_pretrained(trust_remote_code=True) in a new
    Python process, offline, reproduces the logits exactly."""
    import json
    import subprocess
    import sys

    student = student_from_teacher(tiny_teacher(), head_size=32, **mixing)
    out = tmp_path / "student"
    student.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "rwkv_hybrid" and config["architectures"] == ["RwkvHybridForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rwkv_hybrid.RwkvHybridForCausalLM"
    keys = {"head_size", "head_size_divisor", "wkv_version", "wkv_has_gate", "wkv_has_group_norm"}
    assert keys <= set(config)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = student(ids).logits
    torch.save({"ids": ids, "logits": want}, tmp_path / "want.pt")
    script = f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
d = torch.load({str(tmp_path / 'want.pt')!r})
with torch.no_grad():
    got = m(d["ids"]).logits
assert type(m).__name__ == "RwkvHybridForCausalLM", type(m)
assert torch.equal(got, d["logits"]), (got - d["logits"]).abs().max()
print("ok")
"""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": "/usr/bin:/bin"}
    import os
    env.update({k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME")})
    # from tmp_path: in a checkout's root, its arwkv_ext/ source folder would shadow the installed one
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@MIXINGS
@torch.no_grad()
def test_beam_search_scores_match_a_full_forward(mixing):
    """Beam search reorders the recurrent cache: the score it reports for its best sequence is
    the log-probability a fresh full forward gives that sequence."""
    student = student_from_teacher(tiny_teacher(), head_size=32, **mixing)
    prompt = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(9))
    out = student.generate(prompt, num_beams=3, max_new_tokens=5, do_sample=False, length_penalty=0.0,
                           pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    seq = out.sequences
    logp = torch.log_softmax(student(seq).logits[0, 4:-1].float(), dim=-1)
    recomputed = logp.gather(-1, seq[0, 5:, None]).sum()
    torch.testing.assert_close(out.sequences_scores[0], recomputed, rtol=1e-4, atol=1e-4)


def write_published_checkpoint(directory, tied: bool = False, **extra_config) -> dict[str, torch.Tensor]:
    """A 2-layer checkpoint in the published rwkv_hybrid layout (Qwen2's config keys plus
    head_size & co., none of arwkv's optional additions; weights under the published names) in
    ``directory``; with ``tied``, tie_word_embeddings and no lm_head tensor. Returns the weights."""
    import json

    from safetensors.torch import save_file

    C, L, H = 128, 2, 2
    config = {
        "architectures": ["RwkvHybridForCausalLM"], "model_type": "rwkv_hybrid",
        "auto_map": {"AutoConfig": "configuration_rwkv_hybrid.RwkvHybridConfig",
                     "AutoModelForCausalLM": "modeling_rwkv_hybrid.RwkvHybridForCausalLM"},
        "vocab_size": VOCAB, "hidden_size": C, "intermediate_size": 256, "num_hidden_layers": L,
        "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "rope_theta": 1000000.0, "tie_word_embeddings": tied,
        "head_size": 64, "head_size_divisor": 8, "wkv_version": 7, "wkv_has_gate": True,
        "wkv_has_group_norm": True, "torch_dtype": "float32", **extra_config,
    }
    g = torch.Generator().manual_seed(10)
    shapes = {"model.embed_tokens.weight": (VOCAB, C), "model.norm.weight": (C,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, C)
    for i in range(L):
        t = f"model.layers.{i}.self_attn.time_mixer."
        shapes.update({t + n: (1, 1, C) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0",
                                                  "k_k", "k_a")})
        shapes.update({t + "w1": (C, 64), t + "w2": (64, C), t + "a1": (C, 64), t + "a2": (64, C),
                       t + "v1": (C, 32), t + "v2": (32, C), t + "g1": (C, 128), t + "g2": (128, C),
                       t + "r_k": (H, 64), t + "ln_x.weight": (C,), t + "ln_x.bias": (C,)})
        shapes.update({t + f"{n}.weight": (C, C) for n in ("receptance", "key", "value", "output")})
        m = f"model.layers.{i}."
        shapes.update({m + "mlp.gate_proj.weight": (256, C), m + "mlp.up_proj.weight": (256, C),
                       m + "mlp.down_proj.weight": (C, 256), m + "input_layernorm.weight": (C,),
                       m + "post_attention_layernorm.weight": (C,)})
    weights = {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes.items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return weights


def test_a_checkpoint_in_the_published_layout_loads(tmp_path):
    """A config with only the published rwkv_hybrid keys and weights under the published names
    load without a missing or unexpected tensor."""
    weights = write_published_checkpoint(tmp_path)
    model, info = RwkvHybridForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    assert all(torch.equal(state[n], w) for n, w in weights.items())
    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_tied_embeddings_without_lm_head_are_tied(tmp_path):
    """tie_word_embeddings and no lm_head tensor (the published small configs): the output layer
    is the input embedding, as transformers ties the teacher's, not a random matrix."""
    weights = write_published_checkpoint(tmp_path, tied=True)
    model = RwkvHybridForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(model.lm_head.weight, weights["model.embed_tokens.weight"])
    h = torch.randn(3, 128)
    torch.testing.assert_close(model.lm_head(h), h @ weights["model.embed_tokens.weight"].T)


def test_a_missing_tensor_is_reported_and_the_loaded_ones_are_kept(tmp_path):
    """A checkpoint that lacks one time-mixer tensor: one warning line names it, and the layer's
    other tensors keep their loaded values (the mixer's initialisation rewrites the whole mixer,
    so this checks that it does not); an extra tensor is named too."""
    from safetensors.torch import load_file, save_file

    weights = write_published_checkpoint(tmp_path)
    gone = "model.layers.0.self_attn.time_mixer.w1"
    kept = {n: w for n, w in weights.items() if n != gone}
    save_file({**kept, "model.layers.0.extra": torch.zeros(2)}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(kept) | {"model.layers.0.extra"}
    with pytest.warns(UserWarning) as record:
        model = RwkvHybridForCausalLM.from_pretrained(tmp_path)
    lines = [str(w.message) for w in record if "rwkv_hybrid" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert gone in lines[0] and "1 missing" in lines[0] and "model.layers.0.extra" in lines[0]
    state = model.state_dict()
    assert all(torch.equal(state[n], w) for n, w in kept.items())


def test_published_num_wkv_heads_is_accepted_and_checked(tmp_path):
    """The published configuration class writes num_wkv_heads: a matching value loads, a wrong
    one is a one-line error naming it."""
    write_published_checkpoint(tmp_path, num_wkv_heads=2)
    assert RwkvHybridForCausalLM.from_pretrained(tmp_path).config.num_wkv_heads == 2
    write_published_checkpoint(tmp_path, num_wkv_heads=3)
    with pytest.raises(ValueError, match="num_wkv_heads 3 does not match"):
        RwkvHybridForCausalLM.from_pretrained(tmp_path)


@torch.no_grad()
def test_hybrid_keeping_every_attention_layer_is_the_teacher():
    """wkv_layers=[]: every layer keeps the teacher's attention, so the logits are the teacher's
    (prefill, and decoding through the cache)."""
    teacher = tiny_teacher(tie=False)
    hybrid = student_from_teacher(teacher, head_size=32, wkv_layers=[])
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(11))
    want = teacher(ids).logits
    assert rel_error(hybrid(ids).logits, want) <= 1e-5
    assert rel_error(logits_step_by_step(hybrid, ids), want) <= 1e-5


@MIXINGS
@torch.no_grad()
def test_hybrid_mixes_attention_and_time_mixing_consistently(mixing):
    teacher = tiny_teacher()
    hybrid = student_from_teacher(teacher, head_size=32, **mixing, wkv_layers=[1])
    assert [layer.is_wkv for layer in hybrid.model.layers] == [False, True, False]
    kept, original = hybrid.model.layers[0].self_attn, teacher.model.layers[0].self_attn
    assert torch.equal(kept.q_proj.weight, original.q_proj.weight)
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(12))
    full = hybrid(ids)
    assert rel_error(logits_step_by_step(hybrid, ids), full.logits) <= 1e-4
    prefix = hybrid(ids[:, :9])
    rest = hybrid(ids[:, 9:], cache=prefix.cache)
    assert rel_error(torch.cat([prefix.logits, rest.logits], 1), full.logits) <= 1e-5
    # generation: a left-padded batch generates what each prompt does alone
    g = torch.Generator().manual_seed(13)
    a, b = torch.randint(1, VOCAB, (1, 4), generator=g), torch.randint(1, VOCAB, (1, 7), generator=g)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    out = hybrid.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    out_a = hybrid.generate(a, max_new_tokens=5, do_sample=False, pad_token_id=0)
    out_b = hybrid.generate(b, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 7:], out_a[0, 4:]) and torch.equal(out[1, 7:], out_b[0, 7:])


def doc_rows(lengths: list[list[int]], seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Rows of documents (``lengths``: per row, its documents' lengths, summing to one T):
    input_ids [B, T], cu_seqlens over the B * T tokens, and each document's ids [1, n]."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, VOCAB, (1, n), generator=g) for row in lengths for n in row]
    ids = torch.cat(docs, 1).view(len(lengths), -1)
    cu = torch.tensor([0] + [n for row in lengths for n in row]).cumsum(0)
    return ids, cu, docs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("wkv,wkv_layers", [(7, [1]), (6, [0, 2]), (7, None)])
def test_packed_rows_equal_each_document_alone(wkv, wkv_layers, attn):
    """Rows of packed documents (as the stages feed them): every document's logits, and the
    gradients of a loss over them, are those of the document run alone, in hybrids too (their
    kept attention layers see only their own document, positions restarting at each)."""
    hybrid = student_from_teacher(tiny_teacher(seed=4), head_size=32, wkv=wkv, wkv_layers=wkv_layers)
    hybrid.set_attn_implementation(attn)
    ids, cu, docs = doc_rows([[5, 1, 11], [17], [3, 8, 6]], seed=14)
    packed = hybrid(ids, cu_seqlens=cu, use_cache=False).logits  # [3, 17, V]
    alone = torch.cat([hybrid(d, use_cache=False).logits for d in docs], 1).view_as(packed)
    assert rel_error(packed, alone) <= 1e-5
    weights = torch.randn(packed.shape, generator=torch.Generator().manual_seed(15))
    grads = []
    for logits in (packed, alone):
        hybrid.zero_grad()
        (logits * weights).sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in hybrid.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        assert rel_error(a, b) <= 1e-4


def varlen_attention(module, query, key, value, attention_mask, *, cu_seq_lens_q, cu_seq_lens_k,
                     max_length_q, max_length_k, scaling=None, **kwargs):
    """flash attention's variable-length contract in plain torch (no flash-attn here): query
    [1, H, L, d] of sequences packed by cu_seq_lens, each attending causally to itself alone;
    output [1, L, H, d]."""
    assert attention_mask is None and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    assert max_length_q == max_length_k == int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    bounds = cu_seq_lens_q.tolist()
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(parts, 2).transpose(1, 2), None


@torch.no_grad()
def test_packed_rows_take_flash_attentions_variable_length_path(monkeypatch):
    """Under flash attention the kept layers get the packed rows as one sequence with its
    cu_seq_lens (checked against that contract, computed in plain torch), not a mask."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hybrid = student_from_teacher(tiny_teacher(seed=5), head_size=32, wkv_layers=[1])
    ids, cu, docs = doc_rows([[4, 9], [13]], seed=16)
    alone = torch.cat([hybrid(d, use_cache=False).logits for d in docs], 1).view(2, 13, -1)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", varlen_attention)
    monkeypatch.setattr(hybrid.config, "_attn_implementation", "flash_attention_2")
    assert rel_error(hybrid(ids, cu_seqlens=cu, use_cache=False).logits, alone) <= 1e-5


def test_packed_rows_that_do_not_start_a_sequence_are_refused():
    hybrid = student_from_teacher(tiny_teacher(), head_size=32, wkv_layers=[1])
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="must each start a sequence"):
        hybrid(ids, cu_seqlens=torch.tensor([0, 5, 16]), use_cache=False)
    with pytest.raises(ValueError, match="must run from 0 to 16"):
        hybrid(ids, cu_seqlens=torch.tensor([0, 8, 12]), use_cache=False)
    with pytest.raises(ValueError, match="take no attention_mask"):
        hybrid(ids, cu_seqlens=torch.tensor([0, 8, 16]), attention_mask=torch.ones(2, 8), use_cache=False)


def test_hybrid_converts_and_reloads(tmp_path):
    from arwkv.conversion.convert import student_from_teacher as convert_in_memory

    teacher = tiny_teacher()
    hybrid = convert_in_memory(teacher, head_size=32, wkv_layers=[0, 2])
    hybrid.save_pretrained(tmp_path / "h")
    loaded = RwkvHybridForCausalLM.from_pretrained(tmp_path / "h").eval()
    assert loaded.config.wkv_layers == [0, 2]
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hybrid.eval()(ids).logits)
    with pytest.raises(ValueError, match="wkv_layers \\[5\\] are not layers"):
        convert_in_memory(teacher, head_size=32, wkv_layers=[5])


@MIXINGS
def test_bf16_autocast_over_float32_weights(mixing):
    """Training on GPUs runs float32 master weights under bf16 autocast: the projections come out
    in bf16 while the float32 mixes do not, and the op still gets one dtype; the loss stays close
    to float32's and gradients reach the weights in float32."""
    student = student_from_teacher(tiny_teacher(), head_size=32, **mixing).float().train()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    reference = student(ids, labels=ids, use_cache=False).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = student(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    assert student.lm_head.weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_rwkv6_low_rank_widths_come_from_the_config(tmp_path):
    """RWKV-6's low-rank widths: the published keys (lora_rank_tokenshift, lora_rank_decay) when
    given, else the published rule (32 and 64, doubled from width 4096 on); a saved student
    states them and loads back with the same shapes and values."""
    from arwkv.models.configuration_rwkv_hybrid import RwkvHybridConfig

    narrow = RwkvHybridConfig(hidden_size=896, wkv_version=6)
    wide = RwkvHybridConfig(hidden_size=4096, wkv_version=6)
    assert (narrow.lora_rank_tokenshift, narrow.lora_rank_decay) == (32, 64)
    assert (wide.lora_rank_tokenshift, wide.lora_rank_decay) == (64, 128)
    student = student_from_teacher(tiny_teacher(), head_size=32, wkv=6)
    config = student.config.to_dict()
    config.update(lora_rank_tokenshift=16, lora_rank_decay=48)
    custom = RwkvHybridForCausalLM(RwkvHybridConfig(**config))
    mixer = custom.model.layers[0].self_attn.time_mixer
    assert mixer.time_maa_w1.shape == (128, 5 * 16) and mixer.time_maa_w2.shape == (5, 16, 128)
    assert mixer.time_decay_w1.shape == (128, 48) and mixer.time_decay_w2.shape == (48, 128)
    custom.save_pretrained(tmp_path)
    loaded, info = RwkvHybridForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (loaded.config.lora_rank_tokenshift, loaded.config.lora_rank_decay) == (16, 48)
    state = loaded.state_dict()
    assert all(torch.equal(state[n], w) for n, w in custom.state_dict().items())
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, custom(ids).logits)


@pytest.mark.parametrize("value", [-3, 0, 2.5])
@pytest.mark.parametrize("key", ["lora_rank_tokenshift", "lora_rank_decay", "decay_low_rank"])
def test_a_bad_low_rank_width_is_a_one_line_error(key, value):
    from arwkv.models.configuration_rwkv_hybrid import RwkvHybridConfig

    with pytest.raises(ValueError, match=f"rwkv_hybrid: {key} {value} is not a positive integer"):
        RwkvHybridConfig(**{key: value})


def test_rwkv6_form_is_recorded_and_an_older_config_is_finch(tmp_path):
    """convert writes wkv6_form (qrwkv unless told); a config without the key, written before it
    existed, means the stock finch form it was; a wrong value is a one-line error."""
    from arwkv.models.configuration_rwkv_hybrid import RwkvHybridConfig

    student = student_from_teacher(tiny_teacher(), head_size=32, wkv=6)
    assert student.config.wkv6_form == "qrwkv"
    student.save_pretrained(tmp_path / "qrwkv")
    assert RwkvHybridForCausalLM.from_pretrained(tmp_path / "qrwkv").config.wkv6_form == "qrwkv"
    older = student_from_teacher(tiny_teacher(), head_size=32, wkv=6, wkv6_form="finch")
    older.save_pretrained(tmp_path / "older")
    config_file = tmp_path / "older" / "config.json"
    config = json.loads(config_file.read_text())
    del config["wkv6_form"]
    config_file.write_text(json.dumps(config))
    loaded = RwkvHybridForCausalLM.from_pretrained(tmp_path / "older")
    assert loaded.config.wkv6_form == "finch"
    assert hasattr(loaded.model.layers[0].self_attn.time_mixer, "time_faaaa")
    with pytest.raises(ValueError, match="rwkv_hybrid: wkv6_form 'gla' is not one of finch, qrwkv"):
        RwkvHybridConfig(wkv_version=6, wkv6_form="gla")
