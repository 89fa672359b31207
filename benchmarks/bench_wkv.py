"""Benchmark of torch.ops.arwkv.wkv7 / wkv6 against the step-by-step reference recurrence.

    python benchmarks/bench_wkv.py                       # CPU, float32, the two default shapes
    python benchmarks/bench_wkv.py --json results.json   # also write the table as JSON
    python benchmarks/bench_wkv.py --shapes 1,1024,16,64 --ops wkv7 --dtype bfloat16

Measured in one run, on the same inputs: forward, backward (the backward op that autograd
calls) and forward+backward (autograd, gradients of every input from y and final_state) times,
forward GFLOP/s (8 N^2 flop per token per head), the throughput of a float32 torch.mm on the
same threads as the machine's yardstick, the time of autograd through the step-by-step
reference, and the largest relative error of y, final_state and every gradient against a
float64 reference. The reference is timed on the first --ref-steps steps (default 1024) and
scaled linearly to T: running it whole at (4, 2048, 32, 64) needs over 20 GB, and its cost per
step only grows with T (autograd keeps every step's tensors), so the scaling flatters it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

import arwkv_ext
from arwkv_ext.reference import wkv6_reference, wkv7_reference
from arwkv_ext.testing import make_inputs, rel_error, run_with_grads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = {"wkv7": (arwkv_ext.wkv7, wkv7_reference), "wkv6": (arwkv_ext.wkv6, wkv6_reference)}
DEFAULT_SHAPES = "1,1024,16,64;4,2048,32,64"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeat: int, warmup: bool = True) -> float:
    """Median wall time of fn() in seconds, after one warm-up call unless warmup=False."""
    if warmup:
        fn()
        sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mm_gflops(device: str, repeat: int) -> float:
    """float32 torch.mm throughput: the yardstick the kernel's GFLOP/s is compared with."""
    n = 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device, repeat) / 1e9


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor]) -> Callable[[], object]:
    """A closure running forward + backward through fn, gradients of every input."""
    leaves = [x.detach().requires_grad_() for x in inputs]

    def run():
        y, state = fn(*leaves)
        grads = torch.autograd.grad((y.float().sum() + state.sum()), leaves)
        return grads

    return run


def max_error(op: str, inputs: list[torch.Tensor], steps: int) -> float:
    """Largest relative error of y, final_state and all gradients vs a float64 reference."""
    fn, ref = OPS[op]
    xs = [x[:, :steps].detach() if x.dim() == 4 else x.detach() for x in inputs]
    B, T, H, N = xs[0].shape
    gy = torch.randn(B, T, H, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gs = torch.randn(B, H, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    device = xs[0].device
    y, s, g = run_with_grads(fn, xs, None, None, gy.to(device), gs.to(device))
    y64, s64, g64 = run_with_grads(ref, [x.cpu().double() for x in xs], None, None, gy, gs)
    return max(rel_error(a, b) for a, b in zip([y, s, *g], [y64, s64, *g64], strict=True))


def bench_one(op: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: str, repeat: int,
              ref_steps: int, err_steps: int, mm: float) -> dict:
    B, T, H, N = shape
    fn, ref = OPS[op]
    inputs = make_inputs(op, B, T, H, N, dtype=dtype, device=device)
    with torch.no_grad():
        t_fwd = timed(lambda: fn(*inputs), device, repeat)
        y, state = fn(*inputs)
    gy, gs = torch.ones_like(y), torch.ones_like(state)
    backward_op = torch.ops.arwkv.wkv7_backward if op == "wkv7" else torch.ops.arwkv.wkv6_backward
    t_bwd = timed(lambda: backward_op(*inputs, None, None, gy, gs), device, repeat)
    t_fb = timed(fwd_bwd(fn, inputs), device, repeat)

    steps = min(T, ref_steps)
    prefix = [x[:, :steps] if x.dim() == 4 else x for x in inputs]
    # One run: it takes seconds to minutes, so call overheads do not matter.
    t_ref = timed(fwd_bwd(ref, prefix), device, 1, warmup=False) * T / steps
    gflops = 8 * N * N * B * T * H / t_fwd / 1e9
    return {
        "op": op, "B": B, "T": T, "H": H, "N": N, "dtype": str(dtype).removeprefix("torch."),
        "fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3, "fwd_bwd_ms": t_fb * 1e3,
        "fwd_gflops": gflops, "mm_gflops": mm, "fwd_vs_mm": gflops / mm,
        "ref_fwd_bwd_ms": t_ref * 1e3, "ref_steps_timed": steps,
        "speedup_vs_ref": t_ref / t_fb, "max_rel_err": max_error(op, inputs, min(T, err_steps)),
    }


def print_table(rows: list[dict]) -> None:
    cols = [("op", "{}"), ("B", "{}"), ("T", "{}"), ("H", "{}"), ("N", "{}"), ("dtype", "{}"),
            ("fwd_ms", "{:.2f}"), ("bwd_ms", "{:.2f}"), ("fwd_bwd_ms", "{:.2f}"),
            ("fwd_gflops", "{:.1f}"), ("mm_gflops", "{:.1f}"), ("fwd_vs_mm", "{:.0%}"),
            ("ref_fwd_bwd_ms", "{:.0f}"), ("speedup_vs_ref", "{:.0f}x"), ("max_rel_err", "{:.1e}")]
    cells = [[c for c, _ in cols]] + [[f.format(r[c]) for c, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for part in text.split(";"):
        dims = [int(x) for x in part.split(",")]
        if len(dims) != 4:
            raise argparse.ArgumentTypeError(f"shape {part!r} is not B,T,H,N")
        shapes.append(tuple(dims))
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--ops", default="wkv7,wkv6", help="comma-separated: wkv7, wkv6")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                   help=f"B,T,H,N;B,T,H,N (default {DEFAULT_SHAPES})")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--ref-steps", type=int, default=1024, help="steps of the reference that are timed")
    p.add_argument("--err-steps", type=int, default=256, help="steps compared with the float64 reference")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; expected wkv7 and/or wkv6")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_isa": arwkv_ext.cpu_isa(), "python": sys.version.split()[0],
    }
    print(json.dumps(meta))
    mm = mm_gflops(args.device, args.repeat)
    rows = []
    for op in ops:
        for shape in args.shapes:
            rows.append(bench_one(op, shape, DTYPES[args.dtype], args.device, args.repeat,
                                  args.ref_steps, args.err_steps, mm))
            print(f"done {op} {shape}", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
