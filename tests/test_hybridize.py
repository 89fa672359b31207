"""``arwkv hybridize``: the teacher's attention goes back into the layers with the worst (or, with
--pick best, the best) stage-1 alignment loss, scored from a stage-1 run's metrics or measured on
text; the written hybrid holds the teacher's attention tensors there and the student's elsewhere,
and computes what a hybrid converted directly (with the same time mixers) computes; bad requests
are one line."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from arwkv.cli import main
from arwkv.conversion.convert import convert_checkpoint
from arwkv.conversion.hybridize import (
    HybridizeError,
    choose_layers,
    hybridize,
    measure_restore_gains,
    measure_scores,
    scores_from_run,
)
from arwkv.models.modeling_rwkv_hybrid import RwkvHybridForCausalLM
from arwkv.options import DistillConfig
from arwkv.training.monitor import read_metrics
from fixtures import WORDS, make_run_inputs, tiny_teacher

LAYERS = 4
# hand-written held-out scores: layer 2 worst, then 0; layer 3 best, then 1
SCORES = {0: 0.30, 1: 0.12, 2: 0.45, 3: 0.05}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer tiny teacher and its student, whose time mixers are moved off their converted
    values (as training would), so "the student's tensors" and "the converted ones" differ."""
    root = tmp_path_factory.mktemp("hybridize")
    paths = make_run_inputs(root, layers=LAYERS)
    student = RwkvHybridForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".time_mixer." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    student.save_pretrained(root / "trained")
    for f in paths["student"].iterdir():  # the tokenizer and generation files travel with it
        if f.name.startswith(("tokenizer", "special_tokens", "generation")):
            (root / "trained" / f.name).write_bytes(f.read_bytes())
    return {**paths, "trained": root / "trained", "root": root}


def write_metrics(run: Path, records: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run


def stage1_records(scores: dict[int, float], stale: dict[int, float]) -> list[dict]:
    """Training records with layer_I, a validation at step 2 (``stale``), the latest at step 4
    (``scores``), and a step 5 without validation."""
    def train(step: int) -> dict:
        return {"step": step, "stage": 1, "loss": 0.2, **{f"layer_{i}": 9.0 for i in scores}}

    return [train(1), {**train(2), "val_loss": 0.3, **{f"val_layer_{i}": v for i, v in stale.items()}},
            train(3), {**train(4), "val_loss": 0.2, **{f"val_layer_{i}": v for i, v in scores.items()}},
            train(5)]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    return RwkvHybridForCausalLM.from_pretrained(path, dtype="auto").state_dict()


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ----------------------------------------------------------------------------- choosing


def test_choose_layers_takes_the_worst_or_the_best():
    candidates = list(SCORES)
    assert choose_layers(SCORES, candidates, 2, "worst") == [0, 2]
    assert choose_layers(SCORES, candidates, 2, "best") == [1, 3]
    assert choose_layers(SCORES, candidates, 1, "worst") == [2]
    assert choose_layers(SCORES, candidates, 0, "worst") == []
    assert choose_layers(SCORES, [0, 1, 3], 1, "worst") == [0]  # only time-mixing layers compete
    assert choose_layers({0: 1.0, 1: 1.0, 2: 0.5}, [0, 1, 2], 1, "worst") == [0]  # ties: lower index
    with pytest.raises(HybridizeError, match="no score for time-mixing layer"):
        choose_layers({0: 1.0}, [0, 1], 1)


def test_scores_come_from_the_latest_validation_record(tmp_path):
    stale = {i: 1.0 - v for i, v in SCORES.items()}
    run = write_metrics(tmp_path / "run", stage1_records(SCORES, stale), tail='{"step": 6, "val_la')
    got = scores_from_run(run)
    assert got.scores == SCORES and got.source == {"kind": "run", "run": str(run), "step": 4, "stage": 1}


# ----------------------------------------------------------------------------- what is written


@pytest.mark.parametrize("pick, chosen", [("worst", [0, 2]), ("best", [1, 3])])
def test_cli_keeps_attention_where_the_scores_say(inputs, tmp_path, capsys, pick, chosen):
    run = write_metrics(tmp_path / "run", stage1_records(SCORES, SCORES))
    out = tmp_path / "hybrid"
    rc, text, _ = run_main(["hybridize", "--teacher", str(inputs["teacher"]), "--student",
                            str(inputs["trained"]), "--run", str(run), "--keep", "2", "--pick", pick,
                            "--out", str(out)], capsys)
    assert rc == 0
    wkv = [i for i in range(LAYERS) if i not in chosen]
    config = json.loads((out / "config.json").read_text())
    assert config["wkv_layers"] == wkv
    assert config["layer_types"] == ["linear_attention" if i in wkv else "full_attention"
                                     for i in range(LAYERS)]
    report = json.loads((out / "hybridize.json").read_text())
    assert report["chosen"] == chosen and report["pick"] == pick and report["keep"] == 2
    assert report["scores"] == {str(i): v for i, v in SCORES.items()}
    assert report["source"]["kind"] == "run" and report["source"]["step"] == 4
    assert report["wkv_layers"] == wkv and report["attention_layers"] == chosen
    # the table: every layer's score, the chosen ones marked, and the choice
    for i, v in SCORES.items():
        line = next(row for row in text.splitlines() if row.split()[:1] == [str(i)])
        assert f"{v:.5f}" in line and (("keeps attention" in line) == (i in chosen)), line
    assert f"({pick} 2): {', '.join(map(str, chosen))}" in text and f"wrote {out}" in text


def test_hybrid_holds_the_teachers_attention_and_the_students_rest(inputs, tmp_path):
    """Kept layers: the teacher's self_attn tensors; everything else: the student's. The hybrid
    computes what `arwkv convert --wkv-layers` makes, given the same time mixers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = hybridize(inputs["teacher"], inputs["trained"], tmp_path / "hybrid", layers=[0, 2]).path
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "configuration_rwkv_hybrid.py", "modeling_rwkv_hybrid.py", "hybridize.json",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["wkv_layers"] == [1, 3] and config["dtype"] == "float32"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rwkv_hybrid.RwkvHybridForCausalLM"
    assert AutoTokenizer.from_pretrained(out).convert_ids_to_tokens([5]) == [WORDS[5]]
    with warnings.catch_warnings(record=True) as record:  # loads with no missing or unexpected tensor
        warnings.simplefilter("always")
        loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert not [w for w in record if "rwkv_hybrid" in str(w.message)]
    assert [layer.is_wkv for layer in loaded.model.layers] == [False, True, False, True]

    hybrid, student = loaded.state_dict(), state_of(inputs["trained"])
    from safetensors.torch import load_file

    teacher = load_file(inputs["teacher"] / "model.safetensors")
    kept = ("model.layers.0.self_attn.", "model.layers.2.self_attn.")
    assert {n for n in hybrid if n.startswith(kept)} == {n for n in teacher if n.startswith(kept)}
    for name, value in hybrid.items():
        want = teacher[name] if name.startswith(kept) else student[name]
        assert torch.equal(value, want), name
    assert set(hybrid) - {n for n in hybrid if n.startswith(kept)} <= set(student)

    # the same hybrid, converted directly, then given the student's time mixers
    direct_dir = convert_checkpoint(inputs["teacher"], tmp_path / "direct", head_size=16, dtype="fp32",
                                    wkv_layers=[1, 3])
    direct = RwkvHybridForCausalLM.from_pretrained(direct_dir).eval()
    mixers = {n: v for n, v in student.items() if ".time_mixer." in n and not n.startswith(kept)}
    assert not direct.load_state_dict(mixers, strict=False).unexpected_keys
    ids = torch.randint(5, len(WORDS), (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, direct(ids).logits)
        # and the mixers mattered: the converted hybrid without them differs
        plain = RwkvHybridForCausalLM.from_pretrained(direct_dir).eval()
        assert not torch.allclose(plain(ids).logits, direct(ids).logits)


def test_a_hybrid_keeps_its_attention_and_gains_more_in_its_own_dtype(inputs, tmp_path, capsys):
    """A bf16 student that already keeps layer 2: its own layer-2 attention stays, layer 0 (the
    worst of its time-mixing layers) gets the teacher's, cast to bf16; only time-mixing layers
    compete, and K may be at most their number."""
    converted = convert_checkpoint(inputs["teacher"], tmp_path / "converted", head_size=16, dtype="bf16",
                                   wkv_layers=[0, 1, 3])
    model = RwkvHybridForCausalLM.from_pretrained(converted, dtype="auto")
    with torch.no_grad():  # the student's own attention, changed (as stage 2 would)
        model.model.layers[2].self_attn.q_proj.weight += 0.5
    student = tmp_path / "student"
    model.save_pretrained(student)
    state = model.state_dict()
    run = write_metrics(tmp_path / "run", stage1_records(SCORES, SCORES))
    args = ["hybridize", "--teacher", str(inputs["teacher"]), "--student", str(student), "--run", str(run),
            "--out", str(tmp_path / "hybrid")]
    rc, text, _ = run_main([*args, "--keep", "1"], capsys)
    assert rc == 0
    assert "2          -  attention (already)" in text
    report = json.loads((tmp_path / "hybrid" / "hybridize.json").read_text())
    assert report["chosen"] == [0] and report["wkv_layers_before"] == [0, 1, 3]
    assert report["wkv_layers"] == [1, 3] and report["attention_layers"] == [0, 2]
    hybrid = state_of(tmp_path / "hybrid")
    assert json.loads((tmp_path / "hybrid" / "config.json").read_text())["dtype"] == "bfloat16"
    own = "model.layers.2.self_attn.q_proj.weight"
    assert torch.equal(hybrid[own], state[own])
    from safetensors.torch import load_file

    teacher = load_file(inputs["teacher"] / "model.safetensors")
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.0.self_attn.{proj}.weight"
        assert hybrid[name].dtype == torch.bfloat16 and torch.equal(hybrid[name], teacher[name].bfloat16())
    rc, _, err = run_main([*args, "--keep", "4", "--overwrite"], capsys)
    assert rc == 1 and "--keep 4: the student has only 3 time-mixing layers ([0, 1, 3])" in err
    rc, _, err = run_main([*args[:-4], "--layers", "1,2", "--out", str(tmp_path / "x")], capsys)
    assert rc == 1 and "--layers [2]: already attention layers" in err
    # K = all of them: every layer is the teacher's attention
    rc, _, _ = run_main([*args, "--keep", "3", "--overwrite"], capsys)
    assert rc == 0 and json.loads((tmp_path / "hybrid" / "config.json").read_text())["wkv_layers"] == []


# ----------------------------------------------------------------------------- real scores


def test_scores_of_a_real_stage1_run_and_measured_on_its_split_agree(inputs, tmp_path, capsys):
    """A 2-step stage 1 with a validation split writes val_layer_I for every layer; hybridize
    --run reads them (RUN/student by default) and keeps attention in the worst; --data on the
    same split, rows and seq_len measures the same losses."""
    from arwkv.training.trainer import train

    run = tmp_path / "stage1"
    train(DistillConfig(stage=1, teacher=str(inputs["teacher"]), student=str(inputs["trained"]),
                        data=str(inputs["text"]), out=str(run), seq_len=32, batch_size=4, max_steps=2,
                        warmup_steps=1, lr=3e-3, validation_fraction=0.2, device="cpu", log_every=1))
    last = read_metrics(run)[-1]
    run_scores = {i: last[f"val_layer_{i}"] for i in range(LAYERS)}
    assert all(math.isfinite(v) and v > 0 for v in run_scores.values())
    worst = max(run_scores, key=run_scores.get)
    out = tmp_path / "hybrid"
    rc, text, _ = run_main(["hybridize", "--teacher", str(inputs["teacher"]), "--run", str(run),
                            "--keep", "1", "--out", str(out)], capsys)
    assert rc == 0 and f"(worst 1): {worst}" in text
    report = json.loads((out / "hybridize.json").read_text())
    assert report["student"] == str(run / "student") and report["chosen"] == [worst]

    measured = measure_scores(inputs["teacher"], run / "student", inputs["text"], rows=1000, seq_len=32,
                              batch_size=3, validation_fraction=0.2, seed=0, device="cpu")
    assert measured.source["rows"] < 1000  # all the split's rows
    assert measured.scores == pytest.approx(run_scores, rel=1e-5)


def test_data_measurement_scores_and_chooses(inputs, tmp_path, capsys):
    """--data: measured scores choose the layers; with --layers they are printed too."""
    out = tmp_path / "hybrid"
    base = ["hybridize", "--teacher", str(inputs["teacher"]), "--student", str(inputs["trained"]),
            "--data", str(inputs["text"]), "--rows", "3", "--seq-len", "24", "--device", "cpu", "--score",
            "alignment"]
    rc, text, _ = run_main([*base, "--keep", "2", "--pick", "best", "--out", str(out)], capsys)
    assert rc == 0
    report = json.loads((out / "hybridize.json").read_text())
    scores = {int(i): v for i, v in report["scores"].items()}
    assert report["source"]["kind"] == "data" and report["source"]["rows"] == 3
    assert report["chosen"] == sorted(sorted(scores, key=scores.get)[:2])
    assert "3 rows of 24 tokens" in text
    rc, text, _ = run_main([*base, "--layers", "3", "--out", str(tmp_path / "h2")], capsys)
    assert rc == 0 and "given by --layers): 3" in text and "loss" in text
    report2 = json.loads((tmp_path / "h2" / "hybridize.json").read_text())
    assert report2["pick"] == "given" and report2["scores"] == pytest.approx(report["scores"])


def kl_to_teacher(teacher_dir: Path, student_dir: Path, data: Path, rows: int, seq_len: int) -> float:
    """The student's KL(teacher || student) per token on the first rows of data, computed
    directly with stage 2's objective (a real checkpoint each time: no module swapping)."""
    from transformers import AutoTokenizer

    from arwkv.data.records import iter_records
    from arwkv.data.rows import PackedRow, collate
    from arwkv.training.losses import LogitDistillation
    from arwkv.training.trainer import load_student, load_teacher

    # the documents one after another (each closed by EOS), cut into rows; a boundary where each
    # document starts inside a row
    tokenizer = AutoTokenizer.from_pretrained(student_dir, trust_remote_code=True)
    docs = [tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for r in iter_records(data)]
    stream = [t for d in docs for t in d]
    starts = {sum(map(len, docs[:i])) for i in range(len(docs))}
    packed = []
    for r in range(rows):
        inner = sorted(p - r * seq_len for p in starts if 0 < p - r * seq_len < seq_len)
        packed.append(PackedRow(torch.tensor(stream[r * seq_len:(r + 1) * seq_len]),
                                torch.tensor([0, *inner, seq_len], dtype=torch.int32)))
    batch = collate(packed)
    teacher = load_teacher(teacher_dir, torch.device("cpu"))
    student = load_student(student_dir).eval()
    with torch.no_grad():
        hidden = teacher.model(batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).last_hidden_state
        parts = LogitDistillation(student)(batch["input_ids"], batch["cu_seqlens"], batch["labels"], hidden,
                                           teacher.get_output_embeddings().weight)
    return float(parts[1])


def test_restore_gains_are_what_each_single_layer_hybrid_gains(inputs, tmp_path, capsys):
    """--score restore: a layer's gain is the student's KL minus the KL of the hybrid that keeps
    only that layer's attention (written by hybridize --layers, then measured directly), and the
    CLI keeps attention where the gains are largest."""
    gains = measure_restore_gains(inputs["teacher"], inputs["trained"], inputs["text"], rows=4, seq_len=24,
                                  batch_size=3, device="cpu")
    assert sorted(gains.scores) == list(range(LAYERS)) and gains.source["kind"] == "restore"
    base = kl_to_teacher(inputs["teacher"], inputs["trained"], inputs["text"], 4, 24)
    assert gains.source["kl"] == pytest.approx(base, rel=1e-5)
    for i in range(LAYERS):
        single = hybridize(inputs["teacher"], inputs["trained"], tmp_path / f"only{i}", layers=[i]).path
        after = kl_to_teacher(inputs["teacher"], single, inputs["text"], 4, 24)
        assert gains.scores[i] == pytest.approx(base - after, rel=1e-4, abs=1e-7), i
    assert len({round(v, 6) for v in gains.scores.values()}) == LAYERS  # distinct: a real choice
    out = tmp_path / "restore"
    rc, text, _ = run_main(["hybridize", "--teacher", str(inputs["teacher"]), "--student",
                            str(inputs["trained"]), "--data", str(inputs["text"]), "--rows", "4", "--seq-len",
                            "24", "--batch-size", "3", "--keep", "2", "--device", "cpu",
                            "--out", str(out)], capsys)  # restore: the default with --data
    assert rc == 0 and "drop of the student's KL" in text
    report = json.loads((out / "hybridize.json").read_text())
    assert report["chosen"] == sorted(sorted(gains.scores, key=gains.scores.get)[-2:])


# ----------------------------------------------------------------------------- refusals


def test_bad_requests_are_one_line(inputs, tmp_path, capsys):
    teacher, student = str(inputs["teacher"]), str(inputs["trained"])
    run = str(write_metrics(tmp_path / "run", stage1_records(SCORES, SCORES)))
    no_val = str(write_metrics(tmp_path / "noval", stage1_records(SCORES, SCORES)[:1]))
    other = tmp_path / "other"
    tiny_teacher(vocab=len(WORDS), hidden=64, intermediate=128, layers=3).save_pretrained(other)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("mine")
    capsys.readouterr()  # the set-up's own output (transformers' save bars)

    def error(*args: str, out: str = str(tmp_path / "out")) -> str:
        rc, _, err = run_main(["hybridize", "--teacher", teacher, "--student", student, "--out", out, *args],
                              capsys)
        assert rc == 1 and err.startswith("arwkv hybridize: ") and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
        return err

    assert "needs scores to choose by: give --run" in error("--keep", "1")
    assert "give --keep K" in error("--run", run)
    assert "not both" in error("--keep", "1", "--layers", "1", "--run", run)
    assert "not both" in error("--keep", "1", "--run", run, "--data", str(inputs["text"]))
    assert "--keep must be at least 0, got -1" in error("--keep", "-1", "--run", run)
    assert "--keep 5: the student has only 4 time-mixing layers" in error("--keep", "5", "--run", run)
    assert "--layers [4]: not layers of this 4-layer model" in error("--layers", "1,4")
    assert "exists and is not empty; pass --overwrite" in error("--layers", "1", out=str(full))
    assert "is the --student directory" in error("--layers", "1", "--overwrite", out=student)
    err = error("--keep", "1", "--run", no_val)
    assert "no held-out per-layer losses" in err and "--validation-fraction" in err
    err = error("--layers", "1", "--teacher", str(other))
    assert "does not match the student: num_hidden_layers 3" in err
    assert "not an arwkv student" in error("--layers", "1", "--student", teacher)
    assert "is not a directory" in error("--layers", "1", "--student", str(tmp_path / "nope"))
    assert "--run" in error("--keep", "1", "--run", str(tmp_path / "nope"))
    assert "--data" in error("--keep", "1", "--data", str(tmp_path / "nope.jsonl"))
    err = error("--keep", "1", "--run", run, "--score", "restore")
    assert "--score restore is measured here on --data" in err
    # a run of another student: it scores other layers
    other_run = str(write_metrics(tmp_path / "run2", stage1_records({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})))
    err = error("--keep", "1", "--run", other_run)
    assert "no score for the student's time-mixing layer(s) [2, 3]" in err
    # with --overwrite a non-empty --out is replaced, whole
    rc, _, _ = run_main(["hybridize", "--teacher", teacher, "--student", student, "--layers", "1",
                         "--overwrite", "--out", str(full)], capsys)
    assert rc == 0 and not (full / "x.txt").exists() and (full / "hybridize.json").is_file()
