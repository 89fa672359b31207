"""Time and memory per generated token, by context position, for an ARWKV student and its
teacher with a KV cache (same random teacher, converted; CPU by default).

    python benchmarks/bench_decode.py                     # positions 64 ... 8192, a mid-size model
    python benchmarks/bench_decode.py --positions 64,1024 --layers 4 --json out.json

For each position p the prompt of p tokens is prefilled once (untimed); then, from copies of
that cache, --warmup untimed runs and --repeats timed runs each decode --steps tokens greedily
at batch 1, and the time per token is the median over the timed runs of (run time / steps)
(arwkv.evaluation.perplexity.decoding_speed, which `arwkv demo` uses too). Cache bytes are read off the
caches themselves: the student's per-layer states (constant in p) and the teacher's key/value
tensors (linear in p).
Goal: the student's time per token at the largest position within 1.2x of the smallest.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from arwkv.cli import RawDescriptionDefaultsFormatter
from arwkv.conversion.convert import student_from_teacher
from arwkv.evaluation.perplexity import decoding_method, decoding_speed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsFormatter)
    ap.add_argument("--positions", default="64,256,1024,4096,8192", help="comma-separated context lengths")
    ap.add_argument("--hidden", type=int, default=512, help="teacher hidden size")
    ap.add_argument("--layers", type=int, default=8, help="teacher layers")
    ap.add_argument("--heads", type=int, default=8, help="teacher query heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="teacher key/value heads")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    ap.add_argument("--steps", type=int, default=32, help="decoding steps per run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per position (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    positions = [int(p) for p in args.positions.split(",")]
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(positions) + 64)
    teacher = Qwen2ForCausalLM(config).eval()
    student = student_from_teacher(teacher, head_size=64).eval()
    meta = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
            "vocab": args.vocab, "torch": torch.__version__,
            **decoding_method(args.steps, args.repeats, args.warmup)}
    print(json.dumps(meta))
    rows = []
    for p in positions:
        prompt = torch.randint(0, args.vocab, (1, p), generator=torch.Generator().manual_seed(p))
        s_time, s_bytes = decoding_speed(student, prompt, args.steps, args.repeats, args.warmup)
        t_time, t_bytes = decoding_speed(teacher, prompt, args.steps, args.repeats, args.warmup)
        rows.append({"position": p, "student_ms": s_time * 1e3, "student_cache_mb": s_bytes / 1e6,
                     "teacher_ms": t_time * 1e3, "teacher_cache_mb": t_bytes / 1e6})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'position':>8}  {'student ms/token':>16}  {'student cache MB':>16}  {'teacher ms/token':>16}  "
          f"{'teacher KV MB':>13}")
    for r in rows:
        print(f"{r['position']:>8}  {r['student_ms']:>16.2f}  {r['student_cache_mb']:>16.2f}  "
              f"{r['teacher_ms']:>16.2f}  {r['teacher_cache_mb']:>13.2f}")
    ratio = rows[-1]["student_ms"] / rows[0]["student_ms"]
    print(f"student time per token at {positions[-1]} / at {positions[0]}: {ratio:.2f}x (goal <= 1.2x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "student_ratio": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
