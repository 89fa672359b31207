"""Reading AMD gfx942 assembly (``clang -S`` with line tables) into the same kernels, loops and
units as sass.py reads NVIDIA's: an instruction's "address" is its position in the listing,
source lines come from ``.loc`` directives, loops from branches back to an earlier label, and
each kernel's VGPRs, AGPRs and LDS from the ``amdhsa.kernels`` metadata."""

from __future__ import annotations

import re
from pathlib import Path

from .sass import Insn, Kernel, _loops

_UNIT_PREFIXES = (
    ("v_mfma", "tensor"),
    ("v_exp_", "mufu"),
    ("v_log_", "mufu"),
    ("v_rcp", "mufu"),
    ("v_rsq", "mufu"),
    ("v_sqrt", "mufu"),
    ("v_sin", "mufu"),
    ("v_cos", "mufu"),
    ("v_cvt", "conv"),
    ("ds_bpermute", "shared"),
    ("ds_swizzle", "shared"),
    ("ds_", "shared"),
    ("global_", "global"),
    ("buffer_", "global"),
    ("flat_", "global"),
    ("scratch_", "global"),
    ("s_barrier", "barrier"),
    ("s_waitcnt", "branch"),
    ("s_nop", "branch"),
    ("s_cbranch", "branch"),
    ("s_branch", "branch"),
    ("s_endpgm", "branch"),
    ("s_setprio", "branch"),
    ("s_", "uniform"),
)
_FLOAT_VALU = re.compile(
    r"^v_(pk_)?(fma|fmac|mac|mad|add|sub|subrev|mul|min|max|med3|ldexp|rndne|floor|fract|"
    r"div_fixup|div_scale|div_fmas|frexp|trunc|ceil)[a-z0-9_]*_f(16|32|64)"
)
_REG = re.compile(r"\b([vsa])(?:(\d+)|\[(\d+):(\d+)\])")
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"\s+"([^"]*)"')
_LABEL = re.compile(r"^(\.LBB\d+_\d+):")
_FUNC = re.compile(r"^(_Z\w+):")
_TARGET = re.compile(r"(\.LBB\d+_\d+)")


class AmdInsn(Insn):
    """An instruction of gfx942 assembly; registers are named ("v5", "s12", "a3")."""

    @property
    def base(self) -> str:
        return self.opcode

    @property
    def is_branch(self) -> bool:
        return self.opcode.startswith(("s_cbranch", "s_branch"))

    @property
    def is_conditional_branch(self) -> bool:
        return self.opcode.startswith("s_cbranch")

    def multiplicity(self) -> int:
        return 2 if ("read2" in self.opcode or "write2" in self.opcode) else 1

    def kind(self) -> str:
        op = self.opcode
        for prefix, kind in (
            ("ds_write", "STS"),
            ("ds_read", "LDS"),
            ("global_load", "LDG"),
            ("buffer_load", "LDG"),
            ("global_store", "STG"),
            ("buffer_store", "STG"),
            ("v_mfma", "HMMA"),
            ("ds_bpermute", "SHFL"),
        ):
            if op.startswith(prefix):
                return kind
        return "MUFU" if self.unit == "mufu" else op

    @property
    def unit(self) -> str:
        op = self.opcode
        for prefix, unit in _UNIT_PREFIXES:
            if op.startswith(prefix):
                return unit
        if op.startswith("v_"):
            return "fp32" if _FLOAT_VALU.match(op) else "alu"
        return "other"

    def width(self) -> int:
        """Bytes per lane of a memory access (b32 / b64 / b96 / b128, dwordxN, short, byte;
        read2 / write2 move two)."""
        op = self.opcode
        m = re.search(r"_b(\d+)$|dwordx(\d)|_dword$|_(u?short|d16)|_(u?byte)", op)
        if not m:
            return 4
        if m.group(1):
            size = int(m.group(1)) // 8
        elif m.group(2):
            size = 4 * int(m.group(2))
        elif m.group(3):
            size = 2
        elif m.group(4):
            size = 1
        else:
            size = 4
        return size * (2 if ("read2" in op or "write2" in op) else 1)

    def _names(self, operand: str) -> list[str]:
        out = []
        for kind, single, lo, hi in _REG.findall(operand):
            if single:
                out.append(f"{kind}{single}")
            else:
                out += [f"{kind}{i}" for i in range(int(lo), int(hi) + 1)]
        return out

    def defs(self) -> list:
        op = self.opcode
        if (
            self.unit in ("branch", "barrier")
            or op.startswith(("ds_write", "global_store", "buffer_store", "flat_store", "s_cmp", "s_store"))
            or not self.operands
        ):
            return []
        return self._names(self.operands[0])

    def uses(self) -> list:
        start = 1 if self.defs() else 0
        out = []
        for operand in self.operands[start:]:
            out += self._names(operand)
        return out


def parse(text: str) -> tuple[dict[str, Kernel], dict[str, tuple[int, int]]]:
    """(every kernel of a gfx942 listing by mangled name, {kernel: (VGPRs + AGPRs, LDS bytes)})."""
    files: dict[int, str] = {}
    comp_dir = "."
    kernels: dict[str, Kernel] = {}
    name, insns, labels, line, pending = None, [], {}, None, []
    position = 0

    def close():
        if name is not None:
            kernels[name] = Kernel(name, insns, _loops(insns, labels), lanes=64, labels=dict(labels))

    for raw in text.splitlines():
        m = _FILE.match(raw)
        if m:  # .file N "folder" "name": folder relative to file 0's (the compilation directory)
            number, folder, base = int(m.group(1)), m.group(2), m.group(3)
            if number == 0:
                comp_dir = folder
            files[number] = str(
                Path(folder) / base if folder.startswith("/") else Path(comp_dir) / folder / base
            )
            continue
        m = _FUNC.match(raw)
        if m:
            close()
            name, insns, labels, line, pending = m.group(1), [], {}, None, []
            continue
        if name is None:
            continue
        if raw.startswith(".Lfunc_end"):
            close()
            name = None
            continue
        m = _LOC.match(raw)
        if m:
            number, ln = int(m.group(1)), int(m.group(2))
            line = (files.get(number, "?"), ln) if ln else line
            continue
        m = _LABEL.match(raw)
        if m:
            pending.append(m.group(1))
            continue
        stripped = raw.strip()
        if not stripped or stripped.startswith((".", ";")) or not raw.startswith("\t"):
            continue
        text_part = stripped.split(";")[0].strip()
        opcode, _, rest = text_part.partition(" ")
        position += 1
        for label in pending:
            labels[label] = position
        pending = []
        target = _TARGET.search(rest) if opcode.startswith(("s_cbranch", "s_branch")) else None
        operands = [o.strip() for o in rest.split(",")] if rest.strip() else []
        insn = AmdInsn(position, opcode, operands, line, False, target.group(1) if target else None)
        insns.append(insn)
    close()

    resources = {}
    for block in re.split(r"\n\s*- \.", text[text.find("amdhsa.kernels") :]):
        nm = re.search(r"\.name:\s+(\S+)", block)
        if not nm:
            continue
        vgpr = re.search(r"\.vgpr_count:\s+(\d+)", block)
        agpr = re.search(r"agpr_count:\s+(\d+)", block)
        lds = re.search(r"\.group_segment_fixed_size:\s+(\d+)", block)
        resources[nm.group(1)] = (
            int(vgpr.group(1)) + (int(agpr.group(1)) if agpr else 0),
            int(lds.group(1)) if lds else 0,
        )
    return kernels, resources
