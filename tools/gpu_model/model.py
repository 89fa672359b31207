"""From a kernel's machine code and a problem shape to an estimated time on a GPU.

Per kernel: dynamic instructions per warp by unit = the instructions of each loop body (read from
the machine code) times its trips (from the launch's shape: ``KernelSpec.loops`` says, for each
source loop, how many times it runs; the unroll factor the compiler chose is read back from the
machine code). Then, per unit (an SM / CU) and per wave of resident blocks:

    time = max(issue, each pipe's work / its rate, shared-memory wavefronts, the serial chain)

where the serial chain is one warp's longest register-dependence path summed over its loop trips
(what no amount of parallel warps hides), and over the kernel: at least its DRAM bytes / bandwidth.
Every assumption is printed by the caller (``describe``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .hardware import Gpu
from .sass import Insn, Kernel, Loop, serial_chain, unit_counts

ASSUMPTIONS = [
    "straight-line code in a loop body counts in full on every trip (branches inside it are not "
    "followed: peeled remainders and rarely taken paths are over-counted)",
    "a loop the compiler unrolled runs floor(trips / unroll) times; its remainder is the peeled "
    "code counted with the enclosing body",
    "shared-memory accesses take lanes x B / 128 wavefronts (B bytes per lane), times, in the chunked "
    "kernels, the bank conflicts the CPU emulator counts at the tile layer's loads and stores (its "
    "--banks report); other shared accesses, and the step kernels', are taken as conflict-free",
    "code that only some of a block's warps run (the chunked kernels' solve, their grads kernel's "
    "L x L gradients) counts that share per warp, on the serial chain in full (code no warp runs, "
    "the pairwise path, is off the chain); an access by part of a warp's lanes counts as the whole "
    "warp's",
    "DRAM traffic is each tensor's bytes once (re-reads by other blocks hit L2)",
    "blocks are spread evenly: the busiest unit runs ceil(blocks / units) blocks, as many at once "
    "as registers, shared memory, threads and the block limit allow",
    "latencies (clocks): fp32/alu 4, conversions 6, special functions 18, shared 30, shuffles 25, "
    "global 260 (L2), tensor 24",
]


@dataclass
class LoopSpec:
    """A source loop of a kernel: ``pattern`` matches its header line and the two lines after it
    (the source line of the loop's backward branch is its ``for``); ``trips(shape)`` is how many
    times it runs per trip of the enclosing loop (per warp: a loop only some warps run counts as
    the average over the block's warps; a loop whose trips differ across a warp's lanes counts
    the warp's most); ``per_trip`` = (opcode, how many a source iteration has) reads the
    compiler's unroll factor back (that opcode in the machine-code body / per source iteration);
    ``needs_global_loads``: a version of the loop without global loads is the one that does not
    run (a null-pointer branch); ``unswitched``: the compiler may emit one copy of the loop per
    value of a condition that does not change inside it, of which one runs (its trips are shared
    out among the copies); ``may_vanish``: the compiler may unroll it away, so no loop of the
    machine code need match it. Every other spec of more than one trip must match a loop: one
    that matches none means its loop was taken for another's (and counted with that one's trips),
    or the source changed under it. (A loop of at most one trip per thread may be compiled as
    straight-line code.)"""

    pattern: str
    trips: Callable[[dict], float]
    per_trip: tuple[str, int] | None = None
    needs_global_loads: bool = False
    unswitched: bool = False
    may_vanish: bool = False


@dataclass
class RegionSpec:
    """Code that only some of a block's warps run (it stands under a test of the warp's index):
    ``pattern`` matches the start of a statement, or of a function whose body is the region, in the
    source file named ``file``; the region is that statement, or the braced block it opens, to its
    end, and what a conditional branch there jumps over where no other branch leads into that code
    (the body of its `if`, inlined from a function elsewhere). ``share(shape)``: the share of the
    block's warps that run it (0: a path the model takes as never run). Its instructions, and the
    loops inside it, count that share per warp (the others wait at the barrier after it: the
    region stays on the serial chain in full, unless its share is 0)."""

    file: str
    pattern: str
    share: Callable[[dict], float]


@dataclass
class KernelSpec:
    """How a kernel is launched for a shape: the kernel (regex on its mangled name), its grid
    (blocks) and block (threads), its loops, and the DRAM bytes it moves."""

    label: str
    name: str
    short: str  # the name benchmarks/gpu_kernel_times.py gives the kernel (it prints the estimate)
    blocks: Callable[[dict], int]
    threads: int
    loops: list[LoopSpec]
    dram_bytes: Callable[[dict], float]
    regions: list[RegionSpec] = field(default_factory=list)
    emulated_as: str = ""  # the launcher's name for it, as the emulator's bank-conflict report gives it
    # (file name, line) -> shared wavefronts per conflict-free wavefront, from that report
    conflicts: dict = field(default_factory=dict)


@dataclass
class Estimate:
    label: str
    ms: float
    bound: str
    blocks: int
    resident: int  # blocks at once per unit
    per_warp: Counter = field(default_factory=Counter)
    chain_clocks: float = 0.0
    parts_ms: dict = field(default_factory=dict)


def _context(line: tuple[str, int] | None, sources: dict[str, list[str]]) -> str:
    """A source line and the two after it."""
    if line is None:
        return ""
    lines = sources.get(line[0]) or []
    return " ".join(lines[line[1] - 1 : line[1] + 2])


def _candidate_lines(loop: Loop, kernel: Kernel) -> list[tuple[str, int]]:
    """Where a loop's own ``for`` may be, most likely first: the compares just before its back
    edge (the trip test: both compilers tag it with the loop's line), the back edge itself
    (NVIDIA's compiler keeps the line there; AMD's often tags it with a line of the body), its
    header, its own branches, its other instructions by frequency."""
    inner = set().union(*(c.addrs for c in loop.children)) if loop.children else set()
    own = [i for i in kernel.loop_body(loop) if i.addr not in inner and i.line]
    at = next((n for n, i in enumerate(kernel.insns) if i.addr == loop.tail), None)
    latch = []
    if at is not None:
        for i in reversed(kernel.insns[max(0, at - 24) : at]):
            if i.is_branch:
                break
            if i.base.startswith(("ISETP", "s_cmp", "v_cmp")) and i.line:
                latch.append(i.line)
    head = next((i.line for i in own if i.addr == loop.head), None)
    branches = [i.line for i in own if i.is_branch]
    counts: dict = {}
    for i in own:
        counts[i.line] = counts.get(i.line, 0) + 1
    ordered = [*latch, loop.line, head, *branches, *sorted(counts, key=counts.get, reverse=True)]
    seen, out = set(), []
    for line in ordered:
        if line and line not in seen:
            seen.add(line)
            out.append(line)
    return out


def _spec_of(loop: Loop, kernel: Kernel, spec: KernelSpec, sources: dict[str, list[str]]) -> int:
    for line in _candidate_lines(loop, kernel):
        text = _context(line, sources)
        for n, ls in enumerate(spec.loops):
            if re.search(ls.pattern, text):
                return n
    lines = (sources.get(loop.line[0]) or []) if loop.line else []
    line = lines[loop.line[1] - 1].strip() if loop.line and 0 < loop.line[1] <= len(lines) else ""
    raise ValueError(f"{spec.label}: no trip count for the loop at {loop.line} ({line[:80]!r})")


def _unroll(loop: Loop, kernel: Kernel, ls: LoopSpec) -> int:
    if not ls.per_trip:
        return 1
    opcode, per_iteration = ls.per_trip
    found = sum(i.multiplicity() for i in kernel.loop_body(loop) if i.kind() == opcode)
    return max(1, round(found / per_iteration))


def loop_trips(
    loops: list[Loop], kernel: Kernel, spec: KernelSpec, shape: dict, sources: dict
) -> list[float]:
    """Trips of each of these sibling loops. Loops of one source loop with different unroll
    factors are its unrolled body and its remainder (floor(n / U) trips, and the n mod U left
    over); with the same factor they are copies of it (inlined at several places), each with
    its own n."""
    which = [_spec_of(loop, kernel, spec, sources) for loop in loops]
    unroll = [_unroll(loop, kernel, spec.loops[w]) for loop, w in zip(loops, which, strict=True)]
    trips = []
    for loop, w, u in zip(loops, which, unroll, strict=True):
        ls = spec.loops[w]
        if ls.needs_global_loads and not any(i.kind() == "LDG" for i in kernel.loop_body(loop)):
            trips.append(0.0)
            continue
        n = ls.trips(shape)
        if ls.unswitched:
            n /= sum(1 for ww, uu in zip(which, unroll, strict=True) if ww == w and uu == u)
        widest = max(uu for ww, uu in zip(which, unroll, strict=True) if ww == w)
        # (n may be an average over the block's warps, below 1: a loop not unrolled keeps it whole)
        trips.append((math.floor(n / u) if u > 1 else n) if u == widest else (n % widest) / u)
    return trips


def check_loops_matched(kernel: Kernel, spec: KernelSpec, shape: dict, sources: dict) -> None:
    """Raises ValueError when a loop spec of more than one trip that may not vanish matches no
    loop of the kernel."""
    used: set[int] = set()

    def walk(loops: list[Loop]) -> None:
        for loop in loops:
            used.add(_spec_of(loop, kernel, spec, sources))
            walk(loop.children)

    walk(kernel.loops)
    for n, ls in enumerate(spec.loops):
        if n not in used and not ls.may_vanish and ls.trips(shape) > 1:
            raise ValueError(f"{spec.label}: no loop of the machine code matches {ls.pattern[:70]!r}")


def region_lines(region: RegionSpec, sources: dict[str, list[str]]) -> set[tuple[str, int]]:
    """The (source path, line) pairs of a region; ValueError unless its pattern matches once."""
    found = []
    for path, lines in sources.items():
        if path.rsplit("/", 1)[-1] != region.file:
            continue
        text = "\n".join(lines)
        for m in re.finditer(region.pattern, text):
            depth, end = 0, None  # (parentheses; a brace at depth 0 opens the block)
            i = m.start()
            while i < len(text) and end is None:
                ch = text[i]
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                elif ch == ";" and depth == 0:
                    end = i
                elif ch == "{" and depth == 0:
                    braces = 0
                    for j in range(i, len(text)):
                        braces += {"{": 1, "}": -1}.get(text[j], 0)
                        if braces == 0:
                            end = j
                            break
                    if end is None:
                        end = len(text)
                i += 1
            first, last = text.count("\n", 0, m.start()) + 1, text.count("\n", 0, end) + 1
            found.append({(path, n) for n in range(first, last + 1)})
    if len(found) != 1:
        raise ValueError(f"region {region.pattern[:60]!r} of {region.file}: {len(found)} matches, not 1")
    return found[0]


def dynamic(
    kernel: Kernel, spec: KernelSpec, shape: dict, sources: dict, latency: dict[str, int] | None = None
) -> tuple[Counter, float]:
    """(instructions per warp by unit for one block's work, the serial chain in clocks)."""
    check_loops_matched(kernel, spec, shape, sources)
    shares = {}  # (source path, line) -> share of the warps that run it
    skipped = {}  # address -> share: what a region's conditional forward branch jumps over (the body
    # of its `if`, inlined from elsewhere: its lines are another function's)
    for region in spec.regions:
        lines = region_lines(region, sources)
        share = region.share(shape)
        for line in lines:
            shares[line] = share
        for i in kernel.insns:
            if i.line in lines and i.is_conditional_branch and kernel.labels.get(i.target, -1) > i.addr:
                lo, hi = i.addr, kernel.labels[i.target]
                # only code entered by falling through the branch: where another branch leads into
                # it (AMD's compiler lays blocks out of order), it is not the `if`'s body alone
                if any(
                    j.is_branch and not lo <= j.addr < hi and lo < kernel.labels.get(j.target, -1) < hi
                    for j in kernel.insns
                ):
                    continue
                for j in kernel.insns:
                    if lo < j.addr < hi:
                        skipped[j.addr] = min(share, skipped.get(j.addr, 1.0))

    def share_of(addr: int, line: tuple[str, int] | None) -> float:
        """(code in several regions runs in the smallest one's share of the warps)"""
        return min(skipped.get(addr, 1.0), shares.get(line, 1.0))

    def walk(insns: list[Insn], loops: list[Loop], in_region: bool = False) -> tuple[Counter, float]:
        # (in_region: inside a loop already counted at its region's share)
        inside = set()
        counts, chain = Counter(), 0.0
        for loop, trips in zip(loops, loop_trips(loops, kernel, spec, shape, sources), strict=True):
            body = kernel.loop_body(loop)
            inside.update(i.addr for i in body)
            share = 1.0 if in_region else share_of(loop.tail, loop.line)
            c, ch = walk(body, loop.children, in_region or share != 1.0)
            for k, v in c.items():
                counts[k] += trips * v * share
            chain += trips * ch if share > 0 else 0.0
        own = [i for i in insns if i.addr not in inside]
        by_share: dict[float, list[Insn]] = {}
        for i in own:
            by_share.setdefault(1.0 if in_region else share_of(i.addr, i.line), []).append(i)
        for share, group in by_share.items():
            for k, v in unit_counts(group, kernel.lanes, spec.conflicts).items():
                counts[k] += share * v
            counts["issue"] += share * len(group)
        # (a path no warp runs is off the chain as well)
        ran = [i for i in own if in_region or share_of(i.addr, i.line) > 0]
        return counts, chain + serial_chain(ran, latency)

    return walk(kernel.insns, kernel.loops)


def resident_blocks(gpu: Gpu, threads: int, regs: int, shared: int) -> int:
    """Blocks of ``threads`` threads one unit holds at once, by registers (allocated per warp in
    units of 256), shared memory, threads and the block limit."""
    warps = math.ceil(threads / gpu.warp)
    if gpu.vgprs_per_simd:  # AMD: waves per SIMD by registers (allocated in 8s), a block's waves spread
        waves = min(gpu.max_waves_per_simd, gpu.vgprs_per_simd // (math.ceil(max(regs, 1) / 8) * 8))
        by_regs = waves * gpu.schedulers // warps
    else:
        regs_per_warp = math.ceil(max(regs, 1) * gpu.warp / 256) * 256
        by_regs = gpu.registers // (regs_per_warp * warps)
    by_shared = gpu.shared_bytes // shared if shared else gpu.max_blocks
    by_threads = gpu.max_threads // threads
    return max(0, min(by_regs, by_shared, by_threads, gpu.max_blocks))


def demands(per_warp: Counter, chain: float, gpu: Gpu) -> dict[str, float]:
    """Clocks of each shared resource of a unit one warp's work takes: the schedulers' issue
    slots and each pipe (a unit's schedulers counted as one server that many times as fast),
    and the unit's shared memory and shuffle network."""
    d = {"issue": per_warp["issue"] / (gpu.rates["issue"] * gpu.schedulers)}
    merged = {u for units in gpu.merged.values() for u in units}
    for unit in ("fp32", "alu", "imad", "conv", "mufu", "tensor", "uniform"):
        if unit not in merged:
            d[unit] = per_warp[unit] / (gpu.rates[unit] * gpu.schedulers)
    for pipe, units in gpu.merged.items():
        d[pipe] = sum(per_warp[u] for u in units) / (gpu.rates[pipe] * gpu.schedulers)
    d["shared"] = per_warp["shared_wavefronts"] / gpu.rates["shared"]
    d["shuffle"] = per_warp["shuffle"] / gpu.rates["shuffle"]
    return d


def closed_network_time(warps: int, demands: dict[str, float], chain: float) -> float:
    """Clocks for ``warps`` warps to finish their work on one unit: exact mean-value analysis of
    a closed queueing network, each warp cycling through the unit's resources (queueing stations
    with the demands above) and its own serial chain (a delay: latency no other warp can take).
    Between the two simple bounds, max(sum of one warp's demands + chain, busiest resource x
    warps), and close to the larger when one dominates."""
    queue = {k: 0.0 for k in demands}
    throughput = 0.0
    for n in range(1, warps + 1):
        residence = {k: d * (1 + queue[k]) for k, d in demands.items()}
        throughput = n / (chain + sum(residence.values()))
        queue = {k: throughput * r for k, r in residence.items()}
    return warps / throughput if throughput else 0.0


def estimate(
    kernel: Kernel, resources: tuple[int, int], spec: KernelSpec, shape: dict, gpu: Gpu, sources: dict
) -> Estimate:
    regs, shared = resources
    blocks = spec.blocks(shape)
    per_warp, chain = dynamic(kernel, spec, shape, sources, gpu.latency)
    resident = resident_blocks(gpu, spec.threads, regs, shared)
    if resident == 0:
        raise ValueError(f"{spec.label}: a block does not fit on one unit")
    warps_per_block = math.ceil(spec.threads / gpu.warp)
    busiest = math.ceil(blocks / gpu.units)
    clocks, bounds = 0.0, Counter()
    left = busiest
    while left > 0:  # one wave of resident blocks after another on the busiest unit
        b = min(left, resident)
        warps = b * warps_per_block
        parts = demands(per_warp, chain, gpu)
        # the chain includes the warp's own issue slots: the delay is the rest (its stalls)
        stalls = max(0.0, chain - per_warp["issue"] / gpu.rates["issue"])
        wave = closed_network_time(warps, parts, stalls)
        if left == busiest:
            first_wave = {k: v * warps / (gpu.clock_ghz * 1e6) for k, v in parts.items()}
            first_wave["chain"] = chain / (gpu.clock_ghz * 1e6)
        bound = max(parts, key=parts.get) if max(parts.values()) * warps > stalls else "latency"
        clocks += wave
        bounds[bound] += wave
        left -= b
    compute_ms = clocks / (gpu.clock_ghz * 1e6)
    dram_ms = spec.dram_bytes(shape) / (gpu.hbm_tb_s * 1e9)
    bound = max(bounds, key=bounds.get) if compute_ms >= dram_ms else "dram"
    return Estimate(
        spec.label,
        max(compute_ms, dram_ms),
        bound,
        blocks,
        resident,
        per_warp,
        chain,
        {"compute": compute_ms, "dram": dram_ms, "first wave": first_wave},
    )
