"""Benchmark of torch.ops.arwkv.wkv7 / wkv6 against the step-by-step reference recurrence
and, on a GPU, against flash-linear-attention's kernels when `fla` is importable.

    python benchmarks/bench_wkv.py                       # CPU, float32, the two default shapes
    python benchmarks/bench_wkv.py --json results.json   # also write the table as JSON
    python benchmarks/bench_wkv.py --shapes 1,1024,16,64 --ops wkv7 --dtype bfloat16
    python benchmarks/bench_wkv.py --device cuda         # GPU: bf16, (B,T,H,N) = (8,4096,64,64)
                                                         #   and (1,32768,32,128), + peers

Measured in one run, on the same inputs: forward, backward (the backward op that autograd
calls) and forward+backward (autograd, gradients of every input from y and final_state) times,
forward GFLOP/s (8 N^2 flop per token per head), the throughput of a float32 torch.mm on the
same threads as the machine's yardstick, the time of autograd through the step-by-step
reference, and the largest relative error of y, final_state and every gradient against a
float64 reference. The reference is timed on the first --ref-steps steps (default 1024) and
scaled linearly to T: running it whole at (4, 2048, 32, 64) needs over 20 GB, and its cost per
step only grows with T (autograd keeps every step's tensors), so the scaling flatters it.

Both algorithms of the kernels, and on the CPU the automatic choice that is the default, are
timed (--algorithms, default step,chunked,auto on the CPU and step,chunked on a GPU: the
ARWKV_CPU_ALGORITHM / ARWKV_GPU_ALGORITHM switches), each as its own row, and the table ends
with the chunked/step and auto/step ratios the kernels are judged by: forward+backward speed-up,
the forward's share of torch.mm (counted at the step algorithm's flop count, 8 N^2 per token and
head, for all) and backward/forward; on a GPU also each algorithm's forward+backward against
fla.chunk_rwkv7 / chunk_rwkv6 when they ran.

Peers (GPU only, when importable): flash-linear-attention's chunk_rwkv7, fused_recurrent_rwkv7
and chunk_rwkv6, called with scale=1.0 and their state transposed back to this project's
[value, key] layout, on the same inputs; each gets the same error check, so a mapping mistake
would show. Their "bwd" is (fwd+bwd) - fwd; ours is the backward op itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from unittest import mock

import torch

import arwkv_ext
from arwkv.cli import RawDescriptionDefaultsFormatter
from arwkv.runtime import DTYPES as RUNTIME_DTYPES
from arwkv.runtime import dtype_from_name, torch_dtype_name
from arwkv_ext.reference import wkv6_reference, wkv7_reference
from arwkv_ext.testing import make_inputs, rel_error, run_with_grads

# arwkv's dtypes under torch's names (float32, bfloat16, float16), as this script's --dtype takes them
DTYPES = {torch_dtype_name(dtype_from_name(d)): dtype_from_name(d) for d in RUNTIME_DTYPES}
OPS = {"wkv7": (arwkv_ext.wkv7, wkv7_reference), "wkv6": (arwkv_ext.wkv6, wkv6_reference)}
DEFAULT_SHAPES = "1,1024,16,64;4,2048,32,64"
DEFAULT_GPU_SHAPES = "8,4096,64,64;1,32768,32,128"  # a wide batch at N = 64, one long sequence at N = 128


def fla_peers(op: str) -> dict[str, Callable]:
    """flash-linear-attention's kernels for op, wrapped to this project's call and state layout
    (fla keeps the state as [key, value]); empty when fla is not importable."""
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except Exception:  # noqa: BLE001 - any import failure just means no peer to compare with
        return {}

    def transposed(out):
        y, state = out
        return y, state.transpose(-1, -2)

    if op == "wkv7":
        return {
            "fla.chunk_rwkv7": lambda r, w, k, v, a, b: transposed(
                chunk_rwkv7(r, w, k, v, a, b, scale=1.0, output_final_state=True)),
            "fla.fused_recurrent_rwkv7": lambda r, w, k, v, a, b: transposed(
                fused_recurrent_rwkv7(r, w, k, v, a, b, scale=1.0, output_final_state=True)),
        }
    return {
        "fla.chunk_rwkv6": lambda r, w, k, v, u: transposed(
            chunk_rwkv6(r, k, v, w, u, scale=1.0, output_final_state=True)),
    }


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


def float64_reference(op: str, inputs: list[torch.Tensor], steps: int) -> tuple:
    """The first `steps` steps of the inputs, random output gradients, and the float64
    reference's outputs and gradients for them (computed once, compared with every kernel)."""
    ref = OPS[op][1]
    xs = [x[:, :steps].detach() if x.dim() == 4 else x.detach() for x in inputs]
    B, T, H, N = xs[0].shape
    gy = torch.randn(B, T, H, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gs = torch.randn(B, H, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y64, s64, g64 = run_with_grads(ref, [x.cpu().double() for x in xs], None, None, gy, gs)
    return xs, gy, gs, [y64, s64, *g64]


def max_error(fn: Callable, reference: tuple) -> float:
    """Largest relative error of y, final_state and all gradients vs the float64 reference."""
    xs, gy, gs, want = reference
    device = xs[0].device
    y, s, g = run_with_grads(lambda *a: fn(*a[:-2]), xs, None, None, gy.to(device), gs.to(device))
    return max(rel_error(a, b) for a, b in zip([y, s, *g], want, strict=True))


def peak_gb(device: str, fn: Callable[[], object]) -> float:
    """Peak GPU memory allocated during fn(), in GB (NaN on the CPU)."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def algorithm(device: str, name: str | None):
    """ARWKV_CPU_ALGORITHM (or, on a GPU, ARWKV_GPU_ALGORITHM) = name while the block runs (None:
    leave it as it is)."""
    if name is None:
        return contextlib.nullcontext()
    variable = "ARWKV_CPU_ALGORITHM" if device == "cpu" else "ARWKV_GPU_ALGORITHM"
    return mock.patch.dict(os.environ, {variable: name})


def bench_one(op: str, shape: tuple[int, int, int, int], dtype: torch.dtype, device: str, repeat: int,
              ref_steps: int, err_steps: int, mm: float, peers: bool,
              algorithms: list[str | None]) -> list[dict]:
    """One row per algorithm of arwkv's kernels, then one per peer kernel, all on the same inputs."""
    B, T, H, N = shape
    fn, ref = OPS[op]
    inputs = make_inputs(op, B, T, H, N, dtype=dtype, device=device)
    steps = min(T, ref_steps)
    prefix = [x[:, :steps] if x.dim() == 4 else x for x in inputs]
    # One run: it takes seconds to minutes, so call overheads do not matter.
    t_ref = timed(fwd_bwd(ref, prefix), device, 1, warmup=False) * T / steps
    base = {"op": op, "B": B, "T": T, "H": H, "N": N, "dtype": str(dtype).removeprefix("torch."),
            "mm_gflops": mm, "ref_fwd_bwd_ms": t_ref * 1e3, "ref_steps_timed": steps}

    reference = float64_reference(op, inputs, min(T, err_steps))
    impls = [("arwkv" if alg is None else f"arwkv-{alg}", fn, alg) for alg in algorithms]
    if peers and device == "cuda":
        impls += [(name, impl, None) for name, impl in fla_peers(op).items()]
    rows = []
    for name, impl, alg in impls:
        with algorithm(device, alg):
            with torch.no_grad():
                t_fwd = timed(lambda impl=impl: impl(*inputs), device, repeat)
            if impl is fn:
                with torch.no_grad():
                    y, state = fn(*inputs)
                grads = (torch.ones_like(y), torch.ones_like(state))
                backward_op = torch.ops.arwkv.wkv7_backward if op == "wkv7" else torch.ops.arwkv.wkv6_backward
                t_bwd = timed(lambda op=backward_op, g=grads: op(*inputs, None, None, *g), device, repeat)
            run = fwd_bwd(impl, inputs)
            t_fb = timed(run, device, repeat)
            if impl is not fn:
                t_bwd = t_fb - t_fwd
            gflops = 8 * N * N * B * T * H / t_fwd / 1e9
            rows.append({
                **base, "impl": name,
                "fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                "fwd_gflops": gflops, "fwd_vs_mm": gflops / mm, "bwd_vs_fwd": t_bwd / t_fwd,
                "speedup_vs_ref": t_ref / t_fb, "peak_gb": peak_gb(device, run),
                "max_rel_err": max_error(impl, reference),
            })
    return rows


def print_algorithm_ratios(rows: list[dict]) -> None:
    """chunked and auto against step, per op and shape, as the kernels' targets are stated."""
    by_key = {(r["op"], r["B"], r["T"], r["H"], r["N"], r["impl"]): r for r in rows}
    for (op, B, T, H, N, impl), row in by_key.items():
        step = by_key.get((op, B, T, H, N, "arwkv-step"))
        if impl not in ("arwkv-chunked", "arwkv-auto") or step is None:
            continue
        print(f"{op} ({B}, {T}, {H}, {N}) {impl.removeprefix('arwkv-')}: fwd+bwd "
              f"{step['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}x faster than step; forward at "
              f"{row['fwd_vs_mm']:.0%} of torch.mm (step {step['fwd_vs_mm']:.0%}); backward "
              f"{row['bwd_vs_fwd']:.2f}x the forward (step {step['bwd_vs_fwd']:.2f}x)")
    for (op, B, T, H, N, impl), row in by_key.items():  # GPU: against fla's chunked kernel
        peer = by_key.get((op, B, T, H, N, f"fla.chunk_rwkv{op[-1]}"))
        if peer is None or not impl.startswith("arwkv"):
            continue
        print(f"{op} ({B}, {T}, {H}, {N}) {impl}: fwd+bwd {row['fwd_bwd_ms']:.2f} ms, "
              f"{peer['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}x faster than fla.chunk_rwkv{op[-1]} "
              f"({peer['fwd_bwd_ms']:.2f} ms)")


def print_table(rows: list[dict]) -> None:
    cols = [("impl", "{}"), ("op", "{}"), ("B", "{}"), ("T", "{}"), ("H", "{}"), ("N", "{}"), ("dtype", "{}"),
            ("fwd_ms", "{:.2f}"), ("bwd_ms", "{:.2f}"), ("fwd_bwd_ms", "{:.2f}"),
            ("fwd_gflops", "{:.1f}"), ("mm_gflops", "{:.1f}"), ("fwd_vs_mm", "{:.0%}"),
            ("bwd_vs_fwd", "{:.2f}"),
            ("ref_fwd_bwd_ms", "{:.0f}"), ("speedup_vs_ref", "{:.0f}x"), ("peak_gb", "{:.2f}"),
            ("max_rel_err", "{:.1e}")]
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the ops run")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="(default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--ops", default="wkv7,wkv6", help="comma-separated: wkv7, wkv6")
    p.add_argument("--shapes", type=parse_shapes,
                   help=f"B,T,H,N;B,T,H,N (default {DEFAULT_SHAPES} on CPU, {DEFAULT_GPU_SHAPES} on GPU)")
    p.add_argument("--repeat", type=int, help="timed repetitions, median (default 5 on CPU, 20 on GPU)")
    p.add_argument("--no-peers", action="store_true", help="skip flash-linear-attention on GPU")
    p.add_argument("--ref-steps", type=int, help="steps of the reference that are timed "
                   "(default 1024 on CPU, 256 on GPU)")
    p.add_argument("--err-steps", type=int, help="steps compared with the float64 reference "
                   "(default 256 on CPU, 32 on GPU: the float64 reference runs on the CPU)")
    p.add_argument("--algorithms", help="comma-separated algorithms of the kernels to time: step, chunked, "
                   "auto (default step,chunked,auto on CPU, step,chunked on GPU, where auto is step)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU) (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; expected wkv7 and/or wkv6")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.algorithms = args.algorithms or ("step,chunked" if args.device == "cuda" else "step,chunked,auto")
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not algorithms or any(a not in ("step", "chunked", "auto") for a in algorithms):
        p.error(f"--algorithms {args.algorithms!r}: expected some of step, chunked, auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.shapes = args.shapes or parse_shapes(DEFAULT_GPU_SHAPES if gpu else DEFAULT_SHAPES)
    args.repeat = args.repeat or (20 if gpu else 5)
    args.ref_steps = args.ref_steps or (256 if gpu else 1024)
    args.err_steps = args.err_steps or (32 if gpu else 256)

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_isa": arwkv_ext.cpu_isa(), "cpu_algorithm_default": {
            f"{op} {d}": arwkv_ext.cpu_algorithm(op, d) for op in OPS for d in ("forward", "backward")},
        "python": sys.version.split()[0],
        "cuda": torch.version.cuda, "hip": torch.version.hip, "arwkv_build": arwkv_ext.build_info,
    }
    if gpu:
        peers = fla_peers("wkv7")
        meta["fla"] = "not importable" if not peers else __import__("fla").__version__
    print(json.dumps(meta))
    mm = mm_gflops(args.device, args.repeat)
    rows = []
    for op in ops:
        for shape in args.shapes:
            new = bench_one(op, shape, DTYPES[args.dtype], args.device, args.repeat,
                            args.ref_steps, args.err_steps, mm, not args.no_peers, algorithms)
            for row in new:  # as they come, so a run cut short still reports
                print(json.dumps(row), file=sys.stderr, flush=True)
            rows += new
    print_table(rows)
    print_algorithm_ratios(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
