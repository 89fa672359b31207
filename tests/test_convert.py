"""arwkv convert: a sharded teacher checkpoint on disk -> a student checkpoint that loads and
equals the in-memory conversion; refusals and failures leave nothing that looks complete."""

from __future__ import annotations

import json

import pytest
import torch

from arwkv.cli import main
from arwkv.conversion.convert import ConversionError, convert_checkpoint, student_from_teacher
from arwkv.models.modeling_rwkv_hybrid import RwkvHybridForCausalLM
from fixtures import VOCAB, tiny_teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    teacher = tiny_teacher("qwen2", tie=True)
    teacher.save_pretrained(path, max_shard_size="200KB")  # several shards + index
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path, teacher


def test_convert_writes_a_loadable_student_equal_to_the_in_memory_one(teacher_dir, tmp_path, capsys):
    path, teacher = teacher_dir
    out = tmp_path / "student"
    assert main(["convert", "--teacher", str(path), "--out", str(out), "--dtype", "fp32",
                 "--head-size", "32", "--max-shard-size", "300KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "configuration_rwkv_hybrid.py",
            "modeling_rwkv_hybrid.py", "tokenizer_config.json", "generation_config.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rwkv_hybrid.RwkvHybridForCausalLM"
    assert config["tie_word_embeddings"] is False and config["wkv_qkv_bias"] is False  # published layout
    loaded = RwkvHybridForCausalLM.from_pretrained(out).eval()
    expected = student_from_teacher(teacher, head_size=32).eval()
    for (name, a), (_, b) in zip(loaded.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_default_dtype_is_the_teachers_own(tmp_path, teacher_dtype):
    """Without --dtype the student keeps the teacher's dtype (a float32 teacher used to become
    bf16), and every copied weight is bit for bit the teacher's."""
    teacher = tiny_teacher("qwen2", tie=False).to(teacher_dtype)
    teacher.save_pretrained(tmp_path / "teacher")
    out = convert_checkpoint(tmp_path / "teacher", tmp_path / "student", head_size=32)
    assert json.loads((out / "config.json").read_text())["dtype"] == str(teacher_dtype).removeprefix("torch.")
    loaded = RwkvHybridForCausalLM.from_pretrained(out, dtype="auto")
    state, teacher_state = loaded.state_dict(), teacher.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        assert state[name].dtype == teacher_dtype and torch.equal(state[name], teacher_state[name]), name


def test_keep_bias_copies_the_biases_and_says_where_they_run(teacher_dir, tmp_path, capsys):
    path, teacher = teacher_dir
    out = tmp_path / "student"
    args = ["convert", "--teacher", str(path), "--out", str(out), "--head-size", "32", "--keep-bias"]
    assert main(args) == 0
    assert "runs only in arwkv" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["wkv_qkv_bias"] is True
    loaded = RwkvHybridForCausalLM.from_pretrained(out)
    bias = loaded.model.layers[0].self_attn.time_mixer.receptance.bias
    assert torch.equal(bias, teacher.model.layers[0].self_attn.q_proj.bias.to(bias.dtype))


def test_convert_refuses_a_non_empty_output_and_overwrites_when_told(teacher_dir, tmp_path):
    path, _ = teacher_dir
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty; pass --overwrite"):
        convert_checkpoint(path, out, head_size=32)
    assert (out / "keep.txt").read_text() == "mine"
    convert_checkpoint(path, out, head_size=32, overwrite=True, dtype="bf16")
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary leftovers


@pytest.mark.parametrize("damage,message", [
    ("missing", "is not a directory"),
    ("unsupported", "has no single *RMSNorm class"),
    ("no_config", "has no config.json"),
    ("no_weights", "has no model.safetensors"),
    ("corrupt", "cannot be read"),
])
def test_bad_teacher_is_one_line_and_leaves_no_output(teacher_dir, tmp_path, damage, message, capsys):
    import shutil

    path, _ = teacher_dir
    bad = tmp_path / "bad"
    if damage != "missing":
        shutil.copytree(path, bad)
    if damage == "no_config":
        (bad / "config.json").unlink()
    elif damage == "no_weights":
        for f in bad.glob("model*.safetensors*"):
            f.unlink()
    elif damage == "unsupported":  # a decoder family without the standard layout
        config = json.loads((bad / "config.json").read_text())
        config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        (bad / "config.json").write_text(json.dumps(config))
    elif damage == "corrupt":
        shard = sorted(bad.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:100])
    out = tmp_path / "out"
    assert main(["convert", "--teacher", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_unsupported_options_are_clear(teacher_dir, tmp_path):
    path, _ = teacher_dir
    with pytest.raises(ConversionError, match="expected 7 .RWKV-7. or 6"):
        convert_checkpoint(path, tmp_path / "o", wkv=5)
    assert not (tmp_path / "o").exists()


def test_convert_rwkv6_student(teacher_dir, tmp_path):
    path, teacher = teacher_dir
    out = convert_checkpoint(path, tmp_path / "student6", head_size=32, dtype="fp32", wkv=6)
    loaded = RwkvHybridForCausalLM.from_pretrained(out).eval()
    assert loaded.config.wkv_version == 6
    expected = student_from_teacher(teacher, head_size=32, wkv=6).eval()
    for (name, a), (_, b) in zip(loaded.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_generate_command_streams_tokens(teacher_dir, tmp_path, capsys):
    """arwkv generate on a converted student with a (tiny, word-level) tokenizer beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path, _ = teacher_dir
    out = tmp_path / "student"
    convert_checkpoint(path, out, head_size=32, dtype="fp32")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0", eos_token="w1")
    fast.save_pretrained(out)
    assert main(["generate", "--model", str(out), "--prompt", "w5 w7 w9", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("w5 w7 w9") and len(captured.out.split()) == 7, captured.out
    assert "tokens/s" in captured.err


def test_convert_hybrid_from_the_command_line(teacher_dir, tmp_path):
    path, teacher = teacher_dir
    out = tmp_path / "hybrid"
    assert main(["convert", "--teacher", str(path), "--out", str(out), "--dtype", "fp32", "--head-size", "32",
                 "--wkv-layers", "1"]) == 0
    loaded = RwkvHybridForCausalLM.from_pretrained(out).eval()
    assert loaded.config.wkv_layers == [1]
    # the checkpoint says which layers hold a recurrent state (vLLM reads this to plan its caches)
    saved = json.loads((out / "config.json").read_text())["layer_types"]
    assert saved == ["full_attention", "linear_attention", "full_attention"]
    assert [layer.is_wkv for layer in loaded.model.layers] == [False, True, False]
    expected = student_from_teacher(teacher, head_size=32, wkv_layers=[1]).eval()
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
