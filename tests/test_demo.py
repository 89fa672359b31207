"""``arwkv demo``: the shipped teacher is what it claims to be, and a shortened demo (the same
code path, a few steps) writes its report, on the CPU and (where there is one) on a GPU;
``--device cuda`` without a GPU is one line; ``arwkv eval --lm-eval-task`` scores a student with
lm-evaluation-harness."""

from __future__ import annotations

import json

import pytest
import torch

import arwkv_ext
from arwkv.cli import build_parser, main
from arwkv.demo import ASSETS, DemoPlan, render_report, run_demo
from arwkv.export.gguf import read_back
from arwkv.options import DemoOptions, options_from_args

TEACHER = ASSETS / "teacher"


def test_the_shipped_teacher_is_a_small_genuine_qwen2():
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    size = sum(f.stat().st_size for f in TEACHER.iterdir())
    assert size <= 20 * 2**20, size
    model = AutoModelForCausalLM.from_pretrained(TEACHER)
    cfg = model.config
    assert isinstance(model, Qwen2ForCausalLM) and cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    text = "def f(x):\n    return [i ** 2 for i in range(x)]  # squares"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    report = json.loads((TEACHER / "training_report.json").read_text())
    assert report["teacher_heldout_ppl"] < report["unigram_heldout_ppl"] / 4


def test_the_teacher_report_is_what_eval_measures():
    from arwkv.evaluation.perplexity import evaluate

    report = json.loads((TEACHER / "training_report.json").read_text())
    measured = evaluate(TEACHER, ASSETS / "heldout.jsonl", seq_len=256, device="cpu")
    assert measured["predicted_tokens"] == report["heldout_tokens_predicted"]
    assert measured["perplexity"] == pytest.approx(report["teacher_heldout_ppl"], rel=1e-3)


def test_quick_demo_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    report = run_demo(out, DemoPlan.quick())
    saved = json.loads((out / "report.json").read_text())
    assert saved["teacher_ppl"] == report["teacher_ppl"] > 1 and saved["student_ppl"] > 1
    assert saved["ratio"] == pytest.approx(saved["student_ppl"] / saved["teacher_ppl"])
    # the CPU by default, and the report says so
    assert saved["device"] == saved["decode_method"]["device"] == saved["plan"]["device"] == "cpu"
    assert saved["training_precision"] == "float32" and saved["gpu"] is None
    for name in ("report.md", "stage1_loss.png", "stage2_loss.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "Held-out perplexity" in md and f"{saved['student_ppl']:.2f}" in md
    assert "distilled on this machine's CPU" in md and "float32 on the CPU with" in md
    student_rows, teacher_rows = saved["decode"]["student"], saved["decode"]["teacher"]
    assert student_rows[0]["cache_bytes"] == student_rows[1]["cache_bytes"]  # constant state
    assert teacher_rows[1]["cache_bytes"] > teacher_rows[0]["cache_bytes"]  # a growing KV cache
    # loss by position of both on held-out sequences (long_context), and cache bytes per token
    plan, lc = DemoPlan.quick(), saved["long_context"]
    assert [m["name"] for m in lc["models"]] == ["teacher", "student"]
    assert lc["trained_at"] == {"teacher": 256, "student": plan.seq_len}
    for m in lc["models"]:
        loss = m["loss_by_position"]
        assert loss["buckets"][0]["start"] == 1 and loss["buckets"][-1]["end"] == plan.long_context_len
        assert loss["sequences"] == plan.long_context_sequences
        assert sum(b["tokens"] for b in loss["buckets"]) == loss["tokens"]
        assert loss["tokens"] == plan.long_context_sequences * (plan.long_context_len - 1)
    cache = {m["name"]: m["cache_bytes"] for m in lc["models"]}
    kv_per_token = 2 * 4 * 2 * 32 * 4  # keys and values x 4 layers x 2 KV heads x head dim 32 x float32
    assert cache["teacher"] == {"constant": 0, "per_token": kv_per_token, "lengths": [16, 48]}
    assert cache["student"]["per_token"] == 0
    assert cache["student"]["constant"] == student_rows[0]["cache_bytes"]  # the recurrent state
    assert (out / "long_context.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["timings"]["long_context_s"] > 0
    assert "## Loss by position (2 held-out sequences of 64 tokens)" in md
    assert "per token of context (prefills of 16 and 48 tokens): teacher 2048 bytes, student 0 bytes" in md
    teacher_all = f"{lc['models'][0]['loss_by_position']['mean_loss']:.3f}"
    assert f"| all | {2 * 63} | {teacher_all} |" in md and "`long_context.png`" in md
    older = render_report({k: v for k, v in saved.items() if k != "long_context"})  # an earlier demo's
    assert "Loss by position" not in older and "long_context.png" not in older
    assert "arwkv demo: stage 2" in capsys.readouterr().err
    # running it again replaces the earlier demo; a directory that is not a demo's is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "mine" / "report.json").write_text("{}")  # a report alone does not make it a demo's
    assert main(["demo", "--quick", "--out", str(tmp_path / "mine")]) == 1
    assert "is not an earlier demo's output" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").write_text("mine")  # a rerun replaces the demo's own entries only
    rerun_args = ["demo", "--quick", "--device", "auto", "--head-size", "64", "--gguf", "--wkv", "6",
                  "--out", str(out)]
    assert main(rerun_args) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.json").is_file()
    meta, _ = read_back(out / "student.gguf")  # the distilled RWKV-6 student, for llama.cpp
    assert meta["general.architecture"] == "rwkv6qwen2" and meta["rwkv6qwen2.wkv.head_size"] == 64
    assert "converted into an RWKV-6 (qrwkv) student" in (out / "report.md").read_text()
    # auto is the GPU only where torch sees one and the kernels were built for it
    gpu = torch.cuda.is_available() and any(k != "cpu" for k in arwkv_ext.build_info["kernels"])
    rerun = json.loads((out / "report.json").read_text())
    assert rerun["plan"]["device"] == "auto" and rerun["device"] == ("cuda" if gpu else "cpu")
    assert rerun["gguf"] == str(out / "student.gguf") and saved["gguf"] is None
    assert main(["demo", "--quick", "--stage1-steps", "0", "--out", str(out)]) == 1
    assert "--stage1-steps must be at least 1" in capsys.readouterr().err
    assert (out / "report.json").is_file()  # refused before anything was removed


def test_demo_device_defaults_to_the_cpu():
    parsed = options_from_args(DemoOptions, build_parser().parse_args(["demo"]))
    assert parsed.device == "cpu"  # the published numbers are the CPU's
    assert DemoPlan().device == DemoPlan.quick().device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_demo_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == "arwkv demo: --device cuda: torch sees no GPU\n"  # one line, no traceback
    assert not out.exists()  # refused before anything was written


def test_demo_on_cuda_without_gpu_kernels_is_one_line(tmp_path, capsys, monkeypatch):
    # a GPU that torch sees, but an arwkv_ext built for the CPU only (ARWKV_BUILD_TARGET=cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(arwkv_ext.build_info, "kernels", ["cpu"])
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("arwkv demo: --device cuda: arwkv was built without GPU kernels")
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: torch.cuda.is_available() is False")
@pytest.mark.skipif(all(k == "cpu" for k in arwkv_ext.build_info["kernels"]),
                    reason="arwkv_ext was built without GPU kernels (CPU only)")
def test_quick_demo_on_a_gpu(tmp_path, capsys):
    """The whole pipeline on the GPU: training (bf16 autocast), scoring, decoding, samples."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == report["decode_method"]["device"] == report["plan"]["device"] == "cuda"
    assert report["gpu"] == torch.cuda.get_device_name() and "bf16" in report["training_precision"]
    for key in ("teacher_ppl", "student_ppl", "student_ppl_before_distillation"):
        assert 1 < report[key] < float("inf"), (key, report[key])
    assert all(row["tokens_per_s"] > 0 for rows in report["decode"].values() for row in rows)
    md = (out / "report.md").read_text()
    assert f"distilled on this machine's GPU ({report['gpu']})" in md
    assert "on the GPU" in capsys.readouterr().err  # the stages said where they ran


def test_lm_eval_scores_a_student(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))  # not the user's cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from arwkv.conversion.convert import convert_checkpoint

    student = convert_checkpoint(TEACHER, tmp_path / "student", head_size=32, dtype="fp32")
    assert (
        main(
            [
                "eval",
                "--model",
                str(student),
                "--lm-eval-task",
                str(ASSETS / "heldout_task.yaml"),
                "--limit",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])["lm_eval"]
    assert result["task"] == "arwkv_demo_heldout"
    assert result["results"]["word_perplexity,none"] > 1
    assert torch.isfinite(torch.tensor(result["results"]["bits_per_byte,none"]))
