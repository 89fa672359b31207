"""Reading NVIDIA machine code (SASS, as ``nvdisasm -g`` prints it) for the GPU performance model.

A kernel becomes a list of instructions (address, opcode, operands, the source line it came
from), its loops (a backward branch from the end of the body to its head, nested by address
range), and for any address range: the instructions counted by the unit that executes them and a
serial chain (the longest path through register dependences, with per-unit latencies).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Units an instruction issues to (the H100 model gives each a rate per SM per clock).
UNITS = (
    "fp32",
    "alu",
    "imad",
    "conv",
    "mufu",
    "tensor",
    "shared",
    "shuffle",
    "global",
    "barrier",
    "uniform",
    "branch",
    "other",
)

_UNIT_OF = {
    "FFMA": "fp32",
    "FADD": "fp32",
    "FMUL": "fp32",
    "FMNMX": "fp32",
    "FSEL": "fp32",
    "FSETP": "fp32",
    "FSET": "fp32",
    "FCHK": "fp32",
    "FSWZADD": "fp32",
    "IMAD": "imad",
    "IMUL": "imad",
    "IADD3": "alu",
    "LOP3": "alu",
    "SHF": "alu",
    "ISETP": "alu",
    "LEA": "alu",
    "PRMT": "alu",
    "SEL": "alu",
    "IABS": "alu",
    "IMNMX": "alu",
    "FLO": "alu",
    "POPC": "alu",
    "BREV": "alu",
    "MOV": "alu",
    "PLOP3": "alu",
    "P2R": "alu",
    "R2P": "alu",
    "VIADD": "alu",
    "VIMNMX": "alu",
    "IDP": "alu",
    "IMNMX3": "alu",
    "CS2R": "alu",
    "S2R": "alu",
    "SGXT": "alu",
    "BMSK": "alu",
    "LOP": "alu",
    "IADD": "alu",
    "ISCADD": "alu",
    "F2F": "conv",
    "F2I": "conv",
    "I2F": "conv",
    "F2FP": "conv",
    "I2FP": "conv",
    "F2IP": "conv",
    "FRND": "conv",
    "MUFU": "mufu",
    "HMMA": "tensor",
    "IMMA": "tensor",
    "HGMMA": "tensor",
    "BMMA": "tensor",
    "LDS": "shared",
    "STS": "shared",
    "LDSM": "shared",
    "ATOMS": "shared",
    "LDGSTS": "shared",
    "SHFL": "shuffle",
    "LDG": "global",
    "STG": "global",
    "LD": "global",
    "ST": "global",
    "RED": "global",
    "ATOMG": "global",
    "LDC": "other",
    "BAR": "barrier",
    "WARPSYNC": "barrier",
    "DEPBAR": "barrier",
    "MEMBAR": "barrier",
    "ERRBAR": "barrier",
    "BRA": "branch",
    "EXIT": "branch",
    "BSSY": "branch",
    "BSYNC": "branch",
    "RET": "branch",
    "CALL": "branch",
    "JMP": "branch",
    "BPT": "branch",
    "NOP": "branch",
    "YIELD": "branch",
    "WARPGROUP": "branch",
}

# Latency (clocks) from issue to a dependent instruction, per unit: the public microbenchmark
# figures for Hopper (fixed-latency pipes ~4-6, shared memory ~30, shuffles ~25, MUFU ~15-20,
# global memory from L2 ~250, from HBM ~500; the model uses the L2 figure: the step kernels
# re-read each chunk's staged inputs from other blocks of the same head).
LATENCY = {
    "fp32": 4,
    "alu": 4,
    "imad": 4,
    "conv": 6,
    "mufu": 18,
    "tensor": 24,
    "shared": 30,
    "shuffle": 25,
    "global": 260,
    "barrier": 20,
    "uniform": 4,
    "branch": 4,
    "other": 10,
}

_LINE = re.compile(r'//## File "(?P<file>[^"]+)", line (?P<line>\d+)')
_INSN = re.compile(r"/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]\s+)?(?P<body>[^;]*);")
_LABEL = re.compile(r"^\.(L_x_\d+):")
_TARGET = re.compile(r"`\(\.(L_x_\d+)\)")
_REG = re.compile(r"\bR(\d+)\b")


@dataclass
class Insn:
    addr: int
    opcode: str  # with modifiers, e.g. LDS.128
    operands: list[str]
    line: tuple[str, int] | None  # (file, line) of the source it came from
    predicated: bool = False
    target: str | None = None  # branch target label

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def is_branch(self) -> bool:
        return self.base == "BRA"

    @property
    def is_conditional_branch(self) -> bool:
        return self.is_branch and self.predicated

    def multiplicity(self) -> int:
        """Accesses it makes (AMD's read2 / write2 make two)."""
        return 1

    def kind(self) -> str:
        """The SASS mnemonic of what it does (LDG, STG, LDS, STS, MUFU, ...): loop signatures
        (model.LoopSpec.per_trip) are written in these for every vendor."""
        return self.base

    @property
    def unit(self) -> str:
        base = self.base
        if base.startswith("U") and base not in _UNIT_OF:  # uniform datapath (one per warp)
            return "uniform"
        if base in ("S2UR", "R2UR", "LDCU"):
            return "uniform"
        return _UNIT_OF.get(base, "other")

    def width(self) -> int:
        """Bytes per lane of a memory access (.64 / .128 / .U16 ...; 4 by default)."""
        for mod in self.opcode.split(".")[1:]:
            if mod in ("128",):
                return 16
            if mod in ("64",):
                return 8
            if mod in ("U16", "S16"):
                return 2
            if mod in ("U8", "S8"):
                return 1
        return 4

    def _regs(self, operand: str, count: int) -> list[int]:
        m = _REG.search(operand)
        if not m or operand.strip().startswith("["):
            return []
        return list(range(int(m.group(1)), int(m.group(1)) + count))

    def defs(self) -> list[int]:
        """Registers written (the first operand of most instructions; stores, branches and barriers
        write none)."""
        if self.unit in ("branch", "barrier") or self.base in (
            "STS",
            "STG",
            "ST",
            "RED",
            "ISETP",
            "FSETP",
            "PLOP3",
            "LDGSTS",
        ):
            return []
        if not self.operands:
            return []
        count = max(1, self.width() // 4) if self.unit in ("shared", "global") else 1
        if self.base == "HMMA":
            count = 2 if ".F16" in self.opcode and ".F32" not in self.opcode else 4
        return self._regs(self.operands[0], count)

    def uses(self) -> list[int]:
        start = 0 if not self.defs() and self.base not in ("ISETP", "FSETP", "PLOP3") else 1
        regs = []
        for op in self.operands[start:]:
            regs += [int(x) for x in _REG.findall(op)]
        return regs


@dataclass
class Loop:
    head: int  # address of its header (the target of its back edges)
    tail: int  # address of its last back-edge branch
    line: tuple[str, int] | None  # source line of that branch (the loop's own `for`)
    addrs: frozenset = frozenset()  # addresses of its instructions (its blocks, nested loops included)
    children: list[Loop] = field(default_factory=list)


@dataclass
class Kernel:
    name: str
    insns: list[Insn]
    loops: list[Loop]  # outermost first; nested ones in .children
    lanes: int = 32  # lanes of a warp (32) or wavefront (64)
    labels: dict = field(default_factory=dict)  # branch target label -> its address

    def body(self, lo: int, hi: int) -> list[Insn]:
        """The instructions at addresses lo .. hi."""
        return [i for i in self.insns if lo <= i.addr <= hi]

    def loop_body(self, loop: Loop) -> list[Insn]:
        return [i for i in self.insns if i.addr in loop.addrs]

    def all_loops(self) -> list[Loop]:
        out, todo = [], list(self.loops)
        while todo:
            loop = todo.pop(0)
            out.append(loop)
            todo = loop.children + todo
        return out


def parse(text: str) -> dict[str, Kernel]:
    """Every kernel of an ``nvdisasm -g`` listing, by mangled name."""
    kernels: dict[str, Kernel] = {}
    name, insns, labels, line = None, [], {}, None

    def close():
        if name is not None:
            # the self-branch nvdisasm prints after the last EXIT never runs
            kept = [i for i in insns if not (i.base == "BRA" and i.target and labels.get(i.target) == i.addr)]
            kernels[name] = Kernel(name, kept, _loops(kept, labels), labels=dict(labels))

    for raw in text.splitlines():
        if raw.startswith(".text."):
            close()
            name, insns, labels, line = raw[len(".text.") :].rstrip(":"), [], {}, None
            continue
        if name is None:
            continue
        m = _LINE.search(raw)
        if m:
            line = (m.group("file"), int(m.group("line")))
            continue
        m = _LABEL.match(raw.strip())
        if m:
            labels[m.group(1)] = None  # resolved to the next instruction's address
            labels["__pending__"] = m.group(1)
            continue
        m = _INSN.search(raw)
        if not m:
            continue
        addr = int(m.group("addr"), 16)
        if "__pending__" in labels:
            labels[labels.pop("__pending__")] = addr
        body = m.group("body").strip()
        opcode, _, rest = body.partition(" ")
        target = _TARGET.search(rest)
        operands = [o.strip() for o in rest.split(",")] if rest.strip() else []
        insns.append(
            Insn(addr, opcode, operands, line, bool(m.group("pred")), target.group(1) if target else None)
        )
    close()
    return kernels


def _loops(insns: list[Insn], labels: dict[str, int | None]) -> list[Loop]:
    """The natural loops of the control-flow graph (a back edge is a branch to a block that
    dominates it; the loop is what reaches the branch without passing its header), nested by
    containment. Address ranges would not do: compilers place blocks out of order (gfx942 code
    jumps back to blocks laid out early)."""
    if not insns:
        return []
    starts = {0} | {
        labels[i.target] for i in insns if i.is_branch and i.target and labels.get(i.target) is not None
    }
    index = {i.addr: n for n, i in enumerate(insns)}
    cut = sorted(
        {index[a] for a in starts if a in index}
        | {0}
        | {
            n + 1
            for n, i in enumerate(insns)
            if (i.is_branch or i.base in ("EXIT", "s_endpgm")) and n + 1 < len(insns)
        }
    )
    blocks = [(cut[b], (cut[b + 1] if b + 1 < len(cut) else len(insns)) - 1) for b in range(len(cut))]
    block_at = {insns[first].addr: b for b, (first, _) in enumerate(blocks)}
    succ: list[list[int]] = []
    for b, (_, last) in enumerate(blocks):
        i = insns[last]
        out = []
        ends = i.base in ("EXIT", "s_endpgm") and not i.predicated
        unconditional = i.is_branch and not i.predicated and i.opcode in ("BRA", "s_branch")
        if i.is_branch and i.target and labels.get(i.target) in block_at:
            out.append(block_at[labels[i.target]])
        if not ends and not unconditional and b + 1 < len(blocks):
            out.append(b + 1)
        succ.append(out)
    # dominators, iteratively (blocks are few hundred)
    everything = set(range(len(blocks)))
    dom = [everything] * len(blocks)
    dom[0] = {0}
    pred: list[list[int]] = [[] for _ in blocks]
    for b, out in enumerate(succ):
        for c in out:
            pred[c].append(b)
    changed = True
    while changed:
        changed = False
        for b in range(1, len(blocks)):
            ps = [dom[p] for p in pred[b]]
            new = ({b} | set.intersection(*ps)) if ps else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    loops: dict[int, Loop] = {}
    for b, out in enumerate(succ):
        for h in out:
            if h in dom[b]:  # back edge b -> h
                body, todo = {h, b}, ([b] if b != h else [])  # (never past the header)
                while todo:
                    x = todo.pop()
                    for p in pred[x]:
                        if p not in body:
                            body.add(p)
                            todo.append(p)
                addrs = {insns[n].addr for blk in body for n in range(blocks[blk][0], blocks[blk][1] + 1)}
                branch = insns[blocks[b][1]]
                if h in loops:  # another back edge of the same header: one loop
                    old = loops[h]
                    loops[h] = Loop(
                        old.head,
                        max(old.tail, branch.addr),
                        old.line if old.tail >= branch.addr else branch.line,
                        frozenset(old.addrs | addrs),
                    )
                else:
                    loops[h] = Loop(insns[blocks[h][0]].addr, branch.addr, branch.line, frozenset(addrs))
    flat = sorted(loops.values(), key=lambda lp: -len(lp.addrs))
    roots: list[Loop] = []
    for loop in flat:  # largest first: each goes under the smallest loop already placed that holds it
        parent, level = None, roots
        while True:
            holder = next((o for o in level if loop.addrs <= o.addrs and o is not loop), None)
            if holder is None:
                break
            parent, level = holder, holder.children
        (parent.children if parent else roots).append(loop)
    for loop in [*roots]:
        _sort_children(loop)
    roots.sort(key=lambda lp: lp.head)
    return roots


def _sort_children(loop: Loop) -> None:
    loop.children.sort(key=lambda lp: lp.head)
    for child in loop.children:
        _sort_children(child)


def unit_counts(insns: list[Insn], lanes: int = 32, conflicts: dict | None = None) -> Counter:
    """Instructions by unit, plus shared-memory wavefronts (``shared_wavefronts``: 128-byte
    cycles of a warp access = lanes x width / 128 when conflict-free, times the factor that
    ``conflicts`` gives its source line, (file name, line): the bank conflicts the emulator
    counted there) and global bytes per warp (``global_bytes``)."""
    c = Counter(i.unit for i in insns)
    for i in insns:
        if i.unit == "shared" and i.base != "LDSM":
            factor = conflicts.get((Path(i.line[0]).name, i.line[1]), 1.0) if conflicts and i.line else 1.0
            c["shared_wavefronts"] += max(1, lanes * i.width() // 128) * factor
        elif i.base == "LDSM":
            c["shared_wavefronts"] += 4
        if i.unit == "global":
            c["global_bytes"] += lanes * i.width()
    return c


def serial_chain(insns: list[Insn], latency: dict[str, int] | None = None) -> int:
    """Clocks one warp takes for ``insns`` alone: issued in program order (as a GPU issues a
    warp's instructions), each one clock after the previous and no earlier than its source
    registers are ready (per-unit latencies). A lower bound on the time of one trip, which no
    number of other warps shortens."""
    latency = latency or LATENCY
    ready: dict = {}
    clock, end = 0, 0
    for i in insns:
        clock = max([clock + 1] + [ready.get(r, 0) for r in i.uses()])
        done = clock + latency[i.unit]
        for r in i.defs():
            ready[r] = done
        end = max(end, done)
    return end
