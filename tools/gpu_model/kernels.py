"""What the GPU backend launches for a WKV call, as the model needs it: for the step ("rows" /
"columns") kernels of csrc/gpu/wkv_gpu_kernels.cuh, the kernels, their grids and blocks, the trips
of their source loops, and the DRAM bytes each moves. The tile choices mirror the launch code
there (WideRows / NarrowRows / ColTile and the wide-or-narrow rule); kChunk is csrc/gpu/wkv_gpu.h's.
"""

from __future__ import annotations

import math

from .model import KernelSpec, LoopSpec, RegionSpec

CHUNKED = "wkv_gpu_chunked.cuh"  # the chunked kernels' source file
K_CHUNK = 8  # csrc/gpu/wkv_gpu.h kChunk: steps staged per chunk (and between snapshots)
FORWARD, SNAPSHOTS, STATE_GRAD = 0, 1, 2

# (keys per thread, threads) of the row tiles, by head size; HIP narrows N = 128 (VGPRs, LDS)
WIDE_ROWS = {16: (4, 64), 32: (16, 64), 64: (16, 128), 128: (32, 128)}
NARROW_ROWS = {16: (4, 64), 32: (8, 64), 64: (8, 64), 128: (8, 64)}
WIDE_ROWS_HIP = {**WIDE_ROWS, 128: (16, 128)}
NARROW_ROWS_HIP = {**NARROW_ROWS, 128: (8, 128)}


def warp(s: dict) -> int:
    """Lanes of a warp (CUDA, 32) or wavefront (HIP, 64): shape["hip"] says which."""
    return 64 if s.get("hip") else 32


def stage_steps(s: dict) -> int:
    """kStage: steps the rows kernels stage per barrier (all kChunk on CUDA, 2 on HIP)."""
    return 2 if s.get("hip") else K_CHUNK


def elements(s: dict) -> int:
    return s["B"] * s["T"] * s["H"] * s["N"]


def row_tile(s: dict, units: int) -> tuple[int, int, int]:
    """(keys per thread, threads, rows per block) of the rows kernels for shape s."""
    N = s["N"]
    kpt, threads = (WIDE_ROWS_HIP if s.get("hip") else WIDE_ROWS)[N]
    rows = threads // (N // kpt)
    if s["B"] * s["H"] * (N // rows) < 2 * units:  # few wide blocks: narrow ones
        kpt, threads = (NARROW_ROWS_HIP if s.get("hip") else NARROW_ROWS)[N]
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
        loops=[
            LoopSpec(r"step < num_chunks", lambda s: math.ceil(s["T"] / K_CHUNK)),
            LoopSpec(r"si < num_stages", lambda s: K_CHUNK // stage_steps(s)),
            LoopSpec(r"idx < n \* N;", lambda s: stage_steps(s) * s["N"] / threads, per_trip=("STS", keys)),
            LoopSpec(
                r"idx < n \* ROWS;",
                lambda s: stage_steps(s) * rows / threads,
                per_trip=("STS", 1),
                needs_global_loads=True,
            ),
            LoopSpec(r"t < [mn];", lambda s: stage_steps(s)),
        ],
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
    dram = (
        (keys + 2) * elements(s) * b
        + (2 * elements(s) * 4 if V == 7 else 0)
        + (chunks + 1) * state
        + keys * elements(s) * b
    )  # reads v, grad_y, keys, sa, dsa, snapshots; writes the key grads
    return KernelSpec(
        label=f"columns ({threads} threads)",
        name=rf"wkv_columns_kernelINS0_4Bf16ELi{V}ELi{N}E",
        short=f"columns <{N}>",
        blocks=lambda s: (s["N"] // cols) * s["H"] * s["B"],
        threads=threads,
        loops=[
            LoopSpec(r"c >= 0;", lambda s: math.ceil(s["T"] / K_CHUNK)),
            LoopSpec(
                r"idx < n \* N;", lambda s: K_CHUNK * s["N"] / threads, per_trip=("STS", 4 if V == 7 else 2)
            ),
            LoopSpec(r"idx < n \* COLS;", lambda s: K_CHUNK * cols / threads, per_trip=("STS", keys)),
        ],
        dram_bytes=lambda s: dram,
    )


def step_kernels(s: dict, units: int) -> dict[str, list[KernelSpec]]:
    """The step path's launches: forward = rows forward; backward = rows snapshots, rows
    state-grad, columns."""
    return {
        "forward": [rows_kernel(s, FORWARD, units)],
        "backward": [rows_kernel(s, SNAPSHOTS, units), rows_kernel(s, STATE_GRAD, units), columns_kernel(s)],
    }


# ---- the chunked kernels (csrc/gpu/wkv_gpu_chunked.cuh) -----------------------------------------
L_CHUNK = 16  # wkv_gpu.h kChunkSteps: steps per chunk
# The chunked kernels' path: a chunk whose decays factor (every key's decay over the chunk >= 2^-96,
# kFactorLimit; always so for decays >= e^-0.61 per step, as RWKV-7's) takes tile products; the
# pairwise form for stronger decays is counted as not running.
FACTORED = (
    "the chunked kernels take their factored path (every key's decay over a 16-step chunk >= 2^-96: "
    "always so for decays >= e^-0.61 per step); the pairwise fallback's loops are not counted"
)


def chunk_slots(s: dict) -> int:
    """num_chunk_slots(p, kChunkSteps): the per-chunk kernels' grid (x)."""
    return s["B"] * s["T"] // L_CHUNK + s["B"] + 1


def operand_parts(s: dict) -> dict[str, int]:
    """Operands<V, N>'s fields, in order, and their 4-byte words per (chunk, head): the
    chunk's scratch slot (wkv_gpu_chunked.cuh)."""
    L, N = L_CHUNK, s["N"]
    if s["V"] == 7:
        return {
            "rt": L * N,
            "at": L * N,
            "ck": L * N,
            "cb": L * N,
            "arb": L * L,
            "ark": L * L,
            "ab": L * L,
            "aak": L * L,
            "inv": L * L,
            "gam": N,
            "flag": 4,
        }
    return {"rt": L * N, "ck": L * N, "a": L * L, "gam": N, "flag": 4}


def operand_floats(s: dict) -> int:
    """Operands<V, N>::size."""
    return sum(operand_parts(s).values())


def operand_reads(s: dict, *fields: str) -> int:
    """4-byte words per (chunk, head) a kernel reads of the slot: the named fields that this
    version has (DRAM moves whole 32-byte sectors, and the fields a kernel skips are far larger)."""
    parts = operand_parts(s)
    known = set(operand_parts({**s, "V": 7})) | set(operand_parts({**s, "V": 6}))
    if unknown := set(fields) - known:
        raise ValueError(f"no such operand field: {sorted(unknown)}")
    return sum(parts[f] for f in fields if f in parts)


def _seek(s: dict) -> float:
    """Trips of chunk_at_slot's binary search over the sequences."""
    return math.ceil(math.log2(max(s["B"], 1))) if s["B"] > 1 else 0


def _decay_loops(s: dict, threads: int) -> list[LoopSpec]:
    """cumulative_log_decays' loops, per chunk. CUDA: the first threads (in warps of their own) one
    key each, its steps in two parts; gfx942: a thread per group of keys of a step, then the first
    threads one key each."""
    N = s["N"]
    warps = threads // warp(s)
    per_key = LoopSpec(
        r"j < N; j \+= THREADS\) \{\s+float acc = 0.f;", lambda s: math.ceil(N / warp(s)) / warps
    )
    if s.get("hip"):
        return [LoopSpec(rf"{GROUPS}\s+float x", lambda s: L_CHUNK * N / 4 / threads), per_key]
    return [per_key, LoopSpec(r"t0 < L; t0 \+= kPart", lambda s: 2)]


def _build_loops(s: dict) -> list[LoopSpec]:
    """The loops of build_chunk (the fused forward's and prep's chunk building), per chunk."""
    V, N = s["V"], s["N"]
    warps = N // 16
    threads = warps * warp(s)
    first_warps = lambda s: math.ceil(N / warp(s)) / warps  # noqa: E731 (loops over j < N: the first warps)
    return [
        # the decays, chunk_factors
        *_decay_loops(s, threads),
        LoopSpec(r"j < N; j \+= THREADS\)\s+if \(!\(g_last", first_warps),
        # the pairwise form's staging and sums (FACTORED: not run)
        LoopSpec(rf"{GROUPS[:-1]}, off = q \* ldi \+ j0;\s+auto stage", lambda s: 0),
        LoopSpec(
            r"pr < L \* L; pr \+= THREADS\) \{\s+const int t = pr / L, q = pr % L;  // \(row", lambda s: 0
        ),
        LoopSpec(r"j < N; \+\+j\) \{\s+const float e = exp2f", lambda s: 0),
        # the operands (one copy per path), the decay over the chunk, the matrices' tile products
        # (matrix m by warp m % warps)
        LoopSpec(rf"{GROUPS[:-1]}, off = q \* ldi \+ j0;\s+const bool real", lambda s: 1, unswitched=True),
        LoopSpec(r"j < N; j \+= THREADS\) sh.gamma", first_warps),
        LoopSpec(r"m = warp; m < kMats; m \+= WARPS", lambda s: (4 if V == 7 else 2) / warps),
        # masking and splitting the matrices; splitting the inverse (WKV-7)
        LoopSpec(
            r"pr < L \* L; pr \+= THREADS\) \{\s+const int t = pr / L, q = pr % L;\s+float\* m",
            lambda s: L_CHUNK * L_CHUNK / threads,
        ),
        LoopSpec(
            r"pr < L \* L; pr \+= THREADS\) \{\s+SplitBits& x",
            lambda s: L_CHUNK * L_CHUNK / threads if s.get("hip") else 0,  # (gfx942 only)
            may_vanish=True,
        ),
    ]


def _band_loops(s: dict, first: str, chunks: str, last: str | None) -> list[LoopSpec]:
    """The loops of a state pass (one warp per 16-row band): the band's state read in, the chunk
    loop, its per-chunk [16, N] store (in groups, each unrolled), the band's result written out
    (`last`, if any)."""
    N, w = s["N"], warp(s)
    chunk_count = math.ceil(s["T"] / L_CHUNK)
    loops = [
        LoopSpec(
            rf"idx < 16 \* N; idx \+= kWarpSize\) {first}",
            lambda s: 16 * N / w,
            per_trip=("STS", 1),
            needs_global_loads=True,
        ),
        LoopSpec(chunks, lambda s: chunk_count),
        # the per-chunk [16, N] store: two groups of elements on CUDA up to N = 64, else one
        LoopSpec(
            r"u0 < kPerLane; u0 \+= kGroup", lambda s: 1 if s.get("hip") or N > 64 else 2, may_vanish=True
        ),
    ]
    if last:
        loops.append(
            LoopSpec(rf"idx < 16 \* N; idx \+= kWarpSize\) {last}", lambda s: 16 * N / w, per_trip=("STG", 1))
        )
    return loops


# the chunk kernels' loops over (step, kGroupKeys keys) groups of a chunk's inputs
GROUPS = r"grp < kGroups; grp \+= THREADS\) \{\s+const int q = grp / \(N / GK\), j0 = grp % \(N / GK\) \* GK;"


# (FACTORED) the fused forward's state scaled before its update: the path of a chunk that does not
# factor, never run
NOT_FACTORED_SCALE = RegionSpec(CHUNKED, r"if \(!factored\) scale_band_keys", lambda s: 0)
# build_chunk's pairwise matrices (its staging of the inputs: the loops after it have no trips)
NOT_FACTORED_MATRICES = RegionSpec(
    CHUNKED, r"if \(!factored\) \{\s+// the L x L matrices as pairwise", lambda s: 0
)


def chunk_fused_forward(s: dict, saves: bool = False) -> KernelSpec:
    """The fused forward: a block of N / 16 warps per (sequence, head), serial over the chunks.
    ``saves``: the backward's first pass, the same kernel storing each chunk's operands (its scratch
    slot), the state at each chunk start and (WKV-7) S a_t per step, instead of the outputs and the
    final state."""
    V, N = s["V"], s["N"]
    warps = N // 16
    threads = warps * warp(s)
    inputs = 6 if V == 7 else 4  # r, w, k, v (, a, b); WKV-6's u is N values
    state = s["B"] * s["H"] * N * N * 4
    if saves:
        slots = chunk_slots(s) * s["H"]
        dram = inputs * elements(s) * s["bytes"] + state + slots * (operand_floats(s) + N * N) * 4
        dram += elements(s) * 4 if V == 7 else 0
    else:
        dram = (inputs + 1) * elements(s) * s["bytes"] + 2 * state
    loops = [
        LoopSpec(
            r"c < k0.num_chunks; \+\+c\) \{\s+const Chunk k = chunk_of\(k0, c\);\s+const int64_t first",
            lambda s: math.ceil(s["T"] / L_CHUNK),
        ),
        *_build_loops(s),
    ]
    if saves:  # copy_operands: the rows of N floats (twice: row, column operands), of L
        wide, narrow = (2 * L_CHUNK, 5 * L_CHUNK) if V == 7 else (L_CHUNK, L_CHUNK)
        loops += [
            # (unrolled in full at N = 128)
            LoopSpec(
                r"i < kWide \* N / 4; i \+= THREADS",
                lambda s: wide * N / 4 / threads,
                per_trip=("LDS", 1),
                may_vanish=True,
            ),
            LoopSpec(
                r"i < kNarrow \* L / 4; i \+= THREADS",
                lambda s: narrow * L_CHUNK / 4 / threads,
                may_vanish=True,
            ),
        ]
    label = "chunk saves" if saves else "chunk fused forward"
    # (WKV-7) the solve's inverse: its L columns by the first warp's first lanes (the statement's
    # branch jumps over the function's inlined body)
    solve = [RegionSpec(CHUNKED, r"if \(threadIdx.x < L\)\s+unit_lower_inverse_column", lambda s: 1 / warps)]
    return KernelSpec(
        label=label,
        emulated_as="saves" if saves else "fused",
        name=rf"wkv_chunk_fused_forward_kernelINS0_4Bf16ELi{V}ELi{N}ELb{int(saves)}E",
        short=f"chunk {'saves' if saves else 'fused_forward'} <{N}>",
        blocks=lambda s: s["H"] * s["B"],
        threads=threads,
        loops=loops,
        regions=[*(solve if V == 7 else []), NOT_FACTORED_SCALE, NOT_FACTORED_MATRICES],
        dram_bytes=lambda s: dram,
    )


def chunk_state_grad(s: dict) -> KernelSpec:
    V, N = s["V"], s["N"]
    state = s["B"] * s["H"] * N * N * 4
    reads = operand_reads(
        s, "rt", "ck", "gam", "flag", "arb", "ark", "a", "aak", "at", "cb", "inv"
    )  # (not ab)
    dram = (
        chunk_slots(s) * s["H"] * (reads + N * N) * 4
        + 2 * elements(s) * s["bytes"]
        + (elements(s) * 4 if V == 7 else 0)
        + 2 * state
    )
    return KernelSpec(
        label="chunk state-grad",
        emulated_as="state_grad",
        name=rf"wkv_chunk_state_grad_kernelINS0_4Bf16ELi{V}ELi{N}E",
        short=f"chunk state_grad <{N}>",
        blocks=lambda s: (s["N"] // 16) * s["H"] * s["B"],
        threads=warp(s),
        loops=_band_loops(s, r"dS\[", r"c >= 0; --c", r"grad_s0"),
        dram_bytes=lambda s: dram,
    )


def chunk_grads(s: dict) -> KernelSpec:
    V, N = s["V"], s["N"]
    warps = max(N // 16, 4)
    threads = warps * warp(s)
    kt_warps = min(N // 16, warps) / warps  # share of warps with a key tile
    keys = 5 if V == 7 else 3
    # the L x L gradients: a warp each (WKV-7: 4 of them, WKV-6: 1), each of step_pairs' copies in one
    pairs_share = lambda s: (4 if V == 7 else 1) / warps  # noqa: E731
    dram = (
        chunk_slots(s) * s["H"] * (2 * N * N + operand_reads(s, "rt", "ck", "at", "cb", "flag")) * 4
        + (keys + 2) * elements(s) * s["bytes"]
        + (2 * elements(s) * 4 if V == 7 else 0)
        + keys * elements(s) * s["bytes"]
    )
    return KernelSpec(
        label="chunk grads",
        emulated_as="grads",
        name=rf"wkv_chunk_grads_kernelINS0_4Bf16ELi{V}ELi{N}E",
        short=f"chunk grads <{N}>",
        blocks=lambda s: chunk_slots(s) * s["H"],
        threads=threads,
        regions=[
            RegionSpec(CHUNKED, r"if \(V == 7 \? warp < 4 : warp == 1\)", pairs_share),
            RegionSpec(CHUNKED, r"__device__ __forceinline__ TileAcc step_pairs\(", lambda s: 1 / warps),
        ],
        loops=[
            LoopSpec(r"while \(lo < hi\)", _seek),
            *_decay_loops(s, threads),
            LoopSpec(r"it < N / 16; \+\+it", lambda s: N / 16, may_vanish=True),  # (gfx942 unrolls to N = 64)
            # WKV-6, in the blocks of unused scratch slots only (B + 1 of them): none on average
            LoopSpec(r"j < N; j \+= THREADS\) sc.grad_u_partial", lambda s: 0),
            # the factored chunks' element-wise rows (FACTORED); the pairwise form's loops never run
            LoopSpec(
                r"e < kTileAcc; \+\+e\) \{\s+const int t = TileAcc::row\(e\), c = TileAcc::col\(e\), "
                r"j = kt \* 16 \+ c;\s+const float before",
                lambda s: (4 if s.get("hip") else 8) * kt_warps,
            ),
            LoopSpec(r"e < kTileAcc; \+\+e\) \{  // this lane", lambda s: 0),
            LoopSpec(r"s <= t && s < n|s < t && s < n", lambda s: 0),
            LoopSpec(r"q = t; q < n|q = t \+ 1; q < n", lambda s: 0),
            # the sum over value rows for dw: gfx942, every fourth row a lane; CUDA, every row
            LoopSpec(
                r"m < N / 4; \+\+m\)", lambda s: N / 4 * kt_warps if s.get("hip") else 0, per_trip=("LDG", 2)
            ),
            LoopSpec(
                r"i < N; \+\+i\) acc = fmaf",
                lambda s: 0 if s.get("hip") else N * kt_warps,
                per_trip=("LDG", 2),
            ),
            LoopSpec(
                r"t = L - 1; t >= 0", lambda s: L_CHUNK * kt_warps, may_vanish=True
            ),  # (unrolled on CUDA)
        ],
        dram_bytes=lambda s: dram,
    )


def chunked_kernels(s: dict) -> dict[str, list[KernelSpec]]:
    """The chunked path's launches: forward = the fused forward; backward = the fused forward's
    saves pass, state-grad, grads."""
    return {
        "forward": [chunk_fused_forward(s)],
        "backward": [chunk_fused_forward(s, saves=True), chunk_state_grad(s), chunk_grads(s)],
    }
