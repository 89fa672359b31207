"""``arwkv distill`` end to end on a tiny teacher: the four stages, one config type for flags
and files, the schedule and batch split, checkpoints that resume exactly after SIGKILL, two gloo
processes (DDP and FSDP2) matching one process, ``arwkv eval`` and ``arwkv plot``, one-line
errors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from arwkv.cli import main
from arwkv.data.order import RowOrder
from arwkv.options import ConfigError, DistillConfig, load_config_file
from arwkv.training.monitor import read_metrics
from arwkv.training.trainer import Schedule, micro_batches
from fixtures import WORDS, chat_record, make_run_inputs, markov_text, tiny_teacher, word_tokenizer


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> dict[str, Path]:
    return make_run_inputs(tmp_path_factory.mktemp("tiny"))


def distill_args(inputs: dict[str, Path], out: Path, stage: int = 2, tokenized: bool = False,
                 **flags) -> list[str]:
    """An arwkv distill command line on the stage's data: raw, or its token directory (from arwkv
    tokenize) when ``tokenized``."""
    data = {3: inputs["chat"], 4: inputs["prefs"]}.get(stage, inputs["text"])
    if tokenized:
        data = tokenized_dir(data)
    args = [
        "distill",
        "--stage",
        str(stage),
        "--student",
        str(inputs["student"]),
        "--data",
        str(data),
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
    ]
    if stage in (1, 2):
        args += ["--teacher", str(inputs["teacher"])]
    for key, value in flags.items():
        flag = f"--{key.replace('_', '-')}"
        args += (
            [flag]
            if value is True
            else [f"--no-{key.replace('_', '-')}"]
            if value is False
            else [flag, str(value)]
        )
    return args


def tokenized_dir(data: Path) -> Path:
    """data's token directory beside it (made once, by the arwkv tokenize command with the
    student's tokenizer, 2 workers)."""
    out = data.parent / f"{data.stem}-tokens"
    if not out.exists():
        assert main(["tokenize", "--data", str(data), "--tokenizer", str(data.parent / "student"), "--out",
                     str(out), "--workers", "2"]) == 0
    return out


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


def run_cli(
    args: list[str], cwd: Path, torchrun: int = 0, timeout: float = 300, **popen
) -> subprocess.Popen | subprocess.CompletedProcess:
    """The command in a fresh process (one thread each, so sums are made in the same order)."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
        if torchrun
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*launcher, "-m", "arwkv.cli", *args]
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, **popen)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- config


def test_flags_and_config_files_make_the_same_config(tmp_path, run_inputs):
    flags = [
        "distill",
        "--stage",
        "2",
        "--teacher",
        str(run_inputs["teacher"]),
        "--student",
        str(run_inputs["student"]),
        "--data",
        str(run_inputs["text"]),
        "--out",
        str(tmp_path / "o"),
        "--seq-len",
        "64",
        "--lr",
        "0.001",
        "--freeze-mlp",
        "--schedule",
        "constant",
    ]
    import argparse

    from arwkv.options import add_arguments, options_from_args

    def config_from_args(args):
        return options_from_args(DistillConfig, args)

    parser = argparse.ArgumentParser()
    add_arguments(parser, DistillConfig)
    from_flags = config_from_args(parser.parse_args(flags[1:]))
    (tmp_path / "c.yaml").write_text(
        f"stage: 2\nteacher: {run_inputs['teacher']}\nstudent: {run_inputs['student']}\n"
        f"data: {run_inputs['text']}\nout: {tmp_path / 'o'}\nseq-len: 64\nlr: 0.001\nfreeze_mlp: true\n"
        "schedule: constant\n"
    )
    (tmp_path / "c.toml").write_text(
        f"stage = 2\nteacher = '{run_inputs['teacher']}'\nstudent = '{run_inputs['student']}'\n"
        f"data = '{run_inputs['text']}'\nout = '{tmp_path / 'o'}'\nseq_len = 64\nlr = 1e-3\n"
        "freeze_mlp = true\n"
        "schedule = 'constant'\n"
    )
    for name in ("c.yaml", "c.toml"):
        assert config_from_args(parser.parse_args(["--config", str(tmp_path / name)])) == from_flags
    # a flag wins over the file
    assert (
        config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--seq-len", "16"])).seq_len
        == 16
    )
    assert (
        from_flags.seq_len == 64
        and from_flags.freeze_mlp
        and from_flags.batch_size == DistillConfig().batch_size
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("seq_len: 64\nsequence_length: 3\n", "unknown key 'sequence_length'"),
        ("seq_len: sixty\n", "seq_len = 'sixty' is not a whole number"),
        ("freeze_mlp: 1\n", "freeze_mlp = 1 is not true or false"),
        ("- 1\n", "expected a mapping"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(tmp_path / "c.yaml", DistillConfig)


def test_schedule_warms_up_then_decays():
    schedule = Schedule.of(DistillConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1))
    factors = [schedule.factor(s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert schedule.factor(100) == pytest.approx(0.1)
    constant = Schedule.of(DistillConfig(max_steps=100, warmup_steps=10, schedule="constant"))
    assert {constant.factor(s) for s in range(10, 100)} == {1.0}


@pytest.mark.parametrize("stop, total", [(6, 12), (30, 100), (60, 40), (1, 12), (100, 300)])
def test_a_stretched_schedule_goes_on_from_where_it_was(stop, total):
    """Resumed at ``stop`` with --max-steps ``total`` (was 100 with 10 warm-up steps): the same factor
    as the run had at the resumed step, falling from there to --min-lr-ratio at the new total; the
    same --max-steps changes nothing; stretching twice keeps the rate continuous both times."""
    before = Schedule.of(DistillConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1))
    after = before.resumed(total, stop)
    assert before.resumed(100, stop) is before
    assert after.factor(stop) == pytest.approx(before.factor(stop))  # no jump at the resume point
    if stop >= 10 and total > stop:
        tail = [after.factor(s) for s in range(stop, total + 1)]
        assert all(a >= b - 1e-12 for a, b in zip(tail, tail[1:], strict=False))
        assert after.factor(total) == pytest.approx(0.1)
    elif stop < 10:  # still warming up: the schedule of the new total, from its start
        assert [after.factor(s) for s in range(total)] == [
            Schedule.of(DistillConfig(max_steps=total, warmup_steps=10, min_lr_ratio=0.1)).factor(s)
            for s in range(total)]
    again = after.resumed(total + 50, stop + 5)
    assert again.factor(stop + 5) == pytest.approx(after.factor(stop + 5))


def test_resume_with_more_steps_continues_the_learning_rate(tmp_path, run_inputs):
    """The user's path: 6 steps, then --resume --max-steps 12: the logged rates go on from where
    they were, down to --min-lr-ratio, without a jump."""
    out = tmp_path / "run"
    assert main(distill_args(run_inputs, out, max_steps=6)) == 0
    assert main(distill_args(run_inputs, out, max_steps=12, resume=True)) == 0
    lrs = [r["lr"] for r in read_metrics(out)]
    assert len(lrs) == 12
    first = Schedule.of(DistillConfig(max_steps=6, warmup_steps=2, lr=3e-3))
    assert lrs[:6] == pytest.approx([3e-3 * first.factor(s) for s in range(6)])
    assert lrs[6] == pytest.approx(3e-3 * first.factor(6))  # continuous at the resume point
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False)) and lrs[-1] > 3e-4


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batches_split_over_ranks_cover_each_row_once_per_epoch(world):
    order = RowOrder(rows=12, batch_size=4, seed=3)
    epoch = [i for s in range(3) for i in order.batch(s)]
    assert sorted(epoch) == list(range(12))
    assert order.batch(3) != order.batch(0) or order.batch(4) != order.batch(1)  # a new order next epoch
    for step in range(5):
        rows = order.batch(step)
        shares = [micro_batches(rows, 4 // world if world < 4 else 1, world, r) for r in range(world)]
        assert sorted(i for share in shares for mb in share for i in mb) == sorted(rows)
    assert RowOrder(rows=12, batch_size=4, seed=3).batch(7) == order.batch(7)


# ----------------------------------------------------------------------------- stages, in process


def test_what_each_stage_trains(run_inputs):
    from arwkv.training.stages import make_stage
    from arwkv.training.trainer import load_student, make_optimizer

    student = load_student(run_inputs["student"])
    make_stage(DistillConfig(stage=1)).set_trainable(student)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names and all(".time_mixer." in n for n in names)
    assert "model.layers.0.self_attn.time_mixer.v1" not in names  # layer 0 makes v_first
    assert "model.layers.1.self_attn.time_mixer.v1" in names
    make_stage(DistillConfig(stage=2, freeze_mlp=True, freeze_embeddings=True)).set_trainable(student)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert not any(".mlp." in n or "embed_tokens" in n for n in names) and "lm_head.weight" in names
    optimizer = make_optimizer(
        DistillConfig(weight_decay=0.1), [p for p in student.parameters() if p.requires_grad]
    )
    for group in optimizer.param_groups:
        assert all((p.ndim == 2) == (group["weight_decay"] == 0.1) for p in group["params"])
        assert group["betas"] == (0.9, 0.95)


def test_activation_checkpointing_gives_the_same_gradients(run_inputs):
    from arwkv.training.trainer import load_student

    student = load_student(run_inputs["student"]).train()
    ids = torch.randint(5, 60, (1, 24))
    grads = []
    for flag in (False, True):
        student.zero_grad()
        student.model.gradient_checkpointing = flag
        student(ids, labels=ids, use_cache=False).loss.backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_each_stage_runs_and_leaves_a_loadable_student(tmp_path, run_inputs, stage, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"stage{stage}"
    assert (
        main(
            distill_args(
                run_inputs,
                out,
                stage,
                max_steps=6,
                save_every=2,
                keep_last=2,
                validation_fraction=0.1,
                eval_every=3,
                log_every=2,
            )
        )
        == 0
    )
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert "val_loss" in records[2] and "val_loss" in records[5] and "val_loss" not in records[0]
    parts = {1: ["layer_0", "layer_1"], 2: ["kl", "ce"], 3: [], 4: ["reward_accuracy", "margin"]}[stage]
    assert all(f"val_{p}" in records[5] and p in records[5] for p in parts)  # held-out parts too
    if stage == 1:  # the held-out loss is the mean of the per-layer ones
        per_layer = (records[5]["val_layer_0"] + records[5]["val_layer_1"]) / 2
        assert records[5]["val_loss"] == pytest.approx(per_layer)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    try:
        import tensorboard  # noqa: F401

        assert any((out / "tensorboard").iterdir())
    except ImportError:
        pass
    err = capsys.readouterr().err
    assert "step 2/6" in err and "step 6/6" in err  # plain progress lines when not on a terminal
    final = f"arwkv distill: validation loss {records[5]['val_loss']:.6g} at step 6"
    assert final in err  # the last held-out loss is said, not only logged
    if stage == 3:  # conversations are packed whole, and the run says what was cut
        assert "conversations packed whole into" in err and "truncated to --seq-len" in err
    student = AutoModelForCausalLM.from_pretrained(out / "student", trust_remote_code=True)
    assert type(student).__name__ == "RwkvHybridForCausalLM"
    # the export is the last checkpoint's weights
    saved = AutoModelForCausalLM.from_pretrained(
        out / "checkpoints" / "step-00000006", trust_remote_code=True
    )
    for (name, a), b in zip(student.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if stage == 2:
        assert records[-1]["kl"] < records[0]["kl"]  # it learns
    if stage == 3:
        assert records[-1]["loss"] < records[0]["loss"]
    if stage == 4:  # the policy starts as its reference (margin 0, loss log 2), then learns the
        # pairs: judged on the held-out ones (one step's 4 training pairs are too few to say)
        assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert records[-1]["val_loss"] < math.log(2) and records[-1]["val_margin"] > 0
        assert "preference pairs, one per row" in err


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_each_stage_trains_a_hybrid(tmp_path, run_inputs, stage):
    """A student that keeps layer 0's attention: stage 1 aligns its one time mixer and leaves the
    kept attention alone; stages 2-4 train the whole student, kept attention included, on
    packed rows; the result loads and runs."""
    from transformers import AutoModelForCausalLM

    from arwkv.training.trainer import load_student

    out = tmp_path / f"hybrid{stage}"
    inputs = {**run_inputs, "student": run_inputs["hybrid"]}
    # lr 1e-3: the transferred hybrid starts close to its teacher (KL ~0.004), 3e-3 overshoots
    flags = dict(max_steps=4, validation_fraction=0.1, eval_every=1, log_every=100, lr=1e-3)
    assert main(distill_args(inputs, out, stage, **flags)) == 0
    records = read_metrics(out)
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["val_loss"] < records[0]["val_loss"]  # the same held-out rows: it learns
    if stage == 1:
        assert "layer_1" in records[-1] and "val_layer_1" in records[-1] and "layer_0" not in records[-1]
    before, after = load_student(run_inputs["hybrid"]), load_student(out / "student")
    kept = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(before.get_parameter(kept), after.get_parameter(kept)) == (stage == 1)
    student = AutoModelForCausalLM.from_pretrained(out / "student", trust_remote_code=True)
    assert student.config.wkv_layers == [1]
    with torch.no_grad():
        assert torch.isfinite(student(torch.tensor([[3, 4, 5]])).logits).all()


def test_stage2_adaptive_kl_runs_and_learns(tmp_path, run_inputs, capsys):
    out = tmp_path / "akl"
    assert main(distill_args(run_inputs, out, 2, max_steps=6, kl="adaptive", akl_head=0.5)) == 0
    records = read_metrics(out)
    assert "kl" not in records[0]  # its own key: runs of the two divergences cannot be mixed up
    assert records[-1]["akl"] < records[0]["akl"]
    assert main(distill_args(run_inputs, tmp_path / "bad", 2, max_steps=2, kl="adaptive", akl_head=1.5)) == 1
    assert "--akl-head must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_bad_preference_records_are_one_line(tmp_path, run_inputs, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1 w2", "chosen": "w3"}) + "\n")
    assert main(distill_args({**run_inputs, "prefs": bad}, tmp_path / "o", 4, max_steps=1)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "record 1: a preference record needs 'prompt', 'chosen' and 'rejected'" in err[0]
    assert main(distill_args(run_inputs, tmp_path / "o2", 4, max_steps=1, dpo_beta=0)) == 1
    assert "--dpo-beta must be positive" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume, processes


# One case of each in the default tier (make test); the others in make test-full (about 20 s each).
# (on a token directory from arwkv tokenize: what a large run reads; raw data goes the same way)
@pytest.mark.parametrize("stage,student", [
    (2, "student"), *(pytest.param(*case, marks=pytest.mark.slow)
                      for case in [(4, "student"), (2, "hybrid"), (3, "hybrid"), (4, "hybrid")])])
def test_resume_after_sigkill_gives_the_uninterrupted_losses(tmp_path, run_inputs, stage, student):
    run_inputs = {**run_inputs, "student": run_inputs[student]}
    args = dict(max_steps=8, save_every=3, micro_batch_size=2, log_every=100, tokenized=True)
    whole = run_cli(distill_args(run_inputs, tmp_path / "whole", stage, **args), tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    proc = run_cli(
        distill_args(run_inputs, out, stage, **args), tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while len(read_metrics(out)) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 5 <= len(read_metrics(out)) < 8
    resumed = run_cli(distill_args(run_inputs, out, stage, resume=True, **args), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "steps 3..8" in resumed.stderr or "steps 6..8" in resumed.stderr
    assert losses(out) == losses(tmp_path / "whole")
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))


def test_ctrl_c_says_how_to_resume(tmp_path, run_inputs):
    """Ctrl-C (SIGINT) during distill: one line saying that --resume goes on from the last
    checkpoint, no traceback, exit status 130; and --resume then does."""
    out = tmp_path / "run"
    args = distill_args(run_inputs, out, max_steps=100_000, save_every=1, log_every=1)
    # as a shell's foreground job gets it: a test run started in the background (make &) passes
    # SIGINT on ignored, and a Python that starts with SIGINT ignored keeps ignoring it
    proc = run_cli(args, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while len(read_metrics(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"arwkv distill: interrupted; the same command with --resume continues from "
                        rf"{re.escape(str(out))}/checkpoints/step-\d{{8}}", last), last
    resumed = run_cli(distill_args(run_inputs, out, max_steps=5, save_every=1, resume=True), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.mark.parametrize("stage,strategy,student,tokenized", [
    (1, "ddp", "student", True), (2, "ddp", "student", True), (3, "fsdp", "hybrid", False),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        (2, "ddp", "student", False), (2, "fsdp", "student", True), (3, "fsdp", "student", True),
        (4, "ddp", "student", True), (1, "ddp", "hybrid", False), (2, "ddp", "hybrid", True),
        (4, "ddp", "hybrid", False)]),
])
def test_two_gloo_processes_match_one(tmp_path, run_inputs, stage, strategy, student, tokenized):
    """The global batch (4 rows, micro-batches of 2) split over 2 processes, each reading only
    its own rows, gives one process's losses: exactly under DDP, within float tolerance under
    FSDP2; for pure and hybrid students, on token directories and raw data."""
    run_inputs = {**run_inputs, "student": run_inputs[student]}
    args = dict(max_steps=3, micro_batch_size=2, log_every=100, tokenized=tokenized)
    one = run_cli(distill_args(run_inputs, tmp_path / "one", stage, **args), tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(
        distill_args(run_inputs, tmp_path / "two", stage, strategy=strategy, **args), tmp_path, torchrun=2
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr
    if strategy == "ddp":
        assert losses(tmp_path / "two") == losses(tmp_path / "one")
    else:
        assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert len(losses(tmp_path / "two")) == 3  # rank 0 alone writes the log


# ----------------------------------------------------------------------------- eval, plot, errors


def test_eval_reports_the_models_own_perplexity(run_inputs, capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from arwkv.data.tokenize import scored_documents
    from arwkv.evaluation.perplexity import windows

    model_dir = run_inputs["student"]
    assert (
        main(["eval", "--model", str(model_dir), "--data", str(run_inputs["text"]), "--seq-len", "16"]) == 0
    )
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    # while it scores it says what (and nothing of transformers' own loading bars)
    assert captured.err.startswith("arwkv eval: scoring ") and "Loading weights" not in captured.err
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    docs = list(scored_documents(run_inputs["text"], tokenizer))
    nll, n = 0.0, 0
    with torch.no_grad():
        for piece in windows(docs, 16):  # one window at a time, the model's own loss
            ids = torch.tensor([piece])
            nll += model(ids, labels=ids).loss.item() * (len(piece) - 1)
            n += len(piece) - 1
    assert report["predicted_tokens"] == n > 500
    assert report["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert report["tokens_per_s"] > 0
    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--data",
                str(run_inputs["text"]),
                "--seq-len",
                "16",
                "--validation-fraction",
                "0.2",
            ]
        )
        == 0
    )
    held_out = json.loads(capsys.readouterr().out)
    assert 0 < held_out["predicted_tokens"] < n
    # a token directory made with the same fraction scores the same documents: the same numbers;
    # without the flag, all of them (both splits: train first, so other batches, float rounding)
    tokens = tmp_path / "tokens"
    assert main(["tokenize", "--data", str(run_inputs["text"]), "--tokenizer", str(model_dir), "--out",
                 str(tokens), "--validation-fraction", "0.2"]) == 0
    for flags, expected, rel in ((["--validation-fraction", "0.2"], held_out, 1e-12), ([], report, 1e-6)):
        argv = ["eval", "--model", str(model_dir), "--data", str(tokens), "--seq-len", "16", *flags]
        assert main(argv) == 0
        scored = json.loads(capsys.readouterr().out)
        assert scored["predicted_tokens"] == expected["predicted_tokens"]
        assert scored["nll"] == pytest.approx(expected["nll"], rel=rel)


def test_plot_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1 / s, "lr": 1e-3}) + "\n" for s in range(1, 5))
        + '{"step": 5, "lo'
    )  # a cut last line
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(tmp_path / "none")]) == 1
    assert "holds no training records" in capsys.readouterr().err


def test_loss_plot_shows_whole_steps_and_the_losss_parts():
    """A 3-step run's axis has whole steps only; stage 1's per-layer losses and DPO's reward
    accuracy are drawn (an unused CE term, zero throughout, is not)."""
    from arwkv.training.monitor import loss_figure, loss_parts

    stage1 = [{"step": s, "stage": 1, "loss": 1 / s, "layer_0": 1 / s, "layer_1": 2 / s, "lr": 1e-3,
               "grad_norm": 1.0, "tokens": 64 * s, "tokens_per_s": 9.0, "val_loss": 1.0} for s in (1, 2, 3)]
    dpo = [{"step": s, "loss": 0.7, "reward_accuracy": 0.5, "margin": 0.1 * s, "lr": 1e-6} for s in (1, 2)]
    kl = [{"step": s, "loss": 1.0, "kl": 1.0, "ce": 0.0, "lr": 1e-4} for s in (1, 2)]
    assert loss_parts(stage1) == ["layer_0", "layer_1"]
    assert loss_parts(dpo) == ["reward_accuracy", "margin"] and loss_parts(kl) == ["kl"]
    fig = loss_figure(stage1)
    assert len(fig.axes) == 3 and [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == [
        "layer_0", "layer_1"]
    ticks = [t for t in fig.axes[-1].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert len(loss_figure([{"step": 1, "loss": 1.0, "lr": 1e-3}]).axes) == 2  # nothing else logged


def test_bad_runs_are_one_line(tmp_path, run_inputs, capsys):
    def error(args: list[str]) -> str:
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("arwkv "), err
        return err[0]

    assert "--data" in error(distill_args({**run_inputs, "text": tmp_path / "missing.jsonl"}, tmp_path / "o"))
    assert "does not exist" in error(
        distill_args({**run_inputs, "text": tmp_path / "missing.jsonl"}, tmp_path / "o")
    )
    (tmp_path / "c.toml").write_text("lr = 1e-3\nlearning_rate = 2\n")
    assert "unknown key 'learning_rate'" in error(["distill", "--config", str(tmp_path / "c.toml")])
    no_teacher = distill_args(run_inputs, tmp_path / "o")
    del no_teacher[no_teacher.index("--teacher") : no_teacher.index("--teacher") + 2]
    assert "--teacher is required" in error(no_teacher)
    assert "not an arwkv student" in error(
        distill_args({**run_inputs, "student": run_inputs["teacher"]}, tmp_path / "o2", max_steps=1)
    )
    out = tmp_path / "run"
    assert main(distill_args(run_inputs, out, max_steps=1)) == 0
    capsys.readouterr()
    assert "already holds a run" in error(distill_args(run_inputs, out, max_steps=1))
    assert "was made with --seq-len 32, this run asks for --seq-len 16" in error(
        distill_args(run_inputs, out, max_steps=2, resume=True, seq_len=16)
    )
    assert "--lr 0.003, this run asks for --lr 0.01" in error(
        distill_args(run_inputs, out, max_steps=2, resume=True, lr=0.01)
    )
    (out / "checkpoints" / "step-00000001" / "trainer_state.pt").write_bytes(b"not a checkpoint")
    assert "not a readable arwkv trainer state" in error(
        distill_args(run_inputs, out, max_steps=2, resume=True)
    )
    assert "fewer than --batch-size 400" in error(distill_args(run_inputs, tmp_path / "o3", batch_size=400))
    # a split asked for that holds out too little for one row
    assert "gives no row of 32 tokens; hold out more" in error(
        distill_args(run_inputs, tmp_path / "o5", validation_fraction=0.01)
    )
    assert "--min-lr-ratio must be in [0, 1]" in error(
        distill_args(run_inputs, tmp_path / "o4", min_lr_ratio=-1)
    )


def test_sft_micro_batches_without_assistant_tokens(tmp_path, run_inputs):
    """Rows cut from long user turns can hold no labelled token: they weigh nothing in the step's
    mean (no NaN), and the step's loss is the mean over the batch's labelled tokens."""
    g = torch.Generator().manual_seed(1)
    data = tmp_path / "long_user.jsonl"
    with data.open("w") as f:
        for i in range(12):  # most are cut before their answer; every third fits whole
            user = markov_text(g, 1 if i % 3 == 0 else 60)
            f.write(json.dumps(chat_record(user, markov_text(g, 2))) + "\n")
    out = tmp_path / "run"
    assert (
        main(distill_args({**run_inputs, "chat": data}, out, 3, seq_len=16, micro_batch_size=1, max_steps=4))
        == 0
    )
    assert all(math.isfinite(loss) for loss in losses(out))


def test_sft_data_with_nothing_to_learn_is_refused(tmp_path, run_inputs, capsys):
    """Stage 3 whose every answer is cut off by --seq-len trains on nothing: refused in one line
    that says why (it used to write loss -0 every step and a student)."""
    g = torch.Generator().manual_seed(1)
    data = tmp_path / "long_user.jsonl"
    data.write_text("".join(json.dumps(chat_record(markov_text(g, 60), markov_text(g, 3))) + "\n"
                            for _ in range(12)))
    out = tmp_path / "run"
    assert main(distill_args({**run_inputs, "chat": data}, out, 3, seq_len=16, max_steps=2)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the training rows hold no assistant tokens to learn from" in err[0], err
    assert "12 truncated to --seq-len 16" in err[0] and "raise --seq-len" in err[0]
    assert not (out / "student").exists()
    # with room for the answers, the log says how many tokens it learns from
    assert main(distill_args({**run_inputs, "chat": data}, out, 3, seq_len=128, max_steps=1)) == 0
    assert re.search(r"; \d+ assistant tokens in the training conversations", capsys.readouterr().err)


@pytest.mark.parametrize("stage, records, message", [
    (3, [{"text": "w1 w2"}], "stage 3 (SFT) trains on chat records; --data {data} holds 1 text records"),
    (3, [chat_record("w1", "w2"), {"messages": []}], "{data}: record 2: its 'messages' list is empty"),
    (3, [{"messages": [{"role": "wizard", "content": "w1"}]}],
     "{data}: record 1: a message needs a known role"),
    (2, [{"text": "w1 w2"}, {"title": "w3"}], "{data}: record 2: a record needs 'text', a 'messages'/"
     "'conversations' list, or 'prompt'/'chosen'/'rejected'; it has keys ['title']"),
    (2, [{"text": 7}], "{data}: record 1: a record's 'text' must be a string"),
])
def test_bad_records_name_the_file_and_the_record(tmp_path, run_inputs, capsys, stage, records, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    key = {3: "chat", 2: "text"}[stage]
    assert main(distill_args({**run_inputs, key: data}, tmp_path / "o", stage, max_steps=1)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"arwkv distill: {message.format(data=data)}"), err


def test_stage2_with_a_larger_teacher(tmp_path, run_inputs):
    """A deeper, wider teacher with a larger vocabulary (same tokenizer) teaches the student in
    stage 2; its extra logits are truncated to the student's vocabulary, with a warning."""
    big = tiny_teacher(tie=False, seed=3, vocab=len(WORDS) + 8, hidden=96, intermediate=192, layers=3)
    big.save_pretrained(tmp_path / "big")
    word_tokenizer().save_pretrained(tmp_path / "big")
    with pytest.warns(UserWarning, match="truncated to the student's vocabulary"):
        assert (
            main(distill_args({**run_inputs, "teacher": tmp_path / "big"}, tmp_path / "run", 2, max_steps=2))
            == 0
        )
    assert len(losses(tmp_path / "run")) == 2 and all(math.isfinite(x) for x in losses(tmp_path / "run"))


def test_on_a_terminal_the_header_comes_before_the_progress_bar(tmp_path, run_inputs):
    """On a terminal the run's header lines are printed, then tqdm's bar starts on a line of its
    own (the header used to be written over the bar's line)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    args = [sys.executable, "-m", "arwkv.cli", *distill_args(run_inputs, tmp_path / "run", max_steps=2)]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, output.decode(errors="replace")[-2000:]
    text = output.decode(errors="replace")
    assert "%|" in text and "step/s" in text, text[-3000:]  # tqdm's bar was drawn
    header_line = next(line for line in text.split("\n") if "arwkv distill: stage 2, " in line)
    assert "%|" not in header_line, text[:2000]  # the header has its own line
    assert text.index("arwkv distill: stage 2, ") < text.index("%|")


def test_quiet_surprises_are_said(tmp_path, run_inputs, capsys):
    """--teacher given to a stage that learns from none, and --resume on an --out with no
    checkpoint yet: each is one note line (both used to pass without a word)."""
    out = tmp_path / "sft"
    args = distill_args(run_inputs, out, 3, max_steps=1, resume=True)
    args += ["--teacher", str(run_inputs["teacher"])]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "arwkv distill: note: stage 3 (SFT) learns from no teacher; --teacher is not used" in err
    assert f"arwkv distill: note: --resume: {out} holds no checkpoint yet; starting at step 0" in err
