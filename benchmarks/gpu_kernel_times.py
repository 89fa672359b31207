"""Device time of each kernel launched by one forward and one backward of the WKV ops, from the
torch profiler, for each algorithm of the GPU kernels (ARWKV_GPU_ALGORITHM): which of the step
backward's three passes (rows "snapshots", rows "state-grad", columns), and which of the chunked
kernels (forward / saves, state-grad, grads), costs what (benchmarks/gpu_notes.md).

    python benchmarks/gpu_kernel_times.py                       # (B,T,H,N) = (8,4096,64,64) and
                                                                # (1,32768,32,128), bf16
    python benchmarks/gpu_kernel_times.py --shape 8,4096,64,64 --op wkv6

On a CPU it lists the ops' CPU time instead (a smoke test of this script). Beside each kernel it
prints the H100 estimate `make gpu-model` saved for it (benchmarks/results/gpu-model.json), when
there is one, so a GPU run tests the model too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import arwkv_ext  # noqa: F401  (registers torch.ops.arwkv)
from arwkv.cli import RawDescriptionDefaultsFormatter
from arwkv.runtime import DTYPES, dtype_from_name, torch_dtype_name
from arwkv_ext.testing import make_inputs

MODEL = Path(__file__).resolve().parent / "results" / "gpu-model.json"
DEFAULT_SHAPES = ["8,4096,64,64", "1,32768,32,128"]  # a wide batch at N = 64, one long sequence at N = 128
ROW_MODES = {"0": "rows forward", "1": "rows snapshots", "2": "rows state-grad"}


def short_name(kernel: str) -> str:
    """'void arwkv::gpu::wkv_rows_kernel<arwkv::gpu::Bf16, 7, arwkv::gpu::RowTile<64, 16, 128>, 1>(...)'
    -> 'rows snapshots <64,16,128>'; other kernels keep their first 60 characters."""
    m = re.search(r"wkv_rows_kernel<[^,]+, \d+, [\w:]*RowTile<(\d+), (\d+), (\d+)>, (\d)>", kernel)
    if m:
        return f"{ROW_MODES[m.group(4)]} <{m.group(1)},{m.group(2)},{m.group(3)}>"
    m = re.search(r"wkv_columns_kernel<[^,]+, \d+, (\d+)>", kernel)
    if m:
        return f"columns <{m.group(1)}>"
    m = re.search(r"wkv_chunk_(\w+?)_kernel<[^,]+, \d+, (\d+)(, true|, false)?>", kernel)
    if m:  # the fused forward with SAVES = true is the backward's saves pass
        return f"chunk {'saves' if m.group(3) == ', true' else m.group(1)} <{m.group(2)}>"
    return kernel[:60]


def kernel_times(fn: Callable[[], object], device: str, repeat: int) -> dict[str, float]:
    """Milliseconds per call of fn spent in each kernel (on a CPU: in each op)."""
    for _ in range(2):  # warm-up
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(repeat):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if device == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA:
            times[short_name(e.name)] += e.device_time_total / 1e3 / repeat
        elif device != "cuda" and e.name.startswith("arwkv::"):
            times[e.name] += e.cpu_time_total / 1e3 / repeat
    return dict(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=RawDescriptionDefaultsFormatter)
    ap.add_argument("--shape", action="append",
                    help=f"B,T,H,N (repeatable) (default: {' and '.join(DEFAULT_SHAPES)})")
    ap.add_argument("--op", choices=["wkv7", "wkv6", "both"], default="both", help="which op")
    names = [torch_dtype_name(dtype_from_name(d)) for d in DTYPES]
    ap.add_argument("--dtype", choices=names, default="bfloat16",
                    help="input dtype")
    ap.add_argument("--repeat", type=int, default=3, help="profiled calls (after 2 warm-up calls)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda when torch sees a GPU, else cpu")
    ap.add_argument("--algorithms", default="step,chunked",
                    help="comma-separated algorithms of the GPU kernels (ARWKV_GPU_ALGORITHM)")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape or DEFAULT_SHAPES]
    if any(len(s) != 4 for s in shapes):
        ap.error("--shape takes B,T,H,N")
    dtype = getattr(torch, args.dtype)
    model = json.loads(MODEL.read_text())["ms"] if MODEL.is_file() else {}
    ops = ["wkv7", "wkv6"] if args.op == "both" else [args.op]
    for op in ops:
        forward = getattr(torch.ops.arwkv, op)
        backward = getattr(torch.ops.arwkv, op + "_backward")
        for B, T, H, N in shapes:
            xs = make_inputs(op, B, T, H, N, dtype=dtype, device=args.device)
            state = torch.zeros(B, H, N, N, device=args.device)
            gy = torch.randn(B, T, H, N, device=args.device).to(dtype)
            gs = torch.randn(B, H, N, N, device=args.device)
            for algorithm in args.algorithms.split(",") if args.device == "cuda" else ["cpu"]:
                os.environ["ARWKV_GPU_ALGORITHM"] = algorithm if args.device == "cuda" else "auto"
                where = f"{args.device}, {algorithm}"
                print(f"== {op} B={B} T={T} H={H} N={N} {args.dtype} ({where}), ms per call")
                estimates = model.get(f"{op} {B},{T},{H},{N} {args.dtype} {algorithm}", {})
                for label, fn in (("forward", partial(forward, *xs, state, None)),
                                  ("backward", partial(backward, *xs, state, None, gy, gs))):
                    times = kernel_times(fn, args.device, args.repeat)
                    guesses = estimates.get(label, {})
                    total = sum(times.values())
                    print(f"  {label}: {total:.3f} ms in all")
                    for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
                        guess = f"  (model: {guesses[name]:.3f})" if name in guesses else ""
                        print(f"    {ms:9.3f}  {100 * ms / max(total, 1e-12):5.1f}%  {name}{guess}")
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
