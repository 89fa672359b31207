"""Which layers should keep the teacher's attention? Held-out perplexity of hybrids of the demo
student that keep attention in K = 0, 1, 2 layers, chosen by `arwkv hybridize` under each of its
two scores, taking the K worst layers (what it does by default) or the K best (the opposite
choice, the ablation), against the teacher, with the KV cache each hybrid then needs.

    python benchmarks/bench_hybrid_layers.py [--out DIR] [--stage1-steps N] [--stage2-steps N] [--quick]

On the shipped demo teacher (4 layers) at the demo's budget (arwkv.demo.DemoPlan: steps, lr,
seq_len, batch size, head size, held-out scoring): convert to an all-RWKV student, stage 1 with
--validation-fraction (so the run's metrics hold the held-out val_layer_I), then the two scores
of its layers: `alignment` (the run's val_layer_I) and `restore` (measured on the same held-out
split: the drop of the student's KL to the teacher when only that layer gets attention back).
Per variant (K = 0 once; K = 1, 2 with each score and --pick worst and best): hybridize, stage 2
at the demo's budget, held-out perplexity (arwkv.evaluation.perplexity.evaluate, the demo's settings). A
layer set that two variants choose is trained once. Writes RESULTS/hybrid-layers.md and
RESULTS/hybrid-layers.json (--quick: into --out instead). About 20 minutes on 2 CPU cores.

Cache bytes per token of context are the kept attention layers' keys and values at float32
(2 x kv heads x head_dim x 4 bytes per layer); the time-mixing layers' state is fixed (its
column), whatever the context.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from arwkv.cli import RawDescriptionDefaultsFormatter
from arwkv.conversion.convert import convert_checkpoint
from arwkv.conversion.hybridize import hybridize, measure_restore_gains
from arwkv.demo import ASSETS, DemoPlan
from arwkv.evaluation.perplexity import evaluate
from arwkv.files import write_atomic
from arwkv.options import DistillConfig
from arwkv.training.monitor import read_metrics
from arwkv.training.trainer import train

RESULTS = Path(__file__).parent / "results"
# (score, K, pick); K = 0 keeps nothing, whatever the score
VARIANTS = [("alignment", 0, "worst")] + [(score, keep, pick) for score in ("alignment", "restore")
                                          for keep in (1, 2) for pick in ("worst", "best")]


def _say(text: str) -> None:
    print(f"bench_hybrid_layers: {text}", file=sys.stderr, flush=True)


def _stage(stage: int, student: Path, out: Path, steps: int, lr: float, plan: DemoPlan, device: str,
           validation_fraction: float = 0.0) -> Path:
    """One stage as the demo runs it (its data, seq_len, batch, warm-up, seed); OUT/student."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (the trainer refuses a used --out)
    return train(DistillConfig(stage=stage, teacher=str(ASSETS / "teacher"), student=str(student),
                               data=str(ASSETS / "train.jsonl"), out=str(out), seq_len=plan.seq_len,
                               batch_size=plan.batch_size, max_steps=steps, lr=lr,
                               warmup_steps=max(steps // 10, 1), validation_fraction=validation_fraction,
                               log_every=20, seed=0, device=device))


def cache_bytes(config: dict, attention_layers: int) -> tuple[int, int]:
    """(bytes per token of context: the attention layers' float32 keys and values, bytes of the
    time-mixing layers' fixed state: float32 WKV state H x N x N and the token-shift vector)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv = 2 * config.get("num_key_value_heads", heads) * head_dim * 4 * attention_layers
    width = heads * head_dim
    mixers = config["num_hidden_layers"] - attention_layers
    head_size = config.get("head_size", 64)
    state = (width // head_size) * head_size**2 * 4 + config["hidden_size"] * 4
    return kv, state * mixers


def render(report: dict) -> str:
    """hybrid-layers.md from the report."""
    plan, scores = report["plan"], report["scores"]
    layers = list(scores["alignment"])
    lines = [
        "# Which layers keep attention: the K worst vs the K best by each score (demo teacher)",
        "",
        f"The shipped {report['layers']}-layer Qwen2 demo teacher, converted to an RWKV-7 student (head size "
        f"{plan['head_size']}, --init {plan['init']}), stage 1 for {plan['stage1_steps']} steps with "
        f"--validation-fraction {report['validation_fraction']} ({report['stage1_seconds']:.0f} s); "
        f"then per row: `arwkv hybridize --keep K --score S --pick P` (S alignment: `--run stage1`; "
        f"S restore: `--data train.jsonl --validation-fraction {report['validation_fraction']}`, "
        f"{report['restore_rows']} rows of {plan['seq_len']} tokens), stage 2 for {plan['stage2_steps']} "
        f"steps, held-out perplexity ({report['heldout_tokens_predicted']} predicted tokens of "
        f"heldout.jsonl, windows of {plan['eval_seq_len']}). Device: {report['device']}, "
        f"{report['threads']} threads.",
        "",
        "The two scores of the stage-1 student's layers, on the held-out 10% of train.jsonl (higher: "
        "time mixing does worse there):",
        "",
        "| score | " + " | ".join(f"layer {i}" for i in layers) + " |",
        "|---|" + "---|" * len(layers),
        "| alignment: stage-1 RMS alignment loss (val_layer_I) | "
        + " | ".join(f"{scores['alignment'][i]:.4f}" for i in layers) + " |",
        f"| restore: drop of KL(teacher \\|\\| student) per token (now {report['restore_kl']:.4f}) with only "
        "that layer's attention back | " + " | ".join(f"{scores['restore'][i]:.4f}" for i in layers) + " |",
        "",
        "| K | score | pick | layers kept (attention) | held-out ppl | ratio to teacher | "
        "cache bytes / token of context | fixed state bytes | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        kept = ", ".join(map(str, r["attention_layers"])) or "none"
        score, pick = (r["score"], r["pick"]) if r["keep"] else ("-", "-")  # K = 0: no choice made
        seconds = f"{r['seconds']:.0f}" if r["trained"] else f"(as {r['same_as']})"
        lines.append(f"| {r['keep']} | {score} | {pick} | {kept} | {r['perplexity']:.3f} | "
                     f"{r['ratio']:.4f}x | {r['kv_bytes_per_token']} | {r['state_bytes']} | {seconds} |")
    t = report["teacher"]
    lines += [
        f"| teacher | - | - | all | {t['perplexity']:.3f} | 1x | {t['kv_bytes_per_token']} | 0 | - |",
        "",
        "K = 0 is the all-RWKV student (the demo's pipeline, but stage 1 trains on the split that is "
        "not held out). A row whose layer set an earlier row already chose reuses that row's student "
        "(wall time \"as\" it). Wall time per row: hybridize + stage 2 + scoring, on a shared machine. "
        "Cache bytes per token: the kept attention layers' float32 keys and values; fixed state: the "
        "time-mixing layers' WKV state and token shift, the same at any context length.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsFormatter)
    ap.add_argument("--out", default="arwkv-hybrid-layers", metavar="DIR",
                    help="work directory (students, runs); its entries from an earlier run are replaced")
    ap.add_argument("--stage1-steps", type=int, metavar="N", help="default: the demo's")
    ap.add_argument("--stage2-steps", type=int, metavar="N", help="default: the demo's")
    ap.add_argument("--validation-fraction", type=float, default=0.1,
                    help="stage 1's held-out documents (its val_layer_I are the alignment scores; the "
                    "restore scores are measured on them)")
    ap.add_argument("--restore-rows", type=int, default=64, help="held-out rows the restore scores use")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where everything runs")
    ap.add_argument("--results", metavar="DIR",
                    help=f"where hybrid-layers.md/.json go (default: {RESULTS}; --quick: --out)")
    ap.add_argument("--quick", action="store_true", help="DemoPlan.quick(): a few steps of everything")
    args = ap.parse_args(argv)
    plan = DemoPlan.quick() if args.quick else DemoPlan()
    for name in ("stage1_steps", "stage2_steps"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Path(args.results) if args.results else (out if args.quick else RESULTS)
    teacher = ASSETS / "teacher"
    heldout = ASSETS / "heldout.jsonl"
    config = json.loads((teacher / "config.json").read_text())
    config["head_size"] = plan.head_size

    def score(model: Path) -> dict:
        return evaluate(model, heldout, seq_len=plan.eval_seq_len, max_tokens=plan.eval_tokens,
                        device=args.device)

    began = time.perf_counter()
    _say("converting the demo teacher to an all-RWKV student")
    convert_checkpoint(teacher, out / "student-init", init=plan.init, head_size=plan.head_size, dtype="fp32",
                       keep_bias=plan.keep_bias, overwrite=True)
    _say(f"stage 1: {plan.stage1_steps} steps, --validation-fraction {args.validation_fraction}")
    t0 = time.perf_counter()
    _stage(1, out / "student-init", out / "stage1", plan.stage1_steps, plan.stage1_lr, plan, args.device,
           args.validation_fraction)
    stage1_seconds = time.perf_counter() - t0
    last = [r for r in read_metrics(out / "stage1") if "val_layer_0" in r][-1]
    layers = range(config["num_hidden_layers"])
    restore = measure_restore_gains(teacher, out / "stage1" / "student", ASSETS / "train.jsonl",
                                    rows=args.restore_rows, seq_len=plan.seq_len, batch_size=plan.batch_size,
                                    validation_fraction=args.validation_fraction, seed=0, device=args.device)
    scores = {"alignment": {i: last[f"val_layer_{i}"] for i in layers},
              "restore": {i: restore.scores[i] for i in layers}}
    _say(f"stage-1 student's layer scores: {scores}")
    teacher_score = score(teacher)
    rows, trained = [], {}  # trained: layer set -> the row that trained it
    for score_kind, keep, pick in VARIANTS:
        name = f"k{keep}" + (f"-{score_kind}-{pick}" if keep else "")
        t0 = time.perf_counter()
        source = {"run": out / "stage1"} if score_kind == "alignment" else {
            "data": ASSETS / "train.jsonl", "rows": args.restore_rows, "seq_len": plan.seq_len,
            "batch_size": plan.batch_size, "validation_fraction": args.validation_fraction}
        hybrid = hybridize(teacher, out / "stage1" / "student", out / name / "student-init", keep=keep,
                           score=score_kind, pick=pick, overwrite=True, device=args.device, **source)
        attention = hybrid.report["attention_layers"]
        earlier = trained.get(tuple(attention))
        if earlier is None:
            _say(f"{name}: keeps attention in {attention}; stage 2: {plan.stage2_steps} steps")
            student = _stage(2, hybrid.path, out / name / "stage2", plan.stage2_steps, plan.stage2_lr, plan,
                             args.device)
            result = score(student)
            if result["predicted_tokens"] != teacher_score["predicted_tokens"]:
                raise RuntimeError(f"{name}: scored {result['predicted_tokens']} tokens, the teacher "
                                   f"{teacher_score['predicted_tokens']}")
            perplexity = result["perplexity"]
            final_loss = read_metrics(out / name / "stage2")[-1]["loss"]
            trained[tuple(attention)] = {"name": name, "perplexity": perplexity, "final_loss": final_loss}
        else:
            _say(f"{name}: keeps attention in {attention}, as {earlier['name']} did: its student is reused")
            perplexity, final_loss = earlier["perplexity"], earlier["final_loss"]
        seconds = time.perf_counter() - t0
        kv, state = cache_bytes(config, len(attention))
        rows.append({"keep": keep, "score": score_kind, "pick": pick, "attention_layers": attention,
                     "perplexity": perplexity, "ratio": perplexity / teacher_score["perplexity"],
                     "kv_bytes_per_token": kv, "state_bytes": state, "seconds": seconds,
                     "trained": earlier is None, "same_as": earlier["name"] if earlier else None,
                     "final_stage2_loss": final_loss})
        _say(f"{name}: layers kept {attention}, held-out ppl {perplexity:.3f} "
             f"({rows[-1]['ratio']:.4f}x the teacher's) in {seconds:.0f} s")
    report = {
        "layers": config["num_hidden_layers"],
        "plan": dict(plan.__dict__),
        "validation_fraction": args.validation_fraction,
        "stage1_seconds": stage1_seconds,
        "scores": scores,
        "stage1_scores_step": last["step"],
        "restore_kl": restore.source["kl"],
        "restore_rows": restore.source["rows"],
        "teacher": {"perplexity": teacher_score["perplexity"],
                    "kv_bytes_per_token": cache_bytes(config, config["num_hidden_layers"])[0]},
        "heldout_tokens_predicted": teacher_score["predicted_tokens"],
        "rows": rows,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "seconds": time.perf_counter() - began,
        "torch": torch.__version__,
    }
    results.mkdir(parents=True, exist_ok=True)
    text = render(report)
    write_atomic(results / "hybrid-layers.md", text)
    write_atomic(results / "hybrid-layers.json", json.dumps(report, indent=2) + "\n")
    print(text)
    _say(f"wrote {results / 'hybrid-layers.md'} and {results / 'hybrid-layers.json'} "
         f"in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
