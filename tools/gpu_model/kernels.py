"""What the GPU backend launches for a WKV call, as the model needs it: for the step ("rows" /
"columns") kernels of csrc/gpu/wkv_gpu_kernels.cuh, the kernels, their grids and blocks, the trips
of their source loops, and the DRAM bytes each moves. The tile choices mirror the launch code
there (WideRows / NarrowRows / ColTile and the wide-or-narrow rule); kChunk is csrc/gpu/wkv_gpu.h's.
"""

from __future__ import annotations

import math

from .model import KernelSpec, LoopSpec

K_CHUNK = 8  # csrc/gpu/wkv_gpu.h kChunk: steps staged per chunk (and between snapshots)
FORWARD, SNAPSHOTS, STATE_GRAD = 0, 1, 2

# (keys per thread, threads) of the row tiles on CUDA, by head size
WIDE_ROWS = {16: (4, 64), 32: (16, 64), 64: (16, 128), 128: (32, 128)}
NARROW_ROWS = {16: (4, 64), 32: (8, 64), 64: (8, 64), 128: (8, 64)}


def elements(s: dict) -> int:
    return s["B"] * s["T"] * s["H"] * s["N"]


def row_tile(s: dict, units: int) -> tuple[int, int, int]:
    """(keys per thread, threads, rows per block) of the rows kernels for shape s."""
    N = s["N"]
    kpt, threads = WIDE_ROWS[N]
    rows = threads // (N // kpt)
    if s["B"] * s["H"] * (N // rows) < 2 * units:  # few wide blocks: narrow ones
        kpt, threads = NARROW_ROWS[N]
        rows = threads // (N // kpt)
    return kpt, threads, rows


def rows_kernel(s: dict, mode: int, units: int) -> KernelSpec:
    V, N, b = s["V"], s["N"], s["bytes"]
    kpt, threads, rows = row_tile(s, units)
    keys = 5 if V == 7 else 3  # key vectors staged per step: r, decay, k (, a, b)
    state = s["B"] * s["H"] * N * N * 4
    chunks = math.ceil(s["T"] / K_CHUNK)
    inputs = (keys + 1) * elements(s) * b  # + v (or grad_y)
    if mode == FORWARD:
        dram = inputs + elements(s) * b + 2 * state
    elif mode == SNAPSHOTS:
        dram = inputs + (chunks + 1) * state + (elements(s) * 4 if V == 7 else 0)
    else:
        dram = inputs + elements(s) * b + (elements(s) * 4 if V == 7 else 0) + 2 * state
    label = {FORWARD: "rows forward", SNAPSHOTS: "rows snapshots", STATE_GRAD: "rows state-grad"}[mode]
    return KernelSpec(
        label=f"{label} ({kpt} keys x {threads} threads)",
        name=rf"wkv_rows_kernelINS0_4Bf16ELi{V}ENS0_7RowTileILi{N}ELi{kpt}ELi{threads}EEELi{mode}E",
        short=f"{label} <{N},{kpt},{threads}>",
        blocks=lambda s: (s["N"] // rows) * s["H"] * s["B"],
        threads=threads,
        loops=[LoopSpec(r"step < num_chunks", lambda s: math.ceil(s["T"] / K_CHUNK)),
               LoopSpec(r"si < num_stages", lambda s: 1),
               LoopSpec(r"idx < n \* N;", lambda s: K_CHUNK * s["N"] / threads, stores_per_trip=keys),
               LoopSpec(r"idx < n \* ROWS;", lambda s: K_CHUNK * rows / threads, stores_per_trip=1,
                        needs_global_loads=True),
               LoopSpec(r"t < [mn];", lambda s: K_CHUNK)],
        dram_bytes=lambda s: dram,
    )


def columns_kernel(s: dict) -> KernelSpec:
    V, N, b = s["V"], s["N"], s["bytes"]
    rr = 4 if N == 16 else 8
    threads = 128 if N >= 64 else 64
    cols = threads // (N // rr)
    keys = 5 if V == 7 else 3
    chunks = math.ceil(s["T"] / K_CHUNK)
    state = s["B"] * s["H"] * N * N * 4
    dram = ((keys + 2) * elements(s) * b + (2 * elements(s) * 4 if V == 7 else 0) + (chunks + 1) * state
            + keys * elements(s) * b)  # reads v, grad_y, keys, sa, dsa, snapshots; writes the key grads
    return KernelSpec(
        label=f"columns ({threads} threads)",
        name=rf"wkv_columns_kernelINS0_4Bf16ELi{V}ELi{N}E",
        short=f"columns <{N}>",
        blocks=lambda s: (s["N"] // cols) * s["H"] * s["B"],
        threads=threads,
        loops=[LoopSpec(r"c >= 0;", lambda s: math.ceil(s["T"] / K_CHUNK)),
               LoopSpec(r"idx < n \* N;", lambda s: K_CHUNK * s["N"] / threads,
                        stores_per_trip=4 if V == 7 else 2),
               LoopSpec(r"idx < n \* COLS;", lambda s: K_CHUNK * cols / threads, stores_per_trip=keys)],
        dram_bytes=lambda s: dram,
    )


def step_kernels(s: dict, units: int) -> dict[str, list[KernelSpec]]:
    """The step path's launches: forward = rows forward; backward = rows snapshots, rows
    state-grad, columns."""
    return {"forward": [rows_kernel(s, FORWARD, units)],
            "backward": [rows_kernel(s, SNAPSHOTS, units), rows_kernel(s, STATE_GRAD, units),
                         columns_kernel(s)]}
