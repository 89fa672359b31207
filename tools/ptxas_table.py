"""Turns `ptxas -v` output (from a verbose CUDA build) into one row per kernel and architecture:
registers, spills, stack frame, shared memory. With --fail-on-spill, exits non-zero when a
kernel spills.

    python tools/ptxas_table.py build.log [--out table.txt] [--fail-on-spill]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

COMPILING = re.compile(r"ptxas info\s*: Compiling entry function '(\S+)' for '(sm_\d+a?)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def short(name: str) -> str:
    """arwkv::gpu::wkv_rows_kernel<float, 7, arwkv::gpu::RowTile<64, 16, 128>, 0>(...) -> compact."""
    name = name.split("(")[0].removeprefix("void ").replace("arwkv::gpu::", "")
    return name.replace("RowTile", "tile").replace(" ", "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--fail-on-spill", action="store_true")
    args = ap.parse_args()
    rows, current = [], None
    for line in args.log.read_text(errors="replace").splitlines():
        if m := COMPILING.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2)}
        elif current and (m := PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif current and (m := USED.search(line)):
            smem = SMEM.search(line)
            current.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
            rows.append(current)
            current = None
    if not rows:
        print(f"no ptxas -v output found in {args.log}", file=sys.stderr)
        return 1
    for row, name in zip(rows, demangle([r["kernel"] for r in rows]), strict=True):
        row["kernel"] = short(name)
    rows.sort(key=lambda r: (r["arch"], r["kernel"]))
    width = max(len(r["kernel"]) for r in rows)
    lines = [f"{'kernel':<{width}}  arch   regs  spill_st  spill_ld  stack  smem_bytes"]
    for r in rows:
        lines.append(
            f"{r['kernel']:<{width}}  {r['arch']:<5} {r['regs']:>5}  {r['spill_st']:>8}  {r['spill_ld']:>8}"
            f"  {r['stack']:>5}  {r['smem']:>10}"
        )
    spills = [r for r in rows if r["spill_st"] or r["spill_ld"]]
    lines.append(f"{len(rows)} kernels; {len(spills)} spill; max registers {max(r['regs'] for r in rows)}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if spills and args.fail_on_spill else 0


if __name__ == "__main__":
    sys.exit(main())
