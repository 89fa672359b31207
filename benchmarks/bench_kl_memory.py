"""Peak memory of the stage-2 loss, KL(teacher || student) over the full vocabulary, computed
chunk by chunk (arwkv.training.losses.chunked_kl) against the plain computation on full logits, at
(B=1, T=2048, V=151936) with Qwen2.5-0.5B's width (896), float32, forward + backward.

    python benchmarks/bench_kl_memory.py [--tokens 2048] [--vocab 151936] [--width 896]

Each variant runs in a fresh process (glibc told to return freed blocks, so RSS follows live
memory); reported: peak RSS added by the loss and its gradient. Goal: chunked <= half of plain.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from arwkv.cli import RawDescriptionDefaultsFormatter


def child(mode: str, tokens: int, vocab: int, width: int) -> dict:
    import torch

    from arwkv.training.losses import _kl_chunk, chunked_kl

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, width, generator=g).requires_grad_()
    head = (torch.randn(vocab, width, generator=g) * 0.02).requires_grad_()
    t_hidden, t_head = torch.randn(tokens, width, generator=g), torch.randn(vocab, width, generator=g) * 0.02
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "chunked":
        loss = chunked_kl(hidden, head, t_hidden, t_head, chunk=512)
    else:
        loss = _kl_chunk(hidden, head, t_hidden, t_head, 1.0)[0] / tokens
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "loss": loss.item(), "added_mb": (peak - before) / 1e3, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens T (B = 1)")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size V")
    ap.add_argument("--width", type=int, default=896, help="hidden width of student and teacher")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.vocab, args.width)))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    rows = {}
    for mode in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--width", str(args.width), "--child", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_mb = args.tokens * args.vocab * 4 / 1e6
    print(f"KL over V={args.vocab}, {args.tokens} tokens, width {args.width} "
          f"(one float32 [T, V] = {logits_mb:.0f} MB)")
    for mode, r in rows.items():
        print(f"{mode:>8}: +{r['added_mb']:.0f} MB peak RSS, {r['seconds']:.1f} s, loss {r['loss']:.6f}")
    ratio = rows["chunked"]["added_mb"] / rows["plain"]["added_mb"]
    print(f"chunked / plain peak: {ratio:.2f} (goal <= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
