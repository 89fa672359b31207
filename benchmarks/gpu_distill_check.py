"""The GPU check's training smoke test (stage ``distill`` of benchmarks/gpu_check.sh): a few steps
each of distillation stages 1 and 2 through the ``arwkv distill`` command line, stage 2 again on
a hybrid of the stage-1 student (``arwkv hybridize --layers 0``), then ``arwkv eval``'s scoring of
the pure student, on a tiny Qwen2 teacher built here. Nothing is downloaded: the
teacher has random weights, a word-level tokenizer and Markov-chain text (tests/fixtures.py, the
tests' own tiny run), so it runs on a GPU machine without internet.

On a GPU the trainer runs float32 master weights under bf16 autocast (its only GPU precision);
the teacher is saved in bf16 and runs in its own dtype, as a Qwen2.5 teacher does. The student
uses head size 64 (the kernels' common case), unlike the tests' 16.

    python benchmarks/gpu_distill_check.py --out OUT/distill              # on the GPU
    python benchmarks/gpu_distill_check.py --out /tmp/d --device cpu      # dry run on the CPU

Writes OUT/summary.json (per stage: losses, seconds, peak GPU memory), OUT/stageN/metrics.jsonl
and loss.png; the models and checkpoints stay in --work (a temporary directory by default), so
that OUT holds only small files. Exit status 1 when a stage fails or a loss or the perplexity is
not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # fixtures.py: the tests' tiny teacher, tokenizer and text

from arwkv.cli import DefaultsHelpFormatter, build_parser  # noqa: E402
from arwkv.runtime import DEVICES, DTYPES, dtype_from_name, resolve_device  # noqa: E402
from arwkv.training.monitor import read_metrics  # noqa: E402


def make_inputs(work: Path, hidden: int, layers: int, head_size: int, teacher_dtype: str,
                docs: int, seed: int = 0) -> dict[str, Path]:
    """work/teacher (random tiny Qwen2 in teacher_dtype, with the word tokenizer), work/student
    (converted, fp32 master weights as `arwkv convert --dtype fp32` makes them) and
    work/text.jsonl (Markov-chain documents of 20-150 words)."""
    from arwkv.conversion.convert import convert_checkpoint
    from fixtures import WORDS, markov_text, tiny_teacher, word_tokenizer

    teacher = tiny_teacher(seed=seed, vocab=len(WORDS), hidden=hidden, intermediate=2 * hidden,
                           layers=layers, eos_token_id=0, max_position_embeddings=1024)
    teacher.to(dtype_from_name(teacher_dtype)).save_pretrained(work / "teacher")
    word_tokenizer().save_pretrained(work / "teacher")
    convert_checkpoint(work / "teacher", work / "student", head_size=head_size, dtype="fp32", overwrite=True)
    g = torch.Generator().manual_seed(seed)
    with (work / "text.jsonl").open("w") as f:
        for n in torch.randint(20, 150, (docs,), generator=g).tolist():
            f.write(json.dumps({"text": markov_text(g, n)}) + "\n")
    return {"teacher": work / "teacher", "student": work / "student", "text": work / "text.jsonl"}


def run_command(argv: list[str]) -> None:
    """One `arwkv` command as the command line runs it (same parser, same function), but with its
    traceback on failure: a smoke test should show where it broke, not one line."""
    print("$ arwkv " + " ".join(argv), file=sys.stderr, flush=True)
    args = build_parser().parse_args(argv)
    args.run(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="summary.json and each stage's metrics and loss curve")
    p.add_argument("--work", help="models, runs, checkpoints (default: a temporary directory, removed)")
    p.add_argument("--device", choices=DEVICES, default="cuda", help="where the stages and eval run")
    p.add_argument("--steps", type=int, default=2, help="optimiser steps per stage")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per packed row")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--hidden", type=int, default=256, help="teacher width (4 attention heads)")
    p.add_argument("--layers", type=int, default=2, help="teacher layers")
    p.add_argument("--head-size", type=int, default=64, help="the student's WKV head size")
    p.add_argument("--teacher-dtype", choices=list(DTYPES), default="bf16", help="the teacher's saved dtype")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as err:  # cuda without a GPU: one line, before any work
        p.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    temporary = None if args.work else tempfile.TemporaryDirectory(prefix="arwkv-distill-check-")
    work = Path(args.work or temporary.name)
    work.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    summary: dict = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "precision": "bf16 autocast over float32 weights" if cuda else "float32",
        "teacher_dtype": args.teacher_dtype,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "stages": {},
        "ok": False,
    }

    def save() -> None:  # after every stage, so a run stopped by a time limit keeps what finished
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    try:
        t0 = time.perf_counter()
        # about 86 tokens a document: enough for a few batches of packed rows
        docs = max(64, 4 * args.batch_size * args.seq_len // 86)
        inputs = make_inputs(work, args.hidden, args.layers, args.head_size, args.teacher_dtype, docs)
        summary["prepare_s"] = time.perf_counter() - t0
        def distill(stage: int, student: Path, name: str) -> Path:
            """One stage for args.steps steps into work/NAME; its losses and peak memory into the
            summary, its metrics and loss curve into OUT/NAME. Returns its student."""
            run = work / name
            if run.exists():  # a rerun with the same --work starts over
                shutil.rmtree(run)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            run_command([
                "distill", "--stage", str(stage), "--teacher", str(inputs["teacher"]),
                "--student", str(student), "--data", str(inputs["text"]), "--out", str(run),
                "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                "--max-steps", str(args.steps), "--warmup-steps", "1", "--lr", "1e-3",
                "--log-every", "1", "--device", args.device,
            ])
            seconds = time.perf_counter() - t0
            losses = [r["loss"] for r in read_metrics(run)]
            summary["stages"][name] = {
                "seconds": seconds,
                "losses": losses,
                "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            }
            (out / name).mkdir(exist_ok=True)
            for file in ("metrics.jsonl", "loss.png"):
                shutil.copy2(run / file, out / name / file)
            if len(losses) != args.steps or not all(math.isfinite(x) for x in losses):
                raise RuntimeError(f"{name}: expected {args.steps} finite losses, got {losses}")
            print(f"gpu_distill_check: {name}: {args.steps} steps on {device.type} in "
                  f"{seconds:.1f} s, losses {[round(x, 4) for x in losses]}", file=sys.stderr, flush=True)
            save()
            return run / "student"

        stage1 = distill(1, inputs["student"], "stage1")
        student = distill(2, stage1, "stage2")
        # a hybrid (layer 0's attention given back, measured end to end) through stage 2: kept
        # attention on packed rows (block-diagonal mask) under the GPU's bf16 autocast
        hybrid = work / "hybrid"
        run_command(["hybridize", "--teacher", str(inputs["teacher"]), "--student", str(stage1), "--data",
                     str(inputs["text"]), "--rows", "8", "--seq-len", str(args.seq_len), "--layers", "0",
                     "--device", args.device, "--out", str(hybrid), "--overwrite"])
        distill(2, hybrid, "hybrid_stage2")

        from arwkv.evaluation.perplexity import evaluate

        scored = evaluate(student, inputs["text"], seq_len=args.seq_len, max_tokens=4096, device=args.device)
        summary["eval"] = {k: scored[k] for k in ("perplexity", "predicted_tokens", "seconds", "device")}
        if not math.isfinite(scored["perplexity"]):
            raise RuntimeError(f"the distilled student's perplexity is {scored['perplexity']}")
        print(f"gpu_distill_check: distilled student's perplexity {scored['perplexity']:.2f} "
              f"({scored['predicted_tokens']} tokens, {scored['device']})", file=sys.stderr)
        summary["ok"] = True
    finally:  # what finished is kept, also when a stage fails
        save()
        if temporary is not None:
            temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
