"""Peak memory of one stage-1 (attention alignment) step against the depth of the teacher.

Each configuration runs in a fresh process and reports its peak RSS (ru_maxrss) after building a
random Qwen2 teacher of the given depth and its student, then one step of the hooked aligner
(one student layer graph at a time) or of the naive loss (every layer's graph kept, summed):

    python benchmarks/bench_stage1_memory.py [--width 512] [--seq-len 1024] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from arwkv.cli import RawDescriptionDefaultsFormatter


def run_one(layers: int, width: int, seq_len: int, batch: int, mode: str) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from arwkv.conversion.convert import student_from_teacher
    from arwkv.training.losses import AttentionAligner, alignment_losses_keeping_graphs

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1000, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=2)
    teacher = Qwen2ForCausalLM(config).eval()
    student = student_from_teacher(teacher, head_size=64)
    ids = torch.randint(0, 1000, (batch, seq_len))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "aligner":
        AttentionAligner(teacher, student).step(ids)
    else:  # keep every layer's graph, then one backward
        torch.stack(alignment_losses_keeping_graphs(teacher, student, ids)).mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"layers": layers, "mode": mode, "rss_before_step_mb": before / 1e3, "peak_rss_mb": peak / 1e3,
            "step_mb": (peak - before) / 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsFormatter)
    ap.add_argument("--width", type=int, default=512, help="teacher hidden size")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per row")
    ap.add_argument("--batch", type=int, default=4, help="rows per step")
    ap.add_argument("--child", nargs=2, metavar=("LAYERS", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(int(args.child[0]), args.width, args.seq_len, args.batch, args.child[1])))
        return 0
    print(f"width {args.width}, batch {args.batch} x {args.seq_len} tokens; peak RSS of a fresh process")
    print(f"{'layers':>6}  {'mode':>8}  {'peak RSS MB':>11}  {'added by the step MB':>20}")
    for layers in (2, 4, 8):
        for mode in ("aligner", "naive"):
            cmd = [sys.executable, __file__, "--width", str(args.width), "--seq-len", str(args.seq_len),
                   "--batch", str(args.batch), "--child", str(layers), mode]
            # a fixed mmap threshold: freed large blocks go back to the system, so RSS tracks live
            # memory rather than glibc's growing heap
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{layers:>6}  {mode:>8}  {r['peak_rss_mb']:>11.0f}  {r['step_mb']:>20.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
