"""``arwkv demo``: the whole idea on a laptop CPU in a few minutes, with no download.

A small Qwen2 teacher ships in ``arwkv/demo_assets/teacher`` (trained by
tools/make_demo_teacher.py on text that ships with Python: the pydoc topics and the standard
library's docstrings; ``train.jsonl`` / ``heldout.jsonl`` beside it). The demo converts it into an
RWKV-7 student (RWKV-6 with ``--wkv 6``), runs stage 1 (attention alignment) and stage 2 (logit
distillation) on the training split, then scores teacher and student on the held-out split, times
decoding at a short and a long context (batch 1, greedy; the median of several timed runs after a warm-up: see
``evaluate.decoding_speed``), generates a sample from each, measures the loss by position of
both on long sequences of the held-out text (``long_context``: documents concatenated into
2048-token sequences, each scored from an empty context; the teacher was trained on 256-token
sequences and the student distilled on 128-token ones) and their cache bytes per token of
context, and writes OUT/report.md, OUT/report.json, the loss curves and OUT/long_context.png.

Everything runs on the CPU by default: the published numbers and the step counts are the CPU
story. ``--device cuda`` runs the same pipeline (training, scoring, decoding, samples) on a GPU,
as a quick end-to-end check there; training then uses the trainer's bf16 autocast over float32
weights, so its numbers are not the CPU ones.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .evaluation.long_context import (
    bucket_edges,
    describe_model,
    describe_settings,
    load_sequences,
    loss_by_position,
    plot_long_context,
)
from .files import write_atomic
from .loading import load_causal_lm
from .options import LongContextOptions
from .runtime import resolve_device

ASSETS = Path(__file__).parent / "demo_assets"
PROMPT = "The for statement is used to"


@dataclass
class DemoPlan:
    """What the demo runs; ``quick()`` is the seconds-long version CI runs (same code path)."""

    init: str = "transfer"
    # where training, scoring and decoding run: cpu (the published story), cuda or auto
    device: str = "cpu"
    keep_bias: bool = False  # the teacher's q/k/v biases on the student (as arwkv convert --keep-bias)
    wkv: int = 7  # the student's time mixing: RWKV-7, or RWKV-6 in convert's default (qrwkv) form
    # the student's WKV head size: 64, which llama.cpp runs correctly (its CPU kernel mishandles
    # 32 on AVX-512 machines); measured at the default steps: 1.021x (head size 32: 1.009x)
    head_size: int = 64
    gguf: bool = False  # also write the distilled student as OUT/student.gguf (f16) for llama.cpp
    # Step counts chosen by measurement (2 cores, AVX-512, transfer init keeping the teacher's
    # q/k/v biases, the default then): stage 1 / stage 2 =
    # 60/260 -> 1.050x the teacher's held-out perplexity in 81 s, 60/400 -> 1.016x in 115 s,
    # 120/400 -> 1.009x in 121 s, 200/380 -> 1.009x in 130 s, 240/340 -> 1.007x in 135 s. The
    # slower AVX2 machines take about 2.1x as long, and the whole demo must stay under 5 minutes
    # there: 120/400 (about 4 min 15 s).
    stage1_steps: int = 120
    stage1_lr: float = 3e-3
    stage2_steps: int = 400
    stage2_lr: float = 2e-3
    seq_len: int = 128
    batch_size: int = 8
    eval_seq_len: int = 256
    eval_tokens: int | None = None
    contexts: tuple[int, int] = (64, 1024)
    decode_steps: int = 16  # tokens decoded per run (5 timed runs: 80 timed steps per row)
    decode_repeats: int = 5  # timed runs; the median is reported
    decode_warmup: int = 1  # untimed runs before them
    sample_tokens: int = 40
    # loss by position on the held-out split, its documents concatenated into sequences of
    # long_context_len tokens (31k held-out tokens: 15 sequences of 2048), each scored from an
    # empty context: 9.2 s for both models (and their cache bytes) measured on 1 thread of the
    # 2-core machine under other load
    long_context_len: int = 2048
    long_context_buckets: int = 8  # log-spaced position buckets
    long_context_sequences: int | None = None  # at most this many sequences (None: all)

    @classmethod
    def quick(cls, init: str = "transfer") -> DemoPlan:
        """A few steps of everything: seconds, not minutes."""
        return cls(
            init=init,
            stage1_steps=3,
            stage2_steps=3,
            seq_len=32,
            batch_size=2,
            eval_tokens=2000,
            contexts=(16, 64),
            decode_steps=2,
            decode_repeats=2,
            sample_tokens=8,
            long_context_len=64,
            long_context_buckets=3,
            long_context_sequences=2,
        )


def _say(text: str) -> None:
    print(f"arwkv demo: {text}", file=sys.stderr, flush=True)


def _where(device: str, gpu: str | None = None) -> str:
    """``CPU``, or ``GPU (its name)``: where the demo ran, for its messages and report."""
    if device == "cpu":
        return "CPU"
    return f"GPU ({gpu})" if gpu else "GPU"


# the DemoPlan fields that `arwkv demo` sets from a flag, named in refusals
FLAGS = {"stage1_steps": "--stage1-steps", "stage2_steps": "--stage2-steps"}
MARKER = ".arwkv-demo"
# what a demo writes into OUT (all that a rerun removes)
OUTPUTS = (
    "student-init",
    "stage1",
    "stage2",
    "report.md",
    "report.json",
    "stage1_loss.png",
    "stage2_loss.png",
    "long_context.png",
    "student.gguf",
)


def mixing_name(wkv: int) -> str:
    return "RWKV-7" if wkv == 7 else "RWKV-6 (qrwkv)"


def _prepare_out(out: Path) -> None:
    """OUT may be new, empty, or an earlier demo's output (its entries are replaced, nothing
    else is touched); anything else is refused."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"--out {out} exists and is not an earlier demo's output; choose another")
        for name in OUTPUTS:
            entry = out / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by arwkv demo\n")


def _decode_rows(model, heldout_ids: list[int], plan: DemoPlan) -> list[dict]:
    """One row per context length of plan.contexts: tokens/s of greedy decoding at batch 1 after
    a prompt of that many held-out tokens (repeated when the text is shorter), and the cache."""
    from .evaluation.perplexity import decoding_speed

    rows = []
    steps = plan.decode_steps
    device = next(model.parameters()).device
    for context in plan.contexts:
        prompt = torch.tensor([(heldout_ids * (context // max(len(heldout_ids), 1) + 1))[:context]],
                              device=device)
        seconds, cache = decoding_speed(model, prompt, steps, repeats=plan.decode_repeats,
                                        warmup=plan.decode_warmup)
        rows.append(
            {
                "context": context,
                "tokens_per_s": 1.0 / seconds,
                "ms_per_token": seconds * 1e3,
                # measured after a timed run: the cache then holds context + steps tokens
                "tokens_held": context + steps,
                "cache_bytes": cache,
                "cache_bytes_per_token_held": cache / (context + steps),
            }
        )
    return rows


def _sample(model, tokenizer, tokens: int) -> str:
    """PROMPT continued greedily by ``tokens`` tokens."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def long_context_edges(plan: DemoPlan) -> list[int]:
    """The position buckets of the demo's loss-by-position curve (log-spaced)."""
    return bucket_edges(plan.long_context_len, plan.long_context_buckets, "log")


def _markers(trained_at: dict[str, int | None]) -> dict[str, int]:
    """The sequence lengths teacher and student were trained at, as labelled lines on the
    loss-by-position plot."""
    verbs = {"teacher": "trained", "student": "distilled"}
    return {f"{name} {verbs[name]} at {n}": n for name, n in trained_at.items() if n}


def _long_context(teacher: Path, student: Path, device: torch.device, plan: DemoPlan, scores: dict) -> dict:
    """Loss by position (long_context's) of teacher and student on the held-out split made into
    plan.long_context_len-token sequences, and each one's cache bytes (constant, per token of
    context; measured by the held-out scoring, ``scores``), as a long-context report:
    {"settings", "models": [teacher, student]}."""
    settings = LongContextOptions(
        max_len=plan.long_context_len,
        buckets=str(plan.long_context_buckets),
        data=str(ASSETS / "heldout.jsonl"),
        max_sequences=plan.long_context_sequences,
        passkey_trials=0,
        device=device.type,
    )
    edges = long_context_edges(plan)
    teacher_len = json.loads((teacher / "training_report.json").read_text()).get("seq_len")
    trained_at = {"teacher": teacher_len, "student": plan.seq_len}  # sequence lengths in training
    report = {"settings": describe_settings(settings), "trained_at": trained_at, "models": []}
    for name, path in (("teacher", teacher), ("student", student)):
        model, tokenizer = load_causal_lm(path, device, torch.float32)
        sequences = load_sequences(tokenizer, settings.data, settings.max_len,
                                   max_sequences=settings.max_sequences)
        entry = describe_model(name, path, model)
        entry["loss_by_position"] = loss_by_position(model, sequences, edges)
        entry["cache_bytes"] = scores[name]["cache_bytes"]
        report["models"].append(entry)
    return report


def run_demo(out: str | Path, plan: DemoPlan | None = None) -> dict:
    """Runs the demo into ``out``; returns the report (also written as OUT/report.json)."""
    from .conversion.convert import convert_checkpoint
    from .evaluation.perplexity import decoding_method, evaluate
    from .options import STAGE_TITLES, DistillConfig
    from .training.monitor import read_metrics
    from .training.trainer import train

    plan = plan or DemoPlan()
    out = Path(out)
    for name in (
        "stage1_steps",
        "stage2_steps",
        "seq_len",
        "batch_size",
        "eval_seq_len",
        "decode_steps",
        "decode_repeats",
        "sample_tokens",
        "long_context_len",
        "long_context_buckets",
    ):
        if getattr(plan, name) < 1:
            flag = FLAGS.get(name)
            raise ValueError(
                f"{name} must be at least 1, got {getattr(plan, name)}" + (f" ({flag})" if flag else "")
            )
    if plan.decode_warmup < 0:
        raise ValueError(f"decode_warmup must not be negative, got {plan.decode_warmup}")
    if plan.long_context_sequences is not None and plan.long_context_sequences < 1:
        raise ValueError(f"long_context_sequences must be at least 1, got {plan.long_context_sequences}")
    long_context_edges(plan)  # refused here, before OUT is touched
    device = resolve_device(plan.device)  # refused here, before OUT is touched
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    # the trainer runs float32 weights under bf16 autocast on a GPU, in float32 on the CPU
    precision = "bf16 autocast over float32 weights" if device.type == "cuda" else "float32"
    teacher = ASSETS / "teacher"
    if not (teacher / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo teacher is missing from {teacher}; regenerate it with tools/make_demo_teacher.py"
        )
    _prepare_out(out)
    began = time.perf_counter()
    timings = {}

    _say(f"converting the shipped Qwen2 teacher into an {mixing_name(plan.wkv)} student (--init {plan.init}, "
         f"--head-size {plan.head_size}{', --keep-bias' if plan.keep_bias else ''})")
    t0 = time.perf_counter()
    convert_checkpoint(teacher, out / "student-init", init=plan.init, head_size=plan.head_size, dtype="fp32",
                       keep_bias=plan.keep_bias, wkv=plan.wkv)
    timings["convert_s"] = time.perf_counter() - t0

    common = dict(
        teacher=str(teacher),
        data=str(ASSETS / "train.jsonl"),
        seq_len=plan.seq_len,
        batch_size=plan.batch_size,
        log_every=20,
        seed=0,
    )
    stages = [
        (1, plan.stage1_steps, plan.stage1_lr, out / "student-init"),
        (2, plan.stage2_steps, plan.stage2_lr, out / "stage1" / "student"),
    ]
    for stage, steps, lr, student in stages:
        _say(
            f"stage {stage} ({STAGE_TITLES[stage]}): {steps} steps "
            f"of {plan.batch_size} x {plan.seq_len} tokens on the {_where(device.type, gpu)}"
        )
        t0 = time.perf_counter()
        train(
            DistillConfig(
                stage=stage,
                student=str(student),
                out=str(out / f"stage{stage}"),
                max_steps=steps,
                lr=lr,
                warmup_steps=max(steps // 10, 1),
                device=device.type,
                **common,
            )
        )
        timings[f"stage{stage}_s"] = time.perf_counter() - t0
        shutil.copy2(out / f"stage{stage}" / "loss.png", out / f"stage{stage}_loss.png")
    student = out / "stage2" / "student"

    _say("scoring teacher and student on the held-out split")
    t0 = time.perf_counter()
    heldout = str(ASSETS / "heldout.jsonl")
    scores = {
        name: evaluate(path, heldout, seq_len=plan.eval_seq_len, max_tokens=plan.eval_tokens,
                       device=device.type)
        for name, path in (
            ("teacher", teacher),
            ("student", student),
            ("student_before", out / "student-init"),
        )
    }
    timings["eval_s"] = time.perf_counter() - t0
    predicted = {name: score["predicted_tokens"] for name, score in scores.items()}
    if len(set(predicted.values())) != 1:  # same tokenizer, same windows: the ratio compares like with like
        raise RuntimeError(f"demo: teacher and student were scored on different token counts {predicted}")

    _say(
        f"decoding speed (median of {plan.decode_repeats} runs of {plan.decode_steps} steps) and cache "
        f"memory at contexts {plan.contexts}; samples"
    )
    t0 = time.perf_counter()
    text = json.loads((ASSETS / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[0])["text"]
    decode, samples = {}, {}
    for name, path in (("teacher", teacher), ("student", student)):
        # the same tokenizer for both (the student's is the teacher's copy)
        model, tokenizer = load_causal_lm(path, device, torch.float32)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        decode[name] = _decode_rows(model, ids, plan)
        samples[name] = _sample(model, tokenizer, plan.sample_tokens)
    timings["decode_and_samples_s"] = time.perf_counter() - t0

    _say(f"loss by position on {plan.long_context_len}-token held-out sequences, and cache bytes per token")
    t0 = time.perf_counter()
    long_context = _long_context(teacher, student, device, plan, scores)
    png = plot_long_context(long_context, _markers(long_context["trained_at"]))
    write_atomic(out / "long_context.png", png)
    timings["long_context_s"] = time.perf_counter() - t0
    gguf_path = None
    if plan.gguf:
        from .export.gguf import export_gguf

        _say("writing the distilled student as llama.cpp's arwkv7 GGUF (f16)")
        gguf_export = export_gguf(student, out / "student.gguf", outtype="f16", overwrite=True)
        for warning in gguf_export.warnings:
            _say(f"warning: {warning}")
        gguf_path = str(gguf_export.path)
    # other processes on the CPU move these timings more than anything: say how busy it was
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    training_report = json.loads((teacher / "training_report.json").read_text())
    report = {
        "teacher_ppl": scores["teacher"]["perplexity"],
        "student_ppl": scores["student"]["perplexity"],
        "ratio": scores["student"]["perplexity"] / scores["teacher"]["perplexity"],
        "student_ppl_before_distillation": scores["student_before"]["perplexity"],
        "unigram_ppl": training_report.get("unigram_heldout_ppl"),
        "init": plan.init,
        "device": device.type,  # where it all ran (plan.device is what was asked: auto, cpu, cuda)
        "gpu": gpu,
        "training_precision": precision,
        "plan": {k: v for k, v in plan.__dict__.items()},
        "heldout_tokens_predicted": scores["teacher"]["predicted_tokens"],
        "final_losses": {f"stage{s}": read_metrics(out / f"stage{s}")[-1]["loss"] for s in (1, 2)},
        "decode": decode,
        "decode_method": {
            **decoding_method(plan.decode_steps, plan.decode_repeats, plan.decode_warmup),
            "contexts": list(plan.contexts),
            "dtype": "float32",
            "device": device.type,
            "gpu": gpu,
            "load_average_1min": load,
            "cpus": os.cpu_count(),
        },
        "samples": samples,
        "long_context": long_context,
        "gguf": gguf_path,
        "timings": timings,
        "seconds": time.perf_counter() - began,
        "threads": torch.get_num_threads(),
    }
    # report.md first, report.json last and atomically: a complete report.json means a finished demo
    write_atomic(out / "report.md", render_report(report))
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    _say(
        f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'stage1_loss.png'}, "
        f"{out / 'stage2_loss.png'}, {out / 'long_context.png'}"
    )
    print(render_report(report))
    return report


def _decode_method_text(r: dict) -> str:
    """One sentence saying what the decoding table measures."""
    m = r.get("decode_method")
    if not m:  # a report written before decode_method existed
        return "Batch 1, greedy decoding."

    def runs(n: int, what: str) -> str:
        return f"{n} {what} run{'' if n == 1 else 's'}"

    device = m["device"]
    threads = f" with {m['threads']} threads" if device == "cpu" else ""
    return (
        f"Batch {m['batch']}, greedy, {m['dtype']} on the {_where(device, m.get('gpu'))}{threads}. "
        f"After the prompt (prefilled once, untimed), {runs(m['warmup_runs'], 'untimed warm-up')}, then "
        f"{runs(m['repeats'], 'timed')} of {m['steps']} decoding steps, each from a copy of the prompt's "
        "cache; tokens/s is 1 / the median over the timed runs of (run time / steps)."
        + (
            f" The machine's 1-minute load average was {m['load_average_1min']:.1f} on {m['cpus']} CPUs "
            "(other processes slow decoding down, most of all when the load exceeds the CPUs)."
            if m.get("load_average_1min") is not None
            else ""
        )
    )


def render_report(r: dict) -> str:
    """report.md from the report's numbers."""
    device = r.get("device", "cpu")  # reports written before --device ran on the CPU
    how = (
        f"({r['threads']} threads)"
        if device == "cpu"
        else f"({r.get('training_precision', 'bf16 autocast over float32 weights')})"
    )
    mixing = mixing_name(r["plan"].get("wkv", 7))
    lines = [
        "# arwkv demo",
        "",
        f"A Qwen2 teacher (shipped, trained on Python's own documentation) converted into an {mixing} "
        f"student (`--init {r['init']}`) and distilled on this machine's {_where(device, r.get('gpu'))} in "
        f"{r['seconds']:.0f} s {how}: stage 1 for {r['plan']['stage1_steps']} steps, stage 2 for "
        f"{r['plan']['stage2_steps']} steps.",
        "",
        f"## Held-out perplexity ({r['heldout_tokens_predicted']} predicted tokens)",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| teacher (Transformer) | {r['teacher_ppl']:.2f} |",
        f"| student ({mixing}), distilled | {r['student_ppl']:.2f} |",
        f"| student before distillation | {r['student_ppl_before_distillation']:.2f} |",
    ]
    if r.get("unigram_ppl"):
        lines.append(f"| unigram model | {r['unigram_ppl']:.2f} |")
    lines += [
        "",
        f"Student / teacher: **{r['ratio']:.3f}x** (goal <= 1.25x).",
        "",
        "## Decoding (one token at a time, after a prompt of the given length)",
        "",
        _decode_method_text(r),
        "",
        "| model | context | tokens/s | cache (context + decoded tokens) | bytes per token held |",
        "|---|---|---|---|---|",
    ]
    for name in ("teacher", "student"):
        for row in r["decode"][name]:
            lines.append(
                f"| {name} | {row['context']} | {row['tokens_per_s']:.0f} | "
                f"{row['cache_bytes'] / 1024:.1f} KiB ({row['tokens_held']} tokens) | "
                f"{row['cache_bytes_per_token_held']:.0f} |"
            )
    short, long = (r["decode"][name] for name in ("student", "teacher"))
    lines += [
        "",
        f"From context {short[0]['context']} to {short[-1]['context']}, the student's cache goes from "
        f"{short[0]['cache_bytes'] / 1024:.1f} to {short[-1]['cache_bytes'] / 1024:.1f} KiB, "
        "the teacher's from "
        f"{long[0]['cache_bytes'] / 1024:.1f} to {long[-1]['cache_bytes'] / 1024:.1f} KiB.",
        "",
    ]
    lines += _long_context_text(r.get("long_context"))
    lines += ["## Samples (greedy)", ""]
    for name in ("teacher", "student"):
        lines += [f"**{name}**:", "", "```", r["samples"][name], "```", ""]
    lines += ["## Time", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in r["timings"].items()]
    figures = "`stage1_loss.png`, `stage2_loss.png`"
    if r.get("long_context"):
        figures += "; loss by position: `long_context.png`"
    lines += ["", f"Loss curves: {figures}.", ""]
    return "\n".join(lines)


def _long_context_text(lc: dict | None) -> list[str]:
    """report.md's lines on the cache bytes per token of context and the loss by position (none
    for a report written before they were measured)."""
    if not lc:
        return []
    models = {m["name"]: m for m in lc["models"]}
    teacher, student = models["teacher"], models["student"]
    tc, sc = teacher["cache_bytes"], student["cache_bytes"]
    lines = [
        f"Cache per token of context (prefills of {tc['lengths'][0]} and {tc['lengths'][1]} tokens): "
        f"teacher {tc['per_token']:g} bytes, student {sc['per_token']:g} bytes; besides that, independent "
        f"of the context: teacher {tc['constant'] / 1024:.1f} KiB, student {sc['constant'] / 1024:.1f} KiB.",
        "",
    ]
    tl, sl = teacher["loss_by_position"], student["loss_by_position"]
    settings, trained = lc["settings"], lc.get("trained_at", {})
    lines += [
        f"## Loss by position ({tl['sequences']} held-out sequences of {settings['max_len']} tokens)",
        "",
        "Mean next-token loss (nats) of the tokens at positions t in [start, end) of their sequence, "
        "predicted from t tokens of context; each sequence scored in one forward from an empty context, "
        "the held-out documents concatenated (EOS after each). The teacher was trained on sequences of "
        f"{trained.get('teacher', '?')} tokens, the student distilled on sequences of "
        f"{trained.get('student', '?')} tokens. Figure: `long_context.png`.",
        "",
        "| positions | tokens | teacher loss | student loss | student - teacher |",
        "|---|---|---|---|---|",
    ]
    for t, st in zip(tl["buckets"], sl["buckets"], strict=True):
        lines.append(
            f"| {t['start']}-{t['end'] - 1} | {t['tokens']} | {t['mean_loss']:.3f} | {st['mean_loss']:.3f} | "
            f"{st['mean_loss'] - t['mean_loss']:+.3f} |"
        )
    lines += [
        f"| all | {tl['tokens']} | {tl['mean_loss']:.3f} | {sl['mean_loss']:.3f} | "
        f"{sl['mean_loss'] - tl['mean_loss']:+.3f} |",
        "",
    ]
    return lines
