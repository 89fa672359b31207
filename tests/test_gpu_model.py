"""The GPU performance model's pieces that need no compiler: reading an nvdisasm listing (kernels,
source lines, nested loops, instructions by unit, the in-order serial chain), trip counts with the
compiler's unroll factor read back, occupancy, and the closed-network time between its bounds.
(``make gpu-model`` runs the whole model on the real kernels; it needs nvcc.)"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from gpu_model.hardware import H100  # noqa: E402
from gpu_model.model import (  # noqa: E402
    KernelSpec,
    LoopSpec,
    RegionSpec,
    closed_network_time,
    dynamic,
    resident_blocks,
)
from gpu_model.sass import parse, serial_chain, unit_counts  # noqa: E402

SRC = "/src/k.cu"
# A kernel with an outer loop (line 10) around an inner loop unrolled twice (line 12: two shared
# stores per trip where the source has one), then the trap loop nvdisasm prints after EXIT.
LISTING = f"""
.text._Z6kernelPf:
	//## File "{SRC}", line 5
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   MOV R1, RZ ;
.L_x_1:
	//## File "{SRC}", line 11
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   FFMA R8, R4, R5, R6 ;
.L_x_2:
	//## File "{SRC}", line 13
        /*0040*/                   STS [R0], R8 ;
        /*0050*/                   STS [R0+0x4], R8 ;
        /*0060*/                   LDS.128 R12, [R0] ;
        /*0070*/                   FFMA R9, R12, R13, R9 ;
	//## File "{SRC}", line 12
        /*0080*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
        /*0090*/              @!P0 BRA `(.L_x_2) ;
	//## File "{SRC}", line 10
        /*00a0*/                   IADD3 R1, R1, 0x1, RZ ;
        /*00b0*/                   ISETP.GE.AND P1, PT, R1, 0x8, PT ;
        /*00c0*/              @!P1 BRA `(.L_x_1) ;
        /*00d0*/                   EXIT ;
.L_x_3:
        /*00e0*/                   BRA `(.L_x_3);
"""
SOURCES = {SRC: ["" for _ in range(20)]}
SOURCES[SRC][9] = "  for (int c = 0; c < num_chunks; ++c) {"
SOURCES[SRC][11] = "    for (int t = 0; t < m; ++t) {"


def test_listing_reads_into_kernels_loops_and_units():
    kernels = parse(LISTING)
    assert list(kernels) == ["_Z6kernelPf"]
    k = kernels["_Z6kernelPf"]
    assert len(k.insns) == 14 and k.insns[2].opcode == "LDG.E.128" and k.insns[2].line == (SRC, 11)
    assert len(k.loops) == 1  # the self-branch after EXIT is dropped
    outer = k.loops[0]
    assert (outer.head, outer.tail, outer.line) == (0x20, 0xC0, (SRC, 10))
    assert [(c.head, c.tail, c.line) for c in outer.children] == [(0x40, 0x90, (SRC, 12))]
    counts = unit_counts(k.body(0x40, 0x90))
    assert counts["shared"] == 3 and counts["fp32"] == 1 and counts["alu"] == 1 and counts["branch"] == 1
    assert counts["shared_wavefronts"] == 1 + 1 + 4  # two 4-byte stores, one 16-byte load
    assert unit_counts(k.body(0x20, 0x30))["global_bytes"] == 32 * 16


def test_serial_chain_issues_in_order_and_waits_for_sources():
    k = parse(LISTING)["_Z6kernelPf"]
    body = k.body(0x40, 0x70)  # STS, STS, LDS.128 -> R12..R15, FFMA needs R12, R13
    # issue at 1, 2, 3; the FFMA waits for the load (3 + 30), then its own latency 4
    assert serial_chain(body) == 3 + 30 + 4
    independent = k.body(0x00, 0x10)  # S2R, MOV: one clock apart, no dependence
    assert serial_chain(independent) == 2 + 4


def test_trips_read_the_unroll_factor_back():
    k = parse(LISTING)["_Z6kernelPf"]
    spec = KernelSpec("k", "kernel", "k", blocks=lambda s: 1, threads=32, dram_bytes=lambda s: 0,
                      loops=[LoopSpec(r"c < num_chunks", lambda s: s["chunks"]),
                             LoopSpec(r"t < m;", lambda s: 8, per_trip=("STS", 1))])
    per_warp, chain = dynamic(k, spec, {"chunks": 3}, SOURCES)
    # the inner body (6 instructions) runs 8 / 2 = 4 times a chunk; the outer's own 5, 3 chunks;
    # 3 outside (S2R, MOV, EXIT)
    assert per_warp["issue"] == 3 * (5 + 4 * 6) + 3
    assert per_warp["shared"] == 3 * 4 * 3 and per_warp["global"] == 3
    assert chain > 3 * 4 * serial_chain(k.body(0x40, 0x90))
    missing = KernelSpec("k", "kernel", "k", blocks=lambda s: 1, threads=32, dram_bytes=lambda s: 0, loops=[])
    with pytest.raises(ValueError, match="no trip count for the loop"):
        dynamic(k, missing, {}, SOURCES)


def test_a_spec_that_matches_no_loop_is_an_error_unless_it_may_vanish():
    """A loop spec of more than one trip that no loop of the machine code matches means a loop was
    counted with another spec's trips (or the source moved): the model refuses to estimate."""
    k = parse(LISTING)["_Z6kernelPf"]
    loops = [LoopSpec(r"c < num_chunks", lambda s: 3), LoopSpec(r"t < m;", lambda s: 8, per_trip=("STS", 1))]

    def spec(extra: LoopSpec) -> KernelSpec:
        return KernelSpec("k", "kernel", "k", blocks=lambda s: 1, threads=32, dram_bytes=lambda s: 0,
                          loops=[*loops, extra])

    with pytest.raises(ValueError, match="no loop of the machine code matches 'j < N'"):
        dynamic(k, spec(LoopSpec(r"j < N", lambda s: 4)), {}, SOURCES)
    dynamic(k, spec(LoopSpec(r"j < N", lambda s: 4, may_vanish=True)), {}, SOURCES)  # unrolled away
    dynamic(k, spec(LoopSpec(r"j < N", lambda s: 1)), {}, SOURCES)  # one trip: may be straight-line code


def test_code_only_some_warps_run_counts_their_share_and_stays_on_the_chain():
    """A region (a statement, or the block a line opens) run by some of a block's warps counts that
    share of its instructions per warp, loops inside it included; the serial chain keeps it whole,
    unless no warp runs it."""
    k = parse(LISTING)["_Z6kernelPf"]
    lines = list(SOURCES[SRC])
    lines[4] = "  if (warp == 0) first_warp_only(x,"  # line 5: the S2R and the MOV
    lines[5] = "                                  y);"
    lines[12] = "    }"
    sources = {SRC: lines}
    loops = [LoopSpec(r"c < num_chunks", lambda s: 3), LoopSpec(r"t < m;", lambda s: 8, per_trip=("STS", 1))]

    def run(*regions: RegionSpec):
        spec = KernelSpec("k", "kernel", "k", blocks=lambda s: 1, threads=32, dram_bytes=lambda s: 0,
                          loops=loops, regions=list(regions))
        return dynamic(k, spec, {}, sources)

    (whole, chain), (part, part_chain) = run(), run(RegionSpec("k.cu", r"if \(warp == 0\)", lambda s: 0.25))
    assert whole["issue"] - part["issue"] == 0.75 * 2 and part_chain == chain
    inner, inner_chain = run(RegionSpec("k.cu", r"for \(int t = 0", lambda s: 0.5))
    assert inner["shared"] == whole["shared"] / 2 and inner_chain == chain
    assert whole["issue"] - inner["issue"] == 0.5 * 3 * 4 * 6  # the inner loop's body, 4 trips a chunk
    with pytest.raises(ValueError, match="0 matches"):
        run(RegionSpec("k.cu", r"no such code", lambda s: 0.5))
    # a path no warp runs (share 0) is off the chain as well: the inner loop's body, the statement
    never_inner, never_inner_chain = run(RegionSpec("k.cu", r"for \(int t = 0", lambda s: 0))
    assert never_inner["shared"] == 0 and never_inner_chain < chain
    never_first, never_first_chain = run(RegionSpec("k.cu", r"if \(warp == 0\)", lambda s: 0))
    assert whole["issue"] - never_first["issue"] == 2 and never_first_chain < chain


def test_a_region_takes_what_its_branch_jumps_over_unless_other_code_leads_into_it():
    """The body of a region's `if`, inlined from another file, is found as what the branch skips;
    not where another branch enters that code (then it is not the `if`'s alone)."""
    other = "/src/other.cuh"

    def listing(entry: bool) -> str:
        extra = "        /*0060*/                   @P1 BRA `(.L_x_8) ;\n" if entry else ""
        return f"""
.text._Z2k2Pf:
	//## File "{SRC}", line 5
        /*0000*/                   S2R R0, SR_TID.X ;
	//## File "{SRC}", line 6
        /*0010*/                   @P0 BRA `(.L_x_9) ;
	//## File "{other}", line 3
        /*0020*/                   LDS.128 R4, [R0] ;
.L_x_8:
        /*0030*/                   FFMA R8, R4, R5, R6 ;
.L_x_9:
	//## File "{SRC}", line 7
        /*0040*/                   STS [R0], R8 ;
        /*0050*/                   EXIT ;
{extra}"""

    sources = {SRC: ["" for _ in range(20)], other: ["", "", "  x = y * z;"]}
    sources[SRC][5] = "  if (threadIdx.x < 16) solve(x);"
    spec = KernelSpec("k", "k2", "k", blocks=lambda s: 1, threads=128, dram_bytes=lambda s: 0, loops=[],
                      regions=[RegionSpec("k.cu", r"if \(threadIdx.x < 16\)", lambda s: 0.25)])
    counts, _ = dynamic(parse(listing(False))["_Z2k2Pf"], spec, {}, sources)
    # S2R, STS, EXIT in full; the branch (on the region's line) and the two it skips a quarter each
    assert counts["issue"] == 3 + 0.25 * 3
    assert counts["shared_wavefronts"] == 0.25 * 4 + 1
    counts, _ = dynamic(parse(listing(True))["_Z2k2Pf"], spec, {}, sources)
    assert counts["issue"] == 4 + 0.25 + 2  # the skipped code is entered from elsewhere: counted in full


def test_occupancy_follows_registers_shared_memory_and_threads():
    assert resident_blocks(H100, 128, 64, 0) == 8  # 64 K registers / (128 x 64)
    assert resident_blocks(H100, 128, 159, 0) == 3  # 160 allocated per thread
    assert resident_blocks(H100, 64, 32, 100 * 1024) == 2  # shared memory
    assert resident_blocks(H100, 1024, 16, 0) == 2  # threads


@pytest.mark.parametrize("warps", [1, 4, 16, 64])
def test_closed_network_time_lies_between_its_bounds(warps):
    demands = {"issue": 100.0, "shared": 60.0}
    stalls = 500.0
    t = closed_network_time(warps, demands, stalls)
    lower = max(sum(demands.values()) + stalls, warps * max(demands.values()))
    upper = warps * (sum(demands.values()) + stalls)
    assert lower - 1e-6 <= t <= upper + 1e-6
    assert closed_network_time(1, demands, stalls) == pytest.approx(sum(demands.values()) + stalls)
    # many warps: the busiest resource, fully used
    assert closed_network_time(200, demands, stalls) == pytest.approx(200 * 100.0, rel=0.05)
    assert Counter(demands)  # (demands are per warp, not changed)


def test_an_unrolled_loop_and_its_remainder_share_the_trips_and_copies_do_not():
    """Two machine-code loops of one source loop: with different unroll factors they are its
    unrolled body and remainder (n // U and n % U trips); with the same, two inlined copies."""

    def listing(stores_second: int) -> str:
        second = "\n".join(f"        /*{0x60 + 0x10 * i:04x}*/                   STS [R0], R1 ;"
                           for i in range(stores_second))
        end = 0x60 + 0x10 * stores_second
        return f"""
.text._Z1kv:
.L_x_1:
	//## File "{SRC}", line 12
        /*0000*/                   STS [R0], R1 ;
        /*0010*/                   STS [R0+0x4], R1 ;
        /*0020*/                   STS [R0+0x8], R1 ;
        /*0030*/                   STS [R0+0xc], R1 ;
        /*0040*/              @!P0 BRA `(.L_x_1) ;
        /*0050*/                   NOP ;
.L_x_2:
{second}
        /*{end:04x}*/              @!P0 BRA `(.L_x_2) ;
        /*{end + 0x10:04x}*/                   EXIT ;
"""

    spec = KernelSpec("k", "kv", "k", blocks=lambda s: 1, threads=32, dram_bytes=lambda s: 0,
                      loops=[LoopSpec(r"t < m;", lambda s: 10, per_trip=("STS", 1))])
    from gpu_model.model import loop_trips

    k = parse(listing(1))["_Z1kv"]
    assert loop_trips(k.loops, k, spec, {}, SOURCES) == [2, 2]  # 10 // 4 unrolled, 10 % 4 left over
    k = parse(listing(4))["_Z1kv"]
    assert loop_trips(k.loops, k, spec, {}, SOURCES) == [2, 2]  # two copies, each 10 // 4
    spec.loops[0].trips = lambda s: 11
    k = parse(listing(1))["_Z1kv"]
    assert loop_trips(k.loops, k, spec, {}, SOURCES) == [2, 3]


def test_an_unswitched_loop_shares_its_trips_and_a_fraction_of_a_trip_is_kept():
    """Copies of a loop the compiler unswitched (one per value of a fixed condition) share the
    trips, one of them running; a loop some warps run (under one trip per warp on average) keeps
    its fraction rather than rounding it down to none."""
    listing = f"""
.text._Z1kv:
.L_x_1:
	//## File "{SRC}", line 12
        /*0000*/                   STS [R0], R1 ;
        /*0010*/              @!P0 BRA `(.L_x_1) ;
        /*0020*/                   NOP ;
.L_x_2:
        /*0030*/                   STS [R0], R1 ;
        /*0040*/              @!P0 BRA `(.L_x_2) ;
        /*0050*/                   EXIT ;
"""
    from gpu_model.model import loop_trips

    k = parse(listing)["_Z1kv"]
    spec = KernelSpec("k", "kv", "k", blocks=lambda s: 1, threads=32, dram_bytes=lambda s: 0,
                      loops=[LoopSpec(r"t < m;", lambda s: 8)])
    assert loop_trips(k.loops, k, spec, {}, SOURCES) == [8, 8]  # copies that both run
    spec.loops[0].unswitched = True
    assert loop_trips(k.loops, k, spec, {}, SOURCES) == [4, 4]  # one of the two runs: 8 in all
    spec.loops[0].trips = lambda s: 0.25
    assert loop_trips(k.loops, k, spec, {}, SOURCES) == [0.125, 0.125]


AMD_LISTING = """
	.file	0 "/src" "k.cu"
	.file	1 "/src" "k.cuh"
_Z4stepv:                               ; @_Z4stepv
	.loc	1 5 0
	s_mov_b32 s4, 0
	v_mov_b32_e32 v1, 0
.LBB0_1:
	.loc	1 13 3
	ds_read_b128 v[2:5], v1
	global_load_dwordx4 v[6:9], v[10:11], off
	s_waitcnt vmcnt(0) lgkmcnt(0)
	v_fmac_f32_e32 v2, v6, v3
	ds_write2_b32 v1, v2, v3 offset1:1
	v_exp_f32_e32 v12, v2
	.loc	1 12 5
	s_add_i32 s4, s4, 1
	s_cmp_lg_u32 s4, 16
	.loc	1 17 9
	s_cbranch_scc1 .LBB0_1
	s_endpgm
.Lfunc_end0:
	.amdgpu_metadata
---
amdhsa.kernels:
  - .agpr_count:     4
    .group_segment_fixed_size: 2048
    .name:           _Z4stepv
    .vgpr_count:     40
...
"""


def test_gfx942_listing_reads_into_the_same_kernels_loops_and_units():
    from gpu_model import amdgpu
    from gpu_model.model import _spec_of

    kernels, resources = amdgpu.parse(AMD_LISTING)
    k = kernels["_Z4stepv"]
    assert resources["_Z4stepv"] == (44, 2048) and k.lanes == 64
    assert len(k.loops) == 1 and len(k.loop_body(k.loops[0])) == 9
    body = k.loop_body(k.loops[0])
    counts = unit_counts(body, k.lanes)
    assert counts["fp32"] == 1 and counts["mufu"] == 1 and counts["tensor"] == 0
    assert counts["shared"] == 2 and counts["shared_wavefronts"] == 64 * 16 // 128 + 64 * 8 // 128
    assert counts["global_bytes"] == 64 * 16 and counts["uniform"] == 2
    assert [i.kind() for i in body].count("STS") == 1 and body[4].multiplicity() == 2
    # the trip test's line (12) names the loop, not the back edge's (17: a line of its body)
    sources = {"/src/k.cuh": ["" for _ in range(20)]}
    sources["/src/k.cuh"][11] = "  for (int t = 0; t < m; ++t) {"
    sources["/src/k.cuh"][16] = "  for (int idx = 0; idx < n * N; ++idx) {"
    spec = KernelSpec("k", "k", "k", blocks=lambda s: 1, threads=64, dram_bytes=lambda s: 0,
                      loops=[LoopSpec(r"idx < n \* N", lambda s: 1), LoopSpec(r"t < m;", lambda s: 16)])
    assert _spec_of(k.loops[0], k, spec, sources) == 1
    # v2 waits for the load (500 clocks on the MI300X model) before the FMA
    from gpu_model.hardware import MI300X

    assert serial_chain(body, MI300X.latency) >= 500


def test_every_chunked_kernel_the_profiler_names_finds_its_estimate():
    """gpu_check.sh prints the model's estimate beside each kernel time the profiler measures, by
    short name: each chunked launch's profiler name (the fused forward twice: as the forward and
    as the backward's saves pass) must come out as its KernelSpec's short name."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_kernel_times import short_name
    from gpu_model.kernels import chunked_kernels

    shape = {"B": 2, "T": 64, "H": 2, "N": 64, "V": 7, "bytes": 2, "hip": False}
    args = "(arwkv::WkvBackwardProblem, arwkv::gpu::Scratch)"
    profiled = [
        f"void arwkv::gpu::chunked::wkv_chunk_fused_forward_kernel<arwkv::gpu::Bf16, 7, 64, false>{args}",
        f"void arwkv::gpu::chunked::wkv_chunk_fused_forward_kernel<arwkv::gpu::Bf16, 7, 64, true>{args}",
        f"void arwkv::gpu::chunked::wkv_chunk_state_grad_kernel<arwkv::gpu::Bf16, 7, 64>{args}",
        f"void arwkv::gpu::chunked::wkv_chunk_grads_kernel<arwkv::gpu::Bf16, 7, 64>{args}",
    ]
    specs = [spec for launches in chunked_kernels(shape).values() for spec in launches]
    assert [short_name(n) for n in profiled] == [spec.short for spec in specs]
