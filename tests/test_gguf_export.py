"""`arwkv export --gguf`: students written as llama.cpp's arwkv7 (RWKV-7) and rwkv6qwen2 (RWKV-6,
qrwkv form) GGUF, read back with gguf's own reader (metadata, tensor names, shapes, values, types,
tokenizer), and the one-line refusals of what llama.cpp cannot run. (Running the files in
llama.cpp itself is benchmarks/llama_cpp_check.py, not part of the test suite: it builds llama.cpp.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from arwkv.cli import main
from arwkv.conversion.convert import convert_checkpoint
from arwkv.export.gguf import ExportError, export_gguf, pre_tokenizer_name, read_back
from arwkv.models.modeling_rwkv_hybrid import RwkvHybridForCausalLM
from arwkv_ext.testing import rel_error
from fixtures import tiny_teacher, word_tokenizer

DEMO_TEACHER = Path(__file__).resolve().parents[1] / "python" / "arwkv" / "demo_assets" / "teacher"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def teacher_with_demo_tokenizer(root: Path, tie: bool = True, **config) -> Path:
    """A tiny random Qwen2 teacher with the demo's Qwen2-style byte-level BPE tokenizer."""
    vocab = json.loads((DEMO_TEACHER / "config.json").read_text())["vocab_size"]
    teacher = tiny_teacher(vocab=vocab, hidden=128, intermediate=160, layers=2, tie=tie, eos_token_id=0,
                           **config)
    teacher.save_pretrained(root / "teacher")
    for name in TOKENIZER_FILES:
        if (DEMO_TEACHER / name).exists():
            shutil.copy(DEMO_TEACHER / name, root / "teacher" / name)
    return root / "teacher"


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A converted student (head size 64, gate, GroupNorm, tied embeddings, float32)."""
    root = tmp_path_factory.mktemp("gguf")
    convert_checkpoint(teacher_with_demo_tokenizer(root), root / "student", head_size=64, group_norm=True,
                       dtype="fp32")
    return root / "student"


def student_tensors(path: Path) -> dict[str, torch.Tensor]:
    model = RwkvHybridForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_f32_read_back_matches_the_student(student, tmp_path):
    out = tmp_path / "s.gguf"
    report = export_gguf(student, out, outtype="f32")
    meta, tensors = read_back(out)
    cfg = json.loads((student / "config.json").read_text())
    C, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    assert meta["general.architecture"] == "arwkv7"
    assert meta["arwkv7.embedding_length"] == C and meta["arwkv7.block_count"] == L
    assert meta["arwkv7.wkv.head_size"] == 64 and meta["arwkv7.token_shift_count"] == 1
    assert meta["arwkv7.feed_forward_length"] == cfg["intermediate_size"]
    assert meta["arwkv7.attention.decay_lora_rank"] == cfg["decay_low_rank"]
    assert meta["arwkv7.attention.iclr_lora_rank"] == cfg["a_low_rank"]
    assert meta["arwkv7.attention.value_residual_mix_lora_rank"] == cfg["v_low_rank"]
    assert meta["arwkv7.attention.gate_lora_rank"] == cfg["gate_low_rank"]
    assert meta["arwkv7.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    # exactly llama.cpp's tensors: 3 global + 26 per layer with gate and GroupNorm
    assert len(tensors) == report.tensors == 3 + 26 * L

    want = student_tensors(student)
    mix = "model.layers.{}.self_attn.time_mixer."

    def same(name: str, value: torch.Tensor) -> None:
        np.testing.assert_array_equal(tensors[name], value.float().numpy(), err_msg=name)

    same("token_embd.weight", want["model.embed_tokens.weight"])
    same("output.weight", want["model.embed_tokens.weight"])  # tied: a copy of the embedding
    for i in range(L):
        m, b = mix.format(i), f"blk.{i}."
        lerps = [want[m + x] for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]
        same(b + "time_mix_lerp_fused.weight", torch.stack(lerps, 0))
        assert tensors[b + "time_mix_lerp_fused.weight"].shape == (6, 1, 1, C)
        same(b + "time_mix_w1.weight", want[m + "w1"].t())
        same(b + "time_mix_w2.weight", want[m + "w2"].t())
        same(b + "time_mix_r_k.weight", want[m + "r_k"].reshape(-1))
        same(b + "time_mix_k_k.weight", want[m + "k_k"].reshape(-1))
        src = "a" if i == 0 else "v"  # layer 0: copies of a0, a1, a2 where llama.cpp expects v*
        same(b + "time_mix_v1.weight", want[m + f"{src}1"].t())
        same(b + "time_mix_v0.weight", want[m + f"{src}0"].reshape(-1))
        same(b + "time_mix_ln.bias", want[m + "ln_x.bias"])
        same(b + "time_mix_receptance.weight", want[m + "receptance.weight"])
        same(b + "ffn_down.weight", want[f"model.layers.{i}.mlp.down_proj.weight"])


@pytest.fixture(scope="module")
def student6(tmp_path_factory) -> Path:
    """A default RWKV-6 student (qrwkv form) keeping the teacher's q/k/v biases, untied, float32."""
    root = tmp_path_factory.mktemp("gguf6")
    convert_checkpoint(teacher_with_demo_tokenizer(root, tie=False), root / "student", head_size=64, wkv=6,
                       keep_bias=True, dtype="fp32")
    return root / "student"


def test_rwkv6_f32_read_back_matches_the_student(student6, tmp_path):
    out = tmp_path / "s6.gguf"
    report = export_gguf(student6, out, outtype="f32")
    meta, tensors = read_back(out)
    cfg = json.loads((student6 / "config.json").read_text())
    C, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    arch = "rwkv6qwen2"
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.embedding_length"] == C and meta[f"{arch}.block_count"] == L
    assert meta[f"{arch}.wkv.head_size"] == 64 and meta[f"{arch}.token_shift_count"] == 1
    assert meta[f"{arch}.feed_forward_length"] == cfg["intermediate_size"]
    assert meta[f"{arch}.time_mix_extra_dim"] == cfg["lora_rank_tokenshift"] == 32
    assert meta[f"{arch}.time_decay_extra_dim"] == cfg["lora_rank_decay"] == 64
    assert meta[f"{arch}.attention.head_count"] == 0  # key/value at full width
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    # exactly what llama.cpp's rwkv6qwen2 loads, optional biases included, no time_mix_first
    # (which would put llama.cpp on its finch path)
    per_layer = ["attn_norm.weight", "time_mix_lerp_x.weight", "time_mix_lerp_fused.weight",
                 "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_decay.weight",
                 "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_receptance.weight",
                 "time_mix_receptance.bias",
                 "time_mix_key.weight", "time_mix_key.bias", "time_mix_value.weight", "time_mix_value.bias",
                 "time_mix_gate.weight", "time_mix_output.weight", "ffn_norm.weight", "ffn_gate.weight",
                 "ffn_up.weight", "ffn_down.weight"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{name}" for i in range(L) for name in per_layer}
    assert set(tensors) == expected and report.tensors == len(expected)

    want = student_tensors(student6)

    def same(name: str, value: torch.Tensor) -> None:
        np.testing.assert_array_equal(tensors[name], value.float().numpy(), err_msg=name)

    same("output.weight", want["lm_head.weight"])
    same("output_norm.weight", want["model.norm.weight"])
    for i in range(L):
        m, b = f"model.layers.{i}.self_attn.time_mixer.", f"blk.{i}."
        same(b + "attn_norm.weight", want[f"model.layers.{i}.input_layernorm.weight"])
        same(b + "time_mix_lerp_x.weight", want[m + "time_maa_x"])
        same(b + "time_mix_lerp_fused.weight", torch.stack([want[m + f"time_maa_{x}"] for x in "wkvrg"], 0))
        assert tensors[b + "time_mix_lerp_fused.weight"].shape == (5, 1, 1, C)
        same(b + "time_mix_w1.weight", want[m + "time_maa_w1"].t())
        # llama.cpp multiplies the tanh output's slice j by slice j, [C, R] in numpy layout
        same(b + "time_mix_w2.weight", want[m + "time_maa_w2"].transpose(1, 2))
        same(b + "time_mix_decay.weight", want[m + "time_decay"].reshape(-1))
        same(b + "time_mix_decay_w1.weight", want[m + "time_decay_w1"].t())
        same(b + "time_mix_decay_w2.weight", want[m + "time_decay_w2"].t())
        for proj in ("receptance", "key", "value"):
            same(b + f"time_mix_{proj}.weight", want[m + f"{proj}.weight"])
            same(b + f"time_mix_{proj}.bias", want[m + f"{proj}.bias"])
        same(b + "time_mix_gate.weight", want[m + "gate.weight"])
        same(b + "time_mix_output.weight", want[m + "output.weight"])
        same(b + "ffn_up.weight", want[f"model.layers.{i}.mlp.up_proj.weight"])


def test_rwkv6_without_gate_is_a_zero_gate_and_twice_the_output(tmp_path):
    """llama.cpp's rwkv6qwen2 always gates: a student without gate is written with a zero gate
    (sigmoid 0 = 1/2) and twice its output matrix, which in arwkv's own model is the same
    student: same logits."""
    teacher = teacher_with_demo_tokenizer(tmp_path)
    convert_checkpoint(teacher, tmp_path / "nog", head_size=64, wkv=6, gate=False, dtype="fp32")
    export_gguf(tmp_path / "nog", tmp_path / "nog.gguf", outtype="f32")
    _, tensors = read_back(tmp_path / "nog.gguf")
    plain = RwkvHybridForCausalLM.from_pretrained(tmp_path / "nog", dtype=torch.float32).eval()
    gated_config = plain.config.__class__(**{**plain.config.to_dict(), "wkv_has_gate": True})
    gated = RwkvHybridForCausalLM(gated_config).eval()
    gated.load_state_dict(plain.state_dict(), strict=False)
    for i, layer in enumerate(gated.model.layers):
        mixer = layer.self_attn.time_mixer
        mixer.gate.weight.data = torch.from_numpy(tensors[f"blk.{i}.time_mix_gate.weight"].copy())
        mixer.output.weight.data = torch.from_numpy(tensors[f"blk.{i}.time_mix_output.weight"].copy())
        assert not mixer.gate.weight.any()
    ids = torch.randint(0, plain.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_error(gated(ids).logits, plain(ids).logits) <= 1e-6


def test_tokenizer_is_llama_cpps_qwen2_bpe(student, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "s.gguf"
    export_gguf(student, out, outtype="f32")
    meta, tensors = read_back(out)
    tok = AutoTokenizer.from_pretrained(student, trust_remote_code=True)
    spec = json.loads((student / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == tensors["token_embd.weight"].shape[0]  # llama.cpp: one token per row
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    types = meta["tokenizer.ggml.token_type"]
    assert types[vocab["<|endoftext|>"]] == gguf.TokenType.CONTROL
    assert len(meta["tokenizer.ggml.merges"]) == len(spec["model"]["merges"])
    assert meta["tokenizer.ggml.merges"][0] == " ".join(spec["model"]["merges"][0])
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.chat_template"] == tok.chat_template


# (f16 and bf16 round each value to 2^-11 / 2^-9 of itself; q8_0 to half a step of 1/127 of
# its 32-value block's largest)
SMALL = {7: ("blk.0.attn_norm.weight", "blk.1.time_mix_w1.weight", "blk.1.time_mix_a2.weight",
             "blk.0.time_mix_lerp_fused.weight", "blk.1.time_mix_r_k.weight"),
         6: ("blk.0.attn_norm.weight", "blk.1.time_mix_w1.weight", "blk.1.time_mix_w2.weight",
             "blk.0.time_mix_lerp_fused.weight", "blk.1.time_mix_lerp_x.weight",
             "blk.0.time_mix_decay.weight", "blk.0.time_mix_decay_w1.weight",
             "blk.1.time_mix_decay_w2.weight", "blk.0.time_mix_key.bias")}


@pytest.mark.parametrize("outtype,tol", [("f16", 1e-3), ("bf16", 4e-3), ("q8_0", 5e-3)])
@pytest.mark.parametrize("wkv", [7, 6])
def test_outtypes_round_trip(student, student6, tmp_path, outtype, tol, wkv):
    """Large matrices take the outtype (dequantised within its rounding); norms, vectors, lerps and
    the low-rank time-mix matrices stay float32, bit for bit."""
    student = {7: student, 6: student6}[wkv]
    export_gguf(student, tmp_path / "f32.gguf", "f32")
    _, ref = read_back(tmp_path / "f32.gguf")
    out = tmp_path / f"{outtype}.gguf"
    export_gguf(student, out, outtype=outtype)
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    want_type = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
                 "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    for name in ("blk.0.time_mix_key.weight", "token_embd.weight", "blk.1.time_mix_output.weight",
                 "blk.0.ffn_up.weight") + (("blk.1.time_mix_gate.weight",) if wkv == 6 else ()):
        assert types[name] == want_type, name
    for name in SMALL[wkv]:
        assert types[name] == gguf.GGMLQuantizationType.F32, name
    _, got = read_back(out)
    for name, value in ref.items():
        scale = np.abs(value).max() + 1e-30
        assert np.abs(got[name] - value).max() <= tol * scale, name


def test_refuses_what_llama_cpp_cannot_run(tmp_path):
    teacher = teacher_with_demo_tokenizer(tmp_path)
    cases = {
        "finch": (dict(wkv=6, wkv6_form="finch"),
                  "rwkv6qwen2 cannot run an RWKV-6 student of the finch form"),
        "rwkv6-groupnorm": (dict(wkv=6, group_norm=True), "GroupNorm of the WKV output"),
        "rwkv6-hybrid": (dict(wkv=6, wkv_layers=[0]), "rwkv6qwen2 cannot run a hybrid student"),
        "bias": (dict(keep_bias=True), "receptance/key/value biases"),
        "hybrid": (dict(wkv_layers=[1]), "a hybrid student"),
    }
    for name, (kwargs, message) in cases.items():
        convert_checkpoint(teacher, tmp_path / name, head_size=64, dtype="fp32", **kwargs)
        out = tmp_path / f"{name}.gguf"
        with pytest.raises(ExportError, match=message):
            export_gguf(tmp_path / name, out)
        assert not out.exists() and not list(tmp_path.glob(f".{name}.gguf.partial-*"))
    # and the command says so in one line, exit status 1
    assert main(["export", "--model", str(tmp_path / "bias"), "--gguf", str(tmp_path / "b.gguf")]) == 1


def test_refuses_other_tokenizers_and_existing_files(tmp_path, capsys):
    teacher = tiny_teacher(vocab=64, hidden=128, intermediate=160, layers=1, eos_token_id=0)
    teacher.save_pretrained(tmp_path / "teacher")
    word_tokenizer().save_pretrained(tmp_path / "teacher")  # word-level, not byte-level BPE
    convert_checkpoint(tmp_path / "teacher", tmp_path / "words", head_size=64, dtype="fp32")
    with pytest.raises(ExportError, match="WordLevel tokenizer"):
        export_gguf(tmp_path / "words", tmp_path / "w.gguf")
    assert not (tmp_path / "w.gguf").exists()
    (tmp_path / "taken.gguf").write_text("not mine")
    assert main(["export", "--model", str(tmp_path / "words"), "--gguf", str(tmp_path / "taken.gguf")]) == 1
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
    assert (tmp_path / "taken.gguf").read_text() == "not mine"


def test_small_head_sizes_warn(tmp_path, capsys):
    teacher = teacher_with_demo_tokenizer(tmp_path, tie=False)
    convert_checkpoint(teacher, tmp_path / "s32", head_size=32, dtype="fp32")
    assert main(["export", "--model", str(tmp_path / "s32"), "--gguf", str(tmp_path / "s32.gguf"),
                 "--outtype", "f32"]) == 0
    err = capsys.readouterr().err
    assert "warning: head size 32" in err
    _, tensors = read_back(tmp_path / "s32.gguf")
    want = student_tensors(tmp_path / "s32")
    np.testing.assert_array_equal(tensors["output.weight"], want["lm_head.weight"].numpy())  # untied


def test_pre_tokenizer_detection():
    spec = json.loads((DEMO_TEACHER / "tokenizer.json").read_text())
    assert pre_tokenizer_name(spec) == "qwen2"
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+"
    assert pre_tokenizer_name(spec) is None
    assert pre_tokenizer_name({}) is None


def test_output_paths(student, tmp_path, capsys):
    """--gguf into a folder that does not exist yet makes it; a directory is refused as the output
    file, --overwrite or not, and left as it was."""
    nested = tmp_path / "gguf" / "deeper" / "x.gguf"
    assert main(["export", "--model", str(student), "--gguf", str(nested), "--outtype", "f32"]) == 0
    assert nested.is_file() and nested.read_bytes()[:4] == b"GGUF"
    folder = tmp_path / "gguf"
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert main(["export", "--model", str(student), "--gguf", str(folder), *extra]) == 1
        err = capsys.readouterr().err
        assert err == (f"arwkv export: --gguf {folder} is a directory; give the file to write, e.g. "
                       f"{folder / 'student.gguf'}\n")
        assert sorted(p.name for p in folder.iterdir()) == ["deeper"]  # untouched
    assert main(["export", "--model", str(student), "--gguf", str(nested)]) == 1  # exists, no --overwrite
    assert "exists (--overwrite replaces it)" in capsys.readouterr().err
    (tmp_path / "file").write_text("not a folder")
    assert main(["export", "--model", str(student), "--gguf", str(tmp_path / "file" / "x.gguf")]) == 1
    assert "is not a directory" in capsys.readouterr().err
