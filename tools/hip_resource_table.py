"""Turns clang's `-Rpass-analysis=kernel-resource-usage` remarks (AMDGPU) into one row per
kernel, fails (exit 1) if any kernel spills registers or uses scratch memory, and reports
which kernels miss the occupancy goals on gfx942:

- step forward kernels: >= 4 waves per SIMD, LDS <= 32 KB per workgroup;
- step backward kernels (snapshots, state gradient, columns): >= 2 waves per SIMD;
- chunked kernels (the fused forward and its backward saves pass, state gradient, grads; their
  tensor-core tiles live in registers): >= 2 waves per SIMD;
- the tensor-core tiles' self-test kernel: no occupancy goal (it still must not spill).

    python tools/hip_resource_table.py remarks.log [--out table.txt]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ptxas_table import demangle  # tools/ is the script's folder, first on sys.path

FIELD = re.compile(
    r"remark:\s+(Function Name|SGPRs|VGPRs|AGPRs|ScratchSize \[bytes/lane\]|"
    r"Occupancy \[waves/SIMD\]|SGPRs Spill|VGPRs Spill|LDS Size \[bytes/block\]): (\S+)"
)
KEYS = {
    "SGPRs": "sgpr",
    "VGPRs": "vgpr",
    "AGPRs": "agpr",
    "ScratchSize [bytes/lane]": "scratch",
    "Occupancy [waves/SIMD]": "waves",
    "SGPRs Spill": "sgpr_spill",
    "VGPRs Spill": "vgpr_spill",
    "LDS Size [bytes/block]": "lds",
}
MODES = {"0": "forward", "1": "bwd:snapshots", "2": "bwd:state-grad"}
CHUNKED = {"fused_forward": "chunk:forward", "state_grad": "chunk:state-grad", "grads": "chunk:grads"}


def describe(name: str) -> tuple[str, str]:
    """(role, compact name) from a demangled kernel name."""
    name = name.split("(")[0].removeprefix("void ").replace("arwkv::gpu::", "").replace(" ", "")
    if name.startswith("chunked::wkv_chunk_"):
        kind = name.removeprefix("chunked::wkv_chunk_").split("_kernel")[0]
        role = CHUNKED[kind]
        if role == "chunk:forward" and name.endswith(",true>"):  # the backward's saves pass
            role = "chunk:saves"
    elif name.startswith("wkv_columns_kernel"):
        role = "bwd:columns"
    elif not name.startswith("wkv_rows_kernel"):
        role = "selftest"  # e.g. tiles::tile_selftest_kernel: no occupancy goal, spills still fail
    else:
        role = MODES[name.rsplit(",", 1)[1].rstrip(">")]
    return role, name.replace("RowTile", "tile")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    kernels: list[dict] = []
    for line in args.log.read_text(errors="replace").splitlines():
        m = FIELD.search(line)
        if not m:
            continue
        key, value = m.groups()
        if key == "Function Name":
            kernels.append({"mangled": value})
        elif kernels:
            kernels[-1][KEYS[key]] = int(value)
    kernels = [k for k in kernels if "waves" in k]
    if not kernels:
        print(f"no kernel-resource-usage remarks in {args.log}", file=sys.stderr)
        return 1
    seen, rows = set(), []
    for k, name in zip(kernels, demangle([k["mangled"] for k in kernels]), strict=True):
        if k["mangled"] in seen:
            continue
        seen.add(k["mangled"])
        k["role"], k["name"] = describe(name)
        k["spills"] = bool(k["scratch"] or k["vgpr_spill"] or k["sgpr_spill"])
        problems = ["SPILLS/SCRATCH"] if k["spills"] else []
        if k["role"] == "forward" and k["waves"] < 4:
            problems.append("forward < 4 waves/SIMD")
        if k["role"] == "forward" and k["lds"] > 32 * 1024:
            problems.append("forward LDS > 32 KB")
        if k["role"].startswith("chunk:") and k["waves"] < 2:
            problems.append("chunked < 2 waves/SIMD")
        elif k["role"] not in ("forward", "selftest") and k["waves"] < 2:
            problems.append("backward < 2 waves/SIMD")
        k["check"] = "ok" if not problems else "misses: " + ", ".join(problems)
        rows.append(k)
    rows.sort(key=lambda k: (k["role"], k["name"]))
    width = max(len(k["name"]) for k in rows)
    header = "VGPRs SGPRs AGPRs  LDS_bytes scratch spills waves/SIMD  check"
    lines = [f"{'kernel':<{width}}  {'role':<15} {header}"]
    for k in rows:
        lines.append(
            f"{k['name']:<{width}}  {k['role']:<15} {k['vgpr']:>5} {k['sgpr']:>5} {k['agpr']:>5}"
            f"  {k['lds']:>9} {k['scratch']:>7} {k['vgpr_spill'] + k['sgpr_spill']:>6}"
            f" {k['waves']:>10}  {k['check']}"
        )
    spilled = [k for k in rows if k["spills"]]
    missed = [k for k in rows if k["check"] != "ok"]
    lines.append(
        f"gfx942: {len(rows)} kernels; {len(spilled)} spill or use scratch (must be 0); "
        f"{len(missed)} miss an occupancy goal (step forward >= 4 waves/SIMD and LDS <= 32 KB, "
        "step backward and chunked >= 2 waves/SIMD)"
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
